"""What research code written for Meta's model relies on besides generating: forward hooks on its modules (to
read or edit activations) and its helper functions, against the float64 reference."""

import types
from contextlib import contextmanager

import weakref

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

import llama.generation
import llama.kernels
import llama.linear
import llama.model
from llama import Llama, Tokenizer
from llama.graphs import GraphedDecoder
from llama.linear import Fused, PackedFused
from llama.research import replaced
from llama.model import (Attention, FeedForward, ModelArgs, RMSNorm, Transformer, TransformerBlock, apply_rotary_emb,
                         apply_scaling, precompute_freqs_cis, repeat_kv, reshape_for_broadcast)

from conftest import GQA, VOCAB
from reference import greedy, rms_norm, rotate, scaled_freq
from reference import logits as reference_logits
from test_model import build_model, prompt
from test_packing import CONFIG

PARAMS = {**GQA, "vocab_size": VOCAB}
EPS = GQA["norm_eps"]


@pytest.fixture(scope="module")
def gqa(make_ckpt, tokenizer_path):
    ckpt, state = make_ckpt(GQA)
    return Llama.build(ckpt, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32"), state


@contextmanager
def registered(*handles):
    """Hooks removed on the way out, so that the module-scoped model is left without them."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def layer_outputs(state: dict, params: dict, tokens: list) -> list:
    outs = []
    reference_logits(state, params, tokens, layer_out=lambda i, x: outs.append(x) or x)
    return outs


def test_hooks_on_blocks_and_norms_see_the_activations_of_metas_model(gqa):
    """The fused way (each residual sum done by the norm after it) calls no block or norm as a module: with hooks
    on them, the forward pass calls each, and the hooks see the residual stream as on Meta's model."""
    g, state = gqa
    model, tokens, seen = g.model, prompt(20), {}

    def keep(name):
        return lambda module, args, out: seen.setdefault(name, []).append(out[0].double())

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(model.layers)]
    handles += [model.layers[1].attention_norm.register_forward_hook(keep("attention_norm 1")),
                model.norm.register_forward_hook(keep("norm"))]
    with registered(*handles):
        logits = model.forward(torch.tensor([tokens]), 0)
    outs = layer_outputs(state, PARAMS, tokens)
    assert sorted(seen, key=str) == sorted([0, 1, "attention_norm 1", "norm"], key=str)
    assert all(len(v) == 1 for v in seen.values())  # each called once
    for i, want in enumerate(outs):
        torch.testing.assert_close(seen[i][0], want, rtol=1e-4, atol=1e-4)
    norm1 = rms_norm(outs[0], state["layers.1.attention_norm.weight"].double(), EPS)
    torch.testing.assert_close(seen["attention_norm 1"][0], norm1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["norm"][0], rms_norm(outs[-1], state["norm.weight"].double(), EPS),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[0].double(), reference_logits(state, PARAMS, tokens), rtol=1e-4, atol=1e-4)


def test_a_hook_that_edits_a_blocks_output_steers_generation(gqa):
    """A steering vector added to the first block's output by a forward hook: generate's tokens are the
    reference's with the same edit, and after the hook is removed, the reference's without it."""
    g, state = gqa
    push = torch.randn(GQA["dim"], generator=torch.Generator().manual_seed(3)) * 4
    tokens, stop = prompt(8, seed=5), g.tokenizer.eos_id
    steered = greedy(state, PARAMS, tokens, 12, stop, layer_out=lambda i, x: x + push.double() if i == 0 else x)
    plain = greedy(state, PARAMS, tokens, 12, stop)
    assert steered != plain  # the push changes the continuation
    with registered(g.model.layers[0].register_forward_hook(lambda module, args, out: out + push)):
        assert g.generate([tokens], 12, temperature=0)[0][0] == steered
    assert g.generate([tokens], 12, temperature=0)[0][0] == plain


def test_a_ragged_batch_with_hooks_generates_as_without(gqa):
    """Meta's way (each block and norm called) and the fused one give the same ragged batch, prompts of three
    lengths prefilled, with hooks, in one pass of every row in the order given (as Meta's passes hold them), then
    decoded together. A pass that Meta's code could make (one prompt, from cache row 0) gives the hook Meta's
    arguments: an int start_pos."""
    g, _ = gqa
    prompts = [prompt(3, 1), prompt(11, 2), prompt(7, 3)]
    fused = g.generate(prompts, 10, temperature=0, logprobs=True)
    calls = []
    with registered(g.model.layers[1].register_forward_hook(lambda module, args, out: calls.append(out.shape[:2]))):
        plain = g.generate(prompts, 10, temperature=0, logprobs=True)
    assert plain[0] == fused[0] and calls[:2] == [(3, 11), (3, 1)]
    starts = []
    with registered(g.model.layers[1].register_forward_hook(lambda module, args, out: starts.append(args[1]))):
        g.generate(prompts[:1], 3, temperature=0)
    assert starts == [0, 3, 4]
    for a, b in zip(plain[1], fused[1]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)


def test_a_hook_steering_each_row_its_own_way_in_a_ragged_batch(gqa):
    """A steering vector per prompt, added by a hook to the first block's output by row, as research code does
    on Meta's model, whose passes hold every row in the caller's order: each prompt's tokens are those it gets
    alone with its own vector."""
    g, _ = gqa
    prompts = [prompt(3, 4), prompt(11, 5), prompt(7, 6)]
    steer = torch.randn(3, GQA["dim"], generator=torch.Generator().manual_seed(7)) * 3

    def steered(rows):
        hook = g.model.layers[0].register_forward_hook(lambda m, args, out: out + steer[rows, None, :])
        with registered(hook):
            return g.generate([prompts[i] for i in rows], 8, temperature=0)[0]

    together = steered([0, 1, 2])
    alone = [steered([i])[0] for i in range(3)]
    assert together == alone
    assert together != g.generate(prompts, 8, temperature=0)[0]  # not vacuous: the steering changes the text
    # Rows cut short by the cache's end beside the longest (max_seq_len 64) are continued in a batch of all
    # three rows still, the row done in its place, so that each keeps its vector; echo's logprobs as without.
    long = [prompt(3, 4), prompt(50, 5), prompt(20, 6)]
    shapes = []
    hook = g.model.layers[0].register_forward_hook(lambda m, args, out: shapes.append(out.shape[0]) or
                                                   out + steer[:, None, :])
    with registered(hook):
        together, lps = g.generate(long, 30, temperature=0, stop_tokens=[], logprobs=True, echo=True)
    assert set(shapes) == {3} and [len(t) - len(p) for t, p in zip(together, long)] == [30, 14, 30]
    for i, p in enumerate(long):
        hook = g.model.layers[0].register_forward_hook(lambda m, args, out, i=i: out + steer[i])
        with registered(hook):
            alone, alone_lps = g.generate([p], 30, temperature=0, stop_tokens=[], logprobs=True, echo=True)
        assert together[i] == alone[0] and lps[i][0] == 0.0
        torch.testing.assert_close(torch.tensor(lps[i]), torch.tensor(alone_lps[0]), rtol=1e-4, atol=1e-4)


