"""lorafa-scale: LoRA-FA adapters (frozen A, trained B) for large Hugging Face models.

`from lorafa_scale import LoraConfig, get_peft_model` is a drop-in for the same names in PEFT.
"""

from .config import ConfigError, LoraConfig, LoraFAConfig
from .engines import load_sharded_model, save_sharded_adapter, wrap_sharded_model
from .fast_adapter import CalibrationReport, calibrate
from .layer import LoraFAFunction, LoraFALinear
from .model import LoraFAModel, PeftModel, get_lorafa_model, get_peft_model
from .peft_format import AdapterFormatError

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "CalibrationReport",
    "ConfigError",
    "LoraConfig",
    "LoraFAConfig",
    "LoraFAFunction",
    "LoraFALinear",
    "LoraFAModel",
    "PeftModel",
    "calibrate",
    "get_lorafa_model",
    "get_peft_model",
    "load_sharded_model",
    "save_sharded_adapter",
    "wrap_sharded_model",
]
