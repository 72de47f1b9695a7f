"""Tests for graphopt.models.tokenizer: exact round trips, fixed special ids, clear errors."""

import json
import os
import string
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from external_tokenizer import write_external_tokenizer
from graphopt.models import tokenizer as tokmod
from graphopt.models.tokenizer import (
    EOS_TOKEN,
    FILE_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

SNIPPET = '''\
def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out


if __name__ == "__main__":
    print(fibonacci(10))  # café ✓
'''


@pytest.fixture(scope="module")
def small_tok() -> Tokenizer:
    """A 512-token tokenizer trained on three small stdlib modules (fast: well under 1 s)."""
    texts = [Path(m.__file__).read_text(encoding="utf-8") for m in (json.decoder, textwrap, string)]
    return Tokenizer(train_tokenizer(texts, vocab_size=512))


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trips_arbitrary_unicode(small_tok, text):
    assert small_tok.decode(small_tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.one_of(st.text(max_size=20), st.sampled_from(SPECIAL_TOKENS))))
def test_round_trips_text_containing_special_token_strings(small_tok, pieces):
    text = "".join(pieces)
    assert small_tok.decode(small_tok.encode(text)) == text


def test_special_token_ids_are_fixed(small_tok):
    assert [small_tok.backend.token_to_id(t) for t in (EOS_TOKEN, FILE_TOKEN, PAD_TOKEN)] == [0, 1, 2]
    assert (small_tok.eos_token_id, small_tok.file_token_id, small_tok.pad_token_id) == (0, 1, 2)
    # A special token in text is one id, not spelled out byte by byte.
    assert small_tok.encode(FILE_TOKEN + "x" + EOS_TOKEN) == [1, *small_tok.encode("x"), 0]


def test_trained_vocab_respects_requested_size(small_tok):
    # 256 byte symbols + 3 specials are always present; merges fill up to the request.
    assert 259 < small_tok.vocab_size <= 512
    ids = small_tok.encode(SNIPPET)
    assert max(ids) < small_tok.vocab_size
    assert len(ids) < len(SNIPPET.encode("utf-8"))  # merges actually compress code


@pytest.mark.parametrize("bad_size", [100, 258, 70_000])
def test_rejects_vocab_size_out_of_range(bad_size):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=bad_size)


def test_rejects_a_single_string_as_texts():
    with pytest.raises(TypeError):
        train_tokenizer("def f(): pass", vocab_size=300)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_file(missing)


@pytest.mark.parametrize("content", ["{not json", '{"version": "1.0"}', ""])
def test_corrupt_file_gives_value_error_naming_the_path(tmp_path, content):
    bad = tmp_path / "broken_tokenizer.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match="broken_tokenizer.json"):
        Tokenizer.from_file(bad)


def test_file_with_wrong_special_ids_is_rejected(tmp_path, small_tok):
    # Same tokenizer, but <|pad|> and <|endoftext|> swapped in the vocabulary.
    data = json.loads(small_tok.backend.to_str())
    for added in data["added_tokens"]:
        added["id"] = {0: 2, 2: 0}.get(added["id"], added["id"])
    vocab = data["model"]["vocab"]
    vocab[EOS_TOKEN], vocab[PAD_TOKEN] = vocab[PAD_TOKEN], vocab[EOS_TOKEN]
    path = tmp_path / "swapped.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="swapped.json.*expected 0"):
        Tokenizer.from_file(path)


def test_save_is_atomic_and_reloads_identically(tmp_path, small_tok):
    path = tmp_path / "tokenizer.json"
    path.write_text("old contents")
    small_tok.save(path)
    assert os.listdir(tmp_path) == ["tokenizer.json"]  # no temp file left behind
    again = Tokenizer.from_file(path)
    assert again.encode(SNIPPET) == small_tok.encode(SNIPPET)
    assert again.vocab_size == small_tok.vocab_size


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, small_tok, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("old contents")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tokmod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        small_tok.save(path)
    assert os.listdir(tmp_path) == ["tokenizer.json"]
    assert path.read_text() == "old contents"


def test_shipped_tokenizer_loads_and_round_trips_python():
    tok = load_tokenizer()
    assert tok.vocab_size == 8192
    assert (tok.eos_token_id, tok.file_token_id, tok.pad_token_id) == (0, 1, 2)
    ids = tok.encode(SNIPPET)
    assert tok.decode(ids) == SNIPPET
    # Trained on Python: common code is several bytes per token.
    assert len(SNIPPET.encode("utf-8")) / len(ids) > 2.5
    assert len(tok.encode("return")) == 1


def test_missing_packaged_tokenizer_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(tokmod, "_PACKAGED_PATH", ("tiny", "not_built_yet.json"))
    with pytest.raises(FileNotFoundError, match="python -m graphopt.models.corpus"):
        load_tokenizer()


def test_an_external_checkpoint_tokenizer_loads_with_its_own_special_ids(tmp_path):
    tok = Tokenizer.from_file(write_external_tokenizer(tmp_path))
    assert not tok.is_graphopt_layout and "external" in repr(tok)
    assert tok.eos_token_id == 1 and tok.pad_token_id is None
    ids = tok.encode(SNIPPET)
    assert ids[0] != 0 and tok.decode(ids) == SNIPPET          # no BOS added; exact round trip
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(SNIPPET) == ids
    (tmp_path / "copy").mkdir()
    tok.save(tmp_path / "copy" / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path / "copy" / "tokenizer.json")   # eos kept in its tokenizer_config.json
    assert again.eos_token_id == 1 and again.encode(SNIPPET) == ids
    with pytest.raises(ValueError, match="no <|file|> document marker"):
        tok.file_token_id


def test_an_external_tokenizer_without_a_config_has_no_eos(tmp_path):
    tok = Tokenizer.from_file(write_external_tokenizer(tmp_path, with_config=False))
    assert tok.eos_token_id is None and tok.pad_token_id is None


@pytest.mark.parametrize("config, match", [
    ("{not json", "corrupt .*tokenizer_config.json"),
    ('["eos"]', "expected a JSON object"),
    ('{"eos_token": 5}', "eos_token must be a string"),
    ('{"eos_token": "<none-such>"}', "eos token '<none-such>' is not in its vocabulary"),
])
def test_a_bad_tokenizer_config_is_refused_naming_the_file(tmp_path, config, match):
    path = write_external_tokenizer(tmp_path, with_config=False)
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_file(path)


def test_an_external_tokenizer_cannot_write_corpus_files(tmp_path):
    from graphopt.models.corpus import build_corpus
    tok = Tokenizer.from_file(write_external_tokenizer(tmp_path))
    with pytest.raises(ValueError, match="external tokenizer.*graphopt's layout"):
        build_corpus(tmp_path / "corpus", tok, root=tmp_path / "no-such-stdlib")