def fused_model(make_ckpt, tokenizer_path, way: str):
    """A model whose wq/wk/wv and w1/w3 are one product each: concatenated as on a GPU (``Fused``), or packed
    for a CPU's product (``PackedFused``, where this machine can pack), with the state it was made from."""
    if way == "concatenated":
        ckpt, state = make_ckpt(GQA)
        model = build_model(ckpt, state)
        model.fuse_weights()
        return model, state, Fused, 1e-4
    ckpt, state = make_ckpt(CONFIG)
    model = Llama.build(ckpt, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu",
                        dtype="bfloat16").model
    if not model.packed_weights():
        pytest.skip("nothing can be packed on this machine")
    return model, {k: v.bfloat16().float() for k, v in state.items()}, PackedFused, 0.05


@pytest.mark.parametrize("way", ["concatenated", "packed"])
def test_hooks_on_fused_layers_see_their_own_products(make_ckpt, tokenizer_path, way):
    """With hooks on wk or w3, their group's one product gives way to each layer's own: each hook sees its
    layer's input and output; without hooks the group's product runs again, its result unchanged."""
    model, state, kind, tol = fused_model(make_ckpt, tokenizer_path, way)
    attention, ff = model.layers[0].attention, model.layers[0].feed_forward
    assert isinstance(attention.wqkv, kind) and isinstance(ff.w13, kind)
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen[name] = (args[0].double(), out.double())
        return hook

    tokens = torch.tensor([prompt(12)])
    before = model.forward(tokens, 0)
    with registered(attention.wk.register_forward_hook(keep("wk")), ff.w3.register_forward_hook(keep("w3"))):
        hooked = model.forward(tokens, 0)
    after = model.forward(tokens, 0)
    x0 = state["tok_embeddings.weight"].double()[tokens[0]]
    normed = rms_norm(x0, state["layers.0.attention_norm.weight"].double(), model.params.norm_eps)
    for name, weight in (("wk", "attention.wk"), ("w3", "feed_forward.w3")):
        x, out = seen[name]
        w = state[f"layers.0.{weight}.weight"].double()
        assert (out[0] - x[0] @ w.T).abs().max() <= tol * out.abs().max()
    assert (seen["wk"][0][0] - normed).abs().max() <= tol * normed.abs().max()
    assert (hooked - before).abs().max() <= tol * before.abs().max()
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_fused_weights_converted_by_to_are_let_go_of_and_fused_again(make_ckpt, tokenizer_path):
    """``.to(dtype)`` after fusing (``.half()`` on a GPU) gives each layer a weight of its own: each group's old
    concatenation is freed, not held beside them, and the next pass fuses the converted weights again."""
    model, state, _, _ = fused_model(make_ckpt, tokenizer_path, "concatenated")
    old = weakref.ref(model.layers[0].attention.wqkv.weight)
    model.to(torch.float64)
    tokens = torch.tensor([prompt(12)])
    got = model.forward(tokens, 0)[0]
    assert old() is None
    groups = [group for layer in model.layers for group in (layer.attention.wqkv, layer.feed_forward.w13)]
    assert all(isinstance(g, Fused) and g.valid() and g.weight.dtype == torch.float64 for g in groups)
    want = reference_logits({k: v.double() for k, v in state.items()}, PARAMS, tokens[0].tolist())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


class Halved(torch.nn.Module):
    """A module put in the place of a linear layer, as a LoRA wrapper is: its output is the layer's, halved."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 0.5


@pytest.mark.parametrize("way", ["concatenated", "packed"])
def test_a_module_put_in_the_place_of_a_fused_layer_computes(make_ckpt, tokenizer_path, way):
    """wv of one layer and w3 of another wrapped after the model was built: their groups' one product (made of
    the layers that were there) gives way, and the logits are the reference's with those weights halved."""
    model, state, _, tol = fused_model(make_ckpt, tokenizer_path, way)
    tokens = torch.tensor([prompt(12)])
    before = model.forward(tokens, 0)[0]
    model.layers[1].attention.wv = Halved(model.layers[1].attention.wv)
    model.layers[0].feed_forward.w3 = Halved(model.layers[0].feed_forward.w3)
    got = model.forward(tokens, 0)[0].double()
    edited = {k: v.double() for k, v in state.items()}
    for name in ("layers.1.attention.wv.weight", "layers.0.feed_forward.w3.weight"):
        edited[name] = edited[name] * 0.5
    want = reference_logits(edited, PARAMS | {"n_kv_heads": model.params.kv_heads,
                                              "multiple_of": model.params.multiple_of}, tokens[0].tolist())
    assert (got - want).abs().max() <= tol * want.abs().max()
    assert (before.double() - want).abs().max() > 4 * tol * want.abs().max()  # the wrappers mattered


@pytest.mark.parametrize("way", ["concatenated", "packed"])
def test_a_weight_of_a_fused_group_replaced_is_used(make_ckpt, tokenizer_path, way):
    """A new Parameter put in place of the last weight of a group (wv, w3), not the first: the group's product,
    made of the old ones, gives way, and the logits are the reference's on the new weights."""
    model, state, _, tol = fused_model(make_ckpt, tokenizer_path, way)
    tokens = torch.tensor([prompt(12)])
    before = model.forward(tokens, 0)[0]
    edited = {k: v.double() for k, v in state.items()}
    for module, name in ((model.layers[1].attention.wv, "layers.1.attention.wv.weight"),
                         (model.layers[0].feed_forward.w3, "layers.0.feed_forward.w3.weight")):
        module.weight = torch.nn.Parameter(-module.weight.detach().clone())
        edited[name] = -edited[name]
    got = model.forward(tokens, 0)[0].double()
    want = reference_logits(edited, PARAMS | {"n_kv_heads": model.params.kv_heads,
                                              "multiple_of": model.params.multiple_of}, tokens[0].tolist())
    assert (got - want).abs().max() <= tol * want.abs().max()
    assert (before.double() - want).abs().max() > 4 * tol * want.abs().max()  # the new weights mattered


