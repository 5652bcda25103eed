"""Benchmark 4 (inference): latency of the bare base, our unmerged adapter, our merged model, PEFT unmerged.

Bench geometry, eval mode, no gradients, float32 on CPU, one torch thread, process CPU time (other jobs
sharing the cores disturb wall time far more). Two timings, alternating between the four models in rotating
order each round: prefill (one forward over 1024 tokens) and decode (32 new tokens after a 128-token prompt
with the KV cache, per new token). The seed card promises < 3% overhead unmerged;
a merged model is the plain base model again and should cost nothing.

    python bench/bench_inference.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import peft
import torch
from common import ALPHA, R, base_model, batch, save_result

import lorafa_scale
from lorafa_scale.jobs.planner import ALL_TARGETS

MODELS = ("base", "ours_unmerged", "ours_merged", "peft_unmerged")
NEW_TOKENS, PROMPT = 32, 128


def build() -> dict[str, torch.nn.Module]:
    # init_lora_weights=False gives B random values, so an unmerged adapter does its real work.
    ours = lorafa_scale.get_peft_model(base_model(), lorafa_scale.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=list(ALL_TARGETS), init_lora_weights=False))
    merged = lorafa_scale.get_peft_model(base_model(), lorafa_scale.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=list(ALL_TARGETS), init_lora_weights=False)).merge_and_unload()
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=list(ALL_TARGETS), init_lora_weights=False))
    models = {"base": base_model(), "ours_unmerged": ours, "ours_merged": merged, "peft_unmerged": theirs}
    return {name: model.eval() for name, model in models.items()}


def prefill_seconds(model, ids) -> float:
    start = time.process_time()
    model(input_ids=ids)
    return time.process_time() - start


def decode_seconds_per_token(model, prompt) -> float:
    start = time.process_time()
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                   min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return (time.process_time() - start) / NEW_TOKENS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = batch()
    prompt = ids[:, :PROMPT]
    models = build()
    times = {kind: {name: [] for name in MODELS} for kind in ("prefill", "decode")}
    with torch.no_grad():
        for model in models.values():  # warm-up
            prefill_seconds(model, ids)
            decode_seconds_per_token(model, prompt)
        for round_index in range(args.rounds):
            order = MODELS[round_index % 4:] + MODELS[:round_index % 4]
            for name in order:
                times["prefill"][name].append(prefill_seconds(models[name], ids))
                times["decode"][name].append(decode_seconds_per_token(models[name], prompt))
            print(f"round {round_index + 1}: " + "  ".join(
                f"{n} {times['prefill'][n][-1]:.3f}s/{1000 * times['decode'][n][-1]:.1f}ms" for n in MODELS), flush=True)
    summary = {}
    for kind, per_model in times.items():
        summary[kind] = {}
        for name in MODELS:
            ratios = [t / b for t, b in zip(per_model[name], per_model["base"], strict=True)]
            summary[kind][name] = {"median_s": statistics.median(per_model[name]), "all_s": per_model[name],
                                   "overhead_median": statistics.median(ratios) - 1,
                                   "overhead_range": [min(ratios) - 1, max(ratios) - 1]}
            row = summary[kind][name]
            print(f"{kind:<8}{name:<15} median {row['median_s'] * 1000:8.1f} ms  overhead vs base "
                  f"{100 * row['overhead_median']:+.1f}% (range {100 * row['overhead_range'][0]:+.1f}% to "
                  f"{100 * row['overhead_range'][1]:+.1f}%)")
    print(f"wrote {save_result('inference', {'rounds': args.rounds, 'new_tokens': NEW_TOKENS, 'prompt': PROMPT, **summary})}")


if __name__ == "__main__":
    main()
