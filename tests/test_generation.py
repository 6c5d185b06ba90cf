"""Llama.build / generate / text_completion / chat_completion against the float64 reference."""

import logging

import pytest
import torch

from llama import Llama
from llama.chat import UNSAFE_ERROR

from conftest import CODE, GQA, MHA, VOCAB
from graph_replay import cpu_llama
from reference import greedy
from reference import logits as reference_logits


@pytest.fixture(scope="module", params=["eager", "graphs"])
def gqa(request, make_ckpt, tokenizer_path):
    """A generator and its weights; decoding eagerly, or from CUDA graphs as on a GPU (here graph_replay's)."""
    ckpt, state = make_ckpt(GQA)
    return cpu_llama(ckpt, tokenizer_path, 64, 4, graphs=request.param == "graphs"), state


PARAMS = {**GQA, "vocab_size": VOCAB}


def test_build_does_not_change_torch_defaults(make_ckpt, tokenizer_path):
    ckpt, _ = make_ckpt(MHA)
    Llama.build(ckpt, tokenizer_path, max_seq_len=32, max_batch_size=2, dtype="bfloat16")
    assert torch.get_default_dtype() == torch.float32
    assert torch.empty(1).dtype == torch.float32 and torch.empty(1).device.type == "cpu"


def test_default_dtype_is_picked_for_the_machine(make_ckpt, tokenizer_path, caplog):
    from llama.machine import cpu_has_native_bf16
    ckpt, _ = make_ckpt(MHA)
    with caplog.at_level(logging.INFO, logger="llama"):
        g = Llama.build(ckpt, tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu")
    x86 = torch.backends.cpu.get_cpu_capability().startswith("AVX")
    assert g.model.output.weight.dtype == (torch.bfloat16 if x86 else torch.float32)
    # Without native bf16, products are float32 (bf16 matrix products are emulated there); the KV cache is the
    # weights' dtype, as it is read, not multiplied as a matrix.
    want = torch.bfloat16 if x86 and cpu_has_native_bf16() else torch.float32
    assert g.model.compute_dtype == want
    assert g.model.layers[0].attention.cache_k.dtype == g.model.output.weight.dtype == g.model.cache_dtype
    assert f"computing in {str(want).removeprefix('torch.')}" in caplog.text
    assert ("KV cache in bfloat16" in caplog.text) == (g.model.cache_dtype != want)  # said where it differs


@pytest.mark.parametrize("native", [True, False], ids=["ampere_on", "t4_v100"])
def test_default_dtype_on_a_gpu_is_bf16_only_where_it_computes_in_it(monkeypatch, native):
    """A T4 or V100 can hold bf16 tensors (torch.cuda.is_bf16_supported() says True there by default), but its
    bf16 arithmetic is emulated: float16 there."""
    from llama.machine import pick_dtype
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert pick_dtype(None, torch.device("cuda")) == (torch.bfloat16 if native else torch.float16)


@pytest.mark.parametrize("convert_bytes", [8 << 20, 1000], ids=["whole_weight", "blocks_of_a_few_rows"])
def test_bf16_weights_with_float32_compute_match_reference(make_ckpt, tokenizer_path, monkeypatch, convert_bytes):
    import llama.linear
    monkeypatch.setattr(llama.linear, "CONVERT_BYTES", convert_bytes)  # a weight converted in one block or many
    ckpt, state = make_ckpt(GQA)
    g = Llama.build(ckpt, tokenizer_path, 64, 4, device="cpu", dtype="bfloat16")
    # The CPU-without-native-bf16 path, on any machine; the KV cache float32, not rounding what is compared
    g.model.setup_cache(compute_dtype=torch.float32, cache_dtype=torch.float32)
    prompt = g.tokenizer.encode("The quick brown fox jumps over", bos=True, eos=False)
    # Wide products (the prompt) convert the bf16 weights; narrow ones (one token) run in bf16.
    logits = g.model.forward(torch.tensor([prompt]), 0)[0].double()
    want = reference_logits(state, PARAMS, prompt)  # the checkpoint's bf16 weights, in float64
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    step = g.model.forward(torch.tensor([[prompt[-1]]]), len(prompt) - 1)[0, 0].double()
    assert (step - want[-1]).abs().max() < 0.02 * want[-1].abs().max()  # activations rounded to bf16 there
    tokens, _ = g.generate([prompt], max_gen_len=1, temperature=0)  # from the prompt's float32 logits
    assert tokens[0] == greedy(state, PARAMS, prompt, 1, stop=g.tokenizer.eos_id)


def test_greedy_tokens_match_reference(gqa):
    g, state = gqa
    prompt = g.tokenizer.encode("The quick brown fox", bos=True, eos=False)
    tokens, _ = g.generate([prompt], max_gen_len=1, temperature=0)  # from the prompt's float32 logits
    assert tokens[0] == greedy(state, PARAMS, prompt, 1, stop=g.tokenizer.eos_id)


def test_prompts_as_numpy_integers_tensors_and_arrays_generate_as_lists(gqa):
    """Meta's generate takes whatever torch.tensor does as a prompt."""
    np = pytest.importorskip("numpy")
    g, _ = gqa
    prompt = g.tokenizer.encode("The quick brown fox", bos=True, eos=False)
    want = g.generate([prompt], max_gen_len=4, temperature=0)
    for given in ([np.int64(t) for t in prompt], torch.tensor(prompt), np.array(prompt)):
        assert g.generate([given], max_gen_len=np.int64(4), temperature=np.float32(0)) == want


def test_ragged_batch_equals_each_prompt_alone(gqa):
    g, _ = gqa
    texts = ["Hi", "A much longer prompt that spans quite a few more tokens than the others", "Once upon a time"]
    prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in texts]
    batch, _ = g.generate(prompts, max_gen_len=8, temperature=0)
    for p, row in zip(prompts, batch):
        alone, _ = g.generate([p], max_gen_len=8, temperature=0)
        assert row == alone[0]
        assert len(row) == 8  # a random model emitting EOS this early would make the test vacuous
    assert g.decoder is None or {rows for rows, _ in g.decoder.graphs} == {1, 3}  # the steps were replays


