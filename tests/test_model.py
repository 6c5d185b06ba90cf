"""The model's logits against the independent float64 computation in reference.py."""

import pytest
import torch

from llama import ModelArgs, Transformer
from llama.checkpoint import read_params

from conftest import CODE, GQA, MHA, VOCAB
from reference import logits as reference_logits


def build_model(ckpt_dir, state, max_batch_size=4, max_seq_len=64, dtype=torch.float32) -> Transformer:
    args = ModelArgs.from_params({**read_params(ckpt_dir), "vocab_size": VOCAB, "max_batch_size": max_batch_size,
                                  "max_seq_len": max_seq_len})
    model = Transformer(args)
    weights = {k: v.to(dtype, copy=True) for k, v in state.items() if k != "rope.freqs"}  # edits stay its own
    model.load_state_dict(weights, strict=True, assign=True)
    model.setup_cache()
    return model


def prompt(n, seed=0):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("params", [MHA, GQA, CODE], ids=["mha", "gqa", "rope_theta_1e6"])
def test_logits_match_float64_reference(make_ckpt, params):
    ckpt, state = make_ckpt(params)
    model = build_model(ckpt, state)
    rows = [prompt(24, seed) for seed in range(2)]
    got = model.forward(torch.tensor(rows), 0)
    assert got.dtype == torch.float32 and got.shape == (2, 24, VOCAB)
    for row, tokens in zip(got, rows):
        want = reference_logits(state, {**params, "vocab_size": VOCAB}, tokens)
        torch.testing.assert_close(row.double(), want, rtol=1e-4, atol=1e-4)


def test_logits_do_not_depend_on_torch_default_dtype(make_ckpt, default_dtype_guard):
    """Research code sets torch's default dtype (Meta's scripts set a default tensor type) and then calls the
    model: what the model allocates for itself keeps its own dtype. head_dim 64: a prompt's attention runs in
    kernels.c's prefill_attention, whose buffers once took the default (float64: wrong logits; bf16: a heap
    overrun)."""
    params = {"dim": 128, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 32, "norm_eps": 1e-5,
              "vocab_size": -1}
    ckpt, state = make_ckpt(params)
    model = build_model(ckpt, state)
    tokens = prompt(20)
    want = reference_logits(state, {**params, "vocab_size": VOCAB}, tokens)
    torch.set_default_dtype(torch.float64)
    try:
        got = model.forward(torch.tensor([tokens]), 0)[0]
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_hidden_dim_matches_meta_shapes():
    # Llama 2 7B, 13B, 70B and Code Llama 34B: the SwiGLU widths of Meta's released weights.
    assert ModelArgs(dim=4096, multiple_of=256).hidden_dim == 11008
    assert ModelArgs(dim=5120, multiple_of=256).hidden_dim == 13824
    assert ModelArgs(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3).hidden_dim == 28672
    assert ModelArgs(dim=8192, multiple_of=256, ffn_dim_multiplier=1.0).hidden_dim == 22016


def test_bfloat16_model_close_to_reference(make_ckpt):
    ckpt, state = make_ckpt(GQA)
    model = build_model(ckpt, state, dtype=torch.bfloat16)
    tokens = prompt(16)
    got = model.forward(torch.tensor([tokens]), 0)[0]
    want = reference_logits(state, {**GQA, "vocab_size": VOCAB}, tokens)
    assert got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: compare at that precision, and the top token where it is clear.
    assert (got.double() - want).abs().max() < 0.05 * want.abs().max()


