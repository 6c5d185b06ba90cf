"""Loading: any shard count on any number of processes, resharding, and a clear error for every broken
checkpoint, raised on every rank without hanging."""

import builtins
import errno
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama import checkpoint, generation, machine

from conftest import GQA, VOCAB, launch, run_cmd, script_main
from reference import greedy
from reference import logits as reference_logits

# Four KV heads, so that it can be saved in 4 shards; GQA (two KV heads) runs on 4 ranks by replicating them.
MP4 = {**GQA, "n_kv_heads": 4}
PROMPTS = ["Once there was a", "The rain in the valley kept falling for days and days"]


def greedy_reference(state, params, tokenizer_path):
    from llama import Tokenizer
    tok = Tokenizer(tokenizer_path)
    return [greedy(state, {**params, "vocab_size": VOCAB}, tok.encode(p, True, False), 8, stop=tok.eos_id)
            for p in PROMPTS], tok.encode(PROMPTS[0], True, False)


@pytest.mark.parametrize("k", [2, 4])
def test_k_shards_on_one_process(make_ckpt, tokenizer_path, k):
    ckpt, state = make_ckpt(MP4, mp=k)
    g = Llama.build(ckpt, tokenizer_path, 64, 2, dtype="float32")
    want_tokens, prompt = greedy_reference(state, MP4, tokenizer_path)
    logits = g.model.forward(torch.tensor([prompt]), 0)[0]
    torch.testing.assert_close(logits.double(), reference_logits(state, {**MP4, "vocab_size": VOCAB}, prompt),
                               rtol=1e-4, atol=1e-4)
    got, _ = g.generate([g.tokenizer.encode(p, True, False) for p in PROMPTS], 8, temperature=0)
    assert got == want_tokens


@pytest.mark.parametrize("params, k, n", [(MP4, 1, 2), (MP4, 4, 2), ({**GQA, "n_kv_heads": 1}, 1, 2)],
                         ids=["split-1-to-2", "merge-4-to-2", "split-1-to-2-replicating-its-kv-head"])
