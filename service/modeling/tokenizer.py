"""Thin wrapper over a HF `tokenizers` tokenizer.json: training, batch encoding, padding-free token id lists."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, UNK = "[PAD]", "[UNK]"


@dataclass
class Encoded:
    ids: list[int]  # after truncation
    original_length: int  # before truncation

    @property
    def truncated(self) -> bool:
        return self.original_length > len(self.ids)


class TextTokenizer:
    """Encodes texts to token id lists without padding; the model side packs them.

    Special tokens that the tokenizer's post-processor adds around a text (BERT's [CLS] ... [SEP]) are kept when a
    text is truncated: the text's own tokens are cut, as HF tokenizers do, so a pretrained encoder always sees the
    frame it was trained with.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        pad = tokenizer.token_to_id(PAD)
        self.pad_id = 0 if pad is None else pad
        unk = tokenizer.token_to_id(UNK)
        # An empty-after-normalisation text still needs one token, or the text would have nothing to pool.
        self.fallback_id = self.pad_id if unk is None else unk
        self.prefix, self.suffix = self._special_frame()

    def _special_frame(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a single text ([CLS] / [SEP] for BERT; none here)."""
        framed = self.tokenizer.encode("a", add_special_tokens=True).ids
        bare = self.tokenizer.encode("a", add_special_tokens=False).ids
        for i in range(len(framed) - len(bare) + 1):
            if framed[i : i + len(bare)] == bare:
                return framed[:i], framed[i + len(bare) :]
        return [], []

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> TextTokenizer:
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        # The trainer numbers tokens in an order that varies from run to run (hash-map order in Rust), though the
        # vocabulary itself is the same. Renumber deterministically (specials first, then sorted) so the same data
        # gives the same token ids, and so the same model, on every run and machine. WordPiece matching is
        # greedy longest-match and does not depend on the ids.
        vocab = tok.get_vocab()
        specials = [PAD, UNK]
        ordered = specials + sorted(t for t in vocab if t not in specials)
        tok.model = models.WordPiece({t: i for i, t in enumerate(ordered)}, unk_token=UNK)
        return cls(tok)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode_inner(self, texts: list[str]) -> list[list[int]]:
        """The texts' own token ids, without special tokens or truncation (Rust, releases the GIL)."""
        return [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def frame(self, inner: list[int], max_length: int) -> list[int]:
        """Special tokens around a text's own ids, cut so the whole fits in max_length; never empty."""
        room = max(max_length - len(self.prefix) - len(self.suffix), 0)
        ids = self.prefix + inner[:room] + self.suffix
        return ids or [self.fallback_id]

    def encode_batch(self, texts: list[str], max_length: int) -> list[Encoded]:
        """Batch encode; ids are cut to max_length (special tokens kept), the original length is kept."""
        specials = len(self.prefix) + len(self.suffix)
        return [
            Encoded(ids=self.frame(inner, max_length), original_length=max(len(inner) + specials, 1))
            for inner in self.encode_inner(texts)
        ]


def pad_ids(sequences: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id lists to the longest one: (input_ids, attention_mask), both int64 [B, L]. numpy, so the
    torch-free backends use it too; torch wraps the arrays without a copy (one tensor per row cost ~6x more)."""
    length = max(len(s) for s in sequences)
    ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask
