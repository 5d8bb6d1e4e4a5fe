"""RetentionPredictor: fit/predict, missing values, intervals, safe persistence, mergeprobe.fit."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

from mergeprobe import (
    InvalidParameterError,
    RetentionPredictor,
    UnsafePredictorError,
    fit,
    load_predictors,
    save_predictors,
    set_retention,
)

FEATURES = ("interference_ratio_last", "drift_norm_ratio", "cka_self")


def _rows(n=80, seed=0):
    rng = np.random.default_rng(seed)
    rows, y = [], []
    for _k in range(n):
        ratio = float(rng.uniform(0.1, 3.0))
        cka = float(rng.uniform(0.5, 1.0))
        rows.append(
            {
                "interference_ratio_last": ratio,
                "drift_norm_ratio": float(rng.uniform(0.2, 5)),
                "cka_self": cka,
            }
        )
        # retention falls linearly with the log of the interference ratio
        y.append(1.0 - 0.1 * math.log(ratio) + 0.05 * (cka - 0.75))
    groups = [k % 6 for k in range(n)]
    return rows, np.array(y), groups


def test_ridge_recovers_a_linear_log_relation():
    rows, y, groups = _rows()
    predictor = RetentionPredictor(features=FEATURES, model="ridge").fit(rows, y, groups=groups)
    test_rows, test_y, _ = _rows(20, seed=1)
    assert np.abs(predictor.predict(test_rows) - test_y).max() < 0.01
    low, high = predictor.residual_quantiles_
    assert low < 0 < high and high - low < 0.02


def test_missing_signals_stay_missing_not_zero():
    rows, y, groups = _rows()
    rows[3]["cka_self"] = None  # one training row misses it too: the indicator is learned
    predictor = RetentionPredictor(features=FEATURES, model="ridge").fit(rows, y, groups=groups)
    base = {"interference_ratio_last": 1.0, "drift_norm_ratio": 1.0}
    missing = predictor.predict([{**base}])[0]
    zero = predictor.predict([{**base, "cka_self": 0.0}])[0]
    median = float(np.median([r["cka_self"] for r in rows if r["cka_self"] is not None]))
    imputed = predictor.predict([{**base, "cka_self": median}])[0]
    assert missing != pytest.approx(zero, abs=1e-3)
    assert missing == pytest.approx(imputed, abs=0.02)


def test_interval_brackets_the_prediction():
    rows, y, groups = _rows()
    y = y + np.random.default_rng(0).normal(0, 0.05, len(y))
    predictor = RetentionPredictor(features=FEATURES, model="ridge", coverage=0.8).fit(
        rows, y, groups=groups
    )
    interval = predictor.predict_interval(rows)
    point = predictor.predict(rows)
    assert (interval[:, 0] < point).all() and (point < interval[:, 1]).all()
    inside = ((y >= interval[:, 0]) & (y <= interval[:, 1])).mean()
    assert 0.6 < inside < 0.95


def test_damage_model_recovers_damage_proportional_to_interference():
    # R = 1 - 0.04 * interference - 0.01 * drift ratio, exactly: no intercept to find.
    rows, _, groups = _rows()
    y = np.array(
        [1 - 0.04 * r["interference_ratio_last"] - 0.01 * r["drift_norm_ratio"] for r in rows]
    )
    features = ("interference_ratio_last", "drift_norm_ratio")
    predictor = RetentionPredictor(features=features, model="damage").fit(rows, y, groups=groups)
    np.testing.assert_allclose(predictor.estimator_[-1].coef_, [0.04, 0.01], atol=1e-9)
    # A partner that moves nothing costs nothing; raw signals, not their logarithms.
    assert predictor.predict([{"interference_ratio_last": 0.0, "drift_norm_ratio": 0.0}])[0] == (
        pytest.approx(1.0, abs=1e-9)
    )
    assert predictor.predict([{"interference_ratio_last": 2.0, "drift_norm_ratio": 3.0}])[0] == (
        pytest.approx(1 - 0.08 - 0.03, abs=1e-9)
    )


def test_damage_model_never_lets_a_signal_raise_retention():
    rows, _, groups = _rows()
    # Retention that *rises* with the drift ratio: the damage model may not follow it, so the
    # drift ratio gets no weight and no prediction exceeds 1.
    y = np.array(
        [1 - 0.04 * r["interference_ratio_last"] + 0.02 * r["drift_norm_ratio"] for r in rows]
    )
    features = ("interference_ratio_last", "drift_norm_ratio")
    predictor = RetentionPredictor(features=features, model="damage").fit(rows, y, groups=groups)
    assert predictor.estimator_[-1].coef_[1] == pytest.approx(0.0, abs=1e-12)
    assert (predictor.predict(rows) <= 1.0).all()


def test_damage_model_refuses_signed_signals():
    rows, y, _ = _rows()
    with pytest.raises(InvalidParameterError, match="non-negative scale signals"):
        RetentionPredictor(features=FEATURES, model="damage").fit(rows, y)


@pytest.mark.parametrize("model", ["ridge", "boosting", "damage"])
def test_round_trip_through_skops_gives_identical_predictions(tmp_path, model):
    rows, y, groups = _rows()
    features = FEATURES[:2] if model == "damage" else FEATURES
    predictor = RetentionPredictor(features=features, model=model).fit(rows, y, groups=groups)
    path = save_predictors({"direct": predictor}, tmp_path / "p.skops", {"trained_on": 80})
    loaded, meta = load_predictors(path)
    assert meta["trained_on"] == 80 and meta["mergeprobe_version"]
    np.testing.assert_array_equal(loaded["direct"].predict(rows), predictor.predict(rows))
    assert loaded["direct"].residual_quantiles_ == predictor.residual_quantiles_


def test_a_pickle_is_refused(tmp_path):
    rows, y, groups = _rows()
    predictor = RetentionPredictor(features=FEATURES, model="ridge").fit(rows, y, groups=groups)
    path = tmp_path / "predictor.skops"  # a pickle under a harmless-looking name
    path.write_bytes(pickle.dumps({"direct": predictor}))
    with pytest.raises(UnsafePredictorError, match="pickle"):
        load_predictors(path)


class Foreign:
    """Stands for any class a stranger's file could name."""

    def __init__(self):
        self.payload = "anything"


