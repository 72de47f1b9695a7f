"""Engine behaviour: exactness, continuous batching, cache pressure, stop conditions, streaming.

Tests taking `make_engine` run on every step provider: the eager plain-decoding reference (k = 0)
and, when importable, the speculative provider of `graphopt.step.provider` with k = 2.
"""

import random
import time

import pytest
import torch

from graphopt.models.generate import greedy_generate
from graphopt.runtime import Engine, FinishReason, ReferenceStepProvider, RequestTooLongError, SamplingParams
from graphopt.runtime.request import Status

BS = 4
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [40], [9, 9, 9], [60, 61, 62, 63, 64, 65, 66]]


def _provider(kind, model):
    if kind == "reference":
        return ReferenceStepProvider.from_model(model, block_size=BS)
    spec = pytest.importorskip("graphopt.step.provider")
    return spec.SpecStepProvider.from_model(model, int(kind[-1]), block_size=BS)


def _engine(model, kind="reference", **kw):
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("prefill_chunk_size", 4)
    return Engine(_provider(kind, model), debug=True, **kw)


@pytest.fixture(params=["reference", "speculative-k2"])
def make_engine(request, model):
    return lambda m=model, **kw: _engine(m, request.param, **kw)


def test_ragged_batch_equals_reference_greedy_decoding(model, make_engine):
    news = [6, 9, 1, 4]
    got = make_engine().generate(PROMPTS, [SamplingParams(max_new_tokens=n) for n in news])
    assert got == [greedy_generate(model, p, n, block_size=BS) for p, n in zip(PROMPTS, news)]


def test_sampled_tokens_do_not_depend_on_the_batch(model, make_engine):
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=100 + i, max_new_tokens=6)
              for i in range(len(PROMPTS))]
    batched = make_engine().generate(PROMPTS, params)
    alone = [make_engine(max_batch_size=1, prefill_chunk_size=64).generate([p], sp)[0]
             for p, sp in zip(PROMPTS, params)]
    assert batched == alone
    reseeded = make_engine().generate(PROMPTS[:1], SamplingParams(temperature=0.9, top_p=0.95, top_k=40,
                                                                   seed=7, max_new_tokens=6))
    assert reseeded[0] != batched[0]                     # the seed matters


def test_requests_joining_mid_flight_leave_others_unchanged(model, make_engine):
    engine = make_engine(max_batch_size=4)
    first = [engine.add_request(p, SamplingParams(max_new_tokens=8, temperature=0.7, seed=1)) for p in PROMPTS[:2]]
    for _ in range(3):
        engine.step()
    late = [engine.add_request(p, SamplingParams(max_new_tokens=5)) for p in PROMPTS[2:]]
    outputs = {o.request_id: o.token_ids for o in engine.run_until_done()}
    solo = make_engine().generate(PROMPTS[:2], SamplingParams(max_new_tokens=8, temperature=0.7, seed=1))
    assert [outputs[i] for i in first] == solo
    assert [outputs[i] for i in late] == [greedy_generate(model, p, 5, block_size=BS) for p in PROMPTS[2:]]


def test_a_request_waits_for_cache_blocks_then_runs(model, make_engine):
    # each request needs 6 + 10 - 1 = 15 slots = 4 blocks of 4; 6 usable blocks hold one at a time
    engine = make_engine(num_blocks=7)
    prompts = [[3, 4, 5, 6, 7, 8], [20, 21, 22, 23, 24, 25]]
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=10)) for p in prompts]
    order = []
    while engine.has_unfinished():
        order += [e.request_id for e in engine.step()]
        assert sum(engine._live[i].status is not Status.WAITING for i in ids if i in engine._live) <= 1
    assert order == sorted(order) and set(order) == set(ids)   # the second only starts once the first left
    assert engine.cache.allocator.num_free == 6
    assert [engine.take_output(i).token_ids for i in ids] == [greedy_generate(model, p, 10, block_size=BS)
                                                              for p in prompts]


def test_a_request_that_can_never_fit_is_refused_at_submission(model):
    engine = _engine(model, num_blocks=7)                                  # 24 slots
    with pytest.raises(RequestTooLongError, match=r"needs 29 cache slots \(prompt 10 \+ max_new_tokens 20.*holds 24"):
        engine.add_request(list(range(1, 11)), SamplingParams(max_new_tokens=20))
    with pytest.raises(RequestTooLongError, match="max_position_embeddings"):
        _engine(model).add_request([1] * 250, SamplingParams(max_new_tokens=10))
    assert not engine.has_unfinished()


