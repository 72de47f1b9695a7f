"""graphopt.compile / CompiledModel: drop-in forward, generate, dumps, the model left untouched, bad input."""

import pytest
import torch

import graphopt
from graphopt.models.generate import greedy_generate
from graphopt.models.random import random_model


def test_compiled_forward_is_a_drop_in(compiled_random):
    model, compiled, _, _ = compiled_random
    ids = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-4, atol=1e-5)


def test_generate_greedy_matches_reference_decoding(compiled_random):
    model, compiled, _, _ = compiled_random
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13]]
    out = compiled.generate(prompts, max_new_tokens=9)
    assert out == [greedy_generate(model, p, 9) for p in prompts]
    assert compiled.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=9) == out[:1]


def test_generate_sampling_is_seeded(compiled_random):
    _, compiled, _, _ = compiled_random
    a = compiled.generate([[5, 6]], max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = compiled.generate([[5, 6]], max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    c = compiled.generate([[5, 6]], max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=8)
    assert a == b and a != c and len(a[0]) == 12


def test_user_model_is_not_modified(compiled_random):
    model, _, _, snapshot = compiled_random
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for name, value in snapshot.items():
        assert torch.equal(state[name], value), name


def test_dump_report_lists_every_pass(compiled_random):
    _, compiled, dump_dir, _ = compiled_random
    report = (dump_dir / "report.md").read_text()
    for record in compiled.report.records:
        assert f"| {record.graph} | {record.phase} | {record.name} |" in report
    assert (dump_dir / "main" / "capture.py").exists() and (dump_dir / "main" / "final.dot").exists()
    assert (dump_dir / "report.html").exists()


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="tensorrt"), "unknown backend 'tensorrt'; accepted: auto, eager"),
    (dict(block_sizes=16), "unknown compile option.*block_sizes.*accepted options"),
    (dict(block_size=12), "power of two"),
    (dict(spec="medusa"), "spec = 'medusa' is not supported; accepted values: None, 'mtp'"),
    (dict(disable_passes=["no_such_pass"]), "unknown pass"),
])
def test_bad_compile_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        graphopt.compile(random_model(num_hidden_layers=1, first_k_dense_replace=1), **kwargs)


def test_unsupported_model_class_is_refused():
    with pytest.raises(TypeError, match="supports graphopt.models.DeepseekV3ForCausalLM.*got torch.nn.modules.linear.Linear"):
        graphopt.compile(torch.nn.Linear(2, 2))


def test_spec_needs_mtp_weights():
    with pytest.raises(ValueError, match="needs MTP weights"):
        graphopt.compile(random_model(num_nextn_predict_layers=0), spec="mtp")


def test_bad_call_inputs(compiled_random):
    _, compiled, _, _ = compiled_random
    with pytest.raises(ValueError, match="2-D LongTensor"):
        compiled(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        compiled(torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match="list of token-id lists"):
        compiled.generate("def f():")


def test_generate_keeps_one_engine_and_grows_it_only_when_a_call_needs_more(compiled_random):
    model, compiled, _, _ = compiled_random
    compiled.generate([[1, 2, 3], [4, 5]], max_new_tokens=6)
    engine, size = compiled._engine, compiled._engine_size
    assert compiled.generate([[7, 8]], max_new_tokens=4) == [greedy_generate(model, [7, 8], 4)]
    assert compiled._engine is engine                                       # smaller call: same engine, same cache
    prompts = [[1], [2], [3, 4, 5]]
    assert compiled.generate(prompts, max_new_tokens=30) == [greedy_generate(model, p, 30) for p in prompts]
    assert compiled._engine is not engine and compiled._engine_size > size  # more rows and positions: grown
    grown = compiled._engine
    compiled.generate([[9]], max_new_tokens=2)
    assert compiled._engine is grown


def test_unseeded_sampling_repeats_across_calls_on_the_reused_engine(compiled_random):
    _, compiled, _, _ = compiled_random
    a = compiled.generate([[5, 6], [7]], max_new_tokens=8, temperature=1.0)
    b = compiled.generate([[5, 6], [7]], max_new_tokens=8, temperature=1.0)
    assert a == b


def test_report_carries_pass_notes_and_stage_times(compiled_random):
    _, compiled, dump_dir, _ = compiled_random
    notes = compiled.report.notes
    assert notes["backend"] == "eager" and "k = 0" in notes["step/fuse_spec_step"]
    assert {"capture", "passes", "lower"} <= set(compiled.report.seconds)
    report = (dump_dir / "report.md").read_text()
    assert "- step/fuse_spec_step: fused main + 0 MTP graph(s)" in report and "- passes seconds:" in report
    assert "step/fuse_spec_step" in compiled.report.render()


def test_random_step_calibration_is_said_in_the_report():
    from graphopt.quant import PRESETS
    config = PRESETS["w8a8_smooth"]
    config = config.replace(calibration=config.calibration.__class__(num_samples=2))
    compiled = graphopt.compile(random_model(num_hidden_layers=1, first_k_dense_replace=1), quant=config,
                                progress=False)
    assert "random valid steps" in compiled.report.notes["main/quant_calibrate"]


def test_unknown_pass_names_fail_before_capture(monkeypatch):
    import graphopt.api as api
    monkeypatch.setattr(api, "capture_main", lambda *a: pytest.fail("captured before validating"))
    with pytest.raises(ValueError, match="unknown pass.*no_such_pass"):
        graphopt.compile(random_model(num_hidden_layers=1, first_k_dense_replace=1), disable_passes=["no_such_pass"])
    with pytest.raises(ValueError, match="spec= needs the fuse_spec_step pass"):
        graphopt.compile(random_model(), spec="mtp", disable_passes=["fuse_spec_step"])
