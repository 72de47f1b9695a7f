"""Calibration data and the layer-by-layer observation run.

Data (`calibration_data`): the token ids in CalibrationConfig.tokens, or CalibrationConfig.sources:
(spec, ratio) pairs; num_samples windows of seq_len tokens are split between sources in proportion
to the ratios (largest remainder), each window taken at a random offset (seeded) of its source's
token stream, then the windows are shuffled. Text is tokenised with the model's own tokenizer
(`model_tokenizer`: the one given, the embedded tokenizer only for the embedded model's config);
without one, a text source is an error before anything is read.
  "default"      the embedded model's training split: the corpus token file `train.bin` in
                 $GRAPHOPT_CORPUS or ./.cache/corpus (`python -m graphopt.models.corpus` writes it),
                 used only with the embedded tokenizer (its ids). Otherwise, or when the file is not
                 there, the shipped held-out text minus the evaluation slice ("heldout" below).
  "heldout"      graphopt/models/data/heldout.txt, tokenized, minus its first EVAL_FRACTION (the
                 slice quant.eval and benchmarks/quant_accuracy.py evaluate on).
  "text:PATH"    a UTF-8 text file, tokenized with the model's tokenizer.
  "tokens:PATH"  token ids: .bin (little-endian uint16, the corpus format), .pt or .safetensors
                 (the first tensor) of integers. No tokenizer needed.
  "random"       uniform random ids in [0, vocab_size), seeded: only when named (no tokenizer).
Every token id is checked (`as_token_ids`): integers, the right shape, not empty, in [0, vocab_size).

Observation (`LayerRunner`): the calibration windows go through the model one decoder layer at a
time; only that layer is instrumented, its observers feed the quantiser, and its (quantised) output
becomes the next layer's input. Memory is the hidden states of the calibration set plus one layer's
observers, whatever the depth. MTP modules follow the main layers, fed with the final hidden states.
Routed experts are observed on their routed tokens (`observe_expert_inputs`): the reference model's
dense dispatch computes every expert on every token, and the router's ids say which rows count for
which expert's down_proj input; an expert routed fewer than min_expert_tokens tokens falls back to
all of them (observers.py). gate_up's input is the token itself, shared by the experts (one
smoothing vector and one static scale in the quantised op), and every token is routed to some
expert, so its statistics come from every token; its observer also keeps each expert's routed rows
(`Observer.track_routed_rows`), which the weight clipping of expert e's gate_up is searched on.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
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

__all__ = ["CalibrationData", "GraphCalibration", "calibration_data", "calibration_tokens", "source_tokens",
           "heldout_tokens", "model_tokenizer", "as_token_ids", "check_vocab", "check_windows", "graph_calibration",
           "LayerRunner", "attach_observers", "observe_expert_inputs", "observe_layer", "routed_mask",
           "step_inputs", "EVAL_FRACTION", "HELDOUT_TEXT", "RANDOM", "TEXT_KINDS"]

EVAL_FRACTION = 0.5
HELDOUT_TEXT = Path(__file__).resolve().parent.parent / "models" / "data" / "heldout.txt"
RANDOM = "random"
TEXT_KINDS = ("default", "heldout", "text")       # sources that need the model's tokenizer
_KINDS = "'default', 'heldout', 'text:PATH', 'tokens:PATH', 'random'"
_NEED_DATA = ("pass the model's tokenizer (tokenizer= to graphopt.compile or quantize_model: an object with "
              "encode(str) -> ids, or a tokenizer.json path), or token ids (quantize_model(data=[n, T] ids), "
              "CalibrationConfig(tokens=ids) or sources=(('tokens:PATH', 1.0),)), or name "
              "sources=(('random', 1.0),) for random ids")


# -- data ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationData:
    tokens: Tensor        # [n, T] int64, every id < vocab_size
    origin: str           # what they are: sources and windows, the tokenizer or "token ids"


def heldout_tokens(tokenizer=None) -> tuple[Tensor, Tensor]:
    """The shipped held-out text as ids, split into (evaluation slice, calibration remainder).
    tokenizer None: the embedded one (evaluation of the embedded model; calibration never does this)."""
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


def _is_embedded_tokenizer(tokenizer) -> bool:
    from graphopt.models.tokenizer import Tokenizer
    if not isinstance(tokenizer, Tokenizer):
        return False
    try:
        embedded = _default_tokenizer()
    except FileNotFoundError:      # no packaged tokenizer: nothing is the embedded one
        return False
    return tokenizer is embedded or tokenizer.backend.to_str() == embedded.backend.to_str()


def model_tokenizer(config, tokenizer=None):
    """The tokenizer that goes with a model (`graphopt.models.tokenizer.tokenizer_for`: the one given,
    else the embedded tokenizer for the embedded model's config, else None), as graphopt.compile uses."""
    from graphopt.models.tokenizer import tokenizer_for
    return tokenizer_for(config, tokenizer)


def _tokenizer_name(tokenizer) -> str:
    if _is_embedded_tokenizer(tokenizer):
        return f"the embedded graphopt tokenizer ({tokenizer.vocab_size} ids)"
    name = getattr(tokenizer, "name_or_path", None) or repr(tokenizer)
    return f"tokenizer {name[:80]}"


def _corpus_train_file() -> Path | None:
    roots = [os.environ.get("GRAPHOPT_CORPUS"), ".cache/corpus",
             str(Path(__file__).resolve().parents[2] / ".cache" / "corpus")]
    for root in filter(None, roots):
        if (Path(root) / "train.bin").is_file():
            return Path(root) / "train.bin"
    return None


def _check_source(spec: str, tokenizer) -> None:
    """Everything that can be known about a source before reading it."""
    kind, _, path = spec.partition(":")
    if kind not in (*TEXT_KINDS, "tokens", RANDOM) or (kind in ("text", "tokens")) != bool(path):
        raise QuantError(f"unknown calibration source {spec!r}; accepted: {_KINDS}")
    if kind in TEXT_KINDS and tokenizer is None:
        raise QuantError(f"calibration source {spec!r} needs the model's tokenizer (it is text, or the embedded "
                         f"tokenizer's ids) and none was given (only the embedded model has one by default): {_NEED_DATA}")
    if kind in ("text", "tokens") and not Path(path).is_file():
        raise FileNotFoundError(f"calibration {kind} file not found: {path} (source {spec!r})")


def _default_source(tokenizer) -> tuple[Tensor, str]:
    train = _corpus_train_file() if _is_embedded_tokenizer(tokenizer) else None
    if train is not None:
        return _read_token_file(train), f"default ({train})"
    return heldout_tokens(tokenizer)[1], "default (held-out text minus the evaluation slice)"


def source_tokens(spec: str, tokenizer=None) -> Tensor:
    """All token ids of one source spec, 1-D int64 (text sources need the model's tokenizer)."""
    return _source(spec, tokenizer)[0]


def _source(spec: str, tokenizer) -> tuple[Tensor, str]:
    _check_source(spec, tokenizer)
    kind, _, path = spec.partition(":")
    if kind == RANDOM:
        raise QuantError("the 'random' calibration source has no token stream (calibration_data draws its windows)")
    if kind == "default":
        ids, label = _default_source(tokenizer)
    elif kind == "heldout":
        ids, label = heldout_tokens(tokenizer)[1], spec
    elif kind == "text":
        text = Path(path).read_text(encoding="utf-8")
        ids, label = torch.tensor(tokenizer.encode(text), dtype=torch.long), spec
    else:
        ids, label = _read_token_file(Path(path)), spec
    if ids.numel() == 0:
        raise QuantError(f"calibration source {spec!r} is empty (0 tokens{' after tokenization' if kind != 'tokens' else ''}); "
                         "give it text or token ids")
    return ids, label


def _read_token_file(path: Path) -> Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"calibration token file not found: {path}")
    if path.suffix == ".bin":
        t = torch.from_numpy(np.fromfile(path, dtype="<u2").astype(np.int64))
    elif path.suffix == ".pt":
        t = torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file
        tensors = load_file(path)
        if not tensors:
            raise QuantError(f"token file {path} holds no tensor; accepted: one integer tensor of token ids")
        t = next(iter(tensors.values()))
    else:
        raise QuantError(f"token file {path}: accepted suffixes are .bin (uint16), .pt, .safetensors")
    if not isinstance(t, Tensor):
        raise QuantError(f"token file {path} must hold one integer tensor of token ids, got {type(t).__name__}")
    return as_token_ids(t, f"token file {path}").flatten()


