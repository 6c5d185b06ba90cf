"""Weights packed for their products (Transformer.pack_weights): kernels.c's order for bf16 products, oneDNN's
blocked layout, or kernels.c's order for float32 products. The same function as the reference, one copy of the
weights, and never a stale copy used after the weight changed."""

import copy
import mmap
import sys
import threading

import pytest
import torch
from torch import nn

import llama.machine
from llama import Llama, Transformer, kernels, linear, pages
from llama.checkpoint import Checkpoint
from llama.linear import PackedFused, Packable, can_pack

from conftest import GQA, VOCAB
from reference import logits as reference_logits
from test_model import build_model, prompt


# Every weight's rows a multiple of the float32 product's blocks (32 columns under AVX-512), so that all are packed.
CONFIG = {**GQA, "n_kv_heads": 4, "multiple_of": 64}
WAYS = {"kernels.c": torch.bfloat16, "oneDNN": torch.bfloat16, "float32": torch.float32}
compute = torch.bfloat16  # the way under test's, set by the fixture below


def mapped_model(ckpt_dir: str) -> Transformer:
    """The model as Llama.build loads a bf16 checkpoint: its weights memory-mapped from the shard, computed in
    the dtype of the way under test, its KV cache too (in float32, no keys or values rounded: the products are
    what is compared)."""
    ckpt = Checkpoint(ckpt_dir)
    args = ckpt.model_args(max_batch_size=4, max_seq_len=64)
    model = Transformer(args)
    model.load_state_dict(ckpt.load_rank(args, 0, 1, torch.bfloat16, torch.device("cpu")), strict=True, assign=True)
    model.setup_cache(compute_dtype=compute, cache_dtype=compute)
    return model


def packables(model: Transformer) -> list:
    return [m for m in model.modules() if isinstance(m, Packable)]


def packed(model: Transformer) -> list:
    """The layers whose products use a blocked copy now: their own, or their group's (wq, wk, wv; w1, w3)."""
    groups = [g for layer in model.layers for g in (layer.attention.wqkv, layer.feed_forward.w13)]
    shared = {m for g in groups if isinstance(g, PackedFused) and g.valid() for m in g.layers}
    return [m for m in packables(model) if m.blocked is not None or m in shared]


