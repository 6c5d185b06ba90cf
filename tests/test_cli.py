"""What the examples and scripts share (llama/cli.py, and the ranks' agreement in llama/distributed.py): flags
checked as fire passes them, the output folder of a script left as it was when the writing fails or is stopped,
and interruptions and bad settings as one line."""

import os
import re
import signal
import stat
import subprocess
import sys
from typing import Optional

import pytest

from llama import cli, distributed

from conftest import ROOT, run_cmd


def main(ckpt_dir: Optional[str] = None, max_gen_len: int = 4, suffix_first: bool = False):
    return ckpt_dir, max_gen_len, suffix_first


def test_flags_are_checked_as_fire_spells_them():
    """-flag is fire's too, and -m its short flag for the one flag starting with m; a misspelt one fails before
    anything runs."""
    cli.check_flags(main, ["-max_gen_len", "3", "-m", "3", "--ckpt-dir=x", "--nosuffix_first", "--", "--anything"])
    for arg in ("-max_gen_length", "--max_gen_length=3"):
        with pytest.raises(ValueError, match=f"unknown flag {arg.split('=')[0]}: did you mean --max_gen_len?"):
            cli.check_flags(main, [arg, "3"])


def test_bool_and_path_flags_as_fire_passes_them():
    """fire passes --suffix_first=false as the string 'false' (true to Python), --ckpt_dir with no value as True
    and --ckpt_dir 2024 as a number."""
    typed = cli.typed(main)
    assert typed(ckpt_dir=2024, suffix_first=True) == ("2024", 4, True)
    assert typed() == (None, 4, False)
    with pytest.raises(ValueError, match=r"--suffix_first is true or false \(--suffix_first or --nosuffix_first\), "
                                         "got 'false'"):
        typed(suffix_first="false")
    with pytest.raises(ValueError, match="--ckpt_dir needs a value"):
        typed(ckpt_dir=True)


def test_text_flags_are_passed_on_as_typed():
    """fire reads a flag's value as a Python literal: a str flag gets the text as typed all the same (where
    --system 'pirate, concise' was the tuple's text and --ckpt_dir 1e3 was '1000.0'); the others their literals."""
    def chat(ckpt_dir: Optional[str] = None, system: str = "", max_gen_len: int = 4, quiet: bool = False):
        return ckpt_dir, system, max_gen_len, quiet

    for argv, want in [(["--system", "pirate, concise", "--max_gen_len", "1e1"],
                        (None, "pirate, concise", 10.0, False)),
                       (["--system=[yes]", "--ckpt-dir=0x10"], ("0x10", "[yes]", 4, False)),
                       (["--quiet", "--ckpt_dir", "1e3", "--system", "-1"], ("1e3", "-1", 4, True)),
                       (["--ckpt_dir", "2024", "--system=", "-max_gen_len", "2"], ("2024", "", 2, False)),
                       (["--system", "it's \"x\"", "--", "--verbose"], (None, "it's \"x\"", 4, False)),
                       (["--ckpt_dir=None", "--system", "None"], (None, "None", 4, False))]:  # fire's None kept
        assert cli.call(chat, argv) == want, argv
    with pytest.raises(ValueError, match="--ckpt_dir needs a value"):
        cli.call(chat, ["--ckpt_dir", "--quiet"])
    with pytest.raises(ValueError, match="--ckpt_dir is empty: give it the path"):
        cli.checkpoint_or_demo("", "tokenizer.model")


def test_equal_arguments_written_differently_agree():
    """What the ranks compare (distributed.agree): 0 and 0.0, and a params.json's keys in another order, are
    the same; 0.6 and 0.60001 are not."""
    same = [(0, 0.0), (1, 1.0), ({"dim": 64, "norm_eps": 1e-5}, {"norm_eps": 0.00001, "dim": 64.0}),
            (frozenset({2, 128009, 128008}), frozenset({128008, 2, 128009})), (None, None)]
    for a, b in same:
        assert distributed._canonical(a) == distributed._canonical(b), (a, b)
    for a, b in [(0.6, 0.60001), (True, 1), ("0", 0), ({"dim": 64}, {"dim": 65}), (10 ** 20, 10 ** 20 + 1)]:
        assert distributed._canonical(a) != distributed._canonical(b), (a, b)


def test_a_failed_write_empties_the_folder_it_was_given_and_keeps_it(tmp_path):
    """A folder that was there (its permissions kept) or a link to one: emptied again, not removed and made anew.
    One that wasn't there: removed."""
    folder = tmp_path / "given"
    folder.mkdir()
    folder.chmod(0o750)
    link = tmp_path / "link"
    link.symlink_to(folder)
    for out in (folder, link, tmp_path / "new"):
        with pytest.raises(OSError, match="disk full"):
            with cli.output_dir(str(out)) as path:
                (path / "sub").mkdir(parents=True)
                (path / "sub" / "x").write_text("x")
                (path / ".params.json.partial").write_text("{")
                raise OSError("disk full")
    assert link.is_symlink() and folder.is_dir() and not any(folder.iterdir())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750 and not (tmp_path / "new").exists()


