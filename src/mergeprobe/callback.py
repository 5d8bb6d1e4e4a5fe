"""``MergeProbeCallback``: measures the signals in the first few percent of a LoRA run.

The callback is small and event-driven: it wires Trainer events to the measurement code in
:mod:`mergeprobe.probe` and the writers (store, decision log). It never stops or slows a run
by accident: a probe that fails logs a warning and training goes on (``strict=True`` raises).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ._util import collective_device, utc_now
from .decision_log import DecisionLog
from .exceptions import InvalidParameterError, MergeprobeError
from .policy import (
    PAIR_STATES,
    Policy,
    _check_states,
    _predictor_set,
    _set_name,
    predict_between,
    predict_pairs,
)
from .probe import SignalRecorder, positive_int, resolve_anchor_inputs
from .signals.compare import shared_input_directions
from .signals.labels import LabelCounter
from .signature import Signature
from .store import SignatureStore, sanitize_name

logger = logging.getLogger(__name__)

DEFAULT_STORE_ENV = "MERGEPROBE_STORE"


def _guarded(method):
    """Run a Trainer event; on failure warn (or raise when strict) and keep training."""

    @functools.wraps(method)
    def wrapper(self, args, state, control, **kwargs):
        if not self._active and method.__name__ != "on_train_begin":
            return None
        start = time.perf_counter()
        try:
            return method(self, args, state, control, **kwargs)
        except Exception as exc:
            self.failures.append(f"{method.__name__} at step {state.global_step}: {exc!r}")
            if self.strict:
                raise
            if method.__name__ == "on_train_begin":
                self._active = False
                self._detach()
                logger.warning(
                    "mergeprobe: setup failed (%r); the callback is off for this run and "
                    "training goes on. Pass strict=True to raise instead.",
                    exc,
                )
            else:
                logger.warning(
                    "mergeprobe: %s failed at step %d (%r); training goes on.",
                    method.__name__,
                    state.global_step,
                    exc,
                )
            return None
        finally:
            self.overhead_seconds += time.perf_counter() - start

    return wrapper


def _find_trainer():
    """The Trainer that is calling us, found on the call stack.

    Callbacks are not given the trainer (transformers#38181), and ``Trainer.log`` is the only
    path by which our scalars reach the ``report_to`` integrations, which run before user
    callbacks in ``on_log``.
    """
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover
        return None
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


CHECKPOINT_FILE = "mergeprobe_state.safetensors"
# What a failed hook costs the run's signature, by hook.
HOOK_LOSSES = {
    "gradient": "gradient signals are off",
    "label": "the label room is unknown",
}
# update_input_subspace_excess above which a partner counts as sharing this run's LoRA
# initialisation: 0.28 to 0.49 between same-seed runs of the benchmark at 5 %, at most 0.012
# across seeds (benchmarks/results/input_subspace_eval.md).
SHARED_INIT_EXCESS = 0.1


def _load_checkpoint_state(output_dir, step: int) -> tuple[dict, dict, int, dict]:
    """(anchor inputs, gradient totals, gradient steps, label counts) saved beside
    checkpoint ``step``."""
    path = Path(output_dir or ".") / f"checkpoint-{step}" / CHECKPOINT_FILE
    if not path.is_file():
        return {}, {}, 0, {}
    from safetensors import safe_open

    anchors, totals = {}, {}
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        steps = int(metadata.get("grad_steps", 0))
        labels = {int(k): int(v) for k, v in json.loads(metadata.get("label_counts", "{}")).items()}
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            family, _, name = key.partition(".")
            (anchors if family == "anchor" else totals)[name] = f.get_tensor(key)
    return anchors, totals, steps, labels


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_ranks_ok(ok: bool, model=None) -> bool:
    """``ok`` on every data-parallel rank (a MIN all-reduce); just ``ok`` in one process."""
    if not _distributed():
        return ok
    dist = torch.distributed
    flag = torch.tensor([1 if ok else 0], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _deepspeed_in_use(args) -> bool:
    """Whether the Trainer runs under DeepSpeed (config in the arguments or accelerate's state)."""
    if getattr(args, "deepspeed", None) or getattr(args, "hf_deepspeed_config", None):
        return True
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        if AcceleratorState._shared_state:
            return AcceleratorState().distributed_type == DistributedType.DEEPSPEED
    except Exception:  # an accelerate without these names: not DeepSpeed through accelerate
        pass
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


DEEPSPEED_NOTE = (
    "gradient signals off under DeepSpeed: the engine steps and zeroes gradients inside "
    "backward and keeps its fp16 loss scale to itself; update and drift signals are measured"
)


class MergeProbeCallback(TrainerCallback, ExportableState):
    """Measures mergeability signals early in a LoRA run and writes a signature to a store.

    During the first ``horizon`` fraction of the run it sketches the full-weight gradients of
    every LoRA target layer (on each step) and, at each probe step, the low-rank update
    ΔW = s·B·A and the drift of hidden states from the base model on a fixed anchor set. One
    more probe is taken at the end of training, so that later runs can compare against the
    finished adapter.

    Args:
        store (`str`, `os.PathLike` or [`SignatureStore`], *optional*):
            Where signatures go. Defaults to `$MERGEPROBE_STORE`, else `./mergeprobe-store`.
        run_name (`str`, *optional*):
            Name of this run's store entry. Defaults to `args.run_name`, else the name of
            `args.output_dir`.
        horizon (`float`, *optional*, defaults to 0.05):
            Fraction of `max_steps` within which the signals are captured.
        log_path (`str`, *optional*):
            The JSONL decision log. Defaults to `<output_dir>/mergeprobe.jsonl`.
        probe_fractions (`Sequence[float]`, *optional*):
            Fractions of `max_steps` at which to probe, each in (0, horizon]. Defaults to
            `horizon × (0.2, 0.4, 1.0)`: 1, 2 and 5 % at the default horizon.
        final_probe (`bool`, *optional*, defaults to `True`):
            Probe once more at the end of training.
        anchor_texts (`Sequence[str]`, *optional*):
            Anchor set for drift, tokenized with the Trainer's `processing_class`. Defaults
            to mergeprobe's built-in 64 generic English sentences.
        anchor_inputs (`dict`, *optional*):
            Ready anchor tensors (`input_ids`, `attention_mask`, ...) instead of texts.
        capture_gradients (`bool`, *optional*, defaults to `True`):
            Sketch full-weight gradients inside the horizon.
        report_to_trainer (`bool`, *optional*, defaults to `True`):
            Log compact scalars through `Trainer.log`, so `report_to` loggers get them.
        strict (`bool`, *optional*, defaults to `False`):
            Raise on a failing probe instead of warning and going on.
        sketch_size, entry_count, drift_sketch_size, max_drift_layers, anchor_max_length,
        adapter_name: see [`SignalRecorder`].
        compare_with (`Sequence[str]`, *optional*):
            Store entries to compare with at the horizon. Defaults to every other entry;
            incompatible ones (other base model or anchor set) are skipped with a reason.
        predictor (`str`, `os.PathLike` or `dict`, *optional*):
            A predictor file written by `save_predictors` / `mergeprobe.fit`, used for
            every pair, each partner read at this run's fraction (at its last state if it
            has no probe that early; the partners against each other at their last states,
            as in a plan). Defaults to the ones shipped with mergeprobe (fitted on
            its benchmark): partners that finished training are read at their final state
            with the predictors fitted for that, the others at this run's fraction. A dict
            from states to files (`"early"`: this run beside partners at its fraction,
            `"early_vs_final"`: beside finished partners, `"final"`: finished partners
            beside each other) keeps that per-pair choice with files of one's own; a state
            left out uses the shipped set.
        policy ([`Policy`] or `dict`, *optional*):
            Thresholds of the decision (a dict of `Policy` fields also works). Defaults to
            `Policy()`.
        on_incompatible (`str`, *optional*, defaults to `"continue"`):
            `"stop"` ends training at the horizon when the decision is `route` (incompatible
            with every adapter compared); every rank stops together.

    Example:
        ```python
        trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                          callbacks=[MergeProbeCallback("runs/store")])
        trainer.train()
        ```
    """

    def __init__(
        self,
        store: str | os.PathLike | SignatureStore | None = None,
        run_name: str | None = None,
        horizon: float = 0.05,
        log_path: str | os.PathLike | None = None,
        *,
        probe_fractions: Sequence[float] | None = None,
        final_probe: bool = True,
        anchor_texts: Sequence[str] | None = None,
        anchor_inputs: dict | None = None,
        anchor_max_length: int = 64,
        adapter_name: str | None = None,
        capture_gradients: bool = True,
        report_to_trainer: bool = True,
        strict: bool = False,
        sketch_size: int = 32,
        entry_count: int = 256,
        drift_sketch_size: int = 64,
        max_drift_layers: int = 12,
        compare_with: Sequence[str] | None = None,
        predictor: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
        policy: Policy | None = None,
        on_incompatible: str = "continue",
    ) -> None:
        owner = type(self).__name__
        if on_incompatible not in ("continue", "stop"):
            raise InvalidParameterError(
                f"The 'on_incompatible' parameter of {owner} must be 'continue' or 'stop'. "
                f"Got {on_incompatible!r} instead."
            )
        if isinstance(predictor, Mapping):
            if not predictor:
                raise InvalidParameterError(
                    f"The 'predictor' parameter of {owner} must be a file or a dict from "
                    f"states {', '.join(PAIR_STATES)} to files. Got an empty dict."
                )
            _check_states(predictor, f"The 'predictor' dict of {owner}")
            bad = {k: v for k, v in predictor.items() if not isinstance(v, (str, os.PathLike))}
            if bad:
                raise InvalidParameterError(
                    f"The 'predictor' dict of {owner} maps states to predictor files. Got {bad!r}."
                )
            predictor = {state: os.fspath(path) for state, path in predictor.items()}
        if isinstance(policy, dict):  # from the JSON callback state of a checkpoint
            policy = Policy(**policy)
        if policy is not None and not isinstance(policy, Policy):
            raise InvalidParameterError(
                f"The 'policy' parameter of {owner} must be a mergeprobe.Policy. Got {policy!r} instead."
            )
        if isinstance(compare_with, str):
            compare_with = [compare_with]
        if (
            isinstance(horizon, bool)
            or not isinstance(horizon, int | float)
            or not 0 < horizon <= 1
        ):
            raise InvalidParameterError(
                f"The 'horizon' parameter of {owner} must be a float in (0, 1]. Got {horizon!r} instead."
            )
        if probe_fractions is not None:
            fractions = [float(f) for f in probe_fractions]
            bad = [f for f in fractions if not 0 < f <= horizon + 1e-12]
            if not fractions or bad:
                raise InvalidParameterError(
                    f"The 'probe_fractions' parameter of {owner} must be fractions of the run in "
                    f"(0, horizon={horizon}]. Got {list(probe_fractions)!r} instead."
                )
            probe_fractions = sorted(set(fractions))
        if store is not None and not isinstance(store, str | os.PathLike | SignatureStore):
            raise InvalidParameterError(
                f"The 'store' parameter of {owner} must be a path or a SignatureStore. Got {store!r} instead."
            )
        if run_name is not None and not str(run_name).strip():
            raise InvalidParameterError(f"The 'run_name' parameter of {owner} must be non-empty.")
        self.store = store
        self.run_name = run_name
        self.horizon = float(horizon)
        self.log_path = log_path
        self.probe_fractions = probe_fractions
        self.final_probe = bool(final_probe)
        self.anchor_texts = list(anchor_texts) if anchor_texts is not None else None
        self.anchor_inputs = anchor_inputs
        self.anchor_max_length = anchor_max_length
        self.adapter_name = adapter_name
        self.capture_gradients = bool(capture_gradients)
        self.report_to_trainer = bool(report_to_trainer)
        self.strict = bool(strict)
        self.sketch_size = sketch_size
        self.entry_count = entry_count
        self.drift_sketch_size = drift_sketch_size
        self.max_drift_layers = max_drift_layers
        self.compare_with = list(compare_with) if compare_with is not None else None
        self.predictor = predictor
        self.policy = policy
        self.on_incompatible = on_incompatible
        self.decision: dict[str, Any] | None = None
        # Validate the sizes now, not at the first step.
        for name in (
            "sketch_size",
            "entry_count",
            "drift_sketch_size",
            "max_drift_layers",
            "anchor_max_length",
        ):
            positive_int(name, getattr(self, name), owner)

        # Progress (restored from checkpoints through ExportableState).
        self.run_id: str | None = None
        # Runtime state, rebuilt in on_train_begin.
        self.failures: list[str] = []
        # Wall time spent inside this callback's events (the gradient hooks, which run inside
        # the user's forward and backward passes, are not included).
        self.overhead_seconds = 0.0
        self.signature: Signature | None = None
        self.probe_steps: list[int] = []
        self.horizon_steps = 0
        self._active = False
        self._recorder: SignalRecorder | None = None
        self._labels: LabelCounter | None = None
        self._final_labels: tuple[dict[str, Any] | None] | None = None  # sums after counting
        self._store: SignatureStore | None = None
        self._log: DecisionLog | None = None
        self._trainer = None
        self._targets: dict[int, list[float]] = {}
        self._pending_logs: dict[str, float] = {}
        self._loss: float | None = None
        self._first_loss: tuple[int, float] | None = None
        self._write = False
        self._capture_gradients = bool(capture_gradients)
        self._across_ranks = False
        self._pending: tuple = (None, {}, 0)
        self.notes: list[str] = []

    # -- ExportableState -------------------------------------------------------------------

    def state(self) -> dict:
        store = self._store.path if self._store is not None else self.store
        if isinstance(store, SignatureStore):
            store = store.path
        return {
            "args": {
                "store": str(store) if store is not None else None,
                "run_name": self.run_name_ or self.run_name,
                "horizon": self.horizon,
                "log_path": str(self._log.path) if self._log is not None else self.log_path,
                "probe_fractions": self.probe_fractions,
                "final_probe": self.final_probe,
                "anchor_texts": self.anchor_texts,
                "anchor_max_length": self.anchor_max_length,
                "adapter_name": self.adapter_name,
                "capture_gradients": self.capture_gradients,
                "report_to_trainer": self.report_to_trainer,
                "strict": self.strict,
                "sketch_size": self.sketch_size,
                "entry_count": self.entry_count,
                "drift_sketch_size": self.drift_sketch_size,
                "max_drift_layers": self.max_drift_layers,
                # what the horizon decision depends on, so a resumed run decides the same
                "compare_with": self.compare_with,
                "predictor": (
                    dict(self.predictor)
                    if isinstance(self.predictor, dict)
                    else None
                    if self.predictor is None
                    else str(self.predictor)
                ),
                "policy": dataclasses.asdict(self.policy) if self.policy is not None else None,
                "on_incompatible": self.on_incompatible,
            },
            "attributes": {"run_id": self.run_id},
        }

    @property
    def run_name_(self) -> str | None:
        """The resolved run name (known from ``on_train_begin`` on)."""
        return self.signature.name if self.signature is not None else None

    @property
    def log_path_(self) -> Path | None:
        """The resolved decision-log path (known from ``on_train_begin`` on)."""
        return self._log.path if self._log is not None else None

    @property
    def store_(self) -> SignatureStore | None:
        """The resolved signature store (known from ``on_train_begin`` on)."""
        return self._store

    # -- setup -----------------------------------------------------------------------------

    def _resolve_run_name(self, args) -> str:
        if self.run_name:
            return sanitize_name(self.run_name)
        # TrainingArguments.run_name defaults to output_dir in some versions: prefer the
        # explicit one, else the directory's own name, which is stable across restarts.
        explicit = getattr(args, "run_name", None)
        output_dir = getattr(args, "output_dir", None) or "run"
        if explicit and explicit != output_dir:
            return sanitize_name(explicit)
        return sanitize_name(Path(output_dir).resolve().name)

    def _resolve_store(self, create: bool = True) -> SignatureStore | None:
        if isinstance(self.store, SignatureStore):
            return self.store
        path = Path(self.store or os.environ.get(DEFAULT_STORE_ENV) or "mergeprobe-store")
        return SignatureStore(path) if create or path.is_dir() else None

    def _schedule(self, max_steps: int) -> None:
        self.horizon_steps = max(1, math.ceil(self.horizon * max_steps - 1e-9))
        fractions = self.probe_fractions or [self.horizon * f for f in (0.2, 0.4, 1.0)]
        self._targets: dict[int, list[float]] = {}
        for f in fractions:
            step = min(max(1, round(f * max_steps)), self.horizon_steps)
            self._targets.setdefault(step, []).append(round(f, 12))
        self.probe_steps = sorted(self._targets)
        if len(self.probe_steps) < len(fractions):
            logger.info(
                "mergeprobe: %d steps are too few to probe at %s separately; probing at steps %s",
                max_steps,
                fractions,
                self.probe_steps,
            )

    def _hook_failed(self, exc: BaseException, what: str = "gradient") -> None:
        """A hook inside the user's forward or backward failed: its family goes quiet."""
        self.failures.append(f"{what} hook: {exc!r}")
        if self.strict:
            raise exc
        logger.warning(
            "mergeprobe: the %s hook failed (%r); %s, training goes on.",
            what,
            exc,
            HOOK_LOSSES[what],
        )

    def _detach(self) -> None:
        if self._recorder is not None:
            self._recorder.gradient.detach()
        if self._labels is not None:
            self._labels.detach()

    def _reset(self) -> None:
        """Forget everything of a previous ``train()`` (a callback instance can be reused)."""
        self.failures = []
        self.overhead_seconds = 0.0
        self.signature = None
        self._recorder = None
        self._labels = None
        self._final_labels = None
        self._store = None
        self._log = None
        self._trainer = None
        self._pending_logs = {}
        self._loss = None
        self._first_loss = None
        self.decision = None
        self.notes = []

    @_guarded
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._active = False
        self._detach()  # hooks a previous train() left behind when it raised
        self._reset()
        # Every rank reaches one verdict before each collective part: a rank that switched
        # itself off while the others gather shards (FSDP2, ZeRO-3) or all-reduce gradient
        # sketches would hang the run.
        for part in (self._setup, self._setup_collective):
            error = None
            try:
                part(args, state, model, processing_class)
            except Exception as exc:
                error = exc
            if not _all_ranks_ok(error is None, model):
                raise error or MergeprobeError("mergeprobe setup failed on another rank")
        self._active = True

    def _setup(self, args, state, model, processing_class) -> None:
        """What each rank does on its own: schedule, writers, anchors, the recorder."""
        if model is None:
            raise InvalidParameterError("the Trainer passed no model to the callback")
        if not state.max_steps or state.max_steps <= 0:
            raise InvalidParameterError(
                f"max_steps must be known at train begin, got {state.max_steps}"
            )
        self._schedule(state.max_steps)
        self._write = bool(state.is_world_process_zero)
        self._capture_gradients = self.capture_gradients
        # Fixed for the run, not asked every step: gradients and label counts are summed
        # across ranks when True.
        self._across_ranks = _distributed()
        if self.capture_gradients and _deepspeed_in_use(args):
            self._capture_gradients = False
            self.notes.append(DEEPSPEED_NOTE)
            if self._write:
                logger.warning("mergeprobe: %s", DEEPSPEED_NOTE)
        name = self._resolve_run_name(args)
        # Only the writer creates the store; other ranks read it when it exists (resume).
        self._store = self._resolve_store(create=self._write)
        self._log = DecisionLog(
            self.log_path or os.path.join(args.output_dir or ".", "mergeprobe.jsonl")
        )

        resuming = state.global_step > 0
        anchor_inputs = self.anchor_inputs
        saved_anchors, saved_totals, saved_steps, saved_labels = (
            _load_checkpoint_state(args.output_dir, state.global_step)
            if resuming
            else ({}, {}, 0, {})
        )
        if anchor_inputs is None and saved_anchors:
            anchor_inputs = saved_anchors
        inputs, anchor_info = resolve_anchor_inputs(
            processing_class, self.anchor_texts, anchor_inputs, self.anchor_max_length
        )
        if inputs is None:
            logger.warning(
                "mergeprobe: the Trainer has no processing_class and no anchor_inputs were given; "
                "representation drift is off for run %r",
                name,
            )
        self._recorder = SignalRecorder(
            model,
            adapter_name=self.adapter_name,
            anchor_inputs=inputs,
            anchor_info=anchor_info,
            sketch_size=self.sketch_size,
            entry_count=self.entry_count,
            drift_sketch_size=self.drift_sketch_size,
            max_drift_layers=self.max_drift_layers,
            on_error=self._hook_failed,
            strict=self.strict,
        )
        # The class balance of what the run trains on, up to its horizon (label_room).
        # Saved counts are sums over the ranks: the writer alone starts from them.
        self._labels = LabelCounter(
            saved_labels if self._write else None,
            on_error=functools.partial(self._hook_failed, what="label"),
        )
        if state.global_step < max(self.probe_steps):
            self._labels.attach(model)
        # handed to the collective part of the setup
        self._pending = (name, saved_totals, saved_steps)

    def _setup_collective(self, args, state, model, processing_class) -> None:
        """What every rank does together: read (gathered) factors, base forward, metadata."""
        resuming = state.global_step > 0
        name, saved_totals, saved_steps = self._pending
        if not resuming:
            self._recorder.capture_initial()
        try:
            self._recorder.capture_base()
        except Exception as exc:  # drift is one family of three: lose it, keep the others
            if self.strict:
                raise
            self._recorder.anchor_inputs = None
            self.failures.append(f"drift setup: {exc!r}")
            logger.warning(
                "mergeprobe: drift setup failed (%r); drift is off, the other signals go on", exc
            )

        metadata = self._recorder.describe()
        metadata.update(
            source="training",
            created=utc_now(),
            training={
                "max_steps": state.max_steps,
                "output_dir": str(Path(args.output_dir).resolve()) if args.output_dir else None,
                "horizon": self.horizon,
                "horizon_steps": self.horizon_steps,
                "probe_steps": self.probe_steps,
                "learning_rate": getattr(args, "learning_rate", None),
                "seed": getattr(args, "seed", None),
                "per_device_train_batch_size": getattr(args, "per_device_train_batch_size", None),
                "gradient_accumulation_steps": getattr(args, "gradient_accumulation_steps", None),
                "world_size": getattr(args, "world_size", 1),
            },
        )
        if self.notes:
            metadata["notes"] = list(self.notes)
        self.signature = Signature(name=name, metadata=metadata, probes=[])
        previous = self._previous_entry(name)
        if resuming:
            self._resume_from(previous, state.global_step)
            if saved_steps:  # exact running totals from the checkpoint beat a probe's mean
                self._recorder.gradient.load_state_tensors(saved_totals, saved_steps)
        else:
            if previous is not None and self._write:
                logger.warning(
                    "mergeprobe: store %s already has an entry %r from another run; it will be "
                    "replaced. Pass run_name=... to keep both.",
                    self._store.path,
                    name,
                )
            self.run_id = uuid.uuid4().hex
        self.run_id = self.run_id or uuid.uuid4().hex
        self.signature.metadata["run_id"] = self.run_id
        self._trainer = _find_trainer() if self.report_to_trainer else None

    def _previous_entry(self, name: str) -> Signature | None:
        if self._store is None or name not in self._store:
            return None
        try:
            return self._store.load(name)
        except Exception as exc:  # a corrupt entry of the same name is simply replaced
            logger.warning(
                "mergeprobe: the stored entry %r is unreadable (%r); it will be replaced", name, exc
            )
            return None

    def _resume_from(self, previous: Signature | None, step: int) -> None:
        """Keep this run's probes up to ``step`` and its gradient running total.

        The stored entry is this run's when its ``run_id`` matches the restored callback state
        (``restore_callback_states_from_checkpoint=True``) or, without restored state, when it
        is a training run with the same ``max_steps``, layers and anchor inputs.
        """
        if previous is None:
            return
        meta, current = previous.metadata, self.signature.metadata
        if self.run_id is not None:
            ours = meta.get("run_id") == self.run_id
        else:
            ours = (
                meta.get("source") == "training"
                and (meta.get("training") or {}).get("max_steps")
                == current["training"]["max_steps"]
                and previous.layers == self.signature.layers
            )
        if not ours:
            return
        if (meta.get("anchor") or {}) != (current.get("anchor") or {}):
            logger.warning(
                "mergeprobe: run %r resumes with another anchor set than it started with; its "
                "earlier probes are dropped (pass the same anchor_inputs / anchor_texts to resume)",
                previous.name,
            )
            return
        if (meta.get("adapter") or {}).get("nonzero_init_layers"):
            logger.warning(
                "mergeprobe: run %r started from non-zero LoRA factors; after a resume ΔW is "
                "measured from zero, not from the initial factors",
                previous.name,
            )
        self.run_id = meta.get("run_id")
        # Label counts: the checkpoint's cover exactly the steps before it. Without them the
        # stored ones are right only when counting had ended (the run resumes after its
        # decision); before that they may hold steps after the checkpoint, so counting
        # restarts at the resume.
        labels = meta.get("labels") or {}
        if (
            isinstance(labels.get("counts"), dict)
            and self._labels is not None
            and self._write  # stored counts are sums over the ranks
            and not self._labels.counts
            and step >= max(self.probe_steps)
        ):
            self._labels.counts = {int(k): int(v) for k, v in labels["counts"].items()}
        if meta.get("covariates"):
            current["covariates"] = meta["covariates"]
            self._first_loss = (
                meta["covariates"].get("first_logged_step"),
                meta["covariates"].get("first_logged_loss"),
            )
        probes = [
            p
            for p in previous.probes
            if p.kind == "probe" and p.step is not None and p.step <= step
        ]
        self.signature.probes = probes
        if probes and "grad_sketch" in probes[-1].tensors:
            last = probes[-1]
            steps = int(last.info.get("grad_steps", 0))
            totals = {
                layer: last.tensors["grad_sketch"][i] * steps
                for i, layer in enumerate(previous.layers)
                if bool(torch.isfinite(last.tensors["grad_sketch"][i]).all())
            }
            self._recorder.gradient.load_state_tensors(totals, steps)
        logger.info(
            "mergeprobe: resuming run %r at step %d with %d earlier probes",
            previous.name,
            step,
            len(probes),
        )

    # -- training events -------------------------------------------------------------------

    @_guarded
    def on_save(self, args, state, control, **kwargs):
        # What the JSON callback state that transformers restores cannot hold goes beside the
        # checkpoint: user-given anchor tensors (so a resumed run measures the same drift) and
        # the gradient running totals (so the horizon mean covers every step exactly).
        # Every rank sums the label counts (a collective) before the others return.
        labels = self._label_summary(state.global_step)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not self._write or not folder.is_dir():
            return
        from safetensors.torch import save_file

        anchors = self.anchor_inputs or {}
        tensors = {f"anchor.{k}": torch.as_tensor(v).contiguous() for k, v in anchors.items()}
        gradient = self._recorder.gradient
        tensors.update({f"grad.{k}": v.contiguous() for k, v in gradient.totals().items()})
        if tensors or labels:
            metadata = {"grad_steps": str(gradient.steps)}
            if labels:
                metadata["label_counts"] = json.dumps(labels["counts"])
            save_file(tensors, str(folder / CHECKPOINT_FILE), metadata=metadata)

    @_guarded
    def on_step_begin(self, args, state, control, **kwargs):
        # global_step counts completed steps: the step starting now is global_step + 1.
        if self._capture_gradients and state.global_step < self.horizon_steps:
            self._recorder.gradient.attach()

    @_guarded
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        gradient = self._recorder.gradient
        if not gradient.attached:
            return
        scaler = getattr(optimizer, "scaler", None)
        # fp16: hooks saw gradients of the scaled loss; divide the scale back out.
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        gradient.end_step(scale=scale, reduce_across_ranks=self._across_ranks)
        if state.global_step + 1 >= self.horizon_steps:
            gradient.detach()

    @_guarded
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.probe_steps and not any(
            p.step == state.global_step for p in self.signature.probes
        ):
            self._probe(state, "probe", control)
            if state.global_step == max(self.probe_steps):
                self._decide(state, control)
        if state.global_step >= max(self.probe_steps):  # labels count up to the decision
            self._labels.detach()

    @_guarded
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and isinstance(logs.get("loss"), int | float):
            self._loss = float(logs["loss"])
            if self._first_loss is None:
                self._first_loss = (state.global_step, self._loss)
                self.signature.metadata["covariates"] = {
                    "first_logged_loss": self._loss,
                    "first_logged_step": state.global_step,
                }
        if self._pending_logs and logs is not None and self._trainer is None:
            # No Trainer handle: the console (callbacks after us) still sees the scalars.
            logs.update(self._pending_logs)
            self._pending_logs = {}

    @_guarded
    def on_train_end(self, args, state, control, **kwargs):
        try:
            if self.final_probe:
                self._probe(state, "final", control)
        finally:
            self._detach()
            self._active = False
            self._trainer = None  # do not keep the Trainer (and its model) alive
            self._recorder = None
            self._labels = None

    # -- probing ---------------------------------------------------------------------------

    def _label_summary(self, step: int) -> dict[str, Any] | None:
        """The run's label counts, summed over data-parallel ranks (every rank calls this)."""
        if self._labels is None:
            return None
        # Counting ends at the decision step on every rank alike, so from then on the sums
        # are final: later checkpoints and the final probe reuse them without a collective.
        if self._final_labels is not None and step >= max(self.probe_steps):
            return self._final_labels[0]
        summary = self._labels.summary(across_ranks=self._across_ranks)
        if step >= max(self.probe_steps):
            self._final_labels = (summary,)
        return summary

    def _probe(self, state, kind: str, control=None) -> None:
        step, max_steps = state.global_step, state.max_steps
        info = {
            "loss": self._loss,
            "target_fractions": self._targets.get(step, []) if kind == "probe" else [1.0],
        }
        probe = self._recorder.measure(step, step / max_steps, kind, info=info)
        self.signature.probes.append(probe)
        labels = self._label_summary(step)
        if labels is not None:
            self.signature.metadata["labels"] = labels
        self.signature.metadata["updated"] = utc_now()
        summary = self._summary(probe)
        if self._write:
            with self._writer_io(f"writing the {kind} at step {step}"):
                self._store.save(self.signature)
                self._log.write(
                    kind,
                    run=self.signature.name,
                    step=step,
                    max_steps=max_steps,
                    signals=summary,
                    store=str(self._store.path),
                    overhead_seconds=round(self.overhead_seconds, 3),
                    **({"notes": list(self.notes)} if self.notes else {}),
                )
        scalars = {f"mergeprobe/{k}": v for k, v in summary.items() if isinstance(v, float)}
        self._emit(scalars, control)

    def _decision_record(self) -> dict[str, Any]:
        """Compare this run with the store and decide (world process zero only)."""
        sets = self._predictor_sets()
        predictors, meta = sets["early"]
        finished, finished_meta = sets.get("early_vs_final", (None, {}))
        policy = self.policy or Policy()
        names = self.compare_with
        if names is None:
            names = [n for n in self._store.names() if n != self.signature.name]
        partners, skipped = [], []
        for name in names:
            try:
                partners.append(self._store.load(name))
            except Exception as exc:  # a corrupt or vanished entry must not stop the decision
                skipped.append({"with": name, "skipped": repr(exc)})
        pairs, notes = predict_pairs(
            self.signature, partners, predictors, against_finished=finished
        )
        between, between_note = self._partner_pairs(policy, pairs, partners, sets)
        decision = policy.decide(self.signature.name, pairs, between)
        method = decision.method or policy.methods[0]
        by_name = {n["with"]: n for n in notes}
        pair_records = [{**p.as_record(method), **by_name.get(p.other, {})} for p in pairs]
        reasons = list(decision.reasons)
        for note in [*skipped, *(n for n in notes if "skipped" in n)]:
            reasons.append(f"not compared with {note['with']}: {note['skipped']}")
        reasons.extend(n["layers_note"] for n in notes if n.get("layers_note"))
        if between_note:
            reasons.append(between_note)
        compared = {p.other for p in pairs}
        shared = self._shared_initialisation([s for s in partners if s.name in compared])
        if shared:
            reasons.append(shared)

        return {
            "decision": decision.decision,
            "reasons": reasons,
            "pairs": pair_records,
            "set": decision.set_record(),
            "weights": decision.weights,
            "tau": policy.tau,
            "predictor": {
                "name": meta["name"],
                "version": meta.get("mergeprobe_version"),
                "trained_on": meta.get("trained_on"),
                **(
                    {
                        "against_finished": {
                            "name": finished_meta["name"],
                            "trained_on": finished_meta.get("trained_on"),
                        }
                    }
                    if finished is not None
                    else {}
                ),
                # what weighed the partners against each other (finished ones: the final set)
                **(
                    {"between": {"name": _set_name("final", self._given("final"))}}
                    if between is not None
                    else {}
                ),
            },
        }

    @property
    def _one_file(self) -> bool:
        """Whether one predictor file predicts every pair (else a set per state)."""
        return self.predictor is not None and not isinstance(self.predictor, dict)

    def _given(self, state: str):
        """The file given for the pairs of ``state``, or None for the shipped set."""
        return self.predictor if self._one_file else (self.predictor or {}).get(state)

    def _predictor_sets(self) -> dict[str, tuple[dict, dict]]:
        """(predictors, record) per state: one file for every pair (``"early"`` only), else a
        set per state, the user's file where given, else the shipped one."""
        if self._one_file:
            return {"early": _predictor_set("early", self.predictor)}
        # the final set weighs partners against each other only; predict_between loads the
        # shipped one itself when it is needed (README's decision timings assume this)
        states = [s for s in PAIR_STATES if s != "final" or self._given(s) is not None]
        sets = {state: _predictor_set(state, self._given(state)) for state in states}
        # files of one's own may cover fewer merge methods than the shipped ones
        methods = set.intersection(*(set(p) for p, _ in sets.values()))
        if not methods:
            raise InvalidParameterError(
                "the predictor files given per state share no merge method: "
                + "; ".join(f"{s}: {sorted(p)}" for s, (p, _) in sets.items())
            )
        return {
            s: ({m: v for m, v in p.items() if m in methods}, record)
            for s, (p, record) in sets.items()
        }

    def _partner_pairs(
        self, policy: Policy, pairs, partners, sets
    ) -> tuple[list | None, str | None]:
        """Predictions among the partners that could join this run (both sides >= tau under
        some method), so the decision keeps every member of the group >= tau, not only this
        run. On failure the decision weighs each partner against this run only, and says so."""
        candidates = {
            p.other for p in pairs if any(p.keeps_both(m, policy.tau) for m in policy.methods)
        }
        chosen = [s for s in partners if s.name in candidates]
        if len(chosen) < 2:
            return None, None
        try:
            methods = list(policy.methods)
            if self._one_file:
                # one file for every pair, as in a plan: partners at their last states
                return predict_between(chosen, sets["early"][0], methods=methods), None
            loaded = {state: predictors for state, (predictors, _) in sets.items()}
            return predict_between(chosen, sets=loaded, methods=methods), None
        except Exception as exc:
            if self.strict:
                raise
            logger.warning("mergeprobe: partners not weighed against each other (%r)", exc)
            return None, (
                f"the partners could not be weighed against each other ({exc!r}): each is "
                "weighed against this run only"
            )

    def _shared_initialisation(self, partners) -> str | None:
        """Advice when this run's updates read the same input directions as some partners'
        (the same seed gives the same LoRA A rows), which makes merges worse; a failure to
        tell leaves the decision as it is."""
        try:
            excess = shared_input_directions(self.signature, partners)
        except Exception as exc:
            if self.strict:
                raise
            logger.warning("mergeprobe: shared initialisation not checked (%r)", exc)
            return None
        shared = sorted(
            ((v, n) for n, v in excess.items() if v >= SHARED_INIT_EXCESS), reverse=True
        )
        if not shared:
            return None
        names = ", ".join(n for _, n in shared[:3])
        if len(shared) > 3:
            names += f" and {len(shared) - 3} more"
        return (
            f"this run shares its LoRA initialisation with {names}: their updates read the "
            f"same input directions (input-subspace overlap up to {shared[0][0]:.2f} above "
            "chance), as adapters trained with the same seed do, and such merges keep less "
            "(benchmark: 0.052 less retention per pair, 39 % of pairs below 0.9 against 15 %); "
            "give each adapter its own seed"
        )

    def _decide(self, state, control) -> None:
        """At the horizon: write a decision; with on_incompatible="stop", stop on "route"."""
        stop = False
        if self._write:
            started = time.perf_counter()
            try:
                record = self._decision_record()
            except Exception as exc:
                if self.strict:
                    raise
                logger.warning("mergeprobe: no decision at step %d (%r)", state.global_step, exc)
                record = {
                    "decision": "route",
                    "reasons": [f"no prediction could be made ({exc!r}); serve it separately"],
                    "pairs": [],
                    "set": {"members": [self.signature.name]},
                    "predictor": {
                        "name": _set_name("early", self._given("early")),
                        "version": None,
                    },
                    "failed": True,
                }
            # One-time cost (loads every partner and the predictor); benchmarks/overhead.py
            # reports it against the size of the store.
            record["overhead_seconds"] = round(time.perf_counter() - started, 4)
            self.decision = record
            with self._writer_io(f"writing the decision at step {state.global_step}"):
                self._log.write(
                    "decision",
                    run=self.signature.name,
                    step=state.global_step,
                    max_steps=state.max_steps,
                    **record,
                )
            retentions = [p["retention_self"] for p in record["pairs"]]
            scalars = {
                "mergeprobe/compared": float(len(retentions)),
                "mergeprobe/decision_route": float(record["decision"] == "route"),
            }
            if retentions:
                scalars["mergeprobe/retention_min"] = float(min(retentions))
            self._emit(scalars, control)
            stop = (
                self.on_incompatible == "stop"
                and record["decision"] == "route"
                and bool(record["pairs"])
            )
        # Every rank must take the same decision to stop, or the others hang in a collective.
        if not _all_ranks_ok(not stop):
            control.should_training_stop = True
            if self._write:
                self._log.write(
                    "stopped",
                    run=self.signature.name,
                    step=state.global_step,
                    max_steps=state.max_steps,
                    reasons=[
                        "predicted incompatible with every adapter compared (route); "
                        "on_incompatible='stop'"
                    ],
                )

    @contextlib.contextmanager
    def _writer_io(self, what: str):
        """File writes of world process zero. A failure here must not skip the collectives
        that follow on this rank alone (the others would wait for it forever): warn, go on."""
        try:
            yield
        except Exception as exc:
            self.failures.append(f"{what}: {exc!r}")
            if self.strict and not _distributed():
                raise
            logger.warning("mergeprobe: %s failed (%r); training goes on", what, exc)

    def _emit(self, scalars: dict[str, float], control) -> None:
        # Trainer.log ends in on_log, which clears control.should_log: without restoring it, a
        # probe on a logging step would swallow the Trainer's own loss record for that step.
        if self._trainer is not None:
            should_log = control.should_log if control is not None else None
            # The base class's log, not an override: TRL's SFTTrainer.log averages and clears
            # its pending metrics (entropy, num_tokens...) into whatever record it is given,
            # which would split the user's own metrics across our records.
            from transformers import Trainer

            Trainer.log(self._trainer, scalars)
            if control is not None:
                control.should_log = should_log
        else:
            self._pending_logs.update(scalars)

    @staticmethod
    def _summary(probe) -> dict[str, Any]:
        t = probe.tensors
        summary: dict[str, Any] = {
            "families": probe.families,
            "probe_seconds": float(probe.info["seconds"]),
        }
        if "update_norm" in t:
            summary["update_norm"] = float(t["update_norm"].square().sum().sqrt())
        if "grad_norm" in t:
            summary["grad_norm"] = float(t["grad_norm"].nan_to_num(0).square().sum().sqrt())
        if "cka" in t:
            summary["drift"] = float((1 - t["cka"]).mean())
            summary["cka_min"] = float(t["cka"].min())
        return summary
