import atexit
import contextlib
import functools
import importlib.util
import multiprocessing
import os
import runpy
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import unittest.mock
from pathlib import Path
from types import ModuleType
from typing import List, Tuple

import pytest
import torch

from llama import distributed, kernels
from llama.checkpoint import random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("LLAMA_TEST_FIXTURES") or ROOT.parent / "shared" / "fixtures")
LLAMA2_TOKENIZER = FIXTURES / "llama2" / "tokenizer.model"
LLAMA3_TOKENIZER = FIXTURES / "llama3" / "tokenizer.model"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Most tests read the real tokenizers: without them, say so once instead of failing each test its own way."""
    missing = [str(p) for p in (LLAMA2_TOKENIZER, LLAMA3_TOKENIZER) if not p.is_file()]
    if missing:
        pytest.exit(f"missing test fixtures {missing}: the real Llama 2 and Llama 3 tokenizers, in shared/fixtures/ "
                    "beside the clone, or where LLAMA_TEST_FIXTURES points (see the README's tests section)",
                    returncode=1)

# Small shapes of each kind: multi-head, grouped-query, Code Llama's rope_theta. vocab_size -1 as Meta writes it.
MHA = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}
GQA = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 48, "ffn_dim_multiplier": 1.3,
       "norm_eps": 1e-6, "vocab_size": -1}
CODE = {**GQA, "rope_theta": 1e6}
VOCAB = 32000


def kernels_expected() -> bool:
    """Whether llama/kernels.c should be in use: on, and a C compiler to build it. Where one is found, a failed
    build fails the tests that need the kernels rather than skipping them."""
    return kernels.enabled() and shutil.which(os.environ.get("CC", "cc")) is not None


needs_kernels = pytest.mark.skipif(not kernels_expected(), reason="C kernels off (LLAMA_KERNELS=0) or no C compiler")


@pytest.fixture(scope="session", autouse=True)
def process_group():
    """One process, one model-parallel group, set up the way Llama.build does it without a launcher."""
    for var in distributed.LAUNCHER_VARS:
        os.environ.pop(var, None)
    distributed.setup(None, "cpu")
    yield


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    return str(LLAMA2_TOKENIZER)


# Code Llama's tokenizer is Llama 2's with 16 pieces after its 32000, the infilling ones at 32007-32010. The others
# here stand in for its own: steps of BPE merges that reach the infilling pieces from text (so " <PRE>" encodes to
# one piece), then fillers.
CODE_LLAMA_PIECES = ["▁<SU", "▁<SUF", "▁<PRE", "▁<M", "▁<MID", "▁<E", "▁<EOT", "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>",
                     "▁<FILL_1>", "▁<FILL_2>", "▁<FILL_3>", "▁<FILL_4>", "▁<FILL_5>"]


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def _piece_entry(piece: str) -> bytes:
    """One more entry of a SentencePiece ModelProto's repeated field 1 (pieces): the piece (1), score 0 (2, a
    float) and type NORMAL (3). Appended to a model file, protobuf adds it after the pieces already there."""
    text = piece.encode()
    message = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", 0.0) + b"\x18\x01"
    return b"\x0a" + _varint(len(message)) + message


def _llama2_tokenizer_with(pieces: List[str], tokenizer_path: str, folder: Path) -> str:
    """Llama 2's real tokenizer.model with pieces after its 32000, written in folder."""
    path = folder / "tokenizer.model"
    path.write_bytes(Path(tokenizer_path).read_bytes() + b"".join(map(_piece_entry, pieces)))
    return str(path)


@pytest.fixture(scope="session")
def code_llama_tokenizer_path(tokenizer_path, tmp_path_factory) -> str:
    """A tokenizer.model laid out as Code Llama's: Llama 2's real one and its 16 extra pieces (vocabulary 32016)."""
    return _llama2_tokenizer_with(CODE_LLAMA_PIECES, tokenizer_path, tmp_path_factory.mktemp("codellama"))