def test_a_skops_file_with_foreign_types_is_refused(tmp_path):
    import skops.io

    path = tmp_path / "foreign.skops"
    skops.io.dump({"format": "mergeprobe.predictors/1", "predictors": {"direct": Foreign()}}, path)
    with pytest.raises(UnsafePredictorError, match="allow-list"):
        load_predictors(path)


def test_the_shipped_default_predictors_load_and_predict():
    predictors, meta = load_predictors()
    assert set(predictors) == {"direct", "mean", "ties", "dare"}
    assert meta["trained_on"]["direct"] >= 200
    row = {f: 1.0 for f in predictors["direct"].features}
    value = predictors["direct"].predict([row])[0]
    assert 0.3 < value < 1.3


def test_the_shipped_rehearsal_predictors_read_rehearsal_kl():
    predictors, meta = load_predictors(state="rehearsal")
    assert set(predictors) == {"direct", "mean", "ties", "dare"}
    assert meta["state"] == "rehearsal" and meta["trained_on"]["direct"] >= 200
    direct = predictors["direct"]
    assert direct.features == ("rehearsal_kl",) and direct.model == "damage"
    values = direct.predict({"rehearsal_kl": [0.0, 0.1, 1.0]})
    assert values[0] == pytest.approx(1.0)  # no change to the outputs, no damage
    assert values[0] > values[1] > values[2]
    with pytest.raises(InvalidParameterError, match="rehearsal"):
        load_predictors(state="rehersal")


def test_invalid_parameters_are_reported_clearly():
    rows, y, _ = _rows()
    with pytest.raises(InvalidParameterError, match="model must be one of"):
        RetentionPredictor(features=FEATURES, model="xgboost").fit(rows, y)
    with pytest.raises(InvalidParameterError, match="one value per row"):
        RetentionPredictor(features=FEATURES, model="ridge").fit(rows, y[:-1])
    with pytest.raises(InvalidParameterError, match="coverage"):
        RetentionPredictor(features=FEATURES, model="ridge", coverage=1.5).fit(rows, y)


