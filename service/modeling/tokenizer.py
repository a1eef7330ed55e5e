"""Thin wrapper over a HF `tokenizers` tokenizer.json: training, batch encoding, padding-free token id lists."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

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
    """Encodes texts to token id lists without padding; the model side packs them."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        pad = tokenizer.token_to_id(PAD)
        self.pad_id = 0 if pad is None else pad
        unk = tokenizer.token_to_id(UNK)
        # An empty-after-normalisation text still needs one token, or the text would have nothing to pool.
        self.fallback_id = self.pad_id if unk is None else unk

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

    def encode_batch(self, texts: list[str], max_length: int) -> list[Encoded]:
        """Batch encode (Rust, releases the GIL); ids are cut to max_length, the original length is kept."""
        out = []
        for enc in self.tokenizer.encode_batch(texts, add_special_tokens=True):
            ids = enc.ids or [self.fallback_id]
            out.append(Encoded(ids=ids[:max_length], original_length=len(ids)))
        return out
