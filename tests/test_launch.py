"""Multi-process runs (gloo) under torchrun and started as other launchers start them (``launch``), the examples
end to end, and running with no launcher at all."""

import json
import os
import re
import sys
import time

import pytest
import torch

from llama import distributed

from conftest import GQA, VOCAB, launch, launch_ranks, run_cmd, torchrun, torchrun_machines
from reference import greedy

PROMPTS = ["The sea was calm", "A much longer opening line, which makes this batch ragged"]


def tokens_of(result):
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("TOKENS "))
    return json.loads(line[len("TOKENS "):])


def driver(ckpt: str, tokenizer_path: str, *extra: str) -> list:
    """tests/generate_driver.py's arguments for PROMPTS on this checkpoint."""
    return ["tests/generate_driver.py", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path,
            "--prompts", json.dumps(PROMPTS), *extra]


def tokens_in_this_process(ckpt: str, tokenizer_path: str) -> list:
    """What tests/generate_driver.py prints for PROMPTS, computed here: one process, no launcher."""
    from llama import Llama
    g = Llama.build(ckpt, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32")
    return g.generate([g.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS], 8, temperature=0)[0]


def assert_reference_greedy(tokens: list, state: dict, tokenizer_path: str) -> None:
    """Each prompt's 8 greedy tokens, as the float64 reference decodes them."""
    from llama import Tokenizer
    tok = Tokenizer(tokenizer_path)
    assert len(tokens) == len(PROMPTS)
    for p, got in zip(PROMPTS, tokens):
        assert got == greedy(state, {**GQA, "vocab_size": VOCAB}, tok.encode(p, True, False), 8, stop=tok.eos_id)


def test_two_processes_on_mp2_equal_one_process_and_reference(make_ckpt, tokenizer_path):
    mp2, state = make_ckpt(GQA, mp=2)
    mp1, state1 = make_ckpt(GQA, mp=1)
    assert all((state[k] == state1[k]).all() for k in state)  # same seed: the same weights, sharded two ways
    two = tokens_of(launch(2, *driver(mp2, tokenizer_path)))
    assert two == tokens_in_this_process(mp1, tokenizer_path)
    assert_reference_greedy(two, state, tokenizer_path)


@pytest.mark.parametrize("env, cpus, threads", [
    ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, 16, 8),  # torchrun's default: the machine shared
    ({"LOCAL_WORLD_SIZE": "4"}, 16, 4),  # another launcher, nothing set: shared, not 16 threads each
    ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "4"}, 2, 1),
    ({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, 16, None),  # the user's number
    ({}, 16, None), ({"OMP_NUM_THREADS": "1"}, 16, None),  # one process: torch's own default, or the user's 1
])
def test_cpu_processes_share_the_machine_where_torchrun_would_give_each_one_core(env, cpus, threads):
    from llama.distributed import cpu_threads
    assert cpu_threads(env, cpus) == threads


def test_setup_gives_torch_the_ranks_share_of_the_cores(monkeypatch):
    """What cpu_threads says is what torch is set to, before the process group is made: torchrun's two CPU
    processes on 16 cores (OMP_NUM_THREADS=1) compute on 8 threads each."""
    class NoGroup(Exception):
        pass

    def init_process_group(device):
        raise NoGroup

    set_to = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(distributed, "init_process_group", init_process_group)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(NoGroup):
        distributed.setup(None, "cpu")
    assert set_to == [8]


def test_two_machines_equal_one_process(make_ckpt, tokenizer_path):
    """torchrun --nnodes 2, one process a machine, as a run across machines is launched; each machine's
    arguments typed on its own, one value written two ways (0 and 0.0), which agree."""
    mp2, _ = make_ckpt(GQA, mp=2)
    args = driver(mp2, tokenizer_path)
    first, second = torchrun_machines([*args, "--temperature", "0"], [*args, "--temperature", "0.0"])
    assert second.returncode == 0 and "TOKENS" not in second.stdout, second.stderr[-3000:]  # rank 0 prints
    assert tokens_of(first) == tokens_in_this_process(mp2, tokenizer_path)