@pytest.fixture(scope="session")
def code_llama_70b_tokenizer_path(tokenizer_path, tmp_path_factory) -> str:
    """The same with a ``<step>`` piece last, as Code Llama 70B's has: its chat format is another."""
    return _llama2_tokenizer_with(CODE_LLAMA_PIECES[:-1] + ["<step>"], tokenizer_path,
                                  tmp_path_factory.mktemp("codellama70b"))


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(params, mp) -> (ckpt_dir, full float weights); each distinct checkpoint is written once."""
    made = {}

    def make(params: dict, mp: int = 1, seed: int = 0):
        key = (tuple(sorted(params.items())), mp, seed)
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt")
            state = random_checkpoint(str(out), params, mp=mp, seed=seed, vocab_size=VOCAB)
            made[key] = (str(out), {k: v.float() for k, v in state.items()})
        return made[key]

    return make


@functools.lru_cache(maxsize=None)
def program(path: str) -> ModuleType:
    """The program at path (from the repository's root) as a module, its main() not run."""
    spec = importlib.util.spec_from_file_location(path.replace("/", "_").removesuffix(".py"), ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_main(name: str, *args: str) -> None:
    """scripts/<name>.py's main() in this process, given these arguments: what the script does, without the
    3-4 s a new process spends importing torch on a 2-core AVX2 machine. Bad input raises the ValueError that
    the script's one line on stderr is made of (each script's one-line errors are tested as a process)."""
    with unittest.mock.patch.object(sys, "argv", [f"scripts/{name}.py", *args]):
        program(f"scripts/{name}.py").main()


def run_cmd(args, timeout=180, env=None, **kwargs) -> subprocess.CompletedProcess:
    """Run a command from the repository root with no launcher variables inherited; a hang fails the test. A
    Python script given no input starts from ``_warm``'s process."""
    env = {**_unlaunched_env(), **(env or {})}
    if not kwargs and _a_script(args):
        return _run_together([(args, env)], timeout)[0]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def _unlaunched_env() -> dict:
    """This environment without a launcher's variables: a child starts unlaunched, or under its own torchrun.
    And with no GPU to see: the programs the tests run are CPU runs (on one GPU, two processes would share it)."""
    return {**{k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_VARS}, "CUDA_VISIBLE_DEVICES": ""}


def _torchrun_exe() -> str:
    return shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"


def torchrun(nproc: int, *args, **kwargs) -> subprocess.CompletedProcess:
    return run_cmd([_torchrun_exe(), "--standalone", "--nproc_per_node", str(nproc), *args], **kwargs)


def torchrun_started(nproc: int, *args, env=None) -> subprocess.Popen:
    """torchrun's processes started, their input, output and errors pipes, for a test that feeds them in time; in
    a process group of their own, which the test may signal as a terminal signals its foreground job."""
    return subprocess.Popen([_torchrun_exe(), "--standalone", "--nproc_per_node", str(nproc), *args], cwd=ROOT,
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**_unlaunched_env(), **(env or {})}, start_new_session=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _a_script(cmd: list) -> bool:
    """Whether cmd is ``python script.py ...``, which ``_run_script`` can run in a process forked from ``_warm``'s."""
    return cmd[0] == sys.executable and len(cmd) > 1 and cmd[1].endswith(".py")


def _run_script(argv: List[str], env: dict, out: str, err: str) -> None:
    """In a process forked from ``_warm``'s: what ``python script args...`` would do, without importing torch
    again. Its output to the files out and err, its exit status the script's, atexit's functions run."""
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY), fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    sys.argv = list(argv)
    sys.path.insert(0, str((ROOT / argv[0]).resolve().parent))  # as python puts a script's folder
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:  # as the interpreter ends on it
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            sys.stderr.write(f"{e.code}\n")
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


@functools.lru_cache(maxsize=None)
def _warm() -> multiprocessing.context.BaseContext:
    """Processes forked from one that has imported torch and llama already: 3-4 s less a rank on a 2-core AVX2
    machine, most of what a test of the ranks' behaviour costs. What torch reads at import (none of what the
    ranks are given differs) is this process's environment's."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "fire", "llama", "llama.cli", "conftest"])
    return ctx


def _run_together(commands: List[Tuple[list, dict]], timeout: float) -> List[subprocess.CompletedProcess]:
    """Start every (command, environment) at once and wait for all; output to files, not pipes that could fill
    while the test waits on another process. A hang fails the test, and kills them all. Python scripts start
    from ``_warm``'s process; other commands (``python -c``, torchrun) as themselves."""
    with contextlib.ExitStack() as stack:
        launched = []
        for cmd, env in commands:
            out, err = (stack.enter_context(tempfile.NamedTemporaryFile("w+")) for _ in range(2))
            if _a_script(cmd):
                p = _warm().Process(target=_run_script, args=(cmd[1:], env, out.name, err.name))
                p.start()
            else:
                p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
            launched.append((cmd, p, out, err))
            stack.callback(p.kill)
        done = []
        deadline = time.monotonic() + timeout
        for cmd, p, out, err in launched:
            if isinstance(p, subprocess.Popen):
                p.wait(max(0.0, deadline - time.monotonic()))
                code = p.returncode
            else:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.exitcode is None:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                code = p.exitcode
            out.seek(0), err.seek(0)
            done.append(subprocess.CompletedProcess(cmd, code, out.read(), err.read()))
        return done


def torchrun_machines(*args_per_machine, timeout=120) -> List[subprocess.CompletedProcess]:
    """Launch as on several machines, here on one: a torchrun per machine (--nnodes, its own --node_rank, one
    process each) meeting at a local address, each with its own arguments."""
    port, env = _free_port(), _unlaunched_env()
    return _run_together([([_torchrun_exe(), "--nnodes", str(len(args_per_machine)), "--node_rank", str(node),
                            "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), *args],
                           env) for node, args in enumerate(args_per_machine)], timeout)


def launch_ranks(*args_per_rank, timeout=120) -> List[subprocess.CompletedProcess]:
    """The ranks of one run started as a launcher other than torchrun may start them (a SLURM or MPI job script):
    the environment variables set (rank 0 then hosts the store the ranks meet at), no agent process. Each rank has
    its own arguments, as if typed on its own machine. torchrun's agent imports torch too: 3-4 s of a run on a
    2-core AVX2 machine, most of what a test of the ranks' behaviour costs. The examples' tests run under
    torchrun itself."""
    port, world, env = _free_port(), len(args_per_rank), _unlaunched_env()
    return _run_together([([sys.executable, *args], {**env, **distributed.launcher_env(rank, world, port)})
                          for rank, args in enumerate(args_per_rank)], timeout)


def launch(nproc: int, *args, timeout=120) -> subprocess.CompletedProcess:
    """``launch_ranks`` of nproc ranks with the same arguments, as one result, as torchrun's: each rank's output
    after the one before's, and the first failing rank's exit code."""
    ranks = launch_ranks(*[args] * nproc, timeout=timeout)
    failed = [r.returncode for r in ranks if r.returncode]
    return subprocess.CompletedProcess(ranks[0].args, failed[0] if failed else 0,
                                       "".join(r.stdout for r in ranks), "".join(r.stderr for r in ranks))


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """The tests compute on the CPU where a GPU is present too (the engine's defaults would pick it), except
    those marked gpu."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def default_dtype_guard():
    yield
    assert torch.get_default_dtype() == torch.float32
