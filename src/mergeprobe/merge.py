"""Merging LoRA adapters on their dense updates: pure tensor functions, no state.

The **direct merge** is exact task arithmetic, ``W = W0 + Σ_k w_k ΔW_k`` with ΔW = s·B·A
(all ``w_k = 1``). PEFT's ``combination_type="linear"`` is not this: it averages A and B
separately, which adds cross terms B_i A_j. TIES and DARE use PEFT's own ``merge_utils`` on the
dense ΔW, never on the factors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft.utils import merge_utils

from ._util import RESERVED_NAMES
from .adapters import AUTO_CLASS_BY_TASK, find_lora_layers
from .exceptions import InvalidParameterError
from .store import sanitize_name

logger = logging.getLogger(__name__)

MergeMethod = Literal["direct", "mean", "ties", "dare"]
MERGE_METHODS: tuple[str, ...] = ("direct", "mean", "ties", "dare")
DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.5}


@torch.no_grad()
def lora_deltas(model, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Dense ΔW = s·B·A (float32, CPU, ``nn.Linear`` layout out × in) of every LoRA layer,
    keyed by normalized layer name (``encoder.layer.0.attention.self.query``)."""
    return {ref.name: ref.update().dense().cpu() for ref in find_lora_layers(model, adapter_name)}


