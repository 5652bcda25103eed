"""Benchmark 2b: forward + backward time of one adapted linear layer, ours vs PEFT LoRA vs PEFT LoRA-FA.

The model-level step (bench_step_time.py) is dominated by the frozen base's matmuls, so the adapters'
own cost drowns in noise on a shared machine. Here one 1024 -> 2816 linear (the bench geometry's gate_proj)
with r 16, dropout 0.05, 1024 tokens, float32, runs many times in alternation; process CPU time on one
thread, the median of --repeats blocks of --inner calls each, is reported per variant. It also times the two ways of
drawing a dropout mask for this layer's input: bernoulli_(1 - p) and uniform >= p (what layer.py uses).

    python bench/bench_layer_time.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import peft
import torch
from common import ALPHA, DROPOUT, LABELS, SEQ_LEN, VARIANTS, R, save_result
from torch import nn

from lorafa_scale.backends import find_backend
from lorafa_scale.layer import LoraFALinear

IN, OUT = 1024, 2816


def layer(variant: str) -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(IN, OUT, bias=False)).requires_grad_(False)
    if variant == "ours":
        return LoraFALinear(module[0], find_backend(module[0]), R, ALPHA, DROPOUT).train()
    model = peft.get_peft_model(module, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                        target_modules=["0"]))
    if variant == "peft_lorafa":
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(1, SEQ_LEN, IN, requires_grad=True)
    grad = torch.randn(1, SEQ_LEN, OUT)
    layers = {variant: layer(variant) for variant in VARIANTS}

    def run(module):
        module(x).backward(grad)

    times = {variant: [] for variant in VARIANTS}
    for module in layers.values():
        run(module)
    for repeat in range(args.repeats):
        for variant in VARIANTS[repeat % 3:] + VARIANTS[:repeat % 3]:
            start = time.process_time()
            for _ in range(args.inner):
                run(layers[variant])
            times[variant].append((time.process_time() - start) / args.inner)
    base = torch.nn.Linear(IN, OUT, bias=False).requires_grad_(False)
    start = time.process_time()
    for _ in range(args.inner):
        base(x).backward(grad)
    base_ms = 1000 * (time.process_time() - start) / args.inner
    generator = torch.Generator().manual_seed(0)
    mask_ms = {}
    for name, draw in (("bernoulli_", lambda: torch.empty(x.shape).bernoulli_(1 - DROPOUT, generator=generator)),
                       ("uniform >= p", lambda: torch.rand(x.shape, generator=generator).ge_(DROPOUT))):
        start = time.process_time()
        for _ in range(args.inner):
            draw()
        mask_ms[name] = 1000 * (time.process_time() - start) / args.inner
        print(f"dropout mask, {x.numel() / 1e6:.2f}M values, {name:<13} {mask_ms[name]:6.2f} ms")
    summary = {v: {"median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t), "max_ms": 1000 * max(t)}
               for v, t in times.items()}
    print(f"frozen base linear alone: {base_ms:.1f} ms")
    for variant, row in summary.items():
        print(f"{LABELS[variant]:<28} median {row['median_ms']:6.1f} ms  range {row['min_ms']:.1f}-{row['max_ms']:.1f}"
              f"  adapter cost {row['median_ms'] - base_ms:6.1f} ms")
    ratio = summary["ours"]["median_ms"] / summary["peft_lora"]["median_ms"]
    print(f"ours / PEFT LoRA: {ratio:.3f}")
    print(f"wrote {save_result('layer_time', {'base_ms': base_ms, 'mask_ms': mask_ms, 'variants': summary, 'ratio': ratio})}")


if __name__ == "__main__":
    main()
