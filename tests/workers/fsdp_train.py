"""FSDP2 worker for tests/engines/test_fsdp.py: `torchrun --nproc_per_node 2 fsdp_train.py MODEL_DIR OUT`.

Loads the tiny model sharded from MODEL_DIR the way the training loop does, trains STEPS steps, exports the
adapter, compares activation checkpointing on/off, runs one bf16 mixed-precision step with CPU offload,
checks a 4-bit base and the error for an incomplete checkpoint. Rank 0 writes OUT/train.json. The test
imports lora_config() and global_batches() for its single-process reference run. Besides the training-loop
strategy, loading, wrapping and export go through lorafa_scale.engines (engine="fsdp2"), the one entry
point for both engines.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lorafa_scale import (
    ConfigError,
    LoraFAConfig,
    get_peft_model,
    load_sharded_model,
    save_sharded_adapter,
    wrap_sharded_model,
)
from lorafa_scale.engines.fsdp import FSDPStrategy, init_adapters
from lorafa_scale.quantization import load_model as load_quantized

SEED, STEPS, LR = 7, 4, 1e-2
GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 127  # 127 rows of embeddings: uneven shards (64 + 63)


def lora_config(dropout: float = 0.0) -> LoraFAConfig:
    return LoraFAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=dropout)


def global_batches() -> list[torch.Tensor]:
    """One (GLOBAL_BATCH x SEQ) token batch per step; each of W ranks takes its GLOBAL_BATCH / W rows."""
    generator = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=generator) for _ in range(STEPS)]


def rank_rows(batch: torch.Tensor) -> torch.Tensor:
    return batch.chunk(dist.get_world_size())[dist.get_rank()]


def make_strategy(model_dir: str) -> FSDPStrategy:
    """As the training loop does: build in the strategy's context (meta), then setup shards and loads."""
    strategy = FSDPStrategy(SimpleNamespace(grad_accum=1, max_grad_norm=1.0, dtype="float32", seed=SEED,
                                            model=model_dir))
    with strategy.model_init_context():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_config())
    params = [p for p in model.parameters() if p.requires_grad]
    strategy.setup(model, strategy.make_optimizer(params, lr=LR, weight_decay=0.0), None)
    return strategy


def train_steps(strategy: FSDPStrategy, steps: range) -> list[float]:
    losses = []
    batches = global_batches()
    for step in steps:
        ids = rank_rows(batches[step])
        loss = strategy.model(input_ids=ids, labels=ids).loss
        strategy.backward(loss)
        strategy.step()
        losses.append(float(strategy.all_reduce_mean(loss.detach())))
    return losses


