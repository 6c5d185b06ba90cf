"""Tests for download.sh against a fake signed-URL release on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_release_server import MODELS, SIGNATURE, FakeRelease  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "download.sh"
BASH = shutil.which("bash") or "/bin/bash"
ROOT_FILES = ["LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk"]
SHARD_7B = "llama-2-7b/consolidated.00.pth"
DOWNLOADERS = [d for d in ("curl", "wget") if shutil.which(d)]

# tools download.sh needs besides a downloader and an md5 tool
BASE_TOOLS = ["awk", "cat", "dd", "df", "du", "grep", "head", "mkdir", "mkfifo", "mktemp", "mv", "rm",
              "sleep", "tr", "wc"]


@pytest.fixture
def server():
    srv = FakeRelease().start()
    try:
        yield srv
    finally:
        srv.stop()


def script_env(env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}
    full_env["LLAMA_DOWNLOAD_BACKOFF"] = "0"
    full_env.update(env or {})
    return full_env


def run(args=(), *, env=None, stdin="", cwd=None, timeout=60):
    """Runs download.sh; checks that the signature never shows in its output."""
    proc = subprocess.run(
        [BASH, str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
        env=script_env(env), cwd=cwd, timeout=timeout,
    )
    assert SIGNATURE not in proc.stdout
    assert SIGNATURE not in proc.stderr
    return proc


@pytest.fixture
def launch(tmp_path_factory):
    """Starts download.sh in the background, in a process group of its own (as a shell job); its output
    goes to files (proc.out(), proc.err()). Whatever is left of the group is killed at the end."""
    procs = []
    logs = tmp_path_factory.mktemp("logs")

    def start(args, env=None):
        n = len(procs)
        out, err = logs / f"stdout{n}.txt", logs / f"stderr{n}.txt"
        with open(out, "w") as o, open(err, "w") as e:
            proc = subprocess.Popen([BASH, str(SCRIPT), *args], stdin=subprocess.DEVNULL, stdout=o,
                                    stderr=e, env=script_env(env), start_new_session=True)
        proc.out, proc.err = out.read_text, err.read_text
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        assert SIGNATURE not in proc.out() + proc.err()


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def partial_started(path: Path):
    """True once the download has written to path (curl buffers, so not every byte received is there)."""
    return lambda: path.exists() and path.stat().st_size > 0


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group pgid."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(pid))
    return found


def model_paths(model: str) -> list[str]:
    shards = [f"{model}/consolidated.{i:02d}.pth" for i in range(MODELS[model])]
    return shards + [f"{model}/params.json", f"{model}/checklist.chk"]


def assert_release(target: Path, release: FakeRelease, models: list[str]) -> None:
    """Exactly the requested models, laid out as Meta's release, byte-exact."""
    wanted = list(ROOT_FILES)
    for m in models:
        wanted += model_paths(m)
    for rel in wanted:
        assert (target / rel).read_bytes() == release.files[rel], rel
    present = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert present == sorted(wanted)
    # and the checklists agree with md5sum's view of the folder
    for m in models:
        for line in (target / m / "checklist.chk").read_text().splitlines():
            digest, name = line.split(maxsplit=1)
            assert hashlib.md5((target / m / name).read_bytes()).hexdigest() == digest


def no_complete_looking(target: Path, rel: str) -> None:
    assert not (target / rel).exists(), f"{rel} left under its final name"


