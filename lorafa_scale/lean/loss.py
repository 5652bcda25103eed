"""Output head + next-token cross-entropy in chunks of tokens, never keeping the logits.

transformers computes logits = lm_head(h) for every token (tokens x vocab), upcasts them to float32 and
takes the cross-entropy; autograd keeps the float32 log-softmax (4 V bytes per token: 125 MiB for 1024
tokens at a 32k vocabulary, 4 GiB for 8k tokens at Llama-3's 128k). With a frozen head the gradient of the
loss with respect to h is all backward needs from here, and it is as large as h:

    g_h = ((softmax(logits) - onehot(label)) * valid / n) W

`LinearCrossEntropyFunction` computes it during forward, one chunk of tokens at a time (the chunk's logits
exist only while it is processed), and keeps g_h alone (h d bytes per token). Backward multiplies it by the
incoming scalar gradient. No matrix product is computed twice: the logits and g_h are the two products an
ordinary forward + backward computes, done here in forward. A trained head weight (rare: a head trained in
full is a modules_to_save copy, which takes the ordinary path) gets its gradient accumulated the same way.

Loss conventions are transformers' (`ForCausalLMLoss`): labels are shifted left by one (or `shift_labels`
given as is), `ignore_index` (-100) tokens are skipped, the reduction is the mean over counted tokens, or
the sum divided by `num_items_in_batch` when given. All tokens ignored gives nan with the mean, as there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
CHUNK_VALUES = 2**25  # logits values per chunk: 128 MiB in float32 (1024 tokens at a 32k vocabulary)


def default_chunk_tokens(vocab_size: int) -> int:
    """The largest power of two of tokens whose logits stay within CHUNK_VALUES values (at least 1)."""
    tokens = max(1, CHUNK_VALUES // max(1, vocab_size))
    return 1 << (tokens.bit_length() - 1)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """sum over tokens of cross_entropy(h W^T, label) * scale; keeps only the gradient of h (and of W if trained)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, ignore_index, chunk_tokens):
        # hidden (N, H), weight (V, H), labels (N,), scale: a 0-dim float32 tensor (1 / tokens counted)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens]
            label = labels[start : start + chunk_tokens]
            logits = F.linear(h, weight).float()  # (c, V): transformers' lm_head, then its float32 upcast
            valid = label != ignore_index
            safe = torch.where(valid, label, 0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe).squeeze(1)) * valid).sum()
            if want_h or want_w:
                grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                grad_logits.scatter_add_(1, safe, -valid.to(grad_logits.dtype).unsqueeze(1))
                grad_logits.mul_((valid * scale).unsqueeze(1))
                grad_logits = grad_logits.to(h.dtype)
                if want_h:
                    grad_hidden[start : start + chunk_tokens] = grad_logits @ weight.to(h.dtype)
                if want_w:
                    grad_weight += grad_logits.T.float() @ h.float()
            del logits
        if want_h or want_w:
            ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _full_weight(weight: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shards not gathered by a unit) re-assembled; any other weight as it is."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight


class LeanCausalLMLoss(nn.Module):
    """The lean head + loss as a (parameterless) submodule of the causal LM.

    Under DeepSpeed ZeRO-3 a partitioned parameter read inside a module's forward is gathered and registered
    as an external parameter of that module, then released after its forward: reading the head's weight
    here keeps it gathered only while the loss is computed, not for the whole model's forward.
    """

    def forward(self, hidden, head, labels=None, **kwargs):
        return linear_cross_entropy(hidden, head.weight, labels, **kwargs)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss(lm_head(hidden), labels) without materialising the logits.

    hidden: (..., T, H) the final hidden states; weight: the head's (V, H) weight (no bias); labels (..., T)
    unshifted, or shift_labels already shifted.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        scale = 1.0 / (shift_labels != ignore_index).sum().to(torch.float32)  # inf if none counted: nan, as there
    else:
        scale = 1.0 / torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    weight = _full_weight(weight)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    if not torch.is_grad_enabled() or not (flat.requires_grad or weight.requires_grad):
        with torch.no_grad():
            return LinearCrossEntropyFunction.forward(_NoCtx(), flat, weight, shift_labels, scale, ignore_index, chunk)
    return LinearCrossEntropyFunction.apply(flat, weight, shift_labels, scale, ignore_index, chunk)


class _NoCtx:
    """A stand-in ctx for running the forward alone (no gradient wanted)."""

    needs_input_grad = (False,) * 6

    def save_for_backward(self, *tensors):
        pass
