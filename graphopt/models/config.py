"""DeepSeek-V3 / V2 configuration, read from a Hugging Face `config.json`.

Field names are exactly those of the HF `config.json` files that DeepSeek publishes, so a config read
from a checkpoint and written back is the same file. Values we cannot run are rejected here, once,
with the field name and the values we accept, instead of failing deep inside a forward.

Accepted without effect (informational keys every HF config carries) are listed in
`_IGNORED_KEYS`; any other key is an error naming it (a typo in a hand-written config must not be
silently ignored).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..ops.core import SUPPORTED_SCORING, SUPPORTED_TOPK_METHODS  # the routers the ops implement

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
SUPPORTED_ROPE_TYPES = ("default", "yarn")
SUPPORTED_ACTS = ("silu",)

# Keys HF configs carry that do not change what the model computes.
_IGNORED_KEYS = frozenset({
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "aux_loss_alpha",
    "seq_aux", "ep_size", "pretraining_tp", "use_cache", "_name_or_path", "output_router_logits",
    "initializer_range", "attention_dropout", "quantization_config", "num_key_value_heads",
    "router_aux_loss_coef", "head_dim", "qk_head_dim", "id2label", "label2id", "return_dict",
    "output_hidden_states", "output_attentions", "tie_encoder_decoder", "is_encoder_decoder",
    "chunk_size_feed_forward", "problem_type", "tokenizer_class", "_attn_implementation_autoset",
    "use_mla", "n_layer_groups", "layer_types", "mlp_layer_types", "num_mtp_layers",
})


class ConfigError(ValueError):
    """A config field holds a value graphopt does not support."""


@dataclass
class DeepseekV3Config:
    """The model's shape and maths; defaults are DeepSeek-V3's published values."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes ------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: normalised latent + roped shared key (576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.n_routed_experts is not None and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times yarn's mscale(factor, mscale_all_dim)^2 when yarn is on."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = yarn_mscale(self.rope_scaling["factor"], mscale_all_dim)
                scale = scale * m * m
        return scale

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        def choice(name: str, value: Any, allowed: tuple) -> None:
            if value not in allowed:
                raise ConfigError(f"config field {name!r} = {value!r} is not supported; "
                                  f"supported values: {', '.join(map(repr, allowed))}")

        choice("model_type", self.model_type, SUPPORTED_MODEL_TYPES)
        choice("hidden_act", self.hidden_act, SUPPORTED_ACTS)
        choice("topk_method", self.topk_method, SUPPORTED_TOPK_METHODS)
        choice("scoring_func", self.scoring_func, SUPPORTED_SCORING)
        choice("rope_scaling.type", self.rope_type, SUPPORTED_ROPE_TYPES)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "moe_layer_freq"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, "
                                  f"got {getattr(self, name)!r}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"config field 'q_lora_rank' must be null or > 0, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"config field 'qk_rope_head_dim' must be even, got {self.qk_rope_head_dim}")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError("config field 'num_nextn_predict_layers' must be >= 0")
        if self.n_routed_experts is not None:
            self._validate_moe()
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            raise ConfigError("topk_method 'noaux_tc' needs scoring_func 'sigmoid' "
                              f"(got {self.scoring_func!r})")
        if self.rope_type == "yarn" and "factor" not in self.rope_scaling:
            raise ConfigError("rope_scaling of type 'yarn' needs a 'factor'")

    def _validate_moe(self) -> None:
        e, k = self.n_routed_experts, self.num_experts_per_tok
        if not k or k > e:
            raise ConfigError(f"num_experts_per_tok must be in 1..n_routed_experts ({e}), got {k}")
        g, tg = self.n_group or 1, self.topk_group or 1
        if e % g:
            raise ConfigError(f"n_routed_experts ({e}) must be divisible by n_group ({g})")
        if tg > g:
            raise ConfigError(f"topk_group ({tg}) must be <= n_group ({g})")
        if self.topk_method == "noaux_tc" and e // g < 2:
            raise ConfigError("topk_method 'noaux_tc' scores a group by its top-2 experts: "
                              f"need >= 2 experts per group, got {e // g}")
        if tg * (e // g) < k:
            raise ConfigError(f"topk_group ({tg}) groups of {e // g} experts cannot hold "
                              f"num_experts_per_tok ({k}) experts")

    # -- (de)serialisation --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeepseekV3Config":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "rope_parameters" in data:  # transformers 5 spelling of rope_theta + rope_scaling
            params = dict(data.pop("rope_parameters") or {})
            theta = params.pop("rope_theta", None)
            if theta is not None:
                data["rope_theta"] = theta
            params.pop("partial_rotary_factor", None)
            if params.get("rope_type", params.get("type", "default")) != "default":
                data["rope_scaling"] = params
        unknown = sorted(k for k in data if k not in known and k not in _IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; accepted keys: {sorted(known)} "
                              f"(and HF informational keys {sorted(_IGNORED_KEYS)})")
        if data.get("model_type", "deepseek_v3") not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {data.get('model_type')!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        extra = {k: v for k, v in data.items() if k in _IGNORED_KEYS}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("model_type") == "deepseek_v2":  # V2 defaults differ from V3's
            kwargs.setdefault("topk_method", "greedy")
            kwargs.setdefault("scoring_func", "softmax")
            kwargs.setdefault("norm_topk_prob", False)
            kwargs.setdefault("routed_scaling_factor", 1.0)
            kwargs.setdefault("num_nextn_predict_layers", 0)
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "DeepseekV3Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["architectures"] = ["DeepseekV3ForCausalLM"]
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> "DeepseekV3Config":
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction, 0.1 * m * ln(s) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