def as_token_ids(ids, what: str, dims: tuple[int, ...] = (1, 2, 3, 4)) -> Tensor:
    """`ids` (an integer tensor or nested lists of ints) as int64, or a QuantError saying what is wrong."""
    if isinstance(ids, (list, tuple)):
        try:
            ids = torch.tensor(ids)
        except (TypeError, ValueError) as e:
            raise QuantError(f"{what}: token ids as lists must be ints in rows of one length ({e})") from None
    if not isinstance(ids, Tensor):
        raise QuantError(f"{what} must be token ids (an integer tensor or lists of ints), got {type(ids).__name__}")
    if ids.numel() == 0:
        raise QuantError(f"{what} is empty (shape {tuple(ids.shape)}): give at least one window of token ids")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise QuantError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() not in dims:
        want = " or ".join({1: "1-D [tokens]", 2: "2-D [windows, tokens]"}.get(d, f"{d}-D") for d in dims)
        raise QuantError(f"{what} must be {want}, got shape {tuple(ids.shape)}")
    ids = ids.long()
    if int(ids.min()) < 0:
        raise QuantError(f"{what}: token id {int(ids.min())} < 0; token ids are in [0, vocab_size)")
    return ids


def check_vocab(tokens: Tensor, vocab_size: int, what: str) -> None:
    if tokens.numel() and int(tokens.min()) < 0:
        raise QuantError(f"{what}: token id {int(tokens.min())} < 0; token ids are in [0, vocab_size)")
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise QuantError(f"{what}: token id {int(tokens.max())} >= the model's vocab_size {vocab_size}; "
                         "the data was tokenized for another model (pass tokens of this model)")


