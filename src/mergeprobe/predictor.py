"""Retention predictor: pairwise signals → predicted ``R_{i|j}`` with an interval (design §4).

A ``RetentionPredictor`` follows scikit-learn's conventions: explicit parameters validated in
``fit``, ``fit``/``predict``, fitted state in attributes ending in ``_``. It takes rows of
pairwise signals (``pairwise_signals`` dicts, a pandas DataFrame or an array whose columns are
``features``); missing signals stay NaN and the model imputes them from training medians with
a missing-value indicator, never as zeros.

Predictors are saved with skops, never pickle: ``load_predictors`` refuses a pickle file and
any type outside a fixed allow-list.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from ._version import __version__
from .exceptions import InvalidParameterError, MergeprobeError

__all__ = [
    "DEFAULT_FEATURES",
    "DEFAULT_MODEL",
    "METHODS",
    "RetentionPredictor",
    "UnsafePredictorError",
    "fit",
    "load_predictors",
    "save_predictors",
    "set_retention",
]

METHODS = ("direct", "mean", "ties", "dare")
# Chosen by leave-one-task-out measurement on the benchmark (benchmarks/predictor_eval.py,
# results/predictor_eval.md): how much of the partner's drift lands inside the own drift
# region, read as damage that vanishes with it, generalises to unseen tasks; direction cosines
# and per-run descriptors did not (design §3). The shipped predictors read head_interference
# (the partner's drift read through the run's own task head) with these as their fallback:
# the head signals rank pairs better but exist only for models with a linear task head, so a
# refit from a user's pairs defaults to the signals every model has.
DEFAULT_FEATURES = ("interference_ratio", "interference_ratio_last")
DEFAULT_MODEL = "damage"
DEFAULT_POWER = "auto"
# Positive, scale-like features enter the model as logarithms: ratios are symmetric in log
# space (2x and 0.5x are equally far from 1).
_LOG_FEATURES = {
    "interference_ratio",
    "interference_ratio_last",
    "drift_norm_ratio",
    "update_norm_ratio",
    "grad_norm_ratio",
    "update_norm_self",
    "update_norm_other",
    "drift_norm_self",
    "drift_norm_other",
    "head_kl",
    "head_logit_shift",
    "head_interference",
    "head_interference_room",  # head_interference x the run's label room (label_room_self)
    "rehearsal_kl",  # mergeprobe.rehearsal_kl, finished adapters: not a signature signal
}
_MODELS = ("ridge", "boosting", "damage")
# The damage model's candidate powers for ``power="auto"``.
POWERS = tuple(round(0.2 + 0.05 * k, 2) for k in range(17))  # 0.2, 0.25, ..., 1.0
# The damage model reads scale-like signals as they are (no logarithm): damage must vanish
# when the partner moves nothing, which a zero signal means only on the raw scale.
# An overlap above chance enters clipped at zero: no shared input directions, no damage.
_DAMAGE_FEATURES = _LOG_FEATURES | {"head_flip", "update_input_subspace_excess"}
_DATA = Path(__file__).parent / "data"
# The shipped predictors, by the state of the signals they read: runs at their horizon;
# a run at its horizon against partners that finished training (their final state reaches
# further than their horizon did); finished adapters (``mergeprobe add``), whose update and
# drift magnitudes are far larger than at 5 % of a run; and finished adapters' merge rehearsal
# (``rehearsal_kl``, given to ``build_plan(signals=...)``; benchmarks/rehearsal_eval.py --ship).
_DEFAULT_PATHS = {
    "early": _DATA / "default_predictors.skops",
    "early_vs_final": _DATA / "default_predictors_early_vs_final.skops",
    "final": _DATA / "default_predictors_final.skops",
    "rehearsal": _DATA / "default_predictors_rehearsal.skops",
}
STATES = tuple(_DEFAULT_PATHS)


class UnsafePredictorError(MergeprobeError):
    """A predictor file is a pickle or holds types outside mergeprobe's allow-list."""


