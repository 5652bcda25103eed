"""2-rank DeepSpeed worker for tests/engines/test_deepspeed.py (run by torchrun, DS_ACCELERATOR=cpu).

One run checks several things to pay DeepSpeed's start-up once:
1. load_sharded_model(engine="zero3") under zero.Init (ZeRO-3) and export the initial adapter (for the
   single-process reference);
2. train `steps` optimizer steps through DeepSpeedStrategy, checkpointing after `resume_at`, and export;
3. build a fresh engine (a different A), resume from the checkpoint and finish; export again;
4. (ZeRO-3) count gathered weight elements alive between forward and backward, with a leaking control;
5. (ZeRO-3) B's gradient with reentrant and non-reentrant activation checkpointing vs none;
6. (ZeRO-3) a 4-bit base trained as a user's own loop does: wrap_sharded_model, engine.backward/engine.step.
Loading and adapter export go through lorafa_scale.engines (the one entry point for both engines).
Results go to <out>/result.json (rank 0) and adapter directories under <out>.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from torch.multiprocessing.reductions import StorageWeakRef

from lorafa_scale import (
    LoraFAConfig,
    LoraFALinear,
    load_sharded_model,
    save_sharded_adapter,
    wrap_sharded_model,
)
from lorafa_scale.engines import DS_CONFIG_ATTR
from lorafa_scale.engines.deepspeed import DeepSpeedStrategy, adapter_state_dict

MICRO, ACCUM, WORLD = 2, 2, 2  # per-rank micro-batch, accumulation, ranks
SETTLE_S = 2.0  # how long gathered_alive_after_forward waits for a freed weight's storage to go
RESUME_AT, LR, WEIGHT_DECAY, CLIP = 2, 1e-2, 0.01, 0.5


def lora_config() -> LoraFAConfig:
    # alpha 1 (scaling 1/4, and B's corrected gradient grows as 1/scaling) gives gradient norms near 1, so
    # clipping at CLIP = 0.5 acts on every step.
    return LoraFAConfig(r=4, lora_alpha=1, target_modules="all-linear")


def make_optimizer(params) -> torch.optim.Optimizer:
    # eps 1e-6: Adam's step is ill-conditioned where a gradient element is near 0, where it would turn the
    # last-bit differences of a reduction over 2 ranks into 1e-5 differences of B.
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, eps=1e-6, foreach=False)


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 3)


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        # No persistence, reuse or prefetch: every weight is partitioned and freed right after use, so the count
        # of gathered elements alive after forward measures the layer, not DeepSpeed's caching.
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
                              "stage3_prefetch_bucket_size": 0, "reduce_bucket_size": "auto"},
        "steps_per_print": 10**9,
    }


def build(args, seed: int, quantization: str = "none"):
    torch.manual_seed(seed)  # rank 0's draw decides A; a different seed gives a different A
    model = load_sharded_model(args.model, lora_config(), "zero3", ds_config=ds_config(args.stage),
                               dtype=torch.float32, quantization=quantization, micro_batch_size=MICRO,
                               grad_accum=ACCUM, max_grad_norm=CLIP)
    strategy = DeepSpeedStrategy(SimpleNamespace(config=getattr(model, DS_CONFIG_ATTR), grad_accum=ACCUM,
                                                 max_grad_norm=CLIP, micro_batch_size=MICRO))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    return model, strategy, optimizer, scheduler


def train(strategy, engine, batches, steps):
    losses, norms = [], []
    for step in steps:
        step_loss = 0.0
        for ids in batches[step]:
            mine = ids[strategy.rank * MICRO:(strategy.rank + 1) * MICRO]
            loss = engine(input_ids=mine, labels=mine).loss
            strategy.backward(loss)
            step_loss += float(strategy.all_reduce_mean(loss.detach())) / len(batches[step])
        norms.append(strategy.step())
        losses.append(step_loss)
    return losses, norms


class UserLoop:
    """The strategy calls `train` makes, done as a user's own loop does with the engine wrap_sharded_model
    returns (README): engine.backward and engine.step after every micro-batch."""

    def __init__(self, engine):
        self.engine, self.rank = engine, dist.get_rank()

    def backward(self, loss):
        self.engine.backward(loss)
        self.engine.step()  # steps the optimizer on the last micro-batch of a window only

    def step(self) -> float:
        return float(self.engine.get_global_grad_norm())

    def all_reduce_mean(self, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor / dist.get_world_size()


def gathered_alive_after_forward(engine, ids, library_forward_on=None) -> tuple[int, int, list[str]]:
    """(elements of gathered weights - base W, A, B - still alive after forward by any reference, all seen,
    the names of those alive).

    A forward pre-hook on each layer (run after ZeRO-3's own, which gathers) takes a weak reference to the
    storage of each weight it uses: a base layer's weight, a LoraFALinear's A and B. After the forward, the
    storages not yet freed are counted. gc runs first: DeepSpeed's flat all-gather buffer of the last layer
    sometimes ends in a reference cycle, garbage that nothing can reach (backward included) and that the
    next collection frees. And the count is taken once it settles (it falls to 0 within SETTLE_S, or that
    time passes): a clean-clone run once found one weight (8192 elements) alive right after the forward,
    and a loop of the same count saw that twice in 120 forwards (on 2 ranks, the CPU loaded) and never in
    820 more; a storage that outlives its last Python reference for a moment fits a collective's work
    object released on gloo's own thread after wait() returned (not established). A weight kept for
    backward stays alive until backward, so waiting loses nothing of what the count checks; the control,
    whose weight autograd keeps, shows it.
    """
    uses = {m: {f"{name}.weight": m.weight} for name, m in engine.module.named_modules()
            if isinstance(getattr(m, "weight", None), torch.nn.Parameter) and not m.weight.requires_grad}
    uses.update({m: {f"{name}.lora_A": m.lora_A.weight, f"{name}.lora_B": m.lora_B.weight}
                 for name, m in engine.module.named_modules() if isinstance(m, LoraFALinear)})
    gathered = []

    def record(module, _):
        gathered.extend((name, StorageWeakRef(p.data.untyped_storage()), p.data.numel())
                        for name, p in uses[module].items())

    hooks = [m.register_forward_pre_hook(record) for m in uses]
    if library_forward_on is not None:  # control: torch's / bitsandbytes' own forward keeps a view of the weight
        library_forward_on.forward = super(type(library_forward_on), library_forward_on).forward
    loss = engine(input_ids=ids, labels=ids).loss
    deadline = time.monotonic() + SETTLE_S
    while True:
        gc.collect()
        alive = [(name, numel) for name, ref, numel in gathered if not ref.expired()]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    seen = sum(numel for _, _, numel in gathered)
    engine.backward(loss)
    engine.optimizer.zero_grad(set_to_none=True)
    for hook in hooks:
        hook.remove()
    if library_forward_on is not None:
        del library_forward_on.forward
    return sum(numel for _, numel in alive), seen, [name for name, _ in alive]


def b_grads(engine, model, ids, checkpointing: dict | None) -> tuple[torch.Tensor, int]:
    """(B's gradient, number of tensors autograd kept outside checkpointed regions) for one backward."""
    hf_model = model.get_base_model()
    if checkpointing is None:
        hf_model.gradient_checkpointing_disable()
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        hf_model.enable_input_require_grads()
    hf_model.train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    grads = [safe_get_full_grad(layer.lora_B.weight).flatten() for layer in model.lora_layers()]
    engine.optimizer.zero_grad(set_to_none=True)
    return torch.cat(grads), len(saved)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, required=True)
    args = parser.parse_args()
    out = Path(args.out)
    batches = torch.load(args.batches, weights_only=True)
    steps = len(batches)

    model, strategy, optimizer, scheduler = build(args, seed=1)
    rank = strategy.rank
    save_sharded_adapter(model, out / "initial_adapter")  # gathered before any engine exists
    engine = strategy.setup(model, optimizer, scheduler)
    losses, norms = train(strategy, engine, batches, range(RESUME_AT))
    checkpoint = out / "checkpoint"
    checkpoint.mkdir(exist_ok=True)
    strategy.save_checkpoint(checkpoint, {"step": RESUME_AT})
    try:  # a second save over it must be refused on every rank (no hang), leaving the first intact for resume
        strategy.save_checkpoint(checkpoint, {"step": -1})
        second_save = "written"
    except FileExistsError:
        second_save = "refused"
    more_losses, more_norms = train(strategy, engine, batches, range(RESUME_AT, steps))
    save_sharded_adapter(engine, out / "final_adapter")
    managed = getattr(engine.optimizer, "fp16_groups", None) or engine.optimizer.bit16_groups  # ZeRO-3 / ZeRO-2
    result = {"losses": losses + more_losses, "grad_norms": norms + more_norms, "second_save": second_save,
              "optimizer_params": sum(getattr(p, "ds_numel", p.numel()) for group in managed for p in group),
              "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)}

    uninterrupted_strategy, uninterrupted_engine = strategy, engine
    model, strategy, optimizer, scheduler = build(args, seed=2)
    save_sharded_adapter(model, out / "fresh_adapter")  # a different A, which resuming must replace
    engine = strategy.setup(model, optimizer, scheduler)
    client_state = strategy.load_checkpoint(checkpoint)
    resumed_losses, _ = train(strategy, engine, batches, range(client_state["step"], steps))
    strategy.save_adapter(out / "resumed_adapter")
    result["resumed_losses"] = resumed_losses

    # skip_step (a non-finite loss) drops a whole window: then one more step must equal the same step taken by
    # the uninterrupted engine, which never saw the dropped window.
    before = adapter_state_dict(engine)
    for ids in batches[1]:
        mine = ids[rank * MICRO:(rank + 1) * MICRO]
        strategy.backward(engine(input_ids=mine, labels=mine).loss)
    strategy.skip_step()
    result["skip_changed_adapter"] = any(not torch.equal(t, before[k]) for k, t in adapter_state_dict(engine).items())
    train(strategy, engine, batches, [0])
    train(uninterrupted_strategy, uninterrupted_engine, batches, [0])
    after, expected = adapter_state_dict(engine), adapter_state_dict(uninterrupted_engine)
    result["after_skip_max_diff"] = max(float((after[k] - expected[k]).abs().max()) for k in after)

    if args.stage == 3:
        ids = batches[0][0][rank * MICRO:(rank + 1) * MICRO]
        control = model.lora_layers()[-1].base_layer  # its input needs a gradient, so a view would be kept
        result["alive_after_forward"], result["gathered_in_forward"], result["alive_names"] = \
            gathered_alive_after_forward(engine, ids)
        result["alive_after_forward_control"], _, result["alive_names_control"] = \
            gathered_alive_after_forward(engine, ids, control)
        result["control_weight_numel"] = control.weight.ds_numel
        plain, result["saved_tensors_without_checkpointing"] = b_grads(engine, model, ids, None)
        for name, kwargs in (("reentrant", {"use_reentrant": True}), ("non_reentrant", {"use_reentrant": False})):
            grads, result[f"saved_tensors_with_{name}_checkpointing"] = b_grads(engine, model, ids, kwargs)
            result[f"checkpointing_{name}_rel_diff"] = float((grads - plain).norm() / plain.norm())

        # A 4-bit base: every rank loads it quantized (packed in fp32), and the engine partitions it.
        model, _, optimizer, scheduler = build(args, seed=3, quantization="nf4")
        save_sharded_adapter(model, out / "nf4_initial_adapter")
        engine, _, _ = wrap_sharded_model(model, "zero3", optimizer=optimizer, lr_scheduler=scheduler)
        result["nf4_held_fraction"] = (sum(p.ds_tensor.numel() for p in model.parameters())
                                       / sum(p.ds_numel for p in model.parameters()))
        result["nf4_losses"], result["nf4_grad_norms"] = train(UserLoop(engine), engine, batches, range(steps))
        save_sharded_adapter(engine, out / "nf4_final_adapter")
        control = model.lora_layers()[-1].base_layer
        result["nf4_alive_after_forward"], result["nf4_gathered_in_forward"], result["nf4_alive_names"] = \
            gathered_alive_after_forward(engine, ids)
        result["nf4_alive_after_forward_control"], _, result["nf4_alive_names_control"] = \
            gathered_alive_after_forward(engine, ids, control)
        result["nf4_control_weight_numel"] = control.weight.ds_numel
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result, indent=2))
    # Tear down before exit: leaving the process group to interpreter shutdown sometimes aborted a rank
    # ("terminate called without an active exception", SIGABRT) after all its work was done.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
