"""One entry point for both sharding engines: DeepSpeed ZeRO-3 (engine="zero3") and FSDP2 (engine="fsdp2").

    model = load_sharded_model(path, LoraFAConfig(r=16, target_modules="all-linear"), engine,
                               ds_config="ds_configs/zero3.json" if engine == "zero3" else None)
    module, optimizer, scheduler = wrap_sharded_model(model, engine, optimizer=lambda ps: AdamW(ps, lr=2e-4))
    ...loss = module(**batch).loss...
    save_sharded_adapter(module, "out/adapter")             # every rank calls; rank 0 writes (PEFT)

Each call dispatches to the engine's own functions (deepspeed.load_model / wrap / save_adapter,
fsdp.load_model / shard_model / save_adapter), imported on first use, so `import lorafa_scale` never imports
DeepSpeed. The loader records the engine, and for zero3 the resolved DeepSpeed config, on the model
(`lorafa_sharding_engine`, `lorafa_ds_config`), so the wrap call needs neither again. What stays different
is the loop: a DeepSpeed engine owns accumulation, clipping and the optimizer step (engine.backward(loss);
engine.step() after every micro-batch), while an FSDP2 model is a plain module (loss.backward();
optimizer.step()). "zero3" follows the config's stage (stage 2 or below keeps the base whole on each rank).
engine_options go to the engine's functions: micro_batch_size, grad_accum, max_grad_norm (zero3); seed,
mixed_precision, cpu_offload, activation_checkpointing (fsdp2); trust_remote_code (both loaders).
"""

from __future__ import annotations

import sys

import torch

from ..config import ConfigError, LoraFAConfig

ENGINES = ("zero3", "fsdp2")
ENGINE_ATTR, DS_CONFIG_ATTR = "lorafa_sharding_engine", "lorafa_ds_config"


def _check(engine: str, ds_config) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if engine == "fsdp2" and ds_config is not None:
        raise ConfigError("ds_config is a DeepSpeed config: only engine='zero3' takes it")


def load_sharded_model(path, lora_config: LoraFAConfig, engine: str, *, ds_config=None,
                       dtype: torch.dtype = torch.bfloat16, quantization: str = "none", lean: bool = True,
                       **engine_options):
    """Collective: a LoRA-FA causal LM sharded by `engine` from the moment it is loaded (module doc).

    lean (default True): lorafa_scale.lean's patches for Llama/Mistral/Qwen2/Qwen3 (chunked head + loss,
    SwiGLU and RMSNorm keeping only their inputs); `module(**batch, labels=...).loss` then never builds the
    logits in training mode (logits=None). Other model types are left as they are."""
    _check(engine, ds_config)
    if engine == "zero3" and ds_config is None:
        raise ConfigError("engine='zero3' needs ds_config (a dict or a JSON path: ds_configs/zero3.json)")
    if engine == "zero3":
        from .deepspeed import load_model

        model, resolved = load_model(path, lora_config, ds_config, dtype=dtype, quantization=quantization,
                                     **engine_options)
        setattr(model, DS_CONFIG_ATTR, resolved)
    else:
        from . import fsdp

        model = fsdp.load_model(path, lora_config, dtype=dtype, quantization=quantization, **engine_options)
    if lean:
        from .. import lean as lean_mode

        lean_mode.apply(model)
    setattr(model, ENGINE_ATTR, engine)
    return model


def wrap_sharded_model(model, engine: str, *, optimizer, lr_scheduler=None, ds_config=None, **engine_options):
    """Collective: (module, optimizer, lr_scheduler) to train the model's adapters with `engine`.

    optimizer: a torch optimizer over the trainable parameters or a callable params -> optimizer (zero3 also
    takes None: the config's "optimizer" section); lr_scheduler: a scheduler or a callable optimizer ->
    scheduler. zero3 returns deepspeed_engine.wrap's engine; fsdp2 shards a model not sharded yet (options
    to fsdp.shard_model) and returns the model itself.
    """
    _check(engine, ds_config)
    recorded = getattr(model, ENGINE_ATTR, None)
    if recorded not in (None, engine):
        raise ConfigError(f"the model was loaded for engine={recorded!r}, not {engine!r}")
    if engine == "zero3":
        from .deepspeed import wrap

        ds_config = getattr(model, DS_CONFIG_ATTR, None) if ds_config is None else ds_config
        if ds_config is None:
            raise ConfigError("engine='zero3': pass ds_config (the model is not from load_sharded_model)")
        module, optimizer, lr_scheduler = wrap(
            model, ds_config, optimizer=optimizer, lr_scheduler=lr_scheduler, **engine_options)
    else:
        from torch.distributed.fsdp import FSDPModule

        from . import fsdp

        if optimizer is None:
            raise ConfigError("engine='fsdp2' needs optimizer= (an optimizer or a callable params -> one)")
        if isinstance(model, FSDPModule) and engine_options:
            raise ConfigError(f"the model is already sharded: {sorted(engine_options)} would be ignored")
        if not isinstance(model, FSDPModule):
            if not callable(optimizer):
                raise ConfigError("sharding replaces the parameters an optimizer built before holds; "
                                  "pass optimizer=lambda params: ... instead")
            fsdp.init_distributed()
            fsdp.shard_model(model, **engine_options)
        if callable(optimizer):
            optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
        if callable(lr_scheduler):
            lr_scheduler = lr_scheduler(optimizer)
        module = model
    setattr(model, ENGINE_ATTR, engine)
    return module, optimizer, lr_scheduler


def save_sharded_adapter(module, directory) -> None:
    """Collective: gather the adapter of a DeepSpeed engine or a sharded model; rank 0 writes it (PEFT)."""
    deepspeed = sys.modules.get("deepspeed")  # an engine exists only if DeepSpeed was imported
    if deepspeed is not None and isinstance(module, deepspeed.DeepSpeedEngine):
        engine = "zero3"
    else:
        from torch.distributed.fsdp import FSDPModule

        engine = getattr(module, ENGINE_ATTR, None) or ("fsdp2" if isinstance(module, FSDPModule) else None)
    if engine == "zero3":
        from .deepspeed import save_adapter
    elif engine == "fsdp2":
        from .fsdp import save_adapter
    else:
        raise ConfigError("save_sharded_adapter: expected a DeepSpeed engine or a model from "
                          "load_sharded_model / wrap_sharded_model")
    save_adapter(module, directory)
