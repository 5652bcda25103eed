"""Adapters on disk in PEFT's format.

An adapter directory holds
- adapter_config.json: PEFT's LoraConfig fields only (peft_type "LORA"), so `peft.PeftModel.from_pretrained`
  reads it without warnings;
- adapter_model.safetensors: keys as PEFT writes them, e.g.
  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (r x in) and ...lora_B.weight (out x r),
  both A and B (a random A cannot be re-derived);
- lorafa_config.json: the LoRA-FA settings PEFT has no field for (use_fast_adapter, correct_b_grad, ...).
  PEFT ignores this file; without it an adapter is read as a PEFT LoRA adapter with A frozen.
Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import LoraConfig, LoraFAConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORAFA_CONFIG_NAME = "lorafa_config.json"
LORAFA_ONLY_FIELDS = ("use_fast_adapter", "fast_adapter_rank", "correct_b_grad", "init_lora_weights")


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be read; the message names the file."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def peft_config_dict(config: LoraFAConfig, target_modules, fan_in_fan_out: bool) -> dict:
    """adapter_config.json contents: the fields PEFT's LoraConfig knows."""
    init = config.init_lora_weights
    return {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": getattr(config, "revision", None),
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": target_modules,
        "bias": config.bias,
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": config.use_rslora,
        "modules_to_save": config.modules_to_save,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        # PEFT re-initialises then overwrites the weights on load; only its own init names are valid there.
        "init_lora_weights": init if init in (False, "gaussian") else True,
        "use_dora": False,
    }


def save_adapter(directory, state_dict: dict[str, torch.Tensor], config: LoraFAConfig, target_modules,
                 fan_in_fan_out: bool) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _write_json(directory / CONFIG_NAME, peft_config_dict(config, target_modules, fan_in_fan_out))
    _write_json(directory / LORAFA_CONFIG_NAME, {k: getattr(config, k) for k in LORAFA_ONLY_FIELDS})


def load_config(directory) -> LoraConfig:
    """Read adapter_config.json (plus lorafa_config.json if present) into a LoraConfig."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{path}: not found (expected a PEFT adapter directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{path}: invalid JSON: {err}") from None
    if raw.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{path}: peft_type is {raw.get('peft_type')!r}; only 'LORA' adapters load here")
    known = {f for f in LoraConfig.__dataclass_fields__}
    fields = {k: v for k, v in raw.items() if k in known}
    if fields.get("init_lora_weights") not in (True, False, "gaussian"):
        fields["init_lora_weights"] = True  # PEFT-only inits (pissa, eva, ...): the weights on disk decide
    extra = directory / LORAFA_CONFIG_NAME
    if extra.is_file():
        fields.update({k: v for k, v in json.loads(extra.read_text()).items() if k in LORAFA_ONLY_FIELDS})
    return LoraConfig(**fields)


def load_weights(directory) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{path}: not found (lorafa-scale reads safetensors adapters only)")
    return load_file(str(path))
