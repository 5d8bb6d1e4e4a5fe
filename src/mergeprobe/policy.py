"""Policy: predicted retentions → merge / reweight / prune / route, with reasons (design §5).

``Policy.decide`` answers for one run against the adapters it was compared with (what the
callback writes at the horizon); ``Policy.plan`` groups a whole set of adapters into as few
served models as keep every member's predicted retention at or above ``tau``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .exceptions import InvalidParameterError
from .predictor import METHODS, set_retention

__all__ = ["Decision", "PairPrediction", "Policy", "predict_pairs"]

DECISIONS = ("merge", "reweight", "prune", "route")


@dataclasses.dataclass(frozen=True)
class PairPrediction:
    """Predicted retentions of ``self`` and ``other`` when merged, per merge method.

    ``retention_self[m]`` is ``R_{self|other}`` under method ``m``; ``interval[m]`` its
    [low, high]. ``redundancy`` is a similarity in [-1, 1] (drift cosine) used for pruning.
    """

    self: str
    other: str
    retention_self: Mapping[str, float]
    retention_other: Mapping[str, float]
    interval: Mapping[str, tuple[float, float]]
    redundancy: float = math.nan

    def as_record(self, method: str = "direct") -> dict[str, Any]:
        return {
            "with": self.other,
            "method": method,
            "retention_self": self.retention_self.get(method),
            "retention_other": self.retention_other.get(method),
            "interval": list(self.interval[method]) if method in self.interval else None,
            "redundancy": self.redundancy,
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

    def decide(self, name: str, pairs: Sequence[PairPrediction]) -> Decision:
        """Decision for adapter ``name`` given its predictions against other adapters."""
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
        for method in self.methods:
            fits = [
                p
                for p in pairs
                if p.retention_self.get(method, -math.inf) >= self.tau
                and p.retention_other.get(method, -math.inf) >= self.tau
            ]
            if not fits:
                continue
            # Partners enter in order of the smaller predicted retention, as long as this
            # run's set retention stays above tau.
            fits.sort(key=lambda p: -min(p.retention_self[method], p.retention_other[method]))
            chosen: list[PairPrediction] = []
            for p in fits:  # the first always fits: its own retention is >= tau
                if set_retention([q.retention_self[method] for q in [*chosen, p]]) >= self.tau:
                    chosen.append(p)
            own = set_retention([p.retention_self[method] for p in chosen])
            others = [p.retention_other[method] for p in chosen]
            members = [name, *(p.other for p in chosen)]
            reasons = [
                f"predicted retention with {p.other} under the {method} merge: "
                f"{p.retention_self[method]:.3f} (this run), {p.retention_other[method]:.3f} "
                f"({p.other}) >= tau {self.tau:.2f}"
                for p in chosen
            ]
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

    def plan(self, names: Sequence[str], pairs: Iterable[PairPrediction]) -> list[Decision]:
        """Greedy grouping of ``names`` into as few merged models as keep all members ≥ tau.

        Adapters are placed hardest first (lowest mean predicted retention); each joins the
        existing group and method whose worst member stays highest, if that is ≥ tau.
        Pairs missing a prediction count as incompatible.
        """
        table: dict[tuple[str, str], PairPrediction] = {}
        for p in pairs:
            table[(p.self, p.other)] = p
        names = list(dict.fromkeys(names))
        # An adapter is pruned only in favour of one that is kept, so no chain a -> b -> c
        # leaves a task without a served model.
        keep: list[str] = []
        pruned: dict[str, tuple[str, float]] = {}
        for n in names:
            twins = [
                (p.redundancy, k)
                for k in keep
                if (p := table.get((n, k)) or table.get((k, n))) is not None
                and p.redundancy >= self.prune_similarity
            ]
            if twins:
                similarity, twin = max(twins)
                pruned[n] = (twin, similarity)
            else:
                keep.append(n)

        def r(a: str, b: str, method: str) -> float:
            p = table.get((a, b))
            return p.retention_self.get(method, -math.inf) if p is not None else -math.inf

        def set_values(group: Sequence[str], method: str) -> list[float]:
            return [set_retention([r(a, b, method) for b in group if b != a]) for a in group]

        def hardness(n: str) -> float:
            values = [r(n, m, self.methods[0]) for m in keep if m != n]
            finite = [v for v in values if math.isfinite(v)]
            return sum(finite) / len(finite) if finite else -math.inf

        groups: list[tuple[list[str], str]] = []
        for n in sorted(keep, key=hardness):
            best = None
            for k, (members, _) in enumerate(groups):
                for method in self.methods:
                    low = min(set_values([*members, n], method))
                    if low >= self.tau and (best is None or low > best[0] + 1e-12):
                        best = (low, k, method)
                    if low >= self.tau:
                        break  # prefer the earlier (simpler) method when it suffices
            if best is None:
                groups.append(([n], self.methods[0]))
            else:
                _, k, method = best
                groups[k] = ([*groups[k][0], n], method)

        decisions = []
        for members, method in groups:
            if len(members) == 1:
                decisions.append(
                    Decision(
                        "route",
                        [
                            f"no group keeps {members[0]} and its partners at or above tau "
                            f"{self.tau:.2f}; served as a separate adapter"
                        ],
                        members=members,
                    )
                )
                continue
            values = set_values(members, method)
            kind = "merge" if method == self.methods[0] else "reweight"
            decisions.append(
                Decision(
                    kind,
                    [
                        f"predicted set retention under the {method} merge: "
                        + ", ".join(f"{m} {v:.3f}" for m, v in zip(members, values, strict=True))
                        + f" (all >= tau {self.tau:.2f})"
                    ],
                    method=method,
                    members=members,
                    weights=self.weights_for(method, members),
                    predicted_mean=sum(values) / len(values),
                    predicted_min=min(values),
                )
            )
        for n, (twin, similarity) in pruned.items():
            decisions.append(
                Decision(
                    "prune",
                    [
                        f"redundant with {twin} (drift cosine {similarity:.2f} >= "
                        f"{self.prune_similarity:.2f}); {twin} serves its task"
                    ],
                    members=[n, twin],
                )
            )
        return decisions


def _partner_probe(own_fraction: float | None, other) -> tuple[Any, str]:
    """The partner's probe nearest before ``own_fraction`` (its last one if it has none)."""
    early = [p for p in other.probes if p.kind == "probe" and p.fraction is not None]
    if own_fraction is not None and early:
        before = [p for p in early if p.fraction <= own_fraction + 1e-9]
        if before:
            probe = other.probe(own_fraction)
            return probe, f"probe at {probe.fraction:.3f}"
    probe = other.probes[-1]
    return probe, f"{probe.kind} state"