def test_more_prompts_than_max_batch_size_go_in_turns(gqa):
    """Seven prompts on a cache of four rows (Meta's code fails an assert): two batches, in the caller's order,
    each row the tokens and log-probabilities of its prompt alone, its first token the reference's."""
    g, state = gqa
    texts = ["Hi", "Once upon a time", "A much longer prompt than the others, by a good few tokens", "x",
             "The quick brown fox", "one two", "Hello there, friend"]
    prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in texts]
    tokens, probs = g.generate(prompts, max_gen_len=5, temperature=0, logprobs=True)
    assert len(tokens) == len(probs) == len(texts)
    for p, row, row_probs in zip(prompts, tokens, probs):
        alone, alone_probs = g.generate([p], max_gen_len=5, temperature=0, logprobs=True)
        assert row == alone[0] and len(row) == 5
        torch.testing.assert_close(torch.tensor(row_probs), torch.tensor(alone_probs[0]))
        assert row[:1] == greedy(state, PARAMS, p, 1, stop=g.tokenizer.eos_id)
    answers = g.text_completion(texts, max_gen_len=3, temperature=0)
    assert [a["generation"] for a in answers] == [g.tokenizer.decode(row[:3]) for row in tokens]
    dialogs = [[{"role": "user", "content": t}] for t in texts[:6]]
    assert len(g.chat_completion(dialogs, max_gen_len=2, temperature=0)) == 6