def test_fit_from_a_jsonl_of_measured_pairs(tmp_path):
    rows, y, groups = _rows()
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for row, value, group in zip(rows, y, groups, strict=True):
            f.write(json.dumps({**row, "retention_direct": value, "group": f"t{group}"}) + "\n")
    out = tmp_path / "mine.skops"
    predictors = fit(path, features=FEATURES, model="ridge", out=out)
    assert set(predictors) == {"direct"}
    loaded, meta = load_predictors(out)
    assert meta["trained_on"] == {"direct": 80}
    np.testing.assert_allclose(loaded["direct"].predict(rows[:5]), y[:5], atol=0.01)
    with pytest.raises(InvalidParameterError, match="10 or more"):
        fit(rows[:5], features=FEATURES, model="ridge")


def test_set_retention_adds_the_damages():
    assert set_retention([0.95, 0.9]) == pytest.approx(0.85)
    assert set_retention([1.02]) == pytest.approx(1.02)
    assert set_retention([]) == 1.0


def test_rows_missing_a_feature_go_to_the_fallback_model(tmp_path):
    rows, _, groups = _rows()
    for k, row in enumerate(rows):
        row["head_kl"] = 0.01 * (1 + k % 7)
    y = np.array([1 - 2.0 * r["head_kl"] for r in rows])  # damage from the head signal only
    predictor = RetentionPredictor(
        features=("head_kl",), model="damage", fallback_features=("interference_ratio_last",)
    ).fit(rows, y, groups=groups)
    alone = RetentionPredictor(features=("interference_ratio_last",), model="damage").fit(
        rows, y, groups=groups
    )
    with_head = {"head_kl": 0.05, "interference_ratio_last": 1.0}
    without = {"interference_ratio_last": 1.0}  # e.g. a causal LM: no classification head
    point = predictor.predict([with_head, without])
    assert point[0] == pytest.approx(1 - 2.0 * 0.05)  # the main model: R = 1 - 2 · head_kl
    assert point[1] == pytest.approx(alone.predict([without])[0])
    interval = predictor.predict_interval([with_head, without])
    np.testing.assert_allclose(interval[0] - point[0], predictor.residual_quantiles_, atol=1e-12)
    np.testing.assert_allclose(interval[1] - point[1], alone.residual_quantiles_)
    path = save_predictors({"direct": predictor}, tmp_path / "p.skops")
    loaded, _ = load_predictors(path)
    np.testing.assert_array_equal(loaded["direct"].predict([with_head, without]), point)


def test_fallbacks_chain_in_order_and_round_trip(tmp_path):
    rows, _, groups = _rows()
    for k, row in enumerate(rows):
        row["head_kl"] = 0.01 * (1 + k % 7)
        row["head_interference"] = 0.02 * (1 + k % 5)
    y = np.array([1 - 2.0 * r["head_kl"] - r["head_interference"] for r in rows])
    chain = (("head_interference",), ("interference_ratio_last",))
    predictor = RetentionPredictor(
        features=("head_kl",), model="damage", fallback_features=chain
    ).fit(rows, y, groups=groups)
    second = RetentionPredictor(features=("head_interference",), model="damage").fit(
        rows, y, groups=groups
    )
    third = RetentionPredictor(features=("interference_ratio_last",), model="damage").fit(
        rows, y, groups=groups
    )
    full = {"head_kl": 0.05, "head_interference": 0.04, "interference_ratio_last": 1.0}
    no_kl = {"head_interference": 0.04, "interference_ratio_last": 1.0}
    neither = {"interference_ratio_last": 1.0}
    point = predictor.predict([full, no_kl, neither])
    assert point[1] == pytest.approx(second.predict([no_kl])[0])
    assert point[2] == pytest.approx(third.predict([neither])[0])
    assert predictor.fallback_.fallback_features == (("interference_ratio_last",),)
    low, high = predictor.predict_interval([neither])[0]
    assert high - low == pytest.approx(np.subtract(*third.residual_quantiles_[::-1]))
    path = save_predictors({"direct": predictor}, tmp_path / "chain.skops")
    loaded, _ = load_predictors(path)
    np.testing.assert_array_equal(loaded["direct"].predict([full, no_kl, neither]), point)
    # which model predicted each row; the last link takes what is left (imputed)
    assert loaded["direct"].predicted_from([full, no_kl, neither, {}]) == [
        ("head_kl",),
        ("head_interference",),
        ("interference_ratio_last",),
        ("interference_ratio_last",),
    ]


