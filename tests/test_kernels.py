"""The C kernels (llama/kernels.c) against float64: decoding and prefill attention computed naively, products, on
their own and inside the model; and their fallback to torch's operations where they can't be built. Skipped
where they are turned off (LLAMA_KERNELS=0) or there is no C compiler; with one, a build that fails fails them."""

import logging
import os
import platform
import subprocess

import pytest
import torch
import torch.nn.functional as F

from llama import kernels
from llama.model import precompute_freqs_cis

from conftest import VOCAB, needs_kernels
from reference import logits as reference_logits
from test_graphs import fill_cache_with_noise
from test_model import build_model, prompt

# head_dim 64, two query heads per KV head: the smallest shape the kernel takes.
WIDE = {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 64, "norm_eps": 1e-5,
        "vocab_size": -1}
# Each compiled form of the kernel: the machine's own, and on x86 with AVX-512 also AVX2's (what machines without
# AVX-512 run: other vector widths, other shuffles; on an AVX2-only machine the machine's own build is that one);
# on x86 without AVX-512, AVX-512's vector width emulated with AVX2's (GCC splits each vector in two), so that the
# forms of the kernels for 16 floats a vector are checked on every x86 machine, not only where they run (at -O1:
# GCC takes a minute over that form at -O3, 10 s at -O1).
_X86 = platform.machine() == "x86_64"
_AVX512 = "avx512f" in kernels.cpu_id().split()
BUILDS = [kernels.FLAGS] + ([tuple("-march=x86-64-v3" if f == "-march=native" else f for f in kernels.FLAGS)]
                            if _X86 and _AVX512 else [])
BUILDS += ([tuple("-O1" if f == "-O3" else f for f in kernels.FLAGS) + ("-DVECTOR_FLOATS=16", "-Wno-psabi")]
           if _X86 and not _AVX512 else [])


def build_id(flags: tuple) -> str:
    return "16-floats-on-avx2" if "-DVECTOR_FLOATS=16" in flags else next(f for f in flags if f.startswith("-march"))


def naive(q, keys, values, mask):
    """float64 softmax(q k^T / sqrt(d) + mask) v, one query head at a time."""
    scores = q.double() @ keys.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores + mask.double()
    return scores.softmax(-1) @ values.double()


@pytest.fixture
def built(request, monkeypatch):
    """kernels.library() returning the kernels compiled with request.param's flags."""
    lib = kernels.build(request.param)
    monkeypatch.setattr(kernels, "library", lambda: lib)
    return request.param


def cache_views(bsz, kv_heads, n, dim, dtype, seed):
    """Keys and values as the model passes them: views of the first n positions of rows 1.. of a larger cache,
    full of large values past n that must not be read."""
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(bsz + 1, kv_heads, n + 40, dim, generator=g).to(dtype) for _ in range(2))
    k[:, :, n:], v[:, :, n:] = 1e4, 1e4
    return k[1:, :, :n], v[1:, :, :n]


@needs_kernels
@pytest.mark.parametrize("built", BUILDS, ids=build_id, indirect=True)
@pytest.mark.parametrize("dtype,cache", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float32, torch.bfloat16)],
                         ids=["fp32", "bf16", "fp32-bf16_cache"])