def restricted_path(tmp_path: Path, tools: list[str], extra: dict[str, str] | None = None) -> str:
    """A PATH directory holding only the given tools (plus small scripts)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        assert found, tool
        (bindir / tool).symlink_to(found)
    for name, text in (extra or {}).items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    return str(bindir)


# ------------------------------------------------------------------ happy paths

def test_flags_download_verifies_meta_layout(server, tmp_path):
    target = tmp_path / "weights"
    proc = run(["--url", server.url, "--models", "7B,13B,70B", "--target", str(target)])
    assert proc.returncode == 0, proc.stderr
    assert_release(target, server, ["llama-2-7b", "llama-2-13b", "llama-2-70b"])
    for m in ("tokenizer", "llama-2-7b", "llama-2-13b", "llama-2-70b"):
        assert f"{m}: OK" in proc.stdout
    assert "All files verified" in proc.stdout
    # the path replaced the '*' and the signed query went along
    assert "llama-2-70b/consolidated.07.pth" in server.requested_paths()
    assert not any(r for r in server.requests if r[0] != "GET")


def test_interactive_prompts_from_stdin(server, tmp_path):
    workdir = tmp_path / "here"
    workdir.mkdir()
    proc = run([], stdin=f"{server.url}\n7B-chat\n", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "Enter the URL from email" in proc.stderr
    assert "Enter the models to download, separated by commas or blanks" in proc.stderr
    # the default target is the current directory
    assert_release(workdir, server, ["llama-2-7b-chat"])


def test_interactive_enter_means_all_models(server, tmp_path):
    # a pasted URL with quotes and blanks around it is accepted too
    proc = run(["--target", str(tmp_path / "t")], stdin=f"  '{server.url}'\n\n")
    assert proc.returncode == 0, proc.stderr
    assert_release(tmp_path / "t", server, list(MODELS))
    assert "llama-2-70b-chat: OK" in proc.stdout


def test_environment_variables(server, tmp_path):
    target = tmp_path / "env target"  # a blank in the path, too
    proc = run(env={"LLAMA_DOWNLOAD_URL": server.url, "LLAMA_MODELS": "13b",
                    "LLAMA_TARGET_DIR": str(target)})
    assert proc.returncode == 0, proc.stderr
    assert "Enter" not in proc.stderr
    assert_release(target, server, ["llama-2-13b"])


def test_flags_win_over_environment(server, tmp_path):
    env = {"LLAMA_DOWNLOAD_URL": "https://example.invalid/no-star?Signature=x",
           "LLAMA_MODELS": "70B", "LLAMA_TARGET_DIR": str(tmp_path / "from-env"),
           "LLAMA_DOWNLOADER": "no-such-tool"}
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path / "flag"),
                "--downloader", DOWNLOADERS[0]], env=env)
    assert proc.returncode == 0, proc.stderr
    assert_release(tmp_path / "flag", server, ["llama-2-7b"])
    assert not (tmp_path / "from-env").exists()


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_each_downloader_and_second_run_fetches_nothing(server, tmp_path, downloader):
    args = ["--url", server.url, "--models", "7B", "--target", str(tmp_path),
            "--downloader", downloader]
    first = run(args)
    assert first.returncode == 0, first.stderr
    assert f"Downloader: {downloader}" in first.stdout
    assert_release(tmp_path, server, ["llama-2-7b"])
    server.reset_log()
    second = run(args)
    assert second.returncode == 0, second.stderr
    assert server.requests == []
    assert "already verified" in second.stdout
    assert_release(tmp_path, server, ["llama-2-7b"])


def test_progress_is_shown_per_file(server, tmp_path):
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path)],
               env={"LLAMA_DOWNLOAD_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "consolidated.00.pth  64.0 KiB / 64.0 KiB  100%" in proc.stderr
    assert "[6/7] llama-2-7b/consolidated.00.pth: verified" in proc.stdout


def test_dry_run_fetches_nothing(server, tmp_path):
    target = tmp_path / "not-created"
    proc = run(["--url", server.url, "--models", "70B-chat", "--target", str(target),
                "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert server.requests == []
    assert not target.exists()
    out = proc.stdout
    assert "/dl/llama-2-70b-chat/consolidated.07.pth?Policy=***&Signature=***" in out
    assert f"{target}/llama-2-70b-chat/consolidated.07.pth" in out
    assert f"{target}/tokenizer.model" in out


# ------------------------------------------------------ Code Llama and Llama 3

@pytest.fixture
def family_server(request):
    srv = FakeRelease(request.param).start()
    try:
        yield srv
    finally:
        srv.stop()


def assert_tree(target: Path, release: FakeRelease, placed: dict[str, str]) -> None:
    """Exactly the files of placed ({path in target: path on the server}), byte-exact."""
    for rel, remote in placed.items():
        assert (target / rel).read_bytes() == release.files[remote], rel
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == sorted(placed)


def folder(local: str, remote: str, release: FakeRelease) -> dict[str, str]:
    """{local/NAME: remote/NAME} for every file of a model folder on the server."""
    return {local + p[len(remote):]: p for p in release.files if p.startswith(remote + "/")}


@pytest.mark.parametrize("family_server", ["codellama"], indirect=True)
def test_code_llama_models_each_with_its_tokenizer(family_server, tmp_path):
    srv = family_server
    proc = run(["--url", srv.url, "--family", "codellama", "--models", "7b,34B-python,70b-Instruct",
                "--target", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    placed = {"LICENSE": "LICENSE", "USE_POLICY.md": "USE_POLICY.md"}
    for model in ("CodeLlama-7b", "CodeLlama-34b-Python", "CodeLlama-70b-Instruct"):
        placed.update(folder(model, model, srv))
    assert_tree(tmp_path, srv, placed)
    assert "CodeLlama-70b-Instruct/tokenizer.model" in placed and "All files verified" in proc.stdout
    # 70b-Instruct's 8 shards, no more (Meta's script asks for 71 of them)
    assert sum(p.startswith("CodeLlama-70b-Instruct/consolidated.") for p in srv.requested_paths()) == 8


@pytest.mark.parametrize("family_server", ["llama3"], indirect=True)
def test_llama3_models_in_meta_folders_from_the_server_paths(family_server, tmp_path):
    srv = family_server
    proc = run(["--url", srv.url, "--models", "8B-instruct,70b", "--target", str(tmp_path)],
               env={"LLAMA_FAMILY": "llama3"})
    assert proc.returncode == 0, proc.stderr
    placed = {"LICENSE": "LICENSE", "USE_POLICY": "USE_POLICY",
              **folder("Meta-Llama-3-8B-Instruct", "8b_instruction_tuned", srv),
              **folder("Meta-Llama-3-70B", "70b_pre_trained", srv)}
    assert len(placed) == 2 + 4 + 11
    assert_tree(tmp_path, srv, placed)
    assert "Meta-Llama-3-70B: OK" in proc.stdout and "license: OK" in proc.stdout


@pytest.mark.parametrize("family_server", ["codellama"], indirect=True)
def test_a_tokenizer_the_checklist_does_not_list_is_fetched_with_a_warning(family_server, tmp_path):
    srv = family_server
    chk = srv.files["CodeLlama-7b/checklist.chk"].decode().splitlines(keepends=True)
    srv.files["CodeLlama-7b/checklist.chk"] = "".join(c for c in chk if "tokenizer" not in c).encode()
    args = ["--url", srv.url, "--family", "codellama", "--models", "7b", "--target", str(tmp_path)]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    assert "has no md5 for tokenizer.model: it is fetched but can't be verified" in proc.stderr
    tokenizer = tmp_path / "CodeLlama-7b/tokenizer.model"
    assert tokenizer.read_bytes() == srv.files["CodeLlama-7b/tokenizer.model"]
    # the next run keeps it, and says so
    srv.reset_log()
    again = run(args)
    assert again.returncode == 0, again.stderr
    assert srv.requests == []
    assert "has no md5 for tokenizer.model: the one in place is kept but can't be verified" in again.stderr
    assert "it is fetched" not in again.stderr
    # an empty one, as wget -O leaves after a 403, is not a tokenizer: fetched (the checklist once more too)
    tokenizer.write_bytes(b"")
    srv.reset_log()
    third = run(args)
    assert third.returncode == 0, third.stderr
    assert srv.requested_paths() == ["CodeLlama-7b/checklist.chk", "CodeLlama-7b/tokenizer.model"]
    assert tokenizer.read_bytes() == srv.files["CodeLlama-7b/tokenizer.model"]


@pytest.mark.parametrize("args, message", [
    (["--family", "llama3", "--models", "7B-chat"], "unknown model '7b-chat' for llama3 (valid: 8B,8B-instruct,"),
    (["--family", "codellama", "--models", "7b-chat"], "unknown model '7b-chat' for codellama"),
    (["--family", "llama4"], "unknown family 'llama4': the family is llama2, codellama or llama3"),
])
def test_a_model_or_family_not_there_is_rejected(server, tmp_path, args, message):
    proc = run(["--url", server.url, *args, "--target", str(tmp_path)])
    assert proc.returncode == 2
    assert message in proc.stderr
    assert server.requests == []


# ---------------------------------------------------------------------- resuming

@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_cut_transfer_resumes_with_range(server, tmp_path, downloader):
    server.cut = {SHARD_7B: 20000}
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path),
                "--downloader", downloader])
    assert proc.returncode == 0, proc.stderr
    assert server.ranges_for(SHARD_7B) == [None, "bytes=20000-"]
    assert "retry 1 of 5" in proc.stderr
    assert_release(tmp_path, server, ["llama-2-7b"])


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_interrupted_run_resumes_next_time(server, tmp_path, downloader):
    server.cut = {SHARD_7B: 30000}
    args = ["--url", server.url, "--models", "7B", "--target", str(tmp_path),
            "--downloader", downloader]
    first = run(args, env={"LLAMA_DOWNLOAD_RETRIES": "0"})
    assert first.returncode == 1
    assert "llama-2-7b: FAILED" in first.stdout
    assert f"{SHARD_7B}.partial" in first.stderr and "resume" in first.stderr
    no_complete_looking(tmp_path, SHARD_7B)
    assert (tmp_path / f"{SHARD_7B}.partial").stat().st_size == 30000

    server.reset_log()
    second = run(args)
    assert second.returncode == 0, second.stderr
    assert server.requested_paths() == [SHARD_7B]
    assert server.ranges_for(SHARD_7B) == ["bytes=30000-"]
    assert_release(tmp_path, server, ["llama-2-7b"])


def test_truncated_file_under_final_name_is_continued(server, tmp_path):
    # as left behind by a download that wrote straight to the final name
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / SHARD_7B).write_bytes(server.files[SHARD_7B][:10000])
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert server.ranges_for(SHARD_7B) == ["bytes=10000-"]
    assert_release(tmp_path, server, ["llama-2-7b"])


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_complete_partial_is_verified_without_refetch(server, tmp_path, downloader):
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / f"{SHARD_7B}.partial").write_bytes(server.files[SHARD_7B])
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path),
                "--downloader", downloader])
    assert proc.returncode == 0, proc.stderr
    assert server.ranges_for(SHARD_7B) == [f"bytes={64 * 1024}-"]  # answered 416
    assert_release(tmp_path, server, ["llama-2-7b"])


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_complete_file_that_fails_md5_is_fetched_anew_in_the_same_run(server, tmp_path, downloader):
    args = ["--url", server.url, "--models", "7B", "--target", str(tmp_path), "--downloader", downloader]
    assert run(args).returncode == 0
    damaged = bytearray(server.files[SHARD_7B])
    damaged[1000] ^= 0xFF
    (tmp_path / SHARD_7B).write_bytes(damaged)
    server.reset_log()
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    # continued as a partial (answered 416), then fetched from the start
    assert server.ranges_for(SHARD_7B) == [f"bytes={64 * 1024}-", None]
    assert "fetching it again from the start" in proc.stderr
    assert_release(tmp_path, server, ["llama-2-7b"])


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_partials_longer_than_the_file_start_again(server, tmp_path, downloader):
    """The server answers 416 to a resume past the file's end, which wget took for "already fully retrieved"."""
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / f"{SHARD_7B}.partial").write_bytes(server.files[SHARD_7B] + b"junk")
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path), "--downloader", downloader],
               env={"LLAMA_DOWNLOAD_RETRIES": "0"})  # starting again from byte 0 spends no retry
    assert proc.returncode == 0, proc.stderr
    assert server.ranges_for(SHARD_7B) == [f"bytes={64 * 1024 + 4}-", None]
    assert server.ranges_for("llama-2-7b/checklist.chk") == [None]  # no failed md5 made it fetch the list again
    assert_release(tmp_path, server, ["llama-2-7b"])


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_a_416_with_no_total_leaves_a_complete_partial_to_the_md5(server, tmp_path, downloader):
    """Some servers answer a Range past the end without Content-Range: the partial is not thrown away."""
    server.bare_416 = True
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / f"{SHARD_7B}.partial").write_bytes(server.files[SHARD_7B])
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path), "--downloader", downloader],
               env={"LLAMA_DOWNLOAD_RETRIES": "0"})
    assert proc.returncode == 0, proc.stderr
    assert server.ranges_for(SHARD_7B) == [f"bytes={64 * 1024}-"]
    assert_release(tmp_path, server, ["llama-2-7b"])


