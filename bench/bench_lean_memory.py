"""Benchmark (issue 13): bytes kept for backward with lean mode, beside ours without it and PEFT LoRA.

Bench geometry of BENCHMARKS.md (bench/common.py), one training forward each, counted with
saved_tensors_hooks as unique storages, the model's parameters excluded (lorafa_scale.jobs.planner
.measure_kept). Each figure is split by the module that saved it (the innermost module running).

With --checkpointing, transformers' non-reentrant activation checkpointing wraps every decoder layer (for
PEFT LoRA too). Autograd then keeps what lies outside the decoder layers plus each layer's input, which
the checkpoint holds for recomputation (not seen by saved_tensors_hooks: counted here by a forward pre-hook
on each decoder layer); during backward one layer at a time is recomputed, so the peak adds one layer's
kept bytes, reported as "+ one layer" (that layer's figure from the run without checkpointing).

    python bench/bench_lean_memory.py                   # bench/results/lean_memory.json
    python bench/bench_lean_memory.py --model DIR --seq-len 512   # a saved model (e.g. SmolLM2-135M-Instruct)
    python bench/bench_lean_memory.py --dtype bfloat16 --device cuda   # on a GPU: also the peak CUDA memory of a step
"""

from __future__ import annotations

import argparse
import collections

import peft
import torch
from common import ALPHA, DROPOUT, SEQ_LEN, R, base_model, save_result

import lorafa_scale
from lorafa_scale.jobs.planner import ALL_TARGETS

MiB = 2**20
VARIANTS = ("ours_lean", "ours", "peft_lora")
LABELS = {"ours_lean": "ours, lean", "ours": "ours (lean off)", "peft_lora": "PEFT LoRA"}


def build(variant: str, model, checkpointing: bool):
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if variant == "peft_lora":
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(ALL_TARGETS))
        return peft.get_peft_model(model, config).train()
    config = lorafa_scale.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(ALL_TARGETS))
    return lorafa_scale.get_peft_model(model, config, lean=variant == "ours_lean").train()


def decoder_layers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def measure(model, ids) -> dict:
    """{'kept': bytes, 'by_module': {class name: bytes}, 'by_layer': {index or 'outside': bytes},
    'checkpoint_inputs': bytes held by activation checkpoints}."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    stack, layer_stack, kept = [], [], {}
    layers = decoder_layers(model)
    index = {id(m): i for i, m in enumerate(layers)}
    inputs = {}
    handles = []
    for module in model.modules():
        def pre(m, args, kwargs):
            stack.append(type(m).__name__)
            if id(m) in index:
                layer_stack.append(index[id(m)])
                hidden = args[0] if args else kwargs.get("hidden_states")
                if getattr(m, "gradient_checkpointing", False) and hidden is not None:
                    inputs[hidden.untyped_storage().data_ptr()] = hidden.untyped_storage().nbytes()

        def post(m, args, kwargs, out):
            stack.pop()
            if id(m) in index:
                layer_stack.pop()

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))

    def pack(tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in own and ptr not in kept:
            kept[ptr] = (storage.nbytes(), stack[-1] if stack else "loss", layer_stack[-1] if layer_stack else "outside")
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for handle in handles:
        handle.remove()
    by_module, by_layer = collections.Counter(), collections.Counter()
    for size, module, layer in kept.values():
        by_module[module] += size
        by_layer[str(layer)] += size
    held = sum(size for ptr, size in inputs.items() if ptr not in kept)
    return {"kept": sum(by_module.values()) + held, "by_module": dict(by_module), "by_layer": dict(by_layer),
            "checkpoint_inputs": held}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved Hugging Face model folder (default: the bench geometry)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--name", default=None, help="results name (default lean_memory[_<model folder>])")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    if args.model:
        from transformers import AutoModelForCausalLM

        def fresh():
            return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    else:
        def fresh():
            return base_model().to(dtype=dtype, device=device)
    vocab = fresh().config.vocab_size
    ids = torch.randint(0, vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    rows = {}
    for checkpointing in (False, True):
        for variant in VARIANTS:
            torch.manual_seed(0)
            model = build(variant, fresh(), checkpointing)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            result = measure(model, ids)
            if device.type == "cuda":
                result["cuda_peak_above_start"] = torch.cuda.max_memory_allocated() - before
            key = variant + ("_checkpointing" if checkpointing else "")
            if checkpointing:
                per_layer = rows[variant]["by_layer"]
                result["one_layer"] = max(v for k, v in per_layer.items() if k != "outside")
                result["peak"] = result["kept"] + result["one_layer"]
            rows[key] = result
            parts = ", ".join(f"{k} {v / MiB:.1f}" for k, v in sorted(result["by_module"].items(), key=lambda kv: -kv[1]))
            extra = (f"  (+ one layer {result['one_layer'] / MiB:.1f} = {result['peak'] / MiB:.1f} MiB;"
                     f" checkpointed inputs {result['checkpoint_inputs'] / MiB:.1f})" if checkpointing else "")
            if "cuda_peak_above_start" in result:
                extra += f"  [CUDA peak above start {result['cuda_peak_above_start'] / MiB:.1f} MiB]"
            print(f"{LABELS[variant] + (' + checkpointing' if checkpointing else ''):<34} kept "
                  f"{result['kept'] / MiB:8.1f} MiB{extra}\n    by module: {parts}", flush=True)
            del model
    ratios = {
        "peft_lora_over_ours_lean": rows["peft_lora"]["kept"] / rows["ours_lean"]["kept"],
        "ours_over_ours_lean": rows["ours"]["kept"] / rows["ours_lean"]["kept"],
        "checkpointing_peft_lora_over_ours_lean": rows["peft_lora_checkpointing"]["peak"]
        / rows["ours_lean_checkpointing"]["peak"],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    name = args.name or ("lean_memory" if not args.model else f"lean_memory_{args.model.rstrip('/').split('/')[-1]}")
    if args.dtype != "float32" or device.type != "cpu":
        name += f"_{args.dtype}_{device.type}"
    path = save_result(name, {"model": args.model or "bench geometry", "seq_len": args.seq_len, "dtype": args.dtype,
                              "device": str(device), "rows": rows, "ratios": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
