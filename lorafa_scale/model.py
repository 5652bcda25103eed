"""Injecting LoRA-FA layers into a Hugging Face model, and the PEFT-compatible wrapper around it.

`get_peft_model(model, config)` returns a `LoraFAModel` laid out as PEFT's PeftModel is
(wrapper.base_model.model is the Hugging Face model), so in-memory parameter names such as
base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight are exactly the keys PEFT saves.
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from . import fast_adapter, peft_format
from .backends import find_backend
from .backends.bnb import stored_numel
from .config import ConfigError, LoraFAConfig
from .layer import LoraFALinear, adapter_seed

# Used when target_modules is None, as PEFT does for these model types.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}
# Classification heads: trained in full for SEQ_CLS (as PEFT does), never adapted by "all-linear".
SEQ_CLS_HEADS = ["classifier", "score"]
DEFAULT_LAYER_PATTERNS = ("layers", "h", "layer", "blocks", "block")


class ModulesToSave(nn.Module):
    """A module trained in full: a trainable copy beside the frozen original, as PEFT's ModulesToSaveWrapper."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(module)})
        self.modules_to_save["default"].requires_grad_(True)
        self.disabled = False

    def forward(self, *args, **kwargs):
        active = self.original_module if self.disabled else self.modules_to_save["default"]
        return active(*args, **kwargs)


def _name_matches(name: str, names) -> bool:
    return any(name == n or name.endswith("." + n) for n in names)


def _layer_index(name: str, patterns) -> int | None:
    alternatives = "|".join(re.escape(p) for p in patterns)
    match = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


class LoraFATuner(nn.Module):
    """Holds the Hugging Face model as `.model` and replaces its target layers with LoraFALinear."""

    def __init__(self, model: nn.Module, config: LoraFAConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.target_names = self._inject()
        self._mark_trainable()

    # -- injection ---------------------------------------------------------------------------------
    def _output_head_names(self) -> set[str]:
        get_head = getattr(self.model, "get_output_embeddings", None)
        head = get_head() if get_head else None
        return {name for name, m in self.model.named_modules() if head is not None and m is head}

    def _is_target(self, name: str, module: nn.Module, heads: set[str]) -> bool:
        cfg = self.config
        targets = cfg.target_modules
        if targets == "all-linear":
            hit = find_backend(module) is not None and name not in heads and not _name_matches(name, SEQ_CLS_HEADS)
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = _name_matches(name, targets)
        if hit and cfg.layers_to_transform is not None:
            patterns = cfg.layers_pattern or DEFAULT_LAYER_PATTERNS
            patterns = [patterns] if isinstance(patterns, str) else patterns
            hit = _layer_index(name, patterns) in cfg.layers_to_transform
        return hit

    def _inject(self) -> list[str]:
        cfg = self.config
        if cfg.target_modules is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            if model_type not in DEFAULT_TARGETS:
                raise ConfigError(f"target_modules: no default for model type {model_type!r}; name the layers to adapt")
            cfg.target_modules = list(DEFAULT_TARGETS[model_type])
        heads = self._output_head_names()
        wrapped = []
        for name, module in list(self.model.named_modules()):
            backend = find_backend(module)
            if backend is not None:
                backend.prepare(module)  # every layer gradients flow through, adapted or not
            if not name or isinstance(module, LoraFALinear) or not self._is_target(name, module, heads):
                continue
            if backend is None:
                if cfg.target_modules == "all-linear" or isinstance(cfg.target_modules, str):
                    continue  # a regex may match containers; only linear layers are adapted
                raise ConfigError(f"target_modules: '{name}' is not a linear layer (it is {type(module).__name__})")
            layer = LoraFALinear(
                module, backend, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora,
                cfg.use_fast_adapter, cfg.correct_b_grad, cfg.init_lora_weights,
                init_seed=adapter_seed(torch.initial_seed(), name),  # the same A on every engine and rank
            )
            self.model.set_submodule(name, layer)
            wrapped.append(name)
        if not wrapped:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if find_backend(m)})
            raise ConfigError(
                f"target_modules={cfg.target_modules!r} matched no linear layer"
                + (f" in layers {cfg.layers_to_transform}" if cfg.layers_to_transform is not None else "")
                + f"; linear layers in this model: {', '.join(linear) or 'none'}"
            )
        return wrapped

    def _mark_trainable(self) -> None:
        cfg = self.config
        self.model.requires_grad_(False)
        for layer in self.lora_layers():
            layer.lora_B.weight.requires_grad_(True)
            layer.lora_A.weight.requires_grad_(not cfg.use_fast_adapter)
            if cfg.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)
        if cfg.bias == "all":
            for name, param in self.model.named_parameters():
                if name.endswith("bias"):
                    param.requires_grad_(True)
        to_save = list(cfg.modules_to_save or [])
        if cfg.task_type == "SEQ_CLS":
            to_save += [h for h in SEQ_CLS_HEADS if h not in to_save]
            cfg.modules_to_save = to_save
        for name, module in list(self.model.named_modules()):
            if name and to_save and _name_matches(name, to_save) and not isinstance(module, ModulesToSave):
                self.model.set_submodule(name, ModulesToSave(module))

    # -- helpers -----------------------------------------------------------------------------------
    def lora_layers(self) -> list[LoraFALinear]:
        return [m for m in self.model.modules() if isinstance(m, LoraFALinear)]

    def resolved_target_modules(self):
        """target_modules as adapter_config.json records it: a regex as is, otherwise the layer suffixes."""
        targets = self.config.target_modules
        if isinstance(targets, str) and targets != "all-linear":
            return targets
        return sorted({name.rsplit(".", 1)[-1] for name in self.target_names})

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _saved_key(name: str) -> str:
    # PEFT drops the adapter name of a ModulesToSaveWrapper when saving.
    return name.replace("modules_to_save.default.", "")


