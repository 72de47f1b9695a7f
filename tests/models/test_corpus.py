"""Tests for graphopt.models.corpus: file selection, the whole-package split, built outputs.

The full build (about 20 s) is not run here; building is tested on a small synthetic
"stdlib" folder, and the real stdlib is only listed and measured.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from graphopt.models import corpus
from graphopt.models.corpus import (
    HELDOUT_TOP_LEVEL,
    MIN_HELDOUT_FRACTION,
    build_corpus,
    split_files,
    stdlib_files,
    stdlib_root,
    top_level_name,
    write_heldout_text,
)
from graphopt.models.tokenizer import FILE_TOKEN, Tokenizer

_TRAIN_CODE = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n"
_HELDOUT_CODE = "QJX = 'QJXQJXQJX'\nprint(QJX)\n"  # letters the train files never use


@pytest.fixture
def fake_stdlib(tmp_path) -> Path:
    """A tiny stdlib-shaped tree with one example of every kind of file to keep or drop."""
    root = tmp_path / "lib"
    files = {
        # kept, train
        "os.py": _TRAIN_CODE * 20,
        "collections/__init__.py": _TRAIN_CODE * 20,
        "collections/abc.py": _TRAIN_CODE * 20,
        "unittest/case.py": _TRAIN_CODE * 20,
        # kept, held out (whole packages / modules)
        "json/__init__.py": _HELDOUT_CODE * 6,
        "json/decoder.py": _HELDOUT_CODE * 6,
        "email/mime/text.py": _HELDOUT_CODE * 6,
        # dropped
        "test/test_os.py": "x = 1\n",
        "unittest/test/test_case.py": "x = 1\n",
        "idlelib/idle_test/test_editor.py": "x = 1\n",
        "lib2to3/tests/test_parser.py": "x = 1\n",
        "site-packages/thirdparty.py": "x = 1\n",
        "dist-packages/other.py": "x = 1\n",
        "__pycache__/os.cpython-311.py": "x = 1\n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "latin1_module.py").write_bytes(b"# caf\xe9\nx = 1\n")  # not UTF-8: skipped
    return root


def _rel(paths, root):
    return [p.relative_to(root).as_posix() for p in paths]


def test_stdlib_files_keeps_library_code_only(fake_stdlib):
    assert _rel(stdlib_files(fake_stdlib), fake_stdlib) == [
        "collections/__init__.py",
        "collections/abc.py",
        "email/mime/text.py",
        "json/__init__.py",
        "json/decoder.py",
        "os.py",
        "unittest/case.py",
    ]


def test_real_stdlib_list_is_deterministic_and_excludes_tests():
    root = stdlib_root()
    files = stdlib_files()
    assert files == stdlib_files(root)
    rel = _rel(files, root)
    assert rel == sorted(rel)
    assert "os.py" in rel and "json/decoder.py" in rel
    for path in rel:
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(path.split("/")[:-1])
    # The exclusion does remove something when the interpreter ships its test suite.
    if (root / "test" / "test_os.py").exists():
        assert "test/test_os.py" not in rel


def test_top_level_name(fake_stdlib):
    assert top_level_name(fake_stdlib / "email/mime/text.py", fake_stdlib) == "email"
    assert top_level_name(fake_stdlib / "os.py", fake_stdlib) == "os"
    assert top_level_name(fake_stdlib / "json/__init__.py", fake_stdlib) == "json"


def test_split_is_by_whole_package_on_real_stdlib():
    root = stdlib_root()
    train, heldout = split_files(stdlib_files(root), root)
    train_tops = {top_level_name(p, root) for p in train}
    heldout_tops = {top_level_name(p, root) for p in heldout}
    assert heldout_tops == set(HELDOUT_TOP_LEVEL)
    assert not train_tops & heldout_tops
    assert len(train) + len(heldout) == len(stdlib_files(root))


def test_heldout_is_at_least_5_percent_of_real_stdlib():
    """Measured in bytes, a proxy for tokens (tokenizing 12 MB would take ~15 s).

    The real build checks the token fraction itself (3.11: 9.7% of the tokens).
    """
    root = stdlib_root()
    train, heldout = split_files(stdlib_files(root), root)
    train_bytes = sum(p.stat().st_size for p in train)
    heldout_bytes = sum(p.stat().st_size for p in heldout)
    assert heldout_bytes / (train_bytes + heldout_bytes) >= MIN_HELDOUT_FRACTION


def test_build_corpus_writes_token_files_and_meta(fake_stdlib, tmp_path):
    out = tmp_path / "corpus"
    tok_out = tmp_path / "tok" / "tokenizer.json"
    meta = build_corpus(out, vocab_size=300, root=fake_stdlib, tokenizer_out=tok_out, progress=False)

    assert sorted(os.listdir(out)) == ["heldout.bin", "meta.json", "tokenizer.json", "train.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert (meta["train_files"], meta["heldout_files"]) == (4, 3)
    assert meta["vocab_size"] <= 300

    tok = Tokenizer.from_file(tok_out)
    train_ids = np.fromfile(out / "train.bin", dtype="<u2")
    heldout_ids = np.fromfile(out / "heldout.bin", dtype="<u2")
    assert (len(train_ids), len(heldout_ids)) == (meta["train_tokens"], meta["heldout_tokens"])
    assert meta["heldout_fraction"] == pytest.approx(len(heldout_ids) / (len(train_ids) + len(heldout_ids)), abs=1e-6)
    # Every document starts with the file marker, and the ids decode to the files' text.
    assert train_ids[0] == heldout_ids[0] == tok.file_token_id
    assert (heldout_ids == tok.file_token_id).sum() == 3
    train_files, _ = split_files(stdlib_files(fake_stdlib), fake_stdlib)
    train_text = "".join(FILE_TOKEN + p.read_text() for p in train_files)
    assert tok.decode(train_ids.tolist()) == train_text


def test_tokenizer_is_trained_on_train_split_only(fake_stdlib, tmp_path):
    build_corpus(tmp_path / "c", vocab_size=300, root=fake_stdlib, progress=False)
    tok = Tokenizer.from_file(tmp_path / "c" / "tokenizer.json")
    # "QJX" is frequent in the held-out files only; no merge may have learned from it.
    learned = [t for t in tok.backend.get_vocab() if len(t) > 1 and not t.startswith("<|")]
    assert learned
    assert not [t for t in learned if {"Q", "J", "X"} & set(t)]


def test_build_corpus_refuses_a_too_small_heldout_split(fake_stdlib, tmp_path):
    (fake_stdlib / "os.py").write_text(_TRAIN_CODE * 2000)
    with pytest.raises(ValueError, match="held-out"):
        build_corpus(tmp_path / "c", vocab_size=300, root=fake_stdlib, progress=False)
    assert not (tmp_path / "c" / "meta.json").exists()


def test_heldout_text_is_a_prefix_of_whole_files(fake_stdlib, tmp_path):
    path = tmp_path / "heldout.txt"
    doc = (FILE_TOKEN + _HELDOUT_CODE * 6).encode("utf-8")  # every fake held-out file is this
    info = write_heldout_text(path, max_bytes=2 * len(doc) + 10, root=fake_stdlib)
    assert info == {"files": 2, "of_files": 3, "bytes": 2 * len(doc)}
    assert path.read_bytes() == doc * 2
    assert sorted(os.listdir(tmp_path)) == ["heldout.txt", "lib"]  # no temp file left behind
    with pytest.raises(ValueError, match="max_bytes"):
        write_heldout_text(path, max_bytes=len(doc) - 1, root=fake_stdlib)


def test_shipped_heldout_text_is_small_and_in_corpus_format():
    path = Path(corpus.__file__).parent / "data" / "heldout.txt"
    data = path.read_bytes()
    assert 0 < len(data) <= 2_000_000
    text = data.decode("utf-8")
    assert text.startswith(FILE_TOKEN)
    assert text.count(FILE_TOKEN) > 10  # many whole files, not one truncated one