def test_k_shards_on_n_processes(make_ckpt, tokenizer_path, tmp_path, params, k, n):
    ckpt, state = make_ckpt(params, mp=k)
    out = tmp_path / "logits.pt"
    result = launch(n, "tests/generate_driver.py", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path,
                      "--prompts", json.dumps(PROMPTS), "--logits_out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("TOKENS "))[7:])
    want_tokens, prompt = greedy_reference(state, params, tokenizer_path)
    assert tokens == want_tokens
    torch.testing.assert_close(torch.load(out, weights_only=True).double(),
                               reference_logits(state, {**params, "vocab_size": VOCAB}, prompt), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("world", [4, 8])
def test_kv_heads_are_replicated_to_the_ranks_whose_query_heads_share_them(make_ckpt, k, world):
    """More ranks than KV heads (GQA's 8 query heads over 2 KV heads, on 4 or 8 ranks): each rank holds its query
    heads and a copy of the one KV head they attend to, the reference's grouping (query head h reads KV head
    h // (8 / 2)), from 1 or 2 shards. The launched tests cover only one KV head, which every rank holds."""
    ckpt, state = make_ckpt(GQA, mp=k)
    opened = checkpoint.Checkpoint(ckpt)
    args = opened.model_args()
    heads, kv_heads, hd = GQA["n_heads"], GQA["n_kv_heads"], GQA["dim"] // GQA["n_heads"]
    for rank in range(world):
        got = opened.load_rank(args, rank, world, torch.float32, torch.device("cpu"))
        first = rank * heads // world  # the rank's first query head
        kv = first // (heads // kv_heads)
        for layer in range(GQA["n_layers"]):
            name = f"layers.{layer}.attention"
            wq = state[f"{name}.wq.weight"][first * hd:(rank + 1) * heads // world * hd]
            assert torch.equal(got[f"{name}.wq.weight"], wq.float())
            for w in ("wk", "wv"):
                want = state[f"{name}.{w}.weight"][kv * hd:(kv + 1) * hd]
                assert torch.equal(got[f"{name}.{w}.weight"], want.float())


def test_world_size_that_does_not_divide_is_refused_naming_the_largest_that_works(make_ckpt):
    ckpt, _ = make_ckpt(GQA, mp=2)
    opened = checkpoint.Checkpoint(ckpt)
    args = opened.model_args()
    with pytest.raises(ValueError, match="can't be split across 3 processes: .*largest model-parallel size up to 3 "
                                         "that works is 2"):
        opened.load_rank(args, 0, 3, torch.float32, torch.device("cpu"))
    # 8 query heads over 2 KV heads: 8 ranks replicate each KV head 4 times; 16 can't split the query heads.
    checkpoint.check_split(args, 8)
    with pytest.raises(ValueError, match="n_heads=8"):
        checkpoint.check_split(args, 16)
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        checkpoint.check_split(args, 4, replicate_kv=False)
    with pytest.raises(ValueError, match="at least 1, got 0"):
        checkpoint.check_split(args, 0)


@pytest.mark.parametrize("mp", [0, 3, 4])
def test_a_random_checkpoint_is_not_written_in_shards_the_shapes_cannot_be_cut_into(tmp_path, mp):
    """3 shards of 8 heads (or 4 of 2 KV heads) would be slices of unequal sizes: no checkpoint of Meta's."""
    with pytest.raises(ValueError, match="at least 1" if mp == 0 else f"can't be split across {mp}"):
        checkpoint.random_checkpoint(str(tmp_path / "ckpt"), GQA, mp=mp, vocab_size=VOCAB)
    assert not (tmp_path / "ckpt").exists()


def test_model_parallel_size_defaults_to_world_size_not_shard_count(make_ckpt, tokenizer_path):
    ckpt, _ = make_ckpt(MP4, mp=4)
    g = Llama.build(ckpt, tokenizer_path, 32, 1, dtype="float32")
    assert g.model.output.weight.shape == (VOCAB, MP4["dim"])  # the whole model on this one process


def test_reshard_round_trip(make_ckpt, tmp_path):
    """1 -> 4 shards by the script run as a program, 4 -> 2 -> 1 by its main() here."""
    ckpt, _ = make_ckpt(MP4, mp=1)
    dirs = [Path(ckpt)]
    for mp in (4, 2, 1):
        dirs.append(tmp_path / f"mp{mp}")
        args = ["--ckpt_dir", str(dirs[-2]), "--out_dir", str(dirs[-1]), "--mp", str(mp)]
        if mp == 4:
            r = run_cmd([sys.executable, "scripts/reshard.py", *args])
            assert r.returncode == 0 and r.stdout.startswith("wrote 4 shard(s)"), r.stderr
        else:
            script_main("reshard", *args)
        assert sorted(p.name for p in dirs[-1].glob("*.pth")) == [f"consolidated.{j:02d}.pth" for j in range(mp)]
        assert json.loads((dirs[-1] / "params.json").read_text()) == json.loads((Path(ckpt) / "params.json").read_text())
        if shutil.which("md5sum"):
            check = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=dirs[-1], capture_output=True, text=True)
            assert check.returncode == 0 and check.stdout.count(": OK") == mp + 1, check.stdout
    # Four shards really are quarters, cut as Meta's ranks hold them.
    quarter = torch.load(dirs[1] / "consolidated.02.pth", weights_only=True)
    whole = torch.load(Path(ckpt) / "consolidated.00.pth", weights_only=True)
    assert torch.equal(quarter["layers.1.attention.wo.weight"], whole["layers.1.attention.wo.weight"].chunk(4, 1)[2])
    assert torch.equal(quarter["layers.0.feed_forward.w3.weight"], whole["layers.0.feed_forward.w3.weight"].chunk(4)[2])
    back = torch.load(dirs[-1] / "consolidated.00.pth", weights_only=True)
    assert back.keys() == whole.keys() and all(torch.equal(back[k], whole[k]) and back[k].dtype == whole[k].dtype
                                               for k in whole)


def test_reshard_refuses_a_non_empty_out_dir_unless_forced(make_ckpt, tmp_path):
    ckpt, _ = make_ckpt(MP4, mp=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["--ckpt_dir", ckpt, "--out_dir", str(out), "--mp", "2"]
    with pytest.raises(ValueError, match="not empty"):
        script_main("reshard", *args)
    assert not list(out.glob("*.pth"))
    script_main("reshard", *args, "--force")
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.glob("*.pth"))) == 2
    with pytest.raises(ValueError, match="can't be split across 3"):
        script_main("reshard", "--ckpt_dir", ckpt, "--out_dir", str(tmp_path / "o3"), "--mp", "3")
    src = tmp_path / "src"  # into itself, even forced and named another way: refused, the input as it was
    shutil.copytree(ckpt, src)
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    with pytest.raises(ValueError, match="--out_dir must differ from --ckpt_dir"):
        script_main("reshard", "--ckpt_dir", str(src), "--out_dir", f"{src}/.", "--mp", "2", "--force")
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_reshard_forced_over_links_to_its_input_leaves_the_input_whole(make_ckpt, tmp_path, link):
    """--force into a folder whose files are links to the input's (a copy made with cp -al, or a cache of
    symbolic links): the input keeps every byte, where writing the shards in place would have written through
    the links into the shard being read."""
    ckpt, _ = make_ckpt(MP4, mp=1)
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(ckpt, src)
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).hardlink_to(f) if link == "hard" else (out / f.name).symlink_to(f)
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    script_main("reshard", "--ckpt_dir", str(src), "--out_dir", str(out), "--mp", "2", "--force")
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    assert sorted(f.name for f in out.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    half = torch.load(out / "consolidated.01.pth", weights_only=True)["layers.0.attention.wq.weight"]
    whole = torch.load(src / "consolidated.00.pth", weights_only=True)["layers.0.attention.wq.weight"]
    assert torch.equal(half, whole.chunk(2)[1])


def test_reshard_forced_over_another_checkpoint_leaves_none_of_it(make_ckpt, tmp_path, tokenizer_path):
    """--force into a folder holding a checkpoint of four shards: two are written, the other two removed, the
    checklist theirs, and the folder loads as the input. Its tokenizer.model, a symbolic link to another
    model's, is replaced, not written through."""
    ckpt, _ = make_ckpt(MP4, mp=1)
    old, _ = make_ckpt(MP4, mp=4, seed=1)
    out, other = tmp_path / "out", tmp_path / "other.model"
    shutil.copytree(old, out)
    other.write_bytes(b"another model's")
    (out / "tokenizer.model").symlink_to(other)
    shutil.copyfile(tokenizer_path, Path(ckpt) / "tokenizer.model")
    script_main("reshard", "--ckpt_dir", ckpt, "--out_dir", str(out), "--mp", "2", "--force")
    assert sorted(f.name for f in out.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert (out / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
    assert other.read_bytes() == b"another model's"
    listed = [line.split()[1] for line in (out / "checklist.chk").read_text().splitlines()]
    assert listed == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    want = Llama.build(ckpt, tokenizer_path, 32, 1, device="cpu", dtype="float32").generate([[1, 5, 9]], 6, 0)
    got = Llama.build(str(out), tokenizer_path, 32, 1, device="cpu", dtype="float32").generate([[1, 5, 9]], 6, 0)
    assert got == want


def test_a_reshard_stopped_leaves_one_checkpoint_whole_the_old_or_the_new(make_ckpt, tmp_path, tokenizer_path,
                                                                          monkeypatch):
    """--force over another checkpoint, stopped (Ctrl-C) while its tokenizer is copied: the old checkpoint is
    there as it was, tokenizer too; stopped while the files are renamed into place: the renames finish first,
    and the folder holds the new checkpoint whole (where it had held new shards beside the old checklist)."""
    ckpt, _ = make_ckpt(MP4, mp=1)
    old, _ = make_ckpt(MP4, mp=4, seed=1)
    shutil.copyfile(tokenizer_path, Path(ckpt) / "tokenizer.model")
    out = tmp_path / "out"
    shutil.copytree(old, out)
    (out / "tokenizer.model").write_bytes(b"the old model's")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["--ckpt_dir", ckpt, "--out_dir", str(out), "--mp", "2", "--force"]

    def stopped(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(shutil, "copyfile", stopped)
        with pytest.raises(KeyboardInterrupt):
            script_main("reshard", *args)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    rename, renamed = os.replace, []

    def interrupted(src, dst):  # Ctrl-C at the first rename
        if not renamed:
            os.kill(os.getpid(), signal.SIGINT)
        rename(src, dst)
        renamed.append(Path(dst).name)

    monkeypatch.setattr(os, "replace", interrupted)
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)  # (ignored in a background job)
    try:
        with pytest.raises(KeyboardInterrupt):
            script_main("reshard", *args)
    finally:
        signal.signal(signal.SIGINT, interrupt)
    assert len(renamed) == 5  # params.json, two shards, tokenizer.model, checklist.chk
    assert sorted(p.name for p in out.iterdir()) == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth",
                                                     "params.json", "tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
    for line in (out / "checklist.chk").read_text().splitlines():
        digest, name = line.split()
        assert checkpoint.md5(out / name) == digest, name


def test_a_write_without_room_or_permission_says_so(make_ckpt, tmp_path, monkeypatch, tokenizer_path):
    """A full disk (which torch.save reports in C++'s words) or a read-only folder: one ValueError saying so, the
    checkpoint there before left as it was."""
    ckpt, _ = make_ckpt(MP4, mp=1)
    out = tmp_path / "out"
    shutil.copytree(ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4544 vs 4438")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ValueError, match=rf"can't write the checkpoint into {re.escape(str(out))}: torch.save failed "
                                         r"\(\[enforce fail .* 4438\), with [\d.]+ MiB free there: free space there"):
        script_main("reshard", "--ckpt_dir", ckpt, "--out_dir", str(out), "--mp", "2", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "new"))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ValueError, match="new: Read-only file system: write it into a folder you can write to"):
        script_main("make_checkpoint", "--out_dir", str(tmp_path / "new"), "--tokenizer_path", tokenizer_path)


def test_what_a_killed_reshard_left_is_removed_by_the_next(make_ckpt, tmp_path, tokenizer_path):
    """A reshard killed mid-write (kill -9, the OOM killer) leaves its hidden temporary files: the folder still
    counts as empty for the next run, which removes them, a user's own hidden file kept."""
    ckpt, _ = make_ckpt(MP4, mp=1)
    out = tmp_path / "out"
    out.mkdir()
    left = [".params.json.partial", ".consolidated.00.pth.partial", ".consolidated.03.pth.partial",
            ".checklist.chk.partial", ".tokenizer.model.partial"]
    for name in left:
        (out / name).write_bytes(b"cut short")
    script_main("reshard", "--ckpt_dir", ckpt, "--out_dir", str(out), "--mp", "2")
    names = lambda: sorted(p.name for p in out.iterdir() if p.name != "tokenizer.model")  # (one may be copied)
    assert names() == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json"]
    (out / ".notes.partial").write_text("mine")
    for name in left:
        (out / name).write_bytes(b"cut short")
    with pytest.raises(ValueError, match="not empty"):  # a checkpoint is there
        script_main("reshard", "--ckpt_dir", ckpt, "--out_dir", str(out), "--mp", "1")
    script_main("reshard", "--ckpt_dir", ckpt, "--out_dir", str(out), "--mp", "1", "--force")
    assert names() == [".notes.partial", "checklist.chk", "consolidated.00.pth", "params.json"]


def test_reshard_forced_without_a_tokenizer_keeps_the_one_there_and_says_so(make_ckpt, tmp_path, capsys):
    ckpt, _ = make_ckpt(MP4, mp=1)
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(ckpt, src)
    (src / "tokenizer.model").unlink(missing_ok=True)
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"another model's")
    script_main("reshard", "--ckpt_dir", str(src), "--out_dir", str(out), "--mp", "2", "--force")
    assert (out / "tokenizer.model").read_bytes() == b"another model's"
    assert f"warning: {out / 'tokenizer.model'} was there before and is kept" in capsys.readouterr().err


