"""How large, and how token-specific, A's row projections a_j . x_t are for each way of setting A.

    python bench/adaptation_projections.py --task increment2 --methods ours-k0 ours-k16-a80 ours-k16-a90

Under AdamW every coordinate of B steps by about the learning rate, so a row's projection size acts as its
learning rate (lorafa_scale/fast_adapter.py). For each method, built as bench/adaptation.py builds it (seed 0,
calibrated on the first 4 of a 16-step run's training batches), this prints per layer kind, averaged over the 30 layers
and A's rows, on the held-out prompts' tokens:
- rms: the RMS of a_j . x_t over tokens, over sqrt(mean D) (a random unit row's expected RMS; D the mean
  square of each input dimension), so 1 is a random row's size;
- p99.9: the 99.9th percentile of |a_j . x_t| over its RMS (how heavy the tail is);
- constant: |mean_t a_j . x_t| over the RMS (the share that is the same for every token, a bias).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict

import torch
from adaptation import build, task_data
from adaptation_screens import SCREENS
from smollm2 import smollm2_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafa_scale.layer import LoraFALinear


@torch.no_grad()
def projection_stats(model, batch) -> dict[str, tuple[float, float, float]]:
    """{layer kind: (rms, p99.9, constant)} as the module docstring defines them, on batch's real tokens."""
    live = batch["attention_mask"].reshape(-1).bool()
    per_kind = defaultdict(list)

    def record(name):
        def hook(layer, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[live]
            projected = x @ layer.lora_A.weight.T  # (tokens x r)
            rms = projected.pow(2).mean(0).sqrt()
            per_kind[name.rsplit(".", 1)[-1]].append(torch.stack([
                (rms / x.pow(2).mean().sqrt()).mean(),
                (projected.abs().quantile(0.999, dim=0) / rms).mean(),
                (projected.mean(0).abs() / rms).mean(),
            ]))
        return hook

    handles = [layer.register_forward_hook(record(name)) for name, layer in model.named_modules()
               if isinstance(layer, LoraFALinear)]
    model.eval()
    model(**batch)
    for handle in handles:
        handle.remove()
    return {kind: tuple(float(v) for v in torch.stack(values).mean(0)) for kind, values in sorted(per_kind.items())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="increment2")
    parser.add_argument("--methods", nargs="+", default=["ours-k0", "ours-k16-a80", "ours-k16-a90"])
    parser.add_argument("--screen", choices=SCREENS, default="none")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if any(not method.startswith("ours-") for method in args.methods):
        parser.error("--methods: ours-... only (PEFT's layers hold A in another form)")
    torch.set_num_threads(args.threads)
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base.config.use_cache = False
    batches, _, heldout_batch = task_data(args.task, 16, 0, tokenizer)  # as a 16-step bench run draws them
    print(f"{args.task}, seed 0, screen {args.screen}: per layer kind, rms / p99.9 / constant (module docstring)")
    for method in args.methods:
        model, _ = build(method, base, batches, 4, 0, args.screen)
        stats = projection_stats(model, heldout_batch)
        means = [statistics.mean(values) for values in zip(*stats.values(), strict=True)]
        print(f"{method:22s} " + "  ".join(f"{kind} {rms:.2f}/{tail:.1f}/{constant:.2f}"
                                            for kind, (rms, tail, constant) in stats.items())
              + f"  | all {means[0]:.2f}/{means[1]:.1f}/{means[2]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
