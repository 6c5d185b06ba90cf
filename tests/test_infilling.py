"""Code Llama's infilling: its tokenizer's pieces, the prompt in both orders, and ``Llama.text_infilling``
against greedy decoding by the float64 reference."""

import sys

import pytest
import torch
from sentencepiece import SentencePieceProcessor

from llama import Llama, Tokenizer
from llama.chat import infilling_prompt
from llama.generation import infilling_prompt_tokens
from llama.checkpoint import random_checkpoint

from conftest import FIXTURES, GQA, launch, run_cmd
from reference import greedy
from reference import logits as reference_logits

# A Code Llama 7B-like shape in small: its vocabulary and rope_theta.
CODE_LLAMA = {**GQA, "rope_theta": 1e6, "vocab_size": 32016}
PRE, SUF, MID, EOT = 32007, 32008, 32009, 32010
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return result\n"


def spelled(sp: SentencePieceProcessor, ids: list) -> str:
    """The text the pieces spell, each ▁ a space and each byte piece (<0x0A>) its byte: what the ids stand for,
    with no leading space added."""
    pieces = [sp.id_to_piece(i) for i in ids]
    return b"".join(bytes([int(p[3:5], 16)]) if sp.is_byte(i) else p.replace("▁", " ").encode()
                    for i, p in zip(ids, pieces)).decode()


@pytest.fixture(scope="module")
def code_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("codellama_ckpt")
    state = random_checkpoint(str(out), CODE_LLAMA, seed=3)
    return str(out), {k: v.float() for k, v in state.items()}


def test_code_llama_tokenizer_has_the_infilling_pieces(code_llama_tokenizer_path, tokenizer_path):
    tok = Tokenizer(code_llama_tokenizer_path)
    assert (tok.n_words, tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id) == (32016, PRE, SUF, MID, EOT)
    llama2, llama3 = Tokenizer(tokenizer_path), Tokenizer(str(FIXTURES / "llama3" / "tokenizer.model"))
    assert (llama2.prefix_id, llama2.suffix_id, llama2.middle_id, llama2.eot_id) == (None,) * 4
    assert (llama3.prefix_id, llama3.suffix_id, llama3.middle_id) == (None,) * 3


@pytest.mark.parametrize("text", ["", "x", " x", "  two spaces", "\n    return a + b\n", "(a, b)", "é ☺ 中文"])
def test_encode_infilling_adds_no_leading_space(code_llama_tokenizer_path, text):
    tok = Tokenizer(code_llama_tokenizer_path)
    sp = SentencePieceProcessor(model_file=code_llama_tokenizer_path)
    ids = tok.encode_infilling(text)
    assert spelled(sp, ids) == text
    assert tok.decode_infilling(ids) == text
    if text and not text.startswith(" "):  # where plain encode puts a space before the text
        assert spelled(sp, tok.encode(text, bos=False, eos=False)).startswith(" ")


def test_infilling_prompt_in_both_orders(code_llama_tokenizer_path):
    tok = Tokenizer(code_llama_tokenizer_path)
    sp = SentencePieceProcessor(model_file=code_llama_tokenizer_path)
    pre = sp.encode(PREFIX)  # the prefix as a text of its own: with SentencePiece's leading space
    ids = infilling_prompt(tok, PREFIX, SUFFIX)
    assert ids[:2] == [1, PRE] and ids[2:2 + len(pre)] == pre and ids[2 + len(pre)] == SUF and ids[-1] == MID
    assert spelled(sp, ids[3 + len(pre):-1]) == SUFFIX
    ids = infilling_prompt_tokens(tok, PREFIX, SUFFIX, suffix_first=True)  # by Meta's codellama's name
    middle = ids.index(MID)
    assert ids[:3] == [1, PRE, SUF] and spelled(sp, ids[3:middle]) == SUFFIX and ids[middle + 1:] == pre


