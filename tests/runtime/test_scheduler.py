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


def test_the_last_chunk_takes_the_whole_reservation_so_decode_never_grows():
    s = _sched(num_blocks=33, block_size=4, window=5)
    r = _req(0, 10, 8, sched=s)              # prompt 10, 8 new tokens: 10 + 8 - 2 + 5 = 21 positions
    s.add(r)
    s.admit()
    s.prefill_chunk_size = 4
    first, = s.prefill_chunks()[1]
    assert [(slot, i) for slot, i, _ in s.grow([first])] == [(0, 0)]            # an earlier chunk: its end
    r.prefilled = 8
    last, = s.prefill_chunks()[0]
    entries = s.grow([last])                  # the last chunk: every block of the 21 reserved positions
    assert [(slot, i) for slot, i, _ in entries] == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5)]
    r.status, r.prefilled, r.pos = Status.DECODE, 10, 10
    assert s.grow([]) == [] and s.cache._reserved[r] == 0
    assert s.batch_rows() == 1 and s.table_width([r]) == 6
    s.finish(r)
    assert s.cache.allocator.num_free == 32 and not s.has_work()
