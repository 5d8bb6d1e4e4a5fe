"""Evaluate the retention predictor on the benchmark's pair table (design §7).

    python benchmarks/predictor_eval.py [--pairs benchmarks/results/pairs.csv]

Leave-one-task-out: for each task t, the predictor is fitted on the pairs that involve
neither t, and predicts every pair whose *own* adapter (the new run) is of task t. Pooled
out-of-fold predictions give Spearman, Pearson, MAE and AUROC for "retention < 0.9", each with
a 95 % bootstrap interval (pairs resampled). Compared with: shuffled labels, random features,
the final update cosine alone (model kinship) and the best single early feature; at every
probe fraction (1, 2, 5, 10 % and final). Set retention from pairwise predictions is checked
against the measured triples. Writes predictor_eval.md (and .json) next to the pair table,
and with --ship writes the default predictors into the package.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mergeprobe.exceptions import InvalidParameterError  # noqa: E402
from mergeprobe.predictor import (  # noqa: E402
    _DEFAULT_PATHS,
    METHODS,
    RetentionPredictor,
    save_predictors,
    set_retention,
)
from mergeprobe.signals.compare import HEAD_SIGNALS  # noqa: E402

FIRST_DEFAULT = (
    "interference_ratio_last",
    "interference_ratio",
    "drift_norm_ratio",
    "update_norm_ratio",
    "grad_norm_ratio",
    "cka_self",
    "cka_other",
)
ABSOLUTE_NORMS = ("update_norm_self", "update_norm_other", "drift_norm_self", "drift_norm_other")
# p05f: a run at 5 % against finished partners (what the callback compares when the store
# holds adapters that finished training); f05: a finished adapter against a run at 5 %
PREFIXES = ("p01", "p02", "p05", "p10", "final", "p05f", "f05")
STATE_LABELS = {
    "p05": "both at 5 %",
    "p05f": "the run at 5 %, its partner finished",
    "f05": "the adapter finished, its partner at 5 %",
    "final": "both finished",
}
MODELS = ("ridge", "boosting", "damage")
THRESHOLD = 0.9
N_BOOT = 1000


def metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(pred) & np.isfinite(y)
    pred, y = pred[ok], y[ok]
    low = y < THRESHOLD
    return {
        "spearman": float(spearmanr(pred, y)[0]) if np.ptp(pred) > 0 else math.nan,
        "pearson": float(pearsonr(pred, y)[0]) if np.ptp(pred) > 0 else math.nan,
        "mae": float(np.mean(np.abs(pred - y))),
        "auroc": float(roc_auc_score(low, -pred)) if 0 < low.sum() < len(low) else math.nan,
    }


def bootstrap(pred: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in ("spearman", "pearson", "mae", "auroc")}
    n = len(y)
    for _ in range(N_BOOT):
        idx = rng.integers(0, n, n)
        for k, v in metrics(pred[idx], y[idx]).items():
            draws[k].append(v)
    return {
        k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
        for k, v in draws.items()
    }


def paired_difference(a: np.ndarray, b: np.ndarray, y: np.ndarray, seed: int = 0) -> list[float]:
    """95 % interval of Spearman(b, y) - Spearman(a, y), pairs resampled together."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(1000):
        i = rng.integers(0, len(y), len(y))
        draws.append(spearmanr(b[i], y[i])[0] - spearmanr(a[i], y[i])[0])
    return [float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))]


def signal_name(column: str) -> str:
    """``p05_interference_ratio`` -> ``interference_ratio``: the name the shipped predictor
    reads (and transforms: scale-like signals enter as logarithms)."""
    head, _, rest = column.partition("_")
    return rest if head in PREFIXES else column


# The model for pairs without head signals (causal LMs, signatures recorded before the callback
# kept the head): the best set without them.
FALLBACK_SET = "partner interference"
# Signals defined from other signals (pairwise_signals): not counted as measured signals.
COMPOSITES = {"head_interference", "head_interference_room"}
# Signals added after the sets below were declared (and fraction bookkeeping): kept out of them.
LATER = {"label_room_self", "head_interference_room", "fraction_self", "fraction_other"}


DEFAULT_DATA = ROOT.parent / "shared" / "data"


def label_rooms(data: Path) -> dict[str, float]:
    """Each task's label room (``mergeprobe.signals.labels.label_room``): 1 − the share of its
    most frequent label among the rows of its ``train.jsonl`` (the rows the benchmark trains
    on). The callback counts the labels of the batches it sees before its horizon (240 at step
    15 here, within about ±0.03 of the file's shares)."""
    rooms = {}
    for train in sorted(Path(data).glob("*/train.jsonl")):
        with train.open() as f:
            counts = Counter(json.loads(line)["label"] for line in f if line.strip())
        if counts:
            rooms[train.parent.name] = 1 - max(counts.values()) / sum(counts.values())
    return rooms