def b_grads(model_dir: str, activation_checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Full gradients of every B after one backward with adapter dropout on (same RNG seed each time),
    and how many times the first decoder layer ran forward (2 when its activations were recomputed)."""
    config = lora_config(dropout=0.2)
    model = load_sharded_model(model_dir, config, "fsdp2", dtype=torch.float32, seed=SEED,
                               mixed_precision="fp32", activation_checkpointing=activation_checkpointing)
    model.train()
    calls = []
    model.get_base_model().model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(SEED + dist.get_rank())
    ids = rank_rows(global_batches()[0])
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def wrap_built_model(model_dir: str) -> dict:
    """wrap_sharded_model on a model built whole on every rank: it shards it, then builds the optimizer and
    the scheduler from the callables; one step on the first batch."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_config())
    init_adapters(model, SEED)
    module, optimizer, scheduler = wrap_sharded_model(
        model, "fsdp2", optimizer=lambda ps: torch.optim.AdamW(ps, lr=LR),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5), mixed_precision="fp32")
    ids = rank_rows(global_batches()[0])
    loss = module(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    q_proj = module.get_base_model().model.layers[0].self_attn.q_proj
    b = [p for n, p in module.named_parameters() if ".lora_B." in n]
    return {
        "loss": float(mean_loss) / dist.get_world_size(),
        "q_proj_local_shape": list(q_proj.base_layer.weight.to_local().shape),
        "lr": scheduler.get_last_lr()[0],
        "b_norm": float(sum(p.detach().full_tensor().norm() ** 2 for p in b) ** 0.5),
    }


def bf16_step(model_dir: str) -> dict:
    """One step with the default policy (bf16 all-gather, fp32 reduce) on a bf16 base, with CPU offload."""
    model = load_sharded_model(model_dir, lora_config(), "fsdp2", dtype=torch.bfloat16, seed=SEED,
                               cpu_offload=True)
    model, optimizer, _ = wrap_sharded_model(model, "fsdp2", optimizer=lambda ps: torch.optim.AdamW(ps, lr=LR))
    params = [p for p in model.parameters() if p.requires_grad]
    ids = rank_rows(global_batches()[0])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    return {
        "loss": float(loss.detach()),
        "b_dtype": str(params[0].dtype),
        "base_dtype": str(model.get_base_model().model.layers[0].mlp.up_proj.weight.dtype),
        "b_norm": float(sum(p.detach().full_tensor().float().norm() ** 2 for p in params) ** 0.5),
    }


def nf4_grads(model_dir: str) -> dict:
    """A 4-bit base (nf4 packed in fp32): B's gradients sharded on 2 ranks vs unsharded on the whole batch."""
    ids = global_batches()[0]
    reference = load_quantized(model_dir, "nf4", torch.float32, lora_config())
    init_adapters(reference, SEED)
    reference(input_ids=ids, labels=ids).loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    model = load_sharded_model(model_dir, lora_config(), "fsdp2", dtype=torch.float32, quantization="nf4",
                               seed=SEED, mixed_precision="fp32")
    ids = rank_rows(ids)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    packed = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    return {
        "max_relative_error": max(float((grads[n] - g).norm() / g.norm()) for n, g in expected.items()),
        "packed_local_shape": list(packed.to_local().shape),
        "packed_shape": list(packed.shape),
    }


def missing_weight_error(model_dir: str, out: Path) -> str:
    """The error load_model raises, on every rank, for a checkpoint that lacks the final norm's weight."""
    incomplete = out / "incomplete"
    if dist.get_rank() == 0:
        shutil.copytree(model_dir, incomplete)
        weights = load_file(str(incomplete / "model.safetensors"))
        del weights["model.norm.weight"]
        save_file(weights, str(incomplete / "model.safetensors"))
    dist.barrier()
    try:
        load_sharded_model(incomplete, lora_config(), "fsdp2", dtype=torch.float32, seed=SEED)
    except ConfigError as err:
        return str(err)
    return "no error"


def main(model_dir: str, out: str) -> None:
    out = Path(out)
    strategy = make_strategy(model_dir)
    result = {"world_size": dist.get_world_size(), "losses": train_steps(strategy, range(STEPS))}
    save_sharded_adapter(strategy.model, out / "adapter")  # a model the strategy sharded
    (off, result["forward_calls_off"]), (on, result["forward_calls_on"]) = (
        b_grads(model_dir, False), b_grads(model_dir, True))
    result["checkpointing_max_abs_diff"] = max(float((off[n] - on[n]).abs().max()) for n in off)
    result["grad_abs_max"] = max(float(g.abs().max()) for g in off.values())
    q_proj = strategy.model.get_base_model().model.layers[0].self_attn.q_proj
    result["q_proj_local_shape"] = list(q_proj.base_layer.weight.to_local().shape)
    result["q_proj_lora_A_local_shape"] = list(q_proj.lora_A.weight.to_local().shape)
    result["wrapped"] = wrap_built_model(model_dir)
    result["bf16"] = bf16_step(model_dir)
    result["nf4"] = nf4_grads(model_dir)
    result["missing_weight_error"] = missing_weight_error(model_dir, out)
    if strategy.is_main():
        (out / "train.json").write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
