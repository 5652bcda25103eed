"""Benchmark 4 (nf4 base): bytes kept for backward and step time with a bitsandbytes nf4 base, ours vs PEFT LoRA.

The bench model is saved to a temporary folder (float32 safetensors) and loaded twice with the same
BitsAndBytesConfig (nf4, double quantization, float32 compute on CPU): once by lorafa_scale.quantization.
load_model (ours), once by transformers + peft.get_peft_model (PEFT LoRA, what QLoRA users run). Step times
alternate between the two on one torch thread, wall and process CPU time.

    python bench/bench_nf4.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import peft
import torch
from common import ALPHA, DROPOUT, LR, R, base_model, batch, save_result, train_step
from transformers import AutoModelForCausalLM

from lorafa_scale import LoraConfig
from lorafa_scale.jobs.planner import ALL_TARGETS, measure_kept
from lorafa_scale.quantization import bnb_config, load_model

MiB = 2**20


def load_both(path: str) -> dict:
    ours = load_model(path, "nf4", torch.float32, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                             target_modules=list(ALL_TARGETS)), device_map="cpu")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                                quantization_config=bnb_config("nf4", torch.float32))
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                       target_modules=list(ALL_TARGETS)))
    models = {"ours": ours.train(), "peft_lora": theirs.train()}
    return {name: (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR))
            for name, model in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = batch()
    with tempfile.TemporaryDirectory() as directory:
        base_model().save_pretrained(directory)
        models = load_both(directory)
    result = {}
    for name, (model, optimizer) in models.items():
        kept, _ = measure_kept(lambda model=model: model(input_ids=ids, labels=ids).loss, model)
        train_step(model, optimizer, ids)  # warm-up
        result[name] = {"kept_bytes": kept, "wall_s": [], "cpu_s": []}
        print(f"{name:<10} kept for backward {kept / MiB:8.1f} MiB", flush=True)
    names = list(models)
    for round_index in range(args.rounds):
        for name in names[round_index % 2:] + names[:round_index % 2]:
            model, optimizer = models[name]
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(model, optimizer, ids)
            result[name]["wall_s"].append(time.perf_counter() - start)
            result[name]["cpu_s"].append(time.process_time() - cpu_start)
        print(f"round {round_index + 1}: " + "  ".join(
            f"{n} {result[n]['wall_s'][-1]:.2f}s wall {result[n]['cpu_s'][-1]:.2f}s cpu" for n in names), flush=True)
    for clock in ("wall_s", "cpu_s"):
        ratios = [o / p for o, p in zip(result["ours"][clock], result["peft_lora"][clock], strict=True)]
        result[f"ratio_{clock}"] = ratios
        print(f"{clock}: ours {statistics.median(result['ours'][clock]):.2f}  PEFT LoRA "
              f"{statistics.median(result['peft_lora'][clock]):.2f}  ratio median {statistics.median(ratios):.3f}"
              f" range {min(ratios):.3f}-{max(ratios):.3f}")
    ratio = result["peft_lora"]["kept_bytes"] / result["ours"]["kept_bytes"]
    print(f"kept for backward, PEFT LoRA / ours: {ratio:.2f}x")
    print(f"wrote {save_result('nf4', {'rounds': args.rounds, **result, 'kept_ratio': ratio})}")


if __name__ == "__main__":
    main()
