"""Policy: predicted retentions → merge / reweight / prune / route, with reasons (design §5).

``Policy.decide`` answers for one run against the adapters it was compared with (what the
callback writes at the horizon); ``Policy.plan`` groups a whole set of adapters into as few
served models as keep every member's predicted retention at or above ``tau``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._util import RESERVED_NAMES, clean_json
from .exceptions import InvalidParameterError, MergeprobeError
from .predictor import METHODS, RetentionPredictor, _as_float, _signals_read, set_retention

__all__ = [
    "PLAN_SCHEMA",
    "Decision",
    "PairPrediction",
    "Policy",
    "build_plan",
    "predict_between",
    "predict_pairs",
]

DECISIONS = ("merge", "reweight", "prune", "route")


@dataclasses.dataclass(frozen=True)
class PairPrediction:
    """Predicted retentions of ``self`` and ``other`` when merged, per merge method.

    ``retention_self[m]`` is ``R_{self|other}`` under method ``m``; ``interval[m]`` its
    [low, high]. ``redundancy`` is a similarity in [-1, 1] (drift cosine) used for pruning.
    ``signals[m]``: the signals ``retention_self[m]`` was predicted from, with their values
    (``None``: missing, imputed).
    """

    self: str
    other: str
    retention_self: Mapping[str, float]
    retention_other: Mapping[str, float]
    interval: Mapping[str, tuple[float, float]]
    redundancy: float = math.nan
    signals: Mapping[str, Mapping[str, float | None]] = dataclasses.field(default_factory=dict)

    def keeps_both(self, method: str, tau: float) -> bool:
        """Whether both sides are predicted at or above ``tau`` under ``method``."""
        return (
            self.retention_self.get(method, -math.inf) >= tau
            and self.retention_other.get(method, -math.inf) >= tau
        )

    def as_record(self, method: str = "direct") -> dict[str, Any]:
        return {
            "with": self.other,
            "method": method,
            "retention_self": self.retention_self.get(method),
            "retention_other": self.retention_other.get(method),
            "interval": list(self.interval[method]) if method in self.interval else None,
            "redundancy": self.redundancy,
            **({"signals": dict(self.signals[method])} if method in self.signals else {}),
        }


@dataclasses.dataclass
class Decision:
    """What to do with one adapter, why, and with whom."""

    decision: str
    reasons: list[str]
    method: str | None = None
    members: list[str] = dataclasses.field(default_factory=list)
    weights: dict[str, float] | None = None
    predicted_mean: float | None = None
    predicted_min: float | None = None

    def set_record(self) -> dict[str, Any]:
        return {
            "members": self.members,
            "method": self.method,
            "predicted_mean": self.predicted_mean,
            "predicted_min": self.predicted_min,
        }


@dataclasses.dataclass(frozen=True)
class Policy:
    """Thresholds that turn predicted retentions into decisions.

    Parameters
    ----------
    tau : float
        Smallest acceptable predicted retention of every member of a merged group.
    prune_similarity : float
        Two adapters whose drift cosine is at or above this are redundant: one is pruned.
    methods : sequence of str
        Merge methods to try, in order of preference; the first is the direct merge, the
        others count as reweighting.
    """

    tau: float = 0.9
    prune_similarity: float = 0.9
    methods: Sequence[str] = ("direct", "mean", "ties", "dare")

    def __post_init__(self) -> None:
        if not 0 < self.tau <= 1.5:
            raise InvalidParameterError(f"tau must lie in (0, 1.5]; got {self.tau!r}")
        if not -1 <= self.prune_similarity <= 1:
            raise InvalidParameterError(
                f"prune_similarity must lie in [-1, 1]; got {self.prune_similarity!r}"
            )
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise InvalidParameterError(f"methods must be a non-empty subset of {METHODS}")

    @staticmethod
    def weights_for(method: str, members: Sequence[str]) -> dict[str, float] | None:
        """Coefficients of each member's ΔW under ``method`` (None: plain sum)."""
        if method == "mean":
            return {m: 1.0 / len(members) for m in members}
        return None

    def decide(
        self,
        name: str,
        pairs: Sequence[PairPrediction],
        partner_pairs: Iterable[PairPrediction] | None = None,
    ) -> Decision:
        """Decision for adapter ``name`` given its predictions against other adapters.

        ``partner_pairs`` (predictions among the partners themselves, ``self`` and ``other``
        both partners) makes the group's worst member count: a partner joins only while every
        member's predicted set retention, the partners' damage from each other included,
        stays at or above ``tau``, and two partners without a prediction between them are
        not merged together. Without it, each partner is weighed against this run only.
        """
        if not pairs:
            return Decision(
                "merge",
                [
                    "no compatible signature to compare with: nothing is predicted to conflict; "
                    "add finished adapters to the store to get a real decision"
                ],
                members=[name],
            )
        redundant = [p for p in pairs if p.redundancy >= self.prune_similarity]
        if redundant:
            best = max(redundant, key=lambda p: p.redundancy)
            return Decision(
                "prune",
                [
                    f"redundant with {best.other}: drift cosine {best.redundancy:.2f} >= "
                    f"{self.prune_similarity:.2f}; {best.other} already delivers this gain"
                ],
                members=[name, best.other],
            )
        between = None
        if partner_pairs is not None:
            between = {(p.self, p.other): p for p in partner_pairs}
        for method in self.methods:
            fits = [p for p in pairs if p.keeps_both(method, self.tau)]
            if not fits:
                continue
            # Partners enter in order of the smaller predicted retention, as long as every
            # member's set retention stays above tau (the first always fits).
            fits.sort(key=lambda p: -min(p.retention_self[method], p.retention_other[method]))
            chosen, others = self._group(fits, method, between)
            own = set_retention([p.retention_self[method] for p in chosen])
            members = [name, *(p.other for p in chosen)]
            reasons = [
                f"predicted retention with {p.other} under the {method} merge: "
                f"{p.retention_self[method]:.3f} (this run), {p.retention_other[method]:.3f} "
                f"({p.other}) >= tau {self.tau:.2f}"
                for p in chosen
            ]
            if between is not None and len(chosen) > 1:
                reasons.append(
                    f"predicted set retention of every member under the {method} merge: "
                    + ", ".join(
                        f"{m} {v:.3f}" for m, v in zip(members, [own, *others], strict=True)
                    )
                    + f" (all >= tau {self.tau:.2f}, the partners' damage to each other "
                    "included)"
                )
            if method != self.methods[0]:
                reasons.insert(
                    0,
                    f"the {self.methods[0]} merge falls below tau {self.tau:.2f} with every "
                    f"adapter; the {method} merge keeps it",
                )
            return Decision(
                "merge" if method == self.methods[0] else "reweight",
                reasons,
                method=method,
                members=members,
                weights=self.weights_for(method, members),
                predicted_mean=(own + sum(others)) / (1 + len(others)),
                predicted_min=min([own, *others]),
            )
        worst = min(pairs, key=lambda p: p.retention_self.get(self.methods[0], math.inf))
        return Decision(
            "route",
            [
                f"no merge method keeps both this run and any partner at or above tau "
                f"{self.tau:.2f} (worst: {worst.retention_self.get(self.methods[0], math.nan):.3f}"
                f" with {worst.other} under the {self.methods[0]} merge); serve it separately"
            ],
            members=[name],
        )

    def _group(
        self,
        fits: Sequence[PairPrediction],
        method: str,
        between: Mapping[tuple[str, str], PairPrediction] | None,
    ) -> tuple[list[PairPrediction], list[float]]:
        """``decide``'s greedy: ``fits`` in order, each kept if every member stays >= tau.
        Returns the partners chosen and each one's predicted set retention in the group."""

        def between_retention(a: str, b: str) -> float:
            if (a, b) in between:
                value = between[(a, b)].retention_self.get(method, -math.inf)
            elif (b, a) in between:
                value = between[(b, a)].retention_other.get(method, -math.inf)
            else:
                value = -math.inf  # not predicted: counts as incompatible
            return value if math.isfinite(value) else -math.inf

        chosen: list[PairPrediction] = []
        # each chosen partner's pairwise retentions in the group: with the run, then the others
        partner_sides: list[list[float]] = []
        for p in fits:
            if set_retention([q.retention_self[method] for q in [*chosen, p]]) < self.tau:
                continue
            if between is None:
                sides = [*partner_sides, [p.retention_other[method]]]
            else:
                sides = [
                    [*side, between_retention(q.other, p.other)]
                    for side, q in zip(partner_sides, chosen, strict=True)
                ]
                sides.append(
                    [
                        p.retention_other[method],
                        *(between_retention(p.other, q.other) for q in chosen),
                    ]
                )
                if min(set_retention(side) for side in sides) < self.tau:
                    continue
            partner_sides = sides
            chosen.append(p)
        return chosen, [set_retention(side) for side in partner_sides]

    def plan(self, names: Sequence[str], pairs: Iterable[PairPrediction]) -> list[Decision]:
        """Greedy grouping of ``names`` into as few merged models as keep all members ≥ tau.

        Adapters are placed hardest first (lowest mean predicted retention); each joins the
        existing group and method whose worst member stays highest, if that is ≥ tau.
        Pairs missing a prediction count as incompatible.
        """
        names = list(dict.fromkeys(names))
        index = {n: i for i, n in enumerate(names)}
        n = len(names)
        retention = {m: np.full((n, n), -np.inf) for m in self.methods}
        redundancy = np.full((n, n), np.nan)
        for p in pairs:
            if p.self not in index or p.other not in index:
                continue
            i, j = index[p.self], index[p.other]
            for m in self.methods:
                if m in p.retention_self:
                    retention[m][i, j] = p.retention_self[m]
            redundancy[i, j] = p.redundancy
        return self.plan_matrix(names, retention, redundancy)

    def plan_matrix(
        self,
        names: Sequence[str],
        retention: Mapping[str, Any],
        redundancy: Any,
    ) -> list[Decision]:
        """``plan`` on matrices: ``retention[m][i, j]`` is ``R_{i|j}`` under method ``m``
        (``-inf`` or NaN where not predicted), ``redundancy[i, j]`` the drift cosine.

        Vectorised over groups, so a thousand adapters plan in seconds.
        """
        names = list(names)
        n = len(names)
        # damage[m][i, j] = 1 - R_{i|j}; a missing prediction is an infinite damage
        damage = {}
        for m in self.methods:
            r = np.asarray(retention.get(m, np.full((n, n), -np.inf)), dtype=float)
            damage[m] = np.where(np.isfinite(r), 1.0 - r, np.inf)
        similar = np.asarray(redundancy, dtype=float)
        similar = np.where(np.isfinite(similar), similar, -np.inf)
        similar = np.maximum(similar, similar.T)  # either direction's record counts

        # An adapter is pruned only in favour of one that is kept, so no chain a -> b -> c
        # leaves a task without a served model.
        keep: list[int] = []
        pruned: dict[int, tuple[int, float]] = {}
        for i in range(n):
            if keep:
                row = similar[i, keep]
                k = int(np.argmax(row))
                if row[k] >= self.prune_similarity:
                    pruned[i] = (keep[k], float(row[k]))
                    continue
            keep.append(i)

        first = np.asarray(retention.get(self.methods[0], np.full((n, n), -np.inf)), float)
        kept = np.array(keep, dtype=int)

        def hardness(i: int) -> float:
            values = first[i, kept[kept != i]]
            finite = values[np.isfinite(values)].tolist()
            # a plain left-to-right sum: equal means tie exactly and keep the input order
            return sum(finite) / len(finite) if finite else -math.inf

        order = sorted(keep, key=hardness)  # stable: ties keep the input order
        group_of = np.full(n, -1)
        # current set retention of each placed adapter under each method (additive damages)
        current = {m: np.ones(n) for m in self.methods}
        group_methods: list[str] = []
        group_members: list[list[int]] = []
        for i in order:
            placed = np.flatnonzero(group_of >= 0)
            best = None
            if placed.size:
                g_of = group_of[placed]
                count = len(group_members)
                chosen_low = np.full(count, -np.inf)
                chosen_method = np.full(count, -1)
                for k_m, m in enumerate(self.methods):
                    d = damage[m]
                    # members' values with i added, their group-wise minimum
                    members_low = np.full(count, np.inf)
                    np.minimum.at(members_low, g_of, current[m][placed] - d[placed, i])
                    # i's own value: 1 - its damages from every member of the group
                    own = 1.0 - np.bincount(g_of, weights=d[i, placed], minlength=count)
                    low = np.minimum(members_low, own)
                    low = np.where(np.isnan(low), -np.inf, low)
                    # the first method that keeps a group >= tau is its method
                    take = (chosen_method < 0) & (low >= self.tau)
                    chosen_low[take] = low[take]
                    chosen_method[take] = k_m
                if np.isfinite(chosen_low).any() and chosen_low.max() >= self.tau:
                    # the earliest group within 1e-12 of the best: near-ties keep the older group
                    k = int(np.flatnonzero(chosen_low >= chosen_low.max() - 1e-12)[0])
                    best = (k, self.methods[int(chosen_method[k])])
            if best is None:
                group_of[i] = len(group_members)
                group_members.append([i])
                group_methods.append(self.methods[0])
                continue
            k, method = best
            members = group_members[k]
            idx = np.array(members)
            for m in self.methods:  # additive damages: update in O(group size)
                current[m][idx] -= damage[m][idx, i]
                current[m][i] = 1.0 - damage[m][i, idx].sum()
            members.append(i)
            group_of[i] = k
            group_methods[k] = method

        decisions = []
        for members, method in zip(group_members, group_methods, strict=True):
            labels = [names[i] for i in members]
            if len(members) == 1:
                decisions.append(
                    Decision(
                        "route",
                        [
                            f"no group keeps {labels[0]} and its partners at or above tau "
                            f"{self.tau:.2f}; served as a separate adapter"
                        ],
                        members=labels,
                    )
                )
                continue
            values = [float(current[method][i]) for i in members]
            kind = "merge" if method == self.methods[0] else "reweight"
            decisions.append(
                Decision(
                    kind,
                    [
                        f"predicted set retention under the {method} merge: "
                        + ", ".join(f"{m} {v:.3f}" for m, v in zip(labels, values, strict=True))
                        + f" (all >= tau {self.tau:.2f})"
                    ],
                    method=method,
                    members=labels,
                    weights=self.weights_for(method, labels),
                    predicted_mean=sum(values) / len(values),
                    predicted_min=min(values),
                )
            )
        for i, (twin, similarity) in pruned.items():
            decisions.append(
                Decision(
                    "prune",
                    [
                        f"redundant with {names[twin]} (drift cosine {similarity:.2f} >= "
                        f"{self.prune_similarity:.2f}); {names[twin]} serves its task"
                    ],
                    members=[names[i], names[twin]],
                )
            )
        return decisions


