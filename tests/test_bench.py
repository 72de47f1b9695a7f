"""graphopt bench: the table, and each compiled variant's compile report next to its numbers."""

import pytest
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


def test_bench_out_is_written_with_the_umask_mode_and_validated_first(tmp_path, monkeypatch, capsys):
    import os

    import graphopt.bench as bench
    import graphopt.cli as cli

    calls = []
    monkeypatch.setattr(cli, "_load_model", lambda path, dtype: (random_model(num_hidden_layers=1,
                        first_k_dense_replace=1), None, "random"))
    monkeypatch.setattr(bench, "run", lambda model, prompts, n, ks, device, progress: calls.append(
        (len(prompts), n, ks, progress)) or [dict(variant="v", tokens=4, seconds=1.0, steps=2, exact="reference")])
    old = os.umask(0o022)
    try:
        assert bench.main(["--device", "cpu", "--prompts", "2", "--new-tokens", "3", "--k", "0",
                           "--quiet", "--out", str(tmp_path / "r" / "bench.md")]) == 0
    finally:
        os.umask(old)
    written = tmp_path / "r" / "bench.md"
    assert written.read_text() in capsys.readouterr().out and "| v | 4 |" in written.read_text()
    assert written.stat().st_mode & 0o777 == 0o644 and [p.name for p in written.parent.iterdir()] == ["bench.md"]
    assert calls == [(2, 3, [0], False)]                       # --quiet: no progress bar
    with pytest.raises(SystemExit) as e:
        bench.main(["--prompts", "0"])
    assert e.value.code == 2 and len(calls) == 1


def test_bench_progress_bar_waits_two_seconds_and_names_the_stage(monkeypatch):
    import graphopt.bench as bench

    bars = []

    class Recorder:
        def __init__(self, **kwargs):
            self.kwargs, self.stages, self.n = kwargs, [], 0
            bars.append(self)

        def set_postfix_str(self, s):
            self.stages.append(s)

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(bench, "tqdm", Recorder)
    model = random_model(num_hidden_layers=1, first_k_dense_replace=1)
    run(model, [[1, 2, 3]], 2, [0], torch.device("cpu"), progress=True)
    [bar] = bars
    assert bar.kwargs["delay"] == 2.0 and bar.kwargs["disable"] is False and bar.kwargs["total"] == 3
    assert bar.stages == ["eager reference", "compile k=0", "generate k=0"] and bar.n == 3
