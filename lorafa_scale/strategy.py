"""How a training loop runs: one process, a DeepSpeed engine, or FSDP2.

The loop in lorafa_scale/ talks only to this interface, so each engine lives in its own module
(deepspeed_engine.py, fsdp.py) and plugs in without the loop knowing its details.

Contract, per optimizer step of `accum` micro-batches:
    for micro_batch in micro_batches:
        loss = strategy.model(**micro_batch).loss      # mean loss of this rank's micro-batch
        strategy.backward(loss)                          # scales by 1/accum itself
    grad_norm = strategy.step()                          # clip, optimizer step, scheduler step, zero grads
All methods marked collective must be called on every rank.
"""

from __future__ import annotations

import os
from typing import Any

import torch


class Strategy:
    """Base class: a single process (no distributed), plain torch optimizer."""

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

    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

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