def test_sigterm_while_writing_leaves_the_folder_as_it_was(tmp_path):
    """kill, a timeout or a job scheduler stop a script with SIGTERM: what it had written goes, as on Ctrl-C, and
    the signal's own handling comes back after."""
    def before(signum, frame):  # (not the default, which would end the tests)
        raise RuntimeError("SIGTERM reached the handler from before output_dir")

    out = tmp_path / "out"
    previous = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(SystemExit) as stopped:
            with cli.output_dir(str(out)) as path:
                path.mkdir()
                (path / "params.json").write_text("{}")
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM and not out.exists()


def test_ctrl_c_is_one_line_and_the_shells_status(capsys):
    with pytest.raises((SystemExit, KeyboardInterrupt)) as stopped:  # (one that escaped would stop the tests)
        with cli.one_line_errors():
            raise KeyboardInterrupt
    assert stopped.type is SystemExit and stopped.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_a_character_the_output_cannot_encode_is_printed_as_a_question_mark():
    """Text the output's encoding lacks (here ASCII) is printed with "?" in place of what it can't show, and the
    run goes on, where it ended with an encode error."""
    r = subprocess.run([sys.executable, "-c", "from llama.cli import run; run(lambda: print('caf\\xe9 \\u2603 ok'))"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert (r.returncode, r.stdout, r.stderr) == (0, "caf? ? ok\n", "")


def test_a_torch_older_than_2_6_is_named_at_import():
    """torch 2.5 runs one process, but any run of several failed in its first step (its gloo collectives left
    inference mode) with an error that named no version: the package says which torch it needs, at import."""
    r = subprocess.run([sys.executable, "-c", "import torch; torch.__version__ = '2.5.1+cu124'; import llama"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.endswith(
        "ImportError: llama needs torch 2.6 or later, and this is torch 2.5.1+cu124: pip install --upgrade "
        "'torch>=2.6'\n"), r.stderr[-2000:]


def test_output_to_a_reader_gone_ends_quietly_as_a_pipelines_programs_do():
    """`python example_text_completion.py | head -1`: the reader closes the pipe, and the example stops with the
    status of a program stopped by SIGPIPE, saying nothing (where it printed a traceback of BrokenPipeError)."""
    read, write = os.pipe()
    os.close(read)  # a reader gone before the first line
    try:
        result = subprocess.run([sys.executable, "example_text_completion.py", "--max_gen_len", "4"], cwd=ROOT,
                                stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert result.returncode == 141 and result.stderr == "", result.stderr[-3000:]


@pytest.mark.parametrize("value", ["abc", "-5", "0", "inf"])
def test_a_bad_dist_timeout_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("LLAMA_DIST_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"LLAMA_DIST_TIMEOUT must be a number of seconds > 0, got '{value}'"):
        distributed.timeout()
    monkeypatch.setenv("LLAMA_DIST_TIMEOUT", "2.5")
    assert distributed.timeout().total_seconds() == 2.5
    monkeypatch.delenv("LLAMA_DIST_TIMEOUT")
    assert distributed.timeout().total_seconds() == 600  # the README's default


GLOO_PEER_GONE = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                  "[127.0.0.1]:54429. This is typically caused by a remote worker crashing. Check the logs of the "
                  "remote worker before reporting an error.")


# gloo's words for a peer gone while this rank read from it: its address before, "peer" last
GLOO_READ_ERROR = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                   "[127.0.0.1]:54429: Connection reset by peer. This is typically caused by a remote worker crashing.")


@pytest.mark.parametrize("error, said", [
    (GLOO_PEER_GONE, "Connection closed by peer [127.0.0.1]:54429"),
    (GLOO_PEER_GONE.replace("closed", "reset"), "Connection reset by peer [127.0.0.1]:54429"),
    (GLOO_READ_ERROR, "Connection reset by peer"), ("CUDA out of memory", None)])
def test_a_rank_that_lost_the_others_says_so_in_one_line(error, said):
    """A rank whose collective fails because another process died mid-run (gloo's error, as torchrun sees it when
    one rank crashes in a generation) points at that process's error instead of adding a traceback of its own;
    its own crash keeps its traceback."""
    code = ("from llama import distributed, cli\n"
            "distributed.setup(None, 'cpu')\n"
            "with cli.one_line_errors():\n"
            f"    raise RuntimeError({error!r})\n")
    result = run_cmd([sys.executable, "-c", code], timeout=60)
    assert result.returncode == 1
    if said:
        assert re.fullmatch(rf"error: rank 0 \(on [^)]+\) lost the other processes mid-run \({re.escape(said)}\): one "
                            r"of them failed or was killed, and its error is above, or in its machine's log\n",
                            result.stderr), result.stderr
    else:
        assert "Traceback" in result.stderr and "error: rank" not in result.stderr