def _feature_matrix(X: Any, features: Sequence[str], *, log: bool = True) -> np.ndarray:
    """Rows of signals → float matrix in ``features`` order; absent keys become NaN.

    ``X`` is a DataFrame, one row as a dict, a list of such dicts, a dict of equally long 1-D
    columns, or an array whose columns are ``features``. With ``log``, scale-like signals
    become logarithms (non-positive values become NaN)."""
    if hasattr(X, "columns"):  # pandas DataFrame
        missing = [f for f in features if f not in X.columns]
        if missing:
            raise InvalidParameterError(f"X lacks the feature columns {missing}")
        matrix = X.loc[:, list(features)].to_numpy(dtype=float, copy=True)
    elif isinstance(X, Mapping) and any(np.ndim(v) == 1 for v in X.values()):
        n = len(next(v for v in X.values() if np.ndim(v) == 1))
        matrix = np.stack(
            [np.asarray(X[f], dtype=float) if f in X else np.full(n, np.nan) for f in features],
            axis=1,
        )
    elif isinstance(X, Mapping):
        matrix = np.array([[_as_float(X.get(f)) for f in features]])
    elif len(X) and isinstance(X[0], Mapping):
        matrix = np.array([[_as_float(row.get(f)) for f in features] for row in X])
    else:
        matrix = np.asarray(X, dtype=float)
        if matrix.ndim != 2 or matrix.shape[1] != len(features):
            raise InvalidParameterError(
                f"X must have {len(features)} columns ({', '.join(features)}); got shape "
                f"{matrix.shape}"
            )
        matrix = matrix.copy()
    matrix[~np.isfinite(matrix)] = np.nan
    if not log:
        return matrix
    for k, name in enumerate(features):
        if name in _LOG_FEATURES:
            column = matrix[:, k]
            with np.errstate(divide="ignore", invalid="ignore"):
                matrix[:, k] = np.where(column > 0, np.log(np.maximum(column, 1e-12)), np.nan)
    return matrix


def _as_float(value: Any) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


