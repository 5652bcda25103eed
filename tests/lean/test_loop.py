"""launch/train.py's loop uses lean mode by default (--no-lean turns it off); both give the same summed loss."""

from __future__ import annotations

import copy

import torch

from lorafa_scale import LoraConfig, get_peft_model
from lorafa_scale.training.args import build_parser
from lorafa_scale.training.loop import token_loss_sum
from tests.tiny_models import tiny_llama


def test_token_loss_sum_lean_equals_logits_path():
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, -4:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    results = []
    for lean in (False, True):
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(copy.deepcopy(base), config, lean=lean).train()
        torch.manual_seed(2)
        loss = token_loss_sum(model, batch, torch.device("cpu"))
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.eval()
        with torch.no_grad():
            eval_loss = token_loss_sum(model, batch, torch.device("cpu"))
        results.append((loss, grads, eval_loss))
    (loss, grads, eval_loss), (lean_loss, lean_grads, lean_eval) = results
    assert torch.allclose(lean_loss, loss, rtol=1e-6) and torch.allclose(lean_eval, eval_loss, rtol=1e-6)
    for g, lg in zip(grads, lean_grads, strict=True):
        assert torch.allclose(lg, g, rtol=0, atol=2e-5 * float(g.abs().max()))


def test_lean_is_the_default_option():
    parser = build_parser()
    assert parser.parse_args([]).lean is True
    assert parser.parse_args(["--no-lean"]).lean is False


def test_right_padding_mask_dropped_in_lean_path():
    from lorafa_scale.jobs.planner import measure_kept

    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), lean=True).train()
    ids = torch.randint(0, 128, (2, 64))
    mask = torch.ones_like(ids)
    mask[0, -20:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    dropped, _ = measure_kept(lambda: token_loss_sum(model, batch, torch.device("cpu")), model)
    kept, _ = measure_kept(lambda: model(input_ids=ids, attention_mask=mask, labels=labels,
                                         num_items_in_batch=1).loss, model)
    assert kept - dropped >= 2 * 64 * 64 * 4  # at least one float32 batch x seq x seq mask
