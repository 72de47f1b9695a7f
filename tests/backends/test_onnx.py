"""The onnx backend: the functional rewrite of the cache writes, the ONNX-friendly op formulations
(equal to the references), and greedy generation through onnxruntime token-identical to eager.

The default run lowers a one-layer random model (spec k = 1 and quant="w8a8" together) once for the
module (`tiny`) and every test shares it, the functional rewrite's included: exporting a graph is one
torch.export of it (~10-50 s per graph of that model on 2 cores, ~35 s+ for the embedded model), so
no test exports a graph another has exported (`export_program(exported=executable.graphs)`).
The embedded model (`graphopt.models.load`, float32) is in the `slow` tests: spec="mtp" + w8a8 shared
by a module fixture, then plain / mtp / w8a8 compiled separately (32 greedy steps each); the slow
`graphopt dump --format onnx` test exports every graph of a fresh compile."""

import os
import subprocess
import sys

import onnx
import pytest
import torch

import graphopt
from graphopt import backends
from graphopt.api import CompiledModel
from graphopt.backends.onnx import decompositions as D
from graphopt.backends.onnx import export_program, functional_graph
from graphopt.backends.onnx.functional import cache_inputs
from graphopt.models.random import random_model
from graphopt.passes.dump import ONNX_LAYOUT, Dumper

G = torch.ops.graphopt
PROMPTS = [[1, 50, 60, 70], [1, 42], [1, 9, 8, 7, 6, 5, 4, 3, 2, 11, 12]]
STEPS = 32


def _eager_twin(compiled) -> CompiledModel:
    """The eager backend over the same (already optimised) Program: the reference without a 2nd compile."""
    exe = backends.get("eager").lower(compiled.program, compiled.options)
    return CompiledModel(exe, compiled.options, compiled.spec, compiled.quant, "eager", compiled.report)


@pytest.fixture(scope="module")
def tiny():
    model = random_model(0, num_hidden_layers=1, first_k_dense_replace=0)
    return graphopt.compile(model, backend="onnx", spec=graphopt.SpecConfig(num_speculative_tokens=1),
                            quant="w8a8", progress=False, block_size=4)


@pytest.fixture(scope="module")
def embedded():
    from graphopt.models import load
    model = load(dtype=torch.float32)
    return graphopt.compile(model, backend="onnx", spec="mtp", quant="w8a8", progress=False)


# -- the functional rewrite (over tiny's in-place graphs: no second compile) ----------------------------

def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_cache_writes_become_values_returned_after_the_outputs(tiny):
    gm = tiny.program["step_greedy"]
    assert _targets(gm).count(G.kv_cache_write.default) == 2                  # one main layer, one MTP
    f = functional_graph(gm)
    targets = _targets(f)
    assert not [t for t in targets if "graphopt" in str(getattr(t, "namespace", ""))]   # no graphopt op left
    assert G.kv_cache_write.default not in targets
    assert sum(getattr(t, "__name__", "") == "cache_write" for t in targets) == 2
    out = next(n for n in f.graph.nodes if n.op == "output").args[0]
    assert len(out) == 5 + len(cache_inputs(gm)) == 7


def test_the_functional_step_computes_what_the_in_place_step_computes(tiny):
    exe = tiny.executable
    gm, f = tiny.program["step_greedy"], functional_graph(tiny.program["step_greedy"])
    kv, mtp = exe.new_caches(6)
    gen = torch.Generator().manual_seed(0)
    for c in kv + mtp:
        c.copy_(torch.randn(c.shape, generator=gen))
    B = 2
    args = (torch.tensor([[5, 7], [9, 3]]), torch.tensor([3, 6]), torch.tensor([[1, 2], [3, 4]]),
            torch.zeros(B), torch.zeros(B, dtype=torch.long), torch.ones(B), torch.zeros(B),
            torch.zeros(B, dtype=torch.long), torch.full((B,), -1), torch.full((B,), 100), torch.ones(B, dtype=torch.bool))
    flat_kv, flat_mtp = [c.clone() for c in kv], [c.clone() for c in mtp]
    with torch.no_grad():
        want = gm(*args, kv, mtp)                                            # writes kv, mtp in place
        got = f(*args, *flat_kv, *flat_mtp)
    for a, b in zip(got[:5], want):
        assert torch.equal(a, b)
    for new, old_input, written in zip(got[5:], flat_kv + flat_mtp, kv + mtp):
        # the gathered MoE sums a token's k experts in slot order, the reference in expert order
        torch.testing.assert_close(new, written, rtol=0, atol=1e-5)
        assert not torch.equal(old_input, written)                           # the input stayed unmutated


