"""FSDP2 (torch.distributed.fsdp.fully_shard) for LoRA-FA models.

FSDP2 shards every parameter as a DTensor along dim 0 and allows frozen and trainable parameters in one
unit, so a frozen base, frozen A and trained B shard together: each decoder layer is one unit, the root
(embeddings, final norm, head) another.

Loading a big model without materializing it on any rank (run under torchrun):

    model = load_model("path/to/hf_model", LoraFAConfig(...), dtype=torch.bfloat16)

builds the model with its parameters on the meta device (buffers such as rotary frequencies stay real),
injects the adapters, creates A and B from one seed so every rank holds the same A, computes the r x r
gradient-correction buffer from that full A, shards, then loads the base weights: each rank reads only its
own rows of each tensor from the safetensors files.

Checkpoints (FSDPStrategy.save_checkpoint) are gathered, not sharded on disk: A and B in safetensors and
the optimizer state gathered to full tensors keyed by parameter name (torch.save of tensors only, read back
with weights_only=True), written by rank 0. They are small: A, B and two Adam moments of B.
torch.distributed.checkpoint would write per-rank shards but reads its metadata with pickle.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoConfig, AutoModelForCausalLM

from ..config import ConfigError, LoraFAConfig
from ..hf_checkpoint import safetensors_files
from ..layer import LoraFALinear, adapter_seed
from ..model import LoraFAModel, get_peft_model
from .strategy import Strategy

PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
INT8_REASON = "its scales are attributes of the weight tensor, which sharding drops"


def rank_device() -> torch.device:
    """This process's device: its GPU (LOCAL_RANK, set by torchrun) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> torch.device:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPU); return this rank's device."""
    if not dist.is_initialized() and "RANK" not in os.environ:
        raise ConfigError("fsdp: RANK is not set; start the processes with torchrun --nproc_per_node N "
                          "(or accelerate launch)")
    device = rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes its `_no_split_modules` names)."""
    hf_model = model.get_base_model() if isinstance(model, LoraFAModel) else model
    classes = set(getattr(hf_model, "_no_split_modules", None) or [])
    layers = [m for m in hf_model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ConfigError(f"fsdp: found no decoder layers in {type(hf_model).__name__} (_no_split_modules={classes})")
    return layers


@contextlib.contextmanager
def meta_build() -> Iterator[None]:
    """Build a model with its parameters on the meta device (buffers stay real), for `setup` to shard and load.

    transformers (5.25 on) kernelizes a model at the end of from_pretrained when the `kernels` package is
    installed, and kernelize rejects a model on meta: hub kernels are off while building (USE_HUB_KERNELS,
    restored on exit)."""
    previous = os.environ.get("USE_HUB_KERNELS")
    os.environ["USE_HUB_KERNELS"] = "NO"
    try:
        with init_empty_weights(include_buffers=False):
            yield
    finally:
        if previous is None:
            os.environ.pop("USE_HUB_KERNELS", None)
        else:
            os.environ["USE_HUB_KERNELS"] = previous


@torch.no_grad()
def init_adapters(model: LoraFAModel, seed: int, device: torch.device | str = "cpu") -> None:
    """(Re)create every adapter from `seed`: the same A on every rank, B = 0, the correction from the full A.

    Adapters injected into a meta-device model are uninitialised; they are materialized on `device` first.
    Call before sharding. Each A is drawn from (seed, its module name), as get_peft_model draws it after
    torch.manual_seed(seed): a single-process model built that way has the same A.
    """
    for name, layer in model.base_model.model.named_modules():
        if not isinstance(layer, LoraFALinear):
            continue
        if layer.lora_A.weight.is_meta:
            layer.lora_A.to_empty(device=device)
            layer.lora_B.to_empty(device=device)
            layer.b_grad_correction = torch.zeros(layer.r, layer.r, device=device)
        layer.reset_lora_parameters(model.config_lorafa.init_lora_weights, seed=adapter_seed(seed, name))


def shard_model(
    model: LoraFAModel,
    mixed_precision: str = "bf16",
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
) -> LoraFAModel:
    """fully_shard each decoder layer, then the root; return the model (changed in place).

    mixed_precision: "bf16"/"fp16" all-gather parameters in that dtype and reduce gradients in fp32;
    "fp32" keeps every parameter's own dtype (exact, for tests). Parameters are replaced by sharded ones:
    build the optimizer afterwards (FSDPStrategy.setup re-points an existing one).
    """
    if mixed_precision not in PARAM_DTYPES:
        raise ConfigError(f"fsdp: mixed_precision must be one of {list(PARAM_DTYPES)}, got {mixed_precision!r}")
    if any(p.is_meta for layer in model.lora_layers() for p in layer.lora_B.parameters()):
        raise ConfigError("fsdp: adapters are still on the meta device; call init_adapters(model, seed) first")
    if activation_checkpointing:
        # Hugging Face's own per-decoder-layer checkpointing keeps parameter names unchanged;
        # non-reentrant recomputation restores the RNG state, so adapter dropout masks repeat exactly.
        hf_model = model.get_base_model()
        enable = getattr(hf_model, "activation_checkpointing_enable", None)  # the name since transformers 5.x
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    param_dtype = PARAM_DTYPES[mixed_precision]
    if any(p.dtype == torch.int8 for p in model.parameters()):
        raise ConfigError(f"fsdp: the model has 8-bit bitsandbytes layers, which FSDP2 cannot shard ({INT8_REASON})")
    packed = {p.dtype for p in model.parameters() if hasattr(p, "quant_state")}  # bitsandbytes 4-bit weights
    if param_dtype is not None and packed - {param_dtype}:
        raise ConfigError(
            f"fsdp: 4-bit weights are packed in {sorted(map(str, packed))}; mixed_precision={mixed_precision!r} "
            f"would cast the packed bytes. Load with bnb_4bit_quant_storage={param_dtype} or use mixed_precision='fp32'"
        )
    options: dict[str, Any] = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    }
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def _checkpoint_keys(model: LoraFAModel) -> dict[str, list[str]]:
    """{key in the Hugging Face checkpoint: names of the model's base parameters it fills}.

    A tied parameter (e.g. lm_head.weight = embed_tokens.weight) is filled from either of its keys.
    """
    keys: dict[str, list[str]] = {}
    primary: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if ".lora_A." in name or ".lora_B." in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        key = key.replace(".original_module.", ".").replace(".modules_to_save.default.", ".")
        keys.setdefault(key, []).append(primary.setdefault(id(param), name))
    return keys


