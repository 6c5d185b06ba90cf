"""Rewrite a checkpoint in Meta's format with another number of shards.

    python scripts/reshard.py --ckpt_dir IN --out_dir OUT --mp N [--force]

OUT gets params.json (the same values), consolidated.00.pth .. N-1 (the same tensors, re-cut along each
weight's sharded dimension, in the dtype they were saved in), a fresh checklist.chk, and IN's tokenizer.model
where it has one (a tokenizer.model in OUT is otherwise left as it was, with a warning). One output shard is
held in memory at a time. The engine itself loads any shard count on any number of processes; resharding once
saves that work at every start, and gives files Meta's reference code can load with N processes.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama.checkpoint import reshard  # noqa: E402
from llama.cli import one_line_errors, output_dir, positive_int  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True, help="the checkpoint to read")
    parser.add_argument("--out_dir", required=True, help="where to write the resharded checkpoint")
    parser.add_argument("--mp", type=positive_int, required=True, help="number of shards to write")
    parser.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    args = parser.parse_args()
    src, out = Path(args.ckpt_dir).resolve(), Path(args.out_dir).resolve()
    if out == src:
        raise ValueError("--out_dir must differ from --ckpt_dir (the input would be overwritten while read)")
    with output_dir(str(out), args.force):
        reshard(str(src), str(out), args.mp)  # with src's tokenizer.model, in place of any there before
        if not (src / "tokenizer.model").is_file() and (out / "tokenizer.model").exists():  # the user's: kept
            print(f"warning: {out / 'tokenizer.model'} was there before and is kept, but {src} has no "
                  "tokenizer.model to say it is this model's: check that it is", file=sys.stderr)
    print(f"wrote {args.mp} shard(s) to {out}")


if __name__ == "__main__":
    with one_line_errors():
        main()