def check_windows(tokens, model: nn.Module, what: str) -> Tensor:
    """Calibration windows for `model`: [n, T] int64 ids < vocab_size, T long enough for its MTP modules."""
    tokens = as_token_ids(tokens, what, dims=(2,))
    check_vocab(tokens, model.config.vocab_size, what)
    need = len(model.mtp) + 1            # the MTP module at depth d reads tokens d + 1 .. T - 1
    if tokens.shape[1] < need:
        raise QuantError(f"{what}: windows of {tokens.shape[1]} token(s); this model's {len(model.mtp)} MTP "
                         f"module(s) need at least {need} tokens per window")
    return tokens


def calibration_data(cfg: CalibrationConfig, vocab_size: int, tokenizer=None) -> CalibrationData:
    """[num_samples, seq_len] windows mixed from cfg.sources (or cut from cfg.tokens), and their origin."""
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.tokens is not None:
        check_vocab(cfg.tokens, vocab_size, "CalibrationConfig.tokens")
        if cfg.tokens.dim() == 2:
            n, T = cfg.tokens.shape
            return CalibrationData(cfg.tokens, f"{n} windows x {T} tokens of CalibrationConfig.tokens (token ids)")
        out = _windows(cfg.tokens, cfg.num_samples, cfg.seq_len, gen, "CalibrationConfig.tokens")
        return CalibrationData(out, f"{len(out)} windows x {cfg.seq_len} tokens of CalibrationConfig.tokens "
                                    "(token ids)")
    for spec, _ in cfg.sources:          # every source checked before any is read
        _check_source(spec, tokenizer)
    windows, parts = [], []
    for (spec, _), n in zip(cfg.sources, _split(cfg.num_samples, [r for _, r in cfg.sources])):
        if n == 0:
            continue
        if spec == RANDOM:
            windows += list(torch.randint(0, vocab_size, (n, cfg.seq_len), generator=gen))
            parts.append(f"{n} x random ids")
            continue
        ids, label = _source(spec, tokenizer)
        check_vocab(ids, vocab_size, f"calibration source {spec!r}")
        windows += list(_windows(ids, n, cfg.seq_len, gen, f"calibration source {spec!r}"))
        parts.append(f"{n} x {label}")
    out = torch.stack(windows)[torch.randperm(len(windows), generator=gen)]
    text = any(spec.partition(":")[0] in TEXT_KINDS for spec, _ in cfg.sources)
    how = f"tokenized with {_tokenizer_name(tokenizer)}" if text else "token ids"
    return CalibrationData(out, f"{len(out)} windows x {cfg.seq_len} tokens: {', '.join(parts)}; {how}")


