"""Plan, then apply, on the benchmark's adapters: is measured retention inside the plan's
predicted intervals?

    python benchmarks/apply_eval.py [--results benchmarks/results] [--tau 0.9]

The situation of a team with a second generation of adapters: for each seed, the eleven
finished adapters of that seed (one per task) are planned with ``build_plan`` from their final
signatures, using predictors refitted (``mergeprobe.fit``) on the *other* seed's measured
pairs: the same tasks, other runs, never these adapters. The plan is carried out with
``apply_plan``; every member of a merged group is then evaluated through the benchmark's
evaluator with the ΔW read back from the written PEFT adapter and the head from its
``heads/`` file, and its measured retention compared with the plan's predicted interval
(nominal 80 % per pair, composed additively over the group's partners).
Writes apply_eval.md and apply_eval.json into the results folder.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks import merge_retention as bench  # noqa: E402
from benchmarks.plan_eval import (  # noqa: E402
    benchmark_arguments,
    chosen_predictor,
    load_config,
    load_pairs,
    open_runner,
    results_and_cache,
    write_report,
)
from mergeprobe import SignatureStore, apply_plan, build_plan  # noqa: E402
from mergeprobe import fit as fit_predictors  # noqa: E402
from mergeprobe.policy import Policy  # noqa: E402
from mergeprobe.predictor import METHODS  # noqa: E402


def training_rows(frame: pd.DataFrame, seed: int, features, prefix: str) -> list[dict]:
    """Measured cross-task pairs among one seed's adapters, as ``mergeprobe.fit`` rows."""
    rows = []
    part = frame[(frame.self_seed == seed) & (frame.other_seed == seed) & ~frame.same_task]
    for r in part.to_dict("records"):
        row = {f: r.get(f"{prefix}_{f}") for f in features}
        row.update({f"retention_{m}": r[f"retention_ratio_{m}"] for m in METHODS})
        row["group"] = r["self_task"]
        rows.append(row)
    return rows


def seed_predictors(
    frame: pd.DataFrame,
    seeds,
    seed: int,
    features: list[str],
    probe: str,
    model,
    fallback=None,
    power: float | str = 1.0,
):
    """Predictors for one seed's adapters, refitted on the other seed's measured pairs (the
    same tasks, other runs), and their label. With one seed there is no other: they are fitted
    on the same pairs (in-sample), and the label says so. ``fallback``: the signals of the
    models for pairs that miss any of ``features``, a chain of sets tried in order;
    ``power``: the damage model's."""
    others = [s for s in seeds if s != seed]
    source = others[0] if others else seed
    read = dict.fromkeys([*features, *(name for names in fallback or () for name in names)])
    predictors = fit_predictors(
        training_rows(frame, source, read, probe),
        features=features,
        model=model,
        fallback_features=fallback,
        power=power if model == "damage" else 1.0,
    )
    label = f"refit on seed {source}, {probe} signals" + ("" if others else " (in-sample)")
    return predictors, label


