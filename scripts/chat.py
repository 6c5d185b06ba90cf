"""Chat with a model in the terminal, each answer printed while it is generated (``Llama.stream``).

    python scripts/chat.py [--ckpt_dir DIR --tokenizer_path FILE] [--system TEXT] [--temperature 0.6]
        [--top_p 0.9] [--max_seq_len 512] [--max_gen_len N] [--device cpu|cuda] [--dtype bfloat16|...]
    torchrun --nproc_per_node N scripts/chat.py ...      (the first process reads what you type)

Type a message and Enter. /reset starts the dialog again (keeping --system), /exit or the end of input (Ctrl-D)
ends it. When the dialog would leave fewer than max_gen_len positions of max_seq_len for the answer (a quarter of
them without --max_gen_len), its oldest exchanges are dropped. Each turn prefills only what the KV cache doesn't
hold from the turn before (``Llama.stream``'s keep_cache): the new message, not the whole dialog again. Without
--ckpt_dir and --tokenizer_path it talks to the demo model in models/demo, which answers in the Bible's words
whatever it is asked.
"""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama import Dialog, Llama, distributed  # noqa: E402
from llama.cli import checkpoint_or_demo, print0, run  # noqa: E402
from llama.sampling import check_sampling  # noqa: E402


def typed() -> Optional[str]:
    """A line typed on this process (None at the end of input): the first one's is each process's message
    (``distributed.from_first_rank``), however long the typing takes."""
    try:
        return input("> ")
    except EOFError:
        print()
        return None


def fit(generator: Llama, dialog: Dialog, room: int) -> Dialog:
    """The dialog without as many of its oldest exchanges as leave room positions for the answer (a system
    message stays)."""
    system = dialog[:1] if dialog[0]["role"] == "system" else []
    turns = dialog[len(system):]
    limit = generator.model.params.max_seq_len - room
    while len(turns) > 1 and len(generator.formatter.encode_dialog(system + turns)) > limit:
        turns = turns[2:]
    return system + turns


def main(ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None, system: Optional[str] = None,
         temperature: float = 0.6, top_p: float = 0.9, max_seq_len: int = 512, max_gen_len: Optional[int] = None,
         device: Optional[str] = None, dtype: Optional[str] = None):
    check_sampling(max_gen_len, temperature, top_p)  # before the load, which can take minutes
    if distributed.rank() == 0 and sys.stdin is None:
        raise ValueError("standard input is closed: the chat reads what you type there (or a file piped in)")
    ckpt_dir, tokenizer_path, max_gen_len = checkpoint_or_demo(ckpt_dir, tokenizer_path, max_gen_len)
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=1, device=device, dtype=dtype)
    if system:  # bytes that aren't UTF-8 (a terminal in another encoding): U+FFFD, as in what is typed below
        system = system.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    distributed.agree("to chat", system=system)
    if distributed.rank() == 0:  # bytes that aren't UTF-8 typed or piped in: U+FFFD, not an error
        sys.stdin.reconfigure(errors="replace")
    start: Dialog = [{"role": "system", "content": system}] if system else []
    dialog = list(start)
    while (message := distributed.from_first_rank(typed)) is not None:
        message = message.strip()
        if message == "/exit":
            break
        if message == "/reset":
            dialog = list(start)
            print0("(the dialog starts again)\n")
            continue
        if not message:
            continue
        asked = fit(generator, dialog + [{"role": "user", "content": message}], max_gen_len or max_seq_len // 4)
        if generator.formatter.is_unsafe(asked):
            print0("(not sent: the chat format's own tags, such as [INST], can't be part of a message)\n")
            continue
        answer = ""
        try:
            for piece in generator.stream(asked, temperature, top_p, max_gen_len, keep_cache=True):
                print0(piece, end="")
                answer += piece
        except distributed.Disagreement:  # the processes given different arguments: nothing can be sent
            raise
        except ValueError as e:  # a message too long for max_seq_len on its own
            print0(f"(not sent: {e})\n")
            continue
        print0("\n")
        dialog = asked + [{**generator.formatter.answer, "content": answer}]


if __name__ == "__main__":
    run(main)
