"""The benchmark geometry and the three adapters compared on it: ours, PEFT LoRA, PEFT LoRA-FA (A frozen).

Bench geometry (issue 8): a Llama with hidden 1024, intermediate 2816, 4 layers, 16 heads, 4 KV heads,
vocab 32000, batch 1 x 1024 tokens, float32 on CPU; r 16, alpha 32, dropout 0.05 on all 7 linear layers.
Every script builds the models from this config (no download) with the same seed, so all see the same base.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import peft
import torch
from peft.optimizers import create_lorafa_optimizer
from transformers import LlamaConfig, LlamaForCausalLM

import lorafa_scale
from lorafa_scale.jobs.planner import ALL_TARGETS
from lorafa_scale.jobs.presets import ModelGeometry

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("ours", "peft_lora", "peft_lorafa")
LABELS = {"ours": "lorafa-scale LoRA-FA", "peft_lora": "PEFT LoRA", "peft_lorafa": "PEFT LoRA-FA (A frozen)"}
R, ALPHA, DROPOUT, LR = 16, 32, 0.05, 1e-4
SEQ_LEN, BATCH = 1024, 1


GEOMETRY = ModelGeometry("bench", hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


def bench_config(**overrides) -> LlamaConfig:
    return GEOMETRY.to_hf_config(**overrides)


def base_model(config: LlamaConfig | None = None, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config or bench_config())


def adapted(variant: str, model: torch.nn.Module, dropout: float = DROPOUT):
    """(model with adapters in train mode, its optimizer) for one of VARIANTS."""
    if variant == "ours":
        config = lorafa_scale.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(ALL_TARGETS))
        wrapped = lorafa_scale.get_peft_model(model, config)
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    else:
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(ALL_TARGETS))
        wrapped = peft.get_peft_model(model, config)
        if variant == "peft_lorafa":  # PEFT's LoRA-FA: freezes lora_A, AdamW on B with the projected gradient
            optimizer = create_lorafa_optimizer(wrapped, r=R, lora_alpha=ALPHA, lr=LR)
        else:
            optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    return wrapped.train(), optimizer


def batch(vocab_size: int = 32000, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def train_step(model, optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}, peft {peft.__version__}")


def save_result(name: str, result: dict) -> Path:
    """Write bench/results/<name>.json with the command line and machine, and return the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def timed_rounds(models: dict, ids: torch.Tensor, rounds: int) -> dict[str, dict[str, list[float]]]:
    """{"wall"|"cpu": {variant: [seconds per round]}}: one training step of every variant per round, the
    order rotating each round so no variant always runs first."""
    variants = list(models)
    times = {"wall": {v: [] for v in variants}, "cpu": {v: [] for v in variants}}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            model, optimizer = models[variant]
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(model, optimizer, ids)
            times["wall"][variant].append(time.perf_counter() - start)
            times["cpu"][variant].append(time.process_time() - cpu_start)
        print(f"round {round_index + 1}: " + "  ".join(
            f"{v} {times['wall'][v][-1]:.2f}s wall {times['cpu'][v][-1]:.2f}s cpu" for v in variants), flush=True)
    return times


def timing_summary(measured: dict[str, list[float]]) -> dict:
    return {v: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "all_s": t}
            for v, t in measured.items()}
