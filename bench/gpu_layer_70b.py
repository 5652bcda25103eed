"""GPU benchmark: one decoder layer of Llama-3-70B geometry in bf16 at sequence 4096, ours vs PEFT LoRA.

For each variant (r 16, alpha 32, dropout 0.05 on all 7 linear layers of the layer, base frozen) it measures
training throughput (tokens/s of forward + backward + AdamW step, alternating between variants), peak CUDA
memory of a step, and the bytes autograd keeps for backward next to the planner's prediction for one layer.
One run takes about a minute on one H200 (well under the 8-minute budget). Without a GPU, --dry-run runs the
same code at a tiny size on the CPU.

    python bench/gpu_layer_70b.py                # on a GPU; writes bench/results/gpu_layer_70b.json
    python bench/gpu_layer_70b.py --dry-run      # CPU, tiny geometry, checks that everything runs
"""

from __future__ import annotations

import argparse
import statistics
import time

import peft
import torch
from common import ALPHA, DROPOUT, LABELS, LR, R, save_result
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

import lorafa_scale
from lorafa_scale.jobs.planner import ALL_TARGETS, Job, activation_bytes_per_token, measure_kept
from lorafa_scale.jobs.presets import GEOMETRIES, ModelGeometry

VARIANTS = ("ours", "peft_lora")
TIME_BUDGET_S = 240
TINY = ModelGeometry("tiny", 256, 704, 1, 8, 2, 1000, 4096)


class OneLayer(torch.nn.Module):
    """A decoder layer with its rotary embedding, called on hidden states that need a gradient."""

    def __init__(self, config):
        super().__init__()
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, hidden_states):
        positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        out = self.layer(hidden_states, position_embeddings=self.rotary(hidden_states, positions))
        return out[0] if isinstance(out, tuple) else out


def build(variant: str, config, device, dtype):
    torch.manual_seed(0)
    with device:  # initialise on the GPU itself: 0.86B values of random init are slow on the CPU
        layer = OneLayer(config).to(dtype).requires_grad_(False)
    if variant == "ours":
        model = lorafa_scale.get_peft_model(layer, lorafa_scale.LoraConfig(
            r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(ALL_TARGETS)))
    else:  # PEFT keeps its adapters in float32 (autocast_adapter_dtype) as ours does
        model = peft.get_peft_model(layer, peft.LoraConfig(
            r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(ALL_TARGETS)))
    model = model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, optimizer


def step(model, optimizer, x, grad):
    model(x).backward(grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny geometry on the CPU")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args()
    if args.dry_run:
        geometry, device, rounds, seq = TINY, torch.device("cpu"), 2, 256
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_layer_70b: no CUDA device; use --dry-run for the CPU check")
        geometry, device, rounds, seq = GEOMETRIES["llama-3-70b"], torch.device("cuda"), args.rounds, args.seq_len
    dtype = torch.bfloat16
    config = geometry.to_hf_config(num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    x = torch.randn(1, seq, geometry.hidden_size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    models = {v: build(v, config, device, dtype) for v in VARIANTS}
    results = {}
    for variant, (model, optimizer) in models.items():
        step(model, optimizer, x, grad)  # warm-up
        kept, _ = measure_kept(lambda model=model: model(x).sum(), model)  # sum() keeps nothing itself
        method = "lorafa" if variant == "ours" else "lora"
        job = Job(geometry, seq_len=seq, r=R, targets=ALL_TARGETS, method=method, lora_dropout=DROPOUT,
                  dtype="bf16", device=device.type)
        rotary = 2 * seq * geometry.head_dim * 2  # cos and sin in bf16, kept once per position
        planned = seq * activation_bytes_per_token(job) + rotary
        if device.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(model, optimizer, x, grad)
            sync()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = None
        results[variant] = {"kept_bytes": kept, "planner_layer_bytes": planned, "step_peak_cuda_bytes": peak,
                            "times_s": []}
    started = time.perf_counter()
    for round_index in range(rounds):
        if time.perf_counter() - started > TIME_BUDGET_S:  # stay well inside one 8-minute device call
            print(f"stopping after {round_index} rounds: time budget of {TIME_BUDGET_S} s spent")
            break
        for variant in VARIANTS[round_index % 2:] + VARIANTS[:round_index % 2]:
            model, optimizer = models[variant]
            sync()
            start = time.perf_counter()
            step(model, optimizer, x, grad)
            sync()
            results[variant]["times_s"].append(time.perf_counter() - start)
    for variant, row in results.items():
        row["tokens_per_s"] = seq / statistics.median(row["times_s"])
        peak = "-" if row["step_peak_cuda_bytes"] is None else f"{row['step_peak_cuda_bytes'] / 2**30:.2f} GiB"
        print(f"{LABELS[variant]:<22} {row['tokens_per_s']:9.0f} tokens/s  peak above weights {peak}  kept "
              f"{row['kept_bytes'] / 2**20:8.1f} MiB  planner {row['planner_layer_bytes'] / 2**20:8.1f} MiB")
    name = "gpu_layer_70b_dry_run" if args.dry_run else "gpu_layer_70b"
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"wrote {save_result(name, {'device': device_name, 'seq_len': seq, 'geometry': geometry.hf_id, **results})}")


if __name__ == "__main__":
    main()
