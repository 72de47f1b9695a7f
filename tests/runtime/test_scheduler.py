"""Scheduler bookkeeping without a model: FIFO admission, slots, chunking, growth, release."""

import torch

from graphopt.runtime.kv_cache import PagedKVCache
from graphopt.runtime.request import Request, SamplingParams, Status
from graphopt.runtime.scheduler import Scheduler


def _sched(num_blocks=9, block_size=4, max_batch_size=2, chunk=4, window=1):
    caches = [torch.zeros(num_blocks, block_size, 2)]
    return Scheduler(PagedKVCache(caches, [], 256, debug=True), max_batch_size, chunk, window)


def _req(rid, prompt_len, max_new=4, sched=None):
    params = SamplingParams(max_new_tokens=max_new)
    needed = sched.cache.check_fits(prompt_len, max_new, sched.window)
    return Request(rid, list(range(1, prompt_len + 1)), params, rid, needed)


def test_admission_is_fifo_and_bounded_by_slots():
    s = _sched(num_blocks=33, max_batch_size=2)
    reqs = [_req(i, 3, sched=s) for i in range(3)]
    for r in reqs:
        s.add(r)
    assert s.admit() == reqs[:2] and [r.slot for r in reqs[:2]] == [0, 1]
    assert reqs[2].status is Status.WAITING
    s.finish(reqs[0])
    assert s.admit() == [reqs[2]] and reqs[2].slot == 0          # lowest free slot is reused


def test_a_request_that_does_not_fit_yet_blocks_the_queue():
    s = _sched(num_blocks=9, block_size=4, max_batch_size=4)      # 8 usable blocks
    big, small = _req(0, 20, 10, sched=s), _req(1, 2, 2, sched=s)  # 29 slots -> 8 blocks; 1 block
    first = _req(2, 2, 2, sched=s)
    for r in (first, big, small):
        s.add(r)
    assert s.admit() == [first]          # big waits for first's block; small waits behind big
    s.finish(first)
    assert s.admit() == [big]
    s.finish(big)
    assert s.admit() == [small]
    s.cache.check_invariants()


def test_prompts_are_split_into_chunks_and_the_last_is_flagged():
    s = _sched(num_blocks=33, chunk=4)
    long, short = _req(0, 10, sched=s), _req(1, 3, sched=s)
    s.add(long), s.add(short)
    s.admit()
    seen = []
    while True:
        last, partial = s.prefill_chunks()
        if not last and not partial:
            break
        s.grow(last + partial)
        for c in last + partial:
            seen.append((c.request.request_id, c.start, c.length, c.is_last))
            c.request.prefilled += c.length
            if c.is_last:
                c.request.status = Status.DECODE
    assert seen == [(1, 0, 3, True), (0, 0, 4, False), (0, 4, 4, False), (0, 8, 2, True)]


def test_grow_covers_the_decode_window_and_reports_new_entries():
    s = _sched(num_blocks=33, block_size=4, window=5)
    r = _req(0, 4, 8, sched=s)
    s.add(r)
    s.admit()
    last, _ = s.prefill_chunks()
    entries = s.grow(last)                  # prompt 4 + 4 written ahead -> 8 positions, 2 blocks
    assert [(slot, i) for slot, i, _ in entries] == [(0, 0), (0, 1)]
    r.status, r.prefilled, r.pos = Status.DECODE, 4, 4
    assert s.grow([]) == [(0, 2, s.cache.tables[r][2])]   # decode at 4 writes 4..8 -> 3 blocks
    assert s.batch_rows() == 1 and s.table_width([r]) == 3
    s.finish(r)
    assert s.cache.allocator.num_free == 32 and not s.has_work()