# -- the op formulations equal the references ----------------------------------------------------------

def test_sampling_probs_without_bitcast_equals_the_reference():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=gen) * 3
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.9, 1.0])
    top_k = torch.tensor([0, 0, 5, 0, 40, 0])
    top_p = torch.tensor([1.0, 0.9, 0.8, 0.5, 1.0, 0.05])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.05, 0.0])
    want = G.sampling_probs(logits, temperature, top_k, top_p, min_p, 64)
    assert torch.equal(D.sampling_probs(logits, temperature, top_k, top_p, min_p, 64), want)


def test_float_of_bits_inverts_the_bit_view():
    values = torch.tensor([0.0, 1e-45, 3e-39, 1e-8, 0.25, 0.3333, 1.0], dtype=torch.float32)
    bits = values.view(torch.int32).long()
    assert torch.equal(D._float_of_bits(bits), values)


def test_acceptance_decompositions_equal_the_reference():
    gen = torch.Generator().manual_seed(2)
    target = torch.randint(0, 4, (8, 4), generator=gen)
    drafts = torch.randint(0, 4, (8, 3), generator=gen)
    for a, b in zip(D.DECOMPOSITIONS[G.greedy_accept.default](target, drafts), G.greedy_accept(target, drafts)):
        assert torch.equal(a, b)
    probs = torch.rand(8, 4, 10, generator=gen).softmax(-1)
    drafts = torch.randint(0, 10, (8, 3), generator=gen)
    seed, start = torch.arange(8), torch.arange(8) * 3
    for a, b in zip(D.rejection_accept(probs, drafts, None, seed, start), G.rejection_accept(probs, drafts, None, seed, start)):
        assert torch.equal(a, b)


def test_attention_choice_matches_the_reference_on_both_sides_of_the_threshold():
    gen = torch.Generator().manual_seed(3)
    H, dn, dv, r, R = 2, 8, 8, 4, 16
    kv_b = torch.randn(H * (dn + dv), R, generator=gen)
    w = kv_b.view(H, dn + dv, R)
    cache = torch.randn(6, 4, R + r, generator=gen)
    tables = torch.tensor([[1, 2, 3], [4, 5, 0]])
    for T in (2, 10):
        q_nope, q_pe = torch.randn(2, T, H, dn, generator=gen), torch.randn(2, T, H, r, generator=gen)
        pos = torch.arange(T).expand(2, T)
        args = (q_nope, q_pe, cache, tables, pos, kv_b, w[:, :dn], w[:, dn:], 0.3)
        assert torch.equal(D.mla_paged_attention(*args), G.mla_paged_attention(*args))


# -- onnxruntime through the engine ---------------------------------------------------------------------

@pytest.fixture(params=["tiny", pytest.param("embedded", marks=pytest.mark.slow)])
def onnx_compiled(request):
    return request.getfixturevalue(request.param)


def test_every_session_graph_passes_the_full_onnx_check(onnx_compiled):
    exe = onnx_compiled.executable
    assert onnx_compiled.backend == "onnx" and set(exe.graphs) == {"step_greedy", "prefill"}  # step: on first sampled decode
    for g in exe.graphs.values():
        onnx.checker.check_model(g.model, full_check=True)
        assert g.outputs[-len(g.caches):] == [f"new_{c}" for c in g.caches]
        ops = {n.op_type for n in g.model.graph.node}
        assert "ScatterND" in ops                                              # the cache writes
        assert g.writes_in_place == set(g.caches)                              # each read only by its scatter


def test_greedy_mtp_w8a8_tokens_identical_to_eager(onnx_compiled):
    want = _eager_twin(onnx_compiled).generate(PROMPTS, max_new_tokens=STEPS)
    assert onnx_compiled.generate(PROMPTS, max_new_tokens=STEPS) == want
    assert onnx_compiled.stats["steps"] > 0


