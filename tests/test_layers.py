"""The import rules of docs/architecture.md, checked by reading the source (ast), not by importing it.

Layers, lowest first; a module may import graphopt modules of its own layer or of lower ones only:

    ops  <-  models, spec  <-  step  <-  capture  <-  passes, quant  <-  backends  <-  runtime
         <-  serve, api, cli, config, bench (the package's top)

ops imports nothing of ours beyond ops; step only models.config, ops and torch; backends never the
runtime; the runtime consumes an Executable and never imports capture, passes or a backend.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "graphopt"

LAYERS = {"ops": 0, "models": 1, "spec": 1, "step": 2, "capture": 3, "passes": 4, "quant": 4, "backends": 5,
          "runtime": 6, "serve": 7, "api": 7, "cli": 7, "config": 7, "bench": 7, "__init__": 7,
          "__main__": 7}
STEP_MAY_IMPORT = {"graphopt.models.config", "graphopt.ops"}
RUNTIME_MAY_IMPORT = {"ops", "models", "spec", "step", "runtime"}   # it consumes an Executable, nothing above


def _part(module: str) -> str:
    """graphopt.passes.manager -> "passes"; graphopt -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute graphopt module) for every import of ours in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_of(path) if path.name == "__init__.py" else _module_of(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "graphopt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "graphopt":
                continue
            if node.module is None:   # from . import backends: each name is a module
                found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, module))
    return found


def _violations() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        me = _module_of(path)
        mine = _part(me)
        if mine not in LAYERS:
            bad.append(f"{path.relative_to(ROOT.parent)}: package {mine!r} has no layer in tests/test_layers.py")
            continue
        for line, target in _imports(path):
            theirs = _part(target)
            where = f"{path.relative_to(ROOT.parent)}:{line} imports {target}"
            if theirs not in LAYERS:
                bad.append(f"{where}: unknown package {theirs!r}")
            elif LAYERS[theirs] > LAYERS[mine]:
                bad.append(f"{where}: {mine} (layer {LAYERS[mine]}) may not import {theirs} (layer {LAYERS[theirs]})")
            elif mine == "ops" and theirs != "ops":
                bad.append(f"{where}: ops imports nothing of ours beyond ops")
            elif mine == "step" and theirs != "step" and not any(
                    target == m or target.startswith(m + ".") for m in STEP_MAY_IMPORT):
                bad.append(f"{where}: step imports only graphopt.models.config, graphopt.ops and torch")
            elif mine == "runtime" and theirs not in RUNTIME_MAY_IMPORT:
                bad.append(f"{where}: the runtime drives an Executable; it imports no compiler layer")
    return bad


# Breaks that are known and scheduled (issue "Backends own execution", item 4: ops own their
# references). Listed by file and imported module, so a new break fails the test, and a listed one
# that was mended must be removed from here (test_known_breaks_still_exist).
KNOWN_BREAKS: set[tuple[str, str]] = set()   # every import follows the rules


def _key(violation: str) -> tuple[str, str]:
    where, _, rest = violation.partition(" imports ")
    return where.rsplit(":", 1)[0], rest.split(":", 1)[0]


def test_layers_import_only_downwards():
    bad = [v for v in _violations() if _key(v) not in KNOWN_BREAKS]
    assert not bad, "import rules broken:\n" + "\n".join(bad)


def test_known_breaks_still_exist():
    found = {_key(v) for v in _violations()}
    mended = KNOWN_BREAKS - found
    assert not mended, f"mended, remove from KNOWN_BREAKS: {sorted(mended)}"


def test_the_checker_sees_relative_and_absolute_imports(tmp_path):
    pkg = tmp_path / "graphopt"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "runtime").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("from ..models import config\n")
    (pkg / "runtime" / "engine.py").write_text("def f():\n    from ..passes import manager\n    import graphopt.step\n")
    global ROOT
    saved, ROOT = ROOT, pkg
    try:
        bad = _violations()
    finally:
        ROOT = saved
    assert any("ops/__init__.py:1 imports graphopt.models" in b and "ops (layer 0)" in b for b in bad)
    assert any("runtime/engine.py:2 imports graphopt.passes" in b and "no compiler layer" in b for b in bad)
    assert not any("graphopt.step" in b for b in bad)   # runtime may import step
    assert len(bad) == 2


@pytest.mark.parametrize("module,expect", [("graphopt.passes.manager", "passes"), ("graphopt", "__init__"),
                                           ("graphopt.api", "api")])
def test_part(module, expect):
    assert _part(module) == expect