def test_scripts_refuse_an_out_dir_that_is_a_file(tmp_path, make_ckpt):
    ckpt, _ = make_ckpt(MP4, mp=1)
    f = tmp_path / "file"
    f.write_text("mine")
    for args in (["scripts/reshard.py", "--ckpt_dir", ckpt, "--mp", "2"], ["scripts/make_checkpoint.py"]):
        r = run_cmd([sys.executable, *args, "--out_dir", str(f)])
        assert r.returncode == 1 and "is a file" in r.stderr and "Traceback" not in r.stderr
        assert f.read_text() == "mine"


def test_make_checkpoint_leaves_nothing_behind_when_it_fails(tmp_path, tokenizer_path):
    """A failed run writes no half checkpoint, which the next run would refuse as a folder not empty."""
    out = tmp_path / "made"
    with pytest.raises(ValueError, match="can't be split across 3 shards"):
        script_main("make_checkpoint", "--out_dir", str(out), "--mp", "3", "--tokenizer_path", tokenizer_path)
    assert not out.exists()
    script_main("make_checkpoint", "--out_dir", str(out), "--mp", "2", "--tokenizer_path", tokenizer_path)
    assert len(list(out.glob("consolidated.*.pth"))) == 2


# ---- broken checkpoints: each gets one clear error naming the file and the problem

