"""Code Llama's infilling: torchrun --nproc_per_node N example_infilling.py --ckpt_dir DIR --tokenizer_path FILE
(or plain `python example_infilling.py ...` for one process).

The model writes the code between each prefix and suffix. It needs a Code Llama checkpoint trained for it
(Code Llama or Code Llama - Instruct, 7B or 13B) and its tokenizer; the demo model can't infill.
"""

from typing import Optional

from llama import Llama, Tokenizer
from llama.chat import check_infilling
from llama.cli import print0, run
from llama.sampling import check_sampling

PREFIXES = [
    'def fibonacci(n: int) -> int:\n    """The n-th Fibonacci number, from fibonacci(0) = 0."""\n    ',
    "import json\n\n\ndef load_config(path: str) -> dict:\n    ",
    "<!-- three fruits -->\n<ul>\n",
]
SUFFIXES = [
    "\n    return a\n",
    "\n    return config\n",
    "\n</ul>\n",
]


def main(ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None, temperature: float = 0.0,
         top_p: float = 0.9, max_seq_len: int = 192, max_gen_len: int = 128, max_batch_size: int = 4,
         suffix_first: bool = False, device: Optional[str] = None, dtype: Optional[str] = None,
         compile_elementwise: bool = False):
    check_sampling(max_gen_len, temperature, top_p)  # before the load, which can take minutes
    if ckpt_dir is None or tokenizer_path is None:
        raise ValueError("pass --ckpt_dir and --tokenizer_path of a Code Llama checkpoint (7B or 13B, base or "
                         "Instruct): infilling needs its tokenizer, and the demo model can't infill")
    check_infilling(Tokenizer(tokenizer_path))  # before the load, which can take minutes
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=max_batch_size, device=device, dtype=dtype,
                            compile_elementwise=compile_elementwise)
    results = generator.text_infilling(PREFIXES, SUFFIXES, temperature=temperature, top_p=top_p,
                                       max_gen_len=max_gen_len, suffix_first=suffix_first)
    for prefix, suffix, result in zip(PREFIXES, SUFFIXES, results):
        print0("\n================= prefix =================")
        print0(prefix)
        print0("================= the model's middle =================")
        print0(result["generation"])
        print0("================= suffix =================")
        print0(suffix)


if __name__ == "__main__":
    run(main)