def test_each_prompt_gets_its_own_room_within_max_seq_len(gqa):
    """As in Meta's code, a prompt gets min(max_gen_len, max_seq_len - its length) tokens, whatever else is in its
    batch: rows end at one position, so a short prompt beside a long one reaches the cache's end first, and is
    continued after it. Each row the reference's greedy tokens, as many as its room; with echo and logprobs too;
    and max_gen_len=None leaves each prompt all of max_seq_len, as Meta's default (max_seq_len - 1) does."""
    g, state = gqa
    max_seq_len = g.model.params.max_seq_len
    prompts = [[1] + [(37 * i) % (VOCAB - 3) + 3 for i in range(n)] for n in (max_seq_len - 12, 1, 30, 20)]
    tokens, _ = g.generate(prompts, max_gen_len=30, temperature=0, stop_tokens=[])
    rooms = [min(30, max_seq_len - len(p)) for p in prompts]
    assert [len(t) for t in tokens] == rooms == [11, 30, 30, 30]
    for p, row, room in zip(prompts, tokens, rooms):
        assert row == greedy(state, PARAMS, p, room)
    echoed, probs = g.generate(prompts, max_gen_len=30, temperature=0, stop_tokens=[], logprobs=True, echo=True)
    assert echoed == [p + t for p, t in zip(prompts, tokens)]
    for row, lps in zip(echoed, probs):
        want = torch.log_softmax(reference_logits(state, PARAMS, row), dim=-1)
        assert lps == pytest.approx([0.0] + [float(want[i - 1, row[i]]) for i in range(1, len(row))], abs=1e-3)
    texts = ["Hi", "A prompt long enough to take most of the cache's positions, one word after another " * 2]
    answers = g.text_completion(texts, max_gen_len=None, temperature=0, logprobs=True)
    for text, answer in zip(texts, answers):
        prompt = g.tokenizer.encode(text, bos=True, eos=False)
        want = greedy(state, PARAMS, prompt, max_seq_len - len(prompt), stop=g.tokenizer.eos_id)
        assert [g.tokenizer.token_names([t])[0] for t in want] == answer["tokens"]
    assert len(answers[0]["tokens"]) > max_seq_len - len(g.tokenizer.encode(texts[1], bos=True, eos=False))


def test_each_row_stops_at_its_own_eos(gqa):
    g, state = gqa
    prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in ["one", "two three"]]
    # Make the first row's 3rd greedy token the stop token: the reference says which token that is.
    target = greedy(state, PARAMS, prompts[0], 3)
    g.tokenizer.eos_id, saved = target[2], g.tokenizer.eos_id
    try:
        tokens, _ = g.generate(prompts, max_gen_len=6, temperature=0)
    finally:
        g.tokenizer.eos_id = saved
    assert tokens[0] == target[:2]
    assert tokens[1] == greedy(state, PARAMS, prompts[1], 6, stop=target[2])
    # The same stop token given to generate, the tokenizer's left alone; one id alone, or by Meta's codellama's
    # stop_token, positional there as stop_tokens is here.
    assert g.generate(prompts, max_gen_len=6, temperature=0, stop_tokens=[target[2]])[0] == tokens
    assert g.generate(prompts, 6, 0, 0.9, False, False, target[2])[0] == tokens
    assert g.generate(prompts, 6, temperature=0, stop_token=target[2])[0] == tokens


def test_logprobs_and_echo(gqa):
    g, state = gqa
    prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in ["Hello world", "Rain falls on the hills"]]
    for temperature in (1.5, 0):  # sampled too: the model's log-probabilities of the tokens, as Meta's, untempered
        tokens, logprobs = g.generate(prompts, max_gen_len=5, temperature=temperature, logprobs=True, echo=True)
        for p, toks, lps in zip(prompts, tokens, logprobs):
            assert toks[:len(p)] == p and len(lps) == len(toks)
            assert len(toks) == len(p) + 5 if temperature == 0 else len(p) < len(toks) <= len(p) + 5  # a draw may stop
            want = torch.log_softmax(reference_logits(state, PARAMS, toks), dim=-1)
            expected = [0.0] + [float(want[i - 1, toks[i]]) for i in range(1, len(toks))]
            assert lps == pytest.approx(expected, abs=1e-3)
    # Without echo: only the new tokens, with the same log-probabilities.
    new, new_lps = g.generate(prompts, max_gen_len=5, temperature=0, logprobs=True)
    assert new[0] == tokens[0][len(prompts[0]):]
    assert new_lps[0] == pytest.approx(logprobs[0][len(prompts[0]):], abs=1e-4)
    # No new token, as Meta's allows for scoring: the prompts and their log-probabilities alone.
    scored, scored_lps = g.generate(prompts, max_gen_len=0, logprobs=True, echo=True)
    assert scored == prompts and [len(lp) for lp in scored_lps] == [len(p) for p in prompts]
    for lps, full in zip(scored_lps, logprobs):
        assert lps == pytest.approx(full[:len(lps)], abs=1e-4)


