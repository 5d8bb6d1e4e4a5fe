"""The callback's decision at the horizon: records valid against the schema, early stop."""

from __future__ import annotations

import jsonschema
import numpy as np
import pytest

from mergeprobe import (
    InvalidParameterError,
    MergeProbeCallback,
    Policy,
    RetentionPredictor,
    SignatureStore,
    decision_log_schema,
    load_predictors,
    pairwise_signals,
    read_log,
    save_predictors,
)

from .test_callback import _classification_rows, _tiny_bert, _train

FEATURES = ("drift_norm_ratio", "update_norm_ratio", "cka_self")


def _constant_predictor(tmp_path, value):
    """A fitted predictor that predicts ``value`` for every pair (a fixed outcome)."""
    rng = np.random.default_rng(0)
    rows = [{f: float(rng.uniform(0.5, 2)) for f in FEATURES} for _ in range(20)]
    predictor = RetentionPredictor(features=FEATURES, model="ridge").fit(rows, np.full(20, value))
    return save_predictors(
        {"direct": predictor, "mean": predictor},
        tmp_path / f"const{value}.skops",
        {"trained_on": 20},
    )


def _validate(records):
    validator = jsonschema.Draft202012Validator(decision_log_schema())
    for record in records:
        validator.validate(record)


def _callback(tmp_path, name, **kwargs):
    return MergeProbeCallback(
        tmp_path / "store",
        run_name=name,
        horizon=0.25,
        log_path=tmp_path / f"{name}.jsonl",
        **kwargs,
    )


def test_a_run_with_nothing_to_compare_with_writes_a_decision_that_says_so(tmp_path):
    callback = _callback(tmp_path, "first")
    _train(tmp_path, "first", callback, max_steps=12)
    records = read_log(tmp_path / "first.jsonl")
    _validate(records)
    (decision,) = [r for r in records if r["event"] == "decision"]
    assert decision["step"] == 3 and decision["pairs"] == []
    assert "no compatible signature" in decision["reasons"][0]
    assert decision["predictor"]["name"] == "default (early)"
    assert 0 <= decision["overhead_seconds"] < 60  # the one-time cost of deciding is recorded
    assert [r["event"] for r in records][-1] == "final"  # training went on to the end


def test_decision_compares_with_the_store_and_validates(tmp_path):
    _train(tmp_path, "a", _callback(tmp_path, "a"), max_steps=12)
    predictor = _constant_predictor(tmp_path, 0.97)
    callback = _callback(tmp_path, "b", predictor=predictor)
    trainer = _train(tmp_path, "b", callback, max_steps=12, rows=_classification_rows(seed=1))
    records = read_log(tmp_path / "b.jsonl")
    _validate(records)
    (decision,) = [r for r in records if r["event"] == "decision"]
    assert decision["decision"] == "merge"
    (pair,) = decision["pairs"]
    assert pair["with"] == "a" and pair["retention_self"] == pytest.approx(0.97)
    assert pair["retention_other"] == pytest.approx(0.97)
    lo, hi = pair["interval"]
    assert lo - 1e-9 <= 0.97 <= hi + 1e-9
    # the signals that prediction read, with b's values against a
    store = SignatureStore(tmp_path / "store")
    b, a = store.load("b"), store.load("a")
    forward = pairwise_signals(b, a, b.probe(0.25), a.probe(0.25))
    assert sorted(pair["signals"]) == sorted(FEATURES)
    assert pair["signals"]["update_norm_ratio"] == pytest.approx(
        forward["update_norm_ratio"], rel=1e-6
    )
    assert pair["signals"]["cka_self"] is None  # no drift here: missing, never zero
    # a predictor of one's own: a's early probe, not its end, and nothing switched
    assert pair["partner_state"].startswith("probe at") and "predictors" not in pair
    assert "against_finished" not in decision["predictor"]
    assert decision["set"]["members"] == ["b", "a"]
    assert callback.decision["decision"] == "merge"
    logged = [h for h in trainer.state.log_history if "mergeprobe/retention_min" in h]
    assert logged and logged[0]["mergeprobe/retention_min"] == pytest.approx(0.97)


