"""Tokenizer(path): the kind read from the file, Llama 3's tiktoken tokenizer, and SentencePiece unchanged."""

import base64
import random
import re
import shutil
import time

import numpy as np
import pytest
import torch

from llama import Tokenizer
from llama.tokenizer import MAX_CHUNK, MAX_RUN, SentencePieceTokenizer, TiktokenTokenizer, split_for_encoding

from conftest import FIXTURES, LLAMA2_TOKENIZER

LLAMA3_TOKENIZER = FIXTURES / "llama3" / "tokenizer.model"


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer(str(LLAMA3_TOKENIZER))


@pytest.fixture(scope="module")
def llama2():
    return Tokenizer(str(LLAMA2_TOKENIZER))


@pytest.fixture(scope="module")
def rank():
    """rank(b"bytes"): the token's id read straight from the ranks file, independently of the tokenizer."""
    ranks = {}
    for line in LLAMA3_TOKENIZER.read_bytes().splitlines():
        token, r = line.split()
        ranks[token] = int(r)
    return lambda piece: ranks[base64.b64encode(piece)]


def test_kind_is_read_from_the_file(llama2, llama3, tmp_path):
    assert isinstance(llama2, SentencePieceTokenizer) and isinstance(llama2, Tokenizer) and llama2.kind == "llama2"
    assert isinstance(llama3, TiktokenTokenizer) and isinstance(llama3, Tokenizer) and llama3.kind == "llama3"
    # The name doesn't matter, the contents do.
    renamed = tmp_path / "tokenizer.bin"
    renamed.write_bytes(LLAMA3_TOKENIZER.read_bytes())
    assert Tokenizer(renamed).kind == "llama3"


@pytest.mark.parametrize("contents, match", [
    (b"hello world\nthis is just text\n", "SentencePiece cannot load it"),
    (b"\x00\xff" + random.Random(0).randbytes(4000), "SentencePiece cannot load it"),
    (b"", "SentencePiece cannot load it"),
    (b"IQ== 0\nIg== 1\nnot a rank line\n", "line 3 is not 'base64-token rank'"),
    (b"IQ== 0\nIg== 5\n", "not 0..1"),
    (b"IQ== 0\nIg== 1\n", "single bytes are not tokens"),
])
def test_a_file_of_neither_kind_is_a_value_error(tmp_path, contents, match):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(contents)
    with pytest.raises(ValueError, match=match) as error:
        Tokenizer(str(path))
    assert "not a tokenizer model" in str(error.value) and "SentencePiece" in str(error.value)
    assert "tiktoken" in str(error.value)


def test_missing_file(tmp_path):
    for path, said in ((str(tmp_path / "nope.model"), "does not exist"), (str(tmp_path), "is a folder, not a file"),
                       (None, "tokenizer file None does not exist")):
        with pytest.raises(ValueError, match=said):
            Tokenizer(path)


def test_a_folder_holding_the_tokenizer_is_answered_with_its_path(tmp_path, tokenizer_path):
    """A Hugging Face copy of Llama 3 keeps Meta's tokenizer.model in original/."""
    (tmp_path / "original").mkdir()
    shutil.copy(tokenizer_path, tmp_path / "original" / "tokenizer.model")
    with pytest.raises(ValueError, match=re.escape(f"tokenizer.model ({tmp_path}/original/tokenizer.model, here)")):
        Tokenizer(str(tmp_path))


def test_text_with_an_unpaired_surrogate_is_a_value_error(llama2):
    """Bytes that aren't UTF-8, read with errors='surrogateescape' (Python's way for a terminal's input in some
    locales): SentencePiece failed on them with a RuntimeError in C++ words."""
    for encode in (lambda s: llama2.encode(s, bos=True, eos=False), llama2.encode_infilling):
        with pytest.raises(ValueError, match=r"'\\udcff' is half of a UTF-16 pair"):
            encode("hello \udcff there")


def test_llama3_ids(llama3):
    assert llama3.n_words == 128256
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128001, -1)
    assert llama3.stop_tokens == {128001, 128009, 128008}  # 128008: Llama 3.1's <|eom_id|>


