"""Lean mode: a frozen backbone keeps far less for backward (issue 13).

    from lorafa_scale import get_peft_model
    model = get_peft_model(hf_model, config, lean=True)      # or: lorafa_scale.lean.apply(hf_model)
    loss = model(input_ids=ids, labels=labels).loss           # training mode: logits are not returned

`apply(model)` patches a Hugging Face Llama, Mistral, Qwen2 or Qwen3 causal LM in place, by giving each
module concerned a subclass of its own class whose forward is lean (made once per class and named as the
class, so isinstance checks, parameter names, hooks and saved configs are unchanged; `remove` undoes it):

- the causal LM (`*ForCausalLM`): with labels, in training mode and with gradients on, the output head and
  the cross-entropy are computed in chunks of tokens by `loss.linear_cross_entropy`, which keeps only the
  gradient of the final hidden states (h values per token instead of V float32 values), and the output
  has `logits=None`. Otherwise (no labels, eval mode, no_grad, logits_to_keep, a head that is not a plain
  frozen linear layer) transformers' own forward runs.
- each SwiGLU MLP: silu(gate) * up keeps gate and up, SiLU is recomputed in backward (`swiglu.py`).
- each RMSNorm: keeps its input only; 1/rms is recomputed in backward (`norm.py`).
- attention: "eager" is switched to "sdpa" (flash-style kernels keep q, k, v, output and the log-sum-exp,
  never the s x s matrix); sdpa and flash attention are left as they are.

Nothing recomputes a matrix product; losses and gradients equal transformers' within float rounding
(tests/lean). Other model types are left untouched with a warning.
"""

from __future__ import annotations

import inspect
import logging
import sys

import torch
from torch import nn

from ..backends import find_backend
from ..backends.torch_linear import LINEAR
from .loss import IGNORE_INDEX, LeanCausalLMLoss, default_chunk_tokens, linear_cross_entropy
from .norm import lean_rms_norm_forward, rms_norm
from .swiglu import lean_mlp_forward, silu_mul

__all__ = ["FAMILIES", "apply", "remove", "is_lean", "linear_cross_entropy", "rms_norm", "silu_mul",
           "default_chunk_tokens", "IGNORE_INDEX"]

logger = logging.getLogger(__name__)

# model_type -> class-name prefix in transformers.models.<model_type>.modeling_<model_type>
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
SILU_ACTS = ("silu", "swish")
LEAN_MARK = "_lorafa_lean"
_LEAN_CLASSES: dict[type, type] = {}


