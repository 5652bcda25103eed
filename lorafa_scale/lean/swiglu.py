"""SwiGLU MLP that keeps gate and up for backward and recomputes SiLU there.

transformers' Llama-style MLP computes down(silu(gate(x)) * up(x)). Autograd keeps gate (for SiLU's
backward), silu(gate) and up (for the product's backward): 3 f values per token. The gradients

    g_up = g_h * silu(gate),    g_gate = silu_backward(g_h * up, gate)

need gate and up only; silu(gate) is recomputed in backward (elementwise, no matrix product). So
`SiluMulFunction` keeps 2 f values per token, with the same kernels autograd would use (bitwise equal
gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SiluMulFunction(torch.autograd.Function):
    """silu(gate) * up; keeps gate and up, recomputes silu(gate) in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad_out * F.silu(gate)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad):
        return F.silu(gate) * up
    return SiluMulFunction.apply(gate, up)


def lean_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """forward of a patched transformers SwiGLU MLP (gate_proj, up_proj, down_proj; act silu).

    gate_proj runs before up_proj, as in transformers, so adapters' dropout draws come in the same order."""
    gate = self.gate_proj(x)
    return self.down_proj(silu_mul(gate, self.up_proj(x)))
