"""The chunked output head + cross-entropy against transformers' ForCausalLMLoss on materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from lorafa_scale.lean import default_chunk_tokens, linear_cross_entropy

H, V = 24, 50


def reference(hidden, weight, labels, **kwargs):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(weight.requires_grad)
    loss = ForCausalLMLoss(F.linear(hidden, weight), labels, V, **kwargs)
    loss.backward(torch.tensor(1.7))  # an incoming gradient other than 1
    return loss, hidden.grad, weight.grad


def lean(hidden, weight, labels, chunk, **kwargs):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(weight.requires_grad)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk, **kwargs)
    loss.backward(torch.tensor(1.7))
    return loss, hidden.grad, weight.grad


def data(batch, seq, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, H, generator=generator).to(dtype)
    weight = torch.randn(V, H, generator=generator).to(dtype)
    labels = torch.randint(0, V, (batch, seq), generator=generator)
    return hidden, weight, labels


def check(ref, got, tol=1e-5):
    for r, g in zip(ref, got, strict=True):
        if r is None:
            assert g is None
        else:
            assert torch.allclose(g.float(), r.float(), rtol=tol, atol=tol * float(r.float().abs().max())), (r, g)


@pytest.mark.parametrize("seq,chunk", [(5, 16), (16, 16), (23, 4), (23, 5), (2, 3), (23, 1)],
                         ids=["shorter-than-chunk", "one-chunk", "not-divisible-4", "not-divisible-5", "two-tokens",
                              "chunk-1"])
def test_lengths_and_chunks(seq, chunk):
    hidden, weight, labels = data(2, seq)
    labels[0, : seq // 2] = -100
    check(reference(hidden, weight, labels), lean(hidden, weight, labels, chunk))


def test_a_sequence_with_all_labels_ignored():
    hidden, weight, labels = data(3, 11)
    labels[1] = -100
    check(reference(hidden, weight, labels), lean(hidden, weight, labels, 4))
    got = lean(hidden, weight, labels, 4)
    # tokens of the ignored sequence get no gradient, except the last one's prediction of nothing
    assert got[1][1].abs().sum() == 0


def test_every_label_ignored():
    hidden, weight, labels = data(2, 7)
    labels[:] = -100
    ref, got = reference(hidden, weight, labels), lean(hidden, weight, labels, 4)
    assert torch.isnan(ref[0]) and torch.isnan(got[0])  # the mean over no token, as transformers gives
    ref, got = (reference(hidden, weight, labels, num_items_in_batch=5),
                lean(hidden, weight, labels, 4, num_items_in_batch=5))
    assert got[0] == 0 and got[1].abs().sum() == 0
    check(ref, got)


def test_num_items_shift_labels_and_custom_ignore_index():
    hidden, weight, labels = data(2, 13)
    labels[1, 3:6] = 7
    check(reference(hidden, weight, labels, num_items_in_batch=torch.tensor(9)),
          lean(hidden, weight, labels, 4, num_items_in_batch=torch.tensor(9)))
    check(reference(hidden, weight, labels, ignore_index=7), lean(hidden, weight, labels, 4, ignore_index=7))
    shifted = torch.randint(0, V, (2, 13))
    shifted[0, -4:] = -100
    check(reference(hidden, weight, None, shift_labels=shifted), lean(hidden, weight, None, 5, shift_labels=shifted))


def test_trained_head_weight_gets_its_gradient():
    hidden, weight, labels = data(2, 9)
    weight.requires_grad_(True)
    check(reference(hidden, weight, labels), lean(hidden, weight, labels, 4))


def test_bf16():
    hidden, weight, labels = data(2, 19, torch.bfloat16)
    ref, got = reference(hidden, weight, labels), lean(hidden, weight, labels, 8)
    check(ref, got, tol=2e-2)
    assert got[1].dtype == torch.bfloat16


def test_no_grad_keeps_nothing_and_default_chunk():
    hidden, weight, labels = data(2, 9)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels)
    assert loss.grad_fn is None and torch.allclose(loss, ForCausalLMLoss(F.linear(hidden, weight), labels, V))
    assert default_chunk_tokens(32000) == 1024 and default_chunk_tokens(49152) == 512
    assert default_chunk_tokens(128256) == 256 and default_chunk_tokens(2**30) == 1