# The predictor sets a pair may be predicted by, by the states of its two sides: a run beside
# runs, a run beside finished adapters, finished adapters beside each other.
PAIR_STATES = ("early", "early_vs_final", "final")

# A final state earlier than this (a run stopped early, e.g. by on_incompatible="stop") is
# read like a run at its horizon: the finished-partner predictors were fitted on partners
# that trained to the end, whose updates are far larger.
FINISHED_FRACTION = 0.5


def _state_finished(probe) -> bool:
    """Whether ``probe`` is the state of an adapter that trained (most of) its course."""
    return probe.kind == "final" and (probe.fraction is None or probe.fraction >= FINISHED_FRACTION)


def _finished(signature) -> bool:
    """Whether ``signature``'s last state is an adapter that trained (most of) its course."""
    return bool(signature.probes) and _state_finished(signature.probes[-1])


def _partner_probe(own_fraction: float | None, other, at_end: bool = False) -> tuple[Any, str]:
    """The partner's last state when ``at_end``; else its probe nearest before
    ``own_fraction`` (its last one if it has none)."""
    from .exceptions import IncompatibleSignatureError

    if not other.probes:
        raise IncompatibleSignatureError(f"signature {other.name!r} has no probe to compare")
    if at_end:
        return other.probes[-1], "final state"
    early = [p for p in other.probes if p.kind == "probe" and p.fraction is not None]
    if own_fraction is not None and early:
        before = [p for p in early if p.fraction <= own_fraction + 1e-9]
        if before:
            probe = other.probe(own_fraction)
            if _state_finished(probe):  # a fraction list that reaches the end
                return probe, "final state"
            return probe, f"probe at {probe.fraction:.3f}"
    probe = other.probes[-1]
    return probe, f"{probe.kind} state"


