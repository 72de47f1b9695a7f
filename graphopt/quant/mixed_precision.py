"""Per-layer mixed precision chosen by measured sensitivity under a size budget.

Unit: a main decoder layer (`model.layers.{i}`; all its targeted matmuls share a scheme). MTP modules
follow `scheme` / `mtp_scheme` (their cost is acceptance, measured separately: see docs).

  1. sensitivity[i][c] = KL(float || model with only layer i quantised to candidate c, RTN grids) on
     the first calibration windows: one quantisation + forward per (layer, candidate), cheap next to
     the calibration itself (static-activation candidates still calibrate);
  2. start every layer at the most precise candidate (candidates[0]) and, while the average bits per
     targeted weight exceed the budget, move one layer one candidate down: the move with the least
     added KL per bit saved (greedy knapsack);
  3. the answer is the config with one override per layer ("model.layers.{i}.*": scheme).
Fails with the smallest reachable average when the budget is below what the cheapest candidate gives.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .config import QuantConfig
from .eval import kl_divergence
from .schemes import SCHEMES, QuantError, weight_bits_per_element

__all__ = ["choose_mixed_precision", "layer_sizes"]

SENSITIVITY_WINDOWS = 8


def layer_sizes(model: nn.Module, config: QuantConfig, layer: int, scheme: str) -> tuple[float, int]:
    """(bits, elements) of the targeted weights of main layer `layer` under `scheme`."""
    bits, elems = 0.0, 0
    prefix = f"model.layers.{layer}"
    for name, p in model.model.layers[layer].named_parameters():
        full = f"{prefix}.{name}".removesuffix(".weight")
        if p.dim() < 2 or config.scheme_for(full) is None:
            continue
        bits += weight_bits_per_element(SCHEMES[scheme], p.shape[-1], config.group_size) * p.numel()
        elems += p.numel()
    return bits, elems


def choose_mixed_precision(model: nn.Module, config: QuantConfig, data: Tensor, progress: bool = True
                           ) -> QuantConfig:
    from .model_quant import quantize_model  # model_quant calls us: import on use

    mp = config.mixed_precision
    cands = list(mp.candidates)
    n_layers = len(model.model.layers)
    windows = data[:SENSITIVITY_WINDOWS]
    with torch.no_grad():
        ref = model(windows)
    # probes use plain RTN grids and no C8: they rank layers by how much the grid alone costs, and the
    # calibration-free path makes each probe one quantisation (no data pass) plus one forward
    probe = config.replace(mixed_precision=None, mtp_scheme="bf16", algorithms=(), kv_cache=None)
    sens = {}
    for i in tqdm(range(n_layers), desc="sensitivity", disable=not progress):
        for c in cands:
            only = probe.replace(scheme="bf16", overrides=((f"model.layers.{i}.*", c),))
            q = quantize_model(model, only, windows, progress=False)
            with torch.no_grad():
                sens[i, c] = kl_divergence(ref, q(windows))
    size = {(i, c): layer_sizes(model, config, i, c) for i in range(n_layers) for c in cands}
    total = sum(size[i, cands[0]][1] for i in range(n_layers))
    level = [0] * n_layers
    bits = lambda: sum(size[i, cands[level[i]]][0] for i in range(n_layers)) / max(total, 1)
    while bits() > mp.budget_bits:
        moves = [(i, level[i] + 1) for i in range(n_layers) if level[i] + 1 < len(cands)]
        if not moves:
            raise QuantError(f"mixed precision budget {mp.budget_bits} bits/weight is below the smallest "
                             f"reachable {bits():.2f} with candidates {cands}")

        def cost(move):
            i, lv = move
            saved = size[i, cands[level[i]]][0] - size[i, cands[lv]][0]
            return (sens[i, cands[lv]] - sens[i, cands[level[i]]]) / max(saved, 1e-9)

        i, lv = min(moves, key=cost)
        level[i] = lv
    overrides = tuple((f"model.layers.{i}.*", cands[level[i]]) for i in range(n_layers))
    return config.replace(mixed_precision=None, overrides=tuple(config.overrides) + overrides)  # user rules win