@pytest.mark.parametrize("fallback", ["head_kl", (), (("head_kl",), "x"), ((),)])
def test_a_malformed_fallback_chain_is_refused(fallback):
    rows, y, groups = _rows()
    with pytest.raises(InvalidParameterError, match="fallback_features must be"):
        RetentionPredictor(features=FEATURES, fallback_features=fallback).fit(rows, y, groups)


def test_the_main_model_learns_only_from_rows_that_have_its_features():
    rows, _, groups = _rows()
    rng = np.random.default_rng(1)
    y = []
    for k, row in enumerate(rows):
        if k % 2:  # half the pairs lack the head signal and are noisy
            y.append(0.9 + rng.normal(0, 0.1))
        else:
            row["head_kl"] = 0.01 * (1 + k % 7)
            y.append(1 - 2.0 * row["head_kl"])
    predictor = RetentionPredictor(
        features=("head_kl",), model="damage", fallback_features=("interference_ratio_last",)
    ).fit(rows, np.array(y), groups=groups)
    assert predictor.estimator_[-1].coef_[0] == pytest.approx(2.0, abs=1e-9)
    assert max(abs(q) for q in predictor.residual_quantiles_) < 1e-9
    assert predictor.fallback_.n_train_ == len(rows)  # the fallback learns from every row


def test_a_zero_signal_is_a_value_not_a_missing_one():
    rows, _, groups = _rows()
    for k, row in enumerate(rows):
        row["head_kl"] = 0.01 * (k % 5)  # zeros included; the ridge reads log(0) as NaN
    y = np.array([1 - 0.5 * r["head_kl"] for r in rows])
    predictor = RetentionPredictor(
        features=("head_kl",), model="ridge", fallback_features=("interference_ratio_last",)
    ).fit(rows, y, groups=groups)
    zero, missing = predictor.predict_interval(
        [{"head_kl": 0.0, "interference_ratio_last": 1.0}, {"interference_ratio_last": 1.0}]
    )
    # each row carries the interval width of the model that predicted it
    main_low, main_high = predictor.residual_quantiles_
    back_low, back_high = predictor.fallback_.residual_quantiles_
    assert zero[1] - zero[0] == pytest.approx(main_high - main_low)
    assert missing[1] - missing[0] == pytest.approx(back_high - back_low)
    assert predictor.residual_quantiles_ != predictor.fallback_.residual_quantiles_


def test_a_predictor_saved_before_fallbacks_existed_still_works(tmp_path):
    rows, y, groups = _rows()
    predictor = RetentionPredictor(features=FEATURES, model="ridge").fit(rows, y, groups=groups)
    del predictor.__dict__["fallback_features"]  # as unpickled from an older file
    del predictor.__dict__["fallback_"]
    assert predictor.get_params()["fallback_features"] is None
    assert "RetentionPredictor" in repr(predictor)
    np.testing.assert_allclose(predictor.predict(rows[:3]), y[:3], atol=0.01)
    assert predictor.predict_interval(rows[:3]).shape == (3, 2)


def _damage_rows(power: float, n: int = 60):
    """Rows whose damage is exactly 0.05 * interference ** power."""
    rng = np.random.default_rng(3)
    rows = [{"interference_ratio_last": float(x)} for x in rng.uniform(0.01, 4.0, n)]
    y = np.array([1 - 0.05 * r["interference_ratio_last"] ** power for r in rows])
    return rows, y, [k % 5 for k in range(n)]