# Meta's table (llama-models' tokenizer.py, Llama 3.1 on): Llama 3's named tokens where they were, five ids it
# had reserved named, and the reserved names after them numbered from 2.
@pytest.mark.parametrize("name, id_", [
    ("<|begin_of_text|>", 128000), ("<|end_of_text|>", 128001), ("<|reserved_special_token_0|>", 128002),
    ("<|reserved_special_token_1|>", 128003), ("<|finetune_right_pad_id|>", 128004), ("<|step_id|>", 128005),
    ("<|start_header_id|>", 128006), ("<|end_header_id|>", 128007), ("<|eom_id|>", 128008), ("<|eot_id|>", 128009),
    ("<|python_tag|>", 128010), ("<|image|>", 128011), ("<|reserved_special_token_2|>", 128012),
    ("<|reserved_special_token_245|>", 128255),
])
def test_llama3_special_ids_by_name(llama3, name, id_):
    assert llama3.special_id(name) == id_
    assert llama3.decode([id_]) == name


def test_llama3_special_tokens_are_all_there(llama3):
    assert sorted(llama3.special_tokens.values()) == list(range(128000, 128256))
    assert llama3.num_reserved_special_tokens == 256 and llama3.model._pat_str == llama3.pat_str  # Meta's names
    assert (llama3.eom_id, llama3.special_id("<|python_tag|>")) == (128008, 128010)
    for bad in ("<|reserved_special_token_246|>", "hello", "<s>"):
        with pytest.raises(ValueError, match="not a special token"):
            llama3.special_id(bad)


@pytest.mark.parametrize("text, pieces", [
    ("hello world", [b"hello", b" world"]),
    ("Hello, world!", [b"Hello", b",", b" world", b"!"]),
    ("I'll pay 12345.", [b"I", b"'ll", b" pay", b" ", b"123", b"45", b"."]),  # contractions, 3-digit groups
    ("DON'T", [b"DON", b"'T"]),  # contractions ignore case
    ("x  y", [b"x", b" ", b" y"]),  # a space run leaves its last space to the next word
    ("a\n\nb", [b"a", b"\n\n", b"b"]),
    ("$100", [b"$", b"100"]),
    ("  def f():\n\treturn 1\n", [b" ", b" def", b" f", b"():\n", b"\treturn", b" ", b"1", b"\n"]),
])
def test_llama3_exact_ids(llama3, rank, text, pieces):
    """Texts whose every pre-split piece is one token: the ids are those pieces' ranks in the file."""
    assert b"".join(pieces) == text.encode()
    assert llama3.encode(text, bos=False, eos=False) == [rank(p) for p in pieces]