def _tied_parameters(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(module, name, owner, owner's name) for every parameter also registered on an earlier module."""
    owners: dict[int, tuple[nn.Module, str]] = {}
    tied = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in owners:
                tied.append((module, name, *owners[id(param)]))
            else:
                owners[id(param)] = (module, name)
    return tied


def _local_rows(weight_slice, param: DTensor) -> DTensor:
    """This rank's rows of a checkpoint tensor, read from disk alone, as the DTensor shard FSDP2 expects.

    FSDP2 splits dim 0 as torch.chunk does: ceil(rows / ranks) rows per rank, the last ranks may get fewer.
    """
    if param.placements != (Shard(0),):
        raise ConfigError(f"fsdp: expected parameters sharded on dim 0, got {param.placements}")
    mesh = param.device_mesh
    chunk = -(-param.shape[0] // mesh.size())
    start = min(param.shape[0], mesh.get_local_rank() * chunk)
    # A copy: the slice is a view of the memory-mapped file, which must not back a parameter.
    local = weight_slice[start : start + chunk].to(device=rank_device(), dtype=param.dtype, copy=True)
    return DTensor.from_local(local, mesh, param.placements, shape=param.shape, stride=param.stride())


def load_base_weights(model: LoraFAModel, directory) -> None:
    """Fill a sharded model's meta-device base weights from a Hugging Face safetensors checkpoint.

    Each rank reads only its own rows of each tensor (safetensors reads slices without loading the rest),
    so no rank ever holds a whole tensor and nothing is sent between ranks. Every rank must see the files.
    """
    directory = Path(directory)
    targets = _checkpoint_keys(model)
    params = dict(model.named_parameters())
    tied = _tied_parameters(model)
    loaded: dict[str, DTensor] = {}
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                for name in targets.get(key, []):
                    loaded[name] = _local_rows(f.get_slice(key), params[name])
    model.load_state_dict(loaded, strict=False, assign=True)
    for module, name, owner, owner_name in tied:  # assign replaced the owner's parameter
        setattr(module, name, getattr(owner, owner_name))
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ConfigError(f"{directory}: no weight for {missing[0]} in its safetensors files ({len(missing)} missing)")


def load_model(
    path,
    lora_config: LoraFAConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    quantization: str = "none",
    seed: int = 0,
    trust_remote_code: bool = False,
    **shard_options,
) -> LoraFAModel:
    """Collective: a sharded LoRA-FA causal LM from a local Hugging Face checkpoint.

    Unquantized, no rank ever holds the whole model (meta build, weights streamed from rank 0). With
    quantization "nf4"/"fp4" each rank loads the 4-bit model (bitsandbytes quantizes while loading, which
    needs real tensors), packed in `dtype`, then it is sharded. shard_options go to shard_model
    (mixed_precision, cpu_offload, activation_checkpointing).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'}: not found (expected a Hugging Face model directory)")
    safetensors_files(path)  # a missing checkpoint fails here, before any work
    if quantization == "int8":
        raise ConfigError(f"fsdp: quantization='int8' cannot be sharded by FSDP2 ({INT8_REASON}); use nf4 or fp4")
    device = init_distributed()
    if quantization != "none":
        from ..quantization import load_model as load_quantized

        model = load_quantized(path, quantization, dtype, lora_config, trust_remote_code=trust_remote_code)
    else:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with meta_build():
            hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        hf_model.tie_weights()  # init_empty_weights re-creates each parameter, which unties them
        model = get_peft_model(hf_model, lora_config)
    if lora_config.base_model_name_or_path is None:
        lora_config.base_model_name_or_path = str(path)
    init_adapters(model, seed, device)
    shard_model(model, **shard_options)
    if quantization == "none":
        load_base_weights(model, path)
    return model


# -- gathering and saving -----------------------------------------------------------------------------
def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Collective for a DTensor: the whole tensor on CPU."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").clone()


def gather_adapter_state_dict(model: LoraFAModel) -> dict[str, torch.Tensor]:
    """Collective: {PEFT key: full CPU tensor} of the adapter, on every rank."""
    return {key: full_tensor(value) for key, value in model.adapter_state_dict().items()}


def save_adapter(model: LoraFAModel, directory) -> None:
    """Collective: gather the adapter and write it once (rank 0), in PEFT format."""
    state = gather_adapter_state_dict(model)
    if dist.get_rank() == 0:
        model.save_pretrained(directory, state_dict=state)
    dist.barrier()


class FSDPStrategy(Strategy):
    """Data-parallel training of a model sharded by shard_model (one process per device, torchrun).

    The training loop builds the model inside model_init_context(), where parameters stay on the meta
    device; setup() then creates the adapters from args.seed, shards, and streams the base weights from
    args.model. A model built outside it (e.g. quantized, loaded on every rank) is sharded as it is.
    Mixed precision follows args.dtype: bfloat16/float16 all-gather in that dtype and reduce in fp32.
    """

    name = "fsdp"

    def __init__(self, args):
        super().__init__(args.grad_accum, args.max_grad_norm)
        if getattr(args, "quantization", "none") == "none" and not Path(args.model).is_dir():
            raise ConfigError(f"--model {args.model}: --fsdp reads the base weights from a local directory; "
                              f"download it first (huggingface-cli download {args.model} --local-dir DIR)")
        self.args = args
        self.mixed_precision = {"bfloat16": "bf16", "float16": "fp16"}.get(args.dtype, "fp32")
        self._device = init_distributed()

    @property
    def device(self) -> torch.device:
        return self._device

    def model_init_context(self):
        return meta_build()

    def setup(self, model: LoraFAModel, optimizer: torch.optim.Optimizer, scheduler: Any) -> nn.Module:
        """Shard the model (loading it if built on meta) and point the still stateless optimizer at the
        sharded parameters, which replace the original ones."""
        names = {id(p): name for name, p in model.named_parameters()}
        on_meta = any(p.is_meta for p in model.parameters())
        if on_meta:
            init_adapters(model, self.args.seed, self.device)
            model.get_base_model().tie_weights()  # init_empty_weights re-creates each parameter, untying them
        if not isinstance(model, FSDPModule):
            shard_model(model, self.mixed_precision)
        if on_meta:
            load_base_weights(model, self.args.model)
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        return super().setup(model, optimizer, scheduler)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return gather_adapter_state_dict(self.model)

    def save_adapter(self, directory) -> None:
        save_adapter(self.model, directory)

    def optimizer_state_dict(self) -> dict:
        return get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_optimizer_state_dict(self, path: Path) -> None:
        state = torch.load(path, weights_only=True) if self.is_main() else {}
        set_optimizer_state_dict(
            self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
