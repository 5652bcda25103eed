"""A short demo: LoRA-FA on a tiny Llama built from a config (no download), trained for a few steps."""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from . import LoraFAConfig, get_lorafa_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorafa-scale demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", default="runs/demo-adapter")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    model = get_lorafa_model(LlamaForCausalLM(config), LoraFAConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, config.vocab_size, (4, 64))
    for step in range(1, args.steps + 1):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    model.save_pretrained(args.output_dir)
    print(f"adapter saved to {args.output_dir} (PEFT format)")
    return 0
