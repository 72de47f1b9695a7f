"""A Program on disk and back: the optimised graphs, their weights and a manifest, so a load skips
capture and every pass.

    DIR/manifest.json        format, format_version, graphopt and torch versions, the model config,
                             spec, quant, compile options, cache layout, signatures, the pass
                             records and notes, and the size + sha256 of each file below
    DIR/graphs.json          each graph as a list of nodes [op, name, target, args, kwargs]
    DIR/weights.safetensors  every distinct tensor the graphs read (get_attr), stored once

Why our own JSON and not `torch.export.save`: that needs an ExportedProgram, and after the passes
we hold flat `fx.GraphModule`s (graphopt:: ops, registered `_quant_*` buffers, the fused step built
from several graphs). Re-parsing fx's generated Python is fragile. A node list is a small, versioned
format we control: targets are qualified op names (`aten::mm.default`, `graphopt::rms_norm.default`)
or a few allowed Python callables (`_operator.getitem`); arguments are JSON with tagged values:

    Node -> {"$n": name}   tuple -> {"$t": [...]}   dtype -> {"$dtype": "float32"}
    device -> {"$device": "cpu"}   memory_format / layout -> {"$mf" / "$layout": name}
    slice -> {"$slice": [a, b, c]}   dict -> {"$d": [[k, v], ..]}   inf / nan -> {"$f": "inf"}

Anything else is a TypeError at save time, naming the graph and the node. Not saved: node meta
(`meta["val"]`, stack traces): a loaded Program runs and lowers, but a pass that needs meta would
have to propagate it again; the `make_inputs` factories and calibration state (no pass runs again).
torch.export's `_guards_fn` input check (an unused call_module) is dropped. Tensors shared between
graphs (the fused step reads main's and the MTP weights) are stored once per storage, views keep
their strides and loaded weights are re-aligned to 64 bytes (both keep the reloaded logits
bit-identical), and a tensor shared before is one shared tensor again. Device arguments equal to
the saved cache device follow the device of the load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.fx as fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo, CodeGen
from torch.utils._pytree import treespec_dumps, treespec_loads

from ..models.config import DeepseekV3Config
from ..models.fileio import replace_dir_atomically
from ..spec import SpecConfig
from ..step.paged import CacheLayout
from .manager import PassRecord
from .program import CompileState, GraphSignature, Program

__all__ = ["FORMAT", "FORMAT_VERSION", "is_artefact", "load_program", "read_manifest", "save_program"]

FORMAT, FORMAT_VERSION = "graphopt-compiled", 1
MANIFEST, GRAPHS, WEIGHTS = "manifest.json", "graphs.json", "weights.safetensors"
# modules whose functions a graph may call directly (getitem on a multi-output op, SymInt maths)
_PY_MODULES = ("_operator", "operator", "math", "builtins", "torch")


# -- save ------------------------------------------------------------------------------------------
def save_program(program: Program, directory: str | Path, graphopt_version: str, extra: dict) -> None:
    """Write `program` to `directory` atomically (see the module doc); `extra` (backend, options,
    report) goes into the manifest as it is. An existing directory is replaced only if it is an
    artefact."""
    table = _TensorTable()
    graphs = {name: _encode_graph(gm, table, name) for name, gm in program.graphs.items()}
    graphs_json = json.dumps({"graphs": graphs}, separators=(",", ":")).encode()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "graphopt_version": graphopt_version, "torch_version": torch.__version__,
        **extra,
        "model_config": program.model_config.to_dict(),
        "spec": dataclasses.asdict(program.state.spec) if program.state.spec is not None else None,
        "quant": program.state.quant.to_dict() if program.state.quant is not None else None,
        "cache": _encode_layout(program.cache),
        "signatures": {n: {"inputs": list(s.inputs), "outputs": list(s.outputs)}
                       for n, s in program.signatures.items()},
        "records": [dataclasses.asdict(r) for r in program.state.records],
        "notes": dict(program.state.notes),
    }

    def write(tmp: Path) -> None:
        (tmp / GRAPHS).write_bytes(graphs_json)
        safetensors.torch.save_file(table.tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        manifest["files"] = {f: _file_digest(tmp / f) for f in (GRAPHS, WEIGHTS)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")   # last: it vouches for the rest

    replace_dir_atomically(directory, write, is_ours=is_artefact, what="graphopt compiled artefact")


def is_artefact(directory: str | Path) -> bool:
    """True when `directory` holds a manifest of ours (whatever its version)."""
    try:
        return json.loads((Path(directory) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class _TensorTable:
    """Each distinct storage stored once; a tensor is (key, view): view None when the stored tensor
    is the tensor itself, else [dtype, shape, stride, offset] over the stored storage's bytes.

    Views keep their strides: a contiguous copy of a transposed weight would change the matmul's
    summation order, and the reloaded logits would differ in the last bits."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._stored: dict[tuple, tuple[str, torch.Tensor]] = {}    # (device, data_ptr) -> (key, stored)

    def add(self, key: str, t: torch.Tensor) -> tuple[str, list | None]:
        t = t.detach()
        storage = t.untyped_storage()
        whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        sid = (t.device, storage.data_ptr()) if storage.nbytes() else (t.device, "empty", key)
        if sid not in self._stored:
            stored = t if whole else torch.empty(0, dtype=torch.uint8, device=t.device).set_(
                storage, 0, (storage.nbytes(),), (1,))                  # the storage's bytes, flat
            self._stored[sid] = (key, stored)
            self.tensors[key] = stored
        key, stored = self._stored[sid]
        if stored.dtype == t.dtype and stored.shape == t.shape and whole:
            return key, None
        return key, [str(t.dtype).removeprefix("torch."), list(t.shape), list(t.stride()), t.storage_offset()]


