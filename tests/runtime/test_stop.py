"""Stop strings on decoded text: exact text cut, token cut, nothing streamed that the result drops."""

import pytest

from graphopt.models.tokenizer import load_tokenizer
from graphopt.runtime.stop import StopStrings


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_output_ends_before_the_stop_string(tok):
    ids = tok.encode("hello world, stop here")          # 'he' 'l' 'lo' ' wor' 'ld' ',' ' stop' ' here'
    released, cut = StopStrings(tok, (", stop",)).check(ids, 0, final=False)
    assert cut == "hello world" and tok.decode(ids[:released]) == "hello world"


def test_a_token_straddling_the_stop_string_is_dropped(tok):
    ids = tok.encode("hello world, stop here")
    released, cut = StopStrings(tok, ("world",)).check(ids, 0, final=False)
    assert cut == "hello "                              # the text is cut exactly
    assert tok.decode(ids[:released]) == "hello"        # ' wor' holds the space and the stop's start


def test_the_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode("hello world, stop here")
    assert StopStrings(tok, ("here", "lo w")).check(ids, 0, final=True)[1] == "hel"


def test_a_possible_stop_string_start_is_held_back(tok):
    stops = StopStrings(tok, ("world",))
    ids = tok.encode("hello wor")
    released, cut = stops.check(ids, 0, final=False)
    assert cut is None and tok.decode(ids[:released]) == "hello"
    assert stops.check(ids, released, final=True) == (len(ids), None)   # no more tokens: release all
    ids = tok.encode("hello worm")
    assert stops.check(ids, released, final=False) == (len(ids), None)  # 'worm' cannot grow into it


def test_an_incomplete_utf8_character_is_held_back(tok):
    first_byte, second_byte = tok.encode("é")           # byte-level: 0xC3, 0xA9
    a = tok.encode("a")
    stops = StopStrings(tok, ("zzz",))
    assert stops.check(a + [first_byte], 0, final=False) == (1, None)
    assert stops.check(a + [first_byte, second_byte], 1, final=False) == (3, None)


def test_released_tokens_are_never_taken_back(tok):
    ids = tok.encode("abc stop")
    assert StopStrings(tok, ("stop",)).check(ids, 2, final=False)[0] >= 2