def test_eos_ends_the_request_and_is_kept(model, make_engine):
    expected = greedy_generate(model, PROMPTS[0], 10, block_size=BS)
    eos = expected[3]
    engine = make_engine()
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=10, eos_token_id=eos))
    out = engine.run_until_done()[0]
    assert out.request_id == rid and out.finish_reason is FinishReason.EOS
    assert out.token_ids == expected[:expected.index(eos) + 1]


def test_block_tables_on_the_device_match_the_host_and_are_disjoint(model, make_engine):
    engine = make_engine(max_batch_size=4)
    for p in PROMPTS:
        engine.add_request(p, SamplingParams(max_new_tokens=12))
    while engine.has_unfinished():
        engine.step()
        live = [r for r in engine._live.values() if r.status is Status.DECODE]
        # the device runs the rows the host has in decode, less those the step still in flight finished
        # (they turned themselves off; the host learns it when it reads that step's outputs)
        in_flight = {r.slot for r in engine._pending[0]} if engine._pending else set()
        active = set(engine.batch.active.nonzero().flatten().tolist())
        assert active <= {r.slot for r in live} and {r.slot for r in live} - active <= in_flight
        rows = engine.batch.block_tables.tolist()
        seen = set()
        for r in live:
            table = engine.cache.tables[r]
            assert rows[r.slot][:len(table)] == table and not any(rows[r.slot][len(table):])
            assert seen.isdisjoint(table) and 0 not in table
            seen.update(table)


def test_stress_hundreds_of_short_requests(model, make_engine):
    rng = random.Random(0)
    engine = make_engine(max_batch_size=32, num_blocks=41)            # 40 blocks: requests queue
    specs = {}
    for i in range(300):
        prompt = [rng.randrange(3, 97) for _ in range(rng.randint(1, 8))]
        params = SamplingParams(max_new_tokens=rng.randint(1, 6), eos_token_id=rng.choice([None, 57, 25]),
                                temperature=rng.choice([0.0, 1.0]), seed=i)
        specs[engine.add_request(prompt, params)] = (prompt, params)
    start = time.perf_counter()
    outputs = {o.request_id: o for o in engine.run_until_done()}
    assert time.perf_counter() - start < 30                               # 5-11 s on a loaded 2-core CPU
    assert sorted(outputs) == sorted(specs)                               # none lost
    for rid, (prompt, params) in specs.items():
        out = outputs[rid].token_ids
        if outputs[rid].finish_reason is FinishReason.EOS:
            assert out[-1] == params.eos_token_id and len(out) <= params.max_new_tokens
        else:
            assert outputs[rid].finish_reason is FinishReason.LENGTH and len(out) == params.max_new_tokens
        assert params.eos_token_id not in out[:-1]
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_usable == 40   # no leak
    assert not engine.batch.active.any()
    greedy = [rid for rid, (_, p) in specs.items() if p.temperature == 0 and p.eos_token_id is None][:8]
    for rid in greedy:
        prompt, params = specs[rid]
        assert outputs[rid].token_ids == greedy_generate(model, prompt, params.max_new_tokens, block_size=BS)


def test_multi_token_steps_stream_and_stop_at_max_new_tokens(model):
    """Drafts that always pass: each decode step emits k + 1 = 3 tokens; the last step is cut short."""
    spec = pytest.importorskip("graphopt.step.provider")
    with torch.no_grad():
        model.model.norm.weight.zero_()              # all logits 0: the main model always predicts token 0
        for layer in model.mtp:
            layer.shared_head.norm.weight.zero_()    # and so does every draft, so every draft is accepted
    engine = Engine(spec.SpecStepProvider.from_model(model, 2, block_size=BS), debug=True, prefill_chunk_size=4)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS[:2], (7, 9))]
    sizes = {i: [] for i in ids}
    while engine.has_unfinished():
        for e in engine.step():
            sizes[e.request_id].append(len(e.new_token_ids))
    assert sizes == {ids[0]: [1, 3, 3], ids[1]: [1, 3, 3, 2]}
    assert [engine.take_output(i).token_ids for i in ids] == [[0] * 7, [0] * 9]
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_usable


def test_abort_frees_the_request(model, make_engine):
    engine = make_engine()
    a = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=20))
    b = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=6))
    engine.step(), engine.step()
    engine.abort(a)
    assert engine.take_output(a).finish_reason is FinishReason.ABORTED
    assert engine.run_until_done()[0].token_ids == greedy_generate(model, PROMPTS[1], 6, block_size=BS)
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_usable


