"""Benchmark 2: training step time on CPU, ours vs PEFT LoRA vs PEFT LoRA-FA, alternating in one process.

Each round times one full step (forward, backward, optimizer step) of every variant, in a rotating order so
that no variant always runs first or after the same neighbour. Two clocks: wall time, and this process's CPU
time (all its threads), which other processes sharing the cores disturb far less. Reports each variant's
median and range and the per-round ratios ours / PEFT LoRA. --profile prints the operators that take the time in one step each.

    python bench/bench_step_time.py --rounds 8
"""

from __future__ import annotations

import argparse
import statistics

import matplotlib
import torch
from common import (
    LABELS,
    RESULTS,
    VARIANTS,
    adapted,
    base_model,
    batch,
    save_result,
    timed_rounds,
    timing_summary,
    train_step,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def profile(models, ids) -> None:
    for variant, (model, optimizer) in models.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            train_step(model, optimizer, ids)
        print(f"--- {LABELS[variant]}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads; 1 makes CPU time free of OpenMP spin-waits")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = batch()
    models = {variant: adapted(variant, base_model()) for variant in VARIANTS}
    for model, optimizer in models.values():  # warm-up: allocator, thread pools, lazy inits
        train_step(model, optimizer, ids)
    if args.profile:
        profile(models, ids)
        return
    timed = timed_rounds(models, ids, args.rounds)
    summary, ratios = {}, {}
    for clock, measured in timed.items():
        summary[clock] = timing_summary(measured)
        ratios[clock] = [ours / lora for ours, lora in zip(measured["ours"], measured["peft_lora"], strict=True)]
        for variant, row in summary[clock].items():
            print(f"{clock:<5}{LABELS[variant]:<28} median {row['median_s']:.2f}s  range {row['min_s']:.2f}-"
                  f"{row['max_s']:.2f}s")
        print(f"{clock:<5}ours / PEFT LoRA per round: median {statistics.median(ratios[clock]):.3f}, range "
              f"{min(ratios[clock]):.3f}-{max(ratios[clock]):.3f} (target <= 1.0)")
    name = f"step_time_{args.threads}thread" if args.threads else "step_time"
    path = save_result(name, {"rounds": args.rounds, "variants": summary, "ratio_ours_over_peft_lora": ratios})
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for axis, (clock, measured) in zip(axes, (("wall", timed["wall"]), ("process CPU", timed["cpu"])), strict=True):
        for variant in VARIANTS:
            axis.plot(range(1, args.rounds + 1), measured[variant], marker="o", label=LABELS[variant])
        axis.set(xlabel="round", ylabel=f"training step, {clock} time (s)")
    axes[0].legend()
    figure.suptitle("CPU step time, bench geometry (alternating)")
    figure.tight_layout()
    plt.savefig(RESULTS / f"{name}.png", dpi=100)
    print(f"wrote {path} and {RESULTS / f'{name}.png'}")


if __name__ == "__main__":
    main()
