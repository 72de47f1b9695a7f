"""graphopt bench: the table, and each compiled variant's compile report next to its numbers."""

import torch

from graphopt.bench import render, run
from graphopt.models.random import random_model


def test_bench_rows_carry_the_compile_report_and_feed_it_back():
    model = random_model(num_hidden_layers=1, first_k_dense_replace=1)
    rows = run(model, [[1, 2, 3], [4, 5]], 4, [0], torch.device("cpu"))
    assert [r["exact"] for r in rows] == ["reference", "identical"]
    compiled_row = rows[1]
    assert "k = 0" in compiled_row["report"]["step/fuse_spec_step"]
    assert "tokens/s" in compiled_row["report"]["bench"] and compiled_row["compile_seconds"] > 0
    table = render(rows, "header")
    assert "Compile report of graphopt compiled, batch 2, no spec" in table
    assert "- step/fuse_spec_step: fused main + 0 MTP graph(s)" in table
