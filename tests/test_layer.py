"""LoraFALinear against float64 references, and what it keeps for backward."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafa_scale.backends import find_backend
from lorafa_scale.layer import LoraFALinear, dropout_scale

IN, OUT, R, ALPHA = 48, 40, 6, 12


def make_layer(base=None, dropout=0.0, correct=True, init=False, fast=True, seed=0):
    torch.manual_seed(seed)
    base = base if base is not None else nn.Linear(IN, OUT)
    base.requires_grad_(False)
    layer = LoraFALinear(base, find_backend(base), R, ALPHA, dropout, use_fast_adapter=fast,
                         correct_b_grad=correct, init_lora_weights=init)
    layer.lora_B.weight.requires_grad_(True)
    return layer


def base_weight(layer):
    w = layer.base_layer.weight.detach().double()
    return w.T if layer.backend.fan_in_fan_out else w


def reference(layer, x, mask, grad_out, correct):
    """y, g_x, g_B in float64 by plain autograd; g_B corrected as g_B (A A^T)^-1 / s^2."""
    x64 = x.detach().double().requires_grad_(True)
    a = layer.lora_A.weight.detach().double()
    b = layer.lora_B.weight.detach().double().requires_grad_(True)
    s = layer.scaling
    y = x64 @ base_weight(layer).T + layer.base_layer.bias.detach().double() + s * ((x64 * mask) @ a.T) @ b.T
    y.backward(grad_out.double())
    g_b = b.grad
    if correct:
        g_b = g_b @ torch.linalg.inv(a @ a.T) / s**2
    return y.detach(), x64.grad, g_b


def run_ours(layer, x, grad_out, seed=123):
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_out)
    return y.detach(), x.grad, layer.lora_B.weight.grad


def mask_for(seed, shape, p):
    """The mask the layer draws after torch.manual_seed(seed)."""
    if p == 0:
        return torch.ones(shape, dtype=torch.float64)
    torch.manual_seed(seed)
    return dropout_scale(shape, p, int(torch.randint(0, 2**62, (1,))), "cpu", torch.float32).double()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("correct", [True, False])
@pytest.mark.parametrize("shape", [(7, IN), (2, 5, IN), (2, 3, 4, IN)])
@pytest.mark.parametrize("conv1d", [False, True])
def test_forward_and_gradients_match_float64(dropout, correct, shape, conv1d):
    base = Conv1D(OUT, IN) if conv1d else None
    layer = make_layer(base, dropout=dropout, correct=correct).train()
    x = torch.randn(shape)
    grad_out = torch.randn(*shape[:-1], OUT)
    y, g_x, g_b = run_ours(layer, x, grad_out)
    mask = mask_for(123, shape, dropout)
    if dropout:
        assert 0.1 < (mask == 0).double().mean() < 0.5  # the mask really drops
    y_ref, g_x_ref, g_b_ref = reference(layer, x, mask, grad_out, correct)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_x.double(), g_x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_b.double(), g_b_ref, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.weight.grad is None


def test_default_init_orthonormal_a_zero_b_scalar_correction():
    layer = make_layer(init=True)
    a = layer.lora_A.weight.double()
    torch.testing.assert_close(a @ a.T, torch.eye(R, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    torch.testing.assert_close(layer.b_grad_correction, torch.eye(R) / layer.scaling**2, atol=1e-6, rtol=0)
    x = torch.randn(3, IN)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # B = 0: the adapter starts as the identity


def test_plain_lora_mode_trains_a():
    layer = make_layer(fast=False, dropout=0.0)
    layer.lora_A.weight.requires_grad_(True)
    run_ours(layer, torch.randn(4, IN), torch.randn(4, OUT))
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None


def activation_bytes(fn, *modules):
    """Bytes of unique storages autograd keeps for backward, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for m in modules for t in list(m.parameters()) + list(m.buffers())}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(kept.values()), out


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(256, 512)

    def forward(self, x):
        return self.proj(x)


