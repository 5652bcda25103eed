"""The LoRA-FA layer.

A wrapped linear layer computes

    y = base(x) + s * B (A dropout(x)),        A: r x in (frozen),  B: out x r (trained, starts at 0)

with s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA).

Memory. Because A is frozen, B's gradient needs only the projection a = A dropout(x) (r values per token)
and x's gradient needs only A and B: g_x = mask * ((s g_y B) A). So `LoraFAFunction` keeps `a` and the
Parameters A and B themselves, never x, the dropout output or the mask: the mask is regenerated in
backward from a seed drawn in forward. A frozen base layer keeps nothing of x either (its backward needs
only its weight), so a LoRA-FA layer adds r values per token to what autograd keeps.

Gradient correction (LoRA-FA v2). The update s dB A is the best approximation of the full-weight
gradient G = dL/dW within A's row space when dB = G A^T (A A^T)^-1 / s, i.e.

    g_B <- g_B (A A^T)^-1 / s^2         (g_B = s G A^T is the plain gradient)

computed inside backward from a small r x r buffer, so it works with any optimizer and any sharding.
By default A has orthonormal rows (A A^T = I): the correction is I / s^2, and one SGD step on B moves W
by exactly -lr G A^T A, the full fine-tuning step projected onto A's r directions, whatever r and alpha.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from .backends import Backend


def dropout_keep(shape, p: float, seed: int, device, dtype) -> torch.Tensor:
    """Dropout's keep mask (1 with probability 1 - p, else 0) drawn from a generator seeded with `seed`.

    Forward and backward call this with the same seed and get the same mask, so it need not be kept.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    # uniform >= p rather than bernoulli_: the same distribution, drawn about 2x faster on CPU (torch 2.13)
    uniform = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return uniform.ge_(p).to(dtype)


def dropout_scale(shape, p: float, seed: int, device, dtype) -> torch.Tensor:
    """Inverted-dropout multiplier (0 or 1/(1-p)): the keep mask over 1 - p."""
    return dropout_keep(shape, p, seed, device, dtype).div_(1.0 - p)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the adapter math runs in: autocast's when it is on, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class LoraFAFunction(torch.autograd.Function):
    """s * B (A dropout(x)) with a frozen A, keeping only A dropout(x) and the Parameters for backward."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, b_grad_correction, scaling, dropout_p, seed):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xd = x.to(dtype)
            if dropout_p > 0:
                # Inverted dropout's 1/(1-p) rides on the scalar, sparing a pass over x-sized tensors.
                xd = dropout_keep(x.shape, dropout_p, seed, x.device, dtype).mul_(xd)
                scaling = scaling / (1.0 - dropout_p)
            projected = F.linear(xd, lora_A.to(dtype))  # (..., r): all that backward needs of x
            out = F.linear(projected * scaling, lora_B.to(dtype))  # scale r values per token, not out
        # Save the Parameters themselves: a cast or detached copy would keep a gathered ZeRO-3 weight alive.
        ctx.save_for_backward(projected, lora_A, lora_B, b_grad_correction)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        projected, lora_A, lora_B, b_grad_correction = ctx.saved_tensors
        dtype = projected.dtype
        grad_out = grad_out.to(dtype)
        grad_x = grad_B = None
        if ctx.needs_input_grad[2]:
            rank = projected.shape[-1]
            grad_B = (grad_out.reshape(-1, grad_out.shape[-1]).T @ projected.reshape(-1, rank)) * ctx.scaling
            if b_grad_correction is not None:
                grad_B = grad_B.float() @ b_grad_correction.float()
            grad_B = grad_B.to(lora_B.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ lora_B.to(dtype)) * ctx.scaling
            grad_x = grad_x @ lora_A.to(dtype)
            if ctx.dropout_p > 0:
                grad_x = grad_x.mul_(dropout_keep(ctx.x_shape, ctx.dropout_p, ctx.seed, grad_x.device, dtype))
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, None, grad_B, None, None, None, None


def orthonormal_rows_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill an (r x in) weight with orthonormal rows (orthonormal columns if r > in)."""
    with torch.no_grad():
        gaussian = torch.randn(max(weight.shape), min(weight.shape), dtype=torch.float64, generator=generator)
        q = torch.linalg.qr(gaussian).Q
        weight.copy_(q.T if weight.shape[0] <= weight.shape[1] else q)
    return weight