def head_from_file(template: torch.nn.Module, path: Path, head_name: str) -> torch.nn.Module:
    """A copy of ``template`` with the weights of a served head file, whose keys are the
    module's full names (``base_model.model.<head_name>.<parameter>``, nested heads too)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    prefix = f"{head_name}."
    keys = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    if not keys or not all(k.startswith(prefix) for k in keys):
        raise ValueError(f"{path} does not hold the {head_name!r} head: keys {sorted(state)}")
    head = copy.deepcopy(template)
    head.load_state_dict({k[len(prefix) :]: v for k, v in keys.items()})
    return head.eval()


def main(argv=None) -> int:
    parser = benchmark_arguments(__doc__, probe="final")
    parser.add_argument(
        "--ranks",
        default="4,8,16",
        help="rank budgets (apply --rank) whose merged adapters are measured too; '' for none",
    )
    args = parser.parse_args(argv)
    try:
        budgets = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--ranks must be comma-separated integers; got {args.ranks!r}")
    results, cache = results_and_cache(parser, args)
    started = time.perf_counter()
    config = load_config(results)
    frame = load_pairs(results / "pairs.csv")
    features, model, fallback, power = chosen_predictor(results, probe=args.probe)
    by_run, evaluator, runner = open_runner(config, cache)
    store = SignatureStore(cache / "stores" / config.store_key())
    prefix = evaluator.model.base_model_prefix

    member_rows, group_rows, rank_rows = [], [], []

    def measured_retention(served_dir: Path, manifest: dict, group: str, member: str) -> float:
        target = by_run[member]
        evaluator.set_deltas(bench.adapter_deltas(served_dir / group, prefix))
        head = head_from_file(
            target.head, served_dir / manifest["routes"][member]["head"], evaluator.head_name
        )
        return evaluator.accuracy(target.task, head) / runner.accuracy([target], "direct", target)

    for seed in config.seeds:
        predictors, label = seed_predictors(
            frame, config.seeds, seed, features, args.probe, model, fallback, power
        )
        names = [f"{t}-s{seed}" for t in config.tasks]
        signatures = [store.load(n) for n in names]
        plan = build_plan(
            signatures,
            predictors,
            Policy(tau=args.tau),
            predictor_info={"name": label},
        )
        paths = {n: bench.adapter_dir(cache, config, by_run[n].task, seed) for n in names}
        with tempfile.TemporaryDirectory() as tmp:
            served_dir = Path(tmp) / "served"
            manifest = apply_plan(plan, served_dir, base_model=config.model, adapter_paths=paths)
            for served in plan["served"]:
                if len(served["members"]) < 2:
                    continue
                inside_all = True
                for member in served["members"]:
                    target = by_run[member]
                    alone = runner.accuracy([target], "direct", target)
                    measured = measured_retention(served_dir, manifest, served["name"], member)
                    # the same merge as the benchmark builds it (dense sum in memory)
                    dense = runner.accuracy(
                        [by_run[m] for m in served["members"]], served["method"], target
                    )
                    predicted = served["predicted"][member]
                    low, high = predicted["interval"]
                    inside = low <= measured <= high
                    inside_all &= inside
                    member_rows.append(
                        {
                            "seed": seed,
                            "group": served["name"],
                            "method": served["method"],
                            "member": member,
                            "partners": len(served["members"]) - 1,
                            "predicted": predicted["retention"],
                            "low": low,
                            "high": high,
                            "measured": measured,
                            "dense_sum": dense / alone,
                            "inside": inside,
                        }
                    )
                exact_rank = manifest["models"][served["name"]]["rank"]
                for budget in budgets:
                    if budget >= exact_rank:
                        continue
                    budget_dir = Path(tmp) / f"served-r{budget}"
                    if not budget_dir.exists():  # one write per budget, for all groups
                        apply_plan(
                            plan,
                            budget_dir,
                            base_model=config.model,
                            adapter_paths=paths,
                            rank=budget,
                        )
                    budget_manifest = json.loads((budget_dir / "routing.json").read_text())
                    for member in served["members"]:
                        exact = next(
                            r["measured"]
                            for r in member_rows
                            if r["seed"] == seed and r["member"] == member
                        )
                        rank_rows.append(
                            {
                                "seed": seed,
                                "group": served["name"],
                                "member": member,
                                "rank": budget,
                                "exact_rank": exact_rank,
                                "measured": measured_retention(
                                    budget_dir, budget_manifest, served["name"], member
                                ),
                                "exact": exact,
                            }
                        )
                group_rows.append(
                    {
                        "seed": seed,
                        "group": served["name"],
                        "members": "+".join(m.split("-s")[0] for m in served["members"]),
                        "method": served["method"],
                        "inside_all": inside_all,
                    }
                )
        bench.log(
            f"seed {seed}: {plan['summary']['served_models']} served models, "
            f"{plan['summary']['merged_groups']} merged groups"
        )
        evaluator.set_deltas({})

    seconds = round(time.perf_counter() - started, 1)
    inside = sum(r["inside"] for r in member_rows)
    groups_inside = sum(g["inside_all"] for g in group_rows)
    lines = [
        "# Plan, apply, measure: retention against the plan's intervals",
        "",
        f"Per seed: the {len(config.tasks)} finished adapters of that seed (r={config.rank}), "
        f"planned from their {args.probe} signatures with {model} on {', '.join(features)} "
        "refitted on the other seed's measured pairs (same tasks, other runs), "
        f"`Policy(tau={args.tau})`; carried out with `apply_plan`; each member measured with "
        "the written adapter and its head file. Interval: nominal 80 % per pair, composed "
        "additively over the partners.",
        "",
        "| seed | group | method | member | partners | predicted | interval | measured | "
        "in-memory dense sum | inside |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in member_rows:
        lines.append(
            f"| {r['seed']} | {r['group']} | {r['method']} | {r['member']} | {r['partners']} | "
            f"{r['predicted']:.3f} | [{r['low']:.3f}, {r['high']:.3f}] | {r['measured']:.3f} | "
            f"{r['dense_sum']:.3f} | {'yes' if r['inside'] else 'no'} |"
        )
    lines += [
        "",
        f"Members inside their interval: **{inside} / {len(member_rows)}**; merged groups with "
        f"every member inside: **{groups_inside} / {len(group_rows)}**. Measured retention of "
        f"the merged members: mean {sum(r['measured'] for r in member_rows) / max(len(member_rows), 1):.3f}, "
        f"{sum(r['measured'] < args.tau for r in member_rows)} below {args.tau}; mean interval "
        f"width {sum(r['high'] - r['low'] for r in member_rows) / max(len(member_rows), 1):.3f}. "
        "'in-memory dense sum' is the benchmark's own evaluation of the same merge (W0 + ΣΔW "
        "written into the base): equal to 'measured' means the written adapters are exact.",
    ]
    if rank_rows:
        lines += [
            "",
            "## Rank budget (`apply --rank R`)",
            "",
            "The same merged groups written with a truncated-SVD rank budget per layer; retention "
            "of each member measured the same way. Exact rank: the sum of the members' ranks.",
            "",
            "| rank budget | of exact | members | mean retention | mean exact | worst | "
            "mean change | largest drop |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for budget in sorted({r["rank"] for r in rank_rows}):
            part = [r for r in rank_rows if r["rank"] == budget]
            change = [r["measured"] - r["exact"] for r in part]
            exact_ranks = sorted({r["exact_rank"] for r in part})
            lines.append(
                f"| {budget} | {budget}/{'/'.join(map(str, exact_ranks))} | {len(part)} | "
                f"{statistics.fmean(r['measured'] for r in part):.3f} | "
                f"{statistics.fmean(r['exact'] for r in part):.3f} | "
                f"{min(r['measured'] for r in part):.3f} | {statistics.fmean(change):+.3f} | "
                f"{min(change):+.3f} |"
            )
    payload = {"members": member_rows, "groups": group_rows, "ranks": rank_rows}
    write_report(results, "apply_eval", lines, payload, argv, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
