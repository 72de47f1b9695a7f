"""Shard-only loading: each rank reads the replicated tensors and only its slice of the sharded ones.

    model, shards = load_shard(path, tp=2, ep=2, rank=dist.get_rank(), dtype=torch.float32)
    compiled = graphopt.compile(model, tp=2, ep=2, shards=shards)

Capture needs a model of the full shapes, the sharding passes need this rank's slices. So the model's
sharded parameters (models/shard_plan.py: heads, MLP columns, experts) are full-shape placeholders
that are never written: `torch.empty`, whose pages the OS only commits when touched, so they cost
address space, not memory. Their slices are read from the safetensors files with `get_slice` (only
the bytes of this rank's rows or columns; for per-expert checkpoints, only this rank's experts) into
`RankShards`, and `compile(shards=)` hands them to the sharding passes, which use them instead of
cutting the placeholders (`passes/sharding.py`; a graph still reading a placeholder after the shard
phase is an error). Replicated tensors load as `models.load` loads them.

Kept whole here (the passes slice them after loading): `lm_head` and the MTP layers' shared head
(the backend is resolved on the head's device before capture). Not supported: fp8 checkpoints (their
block scales would need slicing too), tied embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import checkpoint as ck
from .config import DeepseekV3Config
from .deepseek import DeepseekV3ForCausalLM
from .shard_plan import param_shard

__all__ = ["RankShards", "load_shard"]


@dataclass
class RankShards:
    """This rank's slices: parameter name -> (dim, slice), and the model whose placeholders they fill."""

    tp: int
    ep: int
    rank: int
    model: DeepseekV3ForCausalLM
    tensors: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)

    def parts(self):
        """(placeholder parameter, dim, slice) for every sharded parameter."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return [(params[name], dim, part) for name, (dim, part) in self.tensors.items()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors.values())


def load_shard(path: str | os.PathLike | None, *, tp: int, ep: int, rank: int, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu") -> tuple[DeepseekV3ForCausalLM, RankShards]:
    """(model with placeholders for the sharded parameters, this rank's slices); see the module doc."""
    root = ck._checkpoint_dir(path)
    config = DeepseekV3Config.from_json(root / "config.json")
    if config.tie_word_embeddings:
        raise ck.CheckpointError("load_shard: tied embeddings are not supported")
    device = torch.device(device)
    with ck._Reader(ck._weight_files(root)) as reader:
        config = config.replace(num_nextn_predict_layers=ck._mtp_layers_to_load(config, reader, root, True, False))
        with torch.device("meta"):
            model = DeepseekV3ForCausalLM(config)
        full = ck._disk_layout(model)
        sharded = {name: s for name, _ in model.named_parameters(remove_duplicate=False)
                   if (s := param_shard(name, tp, ep)) is not None and not _kept_whole(name)}
        layout = {k: p for k, p in full.items() if p.param not in sharded}
        skip_keys = {k for k, p in full.items() if p.param in sharded} | set(_stacked_disk_names(full, sharded))
        skip = lambda key: key.endswith("rotary_emb.inv_freq") or key in skip_keys
        ck._stream(model, reader, layout, dtype=dtype, device=device, block=ck._fp8_block(config, root), skip=skip)
        shards = RankShards(tp, ep, rank, model)
        for name, (dim, parts) in sharded.items():
            meta = model.get_parameter(name)
            placeholder = torch.empty(meta.shape, dtype=dtype, device=device)    # never written: not resident
            module_path, _, leaf = name.rpartition(".")
            ck._assign(model.get_submodule(module_path), leaf, placeholder)
            part = _read_slice(reader, full, name, meta.shape, dim, parts, rank)
            shards.tensors[name] = (dim, part.to(device=device, dtype=dtype))
    model.model.rotary_emb.reset_parameters(device)
    return model.eval(), shards


def _kept_whole(name: str) -> bool:
    return name == "lm_head.weight" or name.endswith("shared_head.head.weight")


def _stacked_disk_names(full: dict, sharded: dict) -> list[str]:
    """The transformers-5 stacked names (`...mlp.experts.gate_up_proj`) of sharded expert tensors."""
    return [stacked for stacked, keys in ck._stacked_names(full).items() if full[keys[0]].param in sharded]


def _read_slice(reader, full: dict, name: str, shape, dim: int, parts: int, rank: int) -> torch.Tensor:
    step = shape[dim] // parts
    lo, hi = rank * step, (rank + 1) * step
    keys = [k for k, p in full.items() if p.param == name]
    stacked = [s for s, ks in ck._stacked_names(full).items() if full[ks[0]].param == name and s in reader.where]
    if stacked:                                   # one stacked tensor on disk: slice it
        return _get_slice(reader, stacked[0], dim, lo, hi)
    if len(keys) == 1 and full[keys[0]].index is None:
        return _get_slice(reader, keys[0], dim, lo, hi)
    # per-expert tensors: read only this rank's experts (dim 0 of the stacked parameter)
    if dim != 0:
        raise ck.CheckpointError(f"load_shard: {name} is split on dim {dim}; per-expert tensors split by expert only")
    out = torch.empty((step, *shape[1:]), dtype=_stored_dtype(reader, keys[0]))
    for key in keys:
        expert, *rows = full[key].index
        if lo <= expert < hi:
            target = out[expert - lo] if not rows else out[expert - lo][rows[0]]
            target.copy_(_get_slice(reader, key, None, 0, 0))
    return out


def _get_slice(reader, key: str, dim: int | None, lo: int, hi: int) -> torch.Tensor:
    """Only rows / columns [lo, hi) of `key` along `dim` (None: all of it), read through safe_open's get_slice."""
    if reader.dtype(key) == "float8_e4m3fn":
        raise ck.CheckpointError(f"load_shard: {key} is fp8; shard-only loading reads bf16 / fp32 checkpoints")
    handle = reader._handles[reader.where[key]].get_slice(key)
    if dim is None:
        return handle[:]
    index = (slice(None),) * dim + (slice(lo, hi),)
    return handle[index]


def _stored_dtype(reader, key: str) -> torch.dtype:
    return getattr(torch, reader.dtype(key))

