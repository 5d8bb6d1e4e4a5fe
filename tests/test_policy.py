"""Policy decisions and store-wide plans on hand-set predictions."""

from __future__ import annotations

import pytest

from mergeprobe import InvalidParameterError, PairPrediction, Policy, save_predictors


def _pair(a, b, direct, mean=None, other=None, redundancy=0.0):
    mean = direct if mean is None else mean
    other = other or {}
    return PairPrediction(
        a,
        b,
        {"direct": direct, "mean": mean},
        {"direct": other.get("direct", direct), "mean": other.get("mean", mean)},
        {"direct": (direct - 0.05, direct + 0.05), "mean": (mean - 0.05, mean + 0.05)},
        redundancy=redundancy,
    )


POLICY = Policy(tau=0.9, methods=("direct", "mean"))


def test_nothing_to_compare_with_says_so():
    decision = POLICY.decide("run", [])
    assert decision.decision == "merge"
    assert "no compatible signature" in decision.reasons[0]
    assert decision.members == ["run"]


def test_merge_when_both_sides_stay_above_tau():
    decision = POLICY.decide("run", [_pair("run", "a", 0.97), _pair("run", "b", 0.5)])
    assert decision.decision == "merge" and decision.method == "direct"
    assert decision.members == ["run", "a"]
    assert decision.predicted_min == pytest.approx(0.97)
    assert "0.970" in decision.reasons[0]


def test_set_retention_limits_how_many_partners_join():
    # 0.95 and 0.94 each pass, but together the run keeps 1 - 0.05 - 0.06 = 0.89 < 0.9
    decision = POLICY.decide("run", [_pair("run", "a", 0.95), _pair("run", "b", 0.94)])
    assert decision.members == ["run", "a"]


def test_reweight_when_only_the_mean_merge_keeps_it():
    decision = POLICY.decide("run", [_pair("run", "a", 0.7, mean=0.93)])
    assert decision.decision == "reweight" and decision.method == "mean"
    assert decision.weights == {"run": 0.5, "a": 0.5}
    assert "falls below tau" in decision.reasons[0]


def test_route_when_nothing_keeps_it():
    decision = POLICY.decide("run", [_pair("run", "a", 0.6, mean=0.8)])
    assert decision.decision == "route"
    assert "0.600" in decision.reasons[0]


def test_prune_a_redundant_run():
    decision = POLICY.decide("run", [_pair("run", "a", 0.99, redundancy=0.95)])
    assert decision.decision == "prune" and decision.members == ["run", "a"]


def test_the_partner_side_counts_too():
    decision = POLICY.decide("run", [_pair("run", "a", 0.99, other={"direct": 0.5, "mean": 0.5})])
    assert decision.decision == "route"


def test_partners_are_weighed_against_each_other():
    pairs = [_pair("run", "a", 0.97), _pair("run", "b", 0.96)]
    # a and b each fit with the run, but b would cost a 0.2 of its gain
    clash = [_pair("b", "a", 0.99, other={"direct": 0.8, "mean": 0.8})]  # the reverse key
    decision = POLICY.decide("run", pairs, clash)
    assert decision.members == ["run", "a"]
    assert decision.predicted_min == pytest.approx(0.97)
    # compatible partners join together: every member's set retention is >= tau
    decision = POLICY.decide("run", pairs, [_pair("a", "b", 0.99)])
    assert decision.members == ["run", "a", "b"]
    # run 1 - 0.03 - 0.04, a 1 - 0.03 - 0.01, b 1 - 0.04 - 0.01
    assert decision.predicted_min == pytest.approx(0.93)
    assert decision.predicted_mean == pytest.approx((0.93 + 0.96 + 0.95) / 3)
    assert "run 0.930, a 0.960, b 0.950" in decision.reasons[-1]
    # two partners without a prediction between them are not merged together
    assert POLICY.decide("run", pairs, []).members == ["run", "a"]
    # without partner_pairs each partner is weighed against the run only, as before
    alone = POLICY.decide("run", pairs)
    assert alone.members == ["run", "a", "b"] and alone.predicted_min == pytest.approx(0.93)


