"""Mixed precision chosen by measured sensitivity under a size budget.

Unit (MixedPrecisionConfig.unit): "layer", a main decoder layer (`model.layers.{i}`; all its targeted
matmuls share a scheme), or "linear", each targeted linear (or stacked experts tensor) of the main
decoder layers on its own (`model.layers.{i}.self_attn.q_a_proj`, ...). MTP modules follow `scheme` /
`mtp_scheme` (their cost is acceptance, measured separately: see docs).

  1. sensitivity[u][c] = KL(float || model with only unit u quantised to candidate c, RTN grids) on
     the first calibration windows: one quantisation + forward per (unit, candidate), cheap next to
     the calibration itself at layer units (static-activation candidates still calibrate); linear
     units cost about seven times as many probes;
  2. start every unit at the most precise candidate (candidates[0]) and, while the average bits per
     targeted weight exceed the budget, move one unit one candidate down: the move with the least
     added KL per bit saved (greedy knapsack);
  3. the answer is the config with one override per unit ("model.layers.{i}.*" or the linear's name).
Fails with the smallest reachable average when the budget is below what the cheapest candidate gives.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .config import QuantConfig
from .eval import kl_divergence
from .schemes import SCHEMES, QuantError, weight_bits_per_element

__all__ = ["choose_mixed_precision", "layer_sizes", "mixed_precision_units"]

SENSITIVITY_WINDOWS = 8


def _targeted(model: nn.Module, config: QuantConfig, layer: int) -> list[tuple[str, Tensor]]:
    """(name, weight) of the targeted weights of main layer `layer`, named as QuantConfig matches them."""
    out = []
    for name, p in model.model.layers[layer].named_parameters():
        full = f"model.layers.{layer}.{name}".removesuffix(".weight")
        if p.dim() >= 2 and config.scheme_for(full) is not None:
            out.append((full, p))
    return out


def _bits(weights: list[Tensor], config: QuantConfig, scheme: str) -> tuple[float, int]:
    return (sum(weight_bits_per_element(SCHEMES[scheme], p.shape[-1], config.group_size) * p.numel() for p in weights),
            sum(p.numel() for p in weights))


def layer_sizes(model: nn.Module, config: QuantConfig, layer: int, scheme: str) -> tuple[float, int]:
    """(bits, elements) of the targeted weights of main layer `layer` under `scheme`."""
    return _bits([p for _, p in _targeted(model, config, layer)], config, scheme)


def mixed_precision_units(model: nn.Module, config: QuantConfig, unit: str) -> dict[str, list[Tensor]]:
    """The override pattern of each unit -> the targeted weights it covers: "model.layers.{i}.*" per
    main layer, or each targeted weight's own name (unit "linear")."""
    units: dict[str, list[Tensor]] = {}
    for i in range(len(model.model.layers)):
        targeted = _targeted(model, config, i)
        if unit == "layer":
            units[f"model.layers.{i}.*"] = [p for _, p in targeted]
        else:
            units.update((name, [p]) for name, p in targeted)
    return {pattern: ws for pattern, ws in units.items() if ws}


def choose_mixed_precision(model: nn.Module, config: QuantConfig, data: Tensor, progress: bool = True
                           ) -> QuantConfig:
    from .model_quant import quantize_model  # model_quant calls us: import on use

    mp = config.mixed_precision
    cands = list(mp.candidates)
    units = mixed_precision_units(model, config, mp.unit)
    windows = data[:SENSITIVITY_WINDOWS]
    with torch.no_grad():
        ref = model(windows)
    # probes use plain RTN grids and no C8: they rank units by how much the grid alone costs, and the
    # calibration-free path makes each probe one quantisation (no data pass) plus one forward
    probe = config.replace(mixed_precision=None, mtp_scheme="bf16", algorithms=(), kv_cache=None)
    sens = {}
    for u in tqdm(units, desc="sensitivity", disable=not progress):
        for c in cands:
            only = probe.replace(scheme="bf16", overrides=((u, c),))
            q = quantize_model(model, only, windows, progress=False)
            with torch.no_grad():
                sens[u, c] = kl_divergence(ref, q(windows))
    size = {(u, c): _bits(units[u], config, c) for u in units for c in cands}
    total = sum(size[u, cands[0]][1] for u in units)
    level = dict.fromkeys(units, 0)
    bits = lambda: sum(size[u, cands[level[u]]][0] for u in units) / max(total, 1)  # noqa: E731
    while bits() > mp.budget_bits:
        moves = [(u, level[u] + 1) for u in units if level[u] + 1 < len(cands)]
        if not moves:
            raise QuantError(f"mixed precision budget {mp.budget_bits} bits/weight is below the smallest "
                             f"reachable {bits():.2f} with candidates {cands}")

        def cost(move):
            u, lv = move
            saved = size[u, cands[level[u]]][0] - size[u, cands[lv]][0]
            return (sens[u, cands[lv]] - sens[u, cands[level[u]]]) / max(saved, 1e-9)

        u, lv = min(moves, key=cost)
        level[u] = lv
    overrides = tuple((u, cands[level[u]]) for u in units)
    return config.replace(mixed_precision=None, overrides=tuple(config.overrides) + overrides)  # user rules win
