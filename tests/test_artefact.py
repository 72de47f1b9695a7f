"""`CompiledModel.save` / `graphopt.load_compiled`: the reloaded artefact computes exactly what the
compiled model did (graphs, logits, greedy tokens, in this process and a fresh one), and a bad
artefact is a clear error that names its file."""

import functools
import json
import os
import re
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import graphopt
from graphopt.models.random import random_model
from graphopt.passes import program_io

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8]]


@functools.cache
def _plain():
    """The plain compile, shared by `saved` and `artefact` (no test changes it)."""
    return graphopt.compile(random_model(), block_size=4, progress=False)


@pytest.fixture(scope="module", params=["plain", "mtp", "w8a8"])
def saved(request, tmp_path_factory):
    """(compiled, artefact dir) for a plain, a spec k=1 and a W8A8 compile of the random model."""
    kwargs = {"plain": {}, "mtp": {"spec": "mtp"}, "w8a8": {"quant": "w8a8"}}[request.param]
    compiled = _plain() if not kwargs else graphopt.compile(random_model(), block_size=4, progress=False, **kwargs)
    out = tmp_path_factory.mktemp(request.param) / "artefact"
    compiled.save(out)
    return compiled, out


def _outputs(gm, inputs):
    with torch.no_grad():
        return gm(*inputs)


def test_reloaded_graphs_logits_and_tokens_are_identical(saved):
    compiled, out = saved
    reloaded = graphopt.load_compiled(out)
    assert reloaded.program.names == compiled.program.names
    for name, make in compiled.program.make_inputs.items():   # every graph, same inputs, bit-identical
        a, b = _outputs(compiled.graphs[name], make(0)), _outputs(reloaded.graphs[name], make(0))
        flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
        assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True)), name
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert torch.equal(compiled(x), reloaded(x))
    assert reloaded.generate(PROMPTS, max_new_tokens=10) == compiled.generate(PROMPTS, max_new_tokens=10)
    assert (reloaded.spec, reloaded.quant, reloaded.options) == (compiled.spec, compiled.quant, compiled.options)
    assert len(reloaded.report.records) == len(compiled.report.records) and "load" in reloaded.report.seconds


def test_shared_weights_are_stored_once_and_shared_again(saved):
    compiled, out = saved
    stored = safetensors.torch.load_file(str(out / program_io.WEIGHTS))
    reads = sum(n.op == "get_attr" for gm in compiled.graphs.values() for n in gm.graph.nodes)
    assert 0 < len(stored) < reads or "step" not in compiled.graphs
    reloaded = graphopt.load_compiled(out)
    ptrs = lambda gm: {t.data_ptr() for t in gm.state_dict().values()}
    if "step" in reloaded.graphs:   # the fused step reads main's weights: the same memory after a load
        assert ptrs(reloaded.graphs["main"]) & ptrs(reloaded.graphs["step"])


