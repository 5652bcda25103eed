"""Model geometries and per-size training presets for real Llama-family models, written here (no download).

`GEOMETRIES` holds the fields of each model's Hugging Face config.json that decide memory and compute
(the memory planner reads them too). `get_preset(name, **overrides)` returns the training settings for a
model: rank and alpha follow the "Optimal Settings by Model Size" table (<1B r16/a32, 1B-7B r32/a64, 7B-13B
r48/a96, >13B r64/a128); fast_adapter_rank is r, not the table's r/4 (BENCHMARKS.md section 8: k = r/4
learned worse than a random A, k = r best), plus the
DeepSpeed config, micro batch, sequence length and gradient checkpointing; every field is overridable.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from ..config import ConfigError, LoraFAConfig


@dataclass(frozen=True)
class ModelGeometry:
    """The config.json fields of a decoder-only Llama-style model that decide its size (HF field names)."""

    hf_id: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    model_type: str = "llama"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer, by module name."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        ffn = self.intermediate_size
        return {
            "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, ffn), "up_proj": (h, ffn), "down_proj": (ffn, h),
        }

    def num_parameters(self) -> int:
        """Parameter count of the base model (embeddings, decoder layers, norms, output head)."""
        per_layer = sum(i * o for i, o in self.linear_shapes().values()) + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * per_layer + self.hidden_size

    def to_hf_config(self, **overrides):
        """A transformers LlamaConfig with this geometry, e.g. to build the model on the meta device."""
        from transformers import LlamaConfig

        fields_ = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("hf_id", "model_type")}
        return LlamaConfig(**{**fields_, **overrides})


# Values copied from each model's config.json on the Hugging Face Hub.
GEOMETRIES: dict[str, ModelGeometry] = {
    "tinyllama-1.1b": ModelGeometry("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", 2048, 5632, 22, 32, 4,
                                    32000, 2048),
    "llama-3.2-1b": ModelGeometry("meta-llama/Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, 131072,
                                  rope_theta=500000.0, tie_word_embeddings=True),
    "llama-2-7b": ModelGeometry("meta-llama/Llama-2-7b-hf", 4096, 11008, 32, 32, 32, 32000, 4096),
    "llama-2-13b": ModelGeometry("meta-llama/Llama-2-13b-hf", 5120, 13824, 40, 40, 40, 32000, 4096),
    "llama-2-70b": ModelGeometry("meta-llama/Llama-2-70b-hf", 8192, 28672, 80, 64, 8, 32000, 4096),
    "llama-3-8b": ModelGeometry("meta-llama/Meta-Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, 8192,
                                rope_theta=500000.0),
    "llama-3-70b": ModelGeometry("meta-llama/Meta-Llama-3-70B", 8192, 28672, 80, 64, 8, 128256, 8192,
                                 rope_theta=500000.0),
}


@dataclass(frozen=True)
class SizeDefaults:
    """Settings that depend only on model size."""

    r: int
    lora_alpha: int
    fast_adapter_rank: int
    micro_batch: int
    gradient_checkpointing: bool
    deepspeed_config: str


# (smallest nominal size in billions, defaults). Nominal sizes from 1B up are whole billions (see
# nominal_billions), so the seed's rows "<1B", "1B-7B", "7B-13B", ">13B" start at 0, 1, 7 and 14; a 7B model
# takes the 7B-13B row, whose name it shares with 1B-7B. Rank/alpha: the seed's table; fast rank r (module doc). Below 7B the
# bf16 base (< 14 GB) fits on every GPU, so ZeRO-2 keeps it whole and skips ZeRO-3's per-layer all-gathers.
# Micro batch and checkpointing: every preset fits in 80 GiB per GPU at seq 4096 by planner.py, with room to
# spare (tests/jobs/test_presets.py checks it); checkpointing cuts 7B+ activations several-fold.
ZERO2, ZERO3 = "ds_configs/zero2.json", "ds_configs/zero3.json"
SIZE_TABLE: list[tuple[float, SizeDefaults]] = [
    (0, SizeDefaults(16, 32, 16, micro_batch=8, gradient_checkpointing=False, deepspeed_config=ZERO2)),
    (1, SizeDefaults(32, 64, 32, micro_batch=4, gradient_checkpointing=False, deepspeed_config=ZERO2)),
    (7, SizeDefaults(48, 96, 48, micro_batch=4, gradient_checkpointing=True, deepspeed_config=ZERO3)),
    (14, SizeDefaults(64, 128, 64, micro_batch=2, gradient_checkpointing=True, deepspeed_config=ZERO3)),
]


def nominal_billions(num_parameters: int) -> float:
    """The size a model is named by: 6.74e9 parameters is "7B", 13.02e9 is "13B"; below 1B stays exact."""
    billions = num_parameters / 1e9
    return billions if billions < 1 else float(round(billions))


def size_defaults(num_parameters: int) -> SizeDefaults:
    """The SIZE_TABLE row for a model of this many parameters."""
    billions = nominal_billions(num_parameters)
    return [defaults for lower, defaults in SIZE_TABLE if billions >= lower][-1]


@dataclass(frozen=True)
class Preset:
    """Everything a training job needs to know about the model and its adapter. Build with get_preset()."""

    name: str
    model: str  # Hugging Face id or local path passed to from_pretrained
    geometry: ModelGeometry
    r: int
    lora_alpha: int
    fast_adapter_rank: int
    target_modules: list[str] | str = "all-linear"
    lora_dropout: float = 0.05
    strategy: str = "deepspeed"  # deepspeed | fsdp | single
    deepspeed_config: str = ZERO3  # relative to the repository root
    micro_batch: int = 1
    seq_len: int = 4096
    gradient_checkpointing: bool = True

    def lora_config(self) -> LoraFAConfig:
        return LoraFAConfig(r=self.r, lora_alpha=self.lora_alpha, fast_adapter_rank=self.fast_adapter_rank,
                            target_modules=self.target_modules, lora_dropout=self.lora_dropout,
                            base_model_name_or_path=self.model)


STRATEGIES = ("deepspeed", "fsdp", "single")
_OVERRIDABLE = {f.name for f in dataclasses.fields(Preset)} - {"name", "geometry"}


def get_preset(name: str, **overrides) -> Preset:
    """The preset for a model in GEOMETRIES, with any field replaced by a keyword (None means keep)."""
    if name not in GEOMETRIES:
        close = difflib.get_close_matches(name, GEOMETRIES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"preset: unknown model '{name}'{hint} (known: {', '.join(GEOMETRIES)})")
    return preset_for(name, GEOMETRIES[name], **overrides)


def preset_from(name_or_path: str, /, **overrides) -> Preset:
    """A preset by name, or the size table's settings for a local Llama-layout model (its folder or config.json).

    The one lookup behind `lorafa-scale launch --preset` and `lorafa-scale plan --preset`, so both plan the
    same job. A bad name or folder is a ConfigError naming the presets."""
    if name_or_path in GEOMETRIES:
        return get_preset(name_or_path, **overrides)
    from pathlib import Path

    from .planner import load_geometry

    folder = Path(name_or_path).resolve()
    folder = folder.parent if folder.name == "config.json" else folder
    try:
        geometry = load_geometry(name_or_path)
    except ConfigError as err:
        raise ConfigError(f"preset: {str(err).removeprefix('plan: ')}") from None
    return preset_for(folder.name, geometry, **{**overrides, "model": overrides.get("model") or str(folder)})


def preset_for(name: str, geometry: ModelGeometry, **overrides) -> Preset:
    """The per-size defaults for any model geometry (e.g. read from a local config.json), with overrides."""
    for key in overrides:
        if key not in _OVERRIDABLE:
            raise ConfigError(f"preset: unknown field '{key}' (overridable: {', '.join(sorted(_OVERRIDABLE))})")
    size = size_defaults(geometry.num_parameters())
    # A new r brings the table's alpha = 2r and fast_adapter_rank = r along, unless those are given too.
    r = overrides.get("r")
    r = r if isinstance(r, int) and not isinstance(r, bool) and r > 0 else size.r  # a bad r fails in _check
    preset = Preset(
        name=name, model=geometry.hf_id, geometry=geometry, r=r, lora_alpha=size.lora_alpha * r // size.r,
        fast_adapter_rank=size.fast_adapter_rank * r // size.r, micro_batch=size.micro_batch,
        seq_len=min(4096, geometry.max_position_embeddings), gradient_checkpointing=size.gradient_checkpointing,
        deepspeed_config=size.deepspeed_config,
    )
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    _check(preset)
    return preset


def _check(preset: Preset) -> None:
    for key in ("r", "micro_batch", "seq_len"):
        value = getattr(preset, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"preset {preset.name}: {key} must be a positive integer, got {value!r}")
    if preset.seq_len > preset.geometry.max_position_embeddings:
        raise ConfigError(f"preset {preset.name}: seq_len={preset.seq_len} exceeds the model's "
                          f"max_position_embeddings={preset.geometry.max_position_embeddings}")
    if preset.strategy not in STRATEGIES:
        raise ConfigError(f"preset {preset.name}: strategy must be one of {STRATEGIES}, got {preset.strategy!r}")
    preset.lora_config()  # r / alpha / fast_adapter_rank checks live in LoraFAConfig
