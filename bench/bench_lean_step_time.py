"""Benchmark (issue 13): training step time with lean mode, beside ours without it and PEFT LoRA, on CPU.

Bench geometry (bench/common.py). Each round times one full step (forward, backward, AdamW step) of every
variant in a rotating order, in one process; reports wall and process CPU time (use --threads 1 for CPU
time free of OpenMP spin-waits, as BENCHMARKS.md does) and the per-round ratio ours-lean / PEFT LoRA.

    python bench/bench_lean_step_time.py --rounds 5 --threads 1        # bench/results/lean_step_time_1thread.json
    python bench/bench_lean_step_time.py --rounds 3 --threads 1 --checkpointing
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_lean_memory import LABELS, VARIANTS, build
from common import LR, base_model, batch, save_result, timed_rounds, timing_summary, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads; 1 makes CPU time free of OpenMP spin-waits")
    parser.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = batch()
    models = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = build(variant, base_model(), args.checkpointing)
        models[variant] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR))
    for model, optimizer in models.values():  # warm-up
        train_step(model, optimizer, ids)
    timed = timed_rounds(models, ids, args.rounds)
    summary, ratios = {}, {}
    for clock, measured in timed.items():
        summary[clock] = timing_summary(measured)
        ratios[clock] = {
            other: [a / b for a, b in zip(measured["ours_lean"], measured[other], strict=True)]
            for other in ("peft_lora", "ours")
        }
        for variant, row in summary[clock].items():
            print(f"{clock:<5}{LABELS[variant]:<20} median {row['median_s']:.2f}s  range {row['min_s']:.2f}-"
                  f"{row['max_s']:.2f}s")
        for other, values in ratios[clock].items():
            print(f"{clock:<5}ours-lean / {LABELS[other]} per round: median {statistics.median(values):.3f}, "
                  f"range {min(values):.3f}-{max(values):.3f}")
    name = "lean_step_time" + ("_checkpointing" if args.checkpointing else "") + (
        f"_{args.threads}thread" if args.threads else "")
    path = save_result(name, {"rounds": args.rounds, "checkpointing": args.checkpointing, "variants": summary,
                              "ratio_ours_lean_over": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
