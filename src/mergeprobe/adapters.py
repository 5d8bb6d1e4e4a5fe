"""Finding the LoRA layers of a model, reading their factors, and fingerprinting the base."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import torch
from torch import nn

from .signals.update import LowRankUpdate

_WRAPPER_SEGMENTS = re.compile(
    r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|module)(?=\.)"
)
# Config keys that define the shared architecture; everything else (labels, dtype, versions,
# paths) varies per task or per machine and must not make two runs on one base incomparable.
_ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "d_model",
)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded ``DTensor`` (FSDP2): an all-gather, so every rank must
    call it at the same point; any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor, also for a DeepSpeed ZeRO-3 partition (``ds_shape``)."""
    return tuple(getattr(tensor, "ds_shape", None) or tensor.shape)


def gathered(params):
    """A context in which DeepSpeed ZeRO-3 partitions of ``params`` are whole (a no-op
    without ZeRO-3); every rank must enter it together."""
    from peft.utils.integrations import gather_params_ctx

    return gather_params_ctx([p for p in params if p is not None], modifier_rank=None)


@dataclass
class LoraLayerRef:
    """One LoRA-adapted linear layer: normalized name, the module, and its adapter name."""

    name: str
    module: nn.Module
    adapter: str

    @property
    def lora_A(self) -> torch.Tensor:
        return full_tensor(self.module.lora_A[self.adapter].weight)

    @property
    def lora_B(self) -> torch.Tensor:
        return full_tensor(self.module.lora_B[self.adapter].weight)

    @property
    def scale(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def rank(self) -> int:
        return int(self.module.r[self.adapter])

    @property
    def alpha(self) -> float:
        return float(self.module.lora_alpha[self.adapter])

    @property
    def shape(self) -> tuple[int, int]:
        # Shapes of the whole factors, without gathering a sharded or partitioned one.
        a = full_shape(self.module.lora_A[self.adapter].weight)
        b = full_shape(self.module.lora_B[self.adapter].weight)
        return (int(b[0]), int(a[1]))

    @property
    def use_dora(self) -> bool:
        return bool(getattr(self.module, "use_dora", {}).get(self.adapter, False))

    def parameters(self) -> list[torch.Tensor]:
        """The tensors a measurement of ΔW reads (to gather under ZeRO-3)."""
        params = [self.module.lora_A[self.adapter].weight, self.module.lora_B[self.adapter].weight]
        if self.use_dora:
            params += [
                self.module.lora_magnitude_vector[self.adapter].weight,
                self.module.get_base_layer().weight,
            ]
        return params

    def base_weight(self) -> torch.Tensor:
        """The frozen weight in the (out × in) convention, whatever the storage layout
        (dequantized for a 4- or 8-bit base, as PEFT's QDoRA does)."""
        from peft.utils.integrations import dequantize_module_weight

        base = self.module.get_base_layer()
        weight = full_tensor(base.weight)
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            weight = dequantize_module_weight(base)
        return weight.T if getattr(self.module, "fan_in_fan_out", False) else weight

    def update(self, initial: tuple[torch.Tensor, torch.Tensor] | None = None) -> LowRankUpdate:
        """The current ΔW, relative to ``initial`` = (A0, B0) when the adapter did not start at 0.

        For DoRA, the effective update including the magnitude rescaling.
        """
        a0, b0 = initial if initial is not None else (None, None)
        dora = {}
        if self.use_dora:
            dora = {
                "magnitude": full_tensor(self.module.lora_magnitude_vector[self.adapter].weight),
                "base_weight": self.base_weight(),
            }
        return LowRankUpdate(self.lora_A, self.lora_B, self.scale, A0=a0, B0=b0, **dora)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def _base_prefix(model: nn.Module) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "base_model_prefix", None) or None


