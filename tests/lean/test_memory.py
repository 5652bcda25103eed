"""What lean mode keeps for backward, counted with saved_tensors_hooks, against a stated formula and the planner.

Per token, in a decoder layer other than the first, LoRA-FA on all 7 linear layers, d the dtype's bytes:

    2 RMSNorm inputs               2 h d
    q, k, v, attention output      (2h + 2kv) d + 4 heads      (SDPA: plus a float32 log-sum-exp per head)
    MLP gate and up                2 f d
    7 adapters                     7 r d                       (A dropout(x))

The first layer's input norm keeps nothing (the embeddings need no gradient). Outside the layers: the
final norm's input and the gradient of the final hidden states (2 h d per token); rotary cos/sin
(2 head_dim d per position, shared by all layers, counted where layer 0 first saves them).
"""

from __future__ import annotations

import pytest
import torch

from lorafa_scale import LoraConfig, get_peft_model
from lorafa_scale.jobs.planner import ALL_TARGETS, Job, kept_for_backward
from lorafa_scale.jobs.presets import ModelGeometry
from tests.tiny_models import tiny_llama

GEOMETRIES = [(64, 160, 2, 4, 2, 128), (96, 256, 3, 6, 6, 300), (128, 352, 1, 8, 1, 200)]
BYTES = {torch.float32: 4, torch.bfloat16: 2}
R = 8


def kept_by_layer(model, ids):
    """{layer index or 'outside': bytes of unique non-parameter storages saved for backward}."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    current, kept, handles = [], {}, []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=index: current.append(i)))
        handles.append(layer.register_forward_hook(lambda m, a, o: (current.pop(), None)[1]))

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            kept.setdefault(storage.data_ptr(), (storage.nbytes(), current[-1] if current else "outside"))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for handle in handles:
        handle.remove()
    totals = {}
    for size, where in kept.values():
        totals[where] = totals.get(where, 0) + size
    return totals


def lean_model(geometry, dtype, dropout=0.05):
    hidden, ffn, layers, heads, kv_heads, vocab = geometry
    model = tiny_llama(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, vocab_size=vocab).to(dtype)
    config = LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=dropout, target_modules="all-linear")
    return get_peft_model(model, config, lean=True).train()


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"h{g[0]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bytes_per_layer_match_formula_and_planner(geometry, dtype):
    hidden, ffn, layers, heads, kv_heads, vocab = geometry
    batch, seq, d = 2, 40, BYTES[dtype]
    kv, tokens = kv_heads * hidden // heads, batch * seq
    torch.manual_seed(1)
    model = lean_model(geometry, dtype)
    ids = torch.randint(0, vocab, (batch, seq))
    measured = kept_by_layer(model, ids)
    per_token = 2 * hidden * d + (2 * hidden + 2 * kv) * d + 4 * heads + 2 * ffn * d + 7 * R * d
    first = per_token - hidden * d
    rotary = seq * 2 * (hidden // heads) * d  # computed once, first saved inside layer 0
    expected = {0: tokens * first + rotary, **{i: tokens * per_token for i in range(1, layers)},
                "outside": tokens * 2 * hidden * d}
    assert measured == expected
    g = ModelGeometry("t", hidden, ffn, layers, heads, kv_heads, vocab, max_position_embeddings=256)
    job = Job(g, micro_batch=batch, seq_len=seq, r=R, targets=ALL_TARGETS, lora_dropout=0.05,
              dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype], device="cpu", lean=True)
    assert kept_for_backward(job) == sum(measured.values())


def test_lean_keeps_less_than_transformers_forward():
    torch.manual_seed(1)
    geometry = GEOMETRIES[0]
    ids = torch.randint(0, geometry[-1], (2, 40))
    lean_total = sum(kept_by_layer(lean_model(geometry, torch.float32), ids).values())
    hidden, ffn, layers, heads, kv_heads, vocab = geometry
    plain = tiny_llama(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, vocab_size=vocab)
    plain = get_peft_model(plain, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.05, target_modules="all-linear"))
    plain_total = sum(kept_by_layer(plain.train(), ids).values())
    # the log-softmax (4 V per token), labels, silu(gate) (f d) and the float32 norm copies are gone
    assert plain_total - lean_total >= 80 * (4 * vocab + ffn * 4)
