"""The one TwoTower configuration: a NemotronH ``config.json`` shared by both towers.

Both towers of the released checkpoint share a single NemotronH config (spec §1), so this
dataclass keeps the checkpoint's own field names and reads and writes its ``config.json``
unchanged. The TwoTower-only values that are not part of the released config (the mask token)
get defaults from the spec and are written as extra keys, which NemotronH loaders ignore.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TwoTowerError

# Pattern characters and the two spellings of layer types (spec §2.1).
MAMBA, ATTENTION, MOE, MLP = "M", "*", "E", "-"
LAYER_TYPE_SPELLINGS = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
    "moe": MOE,
    "mlp": MLP,
}
NEWER_SPELLING = {MAMBA: "linear_attention", ATTENTION: "full_attention", MOE: "moe", MLP: "mlp"}


class ConfigError(TwoTowerError, ValueError):
    """A config.json that does not describe a TwoTower model we can run."""


@dataclass(frozen=True)
class TwoTowerConfig:
    """NemotronH hyper-parameters (spec §1) plus the TwoTower extras, validated on creation."""

    vocab_size: int
    hidden_size: int
    hybrid_override_pattern: str
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int
    chunk_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    n_shared_experts: int = 1
    intermediate_size: int = 0
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    mamba_hidden_act: str = "silu"
    mlp_hidden_act: str = "relu2"
    layer_norm_epsilon: float = 1e-5
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "bfloat16"
    mask_token_id: int = 3
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _validate(self)

    # --- derived sizes (spec §1, "Derived sizes") ---------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple(self.hybrid_override_pattern)

    @property
    def mamba_layers(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.hybrid_override_pattern) if c == MAMBA)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.hybrid_override_pattern) if c == ATTENTION)

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_dim(self) -> int:
        return self.d_inner + self.conv_dim + self.mamba_num_heads

    # --- config.json ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TwoTowerConfig":
        """Accepts the released config (``hybrid_override_pattern``) or the newer
        ``layers_block_type`` list, plus the legacy ``mamba_*`` aliases HF also accepts."""
        data = dict(raw)
        model_type = data.pop("model_type", "nemotron_h")
        if model_type != "nemotron_h":
            raise ConfigError(f"model_type is {model_type!r}; a TwoTower checkpoint has 'nemotron_h'")
        data["hybrid_override_pattern"] = _pattern_from(data)
        data.pop("layers_block_type", None)
        for alias, name in _ALIASES.items():
            if alias in data:
                data.setdefault(name, data.pop(alias))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name in known and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING and f.name not in data)
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        n_layers = data.pop("num_hidden_layers", None)
        if "time_step_limit" in data:
            data["time_step_limit"] = tuple(float(v) for v in data["time_step_limit"])
        if isinstance(data.get("eos_token_id"), list):
            data["eos_token_id"] = data["eos_token_id"][0]
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        try:
            config = cls(**kwargs, extra=extra)
        except TypeError as err:
            raise ConfigError(f"config.json has a field of the wrong type: {err}") from err
        if n_layers is not None and n_layers != config.num_hidden_layers:
            raise ConfigError(f"num_hidden_layers={n_layers} but the layer pattern has "
                              f"{config.num_hidden_layers} entries")
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["time_step_limit"] = list(self.time_step_limit)
        out["model_type"] = "nemotron_h"
        out["architectures"] = out.get("architectures", ["NemotronHTwoTowerForCausalLM"])
        out["num_hidden_layers"] = self.num_hidden_layers
        return dict(sorted(out.items()))

    @classmethod
    def load(cls, path: str | Path) -> "TwoTowerConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def replace(self, **changes: Any) -> "TwoTowerConfig":
        return dataclasses.replace(self, **changes)


_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_chunk_size": "chunk_size",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_dt_limit": "time_step_limit",
    "use_bias": "mamba_proj_bias",
    "norm_eps": "layer_norm_epsilon",
}


def _pattern_from(data: dict[str, Any]) -> str:
    if "hybrid_override_pattern" in data:
        pattern = data["hybrid_override_pattern"]
        if not isinstance(pattern, str):
            raise ConfigError("hybrid_override_pattern must be a string such as 'MEM*E'")
        return pattern
    if "layers_block_type" in data:
        types = data["layers_block_type"]
        if not isinstance(types, list):
            raise ConfigError("layers_block_type must be a list of layer type names")
        unknown = sorted({t for t in types if t not in LAYER_TYPE_SPELLINGS})
        if unknown:
            raise ConfigError(
                f"unknown layer type(s) {unknown} in layers_block_type; "
                f"known: {sorted(LAYER_TYPE_SPELLINGS)}")
        return "".join(LAYER_TYPE_SPELLINGS[t] for t in types)
    raise ConfigError("config.json is missing required field(s): hybrid_override_pattern "
                      "(or layers_block_type)")


def _validate(c: TwoTowerConfig) -> None:
    pattern = c.hybrid_override_pattern
    if not pattern:
        raise ConfigError("the layer pattern is empty: a tower needs at least one layer")
    unknown = sorted(set(pattern) - {MAMBA, ATTENTION, MOE, MLP})
    if unknown:
        raise ConfigError(
            f"unknown layer type(s) {unknown} in hybrid_override_pattern {pattern!r}; "
            "use M (Mamba-2), * (attention), E (MoE) or - (MLP)")
    positive = ["vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
                "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok",
                "moe_intermediate_size", "n_group", "topk_group"]
    for name in positive:
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ConfigError(
            f"num_attention_heads={c.num_attention_heads} is not divisible by "
            f"num_key_value_heads={c.num_key_value_heads} (grouped-query attention)")
    if c.mamba_num_heads % c.n_groups:
        raise ConfigError(f"mamba_num_heads={c.mamba_num_heads} is not divisible by "
                          f"n_groups={c.n_groups}")
    if c.num_experts_per_tok > c.n_routed_experts:
        raise ConfigError(f"num_experts_per_tok={c.num_experts_per_tok} exceeds "
                          f"n_routed_experts={c.n_routed_experts}")
    if c.n_routed_experts % c.n_group or c.topk_group > c.n_group:
        raise ConfigError(f"n_group={c.n_group}/topk_group={c.topk_group} do not divide "
                          f"{c.n_routed_experts} experts into groups")
    if MLP in pattern and c.intermediate_size <= 0:
        raise ConfigError("the pattern has MLP ('-') layers but intermediate_size is not set")
    if c.n_shared_experts and c.moe_shared_expert_intermediate_size <= 0:
        raise ConfigError("n_shared_experts is set but moe_shared_expert_intermediate_size is not")
    if c.mamba_hidden_act != "silu" or c.mlp_hidden_act != "relu2":
        raise ConfigError(f"only mamba_hidden_act='silu' and mlp_hidden_act='relu2' are "
                          f"supported (got {c.mamba_hidden_act!r}, {c.mlp_hidden_act!r})")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
        value = getattr(c, name)
        if not 0 <= value < c.vocab_size:
            raise ConfigError(f"{name}={value} is outside the vocabulary [0, {c.vocab_size})")


# --- presets --------------------------------------------------------------------------------

_NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"

_NANO = dict(
    vocab_size=131072, hidden_size=2688, hybrid_override_pattern=_NANO_PATTERN,
    num_attention_heads=32, num_key_value_heads=2, head_dim=128,
    mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4,
    chunk_size=128, n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
    moe_shared_expert_intermediate_size=3712, n_shared_experts=1, intermediate_size=1856,
    routed_scaling_factor=2.5, max_position_embeddings=262144,
)

PRESETS: dict[str, TwoTowerConfig] = {
    # The released dimensions (spec §1): for shape work and slices, never for CPU runs.
    "nano-30b-a3b": TwoTowerConfig(**_NANO),
    # Full width, one layer of each kind twice over: builds and GPU benchmarks.
    "nano-30b-a3b-slice": TwoTowerConfig(**{**_NANO, "hybrid_override_pattern": "MEM*EM*E"}),
    # The built-in random model: every block type at least twice, two attention layers, a
    # chunk size of 4 so short sequences cross chunk boundaries, runs in seconds on one core.
    "tiny": TwoTowerConfig(
        vocab_size=1024, hidden_size=64, hybrid_override_pattern="ME*M-E*M-E",
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16, n_groups=2, conv_kernel=4,
        chunk_size=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, n_shared_experts=1, intermediate_size=48,
        routed_scaling_factor=2.5, max_position_embeddings=4096, torch_dtype="float32",
    ),
}


def preset(name: str) -> TwoTowerConfig:
    """A named configuration; the error lists the names that exist."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