@pytest.mark.parametrize("way", ["concatenated", "packed"])
def test_neurons_ablated_through_data_are_ablated(make_ckpt, tokenizer_path, way):
    """Writes through ``.data`` (no count of in-place edits sees them) to a weight of a group (w1) and to one
    product's own (w2): the logits are the reference's on the edited weights, not the packed copies' of before."""
    model, state, _, tol = fused_model(make_ckpt, tokenizer_path, way)
    tokens = torch.tensor([prompt(12)])
    before = model.forward(tokens, 0)[0]
    ff = model.layers[1].feed_forward
    ff.w1.weight.data[:40] = 0  # the first 40 neurons' gates, hence their outputs
    ff.w2.weight.data[:, 40:80] = 0  # the next 40 neurons' contributions
    got = model.forward(tokens, 0)[0].double()
    edited = dict(state)
    edited["layers.1.feed_forward.w1.weight"] = state["layers.1.feed_forward.w1.weight"].clone().index_fill_(
        0, torch.arange(40), 0)
    edited["layers.1.feed_forward.w2.weight"] = state["layers.1.feed_forward.w2.weight"].clone().index_fill_(
        1, torch.arange(40, 80), 0)
    want = reference_logits({k: v.double() for k, v in edited.items()}, PARAMS | {"n_kv_heads": model.params.kv_heads,
                            "multiple_of": model.params.multiple_of}, tokens[0].tolist())
    assert (got - want).abs().max() <= tol * want.abs().max()
    assert (before.double() - want).abs().max() > 4 * tol * want.abs().max()  # the edit mattered