def predict_pairs(
    signature,
    partners: Sequence,
    predictors: Mapping[str, Any],
    probe=None,
) -> tuple[list[PairPrediction], list[dict[str, Any]]]:
    """Predictions of ``signature`` (at ``probe``, default its last) against each partner.

    Returns the predictions and one note per pair (which partner state was used, layers
    compared, and any partner skipped as incompatible).
    """
    from .exceptions import IncompatibleSignatureError
    from .signals.compare import pairwise_signals

    probe = probe if probe is not None else signature.probes[-1]
    # Only the signals the predictors read (and the redundancy): the costly ones are most of
    # the time of a decision against a large store.
    needed = {"drift_cosine"}.union(*(getattr(p, "features", ()) for p in predictors.values()))
    predictions, notes = [], []
    for other in partners:
        if other.name == signature.name:
            continue
        try:
            other_probe, used = _partner_probe(probe.fraction, other)
            forward = pairwise_signals(signature, other, probe, other_probe, only=needed)
            backward = pairwise_signals(other, signature, other_probe, probe, only=needed)
        except IncompatibleSignatureError as exc:
            notes.append({"with": other.name, "skipped": str(exc)})
            continue
        retention_self, retention_other, interval = {}, {}, {}
        for method, predictor in predictors.items():
            own, partner = (float(v) for v in predictor.predict([forward, backward]))
            low, high = predictor.residual_quantiles_
            retention_self[method], retention_other[method] = own, partner
            interval[method] = (own + low, own + high)
        predictions.append(
            PairPrediction(
                signature.name,
                other.name,
                retention_self,
                retention_other,
                interval,
                redundancy=forward.get("drift_cosine", math.nan),
            )
        )
        notes.append(
            {
                "with": other.name,
                "partner_state": used,
                "shared_layers": int(forward["shared_layers"]),
                "layer_coverage": forward["layer_coverage"],
            }
        )
    return predictions, notes