class RetentionPredictor(RegressorMixin, BaseEstimator):
    """Predicts the retention ``R_{i|j}`` of adapter i merged with j from pairwise signals.

    Parameters
    ----------
    features : sequence of str
        Names of the pairwise signals used, in order (see ``pairwise_signals``).
    model : {"ridge", "boosting", "damage"}
        Ridge regression on standardised features (cross-validated penalty), shallow
        histogram gradient boosting, or the damage model: ``1 - R`` as a non-negative
        combination of non-negative scale signals with no intercept, so a partner that moves
        nothing predicts no loss. Its fit has no free baseline to absorb the training tasks'
        mean retention, which generalises to unseen tasks better (``results/predictor_eval.md``).
    coverage : float in (0, 1)
        Nominal coverage of ``predict_interval``; the interval comes from out-of-fold
        residual quantiles (grouped when ``fit`` gets ``groups``), so it is honest for pairs
        unlike those seen in training only as far as the folds are.
    random_state : int
        Seeds the boosting model and the fold assignment.
    fallback_features : sequence of str, or sequence of such sequences, optional
        A second model of the same kind on these signals predicts the rows that miss any of
        ``features`` (e.g. head signals of a causal LM, which has no classification head, or
        of signatures recorded before mergeprobe kept them), instead of imputing them. Several
        sets form a chain, tried in order: each predicts the rows its predecessors miss.
    power : float or "auto"
        Damage model only: ``1 - R = Σ c_k s_k ** power``. Below 1 the response bends, so the
        many pairs with small signals still cost some damage instead of almost none, which is
        what sums of damages over a merged group need (``Policy.plan``). ``"auto"`` picks it
        from ``POWERS`` by least squares on the training pairs (fitted ``power_``; the other
        models take it as 1). The fallback model uses the same setting.
    """

    # Predictor files saved before these parameters existed load without them.
    fallback_features = None
    power = 1.0

    def __init__(
        self,
        features: Sequence[str] = DEFAULT_FEATURES,
        model: str = DEFAULT_MODEL,
        coverage: float = 0.8,
        random_state: int = 0,
        fallback_features: Sequence[str] | None = None,
        power: float | str = 1.0,
    ) -> None:
        self.features = features
        self.model = model
        self.coverage = coverage
        self.random_state = random_state
        self.fallback_features = fallback_features
        self.power = power

    def _validate_params(self) -> None:
        if isinstance(self.features, str) or not len(self.features):
            raise InvalidParameterError(
                f"features must be a non-empty sequence of names; got {self.features!r}"
            )
        if self.model not in _MODELS:
            raise InvalidParameterError(f"model must be one of {_MODELS}; got {self.model!r}")
        if not 0 < float(self.coverage) < 1:
            raise InvalidParameterError(f"coverage must lie in (0, 1); got {self.coverage!r}")
        fallback = [name for names in _fallback_chain(self.fallback_features) for name in names]
        if self.power != "auto" and not (
            isinstance(self.power, (int, float)) and 0 < float(self.power) <= 4
        ):
            raise InvalidParameterError(
                f"power must be 'auto' or a number in (0, 4]; got {self.power!r}"
            )
        if self.model != "damage" and self.power not in (1, "auto"):
            raise InvalidParameterError(
                f"power applies to the damage model only; got power={self.power!r} with "
                f"model={self.model!r}"
            )
        if self.model == "damage":
            signed = [f for f in (*self.features, *fallback) if f not in _DAMAGE_FEATURES]
            if signed:
                raise InvalidParameterError(
                    f"the damage model takes non-negative scale signals "
                    f"({', '.join(sorted(_DAMAGE_FEATURES))}); got {signed} "
                    "(pass model='ridge' or 'boosting' for signed ones such as cosines)"
                )

    def _make_estimator(self):
        from sklearn.ensemble import HistGradientBoostingRegressor
        from sklearn.impute import SimpleImputer
        from sklearn.linear_model import LinearRegression, RidgeCV
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        if self.model == "boosting":
            return HistGradientBoostingRegressor(
                max_depth=2,
                learning_rate=0.05,
                max_iter=150,
                min_samples_leaf=20,
                random_state=self.random_state,
            )
        if self.model == "damage":
            # Fitted to 1 - R (see _target / _untarget). A missing signal costs a learned,
            # non-negative damage through its indicator column.
            return Pipeline(
                [
                    (
                        "impute",
                        SimpleImputer(
                            strategy="median", add_indicator=True, keep_empty_features=True
                        ),
                    ),
                    ("damage", LinearRegression(fit_intercept=False, positive=True)),
                ]
            )
        return Pipeline(
            [
                (
                    "impute",
                    SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
                ),
                ("scale", StandardScaler()),
                ("ridge", RidgeCV(alphas=np.logspace(-2, 4, 13))),
            ]
        )

    def fit(self, X: Any, y: Any, groups: Any = None) -> RetentionPredictor:
        """Fit on rows of signals ``X`` and measured retentions ``y``.

        ``groups`` (e.g. the task of the held-out adapter) makes the interval's folds leave
        whole groups out, as a new task would be.
        """
        from sklearn.model_selection import GroupKFold, KFold

        self._validate_params()
        self.features = tuple(self.features)
        matrix = self._matrix(X)
        target = np.asarray(y, dtype=float)
        if target.shape != (matrix.shape[0],):
            raise InvalidParameterError(
                f"y must have one value per row of X ({matrix.shape[0]}); got shape {target.shape}"
            )
        if not np.isfinite(target).all():
            raise InvalidParameterError("y has NaN or infinite retentions; drop those rows")
        if matrix.shape[0] < 10:
            raise InvalidParameterError(
                f"need at least 10 measured pairs to fit; got {matrix.shape[0]}"
            )
        if self.fallback_features is not None:
            # Rows missing a feature are the fallback's to predict, and to learn from: the
            # main model and its interval see only the rows it will be asked about.
            complete = ~self._missing(X)
            if complete.sum() < 10:
                raise InvalidParameterError(
                    f"need at least 10 measured pairs with every one of {tuple(self.features)} "
                    f"to fit beside a fallback; got {int(complete.sum())}"
                )
            full_target, full_groups = target, groups
            matrix, target = matrix[complete], target[complete]
            groups = np.asarray(groups)[complete] if groups is not None else None
        # A signal no training pair has cannot be learned from; predict without it.
        self.active_features_ = np.flatnonzero(np.isfinite(matrix).any(axis=0))
        if self.active_features_.size == 0:
            raise InvalidParameterError(f"every feature is missing in X ({self.features})")
        matrix = matrix[:, self.active_features_]
        if self.model != "damage":
            self.power_ = 1.0
        elif self.power == "auto":
            self.power_ = self._choose_power(matrix, target)
        else:
            self.power_ = float(self.power)
        matrix = self._bend(matrix)
        if groups is not None:
            groups = np.asarray(groups)
            n_splits = min(5, len(np.unique(groups)))
            splitter = GroupKFold(n_splits=n_splits) if n_splits >= 2 else None
        else:
            splitter = KFold(n_splits=5, shuffle=True, random_state=self.random_state)
        residuals = np.empty(0)
        if splitter is not None:
            out_of_fold = np.full(target.shape, np.nan)
            for train, test in splitter.split(matrix, target, groups):
                estimator = self._make_estimator().fit(matrix[train], self._target(target[train]))
                out_of_fold[test] = self._untarget(estimator.predict(matrix[test]))
            residuals = target - out_of_fold
        self.estimator_ = self._make_estimator().fit(matrix, self._target(target))
        if residuals.size == 0:  # one group only: fall back to in-sample residuals
            residuals = target - self._untarget(self.estimator_.predict(matrix))
        tail = (1 - float(self.coverage)) / 2
        self.residual_quantiles_ = (
            float(np.quantile(residuals, tail)),
            float(np.quantile(residuals, 1 - tail)),
        )
        self.n_features_in_ = len(self.features)
        self.n_train_ = int(matrix.shape[0])
        self.fallback_ = None
        if self.fallback_features is not None:
            first, *rest = _fallback_chain(self.fallback_features)
            self.fallback_ = RetentionPredictor(
                features=first,
                model=self.model,
                coverage=self.coverage,
                random_state=self.random_state,
                fallback_features=tuple(rest) or None,
                power=self.power,
            ).fit(X, full_target, groups=full_groups)
        return self

    def _matrix(self, X: Any) -> np.ndarray:
        return _feature_matrix(X, self.features, log=self.model != "damage")

    def _bend(self, matrix: np.ndarray) -> np.ndarray:
        """The damage model's signals raised to the fitted power (NaN stays NaN)."""
        power = float(getattr(self, "power_", 1.0))
        if self.model != "damage" or power == 1.0:
            return matrix
        return np.maximum(matrix, 0.0) ** power

    def _choose_power(self, matrix: np.ndarray, target: np.ndarray) -> float:
        """The power in ``POWERS`` whose damage model fits ``target`` with the least squared
        error (in sample: one smooth parameter, and the folds' errors need it fixed)."""
        errors = []
        for power in POWERS:
            bent = np.maximum(matrix, 0.0) ** power
            fitted = self._make_estimator().fit(bent, self._target(target))
            errors.append(float(np.mean((self._target(target) - fitted.predict(bent)) ** 2)))
        return float(POWERS[int(np.argmin(errors))])

    def _target(self, retention: np.ndarray) -> np.ndarray:
        return 1.0 - retention if self.model == "damage" else retention

    _untarget = _target  # 1 - (1 - R) = R: the same map both ways

    def _check_fitted(self) -> None:
        if not hasattr(self, "estimator_"):
            raise MergeprobeError("this RetentionPredictor is not fitted yet; call fit first")

    def _missing(self, X: Any) -> np.ndarray:
        """Rows missing any of ``features`` (on the raw scale: a zero is a value, even where
        the logarithm makes it NaN)."""
        return ~np.isfinite(_feature_matrix(X, self.features, log=False)).all(axis=1)

    def _predict_rows(self, X: Any) -> tuple[np.ndarray, np.ndarray, list[tuple[str, ...]]]:
        """Predictions, their ``(n, 2)`` intervals and the signals each row was predicted
        from. Rows missing a feature are the fallback's, with its interval and signals (down a
        chain); the last model of the chain predicts every row left, imputing what it lacks."""
        self._check_fitted()
        matrix = self._bend(self._matrix(X)[:, self.active_features_])
        point = self._untarget(self.estimator_.predict(matrix))
        interval = point[:, None] + np.asarray(self.residual_quantiles_)
        # a signal no training pair had is not one the model learned from
        sources = [tuple(self.features[k] for k in self.active_features_)] * len(point)
        if getattr(self, "fallback_", None) is not None:
            missing = self._missing(X)
            if missing.any():
                back_point, back_interval, back_sources = self.fallback_._predict_rows(X)
                point[missing], interval[missing] = back_point[missing], back_interval[missing]
                sources = [
                    b if m else s for s, b, m in zip(sources, back_sources, missing, strict=True)
                ]
        return point, interval, sources

    def predict(self, X: Any) -> np.ndarray:
        """Predicted retention for each row of ``X``."""
        return self._predict_rows(X)[0]

    def predict_interval(self, X: Any) -> np.ndarray:
        """``(n, 2)`` array of [low, high] at the fitted ``coverage``."""
        return self._predict_rows(X)[1]

    def predicted_from(self, X: Any) -> list[tuple[str, ...]]:
        """For each row of ``X``, the signals of the model that predicts it: this one's, or,
        where one of them is missing, a fallback's (down the chain)."""
        return self._predict_rows(X)[2]


