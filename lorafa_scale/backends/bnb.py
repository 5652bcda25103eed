"""Backends for bitsandbytes layers: Linear4bit (nf4 / fp4, any quant_storage) and Linear8bitLt (LLM.int8).

The adapter never looks inside these layers for training: LoraFALinear calls the quantized layer and adds
its own term. Only merging needs the weight itself, so these backends add two things to the float ones:
`dequantized_weight` and an `add_to_weight` that dequantizes, adds and re-quantizes with the layer's own
settings. Re-quantizing rounds the sum to the 4-bit / 8-bit grid, which can erase most of a small delta;
quantization.merge_and_unload measures that error, quantization.export_merged avoids it.

bitsandbytes is never imported here at module level: a model holds a bitsandbytes layer only if
bitsandbytes was already imported, so `matches` looks it up in sys.modules and the package imports fast.
"""

from __future__ import annotations

import sys

import torch

from .torch_linear import Backend


def _bnb():
    return sys.modules.get("bitsandbytes")


class Linear4bitBackend(Backend):
    name = "bnb_4bit"

    def matches(self, module: torch.nn.Module) -> bool:
        bnb = _bnb()
        return bnb is not None and isinstance(module, bnb.nn.Linear4bit)

    def prepare(self, module: torch.nn.Module) -> None:
        # On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit for an inference kernel at its first
        # eval forward without grad, and that kernel has no backward: gradients through the layer (adapted
        # or not) would be silently wrong after an evaluation pass. Keep the training kernel.
        module.support_avx512bf16_for_cpu = False

    def dequantized_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """The (out x in) weight the layer computes with, in the quantization's float dtype."""
        import bitsandbytes.functional as bnbf

        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks CPU weights for its AVX512-BF16 inference kernel on the first eval
            # forward; undo it as bitsandbytes itself does before saving.
            weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)

    @torch.no_grad()
    def add_to_weight(self, module: torch.nn.Module, delta: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        merged = self.dequantized_weight(module)
        merged = (merged.float() + delta.float()).to(merged.dtype)
        module.weight = bnb.nn.Params4bit(
            merged.to("cpu"), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type,
            quant_storage=old.quant_storage, module=module,
        ).to(old.device)  # quantizes on the move, and sets module.quant_state


class Linear8bitBackend(Backend):
    name = "bnb_8bit"

    def matches(self, module: torch.nn.Module) -> bool:
        bnb = _bnb()
        return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)

    def dequantized_weight(self, module: torch.nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        # Before the first forward the row scales live on the weight, after it on the layer's state.
        scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return bnbf.int8_vectorwise_dequant(module.weight.data, scales)

    @torch.no_grad()
    def add_to_weight(self, module: torch.nn.Module, delta: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        merged = self.dequantized_weight(module) + delta.float()
        module.weight = bnb.nn.Int8Params(
            merged.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        ).to(old.device)
        module.state.reset_grads()
        module.state.CB = module.state.SCB = None  # the next forward takes the new ones from the weight


def stored_numel(param: torch.Tensor) -> int:
    """How many weights a parameter stands for: its full size when ZeRO-3 has partitioned it (ds_numel), and
    for a Params4bit two 4-bit values per byte of storage.

    Matches PEFT's count (numel x 2 x bytes per storage element), so print_trainable_parameters agrees.
    """
    numel = getattr(param, "ds_numel", param.numel())
    if type(param).__name__ == "Params4bit":
        return numel * 2 * param.element_size()
    return numel


LINEAR_4BIT = Linear4bitBackend()
LINEAR_8BIT = Linear8bitBackend()
