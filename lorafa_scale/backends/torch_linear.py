"""Backends for plain float layers: torch.nn.Linear (weight out x in) and transformers' Conv1D (in x out)."""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D


class Backend:
    """Base-layer interface used by LoraFALinear. Subclasses override what differs for their layer type."""

    name = "linear"
    layer_type: type = torch.nn.Linear
    fan_in_fan_out = False  # True when the stored weight is (in x out), as in GPT-2's Conv1D

    def matches(self, module: torch.nn.Module) -> bool:
        return type(module) is self.layer_type or isinstance(module, self.layer_type)

    def features(self, module: torch.nn.Module) -> tuple[int, int]:
        """(in_features, out_features)."""
        return module.in_features, module.out_features

    def prepare(self, module: torch.nn.Module) -> None:
        """Called once for every layer of this family in a model being adapted (trained through)."""

    def weight_device(self, module: torch.nn.Module) -> torch.device:
        return module.weight.device

    @torch.no_grad()
    def add_to_weight(self, module: torch.nn.Module, delta: torch.Tensor) -> None:
        """weight += delta, with delta given as (out x in) in any float dtype."""
        weight = module.weight
        weight.add_((delta.T if self.fan_in_fan_out else delta).to(weight.dtype))


class Conv1DBackend(Backend):
    name = "conv1d"
    layer_type = Conv1D
    fan_in_fan_out = True

    def features(self, module):
        in_features, out_features = module.weight.shape
        return in_features, out_features


LINEAR = Backend()
CONV1D = Conv1DBackend()
