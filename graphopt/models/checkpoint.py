"""Load and save DeepSeek-V3 checkpoints in the Hugging Face safetensors layout, streaming.

Names on disk (HF / DeepSeek layout)               in memory (graphopt.models.deepseek)
  model.layers.{l}.mlp.experts.{e}.gate_proj.weight  model.layers.{l}.mlp.experts.gate_up_proj[e, :I]
  model.layers.{l}.mlp.experts.{e}.up_proj.weight    model.layers.{l}.mlp.experts.gate_up_proj[e, I:]
  model.layers.{l}.mlp.experts.{e}.down_proj.weight  model.layers.{l}.mlp.experts.down_proj[e]
  model.layers.{L+i}.<rest>                          mtp.{i}.<rest>          (L = num_hidden_layers)
  anything else                                      the same name
The stacked names (`...mlp.experts.gate_up_proj`, as transformers 5 holds them) are accepted on disk too.

Memory: the model is built on the meta device, then each tensor is read, converted and put in place
on its own (experts are copied into one preallocated [E, ...] tensor), so the host never holds a
second copy of the model: peak growth is the loaded model plus one tensor (docs/models.md).

FP8 (DeepSeek's official release, `quantization_config.quant_method == "fp8"`): a quantised Linear
stores `X.weight` (float8_e4m3fn) and `X.weight_scale_inv` (float32, one per 128x128 block), and
W = W_fp8 * scale_inv blockwise. Each weight is dequantised as it is read.

The MTP module's `embed_tokens` and `shared_head.head` are the main model's modules (shared, as in
DeepSeek-V3). Official checkpoints also store them under layer L+i: on load a copy equal to the main
tensor is dropped (the modules stay shared); a different one gives that MTP layer its own module.

Every problem with the input is a CheckpointError (or FileNotFoundError) that names the tensor or file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import DeepseekV3Config
from .deepseek import DeepseekV3ForCausalLM, TopkRouter
from .fileio import replace_dir_atomically

__all__ = ["CheckpointError", "load", "save", "load_mtp_weights", "write_fp8_checkpoint"]

DEFAULT_MODEL_DIR = Path(__file__).parent / "tiny"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FP8_BLOCK = (128, 128)
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
QUANTISED_MARKER = "quant_model.json"  # graphopt.quant.formats.DESCRIPTION_FILE (that package imports this one)
_log = logging.getLogger("graphopt")
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F8_E4M3": "float8_e4m3fn"}


class CheckpointError(ValueError):
    """A checkpoint on disk does not match the model it describes, or cannot be read."""


# -- public verbs -----------------------------------------------------------------------------
def load(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.bfloat16,
         device: str | torch.device = "cpu", mtp: bool = True, require_mtp: bool = False
         ) -> DeepseekV3ForCausalLM:
    """The model in an HF checkpoint directory (config.json + safetensors); None: the packaged tiny model.

    Weights are cast to `dtype` (logged on the "graphopt" logger, with the dtype config.json records),
    except the router's `mlp.gate.weight` and `e_score_correction_bias`,
    kept in float32: expert selection compares biased scores closer than bf16 can tell apart.
    mtp=False skips the MTP weights. With mtp=True a checkpoint whose config announces MTP layers but
    holds none of their tensors loads without MTP and warns, or raises when require_mtp=True.
    """
    root = _checkpoint_dir(path)
    config = DeepseekV3Config.from_json(root / "config.json")
    block = _fp8_block(config, root)
    with _Reader(_weight_files(root)) as reader:
        config = config.replace(num_nextn_predict_layers=_mtp_layers_to_load(
            config, reader, root, mtp, require_mtp))
        with torch.device("meta"):
            model = DeepseekV3ForCausalLM(config)

        def skip(key: str) -> bool:  # rope tables are recomputed; MTP layers skipped when mtp=False
            layer = re.match(r"model\.layers\.(\d+)\.", key)
            return (key.endswith("rotary_emb.inv_freq")
                    or (key == "lm_head.weight" and config.tie_word_embeddings)
                    or (not mtp and layer is not None and int(layer[1]) >= config.num_hidden_layers))

        _stream(model, reader, _disk_layout(model), dtype=dtype, device=torch.device(device),
                block=block, skip=skip)
        stored = config.extra.get("torch_dtype") or config.extra.get("dtype")
        stored = stored or f"no torch_dtype, its embedding is stored as {reader.dtype('model.embed_tokens.weight')}"
    model.model.rotary_emb.reset_parameters(device)
    _log.info("loaded %s as %s (routers float32; the checkpoint says %s), %d MTP layer(s), on %s",
              root, _dtype_name(dtype), stored, len(model.mtp), device)
    return model


def load_mtp_weights(model: DeepseekV3ForCausalLM, path: str | os.PathLike) -> None:
    """Fill `model.mtp` (built on meta) from the `model.layers.{L+i}.*` tensors of a checkpoint.

    `path` is a checkpoint directory or one .safetensors file. Tensors go to the device and dtype of
    `model.lm_head.weight` (router in float32, as in `load`).
    """
    path = Path(path)
    files = [path] if path.is_file() else _weight_files(path)
    block = _fp8_block(DeepseekV3Config.from_json(path), path) if path.is_dir() else FP8_BLOCK
    L = model.config.num_hidden_layers
    wanted = range(L, L + len(model.mtp))
    layout = {k: p for k, p in _disk_layout(model).items() if p.param.startswith("mtp.")}

    def skip(key: str) -> bool:
        layer = re.match(r"model\.layers\.(\d+)\.", key)
        return layer is None or int(layer[1]) not in wanted

    ref = model.lm_head.weight
    with _Reader(files) as reader:
        _stream(model, reader, layout, dtype=ref.dtype, device=ref.device, block=block, skip=skip)


def save(model: DeepseekV3ForCausalLM, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
         mtp_shared_tensors: bool = True, tokenizer: Any = None) -> None:
    """Write `model` as an HF checkpoint directory (per-expert layout, MTP at layer L+i), atomically.

    Shards are `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json` once the weights
    exceed `max_shard_size` (bytes, or "500MB", "5GB", "2GiB"). The MTP layers' copies of the shared
    embedding and lm_head are written like DeepSeek's release does; mtp_shared_tensors=False leaves
    them out (saves 2 x vocab x hidden per MTP layer; `load` re-ties them). A layer with its own
    embedding or head always writes it. `tokenizer`: a tokenizer.json path, or an object with .save().
    """
    entries = _save_entries(model, mtp_shared_tensors)
    config = {**model.config.to_dict(), "torch_dtype": _dtype_name(model.model.embed_tokens.weight.dtype)}
    _write_checkpoint(Path(path), json.dumps(config, indent=2, sort_keys=True) + "\n", entries,
                      max_shard_size, tokenizer)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # "bfloat16", as HF's config.json spells torch_dtype


def write_fp8_checkpoint(model: DeepseekV3ForCausalLM, path: str | os.PathLike, *,
                         max_shard_size: int | str = "5GB") -> None:
    """Write `model` in DeepSeek's official FP8 layout: e4m3 weights with 128x128 block scales.

    Quantised: every 2-D weight under `self_attn` and `mlp` (experts included), except the router
    `mlp.gate.weight`. Embeddings, norms, lm_head and the MTP eh_proj stay in their dtype.
    """
    def quantised(entry: _Entry) -> _Entry:
        if not _fp8_quantisable(entry.name, entry.shape):
            return entry

        def make() -> dict[str, torch.Tensor]:
            q, scale_inv = quantize_fp8_blockwise(entry.make()[entry.name])
            return {entry.name: q, entry.name + SCALE_SUFFIX: scale_inv}

        n_scales = math.prod(math.ceil(d / b) for d, b in zip(entry.shape, FP8_BLOCK))
        return _Entry(entry.name, entry.shape, math.prod(entry.shape) + 4 * n_scales, make)

    entries = [quantised(e) for e in _save_entries(model, mtp_shared_tensors=True)]
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(FP8_BLOCK)}
    _write_checkpoint(Path(path), json.dumps(config, indent=2, sort_keys=True) + "\n", entries,
                      max_shard_size, None)


def quantize_fp8_blockwise(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (e4m3 [out, in], scale_inv float32 [ceil(out/bo), ceil(in/bi)]), scale = amax/448."""
    out_dim, in_dim = w.shape
    bo, bi = block
    nb_o, nb_i = math.ceil(out_dim / bo), math.ceil(in_dim / bi)
    padded = torch.zeros(nb_o * bo, nb_i * bi, dtype=torch.float32)  # zero padding leaves amax unchanged
    padded[:out_dim, :in_dim] = w.float()
    amax = padded.view(nb_o, bo, nb_i, bi).abs().amax(dim=(1, 3))          # [nb_o, nb_i]
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (w.float() / _expand_blocks(scale, w.shape, block)).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8_blockwise(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = FP8_BLOCK
                             ) -> torch.Tensor:
    """W = w * scale_inv blockwise, in float32; w [..., out, in], scale_inv [..., ceil(out/bo), ceil(in/bi)]."""
    expected = (*w.shape[:-2], *(math.ceil(d / b) for d, b in zip(w.shape[-2:], block)))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"fp8 scale of shape {tuple(scale_inv.shape)} does not fit a weight of shape "
                              f"{tuple(w.shape)} in {block[0]}x{block[1]} blocks (expected {expected})")
    return w.float() * _expand_blocks(scale_inv.float(), w.shape, block)


