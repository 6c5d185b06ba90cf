"""Chat completion: torchrun --nproc_per_node N example_chat_completion.py --ckpt_dir DIR --tokenizer_path FILE
(or plain `python example_chat_completion.py ...` for one process).

Without --ckpt_dir and --tokenizer_path it runs the demo model in models/demo, a small Llama this project
trains on the King James Bible (scripts/train_demo.py). It was never taught to chat: it answers in the
Bible's words whatever is asked, and, unless --max_gen_len says otherwise, 64 tokens at most, since it was
trained on sequences of 256 tokens.
"""

from typing import List, Optional

from llama import Dialog, Llama
from llama.cli import checkpoint_or_demo, print0, run
from llama.sampling import check_sampling

DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "Who was the first man, and what was his work in the garden?"}],
    [
        {"role": "user", "content": "I am planting a vineyard."},
        {"role": "assistant", "content": "Then choose good ground, and be patient: the vine bears in its season."},
        {"role": "user", "content": "What should I do when the grapes are ripe?"},
    ],
    [
        {"role": "system", "content": "Answer in the style of the King James Bible."},
        {"role": "user", "content": "Why should a man be kind to a stranger?"},
    ],
]


def main(ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None, temperature: float = 0.6,
         top_p: float = 0.9, max_seq_len: int = 512, max_gen_len: Optional[int] = None, max_batch_size: int = 4,
         device: Optional[str] = None, dtype: Optional[str] = None, compile_elementwise: bool = False):
    check_sampling(max_gen_len, temperature, top_p)  # before the load, which can take minutes
    ckpt_dir, tokenizer_path, max_gen_len = checkpoint_or_demo(ckpt_dir, tokenizer_path, max_gen_len)
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=max_batch_size, device=device, dtype=dtype,
                            compile_elementwise=compile_elementwise)
    results = generator.chat_completion(DIALOGS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    for dialog, result in zip(DIALOGS, results):
        for message in dialog:
            print0(f"{message['role'].capitalize()}: {message['content']}\n")
        print0(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print0("\n==================================\n")


if __name__ == "__main__":
    run(main)