def test_machines_of_different_kinds_compute_in_one_dtype(make_ckpt, tokenizer_path):
    """One machine with native bf16 and one without (bf16 on one, float32 on the other, left alone): their
    activations meet in each layer's sums, so both compute in float32, and decode as the float64 reference does
    on the bf16 weights. Without the agreement the run died in gloo on unequal message sizes."""
    mp2, state = make_ckpt(GQA, mp=2)
    args = driver(mp2, tokenizer_path, "--dtype", "bfloat16", "--cpu_on_rank", '{1: "avx2"}')
    first, second = launch_ranks(args, args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_reference_greedy(tokens_of(first), state, tokenizer_path)


def test_sampling_draws_the_same_tokens_on_every_rank(make_ckpt, tokenizer_path):
    """Each rank samples; where their CPUs differ a last bit of the softmax can differ, and with it a draw. Here
    the second rank's seed differs, so its draws would: every rank still takes the first rank's tokens, as ranks
    fed different tokens would compute nonsense together without any error."""
    mp2, _ = make_ckpt(GQA, mp=2)
    result = launch(2, *driver(mp2, tokenizer_path, "--max_gen_len", "12", "--temperature", "1.0",
                               "--seed_on_rank", "{1: 12345}"))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = dict(re.findall(r"RANK (\d) TOKENS (\[\[.*?\]\])", result.stdout))  # lines may interleave
    assert len(ranks) == 2 and ranks["0"] == ranks["1"], ranks


def test_machines_picking_different_weight_dtypes_are_asked_for_one(make_ckpt, tokenizer_path):
    """An x86 machine (bf16 weights) with one without AVX (float32 weights): no dtype fits both unasked."""
    mp2, _ = make_ckpt(GQA, mp=2)
    args = driver(mp2, tokenizer_path, "--dtype", "None", "--cpu_on_rank", '{1: "arm"}')
    for result in launch_ranks(args, args):
        assert result.returncode == 1
        assert "error: the processes picked different dtypes for the weights (rank 0: bfloat16, rank 1: float32): " \
            "pass a dtype that every machine supports" in result.stderr, result.stderr[-3000:]


def test_a_checkpoint_missing_on_one_machine_fails_on_both_saying_where(make_ckpt, tmp_path, tokenizer_path):
    """The checkpoint not copied to the second machine: both stop, and the first machine's log says which rank
    failed, on which host, and why, where the reference left it waiting or with a traceback."""
    ckpt, _ = make_ckpt(GQA, mp=2)
    missing = str(tmp_path / "not-copied-here")
    first, second = launch_ranks(*(["example_text_completion.py", "--ckpt_dir", d, "--tokenizer_path",
                                    tokenizer_path] for d in (ckpt, missing)))
    assert first.returncode == second.returncode == 1
    said = f"checkpoint directory {missing!r} does not exist"
    assert f"\nerror: {said}" in "\n" + second.stderr, second.stderr[-3000:]
    assert re.search(rf"(^|\n)error: rank 1 \(on [^)]+\) failed to load the checkpoint: {re.escape(said)}",
                     first.stderr), first.stderr[-3000:]
    for result in (first, second):  # one line each, not a traceback of ours (torchrun adds its own)
        assert "[rank" not in result.stderr and "Error:" not in result.stderr.split("error: ")[1].splitlines()[0]


def test_a_hook_on_one_rank_only_generates_as_without(make_ckpt, tokenizer_path):
    """Research code recording activations on rank 0 alone: that rank calls the blocks as Meta's code does, and
    the other must go the same way, or their collectives don't match (gloo failed on a size mismatch)."""
    ckpt, _ = make_ckpt(GQA, mp=2)
    args = driver(ckpt, tokenizer_path, "--hook_on_rank", "0")
    first, second = launch_ranks(args, args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert tokens_of(first) == tokens_in_this_process(ckpt, tokenizer_path)


def test_a_crash_on_one_rank_is_one_line_on_the_other(make_ckpt, tokenizer_path):
    """A rank that crashes loading (not bad input: CUDA out of memory, say) prints its traceback; the other says
    in one line which rank failed, where, and with what, where it printed a traceback of its own too."""
    ckpt, _ = make_ckpt(GQA, mp=2)
    args = driver(ckpt, tokenizer_path, "--fail_on_rank", "1", "--fail_with", "RuntimeError")
    first, second = launch_ranks(args, args)
    assert first.returncode == second.returncode == 1
    assert "Traceback" in second.stderr and "RuntimeError: injected failure on rank 1" in second.stderr
    assert re.search(r"(^|\n)error: rank 1 \(on [^)]+\) failed to load the checkpoint: RuntimeError: injected "
                     r"failure on rank 1\n$", first.stderr), first.stderr[-3000:]
    assert "Traceback" not in first.stderr


def test_a_rank_slower_than_the_time_limit_is_said_to_be(make_ckpt, tokenizer_path, monkeypatch):
    """A rank that takes longer to load than LLAMA_DIST_TIMEOUT (a cold disk): the one that waited for it says
    that it waited out the limit and how to raise it, not a traceback of gloo's; the slow one, that it lost it."""
    ckpt, _ = make_ckpt(GQA, mp=2)
    monkeypatch.setenv("LLAMA_DIST_TIMEOUT", "4")  # (the ranks must also meet within it: a margin for imports)
    args = driver(ckpt, tokenizer_path, "--slow_on_rank", "{1: 8}")
    first, second = launch_ranks(args, args)
    assert first.returncode == second.returncode == 1
    assert re.search(r"(^|\n)error: rank 0 \(on [^)]+\) waited for the other processes longer than "
                     r"LLAMA_DIST_TIMEOUT allows \(4 s; [Tt]imed out.*set LLAMA_DIST_TIMEOUT=<seconds> higher",
                     first.stderr), first.stderr[-3000:]
    assert "Traceback" not in first.stderr and "error: rank 1" in second.stderr, second.stderr[-3000:]


@pytest.mark.parametrize("bad, launcher, failing", [(["--max_gen_length", "8"], torchrun_machines, 1),
                                                    (["--temperature", "-1"], launch_ranks, 1),
                                                    (["--temperature", "-1"], launch_ranks, 0)],
                         ids=["flag", "value", "value-on-rank-0"])
def test_a_machine_failing_before_the_process_group_stops_the_other_at_once(make_ckpt, tokenizer_path, bad,
                                                                            launcher, failing):
    """A misspelt flag or a bad value on one machine only: it fails before the processes meet, and the other,
    waiting to meet it, stops at once with its error in one line, where it waited out the 600 s time limit and
    then failed without saying why. Under torchrun (the ranks meet at its agent's store) and another launcher
    (at rank 0's, which a failing rank 0 keeps until the others have read its error: without that wait they
    failed with a traceback of the store gone)."""
    ckpt, _ = make_ckpt(GQA, mp=2)
    args = ["example_text_completion.py", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path]
    start = time.monotonic()
    results = launcher(*(args + bad if r == failing else args for r in (0, 1)), timeout=60)
    assert [r.returncode for r in results] == [1, 1] and time.monotonic() - start < 60
    said = ("\n" + results[failing].stderr).split("\nerror: ")[-1].splitlines()[0]
    other = results[1 - failing].stderr
    assert re.search(rf"(^|\n)error: rank {failing} \(on [^)]+\) failed before the process group was made: "
                     rf"{re.escape(said)}", other), other[-3000:]
    # one line: no traceback of ours (torchrun's agent adds one of its own), no warnings of a store gone
    assert "frame #" not in other and (launcher is torchrun_machines or "Traceback" not in other), other[-3000:]


def test_a_rank_0_gone_before_the_ranks_meet_is_one_line_on_the_others(make_ckpt, tokenizer_path):
    """Under a launcher other than torchrun rank 0 holds the store: killed (or crashed) before the ranks meet,
    it takes the store with it, and rank 1 says so at once in one line, where it printed a traceback of the
    store's socket (and had it told the others, it would have tried to reach the store again for 10 s)."""
    ckpt, _ = make_ckpt(GQA, mp=2)
    rank0 = ["-c", "import torch.distributed as d, time\nstore, _, _ = next(d.rendezvous('env://'))\n"
             "while not store.check(['llama/met/1']): time.sleep(0.05)\nprint(time.time(), flush=True)\n"
             "import os; os._exit(9)"]
    first, second = launch_ranks(rank0, ["example_text_completion.py", "--ckpt_dir", ckpt, "--tokenizer_path",
                                         tokenizer_path], timeout=60)
    gone_for = time.time() - float(first.stdout)  # telling the others again retried the store for 10 s
    assert first.returncode == 9 and second.returncode == 1 and gone_for < 8, (gone_for, second.stderr[-3000:])
    assert re.search(r"(^|\n)error: rank 0, which held the store the ranks meet at \(MASTER_ADDR 127.0.0.1, "
                     r"MASTER_PORT \d+\), went away before the process group was made", second.stderr), \
        second.stderr[-3000:]
    # no traceback of ours (the store's own C++ warning of the lost connection comes before, with its frames)
    assert "Traceback" not in second.stderr and second.stderr.rstrip().endswith("its output says why"), \
        second.stderr[-3000:]


@pytest.mark.parametrize("second, differs", [
    (["--temperature", "0.6"], "temperature to generate"), (["--max_gen_len", "40"], "max_gen_len to generate"),
    (["--max_seq_len", "24"], "max_seq_len to load"), (["--model", "mha"], "params to load")])
def test_machines_given_different_arguments_say_so(make_ckpt, tokenizer_path, second, differs):
    """Each machine's command is typed on its own. Given different sampling, lengths or checkpoints, every rank
    stops with one line naming the argument and each rank's value, where they had hung in mismatched
    collectives, failed in gloo's words, or (two checkpoints of one dimension) printed nonsense with exit 0."""
    ckpts = {name: make_ckpt(params, mp=2)[0] for name, params in (("gqa", GQA), ("mha", {**GQA, "n_kv_heads": 8}))}

    def command(extra):
        model = extra[1] if extra[:1] == ["--model"] else "gqa"
        flags = [] if extra[:1] == ["--model"] else extra
        return ["example_text_completion.py", "--ckpt_dir", ckpts[model], "--tokenizer_path", tokenizer_path,
                "--temperature", "0", "--max_gen_len", "16", *flags]

    for result in launch_ranks(command([]), command(second), timeout=60):
        assert result.returncode == 1, result.stderr[-3000:]
        assert re.search(rf"(^|\n)error: the processes were given different {differs} \(rank 0: .*, rank 1: ",
                         result.stderr), result.stderr[-3000:]


def test_a_chat_given_different_system_prompts_stops_saying_so(make_ckpt, tokenizer_path):
    """scripts/chat.py on two machines given different --system: both stop before reading a message, where
    every message had been refused as too long."""
    ckpt, _ = make_ckpt(GQA, mp=2)
    chat = ["scripts/chat.py", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path, "--system"]
    for result in launch_ranks([*chat, "Be brief."], [*chat, "Be kind."], timeout=60):
        assert result.returncode == 1, result.stderr[-3000:]
        assert "error: the processes were given different system to chat (rank 0: 'Be brief.', rank 1: 'Be kind.')" \
            in result.stderr, result.stderr[-3000:]


def test_chat_example_under_torchrun(make_ckpt, tokenizer_path):
    """As the README launches it, on a checkpoint of two shards (the text example: tests/test_demo.py)."""
    ckpt, _ = make_ckpt(GQA, mp=2)
    result = torchrun(2, "example_chat_completion.py", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path,
                      "--max_gen_len", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    # Only rank 0 prints: three dialogs, each answered once.
    assert result.stdout.count("==================================") == 3
    assert sum(line.startswith("> ") for line in result.stdout.splitlines()) == 3


def test_bad_checkpoint_exits_1_on_every_rank_without_hanging(tmp_path, tokenizer_path):
    args = ["example_text_completion.py", "--ckpt_dir", str(tmp_path / "missing"), "--tokenizer_path",
            tokenizer_path]
    launched, plain = launch(2, *args), run_cmd([sys.executable, *args])
    assert launched.returncode == 1 and plain.returncode == 1
    assert plain.stderr.startswith("error: checkpoint directory") and "Traceback" not in plain.stderr
    # Each rank says what is wrong in one line, and exits by itself (no launcher stops it here).
    assert launched.stderr.count("error: checkpoint directory") == 2 and "ValueError" not in launched.stderr


def test_compile_elementwise_without_cuda_graphs_exits_1_on_every_rank(make_ckpt, tokenizer_path):
    ckpt, _ = make_ckpt(GQA, mp=2)
    result = launch(2, "example_text_completion.py", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path,
                    "--device", "cpu", "--compile_elementwise")
    assert result.returncode == 1
    assert result.stderr.count("error: compile_elementwise=True compiles the kernels of the CUDA graphs") == 2
    assert "ValueError" not in result.stderr  # one line per rank, not a traceback


def test_build_twice_in_one_python_session_without_launcher(make_ckpt, tokenizer_path):
    """Two builds in one session, which make and reuse a one-process group; a traceback after them is Python's
    own, where torch's group put "[rank0]: " before each of its lines."""
    ckpt, _ = make_ckpt(GQA)
    code = f"""
from llama import Llama
a = Llama.build({ckpt!r}, {tokenizer_path!r}, 64, 2)
b = Llama.build({ckpt!r}, {tokenizer_path!r}, 32, 1)
x = a.text_completion(["Hello"], temperature=0, max_gen_len=4)[0]["generation"]
y = b.text_completion(["Hello"], temperature=0, max_gen_len=4)[0]["generation"]
assert x == y, (x, y)
print("OK")
raise RuntimeError("after the builds")
"""
    result = run_cmd([sys.executable, "-c", code])
    assert result.returncode == 1 and "OK" in result.stdout, result.stderr[-3000:]
    assert result.stderr.startswith("Traceback") and result.stderr.endswith("\nRuntimeError: after the builds\n")


def test_a_model_parallel_size_without_the_processes_says_how_to_launch(make_ckpt, tokenizer_path):
    ckpt, _ = make_ckpt(GQA)
    code = f"from llama import Llama; Llama.build({ckpt!r}, {tokenizer_path!r}, 32, 1, model_parallel_size=2)"
    result = run_cmd([sys.executable, "-c", code])
    assert result.returncode == 1
    assert "model_parallel_size=2 must divide the number of processes, here 1: launch a multiple of 2 (torchrun " \
        "--nproc_per_node 2)" in result.stderr, result.stderr[-3000:]


def test_a_transformer_built_directly_needs_no_setup(make_ckpt, tmp_path):
    """Transformer(ModelArgs) in a fresh process, as research code builds it, with no process group made first
    (Meta's stopped at fairscale's assertion): its forward pass against the float64 reference."""
    ckpt, state = make_ckpt(GQA)
    code = f"""
import torch
from llama import ModelArgs, Transformer
model = Transformer(ModelArgs.from_params({{**{GQA!r}, "vocab_size": {VOCAB}}}, max_seq_len=16, max_batch_size=1))
state = torch.load({ckpt + "/consolidated.00.pth"!r}, weights_only=True)
state.pop("rope.freqs")
model.load_state_dict({{k: v.float() for k, v in state.items()}}, assign=True)
torch.save(model.forward(torch.tensor([[1, 5, 9, 200]]), 0)[0], {str(tmp_path / "logits.pt")!r})
"""
    result = run_cmd([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    import torch

    from reference import logits
    got = torch.load(tmp_path / "logits.pt", weights_only=True).double()
    want = logits(state, {**GQA, "vocab_size": VOCAB}, [1, 5, 9, 200])
    assert got.shape == want.shape == (4, VOCAB) and (got - want).abs().max() < 1e-3 * want.abs().max()


def test_more_processes_on_a_machine_than_its_gpus_is_a_clear_error(monkeypatch):
    """Two processes on a one-GPU machine: before the process group (nccl would fail in its first collective,
    refusing two ranks on one GPU), every rank says so, and how to launch instead."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(ValueError, match=r"2 processes on this machine, but torch sees 1 GPU\(s\).*"
                                             r"--nproc_per_node 1.*--device cpu"):
            distributed.pick_device(None)


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """As many processes as GPUs (one on one, two on two): each the GPU of its LOCAL_RANK, not its global RANK
    (the second machine's ranks 2 and 3 take GPUs 0 and 1); without a launcher, the first."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for gpus, local, rank in ((1, "1", "0"), (2, "2", "2"), (2, "2", "3"), (1, None, None)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        for name, value in (("LOCAL_WORLD_SIZE", local), ("RANK", rank), ("LOCAL_RANK", rank and str(int(rank) % 2))):
            if value:
                monkeypatch.setenv(name, value)
            else:
                monkeypatch.delenv(name, raising=False)
        assert distributed.pick_device(None) == torch.device("cuda", int(rank or 0) % 2)
    assert chosen == [torch.device("cuda", i) for i in (0, 0, 1, 0)]


ONE_RANK_SCRIPT = '''
import json, sys
import torch
from llama import Llama, ModelArgs, Transformer

ckpt, llama3, tokenizer, out = sys.argv[1:5]
g = Llama.build(ckpt, tokenizer, max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32")
rank = torch.distributed.get_rank()
if rank == 0:  # a logging hook, put on one rank only
    g.model.output.register_forward_hook(lambda module, args, logits: None)
hooked = g.generate([g.tokenizer.encode("The sea was calm", bos=True, eos=False)], 8, temperature=0)[0][0]
dialog = [{"role": "user", "content": "Who made the sea?"}]
first = "".join(g.stream(dialog, temperature=0, max_gen_len=6, keep_cache=True))
if rank == 1:  # the slice of a weight that this rank holds, edited here only
    g.model.layers[0].feed_forward.w1.weight.data[-1] *= 0.5
dialog += [{"role": "assistant", "content": first}, {"role": "user", "content": "And the land?"}]
streamed = "".join(g.stream(dialog, temperature=0, max_gen_len=6, keep_cache=True))
whole = g.chat_completion([dialog], temperature=0, max_gen_len=6)[0]["generation"]["content"]
# Llama 3's shards loaded as Meta's Llama 3 build loads them, each rank its own
params = json.load(open(llama3 + "/params.json"))
model = Transformer(ModelArgs.from_params(params, max_seq_len=16, max_batch_size=1))
state = torch.load(f"{llama3}/consolidated.{rank:02d}.pth", weights_only=True)
model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
logits = model.forward(torch.tensor([[1, 5, 9, 200]]), 0)[0]
if rank == 0:
    json.dump({"hooked": hooked, "streamed": streamed, "whole": whole}, open(out, "w"))
    torch.save(logits, out + ".pt")
'''


def test_ranks_that_differ_in_hooks_edits_and_shard_layouts_go_together(make_ckpt, tokenizer_path, tmp_path):
    """On two processes: a hook research code put on one rank only (the ranks still send the same collectives:
    tokens as the reference's), a weight slice edited on one rank between two turns of a stream with keep_cache
    (the ranks agree to prefill again: the answer is chat_completion's), and a Transformer built directly loading
    Llama 3's shards as they are (its embedding split on the vocabulary, as Meta's): logits as the reference's."""
    from test_llama3 import LLAMA3

    gqa, state = make_ckpt(GQA, mp=2)
    llama3, state3 = make_ckpt(LLAMA3, mp=2)
    script, out = tmp_path / "one_rank.py", tmp_path / "out.json"
    script.write_text(ONE_RANK_SCRIPT)
    result = launch(2, str(script), gqa, llama3, tokenizer_path, str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(out.read_text())
    from llama import Tokenizer
    prompt = Tokenizer(tokenizer_path).encode("The sea was calm", bos=True, eos=False)
    assert got["hooked"] == greedy(state, {**GQA, "vocab_size": VOCAB}, prompt, 8, stop=2)
    assert got["streamed"] == got["whole"] and got["whole"]
    from reference import logits as reference_logits
    want = reference_logits(state3, LLAMA3, [1, 5, 9, 200])
    torch.testing.assert_close(torch.load(str(out) + ".pt", weights_only=True).double(), want, rtol=1e-4, atol=1e-4)


def test_groups_of_their_own_may_be_given_their_own_prompts(make_ckpt, tokenizer_path, tmp_path):
    """model_parallel_size=1 on two processes: each holds the whole model and generates for its own prompt,
    where the ranks' check of their arguments had refused different prompts across the world."""
    ckpt, state = make_ckpt(GQA)
    script = tmp_path / "own_prompts.py"
    script.write_text(f'''
import json, os, sys
from llama import Llama
g = Llama.build({ckpt!r}, {tokenizer_path!r}, 64, 1, model_parallel_size=1, device="cpu", dtype="float32")
prompt = g.tokenizer.encode(["The sea was calm", "A tale of two cities"][int(os.environ["RANK"])], True, False)
print("TOKENS", json.dumps([g.generate([prompt], 6, temperature=0)[0][0]]), flush=True)
''')
    result = launch(2, str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    from llama import Tokenizer
    tok = Tokenizer(tokenizer_path)
    lines = sorted(line.split("TOKENS ", 1)[1] for line in result.stdout.splitlines() if "TOKENS " in line)
    want = sorted(json.dumps([greedy(state, {**GQA, "vocab_size": VOCAB}, tok.encode(p, True, False), 6, stop=2)])
                  for p in ("The sea was calm", "A tale of two cities"))
    assert lines == want, result.stdout[-3000:]
