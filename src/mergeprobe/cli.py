"""The ``mergeprobe`` command.

    mergeprobe add ADAPTER... --store S [--base MODEL] [--labels [NAME=]TRAIN.jsonl ...]
    mergeprobe plan --store S [--names A B ...] [--tau 0.9] --out plan.json
        [--inputs NAME=PATH ...]   (rehearse the merges on each adapter's own inputs)
    mergeprobe apply plan.json --out DIR [--base MODEL] [--adapter NAME=PATH ...] [--rank R]
    mergeprobe report LOG_OR_PLAN [--plot heatmap.png]
    mergeprobe fit PAIRS.jsonl --out predictors.skops [--model ridge] [--features a b ...]

Each subcommand is a thin layer over the public API: it checks its arguments, prints what it
did, and exits nonzero with a one-line message (never a traceback) on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from ._util import atomic_write
from ._version import __version__
from .exceptions import MergeprobeError

_EXIT_USAGE, _EXIT_ERROR = 2, 1


class _CommandError(Exception):
    """Bad input a user can fix; printed as one line, exit status 1."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value}")
    return value


def _power(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number; got {text!r}") from None


def _fit(args: argparse.Namespace) -> int:
    from .predictor import DEFAULT_FEATURES, METHODS
    from .predictor import fit as fit_predictors

    pairs = Path(args.pairs)
    if not pairs.is_file():
        raise _CommandError(f"pairs file {pairs} not found")
    out = Path(args.out)
    if out.suffix != ".skops":
        raise _CommandError(f"--out must end in .skops (a safe skops file); got {out}")
    predictors = fit_predictors(
        pairs,
        features=tuple(args.features or DEFAULT_FEATURES),
        model=args.model,
        group_key=args.group_key or None,
        out=out,
        fallback_features=tuple(map(tuple, args.fallback_features or ())) or None,
        power=args.power,
    )
    print(f"fitted {len(predictors)} predictor(s) from {pairs} -> {out}")
    print()
    print("| method | pairs | features used | power | residual interval |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        if method not in predictors:
            print(f"| {method} | < 10 measured | — | — | not fitted |")
            continue
        p = predictors[method]
        low, high = p.residual_quantiles_
        interval = f"[{low:+.3f}, {high:+.3f}]" if math.isfinite(low) else "—"
        print(
            f"| {method} | {p.n_train_} | {len(p.active_features_)} | {p.power_:g} | {interval} |"
        )
    print()
    print(f"use it: MergeProbeCallback(..., predictor={str(out)!r})")
    return 0


def _add(args: argparse.Namespace) -> int:
    from .probe import signature_of_adapter
    from .store import SignatureStore, sanitize_name

    paths = [Path(p) for p in args.adapters]
    for path in paths:
        if not (path / "adapter_config.json").is_file():
            raise _CommandError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    if args.name and len(paths) > 1:
        raise _CommandError("--name needs exactly one adapter")
    names = [sanitize_name(args.name or p.absolute().name) for p in paths]
    if len(set(names)) != len(names):
        raise _CommandError(
            f"two adapters would get the same name: {names}; add them one by one with --name"
        )
    labels = _labels_by_name(args.labels, names, args.label_field)
    store = SignatureStore(args.store)
    taken = [n for n in names if n in store]
    if taken and not args.replace:
        raise _CommandError(
            f"{args.store} already has {', '.join(taken)}; pass --replace to overwrite"
        )
    # Every signature is computed before any is written: a bad adapter leaves the store as it was.
    signatures = []
    for k, (path, name) in enumerate(zip(paths, names, strict=True), 1):
        print(f"[{k}/{len(paths)}] measuring {path} ...", flush=True)
        signatures.append(
            signature_of_adapter(
                path, name=name, base_model=args.base, training_labels=labels.get(name)
            )
        )
    for signature in signatures:
        store.save(signature)
        meta = signature.metadata
        print(
            f"added {signature.name}: {len(meta.get('layers', []))} LoRA layers, "
            f"{len(meta.get('drift_layers', []))} drift layers, base "
            f"{(meta.get('base_model') or {}).get('name_or_path')}"
        )
    print(f"{args.store}: {len(store)} signature(s)")
    return 0


def _labels_by_name(items: Sequence[str] | None, names: list[str], field: str | None) -> dict:
    """``add --labels [NAME=]PATH``: each named adapter's training label counts, read before
    any adapter is measured (a bare PATH is the one adapter's)."""
    from .signals.labels import count_labels
    from .store import sanitize_name

    if not items:
        if field is not None:
            raise _CommandError("--label-field needs --labels")
        return {}
    if len(items) == 1 and len(names) == 1 and ("=" not in items[0] or Path(items[0]).is_file()):
        paths = {names[0]: items[0]}
    else:
        paths = {sanitize_name(n): p for n, p in _name_paths(items, "--labels").items()}
    unknown = sorted(set(paths) - set(names))
    if unknown:
        raise _CommandError(
            f"--labels names {', '.join(unknown)}, not an adapter being added ({', '.join(names)})"
        )
    return {
        name: count_labels(_read_labels(Path(path), field or "label"))
        for name, path in paths.items()
    }


def _read_labels(path: Path, field: str) -> list:
    """The class label in ``field`` of every row of a JSONL of training rows."""
    from .signals.labels import class_label

    labels = []
    for number, row in _jsonl_rows(path, "labels"):
        if not isinstance(row, dict) or field not in row:
            raise _CommandError(f"{path}:{number} has no {field!r} field (see --label-field)")
        try:
            labels.append(class_label(row[field]))
        except MergeprobeError as exc:
            raise _CommandError(f"{path}:{number}: {exc}") from exc
    if not labels:
        raise _CommandError(f"{path} has no rows")
    return labels


def _jsonl_rows(path: Path, what: str) -> Generator[tuple[int, Any], None, None]:
    """(line number, parsed row) of every non-empty line of a JSONL file, read lazily (a
    caller may stop early); a missing file is refused at the call."""
    if not path.is_file():
        raise _CommandError(f"{what} {path} not found")

    def rows() -> Generator[tuple[int, Any], None, None]:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _CommandError(f"{path}:{number} is not JSON ({exc})") from exc

    return rows()


def _write_json(path: Path, document) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(document, indent=2) + "\n").encode())