def merge_deltas(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    method: MergeMethod = "direct",
    weights: Sequence[float] | None = None,
    *,
    density: float | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Merge several adapters' dense updates, layer by layer.

    Args:
        deltas: one ``{layer: ΔW}`` mapping per adapter. A layer only some adapters have is
            merged over those that have it.
        method: ``"direct"`` (Σ w_k ΔW_k, exact task arithmetic), ``"mean"`` (weights 1/n),
            ``"ties"`` (trim to ``density`` by magnitude, elect sign, disjoint mean; PEFT
            ``merge_utils.ties``) or ``"dare"`` (random drop to ``density`` with rescaling,
            then the weighted sum; PEFT ``merge_utils.dare_linear``).
        weights: per-adapter coefficients (default 1 each, 1/n for ``"mean"``; given
            weights win, as in a reweighted group).
        density: kept fraction for TIES (default 0.2) and DARE (default 0.5).
        seed: seeds DARE's random masks, so a merge is reproducible.
    """
    if method not in MERGE_METHODS:
        raise InvalidParameterError(
            f"The 'method' parameter of merge_deltas must be one of {MERGE_METHODS}. Got {method!r} instead."
        )
    n = len(deltas)
    if n == 0:
        raise InvalidParameterError("merge_deltas needs at least one adapter's deltas.")
    weights = _coefficients(method, n, weights)
    if density is None:
        density = DEFAULT_DENSITY.get(method)
    if density is not None and not 0 < density <= 1:
        raise InvalidParameterError(
            f"The 'density' parameter must be in (0, 1]. Got {density!r} instead."
        )
    # merge_utils draws DARE masks from the global generator: seed it, and leave the caller's
    # random state (CPU and CUDA) as it was.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        merged = {}
        for layer in sorted({name for d in deltas for name in d}):
            members = [
                (d[layer].float(), w) for d, w in zip(deltas, weights, strict=True) if layer in d
            ]
            merged[layer] = _merge_layer(members, method, density)
    return merged


def _coefficients(method: str, n: int, weights: Sequence[float] | None) -> list[float]:
    """Each member's coefficient: the given weights (a reweighted group's), else 1 each, or
    1/n for ``mean``."""
    if weights is None:
        return [1.0 / n if method == "mean" else 1.0] * n
    if len(weights) != n:
        raise InvalidParameterError(f"{n} adapters but {len(weights)} weights")
    return [float(w) for w in weights]


def _merge_layer(members, method: str, density: float | None) -> torch.Tensor:
    """One layer's merged ΔW from ``(ΔW_k, w_k)`` pairs, with PEFT's ``merge_utils``."""
    tensors = [t for t, _ in members]
    w = torch.tensor([float(wk) for _, wk in members], dtype=torch.float32)
    if method in ("direct", "mean"):
        return merge_utils.task_arithmetic(tensors, w)
    if method == "ties":
        return merge_utils.ties(tensors, w, density=density)
    return merge_utils.dare_linear(tensors, w, density=density)


# -- merged PEFT adapters on disk ---------------------------------------------------------

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
# Keys a plain LoRA never has: their update is not s·B·A, so no exact ΔW sum exists.
_UNMERGEABLE = {
    "lora_magnitude_vector": "DoRA (a magnitude vector rescales W0 + ΔW per column)",
    "lora_embedding_A": "embedding LoRA",
    "lora_embedding_B": "embedding LoRA",
    "lora_B.bias": "lora_bias=True",
}


@dataclass
class AdapterWeights:
    """A saved LoRA adapter read from disk: its config, factors with their scales, and the
    non-LoRA tensors it carries (task heads, ``modules_to_save``), keys as saved."""

    path: Path
    config: Any
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    extras: dict[str, torch.Tensor]

    @property
    def ranks(self) -> dict[str, int]:
        return {module: int(a.shape[0]) for module, (a, _, _) in self.factors.items()}

    def delta(self, module: str) -> torch.Tensor:
        """Dense ΔW = s·B·A of one module, float32."""
        a, b, s = self.factors[module]
        return s * b.float() @ a.float()

    def deltas(self) -> dict[str, torch.Tensor]:
        """Dense ΔW of every module, keyed as saved."""
        return {module: self.delta(module) for module in self.factors}


def read_adapter(path: str | os.PathLike) -> AdapterWeights:
    """Read a PEFT LoRA adapter directory without loading its base model.

    Scales follow PEFT: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), per module from
    ``rank_pattern`` / ``alpha_pattern`` where they match. Raises ``InvalidParameterError`` for
    a directory that is not a LoRA adapter, a pickle weight file, or a variant whose update is
    not ``s·B·A`` (DoRA, embedding LoRA, LoRA bias).
    """
    from peft import PeftConfig
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise InvalidParameterError(
            f"{path} is not a PEFT adapter directory (no adapter_config.json)"
        )
    _check_weights_file(path)
    weights_file = path / "adapter_model.safetensors"
    config = PeftConfig.from_pretrained(str(path))
    peft_type = str(getattr(getattr(config, "peft_type", None), "value", config.peft_type))
    if peft_type != "LORA":
        raise InvalidParameterError(f"{path} is a {peft_type} adapter; mergeprobe merges LoRA only")
    if getattr(config, "use_dora", False):
        raise InvalidParameterError(
            f"{path} is a DoRA adapter: its update is not s·B·A, so it has no exact ΔW sum; "
            "serve it separately (route)"
        )
    tensors = load_file(str(weights_file))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        for marker, what in _UNMERGEABLE.items():
            if marker in key:
                raise InvalidParameterError(
                    f"{path} is a {what} adapter ({key}): it has no exact ΔW sum; route it"
                )
        match = _LORA_KEY.match(key)
        if match is None:
            extras[key] = tensor
            continue
        if tensor.ndim != 2:
            raise InvalidParameterError(f"{path}: {key} is not a linear LoRA factor (conv LoRA?)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    factors = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise InvalidParameterError(f"{path}: module {module} lacks lora_{'AB'[len(ab) % 2]}")
        r = int(ab["A"].shape[0])
        alpha_key = get_pattern_key(list(config.alpha_pattern or {}), module)
        alpha = float((config.alpha_pattern or {}).get(alpha_key, config.lora_alpha))
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        factors[module] = (ab["A"], ab["B"], scale)
    if not factors:
        raise InvalidParameterError(f"{path} holds no LoRA factors")
    return AdapterWeights(path, config, factors, extras)


def _split(u, s, vh, rank: int | None, tol: float = 1e-6):
    """(B, A) = (U √S, √S Vᴴ) over the singular values above ``tol`` · the largest (exact
    rank), at most ``rank`` of them."""
    keep = int((s > tol * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    keep = max(min(keep, rank) if rank is not None else keep, 1)
    root = s[:keep].sqrt()
    return (u[:, :keep] * root).float(), (root[:, None] * vh[:keep]).float()


def _svd_factors(left: torch.Tensor, right: torch.Tensor, rank: int | None):
    """(B, A) for left @ right truncated to ``rank``, through QR of the factors: never an SVD
    of the full matrix."""
    q_l, r_l = torch.linalg.qr(left.double())
    q_r, r_r = torch.linalg.qr(right.double().T)
    u, s, vh = torch.linalg.svd(r_l @ r_r.T, full_matrices=False)
    return _split(q_l @ u, s, vh @ q_r.T, rank)


def _factor_dense(dense: torch.Tensor, rank: int | None):
    """(B, A) from the SVD of a dense ΔW: exact rank when ``rank`` is None."""
    return _split(*torch.linalg.svd(dense.double(), full_matrices=False), rank)


def merge_adapters(
    adapters: Sequence[AdapterWeights],
    method: MergeMethod = "direct",
    weights: Sequence[float] | None = None,
    *,
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    _layout_checked: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Merged LoRA factors ``{module: (A, B)}`` with scale 1: ``B @ A`` is the merged ΔW.

    ``direct`` / ``mean`` concatenate the members' ranks, exact (PEFT's ``cat``, with the
    scales folded into A); ``rank`` then keeps the top ``rank`` singular directions of the
    exact sum. ``ties`` / ``dare`` work on the dense ΔW of each layer (PEFT ``merge_utils``)
    and factor the result by SVD (exact when ``rank`` is None). Layers only some members
    have are merged over those. ``weights`` are the members' coefficients (default 1 each,
    1/n for ``mean``; given weights win, as in a reweighted group).
    """
    n = len(adapters)
    if n == 0:
        raise InvalidParameterError("merge_adapters needs at least one adapter")
    if method not in MERGE_METHODS:
        raise InvalidParameterError(
            f"The 'method' parameter must be one of {MERGE_METHODS}. Got {method!r} instead."
        )
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise InvalidParameterError(f"rank must be a positive integer or None; got {rank!r}")
    coefficients = _coefficients(method, n, weights)
    if not _layout_checked:  # apply_plan checked (and warned) before writing anything
        _check_same_layout(adapters)
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if density is None:
        density = DEFAULT_DENSITY.get(method)
    # One generator over the modules in sorted order, as merge_deltas draws DARE's masks: the
    # same seed gives the same merge, and layers of one shape get different masks.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in sorted({m for a in adapters for m in a.factors}):
            merged[module] = _merge_module(adapters, coefficients, module, method, rank, density)
    return merged