def _lean_causal_lm_forward(self, *args, **kwargs):
    original = self._lorafa_original.forward
    signature = self._lorafa_signature
    bound = signature.bind(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    labels = arguments.get("labels")
    extra = dict(arguments.pop("kwargs", {}) or {})
    shift_labels = extra.get("shift_labels")
    head = self.get_output_embeddings()
    lean = (
        (labels is not None or shift_labels is not None)
        and self.training
        and torch.is_grad_enabled()
        and isinstance(arguments.get("logits_to_keep", 0), int) and arguments.get("logits_to_keep", 0) == 0
        and find_backend(head) is LINEAR and head.bias is None  # a plain (or ZeRO-3-frozen) linear head
        and not extra.get("output_attentions")
    )
    if not lean:
        return original(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = extra.pop("return_dict", None)
    num_items_in_batch = extra.pop("num_items_in_batch", None)
    ignore_index = extra.pop("ignore_index", IGNORE_INDEX)
    extra.pop("shift_labels", None)
    model_args = {k: v for k, v in arguments.items() if k not in ("self", "labels", "logits_to_keep")}
    outputs = getattr(self, self.base_model_prefix)(**model_args, **extra)
    loss = self.lorafa_lean_loss(
        outputs.last_hidden_state, head, labels, shift_labels=shift_labels,
        num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, chunk_tokens=self._lorafa_chunk_tokens,
    )
    result = CausalLMOutputWithPast(loss=loss, logits=None, cache=getattr(outputs, "cache", None),
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return result.to_tuple() if return_dict is False else result


def _lean_class(cls: type, forward, **attributes) -> type:
    if cls not in _LEAN_CLASSES:
        # Same name and qualname as the original, so saved configs ("architectures") and reprs are unchanged.
        namespace = {"forward": forward, LEAN_MARK: True, "_lorafa_original": cls, "__qualname__": cls.__qualname__,
                     "__module__": cls.__module__, **attributes}
        _LEAN_CLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return _LEAN_CLASSES[cls]


def _hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a LoraFAModel (or a PEFT PeftModel), or the model itself."""
    inner = model
    for _ in range(3):
        base = getattr(inner, "base_model", None)
        nested = getattr(base, "model", None) if base is not None and base is not inner else None
        if nested is None:
            break
        inner = nested
    return inner


def is_lean(model: nn.Module) -> bool:
    """Whether `apply` has patched this model (a LoraFAModel, the Hugging Face model inside, a DeepSpeed engine)."""
    hf = _hf_model(getattr(model, "module", model))
    return getattr(type(hf), LEAN_MARK, False) or any(getattr(type(m), LEAN_MARK, False) for m in hf.modules())


def apply(model: nn.Module, *, loss_chunk_tokens: int | None = None) -> bool:
    """Patch a Llama / Mistral / Qwen2 / Qwen3 model in place for lean training; False (and a warning) if the
    model type is not one of them. `loss_chunk_tokens`: tokens per chunk of the output head and loss
    (default: the largest power of two whose logits stay within 2^25 values, 128 MiB in float32)."""
    hf = _hf_model(model)
    config = getattr(hf, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        logger.warning("lean mode: model type %r is not one of %s; left as it is", model_type, list(FAMILIES))
        return False
    if loss_chunk_tokens is not None and (isinstance(loss_chunk_tokens, bool) or loss_chunk_tokens <= 0):
        raise ValueError(f"loss_chunk_tokens must be a positive integer, got {loss_chunk_tokens!r}")
    prefix = FAMILIES[model_type]
    modeling = sys.modules[f"transformers.models.{model_type}.modeling_{model_type}"]
    norm_cls, mlp_cls = getattr(modeling, f"{prefix}RMSNorm"), getattr(modeling, f"{prefix}MLP")
    causal_cls = getattr(modeling, f"{prefix}ForCausalLM")
    silu = getattr(config, "hidden_act", None) in SILU_ACTS
    for module in hf.modules():
        cls = type(module)
        if cls is norm_cls:
            module.__class__ = _lean_class(cls, lean_rms_norm_forward)
        elif cls is mlp_cls and silu:
            module.__class__ = _lean_class(cls, lean_mlp_forward)
    if type(hf) is causal_cls:
        hf.__class__ = _lean_class(causal_cls, _lean_causal_lm_forward, _lorafa_chunk_tokens=None,
                                   _lorafa_signature=inspect.signature(causal_cls.forward))
    if type(hf) is _LEAN_CLASSES.get(causal_cls):
        hf._lorafa_chunk_tokens = loss_chunk_tokens
        if not isinstance(getattr(hf, "lorafa_lean_loss", None), LeanCausalLMLoss):
            hf.lorafa_lean_loss = LeanCausalLMLoss()  # no parameters: state_dict and adapter keys unchanged
    if getattr(config, "_attn_implementation", None) == "eager":
        config._attn_implementation = "sdpa"
    return True


def remove(model: nn.Module) -> None:
    """Undo `apply`: every patched module gets its original class back."""
    for module in list(_hf_model(model).modules()):
        if getattr(type(module), LEAN_MARK, False):
            module.__class__ = type(module)._lorafa_original
            if isinstance(getattr(module, "lorafa_lean_loss", None), LeanCausalLMLoss):
                del module.lorafa_lean_loss
