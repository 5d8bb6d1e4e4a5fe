"""The callback's decision at the horizon, on the benchmark: each run at 5 % against the
finished adapters of the other tasks.

    python benchmarks/decision_eval.py [--results benchmarks/results] [--tau 0.9]

The situation the callback is for: a store holds finished adapters and a new run starts. For
each of the benchmark's runs (11 tasks x 2 seeds), the partners are the finished adapters of
the other tasks (20). At 5 % of the run the callback predicts both directions with each
partner and ``Policy.decide`` picks merge, reweight or route (pruning is left out: the
redundancy is not compared here); with ``on_incompatible="stop"`` a route stops the run.
Every prediction of a pair that involves the run's task comes from a predictor fitted without
that task (one fold per task, both directions), with the power fitted on every pair as in
predictor_eval. Three readings of the partners:

- ``finished partners at their end`` (what the callback does with the shipped predictors):
  the run's retention from its 5 % signals against the partner's final state (``p05f``) by
  the model fitted on such pairs, the partner's from its final state against the run at 5 %
  (``f05``) by the model fitted on 5 % pairs;
- ``partners at their 5 % probe`` (what it did before): both from 5 % signals (``p05``);
- ``measured pairs``: the measured retentions, the decision a perfect pairwise predictor would
  give with this policy.

Each reading decides twice: weighing each partner against the run only, and weighing the
partners against each other too (``Policy.decide(..., partner_pairs)``, what the callback does;
the partners' pairs predicted from their final signatures without their own task). Each
decision is scored by the measured retention of every member of the group it joins
(additive damage over the group's measured pairs, the composition the policy uses; Spearman
0.84 against the measured triples), and each stop against the measured pairs' decision. Writes
decision_eval.md and decision_eval.json into the results folder.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks.plan_eval import write_report  # noqa: E402
from benchmarks.predictor_eval import fitted_power, load_pairs, loto  # noqa: E402
from mergeprobe.policy import PairPrediction, Policy  # noqa: E402
from mergeprobe.predictor import METHODS, load_predictors, set_retention  # noqa: E402

TAUS = (0.85, 0.9, 0.95)
READINGS = {
    "finished partners at their end": ("p05f", "f05"),
    "partners at their 5 % probe": ("p05", "p05"),
}


def fold_predictions(
    frame: pd.DataFrame, features: list[str], forward: str, backward: str, target: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per directed pair (run, partner): the run's predicted retention from the ``forward``
    signals and, for the reverse pair, the partner's from the ``backward`` signals, each by
    the shipped model kind fitted on the pairs of its own reading (``forward`` pairs for the
    run, 5 % pairs for a partner beside a run at 5 %) without the run's task."""
    y = frame[target].to_numpy(dtype=float)

    def columns(prefix: str) -> list[str]:
        return [f"{prefix}_{f}" for f in features]

    def predict(reading: str, fit_on: str, fold_by: str) -> np.ndarray:
        power = fitted_power(frame, columns(fit_on), y, "damage")
        return loto(
            frame,
            columns(fit_on),
            y,
            "damage",
            power=power,
            predict_columns=columns(reading),
            fold_by=fold_by,
        )

    # the run is the pair's own adapter; for the reverse pair, it is the partner
    own = predict(forward, forward, "self_task")
    partner = predict(backward, "p05" if backward == "f05" else backward, "other_task")
    return own, partner


def between_finished(
    table: pd.DataFrame, frame: pd.DataFrame, features: list[str], methods: list[str]
) -> dict[str, dict[tuple[str, str], float]]:
    """Each finished adapter's predicted retention beside another finished adapter, for every
    pair of the table (same-task ones too): the final signals by the shipped final model kind
    (its power fitted too), fitted on the cross-task pairs that involve neither the adapter's
    task (one fold per task)."""
    columns = [f"final_{f}" for f in features]
    out = {}
    for method in methods:
        y = frame[f"retention_ratio_{method}"].to_numpy(dtype=float)
        predicted = loto(frame, columns, y, "damage", power="auto", predict_on=table)
        out[method] = dict(zip(zip(table.self, table.other, strict=True), predicted, strict=True))
    return out


def partner_pairs(partners: list[str], between: dict) -> list[PairPrediction]:
    """``between[method][(a, b)]`` as one prediction per unordered pair of ``partners``."""
    return [
        PairPrediction(
            a,
            b,
            {m: float(between[m][(a, b)]) for m in between},
            {m: float(between[m][(b, a)]) for m in between},
            {},
        )
        for a, b in itertools.combinations(partners, 2)
    ]