def test_plan_groups_compatible_adapters_and_routes_the_rest():
    names = ["a", "b", "c"]
    table = {
        ("a", "b"): 0.97,
        ("b", "a"): 0.96,
        ("a", "c"): 0.5,
        ("c", "a"): 0.6,
        ("b", "c"): 0.55,
        ("c", "b"): 0.7,
    }
    pairs = [_pair(x, y, v) for (x, y), v in table.items()]
    decisions = POLICY.plan(names, pairs)
    kinds = {tuple(sorted(d.members)): d.decision for d in decisions}
    assert kinds == {("a", "b"): "merge", ("c",): "route"}
    merged = next(d for d in decisions if d.decision == "merge")
    assert merged.predicted_min == pytest.approx(0.96)


def test_plan_uses_the_mean_merge_where_the_direct_one_fails():
    pairs = [_pair("a", "b", 0.8, mean=0.95), _pair("b", "a", 0.8, mean=0.92)]
    (decision,) = POLICY.plan(["a", "b"], pairs)
    assert decision.decision == "reweight" and decision.weights == {"a": 0.5, "b": 0.5}
    assert decision.predicted_min == pytest.approx(0.92)


def test_plan_prunes_only_in_favour_of_a_served_adapter():
    # a ~ b and b ~ c are redundant, a and c are not: b goes to a, c stays (no chain c -> b -> a)
    similarity = {("a", "b"): 0.95, ("b", "c"): 0.93, ("a", "c"): 0.2}
    pairs = [
        _pair(x, y, 0.97, redundancy=similarity.get((x, y), similarity.get((y, x))))
        for x in "abc"
        for y in "abc"
        if x != y
    ]
    decisions = POLICY.plan(["a", "b", "c"], pairs)
    pruned = [d.members for d in decisions if d.decision == "prune"]
    assert pruned == [["b", "a"]]
    served = {m for d in decisions if d.decision != "prune" for m in d.members}
    assert served == {"a", "c"}


def test_bad_thresholds_are_refused():
    with pytest.raises(InvalidParameterError, match="tau"):
        Policy(tau=0)
    with pytest.raises(InvalidParameterError, match="methods"):
        Policy(methods=("average",))


def test_plan_by_matrices_equals_plan_by_pairs_and_builds_a_document():
    import numpy as np

    from mergeprobe.policy import build_plan

    from .test_compare import _random_signature
    from .test_decisions import FEATURES

    rng = np.random.default_rng(0)
    names = [f"s{k}" for k in range(8)]
    signatures = [_random_signature(n, k, ("l0", "l1", "l2"), (1, 2)) for k, n in enumerate(names)]
    from mergeprobe import RetentionPredictor

    rows = [{f: float(rng.uniform(0.2, 3)) for f in FEATURES} for _ in range(40)]
    y = np.array([0.98 - 0.05 * r["drift_norm_ratio"] for r in rows])
    predictor = RetentionPredictor(features=FEATURES, model="ridge").fit(rows, y)
    plan = build_plan(signatures, {"direct": predictor}, Policy(tau=0.9, methods=("direct",)))
    assert plan["summary"]["adapters"] == 8 and plan["summary"]["pairs_predicted"] == 56
    # the same plan from per-pair predictions through Policy.plan
    from mergeprobe import pairwise_signals

    value = {
        (a.name, b.name): float(predictor.predict([pairwise_signals(a, b)])[0])
        for a in signatures
        for b in signatures
        if a is not b
    }
    pairs = [
        _pair(a, b, v, other={"direct": value[(b, a)]}, redundancy=-1.0)
        for (a, b), v in value.items()
    ]
    table = {(p["self"], p["other"]): p["retention"]["direct"] for p in plan["pairs"]}
    for p in pairs:
        assert table[(p.self, p.other)] == pytest.approx(p.retention_self["direct"], abs=1e-9)
    # every merged member keeps 1 - Σ(1 - R) >= tau by the pairwise predictions made here
    independent = {(p.self, p.other): p.retention_self["direct"] for p in pairs}
    assert any(len(s["members"]) > 1 for s in plan["served"])
    for served in plan["served"]:
        for member in served["members"]:
            damage = sum(1 - independent[(member, o)] for o in served["members"] if o != member)
            assert served["predicted"][member]["retention"] == pytest.approx(1 - damage)
            assert 1 - damage >= 0.9 or len(served["members"]) == 1
    # and the grouping itself is the one Policy.plan makes from those pairs
    by_pairs = Policy(tau=0.9, methods=("direct",)).plan(names, pairs)
    assert not plan["pruned"]
    assert sorted(sorted(d.members) for d in by_pairs) == sorted(
        sorted(s["members"]) for s in plan["served"]
    )


