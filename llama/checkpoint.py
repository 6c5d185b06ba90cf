"""Meta's checkpoint format: ``params.json`` plus ``consolidated.NN.pth`` shards, read, validated and written.

A checkpoint saved with k shards loads on any number n of processes that its shapes can be split across:
every weight is sharded along one dimension (column-parallel on dim 0, row-parallel on dim 1, the embedding
on its embedding dimension in Llama 1/2 and Code Llama shards, on the vocabulary in Llama 3's) or replicated,
so each rank cuts its own slice out of the concatenation of the shards. Shards are memory-mapped, so a rank
only reads the bytes of its slice.
"""

import contextlib
import errno
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import threading
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch

from . import pages
from .checks import cannot_read
from .model import ModelArgs, family_embed_dim, rope_frequencies

# Along which dimension each weight is split across model-parallel ranks; None: replicated on every rank.
SHARD_DIM: Dict[str, Optional[int]] = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
IGNORED_KEYS = {"rope.freqs"}  # in Llama 1/2 shards; the model computes its rotary tables itself
SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")
LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)  # how torch's old (non-zip) format begins
REDOWNLOAD = "download it again and check it with md5sum -c checklist.chk"


def rope_freqs(args: ModelArgs) -> torch.Tensor:
    """The ``rope.freqs`` of Meta's Llama 1/2 shards, for writing checkpoints as theirs (the engine never reads it
    but to check head_dim): each rotary frequency, unscaled, in bf16."""
    return rope_frequencies(args.head_dim, args.rope_theta).to(torch.bfloat16)


def shard_dim(key: str, embed_dim: int = 1) -> Optional[int]:
    """The dimension key is split along; embed_dim: the embedding's (1 in Llama 1/2 shards, 0 in Llama 3's)."""
    return embed_dim if key == "tok_embeddings.weight" else SHARD_DIM[re.sub(r"^layers\.\d+\.", "", key)]


def full_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """The unsharded shape of every weight the model has."""
    kv_dim = args.kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,),
              "output.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (args.n_heads * args.head_dim, args.dim),
            f"layers.{i}.attention.wk.weight": (kv_dim, args.dim),
            f"layers.{i}.attention.wv.weight": (kv_dim, args.dim),
            f"layers.{i}.attention.wo.weight": (args.dim, args.n_heads * args.head_dim),
            f"layers.{i}.feed_forward.w1.weight": (args.hidden_dim, args.dim),
            f"layers.{i}.feed_forward.w2.weight": (args.dim, args.hidden_dim),
            f"layers.{i}.feed_forward.w3.weight": (args.hidden_dim, args.dim),
            f"layers.{i}.attention_norm.weight": (args.dim,),
            f"layers.{i}.ffn_norm.weight": (args.dim,),
        })
    return shapes