def test_a_model_built_in_inference_mode_sees_its_weights_edited_in_place(make_ckpt, tokenizer_path):
    """Llama.build called inside torch.inference_mode() (a notebook cell under it): a weight then edited in place
    (in inference mode, where alone an inference tensor may be edited) is used as edited. Made there as inference
    tensors, which keep no count of edits, the weights' packed copies were used as before the edit."""
    ckpt, state = make_ckpt(CONFIG)
    with torch.inference_mode():
        model = Llama.build(ckpt, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu",
                            dtype="bfloat16").model
    if not model.packed_weights():
        pytest.skip("nothing can be packed on this machine")
    tokens = torch.tensor([prompt(12)])
    with torch.inference_mode():
        model.layers[1].feed_forward.w2.weight.zero_()
    got = model.forward(tokens, 0)[0].double()
    edited = {k: v.bfloat16().double() for k, v in state.items()}
    edited["layers.1.feed_forward.w2.weight"].zero_()
    want = reference_logits(edited, PARAMS | {"n_kv_heads": model.params.kv_heads,
                                              "multiple_of": model.params.multiple_of}, tokens[0].tolist())
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def metas_forward(model, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Meta's Transformer.forward, written out as research code does to run the layers itself."""
    seqlen = tokens.shape[1]
    h = model.tok_embeddings(tokens)
    freqs_cis = model.freqs_cis[start_pos:start_pos + seqlen]
    mask = None
    if seqlen > 1:
        mask = torch.triu(torch.full((seqlen, seqlen), float("-inf")), diagonal=1)
        mask = torch.hstack([torch.zeros((seqlen, start_pos)), mask]).type_as(h)
    for layer in model.layers:
        h = layer(h, start_pos, freqs_cis, mask)
    return model.output(model.norm(h)).float()


def test_layers_run_with_metas_arguments(gqa):
    """Blocks called with Meta's (h, start_pos, freqs_cis, mask): a prompt, then three tokens at once, then one
    at a time (no mask), through the KV cache, give the reference's logits; as does attention called so."""
    g, state = gqa
    tokens = prompt(12, seed=9)
    with torch.inference_mode():
        got = [metas_forward(g.model, torch.tensor([tokens[a:b]]), a)[0] for a, b in ((0, 7), (7, 10), (10, 11),
                                                                                       (11, 12))]
    torch.testing.assert_close(torch.cat(got).double(), reference_logits(state, PARAMS, tokens), rtol=1e-4,
                               atol=1e-4)
    x = torch.randn(1, 3, GQA["dim"], generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():  # three tokens and no mask: each sees all three, as in Meta's
        got = g.model.layers[0].attention(x, start_pos=0, freqs_cis=g.model.freqs_cis[:3], mask=None)[0].double()
    with pytest.raises(ValueError, match="also takes Meta's freqs_cis"):
        g.model.layers[0].attention(x, 0)
    w = {n: state[f"layers.0.attention.{n}.weight"].double() for n in ("wq", "wk", "wv", "wo")}
    heads, kv, hd = GQA["n_heads"], GQA["n_kv_heads"], GQA["dim"] // GQA["n_heads"]
    q = rotate((x[0].double() @ w["wq"].T).view(3, heads, hd), torch.arange(3), 1e4)
    k = rotate((x[0].double() @ w["wk"].T).view(3, kv, hd), torch.arange(3), 1e4).repeat_interleave(heads // kv, 1)
    v = (x[0].double() @ w["wv"].T).view(3, kv, hd).repeat_interleave(heads // kv, 1)
    scores = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5, dim=-1)
    want = torch.einsum("hqk,khd->qhd", scores, v).reshape(3, -1) @ w["wo"].T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    alone = Attention(ModelArgs(**PARAMS, max_batch_size=2, max_seq_len=8))  # its cache made when first called
    alone.load_state_dict({f"{n}.weight": state[f"layers.0.attention.{n}.weight"] for n in w}, assign=True)
    with torch.inference_mode():
        torch.testing.assert_close(alone(x, 0, g.model.freqs_cis[:3], None)[0].double(), want, rtol=1e-4, atol=1e-5)
    assert alone.cache_k.shape == (2, 8, GQA["n_kv_heads"], hd)


def test_metas_module_signatures_and_names():
    """Research code builds Meta's modules itself and reads their attributes."""
    args = ModelArgs(**PARAMS)
    block = TransformerBlock(3, args)
    assert (block.layer_id, block.n_heads, block.dim, block.head_dim) == (3, 8, 64, 8)
    assert (block.attention.n_kv_heads, block.attention.n_rep) == (2, 4)
    assert block.feed_forward.w1.weight.shape == (args.hidden_dim, 64)
    ff = FeedForward(dim=64, hidden_dim=4 * 64, multiple_of=48, ffn_dim_multiplier=1.3)
    assert ff.w3.weight.shape == (240, 64)  # int(1.3 * int(2 * 256 / 3)) = 221, rounded up to a multiple of 48
    assert ModelArgs(dim=4096, multiple_of=256).hidden_dim == 11008  # Llama 2 7B's
    assert ModelArgs(dim=4096, multiple_of=1024, ffn_dim_multiplier=1.3).hidden_dim == 14336  # Llama 3 8B's
    norm = RMSNorm(64)
    x = torch.randn(2, 64, dtype=torch.float64)
    assert norm.eps == 1e-6
    torch.testing.assert_close(norm._norm(x), x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt())
    freqs = precompute_freqs_cis(8, 5)
    assert reshape_for_broadcast(freqs, torch.zeros(2, 5, 3, 4, dtype=torch.complex64)).shape == (1, 5, 1, 4)
    with pytest.raises(ValueError, match="must be"):
        reshape_for_broadcast(freqs, torch.zeros(2, 6, 3, 4, dtype=torch.complex64))


def test_a_hook_for_every_module_sees_every_block(gqa):
    """``register_module_forward_hook`` (every module's calls, and the pre-hooks): the blocks are called, as on
    Meta's model."""
    g, _ = gqa
    blocks = []
    handle = register_module_forward_hook(
        lambda module, args, out: blocks.append(module) if isinstance(module, TransformerBlock) else None)
    with registered(handle):
        g.model.forward(torch.tensor([prompt(6)]), 0)
    assert blocks == list(g.model.layers)
    blocks.clear()  # and register_module_forward_pre_hook's, before each call
    handle = register_module_forward_pre_hook(
        lambda module, args: blocks.append(module) if isinstance(module, TransformerBlock) else None)
    with registered(handle):
        g.model.forward(torch.tensor([prompt(6)]), 0)
    assert blocks == list(g.model.layers)


def test_graphed_decoding_steps_eagerly_while_a_module_has_hooks(gqa):
    """Hooks would not run in a CUDA graph's replay: a graphed decoder steps through the model instead while
    there are any (here on a CPU, where capturing one would fail)."""
    g, state = gqa
    decoder, tokens, shapes = GraphedDecoder(g.model), prompt(9), []
    g.model.forward(torch.tensor([tokens[:8]]), 0)
    with registered(g.model.layers[1].register_forward_hook(lambda module, args, out: shapes.append(out.shape))):
        logits = decoder(torch.tensor([[tokens[8]]]), 8)
    assert shapes == [(1, 1, GQA["dim"])]
    torch.testing.assert_close(logits[0, -1].double(), reference_logits(state, PARAMS, tokens)[-1], rtol=1e-4,
                               atol=1e-4)


def test_graphed_decoding_steps_eagerly_while_a_forward_is_replaced(gqa, monkeypatch):
    """As with hooks: a replay would skip a forward that research code put in place."""
    g, state = gqa
    decoder, tokens, calls = GraphedDecoder(g.model), prompt(9), []
    g.model.forward(torch.tensor([tokens[:8]]), 0)
    original = FeedForward.forward
    monkeypatch.setattr(FeedForward, "forward", lambda self, x: calls.append(x.shape) or original(self, x))
    logits = decoder(torch.tensor([[tokens[8]]]), 8)
    assert calls == [(1, 1, GQA["dim"])] * GQA["n_layers"]
    torch.testing.assert_close(logits[0, -1].double(), reference_logits(state, PARAMS, tokens)[-1], rtol=1e-4,
                               atol=1e-4)


def metas_attention(self, x, start_pos, freqs_cis, mask):
    """Meta's Attention.forward, as research code copies it to change it (here: to keep the attention weights)."""
    bsz, seqlen, _ = x.shape
    xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
    xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
    xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
    xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
    self.cache_k = self.cache_k.to(xq)
    self.cache_v = self.cache_v.to(xq)
    self.cache_k[:bsz, start_pos: start_pos + seqlen] = xk
    self.cache_v[:bsz, start_pos: start_pos + seqlen] = xv
    keys = repeat_kv(self.cache_k[:bsz, : start_pos + seqlen], self.n_rep).transpose(1, 2)
    values = repeat_kv(self.cache_v[:bsz, : start_pos + seqlen], self.n_rep).transpose(1, 2)
    scores = torch.matmul(xq.transpose(1, 2), keys.transpose(2, 3)) / self.head_dim ** 0.5
    if mask is not None:
        scores = scores + mask
    scores = torch.softmax(scores.float(), dim=-1).type_as(xq)
    self.kept.append((start_pos, scores))
    output = torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, seqlen, -1)
    return self.wo(output)


def saving_block(self, x, start_pos, freqs_cis, mask):
    """Meta's TransformerBlock.forward, patched on the class to keep each block's output (as the ncut-pytorch
    gallery does with Meta's Llama 3)."""
    h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
    self.saved = h + self.feed_forward(self.ffn_norm(h))
    return self.saved


def test_forwards_replaced_with_metas_code_get_metas_arguments(gqa, monkeypatch):
    """A ragged batch's generation, with Meta's attention put on one layer's instance and a block forward of
    Meta's on the class: each is called with Meta's (start_pos, freqs_cis, mask), the batch going in turns of
    one prompt length (Meta's arguments can't say a row is left-padded), and the tokens and log-probabilities
    are those of the model as it is."""
    g, state = gqa
    prompts = [prompt(n, seed=n) for n in (5, 9, 5, 3)]
    want, want_probs = g.generate(prompts, 6, temperature=0, logprobs=True)
    attention = g.model.layers[1].attention
    attention.kept = []
    monkeypatch.setattr(attention, "forward", types.MethodType(metas_attention, attention), raising=False)
    monkeypatch.setattr(TransformerBlock, "forward", saving_block)
    got, got_probs = g.generate(prompts, 6, temperature=0, logprobs=True)
    assert got == want
    torch.testing.assert_close(torch.tensor(got_probs), torch.tensor(want_probs), rtol=1e-4, atol=1e-4)
    assert all(isinstance(start, int) for start, _ in attention.kept)
    prefills = [scores.shape for start, scores in attention.kept if start == 0]
    assert prefills == [(2, 8, 5, 5), (1, 8, 9, 9), (1, 8, 3, 3)]  # rows of one length, each from cache row 0
    assert g.model.layers[0].saved.shape == (1, 1, GQA["dim"])  # the last step's, the 3-token prompt's turn
    monkeypatch.undo()
    assert not replaced(g.model.replaceable_modules()) and g.generate(prompts, 6, temperature=0) == (want, None)


def test_an_attention_put_in_place_and_a_transformer_forward_of_metas_signature(gqa, monkeypatch):
    """Research code swaps in a new Attention(args) with the layer's weights (its cache made on first use), and
    puts Meta's Transformer.forward(tokens, start_pos) in place of the model's: generation gives the tokens and
    log-probabilities of the model as it is."""
    g, _ = gqa
    prompts = [prompt(n, seed=n) for n in (5, 9, 5)]
    want, want_probs = g.generate(prompts, 6, temperature=0, logprobs=True)
    layer = g.model.layers[0]  # whose cache the model's checks read
    own = layer.attention
    layer.attention = Attention(g.model.params)  # (not by monkeypatch, whose undo unregisters a submodule)
    try:
        layer.attention.load_state_dict(own.state_dict(), assign=True)
        assert g.generate(prompts, 6, temperature=0) == (want, None)
    finally:
        layer.attention = own
    monkeypatch.setattr(Transformer, "forward", torch.inference_mode()(metas_forward))
    got, got_probs = g.generate(prompts, 6, temperature=0, logprobs=True)
    assert got == want
    torch.testing.assert_close(torch.tensor(got_probs), torch.tensor(want_probs), rtol=1e-4, atol=1e-4)


def test_metas_attention_code_where_bf16_weights_compute_in_float32(make_ckpt, tokenizer_path, monkeypatch):
    """There the KV cache is bf16 (``cache_dtype_for``). Meta's attention code makes its cache its queries' dtype
    (``self.cache_k = self.cache_k.to(xq)``) and computes with what it reads back: that layer's cache becomes
    float32, as the code asks, and a prompt and a step after it give the reference's logits on the same bf16
    weights, up to the rounding of the other layers' keys and values."""
    ckpt, state = make_ckpt(GQA)
    g = Llama.build(ckpt, tokenizer_path, 64, 4, device="cpu", dtype="bfloat16")
    g.model.setup_cache(compute_dtype=torch.float32)
    attention = g.model.layers[1].attention
    attention.kept = []
    monkeypatch.setattr(attention, "forward", types.MethodType(metas_attention, attention), raising=False)
    tokens = prompt(9, seed=12)
    got = torch.cat([g.model.forward(torch.tensor([tokens[:8]]), 0), g.model.forward(torch.tensor([tokens[8:]]), 8)],
                    dim=1)[0].double()
    assert [start for start, _ in attention.kept] == [0, 8]
    assert attention.cache_k.dtype == torch.float32 and g.model.layers[0].attention.cache_k.dtype == torch.bfloat16
    want = reference_logits({k: v.bfloat16().double() for k, v in state.items()}, PARAMS, tokens)
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_replaced_tells_a_module_of_another_class_or_forward():
    args = ModelArgs(**PARAMS)
    block = TransformerBlock(0, args)
    assert not replaced(block.modules())

    class Recording(Attention):
        def forward(self, x, *args):
            return super().forward(x, *args)

    block.attention = Recording(args)
    assert replaced([block.attention]) and not replaced([block])
    block.ffn_norm.forward = lambda x: x
    assert replaced([block.ffn_norm])


def test_the_kv_cache_reads_as_metas(gqa):
    """cache_k and cache_v in Meta's order, (batch, positions, kv_heads, head_dim): after a prompt, the first
    layer's rotated keys and its values at each position."""
    g, state = gqa
    tokens = prompt(10, seed=7)
    g.model.forward(torch.tensor([tokens]), 0)
    n_kv, hd = GQA["n_kv_heads"], GQA["dim"] // GQA["n_heads"]
    w = {k: v.double() for k, v in state.items() if k.startswith("layers.0.")}
    x = rms_norm(state["tok_embeddings.weight"].double()[tokens], w["layers.0.attention_norm.weight"], EPS)
    keys = rotate((x @ w["layers.0.attention.wk.weight"].T).view(len(tokens), n_kv, hd), torch.arange(len(tokens)),
                  GQA.get("rope_theta", 1e4))
    values = (x @ w["layers.0.attention.wv.weight"].T).view(len(tokens), n_kv, hd)
    attention = g.model.layers[0].attention
    assert attention.cache_k.shape == (4, 64, n_kv, hd) == attention.cache_v.shape
    torch.testing.assert_close(attention.cache_k[0, :len(tokens)].double(), keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attention.cache_v[0, :len(tokens)].double(), values, rtol=1e-4, atol=1e-5)


def test_metas_rotary_helpers_match_float64():
    """precompute_freqs_cis, apply_rotary_emb and the model's freqs_cis, which research code imports or reads."""
    d, n, theta = 16, 40, 1e4
    freqs = precompute_freqs_cis(d, n, theta)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    assert freqs.shape == (n, d // 2) and freqs.dtype == torch.complex64
    torch.testing.assert_close(freqs.to(torch.complex128), torch.polar(torch.ones_like(angles), angles),
                               rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    xq, xk = torch.randn(2, n, 4, d, generator=g), torch.randn(2, n, 2, d, generator=g)
    q, k = apply_rotary_emb(xq, xk, freqs)
    for x, got in ((xq, q), (xk, k)):
        assert got.dtype == x.dtype and got.shape == x.shape
        for row in range(2):
            torch.testing.assert_close(got[row].double(), rotate(x[row].double(), torch.arange(n), theta),
                                       rtol=0, atol=1e-5)
    q16, _ = apply_rotary_emb(xq.bfloat16(), xk.bfloat16(), freqs)
    assert q16.dtype == torch.bfloat16
    # Llama 3.1's scaling, by llama-models' name: each frequency as the rule in reference.py says, factor 8 or 32.
    f = 500000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    for factor in (8, 32):
        want = torch.tensor([scaled_freq(float(x), factor) for x in f], dtype=torch.float64)
        torch.testing.assert_close(apply_scaling(f.float(), factor).double(), want, rtol=1e-6, atol=0)


def test_hooks_in_the_last_block_see_every_position(gqa):
    """The engine runs the last block of a prompt's pass for its last position alone, as only its logits are
    sampled from: hooks on that block's layers see the whole prompt all the same, as on Meta's model."""
    g, state = gqa
    tokens, shapes = prompt(8, seed=9), []
    last = g.model.layers[-1]
    with registered(*(m.register_forward_hook(lambda m, a, out: shapes.append(out.shape[1]))
                      for m in (last.attention.wo, last.feed_forward.w2))):
        got = g.generate([tokens], 2, temperature=0)[0][0]
    assert shapes == [8, 8, 1, 1]
    assert got == greedy(state, PARAMS, tokens, 2, g.tokenizer.eos_id)


def test_an_identity_output_gives_the_hidden_states(make_ckpt):
    """model.output = nn.Identity(), as research code takes the final hidden states from Meta's model."""
    ckpt, state = make_ckpt(GQA)
    model = build_model(ckpt, state)
    head = model.output.weight.detach().double()
    model.output = torch.nn.Identity()
    model.setup_cache()
    tokens = prompt(6, seed=10)
    hidden = model.forward(torch.tensor([tokens]), 0)[0]
    assert hidden.shape == (6, GQA["dim"])
    torch.testing.assert_close(hidden.double() @ head.T, reference_logits(state, PARAMS, tokens), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("scaled", [False, True], ids=["llama2", "llama3.1"])
def test_precompute_freqs_cis_put_in_place_with_metas_signature_makes_the_table(make_ckpt, monkeypatch, scaled):
    """Research code replaces llama.model.precompute_freqs_cis with its own, of Meta's signature (dim, end,
    theta; Llama 3.1's adds use_scaled), to scale RoPE: the model's table is what it returns, and rotates."""
    calls = []

    def linear_scaling(dim, end, theta=10000.0, *use_scaled):
        calls.append((dim, end, theta, *use_scaled))
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        return torch.polar(torch.ones(end, dim // 2), torch.outer(torch.arange(end).float() / 2, freqs))

    monkeypatch.setattr(llama.model, "precompute_freqs_cis", linear_scaling)
    params = {**GQA, "use_scaled_rope": scaled}
    model = build_model(*make_ckpt(params))
    head_dim, end = GQA["dim"] // GQA["n_heads"], 2 * model.params.max_seq_len
    assert calls == [(head_dim, end, 10000.0, *((True,) if scaled else ()))]
    torch.testing.assert_close(model.freqs_cis, linear_scaling(head_dim, end))


def test_the_models_freqs_cis_rotates_by_its_rope_theta(make_ckpt):
    params = {**GQA, "rope_theta": 1e6}
    model = build_model(*make_ckpt(params))
    table = model.freqs_cis
    assert table.shape == (2 * model.params.max_seq_len, model.params.head_dim // 2)  # as Meta's
    x = torch.randn(1, table.shape[0], 1, model.params.head_dim, generator=torch.Generator().manual_seed(1))
    rotated, _ = apply_rotary_emb(x, x, table)
    torch.testing.assert_close(rotated[0].double(), rotate(x[0].double(), torch.arange(table.shape[0]), 1e6),
                               rtol=0, atol=1e-4)


def test_repeat_kv_is_metas():
    """Each KV head repeated n_rep times in a row, as Meta's expand-and-reshape gives them."""
    x = torch.randn(2, 5, 3, 4)
    want = torch.stack([x[:, :, h] for h in range(3) for _ in range(2)], dim=2)
    assert torch.equal(repeat_kv(x, 2), want)
    assert torch.equal(repeat_kv(x, 1), x)


def test_metas_chat_names_import_from_generation_and_build_its_prompts(tokenizer_path):
    """Research code builds Llama 2 chat prompts by hand from the names Meta's generation.py defines: imported
    from ours, Meta's recipe gives the tokens chat_completion encodes."""
    from llama import chat
    from llama.chat import chat_format
    from llama.generation import (B_INST, B_SYS, E_INST, E_SYS, SPECIAL_TAGS, UNSAFE_ERROR, ChatFormat, Dialog,
                                  sample_top_p)
    from llama.sampling import sample_top_p as ours
    from llama.tokenizer import ChatFormat as llama3s

    tok = Tokenizer(tokenizer_path)
    dialog: Dialog = [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": " Who made the world? "},
                      {"role": "assistant", "content": "God. "},
                      {"role": "user", "content": "And then?"}]
    first = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
    want = tok.encode(f"{B_INST} {first.strip()} {E_INST} {dialog[2]['content'].strip()} ", bos=True, eos=True)
    want += tok.encode(f"{B_INST} {dialog[3]['content'].strip()} {E_INST}", bos=True, eos=False)
    assert chat_format(tok).encode_dialog(dialog, 0) == want
    assert (sample_top_p, UNSAFE_ERROR) == (ours, chat.UNSAFE_ERROR) and {B_INST, E_INST} <= set(SPECIAL_TAGS)
    assert ChatFormat is llama3s  # Meta's llama3 generation.py imports it from its tokenizer


@pytest.mark.skipif(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 13),
                    reason="Dynamo of torch 2.6 guards on the model's count of runs, and compiles again at each call")
def test_a_compiled_model_is_not_compiled_again_at_every_call(gqa):
    """torch.compile of the whole model (research code may): the same call again reuses what was compiled (no
    guard on anything a call changes, such as the model's count of runs), and the logits are the float64
    reference's. (Keeping the count out of Dynamo's sight with torch.compiler.disable would import Dynamo with
    the package: 2.7 s more for every process on a 2-core machine.)"""
    import torch._dynamo

    g, state = gqa
    torch._dynamo.reset()
    compiled = torch.compile(g.model, backend="eager")  # Dynamo's tracing and guards, without Inductor's codegen
    tokens = torch.tensor([prompt(12)])
    compiled(tokens, 0)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(3):
        logits = compiled(tokens, 0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    want = reference_logits(state, PARAMS, tokens[0].tolist())
    torch.testing.assert_close(logits[0].double(), want, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


class Steered(torch.nn.Module):
    """A wrapper of research code's around a block: its output pushed along a vector."""

    def __init__(self, block, push):
        super().__init__()
        self.block, self.push = block, push

    def forward(self, x, *args):
        return self.block(x, *args) + self.push


class Skipped(torch.nn.Module):
    """A stand-in for a block that leaves the residual stream as it is."""

    def forward(self, x, *args):
        return x


class Recorded(torch.nn.Module):
    """A wrapper around an attention that keeps the shapes of what it gives."""

    def __init__(self, attention):
        super().__init__()
        self.attention, self.shapes = attention, []

    def forward(self, x, *args):
        out = self.attention(x, *args)
        self.shapes.append(tuple(out.shape))
        return out


def test_blocks_and_attention_in_wrappers_of_research_codes_compute(gqa):
    """A block in a steering wrapper, a block replaced by a stand-in that skips it, an attention in a wrapper:
    generation is the reference's with the same change (a skipped block: its wo and w2 zero, which leave the
    stream as it is), and the model is as before once they are taken out."""
    g, state = gqa
    layers = g.model.layers
    push = torch.randn(GQA["dim"], generator=torch.Generator().manual_seed(4)) * 4
    tokens, stop = prompt(8, seed=6), g.tokenizer.eos_id
    plain = greedy(state, PARAMS, tokens, 10, stop)
    block0, block1 = layers[0], layers[1]
    try:
        layers[0] = Steered(block0, push)
        steered = greedy(state, PARAMS, tokens, 10, stop, layer_out=lambda i, x: x + push.double() if i == 0 else x)
        assert steered != plain and g.generate([tokens], 10, temperature=0)[0][0] == steered
        layers[0], layers[1] = block0, Skipped()
        skipped = {**state, **{f"layers.1.{n}.weight": torch.zeros_like(state[f"layers.1.{n}.weight"])
                               for n in ("attention.wo", "feed_forward.w2")}}
        assert g.generate([tokens], 10, temperature=0)[0][0] == greedy(skipped, PARAMS, tokens, 10, stop)
        layers[1] = block1
        block1.attention = Recorded(block1.attention)
        assert g.generate([tokens], 10, temperature=0)[0][0] == plain
        assert block1.attention.shapes[0] == (1, 8, GQA["dim"]) and len(block1.attention.shapes) == len(plain)
    finally:
        layers[0], layers[1] = block0, block1
        if isinstance(block1.attention, Recorded):
            block1.attention = block1.attention.attention
    assert g.generate([tokens], 10, temperature=0)[0][0] == plain


def test_a_sample_top_p_put_in_place_in_generation_samples(gqa, monkeypatch):
    """Meta's generate looks sample_top_p up in llama.generation at each step: research code puts its own there
    to sample another way. Here one that takes the most likely token: the greedy tokens; and it is given Meta's
    probabilities, softmax(logits / temperature), the reference's at each step."""
    g, state = gqa
    calls = []

    def most_likely(probs, p):
        calls.append((probs.clone(), p))
        return probs.argmax(dim=-1, keepdim=True)

    monkeypatch.setattr(llama.generation, "sample_top_p", most_likely)
    tokens = prompt(5, seed=11)
    got = g.generate([tokens], 4, temperature=0.5, top_p=0.8)[0][0]
    assert got == greedy(state, PARAMS, tokens, 4, g.tokenizer.eos_id) and len(got) == 4
    assert [(tuple(probs.shape), p) for probs, p in calls] == [((1, VOCAB), 0.8)] * 4
    for i, (probs, _) in enumerate(calls):
        want = torch.softmax(reference_logits(state, PARAMS, tokens + got[:i])[-1] / 0.5, dim=-1)
        torch.testing.assert_close(probs[0].double(), want, rtol=1e-3, atol=1e-4)


def test_tokens_banned_with_minus_infinity_are_never_generated(gqa):
    """Research code's logit bias: -inf for some tokens, from a hook on the output layer. Greedy picks the
    reference's best of the rest, and sampling never draws them (only NaN, +inf or a row of -inf are errors)."""
    g, state = gqa
    tokens = prompt(8, seed=7)
    banned = reference_logits(state, PARAMS, tokens)[-1].topk(3).indices

    def ban(module, args, out):
        return out.index_fill(-1, banned, float("-inf"))

    with registered(g.model.output.register_forward_hook(ban)):
        first = g.generate([tokens], 1, temperature=0)[0][0][0]
        sampled, _ = g.generate([tokens] * 4, 12, temperature=1.5, top_p=1.0)
    assert first == int(reference_logits(state, PARAMS, tokens)[-1].index_fill(0, banned, float("-inf")).argmax())
    assert not set(banned.tolist()) & {t for row in sampled for t in row}


def test_a_wrapper_of_the_models_forward_may_edit_the_logits_in_place(gqa):
    """A logit bias wrapping ``model.forward`` (the README's way to wrap the whole model) that writes into the
    logits it returns, as it can in Meta's generate, which runs in inference mode: greedy picks the reference's
    best of the rest, in a generation and a stream; outside one, the caller's code is not in inference mode."""
    g, state = gqa
    tokens = prompt(8, seed=9)
    want = reference_logits(state, PARAMS, tokens)[-1]
    banned = int(want.argmax())
    forward = g.model.forward

    def biased(tokens, start_pos):
        out = forward(tokens, start_pos)
        out[..., banned] = float("-inf")
        out /= 2.0
        return out

    g.model.forward = biased
    try:
        first = g.generate([tokens], 1, temperature=0)[0][0][0]
        pieces = g.stream(g.tokenizer.decode(tokens), temperature=0, max_gen_len=3)
        next(pieces)
        assert not torch.is_inference_mode_enabled()
        list(pieces)
    finally:
        del g.model.forward
    assert first == int(want.index_fill(0, torch.tensor(banned), float("-inf")).argmax())


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_modules_made_in_the_weights_dtype_compute_where_activations_are_float32(make_ckpt, tokenizer_path,
                                                                                 monkeypatch, kernels):
    """bf16 weights computing in float32 (CPUs without native bf16): an nn.Linear made in bf16 put in the place
    of wq, w2 and the output layer, and a LoRA wrapper around wv whose matrices are bf16, compute as Meta's model
    would feed them (in bf16), and the logits are the reference's with those weights."""
    if not kernels:
        monkeypatch.setattr(llama.kernels, "library", lambda: None)
    ckpt, state = make_ckpt(GQA)
    g = Llama.build(ckpt, tokenizer_path, 64, 4, device="cpu", dtype="bfloat16")
    g.model.setup_cache(compute_dtype=torch.float32)
    model, edited = g.model, {k: v.bfloat16().double() for k, v in state.items()}
    tokens = prompt(12, seed=4)
    before = model.forward(torch.tensor([tokens]), 0)[0].double()

    def halved(owner: torch.nn.Module, name: str, key: str) -> None:
        old = getattr(owner, name).weight
        new = torch.nn.Linear(old.shape[1], old.shape[0], bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            new.weight.copy_(old * 0.5)
        setattr(owner, name, new)
        edited[key] = edited[key] * 0.5

    class LoRA(torch.nn.Module):
        def __init__(self, base: torch.nn.Module, rank: int = 4):
            super().__init__()
            self.base = base
            self.a = torch.nn.Linear(base.weight.shape[1], rank, bias=False, dtype=base.weight.dtype)
            self.b = torch.nn.Linear(rank, base.weight.shape[0], bias=False, dtype=base.weight.dtype)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + self.b(self.a(x))

    halved(model.layers[0].attention, "wq", "layers.0.attention.wq.weight")
    halved(model.layers[1].feed_forward, "w2", "layers.1.feed_forward.w2.weight")
    halved(model, "output", "output.weight")
    lora = model.layers[1].attention.wv = LoRA(model.layers[1].attention.wv)
    edited["layers.1.attention.wv.weight"] += lora.b.weight.double() @ lora.a.weight.double()
    got = model.forward(torch.tensor([tokens]), 0)[0].double()
    assert got.dtype == before.dtype and model.layers[0].attention.cache_k.dtype == torch.bfloat16
    want = reference_logits(edited, PARAMS, tokens)
    assert (got - want).abs().max() < 0.03 * want.abs().max()
    assert (before - want).abs().max() > 0.2 * want.abs().max()  # the modules mattered


def test_hooks_on_the_final_norm_and_output_see_every_position(gqa):
    """Meta's forward runs the whole prompt through the final norm and the output layer: their hooks see all of
    it, where the engine would otherwise take only the last position there."""
    g, state = gqa
    tokens, shapes = prompt(8, seed=8), []
    with registered(g.model.norm.register_forward_hook(lambda m, a, out: shapes.append(("norm", out.shape[1]))),
                    g.model.output.register_forward_hook(lambda m, a, out: shapes.append(("output", out.shape[1])))):
        got = g.generate([tokens], 2, temperature=0)[0][0]
    assert shapes == [("norm", 8), ("output", 8), ("norm", 1), ("output", 1)]
    assert got == greedy(state, PARAMS, tokens, 2, g.tokenizer.eos_id)
    shapes.clear()  # a hook on the output layer alone
    with registered(g.model.output.register_forward_hook(lambda m, a, out: shapes.append(("output", out.shape[1])))):
        g.generate([tokens], 2, temperature=0)
    assert shapes == [("output", 8), ("output", 1)]


def test_the_kv_cache_saved_and_assigned_back_as_on_metas(gqa):
    """Research code saves each attention's cache_k and cache_v after a prompt, runs another, and assigns them
    back to go on from the first: the next step's logits are the reference's for the first prompt. A cache of
    another size assigned makes the cache that size, keeping what it held; a tensor of the wrong shape is an
    error, not ignored."""
    g, state = gqa
    first, other = prompt(9, seed=9), prompt(12, seed=10)
    attentions = [layer.attention for layer in g.model.layers]
    g.model.forward(torch.tensor([first[:8]]), 0)
    saved = [(a.cache_k.clone(), a.cache_v.clone()) for a in attentions]
    g.model.forward(torch.tensor([other]), 0)
    for a, (k, v) in zip(attentions, saved):
        a.cache_k, a.cache_v = k, v
    logits = g.model.forward(torch.tensor([first[8:]]), 8)
    torch.testing.assert_close(logits[0, -1].double(), reference_logits(state, PARAMS, first)[-1], rtol=1e-4,
                               atol=1e-4)
    a = attentions[0]
    kv_heads, hd = a.cache_k.shape[2:]
    a.cache_k = torch.zeros(2, 80, kv_heads, hd)
    assert a.cache_k.shape[:2] == a.cache_v.shape[:2] == (2, 80)
    assert torch.equal(a.cache_v[:, :8], saved[0][1][:2, :8]) and not a.cache_k.any()
    with pytest.raises(ValueError, match=rf"cache_v must be a \(batch, positions, {kv_heads}, {hd}\) tensor"):
        a.cache_v = torch.zeros(2, 80, kv_heads + 1, hd)
    g.model.setup_cache(4, 64)  # as it was, for the module's other tests
    assert a.cache_k.shape[:2] == (4, 64)


def test_a_transformer_built_directly_has_metas_cache_and_table(make_ckpt):
    """Transformer(ModelArgs): cache_k and cache_v are there before any forward pass, zeros, as Meta's are
    from __init__, and editable in place outside inference mode after one; a freqs_cis of research code's own
    is what the model rotates by (here: another theta), on the first pass and after ``.double()``."""
    ckpt, state = make_ckpt(GQA)
    model = build_model(ckpt, state, max_seq_len=32)
    attention = model.layers[0].attention
    hd = GQA["dim"] // GQA["n_heads"]
    assert attention.cache_k.shape == (model.params.max_batch_size, 32, GQA["n_kv_heads"], hd)
    assert not attention.cache_v.any()
    tokens = prompt(6, seed=11)
    theta = {**PARAMS, "rope_theta": 500000.0}
    model.freqs_cis = precompute_freqs_cis(hd, 64, theta["rope_theta"])
    torch.testing.assert_close(model.forward(torch.tensor([tokens]), 0)[0].double(),
                               reference_logits(state, theta, tokens), rtol=1e-4, atol=1e-4)
    attention.cache_v[:, 20] = 0  # outside inference mode
    model.double()
    torch.testing.assert_close(model.forward(torch.tensor([tokens]), 0)[0].double(),
                               reference_logits(state, theta, tokens), rtol=1e-6, atol=1e-6)


def test_rmsnorm_and_parameters_in_metas_order_and_dtypes():
    """state_dict and parameters() in the order of Meta's (the norm before the output layer), and a norm whose
    weight is wider than its input gives the wider dtype, as Meta's (``_norm(x.float()).type_as(x) * weight``)."""
    model = Transformer(ModelArgs(**PARAMS))
    assert list(model.state_dict())[-2:] == ["norm.weight", "output.weight"]
    norm = RMSNorm(8)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 8).bfloat16()
    want = rms_norm(x.double(), norm.weight.double(), 1e-6)
    out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "no_kernels"])
def test_bf16_weights_computing_in_float32_outside_inference_mode(make_ckpt, tokenizer_path, monkeypatch, kernels):
    """A logit lens on a model whose bf16 weights compute in float32 (CPUs without native bf16): after forward
    passes (in inference mode), the output layer called under no_grad, and with autograd through it, as
    research code does. (Without the C kernels, products of a few rows round them to bf16.)"""
    if not kernels:
        monkeypatch.setattr(llama.kernels, "library", lambda: None)
    ckpt, state = make_ckpt(GQA)
    g = Llama.build(ckpt, tokenizer_path, 64, 4, device="cpu", dtype="bfloat16", pack_weights=False)
    g.model.setup_cache(compute_dtype=torch.float32)
    g.model.forward(torch.tensor([prompt(20)]), 0)  # wide products: the weights converted a block at a time
    weight = state["output.weight"].double()
    h = torch.randn(1, 20, GQA["dim"], generator=torch.Generator().manual_seed(5))
    for rows in (20, 3):
        with torch.no_grad():
            got, want = g.model.output(h[:, :rows]).double(), h[:, :rows].double() @ weight.T
        rounded = not kernels and rows < llama.linear.WIDE_ROWS
        assert (got - want).abs().max() < (0.02 if rounded else 1e-4) * want.abs().max()
    x = h.clone().requires_grad_()
    g.model.output(x).sum().backward()
    torch.testing.assert_close(x.grad.double(), weight.sum(0).expand(1, 20, -1), rtol=1e-4, atol=1e-4)
