"""Peak memory of merging an adapter: `lorafa-scale merge` (one tensor at a time) against loading the whole model.

Saves a Llama geometry (no download) in 100 MB shards with a random all-linear r=16 adapter, then runs each
way in a fresh process and prints its peak RSS above the interpreter's baseline after imports.

    python bench/merge_memory.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

GEOMETRY = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000)

# Peak RSS is read from VmHWM (Linux): getrusage's ru_maxrss survives exec and would report the parent's.
WORKER = """
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM
from lorafa_scale import PeftModel
from lorafa_scale.merge import export_merged
def peak_kib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
way, tmp = sys.argv[1], Path(sys.argv[2])
baseline = peak_kib()
if way == "export_merged":
    export_merged(tmp / "adapter", tmp / "base", tmp / "merged", dtype="fp32")
else:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp / "base"), tmp / "adapter")
    model.merge_and_unload().save_pretrained(tmp / "merged-in-memory")
print((peak_kib() - baseline) / 1024)
"""


def main() -> None:
    from lorafa_scale import LoraConfig, get_peft_model
    from tests.tiny_models import tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_llama(**GEOMETRY)
        model.save_pretrained(tmp / "base", max_shard_size="100MB")
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(tmp / "adapter")
        del model
        shards = sorted((tmp / "base").glob("*.safetensors"))
        sizes = [s.stat().st_size / 2**20 for s in shards]
        print(f"checkpoint {sum(sizes):.0f} MiB in {len(shards)} shards (largest {max(sizes):.0f} MiB)\n")
        print("| merge | peak RSS above baseline, MiB |\n|---|---:|")
        for way in ("export_merged", "whole model in memory"):
            run = subprocess.run([sys.executable, "-c", WORKER, way, str(tmp)], capture_output=True, text=True,
                                 check=True, timeout=1200)
            print(f"| {way} | {float(run.stdout.split()[-1]):.0f} |", flush=True)


if __name__ == "__main__":
    main()