def broken_copy(ckpt, tmp_path) -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(ckpt, dst)
    return dst


def resave(path: Path, change, legacy: bool = False) -> None:
    shard = torch.load(path, weights_only=True)
    change(shard)
    torch.save(shard, path, _use_new_zipfile_serialization=not legacy)


def hugging_face_folder(d: Path, keep_original: bool) -> None:
    """d laid out as a Hub repository of Llama 3: transformers' files, and Meta's in original/ if kept."""
    (d / "original").mkdir()
    for p in list(d.iterdir()):
        if p.is_file():
            p.rename(d / "original" / p.name) if keep_original else p.unlink()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (d / "model-00001-of-00001.safetensors").write_bytes(b"")


BROKEN = {
    "missing params.json": (lambda d: (d / "params.json").unlink(), r"params.json: missing"),
    # Folders from the Hugging Face Hub: transformers' files, with or without Meta's own in original/.
    "Hugging Face folder": (lambda d: hugging_face_folder(d, keep_original=False),
                            r"params.json: missing.*Hugging Face transformers checkpoint.*original/"),
    "Hugging Face folder of pytorch_model.bin alone": (
        lambda d: ([p.unlink() for p in d.iterdir()], torch.save({}, d / "pytorch_model.bin")),
        r"params.json: missing.*Hugging Face transformers checkpoint"),
    "Hugging Face folder, Meta's files in original/": (
        lambda d: hugging_face_folder(d, keep_original=True),
        r"params.json: missing.*broken/original holds them.*--ckpt_dir .*broken/original "),
    "invalid JSON": (lambda d: (d / "params.json").write_text('{"dim": 64,'), r"params.json: not valid JSON"),
    "no shards": (lambda d: [p.unlink() for p in d.glob("*.pth")], r"no consolidated.NN.pth shards"),
    "shards misnumbered": (lambda d: (d / "consolidated.01.pth").rename(d / "consolidated.02.pth"),
                           r"consolidated.01.pth is missing \(found consolidated.00.pth, consolidated.02.pth\)"),
    "shard named with three digits": (lambda d: (d / "consolidated.00.pth").rename(d / "consolidated.000.pth"),
                                      r"consolidated.000.pth: misnamed: .*rename it consolidated.00.pth"),
    "last shard missing, checklist.chk of md5sum -b": (lambda d: (
        (d / "checklist.chk").write_text((d / "checklist.chk").read_text().replace("  ", " *")),
        (d / "consolidated.01.pth").unlink()), r"checklist.chk lists \['consolidated.01.pth'\], not there"),
    "last shard missing, no checklist.chk": (
        lambda d: ((d / "consolidated.01.pth").unlink(), (d / "checklist.chk").unlink()),
        r"shards were cut for 2 processes \(consolidated.00.pth holds 1/2 of each split weight\), but 1 is here "
        r"\(consolidated.00.pth\): consolidated.01.pth missing"),
    "shards of another checkpoint among them": (
        lambda d: [shutil.copyfile(d / f"consolidated.0{j}.pth", d / f"consolidated.0{j + 2}.pth") for j in (0, 1)],
        r"shards were cut for 2 processes .*but 4 are here \(consolidated.00.pth, .*consolidated.03.pth\): shards of "
        r"another checkpoint among them"),
    "the folder that holds the model's folder": (
        lambda d: [p.rename((d / "llama-2-7b").mkdir(exist_ok=True) or d / "llama-2-7b" / p.name)
                   for p in list(d.iterdir())],
        r"params.json: missing.*The model folders in it \(llama-2-7b/\) hold them: pass one, --ckpt_dir "
        r".*broken/llama-2-7b"),
    "last shard missing": (lambda d: (d / "consolidated.01.pth").unlink(),
                           r"checklist.chk lists \['consolidated.01.pth'\], not there: the download or copy is "),
    "wrong shape": (lambda d: resave(d / "consolidated.01.pth", lambda s: s.update(
        {"layers.1.feed_forward.w2.weight": s["layers.1.feed_forward.w2.weight"][:, :-8].clone()})),
        r"consolidated.01.pth: layers.1.feed_forward.w2.weight has shape \(64, 112\), expected \(64, 120\)"),
    "missing key": (lambda d: resave(d / "consolidated.00.pth", lambda s: s.pop("layers.0.ffn_norm.weight")),
                    r"consolidated.00.pth: missing keys \['layers.0.ffn_norm.weight'\]"),
    "unexpected key": (lambda d: resave(d / "consolidated.00.pth", lambda s: s.update({"lm_head.bias": torch.ones(3)})),
                       r"consolidated.00.pth: unexpected keys \['lm_head.bias'\]"),
    "truncated shard": (lambda d: (d / "consolidated.01.pth").write_bytes((d / "consolidated.01.pth").read_bytes()[:5000]),
                        r"consolidated.01.pth: truncated or corrupted"),
    "corrupted shard": (lambda d: (d / "consolidated.00.pth").write_bytes(b"\x00" * 4096),
                        r"consolidated.00.pth: truncated or corrupted"),
    "vocab mismatch": (lambda d: (d / "params.json").write_text(json.dumps({**GQA, "vocab_size": 32016})),
                       r"vocab_size 32016 but the shards hold 32000"),
    # Shards that fail to load for another reason than damage: each said, not "download it again".
    "shard is a folder": (lambda d: ((d / "consolidated.01.pth").unlink(), (d / "consolidated.01.pth").mkdir()),
                          r"cannot read .*consolidated.01.pth: it is a folder, not a file$"),
    "empty shard": (lambda d: (d / "consolidated.01.pth").write_bytes(b""), r"consolidated.01.pth: empty \(0 bytes\)"),
    "broken symbolic link": (lambda d: ((d / "consolidated.01.pth").unlink(),
                                        (d / "consolidated.01.pth").symlink_to(d / "moved.pth")),
                             r"cannot read .*consolidated.01.pth: it is a symbolic link to .*moved.pth, which does "),
    "torch's old format": (lambda d: resave(d / "consolidated.01.pth", lambda s: None, legacy=True),
                           r"consolidated.01.pth: saved in torch's old \(non-zip\) format.*re-save it with a current"),
    "safetensors named .pth": (lambda d: (d / "consolidated.01.pth").write_bytes(
        struct.pack("<Q", 2) + b"{}"), r"consolidated.01.pth: a safetensors file"),
    "keys of a DistributedDataParallel wrapper": (lambda d: resave(d / "consolidated.00.pth", lambda s: s.update(
        {f"module.{k}": s.pop(k) for k in list(s)})), r"consolidated.00.pth: its keys carry a 'module.' prefix"),
    "a sparse tensor": (lambda d: resave(d / "consolidated.01.pth", lambda s: s.update(
        {"norm.weight": s["norm.weight"].to_sparse()})),
        r"consolidated.01.pth: norm.weight is a sparse_coo tensor, where Meta's shards hold dense ones: save it with "
        r"\.to_dense"),
    "a training checkpoint": (lambda d: resave(d / "consolidated.00.pth", lambda s: (s.update(model=dict(s)), [
        s.pop(k) for k in list(s) if k != "model"])), r"consolidated.00.pth: expected a dict of tensors, as Meta's "
                                                     r"shards are; this one holds dicts \(under \['model'\]\)"),
    "output.weight of no dimensions": (lambda d: resave(d / "consolidated.00.pth", lambda s: s.update(
        {"output.weight": torch.tensor(1.0, dtype=torch.bfloat16)})),
        r"consolidated.00.pth: output.weight has shape \(\), expected 2 dimensions"),
    # A params.json of another model: what disagrees with the shards, not that the model it says is too large.
    "params.json of Llama 2 70B": (lambda d: (d / "params.json").write_text(json.dumps(
        {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
         "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1})),
        r"params.json says n_layers 80, the shards hold 2 layers; params.json says dim 8192, the shards' weights "
        r"are 64 wide"),
    "a dim too large for any tensor": (lambda d: (d / "params.json").write_text(json.dumps({**GQA, "dim": 10 ** 20})),
                                       r"params.json says dim 100000000000000000000, the shards' weights are 64 wide"),
    # 4 heads of 16 over 1 KV head make the very shapes of 8 heads of 8 over 2: Llama 2's rope.freqs tells them apart.
    "n_heads that rope.freqs contradicts": (lambda d: (d / "params.json").write_text(json.dumps(
        {**GQA, "n_heads": 4, "n_kv_heads": 1})),
        r"params.json's n_heads 4 gives head_dim 16, but the shards' rope.freqs is for head_dim 8"),
    # Llama 3.2's quantized releases, its vision models and Llama 4: told apart by params.json, before any weight.
    "quantized release": (lambda d: (d / "params.json").write_text(json.dumps(
        {**GQA, "quantization_args": {"group_size": 32}, "lora_args": {"rank": 16, "scale": 2.0}})),
        r"params.json has quantization_args: this is one of Meta's quantized releases"),
    "vision model": (lambda d: (d / "params.json").write_text(json.dumps({**GQA, "vision_chunk_size": 560})),
                     r"params.json has vision_chunk_size: this is a Llama 3.2 Vision model"),
    "float8 weights": (lambda d: resave(d / "consolidated.01.pth", lambda s: s.update(
        {"layers.1.feed_forward.w1.weight": s["layers.1.feed_forward.w1.weight"].to(torch.float8_e4m3fn)})),
        r"consolidated.01.pth: layers.1.feed_forward.w1.weight is stored as torch.float8_e4m3fn \(Meta's FP8 "
        r"release.*fp8_scales"),
    "FP8 release's scales": (lambda d: torch.save({"0_w1_0": torch.ones(3)}, d / "fp8_scales_0.pt"),
                             r"has fp8_scales_0.pt: this is Meta's FP8 release"),
    "integer weights": (lambda d: resave(d / "consolidated.00.pth", lambda s: s.update(
        {"layers.0.attention.wq.weight": s["layers.0.attention.wq.weight"].to(torch.int8)})),
        r"layers.0.attention.wq.weight is stored as torch.int8; this engine loads weights saved in bfloat16"),
    # Values of the wrong type or range: one line naming params.json, not a TypeError deep in a layer.
    **{f"params.json's {key} {value!r}": (
        lambda d, key=key, value=value: (d / "params.json").write_text(json.dumps({**GQA, key: value})),
        rf"params.json: ModelArgs.{key} must be {said}") for key, value, said in (
            ("n_heads", "8", "an integer >= 1"), ("dim", 64.0, "an integer >= 1"), ("multiple_of", 0, "an integer"),
            ("vocab_size", "32000", "a positive integer"),
            ("norm_eps", None, "a positive number"), ("rope_theta", "1e4", "a positive number"),
            ("ffn_dim_multiplier", "x", "a positive number"), ("use_scaled_rope", "yes", "true or false"))},
    "Llama 4": (lambda d: (d / "params.json").write_text(json.dumps(
        {**GQA, "moe_args": {"num_experts": 16, "top_k": 1}, "use_qk_norm": True, "nope_layer_interval": 4})),
        r"params.json has moe_args: this is a Llama 4 model"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_gets_a_clear_error(make_ckpt, tokenizer_path, tmp_path, case):
    ckpt, _ = make_ckpt(GQA, mp=2)
    d = broken_copy(ckpt, tmp_path)
    breaks, message = BROKEN[case]
    breaks(d)
    with pytest.raises(ValueError, match=message):
        Llama.build(str(d), tokenizer_path, 32, 1)


@pytest.fixture
def unreadable(monkeypatch):
    """unreadable(path): opening path fails as for a user without read permission, which chmod can't make it for
    the root user the tests may run as."""
    def make(path: Path) -> None:
        real_open, target = builtins.open, os.path.realpath(path)

        def fake_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == target:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, *args, **kwargs)
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)  # pathlib's
    return make


@pytest.mark.parametrize("name", ["params.json", "checklist.chk", "consolidated.01.pth", "tokenizer.model"])
def test_a_file_that_cannot_be_read_is_named_with_the_reason(make_ckpt, tokenizer_path, tmp_path, unreadable, name):
    ckpt, _ = make_ckpt(GQA, mp=2)
    d = broken_copy(ckpt, tmp_path)
    shutil.copyfile(tokenizer_path, d / "tokenizer.model")
    unreadable(d / name)
    with pytest.raises(ValueError, match=rf"^cannot read {re.escape(str(d / name))}: permission denied; your user "
                                         "needs read access"):
        Llama.build(str(d), str(d / "tokenizer.model"), 32, 1)


def test_params_json_with_a_byte_order_mark_loads(make_ckpt, tmp_path):
    ckpt, _ = make_ckpt(GQA, mp=2)
    d = broken_copy(ckpt, tmp_path)
    (d / "params.json").write_bytes(b"\xef\xbb\xbf" + (d / "params.json").read_bytes())
    assert checkpoint.Checkpoint(str(d)).model_args().dim == GQA["dim"]


def test_tokenizer_of_another_vocabulary_is_refused(tmp_path, tokenizer_path):
    d = tmp_path / "ck"
    checkpoint.random_checkpoint(str(d), GQA, vocab_size=32016)  # a Code Llama-sized vocabulary
    with pytest.raises(ValueError, match="tokenizer has 32000 tokens but the model .* has a vocabulary of 32016"):
        Llama.build(str(d), tokenizer_path, 32, 1)


def damaged_pickle(path: Path) -> None:
    """path's data.pkl, the pickle that lists its tensors, replaced by bytes that are no pickle."""
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in entries:
            z.writestr(info, b"\x80\x02damaged" if info.filename.endswith("data.pkl") else data)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("made", ["to run code", "damaged"])
def test_a_pickle_that_would_run_code_or_is_damaged_is_refused_and_never_run(make_ckpt, tokenizer_path, tmp_path,
                                                                               made):
    """Refused without a word of torch's advice to load it with weights_only=False, which would run the code."""
    ckpt, _ = make_ckpt(GQA, mp=1)
    d = broken_copy(ckpt, tmp_path)
    marker = tmp_path / "code-was-run"
    if made == "damaged":
        damaged_pickle(d / "consolidated.00.pth")
    else:
        resave(d / "consolidated.00.pth", lambda s: s.update({"payload": RunsCode(marker)}))
    with pytest.raises(ValueError, match=r"consolidated.00.pth: refused to load: the file's pickle holds something "
                                         r"other than tensors.*md5sum -c checklist.chk") as error:
        Llama.build(str(d), tokenizer_path, 32, 1)
    assert "weights_only" not in str(error.value) and not marker.exists()


def test_a_kv_cache_that_cannot_fit_fails_before_allocating(make_ckpt, tokenizer_path, monkeypatch):
    ckpt, _ = make_ckpt(GQA)
    with pytest.raises(ValueError, match=r"not enough memory on cpu: .*KV cache .* GiB .*must be at most \d+ here"):
        Llama.build(ckpt, tokenizer_path, max_seq_len=2_000_000, max_batch_size=1000)
    monkeypatch.setattr(generation, "available_memory", lambda device: 1 << 20)  # the weights take 17 MB
    with pytest.raises(ValueError, match=r"this process.s weights alone take 0.02 GiB in float32, and 0.00 GiB are "
                                         r"available: load it on more processes"):
        Llama.build(ckpt, tokenizer_path, 32, 1, dtype="float32")


def test_available_memory_counts_the_page_cache_the_kernel_gives_back(tmp_path, monkeypatch):
    """MemAvailable, not MemFree: right after a checkpoint is copied, its pages fill the cache and MemFree is
    small; a model that fits was refused. With no MemAvailable to read (macOS), the machine's memory in all."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:          800000 kB\nMemAvailable:   20000000 kB\n")
    assert machine.available_memory(torch.device("cpu"), str(meminfo)) == 20000000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")
    sysconf = {"SC_PAGE_SIZE": 16384, "SC_PHYS_PAGES": 1 << 20}  # 16 GiB of Apple silicon's 16 KiB pages
    monkeypatch.setattr(os, "sysconf", sysconf.__getitem__)
    assert machine.available_memory(torch.device("cpu"), str(tmp_path / "none")) == 16 << 30
    monkeypatch.delattr(os, "sysconf")  # Windows
    assert machine.available_memory(torch.device("cpu"), str(meminfo)) is None


@pytest.mark.parametrize("case", ["wrong shape", "truncated shard", "injected failure on rank 1"])
def test_broken_checkpoint_on_two_processes_exits_non_zero_without_hanging(make_ckpt, tokenizer_path, tmp_path, case):
    ckpt, _ = make_ckpt(GQA, mp=2)
    d = broken_copy(ckpt, tmp_path)
    extra = []
    if case in BROKEN:
        BROKEN[case][0](d)
        message = BROKEN[case][1]
    else:
        extra, message = ["--fail_on_rank", "1"], r"rank 1 \(on [^)]+\) failed to load the checkpoint: injected"
    result = launch(2, "tests/generate_driver.py", "--ckpt_dir", str(d), "--tokenizer_path", tokenizer_path,
                      "--prompts", json.dumps(PROMPTS), *extra, timeout=90)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-3000:]


def test_a_save_that_fails_leaves_the_checkpoint_there_as_it_was(make_ckpt, tmp_path):
    """Every file is written beside its name before any is renamed into place: a save over another checkpoint
    that fails after its first shard (a crash, a full disk) leaves that checkpoint whole, with no new file and
    no temporary one, where replacing file by file had left a mixture of the two that loads."""
    ckpt, state = make_ckpt(MP4, mp=2)
    out = tmp_path / "out"
    shutil.copytree(ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def shards():
        yield {k: v.clone() for k, v in state.items()}
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(shards(), {**MP4, "vocab_size": VOCAB}, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
