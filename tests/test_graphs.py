"""Decoding with shapes that don't depend on the position (Transformer.decode) and its CUDA graphs
(llama.graphs), against the float64 reference. The graph tests run on the CPU with a stand-in for CUDA graphs
that replays the aten operations a capture recorded (graph_replay.py), and on a GPU where torch sees one."""

from typing import Tuple

import pytest
import torch

import graph_replay
import llama.graphs
from llama import Llama
from llama.checkpoint import Checkpoint
from llama.model import add_rms_norm

from conftest import GQA, MHA, VOCAB
from reference import logits as reference_logits
from test_model import build_model, prompt
from test_research import Halved

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])])
def device(request) -> str:
    """Where graphs are captured: a GPU, or the CPU, on graph_replay's stand-in for CUDA graphs."""
    return request.param


def build(ckpt, tokenizer_path, max_seq_len: int, max_batch_size: int, device: str, graphs: bool = True) -> Llama:
    """A float32 Llama decoding from graphs (or not): on a GPU as Llama.build makes it; on the CPU, where
    Llama.build refuses cuda_graphs, with graph_replay's decoder."""
    if device == "cuda":
        return Llama.build(ckpt, tokenizer_path, max_seq_len, max_batch_size, device="cuda", dtype="float32",
                           cuda_graphs=graphs)
    return graph_replay.cpu_llama(ckpt, tokenizer_path, max_seq_len, max_batch_size, graphs)


def prefilled(make_ckpt, tokenizer_path, device: str, seed: int) -> Tuple[Llama, dict, list]:
    """A one-row generator with a prompt of 8 tokens in its cache; its weights; the prompt."""
    ckpt, state = make_ckpt(GQA)
    g = build(ckpt, tokenizer_path, 32, 1, device)
    tokens = prompt(8, seed)
    g.model.forward(torch.tensor([tokens], device=device), 0)
    return g, state, tokens


def step_matches_reference(g: Llama, state: dict, tokens: list, t: int, device: str) -> None:
    """One decoding step of token t after tokens (to which it is added): its logits the reference's."""
    logits = g.decode_step(torch.tensor([[t]], device=device), len(tokens))
    tokens.append(t)
    want = reference_logits(state, {**GQA, "vocab_size": VOCAB}, tokens)[-1]
    torch.testing.assert_close(logits[0, -1].double().cpu(), want, rtol=1e-3, atol=1e-3)


def fill_cache_with_noise(model) -> None:
    """Large values everywhere in the cache, as a longer earlier generation would leave: whatever lies past a
    step's position must be masked out, not merely zero."""
    for layer in model.layers:
        for cache in (layer.attention.cache_k, layer.attention.cache_v):
            cache.normal_(0, 100)


@pytest.mark.parametrize("params", [MHA, GQA], ids=["mha", "gqa"])
def test_decode_reading_a_fixed_key_count_matches_reference(make_ckpt, params):
    ckpt, state = make_ckpt(params)
    model = build_model(ckpt, state, max_seq_len=48)
    fill_cache_with_noise(model)
    rows = [prompt(5, 3), prompt(12, 4)]
    pad = torch.tensor([7, 0])
    model.forward(torch.tensor([[0] * 7 + rows[0], rows[1]]), 0, left_pad=pad)
    for pos in range(12, 20):
        nxt = [pos * 7 % VOCAB, pos * 13 % VOCAB]
        got = model.decode(torch.tensor([[t] for t in nxt]), torch.tensor(pos), pad, key_end=48)
        for row, t, logits in zip(rows, nxt, got):
            row.append(t)
            want = reference_logits(state, {**params, "vocab_size": VOCAB}, row)[-1]
            torch.testing.assert_close(logits[0].double(), want, rtol=1e-4, atol=1e-4)


