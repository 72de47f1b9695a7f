"""Byte-level BPE tokenizer for the embedded default model.

The default model is trained on Python source (see `graphopt.models.corpus`), so it needs a
tokenizer we can build offline from text we already have. We use the `tokenizers` library's
byte-level BPE: the ByteLevel pre-tokenizer maps every byte to a printable character before
merging and the ByteLevel decoder maps them back, so no text is ever "unknown" and
`decode(encode(text)) == text` for any string (no normaliser, no prefix space).

Special tokens, with fixed ids that the model and the corpus files rely on:

    id 0  <|endoftext|>   end of sequence (`eos_token_id`)
    id 1  <|file|>        document marker: starts every file in the corpus
    id 2  <|pad|>         padding for batched prompts (`pad_token_id`)

If any of these strings appears literally in the text it is encoded as the special id and
decoded back to the same string, so round trips stay exact.

The shipped tokenizer lives at `graphopt/models/tiny/tokenizer.json`; build it with
`python -m graphopt.models.corpus`.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .fileio import write_file_atomically

__all__ = [
    "EOS_TOKEN",
    "FILE_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "load_tokenizer",
    "train_tokenizer",
    "tokenizer_for",
]

EOS_TOKEN = "<|endoftext|>"
FILE_TOKEN = "<|file|>"
PAD_TOKEN = "<|pad|>"
# Order is the id: the trainer assigns special tokens ids 0, 1, 2 in this order.
SPECIAL_TOKENS = (EOS_TOKEN, FILE_TOKEN, PAD_TOKEN)

# 256 byte symbols + the special tokens is the smallest useful vocabulary; ids are stored
# as uint16 in the corpus files, so 65536 is the largest.
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
_MAX_VOCAB = 1 << 16

_PACKAGED_PATH = ("tiny", "tokenizer.json")


def train_tokenizer(texts_iterator: Iterable[str], vocab_size: int = 8192) -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer on `texts_iterator` (e.g. one string per file).

    The default model uses 8192 (between 4k and 16k: large enough that Python keywords and
    common identifiers are single tokens, small enough that the embedding stays tiny); tests
    use a few hundred. Returns the raw `tokenizers.Tokenizer`; wrap it in `Tokenizer` to use it.
    """
    if not _MIN_VOCAB <= vocab_size <= _MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [{_MIN_VOCAB}, {_MAX_VOCAB}], got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    # No normaliser and no prefix space: either would change the text and break round trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte gets a token even if the training text never contains it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_as_iterator(texts_iterator), trainer=trainer)
    _check_special_ids(tok, source="trained tokenizer")
    return tok


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the few calls the model code needs."""

    def __init__(self, backend: tokenizers.Tokenizer):
        _check_special_ids(backend, source="tokenizer")
        self.backend = backend

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer.json; FileNotFoundError / ValueError name the path on failure."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"corrupt tokenizer file {path}: {exc}") from exc
        try:
            return cls(backend)
        except ValueError as exc:
            raise ValueError(f"bad tokenizer file {path}: {exc}") from exc

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (compact JSON: this file is shipped)."""
        write_file_atomically(path, self.backend.to_str(pretty=False).encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; the library spreads the batch over all cores."""
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        # Keep special tokens so that text containing "<|file|>" etc. round-trips.
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        return SPECIAL_TOKENS.index(EOS_TOKEN)

    @property
    def file_token_id(self) -> int:
        return SPECIAL_TOKENS.index(FILE_TOKEN)

    @property
    def pad_token_id(self) -> int:
        return SPECIAL_TOKENS.index(PAD_TOKEN)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load `path`, or with no path the tokenizer shipped with graphopt."""
    if path is not None:
        return Tokenizer.from_file(path)
    resource = importlib.resources.files("graphopt.models").joinpath(*_PACKAGED_PATH)
    with importlib.resources.as_file(resource) as packaged:
        if not packaged.is_file():
            raise FileNotFoundError(
                f"the packaged tokenizer {packaged} has not been built yet; build one with "
                "`python -m graphopt.models.corpus --out .cache/corpus` and pass its path "
                "(.cache/corpus/tokenizer.json), or ship it with --tokenizer-out " + str(packaged)
            )
        return Tokenizer.from_file(packaged)


def tokenizer_for(config, tokenizer=None):
    """The tokenizer that goes with a model: `tokenizer` if given (a tokenizer.json path is loaded;
    anything else must have encode(str) -> ids and decode(ids) -> str), else the packaged tokenizer
    when `config` is the embedded model's (MTP layers aside: load(mtp=False) drops them), else None.
    A model does not remember the directory it came from, so the embedded one is known by its config."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    if tokenizer is not None:
        if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
            raise TypeError(f"tokenizer must have encode(str) -> ids and decode(ids) -> str; got "
                            f"{type(tokenizer).__name__}")
        return tokenizer
    from .checkpoint import DEFAULT_MODEL_DIR
    from .config import DeepseekV3Config
    embedded = DeepseekV3Config.from_json(DEFAULT_MODEL_DIR / "config.json")
    if embedded.replace(num_nextn_predict_layers=0) == config.replace(num_nextn_predict_layers=0):
        return load_tokenizer()
    return None


def _as_iterator(texts: Iterable[str]) -> Iterator[str]:
    """Reject a bare string early: iterating it would train on single characters."""
    if isinstance(texts, str):
        raise TypeError("texts_iterator must yield strings, not be a single string")
    return iter(texts)


def _check_special_ids(tok: tokenizers.Tokenizer, source: str) -> None:
    """The corpus files and the model hard-code the special ids; refuse any other layout."""
    for want_id, token in enumerate(SPECIAL_TOKENS):
        got_id = tok.token_to_id(token)
        if got_id != want_id:
            raise ValueError(f"{source}: special token {token!r} has id {got_id}, expected {want_id}")
    if not isinstance(tok.decoder, decoders.ByteLevel):
        raise ValueError(f"{source}: expected a ByteLevel decoder, got {type(tok.decoder).__name__}")