def calibration_tokens(cfg: CalibrationConfig, vocab_size: int, tokenizer=None) -> Tensor:
    """[num_samples, seq_len] int64 windows (calibration_data without the origin)."""
    return calibration_data(cfg, vocab_size, tokenizer).tokens


def _split(n: int, ratios: list[float]) -> list[int]:
    """n split in proportion to ratios, largest remainder."""
    exact = [n * r / sum(ratios) for r in ratios]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _windows(ids: Tensor, n: int, seq_len: int, gen: torch.Generator, what: str) -> Tensor:
    if len(ids) < seq_len + 1:
        raise QuantError(f"{what} has {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}; give more "
                         "data or a smaller CalibrationConfig.seq_len")
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=gen)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


class GraphCalibration:
    """Step inputs per graph (graph name -> list of input tuples) and the description of their data,
    which quant_calibrate writes into its pass record."""

    def __init__(self, inputs: dict[str, list], description: str):
        self.inputs, self.description = inputs, description

    def __call__(self, graph_name: str) -> list:
        if graph_name not in self.inputs:
            raise KeyError(f"no calibration inputs for graph {graph_name!r}; built for {sorted(self.inputs)}")
        return self.inputs[graph_name]


def graph_calibration(model: nn.Module, cfg: CalibrationConfig, tokenizer, block_size: int) -> GraphCalibration:
    """The calibration windows of `cfg` as step inputs of every captured graph (graphopt.compile)."""
    data = calibration_data(cfg, model.config.vocab_size, tokenizer)
    tokens = check_windows(data.tokens, model, "calibration data")
    return GraphCalibration(step_inputs(model, tokens, block_size), data.origin)


# -- observation --------------------------------------------------------------------------------------
def attach_observers(module: nn.Module, targets: dict[str, tuple[str, Observer]]) -> list:
    """Hook `targets` {module path inside `module`: (kind, observer)}; returns the hook handles.

    kind "linear": the module's input; "experts": gate_up's input [N, H] and down_proj's per-expert
    input silu(gate) * up [E, N, I] (recomputed from the float stacked weights) on the tokens routed to
    each expert; "latent": the output
    of kv_a_layernorm (the latent that the C8 cache stores).
    """
    handles = []
    for path, (kind, obs) in targets.items():
        sub = module.get_submodule(path)
        if kind == "linear":
            handles.append(sub.register_forward_pre_hook(lambda m, args, o=obs: o.observe(args[0])))
        elif kind == "latent":
            handles.append(sub.register_forward_hook(lambda m, args, out, o=obs: o.observe(out)))
        elif kind == "experts":           # Experts.forward(x, weights, ids): the router's ids are args[2]
            gate_up, down = obs
            handles.append(sub.register_forward_pre_hook(
                lambda m, args, g=gate_up, d=down: observe_expert_inputs(args[0], m.gate_up_proj, g, d, args[2])))
    return handles


def routed_mask(ids: Tensor, num_experts: int) -> Tensor:
    """ids [N, k] (the router's choice per token) -> routed [E, N] bool."""
    N = ids.shape[0]
    routed = torch.zeros(N, num_experts, dtype=torch.bool, device=ids.device)
    return routed.scatter_(1, ids.long(), True).T


@torch.no_grad()
def observe_expert_inputs(x: Tensor, gate_up_weight: Tensor, gate_up: Observer | None, down: Observer | None,
                          ids: Tensor | None = None) -> None:
    """gate_up sees x [N, H] (shared by the experts; every token is routed somewhere), and its
    `routed_rows` (when tracked) each expert's routed rows of it; down sees each expert's input
    silu(gate) * up [E, N, I], computed densely from the float stacked weight [E, 2I, H], counted for
    expert e only on the tokens whose router ids [N, k] chose e (ids None: every token)."""
    if gate_up is not None:
        gate_up.observe(x)
        if gate_up.routed_rows is not None:
            E = gate_up_weight.shape[0]
            routed = routed_mask(ids, E) if ids is not None else torch.ones(E, x.shape[0], dtype=torch.bool)
            gate_up.routed_rows.observe_routed_rows(x, routed)
    if down is not None:
        gate, up = torch.matmul(x, gate_up_weight.transpose(1, 2)).chunk(2, dim=-1)      # [E, N, I]
        h = F.silu(gate) * up
        if ids is None:
            down.observe(h)
        else:
            down.observe_routed(h, routed_mask(ids, gate_up_weight.shape[0]))


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
