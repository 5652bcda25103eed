"""LoRA-FA on DeepSpeed: ZeRO-3 partitioned backbones, engine wrapping, adapter export and checkpoints.

    model, ds_config = load_model("meta-llama/Llama-3.1-70B", LoraFAConfig(r=16, target_modules="all-linear"),
                                  "ds_configs/zero3.json", micro_batch_size=1, grad_accum=8)
    engine, optimizer, scheduler = wrap(model, ds_config, optimizer=torch.optim.AdamW(trainable, lr=1e-4))
    ...engine(**batch).loss, engine.backward(loss), engine.step()...
    save_adapter(engine, "out/adapter")                     # every rank calls; rank 0 writes

How the layer works under ZeRO-3. ZeRO-3 gathers a module's parameters in its forward pre-hook and frees
them after its forward. LoraFALinear hands lora_A.weight and lora_B.weight to its autograd Function without
calling the lora_A / lora_B modules, so their hooks never fire; `wrap` registers both as external parameters
of the LoraFALinear (deepspeed.zero.register_external_parameter), so ZeRO-3 gathers them when the layer runs,
frees them after its forward, and re-gathers them when the gradient reaches its output. The Function saves
the Parameters themselves, never copies, so nothing gathered stays alive in between; the frozen base layers
get the same property from FrozenLayerFunction (torch's and bitsandbytes' own linears keep a view of the
gathered weight, which would keep it alive until backward). (Marking LoraFALinear a
ZeRO-3 "leaf" module instead breaks B's gradient: DeepSpeed reduces a leaf's gradients in a full backward
hook, which fires before B's gradient exists when the layer input needs no gradient, as in the first layer.)

Where adapters live: partitioned like the base. They are gathered anyway with the base weight of the same
layer (one all-gather, r (in + out) extra values next to in x out), so keeping them whole on every rank
would save no communication and cost their full size on each rank (see README for the 70B figures).

Building under zero.Init: LoraFALinear's A and B are then partitioned as they are created, before they can
be initialised; `init_partitioned_adapters` initialises them layer by layer in GatheredParameters (rank 0
draws, every rank receives), so no rank ever holds more than one layer's adapter whole.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import peft_format
from ..backends import find_backend
from ..backends.bnb import LINEAR_4BIT
from ..backends.torch_linear import LINEAR
from ..config import LoraFAConfig
from ..layer import ADAPTER_CREATION_CONTEXT
from ..model import LoraFAModel, get_peft_model
from .deepspeed_config import DeepSpeedConfigError, read_ds_config, resolve_ds_config, zero_stage
from .strategy import Strategy, read_client_state, write_client_state

FROZEN_ADAPTER_NAME = "frozen_adapter.safetensors"
ENGINE_TAG = "engine"


def init_distributed() -> None:
    """Collective: start torch.distributed through DeepSpeed (once per process; env:// rendezvous).

    On CPU, DeepSpeed would JIT-compile a shared-memory all-reduce (minutes on a fresh machine) that only its
    inference all-reduce uses; training collectives go through torch.distributed, so we mark it unavailable.
    LORAFA_DS_SHM_COMM=1 keeps DeepSpeed's default.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and os.environ.get("LORAFA_DS_SHM_COMM") != "1":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False  # read when DeepSpeed builds ops
    deepspeed.init_distributed()  # does nothing the second time; adopts a process group started elsewhere


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def gathered(params, modifier_rank=None):
    """GatheredParameters over the ZeRO-3 parameters among `params` (a no-op for the others)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in params if is_partitioned(p)], modifier_rank=modifier_rank)


# -- the layers under ZeRO-3 -----------------------------------------------------------------------------
class FrozenLayerFunction(torch.autograd.Function):
    """A frozen linear layer (plain or 4-bit) that keeps nothing for backward but a reference to the layer.

    Autograd's linear keeps a transposed view of the weight, and bitsandbytes' 4-bit matmul keeps a view of
    the packed weight. ZeRO-3 frees a gathered weight by pointing param.data at an empty tensor, so such a
    view would keep the whole gathered weight alive from forward to backward. Here the layer's own forward
    runs without autograd, and backward computes x's gradient from the weight ZeRO-3 has gathered again by
    then. The input is never kept (DeepSpeed's memory_efficient_linear keeps it).
    """

    @staticmethod
    def forward(ctx, x, layer, layer_forward):
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return layer_forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        backend = find_backend(ctx.layer)
        dense = backend.dequantized_weight(ctx.layer) if backend is not LINEAR else ctx.layer.weight  # out x in
        return (grad_out.to(dense.dtype) @ dense).to(ctx.x_dtype), None, None


def _frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
    return FrozenLayerFunction.apply(x, self, super(type(self), self).forward)


_FROZEN_CLASSES: dict[type, type] = {}


def freeze_for_zero3(model: nn.Module) -> None:
    """Give every frozen nn.Linear / bitsandbytes Linear4bit FrozenLayerFunction's forward, through a subclass
    made once per class (as FSDP2's fully_shard does); layers with a trained weight or bias are left alone."""
    for module in model.modules():
        cls = type(module)
        trained = any(p.requires_grad for p in module.parameters())
        if trained or find_backend(module) not in (LINEAR, LINEAR_4BIT) or cls in _FROZEN_CLASSES.values():
            continue
        if cls not in _FROZEN_CLASSES:
            _FROZEN_CLASSES[cls] = type(f"ZeRO3Frozen{cls.__name__}", (cls,), {"forward": _frozen_forward})
        module.__class__ = _FROZEN_CLASSES[cls]


# -- building --------------------------------------------------------------------------------------------
@contextmanager
def zero3_init_context(ds_config: dict):
    """Build the model and inject LoRA-FA inside this block to get both partitioned (ZeRO-3; else a no-op).

    transformers' from_pretrained / from_config partition while loading as long as an HfDeepSpeedConfig is
    alive (it keeps only a weak reference, so we hold it). Each LoraFALinear creates its A and B under
    zero.Init (layer.ADAPTER_CREATION_CONTEXT); zero.Init is not kept open around the whole block because
    transformers imports modeling code lazily and importing torch code while zero.Init patches tensor
    creation fails. Call `init_partitioned_adapters` afterwards (`load_model` and the strategy do).
    """
    if zero_stage(ds_config) != 3:
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = HfDeepSpeedConfig(ds_config)
    token = ADAPTER_CREATION_CONTEXT.set(lambda: deepspeed.zero.Init(config_dict_or_path=ds_config))
    try:
        yield
    finally:
        ADAPTER_CREATION_CONTEXT.reset(token)
        del hf_ds_config


@torch.no_grad()
def init_partitioned_adapters(model: LoraFAModel) -> None:
    """Collective: initialise adapters created already partitioned (under zero.Init), one layer at a time.

    Layers initialised before (or created whole) are left alone, so calling this twice changes nothing.
    """
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    init = model.config_lorafa.init_lora_weights
    for layer in model.lora_layers():
        weights = [layer.lora_A.weight, layer.lora_B.weight]
        if not is_partitioned(weights[0]) or getattr(layer, "partitioned_init_done", False):
            continue
        with gathered(weights, modifier_rank=0):
            if rank == 0:
                layer.reset_lora_parameters(init)
        with gathered([layer.lora_A.weight]):
            layer.refresh_b_grad_correction()
        layer.partitioned_init_done = True


@torch.no_grad()
def refresh_corrections(model: LoraFAModel) -> None:
    """Collective: recompute each layer's B-gradient correction from its (gathered) A."""
    for layer in model.lora_layers():
        with gathered([layer.lora_A.weight]):
            layer.refresh_b_grad_correction()


def load_model(
    model_name_or_path: str,
    lora_config: LoraFAConfig,
    ds_config: dict | str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    micro_batch_size: int | None = None,
    grad_accum: int | None = None,
    max_grad_norm: float | None = None,
    quantization: str = "none",
    trust_remote_code: bool = False,
) -> tuple[LoraFAModel, dict]:
    """Collective: load a causal LM with LoRA-FA adapters, partitioned from the start under ZeRO-3.

    Returns the model and the resolved DeepSpeed config to pass to `wrap`. With quantization "nf4" or "fp4"
    each rank loads the 4-bit model (zero.Init cannot build quantized layers; see quantization.load_model,
    which packs the 4-bit values in the model dtype so ZeRO-3 can flatten them with the rest) and `wrap`
    partitions it. "int8" is refused under ZeRO-3: LLM.int8 layers keep their scales beside the weight
    tensor, which ZeRO-3 would partition without them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    init_distributed()
    hf_config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    config = resolve_ds_config(
        ds_config, world_size=world_size(), micro_batch_size=micro_batch_size, grad_accum=grad_accum,
        max_grad_norm=max_grad_norm, hidden_size=getattr(hf_config, "hidden_size", None), dtype=dtype,
    )
    if quantization != "none":
        from ..quantization import load_model as load_quantized

        if quantization == "int8" and zero_stage(config) == 3:
            raise DeepSpeedConfigError("quantization='int8' cannot be partitioned by ZeRO-3; use nf4 or fp4")
        model = load_quantized(model_name_or_path, quantization, dtype, lora_config,
                               trust_remote_code=trust_remote_code)
        return model, config
    with zero3_init_context(config):
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
        model = get_peft_model(model, lora_config)
    init_partitioned_adapters(model)
    return model, config


# -- wrapping --------------------------------------------------------------------------------------------
def wrap(
    model: LoraFAModel,
    ds_config: dict | str | Path,
    *,
    optimizer=None,
    lr_scheduler=None,
    micro_batch_size: int | None = None,
    grad_accum: int | None = None,
    max_grad_norm: float | None = None,
):
    """Collective: (engine, optimizer, lr_scheduler) training only the model's trainable (adapter) parameters.

    `optimizer` is a torch optimizer over trainable parameters, a callable params -> optimizer, or None to
    let DeepSpeed build the config's "optimizer" section over the trainable parameters.
    """
    import deepspeed
    from deepspeed.runtime.zero import register_external_parameter

    init_distributed()
    config = resolve_ds_config(
        ds_config, world_size=world_size(), micro_batch_size=micro_batch_size, grad_accum=grad_accum,
        max_grad_norm=max_grad_norm, hidden_size=getattr(getattr(model, "config", None), "hidden_size", None),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("wrap: the model has no trainable parameters (inject adapters first)")
    if optimizer is None and "optimizer" not in config:
        raise DeepSpeedConfigError("wrap: the DeepSpeed config has no 'optimizer' section; pass optimizer=")
    if isinstance(optimizer, torch.optim.Optimizer):
        frozen = {id(p) for p in model.parameters() if not p.requires_grad}
        if any(id(p) in frozen for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("wrap: the optimizer holds frozen parameters; give it only the trainable ones")
    if zero_stage(config) == 3:
        for layer in model.lora_layers():  # used in LoraFALinear.forward, not in their own modules' forward
            register_external_parameter(layer, layer.lora_A.weight)
            register_external_parameter(layer, layer.lora_B.weight)
        freeze_for_zero3(model)
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=trainable, lr_scheduler=lr_scheduler, config=config,
    )
    refresh_corrections(model)  # A may have been cast (bf16) or broadcast from rank 0 when partitioned
    return engine, optimizer, lr_scheduler


def _lorafa_model(engine_or_model) -> LoraFAModel:
    return getattr(engine_or_model, "module", engine_or_model)


# -- export ----------------------------------------------------------------------------------------------
@torch.no_grad()
def adapter_state_dict(engine_or_model, frozen_only: bool = False, rank0_only: bool = False) -> dict:
    """Collective: {PEFT key: full fp32 CPU tensor} of the adapter, gathered one tensor at a time.

    A trained tensor comes from the optimizer's fp32 master copy when DeepSpeed keeps one (bf16/fp16
    training), so the export is what a single fp32 process would hold. With rank0_only, other ranks get {}.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    keep = not rank0_only or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state = {}
    for key, param in _lorafa_model(engine_or_model).adapter_state_dict().items():
        if frozen_only and param.requires_grad:
            continue
        owned = hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping")  # set by deepspeed.initialize
        master = safe_get_full_fp32_param(param) if param.requires_grad and owned else None
        if master is None:
            with gathered([param]):
                master = param.detach().float().clone() if keep else None
        if keep:
            state[key] = master.to("cpu", torch.float32)
    return state


def save_adapter(engine_or_model, directory) -> None:
    """Collective: write the adapter in PEFT format to `directory` once (rank 0)."""
    model = _lorafa_model(engine_or_model)
    state = adapter_state_dict(model, rank0_only=True)
    if state:
        model.save_pretrained(directory, state_dict=state)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# -- checkpoints -----------------------------------------------------------------------------------------
def save_checkpoint(engine, directory, tag: str = ENGINE_TAG, client_state: dict | None = None) -> None:
    """Collective: DeepSpeed checkpoint of the trained parameters, optimizer and scheduler (never the frozen
    base), plus the frozen A, which DeepSpeed does not restore, in <directory>/<tag>/frozen_adapter.safetensors.
    An existing <directory>/<tag> is never overwritten: every rank refuses before any rank writes."""
    target = Path(directory) / tag
    taken = torch.tensor([float(target.exists())], device=engine.device)
    torch.distributed.all_reduce(taken)  # every rank has looked before any rank writes
    if taken.item():
        raise FileExistsError(f"{target}: a checkpoint is already there; pick another tag or remove it")
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state or {}, save_latest=False,
                           exclude_frozen_parameters=True)
    frozen = adapter_state_dict(engine, frozen_only=True, rank0_only=True)
    if frozen:
        save_file(frozen, str(Path(directory) / tag / FROZEN_ADAPTER_NAME), metadata={"format": "pt"})
    torch.distributed.barrier()


@torch.no_grad()
def load_checkpoint(engine, directory, tag: str = ENGINE_TAG) -> dict:
    """Collective: restore what save_checkpoint wrote, frozen A included; return the client_state."""
    frozen_path = Path(directory) / tag / FROZEN_ADAPTER_NAME
    if not (Path(directory) / tag).is_dir():
        raise FileNotFoundError(f"{Path(directory) / tag}: no DeepSpeed checkpoint there")
    model = _lorafa_model(engine)
    frozen_keys = [k for k, p in model.adapter_state_dict().items() if not p.requires_grad]
    frozen = load_file(str(frozen_path)) if frozen_keys else {}
    if sorted(frozen) != sorted(frozen_keys):
        raise peft_format.AdapterFormatError(f"{frozen_path}: holds {len(frozen)} frozen adapter tensors, "
                                             f"the model has {len(frozen_keys)}")
    _, client_state = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False)
    params = model.adapter_state_dict()
    for key, tensor in frozen.items():
        with gathered([params[key]], modifier_rank=0):
            params[key].copy_(tensor)
    refresh_corrections(model)
    return client_state


