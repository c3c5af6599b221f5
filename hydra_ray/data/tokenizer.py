"""Tokenizers: byte-level by default (nothing to download), any Hugging Face `tokenizer.json`,
and BPE training on a corpus with the `tokenizers` library.

Design choices
- One small interface: `encode_batch(texts) -> list[list[int]]`, `decode(ids)`, `vocab_size`,
  `eos_id`, `pad_id`. Documents are separated by EOS when packed; PAD only fills the tail of the
  last sequence of a shard and never reaches the loss (labels are -100 there).
- Byte-level ids: 0..255 are the bytes, 256 is <|endoftext|>, 257 is <|pad|>; a model needs
  vocab_size >= 258 (the presets use 264, a multiple of 8).
- `load_tokenizer(spec)` is what Ray Data tasks call; it is cached per process so a map task
  loads a tokenizer.json once, not once per batch.
"""

from __future__ import annotations

import functools
from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"


class ByteTokenizer:
    vocab_size = 258
    eos_id = 256
    pad_id = 257
    name = "byte"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json; EOS/PAD are its <|endoftext|> / <|pad|> tokens
    (PAD falls back to EOS: padding is masked from the loss either way)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.name = str(path)
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for unreadable files
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        self.vocab_size = self.tok.get_vocab_size()
        eos = self.tok.token_to_id(EOS)
        if eos is None:
            raise ValueError(f"{path}: the tokenizer has no {EOS} token to separate documents")
        self.eos_id = eos
        pad = self.tok.token_to_id(PAD)
        self.pad_id = eos if pad is None else pad

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str = "byte"):
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).exists():
        raise ValueError(f"tokenizer {spec!r}: expected 'byte' or the path of a tokenizer.json")
    return HFTokenizer(spec)


def train_bpe(texts, vocab_size: int, out: str | Path) -> HFTokenizer:
    """Byte-level BPE trained on an iterator of texts, saved as a tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 2:
        raise ValueError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least 258")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    load_tokenizer.cache_clear()
    return HFTokenizer(out)
