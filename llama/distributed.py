"""Device, backend and process group: with torchrun, or with no launcher at all.

Meta's reference needs torchrun even for one process, and fails when ``Llama.build`` is called twice in one
Python session. Here a missing launcher means a one-process group, and a group that already exists is reused.
"""

import atexit
import contextlib
import datetime
import io
import math
import os
import re
import socket
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, TypeVar, Union

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as mp_init

from .checks import is_int, is_number

T = TypeVar("T")


def timeout() -> datetime.timedelta:
    """How long a collective waits for a rank that died before it fails, instead of hanging the run:
    LLAMA_DIST_TIMEOUT seconds, 600 by default."""
    text = os.environ.get("LLAMA_DIST_TIMEOUT", "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(f"LLAMA_DIST_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def pick_device(device: Union[str, torch.device, None]) -> torch.device:
    """The requested device, or CUDA when available, else the CPU; each launched rank gets its own GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: pass 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        backend = getattr(torch, device.type, None)
        if not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"device {str(device)!r} was asked for but torch has no such device here: pass 'cpu' "
                             "or 'cuda'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU: pass device='cpu' (--device cpu)")
        if device.index is None:
            local, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
            if local > gpus:  # nccl would refuse two ranks on one GPU, in a collective, with its own words
                raise ValueError(f"{local} processes on this machine, but torch sees {gpus} GPU(s) here: each "
                                 f"process needs one of its own. Launch at most {gpus} a machine (torchrun "
                                 f"--nproc_per_node {gpus}: a checkpoint of more shards loads on fewer processes), "
                                 "or compute on the CPU (--device cpu)")
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


# What a launcher (torchrun, a SLURM or MPI job script) sets for each process it starts.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one rank of several."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launcher_env(rank: int, world: int, port: int, addr: str = "127.0.0.1") -> Dict[str, str]:
    """The variables a launcher sets for rank of world processes on one machine, meeting at addr:port: for
    starting the ranks of a run without torchrun (whose agent is one more process importing torch)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


def init_process_group(device: torch.device) -> None:
    """Join torchrun's group if launched by it, else start a one-process group; reuse one that exists."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if launched():
        limit = timeout()
        store, rank, world = next(dist.rendezvous("env://", timeout=limit))  # torchrun's, as init_method's is
        _meet(store, rank, world, limit)
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world,
                                timeout=limit)
    else:  # its store in the process: no port to find (or to race another process for), no network, and none of
        # the TCP store that PyTorch's Windows builds without libuv failed to make
        hook = sys.excepthook  # which torch's would replace with one putting "[rank0]: " before every line
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout())
        sys.excepthook = hook
    # A group left to the interpreter's exit can abort the process there ("terminate called without an active
    # exception"), and torchrun then ends the others, before rank 0 has printed: research code that builds and
    # returns never tears it down itself.
    atexit.register(_tear_down)


def _tear_down() -> None:
    if dist.is_initialized():
        # Before torch 2.8 (pytorch#154976) the group's destructor held the GIL while it joined gloo's threads,
        # one of which may still need it to free the last collective's tensors: a run's processes hung at exit in
        # 2 to 3 of 12 tries on torch 2.5 and 2.6. A moment with the GIL free lets that thread finish first.
        time.sleep(0.05)
        dist.destroy_process_group()


_MET = "llama/met/"  # the launcher's store's keys: each rank's as it comes to make the process group
_FAILED = "llama/failed"  # a rank's error, where it failed before
_TOLD = "llama/told/"  # and each rank's, once it has read that error (or had its own)
_LINGER = 15.0  # seconds a failed rank 0 holding the store waits for the others to read its error


def _store_holder() -> str:
    """Who holds the store the ranks meet at: torchrun's agent, or else (another launcher) rank 0 itself."""
    return "torchrun's agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0"


class OtherRankFailed(RuntimeError):
    """Another rank's crash (not bad input), as this rank learnt of it: its traceback is that rank's to print."""


class PeerFailed(ValueError):
    """Another rank's failure before the process group, as this rank learnt of it: not to tell again (telling
    would reach for a store that may be gone with that rank, retrying for seconds)."""


def _meet(store: dist.Store, rank: int, world: int, limit: datetime.timedelta) -> None:
    """Wait until every rank has come to make the process group, or one has said it failed before it
    (``tell_the_others``): then fail with its message. Making the group would wait the limit for a rank that had
    exited, then fail saying nothing of it (one machine given a misspelt flag: the others waited ten minutes)."""
    everyone = [f"{_MET}{r}" for r in range(world)]
    deadline = time.monotonic() + limit.total_seconds()
    try:
        store.set(f"{_MET}{rank}", socket.gethostname())
        while not store.check(everyone):
            if store.check([_FAILED]):
                failed = store.get(_FAILED).decode()
                store.set(f"{_TOLD}{rank}", "")
                raise PeerFailed(failed)
            if time.monotonic() > deadline:
                missing = [r for r in range(world) if not store.check([f"{_MET}{r}"])]
                raise RuntimeError(f"rank(s) {missing} did not come to make the process group within {limit}: "
                                   "they exited or hung before it (their output says why), or can't reach "
                                   "MASTER_ADDR")
            time.sleep(0.05)
    except dist.DistError as e:  # the store is gone with the process that held it
        where = f"MASTER_ADDR {os.environ.get('MASTER_ADDR')}, MASTER_PORT {os.environ.get('MASTER_PORT')}"
        raise PeerFailed(f"{_store_holder()}, which held the store the ranks meet at ({where}), went away before "
                         "the process group was made: its output says why") from e


def tell_the_others(error: BaseException) -> None:
    """Where this rank fails before the process group exists (a bad flag on one machine), leave its error for
    the ranks waiting to meet it (``_meet``), so that they fail with it at once. Rank 0 holds the store itself
    where the launcher is not torchrun (whose agent holds it): it waits for the others to read the error before
    its exit takes the store away. Best effort: a rank that can't reach the store leaves the others to time out."""
    if dist.is_initialized() or not launched() or isinstance(error, PeerFailed):
        return
    message = f"rank {rank()} (on {socket.gethostname()}) failed before the process group was made: " + (
        str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}")
    with contextlib.suppress(Exception):
        store, me, world = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=10)))
        store.compare_set(_FAILED, "", message)  # the first rank's error, not a waiting rank's echo of it
        store.set(f"{_TOLD}{me}", "")
        if me == 0 and _store_holder() == "rank 0":
            deadline = time.monotonic() + _LINGER
            while not store.check([f"{_TOLD}{r}" for r in range(world)]) and time.monotonic() < deadline:
                time.sleep(0.05)