def test_bfloat16_compute_on_float32_weights_with_a_hook_close_to_reference(make_ckpt):
    """setup_cache(compute_dtype=bf16) on float32 weights, and a hook on a block (the blocks and norms then run
    as Meta's, a norm's output as wide as its weight): the attention mask follows the queries' dtype."""
    ckpt, state = make_ckpt(GQA)
    model = build_model(ckpt, state)
    model.setup_cache(compute_dtype=torch.bfloat16)
    model.layers[0].register_forward_hook(lambda *args: None)
    tokens = prompt(16)
    got = torch.cat([model.forward(torch.tensor([tokens[:8]]), 0)] +
                    [model.forward(torch.tensor([tokens[i:i + 1]]), i) for i in range(8, 16)], dim=1)[0]
    want = reference_logits(state, {**GQA, "vocab_size": VOCAB}, tokens)
    assert (got.double() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("aten_gemv", [True, False], ids=["aten_gemv", "onednn_gemv"])
def test_bfloat16_decoding_one_row_close_to_reference(make_ckpt, monkeypatch, aten_gemv):
    """One sequence decoded a token at a time in bf16 runs its products as matrix-vector ones, with or without
    oneDNN (llama.linear.ATEN_BF16_GEMV, by CPU kind): both agree with the reference, and oneDNN is left as it was."""
    import llama.linear
    monkeypatch.setattr(llama.linear, "ATEN_BF16_GEMV", aten_gemv)
    ckpt, state = make_ckpt(GQA)
    model = build_model(ckpt, state, dtype=torch.bfloat16)
    tokens = prompt(12)
    model.forward(torch.tensor([tokens[:8]]), 0)
    got = torch.cat([model.forward(torch.tensor([[t]]), i) for i, t in enumerate(tokens[8:], 8)], dim=1)[0]
    want = reference_logits(state, {**GQA, "vocab_size": VOCAB}, tokens)[8:]
    assert (got.double() - want).abs().max() < 0.05 * want.abs().max()
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("params", [MHA, GQA], ids=["mha", "gqa"])
def test_incremental_decoding_equals_full_forward(make_ckpt, params):
    ckpt, state = make_ckpt(params)
    model = build_model(ckpt, state)
    tokens = torch.tensor([prompt(20, 1), prompt(20, 2)])
    full = model.forward(tokens, 0)
    # Prefill 8 tokens, then 3, then one at a time, through the KV cache.
    parts = [model.forward(tokens[:, :8], 0), model.forward(tokens[:, 8:11], 8)]
    parts += [model.forward(tokens[:, i:i + 1], i) for i in range(11, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("params", [MHA, GQA], ids=["mha", "gqa"])
def test_last_position_only_matches_reference(make_ckpt, params):
    """forward(last_only=True) runs its last block for the last position alone (that query attends, wo and the
    feed-forward take one row) yet caches every position's keys and values: its logits, and the step decoded
    after it, match the reference, for prompts on their own (causal, no mask) and beside a left-padded one
    (masked)."""
    ckpt, state = make_ckpt(params)
    model = build_model(ckpt, state)
    p = {**params, "vocab_size": VOCAB}
    for rows, pad in (([prompt(24, 6), prompt(24, 7)], None), ([prompt(5, 3), prompt(12, 4)], [7, 0])):
        end = max(map(len, rows))
        tokens = torch.tensor([[0] * (end - len(r)) + r for r in rows])
        left_pad = torch.tensor(pad) if pad else None
        got = model.forward(tokens, 0, left_pad=left_pad, last_only=True)
        step = model.forward(torch.tensor([[11], [13]]), end, left_pad=left_pad, last_only=True)
        assert got.shape == step.shape == (2, 1, VOCAB)
        for i, (row, nxt) in enumerate(zip(rows, (11, 13))):
            want = reference_logits(state, p, row + [nxt])
            torch.testing.assert_close(got[i, 0].double(), want[-2], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(step[i, 0].double(), want[-1], rtol=1e-4, atol=1e-4)


def test_left_padded_rows_equal_unpadded(make_ckpt):
    ckpt, state = make_ckpt(GQA)
    model = build_model(ckpt, state)
    short, long = prompt(5, 3), prompt(12, 4)
    padded = torch.tensor([[0] * 7 + short, long])
    got = model.forward(padded, 0, left_pad=torch.tensor([7, 0]))
    want_short = reference_logits(state, {**GQA, "vocab_size": VOCAB}, short)
    torch.testing.assert_close(got[0, 7:].double(), want_short, rtol=1e-4, atol=1e-4)
    # Decoding one more token for both rows keeps the short row's positions right.
    nxt = torch.tensor([[11], [13]])
    step = model.forward(nxt, 12, left_pad=torch.tensor([7, 0]))
    want = reference_logits(state, {**GQA, "vocab_size": VOCAB}, short + [11])[-1]
    torch.testing.assert_close(step[0, 0].double(), want, rtol=1e-4, atol=1e-4)


def test_prompt_prefilled_after_its_padding_equals_unpadded(make_ckpt):
    """A row prefilled from start_pos with left_pad == start_pos (how Llama.generate prefills the shorter
    prompts of a ragged batch) is a prompt of its own: its attention must read its own keys only, causally, not
    the padding's cache positions, which hold another prompt's keys here, as a reused cache does."""
    ckpt, state = make_ckpt(GQA)
    model = build_model(ckpt, state)
    short, long, stale = prompt(5, 3), prompt(12, 4), prompt(12, 5)
    model.forward(torch.tensor([stale, long]), 0)
    got = model.forward(torch.tensor([short]), 7, left_pad=torch.tensor([7]), first_row=0)
    want_short = reference_logits(state, {**GQA, "vocab_size": VOCAB}, short)
    torch.testing.assert_close(got[0].double(), want_short, rtol=1e-4, atol=1e-4)
    step = model.forward(torch.tensor([[11], [13]]), 12, left_pad=torch.tensor([7, 0]))
    for row, tokens in zip(step, (short + [11], long + [13])):
        want = reference_logits(state, {**GQA, "vocab_size": VOCAB}, tokens)[-1]
        torch.testing.assert_close(row[0].double(), want, rtol=1e-4, atol=1e-4)


def test_fused_weights_match_reference_and_follow_edits(make_ckpt):
    """wq/wk/wv and w1/w3 as one product each (as on a GPU): the same logits, the same state_dict, and weights
    edited in place or replaced afterwards are the ones used."""
    ckpt, state = make_ckpt(GQA)
    model = build_model(ckpt, state)
    model.fuse_weights()
    weights = {k: v for k, v in state.items() if k != "rope.freqs"}
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    attention = model.layers[0].attention
    assert attention.wk.weight.data_ptr() == attention.wqkv.weight.data_ptr() + attention.wq.weight.nbytes
    tokens = prompt(16)

    def check(state):
        got = model.forward(torch.tensor([tokens]), 0)[0]
        torch.testing.assert_close(got.double(), reference_logits(state, {**GQA, "vocab_size": VOCAB}, tokens),
                                   rtol=1e-4, atol=1e-4)
    check(state)
    edited = {**weights, "layers.0.attention.wk.weight": -weights["layers.0.attention.wk.weight"],
              "layers.1.feed_forward.w3.weight": 2 * weights["layers.1.feed_forward.w3.weight"]}
    model.load_state_dict(edited)  # in place: into the fused tensors
    assert attention.wk.weight.data_ptr() == attention.wqkv.weight.data_ptr() + attention.wq.weight.nbytes
    check(edited)
    replaced = {**edited, "layers.1.feed_forward.w1.weight": weights["layers.1.feed_forward.w1.weight"] / 2}
    model.load_state_dict({k: v.clone() for k, v in replaced.items()}, assign=True)  # new tensors: computed alone
    check(replaced)


def test_cache_overflow_is_a_clear_error(make_ckpt):
    ckpt, state = make_ckpt(MHA)
    model = build_model(ckpt, state, max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.forward(torch.tensor([prompt(17)]), 0)
    with pytest.raises(ValueError, match="max_batch_size"):
        model.forward(torch.tensor([prompt(4)] * 3), 0)


def test_bad_forward_arguments_are_clear_errors(make_ckpt):
    ckpt, state = make_ckpt(MHA)
    model = build_model(ckpt, state, max_batch_size=2, max_seq_len=16)
    for tokens, start_pos, said in (
            (torch.tensor(prompt(4)), 0, r"\(batch, seqlen\) tensor of token ids, got a tensor of shape \(4,\)"),
            (torch.tensor([prompt(4)]).float(), 0, "tensor of token ids, got .*torch.float32"),
            ([prompt(4)], 0, "tensor of token ids, got list"),
            (torch.tensor([prompt(4)]), -1, "start_pos must be >= 0, got -1"),
            (torch.tensor([prompt(4)]), 1.5, "start_pos must be an integer"),
            (torch.tensor([[1, VOCAB]]), 0, rf"token ids must be in \[0, {VOCAB}\), got 1..{VOCAB}"),
            (torch.tensor([[-1, 2]]), 0, "token ids must be in")):
        with pytest.raises(ValueError, match=said):
            model.forward(tokens, start_pos)
    assert torch.isfinite(model.forward(torch.tensor([prompt(4)]), torch.tensor(0))).all()  # a 0-dim tensor: as an int
    two = torch.tensor([prompt(4)] * 2)
    for kwargs, said in (
            ({"left_pad": [0, 1]}, r"left_pad must be a tensor of 2 integers >= 0 on cpu .*got list"),
            ({"left_pad": torch.tensor([0, 1, 2])}, r"left_pad must be .*got a tensor of shape \(3,\)"),
            ({"left_pad": torch.tensor([0.0, 1.0])}, "left_pad must be .*torch.float32"),
            ({"left_pad": torch.tensor([0, -1])}, "left_pad must be a tensor of 2 integers >= 0"),
            ({"first_row": -2}, "first_row must be an integer >= 0"),
            ({"first_row": 1.0}, "first_row must be an integer >= 0"),
            ({"first_row": 1}, r"cache rows up to 3 x positions up to 4 exceed the KV cache \(2 x 16\)")):
        with pytest.raises(ValueError, match=said):
            model.forward(two, 0, **kwargs)
    for empty in (torch.zeros((1, 0), dtype=torch.long), torch.zeros((0, 3), dtype=torch.long)):
        with pytest.raises(ValueError, match="tokens must hold at least one row and one position"):
            model.forward(empty, 0)
    for size in ({"max_batch_size": 0}, {"max_seq_len": -4}, {"max_seq_len": 2.0}):
        with pytest.raises(ValueError, match=f"setup_cache: {next(iter(size))} must be an integer >= 1"):
            model.setup_cache(**size)


@pytest.mark.parametrize("change, said", [
    ({"vocab_size": -1}, "vocab_size must be a positive integer, got -1 .*tokenizer.n_words"),
    ({"n_heads": 5}, r"dim \(64\) must be n_heads \(5\) times an even head dimension"),
    ({"n_kv_heads": 3}, r"n_kv_heads \(3\) must divide n_heads \(4\)"),
    ({"n_kv_heads": 2.0}, r"n_kv_heads must be an integer >= 1 \(or None: n_heads\), got 2.0"),
    ({"n_kv_heads": 0}, r"n_kv_heads must be an integer >= 1 \(or None: n_heads\), got 0"),
    ({"dim": 0}, "dim must be an integer >= 1, got 0"),
    ({"n_layers": 0}, "n_layers must be an integer >= 1, got 0"),
    ({"max_seq_len": 2.5}, "max_seq_len must be an integer"),
])
def test_model_args_that_cannot_make_a_model_are_refused(change, said):
    with pytest.raises(ValueError, match=said):
        Transformer(ModelArgs(**{**MHA, "vocab_size": VOCAB, **change}))


def test_the_cache_follows_weights_converted_after_loading(make_ckpt):
    """Weights converted after the first forward (``model.double()``, as research code does for exact logits):
    the next forward computes in their dtype, as Meta's cache follows its activations, with what the cache held
    kept. The logits (float32, as Meta's) then match the reference on the same (bf16-rounded) weights to their
    own rounding: float32 weights miss by 6.8e-7 of the largest, bf16 ones by 1e-2."""
    ckpt, state = make_ckpt(GQA)
    model = build_model(ckpt, state, dtype=torch.bfloat16)
    tokens = prompt(12)
    model.forward(torch.tensor([tokens[:8]]), 0)
    held = model.layers[1].attention.cache_k[0, :8].clone()
    model.double()
    logits = model.forward(torch.tensor([tokens[8:9]]), 8)  # after the 8 positions computed in bf16
    attention = model.layers[1].attention
    assert model.compute_dtype == attention.cache_k.dtype == torch.float64 and logits.dtype == torch.float32
    assert torch.equal(attention.cache_k[0, :8], held.double())
    rounded = {k: v.bfloat16().double() for k, v in state.items()}
    want = reference_logits(rounded, {**GQA, "vocab_size": VOCAB}, tokens)
    got = model.forward(torch.tensor([tokens]), 0)[0]
    assert (got.double() - want).abs().max() < 2e-7 * want.abs().max()


def test_unknown_params_keys_are_ignored_with_a_warning(caplog):
    args = ModelArgs.from_params({**MHA, "future_key": 1})
    assert args.dim == MHA["dim"]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "params.json: ignoring unknown keys ['future_key']")]


@pytest.mark.parametrize("fused", [False, True], ids=["as_loaded", "fused"])
def test_forward_train_matches_reference_and_has_gradients(make_ckpt, fused):
    """Also with wq/wk/wv and w1/w3 fused into one tensor each (as on a GPU): their weights, views of it, still
    ask for gradients and get them."""
    ckpt, state = make_ckpt(GQA)
    args = ModelArgs.from_params({**read_params(ckpt), "vocab_size": VOCAB})
    model = Transformer(args)
    model.load_state_dict({k: v.clone().requires_grad_() for k, v in state.items() if k != "rope.freqs"},
                          strict=True, assign=True)
    if fused:
        model.fuse_weights()
    tokens = prompt(12)
    logits = model.forward_train(torch.tensor([tokens]))
    torch.testing.assert_close(logits[0].double(), reference_logits(state, {**GQA, "vocab_size": VOCAB}, tokens),
                               rtol=1e-4, atol=1e-4)
    logits.logsumexp(-1).mean().backward()
    attention, ff = model.layers[0].attention, model.layers[0].feed_forward
    assert all(m.weight.grad is not None for m in (attention.wq, attention.wk, attention.wv, ff.w1, ff.w3))
