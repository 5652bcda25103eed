"""Lean-mode worker for tests/lean/test_sharded.py: `torchrun --nproc_per_node 2 lean_sharded.py ENGINE MODEL_DIR OUT`.

Loads the tiny model twice through lorafa_scale.engines (lean=True, lean=False) with ENGINE ("zero3" or
"fsdp2"), runs one forward (labels with ignored tokens, adapter dropout on, same RNG seed) and backward on
each, and writes the losses, whether logits came back, and every B's full gradient to OUT/lean_<engine>.pt
(rank 0). fsdp2 also runs the lean model with activation checkpointing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lorafa_scale import LoraFAConfig, load_sharded_model, wrap_sharded_model
from lorafa_scale.lean import is_lean

SEED, VOCAB = 7, 128


def lora_config() -> LoraFAConfig:
    return LoraFAConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False)


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, VOCAB, (4, 24), generator=generator)
    labels = ids.clone()
    labels[0, :9] = -100
    labels[3] = -100
    return ids.chunk(2)[rank], labels.chunk(2)[rank]


def ds_config() -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0},
            "steps_per_print": 10**9}


def run_zero3(model_dir: str, lean: bool) -> dict:
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(SEED)
    model = load_sharded_model(model_dir, lora_config(), "zero3", ds_config=ds_config(), dtype=torch.float32,
                               lean=lean)
    engine, _, _ = wrap_sharded_model(model, "zero3", optimizer=lambda ps: torch.optim.AdamW(ps, lr=0.0))
    engine.train()
    ids, labels = batch(dist.get_rank())
    torch.manual_seed(SEED + 1)
    out = engine(input_ids=ids, labels=labels)
    engine.backward(out.loss)
    grads = {f"{i}": safe_get_full_grad(layer.lora_B.weight).clone() for i, layer in enumerate(model.lora_layers())}
    return {"loss": out.loss.detach(), "logits": out.logits is not None, "lean": is_lean(engine), "grads": grads}


def run_fsdp2(model_dir: str, lean: bool, checkpointing: bool = False) -> dict:
    model = load_sharded_model(model_dir, lora_config(), "fsdp2", dtype=torch.float32, seed=SEED, lean=lean,
                               mixed_precision="fp32", activation_checkpointing=checkpointing)
    model.train()
    ids, labels = batch(dist.get_rank())
    torch.manual_seed(SEED + 1)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": out.loss.detach(), "logits": out.logits is not None, "lean": is_lean(model), "grads": grads}


def main() -> None:
    engine, model_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if engine == "zero3":
        results = {"lean": run_zero3(model_dir, True), "plain": run_zero3(model_dir, False)}
    else:
        results = {"lean": run_fsdp2(model_dir, True), "plain": run_fsdp2(model_dir, False),
                   "lean_checkpointing": run_fsdp2(model_dir, True, checkpointing=True)}
    losses = {k: v["loss"].clone() for k, v in results.items()}
    for loss in losses.values():
        dist.all_reduce(loss)
    for key, loss in losses.items():
        results[key]["loss"] = float(loss) / dist.get_world_size()
    if dist.get_rank() == 0:
        torch.save(results, out / f"lean_{engine}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