def test_the_default_reads_a_finished_partner_at_its_end(tmp_path):
    _train(tmp_path, "a", _callback(tmp_path, "a"), max_steps=12)  # finished: has a final state
    callback = _callback(tmp_path, "b")
    _train(tmp_path, "b", callback, max_steps=12, rows=_classification_rows(seed=1))
    records = read_log(tmp_path / "b.jsonl")
    _validate(records)
    (decision,) = [r for r in records if r["event"] == "decision"]
    (pair,) = decision["pairs"]
    assert pair["partner_state"] == "final state" and pair["predictors"] == "against finished"
    finished, finished_meta = load_predictors(state="early_vs_final")
    assert decision["predictor"]["against_finished"]["trained_on"] == finished_meta["trained_on"]
    # by hand: b at its horizon against a's end with the finished-partner set, a's own
    # retention (its end against b's horizon) with the 5 % set
    store = SignatureStore(tmp_path / "store")
    a, b = store.load("a"), store.load("b")
    horizon = b.probe(0.25)
    method = decision["set"]["method"] or "direct"
    forward = pairwise_signals(b, a, horizon, a.probes[-1])
    own = finished[method].predict([forward])[0]
    # the record names the signals that prediction read: this tiny model records no head and
    # no drift, so the chain's last link, its signals missing (null) and imputed
    read = finished["direct"].predicted_from([forward])[0]
    assert pair["signals"] == {name: None for name in read}
    assert list(read) == ["interference_ratio", "interference_ratio_last"]
    partner = load_predictors()[0][method].predict([pairwise_signals(a, b, a.probes[-1], horizon)])[
        0
    ]
    assert pair["retention_self"] == pytest.approx(own, abs=1e-6)
    assert pair["retention_other"] == pytest.approx(partner, abs=1e-6)


def test_the_decision_weighs_the_partners_against_each_other(tmp_path, monkeypatch):
    for name, seed in (("a", 0), ("c", 2)):
        rows = _classification_rows(seed=seed)
        _train(tmp_path, name, _callback(tmp_path, name), max_steps=12, rows=rows)
    predictor = _constant_predictor(tmp_path, 0.97)
    callback = _callback(tmp_path, "b", predictor=predictor)
    _train(tmp_path, "b", callback, max_steps=12, rows=_classification_rows(seed=1))
    decision = callback.decision
    assert sorted(decision["set"]["members"]) == ["a", "b", "c"]
    # every member loses 0.03 to each of the two others: a and c's damage to each other counts
    assert decision["set"]["predicted_min"] == pytest.approx(0.94)
    assert any("the partners' damage to each other included" in r for r in decision["reasons"])
    assert decision["predictor"]["between"]["name"] == str(predictor)
    # the shipped sets: a, b and c finished, so the final set weighs them against each other
    low = Policy(tau=0.1)
    callback = _callback(tmp_path, "e", policy=low)
    _train(tmp_path, "e", callback, max_steps=12, rows=_classification_rows(seed=4))
    decision = callback.decision
    assert decision["predictor"]["between"]["name"] == "default (final)"
    assert decision["predictor"]["against_finished"]["name"] == "default (early_vs_final)"
    members, method = decision["set"]["members"], decision["set"]["method"]
    assert len(members) == 4  # at tau 0.1 everyone fits
    # every member's set retention, by the pairs with e and, between the finished partners,
    # the shipped final set on their last probes, computed here by hand
    import itertools

    from mergeprobe.predictor import _signals_read

    store = SignatureStore(tmp_path / "store")
    final = load_predictors(state="final")[0][method]
    read = set(_signals_read(final))
    finished = {m: store.load(m) for m in members[1:]}

    def by_hand(x, y):
        values = pairwise_signals(finished[x], finished[y], only=read)
        return float(final.predict({f: [values[f]] for f in read})[0])

    damage = {m: 0.0 for m in members}
    for p in decision["pairs"]:
        damage["e"] += 1 - p["retention_self"]
        damage[p["with"]] += 1 - p["retention_other"]
    for x, y in itertools.combinations(members[1:], 2):
        damage[x] += 1 - by_hand(x, y)
        damage[y] += 1 - by_hand(y, x)
    expected = [1 - d for d in damage.values()]
    assert decision["set"]["predicted_min"] == pytest.approx(min(expected))
    assert decision["set"]["predicted_mean"] == pytest.approx(sum(expected) / 4)
    _validate(read_log(tmp_path / "e.jsonl"))
    # a failure there costs the check, not the decision, and says so
    import mergeprobe.callback

    def broken(*args, **kwargs):
        raise RuntimeError("no partners today")

    monkeypatch.setattr(mergeprobe.callback, "predict_between", broken)
    callback = _callback(tmp_path, "d", predictor=predictor)
    _train(tmp_path, "d", callback, max_steps=12, rows=_classification_rows(seed=3))
    assert callback.decision["decision"] == "merge" and not callback.decision.get("failed")
    assert any("could not be weighed" in r for r in callback.decision["reasons"])
    _validate(read_log(tmp_path / "d.jsonl"))


