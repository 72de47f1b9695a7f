"""The runtime on several ranks (real gloo groups in spawned processes): the lockstep loop admits
requests on rank 0 only and every rank decodes the same tokens; a rank that dies makes the others
raise RankLostError at once instead of hanging."""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from graphopt.runtime.distributed import LockstepEngine, RankLostError, run_local

PROMPTS = [[1, 5, 9], [3, 4], [7, 8, 9, 10, 11]]


def _engine():
    from graphopt.models.random import random_model
    from graphopt.runtime.engine import Engine
    return Engine.from_model(random_model(0), block_size=4, max_batch_size=2, num_blocks=32)


def _lockstep(rank, world, out):
    from graphopt.runtime.request import SamplingParams
    loop = LockstepEngine(_engine())
    if rank == 0:
        ids = [loop.add_request(p, SamplingParams(max_new_tokens=6)) for p in PROMPTS]
        assert ids == [0, 1, 2]
    else:
        with pytest.raises(RuntimeError, match="only rank 0 admits requests"):
            loop.add_request([1, 2])
    tokens: dict[int, list[int]] = {}
    steps = 0
    for events in loop.steps():
        steps += 1
        for e in events:
            tokens.setdefault(e.request_id, []).extend(e.new_token_ids)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"tokens": tokens, "steps": steps}))


def test_lockstep_ranks_decode_what_one_process_decodes(tmp_path):
    run_local(_lockstep, 2, str(tmp_path), timeout_s=120, collective_timeout_s=30)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]                       # same steps, same tokens on both ranks
    from graphopt.runtime.request import SamplingParams
    alone = _engine().generate(PROMPTS, SamplingParams(max_new_tokens=6))
    assert [ranks[0]["tokens"][str(i)] for i in range(3)] == alone


def _dies(rank, world, out):
    from graphopt.runtime.request import SamplingParams
    loop = LockstepEngine(_engine())
    if rank == 0:
        loop.add_request(PROMPTS[0], SamplingParams(max_new_tokens=50))
    start = None
    try:
        for i, _ in enumerate(loop.steps()):
            if i == 2 and rank == 1:
                os._exit(0)                            # dies between steps, without a word
            start = time.monotonic()
    except RankLostError as e:
        Path(out, "error.txt").write_text(f"{time.monotonic() - start:.2f}\n{e}")
        raise


def test_a_dead_rank_is_an_error_not_a_hang(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(Exception, match="RankLostError"):
        run_local(_dies, 2, str(tmp_path), timeout_s=120, collective_timeout_s=20)
    waited, message = (tmp_path / "error.txt").read_text().split("\n", 1)
    assert "rank 0: another rank stopped answering" in message and "exiting" in message
    assert float(waited) < 20 and time.monotonic() - t0 < 120


def test_run_local_kills_a_hung_world():
    with pytest.raises(TimeoutError, match="killed"):
        run_local(_sleeps, 2, timeout_s=4)


def _sleeps(rank, world):
    time.sleep(60)