def _expand_blocks(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    # [..., nb_o, nb_i] -> [..., out, in]; edge blocks are cut to the tensor's size
    s = scale.repeat_interleave(block[0], dim=-2)[..., :shape[-2], :]
    return s.repeat_interleave(block[1], dim=-1)[..., :shape[-1]]


# -- name mapping: disk name -> (in-memory tensor, index inside it) --------------------------------
@dataclass(frozen=True)
class _Piece:
    param: str                   # in-memory name, e.g. "mtp.0.mlp.experts.gate_up_proj"
    index: tuple | None = None   # (expert, rows) of a stacked tensor; None: the whole tensor
    mtp_shared: bool = False     # an MTP layer's embed_tokens / shared_head.head (main model's by default)


def _disk_layout(model: DeepseekV3ForCausalLM) -> dict[str, _Piece]:
    """Every tensor name of the per-expert HF layout -> where it lives in `model`."""
    L = model.config.num_hidden_layers
    layout: dict[str, _Piece] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        disk = re.sub(r"^mtp\.(\d+)\.", lambda m: f"model.layers.{L + int(m[1])}.", name)
        if name.endswith("experts.gate_up_proj"):
            n_experts, inter = tensor.shape[0], tensor.shape[1] // 2
            base = disk.removesuffix("gate_up_proj")
            for e in range(n_experts):
                layout[f"{base}{e}.gate_proj.weight"] = _Piece(name, (e, slice(0, inter)))
                layout[f"{base}{e}.up_proj.weight"] = _Piece(name, (e, slice(inter, 2 * inter)))
        elif name.endswith("experts.down_proj"):
            base = disk.removesuffix("down_proj")
            for e in range(tensor.shape[0]):
                layout[f"{base}{e}.down_proj.weight"] = _Piece(name, (e,))
        elif name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # the embedding itself
        else:
            layout[disk] = _Piece(name, None, name.startswith("mtp.") and name.endswith(_MTP_SHARED))
    return layout


def _stacked_names(layout: dict[str, _Piece]) -> dict[str, list[str]]:
    """Stacked disk name (transformers 5 layout) -> the per-expert names it stands for."""
    out: dict[str, list[str]] = {}
    for disk, piece in layout.items():
        if piece.index is not None:
            stacked = re.sub(r"\.\d+\.(gate|up|down)_proj\.weight$", "." + piece.param.rsplit(".", 1)[1], disk)
            out.setdefault(stacked, []).append(disk)
    return out


# -- reading ----------------------------------------------------------------------------------
def _checkpoint_dir(path: str | os.PathLike | None) -> Path:
    if path is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(f"the packaged tiny model has not been trained yet (no config.json in "
                                    f"{DEFAULT_MODEL_DIR}); train it with `graphopt train-tiny`, or pass "
                                    "the path of a checkpoint directory")
        return DEFAULT_MODEL_DIR
    root = Path(path)
    if (root / QUANTISED_MARKER).is_file():
        raise CheckpointError(f"{root} is a quantised checkpoint (written by `graphopt calibrate`); load it "
                              f"with graphopt.quant.load_quantized({str(root)!r}), or evaluate it with "
                              f"`graphopt eval --quantized {root}`")
    if root.is_file():
        if root.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(root)
        raise CheckpointError(f"{root} is a file; load() takes the checkpoint directory that holds "
                              "config.json and the .safetensors files")
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} has no config.json; an HF checkpoint directory holds config.json "
                                "next to model.safetensors (or its shards and model.safetensors.index.json)")
    return root


