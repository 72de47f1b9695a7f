"""The server's warm-up: every batch bucket decoded once greedy and once sampled before the port
opens, the engine left empty, and /metrics' acceptance rate counting only what came after it."""

import pytest

pytest.importorskip("fastapi")

import graphopt  # noqa: E402
from graphopt.models.random import random_model  # noqa: E402
from graphopt.runtime.request import SamplingParams  # noqa: E402
from graphopt.serve import EngineLoop, warm_up  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    model = random_model(0, num_hidden_layers=1, eos_token_id=None)
    return graphopt.compile(model, spec=graphopt.SpecConfig(num_speculative_tokens=1), backend="eager",
                            progress=False, max_batch_size=6)


def test_warm_up_decodes_every_bucket_greedy_and_sampled(compiled):
    engine = compiled.engine(max_batch_size=6)
    seen, decode = set(), engine.provider.decode

    def recording(inputs):                       # the real step; only the batch it ran is noted
        seen.add((int(inputs.active.sum()), inputs.greedy))
        return decode(inputs)

    engine.provider.decode = recording
    seconds = warm_up(engine, 6)
    assert seconds > 0 and not engine.has_unfinished()
    assert {(rows, greedy) for rows in (1, 2, 4, 6) for greedy in (True, False)} <= seen
    assert max(rows for rows, _ in seen) == 6
    assert engine.load()["blocks_used"] == 0     # every warm-up request gave its blocks back


def test_acceptance_rate_counts_from_after_the_warm_up(compiled):
    engine = compiled.engine(max_batch_size=2)
    warm_up(engine, 2)
    assert compiled.executable.stats["proposed"] > 0          # the warm-up's own drafts were counted
    loop = EngineLoop(engine)
    assert loop._figures()["acceptance_rate"] is None         # ...but not reported as the server's
    engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=6))
    engine.run_until_done()
    rate = loop._figures()["acceptance_rate"]
    assert rate is not None and 0 <= rate <= 1