def test_the_decision_tells_a_run_that_shares_its_lora_initialisation(tmp_path):
    from mergeprobe.callback import SHARED_INIT_EXCESS
    from mergeprobe.signals.compare import shared_input_directions

    # a: the same seed as the run (the same LoRA A); c: the same base, its own LoRA seed
    _train(tmp_path, "a", _callback(tmp_path, "a"), max_steps=12)
    other_init = _tiny_bert(lora_seed=7)
    _train(tmp_path, "c", _callback(tmp_path, "c"), model=other_init, max_steps=12)
    callback = _callback(tmp_path, "b", predictor=_constant_predictor(tmp_path, 0.97))
    _train(tmp_path, "b", callback, max_steps=12, rows=_classification_rows(seed=1))
    store = SignatureStore(tmp_path / "store")
    run = store.load("b")
    run.probes = [p for p in run.probes if p.step <= 3]  # as it was at its horizon
    excess = shared_input_directions(run, [store.load("a"), store.load("c")])
    for name in ("a", "c"):  # the batched value is pairwise_signals' own
        expected = pairwise_signals(run, store.load(name), only={"update_input_subspace_excess"})
        assert excess[name] == pytest.approx(expected["update_input_subspace_excess"])
    # rank 4 in a 32-wide sketch: at most 1 - 4/32 above chance
    assert SHARED_INIT_EXCESS < excess["a"] <= 1 - 4 / 32 + 1e-9
    assert excess["c"] < SHARED_INIT_EXCESS
    (advice,) = [r for r in callback.decision["reasons"] if "LoRA initialisation" in r]
    assert advice.startswith("this run shares its LoRA initialisation with a:")
    assert f"up to {excess['a']:.2f} above chance" in advice
    assert "give each adapter its own seed" in advice
    _validate(read_log(tmp_path / "b.jsonl"))


def test_predictors_of_ones_own_per_state(tmp_path):
    _train(tmp_path, "a", _callback(tmp_path, "a"), max_steps=12)  # finished
    mine = _constant_predictor(tmp_path, 0.97)
    callback = _callback(tmp_path, "b", predictor={"early_vs_final": mine})
    _train(tmp_path, "b", callback, max_steps=12, rows=_classification_rows(seed=1))
    decision = callback.decision
    (pair,) = decision["pairs"]
    # this run beside the finished a by the file given for that state; a's own retention by
    # the shipped 5 % set, as with the defaults
    assert pair["partner_state"] == "final state" and pair["predictors"] == "against finished"
    assert pair["retention_self"] == pytest.approx(0.97)
    store = SignatureStore(tmp_path / "store")
    a, b = store.load("a"), store.load("b")
    shipped = load_predictors()[0]["direct"]  # a's own side: the shipped 5 % set
    expected = shipped.predict([pairwise_signals(a, b, a.probes[-1], b.probe(0.25))])[0]
    assert pair["retention_other"] == pytest.approx(expected, abs=1e-6)
    assert decision["predictor"]["name"] == "default (early)"
    assert decision["predictor"]["against_finished"]["name"] == str(mine)
    _validate(read_log(tmp_path / "b.jsonl"))
    # the dict survives a checkpoint: the state holds a copy, and rebuilds the callback
    args = callback.state()["args"]
    assert args["predictor"] == {"early_vs_final": str(mine)}
    args["predictor"]["final"] = "elsewhere.skops"
    assert callback.predictor == {"early_vs_final": str(mine)}
    assert type(callback)(**callback.state()["args"]).predictor == callback.predictor
    # files that share no merge method: no decision can be made, the record says why
    only_dare = save_predictors(
        {"dare": load_predictors(mine)[0]["direct"]}, tmp_path / "dare.skops", {}
    )
    callback = _callback(tmp_path, "c", predictor={"early_vs_final": mine, "final": only_dare})
    _train(tmp_path, "c", callback, max_steps=12, rows=_classification_rows(seed=2))
    assert callback.decision["failed"]
    assert "share no merge method" in callback.decision["reasons"][0]
    with pytest.raises(InvalidParameterError, match="states"):
        _callback(tmp_path, "c", predictor={"rehearsal": mine})
    with pytest.raises(InvalidParameterError, match="maps states to predictor files"):
        _callback(tmp_path, "c", predictor={"final": None})
    with pytest.raises(InvalidParameterError, match="states"):
        _callback(tmp_path, "c", predictor={})