def load_pairs(path: Path, data: Path | None = None) -> pd.DataFrame:
    """The pair table, with the head signals of ``head_signal_eval.py`` (``head_signals.csv``
    beside it) when the table predates the callback recording them, the head interference
    (``pairwise_signals``' definition) at every fraction that has both of its parts, and,
    where ``data`` (default: the data folder of ``run.json`` beside the table, else
    ``../shared/data``) holds the tasks' training files, the own task's label room and the
    head interference scaled by it (``head_interference_room``) at every fraction: the
    benchmark's signatures predate the callback counting labels."""

    def without_empty_head_columns(frame: pd.DataFrame) -> pd.DataFrame:
        # the benchmark's signatures carry no head: their head columns are empty
        return frame.drop(columns=[c for c in frame if "_head_" in c and frame[c].isna().all()])

    table = without_empty_head_columns(pd.read_csv(path))
    extra = Path(path).with_name("head_signals.csv")
    if extra.is_file():
        head = without_empty_head_columns(pd.read_csv(extra))
        head = head[["self", "other", *(c for c in head.columns[2:] if c not in table)]]
        table = table.merge(head, on=["self", "other"], how="left")
    added: dict[str, pd.Series] = {}  # joined at once: column by column fragments the frame
    for prefix in PREFIXES:
        ratio, kl = f"{prefix}_interference_ratio_last", f"{prefix}_head_kl"
        target = f"{prefix}_head_interference"
        if ratio in table.columns and kl in table.columns and target not in table.columns:
            added[target] = np.sqrt(table[ratio] * table[kl].clip(lower=0))
    if data is None:
        run = Path(path).with_name("run.json")
        config = json.loads(run.read_text()).get("config", {}) if run.is_file() else {}
        data = Path(config.get("data") or DEFAULT_DATA)
    rooms = label_rooms(data) if Path(data).is_dir() else {}
    if rooms:
        room = table.self_task.map(rooms)
        for prefix in PREFIXES:
            head = f"{prefix}_head_interference"
            values = added.get(head, table[head] if head in table.columns else None)
            if values is not None:
                added[f"{prefix}_label_room_self"] = room
                added[f"{prefix}_head_interference_room"] = values * room
    # the training files' rooms replace a table's own columns of the same name
    table = table.drop(columns=[c for c in added if c in table.columns])
    return pd.concat([table, pd.DataFrame(added, index=table.index)], axis=1)


def early_signal_names(frame: pd.DataFrame) -> list[str]:
    """The signals the pair table has at 5 %, without the layer and fraction bookkeeping."""
    return sorted(
        {c[4:] for c in frame.columns if c.startswith("p05_")}
        - {"shared_layers", "layer_coverage", "fraction_self", "fraction_other"}
    )


def candidate_feature_sets(signal_names: list[str]) -> dict[str, list[str]]:
    """The feature sets the predictor is chosen among, by name.

    Declared before looking at the r=16 table except the two "partner" sets, which the
    single-feature ranking suggested, and the head sets, added later: the pick among them is
    optimistic (``selection_eval.py`` measures by how much)."""
    return {
        "ratios + CKA (first default)": list(FIRST_DEFAULT),
        "ratios + CKA + absolute norms": [*FIRST_DEFAULT, *ABSOLUTE_NORMS],
        "partner interference": ["interference_ratio", "interference_ratio_last"],
        # Added after head_signal_eval.py measured the head signals on this table, and the
        # composite after looking at them: their figures carry that selection.
        "head interference": ["head_interference"],
        # Added after the per-task errors followed the tasks' fragility (rehearsal_eval.md)
        # and the tasks' label balance was seen to follow it: carries that selection too.
        "head interference × label room": ["head_interference_room"],
        "partner interference + head": [
            "interference_ratio",
            "interference_ratio_last",
            *HEAD_SIGNALS,
        ],
        "partner magnitudes": ["interference_ratio", "update_norm_other", "drift_norm_other"],
        # (the head signals stay out of the sets declared before them)
        "magnitudes only": [
            f
            for f in signal_names
            if ("norm" in f or "interference" in f) and not f.startswith("head_")
        ],
        "per-run only (no pair interaction)": [
            f for f in signal_names if f.endswith(("_self", "_other")) and f not in LATER
        ],
        "every signal": [f for f in signal_names if not f.startswith("head_") and f not in LATER],
    }


def cross_task_pairs(
    parser: argparse.ArgumentParser, pairs: str
) -> tuple[Path, pd.DataFrame, pd.DataFrame, np.ndarray]:
    """The pair table (``load_pairs``), its cross-task pairs and their measured direct-merge
    retention; a parser error when the table is missing."""
    path = Path(pairs)
    if not path.is_file():
        parser.error(f"{path} not found: run benchmarks/merge_retention.py first")
    table = load_pairs(path)
    frame = table[~table.same_task].reset_index(drop=True)
    return path, table, frame, frame["retention_ratio_direct"].to_numpy(dtype=float)


CALIBRATION_TAUS = (0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97)


