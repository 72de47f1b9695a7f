"""QuantConfig: everything that decides how a model is quantised, as small validated dataclasses.

    graphopt.compile(model, quant="w8a8")                                   # a preset by name
    graphopt.compile(model, quant=QuantConfig(scheme="w4a8", kv_cache="int8",
                                              algorithms=(SmoothQuantConfig(alpha=0.6), ClippingConfig())))

Which linear gets which scheme (`QuantConfig.scheme_for(name)`), first rule that matches wins:
  1. `skip` patterns (fnmatch on the module name) stay in 16 bit. Default: the router gate
     (`*.mlp.gate`), `lm_head`, `*kv_b_proj` (Ascend recipes keep it in float: it expands every cached
     latent, so its error is paid by every key and value). Embeddings and norms are never linears;
  2. `overrides` {pattern: scheme}: hand-written or chosen by sensitivity (quant.mixed_precision);
  3. `mtp_scheme` for the MTP draft module (`mtp.*`) when set: drafts cost acceptance, not exactness;
  4. `scheme`.
`prefill_scheme` (graph path only): the prefill graph's main model is quantised with it in place of
`scheme` (rules 1-3 apply to both), the decode steps with `scheme`: `prefill_config()` is its config.

Algorithms: at most one *transform* (SmoothQuant, FlexSmooth, Hadamard: they rescale or rotate the
input channels of a linear and its weight so that the float function is unchanged) and at most one
*weight method* (RTN, grid clipping, learnable clipping, HQQ: they choose the weight grid). The code of
each lives in quant/algorithms, found through a registry keyed by the config's type.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from .schemes import SCHEMES, QuantError, Scheme, get_scheme

__all__ = [
    "QuantConfig", "CalibrationConfig", "MixedPrecisionConfig", "RTNConfig", "SmoothQuantConfig",
    "FlexSmoothConfig", "ClippingConfig", "LearnableClippingConfig", "HQQConfig", "HadamardConfig",
    "PRESETS", "resolve", "resolve_quant_config", "parse_algorithm", "DEFAULT_SKIP", "KV_CACHE_TYPES",
    "SMOOTH_SCOPES",
]

DEFAULT_SKIP = ("*.mlp.gate", "lm_head", "*kv_b_proj", "*shared_head.head")
KV_CACHE_TYPES = (None, "int8")


# -- algorithms ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RTNConfig:
    """Round to nearest on the abs-max grid: the baseline every other method must beat."""
    kind = "weight"


@dataclass(frozen=True)
class SmoothQuantConfig:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); X / s and W * s. alpha moves difficulty to W.

    scope: what one factor s covers.
      "linear"  each linear its own s, max|W_j| over its own weight (the default; the accuracy tables);
      "input"   one s per input tensor, max|W_j| over every smoothed linear reading it (q_a_proj and
                kv_a_proj_with_mqa read input_layernorm's output; gate / up / experts' gate_up /
                shared experts read post_attention_layernorm's). msModelSlim's anti-outlier step
                computes it so, and folds it into the norm: save_msmodelslim needs this scope.
                quantize_model and graphopt.compile (quant_insert groups the graph's readers of one
                node) give the same factors.
    """
    kind = "transform"
    alpha: float = 0.5
    scope: str = "linear"

    def __post_init__(self):
        _in_range("SmoothQuantConfig.alpha", self.alpha, 0.0, 1.0)
        if self.scope not in SMOOTH_SCOPES:
            raise QuantError(f"SmoothQuantConfig.scope {self.scope!r} is not supported; accepted: "
                             f"{', '.join(map(repr, SMOOTH_SCOPES))}")


SMOOTH_SCOPES = ("linear", "input")