def test_damage_model_with_a_power_bends_the_response():
    rows, y, groups = _damage_rows(0.5)
    features = ("interference_ratio_last",)
    predictor = RetentionPredictor(features=features, model="damage", power=0.5)
    predictor.fit(rows, y, groups=groups)
    assert predictor.power_ == 0.5
    np.testing.assert_allclose(predictor.estimator_[-1].coef_, [0.05], atol=1e-9)
    # 0.05 * sqrt(0.25) = 0.025; nothing moved still costs nothing
    assert predictor.predict([{"interference_ratio_last": 0.25}])[0] == pytest.approx(0.975)
    assert predictor.predict([{"interference_ratio_last": 0.0}])[0] == pytest.approx(1.0)
    # A straight line through the origin underestimates the damage of small signals.
    straight = RetentionPredictor(features=features, model="damage").fit(rows, y, groups=groups)
    # least squares through the origin: c = 0.05 * sum(x ** 1.5) / sum(x ** 2)
    x = np.array([r["interference_ratio_last"] for r in rows])
    expected = 1 - 0.25 * 0.05 * (x**1.5).sum() / (x**2).sum()
    assert straight.predict([{"interference_ratio_last": 0.25}])[0] == pytest.approx(
        expected, rel=1e-9
    )
    assert expected > 0.99  # vs 0.975 with the power


@pytest.mark.parametrize("power", [0.3, 0.5, 1.0])
def test_auto_power_is_the_least_squares_one(power):
    rows, y, groups = _damage_rows(power)
    predictor = RetentionPredictor(
        features=("interference_ratio_last",), model="damage", power="auto"
    ).fit(rows, y, groups=groups)
    assert predictor.power_ == pytest.approx(power)
    np.testing.assert_allclose(predictor.predict(rows), y, atol=1e-9)


def test_power_is_validated_and_kept_through_skops(tmp_path):
    rows, y, groups = _damage_rows(0.5)
    features = ("interference_ratio_last",)
    for bad in (0, -1, 5, "fit"):
        with pytest.raises(InvalidParameterError, match="power must be"):
            RetentionPredictor(features=features, model="damage", power=bad).fit(rows, y)
    with pytest.raises(InvalidParameterError, match="damage model only"):
        RetentionPredictor(features=features, model="ridge", power=0.5).fit(rows, y)
    # 'auto' leaves the other models linear
    assert (
        RetentionPredictor(features=features, model="ridge", power="auto").fit(rows, y).power_ == 1
    )
    predictor = RetentionPredictor(features=features, model="damage", power="auto")
    predictor.fit(rows, y, groups=groups)
    loaded, _ = load_predictors(save_predictors({"direct": predictor}, tmp_path / "p.skops"))
    assert loaded["direct"].power_ == 0.5
    np.testing.assert_array_equal(loaded["direct"].predict(rows), predictor.predict(rows))


def test_a_predictor_saved_before_powers_existed_reads_its_signals_straight():
    rows, y, groups = _damage_rows(1.0)
    predictor = RetentionPredictor(features=("interference_ratio_last",), model="damage")
    predictor.fit(rows, y, groups=groups)
    del predictor.__dict__["power"], predictor.__dict__["power_"]  # an older file
    assert predictor.get_params()["power"] == 1.0
    np.testing.assert_allclose(predictor.predict(rows), y, atol=1e-9)


def test_the_shipped_default_reads_the_head_and_falls_back_without_it():
    predictors, meta = load_predictors()
    direct = predictors["direct"]
    assert direct.features == ("head_interference_room",) and direct.model == "damage"
    assert direct.fallback_features == (
        ("head_interference",),
        ("interference_ratio", "interference_ratio_last"),
    )
    assert meta["power"]["direct"] == direct.power_ and 0 < direct.power_ < 1
    (coef,) = direct.estimator_[-1].coef_
    with_room = {"head_interference_room": 0.02, "head_interference": 0.04, "interference_ratio": 9}
    values = direct.predict([with_room, {"head_interference_room": 0.0}])
    assert values[0] == pytest.approx(1 - coef * 0.02**direct.power_)  # the rest is unread
    assert values[1] == pytest.approx(1.0)
    # no label room (a finished adapter added from disk): the head interference alone
    head = direct.fallback_
    (head_coef,) = head.estimator_[-1].coef_
    no_room = {"head_interference": 0.04, "interference_ratio": 0.5}
    assert direct.predict([no_room])[0] == pytest.approx(1 - head_coef * 0.04**head.power_)
    # a causal LM's pair (no head signals) goes on to the head-free model
    no_head = {"interference_ratio": 0.5, "interference_ratio_last": 0.5}
    assert direct.predict([no_head])[0] == pytest.approx(head.fallback_.predict([no_head])[0])