def _encode_graph(gm: fx.GraphModule, table: _TensorTable, where: str) -> dict:
    nodes, attrs, submodules = [], {}, {}
    for n in gm.graph.nodes:
        at = f"graph {where!r} node {n.name!r}"
        if n.op == "call_module":
            sub = gm.get_submodule(n.target)
            if type(sub).__name__ == "GuardsFn" and not n.users:
                continue   # torch.export's input-shape check; its result is unused
            if not isinstance(sub, fx.GraphModule):
                raise TypeError(f"cannot save {at}: call_module of a {type(sub).__name__} (only fx graphs)")
            submodules[n.target] = _encode_graph(sub, table, f"{where}.{n.target}")
        elif n.op == "get_attr":
            value = _get_attr(gm, n.target)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"cannot save {at}: get_attr {n.target!r} is a {type(value).__name__}, not a tensor")
            param = isinstance(value, torch.nn.Parameter)
            attrs[n.target] = [*table.add(f"{where}/{n.target}", value), param, param and value.requires_grad]
        target = _encode_function(n.target, at) if n.op == "call_function" else n.target
        nodes.append([n.op, n.name, target, _encode(n.args, at), _encode(n.kwargs, at)])
    return {"nodes": nodes, "attrs": attrs, "submodules": submodules, "codegen": _encode_codegen(gm.graph, where)}


def _get_attr(gm: torch.nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _encode_function(fn: Any, at: str) -> str:
    if isinstance(fn, torch._ops.OpOverload):
        return f"op:{fn.namespace}::{fn._opname}.{fn._overloadname}"
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module in _PY_MODULES and name and _resolve_python(module, name) is fn:
        return f"py:{module}:{name}"
    raise TypeError(f"cannot save {at}: call_function target {fn!r} is neither an op overload nor a "
                    f"function of {', '.join(_PY_MODULES)}")


def _encode(v: Any, at: str) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"$f": repr(v)}
    if isinstance(v, fx.Node):
        return {"$n": v.name}
    if isinstance(v, tuple):
        return {"$t": [_encode(x, at) for x in v]}
    if isinstance(v, list):
        return [_encode(x, at) for x in v]
    if isinstance(v, dict):
        return {"$d": [[k, _encode(x, at)] for k, x in v.items()]}
    if isinstance(v, torch.dtype):
        return {"$dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"$device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"$mf": str(v).removeprefix("torch.")}
    if isinstance(v, torch.layout):
        return {"$layout": str(v).removeprefix("torch.")}
    if isinstance(v, slice):
        return {"$slice": [_encode(x, at) for x in (v.start, v.stop, v.step)]}
    raise TypeError(f"cannot save {at}: argument {v!r} of type {type(v).__name__} has no saved form")


def _encode_codegen(graph: fx.Graph, where: str) -> dict | None:
    cg = graph._codegen
    if isinstance(cg, _PyTreeCodeGen):
        info = cg.pytree_info
        dump = lambda spec: None if spec is None else treespec_dumps(spec)
        return {"orig_args": list(info.orig_args), "in_spec": dump(info.in_spec), "out_spec": dump(info.out_spec)}
    if type(cg) is CodeGen:
        return None
    raise TypeError(f"cannot save graph {where!r}: unknown fx code generator {type(cg).__name__}")