# -- the training-loop strategy --------------------------------------------------------------------------
def _torch_dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return getattr(torch, names.get(str(value), str(value)))


class DeepSpeedStrategy(Strategy):
    """The training loop's Strategy on a DeepSpeed engine (ZeRO 0-3, offload as the config says).

    DeepSpeed's own accumulation is kept: engine.backward scales by 1/gradient_accumulation_steps, and
    engine.step must follow every backward (it only steps the optimizer at the boundary). So backward()
    calls engine.step() for all but the last micro-batch and step() makes the boundary call.
    """

    name = "deepspeed"

    def __init__(self, args):
        super().__init__(args.grad_accum, args.max_grad_norm)
        init_distributed()
        hidden_size = None
        model_path = getattr(args, "model", None)
        if model_path and zero_stage(read_ds_config(args.config)[0]) == 3:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=getattr(args, "trust_remote_code", False))
            hidden_size = getattr(hf_config, "hidden_size", None)
        self.ds_config = resolve_ds_config(
            args.config, world_size=world_size(), micro_batch_size=getattr(args, "micro_batch_size", None),
            grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm, hidden_size=hidden_size,
            dtype=_torch_dtype(getattr(args, "dtype", None)),
        )
        self.engine = None

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size()

    @property
    def device(self) -> torch.device:
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().device_name(self.local_rank))

    @contextmanager
    def model_init_context(self):
        with zero3_init_context(self.ds_config):
            yield

    def make_optimizer(self, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        offload = self.ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
        if offload in ("cpu", "nvme"):  # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
        return super().make_optimizer(params, lr, weight_decay)

    def setup(self, model, optimizer, scheduler):
        init_partitioned_adapters(model)
        self.engine, self.optimizer, self.scheduler = wrap(model, self.ds_config, optimizer=optimizer,
                                                           lr_scheduler=scheduler)
        self.model = model
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> float:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"step() called before {self.grad_accum} micro-batches went through backward()")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def skip_step(self) -> None:
        self.engine.optimizer.zero_grad(set_to_none=True)
        self.engine.micro_steps += 1  # the dropped window still counts, so the next one starts aligned

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.engine)

    def save_adapter(self, directory) -> None:
        save_adapter(self.engine, directory)

    def save_checkpoint(self, directory, client_state: dict) -> None:
        save_checkpoint(self.engine, directory)
        if self.is_main():
            write_client_state(directory, client_state)
        self.barrier()

    def load_checkpoint(self, directory) -> dict:
        load_checkpoint(self.engine, directory)
        return read_client_state(directory)
