"""Measuring a probe: the three signal families on one LoRA model, the same way for a run
in training (through the callback) and for a finished adapter on disk."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._util import utc_now
from ._version import __version__
from .adapters import (
    AUTO_CLASS_BY_TASK,
    LoraLayerRef,
    active_adapter_name,
    architecture_fingerprint,
    base_model_name,
    base_weights_fingerprint,
    find_lora_layers,
    full_tensor,
    gathered,
    unwrap_model,
)
from .anchors import DEFAULT_ANCHOR_TEXTS, anchor_hash, tokenize_anchors
from .exceptions import InvalidParameterError, MergeprobeError
from .signals.drift import linear_cka, pool_hidden, sketch_drift
from .signals.gradient import GradientSketcher
from .signals.labels import count_labels, label_summary
from .signals.update import sample_update_entries, sketch_update, update_norm
from .signature import Probe, Signature

logger = logging.getLogger(__name__)


def positive_int(name: str, value: Any, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be an int >= 1. Got {value!r} instead."
        )
    return value


def _logits_to_keep(model: nn.Module) -> dict[str, int]:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        accepts = "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    return {"logits_to_keep": 1} if accepts else {}


def _task_head(model: nn.Module, adapter_name: str) -> tuple[nn.Module, nn.Linear] | None:
    """(the module in the forward pass, the adapter's trained copy) of the one linear task
    head that PEFT trains beside the LoRA factors (``modules_to_save``: a classifier or score
    layer); ``None`` when there is none or several (the head signals are then missing)."""
    found = []
    for module in model.modules():
        copies = getattr(module, "modules_to_save", None)
        if (
            isinstance(copies, nn.ModuleDict)
            and adapter_name in copies
            and isinstance(copies[adapter_name], nn.Linear)
        ):
            found.append((module, copies[adapter_name]))
    return found[0] if len(found) == 1 else None


def _drift_indices(num_hidden: int, max_layers: int) -> list[int]:
    """Hidden-state indices to probe: every layer output (index 0, the embeddings, is not
    touched by LoRA on attention/MLP), thinned evenly to at most ``max_layers``."""
    layers = list(range(1, num_hidden))
    if len(layers) <= max_layers:
        return layers
    if max_layers == 1:
        return [layers[-1]]
    picks = {layers[round(i * (len(layers) - 1) / (max_layers - 1))] for i in range(max_layers)}
    return sorted(picks)


class SignalRecorder:
    """Measures update, gradient and drift signals of one LoRA model at any moment.

    Args:
        model: a ``PeftModel`` (or any model with PEFT LoRA layers), possibly DDP-wrapped.
        adapter_name: the adapter to measure (default: the active one).
        anchor_inputs: tokenized anchor set (``input_ids``, ``attention_mask``...), or ``None``
            to skip drift.
        anchor_info: JSON description of the anchor set (``hash``, ``source``, ``n``...).
        sketch_size: k of the (k, k) update and gradient sketches.
        entry_count: fixed ΔW positions sampled per layer for sign agreement.
        drift_sketch_size: width of each sketched drift matrix (n_anchor, width).
        max_drift_layers: at most this many hidden layers are probed for drift.
        anchor_batch_size: anchor inputs per forward pass.
        on_error: called with the exception when a gradient hook fails.
        strict: raise when a family fails, instead of recording the error and going on.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        adapter_name: str | None = None,
        anchor_inputs: dict[str, torch.Tensor] | None = None,
        anchor_info: dict[str, Any] | None = None,
        sketch_size: int = 32,
        entry_count: int = 256,
        drift_sketch_size: int = 64,
        max_drift_layers: int = 12,
        anchor_batch_size: int = 32,
        on_error: Callable[[BaseException], None] | None = None,
        strict: bool = False,
    ) -> None:
        owner = type(self).__name__
        self.strict = bool(strict)
        self.sketch_size = positive_int("sketch_size", sketch_size, owner)
        self.entry_count = positive_int("entry_count", entry_count, owner)
        self.drift_sketch_size = positive_int("drift_sketch_size", drift_sketch_size, owner)
        self.max_drift_layers = positive_int("max_drift_layers", max_drift_layers, owner)
        self.anchor_batch_size = positive_int("anchor_batch_size", anchor_batch_size, owner)
        self.model = unwrap_model(model)
        self.adapter_name = active_adapter_name(self.model, adapter_name)
        self.layers: list[LoraLayerRef] = find_lora_layers(self.model, self.adapter_name)
        if not self.layers:
            raise MergeprobeError(
                f"no LoRA linear layers with adapter {self.adapter_name!r} found in "
                f"{type(self.model).__name__}; wrap the model with peft.get_peft_model(model, LoraConfig(...))"
            )
        self.anchor_inputs = anchor_inputs
        self.anchor_info = anchor_info
        self.initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.base_pooled: dict[int, torch.Tensor] = {}
        self.base_head_input: torch.Tensor | None = None
        # The task head never changes after wrapping: looked up once, not at every probe.
        self._head = _task_head(self.model, self.adapter_name)
        self.drift_layers: list[int] = []
        # Causal LMs: ask for one position's logits, not (batch, seq, vocab) of them.
        self._forward_kwargs = _logits_to_keep(self.model)
        self.gradient = GradientSketcher(
            {ref.name: ref.module for ref in self.layers},
            {ref.name: ref.shape for ref in self.layers},
            self.sketch_size,
            on_error=on_error,
        )

    # -- setup ---------------------------------------------------------------------------

    @torch.no_grad()
    def capture_initial(self) -> None:
        """Remember factors that do not start at ΔW = 0 (PiSSA, OLoRA...), so ΔW is relative."""
        for ref in self.layers:
            with gathered(ref.parameters()[:2]):
                b = ref.lora_B.detach()  # one gather of a sharded factor, not two
                if bool(b.abs().sum() > 0):
                    self.initial[ref.name] = (
                        ref.lora_A.detach().float().clone(),
                        b.float().clone(),
                    )

    @contextlib.contextmanager
    def _adapter_disabled(self):
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
            return
        for ref in self.layers:
            ref.module.enable_adapters(False)
        try:
            yield
        finally:
            for ref in self.layers:
                ref.module.enable_adapters(True)

    @torch.no_grad()
    def _pooled_hidden_states(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Mean-pooled hidden states of the anchor set, one (n, d) tensor per hidden layer,
        and the (n, d) input of the task head when it reads one vector per input (the pooled
        output of an encoder classifier; ``None`` otherwise)."""
        device = next(p.device for p in self.model.parameters())
        n = int(self.anchor_inputs["input_ids"].shape[0])
        was_training = self.model.training
        head = self._head
        head_chunks: list[torch.Tensor] = []

        def keep_head_input(module, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 2:
                head_chunks.append(args[0].detach().float().cpu())

        hook = None
        try:
            hook = head[0].register_forward_pre_hook(keep_head_input) if head else None
            self.model.eval()  # LoRA dropout off: drift must be deterministic
            chunks: list[list[torch.Tensor]] = []
            for start in range(0, n, self.anchor_batch_size):
                batch = {
                    k: v[start : start + self.anchor_batch_size].to(device)
                    for k, v in self.anchor_inputs.items()
                }
                out = self.model(**batch, **self._forward_kwargs, output_hidden_states=True)
                hidden = getattr(out, "hidden_states", None)
                if hidden is None:
                    raise MergeprobeError(
                        f"{type(self.model).__name__} returned no hidden_states for "
                        "output_hidden_states=True; drift cannot be measured"
                    )
                mask = batch.get("attention_mask")
                chunks.append([pool_hidden(h, mask).cpu() for h in hidden])
        finally:
            self.model.train(was_training)
            if hook is not None:
                hook.remove()
        pooled = [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]
        head_input = torch.cat(head_chunks) if len(head_chunks) == len(chunks) else None
        return pooled, head_input

    def capture_base(self) -> None:
        """Pooled hidden states of the base model on the anchor set (adapter disabled)."""
        if self.anchor_inputs is None:
            return
        with self._adapter_disabled():
            pooled, self.base_head_input = self._pooled_hidden_states()
        self.drift_layers = _drift_indices(len(pooled), self.max_drift_layers)
        self.base_pooled = {i: pooled[i] for i in self.drift_layers}

    # -- measurement ---------------------------------------------------------------------

    @torch.no_grad()
    def measure_update(self) -> dict[str, torch.Tensor]:
        sketches, norms, entries = [], [], []
        for ref in self.layers:
            with gathered(ref.parameters()):
                update = ref.update(self.initial.get(ref.name))
                norms.append(torch.tensor(update_norm(update)))  # exact, by the Gram identity
                sketches.append(sketch_update(update, ref.name, self.sketch_size))
                entries.append(sample_update_entries(update, ref.name, self.entry_count))
        return {
            "update_sketch": torch.stack(sketches),
            "update_norm": torch.stack(norms),
            "update_entries": torch.stack(entries),
        }

    def measure_gradient(self) -> dict[str, torch.Tensor]:
        means = self.gradient.mean()
        if not means:
            return {}
        k = self.sketch_size
        nan = torch.full((k, k), float("nan"))
        sketch = torch.stack([means.get(ref.name, nan) for ref in self.layers])
        # The norm of an unbiased sketch estimates ‖G‖_F; forming G exactly would cost a
        # full (out × in) product per layer and step.
        return {"grad_sketch": sketch, "grad_norm": torch.linalg.norm(sketch.flatten(1), dim=1)}

    def measure_drift(self) -> dict[str, torch.Tensor]:
        if self.anchor_inputs is None or not self.base_pooled:
            return {}
        pooled, head_input = self._pooled_hidden_states()
        sketches, norms, ckas = [], [], []
        for i in self.drift_layers:
            base, adapted = self.base_pooled[i], pooled[i]
            delta = adapted - base
            sketches.append(sketch_drift(delta, i, self.drift_sketch_size))
            norms.append(torch.linalg.norm(delta))
            ckas.append(torch.tensor(linear_cka(base, adapted), dtype=torch.float32))
        out = {
            "drift_sketch": torch.stack(sketches),
            "drift_norm": torch.stack(norms),
            "cka": torch.stack(ckas),
        }
        try:  # a head that cannot be read leaves the drift signals measured
            out.update(self._head_state(head_input))
        except Exception as exc:
            if self.strict:
                raise
            logger.warning("mergeprobe: the task head could not be read (%r); drift is kept", exc)
        return out

    def _head_state(self, head_input: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The trained task head and its input on the anchors, adapted and minus the base's.

        Kept whole (anchors × hidden, about 100 KB): a partner's drift is read through this
        run's head, which a sketch would blur."""
        head = self._head
        base = self.base_head_input
        if head is None or head_input is None or base is None:
            return {}
        linear = head[1]
        with gathered([linear.weight, linear.bias]):
            weight = full_tensor(linear.weight.detach()).float().cpu().clone()
            bias = (
                full_tensor(linear.bias.detach()).float().cpu().clone()
                if linear.bias is not None
                else torch.zeros(weight.shape[0])
            )
        return {
            "head_input": head_input,
            "head_input_drift": head_input - base,
            "head_weight": weight,
            "head_bias": bias,
        }

    def measure(
        self,
        step: int | None,
        fraction: float | None,
        kind: str = "probe",
        info: dict | None = None,
    ) -> Probe:
        """All families that can be measured now, as one probe."""
        start = time.perf_counter()
        info = {**(info or {}), "grad_steps": self.gradient.steps}
        tensors: dict[str, torch.Tensor] = {}
        errors = {}
        for family, measure in (
            ("update", self.measure_update),
            ("gradient", self.measure_gradient),
            ("drift", self.measure_drift),
        ):
            try:  # one family failing leaves the others measured
                tensors.update(measure())
            except Exception as exc:
                if self.strict:
                    raise
                errors[family] = repr(exc)
                logger.warning(
                    "mergeprobe: %s signals failed at step %s (%r); the others are kept",
                    family,
                    step,
                    exc,
                )
        if errors:
            info["errors"] = errors
        info["seconds"] = round(time.perf_counter() - start, 4)
        return Probe(step=step, fraction=fraction, kind=kind, tensors=tensors, info=info)

    # -- metadata ------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Signature metadata: base model, adapter, layers, anchor set, sketch sizes, versions."""
        import peft
        import transformers

        config = getattr(self.model, "config", None)
        peft_config = (getattr(self.model, "peft_config", None) or {}).get(self.adapter_name)
        target_modules = getattr(peft_config, "target_modules", None)
        if isinstance(target_modules, set | list | tuple):
            target_modules = sorted(target_modules)
        return {
            "mergeprobe_version": __version__,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
            "base_model": {
                "name_or_path": base_model_name(self.model),
                "model_type": getattr(config, "model_type", None),
                "architecture_fingerprint": architecture_fingerprint(config)
                if config is not None
                else None,
                "weights_fingerprint": base_weights_fingerprint(self.model),
            },
            "adapter": {
                "adapter_name": self.adapter_name,
                "peft_type": str(
                    getattr(getattr(peft_config, "peft_type", None), "value", None) or "LORA"
                ),
                "task_type": str(getattr(peft_config, "task_type", None) or "") or None,
                "target_modules": target_modules,
                "use_rslora": bool(getattr(peft_config, "use_rslora", False)),
                "use_dora": bool(getattr(peft_config, "use_dora", False)),
                "init_lora_weights": json.loads(
                    json.dumps(getattr(peft_config, "init_lora_weights", True), default=str)
                ),
                "ranks": [ref.rank for ref in self.layers],
                "alphas": [ref.alpha for ref in self.layers],
                "scalings": [ref.scale for ref in self.layers],
                "nonzero_init_layers": sorted(self.initial),
            },
            "layers": [ref.name for ref in self.layers],
            "layer_shapes": [list(ref.shape) for ref in self.layers],
            "drift_layers": list(self.drift_layers),
            "hidden_size": getattr(config, "hidden_size", None),
            "num_hidden_layers": getattr(config, "num_hidden_layers", None),
            "anchor": self.anchor_info if self.anchor_inputs is not None else None,
            "sketch": {
                "update": self.sketch_size,
                "entries": self.entry_count,
                "drift": self.drift_sketch_size,
            },
        }


def resolve_anchor_inputs(
    tokenizer,
    anchor_texts: Sequence[str] | None = None,
    anchor_inputs: dict | None = None,
    max_length: int = 64,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """Tokenized anchors and their description, from user inputs, user texts or the default."""
    if anchor_inputs is not None:
        if "input_ids" not in anchor_inputs:
            raise InvalidParameterError(
                f"The 'anchor_inputs' parameter must be a dict with 'input_ids'. Got keys {sorted(anchor_inputs)} instead."
            )
        inputs = {k: torch.as_tensor(v) for k, v in anchor_inputs.items()}
        info = {
            "hash": anchor_hash(inputs=inputs),
            "source": "inputs",
            "n": int(inputs["input_ids"].shape[0]),
        }
        return inputs, info
    texts = list(anchor_texts) if anchor_texts is not None else list(DEFAULT_ANCHOR_TEXTS)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise InvalidParameterError(
            "The 'anchor_texts' parameter must be a non-empty list of non-empty strings."
        )
    if tokenizer is None:
        return None, None
    inputs = tokenize_anchors(tokenizer, texts, max_length)
    source = "user" if anchor_texts is not None else "default"
    info = {
        "hash": anchor_hash(texts=texts),
        # The same texts tokenized differently (another tokenizer, max length) are other inputs.
        "inputs_hash": anchor_hash(inputs=inputs),
        "source": source,
        "n": len(texts),
        "max_length": max_length,
    }
    return inputs, info


# -- finished adapters ---------------------------------------------------------------------


_HEAD_KEYS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def _head_num_labels(adapter_dir: Path, head_tensors: dict | None = None) -> int | None:
    """The number of labels of a sequence-classification head, from its weights."""
    from safetensors import safe_open

    if head_tensors:
        for key, tensor in head_tensors.items():
            if key.endswith(_HEAD_KEYS):
                return int(tensor.shape[0])
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if key.endswith(_HEAD_KEYS):
                return int(f.get_slice(key).get_shape()[0])
    return None


def _load_peft_model(
    adapter_dir: Path, base_model, torch_dtype=None, head_tensors=None, task_type=None
):
    import transformers
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(adapter_dir))
    if isinstance(base_model, nn.Module):
        return PeftModel.from_pretrained(base_model, str(adapter_dir)), None
    base = base_model or config.base_model_name_or_path
    if not base:
        raise InvalidParameterError(
            f"adapter {str(adapter_dir)!r} names no base model (base_model_name_or_path is empty); "
            "pass base_model='path/or/name'"
        )
    task = str(task_type or getattr(config, "task_type", "") or "")
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if task.endswith("SEQ_CLS"):
        num_labels = _head_num_labels(adapter_dir, head_tensors)
        if num_labels:
            # The adapter's own head replaces whatever head the base checkpoint has.
            kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    auto = getattr(transformers, AUTO_CLASS_BY_TASK.get(task.rsplit(".", 1)[-1], "AutoModel"))
    model = auto.from_pretrained(str(base), **kwargs)
    return PeftModel.from_pretrained(model, str(adapter_dir)), str(base)


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
)


