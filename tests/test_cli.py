"""The mergeprobe command: each subcommand on good and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mergeprobe import load_predictors
from mergeprobe.cli import main

from .test_predictor import FEATURES, _rows


def _write_pairs(path, n=80):
    rows, y, groups = _rows(n)
    with open(path, "w") as f:
        for row, value, group in zip(rows, y, groups, strict=True):
            record = {**row, "retention_direct": value, "retention_mean": value + 0.01}
            f.write(json.dumps({**record, "group": f"t{group}"}) + "\n")
    return rows, y


def test_fit_writes_predictors_that_reproduce_the_measurements(tmp_path, capsys):
    rows, y = _write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "mine.skops"
    code = main(
        [
            "fit",
            str(tmp_path / "pairs.jsonl"),
            "--out",
            str(out),
            "--features",
            *FEATURES,
            "--model",
            "ridge",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| direct | 80 | 3 | 1 |" in printed and "| ties | < 10 measured |" in printed
    predictors, meta = load_predictors(out)
    assert set(predictors) == {"direct", "mean"} and meta["trained_on"]["mean"] == 80
    np.testing.assert_allclose(predictors["mean"].predict(rows[:5]), y[:5] + 0.01, atol=0.01)


def test_fit_takes_the_damage_models_power(tmp_path, capsys):
    _write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "mine.skops"
    args = ["fit", str(tmp_path / "pairs.jsonl"), "--out", str(out), "--model", "damage"]
    assert main([*args, "--features", "interference_ratio_last", "--power", "0.5"]) == 0
    assert "| direct | 80 | 1 | 0.5 |" in capsys.readouterr().out
    assert load_predictors(out)[0]["direct"].power_ == 0.5
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--power", "steep"])
    assert exit_info.value.code == 2 and "expected 'auto' or a number" in capsys.readouterr().err


def test_fit_chains_repeated_fallback_sets_in_order(tmp_path):
    _write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "chain.skops"
    args = ["fit", str(tmp_path / "pairs.jsonl"), "--out", str(out), "--model", "ridge"]
    args += ["--features", "interference_ratio_last", "drift_norm_ratio"]
    args += ["--fallback-features", "drift_norm_ratio", "cka_self"]
    assert main([*args, "--fallback-features", "cka_self"]) == 0
    direct = load_predictors(out)[0]["direct"]
    assert direct.fallback_features == (("drift_norm_ratio", "cka_self"), ("cka_self",))
    # a pair without the first feature goes to the first fallback, one without the first
    # fallback's to the second
    second, third = direct.fallback_, direct.fallback_.fallback_
    rows = [{"drift_norm_ratio": 1.2, "cka_self": 0.9}, {"cka_self": 0.9}]
    np.testing.assert_allclose(
        direct.predict(rows), [second.predict(rows[:1])[0], third.predict(rows[1:])[0]]
    )


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "not found"),
        ("bad_json", "not JSON"),
        ("too_few", "10 or more"),
        ("pickle_suffix", "must end in .skops"),
    ],
)
def test_fit_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path, capsys, setup, message):
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "out.skops"
    if setup == "bad_json":
        _write_pairs(pairs)
        with open(pairs, "a") as f:
            f.write("{not json\n")
    elif setup == "too_few":
        _write_pairs(pairs, n=5)
    elif setup == "pickle_suffix":
        _write_pairs(pairs)
        out = tmp_path / "out.pkl"
    code = main(["fit", str(pairs), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and err.startswith("mergeprobe fit: error:")
    assert "Traceback" not in err
    assert not out.exists()


def test_the_installed_command_runs():
    result = subprocess.run(
        [sys.executable, "-m", "mergeprobe.cli", "fit", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "retention_direct" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "mergeprobe.cli"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and "COMMAND" in result.stderr