def test_both_cache_bindings_give_the_same_tokens(onnx_compiled):
    exe = onnx_compiled.executable
    alias = onnx_compiled.generate(PROMPTS[:2], max_new_tokens=8)
    exe.cache_binding = "copy"
    try:
        assert onnx_compiled.generate(PROMPTS[:2], max_new_tokens=8) == alias
    finally:
        exe.cache_binding = "alias"


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{}, {"spec": "mtp"}, {"quant": "w8a8"}], ids=["plain", "mtp", "w8a8"])
def test_each_configuration_is_token_identical_to_eager(kw):
    from graphopt.models import load
    compiled = graphopt.compile(load(dtype=torch.float32), backend="onnx", progress=False, **kw)
    want = _eager_twin(compiled).generate(PROMPTS, max_new_tokens=STEPS)
    assert compiled.generate(PROMPTS, max_new_tokens=STEPS) == want


@pytest.mark.slow
def test_sampled_generation_runs_the_sampling_step_and_matches_eager(tiny):
    kw = dict(max_new_tokens=8, temperature=0.8, seed=3)
    got = tiny.generate(PROMPTS, **kw)
    assert "step" in tiny.executable.sessions
    assert got == _eager_twin(tiny).generate(PROMPTS, **kw)


def test_forward_runs_the_main_graph_through_onnxruntime(tiny):
    ids = torch.tensor([PROMPTS[2], PROMPTS[2][::-1]])
    got = tiny(ids)
    assert "main" in tiny.executable.sessions
    torch.testing.assert_close(got, _eager_twin(tiny)(ids), rtol=1e-4, atol=1e-4)


def test_dump_layout_files_are_the_checked_session_models_and_the_report_links_them(tiny, tmp_path):
    exe = tiny.executable
    names = [n for n in tiny.program.names if n in exe.graphs]            # exported already: none re-exported
    paths = export_program(tiny.program, tmp_path, layout=ONNX_LAYOUT, names=names, exported=exe.graphs)
    assert paths == [tmp_path / n / "final.onnx" for n in names] and {"prefill", "step_greedy"} <= set(names)
    for name, path in zip(names, paths):
        assert path.read_bytes() == exe.graphs[name].serialize()           # the model onnx.checker passed
    Dumper(tmp_path).write_report(tiny.report.records, tiny.report.all_notes())
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    for name in names:
        assert f"[final.onnx]({name}/final.onnx)" in md and f"<a href='{name}/final.onnx'>final.onnx</a>" in page


# a fresh interpreter where onnx, onnxruntime and onnxscript cannot be imported (the `onnx` extra absent)
WITHOUT_ONNX = """
import sys
for m in ("onnx", "onnxruntime", "onnxscript"):
    sys.modules[m] = None                                   # `import m` now raises ImportError
import graphopt
from graphopt.models.random import random_model
model = random_model(0, num_hidden_layers=1, first_k_dense_replace=1)   # dense: the cheapest compile
compiled = graphopt.compile(model, backend="eager", progress=False, block_size=4)
assert len(compiled.generate([[1, 2, 3]], max_new_tokens=2)[0]) == 2
try:
    graphopt.compile(model, backend="onnx")
except ImportError as e:
    print(e)
"""


def test_without_the_onnx_extra_eager_compiles_and_the_onnx_backend_names_the_extra():
    run = subprocess.run([sys.executable, "-c", WITHOUT_ONNX], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "missing: onnx, onnxruntime, onnxscript" in run.stdout and "pip install graphopt[onnx]" in run.stdout


@pytest.mark.slow
def test_dump_format_onnx_writes_every_final_graph_checked_and_linked(tmp_path, monkeypatch, capsys):
    from graphopt import cli
    model = random_model(0, num_hidden_layers=1, first_k_dense_replace=0)
    monkeypatch.setattr(cli, "_load_model", lambda *a: (model, None, "random"))
    assert cli.main(["dump", "--format", "onnx", "--dump-dir", str(tmp_path)]) == 0
    names = ["main", "step", "step_greedy", "prefill"]                      # k = 0: no mtp0
    assert sorted(p.parent.name for p in tmp_path.glob("*/final.onnx")) == sorted(names)
    for name in names:
        onnx.checker.check_model(str(tmp_path / name / "final.onnx"), full_check=True)
        assert f"({name}/final.onnx)" in (tmp_path / "report.md").read_text()
    assert f"onnx (open in Netron): {tmp_path / 'prefill' / 'final.onnx'}" in capsys.readouterr().out
