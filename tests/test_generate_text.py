"""CompiledModel.generate / stream with text: the embedded tokenizer by default, eos, stop strings
that end inside a multi-token speculative step, streamed text that adds up to the final text."""

import pytest
import torch

import graphopt
from graphopt.models import load, load_tokenizer
from graphopt.runtime.request import SamplingParams

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef main(", "class Stack:\n    def push(self, item):\n"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def compiled():
    """The embedded model with MTP drafts, k = 2: accepted steps emit up to 3 tokens."""
    return graphopt.compile(load(dtype=torch.float32), spec=graphopt.SpecConfig(num_speculative_tokens=2),
                            progress=False)


def _steps(compiled, ids, n):
    """Token groups of each engine step for one prompt (no stop strings, eos ignored)."""
    engine = compiled.engine(max_batch_size=1)
    engine.add_request(ids, SamplingParams(max_new_tokens=n))
    groups = []
    while engine.has_unfinished():
        groups += [e.new_token_ids for e in engine.step() if e.new_token_ids]
    return groups


def test_text_in_text_out_with_the_embedded_tokenizer(compiled, tok):
    assert compiled.tokenizer is not None                 # found by config: the embedded model
    ids = [tok.encode(p) for p in PROMPTS]
    out_ids = compiled.generate(ids, max_new_tokens=12, ignore_eos=True)
    assert compiled.generate(PROMPTS, max_new_tokens=12, ignore_eos=True) == [tok.decode(o) for o in out_ids]
    assert compiled.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True) == tok.decode(out_ids[0])


def test_text_ends_before_the_eos(compiled, tok):
    out = compiled.generate([tok.encode(PROMPTS[0])], max_new_tokens=40, ignore_eos=True)[0]
    eos = out[7]
    text = compiled.generate(PROMPTS[0], max_new_tokens=40, eos_token_id=eos)
    assert text == tok.decode(out[:out.index(eos)])


def test_a_stop_string_ending_inside_a_multi_token_step_emits_nothing_after_it(compiled, tok):
    ids = tok.encode(PROMPTS[0])
    groups = _steps(compiled, ids, 40)
    full = [t for g in groups for t in g]
    text = tok.decode(full)
    # a 2-character stop string ending in the first token of a step of >= 2 tokens, found nowhere earlier
    chosen = None
    for s, g in enumerate(groups):
        before = sum(len(x) for x in groups[:s])              # tokens emitted by earlier steps
        start = len(tok.decode(full[:before]))
        stop = text[start - 1:start + 1]
        if len(g) >= 2 and start >= 1 and len(stop) == 2 and text.find(stop) == start - 1:
            chosen = (before, stop)
            break
    assert chosen is not None, "no multi-token step to test with"
    before, stop = chosen
    cut = text[:text.find(stop)]
    got_ids = compiled.generate([ids], max_new_tokens=40, stop=stop, ignore_eos=True)[0]
    assert got_ids == full[:len(got_ids)] and len(got_ids) <= before   # nothing from the stop's step on
    assert compiled.generate(PROMPTS[0], max_new_tokens=40, stop=stop, ignore_eos=True) == cut
    pieces = "".join(p for _, p in compiled.stream([PROMPTS[0]], max_new_tokens=40, stop=stop, ignore_eos=True))
    assert pieces == cut and stop not in pieces


def test_streamed_text_adds_up_to_generate(compiled):
    want = compiled.generate(PROMPTS, max_new_tokens=20, stop="\n\n")
    got = ["", "", ""]
    for i, piece in compiled.stream(PROMPTS, max_new_tokens=20, stop="\n\n"):
        assert piece
        got[i] += piece
    assert got == want