def calibration_row(kept: np.ndarray) -> tuple[float, float, float, float]:
    """Share of measured retentions at or above 0.9 and 0.85, their mean and minimum."""
    return float(np.mean(kept >= 0.9)), float(np.mean(kept >= 0.85)), kept.mean(), kept.min()


def loto(
    frame: pd.DataFrame,
    columns: list[str],
    y: np.ndarray,
    model: str,
    *,
    shuffle_seed=None,
    power: float | str = 1.0,
    predict_columns: list[str] | None = None,
    fold_by: str = "self_task",
    predict_on: pd.DataFrame | None = None,
):
    """Out-of-fold predictions, one fold per task of the pair's own adapter (``fold_by=
    "other_task"``: of its partner), by the same predictor that ``--ship`` fits (the columns
    renamed to their signal names), fitted on pairs that involve neither the fold's task;
    fitted on ``columns`` and, when given, predicting from ``predict_columns`` (the same
    signals in another state), for the rows of ``predict_on`` (default: ``frame``)."""
    rows = frame if predict_on is None else predict_on
    folds = [
        (
            ((frame.self_task != task) & (frame.other_task != task)).to_numpy(),
            (rows[fold_by] == task).to_numpy(),
        )
        for task in sorted(frame.self_task.unique())
    ]
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    return out_of_fold(
        frame, columns, y, model, power, folds, rows, predict_columns or columns, rng
    )


def leave_both_out(
    frame: pd.DataFrame, columns: list[str], y: np.ndarray, model: str, *, power=1.0
) -> np.ndarray:
    """Out-of-fold predictions, one fold per unordered pair of tasks: the pairs between the
    two tasks (both directions) predicted by a model fitted on pairs that involve neither.
    Stricter than ``loto``: there a held-out pair's partner is seen in training, so a model
    that recognises partners (boosting on partner magnitudes) scores by learning each
    partner's typical damage, which does not carry to an adapter the benchmark never saw."""
    folds = []
    for a, b in itertools.combinations(sorted(frame.self_task.unique()), 2):
        involved = frame.self_task.isin({a, b}), frame.other_task.isin({a, b})
        folds.append(
            ((~involved[0] & ~involved[1]).to_numpy(), (involved[0] & involved[1]).to_numpy())
        )
    return out_of_fold(frame, columns, y, model, power, folds, frame, columns)


def out_of_fold(frame, columns, y, model, power, folds, rows, predict_columns, rng=None):
    """Each fold's ``test`` rows of ``rows`` predicted from ``predict_columns`` by the
    predictor ``--ship`` fits (the columns renamed to their signal names), fitted on the
    fold's ``train`` rows of ``frame`` (their targets shuffled when ``rng`` is given)."""
    pred = np.full(len(rows), np.nan)
    names = [signal_name(c) for c in columns]
    X = frame[columns].set_axis(names, axis=1)
    X_test = rows[predict_columns].set_axis(names, axis=1)
    for train, test in folds:
        if not test.any():
            continue
        target = y[train].copy()
        if rng is not None:
            rng.shuffle(target)
        predictor = RetentionPredictor(features=tuple(names), model=model, power=power)
        predictor.fit(X[train], target, groups=frame.self_task[train])
        pred[test] = predictor.predict(X_test[test])
    return pred


def fitted_power(frame: pd.DataFrame, columns: list[str], y: np.ndarray, model: str) -> float:
    """The damage model's power fitted by least squares on every pair (``power="auto"``);
    1 for the other models. Fixed across folds: a power refitted in each fold moves whole
    tasks' predictions and costs the pooled ranking (reported beside it)."""
    if model != "damage":
        return 1.0
    names = [signal_name(c) for c in columns]
    predictor = RetentionPredictor(features=tuple(names), model=model, power="auto")
    return predictor.fit(frame[columns].set_axis(names, axis=1), y).power_


def model_takes(model: str, names) -> bool:
    """Whether ``model`` can read the signals ``names`` (the damage model takes only
    non-negative scale signals; cosines are signed)."""
    try:
        RetentionPredictor(features=tuple(names), model=model)._validate_params()
    except InvalidParameterError:
        return False
    return True


