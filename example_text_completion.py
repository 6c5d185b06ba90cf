"""Text completion: torchrun --nproc_per_node N example_text_completion.py --ckpt_dir DIR --tokenizer_path FILE
(or plain `python example_text_completion.py ...` for one process).

Without --ckpt_dir and --tokenizer_path it runs the demo model in models/demo, a small Llama this project
trains on the King James Bible (scripts/train_demo.py), so the prompts are ones that suit both it and Llama 2.
"""

from typing import Optional

from llama import Llama
from llama.cli import checkpoint_or_demo, print0, run
from llama.sampling import check_sampling

PROMPTS = [
    # A plain continuation.
    "The LORD is my shepherd, I shall",
    # A familiar opening: what follows is the model's to say.
    "And the LORD said unto Moses,",
    # A story the model is to carry on.
    "And it came to pass, when the king heard these words, that he",
]


def main(ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None, temperature: float = 0.6,
         top_p: float = 0.9, max_seq_len: int = 128, max_gen_len: int = 64, max_batch_size: int = 4,
         device: Optional[str] = None, dtype: Optional[str] = None, compile_elementwise: bool = False):
    check_sampling(max_gen_len, temperature, top_p)  # before the load, which can take minutes
    ckpt_dir, tokenizer_path, max_gen_len = checkpoint_or_demo(ckpt_dir, tokenizer_path, max_gen_len)
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=max_batch_size, device=device, dtype=dtype,
                            compile_elementwise=compile_elementwise)
    results = generator.text_completion(PROMPTS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    for prompt, result in zip(PROMPTS, results):
        print0(prompt)
        print0(f"> {result['generation']}")
        print0("\n==================================\n")


if __name__ == "__main__":
    run(main)