def test_float64_weights_compute_the_reference_to_its_precision(make_ckpt, tokenizer_path):
    """dtype=torch.float64, for research code that compares against exact arithmetic: the logits (float32, as
    Meta's forward returns them) within their own rounding of the reference; float32 weights miss by 8x that."""
    ckpt, state = make_ckpt(GQA)
    g = Llama.build(ckpt, tokenizer_path, 32, 1, dtype=torch.float64)
    prompt = g.tokenizer.encode("Exact to the last bits", bos=True, eos=False)
    got = g.model.forward(torch.tensor([prompt]), 0)[0]
    want = reference_logits(state, PARAMS, prompt)
    assert g.model.compute_dtype == torch.float64 and (got - want).abs().max() < 2e-7 * want.abs().max()


def test_a_prompt_that_fills_max_seq_len_is_scored_with_echo_and_refused_without(gqa):
    """Meta's returned an empty generation for it; with echo and logprobs it is how a whole window is scored."""
    g, state = gqa
    full = [1] + [(37 * i) % (VOCAB - 3) + 3 for i in range(g.model.params.max_seq_len - 1)]
    with pytest.raises(ValueError, match="prompt 0 has 64 tokens, which leave no room for a new one within "
                                         "max_seq_len 64"):
        g.generate([full], max_gen_len=4)
    tokens, logprobs = g.generate([full], max_gen_len=4, logprobs=True, echo=True)
    want = torch.log_softmax(reference_logits(state, PARAMS, full), dim=-1)
    assert tokens == [full]
    assert logprobs[0] == pytest.approx([0.0] + [float(want[i - 1, full[i]]) for i in range(1, len(full))], abs=1e-3)


def test_text_completion_shapes(gqa):
    g, _ = gqa
    out = g.text_completion(["Hello", "Goodbye"], max_gen_len=4, temperature=0)
    assert [set(o) for o in out] == [{"generation"}] * 2 and all(isinstance(o["generation"], str) for o in out)
    out = g.text_completion(["Hello"], max_gen_len=4, temperature=0, logprobs=True, echo=True)
    assert set(out[0]) == {"generation", "tokens", "logprobs"}
    assert out[0]["generation"].startswith("Hello")
    assert len(out[0]["tokens"]) == len(out[0]["logprobs"]) and out[0]["tokens"][1] == "Hello"


