"""Tokenizers behind one interface: ``encode(s, bos, eos)``, ``decode(ids)``, the special ids, ``n_words``,
``stop_tokens`` and ``kind`` (which names the chat format that goes with it).

``Tokenizer(path)`` reads Meta's ``tokenizer.model`` (SentencePiece for Llama 1/2 and Code Llama).
"""

import os
from typing import List, Sequence

from sentencepiece import SentencePieceProcessor


class Tokenizer:
    """Meta's SentencePiece tokenizer (Llama 1/2, Code Llama)."""

    kind = "llama2"

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise ValueError(f"tokenizer file {model_path!r} does not exist: pass the path to Meta's "
                             "tokenizer.model with --tokenizer_path")
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path!r} is not a SentencePiece tokenizer model ({e}): pass Meta's "
                             "tokenizer.model") from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()

    @property
    def stop_tokens(self) -> frozenset:
        """Ids that end a generation."""
        return frozenset({self.eos_id})

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        if not isinstance(s, str):
            raise ValueError(f"can only encode a str, got {type(s).__name__}")
        ids = self.sp_model.encode(s)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp_model.decode(list(ids))
