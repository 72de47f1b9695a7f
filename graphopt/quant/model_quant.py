"""Quantise a reference model's modules: the eager path behind the accuracy tables and checkpoints.

    qmodel = quantize_model(model, "w8a8")                       # a copy; `model` is untouched
    qmodel = quantize_model(model, QuantConfig(...), data=ids)   # ids [n, T]: your calibration windows
    qmodel.calibration_report                                    # which data, which experts fell back

Calibration data: `data` (token ids [n, T]), else QuantConfig.calibration (its token ids or sources;
text is tokenised with `tokenizer`, by default the embedded tokenizer for the embedded model only).
Both are checked before any work: a model without a tokenizer and text sources, empty data, ids out
of range, floats or the wrong shape are a QuantError saying what is accepted.

Layer by layer (calibration.py): observe the layer's targeted matmuls on the calibration hidden
states, quantise them (algorithms.quantize_target), swap the modules, then advance the hidden states
through the quantised layer, so each layer is calibrated on what the quantised model before it
produces. With SmoothQuant scope="input", the targets that read one norm's output (`norm_readers`:
q_a_proj and kv_a_proj_with_mqa; gate, up, the experts' gate_up, the shared experts) share one factor,
max|W_j| taken over all their weights.
Swaps, all drop-in (same call signature), so the quantised model still exports:
    nn.Linear                    -> QuantLinear                    (q_a_proj, o_proj, mlp.*_proj, eh_proj, ...)
    deepseek.Experts             -> QuantExperts                   (stacked [E, out, K] gate_up / down)
    self_attn.kv_a_layernorm     -> QuantLatentNorm, with kv_cache="int8" (C8)
The config used is attached as `qmodel.quant_config` (formats.py saves it).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from tqdm import tqdm

from graphopt.models.deepseek import DeepseekV3ForCausalLM, Experts

from .algorithms import Target, quantize_target
from .algorithms.smoothquant import shared_column_amax, shares_input_factor
from .calibration import LayerRunner, calibration_data, check_windows, model_tokenizer, observe_layer
from .config import QuantConfig, resolve
from .schemes import QuantError
from .observers import Observer
from .qlinear import QuantExperts, QuantLatentNorm, QuantLinear

__all__ = ["quantize_model", "quantized_names", "norm_readers"]


def quantize_model(model: DeepseekV3ForCausalLM, quant: str | QuantConfig | dict, data: Tensor | None = None,
                   *, tokenizer=None, progress: bool = True, batch: int = 8, inplace: bool = False
                   ) -> DeepseekV3ForCausalLM:
    config = resolve(quant)
    if config is None:
        raise ValueError("quantize_model needs a quant preset or QuantConfig, got None")
    if config.separate_prefill:
        raise QuantError(f"quantize_model makes one model, but the config has prefill_scheme={config.prefill_scheme!r} "
                         "(separate prefill weights exist in graphopt.compile only): quantise with "
                         "config.prefill_config() for the prefill weights, or drop prefill_scheme")
    report = {"data": None, "dense_experts": {}}   # dense_experts: name -> experts routed < min_expert_tokens
    if data is not None:
        data = check_windows(data, model, "quantize_model(data=...)")
        report["data"] = f"{data.shape[0]} windows x {data.shape[1]} tokens given as data= (token ids)"
    elif config.reads_data:
        cal = calibration_data(config.calibration, model.config.vocab_size, model_tokenizer(model.config, tokenizer))
        data, report["data"] = check_windows(cal.tokens, model, "calibration data"), cal.origin
    if config.mixed_precision is not None:
        from .mixed_precision import choose_mixed_precision
        config = choose_mixed_precision(model, config, data, progress=progress)
    model = model if inplace else copy.deepcopy(model)
    if not config.needs_calibration:                     # RTN / HQQ weights, dynamic activations: no data pass
        model = _quantize_without_data(model, config, progress)
        model.calibration_report = report
        return model
    runner = LayerRunner(model, data, batch=batch, progress=progress)
    try:
        for i, layer in enumerate(model.model.layers):
            _quantize_layer(runner, layer, f"model.layers.{i}", config, runner.hidden, report)
            runner.run(layer, update=True)
        main_hidden = runner.hidden
        _quantize_head(model, config, main_hidden)
        hidden = main_hidden
        for d, mtp in enumerate(model.mtp):
            x_in = runner.mtp_input(d, hidden)
            _quantize_linear_on(mtp, "eh_proj", f"mtp.{d}.eh_proj", config, x_in)
            with torch.no_grad():
                h = mtp.eh_proj(x_in)
            _quantize_layer(runner, mtp, f"mtp.{d}", config, h, report)
            hidden = runner.run(mtp, update=False, hidden=h)
    finally:
        runner.close()
    model.quant_config = config
    model.calibration_report = report
    return model


def _quantize_without_data(model: DeepseekV3ForCausalLM, config: QuantConfig, progress: bool
                           ) -> DeepseekV3ForCausalLM:
    layers = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    layers += [(f"mtp.{d}", mtp) for d, mtp in enumerate(model.mtp)]
    # no calibration bar here: HQQ (w4a16) takes ~0.17 s a layer on the tiny model (2-core CPU), and a
    # full-size DeepSeek-V3 layer holds 16x the experts at 28x the width, so its 62 layers take far longer
    for prefix, layer in tqdm(layers, desc=f"quantise {config.scheme}", unit="layer", delay=2.0,
                              disable=not progress):
        _quantize_layer(None, layer, prefix, config, None)
        if prefix.startswith("mtp."):
            _quantize_linear_on(layer, "eh_proj", f"{prefix}.eh_proj", config, None)
    _quantize_head(model, config, None)
    model.quant_config = config
    return model


def _targets(layer: nn.Module, prefix: str, config: QuantConfig, seed: int) -> dict:
    """{path in layer: (kind, observer)} of what to observe and quantise; experts: (gate_up, down) pair."""
    cal = config.calibration
    new = lambda name, per_expert=False: Observer(name, cal.max_rows, cal.bins, per_expert, seed,
                                                  cal.min_expert_tokens)
    hooks = {}
    for path, mod in layer.named_modules():
        full = f"{prefix}.{path}"
        if isinstance(mod, nn.Linear) and not path.startswith(("eh_proj", "shared_head")):
            if config.scheme_for(full) is not None:
                hooks[path] = ("linear", new(full))
        elif isinstance(mod, Experts):
            gu, dn = (config.scheme_for(f"{full}.{p}") for p in ("gate_up_proj", "down_proj"))
            if gu is not None or dn is not None:
                hooks[path] = ("experts", (new(f"{full}.gate_up_proj").track_routed_rows() if gu else None,
                                           new(f"{full}.down_proj", per_expert=True) if dn else None))
        elif path.endswith("self_attn.kv_a_layernorm") and config.kv_cache == "int8":
            hooks[path] = ("latent", new(f"{full}"))
    return hooks


def _quantize_layer(runner: LayerRunner, layer: nn.Module, prefix: str, config: QuantConfig, hidden,
                    report: dict | None = None) -> None:
    hooks = _targets(layer, prefix, config, config.calibration.seed)
    if not hooks:
        return
    if config.needs_calibration:
        observe_layer(runner, layer, hooks, hidden)
        for kind, obs in hooks.values():
            down = obs[1] if kind == "experts" else None
            if report is not None and down is not None and down.dense_experts():
                report["dense_experts"][down.name] = down.dense_experts()
    else:  # calibration-free: no observers needed
        hooks = {p: (k, None if k != "experts" else (None, None)) for p, (k, _) in hooks.items()}
    targets = {}                                      # path in layer (experts: by weight name) -> Target
    for path, (kind, obs) in hooks.items():
        full = f"{prefix}.{path}"
        if kind == "linear":
            targets[path] = _target(layer.get_submodule(path), full, config, obs)
        elif kind == "experts":
            for part, o in zip(("gate_up_proj", "down_proj"), obs):
                scheme = config.scheme_for(f"{full}.{part}")
                if scheme is not None:
                    w = getattr(layer.get_submodule(path), part).detach().float()
                    targets[f"{path}.{part}"] = Target(f"{full}.{part}", w, None, scheme, config, o)
    if shares_input_factor(config):
        _share_column_amax(layer, targets)
    for path, (kind, obs) in hooks.items():
        if kind == "linear":
            _replace(layer, path, QuantLinear(quantize_target(targets[path])))
        elif kind == "experts":
            parts = [quantize_target(targets[f"{path}.{p}"]) if f"{path}.{p}" in targets else None
                     for p in ("gate_up_proj", "down_proj")]
            _replace(layer, path, QuantExperts(layer.get_submodule(path), *parts))
        elif kind == "latent":
            scale = obs.channel_amax().clamp_min(1e-8) / 127
            _replace(layer, path, QuantLatentNorm(layer.get_submodule(path), scale))


def norm_readers(layer: nn.Module) -> dict[str, tuple[str, ...]]:
    """{norm: the matmuls reading its output} of a decoder (or MTP) layer, paths inside it; stacked experts
    by their weight name (`mlp.experts.gate_up_proj`), the float router (`mlp.gate`) included.

    The readers of one norm read one tensor: SmoothQuant scope="input" gives them one factor, and
    save_msmodelslim folds it into the norm's weight."""
    attn, mlp = layer.self_attn, layer.mlp
    q = ("self_attn.q_proj",) if attn.config.q_lora_rank is None else ("self_attn.q_a_proj",)
    out = {"input_layernorm": (*q, "self_attn.kv_a_proj_with_mqa")}
    if attn.config.q_lora_rank is not None:
        out["self_attn.q_a_layernorm"] = ("self_attn.q_b_proj",)
    out["self_attn.kv_a_layernorm"] = ("self_attn.kv_b_proj",)
    if hasattr(mlp, "experts"):
        shared = (("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
                  if mlp.shared_experts is not None else ())
        out["post_attention_layernorm"] = ("mlp.gate", "mlp.experts.gate_up_proj", *shared)
    else:
        out["post_attention_layernorm"] = ("mlp.gate_proj", "mlp.up_proj")
    return out


def _share_column_amax(layer: nn.Module, targets: dict[str, Target]) -> None:
    """SmoothQuant scope="input": the targets reading one norm's output get one max|W_j| over all their
    weights, hence one factor (their observers saw the same tensor, so the same max|X_j|)."""
    for readers in norm_readers(layer).values():
        group = [targets[r] for r in readers if r in targets]
        if len(group) > 1:
            amax = shared_column_amax([t.weight for t in group])                          # [K]
            for t in group:
                t.column_amax = amax


def _target(linear: nn.Linear, name: str, config: QuantConfig, obs: Observer | None) -> Target:
    bias = linear.bias.detach().float() if linear.bias is not None else None
    return Target(name, linear.weight.detach().float(), bias, config.scheme_for(name), config, obs)


def _quantize_linear_on(parent: nn.Module, path: str, name: str, config: QuantConfig, x: Tensor) -> None:
    """Quantise one linear whose input `x` the caller computed (eh_proj, lm_head)."""
    if config.scheme_for(name) is None:
        return
    obs = None
    if config.needs_calibration:
        cal = config.calibration
        obs = Observer(name, cal.max_rows, cal.bins, seed=cal.seed)
        obs.observe(x)
    _replace(parent, path, QuantLinear(quantize_target(_target(parent.get_submodule(path), name, config, obs))))


def _quantize_head(model: DeepseekV3ForCausalLM, config: QuantConfig, hidden: Tensor) -> None:
    if config.scheme_for("lm_head") is None:
        return
    with torch.no_grad():
        x = model.model.norm(hidden) if hidden is not None else None
    _quantize_linear_on(model, "lm_head", "lm_head", config, x)
    for mtp in model.mtp:  # the MTP head is the same module (shared, as in DeepSeek-V3)
        mtp.shared_head.head = model.lm_head


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def quantized_names(model: nn.Module) -> dict[str, str]:
    """{name: scheme} of every quantised matmul in a quantised model (expert parts by their weight name)."""
    out = {}
    for path, mod in model.named_modules(remove_duplicate=True):
        if isinstance(mod, QuantLinear):
            out[path] = mod.q.scheme
        elif isinstance(mod, QuantExperts):
            for part in ("gate_up", "down"):
                holder = getattr(mod, part)
                if holder is not None:
                    out[f"{path}.{part}_proj"] = holder.q.scheme
        elif isinstance(mod, QuantLatentNorm):
            out[path] = "kv_int8"
    return out