@pytest.mark.parametrize("downloader", DOWNLOADERS)
@pytest.mark.parametrize("part", ["complete", "half"])
def test_a_server_that_cannot_resume_sends_the_file_again(server, tmp_path, downloader, part):
    """A server that ignores Range answers a resume with the whole file (200): the file is taken from its start,
    and is not mistaken for the page an expired link gets, whether the partial was complete or not."""
    server.no_ranges = True
    (tmp_path / "llama-2-7b").mkdir()
    data = server.files[SHARD_7B]
    (tmp_path / f"{SHARD_7B}.partial").write_bytes(data if part == "complete" else data[:len(data) // 2])
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path), "--downloader", downloader],
               env={"LLAMA_DOWNLOAD_RETRIES": "0"})
    assert proc.returncode == 0, proc.stderr
    assert server.ranges_for(SHARD_7B)[0] == f"bytes={len(data) if part == 'complete' else len(data) // 2}-"
    assert_release(tmp_path, server, ["llama-2-7b"])


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_small_files_with_no_md5_are_never_resumed(server, tmp_path, downloader):
    """A partial LICENSE or checklist (left by an earlier run, stale or damaged) is fetched whole: no md5 would
    catch a resumed one that came out wrong."""
    (tmp_path / "llama-2-7b").mkdir()
    for rel in ("LICENSE", "llama-2-7b/checklist.chk"):
        (tmp_path / f"{rel}.partial").write_bytes(b"garbage" + server.files[rel][7:-10])
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path), "--downloader", downloader])
    assert proc.returncode == 0, proc.stderr
    assert server.ranges_for("LICENSE") == [None] and server.ranges_for("llama-2-7b/checklist.chk") == [None]
    assert_release(tmp_path, server, ["llama-2-7b"])


