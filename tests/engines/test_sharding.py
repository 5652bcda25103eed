"""lorafa_scale.engines, the one entry point for both engines: its errors (no processes).

The 2-rank runs go through it in tests/workers/deepspeed_train.py (engine="zero3": load, wrap, export) and
tests/workers/fsdp_train.py (engine="fsdp2"), checked by tests/engines/test_deepspeed.py and tests/engines/test_fsdp.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lorafa_scale import (
    ConfigError,
    get_peft_model,
    load_sharded_model,
    save_sharded_adapter,
    wrap_sharded_model,
)
from lorafa_scale.engines import ENGINE_ATTR
from tests.tiny_models import tiny_llama
from tests.workers.fsdp_train import lora_config


def test_unknown_engine_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"^engine must be one of \['zero3', 'fsdp2'\], got 'zero2'$"):
        load_sharded_model(tmp_path, lora_config(), "zero2")
    with pytest.raises(ConfigError, match=r"one of \['zero3', 'fsdp2'\], got 'fsdp'$"):
        wrap_sharded_model(get_peft_model(tiny_llama(), lora_config()), "fsdp", optimizer=None)


def test_engine_specific_arguments_are_checked_first(tmp_path):
    model = get_peft_model(tiny_llama(), lora_config())
    with pytest.raises(ConfigError, match="needs ds_config"):
        load_sharded_model(tmp_path, lora_config(), "zero3")
    with pytest.raises(ConfigError, match="only engine='zero3' takes it"):
        load_sharded_model(tmp_path, lora_config(), "fsdp2", ds_config={})
    with pytest.raises(ConfigError, match="lambda params"):  # sharding would orphan its parameters
        params = [p for p in model.parameters() if p.requires_grad]
        wrap_sharded_model(model, "fsdp2", optimizer=torch.optim.AdamW(params))
    setattr(model, ENGINE_ATTR, "zero3")
    with pytest.raises(ConfigError, match="loaded for engine='zero3', not 'fsdp2'"):
        wrap_sharded_model(model, "fsdp2", optimizer=torch.optim.AdamW)
    with pytest.raises(ConfigError, match="expected a DeepSpeed engine"):
        save_sharded_adapter(get_peft_model(tiny_llama(), lora_config()), tmp_path)


def test_package_import_does_not_import_the_engines():
    code = "import sys, lorafa_scale; print(sorted({'deepspeed', 'lorafa_scale.engines.deepspeed', 'lorafa_scale.engines.fsdp'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