def _needed_signals(predictors: Iterable[Any]) -> set[str]:
    """The signals the predictors read (their fallbacks' too), and the drift cosine that
    decides pruning."""
    return {"drift_cosine"}.union(*(_signals_read(p) for p in predictors))


def predict_pairs(
    signature,
    partners: Sequence,
    predictors: Mapping[str, Any],
    probe=None,
    *,
    against_finished: Mapping[str, Any] | None = None,
) -> tuple[list[PairPrediction], list[dict[str, Any]]]:
    """Predictions of ``signature`` (at ``probe``, default its last) against each partner.

    A partner is read at the same fraction of its training (its last state if it has no
    probe that early). A partner *finished* training when its last state is final at 50 % of
    its steps or later (a run stopped at its horizon is read like a run there). With
    ``against_finished`` (predictors fitted on a run against finished partners,
    ``load_predictors(state="early_vs_final")``) and ``signature`` still in training, a
    finished partner is read at its final state and this run's retention beside it is
    predicted by those instead (the partner's own retention still by ``predictors``). A
    finished ``signature`` reads finished partners at their final states with ``predictors``
    (give it the final set). Returns the predictions and one note per pair (which partner
    state and predictors were used, layers compared, and any partner skipped as
    incompatible).
    """
    from .exceptions import IncompatibleSignatureError
    from .signals.compare import pairwise_signals

    if against_finished is not None and not set(predictors) <= set(against_finished):
        raise InvalidParameterError(
            f"against_finished covers the methods {sorted(against_finished)}, predictors "
            f"{sorted(predictors)}; it must cover every method of predictors"
        )
    probe = probe if probe is not None else signature.probes[-1]
    # The finished-partner predictors are for a run in training; a finished adapter beside
    # finished ones is the caller's choice of predictors (the final set), and is read beside
    # their final states.
    own_finished = _state_finished(probe)
    # Only the signals the predictors read (and the redundancy): the costly ones are most of
    # the time of a decision against a large store.
    needed = _needed_signals([*predictors.values(), *(against_finished or {}).values()])
    predictions, notes = [], []
    for other in partners:
        if other.name == signature.name:
            continue
        try:
            at_end = _finished(other) and (own_finished or against_finished is not None)
            finished = at_end and not own_finished  # this run in training: switch predictors
            other_probe, used = _partner_probe(probe.fraction, other, at_end)
            forward = pairwise_signals(signature, other, probe, other_probe, only=needed)
            backward = pairwise_signals(other, signature, other_probe, probe, only=needed)
        except IncompatibleSignatureError as exc:
            notes.append({"with": other.name, "skipped": str(exc)})
            continue
        retention_self, retention_other, interval, read = {}, {}, {}, {}
        for method, predictor in predictors.items():
            # The finished partner beside this run (its end against a run at its horizon) is
            # closest to what the early predictors were fitted on (the partner-states table
            # of benchmarks/results/predictor_eval.md).
            forward_predictor = against_finished[method] if finished else predictor
            own, (low, high), sources = _predict_one(forward_predictor, forward)
            partner = float(predictor.predict([backward])[0])
            read[method] = {
                name: clean_json(_as_float(forward.get(name)))  # missing: None
                for name in sources
            }
            retention_self[method], retention_other[method] = own, partner
            interval[method] = (low, high)
        predictions.append(
            PairPrediction(
                signature.name,
                other.name,
                retention_self,
                retention_other,
                interval,
                redundancy=forward.get("drift_cosine", math.nan),
                signals=read,
            )
        )
        note = {
            "with": other.name,
            "partner_state": used,
            **({"predictors": "against finished"} if finished else {}),
            "shared_layers": int(forward["shared_layers"]),
            "layer_coverage": forward["layer_coverage"],
        }
        if forward["layer_coverage"] < 1 or backward["layer_coverage"] < 1:
            # Different target-module sets: the signals cover only the layers both adapt.
            note["layers_note"] = (
                f"compared with {other.name} on the {note['shared_layers']} LoRA layers both "
                f"adapt ({signature.name} adapts {len(signature.layers)}, {other.name} "
                f"{len(other.layers)})"
            )
        notes.append(note)
    return predictions, notes