@pytest.mark.parametrize("suffix_first", [False, True], ids=["psm", "spm"])
def test_text_infilling_matches_reference(code_ckpt, code_llama_tokenizer_path, suffix_first):
    ckpt, state = code_ckpt
    g = Llama.build(ckpt, code_llama_tokenizer_path, 96, 2, dtype="float32")
    sp = SentencePieceProcessor(model_file=code_llama_tokenizer_path)
    prefixes, suffixes = [PREFIX, "x = "], [SUFFIX, ""]
    out = g.text_infilling(prefixes, suffixes, temperature=0, max_gen_len=6, logprobs=True,
                           suffix_first=suffix_first)
    for prefix, suffix, result in zip(prefixes, suffixes, out):
        prompt = infilling_prompt(g.tokenizer, prefix, suffix, suffix_first)
        want = greedy(state, CODE_LLAMA, prompt, 6, stop=EOT)
        # Code Llama's predictions name each token by its piece, as Meta's codellama (token_piece)
        assert result["tokens"] == [sp.id_to_piece(t) for t in want]
        assert 2 not in want  # (no end of sequence: it would stop ours, not this)
        assert result["generation"] == g.tokenizer.decode_infilling(want)
        assert result["full_text"] == prefix + result["generation"] + suffix
        logits = reference_logits(state, CODE_LLAMA, prompt + want)[len(prompt) - 1:-1]
        want_logprobs = logits.log_softmax(-1).gather(-1, torch.tensor(want)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(result["logprobs"], dtype=torch.float64), want_logprobs,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stop", ["eot", "eos"])
def test_text_infilling_stops_at_eot(code_ckpt, code_llama_tokenizer_path, tmp_path, stop):
    """With ▁<EOT>'s output row (or </s>'s) made twice that of the third token greedy decoding picks, the infill
    ends there (or sooner), without it; Meta's generation stops at either the same way."""
    ckpt, state = code_ckpt
    g = Llama.build(ckpt, code_llama_tokenizer_path, 96, 1, dtype="float32")
    stop_id = EOT if stop == "eot" else g.tokenizer.eos_id
    prompt = infilling_prompt(g.tokenizer, PREFIX, SUFFIX)
    third = greedy(state, CODE_LLAMA, prompt, 3)[2]
    weights = torch.load(f"{ckpt}/consolidated.00.pth", weights_only=True)
    weights["output.weight"][stop_id] = 2 * weights["output.weight"][third]
    (tmp_path / "params.json").write_bytes(open(f"{ckpt}/params.json", "rb").read())
    torch.save(weights, tmp_path / "consolidated.00.pth")
    state = {**state, "output.weight": weights["output.weight"].float()}
    want = greedy(state, CODE_LLAMA, prompt, 8, stop=stop_id)
    assert len(want) < 3
    g = Llama.build(str(tmp_path), code_llama_tokenizer_path, 96, 1, dtype="float32")
    out = g.text_infilling([PREFIX], [SUFFIX], temperature=0, max_gen_len=8, logprobs=True)[0]
    pieces = SentencePieceProcessor(model_file=code_llama_tokenizer_path).id_to_piece(want)
    assert out["tokens"] == pieces and out["full_text"] == PREFIX + g.tokenizer.decode_infilling(want) + SUFFIX


def test_text_infilling_bad_input(code_ckpt, code_llama_tokenizer_path, make_ckpt, tokenizer_path):
    ckpt, _ = make_ckpt(GQA)
    g = Llama.build(ckpt, tokenizer_path, 64, 2, dtype="float32")
    with pytest.raises(ValueError, match="infilling needs a Code Llama tokenizer"):
        g.text_infilling([PREFIX], [SUFFIX])
    g = Llama.build(code_ckpt[0], code_llama_tokenizer_path, 64, 2, dtype="float32")
    for prefixes, suffixes, match in [([PREFIX, "a"], [SUFFIX], "same length"), (PREFIX, SUFFIX, "lists"),
                                      ([PREFIX], [3], "must be strings"), ([], [], "no prompts")]:
        with pytest.raises(ValueError, match=match):
            g.text_infilling(prefixes, suffixes)


def test_example_infilling_on_two_processes_equals_one(code_ckpt, code_llama_tokenizer_path):
    args = ["example_infilling.py", "--ckpt_dir", code_ckpt[0], "--tokenizer_path", code_llama_tokenizer_path,
            "--max_gen_len", "8", "--dtype", "float32"]
    one = run_cmd([sys.executable, *args])
    two = launch(2, *args)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert "the model's middle" in one.stdout and one.stdout == two.stdout


@pytest.mark.parametrize("args, match", [
    ([], "pass --ckpt_dir and --tokenizer_path of a Code Llama checkpoint"),
    (["--ckpt_dir", "LLAMA2", "--tokenizer_path", "LLAMA2_TOKENIZER"], "infilling needs a Code Llama tokenizer"),
])
def test_example_infilling_errors(make_ckpt, tokenizer_path, args, match):
    ckpt, _ = make_ckpt(GQA)
    args = [{"LLAMA2": ckpt, "LLAMA2_TOKENIZER": tokenizer_path}.get(a, a) for a in args]
    result = run_cmd([sys.executable, "example_infilling.py", *args])
    assert result.returncode == 1 and match in result.stderr and "Traceback" not in result.stderr