def lost_peer(error: BaseException) -> Optional[str]:
    """Where error is this rank's collective failing because another process of the run went away (gloo's
    "Connection closed by peer", or the launcher's store gone with rank 0), a consequence and not the cause:
    what it says of that, in a few words. Else None."""
    if not dist.is_initialized() or not isinstance(error, RuntimeError):
        return None
    said = re.search(r"Connection (closed|reset) by peer( \S+)?", str(error))  # (its address, where given)
    if said:
        return said.group(0).rstrip(".")
    return str(error).splitlines()[0] if isinstance(error, dist.DistNetworkError) else None


def timed_out(error: BaseException) -> Optional[str]:
    """Where error is this rank's collective giving up on the others after ``timeout()`` (gloo's "Timed out
    waiting ..."): what it says, in a few words. Else None."""
    if not dist.is_initialized() or not isinstance(error, RuntimeError):
        return None
    said = re.search(r"[Tt]imed out[^\n]*", str(error))
    return said.group(0).rstrip(".") if said else None


def cpu_threads(env: Mapping[str, str], cpus: int) -> Optional[int]:
    """The threads a CPU process should take where torchrun's default would leave the machine idle, else None.

    torchrun gives each of several processes on a machine OMP_NUM_THREADS=1 unless it is set: right for GPU
    processes, but a CPU run then computes on one core per process, however many the machine has (and with it
    unset, each would take every core). Each process takes its share of the CPUs instead. A number other than 1
    in OMP_NUM_THREADS is the user's and is kept.
    """
    local = int(env.get("LOCAL_WORLD_SIZE", "1"))
    if env.get("OMP_NUM_THREADS", "1") == "1" and local > 1:
        return max(1, cpus // local)
    return None


def setup(model_parallel_size: Optional[int], device: Union[str, torch.device, None]) -> torch.device:
    """Process group plus fairscale's model-parallel group; returns this rank's device.

    model_parallel_size defaults to the world size: every process holds a slice of every layer.
    """
    device = pick_device(device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = cpu_threads(os.environ, cpus) if device.type == "cpu" else None
    if threads:
        torch.set_num_threads(threads)
    init_process_group(device)
    world = dist.get_world_size()
    mp = model_parallel_size or world
    if mp_init.model_parallel_is_initialized():
        have = mp_init.get_model_parallel_world_size()
        if have != mp:
            raise ValueError(f"this process already has a model-parallel group of size {have}; "
                             f"model_parallel_size={mp} can't be built beside it in the same process")
    else:
        if world % mp:
            raise ValueError(f"model_parallel_size={mp} must divide the number of processes, here {world}: launch "
                             f"a multiple of {mp} (torchrun --nproc_per_node {mp}), or leave it unset")
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes on rank 0
            mp_init.initialize_model_parallel(mp)
    return device


def rank() -> int:
    """This process's rank; before the group exists, the one its launcher gave it (RANK), else 0."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def as_first_rank_has_it(t: torch.Tensor) -> torch.Tensor:
    """t, in place, as the first rank of this model-parallel group has it: for what each rank computes alone
    and the others must agree with, such as a sampled token (where the ranks' CPUs differ, a last bit of a
    softmax can differ, and with it a draw; ranks fed different tokens would compute nonsense together)."""
    if dist.is_initialized() and mp_init.get_model_parallel_world_size() > 1:
        dist.broadcast(t, mp_init.get_model_parallel_src_rank(), group=mp_init.get_model_parallel_group())
    return t


def any_rank(flag: bool) -> bool:
    """Whether flag holds on any rank of this model-parallel group. For what each rank decides from its own state
    (a hook that research code put on one rank only, a cache one rank holds), where the ranks must go the same way
    or their collectives won't match: a collective, which every rank of the group must call."""
    return any_ranks(flag)[0]


def any_ranks(*flags: bool) -> List[bool]:
    """``any_rank`` of each flag, in one collective."""
    return [bool(v) for v in _reduced([int(f) for f in flags], dist.ReduceOp.MAX)]


def least(value: int) -> int:
    """value's smallest on any rank of this model-parallel group (as ``any_rank``, for the ranks to agree)."""
    return _reduced([value], dist.ReduceOp.MIN)[0]


def _reduced(values: List[int], op: dist.ReduceOp) -> List[int]:
    if not dist.is_initialized() or not mp_init.model_parallel_is_initialized() \
            or mp_init.get_model_parallel_world_size() == 1:
        return values
    group = mp_init.get_model_parallel_group()
    t = torch.tensor(values, device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def everyones(value: T, group: Optional[dist.ProcessGroup] = None) -> List[T]:
    """Every rank's value (of the group, else of the world), by rank: a collective, which all its ranks must
    call."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [value]
    values: List[T] = [value] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


_PATIENT: Optional[dist.ProcessGroup] = None  # from_first_rank's group, made on first use


def from_first_rank(read: Callable[[], T]) -> T:
    """What read() gives on the first rank, on every rank: a collective, which all ranks must call, over a group
    of its own that waits without a time limit. It is for what a person types on the first process, who may take
    longer than ``timeout()``, after which a collective of the run's group fails (and nccl's watchdog ends the
    processes). The group is made before rank 0 reads, and the others' wait is polled from Python: a wait in C++
    holds off Ctrl-C, and under torchrun, which sends it to every process, the others sat out torchrun's 30 s
    before it killed them. A rank that dies still ends the wait: its connections close."""
    global _PATIENT
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return read()
    if _PATIENT is None:
        _PATIENT = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))
    box = [read() if rank() == 0 else None]
    ready = dist.broadcast(torch.zeros(1), src=0, group=_PATIENT, async_op=True)
    while not ready.is_completed():
        time.sleep(0.01)
    ready.wait()  # (raises where it ended with an error)
    dist.broadcast_object_list(box, src=0, group=_PATIENT)
    return box[0]


class Disagreement(ValueError):
    """The ranks were given different arguments (``agree``)."""


def agree(doing: str, **values: object) -> None:
    """Raise Disagreement on every rank where the ranks were given different values for doing something
    together: each machine's command is typed on its own, and ranks computing on different arguments would wait
    forever in collectives that don't match, or compute nonsense together without an error. Equal values written
    differently agree (0 and 0.0; a params.json's keys in another order). Over the model-parallel group: groups
    of their own (model_parallel_size below the world size) may be given their own prompts."""
    group = mp_init.get_model_parallel_group() if mp_init.model_parallel_is_initialized() else None
    given = everyones({name: _canonical(value) for name, value in values.items()}, group)
    for name in values:
        if any(g[name] != given[0][name] for g in given):
            each = ", ".join(f"rank {r}: {g[name][:200]}" for r, g in enumerate(given))
            raise Disagreement(f"the processes were given different {name} {doing} ({each}): give every process "
                               "the same arguments")


def _canonical(value: object) -> str:
    """value's repr, the same for equal values written differently."""
    if is_number(value):
        if is_int(value):
            return repr(int(value))
        number = float(value)
        return repr(int(number) if number.is_integer() else number)  # 0.0 as 0
    if isinstance(value, dict):
        return "{" + ", ".join(sorted(f"{k!r}: {_canonical(v)}" for k, v in value.items())) + "}"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(map(_canonical, value))) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_canonical, value)) + "]"
    return repr(value)


def raise_if_any_failed(error: Optional[Exception], doing: str) -> None:
    """Raise on every rank if any rank failed ``doing`` something: a rank that failed raises its own error, the
    others the first failed rank's message, naming the rank and its host. So no rank waits for one that gave
    up, and on several machines each machine's log says what went wrong, and where."""
    bad_input = isinstance(error, ValueError)
    reports = everyones(None if error is None else (
        socket.gethostname(), bad_input, str(error) if bad_input else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    for first, report in enumerate(reports):
        if report is not None:
            host, bad_input, message = report
            raise (ValueError if bad_input else OtherRankFailed)(f"rank {first} (on {host}) failed {doing}: {message}")