def _merge_module(adapters, coefficients, module, method, rank, density):
    """Merged (A, B) of one module over the adapters that have it."""
    members = [(a, w) for a, w in zip(adapters, coefficients, strict=True) if module in a.factors]
    if method in ("direct", "mean"):
        factors = [(ad.factors[module], w) for ad, w in members]
        right = torch.cat([float(w) * s * a.float() for (a, _, s), w in factors], dim=0)
        left = torch.cat([b.float() for (_, b, _), _ in factors], dim=1)
        if rank is not None and rank < left.shape[1]:
            left, right = _svd_factors(left, right, rank)
        return right, left
    dense = _merge_layer([(ad.delta(module), w) for ad, w in members], method, density)
    left, right = _factor_dense(dense, rank)
    return right, left


def _check_same_layout(adapters: Sequence[AdapterWeights]) -> None:
    """Raise when the adapters cannot share one base: other shapes or weight layouts."""
    layouts = {bool(getattr(a.config, "fan_in_fan_out", False)) for a in adapters}
    if len(layouts) > 1:
        raise InvalidParameterError("adapters disagree on fan_in_fan_out; they cannot be merged")
    names = {m for a in adapters for m in a.factors}
    for name in names:
        clash = sorted(o for o in names if o != name and o.endswith("." + name))
        if clash:
            raise InvalidParameterError(
                f"the adapters name one layer differently ({name} and {clash[0]}): they were "
                "saved from different model classes (e.g. a task model and the bare encoder); "
                "merge adapters saved from the same class"
            )
    for module in sorted(names):
        shapes = {
            (a.factors[module][1].shape[0], a.factors[module][0].shape[1])
            for a in adapters
            if module in a.factors
        }
        if len(shapes) > 1:
            raise InvalidParameterError(
                f"module {module} has different shapes across adapters ({sorted(shapes)}): "
                "they were trained on different base models"
            )
    bases = {a.config.base_model_name_or_path for a in adapters} - {None, ""}
    if len(bases) > 1:
        logger.warning(
            "mergeprobe: the adapters name different base models (%s); merging them assumes "
            "the same weights under different names",
            ", ".join(sorted(bases)),
        )