def decisions(
    frame: pd.DataFrame,
    values: dict,
    policy: Policy,
    partners: dict | None = None,
    between: dict | None = None,
) -> dict[str, object]:
    """``Policy.decide`` for every run against the finished adapters of the other tasks
    (``partners``: run -> the row indices of its pairs, when only some are in the store);
    ``values[method]`` = (the run's retention per row, the partner's retention per row);
    ``between[method][(a, b)]``: the partners' retentions beside each other, weighed when
    given."""
    out = {}
    groups = partners if partners is not None else frame.groupby("self").groups
    for run, rows in groups.items():
        others = None
        if between is not None:
            others = partner_pairs([frame.other[k] for k in rows], between)
        pairs = [
            PairPrediction(
                run,
                frame.other[k],
                {m: float(values[m][0][k]) for m in values},
                {m: float(values[m][1][k]) for m in values},
                {},
            )
            for k in rows
        ]
        out[run] = policy.decide(run, pairs, others)
    return out


def measured_group(members: list[str], method: str, measured: dict) -> list[float]:
    """Each member's retention in the merged group: additive damage over its measured pairs."""
    return [set_retention([measured[method][(m, o)] for o in members if o != m]) for m in members]


def score(chosen: dict, oracle: dict, measured: dict, tau: float) -> dict:
    """What the decisions ``chosen`` (run -> Decision) are worth by the measured pairs."""
    kinds = [d.decision for d in chosen.values()]
    stops = {r for r, d in chosen.items() if d.decision == "route"}
    should = {r for r, d in oracle.items() if d.decision == "route"}
    first, own, worst, named, named_ok = [], [], [], 0, 0
    for run, d in chosen.items():
        if d.decision == "route":
            continue
        sides = [
            min(measured[d.method][(run, p)], measured[d.method][(p, run)]) for p in d.members[1:]
        ]
        first.append(sides[0])  # members follow the decision's ranking
        named += len(sides)
        named_ok += sum(v >= tau for v in sides)
        group = measured_group(d.members, d.method, measured)
        own.append(group[0])
        worst.append(min(group))
    return {
        "merge": kinds.count("merge"),
        "reweight": kinds.count("reweight"),
        "route": kinds.count("route"),
        "stops_right": len(stops & should),
        "stops_wrong": len(stops - should),
        "stops_missed": len(should - stops),
        "first_partner": first,
        "first_partner_ok": sum(v >= tau for v in first),
        "named": named,
        "named_ok": named_ok,
        "run_set_retention": own,
        "group_worst": worst,
        "decisions": {r: d.decision for r, d in chosen.items()},
    }


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _pair(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f}, {min(values):.3f}" if values else "—"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--tau", type=float, nargs="+", help=f"the policy's thresholds (default: {TAUS})"
    )
    parser.add_argument(
        "--features",
        nargs="+",
        help="signals the damage model reads (default: the shipped predictors' features)",
    )
    parser.add_argument(
        "--store-tasks",
        type=int,
        default=2,
        help="tasks in each small store of the early-stop table (default: 2)",
    )
    args = parser.parse_args(argv)
    results = Path(args.results)
    if not (results / "pairs.csv").is_file():
        parser.error(f"{results / 'pairs.csv'} not found: run benchmarks/merge_retention.py")
    started = time.perf_counter()
    table = load_pairs(results / "pairs.csv")
    frame = table[~table.same_task].reset_index(drop=True)
    features = args.features or list(load_predictors(state="early_vs_final")[1]["features"])
    missing = [f"{p}_{f}" for p in ("p05", "p05f", "f05") for f in features]
    missing = [c for c in missing if c not in frame or frame[c].isna().all()]
    if missing:
        parser.error(
            f"the pair table lacks {missing}: rerun merge_retention.py and head_signal_eval.py"
        )
    methods = [m for m in Policy().methods if m in METHODS]
    taus = args.tau or list(TAUS)
    # every measured pair, same-task ones too: two partners of one task can join a group
    measured = {
        m: dict(
            zip(
                zip(table.self, table.other, strict=True),
                table[f"retention_ratio_{m}"],
                strict=True,
            )
        )
        for m in methods
    }
    predictions = {
        label: {
            m: fold_predictions(frame, features, forward, backward, f"retention_ratio_{m}")
            for m in methods
        }
        for label, (forward, backward) in READINGS.items()
    }
    index = {(r.self, r.other): k for k, r in enumerate(frame.itertuples())}
    back = np.array([index[(r.other, r.self)] for r in frame.itertuples()])
    truth = {
        m: (
            frame[f"retention_ratio_{m}"].to_numpy(),
            frame[f"retention_ratio_{m}"].to_numpy()[back],
        )
        for m in methods
    }
    predictions["measured pairs"] = truth

    lines = [
        "# Decisions at the horizon: each run at 5 % against finished adapters",
        "",
        f"{frame.self.nunique()} runs, each against the finished adapters of the other tasks "
        f"({frame.groupby('self').size().iloc[0]}); `Policy`, methods {', '.join(methods)}, "
        f"pruning left out. Damage model on {', '.join(features)}. "
        "Predictions leave the run's task out of the fit (both directions).",
        "",
        "| tau | partners read | partners weighed against each other | merge / reweight / "
        "route | first partner: measured (mean, worst) | first partner keeps both >= tau | "
        "named partners | of them measured both >= tau | run's measured set retention (mean, "
        "worst) | group's worst member, measured (mean, worst) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    finished_features = list(load_predictors(state="final")[1]["features"])
    between = {
        "predicted": between_finished(table, frame, finished_features, methods),
        "measured": measured,
    }
    payload: dict = {"features": features, "finished_features": finished_features, "taus": {}}
    for tau in taus:
        policy = Policy(tau=tau, methods=tuple(methods))
        oracle = decisions(frame, predictions["measured pairs"], policy)
        payload["taus"][str(tau)] = {}
        for label, values in predictions.items():
            for weighed in (False, True):
                kind = "measured" if label == "measured pairs" else "predicted"
                chosen = decisions(
                    frame, values, policy, between=between[kind] if weighed else None
                )
                row = score(chosen, oracle, measured, tau)
                key = f"{label}, partners weighed" if weighed else label
                payload["taus"][str(tau)][key] = row
                first = row["first_partner"]
                weighed_label = f"yes ({kind})" if weighed else "no"
                lines.append(
                    f"| {tau:g} | {label} | {weighed_label} | {row['merge']} / "
                    f"{row['reweight']} / {row['route']} | {_pair(first)} | "
                    f"{row['first_partner_ok']} of {len(first)} | {row['named']} | "
                    f"{row['named_ok']} | {_pair(row['run_set_retention'])} | "
                    f"{_pair(row['group_worst'])} |"
                )
    # Small stores: the full one holds a good partner for every run, so stops are measured
    # on every store made of a few other tasks' adapters.
    tasks = sorted(frame.self_task.unique())
    task_of = dict(zip(frame.self, frame.self_task, strict=True))
    if not 1 <= args.store_tasks < len(tasks):
        parser.error(f"--store-tasks must be between 1 and {len(tasks) - 1}")
    cases = []  # (run, the row indices of its pairs with the store's adapters)
    for run, idx in frame.groupby("self").groups.items():
        others = [t for t in tasks if t != task_of[run]]
        for chosen in itertools.combinations(others, args.store_tasks):
            cases.append((run, [k for k in idx if frame.other_task[k] in chosen]))
    sizes = sorted({len(rows) for _, rows in cases})
    lines += [
        "",
        f"Early stop on small stores: each run against every store made of the finished "
        f"adapters of {args.store_tasks} other tasks ({'-'.join(map(str, sizes))} adapters; "
        f"{len(cases)} run-store cases); a stop is right when the measured pairs route the "
        "run too (no partner keeps both sides >= tau under any method).",
        "",
        "| tau | partners read | measured routes | stops | right | wrong | missed | precision "
        "| recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    payload["small_stores"] = {"tasks": args.store_tasks, "cases": len(cases)}
    for tau in taus:
        policy = Policy(tau=tau, methods=tuple(methods))
        counts = {label: [0, 0, 0] for label in predictions if label != "measured pairs"}
        routes = 0
        for run, rows in cases:
            store = {run: rows}
            should = decisions(frame, predictions["measured pairs"], policy, store)[run]
            should = should.decision == "route"
            routes += should
            for label in counts:
                stop = decisions(frame, predictions[label], policy, store)[run].decision == "route"
                counts[label][0] += stop and should
                counts[label][1] += stop and not should
                counts[label][2] += should and not stop
        for label, (right, wrong, missed) in counts.items():
            precision = right / (right + wrong) if right + wrong else None
            recall = right / routes if routes else None
            payload["small_stores"][f"{tau} / {label}"] = {
                "measured_routes": routes,
                "right": right,
                "wrong": wrong,
                "missed": missed,
                "precision": precision,
                "recall": recall,
            }
            lines.append(
                f"| {tau:g} | {label} | {routes} | {right + wrong} | {right} | {wrong} | "
                f"{missed} | {_ratio(precision)} | {_ratio(recall)} |"
            )
    lines += [
        "",
        '- Stops: a run routed (stopped with `on_incompatible="stop"`) that the measured '
        "pairs route too (right), that they would merge (wrong), and runs they route that were "
        "not stopped (missed).",
        "- First partner: the partner the decision ranks first (the highest smaller side of the "
        "pair's predicted retentions); its measured retention is the smaller of the two sides "
        "under the decision's method.",
        "- Named partners: those the decision merges the run with (both sides predicted >= tau, "
        "added while the predicted set retention stays >= tau: the run's alone, or, with the "
        "partners weighed against each other, every member's); the run's measured set "
        "retention with them is additive damage over its measured pairs.",
        "- Partners weighed against each other (what the callback does): `Policy.decide` is "
        "given the partners' predictions beside each other (`partner_pairs`). Predicted: "
        f"both finished, the damage model on {', '.join(finished_features)} from the final "
        "signatures (the shipped final set's kind, its power fitted in each fold), fitted "
        "without the predicted adapter's task; measured: the measured pairs.",
        "- Group's worst member: the smallest measured set retention (additive damage over the "
        "measured pairs) of any member of the merged group, the run or a partner.",
    ]
    seconds = round(time.perf_counter() - started, 1)
    write_report(results, "decision_eval", lines, payload, argv, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