@pytest.mark.parametrize("page, have", [("html", 30000), ("html", 50), ("error_text", 30000)])
@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_page_in_reply_to_a_resume_keeps_the_partial(server, tmp_path, downloader, page, have):
    # an expired link answered with a 200 page: not the file from its start
    (tmp_path / "llama-2-7b").mkdir()
    part = tmp_path / f"{SHARD_7B}.partial"
    part.write_bytes(server.files[SHARD_7B][:have])
    setattr(server, page, {SHARD_7B})
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path),
                "--downloader", downloader])
    assert proc.returncode == 1
    assert (f"the server returned an HTML page or an error text instead of the rest of {SHARD_7B}; "
            "the link has probably expired or is wrong: request a new one") in proc.stderr
    assert "run the same command again with the new URL to resume it" in proc.stderr
    assert part.read_bytes() == server.files[SHARD_7B][:have]
    assert server.ranges_for(SHARD_7B) == [f"bytes={have}-"]
    no_complete_looking(tmp_path, SHARD_7B)


def test_transient_server_errors_are_retried(server, tmp_path):
    server.flaky = {SHARD_7B: 2}
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert len(server.ranges_for(SHARD_7B)) == 3
    assert "HTTP 503" in proc.stderr and "retry 2 of 5" in proc.stderr
    assert_release(tmp_path, server, ["llama-2-7b"])
    server.flaky = {SHARD_7B: 1}  # one retry allowed, one needed
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path / "again")],
               env={"LLAMA_DOWNLOAD_RETRIES": "1"})
    assert proc.returncode == 0 and "retry 1 of 1" in proc.stderr, proc.stderr
    assert_release(tmp_path / "again", server, ["llama-2-7b"])


def test_retry_delays_double_up_to_a_minute(server, tmp_path):
    """LLAMA_DOWNLOAD_BACKOFF seconds before the first retry, doubled for each after it, never more than 60 (a
    sleep that returns at once stands in for the waits)."""
    server.flaky = {SHARD_7B: 4}
    tools = [t for t in BASE_TOOLS if t != "sleep"] + DOWNLOADERS[:1] + ["md5sum"]
    path = restricted_path(tmp_path, tools, {"sleep": "#!/bin/sh\nexit 0\n"})
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path / "t")],
               env={"PATH": path, "LLAMA_DOWNLOAD_BACKOFF": "20"})
    assert proc.returncode == 0, proc.stderr
    said = re.findall(r"retry (\d) of 5 in (\d+)s", proc.stderr)
    assert said == [("1", "20"), ("2", "40"), ("3", "60"), ("4", "60")]


def test_checklists_written_by_other_md5_tools_are_read(server, tmp_path):
    """A checklist whose names start with ./ (md5sum run on ./*), carry md5sum's binary-mode * or end in CRLF
    (written on Windows): each file still has its md5, and the release downloads and verifies."""
    chk = "llama-2-7b/checklist.chk"
    forms = (b"%s  ./%s\r\n", b"%s *%s\n")  # the shard's line, params.json's
    lines = server.files[chk].splitlines()
    assert len(lines) == len(forms)
    server.files[chk] = b"".join(form % tuple(line.split(b"  ", 1)) for form, line in zip(forms, lines))
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert "no md5" not in proc.stderr and len(server.ranges_for(SHARD_7B)) == 1
    for rel in model_paths("llama-2-7b"):
        assert (tmp_path / rel).read_bytes() == server.files[rel], rel


# ---------------------------------------------------------------------- failures

@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_forbidden_link(server, tmp_path, downloader):
    server.forbidden = True
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path),
                "--downloader", downloader])
    assert proc.returncode == 1
    assert ("access denied (HTTP 403): the signed URL has expired or has been used "
            "too often; request a new one from Meta") in proc.stderr
    assert "A link for another family than llama2 is refused the same way: pass its --family" in proc.stderr
    assert len(server.requests) == 1  # no retries, no further files
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert "llama-2-7b: FAILED" in proc.stdout


