"""QLoRA-style training: a Hugging Face model loaded in 4 or 8 bits with bitsandbytes, plus LoRA-FA.

    model = load_model("path/to/llama", "nf4", torch.bfloat16, LoraConfig(r=16, target_modules="all-linear"))

What is upcast. PEFT's prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not 4-bit
(embeddings, norms, the output head; int8 weights are left alone) to fp32. They are frozen, so that buys
nothing for the optimizer, costs 2 extra bytes per value, and makes the logits and normed hidden states fp32
(bench/quantized_memory.py: +83% parameter bytes, +36% bytes kept for backward on a small Llama with LoRA-FA
on all linear layers). `prepare_for_training` keeps every frozen
parameter in the dtype it was loaded in and upcasts only what is trained: the adapters are created in fp32
by LoraFALinear, and fully trained copies (modules_to_save) get fp32 weights after injection.

Merging. A merged 4-bit model is rarely what anyone wants: re-quantizing W + s B A rounds it to the 4-bit
grid, whose step is far larger than a trained delta, so most of the adapter is lost (`merge_and_unload`
reports how much, per layer). merge.export_merged instead writes a full-precision merged checkpoint from the
base model's safetensors shards, one shard in memory at a time, so a 70B merge needs one shard's RAM.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .backends import find_backend
from .config import ConfigError, LoraFAConfig
from .model import LoraFAModel, ModulesToSave, get_peft_model

QUANTIZATION_CHOICES = ("none", "int8", "nf4", "fp4")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def bnb_config(quantization: str, dtype: torch.dtype | str = torch.bfloat16, double_quant: bool = True,
               quant_storage: torch.dtype | str | None = None):
    """The transformers BitsAndBytesConfig for `quantization` (None for "none").

    dtype is the 4-bit compute dtype. quant_storage is the dtype 4-bit values are packed into (the bytes are
    the same whatever it is); it defaults to dtype, the model dtype, because ZeRO-3 and FSDP shard and
    gather the packed weights only when they have the same dtype as the other parameters.
    """
    from transformers import BitsAndBytesConfig

    if quantization not in QUANTIZATION_CHOICES:
        raise ConfigError(f"quantization must be one of {QUANTIZATION_CHOICES}, got {quantization!r}")
    if quantization == "none":
        return None
    if quantization == "int8":
        if quant_storage is not None:
            raise ConfigError("quant_storage applies to 4-bit quantization (nf4, fp4), not int8")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=resolve_dtype(dtype),
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_storage=resolve_dtype(quant_storage if quant_storage is not None else dtype),
    )


def default_device_map():
    """Each process loads onto its own GPU (LOCAL_RANK), or the CPU when there is none."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "cpu"


def prepare_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze the whole base model, upcast nothing (see the module docstring), keep 4-bit CPU layers trainable.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit for a bf16 inference kernel at its first
    forward in eval mode without grad (an evaluation pass), and that kernel has no backward: training
    after it gets silently wrong gradients. The bitsandbytes backend's `prepare` turns the repack off
    (get_peft_model also calls it, for models users quantize themselves).
    """
    model.requires_grad_(False)
    for module in model.modules():
        backend = find_backend(module)
        if backend is not None:
            backend.prepare(module)
    return model


def upcast_trainable_(model: torch.nn.Module) -> torch.nn.Module:
    """Give every fully trained copy (modules_to_save) fp32 weights, computing in fp32 inside it.

    AdamW steps on bf16 weights lose updates smaller than bf16's resolution, so the copies keep fp32
    master weights; their float inputs are cast to fp32 and their outputs back to the frozen original's
    dtype, so the rest of the model keeps running in its own dtype. The adapters are fp32 already
    (LoraFALinear); trainable biases (bias="all" / "lora_only") stay in their layer's dtype.
    """
    for wrapper in model.modules():
        if not isinstance(wrapper, ModulesToSave):
            continue
        copy = wrapper.modules_to_save["default"]
        if all(p.dtype == torch.float32 for p in copy.parameters() if p.is_floating_point()):
            continue  # an fp32 model, or upcast before
        dtype = next(p.dtype for p in wrapper.original_module.parameters() if p.is_floating_point())
        copy.float()
        copy.register_forward_pre_hook(
            lambda _, args: tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        )
        copy.register_forward_hook(
            lambda _, args, out, dtype=dtype: out.to(dtype) if torch.is_tensor(out) and out.is_floating_point() else out
        )
    return model


def load_model(path, quantization: str = "nf4", dtype: torch.dtype | str = torch.bfloat16,
               lora_config: LoraFAConfig | None = None, *, double_quant: bool = True,
               quant_storage: torch.dtype | str | None = None, device_map=None,
               trust_remote_code: bool = False) -> torch.nn.Module:
    """Load a causal LM from `path` quantized as asked, frozen, with LoRA-FA injected if lora_config is given.

    Returns a LoraFAModel (PEFT layout) when lora_config is given, else the prepared Hugging Face model.
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(dtype)
    quantization_config = bnb_config(quantization, dtype, double_quant, quant_storage)  # checks before loading
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise ConfigError(f"{local / 'config.json'}: not found; path must be a Hugging Face model directory")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=quantization_config,
        device_map=device_map if device_map is not None else default_device_map(),
        trust_remote_code=trust_remote_code,
    )
    prepare_for_training(model)
    if lora_config is None:
        return model
    return upcast_trainable_(get_peft_model(model, lora_config))


# -- merging ----------------------------------------------------------------------------------------


@torch.no_grad()
def merge_and_unload(peft_model: LoraFAModel) -> tuple[torch.nn.Module, dict[str, float]]:
    """Merge every adapter into its (quantized) base layer; return the model and each layer's rounding error.

    The error of a layer is |W'_merged - (W + s B A)| / |s B A| (Frobenius norms, W and W' dequantized):
    0 means the whole update survived re-quantization, 1 means as much error as the update itself.
    """
    errors = {}
    for name, module in peft_model.base_model.model.named_modules():
        dequantize = getattr(getattr(module, "backend", None), "dequantized_weight", None)
        if dequantize is None or module.merged:
            continue
        before = dequantize(module.base_layer).double()
        delta = module.delta_weight().double()
        module.merge()
        after = dequantize(module.base_layer).double()
        errors[name] = float((after - before - delta).norm() / delta.norm().clamp_min(1e-30))
    return peft_model.merge_and_unload(), errors