@dataclass(frozen=True)
class FlexSmoothConfig:
    """s_j = max|X_j|^alpha / max|W_j|^beta, searched per layer on output error.

    Stage 1 searches alpha over `alpha_grid` with beta = 1 - alpha; stage 2 keeps that alpha and
    searches beta over `beta_grid`. The chosen (alpha, beta) per linear is saved with the weights.
    """
    kind = "transform"
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    beta_grid: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)

    def __post_init__(self):
        for g in ("alpha_grid", "beta_grid"):
            if not getattr(self, g):
                raise QuantError(f"FlexSmoothConfig.{g} must hold at least one value")
            for v in getattr(self, g):
                _in_range(f"FlexSmoothConfig.{g}", v, 0.0, 1.0)


@dataclass(frozen=True)
class HadamardConfig:
    """Rotate every quantised linear's input by a block Hadamard (QuaRot); block 0 = largest power of
    two dividing K, at most `max_block`. An alternative to smoothing, not a companion."""
    kind = "transform"
    max_block: int = 128

    def __post_init__(self):
        if self.max_block < 2 or self.max_block & (self.max_block - 1):
            raise QuantError(f"HadamardConfig.max_block must be a power of two >= 2, got {self.max_block}")


@dataclass(frozen=True)
class ClippingConfig:
    """Per output channel (per group for grouped schemes): the clip ratio of the abs-max that
    minimises the linear's output error on calibration inputs, chosen from `grid`."""
    kind = "weight"
    grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)

    def __post_init__(self):
        if not self.grid:
            raise QuantError("ClippingConfig.grid must hold at least one ratio")
        for v in self.grid:
            _in_range("ClippingConfig.grid", v, 0.05, 1.0)


@dataclass(frozen=True)
class LearnableClippingConfig:
    """Clip ratios learnt by gradient descent on the output error (straight-through rounding),
    started from the grid search's answer."""
    kind = "weight"
    steps: int = 30
    lr: float = 0.05
    grid: tuple[float, ...] = ClippingConfig.grid

    def __post_init__(self):
        if self.steps < 1 or self.lr <= 0:
            raise QuantError(f"LearnableClippingConfig needs steps >= 1 and lr > 0, got {self.steps}, {self.lr}")


@dataclass(frozen=True)
class HQQConfig:
    """Calibration-free: half-quadratic optimisation of the zero point of an asymmetric grid under an
    l_p (p < 1) error that tolerates weight outliers. Weight-only schemes (w4a16, w8a16)."""
    kind = "weight"
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01

    def __post_init__(self):
        _in_range("HQQConfig.lp_norm", self.lp_norm, 0.01, 1.0)
        if self.iters < 1:
            raise QuantError(f"HQQConfig.iters must be >= 1, got {self.iters}")


ALGORITHM_TYPES = {c.__name__: c for c in (RTNConfig, SmoothQuantConfig, FlexSmoothConfig, HadamardConfig,
                                           ClippingConfig, LearnableClippingConfig, HQQConfig)}
ALGORITHM_ALIASES = {"rtn": RTNConfig, "smoothquant": SmoothQuantConfig, "flexsmooth": FlexSmoothConfig,
                     "hadamard": HadamardConfig, "clipping": ClippingConfig,
                     "learnable_clipping": LearnableClippingConfig, "hqq": HQQConfig}


