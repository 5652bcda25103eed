"""The path not taken for issue 15: our LoRA-FA layer living inside PEFT's own PeftModel.

A custom module (PEFT's `LoraConfig._register_custom_module`, experimental) maps nn.Linear to a subclass of
PEFT's lora.Linear whose LoRA variant (a private PEFT API) calls LoraFAFunction. Prints what autograd keeps
for backward (parameters and buffers excluded) next to ours and PEFT's LoRA, and whether A stays frozen
through the calls PEFT and transformers' Trainer make. Run: python bench/peft_inside_prototype.py
"""

from __future__ import annotations

import tempfile

import peft
import torch
from peft.tuners.lora import layer as peft_lora
from torch import nn

from lorafa_scale import LoraConfig, get_peft_model
from lorafa_scale.layer import LoraFAFunction, orthonormal_rows_


class LoraFAVariant(peft_lora.LoraVariant):
    @staticmethod
    def init(module, adapter_name, **_kwargs):
        a = module.lora_A[adapter_name].weight
        orthonormal_rows_(a)
        a.requires_grad_(False)
        r, s = module.r[adapter_name], module.scaling[adapter_name]
        module.register_buffer("fa_correction", torch.eye(r) / s**2, persistent=False)

    @staticmethod
    def forward(module, active_adapter, x, result, **_kwargs):
        p = module.lora_dropout[active_adapter].p if module.training else 0.0
        seed = int(torch.randint(0, 2**62, (1,))) if p > 0 else 0
        return result + LoraFAFunction.apply(
            x, module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight, module.fa_correction,
            module.scaling[active_adapter], p, seed,
        )


class LoraFAInPeftLinear(peft_lora.Linear):
    def resolve_lora_variant(self, **_kwargs):
        return LoraFAVariant()


def kib_kept_for_backward(model, x) -> int:
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(kept.values()) // 1024


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512))


def main() -> None:
    x = torch.randn(512, 256)
    fields = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["0"])
    inside = peft.LoraConfig(**fields)
    inside._register_custom_module({nn.Linear: LoraFAInPeftLinear})
    models = {
        "LoRA-FA inside PEFT (custom module + variant)": peft.get_peft_model(base(), inside),
        "lorafa-scale": get_peft_model(base(), LoraConfig(**fields)),
        "PEFT LoRA": peft.get_peft_model(base(), peft.LoraConfig(**fields)),
    }
    for name, model in models.items():
        print(f"{name}: {kib_kept_for_backward(model.train(), x)} KiB kept for backward")
    model = models["LoRA-FA inside PEFT (custom module + variant)"]
    lora_a = model.base_model.model[0].lora_A.default.weight
    print("inside PEFT, parameter names:", [n for n, _ in model.named_parameters() if "lora" in n])
    print("inside PEFT, A trainable after get_peft_model:", lora_a.requires_grad)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        lora_a.requires_grad_(False)
        model.load_adapter(directory, "default", is_trainable=True)  # how Trainer resumes a checkpoint
        print("inside PEFT, A trainable after load_adapter(is_trainable=True):", lora_a.requires_grad)
    lora_a.requires_grad_(False)
    model.set_adapter("default")
    print("inside PEFT, A trainable after set_adapter('default'):", lora_a.requires_grad)


if __name__ == "__main__":
    main()