@pytest.mark.parametrize("bsz,kv_heads,group,dim,n", [
    (1, 4, 8, 64, 200),   # the 1b shape's heads, several blocks of positions
    (3, 2, 1, 128, 65),   # multi-head (one query per KV head), one block and one position
    (2, 1, 7, 64, 1),     # a group taken as 4 + 2 + 1 queries, not dividing a vector; a single position
    (1, 2, 16, 256, 97),  # the largest group and head the kernel takes
])
def test_matches_naive_attention(built, dtype, cache, bsz, kv_heads, group, dim, n):
    keys, values = cache_views(bsz, kv_heads, n, dim, cache, seed=n)
    # Large queries: scores far apart, so that a block's maximum rising past an earlier one's must rescale; and
    # larger, so that some probabilities underflow float32's exp.
    q = torch.randn(bsz, kv_heads, group, dim, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(bsz, 1, 1, n, dtype=dtype)
    mask[0, ..., : n - 1 - n // 3] = float("-inf")  # a left-padded row: its first blocks wholly masked
    mask[-1, ..., n // 2] = float("-inf") if n > 1 else 0  # and a hole (not the only position: none left)
    for m, scale in ((None, 4), (mask, 4), (mask, 40)):
        got = kernels.decode_attention((q * scale).to(dtype), keys, values, m)
        assert got is not None and got.dtype == dtype and got.shape == q.shape
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-4)
        torch.testing.assert_close(got.double(), naive((q * scale).to(dtype), keys, values, m), **tol)


@needs_kernels
def test_declines_what_it_does_not_take():
    q, keys, values = torch.randn(1, 2, 4, 64), *cache_views(1, 2, 10, 64, torch.float32, seed=0)
    assert kernels.decode_attention(q[..., :48], keys[..., :48], values[..., :48], None) is None  # head_dim
    assert kernels.decode_attention(q.half(), keys.half(), values.half(), None) is None  # dtype
    assert kernels.decode_attention(q, keys.half(), values.half(), None) is None  # the cache's dtype
    assert kernels.decode_attention(q.bfloat16(), keys, values, None) is None  # a cache wider than the queries
    assert kernels.decode_attention(q, keys.bfloat16(), values, None) is None  # keys and values apart
    assert kernels.decode_attention(q, keys.transpose(2, 3), values, None) is None  # layout
    # a cache of fewer rows or KV heads than the queries (torch's broadcasts it; the kernel would read past it)
    assert kernels.decode_attention(q.expand(3, -1, -1, -1), keys, values, None) is None
    assert kernels.decode_attention(q, keys[:, :1], values[:, :1], None) is None
    assert kernels.decode_attention(q[:, :, :0], keys, values, None) is None  # no queries
    with torch.enable_grad():
        assert kernels.decode_attention(q.requires_grad_(), keys, values, None) is None  # autograd


@needs_kernels
@pytest.mark.parametrize("built", BUILDS, ids=build_id, indirect=True)
@pytest.mark.parametrize("cache", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_cache"])
@pytest.mark.parametrize("bsz,kv_heads,group,dim,tokens", [
    (1, 4, 8, 64, 200),   # the 1b shape's heads: 8 tokens a work item, keys in four blocks, the last partial
    (2, 2, 1, 128, 65),   # multi-head: 64 tokens a work item, one key past a block
    (1, 1, 7, 64, 1),     # one token; 7 rows, tiles of 6 and 1
    (2, 2, 3, 256, 70),   # the largest head; 63 rows a work item
    (1, 2, 16, 64, 130),  # 16 heads a KV head: 4 tokens a work item
])
def test_prefill_attention_matches_naive(built, cache, bsz, kv_heads, group, dim, tokens):
    keys, values = cache_views(bsz, kv_heads, tokens, dim, cache, seed=tokens)
    heads = kv_heads * group
    g = torch.Generator().manual_seed(2)
    # The queries as the model passes them: the rotated part of a (batch, tokens, heads + 2 kv_heads, dim) product,
    # transposed; large, so that a later block's maximum rises past an earlier one's and must rescale.
    q = (torch.randn(bsz, tokens, heads + 2 * kv_heads, dim, generator=g) * 4)[:, :, :heads].transpose(1, 2)
    got = kernels.prefill_attention(q, keys, values)
    assert got is not None and got.shape == q.shape and got.transpose(1, 2).is_contiguous()
    causal = torch.full((tokens, tokens), float("-inf")).triu(1)
    want = naive(q.reshape(bsz, kv_heads, group, tokens, dim), keys[:, :, None], values[:, :, None], causal)
    torch.testing.assert_close(got.double(), want.reshape(got.shape), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_prefill_attention_declines_what_it_does_not_take():
    keys, values = cache_views(1, 2, 10, 64, torch.float32, seed=0)
    q = torch.randn(1, 10, 4, 64).transpose(1, 2)
    assert kernels.prefill_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16()) is None  # bf16 queries: torch's
    assert kernels.prefill_attention(q, keys.half(), values.half()) is None  # the cache's dtype
    assert kernels.prefill_attention(q, keys.bfloat16(), values) is None  # keys and values apart
    assert kernels.prefill_attention(q[:, :, 1:], keys, values) is None  # fewer queries than keys: not causal alone
    assert kernels.prefill_attention(q[:, :3], keys, values) is None  # heads not a multiple of the KV heads'
    assert kernels.prefill_attention(q[..., :48], keys[..., :48], values[..., :48]) is None  # head_dim
    assert kernels.prefill_attention(q.contiguous(), keys, values) is None  # layout: a token's heads apart
    with torch.enable_grad():
        assert kernels.prefill_attention(q.clone().requires_grad_(), keys, values) is None  # autograd


@needs_kernels
def test_model_prefills_through_the_kernel(make_ckpt, monkeypatch):
    """Prompts of several lengths, alone and in a batch, through the prefill kernel in every layer, against the
    float64 reference at every position."""
    computed = []
    prefill_attention = kernels.prefill_attention
    monkeypatch.setattr(kernels, "prefill_attention", lambda *a: computed.append(prefill_attention(*a)) or computed[-1])
    ckpt, state = make_ckpt(WIDE)
    model = build_model(ckpt, state, max_batch_size=2, max_seq_len=160, dtype=torch.float32)
    fill_cache_with_noise(model)
    state = {k: v.double() for k, v in state.items()}
    for rows in ([prompt(150, 5)], [prompt(70, 6), prompt(70, 7)]):
        computed.clear()
        got = model.forward(torch.tensor(rows), 0)
        assert len(computed) == WIDE["n_layers"] and all(out is not None for out in computed)
        for row, logits in zip(rows, got):
            want = reference_logits(state, {**WIDE, "vocab_size": VOCAB}, row)
            torch.testing.assert_close(logits.double(), want, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("cache", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_cache"])
def test_model_decodes_through_the_kernel(make_ckpt, monkeypatch, cache):
    """A left-padded batch decoding past several blocks of positions over a cache full of noise, against the
    float64 reference; the kernel, not torch's attention, computing every step. bf16_cache: bf16 weights
    computed in float32 keep their KV cache in bf16 (half the bytes each step reads), against the reference on
    those weights with its keys and values rounded to bf16 as the cache holds them (1e-3: a float32 key and its
    float64 value on either side of a rounding boundary round a bf16 step apart)."""
    computed = []  # per call: whether the kernel computed it
    decode_attention = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: computed.append(decode_attention(*a)) or computed[-1])
    ckpt, state = make_ckpt(WIDE)
    model = build_model(ckpt, state, max_batch_size=2, max_seq_len=160, dtype=cache)
    model.setup_cache(compute_dtype=torch.float32)
    assert model.cache_dtype == model.layers[0].attention.cache_kv.dtype == cache
    state = {k: v.to(cache).double() for k, v in state.items()}
    fill_cache_with_noise(model)
    rows = [prompt(20, 3), prompt(90, 4)]
    pad = torch.tensor([70, 0])
    model.forward(torch.tensor([[0] * 70 + rows[0], rows[1]]), 0, left_pad=pad)
    computed.clear()
    tol = 1e-4 if cache == torch.float32 else 1e-3
    for pos in range(90, 140):  # past 128 cached positions: three of the kernel's blocks
        nxt = [pos * 7 % VOCAB, pos * 13 % VOCAB]
        got = model.forward(torch.tensor([[t] for t in nxt]), pos, left_pad=pad)
        for row, t, logits in zip(rows, nxt, got):
            row.append(t)
            if pos % 10 == 9:
                want = reference_logits(state, {**WIDE, "vocab_size": VOCAB}, row, cache=cache)[-1]
                torch.testing.assert_close(logits[0].double(), want, rtol=tol, atol=tol)
    assert len(computed) == 50 * WIDE["n_layers"] and all(out is not None for out in computed)


def test_falls_back_to_torch_when_it_cannot_be_built(monkeypatch, tmp_path, caplog):
    q, keys, values = torch.randn(1, 2, 4, 64), *cache_views(1, 2, 10, 64, torch.float32, seed=0)
    monkeypatch.delenv("LLAMA_KERNELS", raising=False)
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="llama.kernels"):
            assert kernels.decode_attention(q, keys, values, None) is None
        assert "CPU kernels unavailable, using torch's operations instead" in caplog.text
        assert "no-such-compiler" in caplog.text
        failing = tmp_path / "failing-cc"  # a compiler that runs and fails, as clang does on GCC's builtins
        failing.write_text("#!/bin/sh\necho 'error: unknown builtin' >&2\nexit 1\n")
        failing.chmod(0o755)
        monkeypatch.setenv("CC", str(failing))
        kernels.library.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="llama.kernels"):
            assert kernels.linear_bf16(torch.randn(2, 64), torch.randn(8, 64).bfloat16()) is None
        assert "compiling kernels.c with" in caplog.text and "error: unknown builtin" in caplog.text
        assert [p.name for p in tmp_path.iterdir()] == ["failing-cc"]  # no half-built library left behind
        monkeypatch.delenv("CC")
        kernels.library.cache_clear()
        monkeypatch.setenv("LLAMA_KERNELS", "0")  # off
        assert kernels.decode_attention(q, keys, values, None) is None
    finally:
        kernels.library.cache_clear()


@needs_kernels
@pytest.mark.parametrize("built", BUILDS, ids=build_id, indirect=True)
def test_linear_bf16_matches_float64(built):
    g = torch.Generator().manual_seed(0)
    for rows in range(1, 17):  # 1: in order; 8 and more: groups of up to 7 rows in turn, and what is left
        for n, k in ((64, 2048), (67, 48), (5, 256)):  # 67 and 5: weight rows left over after the groups
            weight = torch.randn(n, k, generator=g).bfloat16()
            x = torch.randn(rows, k, generator=g)
            got = kernels.linear_bf16(x.view(1, rows, k), weight)
            assert got is not None and got.shape == (1, rows, n) and got.dtype == torch.float32
            torch.testing.assert_close(got[0].double(), x.double() @ weight.double().T, rtol=1e-5, atol=1e-4)
    weight, x = torch.randn(8, 64).bfloat16(), torch.randn(3, 64)
    assert kernels.linear_bf16(torch.randn(17, 64), weight) is None  # 17: converted, float32 products
    assert kernels.linear_bf16(x[:, :48], weight[:, :48].contiguous()) is not None
    assert kernels.linear_bf16(x[:, :40], weight[:, :40].contiguous()) is None  # not a multiple of 16
    assert kernels.linear_bf16(x, weight.t().contiguous().t()) is None  # layout
    assert kernels.linear_bf16(x.bfloat16(), weight) is None  # dtype


@needs_kernels
def test_rms_norm_matches_float64():
    """x and weight each float32 or bf16; one row, and enough rows for the threads to share them; the result
    within its dtype's rounding of the float64 norm. With a residual added first (add_rms_norm): the sum exactly
    torch's, rounded to x's dtype, and its norm as above."""
    g = torch.Generator().manual_seed(0)
    for xdt in (torch.float32, torch.bfloat16):
        for wdt in (torch.float32, torch.bfloat16):
            for shape in ((1, 1, 64), (2, 40, 2048)):
                x, y = (torch.randn(shape, generator=g).to(xdt) for _ in range(2))
                w = (torch.rand(shape[-1], generator=g) + 0.5).to(wdt)
                total, after_add = kernels.add_rms_norm(x, y, w, 1e-5)
                assert torch.equal(total, x + y)
                for source, got in ((x, kernels.rms_norm(x, w, 1e-5)), (total, after_add)):
                    assert got.dtype == xdt and got.shape == x.shape
                    x64 = source.double()
                    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
                    tol = 2 ** -8 if xdt == torch.bfloat16 else 1e-6
                    assert ((got.double() - want).abs() <= tol * want.abs() + 1e-6).all(), (xdt, wdt, shape)
    x, w = torch.randn(4, 64), torch.ones(64)
    assert kernels.rms_norm(x[:, :40].contiguous(), w[:40], 1e-5) is None  # not a multiple of 16
    assert kernels.rms_norm(x.t().contiguous().t(), w, 1e-5) is None  # layout
    assert kernels.rms_norm(x.double(), w, 1e-5) is None  # dtype
    assert kernels.add_rms_norm(x, x.t().contiguous().t(), w, 1e-5) is None  # the residual's layout
    assert kernels.add_rms_norm(x, x.bfloat16(), w, 1e-5) is None  # its dtype


@needs_kernels
def test_swiglu_and_rope_match_float64():
    """The gate on the two halves of one product's output, and the rotation of the query and key heads of a
    fused qkv (a view, its tokens strided), in float32 and bf16, for one token and enough for the threads to
    share them, against float64."""
    g = torch.Generator().manual_seed(0)
    tables = precompute_freqs_cis(64, 64)
    for dt in (torch.float32, torch.bfloat16):
        tol = 2 ** -8 if dt == torch.bfloat16 else 1e-6
        for rows in (1, 24):
            gate, up = (torch.randn(2, rows, 2 * 1408, generator=g) * 4).to(dt).chunk(2, dim=-1)
            got = kernels.swiglu(gate, up)
            want = F.silu(gate.double()) * up.double()
            assert got.dtype == dt and got.shape == gate.shape
            assert ((got.double() - want).abs() <= tol * want.abs() + 1e-6).all(), (dt, rows)

            qkv = torch.randn(2, rows, 12, 64, generator=g).to(dt)
            rotations = tables[torch.randint(0, 64, (2, rows), generator=g)].unsqueeze(2)
            x = qkv[:, :, :10]  # queries and keys, not values
            got = kernels.rope(x, rotations)
            z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * rotations.to(torch.complex128)
            want = torch.view_as_real(z).flatten(-2)
            assert got.dtype == dt and got.shape == x.shape
            assert ((got.double() - want).abs() <= tol * want.abs() + 1e-6).all(), (dt, rows)
    gate = torch.randn(3, 64)
    assert kernels.swiglu(gate, torch.randn(3, 128)[:, :64]) is None  # strides differ
    assert kernels.swiglu(gate.t().contiguous().t(), gate.t().contiguous().t()) is None  # columns strided
    assert kernels.swiglu(gate[:, :40], gate[:, :40]) is None  # not a multiple of 16
    assert kernels.swiglu(gate[:, :0], gate[:, :0]) is None  # no columns
    assert kernels.rope(torch.randn(1, 2, 2, 64).transpose(1, 2), tables[:2][None, :, None]) is None  # heads strided
    assert kernels.rope(torch.randn(1, 2, 2, 64), tables[:2][None, :, None].to(torch.complex128)) is None  # dtype


@needs_kernels
@pytest.mark.skipif(not kernels.packs_bf16(), reason="the packed bf16 product needs AVX-512 BF16")
def test_linear_packed_bf16_matches_float64():
    """1 row (its own way), 2-8 rows (one tile), 9-17 and 130 (several passes over each tile, a remainder); 1, 2, 3
    and 7 blocks of 16 columns (tiles of 3 and what is left); K pairs not a multiple of 4 (one row's tail). Where
    the CPU has AMX, K a multiple of 32 runs on it: 1 to 16 rows (one row group, padded), 17 (two), 130 and 300
    (row pairs, K taken in chunks, and 300: two row blocks), odd numbers of column blocks; K = 2 and 66 run on
    AVX-512 BF16 there."""
    g = torch.Generator().manual_seed(0)
    for rows in (*range(1, 18), 130, 300):
        for n, k in ((16, 2), (32, 66), (48, 64), (112, 2048), (16, 5632)):
            weight = torch.randn(n, k, generator=g).bfloat16()
            x = torch.randn(1, rows, k, generator=g).bfloat16()
            got = kernels.linear_packed_bf16(x, kernels.pack_bf16(weight))
            assert got.shape == (1, rows, n) and got.dtype == torch.bfloat16
            want = x.double() @ weight.double().T
            # float32 sums rounded once to bf16: within 2 bf16 steps of the exact result
            assert ((got.double() - want).abs() <= 2 ** -7 * want.abs() + 1e-5 * k).all(), (rows, n, k)
    assert kernels.pack_bf16(torch.randn(24, 64).bfloat16()) is None  # outputs not a multiple of 16
    assert kernels.pack_bf16(torch.randn(16, 63).bfloat16()) is None  # inputs not a multiple of 2
    assert kernels.pack_bf16(torch.randn(16, 64)) is None  # float32
    with pytest.raises(ValueError, match="bf16 rows of 64"):
        kernels.linear_packed_bf16(torch.randn(2, 64), kernels.pack_bf16(torch.randn(16, 64).bfloat16()))


@needs_kernels
@pytest.mark.parametrize("built", BUILDS, ids=build_id, indirect=True)
def test_linear_packed_f32_matches_float64(built):
    """1-3 rows (two blocks of columns at a time, the last alone where their number is odd), 4-6 (one tile),
    7-17 (two or three tiles, the first two prefetching), 96 (one block of rows), 97 (a second block of one row),
    200; 1, 2, 3 and 5 blocks of columns; K from 1 to 5632 (45: steps in whole turns of the loop and left over)."""
    c = kernels.packed_f32_columns()
    g = torch.Generator().manual_seed(0)
    for rows in (*range(1, 18), 96, 97, 200):
        for blocks, k in ((1, 1), (2, 3), (3, 45), (3, 48), (5, 256), (2, 2048), (1, 5632)):
            weight = torch.randn(blocks * c, k, generator=g).bfloat16()
            x = torch.randn(1, rows, k, generator=g)
            got = kernels.linear_packed_f32(x, kernels.pack_f32(weight))
            assert got.shape == (1, rows, blocks * c) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), x.double() @ weight.double().T, rtol=1e-5, atol=1e-5 * k ** 0.5)
    assert kernels.pack_f32(torch.randn(c + 8, 64).bfloat16()) is None  # not whole blocks of columns
    assert kernels.pack_f32(torch.randn(c, 64)) is None  # float32
    with pytest.raises(ValueError, match="float32 rows of 64"):
        kernels.linear_packed_f32(torch.randn(2, 64).bfloat16(), kernels.pack_f32(torch.randn(c, 64).bfloat16()))