def assert_close_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 keeps 8 bits of mantissa: compare at that precision."""
    assert (got.double() - want).abs().max() < 0.05 * want.abs().max()


needs_packing = pytest.mark.needs_packing  # skipped where the way under test can't pack here
OWN_WAY = kernels.packs_bf16()  # kernels.c's packed product (AVX-512 BF16)


@pytest.fixture(autouse=True, params=list(WAYS))
def packed_for(request, monkeypatch):
    """Each test three times: the weights packed for bf16 products, by kernels.c's where it can be (AVX-512
    BF16) and by oneDNN's, as where kernels.c can't be built; and for kernels.c's float32 products, as on a CPU
    without native bf16."""
    if request.param == "oneDNN":
        monkeypatch.setattr(kernels, "packs_bf16", lambda: False)
    monkeypatch.setitem(globals(), "compute", WAYS[request.param])
    if request.node.get_closest_marker("needs_packing") and not can_pack(compute):
        pytest.skip(f"this CPU can't pack bf16 weights for {request.param} products")
    return request.param


@needs_packing
def test_packed_model_close_to_reference(make_ckpt, packed_for):
    ckpt, state = make_ckpt(CONFIG)
    model = mapped_model(ckpt)
    assert model.pack_weights() == 7 * CONFIG["n_layers"] + 1 == len(packables(model)) == model.packed_weights()
    copies = [m.blocked[0] for m in packables(model) if m.blocked] + [model.layers[0].attention.wqkv.blocked]
    own = packed_for == "float32" or (packed_for == "kernels.c" and OWN_WAY)
    assert all(c.is_mkldnn != own for c in copies)  # the way under test
    assert len(packed(model)) == len(packables(model))
    for layer in model.layers:  # wq, wk, wv one product, w1, w3 another: copies shared, none of their own
        a, f = layer.attention, layer.feed_forward
        assert isinstance(a.wqkv, PackedFused) and isinstance(f.w13, PackedFused)
        assert all(m.blocked is None for m in (a.wq, a.wk, a.wv, f.w1, f.w3))
    rows = [prompt(12, seed) for seed in (5, 6)]
    tokens = torch.tensor(rows)
    logits = [model.forward(tokens[:, :8], 0)]  # a prompt's products: 16 rows
    logits += [model.forward(tokens[:, i:i + 1], i) for i in range(8, 12)]  # decoding a batch: 2 rows
    got = torch.cat(logits, dim=1)
    one = torch.cat([model.forward(tokens[:1, i:i + 1], i) for i in range(8, 12)], dim=1)  # one row
    bf16_state = {k: v.bfloat16().double() for k, v in state.items()}
    for row, toks, g in zip(got, rows, (one[0], None)):
        want = reference_logits(state, {**CONFIG, "vocab_size": VOCAB}, toks)
        assert_close_bf16(row, want)
        if g is not None:
            assert_close_bf16(g, want[8:])
        if compute == torch.float32:  # the weights widened exactly, x never rounded: float32's accuracy
            exact = reference_logits(bf16_state, {**CONFIG, "vocab_size": VOCAB}, toks)
            torch.testing.assert_close(row.double(), exact, rtol=1e-4, atol=1e-4)
            if g is not None:
                torch.testing.assert_close(g.double(), exact[8:], rtol=1e-4, atol=1e-4)
    assert len(packed(model)) == len(packables(model))  # the packed copies stayed valid throughout


def resident_pages(t: torch.Tensor) -> int:
    """How many of the whole pages under t are in this process's memory (bit 63 of /proc/self/pagemap)."""
    start, end = pages._span(t)
    return int((pages.pagemap(-(-start // mmap.PAGESIZE), end // mmap.PAGESIZE) < 0).sum())


@needs_packing
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are let go of on Linux only")
def test_packing_lets_go_of_the_weights_mapped_pages(make_ckpt):
    """The load reads the weights' pages in; each packed weight, alone or in a group (wq/wk/wv, w1/w3), lets go
    of its own, so that the process holds one copy of the weights, not the packed one and the file's too."""
    model = mapped_model(make_ckpt(CONFIG)[0])
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, Packable)}
    read_in = [f"layers.{i}.{name}" for i in range(2) for name in ("attention.wq", "feed_forward.w1",
                                                                    "feed_forward.w3", "feed_forward.w2")]
    assert all(resident_pages(weights[name]) > 0 for name in read_in)  # (wk and wv, 4 KB, hold no whole page)
    model.pack_weights()
    assert {name: resident_pages(w) for name, w in weights.items()} == dict.fromkeys(weights, 0)


@needs_packing
def test_packed_weights_still_read_as_saved(make_ckpt):
    """Their mapped pages were let go of: reading a weight reads the file again, not zeros."""
    ckpt, state = make_ckpt(CONFIG)
    model = mapped_model(ckpt)
    model.pack_weights()
    for name, w in model.state_dict().items():
        torch.testing.assert_close(w.float(), state[name], rtol=0, atol=0)


@needs_packing
def test_edited_or_replaced_weight_is_used_not_its_stale_copy(make_ckpt):
    ckpt, state = make_ckpt(CONFIG)
    model = mapped_model(ckpt)
    model.pack_weights()
    w2, wk = model.layers[1].feed_forward.w2, model.layers[0].attention.wk
    with torch.no_grad():
        w2.weight.mul_(-3)  # in place
        wk.weight.mul_(-2)  # in place, one of a group sharing a copy
    new_output = torch.randn(model.output.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.05
    model.output.weight = nn.Parameter(new_output.bfloat16())  # replaced
    assert model.packed_weights() == len(packables(model)) - 2 - 3  # counted stale before any product
    edited = {**state, "layers.1.feed_forward.w2.weight": state["layers.1.feed_forward.w2.weight"] * -3,
              "layers.0.attention.wk.weight": state["layers.0.attention.wk.weight"] * -2,
              "output.weight": new_output.bfloat16().float()}
    tokens = prompt(10, 7)
    got = model.forward(torch.tensor([tokens]), 0)[0]
    assert_close_bf16(got, reference_logits(edited, {**CONFIG, "vocab_size": VOCAB}, tokens))
    assert w2.blocked is None and model.output.blocked is None  # stale copies freed
    assert model.layers[0].attention.wqkv.blocked is None  # the group's too: wq, wv compute alone
    assert model.packed_weights() == len(packables(model)) - 2 - 3 == len(packed(model))
    assert model.layers[1].attention.wqkv.valid() and model.layers[0].feed_forward.w13.valid()


@needs_packing
def test_model_loaded_in_inference_mode_packs(make_ckpt):
    """Its weights are inference tensors, which keep no count of in-place edits."""
    ckpt, state = make_ckpt(CONFIG)
    with torch.inference_mode():
        model = mapped_model(ckpt)
        assert model.pack_weights() == len(packables(model))
    tokens = prompt(10, 8)
    assert_close_bf16(model.forward(torch.tensor([tokens]), 0)[0],
                      reference_logits(state, {**CONFIG, "vocab_size": VOCAB}, tokens))
    assert len(packed(model)) == len(packables(model))


@needs_packing
def test_packed_model_can_be_deep_copied_and_saved(make_ckpt, tmp_path):
    ckpt, _ = make_ckpt(CONFIG)
    model = mapped_model(ckpt)
    model.pack_weights()
    tokens = torch.tensor([prompt(6, 9)])
    clone = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    assert packed(clone) == [] and clone.packed_weights() == 0  # computes from its own weights
    assert clone.layers[0].attention.wqkv.layers[1] is clone.layers[0].attention.wk  # the clone's, not the model's
    assert_close_bf16(clone.forward(tokens, 0), model.forward(tokens, 0).double())
    assert len(packed(model)) == len(packables(model))


@needs_packing
def test_weight_edited_before_packing_keeps_its_edit(make_ckpt):
    """Its edited pages are the process's own now: dropping them would bring back the file's values. (So are
    those of a small neighbour sharing a page with it.)"""
    ckpt, state = make_ckpt(CONFIG)
    model = mapped_model(ckpt)
    with torch.no_grad():
        model.layers[0].attention.wq.weight[:8].mul_(-2)
    assert model.pack_weights() < len(packables(model))
    assert model.layers[0].attention.wq.blocked is None and model.layers[0].attention.wqkv is None
    assert model.layers[0].attention.wk.blocked is not None  # packed alone
    edited = {**state, "layers.0.attention.wq.weight": state["layers.0.attention.wq.weight"].clone()}
    edited["layers.0.attention.wq.weight"][:8] *= -2
    for name, w in model.state_dict().items():
        torch.testing.assert_close(w.float(), edited[name], rtol=0, atol=0)
    tokens = prompt(10, 4)
    assert_close_bf16(model.forward(torch.tensor([tokens]), 0)[0],
                      reference_logits(edited, {**CONFIG, "vocab_size": VOCAB}, tokens))


@needs_packing
def test_gradients_flow_past_packed_copies(make_ckpt):
    ckpt, _ = make_ckpt(CONFIG)
    model = mapped_model(ckpt)
    model.pack_weights()
    model.forward_train(torch.tensor([prompt(6)])).float().logsumexp(-1).mean().backward()
    assert model.layers[0].attention.wq.weight.grad is not None


def test_copied_weights_are_not_packed(make_ckpt):
    """Packing a copy in memory would keep two copies of it (and dropping its pages would zero it)."""
    ckpt, state = make_ckpt(CONFIG)
    model = build_model(ckpt, state, dtype=torch.bfloat16)
    assert model.pack_weights() == 0
    torch.testing.assert_close(model.layers[0].attention.wq.weight.float(),
                               state["layers.0.attention.wq.weight"].bfloat16().float(), rtol=0, atol=0)


def test_build_packs_on_request_only_where_it_can(make_ckpt, tokenizer_path):
    ckpt, _ = make_ckpt(CONFIG)
    with pytest.raises(ValueError, match="pack_weights=True needs bf16 weights"):
        Llama.build(ckpt, tokenizer_path, 32, 1, dtype="float32", pack_weights=True)
    unpacked = Llama.build(ckpt, tokenizer_path, 32, 1, dtype="bfloat16", pack_weights=False)
    assert packed(unpacked.model) == []


def test_build_packs_by_default_where_it_can(make_ckpt, tokenizer_path):
    """For products in bf16 where the CPU has native bf16, in float32 where it hasn't (and the kernels built)."""
    ckpt, _ = make_ckpt(CONFIG)
    g = Llama.build(ckpt, tokenizer_path, 32, 2, dtype="bfloat16")
    assert len(packed(g.model)) == (7 * CONFIG["n_layers"] + 1 if can_pack(g.model.compute_dtype) else 0)


def test_build_packs_for_float32_products_without_native_bf16(make_ckpt, tokenizer_path, monkeypatch):
    """bf16 weights on a CPU without native bf16 are computed in float32: packed for kernels.c's float32 product,
    whose logits match the weights as stored (linear_bf16 and float32 products of the weights converted)."""
    monkeypatch.setattr(llama.machine, "cpu_has_native_bf16", lambda: False)
    ckpt, _ = make_ckpt(CONFIG)
    g = Llama.build(ckpt, tokenizer_path, 32, 2, dtype="bfloat16")
    unpacked = Llama.build(ckpt, tokenizer_path, 32, 2, dtype="bfloat16", pack_weights=False)
    assert g.model.compute_dtype == unpacked.model.compute_dtype == torch.float32
    assert len(packed(g.model)) == (7 * CONFIG["n_layers"] + 1 if can_pack(torch.float32) else 0)
    assert packed(unpacked.model) == []
    tokens = torch.tensor([prompt(12, 3), prompt(12, 4)])
    prompts = [model.forward(tokens[:, :10], 0) for model in (g.model, unpacked.model)]  # 20 rows, then 2
    torch.testing.assert_close(prompts[0], prompts[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g.model.forward(tokens[:, 10:11], 10), unpacked.model.forward(tokens[:, 10:11], 10),
                               rtol=1e-4, atol=1e-4)


def test_no_packing_for_products_in_another_dtype(make_ckpt):
    """bf16 weights computed in float16 (research code may ask for it): no product takes them packed."""
    ckpt, state = make_ckpt(CONFIG)
    model = mapped_model(ckpt)
    model.setup_cache(compute_dtype=torch.float16)
    assert model.pack_weights() == 0 and packed(model) == []
    tokens = prompt(6, 2)
    assert_close_bf16(model.forward(torch.tensor([tokens]), 0)[0],
                      reference_logits(state, {**CONFIG, "vocab_size": VOCAB}, tokens))


@pytest.mark.skipif(not linear.ATEN_BF16_GEMV, reason="oneDNN is switched off for one-row products on AVX-512 only")
def test_threads_decoding_unpacked_weights_leave_onednn_on(make_ckpt, tokenizer_path):
    """One-row bf16 products of unpacked weights switch oneDNN off around them, a switch of the whole process:
    two models decoding in two threads could each turn it back to the other's off, leaving it off for good (and
    the user's own bf16 products 40x slower)."""
    ckpt, _ = make_ckpt(GQA)
    models = [Llama.build(ckpt, tokenizer_path, 64, 1, dtype="bfloat16", pack_weights=False) for _ in range(2)]

    def decode(g: Llama) -> None:
        for _ in range(3):
            g.text_completion(["In the beginning"], temperature=0, max_gen_len=40)

    threads = [threading.Thread(target=decode, args=(g,)) for g in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch._C._get_mkldnn_enabled()
