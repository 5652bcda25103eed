"""How a training loop runs: one process, a DeepSpeed engine, or FSDP2.

The loop (training/loop.py) talks only to this interface, so each engine lives in its own module
(deepspeed.py, fsdp.py) and plugs in without the loop knowing its details.

Life of a run:
    strategy = make_strategy(args)                       # picks the engine; initialises distributed
    with strategy.model_init_context():                  # e.g. HfDeepSpeedConfig / zero.Init / meta device
        model = <build HF model, inject LoRA-FA>
    optimizer = strategy.make_optimizer(params, ...)     # torch AdamW unless the engine needs its own
    module = strategy.setup(model, optimizer, scheduler)
    per optimizer step of `grad_accum` micro-batches:
        for micro_batch in micro_batches:
            loss = <loss of this rank's micro-batch computed from module(...)>
            strategy.backward(loss)                      # scales by 1/grad_accum itself
        grad_norm = strategy.step()                      # clip, optimizer step, scheduler step, zero grads
    strategy.save_adapter(directory)                     # PEFT format, written once
    strategy.save_checkpoint(directory, client_state)    # resumable: A, B, optimizer, scheduler
    client_state = strategy.load_checkpoint(directory)

Gradients are averaged over data-parallel ranks by the engine, so a loss built as
(sum over the step's tokens on this rank) * grad_accum * world_size / (tokens of the whole step)
gives the gradient of the global token mean, whatever the micro-batch split.
All methods marked collective must be called on every rank, in the same order.
"""

from __future__ import annotations

import importlib
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CLIENT_STATE_NAME = "client_state.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"


class Strategy:
    """Base class: a single process (no distributed), plain torch optimizer.

    Engine subclasses are constructed as Cls(args), args being the resolved training options
    (training.args.TrainArgs: args.config, args.grad_accum, args.micro_batch_size, args.max_grad_norm, ...).
    """

    name = "single"

    def __init__(self, grad_accum: int = 1, max_grad_norm: float | None = 1.0):
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None

    # -- topology ------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(os.environ.get("RANK", 0))

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", 1))

    @property
    def device(self) -> torch.device:
        """Where batches go."""
        return torch.device("cpu")

    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Collective."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Collective: the element-wise sum over ranks (a new tensor; the input is left alone)."""
        out = tensor.detach().clone()
        if torch.distributed.is_initialized() and self.world_size > 1:
            torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Collective: the element-wise mean over ranks."""
        return self.all_reduce_sum(tensor) / self.world_size

    # -- building ------------------------------------------------------------------------------------
    def model_init_context(self):
        """Context in which the model is built or loaded (engines that shard at load time override)."""
        return nullcontext()

    def make_optimizer(self, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        # foreach=False: the same arithmetic whatever the number of tensors, so resumed runs match bitwise.
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)

    # -- training ------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> torch.nn.Module:
        """Take ownership of model/optimizer/scheduler; return the module the loop calls."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return model

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> float:
        """Clip, step optimizer and scheduler, zero grads; return the pre-clip gradient norm."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def skip_step(self) -> None:
        """Drop the accumulated gradients without stepping (used when a loss was not finite)."""
        self.optimizer.zero_grad(set_to_none=True)

    # -- saving --------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: {PEFT key: full CPU tensor} of every adapter tensor (A and B), on every rank."""
        return {k: v.detach().to("cpu").clone() for k, v in self.model.adapter_state_dict().items()}

    def save_adapter(self, directory) -> None:
        """Collective: write the adapter in PEFT format to `directory`, once (rank 0)."""
        if self.is_main():
            self.model.save_pretrained(directory)
        self.barrier()

    def optimizer_state_dict(self) -> dict:
        """Collective: the optimizer state as one full state dict (engines that shard it gather it)."""
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, path: Path) -> None:
        """Collective: restore the optimizer from the file optimizer_state_dict() was saved to."""
        self.optimizer.load_state_dict(torch.load(path, weights_only=True))

    def save_checkpoint(self, directory, client_state: dict) -> None:
        """Collective: write into the existing `directory` everything to continue exactly (A and B,
        optimizer, scheduler, `client_state` as JSON), never the frozen base; rank 0 writes. The caller
        makes the write atomic (temporary directory, then rename) and saves the RNG states itself."""
        directory = Path(directory)
        adapter, optimizer = self.adapter_state_dict(), self.optimizer_state_dict()
        if self.is_main():
            save_file(adapter, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
            torch.save(optimizer, directory / OPTIMIZER_NAME)
            if self.scheduler is not None:
                torch.save(self.scheduler.state_dict(), directory / SCHEDULER_NAME)
            write_client_state(directory, client_state)
        self.barrier()

    def load_checkpoint(self, directory) -> dict:
        """Collective: restore what save_checkpoint wrote (after setup); return client_state."""
        directory = Path(directory)
        self.model.load_adapter_weights(load_file(str(directory / ADAPTER_WEIGHTS_NAME)), str(directory))
        self.load_optimizer_state_dict(directory / OPTIMIZER_NAME)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(torch.load(directory / SCHEDULER_NAME, weights_only=True))
        return read_client_state(directory)


def write_client_state(directory: Path, client_state: dict) -> None:
    (Path(directory) / CLIENT_STATE_NAME).write_text(json.dumps(client_state, indent=2) + "\n")


def read_client_state(directory: Path) -> dict:
    return json.loads((Path(directory) / CLIENT_STATE_NAME).read_text())


class SingleProcessStrategy(Strategy):
    """One process on one device: the GPU when there is one (the model is moved there), else the CPU."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> torch.nn.Module:
        # A bitsandbytes model was loaded onto its device (device_map) and cannot be moved with .to().
        if self.device.type != "cpu" and getattr(model, "hf_quantizer", None) is None:
            model.to(self.device)
        return super().setup(model, optimizer, scheduler)


# --strategy value -> (module, class); engines are imported only when chosen.
ENGINES = {
    "deepspeed": ("lorafa_scale.engines.deepspeed", "DeepSpeedStrategy"),
    "fsdp": ("lorafa_scale.engines.fsdp", "FSDPStrategy"),
}


def strategy_name(args) -> str:
    """single, deepspeed (a --config is given) or fsdp (--fsdp)."""
    if getattr(args, "fsdp", False):
        return "fsdp"
    if getattr(args, "config", None):
        return "deepspeed"
    return "single"


def make_strategy(args) -> Strategy:
    """The Strategy for these options (args.grad_accum already resolved for the world size)."""
    name = strategy_name(args)
    if name == "single":
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world > 1:
            raise ValueError(
                f"WORLD_SIZE={world}: several processes need an engine; pass --config ds_configs/zero3.json "
                "(DeepSpeed) or --fsdp"
            )
        return SingleProcessStrategy(args.grad_accum, args.max_grad_norm)
    module, cls = ENGINES[name]
    return getattr(importlib.import_module(module), cls)(args)
