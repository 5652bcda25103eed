"""DeepSpeed configs: read (dict or JSON file), fill the "auto" values, refuse what breaks LoRA-FA.

DeepSpeed itself does not understand "auto"; Hugging Face's Trainer fills it. We fill the same fields
the same way, from what the run knows (world size, micro-batch, accumulation, the model's hidden size):

    train_batch_size                          world_size x micro_batch_size x grad_accum
    train_micro_batch_size_per_gpu            micro_batch_size
    gradient_accumulation_steps               grad_accum
    gradient_clipping                         max_grad_norm
    bf16.enabled / fp16.enabled               from dtype
    zero_optimization.reduce_bucket_size      hidden^2
    ...stage3_prefetch_bucket_size            0.9 hidden^2
    ...stage3_param_persistence_threshold     10 hidden

An explicit value that disagrees with the run is an error naming the field, as is any "auto" left over.
ZeRO-3's "memory_efficient_linear" (on by default) replaces F.linear process-wide with a Function that keeps
every linear layer's input for backward, frozen or not, which undoes LoRA-FA's saving: we switch it off
when the config does not mention it and refuse a config that turns it on.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..config import ConfigError

BATCH_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class DeepSpeedConfigError(ConfigError):
    """A DeepSpeed config that cannot be used; the message names the file or field."""


def read_ds_config(config: dict | str | Path) -> tuple[dict, str]:
    """(a deep copy of the config, a name for messages) from a dict or a JSON file path."""
    if isinstance(config, dict):
        return copy.deepcopy(config), "ds_config"
    path = Path(config)
    if not path.is_file():
        raise DeepSpeedConfigError(f"{path}: DeepSpeed config not found")
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(loaded, dict):
        raise DeepSpeedConfigError(f"{path}: a DeepSpeed config is a JSON object, got {type(loaded).__name__}")
    return loaded, str(path)


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _fill(section: dict, key: str, value, where: str) -> None:
    """Put `value` where the config says "auto" or nothing; an explicit different value is an error."""
    current = section.get(key, "auto")
    if value is None:
        return
    if current == "auto":
        section[key] = value
    elif current != value:
        raise DeepSpeedConfigError(f"{where}: {key}={current!r} disagrees with the run's value {value!r}")


def _resolve_batch(config: dict, name: str, world_size: int) -> None:
    for key in BATCH_FIELDS:
        value = config.get(key, "auto")
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int)):
            raise DeepSpeedConfigError(f"{name}: {key} must be a whole number or \"auto\", got {value!r}")
    micro, accum, total = (config.get(k, "auto") for k in BATCH_FIELDS[1:] + BATCH_FIELDS[:1])
    if accum == "auto":
        accum = 1 if total == "auto" or micro == "auto" else total // (micro * world_size)
    if micro == "auto":
        if total == "auto":
            raise DeepSpeedConfigError(f"{name}: train_micro_batch_size_per_gpu is 'auto'; pass the micro-batch size")
        micro = total // (accum * world_size)
    if total == "auto":
        total = micro * accum * world_size
    if micro < 1 or accum < 1 or total != micro * accum * world_size:
        raise DeepSpeedConfigError(
            f"{name}: train_batch_size={total} must equal train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accum} x world size {world_size} = {micro * accum * world_size}"
        )
    config.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)


def _leftover_auto(obj, path: str = "") -> str | None:
    if obj == "auto":
        return path
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _leftover_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    return None


def resolve_ds_config(
    config: dict | str | Path,
    *,
    world_size: int = 1,
    micro_batch_size: int | None = None,
    grad_accum: int | None = None,
    max_grad_norm: float | None = None,
    hidden_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """A DeepSpeed config dict with every "auto" filled and the checks above applied."""
    config, name = read_ds_config(config)
    _fill(config, "train_micro_batch_size_per_gpu", micro_batch_size, name)
    _fill(config, "gradient_accumulation_steps", grad_accum, name)
    _resolve_batch(config, name, world_size)
    _fill(config, "gradient_clipping", max_grad_norm, name)
    for key, wanted in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if config.get(key, {}).get("enabled") == "auto" and dtype is not None:
            config[key]["enabled"] = dtype == wanted

    zero = config.setdefault("zero_optimization", {})
    if hidden_size is not None:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == "auto":
                zero[key] = value
    if zero_stage(config) == 3:
        if zero.get("memory_efficient_linear", False) not in (False, "auto"):
            raise DeepSpeedConfigError(
                f"{name}: zero_optimization.memory_efficient_linear=true makes DeepSpeed replace F.linear with a "
                "version that keeps every layer's input for backward, which undoes LoRA-FA's memory saving; "
                "set it to false"
            )
        zero["memory_efficient_linear"] = False
    leftover = _leftover_auto(config)
    if leftover:
        raise DeepSpeedConfigError(f"{name}: {leftover} is 'auto' and lorafa-scale has no value for it; set it")
    return config
