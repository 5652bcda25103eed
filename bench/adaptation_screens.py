"""Screens for bench/adaptation.py's --screen: one-off changes to calibration's or the layer's internals.

A screen tests an idea without adding an option to the package for it. Each run records its screen among
its settings, so that screened runs are never resumed into, pruned from or merged with default ones
(bench/adaptation_log.md gives each screen's figures and commands):

    none           the package as it is
    damping1       WHITENING_DAMPING 1.0 instead of 1e-2: D + mean D, so rarely active inputs are not weighted up
    no-correction  LoraConfig(correct_b_grad=False): B's gradient without the (A A^T)^-1 correction
    down-raw       down_proj's fast rows unwhitened (whiten 0), every other layer's whitened
    down-only      only down_proj's fast rows whitened
    plain-turn     the exact whitened rows u_j turned toward *plain* random unit rows q_j:
                   cos(angle) u_j + sin(angle) q_j (q orthonormal and orthogonal to the u's), where the default
                   turns in whitened coordinates, so that its random share is whitened too

A screen is (a context manager factory active while a method is built and calibrated, extra LoraConfig fields).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

import lorafa_scale.fast_adapter as fast_adapter
from lorafa_scale.fast_adapter import GradientSketch

SMOLLM2_MLP_WIDTH = 1536  # SmolLM2-135M's intermediate size: down_proj's is the only input this wide


@contextmanager
def patched(owner, name: str, value):
    """owner.name = value inside the block, the old value restored after it."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def whitened_where(keep: Callable[[GradientSketch], bool]) -> AbstractContextManager:
    """fast_rows with calibrate's whitening in the layers `keep` picks, and whiten 0 (raw rows) elsewhere."""
    original = GradientSketch.fast_rows

    def fast_rows(self, whiten=1.0, angle=0.0):
        return original(self, whiten if keep(self) else 0.0, angle)

    return patched(GradientSketch, "fast_rows", fast_rows)


def plain_turn() -> AbstractContextManager:
    """fast_rows turned toward plain random unit rows instead of whitened ones (module docstring)."""
    original = GradientSketch.fast_rows

    def fast_rows(self, whiten=1.0, angle=0.0):
        exact = original(self, whiten, 0.0).double()  # (k x in): the whitened rows, a random unit row's size
        if not angle:
            return exact.float()
        # the same kind of rows fast_adapter_rows draws, but drawn here in (in x k) shape: these are the draws
        # the recorded plain-turn runs used, so reusing that helper would not reproduce them
        generator = torch.Generator().manual_seed(self.seed + 1)
        away = torch.randn(self.in_features, self.k, dtype=torch.float64, generator=generator)
        basis = torch.linalg.qr(exact.T).Q
        away = torch.linalg.qr(away - basis @ (basis.T @ away)).Q
        radians = math.radians(angle)
        return (math.cos(radians) * exact + math.sin(radians) * away.T).float()

    return patched(GradientSketch, "fast_rows", fast_rows)


def is_down_proj(sketch: GradientSketch) -> bool:
    return sketch.in_features == SMOLLM2_MLP_WIDTH


SCREENS: dict[str, tuple[Callable[[], AbstractContextManager], dict]] = {
    "none": (nullcontext, {}),
    "damping1": (lambda: patched(fast_adapter, "WHITENING_DAMPING", 1.0), {}),
    "no-correction": (nullcontext, {"correct_b_grad": False}),
    "down-raw": (lambda: whitened_where(lambda sketch: not is_down_proj(sketch)), {}),
    "down-only": (lambda: whitened_where(is_down_proj), {}),
    "plain-turn": (plain_turn, {}),
}