ADAPTER_NAME = "default"  # the one adapter a LoraFAModel holds, under PEFT's default name


class LoraFAModel(nn.Module):
    """The PEFT-compatible wrapper: `wrapper.base_model.model` is the Hugging Face model.

    With PEFT installed, every instance is also a `peft.PeftModel` (see `_peft_compatible_class`), so the
    libraries that test `isinstance(model, PeftModel)` (transformers' Trainer, TRL, accelerate) treat it as
    one: they save and resume the adapter, not the whole model, and reach the backbone via get_base_model().
    """

    def __new__(cls, *args, **kwargs):
        if cls is LoraFAModel:
            cls = _peft_compatible_class()
        return super().__new__(cls)

    def __init__(self, model: nn.Module, config: LoraFAConfig):
        nn.Module.__init__(self)  # not super(): PeftModel's __init__ (next in the MRO) would inject PEFT's layers
        self.base_model = LoraFATuner(model, config)
        self.peft_config = {ADAPTER_NAME: config}
        # False until calibrate() sets the fast rows of A or an adapter is loaded (fast_adapter.py).
        self.fast_rows_calibrated = config.fast_adapter_rank == 0

    # PeftModel defines these as properties; ours are plain values (one adapter, always active).
    @property
    def peft_config(self) -> dict[str, LoraFAConfig]:
        return self.__dict__["_peft_config"]

    @peft_config.setter
    def peft_config(self, value: dict[str, LoraFAConfig]) -> None:
        self.__dict__["_peft_config"] = value

    @property
    def active_adapter(self) -> str:
        return ADAPTER_NAME

    @property
    def active_adapters(self) -> list[str]:
        return [ADAPTER_NAME]

    @property
    def active_peft_config(self) -> LoraFAConfig:
        return self.config_lorafa

    @property
    def has_active_enabled_adapter(self) -> bool:
        return not any(layer.disabled for layer in self.lora_layers())

    @property
    def modules_to_save(self) -> set[str] | None:
        return set(self.config_lorafa.modules_to_save or []) or None

    @property
    def base_model_torch_dtype(self):
        return getattr(self.base_model.model, "dtype", None)

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)  # parameters, buffers, submodules
        except AttributeError:
            if name == "base_model":  # not built yet (an attribute looked up during __init__)
                raise
            return getattr(self.base_model.model, name)

    @property
    def config_lorafa(self) -> LoraFAConfig:
        return self.peft_config["default"]

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled() and not self.fast_rows_calibrated:
            fast_adapter.warn_if_uncalibrated(self)
        return self.base_model.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def lora_layers(self) -> list[LoraFALinear]:
        return self.base_model.lora_layers()

    # -- parameters --------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for param in self.parameters():
            n = stored_numel(param)  # a 4-bit parameter counts its unpacked values, as in PEFT
            total += n
            trainable += n if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def _adapter_names(self) -> list[str]:
        """In-memory names of every tensor the adapter file holds."""
        cfg = self.config_lorafa
        names = []
        for name, _ in self.named_parameters():
            if ".lora_A." in name or ".lora_B." in name or "modules_to_save.default." in name:
                names.append(name)
            elif cfg.bias == "all" and name.endswith("bias"):
                names.append(name)
            elif cfg.bias == "lora_only" and name.endswith("base_layer.bias"):
                names.append(name)
        return names

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """{PEFT key: tensor} for every adapter tensor."""
        params = dict(self.named_parameters())
        return {_saved_key(n): params[n] for n in self._adapter_names()}

    # -- save / load -------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, safe_serialization: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None, is_main_process: bool = True,
                        selected_adapters: list[str] | None = None, **_ignored) -> None:
        """Write the adapter in PEFT format. `state_dict`, as in PEFT, replaces the live tensors: a model
        state dict (in-memory names, as transformers' Trainer passes) or {PEFT key: tensor} (as the sharding
        engines pass the full tensors they gathered); only the adapter's tensors are taken from it."""
        if not safe_serialization:
            raise ValueError("save_pretrained: lorafa-scale writes safetensors only (safe_serialization=True)")
        if selected_adapters not in (None, [ADAPTER_NAME]):
            raise ValueError(f"save_pretrained: this model holds one adapter, {ADAPTER_NAME!r}; got {selected_adapters}")
        tensors = self.adapter_state_dict() if state_dict is None else self._adapter_tensors_from(state_dict)
        if not is_main_process:
            return
        fan_in_fan_out = any(layer.backend.fan_in_fan_out for layer in self.lora_layers())
        peft_format.save_adapter(
            save_directory, tensors, self.config_lorafa, self.base_model.resolved_target_modules(), fan_in_fan_out,
        )

    def _adapter_tensors_from(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{PEFT key: tensor} for every adapter tensor, read from a state dict keyed either way."""
        tensors, missing = {}, []
        for name in self._adapter_names():
            key = _saved_key(name)
            tensor = state_dict.get(key, state_dict.get(name))
            if tensor is None:
                missing.append(key)
            tensors[key] = tensor
        if missing:
            raise ValueError(
                f"save_pretrained: state_dict lacks {len(missing)} adapter tensors ({missing[0]}, ...); a frozen A "
                "must be saved too (a state dict that excludes frozen parameters cannot hold it)"
            )
        return tensors

    def load_adapter_weights(self, weights: dict[str, torch.Tensor], source: str = "adapter") -> None:
        """Copy {PEFT key: tensor} into the adapter; every key must match in name and shape.

        Collective under FSDP2 (each rank passes the full tensors and keeps its shard)."""
        params = dict(self.named_parameters())
        expected = {_saved_key(n): n for n in self._adapter_names()}
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise peft_format.AdapterFormatError(
                f"{source}: adapter does not fit this model; missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                f" unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
        with torch.no_grad():
            for key, tensor in weights.items():
                param = params[expected[key]]
                if param.shape != tensor.shape:
                    raise peft_format.AdapterFormatError(
                        f"{source}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                    )
                if isinstance(param, DTensor):  # sharded by FSDP2: every rank passes the full tensor
                    tensor = distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
                param.copy_(tensor)
        for layer in self.lora_layers():
            layer.refresh_b_grad_correction()
        self.fast_rows_calibrated = True  # A comes from the file, calibrated or not when it was saved

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = ADAPTER_NAME, is_trainable: bool = False,
                        **_ignored) -> LoraFAModel:
        """Load an adapter saved here or by PEFT onto `model`; a PEFT LoRA adapter gets its A frozen.

        The arguments are PEFT's (model, model_id, adapter_name, is_trainable); only the name "default"."""
        _check_adapter_name(adapter_name)
        config = peft_format.load_config(model_id)
        config.inference_mode = not is_trainable
        wrapper = cls(model, config)
        wrapper.load_adapter_weights(
            peft_format.load_weights(model_id), str(Path(model_id) / peft_format.WEIGHTS_NAME)
        )
        if not is_trainable:
            wrapper.requires_grad_(False)
            wrapper.eval()
        return wrapper

    def load_adapter(self, model_id, adapter_name: str = ADAPTER_NAME, is_trainable: bool = False,
                     **_ignored) -> None:
        """Replace this model's adapter (A and B) by the one saved in `model_id`, as PEFT's load_adapter does
        for the adapter named "default" (transformers' Trainer resumes a checkpoint this way). The saved
        adapter must have this one's layers, shapes and scaling. is_trainable=False freezes it."""
        _check_adapter_name(adapter_name)
        config = peft_format.load_config(model_id)
        if abs(config.scaling - self.config_lorafa.scaling) > 1e-12 * self.config_lorafa.scaling:
            raise peft_format.AdapterFormatError(
                f"{model_id}: scaling {config.scaling:g} (lora_alpha={config.lora_alpha}, r={config.r}, "
                f"use_rslora={config.use_rslora}) differs from this model's {self.config_lorafa.scaling:g}"
            )
        self.load_adapter_weights(peft_format.load_weights(model_id), str(Path(model_id) / peft_format.WEIGHTS_NAME))
        self.set_requires_grad(ADAPTER_NAME, is_trainable)

    def set_requires_grad(self, adapter_names=ADAPTER_NAME, requires_grad: bool = True) -> None:
        """Make the adapter trainable (B, biases and modules_to_save as configured; A only with
        use_fast_adapter=False) or freeze all of it."""
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            _check_adapter_name(name)
        params = dict(self.named_parameters())
        frozen_a = self.config_lorafa.use_fast_adapter
        for name in self._adapter_names():
            params[name].requires_grad_(requires_grad and not (frozen_a and ".lora_A." in name))

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """PEFT's set_adapter for the one adapter, "default" (inference_mode=True freezes it)."""
        _check_adapter_name(adapter_name)
        if inference_mode:
            self.set_requires_grad(ADAPTER_NAME, False)

    def add_adapter(self, adapter_name: str, *_args, **_kwargs) -> None:
        raise NotImplementedError(
            f"add_adapter({adapter_name!r}): a LoraFAModel holds one adapter, {ADAPTER_NAME!r}; wrap another copy "
            "of the base model for a second one"
        )

    def delete_adapter(self, adapter_name: str) -> None:
        raise NotImplementedError(f"delete_adapter({adapter_name!r}): use unload() to remove the adapter")

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """As PEFT: make the embeddings' output require grad, so checkpointed blocks reach the adapters."""
        if not (getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        return model

    _prepare_model_for_gradient_checkpointing = prepare_model_for_gradient_checkpointing

    def create_or_update_model_card(self, output_dir) -> None:
        """Add PEFT's model-card metadata (library_name, base_model) to output_dir/README.md, as PEFT does;
        transformers' Trainer calls this when it writes a model card."""
        path = Path(output_dir) / "README.md"
        text = path.read_text() if path.is_file() else ""
        if text.startswith("---\n"):
            return  # the card already has metadata (Trainer's own card names the base model)
        meta = ["---", "library_name: peft", "tags:", "- lorafa-scale", "- lora"]
        if self.config_lorafa.base_model_name_or_path:
            meta.insert(2, f"base_model: {self.config_lorafa.base_model_name_or_path}")
        path.write_text("\n".join(meta + ["---", "", text]))

    # -- merge and disable -------------------------------------------------------------------------
    def merge_adapter(self) -> None:
        for layer in self.lora_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold s*B*A into each base weight and return the plain Hugging Face model."""
        return self._remove_adapters(merge=True)

    def unload(self) -> nn.Module:
        """Remove the adapters without merging and return the original Hugging Face model."""
        return self._remove_adapters(merge=False)

    def _remove_adapters(self, merge: bool) -> nn.Module:
        model = self.base_model.model
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraFALinear):
                module.merge() if merge else module.unmerge()
                model.set_submodule(name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                model.set_submodule(name, module.modules_to_save["default"] if merge else module.original_module)
        return model

    @contextmanager
    def disable_adapter(self):
        """Run the bare base model inside the block (merged adapters are unmerged, then merged back)."""
        layers = self.lora_layers()
        wrappers = [m for m in self.modules() if isinstance(m, ModulesToSave)]
        merged = [layer for layer in layers if layer.merged]
        for layer in merged:
            layer.unmerge()
        for m in layers + wrappers:
            m.disabled = True
        try:
            yield
        finally:
            for m in layers + wrappers:
                m.disabled = False
            for layer in merged:
                layer.merge()


def _check_adapter_name(name: str) -> None:
    if name != ADAPTER_NAME:
        raise NotImplementedError(
            f"adapter {name!r}: a LoraFAModel holds one adapter, named {ADAPTER_NAME!r} (PEFT's default name)"
        )


def _unsupported(name: str):
    def method(self, *args, **kwargs):
        raise NotImplementedError(
            f"LoraFAModel.{name}: a PEFT feature lorafa-scale does not implement (one LoRA-FA adapter, "
            f"{ADAPTER_NAME!r}; save with save_pretrained)"
        )

    method.__name__ = name
    return method


_PEFT_COMPATIBLE: list[type] = []


def _peft_compatible_class() -> type:
    """The class every LoraFAModel is built as: LoraFAModel itself, or with PEFT installed a subclass of
    both LoraFAModel and peft.PeftModel. LoraFAModel comes first in its MRO, so our injection, layers, names
    and save/load run; PeftModel's __init__ never runs, and each PeftModel (or PushToHubMixin) member that
    LoraFAModel does not define raises NotImplementedError rather than run PEFT code on our internals.
    PEFT is imported here, on the first model built, not by `import lorafa_scale`."""
    if not _PEFT_COMPATIBLE:
        try:
            from peft import PeftModel as PeftPeftModel
        except ImportError:
            _PEFT_COMPATIBLE.append(LoraFAModel)
            return LoraFAModel
        namespace = {"__module__": __name__, "__qualname__": "LoraFAPeftModel", "__doc__": LoraFAModel.__doc__}
        for klass in PeftPeftModel.__mro__:
            if klass in nn.Module.__mro__:
                continue
            for name, value in vars(klass).items():
                if name.startswith("__") or name in vars(LoraFAModel) or name in namespace:
                    continue
                stub = _unsupported(name)
                namespace[name] = property(stub) if isinstance(value, property) else stub
        cls = type("LoraFAPeftModel", (LoraFAModel, PeftPeftModel), namespace)
        globals()["LoraFAPeftModel"] = cls  # so pickle finds the class by name
        _PEFT_COMPATIBLE.append(cls)
    return _PEFT_COMPATIBLE[0]


def get_peft_model(model: nn.Module, config: LoraFAConfig, *, lean: bool = False, **_ignored) -> LoraFAModel:
    """Wrap `model` with LoRA-FA adapters (PEFT's name for `get_lorafa_model`).

    lean=True also patches a Llama / Mistral / Qwen2 / Qwen3 model so the frozen backbone keeps far less for
    backward (lorafa_scale.lean: chunked output head + loss, SwiGLU and RMSNorm keeping only their inputs);
    in training mode a call with labels then returns the loss and logits=None."""
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    wrapper = LoraFAModel(model, config)
    if lean:
        from . import lean as lean_mode

        lean_mode.apply(wrapper)
    return wrapper


get_lorafa_model = get_peft_model
PeftModel = LoraFAModel
