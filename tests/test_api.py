"""graphopt.compile / CompiledModel: drop-in forward, generate, dumps, the model left untouched, bad input."""

import re

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
    (dict(fuse_projections="no"), "fuse_projections='no' must be True or False"),
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
    with pytest.raises(ValueError, match="text prompts need a tokenizer: pass tokenizer="):
        compiled.generate("def f():")                   # the random model has no tokenizer
    with pytest.raises(ValueError, match="a list of token-id lists"):
        compiled.generate([1, 2, 3])


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
    from graphopt.quant import PRESETS, CalibrationConfig
    config = PRESETS["w8a8_smooth"].replace(calibration=CalibrationConfig(sources=(("random", 1.0),), num_samples=2))
    compiled = graphopt.compile(random_model(num_hidden_layers=1, first_k_dense_replace=1), quant=config,
                                progress=False)
    assert "random ids" in compiled.report.notes["main/quant_calibrate"]


def test_text_calibration_without_a_tokenizer_fails_before_capture(monkeypatch):
    import graphopt.api as api
    monkeypatch.setattr(api, "capture_main", lambda *a, **kw: pytest.fail("captured before validating"))
    with pytest.raises(ValueError, match="tokenizer"):
        graphopt.compile(random_model(num_hidden_layers=1, first_k_dense_replace=1), quant="w8a8_static")


def test_unknown_pass_names_fail_before_capture(monkeypatch):
    import graphopt.api as api
    monkeypatch.setattr(api, "capture_main", lambda *a, **kw: pytest.fail("captured before validating"))
    with pytest.raises(ValueError, match="unknown pass.*no_such_pass"):
        graphopt.compile(random_model(num_hidden_layers=1, first_k_dense_replace=1), disable_passes=["no_such_pass"])
    with pytest.raises(ValueError, match="spec= needs the fuse_spec_step pass"):
        graphopt.compile(random_model(), spec="mtp", disable_passes=["fuse_spec_step"])


# -- issue 15: an nn.Module drop-in, eos by default, progress -------------------------------------

def test_compiled_model_is_an_inference_module_sharing_the_graph_weights(compiled_random):
    model, compiled, _, _ = compiled_random
    assert isinstance(compiled, torch.nn.Module) and compiled.eval() is compiled and not compiled.training
    assert compiled.device == torch.device("cpu") and compiled.config == model.config
    state = compiled.state_dict()
    ptrs = [t.data_ptr() for t in state.values()]
    assert len(set(ptrs)) == len(ptrs)                                   # each tensor once
    model_ptrs = {t.data_ptr() for t in model.state_dict().values()}
    assert model.model.embed_tokens.weight.data_ptr() in ptrs and set(ptrs) & model_ptrs  # no copies
    assert "main.model.model.embed_tokens.weight" in state
    assert not compiled.load_state_dict(state).missing_keys
    assert compiled.to("cpu") is compiled and compiled.to(torch.float32) is compiled
    with pytest.raises(RuntimeError, match="cannot be moved in place.*load_compiled"):
        compiled.to(torch.float16)
    with pytest.raises(RuntimeError, match="cannot be converted in place"):
        compiled.half()
    with pytest.raises(RuntimeError, match="inference-only"):
        compiled.train()


def test_attention_mask_left_and_right_padding(compiled_random):
    _, compiled, _, _ = compiled_random
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0          # left padding
    mask[2, 6:] = 0          # right padding
    out = compiled(ids, attention_mask=mask)
    torch.testing.assert_close(out[0], compiled(ids[:1])[0])
    torch.testing.assert_close(out[1, 4:], compiled(ids[1:2, 4:])[0])
    torch.testing.assert_close(out[2, :6], compiled(ids[2:3, :6])[0])
    assert not out[1, :4].any()
    torch.testing.assert_close(compiled(ids, attention_mask=torch.ones_like(ids)), compiled(ids))
    mask[0, 4] = 0           # a hole in the middle
    with pytest.raises(ValueError, match="row 0 is not supported.*left padding or right padding"):
        compiled(ids, attention_mask=mask)


def test_generate_stops_on_the_config_eos_unless_ignored(compiled_random):
    model, compiled, _, _ = compiled_random
    full = compiled.generate([[1, 2, 3]], max_new_tokens=30, ignore_eos=True)[0]
    eos = full[5]                                     # pretend this token is the eos
    assert compiled.generate([[1, 2, 3]], max_new_tokens=30, eos_token_id=eos)[0] == full[:full.index(eos) + 1]
    config_eos = model.config.eos_token_id
    default = compiled.generate([[1, 2, 3]], max_new_tokens=30)[0]
    want = full[:full.index(config_eos) + 1] if config_eos in full else full
    assert default == want


