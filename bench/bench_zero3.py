"""Benchmark 4 (ZeRO-3): 2-rank DeepSpeed ZeRO-3 on CPU (gloo), ours vs PEFT LoRA: peak RSS and step time.

One torchrun launch per variant (2 processes, DS_ACCELERATOR=cpu) on the bench model saved to a temporary
folder, both with ds_configs/zero3.json (memory_efficient_linear off, float32). Ours: lorafa_scale.
lorafa_scale.engines.deepspeed.load_model + wrap. PEFT: transformers under HfDeepSpeedConfig (zero.Init), peft.get_peft_model,
deepspeed.initialize, as PEFT's DeepSpeed guide does. Each rank reports its peak RSS and per-step times.

    python bench/bench_zero3.py --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import deepspeed
import peft
import torch
from common import ALPHA, DROPOUT, LR, R, base_model, batch, save_result
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from lorafa_scale import LoraFAConfig
from lorafa_scale.engines import deepspeed as deepspeed_engine
from lorafa_scale.engines.deepspeed_config import resolve_ds_config
from lorafa_scale.jobs.planner import ALL_TARGETS

DS_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "zero3.json"
VARIANTS = ("ours", "peft_lora")
MiB = 2**20


def build(variant: str, model_dir: str):
    def adamw(params):
        return torch.optim.AdamW(params, lr=LR)

    if variant == "ours":
        config = LoraFAConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(ALL_TARGETS))
        model, ds_config = deepspeed_engine.load_model(model_dir, config, DS_CONFIG, dtype=torch.float32,
                                                       micro_batch_size=1, grad_accum=1, max_grad_norm=1.0)
        engine, _, _ = deepspeed_engine.wrap(model, ds_config, optimizer=adamw)
        return engine
    deepspeed_engine.init_distributed()
    ds_config = resolve_ds_config(DS_CONFIG, world_size=2, micro_batch_size=1, grad_accum=1, max_grad_norm=1.0,
                                  hidden_size=1024, dtype=torch.float32)
    keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained build under zero.Init
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                       target_modules=list(ALL_TARGETS)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=adamw(trainable), model_parameters=trainable,
                                      config=ds_config)
    engine.keep_alive = keep_alive
    return engine


def worker(variant: str, model_dir: str, steps: int, out: str) -> None:
    engine = build(variant, model_dir)
    ids = batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    wall, cpu = [], []
    for _ in range(steps + 1):  # the first step warms up
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    mine = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_rss_before_training_bytes": before, "wall_s": wall[1:], "cpu_s": cpu[1:]}
    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, mine)
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(ranks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", choices=VARIANTS, help="(internal) one rank of one variant")
    parser.add_argument("--model-dir")
    parser.add_argument("--out")
    args, _ = parser.parse_known_args()  # the deepspeed launcher may append --local_rank
    if args.worker:
        worker(args.worker, args.model_dir, args.steps, args.out)
        return
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        base_model().save_pretrained(directory)
        for variant in VARIANTS:
            out = Path(directory) / f"{variant}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       __file__, "--worker", variant, "--model-dir", directory, "--steps", str(args.steps),
                       "--out", str(out)]
            subprocess.run(command, env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=3600, check=True,
                           stdout=subprocess.DEVNULL)
            rows[variant] = json.loads(out.read_text())
            for rank, row in enumerate(rows[variant]):
                print(f"{variant:<10} rank {rank}: peak RSS {row['peak_rss_bytes'] / MiB:6.0f} MiB (before training "
                      f"{row['peak_rss_before_training_bytes'] / MiB:5.0f}), step wall "
                      + ", ".join(f"{t:.1f}" for t in row["wall_s"]) + " s, cpu "
                      + ", ".join(f"{t:.1f}" for t in row["cpu_s"]) + " s", flush=True)
    print(f"wrote {save_result('zero3', {'steps': args.steps, 'ranks': rows})}")


if __name__ == "__main__":
    main()