def test_plan_from_signals_the_signatures_do_not_carry():
    """A predictor fitted on rehearsal_kl plans from the matrix given to build_plan, in the
    order of the signatures or of a "names" entry (as rehearsal_kl returns it)."""
    import numpy as np

    from mergeprobe import RetentionPredictor
    from mergeprobe.policy import build_plan

    from .test_compare import _random_signature

    names = ["s0", "s1", "s2", "s3"]
    signatures = [_random_signature(n, k, ("l0", "l1"), (1, 2)) for k, n in enumerate(names)]
    kl = np.array(
        [
            [np.nan, 0.01, 0.90, 0.02],
            [0.01, np.nan, 0.80, 0.03],
            [0.70, 0.60, np.nan, 0.50],
            [0.02, 0.02, 0.90, np.nan],
        ]
    )
    train = np.linspace(0.0, 1.0, 30)
    predictor = RetentionPredictor(features=("rehearsal_kl",), model="damage")
    predictor.fit({"rehearsal_kl": train}, 1.0 - 0.2 * train)  # R = 1 - 0.2 KL
    policy = Policy(tau=0.9, methods=("direct",))
    plan = build_plan(signatures, {"direct": predictor}, policy, signals={"rehearsal_kl": kl})
    table = {(p["self"], p["other"]): p["retention"]["direct"] for p in plan["pairs"]}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                assert table[(a, b)] == pytest.approx(1.0 - 0.2 * kl[i, j])
    groups = sorted(sorted(s["members"]) for s in plan["served"])
    assert groups == [["s0", "s1", "s3"], ["s2"]]  # s2 damages and is damaged by everyone
    # the same matrix in another order, named
    order = [3, 1, 0, 2]
    named = {"names": [names[k] for k in order], "rehearsal_kl": kl[np.ix_(order, order)]}
    again = build_plan(signatures, {"direct": predictor}, policy, signals=named)
    assert again["served"] == plan["served"]
    # the shipped rehearsal predictors plan from the same matrix
    from mergeprobe import load_predictors

    shipped, _ = load_predictors(state="rehearsal")
    direct = Policy(tau=0.9, methods=("direct",))
    by_shipped = build_plan(signatures, shipped, direct, signals={"rehearsal_kl": kl})
    assert ["s2"] in [s["members"] for s in by_shipped["served"]]  # KL 0.5-0.9: kept apart
    with pytest.raises(InvalidParameterError, match="shape"):
        build_plan(signatures, {"direct": predictor}, policy, signals={"rehearsal_kl": kl[:3]})
    with pytest.raises(InvalidParameterError, match="names"):
        build_plan(
            signatures,
            {"direct": predictor},
            policy,
            signals={"names": ["a", "b", "c", "d"], "rehearsal_kl": kl},
        )


def _norm_damage(c):
    """A damage model on the partner-to-own update norm ratio: R = 1 - c * ratio, exactly."""
    import numpy as np

    from mergeprobe import RetentionPredictor

    ratio = np.linspace(0.1, 3.0, 20)
    predictor = RetentionPredictor(features=("update_norm_ratio",), model="damage")
    return {"direct": predictor.fit({"update_norm_ratio": ratio}, 1.0 - c * ratio)}


def _norm_signature(name, probes):
    """A hand-built signature with one layer whose update norm is given per probe:
    ``probes`` is [(kind, fraction, norm), ...]."""
    import torch

    from mergeprobe import Probe

    from .test_compare import _signature, _update

    signature = _signature(name, {})
    signature.probes = [
        Probe(step=int(f * 100), fraction=f, kind=kind, tensors=_update(torch.eye(8), norm))
        for kind, f, norm in probes
    ]
    return signature