def adapter_seed(seed: int, name: str) -> int:
    """The seed of the adapter at module path `name`: a stable hash of (seed, name).

    Each layer draws its A from its own generator, so A depends on the seed and the layer's name only:
    not on creation order, rank count, engine or loading path.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64, as manual_seed takes


# The context LoraFALinear creates lora_A / lora_B in. A sharding engine may set it: DeepSpeed's zero.Init
# partitions them as they are created (engines/deepspeed.py), and that engine then initialises them.
ADAPTER_CREATION_CONTEXT: ContextVar = ContextVar("ADAPTER_CREATION_CONTEXT", default=nullcontext)


class LoraFALinear(nn.Module):
    """A base linear layer plus a LoRA-FA adapter; the base layer is wrapped, never copied."""

    def __init__(
        self,
        base_layer: nn.Module,
        backend: Backend,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_fast_adapter: bool = True,
        correct_b_grad: bool = True,
        init_lora_weights: bool | str = True,
        init_seed: int | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.backend = backend
        self.in_features, self.out_features = backend.features(base_layer)
        self.r = r
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = lora_dropout
        self.use_fast_adapter = use_fast_adapter
        self.correct_b_grad = correct_b_grad
        self.merged = False
        self.disabled = False
        # A is drawn from this seed (model.py passes adapter_seed(torch.initial_seed(), module name)).
        self.init_seed = torch.initial_seed() if init_seed is None else init_seed
        device = backend.weight_device(base_layer)
        with ADAPTER_CREATION_CONTEXT.get()():
            self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
            self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.register_buffer("b_grad_correction", torch.zeros(r, r, device=device), persistent=False)
        self.dropout = nn.Dropout(lora_dropout)  # used only by the plain-LoRA path
        self.lora_A.weight.requires_grad_(not use_fast_adapter)
        # Weights created on meta, or already partitioned (DeepSpeed zero.Init, numel 0), are initialised
        # later by whoever materialises or gathers them.
        if device.type != "meta" and self.lora_A.weight.numel() > 0:
            self.reset_lora_parameters(init_lora_weights)

    # As PEFT's wrapped layers: `.weight` and `.bias` answer the base layer's, so code that reads
    # model...q_proj.weight after wrapping still works. Plain properties: the parameters stay registered
    # once, on base_layer, which is what named_parameters(), ZeRO-3 and FSDP2 walk.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @torch.no_grad()
    def reset_lora_parameters(self, init: bool | str = True, seed: int | None = None) -> None:
        """A: orthonormal rows (default), PEFT's kaiming-uniform, or gaussian; B: zeros (random if init is False).

        Drawn from a generator seeded with `seed` (default: the layer's init_seed), never the global one.
        """
        if seed is not None:
            self.init_seed = seed
        generator = torch.Generator().manual_seed(self.init_seed)
        a, b = self.lora_A.weight, self.lora_B.weight
        if init in (True, "orthonormal"):
            orthonormal_rows_(a, generator)
        elif init == "gaussian":
            a.copy_(torch.randn(a.shape, generator=generator) / self.r)
        else:  # "kaiming" and False, as in PEFT: kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(in), 1/sqrt(in))
            bound = 1 / math.sqrt(self.in_features)
            a.copy_(torch.rand(a.shape, generator=generator) * (2 * bound) - bound)
        if init is False:
            b.copy_(torch.randn(b.shape, generator=generator) / math.sqrt(self.r))
        else:
            nn.init.zeros_(b)
        self.refresh_b_grad_correction()

    @torch.no_grad()
    def refresh_b_grad_correction(self) -> None:
        """Recompute (A A^T)^-1 / s^2 from the current A; call after A changes (init, loading)."""
        a = self.lora_A.weight
        if isinstance(a, DTensor):  # sharded by FSDP2: the Gram matrix needs every row (a collective)
            a = a.full_tensor()
        a = a.to(torch.float64)
        gram_inverse = torch.linalg.pinv(a @ a.T)
        self.b_grad_correction.copy_(gram_inverse / self.scaling**2)

    def delta_weight(self) -> torch.Tensor:
        """s * B A as an (out x in) fp32 tensor."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.backend.add_to_weight(self.base_layer, self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.backend.add_to_weight(self.base_layer, -self.delta_weight())
            self.merged = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return y
        if not torch.is_grad_enabled() and not (self.training and self.lora_dropout > 0):
            return self._add_adapter_inplace(x, y)
        if self.use_fast_adapter:
            p = self.lora_dropout if self.training else 0.0
            # The seed comes from the global CPU generator, so activation checkpointing (which restores
            # RNG state before recomputing) regenerates the same mask.
            seed = int(torch.randint(0, 2**62, (1,))) if p > 0 else 0
            correction = self.b_grad_correction if self.correct_b_grad else None
            adapter = LoraFAFunction.apply(
                x, self.lora_A.weight, self.lora_B.weight, correction, self.scaling, p, seed
            )
        else:  # plain LoRA, A trained: autograd keeps dropout(x) as PEFT does
            adapter = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return y + adapter.to(y.dtype)

    def _add_adapter_inplace(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inference: y += s * (A x) B^T as one addmm into the base output, with no output-sized temporary."""
        dtype, y = y.dtype, y.contiguous()
        projected = F.linear(x.to(dtype), self.lora_A.weight.to(dtype)).reshape(-1, self.r)
        y.view(-1, y.shape[-1]).addmm_(projected, self.lora_B.weight.to(dtype).T, alpha=self.scaling)
        return y

    def extra_repr(self) -> str:
        mode = "LoRA-FA" if self.use_fast_adapter else "LoRA"
        return f"{mode}, r={self.r}, scaling={self.scaling:g}, dropout={self.lora_dropout}"
