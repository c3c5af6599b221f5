"""Tokenizers: byte-level by default (nothing to download), any Hugging Face `tokenizer.json`,
and BPE training on a corpus with the `tokenizers` library.

Design choices
- One small interface: `encode_batch(texts) -> list[list[int]]`, `decode(ids)`, `vocab_size`,
  `eos_id`, `pad_id`. Documents are separated by EOS when packed; PAD only fills the tail of the
  last sequence of a shard and never reaches the loss (labels are -100 there).
- Byte-level ids: 0..255 are the bytes, 256 is <|endoftext|>, 257 is <|pad|>; a model needs
  vocab_size >= 258 (the presets use 264, a multiple of 8).
- `load_tokenizer(spec)` is what Ray Data tasks call; it is cached per process so a map task
  loads a tokenizer.json once, not once per batch. With the file's sha256 it also refuses a file
  that changed since the run recorded it. The file may be a URI (the copy inside a checkpoint on
  object storage): it is read through hydra_ray.storage, like every other byte of a run.
- A run owns its tokenizer: training copies the file into the run (and into every checkpoint),
  so serving, analysis and `--resume` never depend on the working directory the run started in.
  `find_tokenizer` is the one rule for finding a user's file: the path as given (relative to
  the working directory), else relative to the config file's folder.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from hydra_ray import storage

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

    def token_bytes(self, token: int) -> bytes:
        """The bytes the token stands for in decoded text (none for EOS, PAD and unused ids)."""
        return bytes([token]) if 0 <= token < 256 else b""


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json; EOS/PAD are its <|endoftext|> / <|pad|> tokens
    (PAD falls back to EOS: padding is masked from the loss either way)."""

    def __init__(self, path: str | Path, sha256: str | None = None):
        from tokenizers import Tokenizer

        self.name = str(path)
        try:
            blob = storage.read_bytes(str(path))
        except storage.StorageError as e:  # its message names the location already
            raise ValueError(f"tokenizer: cannot read {e}") from None
        except OSError as e:
            raise ValueError(f"tokenizer {path}: cannot read ({e.strerror or e})") from None
        self.sha256 = hashlib.sha256(blob).hexdigest()
        if sha256 is not None and sha256 != self.sha256:
            raise ValueError(f"tokenizer {path}: the file changed since the run recorded it "
                             f"(sha256 {self.sha256[:12]}..., expected {sha256[:12]}...)")
        try:
            self.tok = Tokenizer.from_str(blob.decode("utf-8"))
        except Exception as e:  # the library raises a bare Exception for unreadable files
            raise ValueError(f"tokenizer {path}: not a readable tokenizer.json ({' '.join(str(e).split())})") from None
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

    def token_bytes(self, token: int) -> bytes:
        """The bytes the token stands for in decoded text: exact for byte-level BPE (a token may
        hold part of a character), else the UTF-8 of the token decoded alone."""
        piece = self.tok.id_to_token(token)
        if piece is None or token in (self.eos_id, self.pad_id):
            return b""
        table = _byte_level_inverse()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return self.tok.decode([token]).encode("utf-8")


@functools.lru_cache(maxsize=1)
def _byte_level_inverse() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), inverted: printable
    bytes stand for themselves, the other bytes in order for chr(256), chr(257), ..."""
    from tokenizers import pre_tokenizers

    as_is = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in as_is]
    table = {chr(b): b for b in as_is} | {chr(256 + i): b for i, b in enumerate(others)}
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet()), "unexpected byte-level alphabet"
    return table


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str = "byte", sha256: str | None = None):
    """'byte', or a tokenizer.json path (checked against `sha256` when given). Raises ValueError."""
    if spec == "byte":
        return ByteTokenizer()
    try:
        found = storage.is_file(spec)
    except storage.StorageError as e:
        raise ValueError(f"tokenizer: cannot read {e}") from None
    if not found:
        raise ValueError(f"tokenizer {spec!r}: no such file (expected 'byte' or the path of a tokenizer.json)")
    return HFTokenizer(spec, sha256)


def find_tokenizer(spec: str, config_path: str | Path | None = None) -> Path | None:
    """The tokenizer.json a config names: None for 'byte'; the path as given, else relative to the
    config file's folder; None when neither exists (the caller decides whether that is an error)."""
    if spec == "byte":
        return None
    p = Path(spec).expanduser()
    candidates = [p]
    if config_path is not None and not p.is_absolute():
        candidates.append(Path(config_path).expanduser().resolve().parent / p)
    return next((c.resolve() for c in candidates if c.is_file()), None)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