def test_a_finished_partner_is_read_at_its_end_by_the_predictors_for_it():
    from mergeprobe import predict_pairs

    run = _norm_signature("run", [("probe", 0.05, 2.0)])
    done = _norm_signature("done", [("probe", 0.05, 1.0), ("final", 1.0, 4.0)])
    running = _norm_signature("running", [("probe", 0.05, 1.0)])
    early, finished = _norm_damage(0.1), _norm_damage(0.05)

    # default: the partner at the same fraction, one set of predictors
    (pair,), (note,) = predict_pairs(run, [done], early)
    assert note["partner_state"] == "probe at 0.050"
    assert pair.retention_self["direct"] == pytest.approx(1 - 0.1 * 1 / 2)
    assert pair.retention_other["direct"] == pytest.approx(1 - 0.1 * 2 / 1)

    pairs, notes = predict_pairs(run, [done, running], early, against_finished=finished)
    # the finished partner at its end (norm 4): this run by the predictors for that, the
    # partner's own retention (its end against this run's horizon) by the early ones
    assert notes[0]["partner_state"] == "final state"
    assert notes[0]["predictors"] == "against finished"
    assert pairs[0].retention_self["direct"] == pytest.approx(1 - 0.05 * 4 / 2)
    assert pairs[0].retention_other["direct"] == pytest.approx(1 - 0.1 * 2 / 4)
    # exact data: zero residuals, so the interval is the point itself
    assert pairs[0].interval["direct"] == pytest.approx((1 - 0.05 * 4 / 2,) * 2)
    # a partner still training: the same fraction and the early predictors, as before
    assert notes[1]["partner_state"] == "probe at 0.050" and "predictors" not in notes[1]
    assert pairs[1].retention_self["direct"] == pytest.approx(1 - 0.1 * 1 / 2)

    # a partner stopped at its horizon (its final state at 5 %) is read like a run there
    stopped = _norm_signature("stopped", [("probe", 0.05, 1.0), ("final", 0.05, 1.0)])
    (pair,), (note,) = predict_pairs(run, [stopped], early, against_finished=finished)
    assert note["partner_state"] == "probe at 0.050" and "predictors" not in note
    assert pair.retention_self["direct"] == pytest.approx(1 - 0.1 * 1 / 2)
    # a finished adapter beside finished ones: the caller's predictors, nothing switched
    (pair,), (note,) = predict_pairs(
        done,
        [done.__class__("other", done.metadata, done.probes)],
        early,
        against_finished=finished,
    )
    assert "predictors" not in note and pair.retention_self["direct"] == pytest.approx(0.9)
    # an adapter finished at 80 % beside a finished partner: its end, the caller's predictors
    late = _norm_signature("late", [("probe", 0.05, 2.0), ("final", 0.8, 2.0)])
    (pair,), (note,) = predict_pairs(late, [done], early, against_finished=finished)
    assert note["partner_state"] == "final state" and "predictors" not in note
    assert pair.retention_self["direct"] == pytest.approx(1 - 0.1 * 4 / 2)
    # a run stopped at its horizon beside finished adapters is not a finished store
    from mergeprobe.policy import plan_state

    assert plan_state([done, stopped]) == "early" and plan_state([done, late]) == "final"
    # a partner without probes is skipped with a reason, the others are still predicted
    empty = _norm_signature("empty", [])
    pairs, notes = predict_pairs(run, [empty, done], early, against_finished=finished)
    assert [p.other for p in pairs] == ["done"] and "no probe" in notes[0]["skipped"]
    # against_finished may cover more methods, not fewer
    more = {**finished, "mean": finished["direct"]}
    assert predict_pairs(run, [done], early, against_finished=more)[0]
    with pytest.raises(InvalidParameterError, match="every method"):
        predict_pairs(run, [done], early, against_finished={"mean": finished["direct"]})


def _ship_norm_damage(monkeypatch):
    """Shipped sets replaced by exact damage models: 5 % 0.1, against finished 0.05, final 0.2."""
    import mergeprobe.predictor

    shipped = {
        "early": _norm_damage(0.1),
        "early_vs_final": _norm_damage(0.05),
        "final": _norm_damage(0.2),
    }
    real = mergeprobe.predictor.load_predictors

    def load(path=None, *, state="early"):
        return real(path) if path is not None else (shipped[state], {"trained_on": state})

    monkeypatch.setattr(mergeprobe.predictor, "load_predictors", load)