@needs_kernels
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_bf16_weights_decode_a_batch_in_float32_through_the_kernel(make_ckpt, monkeypatch, batch):
    """bf16 weights computed in float32 (a CPU without native bf16): a batch of 1, 3 or 16 decodes through
    linear_bf16, every product of the step, and keeps float32's accuracy against the float64 reference on the
    same bf16 weights (the activations are no longer rounded to bf16 for these products; the KV cache is float32
    here, not rounding them either). 16 rows go through in groups of 7, 7 and 2."""
    computed = []
    linear_bf16 = kernels.linear_bf16
    monkeypatch.setattr(kernels, "linear_bf16", lambda *a: computed.append(linear_bf16(*a)) or computed[-1])
    ckpt, state = make_ckpt(WIDE)
    model = build_model(ckpt, state, max_batch_size=batch, dtype=torch.bfloat16)
    model.setup_cache(compute_dtype=torch.float32, cache_dtype=torch.float32)
    bf16_state = {k: v.bfloat16().double() for k, v in state.items()}
    rows = [prompt(9, seed) for seed in range(batch)]
    model.forward(torch.tensor(rows), 0)
    computed.clear()
    for pos in range(9, 12):
        nxt = [pos * (7 + 2 * i) % VOCAB for i in range(batch)]
        got = model.forward(torch.tensor([[t] for t in nxt]), pos)
        for row, t, logits in zip(rows, nxt, got):
            row.append(t)
            want = reference_logits(bf16_state, {**WIDE, "vocab_size": VOCAB}, row)[-1]
            torch.testing.assert_close(logits[0].double(), want, rtol=1e-4, atol=1e-4)
    assert len(computed) == 3 * (7 * WIDE["n_layers"] + 1) and all(out is not None for out in computed)


