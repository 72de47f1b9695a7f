"""The persistent decode batch: device-side step preparation and membership writes, without a model."""

import torch

from graphopt.runtime.batch import DecodeBatch, HostCopy
from graphopt.runtime.request import Request, SamplingParams
from graphopt.step.contract import SpecStepOutputs


def _out(next_tokens, next_start_pos, finished):
    t = torch.tensor(next_tokens)
    return SpecStepOutputs(out_tokens=t.clone(), num_emitted=torch.ones(len(t), dtype=torch.int64),
                           next_tokens=t, next_start_pos=torch.tensor(next_start_pos),
                           finished=torch.tensor(finished))


def _request(rid, slot, **params):
    r = Request(rid, [1, 2, 3], SamplingParams(**params), seed=rid, needed_positions=8)
    r.slot = slot
    return r


def test_admit_writes_the_rows_sampling_fields_and_clears_stale_state():
    b = DecodeBatch(4, num_speculative_tokens=1, table_width=3, device=torch.device("cpu"))
    b.block_tables.fill_(9)
    b.active.fill_(True)
    b.admit([_request(7, 2, temperature=0.5, top_k=3, eos_token_id=4, max_new_tokens=5)])
    assert b.params["temperature"].tolist() == [0, 0, 0.5, 0] and b.params["top_k"].tolist() == [0, 0, 3, 0]
    assert b.params["seed"][2] == 7 and b.params["eos_token_id"][2] == 4 and b.params["max_pos"][2] == 3 + 5 - 1
    assert b.block_tables[2].tolist() == [0, 0, 0] and b.block_tables[1].tolist() == [9, 9, 9]
    assert b.active.tolist() == [True, True, False, True]   # the new row waits for its prefill


def test_rows_without_a_request_hold_valid_idle_sampling_fields():
    # a step over a padded bucket reads them: top_p 0 would leave a sampling row with an empty nucleus
    b = DecodeBatch(4, num_speculative_tokens=0, table_width=2, device=torch.device("cpu"))
    assert b.params["top_p"].tolist() == [1.0] * 4 and b.params["eos_token_id"].tolist() == [-1] * 4
    assert not b.active.any()


def test_join_then_steps_need_nothing_from_the_host():
    b = DecodeBatch(3, num_speculative_tokens=1, table_width=2, device=torch.device("cpu"))
    b.join([2, 0], _out([[5, 6], [7, 8]], [10, 20], [False, True]))   # prefill rows -> slots 2 and 0
    assert b.tokens.tolist() == [[7, 8], [0, 0], [5, 6]] and b.start_pos.tolist() == [20, 0, 10]
    assert b.active.tolist() == [False, False, True]                # slot 0 finished in its prefill
    b.set_blocks([(2, 0, 4), (2, 1, 6)])
    inputs = b.decode_inputs(3, 2, [], [])
    assert inputs.tokens.data_ptr() == b.tokens.data_ptr()          # views of the persistent rows
    assert inputs.block_tables.tolist() == [[0, 0], [0, 0], [4, 6]]
    b.absorb(3, _out([[0, 0], [0, 0], [11, 12]], [20, 0, 12], [True, True, False]))
    again = b.decode_inputs(3, 2, [], [])
    assert again.tokens[2].tolist() == [11, 12] and again.start_pos[2] == 12
    assert again.active.tolist() == [False, False, True]
    b.absorb(3, _out([[0, 0], [0, 0], [13, 14]], [20, 0, 14], [True, True, True]))
    assert not b.active.any()                                        # finished rows stop on the device
    b.join([1], _out([[3, 4]], [3], [False]))
    b.deactivate([1])                                                # a host-side stop (stop string)
    assert not b.active.any()


def test_host_copy_returns_lists():
    got = HostCopy(torch.device("cpu"))(a=torch.tensor([[1, -1]]), f=torch.tensor([True]))
    assert got == {"a": [[1, -1]], "f": [True]}
