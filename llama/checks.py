"""Checks of user input that several modules make alike: numbers as users mean them, and the error for a file
the OS won't let us read."""

import numbers
import os
from pathlib import Path
from typing import Union


def is_int(x: object) -> bool:
    """An integer of Python's or numpy's; not a bool, which is one to Python, not to a user."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x: object) -> bool:
    """A real number of Python's or numpy's, not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def cannot_read(path: Union[str, Path], error: OSError) -> ValueError:
    """The error for an OSError met reading path: the file and the OS's reason. Downloading the file again would
    not help, so unlike a damaged file's error this one doesn't say to."""
    reason = (error.strerror or str(error)).lower()
    if isinstance(error, PermissionError):
        reason += "; your user needs read access to it (ls -l shows its owner and mode)"
    elif isinstance(error, IsADirectoryError):
        reason = "it is a folder, not a file"
    elif os.path.islink(path) and not os.path.exists(path):
        reason = f"it is a symbolic link to {os.readlink(path)}, which does not exist"
    return ValueError(f"cannot read {path}: {reason}")