def _load_tokenizer(base_path: str):
    """The base model's tokenizer, or ``None`` (with a warning) when it has none.

    A local directory without tokenizer files is refused up front: transformers would
    otherwise build a placeholder tokenizer that maps every anchor word to [UNK].
    """
    import transformers

    local = Path(base_path)
    if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
        logger.warning(
            "mergeprobe: %s has no tokenizer files; the signature has no drift", base_path
        )
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(base_path)
    except Exception as exc:  # hub name not cached, broken files: drift is optional
        logger.warning(
            "mergeprobe: no tokenizer for %s (%r); the signature has no drift", base_path, exc
        )
        return None


def signature_of_adapter(
    adapter,
    *,
    name: str | None = None,
    base_model=None,
    tokenizer=None,
    anchor_texts: Sequence[str] | None = None,
    anchor_inputs: dict | None = None,
    anchor_max_length: int = 64,
    adapter_name: str | None = None,
    torch_dtype=None,
    sketch_size: int = 32,
    entry_count: int = 256,
    drift_sketch_size: int = 64,
    training_labels: Mapping[Any, int] | Iterable[Any] | None = None,
) -> Signature:
    """The signature of a finished LoRA adapter: its final update and drift (no gradients).

    Args:
        adapter: an adapter directory (``adapter_config.json`` + weights) or a ``PeftModel``.
        name: entry name (default: the directory's name, or the run name of a ``PeftModel``).
        base_model: a path or hub name, or a loaded model, to put the adapter on (default:
            ``base_model_name_or_path`` from the adapter config).
        tokenizer: tokenizer for the anchor texts (default: loaded from the base model path;
            without one, drift is skipped with a warning).
        training_labels: the class labels of the adapter's training rows, or their counts
            (label -> count), for its label room (``head_interference_room``), which the
            callback records for a run; without them the predictors fall back to the head
            interference alone.
    """
    from .store import sanitize_name

    labels = label_summary(count_labels(training_labels)) if training_labels is not None else None

    if isinstance(adapter, str | os.PathLike):
        adapter_dir = Path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise InvalidParameterError(
                f"{str(adapter_dir)!r} is not a PEFT adapter directory (no adapter_config.json)"
            )
        model, base_path = _load_peft_model(adapter_dir, base_model, torch_dtype)
        default_name = adapter_dir.absolute().name
        if tokenizer is None and base_path is not None:
            tokenizer = _load_tokenizer(base_path)
        state_path = adapter_dir / "trainer_state.json"
        history = json.loads(state_path.read_text()) if state_path.is_file() else {}
    else:
        model, default_name, history, adapter_dir = adapter, "adapter", {}, None
    inputs, info = resolve_anchor_inputs(tokenizer, anchor_texts, anchor_inputs, anchor_max_length)
    if inputs is None:
        logger.warning(
            "mergeprobe: no tokenizer or anchor_inputs given; the signature has no drift"
        )
    recorder = SignalRecorder(
        model,
        adapter_name=adapter_name,
        anchor_inputs=inputs,
        anchor_info=info,
        sketch_size=sketch_size,
        entry_count=entry_count,
        drift_sketch_size=drift_sketch_size,
    )
    recorder.capture_base()
    step, max_steps = history.get("global_step"), history.get("max_steps")
    fraction = step / max_steps if step and max_steps else 1.0
    probe = recorder.measure(step=step, fraction=fraction, kind="final")
    metadata = recorder.describe()
    metadata.update(
        source="adapter",
        adapter_path=str(adapter_dir.resolve()) if adapter_dir is not None else None,
        run_id=None,
        created=utc_now(),
        training={"max_steps": max_steps} if max_steps else {},
    )
    if labels is not None:
        metadata["labels"] = labels
    if not math.isclose(fraction, 1.0):
        metadata["note"] = "adapter measured from a checkpoint before the end of its run"
    return Signature(name=sanitize_name(name or default_name), metadata=metadata, probes=[probe])
