"""The add → plan → apply → report commands on tiny saved adapters, and their errors."""

from __future__ import annotations

import json

import pytest
import torch

from mergeprobe import SignatureStore
from mergeprobe.cli import main
from mergeprobe.merge import load_served_model, read_adapter

from .test_apply import INPUTS, _adapter, _base_dir, _dense_reference
from .test_decisions import _constant_predictor


@pytest.fixture
def adapters(tmp_path):
    paths = {n: _adapter(tmp_path, n, seed=s)[0] for n, s in (("alpha", 1), ("beta", 2))}
    return paths


def _error(capsys, command):
    assert main(command) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0]  # one line, no traceback
    return err[0]


def test_add_plan_apply_report_end_to_end(tmp_path, adapters, capsys):
    store = tmp_path / "store"
    assert main(["add", *map(str, adapters.values()), "--store", str(store)]) == 0
    assert sorted(SignatureStore(store).names()) == ["alpha", "beta"]
    meta = SignatureStore(store).metadata("alpha")
    assert meta["adapter_path"] == str(adapters["alpha"].resolve())
    capsys.readouterr()

    predictor = _constant_predictor(tmp_path, 0.97)
    plan_path = tmp_path / "plan.json"
    code = main(
        ["plan", "--store", str(store), "--predictor", str(predictor), "--out", str(plan_path)]
    )
    assert code == 0
    plan = json.loads(plan_path.read_text())
    assert plan["schema"] == "mergeprobe.plan/1"
    assert plan["summary"]["served_models"] == 1 and plan["summary"]["pairs_predicted"] == 2
    (group,) = plan["served"]
    assert group["decision"] == "merge" and sorted(group["members"]) == ["alpha", "beta"]
    # one partner at 0.97: set retention 0.97, interval from the predictor's residuals
    assert group["predicted"]["alpha"]["retention"] == pytest.approx(0.97, abs=1e-6)
    assert "alpha" in capsys.readouterr().out

    out = tmp_path / "served"
    assert main(["apply", str(plan_path), "--out", str(out)]) == 0
    manifest = json.loads((out / "routing.json").read_text())
    assert set(manifest["routes"]) == {"alpha", "beta"}
    loaded = [read_adapter(adapters["alpha"]), read_adapter(adapters["beta"])]
    reference = _dense_reference(tmp_path, loaded, [1, 1], loaded[1])
    served = load_served_model(out, "beta", base_model=str(_base_dir(tmp_path)))
    with torch.no_grad():
        torch.testing.assert_close(
            served(**INPUTS).logits, reference(**INPUTS).logits, atol=1e-5, rtol=1e-5
        )
    capsys.readouterr()

    assert main(["report", str(plan_path)]) == 0
    printed = capsys.readouterr().out
    assert "2 adapters -> 1 served models" in printed and "0.970" in printed
    pytest.importorskip("matplotlib")
    heatmap = tmp_path / "heat.png"
    assert main(["report", str(plan_path), "--plot", str(heatmap)]) == 0
    assert heatmap.read_bytes()[:4] == b"\x89PNG"


def test_report_reads_a_decision_log(tmp_path, capsys):
    log = tmp_path / "mergeprobe.jsonl"
    record = {
        "schema": "mergeprobe.decision/1",
        "event": "decision",
        "time": "2026-11-23T00:00:00Z",
        "run": "mine",
        "step": 15,
        "max_steps": 300,
        "fraction": 0.05,
        "decision": "route",
        "reasons": ["too different"],
        "pairs": [
            {"with": "other", "retention_self": 0.61, "retention_other": 0.8},
            {
                "with": "done",
                "retention_self": 0.7,
                "retention_other": 0.9,
                "interval": [0.6, 0.8],
                "partner_state": "final state",
            },
        ],
    }
    log.write_text(json.dumps(record) + "\n")
    assert main(["report", str(log)]) == 0
    printed = capsys.readouterr().out
    assert "mine" in printed and "0.610" in printed and "reason: too different" in printed
    (row,) = [line for line in printed.splitlines() if "done" in line]
    assert row.split()[-5:] == ["0.900", "[0.600,", "0.800]", "final", "state"]


def test_add_refuses_a_bad_path_and_writes_nothing(tmp_path, adapters, capsys):
    store = tmp_path / "store"
    message = _error(
        capsys, ["add", str(adapters["alpha"]), str(tmp_path / "nope"), "--store", str(store)]
    )
    assert "not a PEFT adapter directory" in message
    assert not store.exists() or SignatureStore(store).names() == []


def test_add_refuses_to_overwrite_without_replace(tmp_path, adapters, capsys):
    store = tmp_path / "store"
    assert main(["add", str(adapters["alpha"]), "--store", str(store)]) == 0
    assert "--replace" in _error(capsys, ["add", str(adapters["alpha"]), "--store", str(store)])


def test_plan_errors(tmp_path, adapters, capsys):
    assert "not found" in _error(
        capsys, ["plan", "--store", str(tmp_path / "x"), "--out", "p.json"]
    )
    store = tmp_path / "store"
    main(["add", str(adapters["alpha"]), "--store", str(store)])
    capsys.readouterr()
    message = _error(capsys, ["plan", "--store", str(store), "--out", str(tmp_path / "p.json")])
    assert "at least two adapters" in message
    message = _error(
        capsys,
        ["plan", "--store", str(store), "--names", "ghost", "--out", str(tmp_path / "p.json")],
    )
    assert "ghost" in message
    assert not (tmp_path / "p.json").exists()


def test_apply_errors_leave_nothing_half_written(tmp_path, adapters, capsys):
    plan = {
        "schema": "mergeprobe.plan/1",
        "adapters": {"alpha": {"path": str(adapters["alpha"])}, "beta": {"path": None}},
        "served": [
            {"name": "m", "decision": "merge", "method": "direct", "members": ["alpha", "beta"]}
        ],
        "pruned": [],
    }
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    out = tmp_path / "served"
    assert "beta" in _error(capsys, ["apply", str(plan_path), "--out", str(out)])
    assert not out.exists()
    assert "NAME=PATH" in _error(
        capsys, ["apply", str(plan_path), "--out", str(out), "--adapter", "beta"]
    )
    wide, _ = _adapter(tmp_path, "wide", seed=3, hidden=48)
    message = _error(
        capsys, ["apply", str(plan_path), "--out", str(out), "--adapter", f"beta={wide}"]
    )
    assert "different shapes" in message and not out.exists()
    assert (
        main(["apply", str(plan_path), "--out", str(out), "--adapter", f"beta={adapters['beta']}"])
        == 0
    )
    capsys.readouterr()
    assert "already exists" in _error(capsys, ["apply", str(plan_path), "--out", str(out)])
    (tmp_path / "bad.json").write_text("{}")
    assert "not a mergeprobe plan" in _error(
        capsys, ["apply", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o2")]
    )