# -- data and budgets ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data: `sources` are (spec, ratio) pairs mixed in those ratios, or `tokens`.

    spec: "default" (the embedded model's training split, see quant/calibration.py), "heldout"
    (the shipped held-out text minus the evaluation slice), "text:PATH" (a UTF-8 file), all three
    tokenised with the model's own tokenizer; "tokens:PATH" (.bin uint16 ids, .pt / .safetensors int
    tensor) or "random" (uniform random ids: only when named) need none.
    tokens: token ids used instead of `sources`, [n, T] windows as given or a 1-D stream that
    num_samples windows of seq_len are drawn from (an int tensor or nested lists of ints).
    min_expert_tokens: a routed expert observes the tokens routed to it; one that receives fewer
    over the whole calibration set is observed on every token instead (listed in the report).
    """
    sources: tuple[tuple[str, float], ...] = (("default", 1.0),)
    num_samples: int = 32
    seq_len: int = 128
    seed: int = 0
    max_rows: int = 512      # activation rows each observer keeps for searches (reservoir sample)
    bins: int = 1024         # histogram bins per observed tensor
    tokens: Any = field(default=None, compare=False, repr=False)
    min_expert_tokens: int = 16

    def __post_init__(self):
        if not self.sources or any(r <= 0 for _, r in self.sources):
            raise QuantError(f"CalibrationConfig.sources needs (spec, ratio > 0) pairs, got {self.sources}")
        for name in ("num_samples", "seq_len", "max_rows", "bins", "min_expert_tokens"):
            if getattr(self, name) < 1:
                raise QuantError(f"CalibrationConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_expert_tokens > self.max_rows:
            raise QuantError(f"CalibrationConfig.min_expert_tokens ({self.min_expert_tokens}) must be <= max_rows "
                             f"({self.max_rows}): an expert's dense fallback is drawn from its max_rows sample")
        if self.tokens is not None:
            from .calibration import as_token_ids   # the one home of token-id checks
            object.__setattr__(self, "tokens", as_token_ids(self.tokens, "CalibrationConfig.tokens", dims=(1, 2)))


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """A scheme per unit from `candidates` (cheapest last) chosen by measured sensitivity so that the
    quantised weights average at most `budget_bits` per element (scales included). unit: "layer" (a
    main decoder layer: all its linears share a scheme) or "linear" (each targeted linear, or stacked
    experts tensor, of the main decoder layers on its own)."""
    candidates: tuple[str, ...] = ("w8a8", "w4a8")
    budget_bits: float = 6.0
    unit: str = "layer"

    def __post_init__(self):
        for c in self.candidates:
            get_scheme(c)
        if len(self.candidates) < 2:
            raise QuantError("MixedPrecisionConfig.candidates needs at least two schemes to choose from")
        if self.unit not in MIXED_PRECISION_UNITS:
            raise QuantError(f"MixedPrecisionConfig.unit {self.unit!r} is not supported; accepted: {MIXED_PRECISION_UNITS}")


MIXED_PRECISION_UNITS = ("layer", "linear")


# -- the config ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantConfig:
    scheme: str = "w8a8"
    algorithms: tuple[Any, ...] = ()
    kv_cache: str | None = None        # "int8": C8, int8 latent cache with static per-channel scales
    group_size: int = 128              # int4 schemes
    fp8_block: int = 128               # fp8_block scheme
    skip: tuple[str, ...] = DEFAULT_SKIP
    overrides: tuple[tuple[str, str], ...] = ()
    mtp_scheme: str | None = None
    prefill_scheme: str | None = None  # graphopt.compile: the prefill graph's scheme (None: `scheme`)
    mixed_precision: MixedPrecisionConfig | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self):
        get_scheme(self.scheme)
        if self.mtp_scheme is not None:
            get_scheme(self.mtp_scheme)
        if self.prefill_scheme is not None:
            get_scheme(self.prefill_scheme)
            if self.mixed_precision is not None:
                raise QuantError("prefill_scheme and mixed_precision cannot be combined: the per-layer overrides "
                                 "mixed precision chooses would apply to the prefill graph too")
        object.__setattr__(self, "overrides", tuple(tuple(p) for p in (
            self.overrides.items() if isinstance(self.overrides, dict) else self.overrides)))
        for _, s in self.overrides:
            get_scheme(s)
        if self.kv_cache not in KV_CACHE_TYPES:
            raise QuantError(f"kv_cache {self.kv_cache!r} is not supported; accepted: {KV_CACHE_TYPES}")
        if self.group_size < 1 or self.fp8_block < 1:
            raise QuantError("group_size and fp8_block must be >= 1")
        self._check_algorithms()

    def _check_algorithms(self) -> None:
        for a in self.algorithms:
            if type(a) not in ALGORITHM_TYPES.values():
                raise QuantError(f"unknown algorithm config {a!r}; accepted: {', '.join(ALGORITHM_TYPES)}")
        for kind in ("transform", "weight"):
            picked = [type(a).__name__ for a in self.algorithms if a.kind == kind]
            if len(picked) > 1:
                raise QuantError(f"at most one {kind} algorithm per config, got {picked}")
        if isinstance(self.weight_method, HQQConfig):
            for s in self.used_schemes():
                if s.activation != "none" and s.quantized:
                    raise QuantError(f"HQQ makes asymmetric weight-only grids; scheme {s.name!r} quantises "
                                     "activations (use w4a16 or w8a16 with HQQ)")

    @property
    def transform(self):
        return next((a for a in self.algorithms if a.kind == "transform"), None)

    @property
    def weight_method(self):
        return next((a for a in self.algorithms if a.kind == "weight"), RTNConfig())

    @property
    def needs_calibration(self) -> bool:
        """False for RTN / HQQ weights with dynamic activations and no C8: nothing to observe."""
        return (self.transform is not None or self.kv_cache is not None
                or not isinstance(self.weight_method, (RTNConfig, HQQConfig))
                or any(s.activation == "int8_static" for s in self.used_schemes()))

    @property
    def reads_data(self) -> bool:
        """True when quantize_model reads calibration data: to observe (needs_calibration), or to choose
        mixed precision (which scores the candidates on it)."""
        return self.needs_calibration or self.mixed_precision is not None

    @property
    def separate_prefill(self) -> bool:
        """True when the prefill graph gets other weights than the decode steps."""
        return self.prefill_scheme is not None and self.prefill_scheme != self.scheme

    def prefill_config(self) -> "QuantConfig":
        """The config of the prefill graph's weights: `prefill_scheme` in place of `scheme`, the rest shared."""
        if self.prefill_scheme is None:
            return self
        return dataclasses.replace(self, scheme=self.prefill_scheme, prefill_scheme=None)

    def used_schemes(self) -> list[Scheme]:
        names = {self.scheme, *(s for _, s in self.overrides)}
        for extra in (self.mtp_scheme, self.prefill_scheme):
            if extra:
                names.add(extra)
        return [SCHEMES[n] for n in sorted(names)]

    def scheme_for(self, name: str) -> Scheme | None:
        """The scheme of the linear (or stacked experts) called `name`; None: keep it in 16 bit."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.skip):
            return None
        scheme = next((s for p, s in self.overrides if fnmatch.fnmatchcase(name, p)), None)
        if scheme is None and self.mtp_scheme is not None and name.startswith("mtp."):
            scheme = self.mtp_scheme
        s = get_scheme(scheme or self.scheme)
        return s if s.quantized else None

    # -- (de)serialisation: JSON-friendly, every key checked ---------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["algorithms"] = [{"type": type(a).__name__, **dataclasses.asdict(a)} for a in self.algorithms]
        out["overrides"] = dict(self.overrides)
        out["skip"] = list(self.skip)
        out["mixed_precision"] = dataclasses.asdict(self.mixed_precision) if self.mixed_precision else None
        cal = self.calibration
        out["calibration"] = {f.name: getattr(cal, f.name) for f in dataclasses.fields(cal)}
        out["calibration"]["tokens"] = None if cal.tokens is None else cal.tokens.tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        data = dict(data)
        _check_keys("QuantConfig", data, cls)
        if "algorithms" in data:
            data["algorithms"] = tuple(parse_algorithm(a) for a in data["algorithms"])
        if "skip" in data:
            data["skip"] = tuple(data["skip"])
        if data.get("mixed_precision") is not None:
            _check_keys("mixed_precision", data["mixed_precision"], MixedPrecisionConfig)
            mp = data["mixed_precision"]
            data["mixed_precision"] = MixedPrecisionConfig(**{**mp, "candidates": tuple(mp.get(
                "candidates", MixedPrecisionConfig.candidates))})
        if "calibration" in data:
            _check_keys("calibration", data["calibration"], CalibrationConfig)
            cal = dict(data["calibration"])
            if "sources" in cal:
                cal["sources"] = tuple((str(s), float(r)) for s, r in cal["sources"])
            data["calibration"] = CalibrationConfig(**cal)
        return cls(**data)

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)


def parse_algorithm(spec: Any):
    """{"type": "SmoothQuantConfig", "alpha": 0.5}, or a short string "smoothquant" / "smoothquant:alpha=0.6" /
    "smoothquant:alpha=0.5,scope=input"."""
    if isinstance(spec, str):
        name, _, args = spec.partition(":")
        cls = ALGORITHM_ALIASES.get(name)
        if cls is None:
            raise QuantError(f"unknown algorithm {name!r}; accepted: {', '.join(ALGORITHM_ALIASES)}")
        kwargs = {}
        for item in filter(None, args.split(",")):
            key, _, value = item.partition("=")
            kwargs[key] = _number(value)
        spec = {"type": cls.__name__, **kwargs}
    spec = dict(spec)
    cls = ALGORITHM_TYPES.get(spec.pop("type", None))
    if cls is None:
        raise QuantError(f"algorithm entry {spec} needs a 'type' among {', '.join(ALGORITHM_TYPES)}")
    _check_keys(cls.__name__, spec, cls)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})


def _number(text: str):
    """A value of the short form: an int, a float, or else the text itself (scope=input)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _check_keys(where: str, data: dict, cls) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise QuantError(f"unknown {where} key(s) {unknown}; accepted keys: {sorted(known)}")