def _refuse_pickle(file: Path) -> None:
    raise CheckpointError(
        f"refusing to load pickle checkpoint {file}: unpickling can execute arbitrary code. Convert it to "
        "safetensors once, in an environment you trust, e.g. transformers' "
        "`model.save_pretrained(dir, safe_serialization=True)`, or "
        "`safetensors.torch.save_file(torch.load(file, weights_only=True), 'model.safetensors')`")


def _weight_files(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when sharded."""
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist in {root}: {missing}")
        return [root / s for s in shards]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    pickles = sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(pickles[0])
    raise FileNotFoundError(f"{root} has neither {SINGLE_FILE} nor {INDEX_FILE}")


class _Reader:
    """All safetensors files of a checkpoint, memory-mapped together; tensors are read one at a time."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.where: dict[str, Path] = {}  # tensor name -> file, in file order
        self._handles: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()
        try:
            for file in files:
                handle = self._stack.enter_context(self._guard(file, lambda: _safe_open(file)))
                self._handles[file] = handle
                for key in handle.keys():
                    self.where.setdefault(key, file)
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._guard(self.where[key], lambda: self._handles[self.where[key]].get_slice(key).get_shape()))

    def get(self, key: str) -> torch.Tensor:
        return self._guard(self.where[key], lambda: self._handles[self.where[key]].get_tensor(key))

    def dtype(self, key: str) -> str:
        """The stored dtype of `key` in torch's spelling ("bfloat16"), read from the header only."""
        if key not in self.where:
            return "unknown"
        name = self._guard(self.where[key], lambda: self._handles[self.where[key]].get_slice(key).get_dtype())
        return _SAFETENSORS_DTYPES.get(name, name)

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.files)

    @staticmethod
    def _guard(file: Path, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except SafetensorError as e:
            raise CheckpointError(f"safetensors file {file} is truncated or corrupt ({e}); "
                                  "re-download or re-save it") from None


def _safe_open(file: Path) -> Any:
    # pread copies each tensor into memory of its own; the default mmap backend keeps the file's pages
    # mapped while the file is open, which adds up to a second copy of the model to the peak RSS
    try:
        return safe_open(str(file), "pt", backend="pread")
    except TypeError:  # older safetensors: no backend argument, mmap only
        return safe_open(str(file), "pt")


def _fp8_block(config: DeepseekV3Config, root: Path) -> tuple[int, int]:
    quant = config.extra.get("quantization_config")
    if not quant:
        return FP8_BLOCK
    if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{root}/config.json: quantization_config {quant} is not supported; graphopt "
                              "reads DeepSeek's block FP8 layout (quant_method 'fp8', fmt 'e4m3')")
    return tuple(quant.get("weight_block_size", FP8_BLOCK))