@pytest.mark.parametrize("path", ["LICENSE", "llama-2-7b/checklist.chk", SHARD_7B])
@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_html_page_instead_of_file(server, tmp_path, path, downloader):
    server.html = {path}
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path),
                "--downloader", downloader])
    assert proc.returncode == 1
    assert (f"the server returned an HTML page instead of {path}; the link has probably "
            "expired or is wrong: request a new one") in proc.stderr
    no_complete_looking(tmp_path, path)
    assert not (tmp_path / f"{path}.partial").exists()
    assert "FAILED" in proc.stdout


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_corrupt_file_fails_verification(server, tmp_path, downloader):
    server.corrupt = {SHARD_7B}
    args = ["--url", server.url, "--models", "7B,7B-chat", "--target", str(tmp_path),
            "--downloader", downloader]
    proc = run(args)
    assert proc.returncode == 1
    assert f"{SHARD_7B} FAILED verification again, with the same md5" in proc.stderr  # not the transfer's fault
    assert "running again would fetch the same; the download was deleted: request a new link" in proc.stderr
    assert "llama-2-7b: FAILED" in proc.stdout
    assert "llama-2-7b-chat: OK" in proc.stdout
    no_complete_looking(tmp_path, SHARD_7B)
    assert not (tmp_path / f"{SHARD_7B}.partial").exists()
    assert (tmp_path / "llama-2-7b/params.json").exists()

    server.corrupt = set()
    server.reset_log()
    again = run(args)
    assert again.returncode == 0, again.stderr
    assert server.requested_paths() == [SHARD_7B]
    assert_release(tmp_path, server, ["llama-2-7b", "llama-2-7b-chat"])


def test_a_file_garbled_differently_twice_is_said_to_be_worth_another_run(server, tmp_path):
    """Two downloads of other wrong bytes each (a bad transfer, not a bad file on the server): run again."""
    server.garbled = {SHARD_7B}
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path)])
    assert proc.returncode == 1 and server.requested_paths().count(SHARD_7B) == 2
    assert re.search(rf"{SHARD_7B} FAILED verification again \(md5 \w+, checklist says \w+\); the corrupt download "
                     "was deleted: run the same command again to fetch it anew", proc.stderr), proc.stderr
    no_complete_looking(tmp_path, SHARD_7B)


def test_a_stale_checklist_in_place_is_fetched_anew_before_the_file(server, tmp_path):
    """A checklist left by an earlier run that lists another md5 (the release's files updated since): on the
    mismatch the checklist is fetched again before the shard, which verifies against it, fetched once."""
    args = ["--url", server.url, "--models", "7B", "--target", str(tmp_path)]
    chk = tmp_path / "llama-2-7b/checklist.chk"
    chk.parent.mkdir(parents=True)
    digest = hashlib.md5(server.files[SHARD_7B]).hexdigest()
    chk.write_text(server.files["llama-2-7b/checklist.chk"].decode().replace(digest, "0" * 32))
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    assert [p for p in server.requested_paths() if "llama-2-7b/c" in p] == [SHARD_7B, "llama-2-7b/checklist.chk"]
    assert (f"{SHARD_7B} has md5 {digest}, which llama-2-7b/checklist.chk does not list: fetching "
            "llama-2-7b/checklist.chk again") in proc.stdout
    assert_release(tmp_path, server, ["llama-2-7b"])


def test_a_download_is_kept_when_the_checklist_cannot_be_fetched_again(server, tmp_path):
    args = ["--url", server.url, "--models", "7B", "--target", str(tmp_path)]
    chk = tmp_path / "llama-2-7b/checklist.chk"
    chk.parent.mkdir(parents=True)
    digest = hashlib.md5(server.files[SHARD_7B]).hexdigest()
    chk.write_text(server.files["llama-2-7b/checklist.chk"].decode().replace(digest, "0" * 32))
    server.flaky = {"llama-2-7b/checklist.chk": 100}
    proc = run(args, env={"LLAMA_DOWNLOAD_RETRIES": "0"})
    assert proc.returncode == 1
    assert (tmp_path / f"{SHARD_7B}.partial").read_bytes() == server.files[SHARD_7B]
    server.flaky = {}
    server.reset_log()
    again = run(args)
    assert again.returncode == 0, again.stderr
    assert server.ranges_for(SHARD_7B) == [f"bytes={64 * 1024}-"]  # answered 416: not fetched again
    assert_release(tmp_path, server, ["llama-2-7b"])


def test_a_download_is_kept_when_the_new_checklist_does_not_list_it(server, tmp_path):
    args = ["--url", server.url, "--models", "7B", "--target", str(tmp_path)]
    chk = tmp_path / "llama-2-7b/checklist.chk"
    chk.parent.mkdir(parents=True)
    listed = server.files["llama-2-7b/checklist.chk"].decode()
    digest = hashlib.md5(server.files[SHARD_7B]).hexdigest()
    chk.write_text(listed.replace(digest, "0" * 32))
    server.files["llama-2-7b/checklist.chk"] = "".join(
        line for line in listed.splitlines(keepends=True) if "consolidated" not in line).encode()
    proc = run(args)
    assert proc.returncode == 1
    assert "the new llama-2-7b/checklist.chk has no md5 for consolidated.00.pth; cannot verify it" in proc.stderr
    assert server.ranges_for(SHARD_7B) == [None]  # not fetched again for nothing
    assert (tmp_path / f"{SHARD_7B}.partial").read_bytes() == server.files[SHARD_7B]


def test_md5_tool_that_fails_leaves_verified_files_as_they_are(server, tmp_path):
    target = tmp_path / "t"
    args = ["--url", server.url, "--models", "7B", "--target", str(target)]
    assert run(args).returncode == 0
    # a tool that fails having printed a digest (of what it read before the error): its status decides
    failing = "#!/bin/sh\necho 'd41d8cd98f00b204e9800998ecf8427e  -'\necho 'md5sum: -: Input/output error' >&2\nexit 1\n"
    path = restricted_path(tmp_path, BASE_TOOLS + DOWNLOADERS[:1], {"md5sum": failing})
    server.reset_log()
    proc = run(args, env={"PATH": path})
    assert proc.returncode == 1
    assert (f"cannot compute the md5 of {SHARD_7B}: md5sum failed: md5sum: -: Input/output error "
            "(exit status 1); the file is left as it is") in proc.stderr
    assert server.requests == []
    assert_release(target, server, ["llama-2-7b"])  # nothing moved or deleted


