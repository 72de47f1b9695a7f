"""graphopt/cli.py: help without torch, --version, one way to name the model, one-line errors, exit 2."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import graphopt
import graphopt.cli as cli
from graphopt.cli import main

VERBS = ["demo", "compile", "dump", "calibrate", "eval", "bench", "train-tiny"]
PACKAGE = Path(graphopt.__file__).parent


def test_help_and_version_import_no_torch():
    # graphopt/__init__.py is stubbed so that the test measures cli.py's own imports
    code = (f"import sys, types; pkg = types.ModuleType('graphopt'); pkg.__path__ = [{str(PACKAGE)!r}]; "
            "sys.modules['graphopt'] = pkg\nimport graphopt.cli as c\n"
            f"for argv in [['--help'], ['--version'], *([v, '--help'] for v in {VERBS!r})]:\n"
            "    try: c.main(argv)\n    except SystemExit as e: assert e.code == 0, (argv, e.code)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"graphopt {graphopt.__version__}" in run.stdout and "--model DIR" in run.stdout


def test_every_model_verb_names_the_model_with_dash_dash_model(capsys):
    for verb in ["demo", "compile", "dump", "calibrate", "eval", "bench"]:
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "--model DIR" in capsys.readouterr().out, verb


@pytest.mark.parametrize("argv, message", [
    (["demo", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["demo", "--k", "-1"], "argument --k: must be >= 0"),
    (["demo", "--model", "/no/such/dir"], "/no/such/dir is not a directory"),
    (["compile", "--disable-passes", "fuse_swiglu,nosuch"], "unknown pass(es) nosuch; passes:"),
    (["dump", "--quant", "w9"], "unknown quant preset 'w9'"),
    (["dump", "--format", "fx,netron"], "argument --format: unknown format(s) netron; accepted: fx, onnx"),
    (["bench", "--prompts", "0"], "argument --prompts: must be >= 1"),
    (["train-tiny", "--steps", "0"], "argument --steps: must be >= 1"),
    (["serve", "--device", "meta"], "--device 'meta': graphopt serve runs on cpu or cuda[:N]"),
    (["serve", "--device", "gpu0"], "--device 'gpu0' is not a device; accepted: cpu, cuda, cuda:N"),
    (["serve", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
])
def test_bad_input_is_one_line_and_exit_2_before_loading(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("model loaded despite bad options"))
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and err.startswith(f"graphopt {argv[0]}: error:")


def test_a_quantised_directory_is_refused_as_model_with_the_right_verb(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "quant_model.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--model", str(tmp_path)])
    assert e.value.code == 2 and f"graphopt eval --quantized {tmp_path}" in capsys.readouterr().err


def test_positional_model_still_works_with_a_deprecation_note(tmp_path, capsys, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    seen = []

    def fake_load(path, dtype="float32"):
        seen.append(path)
        raise RuntimeError("stop here")

    monkeypatch.setattr(cli, "_load_model", fake_load)
    assert main(["compile", str(tmp_path)]) == 1               # not bad input: exit 1, with the hint
    err = capsys.readouterr().err.splitlines()
    assert seen == [str(tmp_path)] and "positional MODEL is deprecated; use --model" in err[0]
    assert err[1] == "graphopt compile: error: stop here (RuntimeError; run with --debug for the traceback)"
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert main(["compile", "--model", str(other), str(tmp_path)]) == 2
    assert "two models given" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="stop here"):
        main(["compile", "--debug", str(tmp_path)])            # --debug: the real traceback


def test_errors_from_the_work_are_one_line_exit_2(monkeypatch, capsys):
    from graphopt.models.checkpoint import CheckpointError

    def fake_load(path, dtype="float32"):
        raise CheckpointError("tensor x: expected shape (2,),\n got (3,)")

    monkeypatch.setattr(cli, "_load_model", fake_load)
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == "graphopt demo: error: tensor x: expected shape (2,), got (3,)\n"


def test_dump_format_onnx_without_the_extra_is_one_line_exit_2_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("model loaded without onnx"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)           # as if not installed
    for name in [m for m in sys.modules if m.startswith("graphopt.backends.onnx")]:
        monkeypatch.delitem(sys.modules, name)                      # re-imported, restored afterwards
    assert main(["dump", "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: onnxruntime" in err and "pip install graphopt[onnx]" in err


def test_dump_format_onnx_exports_the_final_graphs_into_the_dump_and_links_them(tmp_path, monkeypatch, capsys):
    # the CLI's part only: the export is faked (tests/backends/test_onnx.py runs the real one)
    onnx_backend = pytest.importorskip("graphopt.backends.onnx")
    from graphopt.api import CompileReport

    compiled = SimpleNamespace(program=SimpleNamespace(names=["main", "step"]),
                               report=CompileReport(notes={"backend": "eager"}))
    layouts = []

    def fake_export(program, directory, layout):
        layouts.append(layout)
        paths = [Path(directory) / layout.format(name=n) for n in program.names]
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"onnx")
        return paths

    monkeypatch.setattr(cli, "_load_model", lambda *a: (None, None, "a model"))
    monkeypatch.setattr(cli, "_compile", lambda args, model, k: (compiled, None))
    monkeypatch.setattr(onnx_backend, "export_program", fake_export)
    assert main(["dump", "--dump-dir", str(tmp_path / "fx")]) == 0 and layouts == []   # default: fx only
    assert main(["dump", "--format", "fx,onnx", "--dump-dir", str(tmp_path)]) == 0
    assert layouts == ["{name}/final.onnx"]
    out = capsys.readouterr().out
    assert f"onnx (open in Netron): {tmp_path / 'step' / 'final.onnx'}" in out
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "- main: [final.onnx](main/final.onnx)" in md and "- step: [final.onnx](step/final.onnx)" in md
    assert "<a href='step/final.onnx'>final.onnx</a>" in page


def test_python_dash_m_graphopt_is_the_same_command():
    run = subprocess.run([sys.executable, "-m", "graphopt", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"graphopt {graphopt.__version__}"


def test_serve_compiled_takes_no_dtype_and_a_missing_gpu_is_named(tmp_path, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    (tmp_path / cli.COMPILED_MARKER).write_text("{}")
    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("model loaded despite bad options"))
    assert main(["serve", "--compiled", str(tmp_path), "--dtype", "bfloat16"]) == 2
    assert "takes no --model, --quant or --dtype" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)     # as on a machine without a GPU
    assert main(["serve", "--device", "cuda"]) == 2
    assert "this torch sees no CUDA device; use --device cpu" in capsys.readouterr().err