def _mtp_layers_to_load(config: DeepseekV3Config, reader: _Reader, root: Path, mtp: bool,
                        require_mtp: bool) -> int:
    n, L = config.num_nextn_predict_layers, config.num_hidden_layers
    if not mtp:
        return 0
    if require_mtp and n == 0:
        raise CheckpointError(f"MTP required but {root}/config.json has num_nextn_predict_layers = 0")
    present = {int(m[1]) for k in reader.where if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    for i in range(n):
        if L + i not in present:
            if require_mtp:
                raise CheckpointError(f"MTP layer {i} (tensors model.layers.{L + i}.*) is required but "
                                      f"absent from {reader.describe()}")
            warnings.warn(f"{root}: config.json announces {n} MTP layer(s) but the checkpoint has no "
                          f"model.layers.{L + i}.* tensors; loading {i} MTP layer(s). "
                          "Pass require_mtp=True to make this an error.", stacklevel=3)
            return i
    return n


def _stream(model: nn.Module, reader: _Reader, layout: dict[str, _Piece], *, dtype: torch.dtype,
            device: torch.device, block: tuple[int, int], skip: Callable[[str], bool]) -> None:
    """Check names and shapes of everything first (no data read), then move tensors in one at a time."""
    plan = _plan(model, reader, layout, skip)
    deferred = []
    for key, piece in plan:
        if piece.mtp_shared:
            deferred.append((key, piece))  # compared with the main tensors once those are loaded
        else:
            _place(model, piece, _read(reader, key, block), dtype, device)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for key, piece in deferred:
        _tie_or_untie(model, piece.param.removesuffix(".weight"), _read(reader, key, block))


def _plan(model: nn.Module, reader: _Reader, layout: dict[str, _Piece], skip: Callable[[str], bool]
          ) -> list[tuple[str, _Piece]]:
    stacked = _stacked_names(layout)
    plan, covered, unexpected = [], set(), []
    for key in reader.where:
        if key.endswith(SCALE_SUFFIX) or skip(key):
            continue
        if key in layout:
            plan.append((key, layout[key]))
            covered.add(key)
        elif key in stacked:
            plan.append((key, _Piece(layout[stacked[key][0]].param)))
            covered.update(stacked[key])
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"checkpoint tensor(s) the model does not have: {_some(unexpected)} "
                              f"(in {reader.describe()}); check config.json against the weights")
    missing = [k for k, p in layout.items() if k not in covered and not p.mtp_shared]
    if missing:
        raise CheckpointError(f"checkpoint lacks tensor(s) the model needs: {_some(missing)}; "
                              f"file(s) read: {reader.describe()}")
    for key, piece in plan:
        module_path, _, leaf = piece.param.rpartition(".")
        target = getattr(model.get_submodule(module_path), leaf)  # only its shape is used
        expected = tuple(target[piece.index].shape if piece.index is not None else target.shape)
        got = reader.shape(key)
        if got != expected:
            raise CheckpointError(f"tensor {key} in {reader.where[key]}: expected shape {expected}, got {got}")
    return plan