def _predict_one(predictor, signals: Mapping[str, float]):
    """A row's prediction, its interval and the signals it was predicted from, in one pass
    for a ``RetentionPredictor`` (any object with ``predict`` and ``predict_interval`` may
    be given: then its ``features``, if it names them)."""
    if isinstance(predictor, RetentionPredictor):
        point, interval, sources = predictor._predict_rows([signals])
        return float(point[0]), (float(interval[0, 0]), float(interval[0, 1])), sources[0]
    low, high = (float(v) for v in predictor.predict_interval([signals])[0])
    sources = tuple(getattr(predictor, "features", ()))
    return float(predictor.predict([signals])[0]), (low, high), sources


PLAN_SCHEMA = "mergeprobe.plan/1"


def _adapter_entry(signature) -> dict[str, Any]:
    meta = signature.metadata
    training = meta.get("training") or {}
    probe = signature.probes[-1] if signature.probes else None
    ranks = (meta.get("adapter") or {}).get("ranks") or []
    return {
        "path": meta.get("adapter_path") or training.get("output_dir"),
        "source": meta.get("source"),
        "fraction": probe.fraction if probe is not None else None,
        "state": probe.kind if probe is not None else None,
        "max_rank": max(ranks) if ranks else None,
        "task_type": (meta.get("adapter") or {}).get("task_type"),
    }