@needs_kernels
def test_a_shared_cache_keeps_one_library_per_cpu(monkeypatch, tmp_path):
    """-march=native code for one CPU can crash another: a cache directory two machines share (a home directory
    on a cluster) must give each its own build. (Built unoptimised: a second each, not seven.)"""
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(tmp_path))
    flags = tuple("-O0" if f == "-O3" else f for f in kernels.FLAGS)
    kernels.build(flags)
    kernels.build(flags)  # reused
    assert len(list(tmp_path.glob("kernels-*.so"))) == 1
    monkeypatch.setattr(kernels, "cpu_id", lambda: "model name: another CPU\nflags: avx2\n")
    kernels.build(flags)
    assert len(list(tmp_path.glob("kernels-*.so"))) == 2
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith("kernels-")]  # no temporary files left


@needs_kernels
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the x86 instruction sets' builds")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v4", "sapphirerapids"])
def test_kernels_compile_for_each_x86_kind(march, tmp_path):
    """kernels.c holds code for AVX2, AVX-512 and AVX-512 BF16 with AMX, and a machine builds only its own
    (-march=native): each is compiled here, not run, so that a change made on one CPU kind can't break another's
    build unseen (a macro once took the name of a parameter in AVX-512 BF16's code). Unoptimised: a second each."""
    flags = [f"-march={march}" if f == "-march=native" else "-O0" if f == "-O3" else f for f in kernels.FLAGS]
    cc = os.environ.get("CC", "cc")
    done = subprocess.run([cc, *flags, "-o", str(tmp_path / "kernels.so"), str(kernels.SOURCE), "-lm"],
                          capture_output=True, text=True)
    if done.returncode and f"-march={march}" in done.stderr and "bad value" in done.stderr:
        pytest.skip(f"{cc} does not know -march={march}")
    assert done.returncode == 0, done.stderr
