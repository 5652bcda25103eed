"""Benchmark 3: peak resident memory of a whole training run, ours vs PEFT LoRA vs PEFT LoRA-FA.

Each variant runs in its own fresh process (this script with --variant), which trains for --steps steps
on the bench geometry and reports its own peak RSS (getrusage ru_maxrss). The processes run one after the
other; the peak includes Python, torch and the model (about 440 MB of float32 weights), the same for all.

    python bench/bench_peak_rss.py --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import LABELS, VARIANTS, adapted, base_model, batch, save_result, train_step

MiB = 2**20


def run_one(variant: str, steps: int) -> dict:
    ids = batch()
    model, optimizer = adapted(variant, base_model())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    start = time.perf_counter()
    losses = [train_step(model, optimizer, ids) for _ in range(steps)]
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_rss_before_training_bytes": before, "seconds": time.perf_counter() - start, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help="(internal) run one variant and print JSON")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_one(args.variant, args.steps)))
        return
    rows = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        row = rows[variant]
        print(f"{LABELS[variant]:<28} peak RSS {row['peak_rss_bytes'] / MiB:7.0f} MiB"
              f"  (before training {row['peak_rss_before_training_bytes'] / MiB:5.0f} MiB,"
              f" training adds {(row['peak_rss_bytes'] - row['peak_rss_before_training_bytes']) / MiB:5.0f})",
              flush=True)
    ratio = rows["peft_lora"]["peak_rss_bytes"] / rows["ours"]["peak_rss_bytes"]
    print(f"PEFT LoRA / ours peak RSS: {ratio:.2f}x")
    print(f"wrote {save_result('peak_rss', {'steps': args.steps, 'variants': rows, 'ratio_peft_lora_over_ours': ratio})}")


if __name__ == "__main__":
    main()
