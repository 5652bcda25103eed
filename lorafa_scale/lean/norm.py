"""RMSNorm with a frozen weight that keeps only its input for backward.

transformers' RMSNorm (Llama, Mistral, Qwen2, Qwen3) computes

    y = w * (x_f * rstd).to(dtype),    x_f = x in float32,  rstd = 1 / sqrt(mean(x_f^2) + eps)

and autograd keeps x upcast to float32, rstd, and the normalised x again (4h + 4 bytes per token or more).
The input gradient is

    g_x = rstd * (g_n - n * mean(g_n * n)),    n = x_f * rstd,  g_n = (g_y * w) in float32

which needs x and rstd only, and rstd is one mean over x (a reduction, no matrix product). So
`RMSNormFunction` keeps x itself, in its own dtype (h d bytes per token, half of transformers' figure in
bf16), and recomputes rstd in backward. A trained weight is handled too (its gradient sum(g_y * n) needs
nothing more), so nothing changes if someone unfreezes it.
"""

from __future__ import annotations

import torch


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(x_f * rstd) in float32, with the exact operations transformers' RMSNorm uses."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return hidden * torch.rsqrt(variance + eps)


class RMSNormFunction(torch.autograd.Function):
    """w * rms_normalize(x); keeps x (and the weight Parameter itself) for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out = weight * _normalized(x, eps).to(x.dtype)
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(x, weight)  # the Parameter itself: ZeRO-3 may free the gathered data
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        normed = _normalized(x, ctx.eps)  # float32
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # d(w * n.to(dtype)) / dn: grad * w in the product's dtype, reduced to x's dtype, then float32
            grad_n = (grad_out * weight).to(x.dtype).to(torch.float32)
            rstd = torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + ctx.eps)
            dot = (grad_n * normed).mean(-1, keepdim=True)
            grad_x = ((grad_n - normed * dot) * rstd).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return weight * _normalized(x, eps).to(x.dtype)  # nothing to keep: transformers' own operations
    return RMSNormFunction.apply(x, weight, eps)


def lean_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """forward of a patched transformers RMSNorm (weight, variance_epsilon)."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)
