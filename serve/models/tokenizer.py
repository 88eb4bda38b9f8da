"""umT5 tokenizer: Wan's text cleaning + the SentencePiece model of ``google/umt5-xxl``, no transformers dependency.

Equivalence with what Wan2.1 calls (``HuggingfaceTokenizer('google/umt5-xxl', seq_len=512, clean='whitespace')``,
i.e. HF ``T5TokenizerFast(..., padding='max_length', truncation=True, max_length=512, add_special_tokens=True)``):

* Cleaning: ``ftfy.fix_text`` → ``html.unescape`` twice → strip, then collapse every whitespace run to one space and
  strip again. Same order as Wan's ``basic_clean`` + ``whitespace_clean``.
* Pieces: HF's T5 tokenizers (Metaspace pre-tokenizer with a prefix space, or the slow ``legacy`` path) produce the
  same ids as ``SentencePieceProcessor.encode(text)`` on text whose whitespace is already collapsed to single spaces,
  which the cleaning guarantees. The umT5 vocab has no extra ``<extra_id_*>`` handling we need for plain prompts.
* Special tokens: ``</s>`` (id 1) is appended; no BOS. Pad id is 0.
* Truncation: HF truncates the *content* to ``max_length - 1`` and then appends ``</s>``, so a long prompt still
  ends with ``</s>`` at position 511. We do the same.
* Padding: right padding with id 0 up to ``max_length``; the mask is 1 for content and ``</s>``, 0 for padding.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import ftfy
import sentencepiece as spm
import torch
from torch import Tensor

__all__ = ["UMT5Tokenizer", "clean_prompt"]

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's prompt normalisation; also the key of the embedding cache (so ``"a  cat"`` and ``"a cat"`` share)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class UMT5Tokenizer:
    """SentencePiece tokenizer producing fixed-length ``ids`` and ``mask`` tensors for the umT5 encoder."""

    PAD_ID = 0
    EOS_ID = 1

    def __init__(self, path: str | Path, max_length: int = 512) -> None:
        """``path``: ``spiece.model`` or the folder holding it (an HF tokenizer snapshot of ``google/umt5-xxl``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "spiece.model"
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.path = path
        self.max_length = max_length
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        # The encoder's embedding rows 0 and 1 are <pad> and </s>; check by piece so a model whose header leaves
        # pad_id unset (-1) but still has <pad> at id 0 is accepted, and a misaligned vocab is refused loudly.
        pieces = (self.sp.id_to_piece(self.PAD_ID), self.sp.id_to_piece(self.EOS_ID))
        if pieces != ("<pad>", "</s>"):
            raise ValueError(f"{path}: expected pieces ('<pad>', '</s>') at ids 0, 1, got {pieces}")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode_ids(self, text: str) -> list[int]:
        """Clean, tokenize, truncate to ``max_length - 1`` and append ``</s>`` (unpadded)."""
        ids = self.sp.encode(clean_prompt(text))
        return [*ids[: self.max_length - 1], self.EOS_ID]

    def __call__(self, texts: str | list[str]) -> tuple[Tensor, Tensor]:
        """→ ``ids`` [B, max_length] int64, ``mask`` [B, max_length] int64 (1 = real token)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.max_length), self.PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            seq = self.encode_ids(text)
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids, mask