def shard_shape(shape: Tuple[int, ...], dim: Optional[int], n: int) -> Tuple[int, ...]:
    if dim is None:
        return shape
    return shape[:dim] + (shape[dim] // n,) + shape[dim + 1:]


def _read_text(path: Path, errors: str = "strict") -> str:
    """path's text, without the byte order mark that some Windows editors begin a file with."""
    try:
        return path.read_text(encoding="utf-8-sig", errors=errors)
    except OSError as e:
        raise cannot_read(path, e) from None


def read_params(ckpt_dir: str) -> dict:
    path = Path(ckpt_dir) / "params.json"
    if not Path(ckpt_dir).is_dir():
        problem = "is a file, not a folder" if Path(ckpt_dir).exists() else "does not exist"
        raise ValueError(f"checkpoint directory {ckpt_dir!r} {problem}: pass --ckpt_dir, the folder "
                         "that holds params.json and consolidated.NN.pth")
    if not path.is_file():
        raise ValueError(f"{path}: missing; a checkpoint folder holds params.json and consolidated.NN.pth"
                         + (_hugging_face_hint(Path(ckpt_dir)) or _model_folders_hint(Path(ckpt_dir))))
    try:
        params = json.loads(_read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a JSON object of model parameters, got {type(params).__name__}")
    return params


def _model_folders_hint(folder: Path) -> str:
    """Where the folder download.sh wrote into was passed for a model's folder in it (llama-2-7b/, ...)."""
    models = sorted(p.parent for p in folder.glob("*/params.json"))
    if not models:
        return ""
    names = ", ".join(f"{m.name}/" for m in models[:6]) + (" ..." if len(models) > 6 else "")
    return (f". The model folders in it ({names}) hold them: pass one, --ckpt_dir {models[0]}, say (with its "
            "tokenizer.model, there or in this folder)")


def _hugging_face_hint(folder: Path) -> str:
    """Where a folder from the Hugging Face Hub was passed (the usual mistake), where Meta's files are."""
    original = folder / "original"
    if (original / "params.json").is_file():
        return (f". {original} holds them, as the Hugging Face Hub's copies of Meta's releases keep them: pass "
                f"--ckpt_dir {original} (and --tokenizer_path {original / 'tokenizer.model'})")
    transformers = ("config.json", "*.safetensors", "pytorch_model*.bin")
    if any(next(folder.glob(pattern), None) for pattern in transformers):
        return (". This folder holds a Hugging Face transformers checkpoint (config.json, *.safetensors, "
                "pytorch_model.bin), which this engine does not read: on the Hub, Meta's own files are in the "
                "original/ folder of Llama 3's repositories (huggingface-cli download REPO --include 'original/*') "
                "and in the repositories without -hf of Llama 2's (meta-llama/Llama-2-7b, not "
                "meta-llama/Llama-2-7b-hf)")
    return ""


def shard_paths(ckpt_dir: str) -> List[Path]:
    """The shards, in order; they must be numbered 00 .. k-1."""
    paths = sorted(Path(ckpt_dir).glob("*.pth"))  # in numeric order too, once each name has two digits
    if not paths:
        raise ValueError(f"{ckpt_dir}: no consolidated.NN.pth shards found")
    numbers = {_shard_number(p) for p in paths}
    gaps = [f"consolidated.{j:02d}.pth" for j in range(max(numbers)) if j not in numbers]
    if gaps:
        raise ValueError(f"{ckpt_dir}: {', '.join(gaps)} {'is' if len(gaps) == 1 else 'are'} missing (found "
                         f"{', '.join(p.name for p in paths)}): the download or copy is incomplete")
    checklist = Path(ckpt_dir) / "checklist.chk"
    if checklist.is_file():  # the last shards missing leave the others numbered 00 .. k-1 too
        # md5sum -b marks each name with a * (binary mode): "HASH *consolidated.00.pth"
        listed = {line.split()[-1].removeprefix("*") for line in _read_text(checklist, "replace").splitlines()
                  if line.strip()}
        missing = sorted(name for name in listed - {p.name for p in paths} if SHARD_NAME.fullmatch(name))
        if missing:
            raise ValueError(f"{ckpt_dir}: checklist.chk lists {missing}, not there: the download or copy is "
                             "incomplete (download.sh resumes a download)")
    return paths


def _shard_number(path: Path) -> int:
    """The number in a shard's name. Meta's have two digits: consolidated.0.pth is a shard renamed, which
    checklist.chk would otherwise call missing."""
    m = SHARD_NAME.fullmatch(path.name)
    if not m:
        raise ValueError(f"{path}: unexpected file; shards are named consolidated.00.pth, consolidated.01.pth, ...")
    if len(m.group(1)) != 2:
        raise ValueError(f"{path}: misnamed: Meta's shards are numbered with two digits, consolidated.00.pth, "
                         f"consolidated.01.pth, ...; rename it consolidated.{int(m.group(1)):02d}.pth")
    return int(m.group(1))


def load_shard(path: Path) -> Dict[str, torch.Tensor]:
    """Memory-map one shard. Only tensors and plain containers unpickle: a pickle that would run code is refused."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LEGACY_MAGIC))  # what the file is, where torch.load fails on it
    except OSError as e:
        raise cannot_read(path, e) from None
    try:
        shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:  # torch's message says to load it with weights_only=False: never
        raise ValueError(f"{path}: refused to load: the file's pickle holds something other than tensors, which a "
                         f"checkpoint never does: it is damaged, or was made to run code; {REDOWNLOAD}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: {_why_unloadable(path, head, e)}") from None
    if not isinstance(shard, dict) or not all(isinstance(t, torch.Tensor) for t in shard.values()):
        nested = [k for k, v in shard.items() if isinstance(v, dict)] if isinstance(shard, dict) else []
        raise ValueError(f"{path}: expected a dict of tensors" + (
            f", as Meta's shards are; this one holds dicts (under {nested[:3]}), as a training checkpoint does: "
            "save the model's state_dict alone" if nested else ""))
    if any(key.startswith("module.") for key in shard):
        raise ValueError(f"{path}: its keys carry a 'module.' prefix, as a checkpoint saved from a "
                         "DistributedDataParallel wrapper does; strip it before saving")
    return shard


def _why_unloadable(path: Path, head: bytes, error: Exception) -> str:
    """What is wrong with a shard torch.load failed on, told from its first bytes: downloading it again mends a
    truncated or corrupted file, not one written in another format."""
    if not head:
        return f"empty (0 bytes): its download or copy was cut short; {REDOWNLOAD}"
    if head == LEGACY_MAGIC:
        return ("saved in torch's old (non-zip) format, which can't be memory-mapped: load it with "
                "torch.load(path, weights_only=True) and re-save it with a current torch.save")
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:  # a header's length, then it
        return ("a safetensors file (Hugging Face's format) named .pth; this engine reads Meta's consolidated.NN.pth, "
                "which torch.save writes")
    detail = f" ({str(error).splitlines()[0]})" if head.startswith(b"PK") else ""  # a zip, as torch.save writes
    return f"truncated or corrupted, can't be read{detail}; {REDOWNLOAD}"


def check_split(args: ModelArgs, n: int, replicate_kv: bool = True, unit: str = "processes") -> None:
    """Refuse a world size (or count of shards: unit) the model's shapes can't be cut into, naming the largest one
    that works.

    With replicate_kv, n may exceed n_kv_heads when it is a multiple of it: each rank then holds the one KV head
    its query heads share. A checkpoint written to disk can't hold replicated heads, so resharding passes False.
    """
    if n < 1:
        raise ValueError(f"the number of {unit} must be at least 1, got {n}")

    def kv_ok(m: int) -> bool:
        return args.kv_heads % m == 0 or (replicate_kv and m % args.kv_heads == 0)

    sizes = {"n_heads": args.n_heads, "dim": args.dim, "the SwiGLU hidden size": args.hidden_dim,
             "vocab_size": args.vocab_size}
    bad = [f"{name}={size}" for name, size in sizes.items() if size % n]
    if not kv_ok(n):
        bad.append(f"n_kv_heads={args.kv_heads}" + (" (nor a multiple of it)" if replicate_kv else ""))
    if bad:
        best = max(m for m in range(1, n + 1) if kv_ok(m) and all(size % m == 0 for size in sizes.values()))
        raise ValueError(f"this model can't be split across {n} {unit}: {', '.join(bad)} not divisible by "
                         f"{n}; the largest model-parallel size up to {n} that works is {best}")


def validate(paths: List[Path], shards: List[Dict[str, torch.Tensor]], args: ModelArgs, embed_dim: int) -> None:
    """Every shard holds exactly the expected keys with the shapes params.json implies."""
    expected = full_shapes(args)
    k = len(shards)
    for path, shard in zip(paths, shards):
        keys = set(shard) - IGNORED_KEYS
        missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
        if missing:
            raise ValueError(f"{path}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            raise ValueError(f"{path}: unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                             "(not part of a Llama model with this params.json)")
        for key, shape in expected.items():
            want = shard_shape(shape, shard_dim(key, embed_dim), k)
            if tuple(shard[key].shape) != want:
                raise ValueError(f"{path}: {key} has shape {tuple(shard[key].shape)}, expected {want} for "
                                 f"params.json with {k} shard(s)")
            _check_dtype(path, key, shard[key].dtype)
            if shard[key].layout != torch.strided:
                raise ValueError(f"{path}: {key} is a {str(shard[key].layout).removeprefix('torch.')} tensor, where "
                                 "Meta's shards hold dense ones: save it with .to_dense()")


def _check_dtype(path: Path, key: str, dtype: torch.dtype) -> None:
    """A weight must be stored in a floating dtype that holds its values by itself. Float8 weights (Meta's FP8
    release of Llama 3.1 405B) are scaled by factors kept in other files (fp8_scales_NN.pt): converted alone
    they would load without an error and compute nonsense."""
    if dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        return
    why = (" (Meta's FP8 release, whose weights are scaled by its fp8_scales_NN.pt files, which this engine "
           "doesn't apply)" if "float8" in str(dtype) else "")
    raise ValueError(f"{path}: {key} is stored as {dtype}{why}; this engine loads weights saved in bfloat16, float16 "
                     "or float32: use Meta's bf16 release of the model")


# params.json keys of Meta's releases whose weights this engine can't compute with, and what they are.
UNSUPPORTED = {"quantization_args": "one of Meta's quantized releases (Llama 3.2's SpinQuant and QLoRA: int4 weights "
                                    "with their scales)",
               "vision_chunk_size": "a Llama 3.2 Vision model (an image encoder and cross-attention layers)",
               "moe_args": "a Llama 4 model (mixture-of-experts layers, an image encoder, another tokenizer)"}


class Checkpoint:
    """A checkpoint folder opened for loading: params.json read, every shard memory-mapped (not read)."""

    def __init__(self, ckpt_dir: str):
        self.dir = ckpt_dir
        self.params = read_params(ckpt_dir)
        self.paths = shard_paths(ckpt_dir)
        self.shards = [load_shard(p) for p in self.paths]

    def model_args(self, **overrides) -> ModelArgs:
        """ModelArgs from params.json, with the vocabulary size the shards hold where it says -1, checked against
        the shards' shapes: a params.json of another model fails here, saying what disagrees, rather than later
        as a model too large for the memory (or, where the shapes agree, one that computes garbage)."""
        for key, kind in UNSUPPORTED.items():
            if key in self.params:
                raise ValueError(f"{self.dir}/params.json has {key}: this is {kind}, which this engine doesn't run; "
                                 "use the bf16 release of a text model (Llama 2, Code Llama, Llama 3.x)")
        scales = sorted(p.name for p in Path(self.dir).glob("fp8_scales_*.pt"))
        if scales:
            raise ValueError(f"{self.dir} has {scales[0]}: this is Meta's FP8 release, whose weights are scaled by "
                             "those files, which this engine doesn't apply; use the bf16 release of the model")
        self._check_shard_count()
        args = ModelArgs.from_params({**self.params, **overrides})
        saved_vocab = self._saved_vocab()
        if args.vocab_size == -1:
            args.vocab_size = saved_vocab
        try:
            args.check()  # before comparing: "32000" is not 32000, and must not be said to differ from it
        except ValueError as e:
            raise ValueError(f"{self.dir}/params.json: {e}") from None
        if args.vocab_size != saved_vocab:
            raise ValueError(f"{self.dir}/params.json says vocab_size {args.vocab_size} but the shards hold "
                             f"{saved_vocab} rows of output.weight")
        self._check_params_match(args)
        validate(self.paths, self.shards, args, self.embed_dim(args))
        return args

    def _check_shard_count(self) -> None:
        """Fail where the shards were cut for another number of processes than there are shards: one missing that
        no checklist.chk lists, or another checkpoint's left among them, would otherwise fail on a shape whose
        numbers say nothing of it. The first shard's wq holds dim / k of its dim rows; norm.weight, whole in
        every shard, is dim wide."""
        shard = self.shards[0]
        wq, norm = shard.get("layers.0.attention.wq.weight"), shard.get("norm.weight")
        if (wq is None or norm is None or wq.dim() != 2 or norm.dim() != 1 or wq.shape[1] != norm.shape[0]
                or wq.shape[0] == 0 or norm.shape[0] % wq.shape[0]):
            return  # validate says what is wrong with them
        cut_for, k = norm.shape[0] // wq.shape[0], len(self.shards)
        if cut_for != k:
            missing = [f"consolidated.{j:02d}.pth" for j in range(k, cut_for)]
            why = (f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} missing" if missing
                   else "shards of another checkpoint among them")
            raise ValueError(f"{self.dir}: its shards were cut for {cut_for} processes ({self.paths[0].name} holds "
                             f"1/{cut_for} of each split weight), but {k} {'is' if k == 1 else 'are'} here "
                             f"({', '.join(p.name for p in self.paths)}): {why}; check the folder with md5sum -c "
                             "checklist.chk, or download the checkpoint again")

    def _saved_vocab(self) -> int:
        """The vocabulary size output.weight's rows make across the shards."""
        out = self.shards[0].get("output.weight")
        if out is None:
            raise ValueError(f"{self.paths[0]}: missing keys ['output.weight']")
        if out.dim() != 2:
            raise ValueError(f"{self.paths[0]}: output.weight has shape {tuple(out.shape)}, expected 2 dimensions "
                             "(the vocabulary, dim)")
        return out.shape[0] * len(self.shards)

    def _check_params_match(self, args: ModelArgs) -> None:
        """Name the params.json values the shards contradict where their shapes tell (validate names only the
        first weight that doesn't fit): the layers, the width, and the head dimension, which Llama 1/2's rope.freqs
        (head_dim / 2 long) gives where no weight's shape does (n_heads 8 for 4 reshapes the same weights)."""
        shard = self.shards[0]
        layers = len({m.group(1) for key in shard if (m := re.match(r"layers\.(\d+)\.", key))})
        norm, freqs = shard.get("norm.weight"), shard.get("rope.freqs")
        wrong = []
        if layers != args.n_layers:
            wrong.append(f"params.json says n_layers {args.n_layers}, the shards hold {layers} layers")
        if norm is not None and norm.dim() == 1 and norm.shape[0] != args.dim:
            wrong.append(f"params.json says dim {args.dim}, the shards' weights are {norm.shape[0]} wide (norm.weight)")
        elif freqs is not None and freqs.dim() == 1 and 2 * freqs.shape[0] != args.head_dim:
            wrong.append(f"params.json's n_heads {args.n_heads} gives head_dim {args.head_dim}, but the shards' "
                         f"rope.freqs is for head_dim {2 * freqs.shape[0]}")
        if wrong:
            raise ValueError(f"{self.dir}: {'; '.join(wrong)}: pass the params.json that came with these shards")

    def embed_dim(self, args: ModelArgs) -> int:
        """The dimension the saved embedding is split along, read off the shards' shapes where there are
        several; a single shard is the same either way, so its family's convention is assumed."""
        k = len(self.shards)
        emb = self.shards[0].get("tok_embeddings.weight")
        if k > 1 and emb is not None and tuple(emb.shape) == (args.vocab_size // k, args.dim):
            return 0
        return 1 if k > 1 else family_embed_dim(args.vocab_size)

    def load_rank(self, args: ModelArgs, rank: int, world: int, dtype: Optional[torch.dtype],
                  device: torch.device, copy: bool = False,
                  embed_dim: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """This rank's slice of every weight, in ``dtype`` (None: as saved) on ``device``, whatever the number
        of shards: each weight is cut out of the concatenation of the shards along its sharded dimension.

        embed_dim: the dimension to split the embedding along for these ranks, whichever the shards used; by
        default the model family's (``family_embed_dim``), as the model built from args splits it.
        copy: never hand out memory-mapped tensors (for writing them elsewhere).
        """
        embed_dim = family_embed_dim(args.vocab_size) if embed_dim is None else embed_dim
        check_split(args, world)
        saved_embed_dim = self.embed_dim(args)
        validate(self.paths, self.shards, args, saved_embed_dim)
        k = len(self.shards)
        state = {}
        for key, shape in full_shapes(args).items():
            src, dst = shard_dim(key, saved_embed_dim), shard_dim(key, embed_dim)
            if dst is None:
                state[key] = _gather([self.shards[0][key]], 0, dtype, device, copy)
                continue
            start, end = _rank_range(key, shape[dst], rank, world, args)
            if src != dst:  # the embedding saved split the other way: a slice of every shard, joined along src
                pieces = [shard[key].narrow(dst, start, end - start) for shard in self.shards]
                state[key] = _gather(pieces, src, dtype, device, copy)
                continue
            size = shape[dst] // k  # each shard's share
            pieces = [self.shards[j][key].narrow(dst, max(start, j * size) - j * size,
                                                 min(end, (j + 1) * size) - max(start, j * size))
                      for j in range(start // size, (end - 1) // size + 1)]
            state[key] = _gather(pieces, dst, dtype, device, copy)
        return state


def _rank_range(key: str, size: int, rank: int, world: int, args: ModelArgs) -> Tuple[int, int]:
    """The [start, end) of the sharded dimension that this rank holds."""
    if key.endswith(("attention.wk.weight", "attention.wv.weight")) and world > args.kv_heads:
        head = rank // (world // args.kv_heads)  # the KV head this rank's query heads share
        return head * args.head_dim, (head + 1) * args.head_dim
    return rank * size // world, (rank + 1) * size // world


def _gather(pieces: List[torch.Tensor], dim: int, dtype: Optional[torch.dtype], device: torch.device,
            copy: bool) -> torch.Tensor:
    """Join memory-mapped pieces into one tensor in dtype on device, keeping resident memory to one copy.

    A single contiguous piece already in the right dtype on the CPU is used as it is, still memory-mapped (no
    copy), and its pages are read in now rather than during the first forward pass. Anything else is copied
    once, and the pages the copy read are dropped from this process's memory.
    """
    dtype = dtype or pieces[0].dtype
    if not copy and len(pieces) == 1 and device.type == "cpu" and pieces[0].dtype == dtype \
            and pieces[0].is_contiguous():
        pages.prefault(pieces[0])
        return pieces[0]
    shape = list(pieces[0].shape)
    shape[dim] = sum(p.shape[dim] for p in pieces)
    out = torch.empty(shape, dtype=dtype, device=device)
    offset = 0
    for p in pieces:
        out.narrow(dim, offset, p.shape[dim]).copy_(p)
        offset += p.shape[dim]
        pages.drop(p)
    return out


def split(state: Dict[str, torch.Tensor], k: int, embed_dim: int = 1) -> Iterator[Dict[str, torch.Tensor]]:
    """Cut a full state dict into k shards as Meta's model-parallel ranks hold them, one at a time."""
    for j in range(k):
        yield {key: t.clone() if key in IGNORED_KEYS or shard_dim(key) is None
               else t.chunk(k, shard_dim(key, embed_dim))[j].clone() for key, t in state.items()}


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(shards: Iterable[Dict[str, torch.Tensor]], params: dict, out_dir: str,
         files: Optional[Dict[str, Callable[[Path], object]]] = None) -> None:
    """Write params.json, consolidated.NN.pth and a checklist.chk of md5 sums (``md5sum -c`` format), and remove
    the shards of a checkpoint written there before with more of them. files: other files of the checkpoint
    (its tokenizer.model), name -> a function writing it to the path it is given.

    Every file is written under a temporary name first, and all are renamed into place at the end, the checklist
    last, with Ctrl-C and SIGTERM held until the renames are done (``_signals_held``): a write that fails or is
    stopped leaves a checkpoint that was there as it was, not a mixture of two that would load and compute
    nonsense (it needs room for both until then). No file is written over in place: it may be a link to another
    checkpoint's file (the one being resharded, even), or mapped by a job running on it.

    shards may be a generator: each is written and let go before the next is made.
    """
    out = Path(out_dir)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        for path in leftovers(out):
            path.unlink()
    written: Dict[str, Path] = {}

    def put(name: str, write: Callable[[Path], object]) -> None:
        written[name] = _partial(out / name)
        with writing(out):
            write(written[name])

    try:
        put("params.json", lambda path: path.write_text(json.dumps(params)))
        for j, shard in enumerate(shards):
            put(f"consolidated.{j:02d}.pth", functools.partial(torch.save, shard))
            del shard  # before the generator makes the next one
        sums = "".join(f"{md5(written[name])}  {name}\n" for name in sorted(written))
        for name, write in (files or {}).items():
            put(name, write)
        put("checklist.chk", lambda path: path.write_text(sums))
        with _signals_held():
            for name, path in written.items():
                if name == "checklist.chk":  # the last
                    for old in out.glob("consolidated.*.pth"):
                        if old.name not in written:
                            old.unlink()
                os.replace(path, out / name)
    finally:
        for path in written.values():
            if os.path.lexists(path):  # (unlink's missing_ok doesn't cover a read-only file system's error)
                path.unlink()


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """A write into out that fails for want of room or permission: a ValueError saying so, not a traceback (in
    C++'s words, from torch.save)."""
    try:
        yield
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise ValueError(f"can't write the checkpoint into {out}: {e.strerror or e}: " + (
            "free space there, or write it elsewhere" if full else "write it into a folder you can write to")) from e
    except RuntimeError as e:
        if not re.search(r"inline_container|PytorchStreamWriter|iostream error", str(e)):
            raise
        free = shutil.disk_usage(out).free / 2**20
        raise ValueError(f"can't write the checkpoint into {out}: torch.save failed ({str(e).splitlines()[0]}), with "
                         f"{free:.1f} MiB free there: free space there, or write it elsewhere") from e


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM arriving meanwhile are delivered after the block, not inside it. (Their handlers are
    set aside: blocking them would hold them from this thread alone, and another, gloo's or torch's, would take
    them. Only the main thread can set handlers, and only its own run them.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: List[int] = []
    held = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    held = {s: h for s, h in held.items() if h not in (None, signal.SIG_IGN)}  # (None: set outside Python)
    for s in held:
        signal.signal(s, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        for s in arrived:
            signal.raise_signal(s)


def _partial(path: Path) -> Path:
    """Where path is written before it is renamed into place."""
    return path.with_name(f".{path.name}.partial")


PARTIAL_NAME = re.compile(
    r"\.(params\.json|checklist\.chk|tokenizer\.model|tokenizer_checklist\.chk|consolidated\.\d+\.pth)\.partial")


def leftovers(folder: Path) -> List[Path]:
    """The temporary files (``_partial``) that a write killed before its end (kill -9, the kernel's OOM killer)
    left in folder, hidden from ls: of the names only this module gives."""
    return [p for p in folder.glob(".*.partial") if PARTIAL_NAME.fullmatch(p.name) and p.is_file()]


def reshard(ckpt_dir: str, out_dir: str, mp: int) -> None:
    """Write ckpt_dir's model as an equivalent checkpoint of mp shards, one output shard in memory at a time, with
    ckpt_dir's tokenizer.model where it has one."""
    ckpt = Checkpoint(ckpt_dir)
    tokenizer = Path(ckpt_dir) / "tokenizer.model"
    files = {tokenizer.name: lambda tmp: shutil.copyfile(tokenizer, tmp)} if tokenizer.is_file() else {}
    args = ckpt.model_args()
    check_split(args, mp, replicate_kv=False, unit="shards")
    extras = {k: v.clone() for k, v in ckpt.shards[0].items() if k in IGNORED_KEYS}
    cpu, embed_dim = torch.device("cpu"), ckpt.embed_dim(args)  # each family keeps its own layout
    save(({**ckpt.load_rank(args, r, mp, None, cpu, copy=True, embed_dim=embed_dim), **extras} for r in range(mp)),
         ckpt.params, out_dir, files)


def random_checkpoint(out_dir: str, params: dict, mp: int = 1, seed: int = 0, vocab_size: Optional[int] = None,
                      device: Union[str, torch.device] = "cpu",
                      ) -> Dict[str, torch.Tensor]:
    """Write a random checkpoint in Meta's exact format for its family (bf16 shards; Llama 1/2 ones with the
    unused ``rope.freqs`` and the embedding split on its dimension, Llama 3 ones split on the vocabulary) and
    return its full, unsharded weights. ``vocab_size`` is needed when params.json says -1.

    device: where the random numbers are drawn (the same seed draws other numbers on a GPU). The CPU's generator
    is serial: 0.19 G numbers a second on a Xeon here, some 35 s for a 7B shape, which took 87 s in all to write
    on an H200's host."""
    args = ModelArgs.from_params(params)
    if args.vocab_size == -1:
        if vocab_size is None:
            raise ValueError("params has vocab_size -1: pass vocab_size (the tokenizer's n_words)")
        args.vocab_size = vocab_size
    check_split(args, mp, replicate_kv=False, unit="shards")  # unequal slices would be no checkpoint of Meta's
    g = torch.Generator(device).manual_seed(seed)
    state = {}
    for key, shape in full_shapes(args).items():
        x = torch.randn(shape, generator=g, device=device)
        # norms around 1, so that a test sees them used
        state[key] = (1 + 0.1 * x if len(shape) == 1 else x / shape[-1] ** 0.5).to("cpu", torch.bfloat16)
    return save_full(state, args, params, out_dir, mp)


def save_full(state: Dict[str, torch.Tensor], args: ModelArgs, params: dict, out_dir: str, mp: int = 1,
              files: Optional[Dict[str, Callable[[Path], object]]] = None) -> Dict[str, torch.Tensor]:
    """Write a model's full (unsharded) weights as Meta's checkpoint of mp shards for its family (with ``save``'s
    files), and return what the shards hold joined: bf16, Llama 1/2's with the unused ``rope.freqs`` and the
    embedding split on its dimension, Llama 3's split on the vocabulary."""
    expected = set(full_shapes(args))
    if set(state) != expected:
        raise ValueError(f"the weights' names differ from Meta's: {sorted(set(state) ^ expected)[:5]}")
    state = {key: t.detach().to(torch.bfloat16).contiguous() for key, t in state.items()}
    embed_dim = family_embed_dim(args.vocab_size)
    if embed_dim == 1:
        state["rope.freqs"] = rope_freqs(args)
    save(split(state, mp, embed_dim), params, out_dir, files)
    return state