def test_checklist_in_place_without_a_needed_md5_is_fetched_once_more(server, tmp_path):
    args = ["--url", server.url, "--models", "7B", "--target", str(tmp_path)]
    assert run(args).returncode == 0
    # as left by an earlier run that got them short
    chk = tmp_path / "llama-2-7b/checklist.chk"
    chk.write_text("".join(line for line in chk.read_text().splitlines(keepends=True) if "params" not in line))
    (tmp_path / "tokenizer_checklist.chk").write_text(f"{'0' * 32}  something-else.model\n")
    server.reset_log()
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    assert server.requested_paths() == ["tokenizer_checklist.chk", "llama-2-7b/checklist.chk"]
    assert "llama-2-7b/checklist.chk has no md5 for params.json; fetching it again" in proc.stdout
    assert_release(tmp_path, server, ["llama-2-7b"])


def test_empty_files_in_place_are_fetched(server, tmp_path):
    args = ["--url", server.url, "--models", "7B", "--target", str(tmp_path)]
    assert run(args).returncode == 0
    for name in ("LICENSE", "USE_POLICY.md"):  # what wget -O leaves after a 403
        (tmp_path / name).write_bytes(b"")
    server.reset_log()
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    assert server.requested_paths() == ["LICENSE", "USE_POLICY.md"]
    assert_release(tmp_path, server, ["llama-2-7b"])


def test_corrupt_checklist_is_rejected(server, tmp_path):
    server.files["llama-2-7b/checklist.chk"] = b"this is not a checklist\n"
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path)])
    assert proc.returncode == 1
    assert "does not look like an md5 checklist" in proc.stderr
    no_complete_looking(tmp_path, "llama-2-7b/checklist.chk")


def test_missing_model_fails_only_that_model(server, tmp_path):
    server.missing = {"llama-2-13b/checklist.chk"}
    proc = run(["--url", server.url, "--models", "13B,7B", "--target", str(tmp_path)])
    assert proc.returncode == 1
    assert "HTTP 404" in proc.stderr
    assert "llama-2-13b: FAILED" in proc.stdout and "llama-2-7b: OK" in proc.stdout


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_is_reported(server, tmp_path):
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / f"{SHARD_7B}.partial").symlink_to("/dev/full")  # every write: ENOSPC
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path)])
    assert proc.returncode == 1
    assert f"disk full or not writable: free space in {tmp_path}" in proc.stderr
    no_complete_looking(tmp_path, SHARD_7B)


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_a_file_size_limit_is_named_and_stops_the_run(server, tmp_path, downloader):
    """ulimit -f: the downloader is killed by SIGXFSZ (exit status 153), which every later file would meet too."""
    proc = subprocess.run([BASH, "-c", 'ulimit -f 20 && exec "$0" "$@"', BASH, str(SCRIPT), "--url", server.url,
                           "--models", "7B,13B", "--target", str(tmp_path), "--downloader", downloader],
                          capture_output=True, text=True, env=script_env(), timeout=60)
    assert proc.returncode == 1
    assert "the shell's file size limit (ulimit -f) stopped the write" in proc.stderr
    assert "llama-2-13b: FAILED (not attempted)" in proc.stdout
    assert (tmp_path / f"{SHARD_7B}.partial").stat().st_size == 20 * 1024  # kept, to resume


# ------------------------------------------------- signals and concurrent runs

SIGNAL_CASES = [(d, "SIGTERM", False) for d in DOWNLOADERS] + [
    (DOWNLOADERS[0], "SIGQUIT", True), (DOWNLOADERS[0], "SIGINT", True)]


@pytest.mark.parametrize("downloader, signame, to_group", SIGNAL_CASES)
def test_signal_stops_a_download_at_once(server, tmp_path, launch, downloader, signame, to_group):
    # SIGTERM as kill sends it (to the script); Ctrl-\ and Ctrl-C to the whole foreground group, with
    # the progress line on, as in a terminal
    server.stall = {SHARD_7B: 20000}
    part = tmp_path / f"{SHARD_7B}.partial"
    proc = launch(["--url", server.url, "--models", "7B", "--target", str(tmp_path),
                   "--downloader", downloader], env={"LLAMA_DOWNLOAD_PROGRESS": "1" if to_group else "0"})
    wait_for(partial_started(part))
    start = time.monotonic()
    (os.killpg if to_group else os.kill)(proc.pid, getattr(signal, signame))
    assert proc.wait(timeout=5) == 130
    assert time.monotonic() - start < 2.5
    assert "interrupted: partial files are kept as *.partial" in proc.err()
    wait_for(lambda: SHARD_7B in server.dropped, 2)  # the downloader was stopped too
    kept = part.read_bytes()
    assert 0 < len(kept) <= 20000 and kept == server.files[SHARD_7B][:len(kept)]
    no_complete_looking(tmp_path, SHARD_7B)
    assert not (tmp_path / ".download.lock").exists()