ROUND_TRIPS = [
    "", "a", "Hello, world!", "def f(x):\n\treturn x ** 2  # square\n\n\n", "中文字符和日本語のテキスト、한국어",
    "emoji 😀👍🏽👨‍👩‍👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "   leading and trailing   ", "\t\t\n \r\n\x0b\x0c ", "mixed\u00a0nbsp\u2028sep",
    "x" * 3000 + " " * 2000 + "\n" * 1000, "1234567890" * 10, "'s 'S 're 'VE",
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_llama3_round_trip(llama3, text):
    ids = llama3.encode(text, bos=False, eos=False)
    assert all(0 <= i < 128000 for i in ids)
    assert llama3.decode(ids) == text


def test_special_token_text_is_plain_text(llama3, rank):
    text = "before <|eot_id|> <|begin_of_text|><|start_header_id|>system<|end_header_id|> after"
    ids = llama3.encode(text, bos=False, eos=False)
    assert all(i < 128000 for i in ids)
    assert llama3.decode(ids) == text
    pieces = (b"<", b"|", b"e", b"ot", b"_id", b"|", b">")
    assert llama3.encode("<|eot_id|>", bos=False, eos=False) == [rank(p) for p in pieces]


def test_bos_and_eos_flags(llama3):
    ids = llama3.encode("hi", bos=False, eos=False)
    assert llama3.encode("hi", bos=True, eos=False) == [128000] + ids
    assert llama3.encode("hi", bos=False, eos=True) == ids + [128001]
    assert llama3.encode("hi", bos=True, eos=True) == [128000] + ids + [128001]
    assert llama3.encode("", bos=True, eos=True) == [128000, 128001]
    with pytest.raises(ValueError, match="can only encode a str"):
        llama3.encode(b"hi", bos=False, eos=False)


@pytest.mark.parametrize("kind", ["llama2", "llama3"])
def test_bos_and_eos_are_flags_of_any_truth_value(kind, request):
    """Meta's tests them with ``if``: numpy's bools, None and 2 mean what their truth does."""
    tok = request.getfixturevalue(kind)
    ids = tok.encode("hi", bos=False, eos=False)
    assert tok.encode("hi", bos=np.True_, eos=None) == [tok.bos_id] + ids
    assert tok.encode("hi", bos=0, eos=2) == ids + [tok.eos_id]


def test_decode_survives_split_characters(llama3):
    ids = llama3.encode("😀", bos=False, eos=False)
    assert len(ids) > 1  # the emoji's 4 bytes are more than one token
    assert "\ufffd" in llama3.decode(ids[:1])
    assert llama3.decode(ids) == "😀"
    with pytest.raises(ValueError, match="token ids are in"):
        llama3.decode([128256])


@pytest.mark.parametrize("text", ["a" * 1_000_000, " " * 1_000_000, "\n \t" * 333_334, "😀" * 250_000],
                         ids=["1MB-letter", "1MB-spaces", "1MB-mixed-whitespace", "1MB-emoji"])
def test_huge_runs_encode_in_seconds(llama3, text):
    start = time.perf_counter()
    ids = llama3.encode(text, bos=False, eos=False)
    assert time.perf_counter() - start < 5
    assert llama3.decode(ids) == text


def test_splitting_long_text_changes_no_id(llama3):
    """Ordinary text past the chunk size, and a long run without whitespace, encode as they would whole."""
    rng = random.Random(0)
    words = ["hello", "world", "the", "café", "中文。", "123456", "don't", "x=1;", "\n", "\n\n", "  ", "\t", "😀",
             "...", "I'LL", "a.b", "foo_bar", "http://x.y/z?q=1"]
    prose = " ".join(rng.choice(words) for _ in range(int(MAX_CHUNK / 3)))
    no_spaces = "".join(rng.choice(["abc", "+/", "xyz9", "==", "Q", "7", "é", "中文", "。"])
                        for _ in range(3 * MAX_RUN // 2))
    lines = "\n".join(rng.choice(["word", "12", "{}", "日本"]) for _ in range(MAX_CHUNK // 3))
    for text in (prose, no_spaces, lines):
        parts = split_for_encoding(text)
        assert len(parts) > 1 and "".join(parts) == text
        assert llama3.encode(text, bos=False, eos=False) == llama3.model.encode_ordinary(text)


def test_sentencepiece_unchanged(llama2):
    assert (llama2.bos_id, llama2.eos_id, llama2.pad_id, llama2.n_words) == (1, 2, -1, 32000)
    assert llama2.stop_tokens == {2}
    ids = llama2.encode("Hello world", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == llama2.sp_model.encode("Hello world")
    assert llama2.decode(ids) == "Hello world"
    assert (llama2.special_id("<s>"), llama2.special_id("</s>")) == (1, 2)
    for bad in ("hello", "<|eot_id|>", "▁the"):
        with pytest.raises(ValueError, match="not a special token"):
            llama2.special_id(bad)
    assert 2 not in llama2.encode("a </s> b", bos=False, eos=False)


@pytest.mark.parametrize("kind", ["llama2", "llama3"])
def test_decode_takes_a_tensor_or_one_id_and_refuses_what_is_not_token_ids(kind, request):
    tok = request.getfixturevalue(kind)
    ids = tok.encode("In the beginning", bos=False, eos=False)
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids) == "In the beginning"
    # One id alone, as Meta's generation.py decodes each token of a prediction's "tokens" (SentencePiece takes it).
    assert [tok.decode(i) for i in ids] == [tok.decode(torch.tensor(i)) for i in ids] == tok.token_names(ids)
    assert tok.decode([-1] + ids + [-1, -1]) == "In the beginning"  # Meta's padding, left out as Code Llama's
    for bad, said in ((ids + [tok.n_words], f"cannot decode {tok.n_words}"), ([-2], "cannot decode -2"),
                      ("abc", "got str"), ([1.0], "cannot decode 1.0"), (1.0, "got float"),
                      (torch.tensor([[5]]), "got Tensor"), (True, "got bool")):
        with pytest.raises(ValueError, match=said):
            tok.decode(bad)


def test_llama3_special_tokens_in_text_as_metas_allowed_special_says(llama3):
    """Plain text by default (no content can forge a header); the token where allowed_special names it or is
    "all"; an error where disallowed_special refuses it."""
    text = "<|start_header_id|>user<|end_header_id|>"
    start, end = llama3.special_id("<|start_header_id|>"), llama3.special_id("<|end_header_id|>")
    user = llama3.encode("user", bos=False, eos=False)
    assert start not in llama3.encode(text, bos=False, eos=False)
    assert llama3.encode(text, bos=False, eos=False, allowed_special="all") == [start, *user, end]
    some = llama3.encode(text, bos=False, eos=False, allowed_special={"<|start_header_id|>"})
    assert some[:1 + len(user)] == [start, *user] and end not in some
    with pytest.raises(ValueError, match="disallowed special token '<.start_header_id.>'"):
        llama3.encode(text, bos=False, eos=False, disallowed_special="all")