def seed_pairs(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Each seed-0 pair's measured retention, the same task pair's with seed-1 adapters, and
    the pair's own task; None with fewer than 10 such pairs."""
    by_tasks = {
        (r.self_task, r.other_task, r.self_seed, r.other_seed): r.retention_ratio_direct
        for r in frame.itertuples()
    }
    first, second, task = [], [], []
    for (a, b, sa, sb), value in by_tasks.items():
        if (sa, sb) == (0, 0) and (a, b, 1, 1) in by_tasks:
            first.append(value)
            second.append(by_tasks[(a, b, 1, 1)])
            task.append(a)
    if len(first) < 10:
        return None
    return np.array(first), np.array(second), np.array(task)


def seed_replication(frame: pd.DataFrame) -> dict[str, float] | None:
    """Measured retention of each seed-0 pair against the same task pair with seed-1 adapters:
    how well *any* predictor could rank pairs, given the training noise."""
    found = seed_pairs(frame)
    return None if found is None else metrics(found[0], found[1])


def fmt(m: dict, ci: dict | None = None) -> str:
    cells = []
    for k in ("spearman", "pearson", "mae", "auroc"):
        if not math.isfinite(m[k]):
            cells.append("—")
            continue
        text = f"{m[k]:.3f}"
        if ci is not None:
            text += f" [{ci[k][0]:.2f}, {ci[k][1]:.2f}]"
        cells.append(text)
    return " | ".join(cells)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", default=str(ROOT / "benchmarks" / "results" / "pairs.csv"))
    parser.add_argument("--triples", help="default: triples.csv beside --pairs")
    parser.add_argument(
        "--ship", action="store_true", help="write the default predictors into the package"
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        help="use this model for the tables and --ship instead of the best one at 5 %%",
    )
    parser.add_argument(
        "--feature-set",
        help="use this feature set for the tables and --ship instead of the best one at 5 %% "
        '(e.g. "partner magnitudes", the shipped set)',
    )
    parser.add_argument(
        "--power",
        default="auto",
        help="the damage model's power: a number, or 'auto' (default) to fit it by least "
        "squares on every pair, once per feature set and fraction",
    )
    args = parser.parse_args(argv)
    if args.power != "auto":
        try:
            args.power = float(args.power)
        except ValueError:
            parser.error(f"--power must be 'auto' or a number; got {args.power!r}")
    started = time.perf_counter()
    pairs_path, table, frame, y = cross_task_pairs(parser, args.pairs)
    out: dict = {"pairs": str(pairs_path), "n_pairs": len(frame), "threshold": THRESHOLD}
    lines = [
        "# Retention predictor: leave-one-task-out evaluation",
        "",
        f"Pair table `{pairs_path.relative_to(ROOT) if pairs_path.is_relative_to(ROOT) else pairs_path}`: "
        f"{len(frame)} cross-task directed pairs, {frame.self_task.nunique()} tasks; target "
        f"ratio retention under the direct merge ({(y < THRESHOLD).mean():.0%} below {THRESHOLD}). "
        "One fold per task of the pair's own adapter; training pairs involve neither task. "
        f"95 % intervals: {N_BOOT} bootstrap resamples of the pooled out-of-fold pairs.",
        "",
        "| predictor | signals | Spearman | Pearson | MAE | AUROC (R < 0.9) |",
        "|---|---|---|---|---|---|",
    ]
    signal_names = early_signal_names(frame)
    feature_sets = candidate_feature_sets(signal_names)

    if args.feature_set is not None and args.feature_set not in feature_sets:
        parser.error(f"--feature-set must be one of {sorted(feature_sets)}")

    def cols(prefix: str, names) -> list[str]:
        return [f"{prefix}_{f}" for f in names if f"{prefix}_{f}" in frame.columns]

    def power_of(prefix: str, names, model: str) -> float:
        if model != "damage":
            return 1.0
        if args.power != "auto":
            return args.power
        return fitted_power(frame, cols(prefix, names), y, model)

    set_scores, set_powers = {}, {}
    for set_name, names in feature_sets.items():
        for model in MODELS:
            if cols("p05", names) and model_takes(model, names):
                power = set_powers[(set_name, model)] = power_of("p05", names, model)
                m = metrics(loto(frame, cols("p05", names), y, model, power=power), y)
                set_scores[(set_name, model)] = m
    candidates = {
        k: v
        for k, v in set_scores.items()
        if args.feature_set in (None, k[0]) and args.model in (None, k[1])
    }
    if not candidates:
        parser.error(f"model {args.model!r} cannot take feature set {args.feature_set!r}")
    best_set, best_model = max(
        set_scores, key=lambda k: np.nan_to_num(set_scores[k]["spearman"], nan=-9)
    )
    chosen_set, chosen_model = max(
        candidates, key=lambda k: np.nan_to_num(candidates[k]["spearman"], nan=-9)
    )
    features = feature_sets[chosen_set]
    out["feature_sets"] = {
        f"{k[0]} / {k[1]}": {"features": feature_sets[k[0]], "power": set_powers[k], **v}
        for k, v in set_scores.items()
    }
    # Pairs without a label room (finished adapters added from disk, token labels) fall back
    # to the head interference alone; pairs without head signals (causal LMs, older
    # signatures) to a model without them.
    # name -> what its model goes without
    fallback_sets = {}
    if "head_interference_room" in features:
        fallback_sets["head interference"] = "label room"
    if any(f.startswith("head_") for f in features):
        fallback_sets[FALLBACK_SET] = "head signals"
    fallback = [feature_sets[name] for name in fallback_sets]
    chosen_power = set_powers[(chosen_set, chosen_model)]
    out["chosen_features"] = {
        "set": chosen_set,
        "features": features,
        "fallback": fallback,
        "power": chosen_power,
        "powers": {},  # by fraction, below
    }

    results = {}
    for model in MODELS:
        if not model_takes(model, features):
            continue
        for prefix in PREFIXES:
            c = cols(prefix, features)
            if not c:
                continue
            power = power_of(prefix, features, model)
            if model == chosen_model:
                out["chosen_features"]["powers"][prefix] = power
            pred = loto(frame, c, y, model, power=power)
            m, ci = metrics(pred, y), bootstrap(pred, y)
            results[(model, prefix)] = (m, ci, pred)
            label = f"{model}, power {power:g}" if model == "damage" else model
            lines.append(f"| {label} | {prefix} | {fmt(m, ci)} |")
    # The models that predict pairs without the chosen signals, at every fraction.
    out["fallback_results"] = {}
    fallback_predictions = {}
    for name, without in fallback_sets.items():
        backup = feature_sets[name]
        for prefix in PREFIXES:
            if c := cols(prefix, backup):
                pred = loto(frame, c, y, chosen_model, power=power_of(prefix, backup, chosen_model))
                m, ci = metrics(pred, y), bootstrap(pred, y)
                out["fallback_results"][f"{name}/{prefix}"] = {**m, "ci": ci}
                fallback_predictions[(name, prefix)] = pred
                label = f"{chosen_model}, fallback without {without} ({name})"
                lines.append(f"| {label} | {prefix} | {fmt(m, ci)} |")
    m5, _, pred5 = results[(chosen_model, "p05")]
    if chosen_model == "damage" and args.power == "auto":
        # The honest figure for a power learned from the data: refitted inside every fold.
        for prefix in ("p05", "p05f"):
            if not cols(prefix, features):
                continue
            pred = loto(frame, cols(prefix, features), y, "damage", power="auto")
            m, ci = metrics(pred, y), bootstrap(pred, y)
            out[f"power_refitted_{prefix}"] = {**m, "ci": ci}
            lines.append(f"| damage, power refitted in every fold | {prefix} | {fmt(m, ci)} |")
    # Stricter folds: the partner's task held out too, so no model can learn partners.
    for prefix in ("p05", "p05f"):
        if c := cols(prefix, features):
            power = power_of(prefix, features, chosen_model)
            pred = leave_both_out(frame, c, y, chosen_model, power=power)
            m, ci = metrics(pred, y), bootstrap(pred, y)
            out[f"both_tasks_out_{prefix}"] = {**m, "ci": ci}
            label = f"{chosen_model}, both tasks of the pair held out"
            lines.append(f"| {label} | {prefix} | {fmt(m, ci)} |")
    # nulls at 5 %
    shuffled = [
        metrics(
            loto(frame, cols("p05", features), y, chosen_model, shuffle_seed=s, power=chosen_power),
            y,
        )
        for s in range(5)
    ]
    null_shuffled = {k: float(np.nanmean([d[k] for d in shuffled])) for k in shuffled[0]}
    # The chosen model on positive random values in place of its signals (positive, so the
    # damage model can take them too).
    rng = np.random.default_rng(0)
    noise = frame.copy()
    for c in cols("p05", features):
        noise[c] = rng.lognormal(size=len(noise))
    null_random = metrics(
        loto(noise, cols("p05", features), y, chosen_model, power=chosen_power), y
    )
    lines.append(
        "| null: the chosen signal fitted on shuffled labels (mean of 5; the damage model's "
        "ranking is its signal's, the labels set its scale: the null of the whole choice is in "
        f"selection_eval.md) | p05 | {fmt(null_shuffled)} |"
    )
    lines.append(f"| null: random features | — | {fmt(null_random)} |")
    # one-feature baselines
    kin = frame["final_update_cosine"].to_numpy(dtype=float)
    kin_loto = loto(frame, ["final_update_cosine"], y, "ridge")
    replicate = seed_replication(frame)
    if replicate is not None:
        out["noise_ceiling"] = replicate
        lines.append(
            f"| noise ceiling: the same task pair, other seeds (measured vs measured) | — | "
            f"{fmt(replicate)} |"
        )
    lines.append(f"| kinship: final update cosine (raw) | final | {fmt(metrics(kin, y))} |")
    lines.append(
        f"| kinship: final update cosine (LOTO ridge) | final | {fmt(metrics(kin_loto, y))} |"
    )
    singles, raw_singles = {}, {}
    for name in signal_names:
        column = f"p05_{name}"
        if frame[column].notna().sum() < 10:
            continue
        singles[name] = metrics(loto(frame, [column], y, "ridge"), y)
        # The feature itself as a ranking, nothing fitted (its sign chosen in-sample, so this
        # is optimistic): no fold can shift it, which a fitted baseline's intercept does.
        x = frame[column].to_numpy(dtype=float)
        ok = np.isfinite(x)
        sign = np.sign(spearmanr(x[ok], y[ok])[0]) or 1.0
        raw_singles[name] = {**metrics(sign * x, y), "mae": math.nan, "sign": float(sign)}

    def best_of(scores: dict) -> str:
        return max(scores, key=lambda k: np.nan_to_num(scores[k]["spearman"], nan=-9))

    best_single, best_raw = best_of(singles), best_of(raw_singles)
    measured_singles = {k: v for k, v in raw_singles.items() if k not in COMPOSITES}
    best_measured = best_of(measured_singles)
    lines.append(
        f"| best single early feature (LOTO ridge): {best_single} | p05 | {fmt(singles[best_single])} |"
    )
    lines.append(
        f"| best single early feature (raw ranking, sign chosen in-sample): {best_raw} | p05 | "
        f"{fmt(raw_singles[best_raw])} |"
    )
    if best_measured != best_raw:
        lines.append(
            f"| best single measured signal, not a composite (raw ranking): {best_measured} | "
            f"p05 | {fmt(measured_singles[best_measured])} |"
        )
    lines.append("")
    if (chosen_set, chosen_model) == (best_set, best_model):
        why = (
            "highest leave-one-task-out Spearman at 5 %; the choice is made on the same folds, "
            "so its figure is slightly optimistic"
        )
    else:
        why = (
            f"given with --feature-set / --model; the best at 5 % is **{best_set}** with "
            f"**{best_model}**"
        )
    lines.append(f"Chosen: feature set **{chosen_set}**, model **{chosen_model}** ({why}).")
    if chosen_model == "damage":
        lines.append("")
        lines.append(
            f"The damage model's power ({chosen_power:g} at 5 %) is fitted by least squares on "
            "every pair, like the set's choice, and then held fixed in the folds: a power "
            "refitted inside each fold moves a whole held-out task's predictions and costs "
            "the pooled ranking (the 'refitted' row)."
        )
    lines.append("")
    lines.append("Feature sets at 5 % (leave-one-task-out):")
    lines.append("")
    lines.append("| feature set | model | Spearman | Pearson | MAE | AUROC |")
    lines.append("|---|---|---|---|---|---|")
    for (set_name, model), m in set_scores.items():
        label = f"damage, power {set_powers[(set_name, model)]:g}" if model == "damage" else model
        lines.append(f"| {set_name} | {label} | {fmt(m)} |")
    lines.append("")
    lines.append(
        "Single early features (5 %): leave-one-task-out ridge on one feature, and the raw "
        "feature as a ranking (Spearman, Pearson and AUROC of the signed feature):"
    )
    lines.append("")
    lines.append(
        "| feature | Spearman | Pearson | MAE | AUROC | raw Spearman | raw Pearson | raw AUROC |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for name in sorted(singles, key=lambda k: -np.nan_to_num(singles[k]["spearman"], nan=-9)):
        raw = raw_singles[name]
        lines.append(
            f"| {name} | {fmt(singles[name])} | {raw['spearman']:.3f} | {raw['pearson']:.3f} "
            f"| {raw['auroc']:.3f} |"
        )
    lines.append("")

    # Which shipped predictor for which pair of states: the chosen model fitted on one state's
    # signals and applied, leave-one-task-out, to another's (its own power each).
    states = [p for p in ("p05", "p05f", "f05", "final") if len(cols(p, features)) == len(features)]
    if len(states) > 1:
        lines += [
            "Partner states (the callback compares a run at its horizon with partners at the "
            "same fraction, or with finished ones): the chosen model fitted on the signals of "
            "one pair of states (rows) and applied, leave-one-task-out, to another's (columns). "
            "Each cell: MAE / mean bias (predicted minus measured) / Spearman. "
            + "; ".join(f"{p}: {STATE_LABELS[p]}" for p in states)
            + ".",
            "",
            "| fitted on | " + " | ".join(states) + " |",
            "|---" * (len(states) + 1) + "|",
        ]
        out["partner_states"] = {}
        for fit_on in (p for p in states if p != "f05"):
            power = power_of(fit_on, features, chosen_model)
            cells = []
            for apply_to in states:
                pred = loto(
                    frame,
                    cols(fit_on, features),
                    y,
                    chosen_model,
                    power=power,
                    predict_columns=cols(apply_to, features),
                )
                m = metrics(pred, y)
                bias = float(np.nanmean(pred - y))
                out["partner_states"][f"{fit_on} -> {apply_to}"] = {**m, "bias": bias}
                cells.append(f"{m['mae']:.3f} / {bias:+.3f} / {m['spearman']:.3f}")
            lines.append(f"| {fit_on} (power {power:g}) | " + " | ".join(cells) + " |")
        if {"p05", "p05f"} <= set(states):
            # the callback's choice for a finished partner: its end, or its own 5 % probe
            same = results[(chosen_model, "p05")][2]
            end = results[(chosen_model, "p05f")][2]
            gain = spearmanr(end, y)[0] - spearmanr(same, y)[0]
            low, high = paired_difference(same, end, y)
            out["finished_partner_gain"] = [gain, low, high]
            lines += [
                "",
                "A finished partner read at its end (p05f, its own predictor) rather than at the "
                f"run's fraction (p05): Spearman {gain:+.3f} [{low:+.3f}, {high:+.3f}] (paired "
                "bootstrap, 95 %).",
            ]
        lines.append("")
    if "head_interference_room" in features:
        # what the label room adds to the head interference it scales, state by state
        out["label_room_gain"] = {}
        gains = []
        for prefix in ("p05", "p05f", "final"):
            if (chosen_model, prefix) not in results:
                continue
            without = fallback_predictions[("head interference", prefix)]
            with_room = results[(chosen_model, prefix)][2]
            gain = spearmanr(with_room, y)[0] - spearmanr(without, y)[0]
            low, high = paired_difference(without, with_room, y)
            out["label_room_gain"][prefix] = [gain, low, high]
            gains.append(f"{prefix} {gain:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines += [
            "The label room (1 − the own task's majority-label share; the callback counts the "
            "labels of the batches it sees before its horizon, here read from each task's "
            "train.jsonl) scaling the head interference, against the head interference alone "
            "(the fallback for pairs without it), Spearman: " + "; ".join(gains) + " (paired "
            "bootstrap, 95 %).",
            "",
        ]

    # What the policy's tau means on measured retention: of the pairs the chosen model
    # predicts at or above a threshold, how many keep 0.9 (leave-one-task-out).
    out["threshold_calibration"] = {}
    base_rate = float(np.mean(y >= 0.9))
    lines += [
        "Threshold calibration: the pairs whose leave-one-task-out prediction (chosen model) "
        "is at or above the policy's tau, and their measured retention (share at or above "
        f"0.9 and 0.85, mean, worst). Of all {len(y)} pairs, {base_rate:.0%} keep 0.9.",
        "",
        "| signals | tau | pairs at or above | measured >= 0.9 | measured >= 0.85 | mean | worst |",
        "|---|---|---|---|---|---|---|",
    ]
    for prefix in ("p05", "p05f"):
        if (chosen_model, prefix) not in results:
            continue
        predicted = results[(chosen_model, prefix)][2]
        rows = out["threshold_calibration"][prefix] = {}
        for tau in CALIBRATION_TAUS:
            kept = y[predicted >= tau]
            if not len(kept):
                continue
            share9, share85, mean, worst = calibration_row(kept)
            rows[str(tau)] = {"pairs": len(kept), "at_least_0.9": share9, "at_least_0.85": share85}
            rows[str(tau)].update(mean=mean, worst=worst)
            lines.append(
                f"| {prefix} | {tau:g} | {len(kept)} | {share9:.2f} | {share85:.2f} | "
                f"{mean:.3f} | {worst:.3f} |"
            )
    lines.append("")

    # Does each method's model choose the merge method? The chosen signals at 5 %, one model
    # per method (its power refitted in every fold), each pair merged by the method predicted
    # best for it, against one method for every pair.
    per_method = {}
    at_five = cols("p05", features)
    for method in METHODS if at_five else ():
        column = f"retention_ratio_{method}"
        measured = frame[column].to_numpy(dtype=float) if column in frame.columns else None
        if measured is not None and np.isfinite(measured).all():
            power = "auto" if chosen_model == "damage" else 1.0
            per_method[method] = (
                measured,
                loto(frame, at_five, measured, chosen_model, power=power),
            )
    if len(per_method) > 1:
        names = list(per_method)
        measured_by = np.stack([per_method[m][0] for m in names], axis=1)
        predicted_by = np.stack([per_method[m][1] for m in names], axis=1)
        picked = measured_by[np.arange(len(frame)), np.nanargmax(predicted_by, axis=1)]
        counts = np.bincount(np.nanargmax(predicted_by, axis=1), minlength=len(names))
        rows = [("the method predicted best for the pair", picked)]
        rows += [(f"always {m}", measured_by[:, k]) for k, m in enumerate(names)]
        rows.append(("oracle: the measured best", measured_by.max(axis=1)))
        out["method_choice"] = {label: float(v.mean()) for label, v in rows}
        lines += [
            "Choosing the merge method per pair (5 %, one model per method, leave-one-task-out "
            "with the power refitted in every fold): the measured retention of each pair's own "
            "side under the method chosen. Predicted best: "
            + ", ".join(f"{m} {n}" for m, n in zip(names, counts, strict=True))
            + " pairs.",
            "",
            "| method | mean measured retention | share >= 0.9 |",
            "|---|---|---|",
            *(f"| {label} | {v.mean():.3f} | {np.mean(v >= 0.9):.2f} |" for label, v in rows),
            "",
        ]

    # set retention from pairwise values, against the measured triples
    triples_path = Path(args.triples) if args.triples else pairs_path.with_name("triples.csv")
    if triples_path.is_file():
        triples = pd.read_csv(triples_path)
        measured = {(r.self, r.other): r.retention_ratio_direct for r in table.itertuples()}
        predicted = dict(zip(zip(frame.self, frame.other, strict=True), pred5, strict=True))
        rows = []
        for t in triples.itertuples():
            members = t.members.split("+")
            for k, m in enumerate(members):
                others = [o for o in members if o != m]
                truth = getattr(t, f"retention_ratio_{k}")
                pm = [measured.get((m, o), math.nan) for o in others]
                pp = [predicted.get((m, o), math.nan) for o in others]
                rows.append(
                    (truth, set_retention(pm), float(np.prod(pm)), min(pm), set_retention(pp))
                )
        arr = np.array(rows, dtype=float)
        ok = np.isfinite(arr).all(axis=1)
        arr = arr[ok]
        lines.append(
            f"Set retention on {int(ok.sum())} members of {len(triples)} measured triples:"
        )
        lines.append("")
        lines.append("| composition | from | Spearman | Pearson | MAE | AUROC |")
        lines.append("|---|---|---|---|---|---|")
        for k, label, source in (
            (1, "additive damage (used)", "measured pairs"),
            (2, "product", "measured pairs"),
            (3, "min", "measured pairs"),
            (4, "additive damage (used)", "predicted pairs, 5 %"),
        ):
            lines.append(f"| {label} | {source} | {fmt(metrics(arr[:, k], arr[:, 0]))} |")
        lines.append("")

    out["results"] = {f"{m}/{p}": v[0] for (m, p), v in results.items()}
    out["intervals"] = {f"{m}/{p}": v[1] for (m, p), v in results.items()}
    out["null_shuffled"], out["null_random"] = null_shuffled, null_random
    out["best_single"] = {"feature": best_single, **singles[best_single]}
    out["best_single_raw"] = {"feature": best_raw, **raw_singles[best_raw]}
    out["best_measured_raw"] = {"feature": best_measured, **measured_singles[best_measured]}
    out["kinship"] = metrics(kin, y)
    out["chosen_model"] = chosen_model
    out["loto_p05"] = m5
    out["seconds"] = round(time.perf_counter() - started, 1)
    lines.append(
        "Command: `python benchmarks/predictor_eval.py "
        f"{shlex.join(argv if argv is not None else sys.argv[1:])}`; {out['seconds']} s."
    )
    text = "\n".join(lines) + "\n"
    pairs_path.with_name("predictor_eval.md").write_text(text)
    pairs_path.with_name("predictor_eval.json").write_text(
        json.dumps(out, indent=2, default=float) + "\n"
    )
    print(text)

    if args.ship:
        # Three predictor sets: runs at their horizon, a run at its horizon against finished
        # partners, and finished adapters (``mergeprobe add``): magnitudes grow over
        # training, so a model fitted on one state's signals is off in scale on another's
        # (the partner-states table).
        for prefix, state, signals in (
            ("p05", "early", "p05 (5 % of training) for both adapters"),
            ("p05f", "early_vs_final", "p05f (the run at 5 % of training, its partner finished)"),
            ("final", "final", "final adapters, both sides"),
        ):
            predictors = {}
            trained_on = {}
            present = [c[len(prefix) + 1 :] for c in cols(prefix, features)]
            backup = [[c[len(prefix) + 1 :] for c in cols(prefix, b)] for b in fallback]
            backup = [b for b in backup if b] or None
            read = cols(prefix, dict.fromkeys([*features, *(f for b in fallback for f in b)]))
            for method in METHODS:
                target = table[f"retention_ratio_{method}"].to_numpy(dtype=float)
                keep = ~table.same_task.to_numpy() & np.isfinite(target)
                data = table[keep]
                predictor = RetentionPredictor(
                    features=tuple(present),
                    model=chosen_model,
                    fallback_features=tuple(map(tuple, backup)) if backup else None,
                    power=args.power if chosen_model == "damage" else 1.0,
                )
                predictor.fit(
                    data[read].set_axis([signal_name(c) for c in read], axis=1),
                    target[keep],
                    groups=data.self_task,
                )
                predictors[method] = predictor
                trained_on[method] = int(keep.sum())
            path = _DEFAULT_PATHS[state]  # where load_predictors(state=...) reads it
            save_predictors(
                predictors,
                path,
                {
                    "trained_on": trained_on,
                    "source": str(pairs_path.relative_to(ROOT))
                    if pairs_path.is_relative_to(ROOT)
                    else str(pairs_path),
                    "signals": signals,
                    "state": state,
                    "features": present,
                    "fallback_features": backup,
                    "feature_set": chosen_set,
                    "tasks": sorted(table.self_task.unique()),
                    "model": chosen_model,
                    "power": {m: p.power_ for m, p in predictors.items()},
                    f"loto_{prefix}": out["results"][f"{chosen_model}/{prefix}"],
                },
            )
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
