"""What the example and script entry points share: fire arguments, logging on rank 0 only, and a bad input
reported as one line on stderr with exit code 1 (on every rank) instead of a traceback."""

import argparse
import contextlib
import difflib
import inspect
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import fire
import torch.distributed as dist

from . import distributed

DEMO_DIR = Path(__file__).resolve().parents[1] / "models" / "demo"
DEMO_MAX_GEN_LEN = 64  # the demo model was trained on sequences of 256 tokens: its default max_gen_len


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input (a ValueError) ends the program with one line on stderr and exit code 1, not a traceback."""
    try:
        yield
    except ValueError as e:
        distributed.tell_the_others(e)
        sys.stderr.write(f"error: {e}\n")  # one write: the ranks' lines don't interleave
        sys.stderr.flush()
        sys.exit(1)
    except BaseException as e:  # a crash or Ctrl-C: the other ranks mustn't wait for this one either
        if not (isinstance(e, SystemExit) and e.code in (None, 0)):
            distributed.tell_the_others(e)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def output_dir(path: str, force: Optional[bool] = None) -> Iterator[Path]:
    """The folder a script writes a checkpoint into: a folder or nothing yet, and empty unless force (None: the
    script has no --force). Where the writing fails, a folder that was empty or absent is left so again: a second
    try would refuse it half-written, as not empty."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out_dir {out} is a file: name a folder (it is made if it doesn't exist)")
    empty = not out.exists() or not any(out.iterdir())
    if not empty and not force:
        raise ValueError(f"{out} is not empty: choose an empty --out_dir"
                         + (", or pass --force to write into it" if force is not None else ""))
    existed = out.exists()
    try:
        yield out
    except BaseException:
        if empty and out.exists():
            shutil.rmtree(out)
            if existed:
                out.mkdir()
        raise


def run(main: Callable) -> None:
    """An example's entry point: fire's arguments, INFO logging on rank 0, one_line_errors."""
    logging.basicConfig(level=logging.INFO if distributed.rank() == 0 else logging.WARNING,
                        format="%(message)s")
    with one_line_errors():
        check_flags(main, sys.argv[1:])
        fire.Fire(main)


def check_flags(main: Callable, argv: List[str]) -> None:
    """Refuse a --flag that main doesn't take before anything runs: fire would run the whole job with the flags
    it knows and only then fail on the one it didn't (a misspelt --max_gen_length, after the generation)."""
    params = inspect.signature(main).parameters
    for arg in argv:
        if arg == "--":  # fire's own flags follow (-- --help)
            return
        flag = re.fullmatch(r"--([A-Za-z_][\w-]*)(=.*)?", arg)
        if flag is None or flag.group(1) in ("help", "h"):
            continue
        name = flag.group(1).replace("-", "_")
        if name in params or (name.startswith("no") and name[2:] in params):  # fire's --noFLAG for booleans
            continue
        close = difflib.get_close_matches(name, params, n=1)
        hint = f"did you mean --{close[0]}? " if close else ""
        raise ValueError(f"unknown flag --{flag.group(1)}: {hint}the flags are "
                         + ", ".join(f"--{p}" for p in params))


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def print0(*args, **kwargs) -> None:
    """print on rank 0 only: every rank computes the same text."""
    if distributed.rank() == 0:
        print(*args, **kwargs, flush=True)


def checkpoint_or_demo(ckpt_dir: Optional[str], tokenizer_path: Optional[str]) -> Tuple[str, str, bool]:
    """(ckpt_dir, tokenizer_path, whether it is the demo model): both paths given, or neither for the small
    model this repository ships in models/demo, so a fresh clone can generate without Meta's weights."""
    if ckpt_dir is not None and tokenizer_path is not None:
        return ckpt_dir, tokenizer_path, False
    if ckpt_dir is not None or tokenizer_path is not None:
        raise ValueError("pass both --ckpt_dir and --tokenizer_path, or neither to run the demo model in models/demo")
    if not (DEMO_DIR / "params.json").is_file():
        raise ValueError(f"no --ckpt_dir given and the demo model is not in {DEMO_DIR} (it comes with a clone of "
                         "the repository); pass --ckpt_dir and --tokenizer_path")
    try:
        shown = DEMO_DIR.relative_to(Path.cwd())
    except ValueError:
        shown = DEMO_DIR
    print0(f"using the demo model in {shown} (pass --ckpt_dir and --tokenizer_path for your own)\n")
    return str(DEMO_DIR), str(DEMO_DIR / "tokenizer.model"), True