def test_cuda_graphs_and_compiling_need_a_gpu(make_ckpt, tokenizer_path, monkeypatch):
    ckpt, _ = make_ckpt(MHA)
    assert Llama.build(ckpt, tokenizer_path, 32, 2, device="cpu").decoder is None
    # A flag that can't apply fails before the weights load (a 7B load takes a while to end in an error).
    monkeypatch.setattr(Checkpoint, "load_rank", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        Llama.build(ckpt, tokenizer_path, 32, 2, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="compile_elementwise=True compiles the kernels of the CUDA graphs"):
        Llama.build(ckpt, tokenizer_path, 32, 2, device="cpu", compile_elementwise=True)


def test_compiled_elementwise_kernels_match_reference(make_ckpt):
    """Transformer.compiled_elementwise's forms of RMSNorm, the residual sum with the norm after it, the rotation
    (in real arithmetic there) with the cache write after it and SwiGLU's gate, compiled by Inductor for the CPU
    here (its code for a GPU is checked by test_graphed_generation_equals_eager): a prompt and a decoding step
    against the reference."""
    ckpt, state = make_ckpt(GQA)
    model = build_model(ckpt, state)
    rows, nxt = [prompt(9, 1), prompt(9, 2)], [5, 7]
    with model.compiled_elementwise():
        got = model.forward(torch.tensor(rows), 0)
        step = model.forward(torch.tensor([[t] for t in nxt]), 9)
    assert all(layer.ffn_norm.add_norm is add_rms_norm for layer in model.layers)  # eager again after it
    for row, tokens, t, logits in zip(got, rows, nxt, step):
        want = reference_logits(state, {**GQA, "vocab_size": VOCAB}, tokens + [t])
        torch.testing.assert_close(row.double(), want[:-1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[0].double(), want[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("params", [MHA, GQA], ids=["mha", "gqa"])
def test_graphed_steps_match_reference_across_buckets(make_ckpt, tokenizer_path, monkeypatch, params, device):
    monkeypatch.setattr(llama.graphs, "BUCKET", 8)  # steps 12..29 cross three buckets
    ckpt, state = make_ckpt(params)
    g = build(ckpt, tokenizer_path, 40, 2, device)
    assert g.decoder is not None  # on by default on a GPU
    fill_cache_with_noise(g.model)
    rows = [prompt(5, 3), prompt(12, 4)]
    pad = torch.tensor([7, 0], device=device)
    g.model.forward(torch.tensor([[0] * 7 + rows[0], rows[1]], device=device), 0, left_pad=pad)
    for pos in range(12, 30):
        if pos == 21:  # a cache allocated anew (another size): the graphs are captured again, on its addresses
            old = [(layer.attention.cache_k, layer.attention.cache_v) for layer in g.model.layers]
            g.model.setup_cache(2, 44)
            for layer, (k, v) in zip(g.model.layers, old):
                layer.attention.cache_k[:, :40].copy_(k)
                layer.attention.cache_v[:, :40].copy_(v)
        nxt = [pos * 7 % VOCAB, pos * 13 % VOCAB]
        got = g.decode_step(torch.tensor([[t] for t in nxt], device=device), pos, pad)
        for row, t, logits in zip(rows, nxt, got.cpu()):
            row.append(t)
            want = reference_logits(state, {**params, "vocab_size": VOCAB}, row)[-1]
            torch.testing.assert_close(logits[0].double(), want, rtol=1e-3, atol=1e-3)
    assert {keys for _, keys in g.decoder.graphs} == {24, 32}  # captured again after the new cache


def test_steps_called_outside_inference_mode_after_a_generation_in_it(make_ckpt, tokenizer_path, device):
    """A generation's steps run in inference mode (as Meta's generate), and make the graphs' inputs there; a
    step called by research code afterwards, outside it, writes into them all the same."""
    ckpt, state = make_ckpt(GQA)
    g = build(ckpt, tokenizer_path, 32, 1, device)
    g.generate([prompt(4, 9)], 3, temperature=0)
    tokens = prompt(8, 1)
    g.model.forward(torch.tensor([tokens], device=device), 0)
    assert not torch.is_inference_mode_enabled() and 1 in g.decoder.inputs
    step_matches_reference(g, state, tokens, 11, device)


def test_graphed_generation_equals_eager(make_ckpt, tokenizer_path, device):
    ckpt, _ = make_ckpt(GQA)
    runs = [build(ckpt, tokenizer_path, 64, 3, device, graphs) for graphs in (True, False)]
    assert_same_generations(*runs)


@pytest.mark.gpu
@needs_gpu
def test_graphed_generation_with_compiled_kernels_equals_eager(make_ckpt, tokenizer_path):
    ckpt, _ = make_ckpt(GQA)
    assert_same_generations(*(Llama.build(ckpt, tokenizer_path, 64, 3, device="cuda", dtype="float32",
                                          cuda_graphs=graphs, compile_elementwise=graphs) for graphs in (True, False)))


def assert_same_generations(graphed: Llama, eager: Llama) -> None:
    prompts = [prompt(3, 5), prompt(17, 6), prompt(9, 7)]
    (graphed, graphed_logprobs), (eager, eager_logprobs) = (g.generate(prompts, 40, temperature=0, logprobs=True)
                                                            for g in (graphed, eager))
    assert graphed == eager and sum(map(len, graphed)) > 60
    for a, b in zip(graphed_logprobs, eager_logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)


def test_ragged_graphed_generation_matches_reference(make_ckpt, tokenizer_path, device):
    """A ragged batch on the GPU, over a cache full of noise: each group of shorter prompts prefilled after its
    padding (attention over its own keys, causal), then graphed steps. Every returned token's log-probability
    must be the float64 reference's for that row alone, and the greedy token its argmax."""
    ckpt, state = make_ckpt(GQA)
    g = build(ckpt, tokenizer_path, 48, 3, device)
    fill_cache_with_noise(g.model)
    prompts = [prompt(4, 8), prompt(15, 9), prompt(9, 10)]
    tokens, logprobs = g.generate(prompts, 10, temperature=0, logprobs=True)
    for p, new, lp in zip(prompts, tokens, logprobs):
        assert len(new) == 10
        want = torch.log_softmax(reference_logits(state, {**GQA, "vocab_size": VOCAB}, p + new)[len(p) - 1:-1], -1)
        assert new == want.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), want[torch.arange(10), new],
                                   rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("way", ["hook", "forward"])
def test_graphed_steps_give_way_to_hooks_and_replaced_forwards_and_come_back(make_ckpt, tokenizer_path, device, way):
    """A hook added after graphs were captured, or a forward of research code's put on a module, runs at each
    step (the steps eager while it is there), and once removed the graphs replay again, without it; every
    step's logits the reference's."""
    (g, state, tokens), calls = prefilled(make_ckpt, tokenizer_path, device, 11), []
    ffn = g.model.layers[0].feed_forward
    for pos in range(8, 14):
        t = pos * 5 % VOCAB
        if pos == 10 and way == "hook":
            handle = ffn.register_forward_hook(lambda module, args, out: calls.append(out.shape))
        elif pos == 10:
            ffn.forward = lambda x, own=ffn.forward: calls.append(x.shape) or own(x)
        if pos == 12:
            handle.remove() if way == "hook" else delattr(ffn, "forward")
        step_matches_reference(g, state, tokens, t, device)
    assert calls == [(1, 1, GQA["dim"])] * 2 and len(g.decoder.graphs) == 1  # steps 10 and 11


def test_graphed_steps_follow_a_module_put_in_the_place_of_a_layer(make_ckpt, tokenizer_path, device):
    """A wrapper put around wq after graphs were captured: the steps are captured again with it, their logits
    the reference's with wq halved, where a replay of the old graph would compute without it; and a hook put on
    the wrapper runs."""
    (g, state, tokens), calls = prefilled(make_ckpt, tokenizer_path, device, 12), []
    attention = g.model.layers[1].attention
    for pos in range(8, 13):
        t = pos * 3 % VOCAB
        if pos == 10:
            attention.wq = Halved(attention.wq)
            state = {**state, "layers.1.attention.wq.weight": state["layers.1.attention.wq.weight"] * 0.5}
        if pos == 12:
            attention.wq.register_forward_hook(lambda module, args, out: calls.append(out.shape))
        step_matches_reference(g, state, tokens, t, device)
    assert len(g.decoder.graphs) == 1 and len(calls) == 1  # captured again with the wrapper; its hook ran


@pytest.mark.parametrize("change", ["parameter", "assign", "data", "table"])
def test_graphed_steps_follow_weights_and_a_table_put_in_place(make_ckpt, tokenizer_path, device, change):
    """A weight replaced by another tensor after graphs were captured (a new Parameter, load_state_dict with
    assign=True, a tensor given to .data), or a rotary table put in model.freqs_cis: the steps are captured again
    and compute with it, where a replay would read the old tensor's memory; logits the reference's."""
    g, state, tokens = prefilled(make_ckpt, tokenizer_path, device, 13)
    w2 = g.model.layers[1].feed_forward.w2
    for pos in range(8, 12):
        if pos == 10 and change == "table":  # the same table in new memory, the old one scrambled
            table, g.model.freqs_cis = g.model.freqs_cis, g.model.freqs_cis.clone()
            table.mul_(1j)
        elif pos == 10:
            new = w2.weight.detach() * -2
            state = {**state, "layers.1.feed_forward.w2.weight": state["layers.1.feed_forward.w2.weight"] * -2}
            if change == "parameter":
                w2.weight = torch.nn.Parameter(new)
            elif change == "assign":
                g.model.load_state_dict({**g.model.state_dict(), "layers.1.feed_forward.w2.weight": new},
                                        assign=True)
            else:
                w2.weight.data = new
        step_matches_reference(g, state, tokens, pos * 7 % VOCAB, device)
    assert len(g.decoder.graphs) == 1