def plan_state(signatures: Sequence) -> str:
    """``"final"`` when every signature's last state is a finished adapter, else ``"early"``:
    which shipped predictor fits the plan's signals."""
    finished = [_finished(s) for s in signatures]
    return "final" if finished and all(finished) else "early"


def _given_signals(signals: Mapping[str, Any] | None, names: list[str]) -> dict[str, np.ndarray]:
    """``build_plan``'s extra signal matrices, checked and put in the order of ``names``."""
    if not signals:
        return {}
    order = list(signals.get("names", names))
    if sorted(order) != sorted(names) or len(set(order)) != len(order):
        raise InvalidParameterError(
            f"the signals' names {order} are not the signatures' names {names}"
        )
    index = [order.index(name) for name in names]
    out = {}
    for key, value in signals.items():
        if key == "names":
            continue
        matrix = np.asarray(value, dtype=float)
        if matrix.shape != (len(names), len(names)):
            raise InvalidParameterError(
                f"signal {key!r} must be an ({len(names)}, {len(names)}) array, one row and "
                f"column per signature; got shape {matrix.shape}"
            )
        out[key] = matrix[np.ix_(index, index)]
    return out


def _signal_matrices(signatures: Sequence, needed: set[str], progress: bool):
    """Every needed pairwise signal as an (n, n) matrix, each signature at its last probe:
    matrix products where ``pairwise_signal_matrices`` covers them, else pair by pair."""
    from .exceptions import IncompatibleSignatureError
    from .signals.compare import MATRIX_SIGNALS, pairwise_signal_matrices, pairwise_signals

    n = len(signatures)
    if needed <= MATRIX_SIGNALS:
        matrices = pairwise_signal_matrices(list(signatures), None, only=needed)
        return {k: v.numpy() for k, v in matrices.items()}
    matrices = {k: np.full((n, n), np.nan) for k in needed}
    iterator = range(n)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="pairwise signals", unit="adapter")
    for i in iterator:
        for j in range(n):
            if i == j:
                continue
            try:
                values = pairwise_signals(signatures[i], signatures[j], only=needed)
            except IncompatibleSignatureError:
                continue
            for k in needed:
                matrices[k][i, j] = values.get(k, np.nan)
    return matrices


