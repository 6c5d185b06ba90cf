"""What the example and script entry points share: fire arguments, logging on rank 0 only, and a bad input
reported as one line on stderr with exit code 1 (on every rank) instead of a traceback."""

import argparse
import contextlib
import difflib
import functools
import inspect
import logging
import os
import re
import shutil
import signal
import socket
import sys
import typing
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import fire

from . import checkpoint, distributed

DEMO_DIR = Path(__file__).resolve().parents[1] / "models" / "demo"
DEMO_MAX_GEN_LEN = 64  # the demo model was trained on sequences of 256 tokens: its default max_gen_len


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input (a ValueError) ends the program with one line on stderr and exit code 1, not a traceback."""
    try:
        yield
        sys.stdout.flush()  # now, where a reader gone (below) is caught, rather than at the exit
    except BrokenPipeError as e:  # the reader of its output gone (`| head -1`): it stops, quietly, as others do
        distributed.tell_the_others(e)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush would fail again)
        sys.exit(141)  # 128 + SIGPIPE: the shell's status for a program that signal stopped
    except ValueError as e:
        distributed.tell_the_others(e)
        sys.stderr.write(f"error: {e}\n")  # one write: the ranks' lines don't interleave
        sys.stderr.flush()
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C: no traceback, the shell's exit status for it
        distributed.tell_the_others(e)
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except BaseException as e:  # a crash, or an exit: the other ranks mustn't wait for this one either
        if not (isinstance(e, SystemExit) and e.code in (None, 0)):
            distributed.tell_the_others(e)
        me = f"rank {distributed.rank()} (on {socket.gethostname()})"
        lost, late = distributed.lost_peer(e), distributed.timed_out(e)
        if isinstance(e, distributed.OtherRankFailed):  # the crash was another rank's: its traceback is the one
            sys.stderr.write(f"error: {e}\n")
        elif lost:
            sys.stderr.write(f"error: {me} lost the other processes mid-run ({lost}): one of them failed or was "
                             "killed, and its error is above, or in its machine's log\n")
        elif late:
            sys.stderr.write(f"error: {me} waited for the other processes longer than LLAMA_DIST_TIMEOUT allows "
                             f"({distributed.timeout().total_seconds():g} s; {late}): one of them is stuck, or much "
                             "slower (a cold disk, a network file system): if it is only slow, set "
                             "LLAMA_DIST_TIMEOUT=<seconds> higher on every machine\n")
        else:
            raise
        sys.exit(1)


@contextlib.contextmanager
def output_dir(path: str, force: Optional[bool] = None) -> Iterator[Path]:
    """The folder a script writes a checkpoint into: a folder or nothing yet, and empty unless force (None: the
    script has no --force). Where the writing fails, or is interrupted (Ctrl-C, or SIGTERM from ``kill``, a
    timeout or a job scheduler), a folder that was empty is emptied again (itself kept, with its permissions, or
    the link to it) and one that was absent removed: a second try would refuse it half-written, as not empty. A
    folder holding only what a killed write left (``checkpoint.leftovers``) counts as empty."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out_dir {out} is a file: name a folder (it is made if it doesn't exist)")
    empty = not out.exists() or set(out.iterdir()) <= set(checkpoint.leftovers(out))  # (save removes those)
    if not empty and not force:
        raise ValueError(f"{out} is not empty: choose an empty --out_dir"
                         + (", or pass --force to write into it" if force is not None else ""))
    existed = out.exists()
    terminate = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield out
    except BaseException:
        if empty and existed:
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif empty and out.exists():
            shutil.rmtree(out)
        raise
    finally:
        signal.signal(signal.SIGTERM, terminate)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds, so that what was being written is cleaned up


def run(main: Callable) -> None:
    """An example's entry point: fire's arguments, INFO logging on rank 0, one_line_errors. A character the
    output's encoding lacks (PYTHONIOENCODING=ascii, a Windows console) is printed as "?", where it ended the run
    at the first such piece of a generation."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    logging.basicConfig(level=logging.INFO if distributed.rank() == 0 else logging.WARNING,
                        format="%(message)s")
    with one_line_errors():
        call(main, sys.argv[1:])


def call(main: Callable, argv: List[str]) -> object:
    """main given a command line's arguments as fire gives them, its flags checked first (check_flags, typed)."""
    check_flags(main, argv)
    return fire.Fire(typed(main), command=as_typed(main, argv))