def _name_paths(items: Sequence[str] | None, option: str, form: str = "NAME") -> dict[str, str]:
    """``NAME=PATH`` arguments as a mapping; a malformed or repeated name is refused."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise _CommandError(f"{option} takes {form}=PATH; got {item!r}")
        if name in out:
            raise _CommandError(f"{option} names {name} twice")
        out[name] = path
    return out


def _read_inputs(path: Path, limit: int) -> list[dict]:
    """The first ``limit`` rows of a JSONL of inputs, each with ``text`` or ``input_ids``."""
    rows = []
    lines = _jsonl_rows(path, "inputs")
    for number, row in lines:
        ids = row.get("input_ids") if isinstance(row, dict) else None
        text = row.get("text") if isinstance(row, dict) else None
        # one form per row, decided here: token ids when valid, else the text
        if isinstance(ids, list) and ids and all(_is_token_id(i) for i in ids):
            rows.append({"input_ids": ids})
        elif isinstance(text, str) and text:
            rows.append({"text": text})
        else:
            raise _CommandError(
                f"{path}:{number} needs a non-empty 'text' string or an 'input_ids' list "
                "of non-negative integers"
            )
        if len(rows) == limit:
            lines.close()  # the file now, not when the generator is collected
            break
    if not rows:
        raise _CommandError(f"{path} has no inputs")
    return rows


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _pad_id(model, tokenizer) -> int:
    """The id to pad with: the model's own (decoder classifiers read the last token that is
    not it), else the tokenizer's pad or end-of-sequence token, else 0."""
    for value in (
        getattr(model.config, "pad_token_id", None),
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
    ):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _input_batches(
    rows: list[dict], tokenizer, batch_size: int, max_length: int, pad_id: int = 0
) -> list:
    """Padded ``input_ids`` / ``attention_mask`` batches: texts through the tokenizer, token
    ids as given (cut to ``max_length``), padded on the right with ``pad_id``."""
    import torch

    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = [
            row["input_ids"][:max_length]
            if "input_ids" in row
            else tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
            for row in chunk
        ]
        width = max(len(i) for i in ids)
        batches.append(
            {
                "input_ids": torch.tensor([i + [pad_id] * (width - len(i)) for i in ids]),
                "attention_mask": torch.tensor(
                    [[1] * len(i) + [0] * (width - len(i)) for i in ids]
                ),
            }
        )
    return batches