def test_incompatible_run_is_stopped_early(tmp_path):
    _train(tmp_path, "a", _callback(tmp_path, "a"), max_steps=12)
    predictor = _constant_predictor(tmp_path, 0.5)
    callback = _callback(
        tmp_path,
        "b",
        predictor=predictor,
        on_incompatible="stop",
        policy=Policy(tau=0.9, methods=("direct", "mean")),
    )
    trainer = _train(tmp_path, "b", callback, max_steps=12)
    assert trainer.state.global_step == 3  # stopped at the horizon, not at step 12
    records = read_log(tmp_path / "b.jsonl")
    _validate(records)
    events = [r["event"] for r in records]
    assert events.index("decision") < events.index("stopped")
    (decision,) = [r for r in records if r["event"] == "decision"]
    assert decision["decision"] == "route"


def test_without_stop_an_incompatible_run_goes_on(tmp_path):
    _train(tmp_path, "a", _callback(tmp_path, "a"), max_steps=12)
    callback = _callback(tmp_path, "b", predictor=_constant_predictor(tmp_path, 0.5))
    trainer = _train(tmp_path, "b", callback, max_steps=12)
    assert trainer.state.global_step == 12
    assert callback.decision["decision"] == "route"


def test_schema_rejects_a_malformed_decision():
    record = {
        "schema": "mergeprobe.decision/1",
        "event": "decision",
        "time": "2026-11-23T10:00:00Z",
        "run": "r",
        "step": 3,
        "max_steps": 12,
        "fraction": 0.25,
        "decision": "maybe",
        "reasons": ["x"],
        "pairs": [],
        "set": {"members": ["r"]},
        "predictor": {"name": "default", "version": "0.1.0"},
    }
    with pytest.raises(jsonschema.ValidationError):
        _validate([record])
    record["decision"] = "merge"
    _validate([record])
    pair = {"with": "a", "retention_self": 0.9, "retention_other": 0.9, "interval": [0.8, 1.0]}
    record["pairs"] = [{**pair, "predictors": "guessed"}]
    with pytest.raises(jsonschema.ValidationError):
        _validate([record])
    record["pairs"] = [{**pair, "predictors": "against finished"}]
    _validate([record])


def test_different_target_sets_are_compared_on_the_shared_layers_and_say_so(tmp_path):
    _train(tmp_path, "a", _callback(tmp_path, "a"), max_steps=12)  # query, value: 4 layers
    wider = _tiny_bert(targets=("query", "key", "value"))
    callback = _callback(tmp_path, "b", predictor=_constant_predictor(tmp_path, 0.97))
    _train(tmp_path, "b", callback, model=wider, max_steps=12, rows=_classification_rows(seed=1))
    records = read_log(tmp_path / "b.jsonl")
    _validate(records)
    (decision,) = [r for r in records if r["event"] == "decision"]
    (pair,) = decision["pairs"]
    assert pair["shared_layers"] == 4 and pair["layer_coverage"] == pytest.approx(4 / 6)
    note = "compared with a on the 4 LoRA layers both adapt (b adapts 6, a 4)"
    assert pair["layers_note"] == note and note in decision["reasons"]
