"""Chat completion: torchrun --nproc_per_node N example_chat_completion.py --ckpt_dir DIR --tokenizer_path FILE
(or plain `python example_chat_completion.py ...` for one process)."""

from typing import List, Optional

from llama import Dialog, Llama
from llama.cli import print0, run


def main(ckpt_dir: str, tokenizer_path: str, temperature: float = 0.6, top_p: float = 0.9, max_seq_len: int = 512,
         max_gen_len: Optional[int] = None, max_batch_size: int = 4, device: Optional[str] = None,
         dtype: Optional[str] = None):
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=max_batch_size, device=device, dtype=dtype)
    dialogs: List[Dialog] = [
        [{"role": "user", "content": "What is a good name for a grey cat?"}],
        [
            {"role": "user", "content": "I am planting a small vegetable garden."},
            {"role": "assistant", "content": "Lovely! Beans, lettuce and radishes are easy to start with."},
            {"role": "user", "content": "Which of those grows fastest?"},
        ],
        [
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    ]
    results = generator.chat_completion(dialogs, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    for dialog, result in zip(dialogs, results):
        for message in dialog:
            print0(f"{message['role'].capitalize()}: {message['content']}\n")
        print0(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print0("\n==================================\n")


if __name__ == "__main__":
    run(main)
