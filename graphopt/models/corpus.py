"""Text corpus for the embedded default model: the Python standard library's own source.

Why this text: every machine that runs graphopt already has it, so the default model trains on
real, structured text with no download. It is also close to what the model is asked to
complete in examples (Python code).

Which files (`stdlib_files`): every `*.py` under `sysconfig.get_paths()["stdlib"]`, minus
third-party code (`site-packages`, `dist-packages`), the test suites (any folder named `test`,
`tests` or `idle_test`, which covers `test/`, `unittest/test/`, `lib2to3/tests/`,
`idlelib/idle_test/`, ...) and `__pycache__`. Files that are not valid UTF-8 are skipped (a few
deliberately use legacy encodings). The list is sorted by path relative to the stdlib root
(POSIX form), so it is the same on every run.

Held-out split (`split_files`), by WHOLE top-level package or module, never by file, so the
held-out text is code the model has not seen any part of: a file is held out when the first
part of its relative path (`email/parser.py` -> `email`, `json.py` -> `json`) is one of

    asyncio, email, json, xml            (HELDOUT_TOP_LEVEL)

These exist in every CPython from 3.10 on and together are about 10% of the stdlib's bytes
(3.11: 9.7% of the tokens). `build_corpus` refuses to write a corpus whose held-out part is
under 5% of the tokens (MIN_HELDOUT_FRACTION) and records the actual fraction in meta.json.

Document format: every file becomes one document, the special token `<|file|>` (id 1) followed
by the file's text exactly as stored (no newline translation, no path header); documents are
concatenated in file-list order. The same format is used for the token files and for the
held-out evaluation text.

Outputs of `build_corpus(out_dir)`, each written atomically (temporary name, then os.replace):

    train.bin, heldout.bin   token ids, little-endian uint16, no header
    tokenizer.json           the tokenizer the ids belong to
    meta.json                token and file counts, held-out fraction, Python version, vocab size

Build everything (about 20 s on 2 cores):

    python -m graphopt.models.corpus --out .cache/corpus

It writes only under --out (the held-out text too: OUT/heldout.txt), never into the installed
package. Refreshing the shipped files is explicit:
`--tokenizer-out graphopt/models/tiny/tokenizer.json --heldout-text graphopt/models/data/heldout.txt`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tqdm import tqdm

from graphopt.models.fileio import write_file_atomically
from graphopt.models.tokenizer import FILE_TOKEN, Tokenizer, train_tokenizer

__all__ = [
    "HELDOUT_TOP_LEVEL",
    "MIN_HELDOUT_FRACTION",
    "build_corpus",
    "split_files",
    "stdlib_files",
    "stdlib_root",
    "top_level_name",
    "write_heldout_text",
]

HELDOUT_TOP_LEVEL = ("asyncio", "email", "json", "xml")
MIN_HELDOUT_FRACTION = 0.05

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_TOKEN_DTYPE = np.dtype("<u2")  # little-endian uint16 on every host


def stdlib_root() -> Path:
    """The running interpreter's standard library folder (the base one, even inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """All library `*.py` files under `root` (default: the stdlib), sorted by relative path.

    Excludes folders named site-packages, dist-packages, test, tests, idle_test and
    __pycache__ at any depth. Skips files that are not valid UTF-8 (each file is read once to
    check), so every returned file can be decoded by `_read_text`.
    """
    root = Path(root) if root is not None else stdlib_root()
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        if _read_text(path) is None:
            continue
        found.append((rel.as_posix(), path))
    return [path for _, path in sorted(found)]


def top_level_name(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """The top-level module a stdlib file belongs to: `email/mime/text.py` -> `email`."""
    root = Path(root) if root is not None else stdlib_root()
    first = Path(path).relative_to(root).parts[0]
    return first.removesuffix(".py")


def split_files(
    files: Sequence[Path], root: str | os.PathLike | None = None
) -> tuple[list[Path], list[Path]]:
    """Split into (train, heldout) by whole top-level package; order within each is kept."""
    train, heldout = [], []
    for path in files:
        (heldout if top_level_name(path, root) in HELDOUT_TOP_LEVEL else train).append(path)
    return train, heldout


def build_corpus(
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer | tokenizers.Tokenizer | None = None,
    vocab_size: int = 8192,
    *,
    root: str | os.PathLike | None = None,
    tokenizer_out: str | os.PathLike | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Tokenize the stdlib into out_dir/{train,heldout}.bin, tokenizer.json and meta.json.

    With no `tokenizer`, trains one with `vocab_size` on the TRAIN split only (so held-out text
    never shapes the vocabulary) and also saves it to `tokenizer_out` when given. Raises
    ValueError if the held-out part is under MIN_HELDOUT_FRACTION of the tokens. Returns the
    meta dict that is written to meta.json.
    """
    out_dir = Path(out_dir)
    if isinstance(tokenizer, Tokenizer) and not tokenizer.is_graphopt_layout:
        raise ValueError(f"{tokenizer!r} is an external tokenizer: graphopt corpus files start every document "
                         f"with {FILE_TOKEN!r} at id 1, so they need a tokenizer in graphopt's layout (leave "
                         "--tokenizer out to train one)")
    root = Path(root) if root is not None else stdlib_root()
    train_files, heldout_files = split_files(stdlib_files(root), root)
    if not train_files or not heldout_files:
        raise ValueError(f"no train or no held-out files under {root}: {len(train_files)}/{len(heldout_files)}")
    train_texts = [_read_text(p) for p in tqdm(train_files, desc="read train", disable=not progress)]
    heldout_texts = [_read_text(p) for p in tqdm(heldout_files, desc="read heldout", disable=not progress)]

    if tokenizer is None:
        if progress:
            print(f"training BPE tokenizer (vocab {vocab_size}) on {len(train_texts)} files", file=sys.stderr)
        tokenizer = Tokenizer(train_tokenizer(train_texts, vocab_size=vocab_size))
        if tokenizer_out is not None:
            tokenizer.save(tokenizer_out)
    elif isinstance(tokenizer, tokenizers.Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    if tokenizer.vocab_size > np.iinfo(_TOKEN_DTYPE).max + 1:
        raise ValueError(f"vocab of {tokenizer.vocab_size} does not fit the uint16 token files")

    train_ids = _encode_documents(tokenizer, train_texts, batch_size, "tokenize train", progress)
    heldout_ids = _encode_documents(tokenizer, heldout_texts, batch_size, "tokenize heldout", progress)
    fraction = len(heldout_ids) / (len(train_ids) + len(heldout_ids))
    if fraction < MIN_HELDOUT_FRACTION:
        raise ValueError(
            f"held-out split {HELDOUT_TOP_LEVEL} is {fraction:.2%} of the tokens, "
            f"under the required {MIN_HELDOUT_FRACTION:.0%}"
        )

    tokenizer_json = tokenizer.backend.to_str(pretty=False).encode("utf-8")
    meta = {
        "format": "little-endian uint16 token ids, no header",
        "document_marker": FILE_TOKEN,
        "train_tokens": len(train_ids),
        "heldout_tokens": len(heldout_ids),
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "heldout_fraction": round(fraction, 6),
        "heldout_top_level": list(HELDOUT_TOP_LEVEL),
        "python_version": platform.python_version(),
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": hashlib.sha256(tokenizer_json).hexdigest(),
    }
    write_file_atomically(out_dir / "train.bin", train_ids.tobytes())
    write_file_atomically(out_dir / "heldout.bin", heldout_ids.tobytes())
    write_file_atomically(out_dir / "tokenizer.json", tokenizer_json)
    # Written last: a meta.json present means the files next to it are complete.
    write_file_atomically(out_dir / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return meta


def write_heldout_text(
    path: str | os.PathLike,
    max_bytes: int = 2_000_000,
    *,
    root: str | os.PathLike | None = None,
) -> dict:
    """Write the held-out evaluation text: whole held-out files, in order, up to `max_bytes`.

    Takes the longest prefix of the held-out file list whose documents (`<|file|>` + text,
    the corpus format) fit in `max_bytes` of UTF-8. The file is shipped, so evaluation reads
    the same text on every machine whatever its Python version. Returns file and byte counts.
    """
    root = Path(root) if root is not None else stdlib_root()
    _, heldout_files = split_files(stdlib_files(root), root)
    chunks, used = [], 0
    for file in heldout_files:
        chunk = _document(_read_text(file)).encode("utf-8")
        if used + len(chunk) > max_bytes:
            break  # a prefix, not a best fit: later files never jump the queue
        chunks.append(chunk)
        used += len(chunk)
    if not chunks:
        raise ValueError(f"the first held-out file alone is over max_bytes={max_bytes}")
    write_file_atomically(path, b"".join(chunks))
    return {"files": len(chunks), "of_files": len(heldout_files), "bytes": used}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m graphopt.models.corpus",
        description="Build the stdlib corpus, tokenizer and held-out text for the default model.",
    )
    parser.add_argument("--out", type=Path, default=Path(".cache/corpus"), help="folder for *.bin and meta.json")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokenizer", type=Path, help="use this tokenizer.json instead of training one")
    parser.add_argument("--tokenizer-out", type=Path,
                        help="also save the trained tokenizer here (it is always in OUT/tokenizer.json)")
    parser.add_argument("--heldout-text", type=Path, help="held-out evaluation text (default: OUT/heldout.txt)")
    parser.add_argument("--max-heldout-bytes", type=int, default=2_000_000)
    parser.add_argument("--stdlib", type=Path, help="library folder to read (default: this interpreter's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    tokenizer = Tokenizer.from_file(args.tokenizer) if args.tokenizer else None
    meta = build_corpus(
        args.out,
        tokenizer,
        args.vocab_size,
        root=args.stdlib,
        tokenizer_out=None if tokenizer else args.tokenizer_out,
        progress=not args.quiet,
    )
    heldout_text = args.heldout_text or args.out / "heldout.txt"
    text = write_heldout_text(heldout_text, args.max_heldout_bytes, root=args.stdlib)
    print(json.dumps({"corpus": str(args.out), **meta, "heldout_text": {"path": str(heldout_text), **text}}, indent=2))
    return 0


def _read_text(path: Path) -> str | None:
    """File text exactly as stored (no newline translation), or None if not valid UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def _document(text: str) -> str:
    return FILE_TOKEN + text


def _encode_documents(
    tokenizer: Tokenizer, texts: list[str], batch_size: int, desc: str, progress: bool
) -> np.ndarray:
    """Token ids of all documents concatenated: [n_tokens] uint16."""
    parts = []
    with tqdm(total=len(texts), desc=desc, unit="file", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            batch = [_document(t) for t in texts[start : start + batch_size]]
            for ids in tokenizer.encode_batch(batch):
                parts.append(np.asarray(ids, dtype=_TOKEN_DTYPE))
            bar.update(len(batch))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=_TOKEN_DTYPE)


if __name__ == "__main__":
    sys.exit(main())