def test_signal_cuts_a_backoff_short_and_the_delay_is_decimal(server, tmp_path, launch):
    server.flaky = {SHARD_7B: 1}
    proc = launch(["--url", server.url, "--models", "7B", "--target", str(tmp_path)],
                  env={"LLAMA_DOWNLOAD_BACKOFF": "08"})  # not octal
    wait_for(lambda: "retry 1 of 5 in 8s" in proc.err())
    start = time.monotonic()
    proc.terminate()
    assert proc.wait(timeout=5) == 130
    assert time.monotonic() - start < 2.5


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_progress_line_ends_with_a_killed_script(server, tmp_path, launch):
    server.stall = {SHARD_7B: 20000}
    proc = launch(["--url", server.url, "--models", "7B", "--target", str(tmp_path)],
                  env={"LLAMA_DOWNLOAD_PROGRESS": "1"})
    wait_for(partial_started(tmp_path / f"{SHARD_7B}.partial"))
    proc.kill()
    proc.wait()
    server.unstall.set()  # the orphaned downloader's transfer ends
    wait_for(lambda: not group_members(proc.pid), 4)


def test_second_run_into_the_same_folder_is_refused(server, tmp_path, launch):
    server.stall = {SHARD_7B: 20000}
    args = ["--url", server.url, "--models", "7B", "--target", str(tmp_path)]
    first = launch(args)
    wait_for(partial_started(tmp_path / f"{SHARD_7B}.partial"))
    server.reset_log()
    second = run(args)
    assert second.returncode == 1
    assert f"another download.sh (process {first.pid}) is writing into {tmp_path}" in second.stderr
    assert server.requests == []
    first.terminate()
    assert first.wait(timeout=5) == 130
    # a lock left by a run that was killed is taken over
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".download.lock").mkdir()
    (tmp_path / ".download.lock/pid").write_text(f"{dead.pid}\n")
    third = run(args)
    assert third.returncode == 0, third.stderr
    assert_release(tmp_path, server, ["llama-2-7b"])  # the lock is gone too


# --------------------------------------------------------------- URL and usage

def test_url_without_star_is_rejected(server, tmp_path):
    url = server.url.replace("/*?", "/llama-2-7b/params.json?")
    proc = run(["--url", url, "--target", str(tmp_path)])
    assert proc.returncode == 2
    assert "the URL has no '*'" in proc.stderr
    assert server.requests == []


def test_url_cut_at_ampersand_asks_for_quotes(server, tmp_path):
    url = server.url.split("&")[0]  # what an unquoted URL leaves behind
    proc = run(["--url", url, "--target", str(tmp_path)])
    assert proc.returncode == 2
    assert "single quotes" in proc.stderr
    assert server.requests == []


def test_url_cut_short_at_the_prompt_asks_for_one_line(server, tmp_path):
    """Typed at the prompt, no shell split it: the hint about quotes would mislead."""
    first, rest = server.url.split("&", 1)
    proc = run(["--target", str(tmp_path)], stdin=f"{first}\n&{rest}\n")
    assert proc.returncode == 2
    assert "paste it whole, on one line" in proc.stderr and "quotes" not in proc.stderr


@pytest.mark.parametrize("bad, said", [(lambda u: u + "'", "quotes"), (lambda u: u.replace("&", "&amp;"), "&amp;")],
                         ids=["stray quote", "html entity"])
def test_url_pasted_with_what_the_email_does_not_have_is_rejected(server, tmp_path, bad, said):
    proc = run(["--url", bad(server.url), "--target", str(tmp_path)])
    assert proc.returncode == 2
    assert "malformed URL" in proc.stderr and said in proc.stderr
    assert server.requests == []


@pytest.mark.parametrize("url", ["not a url", "ftp://host/*?Signature=x", ""])
def test_malformed_url_is_rejected(tmp_path, url):
    proc = run(["--target", str(tmp_path)], stdin=url + "\n")
    assert proc.returncode == 2
    assert "URL" in proc.stderr


def test_unknown_model_is_rejected(server, tmp_path):
    proc = run(["--url", server.url, "--models", "7B,8B", "--target", str(tmp_path)])
    assert proc.returncode == 2
    assert "unknown model '8b'" in proc.stderr
    assert server.requests == []


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_empty_model_list_is_an_error_not_all_models(server, tmp_path, how):
    """``--models "$MODELS"`` with MODELS unset must not start a download of every model."""
    args, env = (["--models", ""], None) if how == "flag" else ([], {"LLAMA_MODELS": ""})
    proc = run(["--url", server.url, "--target", str(tmp_path), *args], env=env)
    assert proc.returncode == 2
    assert "the model list is empty" in proc.stderr
    assert server.requests == []


def test_a_model_list_typed_with_a_carriage_return(server, tmp_path):
    proc = run(["--target", str(tmp_path), "--dry-run"], stdin=f"{server.url}\r\n7B\r\n")
    assert proc.returncode == 0, proc.stderr
    assert "Models:     llama-2-7b" in proc.stdout


@pytest.mark.parametrize("how", ["flag", "prompt"])
def test_a_url_given_as_the_model_list_is_not_echoed(server, tmp_path, how):
    """Pasted at the second prompt (the first one doesn't echo, so it's easy to do), or to --models: run() checks
    that the signature shows nowhere."""
    args, stdin = (["--url", server.url, "--models", server.url], "") if how == "flag" else ([], f"{server.url}\n" * 2)
    proc = run(["--target", str(tmp_path), *args], stdin=stdin)
    assert proc.returncode == 2
    assert "the model list looks like the URL" in proc.stderr
    assert server.requests == []