def _cells_by_predictor(choices, rows, cols):
    """The compared cells ``(rows, cols)`` split between predictors: ``choices`` is a list
    of (predictor, (n, n) mask or None for every other cell); empty parts left out."""
    taken = np.zeros(rows.size, dtype=bool)
    parts = []
    for predictor, mask in choices:
        here = ~taken if mask is None else mask[rows, cols] & ~taken
        taken |= here
        parts.append((predictor, here))
    return [(p, (rows[m], cols[m])) for p, m in parts if m.any()]


def _check_states(keys: Iterable[str], what: str) -> None:
    """Refuse per-state predictors keyed by anything but ``PAIR_STATES``."""
    unknown = sorted({str(k) for k in keys} - set(PAIR_STATES))
    if unknown:
        raise InvalidParameterError(
            f"{what} is keyed by the states {', '.join(PAIR_STATES)}; got {', '.join(unknown)}"
        )


def _set_name(state: str, given: Any = None) -> str:
    """How a decision or plan names the predictors of ``state`` (see ``_predictor_set``)."""
    if given is None:
        return f"default ({state})"
    if isinstance(given, Mapping):
        return f"given ({state})"
    return os.fspath(given)


def _predictor_set(state: str, given: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(predictors, record) for the pairs of ``state``: ``given`` predictors (method ->
    predictor) or a predictor file, else the shipped set; the record names the set and
    carries the file's metadata."""
    from .predictor import load_predictors

    name = _set_name(state, given)
    if isinstance(given, Mapping):
        return dict(given), {"name": name}
    predictors, meta = load_predictors(given, state=state)
    return predictors, {"name": name, **meta}


def _predictors_by_cell(signatures, predictors, predictor_info, sets=None):
    """The predictors for a set of signatures: the given ones for every pair, else the set for
    their state (from ``sets``, else shipped), with the sets for a run beside a finished adapter
    and two finished adapters in a mixed store as ``(predictors, (n, n) mask of the cells they
    predict)``."""

    # given files are read now, so a bad one is refused even where no pair needs its state
    given = {state: _predictor_set(state, chosen) for state, chosen in (sets or {}).items()}

    def load(state: str):
        return given[state] if state in given else _predictor_set(state)

    others: list[tuple[dict[str, Any], np.ndarray]] = []
    if predictors is None:
        state = plan_state(signatures)
        predictors, meta = load(state)
        predictor_info = {**meta, **(predictor_info or {})}
        done = np.array([_finished(s) for s in signatures])
        if state == "early" and done.any():
            # Each pair by the set fitted for its states: a run beside a finished adapter,
            # two finished adapters; the rest (a finished adapter beside a run) by the 5 % set.
            for other_state, cells in (
                ("early_vs_final", ~done[:, None] & done[None, :]),
                ("final", done[:, None] & done[None, :]),
            ):
                if cells.any():
                    extra_predictors, extra = load(other_state)
                    others.append((extra_predictors, cells))
                    predictor_info[other_state] = {
                        "name": extra["name"],
                        "trained_on": extra.get("trained_on"),
                    }
    return predictors, others, predictor_info


def _check_sets(predictors, sets) -> None:
    """Refuse per-state ``sets`` keyed by unknown states, or given beside ``predictors``."""
    _check_states(sets or (), "sets")
    if predictors is not None and sets:
        raise InvalidParameterError("give predictors (every pair) or sets (per state), not both")


def _common_methods(wanted: Sequence[str], others) -> list[str]:
    """The methods of ``wanted`` that every other set in use covers: a method some set lacks
    is left out, never predicted by another state's set."""
    return [m for m in wanted if all(m in extra for extra, _ in others)]


def _retention_matrices(signatures, predictors, others, methods, cells, signals, progress):
    """Predicted retention and its interval bounds, (n, n) per method (``-inf`` outside
    ``cells``, the (rows, cols) compared), and the signal matrices they were read from."""
    names = [s.name for s in signatures]
    n = len(names)
    needed = _needed_signals(
        [*(predictors[m] for m in methods), *(p for extra, _ in others for p in extra.values())]
    )
    given = _given_signals(signals, names)
    matrices = _signal_matrices(signatures, needed - set(given), progress)
    matrices.update(given)
    rows, cols = cells
    retention, low, high = {}, {}, {}
    for method in methods:
        predictor = predictors[method]
        values, lo, hi = (np.full((n, n), -np.inf) for _ in range(3))
        choices = [(extra[method], mask) for extra, mask in others if method in extra]
        for chosen, (r, c) in _cells_by_predictor([*choices, (predictor, None)], rows, cols):
            read = _signals_read(chosen)
            X = {f: matrices[f][r, c] for f in read}  # one column per signal
            values[r, c] = chosen.predict(X)
            interval = chosen.predict_interval(X)  # per row: a fallback has its own
            lo[r, c], hi[r, c] = interval[:, 0], interval[:, 1]
        retention[method], low[method], high[method] = values, lo, hi
    return retention, low, high, matrices


def predict_between(
    signatures: Sequence,
    predictors: Mapping[str, Any] | None = None,
    *,
    sets: Mapping[str, Mapping[str, Any] | str | os.PathLike] | None = None,
    methods: Sequence[str] | None = None,
) -> list[PairPrediction]:
    """Predictions among ``signatures`` (one per unordered compatible pair, each at its last
    probe, by the predictors ``build_plan`` would use): the ``partner_pairs`` with which
    ``Policy.decide`` weighs a run's partners against each other.

    ``predictors`` predicts every pair; without it each pair is predicted by the set for its
    states, taken from ``sets`` (state -> predictors or a predictor file, states as in
    ``load_predictors``) where given, else the shipped one. ``methods`` limits the merge
    methods predicted (default: every method of the predictors).
    """
    from .signals.compare import compatibility_matrix

    signatures = list(signatures)
    _check_sets(predictors, sets)
    names = [s.name for s in signatures]
    if len(set(names)) != len(names):
        raise InvalidParameterError("two signatures share a name; names must be unique")
    n = len(signatures)
    if n < 2:
        return []
    predictors, others, _ = _predictors_by_cell(signatures, predictors, None, sets)
    wanted = [m for m in predictors if methods is None or m in methods]
    kept = _common_methods(wanted, others)
    if not kept:
        raise InvalidParameterError(
            f"no merge method of {wanted} is covered by every predictor set these signatures need"
        )
    methods = kept
    compared = compatibility_matrix(signatures).numpy() & ~np.eye(n, dtype=bool)
    rows, cols = np.nonzero(compared)
    retention, low, high, matrices = _retention_matrices(
        signatures, predictors, others, methods, (rows, cols), None, False
    )
    out = []
    for i, j in zip(*np.nonzero(np.triu(compared)), strict=True):
        out.append(
            PairPrediction(
                signatures[i].name,
                signatures[j].name,
                {m: float(retention[m][i, j]) for m in methods},
                {m: float(retention[m][j, i]) for m in methods},
                {m: (float(low[m][i, j]), float(high[m][i, j])) for m in methods},
                redundancy=float(matrices["drift_cosine"][i, j]),
            )
        )
    return out


def build_plan(
    signatures: Sequence,
    predictors: Mapping[str, Any] | None = None,
    policy: Policy | None = None,
    *,
    predictor_info: Mapping[str, Any] | None = None,
    include_pairs: bool | None = None,
    progress: bool = False,
    signals: Mapping[str, Any] | None = None,
    sets: Mapping[str, Mapping[str, Any] | str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """A plan for a set of signatures: every pair predicted, adapters grouped (design §5).

    Each signature is compared at its last probe. ``predictors`` predicts every pair. Without
    it, each pair is predicted by the set for its states: the signatures' state
    (``plan_state``) and, in a store of runs and finished adapters, a run beside a finished
    adapter by the set fitted for that (``load_predictors(state="early_vs_final")``) and two
    finished adapters by the final set; each taken from ``sets`` (state -> predictors or a
    predictor file, states ``"early"``, ``"early_vs_final"``, ``"final"``) where given, else
    the shipped one. Only the merge methods every set in use covers are planned with.
    ``signals`` adds pairwise signals the signatures do not carry, each an (n, n) array (row:
    the adapter, column: its partner) in the order of ``signatures``, or in the order of a
    ``"names"`` entry, as ``rehearsal_kl`` returns them; predictors that read them (e.g.
    fitted on ``rehearsal_kl``) then plan from them. Returns a JSON-ready document (schema
    ``mergeprobe.plan/1``) that ``mergeprobe apply`` carries out: ``served`` models (merged
    groups with method, weights and each member's predicted set retention with its interval,
    and routed adapters), ``pruned`` adapters and the model that serves them, the predicted
    ``pairs`` (by default when there are at most 200 adapters) and the pairs ``skipped``.
    """
    from ._util import utc_now
    from ._version import __version__
    from .signals.compare import compatibility_matrix
    from .signature import check_compatible

    signatures = list(signatures)
    _check_sets(predictors, sets)
    predictors, others, predictor_info = _predictors_by_cell(
        signatures, predictors, predictor_info, sets
    )
    policy = policy or Policy()
    methods = _common_methods([m for m in policy.methods if m in predictors], others)
    if not methods:
        covered = sorted(set(predictors).intersection(*(extra for extra, _ in others)))
        raise InvalidParameterError(
            f"the predictors in use cover {covered}, none of the policy's methods "
            f"{list(policy.methods)}"
        )
    policy = dataclasses.replace(policy, methods=tuple(methods))
    names = [s.name for s in signatures]
    if len(set(names)) != len(names):
        raise InvalidParameterError("two signatures share a name; names must be unique")
    n = len(names)
    include_pairs = n <= 200 if include_pairs is None else include_pairs
    compared = compatibility_matrix(signatures).numpy() & ~np.eye(n, dtype=bool)
    rows, cols = np.nonzero(compared)
    retention, low, high, matrices = _retention_matrices(
        signatures, predictors, others, methods, (rows, cols), signals, progress
    )
    redundancy = matrices["drift_cosine"]
    decisions = policy.plan_matrix(names, retention, redundancy)

    index = {name: i for i, name in enumerate(names)}
    served, pruned = [], []
    taken: set[str] = set(RESERVED_NAMES)
    for k, decision in enumerate(decisions, 1):
        if decision.decision == "prune":
            name, twin = decision.members
            pruned.append({"name": name, "served_by": twin, "reasons": decision.reasons})
            continue
        method = decision.method or methods[0]
        predicted = {}
        for member in decision.members:
            i = index[member]
            others = [index[o] for o in decision.members if o != member]
            predicted[member] = {
                "retention": set_retention(retention[method][i, others]),
                "interval": [
                    set_retention(low[method][i, others]),
                    set_retention(high[method][i, others]),
                ],
            }
        if decision.decision == "route":
            served_name = decision.members[0]
        else:  # never an adapter's own name, nor a file apply writes
            served_name, suffix = f"merged-{k:02d}", 1
            while served_name in index or served_name in taken:
                served_name, suffix = f"merged-{k:02d}-{suffix}", suffix + 1
        taken.add(served_name)
        served.append(
            {
                "name": served_name,
                "decision": decision.decision,
                "method": decision.method,
                "members": decision.members,
                "weights": decision.weights,
                "predicted": predicted,
                "predicted_mean": decision.predicted_mean,
                "predicted_min": decision.predicted_min,
                "reasons": decision.reasons,
            }
        )
    served_by = {m: s["name"] for s in served for m in s["members"]}
    for entry in pruned:
        entry["served_model"] = served_by.get(entry["served_by"])

    skipped: list[dict[str, Any]] = []
    incompatible = ~compared & ~np.eye(n, dtype=bool)
    if include_pairs:
        for i, j in zip(*np.nonzero(np.triu(incompatible)), strict=True):
            try:
                check_compatible(signatures[i], signatures[j])
            except MergeprobeError as exc:
                skipped.append({"self": names[i], "with": names[j], "skipped": str(exc)})
    pairs = []
    if include_pairs:
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            pairs.append(
                {
                    "self": names[i],
                    "other": names[j],
                    "retention": {m: float(retention[m][i, j]) for m in methods},
                    "interval": {m: [float(low[m][i, j]), float(high[m][i, j])] for m in methods},
                    "redundancy": float(redundancy[i, j]),
                }
            )
    document = {
        "schema": PLAN_SCHEMA,
        "created": utc_now(),
        "mergeprobe_version": __version__,
        "policy": {
            "tau": policy.tau,
            "prune_similarity": policy.prune_similarity,
            "methods": list(policy.methods),
        },
        "predictor": dict(predictor_info or {"name": "custom"}),
        "base_model": (signatures[0].metadata.get("base_model") if signatures else None),
        "adapters": {s.name: _adapter_entry(s) for s in signatures},
        "summary": {
            "adapters": n,
            "served_models": len(served),
            "merged_groups": sum(s["decision"] != "route" for s in served),
            "routed": sum(s["decision"] == "route" for s in served),
            "pruned": len(pruned),
            "pairs_predicted": int(rows.size),
            "pairs_skipped": int(np.triu(incompatible).sum()),  # unordered, as listed
        },
        "served": served,
        "pruned": pruned,
        "pairs": pairs,
        "skipped": skipped,
    }
    return clean_json(document)
