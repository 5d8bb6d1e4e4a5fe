"""Signatures: what a run, or a finished adapter, leaves in the store.

A signature holds its signals at each probe, fixed-size whatever the rank, plus metadata.
Tensors go to safetensors and metadata to JSON; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load, save

from .exceptions import CorruptSignatureError, IncompatibleSignatureError

SIGNATURE_SCHEMA = "mergeprobe.signature/1"

# Tensor keys of one probe, by signal family. A probe holds the families it could measure.
UPDATE_KEYS = ("update_sketch", "update_norm", "update_entries")
GRADIENT_KEYS = ("grad_sketch", "grad_norm")
DRIFT_KEYS = ("drift_sketch", "drift_norm", "cka")
FAMILIES = {"update": UPDATE_KEYS, "gradient": GRADIENT_KEYS, "drift": DRIFT_KEYS}


@dataclass
class Probe:
    """The signals measured at one step.

    Attributes:
        step: optimizer step of the measurement (``None`` for an adapter with unknown history).
        fraction: ``step / max_steps`` (1.0 for a finished adapter).
        kind: ``"probe"`` inside the horizon, ``"final"`` at the end of training.
        tensors: per-family tensors; layer order is the signature's ``layers`` /
            ``drift_layers`` metadata.
        info: small JSON scalars: ``grad_steps`` (gradient sketches are the mean over the
            first ``grad_steps`` steps; they stop at the horizon, so a final probe carries the
            early mean), ``target_fractions`` (the scheduled fractions this probe serves),
            ``loss``, ``seconds``.
    """

    step: int | None
    fraction: float | None
    kind: str
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def families(self) -> list[str]:
        return [f for f, keys in FAMILIES.items() if all(k in self.tensors for k in keys[:2])]


@dataclass
class Signature:
    """A run's (or a finished adapter's) signals at each probe, with its metadata."""

    name: str
    metadata: dict[str, Any]
    probes: list[Probe] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return list(self.metadata.get("layers", []))

    @property
    def drift_layers(self) -> list[int]:
        return list(self.metadata.get("drift_layers", []))

    def probe(self, fraction: float | None = None, kind: str | None = None) -> Probe:
        """The probe of a given kind, scheduled for ``fraction`` or else the last one before it.

        With neither argument, the last probe. Raises ``KeyError`` when none matches.
        """
        candidates = [p for p in self.probes if kind is None or p.kind == kind]
        if fraction is not None:
            # A probe scheduled for this fraction wins: rounding to whole steps can put it a
            # little after the fraction on short runs.
            targeted = [
                p
                for p in candidates
                if any(abs(t - fraction) < 1e-9 for t in p.info.get("target_fractions", ()))
            ]
            if targeted:
                return targeted[-1]
            candidates = [
                p for p in candidates if p.fraction is not None and p.fraction <= fraction + 1e-9
            ]
        if not candidates:
            raise KeyError(
                f"signature {self.name!r} has no probe matching fraction={fraction}, kind={kind}; "
                f"it has {[(p.kind, p.fraction) for p in self.probes]}"
            )
        return candidates[-1]

    # -- serialization -------------------------------------------------------------------

    def to_bytes(self) -> tuple[bytes, dict[str, Any]]:
        """(safetensors bytes, JSON-able metadata document) for the store."""
        tensors = {}
        probes_meta = []
        for i, probe in enumerate(self.probes):
            for key, tensor in probe.tensors.items():
                tensors[f"probes.{i}.{key}"] = tensor.detach().to("cpu", torch.float32).contiguous()
            probes_meta.append(
                {
                    "step": probe.step,
                    "fraction": probe.fraction,
                    "kind": probe.kind,
                    "info": probe.info,
                }
            )
        # One metadata key only: safetensors writes its metadata map in a per-process random
        # order, and the store names tensor files by the hash of these bytes, so two keys made
        # the same signature hash differently in two processes.
        blob = save(tensors, metadata={"schema": SIGNATURE_SCHEMA})
        document = {
            **self.metadata,
            "schema": SIGNATURE_SCHEMA,
            "name": self.name,
            "probes": probes_meta,
            "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        }
        return blob, document

    @classmethod
    def from_bytes(cls, blob: bytes, document: dict[str, Any]) -> Signature:
        name = document.get("name", "?")
        if document.get("schema") != SIGNATURE_SCHEMA:
            raise CorruptSignatureError(
                f"signature {name!r} has schema {document.get('schema')!r}; this mergeprobe reads "
                f"{SIGNATURE_SCHEMA!r}. Upgrade mergeprobe or recompute the signature."
            )
        if hashlib.sha256(blob).hexdigest() != document.get("tensors_sha256"):
            raise CorruptSignatureError(
                f"signature {name!r}: tensor file does not match its metadata (checksum differs)"
            )
        try:
            tensors = load(blob)
        except Exception as exc:  # safetensors raises its own error types
            raise CorruptSignatureError(f"signature {name!r}: unreadable tensors ({exc})") from exc
        probes = []
        for i, meta in enumerate(document.get("probes", [])):
            prefix = f"probes.{i}."
            probe_tensors = {
                k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)
            }
            probes.append(
                Probe(
                    meta.get("step"),
                    meta.get("fraction"),
                    meta["kind"],
                    probe_tensors,
                    meta.get("info", {}),
                )
            )
        metadata = {
            k: v
            for k, v in document.items()
            if k not in ("schema", "name", "probes", "tensors_sha256", "tensors_file")
        }
        return cls(name=name, metadata=metadata, probes=probes)


def check_compatible(a: Signature, b: Signature) -> None:
    """Raise ``IncompatibleSignatureError`` unless ``a`` and ``b`` can be compared.

    They must share the base model (architecture and base-weights fingerprints), the anchor
    set (when both measured drift) and the sketch sizes.
    """
    base_a, base_b = a.metadata.get("base_model", {}), b.metadata.get("base_model", {})
    for key in ("architecture_fingerprint", "weights_fingerprint"):
        if base_a.get(key) != base_b.get(key):
            raise IncompatibleSignatureError(
                f"signatures {a.name!r} and {b.name!r} were made on different base models: "
                f"{a.name!r} on {base_a.get('name_or_path')!r} ({key} {base_a.get(key)}), "
                f"{b.name!r} on {base_b.get('name_or_path')!r} ({key} {base_b.get(key)}). "
                "Only adapters of the same base model can be merged."
            )
    anchor_a, anchor_b = a.metadata.get("anchor") or {}, b.metadata.get("anchor") or {}
    inputs_differ = (
        "inputs_hash" in anchor_a
        and "inputs_hash" in anchor_b
        and anchor_a["inputs_hash"] != anchor_b["inputs_hash"]
    )
    if anchor_a and anchor_b and (anchor_a.get("hash") != anchor_b.get("hash") or inputs_differ):
        raise IncompatibleSignatureError(
            f"signatures {a.name!r} and {b.name!r} measured drift on different anchor sets: "
            f"{a.name!r} on texts {anchor_a.get('hash')}, inputs {anchor_a.get('inputs_hash')} "
            f"({anchor_a.get('source')}, n={anchor_a.get('n')}, max_length={anchor_a.get('max_length')}), "
            f"{b.name!r} on texts {anchor_b.get('hash')}, inputs {anchor_b.get('inputs_hash')} "
            f"({anchor_b.get('source')}, n={anchor_b.get('n')}, max_length={anchor_b.get('max_length')}). "
            "Use the same anchor set (the built-in default, or the same texts) for every run."
        )
    sketch_a, sketch_b = a.metadata.get("sketch", {}), b.metadata.get("sketch", {})
    if sketch_a != sketch_b:
        raise IncompatibleSignatureError(
            f"signatures {a.name!r} and {b.name!r} use different sketch sizes: "
            f"{json.dumps(sketch_a, sort_keys=True)} and {json.dumps(sketch_b, sort_keys=True)}"
        )