def save_merged_adapter(
    merged: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    template: AdapterWeights,
    out: str | os.PathLike,
    *,
    base_model: str | None = None,
    extras: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write merged factors as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    Every module gets the same rank (the largest; smaller ones are zero-padded, which changes
    no product) and ``lora_alpha = r``, so the scale is 1 and no ``rank_pattern`` is needed.
    The directory is written next to ``out`` and renamed into place: never half-written.
    """
    from safetensors.torch import save_file

    out = Path(out)
    r = max(a.shape[0] for a, _ in merged.values())
    state: dict[str, torch.Tensor] = {}
    for module, (a, b) in merged.items():
        pad = r - a.shape[0]
        if pad:
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        state[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        state[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    state.update(extras or {})
    config = dataclasses.replace(
        template.config,
        r=r,
        lora_alpha=r,
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
        use_dora=False,
        target_modules=sorted(merged),
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=None,
        inference_mode=True,
        init_lora_weights=True,
        # Task heads live apart (one per member); with a task type PEFT would expect one head
        # inside the adapter.
        task_type=None,
        base_model_name_or_path=base_model or template.config.base_model_name_or_path,
    )
    with _staged_directory(out) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


@contextlib.contextmanager
def _staged_directory(out: Path):
    """A temporary directory beside ``out``, renamed to ``out`` when the block succeeds and
    removed when it fails: readers never see a half-written result."""
    if out.exists():
        raise InvalidParameterError(f"{out} already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


ROUTING_SCHEMA = "mergeprobe.routing/1"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def _check_plan(plan: Mapping[str, Any]) -> None:
    from .policy import PLAN_SCHEMA

    if not isinstance(plan, Mapping) or plan.get("schema") != PLAN_SCHEMA:
        raise InvalidParameterError(
            f"not a mergeprobe plan (expected schema {PLAN_SCHEMA!r}, got "
            f"{plan.get('schema') if isinstance(plan, Mapping) else type(plan).__name__!r})"
        )
    for key in ("served", "pruned", "adapters"):
        if key not in plan:
            raise InvalidParameterError(f"the plan has no {key!r} entry")


def _resolve_paths(
    plan: Mapping[str, Any], adapter_paths: Mapping[str, str | os.PathLike] | None
) -> dict[str, Path]:
    needed = [m for served in plan["served"] for m in served["members"]]
    paths, missing = {}, []
    for name in needed:
        given = (adapter_paths or {}).get(name) or (plan["adapters"].get(name) or {}).get("path")
        if not given:
            missing.append(name)
            continue
        path = Path(given)
        if not (path / "adapter_config.json").is_file():
            raise InvalidParameterError(
                f"adapter {name!r}: {path} is not a PEFT adapter directory (no adapter_config.json)"
            )
        paths[name] = path
    if missing:
        raise InvalidParameterError(
            "the plan knows no adapter directory for "
            + ", ".join(missing)
            + "; give them as NAME=PATH (adapter_paths / --adapter)"
        )
    return paths


def _is_merged(served: Mapping[str, Any]) -> bool:
    """A served model that merges several adapters (else it serves one adapter as it is)."""
    return served["decision"] != "route" and len(served["members"]) > 1


def _check_served_names(plan: Mapping[str, Any]) -> None:
    seen = set()
    for served in plan["served"]:
        name = str(served.get("name", ""))
        if name != sanitize_name(name) or name in RESERVED_NAMES or name.startswith("."):
            raise InvalidParameterError(
                f"served model name {name!r} is not a safe directory name (letters, digits, "
                f"'.', '_', '-'; not {sorted(RESERVED_NAMES)})"
            )
        if name in seen:
            raise InvalidParameterError(f"two served models are named {name!r}")
        seen.add(name)


def _check_weights_file(path: Path) -> None:
    if not (path / "adapter_model.safetensors").is_file():
        if (path / "adapter_model.bin").is_file():
            raise InvalidParameterError(
                f"{path} holds its weights as adapter_model.bin, a pickle; mergeprobe never loads "
                "pickles. Save it again with save_pretrained(..., safe_serialization=True)."
            )
        raise InvalidParameterError(f"{path} has no adapter_model.safetensors")


def apply_plan(
    plan: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    base_model: str | None = None,
    adapter_paths: Mapping[str, str | os.PathLike] | None = None,
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Carry out a plan (``build_plan``): one PEFT adapter directory per served model.

    Merged groups are written with ``merge_adapters`` (exact ΔW sum by rank concatenation for
    ``direct`` and ``mean``, SVD-factored dense TIES / DARE), each member's task head under
    ``heads/``; routed adapters are copied as they are. ``routing.json`` says which served
    model (and head) answers for every adapter, pruned ones included, and ``mergekit/`` and
    ``peft_merge.py`` give the same merges as mergekit configs and PEFT calls.
    Everything is written to a temporary directory renamed to ``out`` at the end.
    """
    _check_plan(plan)
    out = Path(out)
    if out.exists():  # before the (slow) reading and checking of every adapter
        raise InvalidParameterError(f"{out} already exists; choose a new output directory")
    paths = _resolve_paths(plan, adapter_paths)
    base = base_model or ((plan.get("base_model") or {}).get("name_or_path"))
    # Check every served model first: a bad one fails before anything is written.
    _check_served_names(plan)
    groups: dict[str, list[AdapterWeights]] = {}
    for served in plan["served"]:
        if _is_merged(served):
            groups[served["name"]] = [read_adapter(paths[m]) for m in served["members"]]
            _check_same_layout(groups[served["name"]])
            task_types = {_task_type(a.config) for a in groups[served["name"]]}
            if len(task_types) > 1:
                raise InvalidParameterError(
                    f"group {served['name']} mixes task types {sorted(map(str, task_types))}: "
                    "one merged model serves one kind of head; route the others"
                )
        else:
            _check_weights_file(paths[served["members"][0]])
    models: dict[str, Any] = {}
    routes: dict[str, Any] = {}
    served_list = list(plan["served"])
    if progress:
        from tqdm.auto import tqdm

        served_list = tqdm(served_list, desc="writing served models", unit="model")
    with _staged_directory(out) as tmp:
        for served in served_list:
            name, members = served["name"], list(served["members"])
            target = tmp / name
            if not _is_merged(served):
                target.mkdir()
                for file in _ADAPTER_FILES:
                    if (paths[members[0]] / file).is_file():
                        shutil.copy2(paths[members[0]] / file, target / file)
                config = read_adapter_config(paths[members[0]])
                models[name] = {
                    "path": name,
                    "kind": "route",
                    "members": members,
                    "task_type": _task_type(config),
                    # a routed adapter keeps its own base (a plan may span several)
                    "base_model": config.base_model_name_or_path or base,
                }
                routes[members[0]] = {"model": name, "head": None}
                continue
            method = served.get("method") or "direct"
            weights_map = served.get("weights") or _default_weights(method, members)
            weights = [float(weights_map.get(m, 1.0)) for m in members]
            adapters = groups.pop(name)  # freed once written
            merged = merge_adapters(
                adapters,
                method,
                weights,
                rank=rank,
                density=density,
                seed=seed,
                _layout_checked=True,
            )
            save_merged_adapter(merged, adapters[0], target, base_model=base)
            heads = {}
            for member, adapter in zip(members, adapters, strict=True):
                if adapter.extras:
                    from safetensors.torch import save_file

                    (target / "heads").mkdir(exist_ok=True)
                    head = f"{name}/heads/{sanitize_name(member)}.safetensors"
                    save_file(
                        {k: v.contiguous() for k, v in adapter.extras.items()}, str(tmp / head)
                    )
                    heads[member] = head
                routes[member] = {"model": name, "head": heads.get(member)}
            models[name] = {
                "path": name,
                "kind": served["decision"],
                "method": method,
                "members": members,
                "weights": dict(zip(members, weights, strict=True)),
                "rank": max(a.shape[0] for a, _ in merged.values()),
                "rank_budget": rank,
                "task_type": _task_type(adapters[0].config),
                "base_model": base or adapters[0].config.base_model_name_or_path,
                "predicted": served.get("predicted"),
            }
        for entry in plan["pruned"]:
            twin_route = routes.get(entry["served_by"])
            if twin_route is not None:
                routes[entry["name"]] = {**twin_route, "pruned_in_favour_of": entry["served_by"]}
        manifest = {
            "schema": ROUTING_SCHEMA,
            "base_model": base,
            "models": models,
            "routes": routes,
        }
        (tmp / "routing.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "mergekit").mkdir()
        for name, text in plan_to_mergekit(plan, paths, base, density=density).items():
            (tmp / "mergekit" / f"{name}.yaml").write_text(text)
        ranks = {n: m.get("rank") for n, m in models.items()}
        (tmp / "peft_merge.py").write_text(
            plan_to_peft_calls(
                plan, paths, base, density=density, svd_ranks=ranks, rank_budget=rank, seed=seed
            )
        )
    return manifest


_MERGEKIT_METHOD = {
    "direct": "task_arithmetic",
    "mean": "task_arithmetic",
    "ties": "ties",
    "dare": "dare_linear",
}


def plan_to_mergekit(
    plan: Mapping[str, Any],
    paths: Mapping[str, Path],
    base: str | None,
    *,
    density: float | None = None,
) -> dict[str, str]:
    """One mergekit YAML per merged group (``base+lora`` references; mergekit merges the
    dense weights and writes a full model, not an adapter)."""
    configs = {}
    for served in filter(_is_merged, plan["served"]):
        method = served.get("method") or "direct"
        weights = served.get("weights") or _default_weights(method, served["members"])
        lines = [
            f"# mergeprobe plan: {served['decision']} {', '.join(served['members'])}",
            f"merge_method: {_MERGEKIT_METHOD[method]}",
            f"base_model: {json.dumps(str(base))}",
            "models:",
        ]
        for member in served["members"]:
            lines.append(f"  - model: {json.dumps(f'{base}+{paths[member]}')}")
            lines.append("    parameters:")
            lines.append(f"      weight: {float(weights.get(member, 1.0))!r}")
            if method in DEFAULT_DENSITY:
                lines.append(f"      density: {density or DEFAULT_DENSITY[method]!r}")
        # mergekit normalises TIES / DARE weights by default; the plan's predictions are for
        # the plain weighted sum, as PEFT's merge_utils computes it.
        lines += ["parameters:", "  normalize: false", "dtype: float32", ""]
        configs[served["name"]] = "\n".join(lines)
    return configs


_PEFT_COMBINATION = {"direct": "cat", "mean": "cat", "ties": "ties_svd", "dare": "dare_linear_svd"}


def _default_weights(method: str, members: Sequence[str]) -> dict[str, float]:
    return dict(zip(members, _coefficients(method, len(members), None), strict=True))


def plan_to_peft_calls(
    plan: Mapping[str, Any],
    paths: Mapping[str, Path],
    base: str | None,
    *,
    density: float | None = None,
    svd_ranks: Mapping[str, int | None] | None = None,
    rank_budget: int | None = None,
    seed: int = 0,
) -> str:
    """The plan's merges as a runnable script of PEFT ``add_weighted_adapter`` calls.

    ``python peft_merge.py OUT`` writes one PEFT adapter per merged group under ``OUT``:
    ``cat`` (the exact sum) for direct and mean groups, ``svd`` with ``svd_rank`` under a
    ``rank_budget``, ``ties_svd`` / ``dare_linear_svd`` otherwise. Members are loaded without
    their task heads (``modules_to_save``): PEFT refuses to merge adapters that share a
    ``modules_to_save`` module, and every task keeps its own head.
    """
    groups = list(filter(_is_merged, plan["served"]))
    if not groups:
        return (
            '"""The plan merges nothing: every adapter is served as it is."""\n'
            'print("the plan merges nothing: every adapter is served as it is")\n'
        )
    first = read_adapter_config(paths[groups[0]["members"][0]])
    auto = AUTO_CLASS_BY_TASK.get(_task_type(first) or "", "AutoModel")
    base = base or first.base_model_name_or_path
    lines = [
        '"""The merges of a mergeprobe plan as PEFT calls: `python peft_merge.py OUT`.',
        "",
        "`cat` is the exact ΔW sum, `svd` its best rank-`svd_rank` approximation; the *_svd",
        "types merge dense ΔW and refactor it. The task heads are left out (PEFT refuses to",
        "merge adapters sharing modules_to_save); each task keeps its own head.",
        '"""',
        "import os",
        "import shutil",
        "import sys",
        "import tempfile",
        "",
        "import torch",
        "from peft import LoraConfig, PeftModel, set_peft_model_state_dict",
        "from safetensors.torch import load_file",
        f"from transformers import {auto}",
        "",
        'OUT = sys.argv[1] if len(sys.argv) > 1 else "peft_merged"',
        "",
        "",
        "def lora_only(path):",
        "    config = LoraConfig.from_pretrained(path)",
        "    # the weights are loaded below: no head, no task wrapper, no initialisation to run",
        "    config.modules_to_save, config.task_type, config.init_lora_weights = None, None, False",
        '    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))',
        '    return config, {k: v for k, v in tensors.items() if "lora_" in k}',
        "",
        "",
        "def load(model, path, name):",
        "    config, weights = lora_only(path)",
        "    if model is None:",
        "        model = PeftModel(base, config, adapter_name=name)",
        "    else:",
        "        model.add_adapter(name, config)",
        "    result = set_peft_model_state_dict(model, weights, adapter_name=name)",
        '    missing = [k for k in result.missing_keys if f".{name}." in k]',
        "    if missing:",
        '        raise SystemExit(f"{path}: weights missing for {missing[:3]}")',
        "    return model",
        "",
        "",
        "def merge(members, weights, served, **how):",
        '    name = f"g{len(os.listdir(OUT))}"',
        "    model.add_weighted_adapter(members, weights, adapter_name=name, **how)",
        "    # add_weighted_adapter copies the first member's config: the merged factors have",
        "    # scale 1 (lora_alpha = r), which rsLoRA would turn into sqrt(r)",
        "    model.peft_config[name].use_rslora = False",
        "    with tempfile.TemporaryDirectory() as tmp:",
        "        model.save_pretrained(tmp, selected_adapters=[name])",
        "        shutil.move(os.path.join(tmp, name), os.path.join(OUT, served))",
        "",
        "",
        "os.makedirs(OUT, exist_ok=False)",
        f"torch.manual_seed({int(seed)})  # DARE's masks",
        f"base = {auto}.from_pretrained({str(base)!r})",
        "model = None",
    ]
    index = {}  # PEFT adapter names are module keys: no dots, so use our own
    for served in groups:
        members = served["members"]
        method = served.get("method") or "direct"
        weights = served.get("weights") or _default_weights(method, members)
        for member in members:
            index[member] = f"m{len(index)}"
            path = str(Path(paths[member]).resolve())
            lines.append(f"model = load(model, {path!r}, {index[member]!r})")
        how = f"combination_type={_PEFT_COMBINATION[method]!r}"
        if method in DEFAULT_DENSITY:
            # the *_svd types keep svd_rank directions (default: the largest member rank,
            # lossy); the rank apply_plan wrote keeps the merge exact
            how += f", density={density or DEFAULT_DENSITY[method]!r}"
            svd_rank = (svd_ranks or {}).get(served["name"])
            if svd_rank:
                how += f", svd_rank={int(svd_rank)}"
            how += ", svd_full_matrices=False"
        elif rank_budget is not None:
            how = f"combination_type='svd', svd_rank={int(rank_budget)}, svd_full_matrices=False"
        lines.append(
            f"merge({[index[m] for m in members]!r}, "
            f"{[float(weights.get(m, 1.0)) for m in members]!r}, {served['name']!r}, {how})"
        )
    names = ", ".join(s["name"] for s in groups)
    lines.append(f'print(f"merged adapters written under {{OUT}}: {names}")')
    return "\n".join(lines) + "\n"


def load_served_model(served_dir: str | os.PathLike, adapter: str, *, base_model=None, **kwargs):
    """The model that serves ``adapter`` in an ``apply_plan`` output: the base with its merged
    (or routed) PEFT adapter and the adapter's own task head."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from .probe import _load_peft_model

    served_dir = Path(served_dir)
    manifest_path = served_dir / "routing.json"
    if not manifest_path.is_file():
        raise InvalidParameterError(f"{served_dir} has no routing.json; is it an apply output?")
    manifest = json.loads(manifest_path.read_text())
    route = manifest["routes"].get(adapter)
    if route is None:
        raise InvalidParameterError(
            f"{adapter!r} is not served by {served_dir} (it serves {sorted(manifest['routes'])})"
        )
    model_dir = served_dir / manifest["models"][route["model"]]["path"]
    head = load_file(str(served_dir / route["head"])) if route.get("head") else None
    entry = manifest["models"][route["model"]]
    base = (
        base_model
        if base_model is not None
        else entry.get("base_model") or manifest.get("base_model")
    )
    if isinstance(base, PeftModel):
        raise InvalidParameterError("base_model must be the bare base model, not a PeftModel")
    model, _ = _load_peft_model(
        model_dir, base, head_tensors=head, task_type=entry.get("task_type"), **kwargs
    )
    if head is not None:
        bare = model.get_base_model()
        state = {k.removeprefix("base_model.model."): v for k, v in head.items()}
        result = bare.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise InvalidParameterError(
                f"the head of {adapter!r} does not fit the base model: {result.unexpected_keys}"
            )
    model.eval()
    return model


def read_adapter_config(path: str | os.PathLike):
    """The PEFT config of an adapter directory."""
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(path))


def _task_type(config) -> str | None:
    task = getattr(config, "task_type", None)
    return str(getattr(task, "value", task)) if task else None


@torch.no_grad()
def tune_weights(
    model: torch.nn.Module,
    adapters: Mapping[str, AdapterWeights | str | os.PathLike],
    batches: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
    *,
    init: Mapping[str, float] | None = None,
    bounds: tuple[float, float] = (0.0, 1.5),
    budget: int = 40,
    l1: float = 0.05,
    progress: bool = False,
) -> dict[str, Any]:
    """Per-adapter merge coefficients tuned on a few labelled examples (LoraHub-style).

    Minimises the mean training loss of the direct merge ``W0 + Σ w_k ΔW_k`` over the
    members' own batches (each member scored with its own head, from the adapter's saved
    ``modules_to_save``), plus ``l1 · mean |w|`` as in LoraHub, with derivative-free
    Nelder-Mead from ``init`` (default 1 each) inside ``bounds`` for at most ``budget`` loss
    evaluations. Derivative-free because there are only a handful of coefficients and each
    evaluation is a forward pass over at most ~100 examples per task; no backward pass, no
    optimizer state, nothing to tune. ``model`` is the bare base model (with a task head of
    the right size where heads matter); its weights are restored before returning.

    Returns ``weights``, ``loss`` (tuned) and ``loss_init``, and ``evaluations``.
    ``progress=True`` shows a bar over the loss evaluations.
    """
    import numpy as np
    from scipy.optimize import minimize

    names = list(adapters)
    if not names:
        raise InvalidParameterError("tune_weights needs at least one adapter")
    missing = [n for n in names if not batches.get(n)]
    if missing:
        raise InvalidParameterError(f"no batches for {missing}: every member needs examples")
    low, high = (float(b) for b in bounds)
    if not low < high:
        raise InvalidParameterError(f"bounds must be (low, high) with low < high; got {bounds}")
    if budget < 2:
        raise InvalidParameterError(f"budget must be at least 2 evaluations; got {budget}")
    sandbox = _MergeSandbox(model, adapters)
    calls = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=budget, desc="tuning coefficients", unit="evaluation")

    def loss_of(x: np.ndarray) -> float:
        w = np.clip(x, low, high)
        sandbox.write(dict(zip(names, (float(v) for v in w), strict=True)))
        total = 0.0
        for n in names:
            sandbox.use_head(n)
            losses = [_loss(model, batch) for batch in batches[n]]
            total += sum(losses) / len(losses)
        value = total / len(names) + l1 * float(np.abs(w).mean())
        calls.append((value, w.copy()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{min(c[0] for c in calls):.4f}")
        return value

    x0 = np.array([float((init or {}).get(n, 1.0)) for n in names])
    try:
        first = loss_of(x0)
        step = 0.25 * (high - low)
        simplex = np.vstack([x0] + [x0 + step * np.eye(len(names))[k] for k in range(len(names))])
        minimize(
            loss_of,
            x0,
            method="Nelder-Mead",
            options={"maxfev": budget - 1, "initial_simplex": np.clip(simplex, low, high)},
        )
    finally:
        sandbox.restore()
        if bar is not None:
            bar.close()
    best, weights = min(calls, key=lambda c: c[0])
    return {
        "weights": {n: float(w) for n, w in zip(names, weights, strict=True)},
        "loss": best,
        "loss_init": first,
        "evaluations": len(calls),
    }


class _MergeSandbox:
    """A base model in eval mode into which any weighted sum of the adapters' dense updates
    (``W0 + Σ w_k ΔW_k``, summed in the model's dtype on its device) and any member's saved
    task head can be written; ``restore`` puts the model's own weights, head parameters (the
    same objects) and mode back."""

    def __init__(
        self, model: torch.nn.Module, adapters: Mapping[str, AdapterWeights | str | os.PathLike]
    ):
        loaded = {
            n: a if isinstance(a, AdapterWeights) else read_adapter(a) for n, a in adapters.items()
        }
        _check_same_layout(list(loaded.values()))
        self.model = model
        modules = sorted({m for a in loaded.values() for m in a.factors})
        self.targets = {m: model.get_submodule(m) for m in modules}
        self.original = {m: t.weight.detach().clone() for m, t in self.targets.items()}
        self.deltas = {
            n: {
                m: d.to(device=self.original[m].device, dtype=self.original[m].dtype)
                for m, d in ad.deltas().items()
            }
            for n, ad in loaded.items()
        }
        self.heads = {
            n: {k.removeprefix("base_model.model."): v for k, v in ad.extras.items()}
            for n, ad in loaded.items()
        }
        # the model's own head tensors, as objects: restoring them keeps optimizer references
        self.own_heads = {}
        for key in {k for head in self.heads.values() for k in head}:
            owner, _, attr = key.rpartition(".")
            try:
                module = model.get_submodule(owner) if owner else model
            except AttributeError:
                continue  # no such module: putting that head in place will say so
            # None: an attribute the model lacks, removed again by restore
            self.own_heads[key] = (module, attr, getattr(module, attr, None))
        self.was_training = model.training
        model.eval()

    @torch.no_grad()
    def write(self, weights: Mapping[str, float]) -> None:
        """Write ``W0 + Σ weights[n] ΔW_n`` into every target layer."""
        for m, target in self.targets.items():
            update = sum(w * self.deltas[n][m] for n, w in weights.items() if m in self.deltas[n])
            target.weight.copy_(self.original[m] + update)

    def use_head(self, name: str) -> None:
        """``name``'s saved head; an adapter without one is read through the model's own."""
        self._put_own_heads()
        placed = {}
        for key, value in self.heads[name].items():
            own = self.own_heads.get(key)
            if own is not None and isinstance(own[2], torch.Tensor):
                value = value.to(device=own[2].device, dtype=own[2].dtype)
            placed[key] = value
        _set_tensors(self.model, placed)

    def _put_own_heads(self) -> None:
        for module, attr, value in self.own_heads.values():
            if value is not None:
                setattr(module, attr, value)
            elif hasattr(module, attr):
                delattr(module, attr)

    @torch.no_grad()
    def restore(self) -> None:
        for m, target in self.targets.items():
            target.weight.copy_(self.original[m])
        self._put_own_heads()
        self.model.train(self.was_training)


def _set_tensors(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put tensors in place by name, whatever their shape: task heads differ in size."""
    for key, value in tensors.items():
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        setattr(module, attr, torch.nn.Parameter(value.detach().clone(), requires_grad=False))


def _loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> float:
    """Cross-entropy of a classification batch from the logits (the head's own size, not the
    config's ``num_labels``); the model's own loss otherwise (language modelling)."""
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 1:  # one label per sequence: classification
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return float(torch.nn.functional.cross_entropy(logits.float(), labels))
    return float(model(**batch).loss)
