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

Any other tokenizer.json (a real checkpoint's: DeepSeek-V3's has 129280 ids and its own special
tokens) loads too, as an *external* tokenizer: its eos and pad tokens come from the
`tokenizer_config.json` beside it (transformers' layout: a string or {"content": ...}), else they
are unknown (None); it has no `<|file|>` document marker, so it cannot write graphopt corpus files.
Text is encoded without the tokenizer's added special tokens (no BOS) in both layouts.

The shipped tokenizer lives at `graphopt/models/tiny/tokenizer.json`; build it with
`python -m graphopt.models.corpus`.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
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
    "save_tokenizer_into",
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
    """Thin wrapper over `tokenizers.Tokenizer` with the few calls the model code needs.

    `special`: None for graphopt's own layout (checked: ids 0-2 as above, ByteLevel decoder), or the
    token strings of an external tokenizer, {"eos": ..., "pad": ...} (either may be missing), each of
    which must be in its vocabulary."""

    def __init__(self, backend: tokenizers.Tokenizer, special: dict[str, str] | None = None):
        if special is None:
            _check_special_ids(backend, source="tokenizer")
        else:
            unknown = {role: tok for role, tok in special.items() if role not in ("eos", "pad")}
            if unknown:
                raise ValueError(f"tokenizer: unknown special roles {sorted(unknown)}; accepted: eos, pad")
            for role, token in special.items():
                if backend.token_to_id(token) is None:
                    raise ValueError(f"tokenizer: {role} token {token!r} is not in its vocabulary")
        self.backend = backend
        self.special = None if special is None else dict(special)

    @property
    def is_graphopt_layout(self) -> bool:
        """True for graphopt's own special ids (the embedded model's and the corpus tools')."""
        return self.special is None

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
            if _has_graphopt_layout(backend):
                return cls(backend)
            return cls(backend, _special_tokens_beside(path))
        except ValueError as exc:
            raise ValueError(f"bad tokenizer file {path}: {exc}") from exc

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (compact JSON: this file is shipped); an external tokenizer's
        eos / pad tokens go to the tokenizer_config.json beside it, where from_file reads them."""
        write_file_atomically(path, self.backend.to_str(pretty=False).encode("utf-8"))
        if self.special:
            config = {f"{role}_token": token for role, token in self.special.items()}
            write_file_atomically(Path(path).with_name("tokenizer_config.json"),
                                  (json.dumps(config, indent=1) + "\n").encode("utf-8"))

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
    def eos_token_id(self) -> int | None:
        return SPECIAL_TOKENS.index(EOS_TOKEN) if self.special is None else self._external_id("eos")

    @property
    def file_token_id(self) -> int:
        if self.special is not None:
            raise ValueError("an external tokenizer has no <|file|> document marker: graphopt corpus files need "
                             "a tokenizer in graphopt's layout (train one with `python -m graphopt.models.corpus`)")
        return SPECIAL_TOKENS.index(FILE_TOKEN)

    @property
    def pad_token_id(self) -> int | None:
        return SPECIAL_TOKENS.index(PAD_TOKEN) if self.special is None else self._external_id("pad")

    def _external_id(self, role: str) -> int | None:
        token = self.special.get(role)
        return None if token is None else self.backend.token_to_id(token)

    def __repr__(self) -> str:
        kind = "" if self.special is None else ", external"
        return f"Tokenizer(vocab_size={self.vocab_size}{kind})"


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


def save_tokenizer_into(tokenizer, directory: str | os.PathLike) -> None:
    """Put `tokenizer` (a tokenizer.json path, or an object with .save(path)) into a checkpoint directory
    as tokenizer.json; a path's sibling tokenizer_config.json (where an external tokenizer keeps its eos
    and pad tokens) goes with it."""
    directory = Path(directory)
    if isinstance(tokenizer, (str, os.PathLike)):
        shutil.copyfile(tokenizer, directory / "tokenizer.json")
        config = Path(tokenizer).with_name("tokenizer_config.json")
        if config.is_file():
            shutil.copyfile(config, directory / "tokenizer_config.json")
    else:
        tokenizer.save(str(directory / "tokenizer.json"))


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


def _has_graphopt_layout(tok: tokenizers.Tokenizer) -> bool:
    """True when any of graphopt's special tokens is present: then the whole layout must hold (a file with
    them at other ids is refused, not read as an external tokenizer)."""
    return any(tok.token_to_id(token) is not None for token in SPECIAL_TOKENS[1:])


def _special_tokens_beside(path: Path) -> dict[str, str]:
    """eos / pad token strings from the tokenizer_config.json next to `path`, as transformers writes it."""
    config_path = path.with_name("tokenizer_config.json")
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"corrupt {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    special = {}
    for role in ("eos", "pad"):
        entry = config.get(f"{role}_token")
        if isinstance(entry, dict):
            entry = entry.get("content")
        if entry is None:
            continue
        if not isinstance(entry, str):
            raise ValueError(f"{config_path}: {role}_token must be a string or {{\"content\": ...}}, got {entry!r}")
        special[role] = entry
    return special


def _check_special_ids(tok: tokenizers.Tokenizer, source: str) -> None:
    """The corpus files and the model hard-code the special ids; refuse any other layout."""
    for want_id, token in enumerate(SPECIAL_TOKENS):
        got_id = tok.token_to_id(token)
        if got_id != want_id:
            raise ValueError(f"{source}: special token {token!r} has id {got_id}, expected {want_id}")
    if not isinstance(tok.decoder, decoders.ByteLevel):
        raise ValueError(f"{source}: expected a ByteLevel decoder, got {type(tok.decoder).__name__}")
