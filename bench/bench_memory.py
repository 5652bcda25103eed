"""Benchmark 1: bytes autograd keeps for backward in one training step, ours vs PEFT LoRA vs PEFT LoRA-FA.

Counted with torch.autograd.graph.saved_tensors_hooks as unique storages (lorafa_scale.jobs.planner.
measure_kept_bytes), without the model's parameters; the frozen weights that autograd also references are
reported apart, so the figures compare with the field notes' (which include them). No recomputation:
no activation checkpointing anywhere. The planner's prediction for each is printed beside it.

    python bench/bench_memory.py
"""

from __future__ import annotations

import matplotlib
from common import (
    DROPOUT,
    GEOMETRY,
    LABELS,
    RESULTS,
    SEQ_LEN,
    VARIANTS,
    R,
    adapted,
    base_model,
    batch,
    bench_config,
    save_result,
)

from lorafa_scale.jobs.planner import ALL_TARGETS, Job, kept_for_backward, measure_kept

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MiB = 2**20


def main() -> None:
    config, ids = bench_config(), batch()
    rows = {}
    cases = [(v, DROPOUT) for v in VARIANTS] + [("peft_lorafa", 0.0)]
    for variant, dropout in cases:
        model, _ = adapted(variant, base_model(config), dropout)
        kept, weights = measure_kept(lambda model=model: model(input_ids=ids, labels=ids).loss, model)
        # The planner models ours ("lorafa") and PEFT LoRA ("lora"); PEFT with A frozen and dropout keeps
        # dropout(x) for nothing (A needs no gradient) and is not a layout the planner offers.
        method = {"ours": "lorafa", "peft_lora": "lora"}.get(variant, "lorafa" if dropout == 0 else None)
        predicted = method and kept_for_backward(Job(GEOMETRY, micro_batch=1, seq_len=SEQ_LEN, r=R,
                                                     targets=ALL_TARGETS, method=method, lora_dropout=dropout,
                                                     dtype="fp32", device="cpu"))
        key = variant if dropout == DROPOUT else f"{variant}_dropout0"
        rows[key] = {"kept_bytes": kept, "saved_weight_bytes": weights, "planner_bytes": predicted}
        print(f"{LABELS[variant] + ('' if dropout else ', dropout 0'):<36} kept {kept / MiB:8.1f} MiB"
              f"  (+ frozen weights {weights / MiB:6.1f} MiB = {(kept + weights) / MiB:6.1f})"
              + (f"  planner {predicted / MiB:8.1f} MiB" if predicted else "  planner       -"), flush=True)
        del model
    ratio = rows["peft_lora"]["kept_bytes"] / rows["ours"]["kept_bytes"]
    with_weights = ((rows["peft_lora"]["kept_bytes"] + rows["peft_lora"]["saved_weight_bytes"])
                    / (rows["ours"]["kept_bytes"] + rows["ours"]["saved_weight_bytes"]))
    print(f"PEFT LoRA / ours: {ratio:.2f}x activations, {with_weights:.2f}x including saved weights (target >= 1.4)")
    path = save_result("memory", {"rows": rows, "ratio_activations": ratio, "ratio_with_weights": with_weights})
    names = [LABELS[key.removesuffix("_dropout0")] + (", dropout 0" if key.endswith("dropout0") else "")
             for key in rows]
    kept = [row["kept_bytes"] / MiB for row in rows.values()]
    weights = [row["saved_weight_bytes"] / MiB for row in rows.values()]
    plt.figure(figsize=(8, 3.5))
    plt.barh(names, kept, label="activations")
    plt.barh(names, weights, left=kept, label="frozen weights referenced")
    plt.xlabel("MiB kept for backward, one training step")
    plt.title("Bench geometry, 1 x 1024 tokens, float32, r 16, dropout 0.05")
    plt.xlim(0, 1.45 * max(k + w for k, w in zip(kept, weights, strict=True)))
    plt.legend(loc="lower right")
    plt.tight_layout()
    plt.savefig(RESULTS / "memory.png", dpi=100)
    print(f"wrote {path} and {RESULTS / 'memory.png'}")


if __name__ == "__main__":
    main()