def test_a_default_plan_predicts_runs_beside_finished_adapters_with_the_predictors_for_it(
    monkeypatch,
):
    from mergeprobe.policy import build_plan

    _ship_norm_damage(monkeypatch)
    run = _norm_signature("run", [("probe", 0.05, 2.0)])
    other_run = _norm_signature("other_run", [("probe", 0.05, 1.0)])
    done = _norm_signature("done", [("final", 1.0, 4.0)])
    done2 = _norm_signature("done2", [("final", 1.0, 2.0)])
    stopped = _norm_signature("stopped", [("probe", 0.05, 1.0), ("final", 0.05, 1.0)])
    policy = Policy(tau=0.1, methods=("direct",))
    plan = build_plan([run, other_run, done, done2, stopped], policy=policy)
    table = {(p["self"], p["other"]): p["retention"]["direct"] for p in plan["pairs"]}
    assert table[("run", "done")] == pytest.approx(1 - 0.05 * 4 / 2)  # run beside finished
    assert table[("other_run", "done")] == pytest.approx(1 - 0.05 * 4 / 1)
    assert table[("done", "run")] == pytest.approx(1 - 0.1 * 2 / 4)  # the early ones
    assert table[("run", "other_run")] == pytest.approx(1 - 0.1 * 1 / 2)
    assert table[("done", "done2")] == pytest.approx(1 - 0.2 * 2 / 4)  # both finished: final
    assert table[("run", "stopped")] == pytest.approx(1 - 0.1 * 1 / 2)  # stopped at 5 %: early
    assert plan["predictor"]["name"] == "default (early)"
    assert plan["predictor"]["early_vs_final"]["trained_on"] == "early_vs_final"
    assert plan["predictor"]["final"]["trained_on"] == "final"
    # every adapter finished: the final predictors alone
    finished = build_plan([done, done2], policy=policy)
    table = {(p["self"], p["other"]): p["retention"]["direct"] for p in finished["pairs"]}
    assert table[("done", "done2")] == pytest.approx(1 - 0.2 * 2 / 4)
    assert finished["predictor"]["name"] == "default (final)"
    assert "early_vs_final" not in finished["predictor"]
    # predictors of one's own: used for every pair
    mine = build_plan([run, done], _norm_damage(0.3), policy)
    table = {(p["self"], p["other"]): p["retention"]["direct"] for p in mine["pairs"]}
    assert table[("run", "done")] == pytest.approx(1 - 0.3 * 4 / 2)
    assert "early_vs_final" not in mine["predictor"]