def _rehearse(args: argparse.Namespace, signatures: list, inputs: dict[str, str]) -> dict:
    """``rehearsal_kl`` of the signatures' adapters, each on the inputs given for it."""
    import transformers

    from .adapters import AUTO_CLASS_BY_TASK
    from .policy import _adapter_entry
    from .signals.rehearsal import rehearsal_kl

    names = [s.name for s in signatures]
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise _CommandError(f"--inputs names adapters not planned: {', '.join(unknown)}")
    given = _name_paths(args.adapter, "--adapter")
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise _CommandError(f"--adapter names adapters not planned: {', '.join(unknown)}")
    adapters = {}
    for signature in signatures:
        path = given.get(signature.name) or _adapter_entry(signature)["path"]
        if not path or not (Path(path) / "adapter_config.json").is_file():
            raise _CommandError(
                f"no adapter directory for {signature.name} (recorded: {path}); give it with "
                f"--adapter {signature.name}=PATH"
            )
        adapters[signature.name] = path
    bases = {(s.metadata.get("base_model") or {}).get("weights_fingerprint") for s in signatures}
    if len(bases) > 1:
        raise _CommandError(
            f"the adapters sit on {len(bases)} different base models; a rehearsal merges them "
            "on one: plan each base's adapters with --names"
        )
    recorded = {(s.metadata.get("base_model") or {}).get("name_or_path") for s in signatures}
    recorded.discard(None)
    base = args.base or (recorded.pop() if len(recorded) == 1 else None)
    if base is None:
        raise _CommandError("the signatures record no single base model path; give it with --base")
    tasks = {str((s.metadata.get("adapter") or {}).get("task_type") or "") for s in signatures}
    task = tasks.pop().rsplit(".", 1)[-1] if len(tasks) == 1 else None
    if task not in AUTO_CLASS_BY_TASK:
        raise _CommandError(
            f"the adapters' task types are {sorted(tasks | ({task} if task else set()))}: a "
            "rehearsal needs one task type with an output head (e.g. SEQ_CLS, CAUSAL_LM)"
        )
    auto = getattr(transformers, AUTO_CLASS_BY_TASK[task])
    rows = {name: _read_inputs(Path(path), args.max_inputs) for name, path in inputs.items()}
    tokenizer = None
    if any("text" in row for r in rows.values() for row in r):
        from .probe import _load_tokenizer

        tokenizer = _load_tokenizer(str(base))  # refuses a folder without tokenizer files
        if tokenizer is None:
            raise _CommandError(
                f"no tokenizer for {base} to read the 'text' inputs; give 'input_ids' instead"
            )
    model = auto.from_pretrained(base)
    pad_id = _pad_id(model, tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id  # decoder classifiers need it to find the last token
    batches = {
        name: _input_batches(r, tokenizer, args.batch_size, args.max_length, pad_id)
        for name, r in rows.items()
    }
    missing = [n for n in names if n not in batches]
    if missing:
        print(
            f"no --inputs for {', '.join(missing)}: rehearsed only as partners; their own "
            "retention is predicted from a typical rehearsal (the predictor's training median)"
        )
    print(f"rehearsing {len(batches)} adapter(s) against {len(names) - 1} partner(s) each ...")
    return rehearsal_kl(model, adapters, batches, progress=True)


def _plan(args: argparse.Namespace) -> int:
    from .policy import Policy, _check_states, build_plan
    from .predictor import load_predictors
    from .report import plan_table
    from .store import SignatureStore

    if not Path(args.store).is_dir():
        raise _CommandError(f"store {args.store} not found")
    store = SignatureStore(args.store)
    available = store.names()
    names = args.names or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise _CommandError(f"not in {args.store}: {', '.join(unknown)}")
    if len(names) < 2:
        raise _CommandError(f"a plan needs at least two adapters; {args.store} has {len(names)}")
    out = Path(args.out)
    if out.suffix != ".json":
        raise _CommandError(f"--out must end in .json; got {out}")
    signatures = [store.load(n) for n in names]
    inputs = _name_paths(args.inputs, "--inputs")
    if args.adapter and not inputs:
        raise _CommandError("--adapter is used only with --inputs (the merge rehearsal)")
    per_state = _name_paths(args.predictor_for, "--predictor-for", "STATE")
    _check_states(per_state, "--predictor-for")
    if per_state and (args.predictor is not None or inputs):
        raise _CommandError(
            "--predictor-for replaces the shipped sets per state; it goes with neither "
            "--predictor (one file for every pair) nor --inputs (the rehearsal predictors)"
        )
    predictors, info, signals, sets = None, None, None, None
    if inputs:
        signals = _rehearse(args, signatures, inputs)
        predictors, meta = load_predictors(args.predictor, state="rehearsal")
        info = {"name": str(args.predictor or "default (rehearsal)"), **meta}
    elif args.predictor is not None:  # else build_plan picks the sets per pair
        predictors, meta = load_predictors(args.predictor)
        info = {"name": str(args.predictor), **meta}
    elif per_state:
        sets = per_state  # the plan names each set by its file
    policy = Policy(
        tau=args.tau, prune_similarity=args.prune_similarity, methods=tuple(args.methods)
    )
    plan = build_plan(
        signatures,
        predictors,
        policy,
        predictor_info=info,
        progress=True,
        signals=signals,
        sets=sets,
    )
    _write_json(out, plan)
    print("\n".join(plan_table(plan)))
    print(f"\nplan written to {out}; carry it out with: mergeprobe apply {out} --out DIR")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from .merge import apply_plan

    plan_path = Path(args.plan)
    if not plan_path.is_file():
        raise _CommandError(f"plan {plan_path} not found")
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _CommandError(f"{plan_path} is not JSON ({exc})") from exc
    overrides = _name_paths(args.adapter, "--adapter")
    manifest = apply_plan(
        plan,
        args.out,
        base_model=args.base,
        adapter_paths=overrides,
        rank=args.rank,
        density=args.density,
        seed=args.seed,
        progress=True,
    )
    for name, model in manifest["models"].items():
        what = (
            model["kind"]
            if model["kind"] == "route"
            else f"{model['kind']} ({model['method']}, rank {model['rank']})"
        )
        print(f"{name}: {what}: {', '.join(model['members'])}")
    print(
        f"\n{len(manifest['models'])} served model(s) for {len(manifest['routes'])} adapter(s) in {args.out}"
    )
    print(f"routing manifest: {Path(args.out) / 'routing.json'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import decisions_table, load_report_source, plan_table, plot_retention_heatmap

    kind, source = load_report_source(args.source)
    lines = plan_table(source) if kind == "plan" else decisions_table(source)
    print("\n".join(lines))
    if args.plot:
        path = plot_retention_heatmap(source, args.plot, kind=kind, method=args.method)
        print(f"\nheatmap written to {path}")
    return 0


def _quiet_libraries() -> None:
    """Errors only from transformers: a command prints its own progress and results."""
    import warnings

    try:
        import transformers
    except ImportError:  # pragma: no cover
        return
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def build_parser() -> argparse.ArgumentParser:
    from .predictor import DEFAULT_FEATURES, DEFAULT_MODEL, DEFAULT_POWER

    parser = argparse.ArgumentParser(
        prog="mergeprobe",
        description="Will this LoRA adapter merge with the others? Signals, predictions and "
        "plans from the first few percent of training.",
    )
    parser.add_argument("--version", action="version", version=f"mergeprobe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    fit = commands.add_parser(
        "fit",
        help="refit the retention predictors from your own measured merges",
        description="Refit the retention predictors from a JSONL of measured pairs: one "
        "directed pair per line with its pairwise signals (mergeprobe.pairwise_signals "
        "names) and measured retention_direct / retention_mean / retention_ties / "
        "retention_dare (any that you measured). A predictor is fitted per method with at "
        "least 10 pairs.",
    )
    fit.add_argument("pairs", help="JSONL file of measured pairs")
    fit.add_argument("--out", required=True, help="predictor file to write (.skops)")
    fit.add_argument(
        "--model",
        choices=("ridge", "boosting", "damage"),
        default=DEFAULT_MODEL,
        help=f"default: {DEFAULT_MODEL}; damage takes only non-negative scale signals "
        "(norms, ratios)",
    )
    fit.add_argument(
        "--features",
        nargs="+",
        metavar="NAME",
        help=f"signals to use (default: {' '.join(DEFAULT_FEATURES)})",
    )
    fit.add_argument(
        "--fallback-features",
        nargs="+",
        action="append",
        metavar="NAME",
        help="signals of a second model for pairs that miss any of --features (e.g. head "
        "signals, which models without a linear task head lack); repeat it for a chain, "
        "tried in order",
    )
    fit.add_argument(
        "--power",
        type=_power,
        default=DEFAULT_POWER,
        help="the damage model's power: a number in (0, 4], or 'auto' to fit it by least "
        f"squares (default: {DEFAULT_POWER})",
    )
    fit.add_argument(
        "--group-key",
        default="group",
        help="key that groups related pairs (e.g. the task) for the interval's folds; "
        "'' for none (default: group)",
    )
    fit.set_defaults(handler=_fit)

    add = commands.add_parser(
        "add",
        help="add signatures of finished PEFT adapters to a store",
        description="Measure finished LoRA adapters (update and drift signals on the anchor "
        "set) and add their signatures to a store, so runs and plans can compare with them.",
    )
    add.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT adapter directories")
    add.add_argument("--store", required=True, help="signature store directory")
    add.add_argument(
        "--base", help="base model path or name (default: base_model_name_or_path of each adapter)"
    )
    add.add_argument("--name", help="entry name (one adapter only; default: directory name)")
    add.add_argument("--replace", action="store_true", help="overwrite entries of the same name")
    add.add_argument(
        "--labels",
        action="append",
        metavar="[NAME=]PATH",
        help="JSONL of an adapter's training rows, whose class labels give its label room "
        "(what a run's callback records); repeat as NAME=PATH for several adapters",
    )
    add.add_argument("--label-field", help="the rows' label field (default: label)")
    add.set_defaults(handler=_add)

    plan = commands.add_parser(
        "plan",
        help="predict every pair in a store and group the adapters",
        description="Predict the retention of every pair of adapters in a store and group "
        "them into as few served models as keep every member at or above tau.",
    )
    plan.add_argument("--store", required=True, help="signature store directory")
    plan.add_argument("--names", nargs="+", metavar="NAME", help="entries to plan (default: all)")
    plan.add_argument(
        "--tau", type=float, default=0.9, help="smallest acceptable retention (default: 0.9)"
    )
    plan.add_argument(
        "--prune-similarity",
        type=float,
        default=0.9,
        help="drift cosine that makes two adapters redundant (default: 0.9)",
    )
    plan.add_argument(
        "--methods",
        nargs="+",
        default=["direct", "mean", "ties", "dare"],
        choices=["direct", "mean", "ties", "dare"],
        help="merge methods in order of preference",
    )
    plan.add_argument(
        "--predictor",
        help="predictor file (.skops) for every pair (default: the shipped set for each "
        "pair's states)",
    )
    plan.add_argument(
        "--predictor-for",
        action="append",
        metavar="STATE=PATH",
        help="a predictor file of your own (mergeprobe fit) for the pairs of one state: "
        "early (runs at their horizon), early_vs_final (a run beside a finished adapter) or "
        "final (two finished adapters); the other states keep the shipped sets; repeatable",
    )
    plan.add_argument("--out", required=True, help="plan file to write (.json)")
    rehearse = plan.add_argument_group(
        "merge rehearsal (finished adapters)",
        "With --inputs, every merge of two adapters is rehearsed on the first adapter's own "
        "inputs (the KL between its predictions alone and merged, mergeprobe.rehearsal_kl) "
        "and the plan is built from the shipped rehearsal predictors (or --predictor): far "
        "better than the signatures alone on the benchmark (leave-one-task-out Spearman "
        "0.72 against 0.42). Needs the adapters' weights and the base model.",
    )
    rehearse.add_argument(
        "--inputs",
        action="append",
        metavar="NAME=PATH",
        help="a JSONL of adapter NAME's own inputs, one per line with 'text' (tokenized by "
        "the base model's tokenizer) or 'input_ids'; repeat for each adapter",
    )
    rehearse.add_argument(
        "--max-inputs",
        type=_positive_int,
        default=128,
        help="inputs read per adapter (default: 128, what the benchmark measured)",
    )
    rehearse.add_argument("--batch-size", type=_positive_int, default=16, help="default: 16")
    rehearse.add_argument(
        "--max-length", type=_positive_int, default=128, help="tokens per input (default: 128)"
    )
    rehearse.add_argument(
        "--base", help="base model path or name (default: the one the signatures record)"
    )
    rehearse.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=PATH",
        help="adapter directory of NAME (default: the path its signature records)",
    )
    plan.set_defaults(handler=_plan)

    apply = commands.add_parser(
        "apply",
        help="write the merged PEFT adapters of a plan and a routing manifest",
        description="Carry out a plan: one PEFT adapter directory per served model (exact "
        "ΔW sum by rank concatenation, or SVD-factored TIES / DARE), each member's task head, "
        "routed adapters copied, routing.json, mergekit configs and PEFT calls.",
    )
    apply.add_argument("plan", help="plan file from mergeprobe plan")
    apply.add_argument("--out", required=True, help="output directory (must not exist)")
    apply.add_argument("--base", help="base model path or name (default: the plan's)")
    apply.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=PATH",
        help="adapter directory of a plan entry (default: the path its signature recorded)",
    )
    apply.add_argument(
        "--rank", type=int, help="rank budget per layer (truncated SVD; default: exact)"
    )
    apply.add_argument(
        "--density", type=float, help="TIES / DARE kept fraction (default 0.2 / 0.5)"
    )
    apply.add_argument("--seed", type=int, default=0, help="seed of DARE's masks (default: 0)")
    apply.set_defaults(handler=_apply)

    report = commands.add_parser(
        "report",
        help="tables of a decision log or a plan, and a heatmap",
        description="Print the decisions of a JSONL decision log, or the groups of a plan, "
        "as tables; --plot draws the predicted pairwise retention (needs matplotlib).",
    )
    report.add_argument("source", metavar="LOG_OR_PLAN", help="mergeprobe.jsonl or plan.json")
    report.add_argument("--plot", metavar="PNG", help="write a heatmap of predicted retention")
    report.add_argument(
        "--method",
        default="direct",
        choices=["direct", "mean", "ties", "dare"],
        help="merge method of the heatmap",
    )
    report.set_defaults(handler=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.handler(args)
    except (_CommandError, MergeprobeError, OSError) as exc:
        print(f"mergeprobe {args.command}: error: {exc}", file=sys.stderr)
        return _EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