def test_stream_of_ids_adds_up_to_generate(compiled_random):
    _, compiled, _, _ = compiled_random
    prompts = [[1, 2, 3], [4, 5]]
    pieces = {}
    for i, new in compiled.stream(prompts, max_new_tokens=7, ignore_eos=True):
        pieces.setdefault(i, []).extend(new)
    assert [pieces[0], pieces[1]] == compiled.generate(prompts, max_new_tokens=7, ignore_eos=True)
    next(iter(compiled.stream(prompts, max_new_tokens=7)))   # stopped early: the engine is left idle
    assert not compiled._engine.has_unfinished()


def test_compile_progress_is_one_line_per_phase_and_quiet_when_off(capsys, monkeypatch):
    import copy

    import graphopt.api as api
    from graphopt.capture.step import capture_main
    model = random_model(0, num_hidden_layers=1)
    main = capture_main(model, 16)                   # captured once (compile's default block size): each
    monkeypatch.setattr(api, "capture_main", lambda m, bs, **kw: copy.deepcopy(main))   # compile gets a copy
    graphopt.compile(model, progress=True)
    err = capsys.readouterr().err
    for phase in ("capture", "normalise", "spec", "step", "memory", "lower"):
        assert f"graphopt compile: {phase}" in err
    graphopt.compile(model, progress=False)
    graphopt.compile(model)                          # stderr is not a terminal here: quiet by default
    assert "graphopt compile" not in capsys.readouterr().err


def test_a_compiled_transformers_model_returns_an_output_with_logits():
    transformers = pytest.importorskip("transformers")
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(config).eval()
    compiled = graphopt.compile(hf, progress=False)
    ids = torch.randint(0, 64, (2, 6))
    out = compiled(ids, attention_mask=torch.ones_like(ids))
    assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithPast)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert compiled.tokenizer is None


class _Chars:
    """A toy tokenizer: id i <-> the character chr(48 + i)."""

    def encode(self, text):
        return [ord(c) - 48 for c in text]

    def decode(self, ids):
        return "".join(chr(48 + i) for i in ids)


def test_tokenizer_is_checked_and_load_compiled_takes_one(compiled_random, tmp_path):
    with pytest.raises(TypeError, match="tokenizer must have encode"):
        graphopt.compile(random_model(num_hidden_layers=1), tokenizer=object())
    _, compiled, _, _ = compiled_random
    compiled.save(tmp_path / "c")
    reloaded = graphopt.load_compiled(tmp_path / "c", tokenizer=_Chars())
    assert reloaded.wraps == "graphopt" and graphopt.load_compiled(tmp_path / "c").tokenizer is None
    ids = compiled.generate([[1, 2, 3]], max_new_tokens=6, ignore_eos=True)[0]
    assert reloaded.generate("123", max_new_tokens=6, ignore_eos=True) == _Chars().decode(ids)


def test_cli_demo_streams_with_a_tokens_per_second_bar_and_reports_dtype_and_speed(compiled_random, monkeypatch,
                                                                                  capsys):
    import io

    import tqdm as tqdm_module

    from graphopt import cli

    model, compiled, _, _ = compiled_random
    monkeypatch.setattr(cli, "_load_model", lambda path: (model, None, "test model"))
    monkeypatch.setattr(cli, "_compile", lambda args, model, k: (compiled, None))
    made, real = [], tqdm_module.tqdm

    def make(*args, **kwargs):   # the bar drawn at once into a buffer (the demo's waits 2 s)
        made.append({"kwargs": kwargs, "out": io.StringIO()})
        return real(*args, **{**kwargs, "delay": 0, "leave": True, "mininterval": 0, "file": made[-1]["out"]})
    monkeypatch.setattr(tqdm_module, "tqdm", make)
    assert cli.main(["demo", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "test model; " in out and "M parameters, float32" in out
    prompts = [[1, 2, 3], [4, 5], [6]]                             # the demo's prompts without a tokenizer
    for prompt, generated in zip(prompts, compiled.generate(prompts, max_new_tokens=5)):
        assert f"{prompt}{generated}" in out                       # streamed = generate, token for token
    assert re.search(r"generated \d+ tokens for 3 prompts in [\d.]+ s \([\d.]+ tokens/s\)", out)
    [bar] = made
    assert bar["kwargs"]["delay"] == 2.0 and bar["kwargs"]["unit"] == "tok" and "tok/s" in bar["out"].getvalue()


def test_importing_graphopt_models_starts_no_tqdm_monitor_thread_for_any_first_bar():
    # the monitor thread made the first generate after a compile on a terminal 60-100x slower (2-core CPU);
    # switched off when graphopt.models is imported, so it holds whichever bar comes first. A fresh
    # interpreter, because this one imported graphopt.models long ago.
    import subprocess
    import sys

    code = ("import io, graphopt\n"
            "from tqdm import tqdm\n"
            "assert tqdm.monitor_interval == 10 and tqdm.monitor is None\n"  # tqdm's default: would start one
            "graphopt.compile, graphopt.load_compiled\n"                     # imported on use, graphopt.models too
            "with tqdm(total=2, file=io.StringIO()) as bar:\n"               # e.g. the demo's generate
            "    bar.update()\n"
            "    assert tqdm.monitor_interval == 0 and tqdm.monitor is None, tqdm.monitor\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr