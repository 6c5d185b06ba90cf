"""Tokenizers behind one interface: ``encode(s, bos, eos)``, ``decode(ids)``, the special ids, ``n_words``,
``stop_tokens``, ``special_id(name)`` and ``kind`` (which names the chat format that goes with it).

``Tokenizer(path)`` reads Meta's ``tokenizer.model`` whichever kind it is and returns the tokenizer for it:

- a SentencePiece model (a protobuf; Llama 1/2 and Code Llama): a ``SentencePieceTokenizer``, kind "llama2"
  (or "codellama70b" where it has Code Llama 70B's ``<step>`` piece, whose chat format is another);
- a tiktoken BPE file (text lines ``base64-token rank``; Llama 3 / 3.1): a ``TiktokenTokenizer``, kind "llama3".

Both are subclasses of ``Tokenizer``. Text given to ``encode`` never produces a special token, whatever it
contains, unless Llama 3's ``allowed_special`` names it (as Meta's): the chat formats ask for those by name with
``special_id``. (Code Llama's infilling pieces are not
special tokens but ordinary pieces of its vocabulary, which its text can produce as with Meta's tokenizer; the
infilling prompt places them by id.)
"""

import base64
import binascii
import os
import re
import unicodedata
from typing import AbstractSet, Collection, Dict, Iterable, List, Optional, Sequence, Set, Union

import torch
from sentencepiece import SentencePieceProcessor

from .chat import Dialog, Message, Role
from .chat import Llama3ChatFormat as ChatFormat
from .checks import cannot_read, is_int

# With the names research code for Llama 3 imports from Meta's tokenizer.py.
__all__ = ["Tokenizer", "SentencePieceTokenizer", "TiktokenTokenizer", "ChatFormat", "Dialog", "Message", "Role"]

# The first line of a tiktoken BPE file: a base64 token, one space, its rank.
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")


class Tokenizer:
    """``Tokenizer(path)``: the tokenizer for Meta's ``tokenizer.model`` at ``path``, of either kind."""

    kind: str
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    # Code Llama's infilling pieces (``llama.chat.infilling_prompt``); None in tokenizers without them.
    prefix_id: Optional[int] = None
    suffix_id: Optional[int] = None
    middle_id: Optional[int] = None
    eot_id: Optional[int] = None  # the end of an infill (Code Llama), or of a turn (Llama 3's <|eot_id|>)
    step_id: Optional[int] = None  # Code Llama 70B's <step>, which ends each message of its chat format
    stop_tokens: AbstractSet[int]  # the ids that end a generation (each kind's own: see it)

    def __new__(cls, model_path: Optional[str] = None, *args, **kwargs):
        if cls is Tokenizer:
            cls = _class_for(model_path)
        return super().__new__(cls)

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        raise NotImplementedError

    def _framed(self, ids: List[int], bos: bool, eos: bool) -> List[int]:
        """ids with the begin- and end-of-sequence tokens where bos and eos are true (tested as Meta's does, with
        ``if``: numpy's bools and None too)."""
        return [self.bos_id] * bool(bos) + ids + [self.eos_id] * bool(eos)

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def special_id(self, name: str) -> int:
        """The id of the special token ``name`` (e.g. ``"<|eot_id|>"``), which ``encode`` gives only where
        told to (Llama 3's allowed_special)."""
        raise NotImplementedError

    @property
    def is_code_llama(self) -> bool:
        """Code Llama's tokenizer: with its infilling pieces (7B, 13B) or ``<step>`` (70B)."""
        return self.prefix_id is not None or self.step_id is not None

    def token_names(self, ids: Sequence[int]) -> List[str]:
        """Each token as a prediction's "tokens" gives it, as Meta's code for this family does: Code Llama's as its
        piece ("▁def", ``token_piece``), Llama 2's and Llama 3's decoded alone ("def")."""
        if self.is_code_llama:
            return [self.token_piece(i) for i in self._ids(ids)]
        return [self.decode([i]) for i in ids]

    def _ids(self, ids: Sequence[int]) -> List[int]:
        """ids for decoding as a list of ints (from a 1-D tensor too, or one id alone, as Meta's generation.py
        decodes each token of a prediction's "tokens"), or an error naming the first bad one. The padding id of
        Meta's generate, -1, is left out, as Code Llama's decode does."""
        if isinstance(ids, torch.Tensor) and ids.dim() <= 1 and not ids.is_floating_point():
            ids = ids.tolist()
        if is_int(ids):
            ids = [ids]
        if isinstance(ids, (str, bytes, torch.Tensor)) or not isinstance(ids, Iterable):
            raise ValueError(f"can only decode a list of token ids, got {type(ids).__name__}")
        out = []
        for i in ids:
            if not is_int(i) or not -1 <= i < self.n_words:
                raise ValueError(f"cannot decode {i!r}: token ids are integers in [0, {self.n_words})")
            if i != -1:
                out.append(int(i))
        return out