def _fallback_chain(fallback: Any) -> list[tuple[str, ...]]:
    """``fallback_features`` as a list of feature sets, in the order they are tried: a
    sequence of names is one set, a sequence of such sequences a chain."""
    if fallback is None:
        return []
    chain = [fallback] if all(isinstance(name, str) for name in fallback) else list(fallback)
    if (
        isinstance(fallback, str)
        or not chain
        or not all(
            not isinstance(names, str) and len(names) and all(isinstance(n, str) for n in names)
            for names in chain
        )
    ):
        raise InvalidParameterError(
            "fallback_features must be None, a non-empty sequence of names or a non-empty "
            f"sequence of such sequences; got {fallback!r}"
        )
    return [tuple(names) for names in chain]


def _signals_read(predictor: Any) -> tuple[str, ...]:
    """The signals a predictor reads: its features and those of its fallbacks, in order
    (any object with a ``features`` attribute, and optionally ``fallback_features``)."""
    chain = _fallback_chain(getattr(predictor, "fallback_features", None))
    return tuple(dict.fromkeys([*getattr(predictor, "features", ()), *sum(chain, ())]))


def set_retention(pairwise: Sequence[float]) -> float:
    """Retention of one member in a merged set from its pairwise retentions with the others.

    Damages add: ``1 - Σ_j (1 - R_{i|j})`` (each partner's ΔW adds its own perturbation to
    the merged weights). Checked against the benchmark's measured triples.
    """
    values = np.asarray(pairwise, dtype=float)  # lists and arrays alike (plans of 1000s)
    return float(1.0 - np.sum(1.0 - values))