def test_a_plan_takes_sets_of_ones_own_per_state(monkeypatch, tmp_path):
    from mergeprobe.policy import build_plan

    _ship_norm_damage(monkeypatch)
    run = _norm_signature("run", [("probe", 0.05, 2.0)])
    done = _norm_signature("done", [("final", 1.0, 4.0)])
    done2 = _norm_signature("done2", [("final", 1.0, 2.0)])
    policy = Policy(tau=0.1, methods=("direct",))
    plan = build_plan([run, done, done2], policy=policy, sets={"final": _norm_damage(0.5)})
    table = {(p["self"], p["other"]): p["retention"]["direct"] for p in plan["pairs"]}
    assert table[("done", "done2")] == pytest.approx(1 - 0.5 * 2 / 4)  # the given final set
    assert table[("done2", "done")] == pytest.approx(1 - 0.5 * 4 / 2)
    assert table[("run", "done")] == pytest.approx(1 - 0.05 * 4 / 2)  # shipped early_vs_final
    assert table[("done", "run")] == pytest.approx(1 - 0.1 * 2 / 4)  # shipped early
    assert plan["predictor"]["name"] == "default (early)"
    assert plan["predictor"]["final"] == {"name": "given (final)", "trained_on": None}
    assert plan["predictor"]["early_vs_final"]["name"] == "default (early_vs_final)"
    # the same set as a file: the same pairs, named by the file, with what it was fitted on
    path = save_predictors(_norm_damage(0.5), tmp_path / "final.skops", {"trained_on": 7})
    from_file = build_plan([run, done, done2], policy=policy, sets={"final": path})
    assert from_file["pairs"] == plan["pairs"]
    assert from_file["predictor"]["final"] == {"name": str(path), "trained_on": 7}
    # the plan's pairs are predict_between's with the same sets
    from mergeprobe import predict_between

    for p in predict_between([run, done, done2], sets={"final": _norm_damage(0.5)}):
        assert table[(p.self, p.other)] == pytest.approx(p.retention_self["direct"])
        assert table[(p.other, p.self)] == pytest.approx(p.retention_other["direct"])
    # every set given: nothing shipped is read
    given = {"early": _norm_damage(0.2), "early_vs_final": _norm_damage(0.3)}
    plan = build_plan([run, done], policy=policy, sets=given)
    table = {(p["self"], p["other"]): p["retention"]["direct"] for p in plan["pairs"]}
    assert table[("run", "done")] == pytest.approx(1 - 0.3 * 4 / 2)
    assert table[("done", "run")] == pytest.approx(1 - 0.2 * 2 / 4)
    assert plan["predictor"]["name"] == "given (early)"

    # a method some set in use lacks is not planned with; none in common is refused
    def direct_and_mean(c):
        return {"direct": _norm_damage(c)["direct"], "mean": _norm_damage(c)["direct"]}

    plan = build_plan(
        [run, done, done2],
        policy=Policy(tau=0.1, methods=("direct", "mean")),
        sets={
            "early": direct_and_mean(0.1),
            "early_vs_final": direct_and_mean(0.05),
            "final": {"mean": _norm_damage(0.5)["direct"]},
        },
    )
    assert plan["policy"]["methods"] == ["mean"]
    assert all(set(p["retention"]) == {"mean"} for p in plan["pairs"])
    table = {(p["self"], p["other"]): p["retention"]["mean"] for p in plan["pairs"]}
    assert table[("done", "done2")] == pytest.approx(1 - 0.5 * 2 / 4)
    assert table[("run", "done")] == pytest.approx(1 - 0.05 * 4 / 2)
    with pytest.raises(InvalidParameterError, match="none of the policy's methods"):
        build_plan(
            [done, done2], policy=Policy(methods=("ties",)), sets={"final": _norm_damage(0.5)}
        )
    with pytest.raises(InvalidParameterError, match="keyed by"):
        build_plan([done, done2], sets={"rehearsal": _norm_damage(0.5)})
    with pytest.raises(InvalidParameterError, match="not both"):
        build_plan([done, done2], _norm_damage(0.3), sets={"final": _norm_damage(0.5)})


