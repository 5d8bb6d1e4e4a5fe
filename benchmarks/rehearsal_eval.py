"""Candidate signal: a merge rehearsed on the run's own data, at the horizon.

    python benchmarks/rehearsal_eval.py [--results benchmarks/results] [--fraction 0.05]

The signature's signals describe a partner on the shared anchor set; the run itself has its
own training data. This script measures, before anything is built into the callback, whether
the run could predict its retention better by *rehearsing* the merge there: with its own
state at ``--fraction`` of training (retrained, seeded and checked against the signature's
update norms, as in head_signal_eval) and each partner's state at the same fraction (which
the run would need from the store: the partner's LoRA weights, about 1.2 MB here), it reads
its own head's outputs on ``--n`` of its own training examples with the base body, its own
update, and its own update plus the partner's (exact dense sum, the direct merge):

- ``rehearsal_kl``: mean KL divergence from its own to the merged class distribution;
- ``rehearsal_kl_ratio``: that, over the KL from its own distribution to the base body's
  (the partner's effect on its outputs relative to its own training's effect);
- ``rehearsal_shift_ratio``: ‖merged − own logits‖ / ‖own − base logits‖;
- ``rehearsal_flip``: the fraction of its examples whose predicted class changes;
- ``rehearsal_loss_rise``: the rise of its cross-entropy loss.

Then: each signal as a ranking, the damage model (non-negative, no intercept, as shipped) on
each alone and with the shipped features, leave-one-task-out, with the shuffled-label null;
and where the shipped model's errors lie (per own adapter). Last, the same rehearsal with the
partners' finished adapters (own run at the horizon) and with both adapters finished (a plan
of finished adapters). Writes rehearsal_eval.md (and .json) to --results.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr
from sklearn.linear_model import LinearRegression

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from benchmarks.head_signal_eval import (  # noqa: E402
    REPRODUCTION_TOLERANCE,
    benchmark_runs,
    early_run_config,
    early_run_parser,
    reproduction_error,
    stop_at,
    within_task_spearman,
)
from benchmarks.merge_retention import (  # noqa: E402
    BenchConfig,
    DeltaWriter,
    _hash,
    adapter_dir,
    collate_batches,
    load_adapter,
    log,
    make_trainer,
    progress,
    task_head,
)
from benchmarks.plan_eval import write_report  # noqa: E402
from benchmarks.predictor_eval import bootstrap, fmt, load_pairs, loto, metrics  # noqa: E402
from mergeprobe.predictor import DEFAULT_FEATURES  # noqa: E402

SIGNALS = (
    "rehearsal_kl",
    "rehearsal_kl_ratio",
    "rehearsal_shift_ratio",
    "rehearsal_flip",
    "rehearsal_loss_rise",
)


def early_states(config: BenchConfig, cache: Path, step: int, runs, tokenizer):
    """{run: (dense updates, head state dict)} at ``step``, retrained and cached under the
    run's training key; and {run: {layer: update norm}} to check the reproduction."""
    from mergeprobe.merge import lora_deltas

    folder = cache / "rehearsal"
    folder.mkdir(parents=True, exist_ok=True)
    states, norms = {}, {}
    for run, task, seed in progress(runs, f"states at step {step}"):
        path = folder / f"{adapter_dir(cache, config, task.name, seed).name}-{step}.safetensors"
        if not path.is_file():
            trainer = make_trainer(
                config, task, seed, tokenizer, [stop_at(step)], folder / "trainer"
            )
            trainer.train()
            _, head = task_head(trainer.model)
            tensors = {f"delta.{k}": v for k, v in lora_deltas(trainer.model).items()}
            tensors.update({f"head.{k}": v.detach() for k, v in head.state_dict().items()})
            tmp = path.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            tmp.replace(path)
        tensors = load_file(str(path))
        deltas = {k[6:]: v for k, v in tensors.items() if k.startswith("delta.")}
        head = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
        states[run] = (deltas, head)
        norms[run] = {k: torch.linalg.norm(v.double()) for k, v in deltas.items()}
    return states, norms


def reproduced_early_states(config: BenchConfig, cache: Path, step: int, runs, tokenizer):
    """``early_states`` checked against the signatures' update norms: (states, the largest
    relative difference); stops when the retrained runs are not the measured ones."""
    states, norms = early_states(config, cache, step, runs, tokenizer)
    error = reproduction_error(config, cache, norms, step)
    if error > REPRODUCTION_TOLERANCE:
        raise SystemExit(
            f"retraining to step {step} does not reproduce the runs (update norms differ by "
            f"{error:.1e}); the rehearsal would describe other adapters"
        )
    return states, error


