"""Text completion: torchrun --nproc_per_node N example_text_completion.py --ckpt_dir DIR --tokenizer_path FILE
(or plain `python example_text_completion.py ...` for one process)."""

from typing import Optional

from llama import Llama
from llama.cli import print0, run


def main(ckpt_dir: str, tokenizer_path: str, temperature: float = 0.6, top_p: float = 0.9, max_seq_len: int = 128,
         max_gen_len: int = 64, max_batch_size: int = 4, device: Optional[str] = None, dtype: Optional[str] = None):
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=max_batch_size, device=device, dtype=dtype)
    prompts = [
        # A plain continuation.
        "The old lighthouse keeper climbed the stairs and",
        # A question, answered in a few words.
        "Water boils at sea level at a temperature of",
        # A pattern the model is to continue (few-shot).
        """Plural forms:
cat => cats
box => boxes
child => children
mouse =>""",
    ]
    results = generator.text_completion(prompts, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    for prompt, result in zip(prompts, results):
        print0(prompt)
        print0(f"> {result['generation']}")
        print0("\n==================================\n")


if __name__ == "__main__":
    run(main)
