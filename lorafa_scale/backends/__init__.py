"""How a LoRA-FA layer talks to the layer it wraps.

A backend knows one family of base layers (torch.nn.Linear, transformers' Conv1D, bitsandbytes, ...):
their feature sizes, and how to add a dense (out x in) delta to their weight for merging. The adapter math
itself never looks inside the base layer; it only calls it. `find_backend` picks the first backend that
claims a module; new families add a module here and an entry to BACKENDS.
"""

from __future__ import annotations

import torch

from .bnb import LINEAR_4BIT, LINEAR_8BIT
from .torch_linear import CONV1D, LINEAR, Backend

# bitsandbytes layers subclass nn.Linear, so their backends come first.
BACKENDS: list[Backend] = [LINEAR_4BIT, LINEAR_8BIT, LINEAR, CONV1D]


def find_backend(module: torch.nn.Module) -> Backend | None:
    for backend in BACKENDS:
        if backend.matches(module):
            return backend
    return None


__all__ = ["Backend", "BACKENDS", "find_backend"]