def test_fresh_process_generates_the_same_tokens(saved):
    compiled, out = saved
    code = ("import json, sys, graphopt; m = graphopt.load_compiled(sys.argv[1]); "
            "print(json.dumps(m.generate(json.loads(sys.argv[2]), max_new_tokens=10)))")
    proc = subprocess.run([sys.executable, "-c", code, str(out), json.dumps(PROMPTS)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == compiled.generate(PROMPTS, max_new_tokens=10)


@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
    """A small plain compile saved once; tests copy it before damaging it."""
    compiled = _plain()
    out = tmp_path_factory.mktemp("one") / "artefact"
    compiled.save(out)
    return compiled, out


def _copy(src, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(path, **changes):
    manifest = json.loads((path / program_io.MANIFEST).read_text())
    manifest.update(changes)
    (path / program_io.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("key, value, shown", [("graphopt_version", "0.0.9", "graphopt 0.0.9"),
                                               ("torch_version", "1.13.1", "torch 1.13.1"),
                                               ("format_version", 99, "format 99")])
def test_other_version_is_a_clear_error(artefact, tmp_path, key, value, shown):
    out = _copy(artefact[1], tmp_path)
    _edit_manifest(out, **{key: value})
    mine = re.escape(f"this is graphopt {graphopt.__version__} with torch {torch.__version__}")
    with pytest.raises(ValueError, match=rf"compiled by .*{re.escape(shown)}.*{mine}.*recompile"):
        graphopt.load_compiled(out)


def test_corrupt_or_missing_files_are_errors_naming_the_file(artefact, tmp_path):
    out = _copy(artefact[1], tmp_path)
    weights = out / program_io.WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"weights\.safetensors is corrupt or truncated"):
        graphopt.load_compiled(out)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match=r"weights\.safetensors is corrupt: its sha256"):
        graphopt.load_compiled(out)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"weights\.safetensors is missing"):
        graphopt.load_compiled(out)
    (out / program_io.MANIFEST).write_text('{"format": "graphopt-compiled", ')
    with pytest.raises(ValueError, match=r"manifest\.json is corrupt: not valid JSON"):
        graphopt.load_compiled(out)
    with pytest.raises(FileNotFoundError, match=r"not a graphopt compiled artefact: no manifest\.json"):
        graphopt.load_compiled(tmp_path)


def test_missing_weight_key_names_file_and_key(artefact, tmp_path):
    out = _copy(artefact[1], tmp_path)
    weights = out / program_io.WEIGHTS
    tensors = safetensors.torch.load_file(str(weights))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    safetensors.torch.save_file(tensors, str(weights))
    _edit_manifest(out, files={**json.loads((out / program_io.MANIFEST).read_text())["files"],
                               program_io.WEIGHTS: program_io._file_digest(weights)})
    with pytest.raises(ValueError, match=rf"weights\.safetensors is corrupt: no tensor '{dropped}'"):
        graphopt.load_compiled(out)


def test_failed_save_leaves_the_old_artefact_and_no_partial_dir(artefact, tmp_path, monkeypatch):
    compiled, src = artefact
    out = _copy(src, tmp_path)
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(program_io.safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        compiled.save(out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]     # no .copy.tmp-* left behind
    with pytest.raises(OSError):
        compiled.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_save_replaces_an_artefact_but_refuses_other_dirs(artefact, tmp_path):
    compiled, src = artefact
    out = _copy(src, tmp_path)
    (out / "stale.txt").write_text("old")
    compiled.save(out)                                   # an artefact: replaced as a whole
    assert not (out / "stale.txt").exists() and graphopt.load_compiled(out).program.names
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a graphopt compiled artefact"):
        compiled.save(other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_file_modes_follow_the_umask(artefact, tmp_path):
    compiled, _ = artefact
    old = os.umask(0o027)
    try:
        compiled.save(tmp_path / "a")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o750
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "a").iterdir()} == dict.fromkeys(
        [program_io.MANIFEST, program_io.GRAPHS, program_io.WEIGHTS], 0o640)


def test_cli_compile_out_writes_an_artefact(tmp_path, monkeypatch):
    from graphopt import cli
    monkeypatch.setattr(cli, "_load_model", lambda path, dtype="float32": (random_model(), None, "random"))
    assert cli.main(["compile", "--out", str(tmp_path / "a")]) == 0
    reloaded = graphopt.load_compiled(tmp_path / "a")
    assert reloaded.spec is None and reloaded.generate([[1, 2]], max_new_tokens=3)


# -- sharded artefacts: one directory per rank ------------------------------------------------------

SHARD_PROMPTS = [[1, 2, 3], [4, 5]]


def _shard_model():
    return random_model(0, vocab_size=96)          # tp = 2 must divide the vocabulary


def _save_then_load_rank(rank, world, out):
    """Compile, generate and save this rank's shard; once every rank saved, load the other rank's (an error)
    and its own (the same tokens). One launch of the ranks for both halves: each start costs seconds."""
    import torch.distributed as dist
    compiled = graphopt.compile(_shard_model(), tp=world, ep=world, block_size=4, progress=False)
    assert compiled.parallel == {"tp": world, "ep": world, "rank": rank, "world_size": world,
                                 "group_name": compiled.parallel["group_name"]}
    tokens = compiled.generate(SHARD_PROMPTS, max_new_tokens=6, ignore_eos=True)
    compiled.save(os.path.join(out, f"rank{rank}"))
    with open(os.path.join(out, f"tokens{rank}.json"), "w") as f:
        json.dump(tokens, f)
    del compiled
    dist.barrier()                                                    # both artefacts are on disk
    other = os.path.join(out, f"rank{1 - rank}")
    with pytest.raises(ValueError, match=f"holds rank {1 - rank} of a tp=2 ep=2 compile over 2 processes.*"
                                         f"this process is rank {rank} of 2"):
        graphopt.load_compiled(other)
    reloaded = graphopt.load_compiled(os.path.join(out, f"rank{rank}"))
    assert reloaded.parallel["rank"] == rank
    with open(os.path.join(out, f"loaded{rank}.json"), "w") as f:
        json.dump(reloaded.generate(SHARD_PROMPTS, max_new_tokens=6, ignore_eos=True), f)


def test_a_sharded_artefact_reloads_on_its_own_rank_only(tmp_path):
    from graphopt.models.generate import greedy_generate
    from graphopt.runtime.distributed import run_local
    run_local(_save_then_load_rank, 2, str(tmp_path), timeout_s=300, collective_timeout_s=60)
    with pytest.raises(ValueError, match="holds rank 0 of a tp=2 ep=2 compile.*no initialised process group"):
        graphopt.load_compiled(tmp_path / "rank0")                   # this process: no process group
    for rank in range(2):
        saved_tokens = json.loads((tmp_path / f"tokens{rank}.json").read_text())
        assert json.loads((tmp_path / f"loaded{rank}.json").read_text()) == saved_tokens
    # the unsharded model's greedy tokens (the unsharded compile equals them: tests/passes/sharded_parity.py)
    model = _shard_model()
    assert saved_tokens == [greedy_generate(model, p, 6) for p in SHARD_PROMPTS]


@pytest.mark.parametrize("scheme", ["w4a8", "w4a16"])
def test_int4_weights_stay_packed_through_save_and_load(tmp_path, scheme):
    quant = graphopt.QuantConfig(scheme, group_size=16)             # RTN: no calibration data needed
    # two layers: a dense MLP and the MoE experts, both packed (the third layer repeats the second)
    compiled = graphopt.compile(random_model(num_hidden_layers=2), block_size=4, quant=quant, progress=False)
    packed = {n: t for n, t in compiled.graphs["main"].state_dict().items() if n.startswith("_quant_")
              and n.endswith("_weight")}
    assert packed and all(t.dtype == torch.uint8 for t in packed.values())   # two int4 a byte in the Program
    compiled.save(tmp_path / "artefact")
    stored = safetensors.torch.load_file(str(tmp_path / "artefact" / program_io.WEIGHTS))
    assert sum(t.dtype == torch.uint8 for t in stored.values()) >= len(packed)
    reloaded = graphopt.load_compiled(tmp_path / "artefact")
    got = reloaded.graphs["main"].state_dict()
    assert all(torch.equal(got[n], t) for n, t in packed.items())
    inputs = compiled.program.make_inputs["main"](0)
    assert torch.equal(_outputs(compiled.graphs["main"], inputs)[0], _outputs(reloaded.graphs["main"], inputs)[0])
    assert reloaded.generate(PROMPTS, max_new_tokens=6) == compiled.generate(PROMPTS, max_new_tokens=6)
