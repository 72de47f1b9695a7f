"""step/paged.py: the one slot-mapping function, dense block tables and the cache layout."""

import torch

from graphopt.models.random import random_model
from graphopt.step.paged import CacheLayout, blocks_for, dense_block_tables, slot_mapping


def test_slot_mapping_follows_the_block_table():
    tables = torch.tensor([[3, 7], [5, 0]])
    pos = torch.tensor([[0, 5], [2, 3]])
    valid = torch.tensor([[True, True], [True, False]])
    assert slot_mapping(pos, tables, 4, valid).tolist() == [[12, 29], [22, 0]]
    assert slot_mapping(pos, tables, 4).tolist() == [[12, 29], [22, 23]]          # valid=None: every position


def test_positions_past_the_block_table_write_the_sink_not_the_last_block():
    """The old runtime copy clamped p // bs onto the table's last block: position 9 of a 2-block table
    (bs 4) landed on slot 7 * 4 + 1 = 29, a live entry of position 5. Every caller now gets the sink."""
    tables = torch.tensor([[3, 7]])
    pos = torch.tensor([[5, 8, 9, 100]])
    assert slot_mapping(pos, tables, 4).tolist() == [[29, 0, 0, 0]]
    assert slot_mapping(pos, tables, 4, torch.tensor([[True, True, False, True]])).tolist() == [[29, 0, 0, 0]]


def test_dense_block_tables_keep_block_zero_for_the_sink():
    t = dense_block_tables(3, 2)
    assert t.tolist() == [[1, 2], [3, 4], [5, 6]] and t.dtype == torch.int64
    assert blocks_for(9, 4) == 3 and blocks_for(8, 4) == 2 and blocks_for(1, 16) == 1
    pos = torch.arange(8).expand(3, 8)
    slots = slot_mapping(pos, t, 4)
    assert slots.unique().numel() == 24 and int(slots.min()) == 4      # every row distinct, none in block 0


def test_cache_layout_builds_the_models_caches():
    model = random_model()
    layout = CacheLayout.for_config(model.config, 8, torch.float32, "cpu")
    kv, mtp = layout.new_caches(5)
    want = model.new_kv_caches(5, 8)
    assert len(kv) == len(want) and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(kv, want))
    assert len(mtp) == model.config.num_nextn_predict_layers and not any(c.any() for c in kv + mtp)
    assert layout.new_caches(5, with_mtp=False)[1] == []
