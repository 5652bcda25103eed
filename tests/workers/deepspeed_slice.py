"""2-rank ZeRO-3 worker for tests/engines/test_deepspeed_slices.py: one-layer slices of real model geometries.

For each named geometry (lorafa_scale.jobs.presets.GEOMETRIES) a model with ONE decoder layer, its full-size
embeddings and head, in bf16, is built under zero.Init with LoRA-FA on every linear layer (r=16), wrapped in
an engine and, if named in --train, trained one step. A trained slice's ranks fill their own partitions with
random values first: transformers' ZeRO-3 init (gather each module, draw on rank 0, scatter) does the same
through gloo and takes minutes on 2 cores. Rank 0 writes <out>/<name>.json: values in the model and held by
this rank once the engine runs (its partition, or all of a parameter below the persistence threshold), the
adapter shapes and values held, the threshold, timings, the peak resident memory of each rank, and for a
trained slice the loss and B's norm after the step.

The test trains the 13B slice only (the 70B step takes 90 s of bf16 matmuls and gathers on 2 AVX2 cores);
the 70B step by hand (7.7-8.4 GB per rank, about 3 min):
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/workers/deepspeed_slice.py --out DIR \
        --train llama-3-70b llama-3-70b
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import deepspeed
import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.initialization import no_init_weights

from lorafa_scale import LoraFAConfig, get_peft_model
from lorafa_scale.engines.deepspeed import (
    adapter_state_dict,
    init_distributed,
    init_partitioned_adapters,
    wrap,
    zero3_init_context,
)
from lorafa_scale.engines.deepspeed_config import resolve_ds_config
from lorafa_scale.jobs.presets import GEOMETRIES

# 2 tokens, one predicted: bf16 matmuls on a CPU without native bf16 (AVX512-BF16 / AMX) fall back to a slow
# generic gemm, and the 70B slice's full head and layer made a step of 8 tokens take 406 s on such a machine
R, TOKENS = 16, 2
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
    "steps_per_print": 10**9,
}


def held(param) -> int:
    """Values of `param` this rank stores: its partition, or all of it when ZeRO-3 keeps it whole."""
    return param.ds_numel if param.ds_persist else param.ds_tensor.numel()


def run(name: str, train: bool) -> dict:
    hf_config = GEOMETRIES[name].to_hf_config(num_hidden_layers=1)
    config = resolve_ds_config(DS_CONFIG, world_size=torch.distributed.get_world_size(),
                               hidden_size=hf_config.hidden_size)
    torch.manual_seed(torch.distributed.get_rank())
    start = time.perf_counter()
    with deepspeed.zero.Init(config_dict_or_path=config), no_init_weights():
        model = LlamaForCausalLM(hf_config)
    if train:  # an untrained slice is only counted: its values are never read
        with torch.no_grad():
            for module in model.modules():  # the norms were created as ones
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.ds_tensor.normal_(0, hf_config.initializer_range)
    with zero3_init_context(config):
        model = get_peft_model(model, LoraFAConfig(r=R, lora_alpha=2 * R, target_modules="all-linear"))
    init_partitioned_adapters(model)
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    engine, _, _ = wrap(model, config, optimizer=torch.optim.AdamW(trainable, lr=1e-3, foreach=False))
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
    report = {
        "parameters": sum(p.ds_numel for p in params),
        "held": sum(held(p) for p in params),
        "adapter_shapes": [list(p.ds_shape) for p in adapters],
        "adapter_held": sum(held(p) for p in adapters),
        "persistence_threshold": config["zero_optimization"]["stage3_param_persistence_threshold"],
        "build_seconds": build_seconds,
    }
    if not train:
        return report
    ids = torch.randint(0, hf_config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    # the logits of the first position only (it predicts the second token): half the head's bf16 matmuls
    logits = engine(input_ids=ids, logits_to_keep=torch.tensor([0])).logits
    loss = nn.functional.cross_entropy(logits[0].float(), ids[0, 1:])
    engine.backward(loss)
    engine.step()
    trained = adapter_state_dict(engine)
    report["wrap_and_step_seconds"] = time.perf_counter() - start
    report["loss"] = float(loss)
    report["b_norm"] = float(sum(t.norm() ** 2 for k, t in trained.items() if ".lora_B." in k) ** 0.5)
    return report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", action="append", default=[], choices=sorted(GEOMETRIES),
                        help="a geometry that also takes one training step (repeatable)")
    parser.add_argument("geometries", nargs="+", choices=sorted(GEOMETRIES))
    args = parser.parse_args()
    init_distributed()
    for name in args.geometries:
        report = run(name, train=name in args.train)
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])  # Linux: KiB
        peaks = [torch.zeros_like(peak) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(peaks, peak)
        report["peak_rss_bytes_per_rank"] = [int(p) for p in peaks]
        if torch.distributed.get_rank() == 0:
            (Path(args.out) / f"{name}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