def test_bash_as_sh_in_posix_mode_runs(server, tmp_path):
    """macOS's /bin/sh is bash 3.2 in POSIX mode, which can't parse process substitution: the script leaves it."""
    proc = subprocess.run([BASH, "--posix", str(SCRIPT), "--url", server.url, "--models", "7B", "--target",
                           str(tmp_path), "--dry-run"], capture_output=True, text=True, env=script_env(), timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_an_invalid_model_list_is_named(server, tmp_path):
    proc = run(["--url", server.url, "--models", "7b_chat", "--target", str(tmp_path)])
    assert proc.returncode == 2
    assert "invalid model list '7b_chat'" in proc.stderr


def test_a_server_out_of_reach_stops_the_run_after_one_file(tmp_path):
    """Connections refused: every file would spend its retries alike, minutes each."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/*?Policy=p&Signature=s&Key-Pair-Id=k"
    proc = run(["--url", url, "--models", "7B,13B", "--target", str(tmp_path)], env={"LLAMA_DOWNLOAD_RETRIES": "1"})
    assert proc.returncode == 1
    assert proc.stderr.count("giving up after 1 retries") == 1, proc.stderr
    assert "llama-2-7b: FAILED (not attempted)" in proc.stdout
    assert "llama-2-13b: FAILED (not attempted)" in proc.stdout


@pytest.mark.skipif(shutil.which("dash") is None, reason="no POSIX sh other than bash here")
def test_run_with_sh_says_to_use_bash(tmp_path):
    proc = subprocess.run([shutil.which("dash"), str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == "download.sh: run it with bash: bash download.sh\n"


def test_blanks_separate_models_as_commas(server, tmp_path):
    proc = run(["--url", server.url, "--models", "7B 13B,\t70b-chat", "--target", str(tmp_path),
                "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "Models:     llama-2-7b llama-2-13b llama-2-70b-chat" in proc.stdout


def test_target_that_starts_with_a_dash(server, tmp_path):
    proc = run(["--url", server.url, "--models", "7B", "--target", "-dash"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_release(tmp_path / "-dash", server, ["llama-2-7b"])


def test_stray_argument_is_not_echoed(server, tmp_path):
    proc = run(["--url", server.url, f"Signature={SIGNATURE}"])
    assert proc.returncode == 2
    assert "single quotes" in proc.stderr


def test_help_documents_environment():
    proc = run(["--help"])
    assert proc.returncode == 0
    for name in ("--url", "--models", "--target", "--dry-run", "LLAMA_DOWNLOAD_URL",
                 "LLAMA_MODELS", "LLAMA_TARGET_DIR", "LLAMA_DOWNLOAD_BACKOFF"):
        assert name in proc.stdout
    assert "asked for when not given and the URL is typed in\n                     or stdin is a terminal" in proc.stdout


def test_models_are_asked_for_in_a_terminal_even_with_a_url(server, tmp_path):
    # as the help says: a forgotten --models must not mean every model
    master, slave = os.openpty()
    try:
        os.write(master, b"7B\n")
        proc = subprocess.run([BASH, str(SCRIPT), "--url", server.url, "--target", str(tmp_path), "--dry-run"],
                              stdin=slave, capture_output=True, text=True, env=script_env(), timeout=30)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 0, proc.stderr
    assert "Enter the models to download, separated by commas or blanks" in proc.stderr
    assert "Models:     llama-2-7b\n" in proc.stdout


# ------------------------------------------------------- tools that may be missing

@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_python_md5_fallback_without_md5sum(server, tmp_path):
    path = restricted_path(tmp_path, BASE_TOOLS + ["curl"],
                           {"python3": f"#!/bin/sh\nexec {sys.executable} \"$@\"\n"})
    server.corrupt = {"llama-2-7b/params.json"}
    target = tmp_path / "t"
    proc = run(["--url", server.url, "--models", "7B", "--target", str(target)],
               env={"PATH": path})
    assert "md5: python3" in proc.stdout
    assert proc.returncode == 1  # the fallback really checks
    assert "llama-2-7b/params.json FAILED verification" in proc.stderr
    assert (target / SHARD_7B).read_bytes() == server.files[SHARD_7B]
    assert (target / "tokenizer.model").exists()


@pytest.mark.skipif(not shutil.which("md5sum"), reason="fakes macOS md5 with md5sum")
def test_macos_md5_tool_is_used_without_md5sum(server, tmp_path):
    fake_md5 = (f"#!/bin/sh\n[ \"$1\" = -r ] || exit 2\n"
                f"exec {shutil.which('md5sum')} \"$2\"\n")
    path = restricted_path(tmp_path, BASE_TOOLS + DOWNLOADERS[:1], {"md5": fake_md5})
    target = tmp_path / "t"
    proc = run(["--url", server.url, "--models", "7B", "--target", str(target)],
               env={"PATH": path})
    assert proc.returncode == 0, proc.stderr
    assert "md5: md5" in proc.stdout
    assert_release(target, server, ["llama-2-7b"])


def test_explicit_python_md5(server, tmp_path):
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path)],
               env={"LLAMA_DOWNLOAD_MD5": "python"})
    assert proc.returncode == 0, proc.stderr
    assert "md5: python" in proc.stdout
    assert_release(tmp_path, server, ["llama-2-7b"])


@pytest.mark.skipif(not shutil.which("wget"), reason="needs wget")
def test_wget_is_used_when_curl_is_missing(server, tmp_path):
    path = restricted_path(tmp_path, BASE_TOOLS + ["wget", "md5sum"])
    target = tmp_path / "t"
    proc = run(["--url", server.url, "--models", "7B", "--target", str(target)],
               env={"PATH": path})
    assert proc.returncode == 0, proc.stderr
    assert "Downloader: wget" in proc.stdout
    assert_release(target, server, ["llama-2-7b"])


def test_missing_curl_and_wget_is_reported(server, tmp_path):
    path = restricted_path(tmp_path, BASE_TOOLS + ["md5sum"])
    proc = run(["--url", server.url, "--models", "7B", "--target", str(tmp_path / "t")],
               env={"PATH": path})
    assert proc.returncode == 1
    assert "neither curl nor wget is installed" in proc.stderr
    assert server.requests == []


# ---------------------------------------------------------------------- linting

def test_bash_syntax():
    proc = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed")
def test_shellcheck_clean():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