FLAG = re.compile(r"--?([A-Za-z_][\w-]*)(=.*)?", re.S)


def as_typed(main: Callable, argv: List[str]) -> List[str]:
    """argv with the values of main's str flags quoted as Python strings, which fire passes on as they are: it
    reads any other value as a Python literal, --system 'pirate, concise' as a tuple and --ckpt_dir 1e3 as
    1000.0. (A flag followed by another flag, or by nothing, has no value to quote: ``typed`` says so. None,
    for a flag that may be None, stays fire's None: ``--dtype None``, the machine's pick.)"""
    hints = typing.get_type_hints(main)
    strings = {name: hint for name, hint in hints.items() if hint in (str, Optional[str])}

    def quoted(name: str, value: str) -> str:
        return value if value == "None" and strings[name] is not str else repr(value)

    out: List[str] = []
    before = None  # the flag before arg, if it is one
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        flag = FLAG.fullmatch(arg)
        if flag and flag.group(2) and (name := flag.group(1).replace("-", "_")) in strings:
            arg = f"{arg.split('=')[0]}={quoted(name, flag.group(2)[1:])}"
        elif not flag and before and not before.group(2) and (name := before.group(1).replace("-", "_")) in strings:
            arg = quoted(name, arg)
        out.append(arg)
        before = flag
    return out


def typed(main: Callable) -> Callable:
    """main, its bool and str flags checked as fire gives them: fire passes ``--flag=false`` on as the string
    'false' (true to Python), a ``--path`` with no value as True, and a path of digits given without its flag
    name (``as_typed`` quotes the others) as a number."""
    hints = typing.get_type_hints(main)

    @functools.wraps(main)
    def checked(*args, **kwargs):
        bound = inspect.signature(main).bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if hints.get(name) is bool and not isinstance(value, bool):
                raise ValueError(f"--{name} is true or false (--{name} or --no{name}), got {value!r}")
            if hints.get(name) in (str, Optional[str]) and not isinstance(value, str) and value is not None:
                if isinstance(value, bool):
                    raise ValueError(f"--{name} needs a value: --{name} {name.upper()}")
                bound.arguments[name] = str(value)
        return main(*bound.args, **bound.kwargs)

    return checked


def check_flags(main: Callable, argv: List[str]) -> None:
    """Refuse a --flag that main doesn't take before anything runs: fire would run the whole job with the flags
    it knows and only then fail on the one it didn't (a misspelt --max_gen_length, after the generation)."""
    params = inspect.signature(main).parameters
    for arg in argv:
        if arg == "--":  # fire's own flags follow (-- --help)
            return
        flag = re.fullmatch(r"--?([A-Za-z_][\w-]*)(=.*)?", arg)  # fire takes -flag too
        if flag is None or flag.group(1) in ("help", "h") or re.fullmatch(r"-\w", arg):  # -m: fire's short flags
            continue
        name = flag.group(1).replace("-", "_")
        if name in params or (name.startswith("no") and name[2:] in params):  # fire's --noFLAG for booleans
            continue
        close = difflib.get_close_matches(name, params, n=1)
        hint = f"did you mean --{close[0]}? " if close else ""
        raise ValueError(f"unknown flag {arg.split('=')[0]}: {hint}the flags are "
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


def checkpoint_or_demo(ckpt_dir: Optional[str], tokenizer_path: Optional[str],
                       max_gen_len: Optional[int] = None) -> Tuple[str, str, Optional[int]]:
    """(ckpt_dir, tokenizer_path, max_gen_len): both paths given, or neither for the small model this repository
    ships in models/demo, so a fresh clone can generate without Meta's weights; max_gen_len None is the demo's
    own default there (it was trained on short sequences), and stays None for a checkpoint of the user's."""
    for flag, value in (("--ckpt_dir", ckpt_dir), ("--tokenizer_path", tokenizer_path)):
        if value == "":
            raise ValueError(f"{flag} is empty: give it the path (an unset shell variable, maybe)")
    if ckpt_dir is not None and tokenizer_path is not None:
        return ckpt_dir, tokenizer_path, max_gen_len
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
    return str(DEMO_DIR), str(DEMO_DIR / "tokenizer.model"), DEMO_MAX_GEN_LEN if max_gen_len is None else max_gen_len
