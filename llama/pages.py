"""Memory pages of memory-mapped shards: read them in ahead of use, or let go of them after a copy (a slice
copied out, a weight packed into another layout).

A rank maps every shard but keeps only its slice. Pages it touched to copy a slice would otherwise stay in its
resident set until the whole shard is unmapped, so peak memory would be the mapped shards plus the copies.
Dropping them (MADV_DONTNEED on a private, never-written file mapping) only forgets them: touched again, they
are read back from the file, so this is always safe. Elsewhere than Linux nothing is dropped (nor droppable),
and reading ahead touches each page.
"""

import ctypes
import mmap
import sys
from typing import Callable

import torch

MADV_WILLNEED, MADV_DONTNEED, MADV_POPULATE_READ = 3, 4, 22
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes from t's first element to its last, whatever its strides."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _advise(t: torch.Tensor, advice: int) -> bool:
    """madvise the whole pages under t; whether the kernel did (False also where there is nothing to do)."""
    if _libc is None or t.device.type != "cpu" or t.numel() == 0:
        return False
    start, end = _span(t)
    start = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the span only
    end = end // mmap.PAGESIZE * mmap.PAGESIZE
    return end > start and _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice) == 0


def drop(t: torch.Tensor) -> None:
    """Let go of the whole pages under t (a view of a memory-mapped file that is not written to)."""
    _advise(t, MADV_DONTNEED)


def prefault(t: torch.Tensor) -> None:
    """Read in every page of a contiguous memory-mapped tensor now: ask the kernel to read the whole range
    ahead (from disk in large requests, not a page per fault), then map it all in one call (Linux 5.14+;
    a fault per page costs about as much as reading the page cache), or else touch one byte per page."""
    if t.numel():
        _advise(t, MADV_WILLNEED)
        if not _advise(t, MADV_POPULATE_READ):
            t.reshape(-1).view(torch.uint8)[:: mmap.PAGESIZE].sum()


def droppable() -> Callable[[torch.Tensor], bool]:
    """A test of whether ``drop`` may let go of a tensor's pages: it lies in one private mapping of a regular
    file (as torch.load(mmap=True) makes), and none of its pages was written to. Anonymous memory, or a page
    copied on write (an edit the file doesn't have), would read back as zeros or as the file. The mappings are
    taken from /proc/self/maps as they are now, the pages' state from /proc/self/pagemap; elsewhere than Linux,
    nothing is droppable."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1].endswith("p") and fields[4] != "0" and fields[5].startswith("/") \
                        and not fields[5].startswith("/dev/"):
                    spans.append(tuple(int(a, 16) for a in fields[0].split("-")))
    except OSError:
        pass

    def test(t: torch.Tensor) -> bool:
        if t.device.type != "cpu" or t.numel() == 0:
            return False
        start, end = _span(t)
        return any(lo <= start and end <= hi for lo, hi in spans) and _unwritten(start, end)
    return test


def _unwritten(start: int, end: int) -> bool:
    """Whether every page from start to end is either not in memory or the file's own page: pagemap's bits 63
    (present), 62 (swapped: only anonymous pages are) and 61 (a file page)."""
    try:
        entries = pagemap(start // mmap.PAGESIZE, (end - 1) // mmap.PAGESIZE + 1)
    except OSError:
        return False
    present, swapped, file_page = entries < 0, (entries >> 62) & 1 == 1, (entries >> 61) & 1 == 1
    return not bool((swapped | (present & ~file_page)).any())


def pagemap(first: int, end: int) -> torch.Tensor:
    """/proc/self/pagemap's entries (int64) for this process's pages first..end-1 (Linux only: OSError
    elsewhere)."""
    if end <= first:
        return torch.empty(0, dtype=torch.int64)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        return torch.frombuffer(bytearray(f.read((end - first) * 8)), dtype=torch.int64)