def _encode_layout(c: CacheLayout) -> dict:
    return {"num_layers": c.num_layers, "block_size": c.block_size, "kv_cache_dim": c.kv_cache_dim,
            "dtype": str(c.dtype).removeprefix("torch."), "device": str(c.device), "num_mtp": c.num_mtp,
            "cache_dtype": None if c.cache_dtype is None else str(c.cache_dtype).removeprefix("torch.")}


def _file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


# -- load ------------------------------------------------------------------------------------------
def read_manifest(directory: str | Path, graphopt_version: str) -> dict:
    """The manifest of the artefact at `directory`, checked: format, format version, graphopt version
    and torch major.minor must match this installation (graphs name ops that change between them)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a graphopt compiled artefact: no {MANIFEST} "
                                f"(write one with CompiledModel.save(dir) or `graphopt compile MODEL --out DIR`)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a graphopt compiled artefact manifest (format "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r})")
    saved = (manifest.get("format_version"), manifest.get("graphopt_version"), manifest.get("torch_version"))
    if saved[0] != FORMAT_VERSION or saved[1] != graphopt_version or \
            _major_minor(saved[2]) != _major_minor(torch.__version__):
        raise ValueError(f"{directory} was compiled by graphopt {saved[1]} with torch {saved[2]} (artefact format "
                         f"{saved[0]}); this is graphopt {graphopt_version} with torch {torch.__version__} (format "
                         f"{FORMAT_VERSION}). Compiled graphs are not portable across these versions: recompile "
                         f"(graphopt.compile(model, ...).save(dir) or `graphopt compile MODEL --out DIR`)")
    return manifest


def _major_minor(version: Any) -> tuple[str, ...]:
    return tuple(str(version).split("+")[0].split(".")[:2])


def load_program(directory: str | Path, manifest: dict, device: torch.device | str | None = None) -> Program:
    """The Program saved at `directory` (its manifest from `read_manifest`), weights on `device`
    (None: the device it was compiled on)."""
    directory = Path(directory)
    for name, expect in manifest["files"].items():
        _check_file(directory / name, expect)
    layout = _decode_layout(manifest["cache"])
    saved_device = layout.device
    if device is not None:
        layout = dataclasses.replace(layout, device=torch.device(device))
    try:
        graphs = json.loads((directory / GRAPHS).read_bytes())["graphs"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{directory / GRAPHS} is corrupt: {e}") from None
    try:
        weights = safetensors.torch.load_file(str(directory / WEIGHTS), device=str(layout.device))
    except (safetensors.SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{directory / WEIGHTS} is corrupt: {e}") from None
    decoder = _Decoder(weights, {str(saved_device): layout.device}, directory)
    state = CompileState(spec=SpecConfig(**manifest["spec"]) if manifest["spec"] else None,
                         quant=_decode_quant(manifest["quant"]),
                         records=[PassRecord(**r) for r in manifest["records"]], notes=dict(manifest["notes"]))
    program = Program(DeepseekV3Config.from_dict(manifest["model_config"]), layout, state)
    for name, encoded in graphs.items():
        sig = manifest["signatures"][name]
        program.set(name, decoder.graph(encoded, name), GraphSignature(tuple(sig["inputs"]), tuple(sig["outputs"])))
    return program


def _check_file(path: Path, expect: dict) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the compiled artefact")
    size = path.stat().st_size
    if size != expect["bytes"]:
        raise ValueError(f"{path} is corrupt or truncated: {size} bytes, the manifest says {expect['bytes']}")
    if _file_digest(path)["sha256"] != expect["sha256"]:
        raise ValueError(f"{path} is corrupt: its sha256 differs from the manifest's")


class _Decoder:
    def __init__(self, weights: dict[str, torch.Tensor], devices: dict[str, torch.device], directory: Path):
        self.weights, self.devices, self.directory = weights, devices, directory
        self._tensors: dict[tuple, torch.Tensor] = {}

    def graph(self, encoded: dict, where: str) -> fx.GraphModule:
        graph, env = fx.Graph(), {}
        for op, name, target, args, kwargs in encoded["nodes"]:
            at = f"{self.directory / GRAPHS}: graph {where!r} node {name!r}"
            if op == "call_function":
                target = _decode_function(target, at)
            node = graph.create_node(op, target, self._value(args, env, at), self._value(kwargs, env, at), name=name)
            if node.name != name:
                raise ValueError(f"{at}: the name is taken twice")
            env[name] = node
        if encoded["codegen"] is not None:
            cg = encoded["codegen"]
            load = lambda s: None if s is None else treespec_loads(s)
            graph._codegen = _PyTreeCodeGen(_PyTreeInfo(cg["orig_args"], load(cg["in_spec"]), load(cg["out_spec"])))
        root = torch.nn.Module()
        for target, (key, view, is_param, requires_grad) in encoded["attrs"].items():
            self._assign(root, target, self._tensor(key, view, is_param, requires_grad, where), is_param)
        for target, sub in encoded["submodules"].items():
            self._assign(root, target, self.graph(sub, f"{where}.{target}"), False)
        return fx.GraphModule(root, graph)

    def _tensor(self, key: str, view: list | None, is_param: bool, requires_grad: bool, where: str) -> torch.Tensor:
        """The same (key, view) gives the same tensor object: graphs that shared a weight share it again."""
        ident = (key, json.dumps(view), is_param)
        if ident in self._tensors:
            return self._tensors[ident]
        if key not in self.weights:
            raise ValueError(f"{self.directory / WEIGHTS} is corrupt: no tensor {key!r} (graph {where!r} reads it)")
        t = self.weights[key]
        if t.data_ptr() % 64:   # safetensors aligns data to 8 bytes only; kernels pick paths by alignment
            t = self.weights[key] = t.clone()
        if view is not None:
            dtype, shape, stride, offset = view
            t = t.reshape(-1).view(torch.uint8).view(getattr(torch, dtype)).as_strided(shape, stride, offset)
        if is_param:
            t = torch.nn.Parameter(t, requires_grad=requires_grad)
        self._tensors[ident] = t
        return t

    @staticmethod
    def _assign(root: torch.nn.Module, target: str, value: Any, is_param: bool) -> None:
        *path, field = target.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        if isinstance(value, torch.nn.Module):
            module.add_module(field, value)
        elif is_param:
            module.register_parameter(field, value)
        else:
            module.register_buffer(field, value)

    def _value(self, v: Any, env: dict[str, fx.Node], at: str) -> Any:
        if isinstance(v, list):
            return [self._value(x, env, at) for x in v]
        if not isinstance(v, dict):
            return v
        (tag, x), = v.items()
        if tag == "$n":
            if x not in env:
                raise ValueError(f"{at}: refers to node {x!r} before it is defined")
            return env[x]
        if tag == "$t":
            return tuple(self._value(e, env, at) for e in x)
        if tag == "$d":
            return {k: self._value(e, env, at) for k, e in x}
        if tag == "$device":
            return self.devices.get(x, torch.device(x))
        if tag == "$slice":
            return slice(*(self._value(e, env, at) for e in x))
        if tag == "$f":
            return float(x)
        if tag in ("$dtype", "$mf", "$layout"):
            value = getattr(torch, x, None)
            if not isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
                raise ValueError(f"{at}: unknown torch {tag[1:]} {x!r}")
            return value
        raise ValueError(f"{at}: unknown value tag {tag!r}")


def _decode_function(target: str, at: str) -> Any:
    kind, _, name = target.partition(":")
    try:
        if kind == "op":
            namespace, _, rest = name.partition("::")
            opname, _, overload = rest.rpartition(".")
            return getattr(getattr(getattr(torch.ops, namespace), opname), overload)
        module, _, qualname = name.partition(":")
        if kind == "py" and module in _PY_MODULES:
            return _resolve_python(module, qualname)
    except (AttributeError, RuntimeError) as e:
        raise ValueError(f"{at}: this installation has no {name!r} ({e}); was it compiled with other ops?") from None
    raise ValueError(f"{at}: call target {target!r} is not one this format allows")


def _resolve_python(module: str, qualname: str) -> Any:
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _decode_layout(c: dict) -> CacheLayout:
    cache_dtype = c.get("cache_dtype")             # absent in artefacts from before C8 storage
    return CacheLayout(c["num_layers"], c["block_size"], c["kv_cache_dim"], getattr(torch, c["dtype"]),
                       torch.device(c["device"]), c["num_mtp"], None if cache_dtype is None else getattr(torch, cache_dtype))


def _decode_quant(data: dict | None):
    if data is None:
        return None
    from ..quant.config import QuantConfig
    return QuantConfig.from_dict(data)