def _text(s: object) -> str:
    if not isinstance(s, str):
        raise ValueError(f"can only encode a str, got {type(s).__name__}")
    return s


def _utf8(s: object) -> str:
    """s, where SentencePiece can take it: a str with no unpaired surrogate (which it fails on in C++ words)."""
    s = _text(s)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"can't encode {s[max(0, e.start - 20):e.end + 20]!r}: {s[e.start]!r} is half of a UTF-16 "
                         "pair, not text (bytes that aren't UTF-8, read with errors='surrogateescape'?)") from None
    return s


def _check_file(model_path) -> None:
    """A clear error where model_path is not a file (a folder holding one is named in it) or can't be read, which
    SentencePiece's loader would call an invalid model."""
    if isinstance(model_path, (str, os.PathLike)) and os.path.isfile(model_path):
        try:
            open(model_path, "rb").close()
        except OSError as e:
            raise cannot_read(model_path, e) from None
        return
    folder = isinstance(model_path, (str, os.PathLike)) and os.path.isdir(model_path)
    found = [p for p in ("tokenizer.model", "original/tokenizer.model")
             if folder and os.path.isfile(os.path.join(model_path, p))]
    hint = f" ({os.path.join(model_path, found[0])}, here)" if found else ""
    raise ValueError(f"tokenizer file {model_path!r} {'is a folder, not a file' if folder else 'does not exist'}: "
                     f"pass the path to Meta's tokenizer.model{hint} with --tokenizer_path")


def _class_for(model_path) -> type:
    """Which tokenizer reads this file: decided from its first bytes, not its name."""
    _check_file(model_path)
    with open(model_path, "rb") as f:
        head = f.read(4096)
    if _TIKTOKEN_LINE.match(head):
        return TiktokenTokenizer
    # Anything else must be a SentencePiece protobuf; its loader says so if it isn't.
    return SentencePieceTokenizer


def _not_a_tokenizer(model_path, why: str) -> ValueError:
    return ValueError(f"{str(model_path)!r} is not a tokenizer model ({why}): expected Meta's tokenizer.model, "
                      "either a SentencePiece model (Llama 1/2, Code Llama) or a tiktoken BPE file of "
                      "'base64-token rank' lines (Llama 3)")


# Code Llama's infilling pieces, after Llama 2's vocabulary (ids 32007-32010 of its 32016): prefix, suffix, middle,
# end of the infill.
INFILLING_PIECES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")
# One piece of its own in Llama's vocabulary that no other piece starts with, so that it never merges with text
# after it, as Meta's encode_infilling uses it.
INFILLING_MARK = "☺"


