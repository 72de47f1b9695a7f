"""Use a `transformers` DeepseekV3ForCausalLM as a graphopt reference model, sharing its parameters.

The HF module tree and ours use the same attribute names (`model.layers.3.self_attn.kv_b_proj`,
`model.layers.3.mlp.experts.gate_up_proj`, ...), so the bridge builds our model on the meta device
and then points each of our parameters and buffers at the HF tensor of the same name: no copy, and
an in-place change on either side is seen by both.

transformers drops the MTP weights on load (`model.layers.61.*`); pass `mtp_weights=` (a checkpoint
directory or safetensors file that holds them) to get the MTP module back for speculative decoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import DeepseekV3Config
from .deepseek import DeepseekV3ForCausalLM

_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
    "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "rope_interleave", "attention_bias", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
)


def config_from_transformers(hf_config: Any, num_mtp_layers: int = 0) -> DeepseekV3Config:
    """Our config from a transformers DeepseekV3Config (v5: rope_parameters; v4: rope_theta/rope_scaling)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "deepseek_v3":
        raise TypeError(f"expected a transformers DeepseekV3 config (model_type 'deepseek_v3'), "
                        f"got model_type {model_type!r}")
    data = {name: getattr(hf_config, name) for name in _CONFIG_FIELDS if hasattr(hf_config, name)}
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not rope:  # transformers 4.x spelling
        rope = dict(getattr(hf_config, "rope_scaling", None) or {})
        rope["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    data["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope.pop("partial_rotary_factor", None)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        data["rope_scaling"] = rope
    # transformers' router is always V3's: sigmoid scores, bias-corrected group-limited top-k.
    data.update(model_type="deepseek_v3", topk_method="noaux_tc", scoring_func="sigmoid",
                num_nextn_predict_layers=num_mtp_layers)
    return DeepseekV3Config.from_dict(data)


def from_transformers(hf_model: nn.Module, mtp_weights: str | Path | None = None) -> DeepseekV3ForCausalLM:
    """The reference model over `hf_model`'s own parameters (shared, not copied)."""
    if type(hf_model).__name__ != "DeepseekV3ForCausalLM" or not hasattr(hf_model, "model"):
        raise TypeError(f"from_transformers expects a transformers DeepseekV3ForCausalLM, "
                        f"got {type(hf_model).__module__}.{type(hf_model).__name__}")
    num_mtp = 0
    if mtp_weights is not None:
        num_mtp = int(getattr(hf_model.config, "num_nextn_predict_layers", None)
                      or getattr(hf_model.config, "num_mtp_layers", 1) or 1)
    config = config_from_transformers(hf_model.config, num_mtp)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    theirs = dict(hf_model.named_parameters(remove_duplicate=False))
    theirs.update(dict(hf_model.named_buffers(remove_duplicate=False)))
    for name, _ in list(model.named_parameters(remove_duplicate=False)):
        if name.startswith("mtp."):
            continue
        if name not in theirs:
            raise KeyError(f"transformers model has no tensor {name!r}; is it a DeepseekV3ForCausalLM?")
        _set_tensor(model, name, theirs[name])
    for name, _ in list(model.named_buffers(remove_duplicate=False)):
        if name.endswith("e_score_correction_bias") and not name.startswith("mtp."):
            _set_tensor(model, name, theirs[name])
    device = hf_model.lm_head.weight.device
    model.model.rotary_emb.reset_parameters(device)
    if mtp_weights is not None:
        from .checkpoint import load_mtp_weights  # local import: checkpoint I/O imports this package
        load_mtp_weights(model, mtp_weights)
    return model


def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    module = root
    for part in path:
        module = getattr(module, part)
    if isinstance(tensor, nn.Parameter):
        setattr(module, leaf, tensor)
    else:
        module._buffers[leaf] = tensor
