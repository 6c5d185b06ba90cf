"""What the example and script entry points share: fire arguments, logging on rank 0 only, and a bad input
reported as one line on stderr with exit code 1 (on every rank) instead of a traceback."""

import logging
import sys
from typing import Callable

import fire
import torch.distributed as dist

from . import distributed


def run(main: Callable) -> None:
    logging.basicConfig(level=logging.INFO if distributed.rank() == 0 else logging.WARNING,
                        format="%(message)s")
    try:
        fire.Fire(main)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only: every rank computes the same text."""
    if distributed.rank() == 0:
        print(*args, **kwargs, flush=True)
