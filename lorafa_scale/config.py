"""Adapter configuration.

`LoraFAConfig` holds what LoRA-FA needs. `LoraConfig` is the same config under PEFT's name, accepting
PEFT's common fields too, so that code written for `peft.LoraConfig` runs after changing only the import.
Every check runs at construction and names the offending field.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import asdict, dataclass, fields

BIAS_CHOICES = ("none", "all", "lora_only")
# init_lora_weights: True and "orthonormal" give A orthonormal rows (our default, see layer.py);
# "kaiming" is PEFT's default A; "gaussian" draws A ~ N(0, 1/r); False also makes B random (for tests).
INIT_CHOICES = (True, False, "orthonormal", "kaiming", "gaussian")


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


def _reject_unknown_keywords(cls):
    """Wrap a dataclass __init__ so an unknown keyword is a ConfigError that suggests the close name."""
    init = cls.__init__

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        known = {f.name for f in fields(cls)}
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{cls.__name__}: unknown field '{key}'{hint}")
        init(self, *args, **kwargs)

    cls.__init__ = checked_init
    return cls


@_reject_unknown_keywords
@dataclass
class LoraFAConfig:
    """LoRA-FA adapter settings.

    r: adapter rank. lora_alpha: scaling numerator, s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
    target_modules: list of module names (a module matches if its dotted path equals or ends with
    ".<name>"), a regex string matched against the whole path, or "all-linear" (every linear layer except
    the output head). use_fast_adapter: True freezes A (LoRA-FA); False trains A too (plain LoRA).
    fast_adapter_rank: how many of A's r rows `lorafa_scale.calibrate` sets from data (0..r; fast_adapter.py);
    until it runs (or an adapter is loaded) every row is random. correct_b_grad: apply LoRA-FA's closed-form gradient correction to B.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    bias: str = "none"
    use_fast_adapter: bool = True
    fast_adapter_rank: int = 0
    correct_b_grad: bool = True
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_lora_weights: bool | str = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        name = type(self).__name__
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"{name}: r must be a positive integer, got {self.r!r}")
        if not isinstance(self.fast_adapter_rank, int) or not 0 <= self.fast_adapter_rank <= self.r:
            raise ConfigError(
                f"{name}: fast_adapter_rank must be between 0 and r={self.r}, got {self.fast_adapter_rank!r}"
            )
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"{name}: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"{name}: bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights in INIT_CHOICES[2:]):
            raise ConfigError(f"{name}: init_lora_weights must be one of {INIT_CHOICES}, got {self.init_lora_weights!r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"{name}: lora_alpha must be positive, got {self.lora_alpha!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        return asdict(self)


# PEFT fields we accept for compatibility; each must keep the value that matches what we implement.
_PEFT_ONLY_DEFAULTS = {
    "use_dora": False,
    "lora_bias": False,
    "use_qalora": False,
    "rank_pattern": None,
    "alpha_pattern": None,
    "exclude_modules": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
}


@_reject_unknown_keywords
@dataclass
class LoraConfig(LoraFAConfig):
    """`LoraFAConfig` under PEFT's name, accepting PEFT's common fields.

    fan_in_fan_out is detected from the layer type (transformers' Conv1D) and may be left as is;
    inference_mode and revision are recorded. PEFT features we do not implement (use_dora, rank_pattern,
    ...) are accepted only at their "off" value, so a config never silently means something else.
    """

    fan_in_fan_out: bool = False
    inference_mode: bool = False
    revision: str | None = None
    peft_type: str = "LORA"
    use_dora: bool = False
    lora_bias: bool = False
    use_qalora: bool = False
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None
    exclude_modules: list[str] | str | None = None
    layer_replication: list | None = None
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.peft_type != "LORA":
            raise ConfigError(f"LoraConfig: peft_type must be 'LORA', got {self.peft_type!r}")
        for key, off in _PEFT_ONLY_DEFAULTS.items():
            value = getattr(self, key)
            if value != off and value not in ({}, []):
                raise ConfigError(f"LoraConfig: {key}={value!r} is a PEFT feature lorafa-scale does not implement")