def test_same_seed_same_sample(make_ckpt, tokenizer_path):
    ckpt, _ = make_ckpt(GQA)
    runs = [Llama.build(ckpt, tokenizer_path, 64, 2, seed=seed, dtype="float32")
            .text_completion(["Tell me"], temperature=1.0, top_p=0.95, max_gen_len=12)[0]["generation"]
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def encode_plain(g, text, bos=True, eos=False):
    ids = g.tokenizer.sp_model.encode(text)
    return ([g.tokenizer.bos_id] if bos else []) + ids + ([g.tokenizer.eos_id] if eos else [])


INST, END_INST = [518, 25580, 29962], [518, 29914, 25580, 29962]  # "[INST]", "[/INST]" in Llama 2's vocabulary


def test_chat_prompt_tokens(gqa):
    f = gqa[0].formatter
    g = gqa[0]
    single = f.encode_dialog([{"role": "user", "content": "  hi  "}])
    assert single == [1] + INST + g.tokenizer.sp_model.encode("hi") + END_INST
    with_system = f.encode_dialog([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hello there"}])
    assert with_system == encode_plain(g, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello there [/INST]")
    multi = f.encode_dialog([{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                             {"role": "assistant", "content": " A1 "}, {"role": "user", "content": "Q2 "}])
    assert multi == (encode_plain(g, "[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST] A1 ", eos=True)
                     + encode_plain(g, "[INST] Q2 [/INST]"))
    assert multi[:1] == [1] and multi[1:4] == INST and multi.count(2) == 1


def test_chat_unsafe_dialog_gets_error_and_no_generation(gqa, monkeypatch):
    g, _ = gqa
    seen = []
    original = g._generate
    monkeypatch.setattr(g, "_generate",
                        lambda prompts, *a, **k: seen.append(len(prompts)) or original(prompts, *a, **k))
    dialogs = [[{"role": "user", "content": "What is [INST] this?"}], [{"role": "user", "content": "Hi"}],
               [{"role": "system", "content": "<<SYS>> x"}, {"role": "user", "content": "Yo"}]]
    out = g.chat_completion(dialogs, max_gen_len=3, temperature=0)
    assert out[0]["generation"] == {"role": "assistant", "content": UNSAFE_ERROR}
    assert out[2]["generation"]["content"] == UNSAFE_ERROR
    assert out[1]["generation"]["role"] == "assistant" and out[1]["generation"]["content"] != UNSAFE_ERROR
    assert seen == [1]
    alone = g.chat_completion([dialogs[1]], max_gen_len=3, temperature=0)
    assert alone[0] == out[1]
    g.chat_completion([dialogs[0]], max_gen_len=3)  # all unsafe: nothing generated at all
    assert seen == [1, 1]


def test_chat_logprobs(gqa):
    g, _ = gqa
    out = g.chat_completion([[{"role": "user", "content": "Hi"}]], max_gen_len=3, temperature=0, logprobs=True)
    assert len(out[0]["tokens"]) == len(out[0]["logprobs"]) == 3


@pytest.mark.parametrize("call, match", [
    (lambda g: g.text_completion([]), "no prompts"),
    (lambda g: g.text_completion(["word " * 80]), "max_seq_len 64"),
    (lambda g: g.text_completion(["a"], temperature=-0.1), "temperature"),
    (lambda g: g.text_completion(["a"], temperature=float("nan")), "temperature"),
    (lambda g: g.text_completion(["a"], top_p=float("nan")), "top_p"),
    (lambda g: g.text_completion(["a"], top_p=-0.1), "top_p"),
    (lambda g: g.text_completion(["a"], top_p=1.5), "top_p"),
    (lambda g: g.text_completion(["a"], max_gen_len=-1), "max_gen_len"),
    (lambda g: g.text_completion([3]), "list of strings"),
    (lambda g: g.text_completion("abc"), "list of strings"),
    (lambda g: g.generate([[]], 4), "prompt 0 is empty"),
    (lambda g: g.generate([[1, VOCAB]], 4), "token ids"),
    (lambda g: g.generate([[1, 2]], 4, stop_tokens=[VOCAB]), "stop_tokens"),
    (lambda g: g.generate([[1, 2]], 4, stop_tokens=VOCAB), "stop_tokens"),
    (lambda g: g.generate([[1, 2]], 4, stop_tokens=[2], stop_token=2), "stop_tokens or stop_token"),
    (lambda g: g.chat_completion([[{"role": "assistant", "content": "x"}]]), "roles must be"),
    (lambda g: g.chat_completion([[{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]]),
     "roles must be"),
    (lambda g: g.chat_completion([[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]]),
     "ending with 'user'"),
    (lambda g: g.chat_completion([[{"role": "system", "content": "x"}]]), "followed by a user"),
    (lambda g: g.chat_completion([[]]), "non-empty list"),
    (lambda g: g.chat_completion([[{"role": "user", "content": 5}]]), "str 'content'"),
    (lambda g: g.chat_completion([]), "no dialogs given"),
    (lambda g: g.chat_completion([[{"role": "user", "content": "[INST] x"}], [{"role": "user", "content": "y"}],
                                  [{"role": "user", "content": "many words " * 30}]]), "dialog 2 has"),
    (lambda g: g.chat_completion([[{"role": "system", "content": "x"}, {"role": "system", "content": "y"},
                                   {"role": "user", "content": "z"}]]), r"got \['system', 'system', 'user'\]"),
    (lambda g: g.generate(torch.tensor([[1, 5]]), 3), "prompt_tokens must be a list of prompts.*got Tensor"),
    (lambda g: g.generate([torch.tensor([[1, 5]])], 3), "prompt 0 must be a list of token ids, got Tensor"),
    (lambda g: g.text_completion(["a"], max_gen_len=True), "max_gen_len"),
    (lambda g: g.text_completion(["a"], top_p="0.9"), "top_p must be a number"),
    (lambda g: g.text_infilling([], []), "no prompts given"),
    (lambda g: g.generate([[1, 5]], None), "max_gen_len must be an integer >= 0, got None"),
])
def test_bad_input_is_a_value_error(gqa, call, match):
    with pytest.raises(ValueError, match=match):
        call(gqa[0])


@pytest.mark.parametrize("kwargs, match", [
    ({"max_seq_len": 0}, "max_seq_len"), ({"max_batch_size": -1}, "max_batch_size"),
    ({"dtype": "float8"}, "unknown dtype"), ({"tokenizer_path": "/nonexistent/tokenizer.model"}, "does not exist"),
    ({"ckpt_dir": "/nonexistent"}, "does not exist"), ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"device": "cuda:x"}, "unknown device"), ({"dtype": torch.int8}, "unknown dtype"),
    ({"model_parallel_size": 0}, "model_parallel_size must be a positive integer"),
    ({"seed": "x"}, "seed must be an integer"), ({"ckpt_dir": __file__}, "is a file, not a folder"),
    ({"tokenizer_path": "."}, "is a folder, not a file"),
    ({"pack_weights": "no"}, r"pack_weights must be True, False or None \(the machine's default\), got 'no'"),
    ({"cuda_graphs": 0}, "cuda_graphs must be True, False or None"),
    pytest.param({"device": "mps"}, "torch has no such device", marks=pytest.mark.skipif(
        torch.backends.mps.is_available(), reason="this machine has MPS")),
])
def test_bad_build_arguments(make_ckpt, tokenizer_path, kwargs, match):
    ckpt, _ = make_ckpt(MHA)
    args = {"ckpt_dir": ckpt, "tokenizer_path": tokenizer_path, "max_seq_len": 32, "max_batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        Llama.build(**args)


def test_a_numpy_integer_seed_seeds_as_the_int(make_ckpt, tokenizer_path):
    np = pytest.importorskip("numpy")
    ckpt, _ = make_ckpt(MHA)
    outs = [Llama.build(ckpt, tokenizer_path, 32, 1, seed=seed).text_completion(["Hello"], max_gen_len=6)
            for seed in (np.int64(3), 3)]
    assert outs[0] == outs[1]


def test_code_llama_theta_generates_like_reference(make_ckpt, tokenizer_path):
    ckpt, state = make_ckpt(CODE)
    g = Llama.build(ckpt, tokenizer_path, 64, 2, dtype="float32")
    prompt = g.tokenizer.encode("def fib(n):", bos=True, eos=False)
    assert g.generate([prompt], 5, temperature=0)[0][0] == greedy(state, {**CODE, "vocab_size": VOCAB}, prompt, 5,
                                                                   stop=g.tokenizer.eos_id)


def test_logits_that_are_not_finite_end_generation_with_a_clear_error(make_ckpt, tokenizer_path):
    """NaN logits would fail in sampling (on a GPU with a device-side assert): the row and position are named,
    at any temperature, in generate and in stream, before the row's token is given out."""
    ckpt, _ = make_ckpt(GQA)
    g = Llama.build(ckpt, tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32")
    # The poisoned prompt is the caller's first and the batch's second row (the longest goes first).
    prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in ["poisoned", "Fine words, and many more of them"]]
    g.model.tok_embeddings.weight.data[prompts[0][-1]] = float("nan")
    for temperature in (0, 0.6):
        with pytest.raises(ValueError, match=r"prompt 0: the logits for generated token 1 are not finite .* NaN.*"
                           r"md5sum -c checklist.chk"):
            g.generate(prompts, max_gen_len=4, temperature=temperature)
    pieces = []
    with pytest.raises(ValueError, match="prompt 0: the logits for generated token 1 are not finite"):
        pieces.extend(g.stream("poisoned", max_gen_len=4))
    assert pieces == []
    assert g.generate(prompts[1:], max_gen_len=4, temperature=0)[0][0]  # the other prompt alone is fine
    # More prompts than max_batch_size (2) go in turns: the index is still the caller's.
    with pytest.raises(ValueError, match=r"prompt 2: the logits for generated token 1 are not finite"):
        g.generate([prompts[1], prompts[1], prompts[0]], max_gen_len=4, temperature=0)
    # A NaN met while decoding: the first token generated leads to it.
    first = g.generate(prompts[1:], max_gen_len=1, temperature=0)[0][0][0]
    assert first not in prompts[1]
    g.model.tok_embeddings.weight.data[first] = float("nan")
    with pytest.raises(ValueError, match=r"prompt 0: the logits for generated token 2 are not finite"):
        g.generate(prompts[1:], max_gen_len=4, temperature=0)
    g.model.compute_dtype = torch.float16  # as on a GPU without bf16: the advice is another dtype
    assert "build with dtype='bfloat16'" in g._not_finite(0, 1)
