"""Block allocator and paged cache: sizing, the sink block, reservations, disjoint tables, clear errors."""

import pytest
import torch

from graphopt.runtime.kv_cache import (BlockAllocator, CacheFullError, PagedKVCache, RequestTooLongError,
                                       blocks_for_budget)


def _cache(num_blocks=9, block_size=4, dim=8, layers=2, mtp=1, max_positions=256, debug=True):
    make = lambda n: [torch.zeros(num_blocks, block_size, dim) for _ in range(n)]  # noqa: E731
    return PagedKVCache(make(layers), make(mtp), max_positions, debug=debug)


def test_budget_formula_deepseek_v3():
    # 64 tokens x 576 values x 2 bytes (bf16) x (61 + 1) layers = 4,571,136 bytes per block
    assert blocks_for_budget(16 << 30, 64, 576, torch.bfloat16, 61, 1) == (16 << 30) // 4_571_136 == 3758


def test_budget_too_small_names_the_sizes():
    with pytest.raises(ValueError, match=r"holds 1 block\(s\) of 4571136 bytes"):
        blocks_for_budget(5_000_000, 64, 576, torch.bfloat16, 61, 1)


def test_bytes_per_block_matches_the_formula():
    c = _cache(num_blocks=5, block_size=4, dim=8, layers=2, mtp=1)
    assert c.bytes_per_block == 4 * 8 * 4 * 3
    assert c.capacity_tokens == 4 * 4
    assert c.bytes_per_token == 8 * 4 * 3 == c.bytes_per_block // 4
    int8 = PagedKVCache([torch.zeros(5, 4, 8, dtype=torch.int8)] * 2, [], 256)   # a C8 cache: one byte a value
    assert int8.bytes_per_token == 8 * 2


def test_allocator_never_hands_out_the_sink_or_a_block_twice():
    a = BlockAllocator(5, debug=True)
    got = [a.allocate("r") for _ in range(4)]
    assert sorted(got) == [1, 2, 3, 4] and a.num_free == 0
    with pytest.raises(CacheFullError):
        a.allocate("r")
    a.free(got[:2], "r")
    assert a.allocate("s") in got[:2]
    with pytest.raises(AssertionError, match="freed by"):
        a.free([got[3]], "s")  # not s's block


def test_grow_allocates_lazily_within_the_reservation():
    c = _cache(num_blocks=9, block_size=4)            # 8 usable blocks
    c.admit("a", 10)                                    # reserves 3 blocks, allocates none
    assert c.tables["a"] == [] and not c.can_admit(21) and c.can_admit(20)
    new = c.grow("a", 5)
    assert [i for i, _ in new] == [0, 1] and len(c.tables["a"]) == 2
    assert c.grow("a", 8) == []                         # already covered
    c.grow("a", 10)
    with pytest.raises(CacheFullError, match="past its reservation"):
        c.grow("a", 13)
    c.check_invariants()
    c.release("a")
    assert c.allocator.num_free == 8 and c.can_admit(32)
    c.check_invariants()


def test_concurrent_tables_are_disjoint():
    c = _cache(num_blocks=17, block_size=2)
    for r in "abcd":
        c.admit(r, 8)
    for n in range(1, 9):                               # interleaved growth
        for r in "abcd":
            c.grow(r, n)
    blocks = [b for r in "abcd" for b in c.tables[r]]
    assert len(blocks) == len(set(blocks)) == 16 and 0 not in blocks
    c.check_invariants()


def test_invariant_check_catches_a_shared_block():
    c = _cache(debug=False)
    c.admit("a", 4)
    c.admit("b", 4)
    c.grow("a", 4)
    c.tables["b"].append(c.tables["a"][0])              # corrupt on purpose
    with pytest.raises(AssertionError, match="two block tables"):
        c.check_invariants()


def test_request_longer_than_the_cache_is_refused_with_its_numbers():
    c = _cache(num_blocks=9, block_size=4)              # 32 slots
    assert c.check_fits(20, 13, window=1) == 32
    with pytest.raises(RequestTooLongError, match=r"needs 33 cache slots \(prompt 20 \+ max_new_tokens 14.*holds 32"):
        c.check_fits(20, 14, window=1)
    with pytest.raises(RequestTooLongError, match=r"\+ 4 written ahead"):
        c.check_fits(20, 10, window=5)


def test_request_longer_than_the_model_is_refused():
    c = _cache(num_blocks=200, max_positions=64)
    with pytest.raises(RequestTooLongError, match=r"= 65 exceeds the model's max_position_embeddings \(64\)"):
        c.check_fits(60, 5, window=1)