class SentencePieceTokenizer(Tokenizer):
    """Meta's SentencePiece tokenizer (Llama 1/2, Code Llama)."""

    def __init__(self, model_path: str):
        _check_file(model_path)
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(str(model_path))
        except (RuntimeError, OSError) as e:
            raise _not_a_tokenizer(model_path, f"SentencePiece cannot load it: {e}") from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.prefix_id, self.suffix_id, self.middle_id, self.eot_id = map(self._piece_id, INFILLING_PIECES)
        self.step_id = self._piece_id("<step>")
        self.kind = "llama2" if self.step_id is None else "codellama70b"
        # What encode_infilling puts before the text to stand in for the space SentencePiece adds, and removes.
        self._mark = self.sp_model.encode(INFILLING_MARK)

    @property
    def stop_tokens(self) -> frozenset:
        """The end-of-sequence token, whatever eos_id is now (Meta's Llama 2 code stops at eos_id)."""
        return frozenset({self.eos_id})

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        ids = self.sp_model.encode(_utf8(s))
        return self._framed(ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp_model.decode(self._ids(ids))

    def encode_infilling(self, s: str) -> List[int]:
        """s encoded as text that continues other text (an infilling suffix): without the space SentencePiece
        puts before the start of a text. The ids of Meta's ``encode_infilling``."""
        ids = self.sp_model.encode(INFILLING_MARK + _utf8(s))
        if ids[:len(self._mark)] != self._mark:
            raise ValueError(f"{s[:20]!r}...: its start merges with the marker {INFILLING_MARK!r} in this "
                             "tokenizer, so it can't be encoded without a leading space")
        return ids[len(self._mark):]

    def token_piece(self, i: int) -> str:
        """The piece of id i as the vocabulary spells it: Code Llama's name for it."""
        if i == -1:
            raise ValueError("-1 is the padding of Meta's generate, not a token: it has no piece")
        return self.sp_model.id_to_piece(self._ids([i])[0])

    def decode_infilling(self, ids: Sequence[int]) -> str:
        """ids decoded as text that continues other text: a leading space is kept, where ``decode`` drops it."""
        return self.sp_model.decode(self._mark + self._ids(ids))[len(INFILLING_MARK):]

    def _piece_id(self, piece: str) -> Optional[int]:
        i = self.sp_model.piece_to_id(piece)
        return i if self.sp_model.id_to_piece(i) == piece else None  # unknown pieces map to <unk>

    def special_id(self, name: str) -> int:
        """The id of a control piece: ``"<s>"``, ``"</s>"`` (or ``"<unk>"``)."""
        i = self.sp_model.piece_to_id(name) if isinstance(name, str) else -1
        if not (0 <= i < self.n_words and self.sp_model.id_to_piece(i) == name
                and (self.sp_model.is_control(i) or self.sp_model.is_unknown(i))):
            raise ValueError(f"{name!r} is not a special token of this SentencePiece tokenizer")
        return i


# Llama 3's special tokens, in id order from the first id after the regular tokens (128000), by the names of
# Meta's current code (llama-models, from Llama 3.1 on): Llama 3's own code left five ids among its named ones
# reserved (128004, 128005, 128008, 128010 and 128011), 3.1 named them, and the reserved names after them are
# numbered from 2. Llama 3 models never produce those five, so the names only tell 3.1's apart.
N_SPECIAL = 256
_NAMED_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
SPECIAL_TOKENS = _NAMED_SPECIAL + [f"<|reserved_special_token_{i}|>"
                                   for i in range(2, 2 + N_SPECIAL - len(_NAMED_SPECIAL))]

# How Llama 3 splits text into pieces before BPE: contractions; letters with one optional leading character
# that is neither a letter, a digit nor a line break; 1-3 digits; punctuation runs with an optional leading
# space and any trailing line breaks; line-break runs (with the whitespace before them); whitespace not
# followed by a non-space; any other whitespace.
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
           r"|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+"
           r"|\s+(?!\S)"
           r"|\s+")

# tiktoken's regex and BPE get slow (and its regex runs out of stack) on huge runs of whitespace or of
# non-whitespace, so long texts are encoded in parts: at most MAX_CHUNK characters, and no run of more than
# MAX_RUN whitespace or non-whitespace characters within one part.
MAX_CHUNK = 400_000
MAX_RUN = 25_000
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (MAX_RUN + 1, MAX_RUN + 1))
# Where a split never changes the pieces (so neither the ids): PAT_STR never puts a non-whitespace character
# and a following space in one piece, nor a letter and a following non-letter, nor a digit and a following
# non-digit; and the one lookahead, (?!\S), reads the same at a space as at the end of a part.
_SPACE_CUT = re.compile(r"\S(?= )")
_WORD_CUT = re.compile(r"[^\W_](?=[\W_])")  # candidates, checked with unicodedata


def _word_cut_ok(s: str, i: int) -> bool:
    before, after = unicodedata.category(s[i - 1])[0], unicodedata.category(s[i])[0]
    return before in "LN" and after != before


def _last_cut(s: str, lo: int, hi: int) -> int:
    """The last position in (lo, hi] where splitting ``s`` leaves its pieces as they are; hi if there is none."""
    for pattern, ok in ((_SPACE_CUT, None), (_WORD_CUT, _word_cut_ok)):
        starts = (hi - 4096, lo) if hi - 4096 > lo else (lo,)  # look near hi first: cheaper
        for start in starts:
            last = None
            for m in pattern.finditer(s, start, hi + 1):
                if ok is None or ok(s, m.end()):
                    last = m.end()
            if last is not None:
                return last
    return hi