# -- safe persistence ---------------------------------------------------------------------

_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "mergeprobe.predictor.", "builtins.")


def save_predictors(
    predictors: Mapping[str, RetentionPredictor],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write fitted predictors (one per merge method) to a skops file, atomically."""
    import skops.io

    for method, predictor in predictors.items():
        if method not in METHODS:
            raise InvalidParameterError(f"unknown merge method {method!r}; expected {METHODS}")
        predictor._check_fitted()
    path = Path(path)
    payload = {
        "format": "mergeprobe.predictors/1",
        "mergeprobe_version": __version__,
        "metadata_json": json.dumps(dict(metadata or {}), sort_keys=True),
        "predictors": dict(predictors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    skops.io.dump(payload, tmp)
    os.replace(tmp, path)
    return path


def load_predictors(
    path: str | os.PathLike | None = None, *, state: str = "early"
) -> tuple[dict[str, RetentionPredictor], dict[str, Any]]:
    """Predictors and their metadata from a skops file (default: the one shipped for
    ``state``: ``"early"`` signals of runs at their horizon, ``"early_vs_final"`` a run at its
    horizon against finished partners (``predict_pairs(against_finished=...)``), ``"final"``
    adapters, or ``"rehearsal"``: finished adapters' ``rehearsal_kl``, passed to
    ``build_plan(signals=...)``).

    Refuses a pickle file and any object type outside scikit-learn, numpy and mergeprobe's
    predictor: a predictor may come from someone else.
    """
    import skops.io

    if state not in STATES:
        raise InvalidParameterError(f"state must be one of {STATES}; got {state!r}")
    path = Path(path) if path is not None else _DEFAULT_PATHS[state]
    if not path.is_file():
        raise MergeprobeError(f"no predictor file at {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80" or path.suffix in {".pkl", ".pickle", ".joblib"}:
        raise UnsafePredictorError(
            f"{path} is a pickle; mergeprobe never loads pickles (they can run code). "
            "Save predictors with mergeprobe.save_predictors (skops format)."
        )
    if head != b"PK\x03\x04":
        raise UnsafePredictorError(f"{path} is not a skops file")
    untrusted = skops.io.get_untrusted_types(file=path)
    refused = [t for t in untrusted if not t.startswith(_TRUSTED_PREFIXES)]
    if refused:
        raise UnsafePredictorError(f"{path} holds types outside the allow-list: {refused}")
    payload = skops.io.load(path, trusted=untrusted)
    if (
        not isinstance(payload, dict)
        or payload.get("format") != "mergeprobe.predictors/1"
        or not isinstance(payload.get("predictors"), dict)
    ):
        raise UnsafePredictorError(f"{path} is not a mergeprobe predictor file")
    predictors = payload["predictors"]
    for method, predictor in predictors.items():
        if not isinstance(predictor, RetentionPredictor):
            raise UnsafePredictorError(f"{path}: entry {method!r} is not a RetentionPredictor")
    metadata = json.loads(payload.get("metadata_json") or "{}")
    metadata.setdefault("mergeprobe_version", payload.get("mergeprobe_version"))
    return predictors, metadata


def fit(
    pairs: str | os.PathLike | Sequence[Mapping[str, Any]],
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    model: str = DEFAULT_MODEL,
    group_key: str | None = "group",
    out: str | os.PathLike | None = None,
    fallback_features: Sequence[str] | None = None,
    power: float | str = DEFAULT_POWER,
) -> dict[str, RetentionPredictor]:
    """Refit predictors from measured outcomes.

    ``pairs`` is a JSONL file (or a list of dicts): one directed pair per line with its
    pairwise signals (names as in ``features``) and one or more measured retentions
    ``retention_direct``, ``retention_mean``, ``retention_ties``, ``retention_dare``; an
    optional ``group`` (e.g. the task) keeps related pairs in the same interval fold.
    ``fallback_features`` fit a second model for pairs that miss any of ``features``;
    ``power`` is the damage model's (``RetentionPredictor``).
    A predictor is fitted for each method with at least 10 measured pairs; with ``out``
    they are saved (skops) for ``load_predictors``.
    """
    if isinstance(pairs, (str, os.PathLike)):
        rows = []
        with open(pairs, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise InvalidParameterError(f"{pairs}:{number}: not JSON ({exc})") from exc
    else:
        rows = list(pairs)
    predictors = {}
    for method in METHODS:
        key = f"retention_{method}"
        usable = [r for r in rows if math.isfinite(_as_float(r.get(key)))]
        if len(usable) < 10:
            continue
        groups = [r.get(group_key) for r in usable] if group_key else None
        if groups is not None and any(g is None for g in groups):
            groups = None
        predictors[method] = RetentionPredictor(
            features=features, model=model, fallback_features=fallback_features, power=power
        ).fit(usable, [float(r[key]) for r in usable], groups=groups)
    if not predictors:
        raise InvalidParameterError(
            "no merge method has 10 or more measured pairs (keys retention_direct, "
            "retention_mean, retention_ties, retention_dare)"
        )
    if out is not None:
        save_predictors(
            predictors,
            out,
            {"trained_on": {m: p.n_train_ for m, p in predictors.items()}, "source": "fit"},
        )
    return predictors