def _read(reader: _Reader, key: str, block: tuple[int, int]) -> torch.Tensor:
    tensor = reader.get(key)
    if tensor.dtype != torch.float8_e4m3fn:
        return tensor
    if key + SCALE_SUFFIX not in reader.where:
        raise CheckpointError(f"fp8 tensor {key} has no {key + SCALE_SUFFIX} in {reader.describe()}")
    try:
        return dequantize_fp8_blockwise(tensor, reader.get(key + SCALE_SUFFIX), block)
    except CheckpointError as e:
        raise CheckpointError(f"tensor {key}: {e}") from None


def _place(model: nn.Module, piece: _Piece, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    module_path, _, leaf = piece.param.rpartition(".")
    module = model.get_submodule(module_path)
    if isinstance(module, TopkRouter):
        dtype = torch.float32
    tensor = tensor.to(device=device, dtype=dtype)  # no copy when the file already has dtype/device
    if piece.index is None:
        _assign(module, leaf, tensor)
        return
    stacked = getattr(module, leaf)
    if stacked.is_meta:  # first expert: allocate the whole [E, ...] tensor once, on the target device
        stacked = torch.empty(stacked.shape, dtype=dtype, device=device)
        _assign(module, leaf, stacked)
    with torch.no_grad():
        getattr(module, leaf)[piece.index].copy_(tensor)


def _assign(module: nn.Module, leaf: str, tensor: torch.Tensor) -> None:
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = tensor


def _tie_or_untie(model: nn.Module, module_path: str, weight: torch.Tensor) -> None:
    """An MTP layer's embed_tokens / shared_head.head stays the main module unless the checkpoint's copy differs."""
    main = model.get_submodule(module_path).weight
    weight = weight.to(device=main.device, dtype=main.dtype)
    if torch.equal(weight, main):
        return
    parent_path, _, attr = module_path.rpartition(".")
    rows, cols = weight.shape
    with torch.device("meta"):
        own = nn.Embedding(rows, cols) if attr == "embed_tokens" else nn.Linear(cols, rows, bias=False)
    own.weight = nn.Parameter(weight)
    setattr(model.get_submodule(parent_path), attr, own)


def _some(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


# -- writing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    name: str                                    # disk name
    shape: tuple[int, ...]
    nbytes: int                                  # on disk, for sharding
    make: Callable[[], dict[str, torch.Tensor]]  # materialised only while its shard is written


def _save_entries(model: DeepseekV3ForCausalLM, mtp_shared_tensors: bool) -> list[_Entry]:
    state = model.state_dict(keep_vars=True)
    entries = []
    for disk, piece in _disk_layout(model).items():
        tensor = state[piece.param]
        if piece.mtp_shared and not mtp_shared_tensors and _is_main_tensor(model, tensor):
            continue
        view = tensor if piece.index is None else tensor[piece.index]

        def make(disk=disk, view=view) -> dict[str, torch.Tensor]:
            return {disk: view.detach().to("cpu").contiguous()}

        entries.append(_Entry(disk, tuple(view.shape), view.numel() * view.element_size(), make))
    return entries


def _is_main_tensor(model: DeepseekV3ForCausalLM, tensor: torch.Tensor) -> bool:
    return tensor is model.model.embed_tokens.weight or tensor is model.lm_head.weight


def _fp8_quantisable(name: str, shape: tuple[int, ...]) -> bool:
    return (len(shape) == 2 and name.endswith(".weight") and not name.endswith("mlp.gate.weight")
            and (".self_attn." in name or ".mlp." in name))


def _write_checkpoint(target: Path, config_json: str, entries: list[_Entry], max_shard_size: int | str,
                      tokenizer: Any) -> None:
    shards = _shard(entries, _parse_size(max_shard_size))

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(config_json)
        weight_map, total = {}, 0
        for k, shard in enumerate(shards, 1):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = _distinct({n: t for e in shard for n, t in e.make().items()})
            safetensors.torch.save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            from .tokenizer import save_tokenizer_into   # on use: `tokenizers` is not needed for the weights
            save_tokenizer_into(tokenizer, tmp)

    replace_dir_atomically(target, write, is_ours=lambda d: (d / "config.json").is_file(),
                           what="checkpoint (no config.json)", carry_over=_carry_over)


def _shard(entries: list[_Entry], limit: int) -> list[list[_Entry]]:
    """Consecutive groups of at most `limit` bytes; a tensor larger than `limit` gets a shard alone."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _distinct(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (views, tied weights): clone all but the first."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '500MB', '5GB', '2GiB'")
    powers = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m[1]) * powers[m[2]])


def _carry_over(old: Path, new: Path) -> None:
    for item in old.iterdir():
        if (new / item.name).exists() or item.suffix == ".safetensors" or item.name == INDEX_FILE:
            continue
        if item.is_dir():
            shutil.copytree(item, new / item.name)
        else:
            shutil.copy2(item, new / item.name)

