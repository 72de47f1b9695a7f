"""Calibration data and the layer-by-layer observation run.

Data (`calibration_tokens`): CalibrationConfig.sources are (spec, ratio) pairs; num_samples windows
of seq_len tokens are split between sources in proportion to the ratios (largest remainder), each
window taken at a random offset (seeded) of its source's token stream, then the windows are shuffled.
  "default"      the embedded model's training split: the corpus token file `train.bin` in
                 $GRAPHOPT_CORPUS or ./.cache/corpus (`python -m graphopt.models.corpus` writes it).
                 When it is not there (an installed package ships no training data), the shipped
                 held-out text minus the evaluation slice ("heldout" below) is used instead.
  "heldout"      graphopt/models/data/heldout.txt, tokenized, minus its first EVAL_FRACTION (the
                 slice quant.eval and benchmarks/quant_accuracy.py evaluate on).
  "text:PATH"    a UTF-8 text file, tokenized with the model's tokenizer.
  "tokens:PATH"  token ids: .bin (little-endian uint16, the corpus format), .pt or .safetensors
                 (the first tensor) of integers.

Observation (`LayerRunner`): the calibration windows go through the model one decoder layer at a
time; only that layer is instrumented, its observers feed the quantiser, and its (quantised) output
becomes the next layer's input. Memory is the hidden states of the calibration set plus one layer's
observers, whatever the depth. MTP modules follow the main layers, fed with the final hidden states.
Every routed expert is observed on every token: the reference model's dense dispatch runs every token
through every expert (routing only weights the outputs), so no expert is left without data.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..step.paged import slot_mapping
from .config import CalibrationConfig
from .observers import Observer
from .schemes import QuantError

__all__ = ["calibration_tokens", "source_tokens", "heldout_tokens", "check_vocab", "LayerRunner",
           "attach_observers", "observe_expert_inputs", "observe_layer", "step_inputs", "EVAL_FRACTION", "HELDOUT_TEXT"]

EVAL_FRACTION = 0.5
HELDOUT_TEXT = Path(__file__).resolve().parent.parent / "models" / "data" / "heldout.txt"


# -- data ------------------------------------------------------------------------------------------
def heldout_tokens(tokenizer=None) -> tuple[Tensor, Tensor]:
    """The shipped held-out text as ids, split into (evaluation slice, calibration remainder)."""
    ids = _encoded_heldout(tokenizer or _default_tokenizer())
    cut = int(len(ids) * EVAL_FRACTION)
    return ids[:cut], ids[cut:]


@functools.lru_cache(maxsize=4)
def _encoded_heldout(tokenizer) -> Tensor:  # 1.2 MB of text: tokenize once per tokenizer
    return torch.tensor(tokenizer.encode(HELDOUT_TEXT.read_text(encoding="utf-8")), dtype=torch.long)


@functools.lru_cache(maxsize=1)
def _default_tokenizer():
    from graphopt.models.tokenizer import load_tokenizer
    return load_tokenizer()


def _corpus_train_file() -> Path | None:
    roots = [os.environ.get("GRAPHOPT_CORPUS"), ".cache/corpus",
             str(Path(__file__).resolve().parents[2] / ".cache" / "corpus")]
    for root in filter(None, roots):
        if (Path(root) / "train.bin").is_file():
            return Path(root) / "train.bin"
    return None


def source_tokens(spec: str, tokenizer=None) -> Tensor:
    """All token ids of one source spec, 1-D int64."""
    kind, _, path = spec.partition(":")
    if kind == "default":
        train = _corpus_train_file()
        return _read_token_file(train) if train else heldout_tokens(tokenizer)[1]
    if kind == "heldout":
        return heldout_tokens(tokenizer)[1]
    if kind == "text":
        text = Path(path).read_text(encoding="utf-8")
        return torch.tensor((tokenizer or _default_tokenizer()).encode(text), dtype=torch.long)
    if kind == "tokens":
        return _read_token_file(Path(path))
    raise QuantError(f"unknown calibration source {spec!r}; accepted: 'default', 'heldout', 'text:PATH', "
                     "'tokens:PATH'")


def _read_token_file(path: Path) -> Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"calibration token file not found: {path}")
    if path.suffix == ".bin":
        return torch.from_numpy(np.fromfile(path, dtype="<u2").astype(np.int64))
    if path.suffix == ".pt":
        t = torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file
        t = next(iter(load_file(path).values()))
    else:
        raise QuantError(f"token file {path}: accepted suffixes are .bin (uint16), .pt, .safetensors")
    if not isinstance(t, Tensor) or t.is_floating_point():
        raise QuantError(f"token file {path} must hold one integer tensor of token ids")
    return t.flatten().long()


def calibration_tokens(cfg: CalibrationConfig, vocab_size: int, tokenizer=None) -> Tensor:
    """[num_samples, seq_len] int64 windows mixed from cfg.sources in cfg.ratios."""
    gen = torch.Generator().manual_seed(cfg.seed)
    total = sum(r for _, r in cfg.sources)
    exact = [cfg.num_samples * r / total for _, r in cfg.sources]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: cfg.num_samples - sum(counts)]:
        counts[i] += 1                                                            # largest remainder
    windows = []
    for (spec, _), n in zip(cfg.sources, counts):
        if n == 0:
            continue
        ids = source_tokens(spec, tokenizer)
        if len(ids) < cfg.seq_len + 1:
            raise QuantError(f"calibration source {spec!r} has {len(ids)} tokens, fewer than seq_len "
                             f"{cfg.seq_len}")
        starts = torch.randint(0, len(ids) - cfg.seq_len, (n,), generator=gen)
        windows += [ids[s: s + cfg.seq_len] for s in starts.tolist()]
    out = torch.stack(windows)[torch.randperm(len(windows), generator=gen)]
    check_vocab(out, vocab_size, "calibration data")
    return out


def check_vocab(tokens: Tensor, vocab_size: int, what: str) -> None:
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise QuantError(f"{what}: token id {int(tokens.max())} >= the model's vocab_size {vocab_size}; "
                         "the data was tokenized for another model (pass tokens of this model)")


# -- observation --------------------------------------------------------------------------------------
def attach_observers(module: nn.Module, targets: dict[str, tuple[str, Observer]]) -> list:
    """Hook `targets` {module path inside `module`: (kind, observer)}; returns the hook handles.

    kind "linear": the module's input; "experts": gate_up's input [N, H] and down_proj's per-expert
    input silu(gate) * up [E, N, I] (recomputed from the float stacked weights); "latent": the output
    of kv_a_layernorm (the latent that the C8 cache stores).
    """
    handles = []
    for path, (kind, obs) in targets.items():
        sub = module.get_submodule(path)
        if kind == "linear":
            handles.append(sub.register_forward_pre_hook(lambda m, args, o=obs: o.observe(args[0])))
        elif kind == "latent":
            handles.append(sub.register_forward_hook(lambda m, args, out, o=obs: o.observe(out)))
        elif kind == "experts":
            gate_up, down = obs
            handles.append(sub.register_forward_pre_hook(
                lambda m, args, g=gate_up, d=down: observe_expert_inputs(args[0], m.gate_up_proj, g, d)))
    return handles


@torch.no_grad()
def observe_expert_inputs(x: Tensor, gate_up_weight: Tensor, gate_up: Observer | None, down: Observer | None) -> None:
    """gate_up sees x [N, H]; down sees every expert's input on every token, silu(gate) * up [E, N, I]
    from the float stacked weight [E, 2I, H], whatever the routing chose."""
    if gate_up is not None:
        gate_up.observe(x)
    if down is not None:
        gate, up = torch.matmul(x, gate_up_weight.transpose(1, 2)).chunk(2, dim=-1)      # [E, N, I]
        down.observe(F.silu(gate) * up)


class LayerRunner:
    """Hidden states of the calibration windows, advanced one layer at a time (batches of `batch`)."""

    def __init__(self, model: nn.Module, tokens: Tensor, batch: int = 8, progress: bool = True):
        self.model, self.tokens, self.batch = model, tokens, batch
        dev = model.lm_head.weight.device
        self.tokens = tokens.to(dev)
        with torch.no_grad():
            self.hidden = model.model.embed_tokens(self.tokens)                   # [n, T, H]
        n_steps = (len(model.model.layers) + len(model.mtp)) * 2 * -(-len(tokens) // batch)
        self.bar = tqdm(total=n_steps, desc="calibrate", unit="batch", delay=2.0, disable=not progress)

    def _chunks(self) -> Iterator[slice]:
        for i in range(0, self.hidden.shape[0], self.batch):
            yield slice(i, i + self.batch)

    @torch.no_grad()
    def run(self, layer: nn.Module, update: bool, hidden: Tensor | None = None) -> Tensor:
        """Run `layer` over the calibration hidden states; with update=True they become its output."""
        hidden = self.hidden if hidden is None else hidden
        outs = []
        for sl in self._chunks():
            h = hidden[sl]
            positions = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
            cos, sin = self.model.model.rotary_emb(positions, h.dtype)
            outs.append(layer(h, cos, sin, positions))
            self.bar.update(1)
        out = torch.cat(outs)
        if update:
            self.hidden = out
        return out

    @torch.no_grad()
    def mtp_input(self, depth: int, hidden: Tensor) -> Tensor:
        """[enorm(embed(token t + 1 + depth)), hnorm(h_t)] for the MTP module at `depth`: [n, T', 2H]."""
        layer = self.model.mtp[depth]
        next_ids = self.tokens[:, depth + 1:]
        h = hidden[:, : next_ids.shape[1]]
        return torch.cat([layer.enorm(layer.embed_tokens(next_ids)), layer.hnorm(h)], dim=-1)

    def close(self) -> None:
        self.bar.close()


def observe_layer(runner: LayerRunner, layer: nn.Module, targets: dict, hidden: Tensor | None = None) -> None:
    """Run `layer` once with `targets` hooked (hidden states unchanged), then unhook."""
    handles = attach_observers(layer, targets)
    try:
        runner.run(layer, update=False, hidden=hidden)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def step_inputs(model: nn.Module, tokens: Tensor, block_size: int = 16, batch: int = 4) -> dict[str, list]:
    """Calibration inputs for the captured step graphs: {"main": [...], "mtp0": [...], ...}.

    Each entry is one prefill of `batch` windows, in the capture signatures (graphopt/capture/step.py):
    main (input_ids, positions, slot_mapping, block_tables, kv_caches) and MTP depth d (next_ids,
    hidden, positions, slot_mapping, block_tables, mtp_cache), with fresh zeroed caches (block 0 is
    the padding sink) and the MTP hidden states from the eager model. For quant_calibrate:
    `PassContext.state["calibration_inputs"] = step_inputs(model, tokens, block_size).__getitem__`.
    """
    out: dict[str, list] = {"main": [], **{f"mtp{d}": [] for d in range(len(model.mtp))}}
    dev = model.lm_head.weight.device
    for i in range(0, len(tokens), batch):
        ids = tokens[i: i + batch].to(dev)
        B, T = ids.shape
        n_blocks = -(-T // block_size)
        tables = 1 + torch.arange(B * n_blocks, device=dev).view(B, n_blocks)           # [B, M]
        positions = torch.arange(T, device=dev).expand(B, T).contiguous()
        slots = slot_mapping(positions, tables, block_size)
        fresh = lambda mtp=False: model.new_kv_caches(1 + B * n_blocks, block_size, mtp=mtp)
        out["main"].append((ids, positions, slots, tables, fresh()))
        hidden = model(ids, positions, fresh(), slots, tables, return_hidden=True)[1]
        for d in range(len(model.mtp)):
            n = T - 1 - d
            # the captured graphs take contiguous inputs (their views were traced on contiguous tensors)
            nxt, hid, pos, slt = (t.contiguous() for t in (ids[:, 1 + d:], hidden[:, :n], positions[:, :n], slots[:, :n]))
            out[f"mtp{d}"].append((nxt, hid, pos, slt, tables, fresh(mtp=True)[0]))
            hidden = model.mtp_forward(d, nxt, hid, pos, fresh(mtp=True)[0], slt, tables)[1]
    return out