def normalize_name(name: str, base_prefix: str | None = None) -> str:
    """A layer name that is the same for the bare model, its task wrapper and a PeftModel.

    ``base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight`` and
    ``encoder.layer.0.attention.self.query.weight`` both become
    ``encoder.layer.0.attention.self.query.weight``.
    """
    name = _WRAPPER_SEGMENTS.sub(r"\1", name).lstrip(".")
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    name = name.replace(".base_layer.", ".").replace(".base_layer", "")
    if base_prefix and name.startswith(base_prefix + "."):
        name = name[len(base_prefix) + 1 :]
    return name


def active_adapter_name(model: nn.Module, adapter_name: str | None = None) -> str:
    if adapter_name:
        return adapter_name
    active = getattr(model, "active_adapter", None)
    if isinstance(active, str):
        return active
    if isinstance(active, list | tuple) and active:
        return str(active[0])
    return "default"


def find_lora_layers(model: nn.Module, adapter_name: str | None = None) -> list[LoraLayerRef]:
    """Every linear LoRA layer of ``model`` carrying ``adapter_name``, sorted by name."""
    from peft.tuners.lora import LoraLayer

    model = unwrap_model(model)
    adapter = active_adapter_name(model, adapter_name)
    prefix = _base_prefix(model)
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        if getattr(module.lora_A[adapter], "weight", None) is None:
            continue
        if len(full_shape(module.lora_A[adapter].weight)) != 2:  # conv LoRA: no plain ΔW
            continue
        layers.append(LoraLayerRef(normalize_name(name, prefix), module, adapter))
    return sorted(layers, key=lambda ref: ref.name)


def architecture_fingerprint(config) -> str:
    """Hash of the architecture-defining config keys (not labels, dtype or versions)."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    arch = {k: as_dict[k] for k in _ARCH_KEYS if k in as_dict}
    text_config = as_dict.get("text_config")
    if isinstance(text_config, dict):
        arch["text_config"] = {k: text_config[k] for k in _ARCH_KEYS if k in text_config}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def _excluded(name: str, modules_to_save: set[str]) -> bool:
    if "lora_" in name or "modules_to_save" in name or "original_module" in name:
        return True
    return any(
        name == m or name.startswith(m + ".") or f".{m}." in f".{name}" for m in modules_to_save
    )


@torch.no_grad()
def base_weights_fingerprint(model: nn.Module, samples_per_tensor: int = 64) -> str:
    """Hash of the shared base weights, from a fixed sample of each tensor.

    LoRA factors, task heads and other ``modules_to_save`` are left out: they differ per task.
    Samples are rounded to bfloat16 so the same base loaded in fp32, fp16 or bf16 matches.
    """
    model = unwrap_model(model)
    prefix = _base_prefix(model)
    modules_to_save: set[str] = set()
    for config in (getattr(model, "peft_config", None) or {}).values():
        modules_to_save.update(getattr(config, "modules_to_save", None) or [])
    entries = []
    for name, param in model.named_parameters():
        if _excluded(name, modules_to_save):
            continue
        # FSDP2 shards and ZeRO-3 partitions: the whole tensor, so every rank hashes what one
        # process would (one gather per tensor, once per run).
        with gathered([param]):
            whole = full_tensor(param.detach())
            shape = tuple(whole.shape)  # outside the context a ZeRO-3 partition has shape (0,)
            flat = whole.reshape(-1)
            if flat.numel() == 0:
                continue
            idx = torch.linspace(0, flat.numel() - 1, min(samples_per_tensor, flat.numel()))
            sample = flat[idx.long().to(flat.device)].to(torch.bfloat16).float().cpu()
        entries.append((normalize_name(name, prefix), shape, sample.numpy().tobytes()))
    h = hashlib.sha256()
    for name, shape, data in sorted(entries):
        h.update(f"{name}:{shape}".encode())
        h.update(data)
    return h.hexdigest()[:16]


def base_model_name(model: nn.Module) -> str:
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    for source in (getattr(model, "peft_config", {}) or {}).values():
        name = getattr(source, "base_model_name_or_path", None)
        if name:
            return str(name)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "unknown"))


# The transformers class whose module names a PEFT adapter of each task type was saved with.
AUTO_CLASS_BY_TASK = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