def test_cache_is_sized_from_the_budget(model):
    provider = ReferenceStepProvider.from_model(model, block_size=BS)
    per_block = BS * model.config.kv_cache_dim * 4 * model.config.num_hidden_layers   # float32, no MTP cache
    engine = Engine(provider, cache_budget_bytes=per_block * 10 + 5)
    assert engine.cache.num_blocks == 10 and engine.cache.bytes_per_block == per_block
    with pytest.raises(ValueError, match="not both"):
        Engine(provider, num_blocks=4, cache_budget_bytes=10**6)
    with pytest.raises(TypeError, match=r"not a step provider: missing \['num_speculative_tokens'"):
        Engine(object())


@pytest.mark.parametrize("prompt,params,message", [
    ([], None, "non-empty sequence of token ids"),
    ([5, 97], None, r"token ids must be integers in \[0, 97\)"),
    ([5], SamplingParams(stop=("x",)), "stop strings .* need a tokenizer"),
    ([5], SamplingParams(top_k=1000), "top_k = 1000 exceeds the step provider's max_top_k"),
])
def test_bad_requests_are_refused_with_the_reason(model, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        _engine(model).add_request(prompt, params)


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("min_p", 2.0),
                                         ("max_new_tokens", 0), ("eos_token_id", -1), ("stop", ("",))])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} = .* is invalid; expected"):
        SamplingParams(**{field: value})


# -- stop strings and streaming ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from graphopt.models.tokenizer import load_tokenizer
    return load_tokenizer()


def test_stop_string_cuts_the_output_before_it(model, make_engine, tok):
    expected = greedy_generate(model, PROMPTS[0], 16, block_size=BS)
    text = tok.decode(expected)
    stop = text[5:7]
    cut = text[:text.find(stop)]
    engine = make_engine(tokenizer=tok)
    engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=16, stop=(stop, "never appears")))
    out = engine.run_until_done()[0]
    assert out.finish_reason is FinishReason.STOP and out.text == cut
    assert cut.startswith(tok.decode(out.token_ids)) and out.token_ids == expected[:len(out.token_ids)]
    assert len(out.token_ids) < 16
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_usable


def test_streaming_iterator_and_callbacks_give_the_final_tokens(model, make_engine, tok):
    engine = make_engine(tokenizer=tok, max_batch_size=3, num_blocks=20)
    texts = [tok.decode(greedy_generate(model, p, 12, block_size=BS)) for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=12, stop=(texts[0][6:8],)),
              SamplingParams(max_new_tokens=12, temperature=1.0, seed=5),
              SamplingParams(max_new_tokens=12, eos_token_id=57),
              SamplingParams(max_new_tokens=12, stop=(texts[3][3:5],))]
    from_callbacks, finished = {}, []

    def on_event(event):
        from_callbacks.setdefault(event.request_id, []).extend(event.new_token_ids)
        if event.finished:
            finished.append(event.request_id)

    ids = [engine.add_request(p, sp, callback=on_event) for p, sp in zip(PROMPTS, params)]
    streamed = {}
    for rid, new in engine.stream():
        assert new
        streamed.setdefault(rid, []).extend(new)
    outputs = {i: engine.take_output(i) for i in ids}
    assert sorted(finished) == ids
    for i in ids:
        assert streamed.get(i, []) == from_callbacks.get(i, []) == outputs[i].token_ids
    assert outputs[ids[0]].finish_reason is FinishReason.STOP


def test_stream_and_generate_accept_prompts_directly(model):
    engine = _engine(model)
    pieces = {}
    for rid, new in engine.stream(PROMPTS[:2], SamplingParams(max_new_tokens=5)):
        pieces.setdefault(rid, []).extend(new)
    assert [pieces[i] for i in sorted(pieces)] == engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        engine.generate(PROMPTS[:2], [SamplingParams()])


def test_a_batch_is_greedy_exactly_while_every_decoding_request_is(model):
    engine = _engine(model)
    seen, decode = [], engine.provider.decode

    def recording(inputs):                    # the real step; only what it was told is noted
        seen.append((int(inputs.active.sum()), inputs.greedy))
        return decode(inputs)

    engine.provider.decode = recording
    engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=12))                        # greedy
    engine.add_request([9, 9], SamplingParams(max_new_tokens=3, temperature=0.8, seed=1))   # sampled, ends first
    engine.run_until_done()
    assert (2, False) in seen                 # both decoding: the sampling step
    assert seen[-1] == (1, True)              # the sampled request's slot freed: greedy again
    flags = [greedy for _, greedy in seen]
    assert flags[flags.index(False):] == sorted(flags[flags.index(False):])   # once greedy, it stays greedy