def test_predict_between_gives_the_plans_predictions(monkeypatch):
    from mergeprobe import predict_between
    from mergeprobe.policy import build_plan

    run = _norm_signature("run", [("probe", 0.05, 2.0)])
    done = _norm_signature("done", [("final", 1.0, 4.0)])
    done2 = _norm_signature("done2", [("final", 1.0, 2.0)])
    # predictors of one's own: every pair, one prediction per unordered pair
    (pair,) = predict_between([done, done2], _norm_damage(0.3))
    assert (pair.self, pair.other) == ("done", "done2")
    assert pair.retention_self["direct"] == pytest.approx(1 - 0.3 * 2 / 4)
    assert pair.retention_other["direct"] == pytest.approx(1 - 0.3 * 4 / 2)
    assert pair.interval["direct"] == pytest.approx((1 - 0.3 * 2 / 4,) * 2)
    assert predict_between([done], _norm_damage(0.3)) == []
    # the shipped sets, each pair by the set for its states, as build_plan reads them
    _ship_norm_damage(monkeypatch)
    between = predict_between([run, done, done2])
    plan = build_plan([run, done, done2], policy=Policy(tau=0.1, methods=("direct",)))
    table = {(p["self"], p["other"]): p["retention"]["direct"] for p in plan["pairs"]}
    assert len(between) == 3
    for p in between:
        assert p.retention_self["direct"] == pytest.approx(table[(p.self, p.other)])
        assert p.retention_other["direct"] == pytest.approx(table[(p.other, p.self)])
    by_name = {(p.self, p.other): p for p in between}
    assert by_name[("run", "done")].retention_self["direct"] == pytest.approx(1 - 0.05 * 4 / 2)
    assert by_name[("done", "done2")].retention_self["direct"] == pytest.approx(1 - 0.2 * 2 / 4)
    assert by_name[("run", "done2")].retention_self["direct"] == pytest.approx(1 - 0.05 * 2 / 2)
    assert by_name[("run", "done2")].retention_other["direct"] == pytest.approx(1 - 0.1 * 2 / 2)
    # sets of one's own replace the shipped set of their state only
    mine = predict_between([run, done, done2], sets={"final": _norm_damage(0.5)})
    by_name = {(p.self, p.other): p for p in mine}
    assert by_name[("done", "done2")].retention_self["direct"] == pytest.approx(1 - 0.5 * 2 / 4)
    assert by_name[("run", "done")].retention_self["direct"] == pytest.approx(1 - 0.05 * 4 / 2)
    with pytest.raises(InvalidParameterError, match="keyed by"):
        predict_between([done, done2], sets={"rehearsal": _norm_damage(0.5)})

    # a method one set in use lacks is left out, never predicted by another state's set
    def both(c):
        return {"direct": _norm_damage(c)["direct"], "mean": _norm_damage(c)["direct"]}

    sets = {"early": both(0.1), "early_vs_final": both(0.05), "final": {"mean": both(0.5)["mean"]}}
    mixed = {(p.self, p.other): p for p in predict_between([run, done, done2], sets=sets)}
    assert all(set(p.retention_self) == {"mean"} for p in mixed.values())
    assert mixed[("done", "done2")].retention_self["mean"] == pytest.approx(1 - 0.5 * 2 / 4)
    assert mixed[("run", "done")].retention_self["mean"] == pytest.approx(1 - 0.05 * 4 / 2)
    with pytest.raises(InvalidParameterError, match="no merge method"):
        predict_between([done, done2], _norm_damage(0.3), methods=["mean"])
    with pytest.raises(InvalidParameterError, match="not both"):
        predict_between([done, done2], _norm_damage(0.3), sets={"final": _norm_damage(0.5)})
    with pytest.raises(InvalidParameterError, match="unique"):
        predict_between([done, done], _norm_damage(0.3))


def test_partner_pairs_that_are_not_finite_count_as_incompatible():
    pairs = [_pair("run", "a", 0.97), _pair("run", "b", 0.96)]
    for value in (float("nan"), float("inf"), float("-inf")):
        between = [_pair("a", "b", value, other={"direct": 0.99, "mean": 0.99})]
        assert POLICY.decide("run", pairs, between).members == ["run", "a"]
    # the partner that joins second is damaged by the first: its own side counts too
    between = [_pair("a", "b", 0.99, other={"direct": 0.9, "mean": 0.9})]
    assert POLICY.decide("run", pairs, between).members == ["run", "a"]


def test_each_method_names_the_signals_its_prediction_read():
    import numpy as np

    from mergeprobe import RetentionPredictor, predict_pairs

    run = _norm_signature("run", [("probe", 0.05, 2.0)])
    done = _norm_signature("done", [("probe", 0.05, 1.0)])
    predictors = _norm_damage(0.1)
    # the mean merge's model reads another signal (hand-built signatures carry no drift:
    # drift_norm_ratio is missing and imputed, so it is named with no value)
    ratio = np.linspace(0.1, 3.0, 20)
    predictors["mean"] = RetentionPredictor(features=("drift_norm_ratio",), model="ridge").fit(
        {"drift_norm_ratio": ratio}, 1.0 - 0.01 * ratio
    )
    (pair,), _ = predict_pairs(run, [done], predictors)
    assert pair.signals["direct"] == {"update_norm_ratio": pytest.approx(0.5)}
    assert pair.signals["mean"] == {"drift_norm_ratio": None}
    assert pair.as_record("mean")["signals"] == {"drift_norm_ratio": None}
    assert pair.as_record("direct")["signals"]["update_norm_ratio"] == pytest.approx(0.5)
    assert "signals" not in pair.as_record("ties")  # no prediction for it
