"""The ``mergeprobe`` command.

    mergeprobe fit PAIRS.jsonl --out predictors.skops [--model ridge] [--features a b ...]

Each subcommand is a thin layer over the public API: it checks its arguments, prints what it
did, and exits nonzero with a one-line message (never a traceback) on bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__
from .exceptions import MergeprobeError

_EXIT_USAGE, _EXIT_ERROR = 2, 1


class _CommandError(Exception):
    """Bad input a user can fix; printed as one line, exit status 1."""


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
    )
    print(f"fitted {len(predictors)} predictor(s) from {pairs} -> {out}")
    print()
    print("| method | pairs | features used | residual interval |")
    print("|---|---|---|---|")
    for method in METHODS:
        if method not in predictors:
            print(f"| {method} | < 10 measured | — | not fitted |")
            continue
        p = predictors[method]
        low, high = p.residual_quantiles_
        interval = f"[{low:+.3f}, {high:+.3f}]" if math.isfinite(low) else "—"
        print(f"| {method} | {p.n_train_} | {len(p.active_features_)} | {interval} |")
    print()
    print(f"use it: MergeProbeCallback(..., predictor={str(out)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .predictor import DEFAULT_FEATURES

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
        "--model", choices=("ridge", "boosting"), default="ridge", help="default: ridge"
    )
    fit.add_argument(
        "--features",
        nargs="+",
        metavar="NAME",
        help=f"signals to use (default: {' '.join(DEFAULT_FEATURES)})",
    )
    fit.add_argument(
        "--group-key",
        default="group",
        help="key that groups related pairs (e.g. the task) for the interval's folds; "
        "'' for none (default: group)",
    )
    fit.set_defaults(handler=_fit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (_CommandError, MergeprobeError, OSError) as exc:
        print(f"mergeprobe {args.command}: error: {exc}", file=sys.stderr)
        return _EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