def own_rows(task, n: int) -> list[dict]:
    """A fixed sample of the task's *training* split: what the run itself could read."""
    rows = list(task.train)
    random.Random(f"rehearsal-{task.name}").shuffle(rows)
    return rows[:n]


def finished_states(config: BenchConfig, cache: Path, runs):
    """{run: (dense updates, head state dict)} of the finished adapters."""
    states = {}
    for run, task, seed in progress(runs, "finished adapters"):
        adapter = load_adapter(config, adapter_dir(cache, config, task.name, seed), task, seed)
        states[run] = (adapter.deltas, adapter.head.state_dict())
    return states


@torch.no_grad()
def rehearse(config, tokenizer, runs, own_states, partner_states, n, cache: Path, label: str):
    """{(own run, partner run): signals} and {own run: the drop of its own loss from the base
    body's}: each own run (its update and head from ``own_states``) merged with each partner
    of another task (its update from ``partner_states``); the logits cached per own run under
    ``label``, which names the states."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(config.model, num_labels=2)
    model.eval().requires_grad_(False)
    writer = DeltaWriter(model, under=model.base_model_prefix)
    head_name = "classifier" if hasattr(model, "classifier") else "score"
    signals, loss_drop = {}, {}
    for run, task, seed in progress(runs, "rehearsals"):
        partners = [r for r, t, _ in runs if t.name != task.name]
        # the logits depend on this run's and every partner's training: keyed by all of them,
        # and for finished adapters by their weight files too (a retrained adapter is new)
        keys = [adapter_dir(cache, config, t.name, s).name for _, t, s in runs]
        if "final" in label:
            for _, t, s in runs:
                weights = (
                    adapter_dir(cache, config, t.name, s) / "adapter_model.safetensors"
                ).stat()
                keys.append([weights.st_size, weights.st_mtime_ns])
        own = adapter_dir(cache, config, task.name, seed).name
        path = cache / "rehearsal" / f"logits-{own}-{label}-n{n}-{_hash(keys)}.safetensors"
        if not path.is_file():
            batches = collate_batches(tokenizer, own_rows(task, n), config.max_length, 64)
            deltas, head_state = own_states[run]
            head = torch.nn.Linear(head_state["weight"].shape[1], head_state["weight"].shape[0])
            head.load_state_dict(head_state)
            setattr(model, head_name, head)

            inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches]

            def logits(update, inputs=inputs) -> torch.Tensor:
                writer.write(update)
                return torch.cat([model(**x).logits for x in inputs]).double()

            out = {"labels": torch.cat([b["labels"] for b in batches])}
            out["base"], out["alone"] = logits({}), logits(deltas)
            for partner in partners:
                other = partner_states[partner][0]
                merged = {k: deltas.get(k, 0) + other.get(k, 0) for k in set(deltas) | set(other)}
                out[f"merged.{partner}"] = logits(merged)
            tmp = path.with_suffix(".tmp")
            save_file(out, str(tmp))
            tmp.replace(path)
        out = load_file(str(path))
        ce = torch.nn.functional.cross_entropy
        loss_drop[run] = float(ce(out["base"], out["labels"]) - ce(out["alone"], out["labels"]))
        for partner in partners:
            signals[(run, partner)] = rehearsal_signals(
                out["base"], out["alone"], out[f"merged.{partner}"], out["labels"]
            )
    return signals, loss_drop


def rehearsal_signals(base, alone, merged, labels) -> dict[str, float]:
    def kl(p_logits, q_logits) -> torch.Tensor:
        log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    own_kl = kl(alone, base)
    ce = torch.nn.functional.cross_entropy
    return {
        "rehearsal_kl": float(kl(alone, merged)),
        "rehearsal_kl_ratio": float(kl(alone, merged) / own_kl.clamp_min(1e-12)),
        "rehearsal_shift_ratio": float(
            (merged - alone).norm() / (alone - base).norm().clamp_min(1e-12)
        ),
        "rehearsal_flip": float((merged.argmax(-1) != alone.argmax(-1)).double().mean()),
        "rehearsal_loss_rise": float(ce(merged, labels) - ce(alone, labels)),
    }


def damage_loto(frame: pd.DataFrame, columns: list[str], y: np.ndarray, shuffle_seed=None):
    """Leave-one-task-out predictions of the shipped damage model's form: ``1 - R`` as a
    non-negative combination of the columns, no intercept (the signals here are not in the
    package's signal list, so its predictor refuses them)."""
    pred = np.full(len(frame), np.nan)
    rng = np.random.default_rng(shuffle_seed)
    X = frame[columns].to_numpy(dtype=float)
    for task in sorted(frame.self_task.unique()):
        test = (frame.self_task == task).to_numpy()
        train = ((frame.self_task != task) & (frame.other_task != task)).to_numpy()
        target = 1.0 - y[train]
        if shuffle_seed is not None:
            target = rng.permutation(target)
        model = LinearRegression(positive=True, fit_intercept=False).fit(X[train], target)
        pred[test] = 1.0 - model.predict(X[test])
    return pred


def ship_predictors(table: pd.DataFrame, per_pair: pd.DataFrame, payload: dict, results: Path):
    """The damage model on the finished adapters' ``rehearsal_kl``, one per merge method,
    fitted on every cross-task pair; its leave-one-task-out figures (the package's predictor,
    as ``predictor_eval`` evaluates it) go into its metadata and the report's payload."""
    from mergeprobe.predictor import _DEFAULT_PATHS, METHODS, RetentionPredictor, save_predictors

    frame = table[~table.same_task].merge(per_pair, on=["self", "other"]).reset_index(drop=True)
    predictors, trained_on, evaluation = {}, {}, {}
    for method in METHODS:
        y = frame[f"retention_ratio_{method}"].to_numpy(dtype=float)
        keep = np.isfinite(y)
        data = frame[keep].reset_index(drop=True)
        evaluation[method] = metrics(loto(data, ["final_rehearsal_kl"], y[keep], "damage"), y[keep])
        predictor = RetentionPredictor(features=("rehearsal_kl",), model="damage")
        predictor.fit({"rehearsal_kl": data["final_rehearsal_kl"].to_numpy()}, y[keep])
        predictors[method] = predictor
        trained_on[method] = int(keep.sum())
    path = _DEFAULT_PATHS["rehearsal"]  # where load_predictors(state="rehearsal") reads it
    save_predictors(
        predictors,
        path,
        {
            "trained_on": trained_on,
            "source": str((results / "rehearsal.csv").relative_to(ROOT))
            if (results / "rehearsal.csv").is_relative_to(ROOT)
            else str(results / "rehearsal.csv"),
            "signals": "rehearsal_kl of finished adapters on 128 own training inputs per task",
            "state": "rehearsal",
            "features": ["rehearsal_kl"],
            "fallback_features": None,
            "tasks": sorted(frame.self_task.unique()),
            "model": "damage",
            "loto_final": evaluation["direct"],
            "loto_by_method": evaluation,
        },
    )
    payload["shipped"] = {"path": str(path.name), "loto_by_method": evaluation}
    log(f"wrote {path}")


def main(argv=None) -> int:
    parser = early_run_parser(__doc__)
    parser.add_argument("--n", type=int, default=128, help="own training examples per run")
    parser.add_argument(
        "--ship",
        action="store_true",
        help="write the damage model on the finished adapters' rehearsal_kl into the package "
        "(load_predictors(state='rehearsal'))",
    )
    args = parser.parse_args(argv)
    results, cache, config, step = early_run_config(parser, args)
    if args.n < 8:
        parser.error(f"--n must be at least 8 examples, got {args.n}")
    started = time.perf_counter()
    prefix = f"p{round(args.fraction * 100):02d}"

    tokenizer, runs = benchmark_runs(config)
    states, error = reproduced_early_states(config, cache, step, runs, tokenizer)
    signals, loss_drop = rehearse(config, tokenizer, runs, states, states, args.n, cache, str(step))

    table = load_pairs(results / "pairs.csv")
    frame = table[~table.same_task].reset_index(drop=True)
    for name in SIGNALS:
        frame[name] = [signals[(r.self, r.other)][name] for r in frame.itertuples()]
    # per-pair values, prefixed like the pair table's signals, for plan_eval --features
    per_pair = frame[["self", "other"]].copy()
    for name in SIGNALS:
        per_pair[f"{prefix}_{name}"] = frame[name]
    y = frame["retention_ratio_direct"].to_numpy(dtype=float)
    shipped = [f"{prefix}_{n}" for n in DEFAULT_FEATURES]
    head = f"{prefix}_head_interference"

    lines = [
        "# Candidate signal: the merge rehearsed on the run's own data",
        "",
        f"Pair table `{results.name}/pairs.csv` ({len(frame)} cross-task directed pairs; "
        f"{config.steps} steps, rank {config.rank}). Each run and partner at step {step} "
        f"({args.fraction:.0%}), retrained; the update norms match the signatures to "
        f"{error:.1e}. {args.n} of the run's own training examples. Leave-one-task-out as in "
        "predictor_eval; 95 % bootstrap intervals; the shuffled-label null is the mean of 5.",
        "",
        "Each signal as a ranking (larger = more damage, fixed in advance):",
        "",
        "| signal | Spearman (all pairs) | within task | AUROC (R < 0.9) |",
        "|---|---|---|---|",
    ]
    payload: dict = {"step": step, "n": args.n, "reproduction_error": error, "signals": {}}
    for column in (*SIGNALS, *shipped, head):
        m = metrics(-frame[column].to_numpy(dtype=float), y)
        within = within_task_spearman(frame.assign(neg=-frame[column]), "neg")
        payload["signals"][column] = {**m, "within_task": within}
        lines.append(f"| {column} | {m['spearman']:.3f} | {within:.3f} | {m['auroc']:.3f} |")
    lines += [
        "",
        "Damage model (leave-one-task-out):",
        "",
        "| features | Spearman | Pearson | MAE | AUROC | shuffled-label null (Spearman) |",
        "|---|---|---|---|---|---|",
    ]
    sets = {"shipped (" + ", ".join(DEFAULT_FEATURES) + ")": shipped}
    sets.update({name: [name] for name in SIGNALS})
    sets.update({f"shipped + {name}": [*shipped, name] for name in SIGNALS[:3]})
    sets["head_interference"] = [head]
    sets["head_interference + rehearsal_kl"] = [head, "rehearsal_kl"]
    predictions = {}
    payload["models"] = {}
    for set_name, columns in sets.items():
        pred = damage_loto(frame, columns, y)
        predictions[set_name] = pred
        null = float(
            np.mean([spearmanr(damage_loto(frame, columns, y, s), y)[0] for s in range(5)])
        )
        m, ci = metrics(pred, y), bootstrap(pred, y)
        payload["models"][set_name] = {**m, "ci": ci, "shuffled_null": null}
        lines.append(f"| {set_name} | {fmt(m, ci)} | {null:.3f} |")

    # Where the errors lie: the residual of the shipped model, averaged per own adapter.
    frame["residual"] = y - predictions[next(iter(sets))]
    per_run = frame.groupby("self").agg(
        task=("self_task", "first"),
        damage=("retention_ratio_direct", lambda r: 1.0 - r.mean()),
        residual=("residual", "mean"),
        rehearsal_kl_ratio=("rehearsal_kl_ratio", "median"),
        interference=(shipped[-1], "median"),
    )
    per_run["loss_drop"] = [loss_drop[run] for run in per_run.index]
    rho = spearmanr(per_run.damage, per_run.residual)[0]
    sensitivity = {
        c: float(spearmanr(per_run[c], per_run.damage)[0])
        for c in ("rehearsal_kl_ratio", "interference")
    }
    # the same from the partner's side: how much damage a partner does, on average
    per_partner = frame.groupby("other").agg(
        damage=("retention_ratio_direct", lambda r: 1.0 - r.mean()),
        interference=(shipped[-1], "median"),
    )
    aggression = float(spearmanr(per_partner.interference, per_partner.damage)[0])
    payload["per_run"] = {
        "damage_vs_residual": float(rho),
        "damage_vs_signal": sensitivity,
        "partner_damage_vs_signal": aggression,
    }
    lines += [
        "",
        f"Per own adapter: mean measured damage (1 − R over its "
        f"{frame.groupby('self').size().max()} partners), the shipped "
        "model's mean residual and the median of two signals over the partners. Over "
        f"{len(per_run)} adapters the residual follows the damage (Spearman {rho:.2f}): the "
        "errors are mostly how sensitive the own task is, which the signals rank poorly "
        f"(median rehearsal_kl_ratio against mean damage {sensitivity['rehearsal_kl_ratio']:.2f}, "
        f"median {shipped[-1]} {sensitivity['interference']:.2f}). From the partner's side "
        f"the same median ranks the mean damage a partner does at {aggression:.2f}.",
        "",
        "| run | mean damage | mean residual | median rehearsal_kl_ratio "
        f"| median {shipped[-1]} | own loss drop at step {step} |",
        "|---|---|---|---|---|---|",
    ]
    for run, r in per_run.sort_values("damage").iterrows():
        lines.append(
            f"| {run} | {r.damage:.3f} | {r.residual:+.3f} | {r.rehearsal_kl_ratio:.3g} "
            f"| {r.interference:.3g} | {r.loss_drop:+.3f} |"
        )
    # The same rehearsal with finished adapters: a new run at the horizon against adapters
    # already trained, and a set of finished adapters (what a plan of finished adapters reads).
    finished = finished_states(config, cache, runs)
    scenarios = {
        f"own run at step {step}, partners finished": (states, f"{step}-vs-final"),
        "both finished": (finished, "final"),
    }
    lines += [
        "",
        "## Finished partners, finished adapters",
        "",
        "The rehearsal with the partner's finished adapter (a new run at the horizon compared "
        "with adapters already trained) and with both adapters finished (a plan over finished "
        "adapters). Each signal as a ranking, and the damage model on it alone "
        "(leave-one-task-out, shuffled-label null the mean of 5); for comparison the shipped "
        "features and head_interference from the final signatures.",
        "",
        "| states | features | raw Spearman | raw AUROC | damage model: Spearman | MAE | AUROC "
        "| null |",
        "|---|---|---|---|---|---|---|---|",
    ]
    payload["finished"] = {}
    for scenario, (own_states, label) in scenarios.items():
        found, _ = rehearse(config, tokenizer, runs, own_states, finished, args.n, cache, label)
        if label == "final":
            both_finished = found
        scenario_frame = frame.copy()
        for name in SIGNALS:
            scenario_frame[name] = [found[(r.self, r.other)][name] for r in frame.itertuples()]
            if label == "final":
                per_pair[f"final_{name}"] = scenario_frame[name]
        compared = {name: [name] for name in SIGNALS}
        if label == "final":
            compared["shipped features, final"] = [f"final_{n}" for n in DEFAULT_FEATURES]
            head_final = "final_head_interference"
            if head_final in frame and frame[head_final].notna().all():
                compared["head_interference, final"] = [head_final]
        for set_name, columns in compared.items():
            raw = metrics(-scenario_frame[columns[0]].to_numpy(dtype=float), y)
            pred = damage_loto(scenario_frame, columns, y)
            null = float(
                np.mean(
                    [spearmanr(damage_loto(scenario_frame, columns, y, k), y)[0] for k in range(5)]
                )
            )
            m, ci = metrics(pred, y), bootstrap(pred, y)
            payload["finished"][f"{scenario} / {set_name}"] = {
                "raw": raw,
                **m,
                "ci": ci,
                "shuffled_null": null,
            }
            raw_cells = (
                f"{raw['spearman']:.3f} | {raw['auroc']:.3f}" if len(columns) == 1 else "— | —"
            )
            lines.append(
                f"| {scenario} | {set_name} | {raw_cells} | {m['spearman']:.3f} "
                f"[{ci['spearman'][0]:.2f}, {ci['spearman'][1]:.2f}] | {m['mae']:.3f} "
                f"| {m['auroc']:.3f} | {null:.3f} |"
            )
    # The package's rehearsal_kl on the finished adapters' directories must give these values.
    from transformers import AutoModelForSequenceClassification

    from mergeprobe import rehearsal_kl

    run, task, seed = runs[0]
    partners = [r for r, t, _ in runs if t.name != task.name][:2]
    directories = {r: adapter_dir(cache, config, t.name, s) for r, t, s in runs}
    package = rehearsal_kl(
        AutoModelForSequenceClassification.from_pretrained(config.model, num_labels=2),
        {r: directories[r] for r in (run, *partners)},
        {run: collate_batches(tokenizer, own_rows(task, args.n), config.max_length, 64)},
    )["rehearsal_kl"][0, 1:]
    expected = np.array([both_finished[(run, p)]["rehearsal_kl"] for p in partners])
    package_error = float(np.max(np.abs(package - expected) / np.abs(expected).clip(1e-12)))
    payload["package_rehearsal_kl_error"] = package_error
    lines += [
        "",
        f"`mergeprobe.rehearsal_kl` on the adapter directories of {run} and two partners gives "
        f"these values to {package_error:.1e} (largest relative difference).",
    ]
    per_pair.to_csv(results / "rehearsal.csv", index=False)
    if args.ship:
        ship_predictors(table, per_pair, payload, results)
    seconds = round(time.perf_counter() - started, 1)
    log(f"done in {seconds} s")
    write_report(results, "rehearsal_eval", lines, payload, argv, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
