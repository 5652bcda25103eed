"""QLoRA memory: lorafa-scale's loader + LoRA-FA against PEFT's prepare_model_for_kbit_training + LoRA.

Builds a Llama geometry from a config (no download), saves it, loads it quantized in bf16 four ways and
prints a markdown table of parameter bytes and the bytes autograd keeps for backward on one micro-batch
(activation checkpointing off everywhere, so the numbers compare the layers themselves).

    python bench/quantized_memory.py --quantization nf4 --seq-len 512
"""

from __future__ import annotations

import argparse
import tempfile

import peft
import torch

from lorafa_scale import LoraConfig
from lorafa_scale.jobs.planner import measure_kept_bytes
from lorafa_scale.quantization import load_model
from tests.tiny_models import save_tiny_llama

GEOMETRY = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
ADAPTER = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())


def variants(path, quantization):
    def base(peft_prepare):
        model = load_model(path, quantization, torch.bfloat16)
        return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False) if peft_prepare else model

    yield "lorafa-scale load_model + LoRA-FA", load_model(path, quantization, torch.bfloat16, LoraConfig(**ADAPTER))
    yield "PEFT prepare_model_for_kbit_training + LoRA-FA", peft_model_of(base(True), lorafa=True)
    yield "lorafa-scale load_model + PEFT LoRA", peft_model_of(base(False), lorafa=False)
    yield "PEFT prepare_model_for_kbit_training + PEFT LoRA (QLoRA recipe)", peft_model_of(base(True), lorafa=False)


def peft_model_of(model, lorafa: bool):
    if lorafa:
        from lorafa_scale import get_peft_model

        return get_peft_model(model, LoraConfig(**ADAPTER))
    return peft.get_peft_model(model, peft.LoraConfig(**ADAPTER))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "int8"])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    ids = torch.randint(0, GEOMETRY["vocab_size"], (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    print(f"Llama {GEOMETRY}, {args.quantization} in bf16, adapter {ADAPTER}, batch {args.batch} x {args.seq_len}\n")
    print("| setup | parameter MiB | kept for backward MiB |\n|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_llama(tmp, **GEOMETRY)
        for name, model in variants(path, args.quantization):
            model.train()
            kept = measure_kept_bytes(lambda m=model: m(input_ids=ids, labels=ids).loss, model)
            print(f"| {name} | {parameter_bytes(model) / 2**20:.1f} | {kept / 2**20:.1f} |", flush=True)
            del model


if __name__ == "__main__":
    main()