def test_keeps_only_r_values_per_token_vs_peft():
    tokens, r = 4 * 128, 16
    x = torch.randn(4, 128, 256, requires_grad=True)
    base = nn.Linear(256, 512).requires_grad_(False)
    base_only, _ = activation_bytes(lambda: base(x), base)
    layer = LoraFALinear(base, find_backend(base), r, 32, lora_dropout=0.05).train()
    ours, _ = activation_bytes(lambda: layer(x), layer)
    assert base_only == 0
    assert ours == tokens * r * 4  # the fp32 projection A dropout(x), nothing else

    def peft_layer(freeze_a):
        torch.manual_seed(0)
        model = peft.get_peft_model(OneLinear(), peft.LoraConfig(r=r, lora_alpha=32, lora_dropout=0.05,
                                                                 target_modules=["proj"])).train()
        if freeze_a:
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
        return model

    lora, frozen_a = peft_layer(False), peft_layer(True)
    peft_lora, _ = activation_bytes(lambda: lora(x), lora)
    peft_frozen_a, _ = activation_bytes(lambda: frozen_a(x), frozen_a)
    # PEFT keeps the dropout mask and dropout(x) (x-sized each) plus A's output.
    assert peft_lora >= 2 * tokens * 256 * 4
    assert peft_frozen_a >= tokens * 256 * 4
    assert ours * 10 < peft_frozen_a


def test_no_grad_keeps_nothing_and_matches():
    layer = make_layer(dropout=0.2).eval()
    x = torch.randn(3, IN)
    with torch.no_grad():
        kept, y = activation_bytes(lambda: layer(x), layer)
    assert kept == 0 and not y.requires_grad
    torch.testing.assert_close(y, layer(x).detach())


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_same_gradients(use_reentrant):
    layer = make_layer(dropout=0.3).train()
    x = torch.randn(2, 9, IN)
    grad_out = torch.randn(2, 9, OUT)
    _, g_x, g_b = run_ours(layer, x, grad_out)
    g_b = g_b.clone()
    layer.lora_B.weight.grad = None
    torch.manual_seed(123)
    xc = x.clone().requires_grad_(True)
    y = torch.utils.checkpoint.checkpoint(layer, xc, use_reentrant=use_reentrant)
    y.backward(grad_out)
    torch.testing.assert_close(xc.grad, g_x, rtol=0, atol=0)
    torch.testing.assert_close(layer.lora_B.weight.grad, g_b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype):
    layer = make_layer(dropout=0.0).to(dtype)
    x = torch.randn(4, 8, IN)
    grad_out = torch.randn(4, 8, OUT)
    y, g_x, g_b = run_ours(layer, x.to(dtype), grad_out.to(dtype))
    assert y.dtype == dtype and g_x.dtype == dtype and g_b.dtype == dtype
    y_ref, g_x_ref, g_b_ref = reference(layer, x.to(dtype), torch.ones(1), grad_out.to(dtype), True)
    tol = dict(rtol=3e-2, atol=3e-2 * float(y_ref.abs().max()))
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(g_x.double(), g_x_ref, rtol=3e-2, atol=3e-2 * float(g_x_ref.abs().max()))
    torch.testing.assert_close(g_b.double(), g_b_ref, rtol=3e-2, atol=3e-2 * float(g_b_ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    layer = make_layer(dropout=0.0)
    x = torch.randn(4, 8, IN)
    grad_out = torch.randn(4, 8, OUT)
    with torch.autocast("cpu", dtype=dtype):
        xr = x.clone().requires_grad_(True)
        y = layer(xr)
    assert y.dtype == dtype
    y.backward(grad_out.to(dtype))
    assert xr.grad.dtype == torch.float32 and layer.lora_B.weight.grad.dtype == torch.float32
    y_ref, g_x_ref, g_b_ref = reference(layer, x, torch.ones(1), grad_out.to(dtype).float(), True)
    torch.testing.assert_close(y.double(), y_ref, rtol=3e-2, atol=3e-2 * float(y_ref.abs().max()))
    torch.testing.assert_close(xr.grad.double(), g_x_ref, rtol=3e-2, atol=3e-2 * float(g_x_ref.abs().max()))
    g_b = layer.lora_B.weight.grad.double()
    torch.testing.assert_close(g_b, g_b_ref, rtol=3e-2, atol=3e-2 * float(g_b_ref.abs().max()))


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_unmerge_and_disable(conv1d):
    layer = make_layer(Conv1D(OUT, IN) if conv1d else None).eval()
    x = torch.randn(5, IN)
    with torch.no_grad():
        y = layer(x)
        bare = layer.base_layer(x)
        assert not torch.allclose(y, bare, atol=1e-3)
        original = layer.base_layer.weight.clone()
        layer.merge()
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.base_layer(x), y, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)
        layer.disabled = True
        torch.testing.assert_close(layer(x), bare)