def split_for_encoding(s: str) -> List[str]:
    """``s`` in consecutive parts that tiktoken encodes quickly. For any ordinary text the parts' ids put end to
    end are the ids of ``s``; only a run of more than MAX_RUN whitespace characters, or of that many letters
    (or digits) with nothing between them, is cut where the cut may change a piece."""
    if len(s) <= MAX_RUN:
        return [s]
    cuts = []
    for m in _LONG_RUN.finditer(s):
        at = m.start()
        while m.end() - at > MAX_RUN:
            at = _last_cut(s, at, at + MAX_RUN)
            cuts.append(at)
    parts, start = [], 0
    for end in cuts + [len(s)]:
        while end - start > MAX_CHUNK:
            cut = _last_cut(s, start, start + MAX_CHUNK)
            parts.append(s[start:cut])
            start = cut
        parts.append(s[start:end])
        start = end
    return parts


def _read_ranks(model_path) -> Dict[bytes, int]:
    """The regular tokens of a tiktoken BPE file, checked: every line ``base64 rank``, ranks 0..n-1, each
    token once, and every single byte a token (BPE can then encode any text)."""
    ranks: Dict[bytes, int] = {}
    with open(model_path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                token, rank = base64.b64decode(token, validate=True), int(rank)
            except (ValueError, binascii.Error):
                raise _not_a_tokenizer(model_path, f"line {number} is not 'base64-token rank': "
                                                   f"{line[:80]!r}") from None
            if token in ranks:
                raise _not_a_tokenizer(model_path, f"line {number}: token {token!r} appears twice")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise _not_a_tokenizer(model_path, f"the ranks of its {len(ranks)} tokens are not 0..{len(ranks) - 1}, "
                                           "each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise _not_a_tokenizer(model_path, f"{len(missing)} single bytes are not tokens, e.g. {bytes(missing[:1])!r}")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: byte-level BPE with tiktoken over PAT_STR's pieces, plus 256 special tokens
    numbered from the first id after the regular ones."""

    kind = "llama3"
    pat_str = PAT_STR  # Meta's names for them
    num_reserved_special_tokens = N_SPECIAL

    def __init__(self, model_path: str):
        import tiktoken  # only Llama 3 needs it

        _check_file(model_path)
        ranks = _read_ranks(model_path)
        self.special_tokens: Dict[str, int] = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=os.path.basename(str(model_path)), pat_str=PAT_STR,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.n_words: int = len(ranks) + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]  # Llama 3.1's: a tool call waits for its output
        self.pad_id: int = -1
        # End of text (a base model's end), of turn (a chat model's) and of message (Llama 3.1's tool calls, as
        # Meta's 3.1 code stops on): a set of its own, as Meta's, which research code may add to.
        self.stop_tokens: Set[int] = {self.eos_id, self.eot_id, self.eom_id}

    def encode(self, s: str, bos: bool, eos: bool, allowed_special: Union[str, AbstractSet[str]] = frozenset(),
               disallowed_special: Union[str, Collection[str]] = ()) -> List[int]:
        """``s`` as plain text: a special token's name in it is encoded as the characters it is made of, unless
        allowed_special names it (or is "all"), as Meta's: then as the token. disallowed_special: names that fail
        the encoding if they occur ("all": every special token not allowed)."""
        s = _text(s)
        ids: List[int] = []
        try:
            for part in split_for_encoding(s):
                ids += self.model.encode(part, allowed_special=allowed_special, disallowed_special=disallowed_special)
        except ValueError as e:  # tiktoken's, for a disallowed one
            raise ValueError(f"{str(e).splitlines()[0]} (refused by disallowed_special)") from None
        return self._framed(ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes that aren't whole UTF-8 characters (ids cut mid-character) decode as U+FFFD."""
        return self.model.decode_bytes(self._ids(ids)).decode("utf-8", errors="replace")

    def special_id(self, name: str) -> int:
        if name not in self.special_tokens:
            raise ValueError(f"{name!r} is not a special token of the Llama 3 tokenizer")
        return self.special_tokens[name]