def _in_range(name: str, v: float, lo: float, hi: float) -> None:
    if not lo <= v <= hi:
        raise QuantError(f"{name} must be in [{lo}, {hi}], got {v}")


# -- presets -------------------------------------------------------------------------------------
PRESETS: dict[str, QuantConfig] = {
    "w8a8": QuantConfig("w8a8"),
    "w8a8_static": QuantConfig("w8a8_static", algorithms=(SmoothQuantConfig(0.5),)),
    # one SmoothQuant factor per norm output, which save_msmodelslim folds into the norm weights
    "w8a8_static_folded": QuantConfig("w8a8_static", algorithms=(SmoothQuantConfig(0.5, scope="input"),)),
    "w8a8_smooth": QuantConfig("w8a8", algorithms=(SmoothQuantConfig(0.5),)),
    "w8a8_c8": QuantConfig("w8a8", kv_cache="int8"),
    "w4a8": QuantConfig("w4a8", algorithms=(ClippingConfig(),)),
    "w4a8_c8": QuantConfig("w4a8", algorithms=(ClippingConfig(),), kv_cache="int8"),
    "w8a16": QuantConfig("w8a16"),
    "w4a16": QuantConfig("w4a16", algorithms=(HQQConfig(),)),
    "fp8": QuantConfig("fp8"),
    "fp8_block": QuantConfig("fp8_block"),
    "c8": QuantConfig("bf16", kv_cache="int8"),
    "w2a16": QuantConfig("w2a16", group_size=16),   # 16 divides every K of the embedded model (112)
    "hif8": QuantConfig("hif8"),
    "nf4": QuantConfig("nf4"),
}


def resolve_quant_config(quant: str | QuantConfig | dict | None) -> QuantConfig | None:
    return resolve(quant)


def resolve(quant: str | QuantConfig | dict | None) -> QuantConfig | None:
    """`quant=` as users pass it: a preset name, a QuantConfig, a dict (JSON) or None (no quantisation)."""
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    if isinstance(quant, dict):
        return QuantConfig.from_dict(quant)
    if isinstance(quant, str):
        if quant in PRESETS:
            return PRESETS[quant]
        raise QuantError(f"unknown quant preset {quant!r}; accepted: {', '.join(PRESETS)} "
                         "(or a graphopt.QuantConfig)")
    raise QuantError(f"quant= takes a preset name, a QuantConfig or a dict, got {type(quant).__name__}")
