"""Pairwise signals against values worked out by hand on constructed signatures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergeprobe import Probe, Signature, pairwise_signals

K = 8  # sketch size of these hand-built signatures


def _signature(name, tensors, layers=("l0",), ranks=(2,), drift_layers=(1,)):
    metadata = {
        "base_model": {
            "architecture_fingerprint": "arch",
            "weights_fingerprint": "w",
            "name_or_path": "tiny",
        },
        "anchor": {"hash": "anchors", "source": "default", "n": 4},
        "sketch": {"update": K, "entries": 8, "drift": 3},
        "layers": list(layers),
        "drift_layers": list(drift_layers),
        "adapter": {"ranks": list(ranks)},
    }
    return Signature(name, metadata, [Probe(step=5, fraction=0.05, kind="probe", tensors=tensors)])


def _update(sketch, norm, entries=None):
    return {
        "update_sketch": sketch.unsqueeze(0),
        "update_norm": torch.tensor([norm]),
        "update_entries": (entries if entries is not None else torch.ones(8)).unsqueeze(0),
    }


def _low_rank_on(columns):
    """A K × K sketch whose column space is spanned by the given standard basis vectors."""
    s = torch.zeros(K, K)
    for i, c in enumerate(columns):
        s[c, i] = 1.0 + i  # distinct singular values: a well-defined top-r basis
    return s


def test_subspace_excess_is_overlap_minus_chance():
    # Rank 2 in R^8: chance overlap of two random 2-d subspaces is 2/8.
    same = pairwise_signals(
        _signature("a", _update(_low_rank_on([0, 1]), 1.0)),
        _signature("b", _update(_low_rank_on([0, 1]), 1.0)),
    )
    assert same["update_subspace_excess"] == pytest.approx(1.0 - 2 / 8)
    apart = pairwise_signals(
        _signature("a", _update(_low_rank_on([0, 1]), 1.0)),
        _signature("b", _update(_low_rank_on([2, 3]), 1.0)),
    )
    assert apart["update_subspace_excess"] == pytest.approx(0.0 - 2 / 8)
    half = pairwise_signals(
        _signature("a", _update(_low_rank_on([0, 1]), 1.0)),
        _signature("b", _update(_low_rank_on([1, 2]), 1.0)),
    )
    assert half["update_subspace_excess"] == pytest.approx(0.5 - 2 / 8)
    # A zero update has no subspace: missing, not a number.
    empty = pairwise_signals(
        _signature("a", _update(_low_rank_on([0, 1]), 1.0)),
        _signature("b", _update(torch.zeros(K, K), 0.0)),
    )
    assert math.isnan(empty["update_subspace_excess"])


def test_input_subspace_excess_reads_the_row_spaces():
    # The same columns written (same output subspace) from different input directions:
    # the output overlap is full, the input overlap none; the transpose swaps them.
    a = _low_rank_on([0, 1])
    b = torch.zeros(K, K)
    b[0, 2], b[1, 3] = 1.0, 2.0  # columns 0, 1 written, read from inputs 2, 3
    values = pairwise_signals(_signature("a", _update(a, 1.0)), _signature("b", _update(b, 1.0)))
    assert values["update_subspace_excess"] == pytest.approx(1.0 - 2 / 8)
    assert values["update_input_subspace_excess"] == pytest.approx(0.0 - 2 / 8)
    swapped = pairwise_signals(
        _signature("a", _update(a.T, 1.0)), _signature("b", _update(b.T, 1.0))
    )
    assert swapped["update_subspace_excess"] == pytest.approx(0.0 - 2 / 8)
    assert swapped["update_input_subspace_excess"] == pytest.approx(1.0 - 2 / 8)
    # one input direction of two shared (a shared LoRA A row): overlap 1/2
    c = torch.zeros(K, K)
    c[4, 1], c[5, 6] = 1.0, 2.0
    half = pairwise_signals(_signature("a", _update(a, 1.0)), _signature("c", _update(c, 1.0)))
    assert half["update_input_subspace_excess"] == pytest.approx(0.5 - 2 / 8)


def test_sign_agreement_counts_only_the_largest_entries_of_both():
    # 8 entries, top 20 % = 2 per update. a's largest are positions 0, 1; b's are 0 and 2.
    a_entries = torch.tensor([9.0, -8.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    b_entries = torch.tensor([-7.0, 0.2, 6.0, 0.1, 0.1, 0.1, 0.1, 0.1])
    a = _signature("a", _update(_low_rank_on([0]), 1.0, a_entries), ranks=(1,))
    b = _signature("b", _update(_low_rank_on([0]), 1.0, b_entries), ranks=(1,))
    # Only position 0 is large in both, and there the signs differ.
    assert pairwise_signals(a, b)["update_sign_agreement"] == 0.0
    b_agree = _signature("b", _update(_low_rank_on([0]), 1.0, -b_entries), ranks=(1,))
    assert pairwise_signals(a, b_agree)["update_sign_agreement"] == 1.0


def test_norm_ratios_are_partner_over_own_on_shared_layers():
    sketch = _low_rank_on([0])
    a = _signature(
        "a",
        {
            "update_sketch": torch.stack([sketch, sketch]),
            "update_norm": torch.tensor([3.0, 4.0]),  # ‖(3, 4)‖ = 5
            "update_entries": torch.ones(2, 8),
        },
        layers=("l0", "l1"),
        ranks=(1, 1),
    )
    b = _signature("b", _update(sketch, 12.0), layers=("l1",), ranks=(1,))
    forward, backward = pairwise_signals(a, b), pairwise_signals(b, a)
    assert forward["shared_layers"] == 1 and forward["layer_coverage"] == 0.5
    assert forward["update_norm_ratio"] == pytest.approx(12.0 / 4.0)  # only l1 is shared
    assert backward["update_norm_ratio"] == pytest.approx(4.0 / 12.0)
    assert forward["update_norm_self"] == pytest.approx(4.0)
    assert forward["update_norm_other"] == pytest.approx(12.0)


def test_interference_ratio_projects_the_partner_on_own_drift_region():
    # a drifts along one hidden direction (e0) only, so its region is e0.
    d_a = torch.zeros(4, 3)
    d_a[:, 0] = torch.tensor([1.0, 2.0, 0.0, 2.0])  # ‖d_a‖ = 3
    # b drifts along e0 (norm 1.5) and along e1 (norm 4), which a's region does not see.
    d_b = torch.zeros(4, 3)
    d_b[:, 0] = torch.tensor([0.0, 1.5, 0.0, 0.0])
    d_b[:, 1] = torch.tensor([4.0, 0.0, 0.0, 0.0])

    def drift(d):
        return {
            "drift_sketch": d.unsqueeze(0),
            "drift_norm": d.norm().reshape(1),
            "cka": torch.tensor([0.9]),
        }

    a = _signature("a", {**_update(_low_rank_on([0]), 1.0), **drift(d_a)}, ranks=(1,))
    b = _signature("b", {**_update(_low_rank_on([0]), 1.0), **drift(d_b)}, ranks=(1,))
    signals = pairwise_signals(a, b)
    assert signals["interference_ratio"] == pytest.approx(1.5 / 3.0)
    # one drift layer: the last-layer ratio is the same number
    assert signals["interference_ratio_last"] == pytest.approx(1.5 / 3.0)
    assert signals["drift_norm_self"] == pytest.approx(3.0)
    assert signals["drift_norm_other"] == pytest.approx(math.hypot(1.5, 4.0))
    assert signals["drift_norm_ratio"] == pytest.approx(math.hypot(1.5, 4.0) / 3.0)
    # cosine of the flattened drifts: only the e0 column overlaps, <d_a, d_b> = 2 * 1.5
    assert signals["drift_cosine"] == pytest.approx(3.0 / (3.0 * math.hypot(1.5, 4.0)))


def test_only_skips_the_costly_signals_not_asked_for_and_keeps_the_rest_exact():
    d = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    tensors = {
        "drift_sketch": d.unsqueeze(0),
        "drift_norm": d.norm().reshape(1),
        "cka": torch.tensor([0.9]),
    }
    a = _signature("a", {**_update(_low_rank_on([0, 1]), 1.0), **tensors})
    b = _signature(
        "b", {**_update(_low_rank_on([1, 2]), 2.0), **tensors, "cka": torch.tensor([0.8])}
    )
    full = pairwise_signals(a, b)
    only = {"interference_ratio", "update_norm_other"}
    some = pairwise_signals(a, b, only=only)
    assert set(full) - set(some) == {
        "update_sign_agreement",
        "update_subspace_excess",
        "update_input_subspace_excess",
        "interference_ratio_last",
        "head_interference",
        "head_interference_room",
    }
    assert some["interference_ratio"] == full["interference_ratio"]
    # every cheap signal is still there, with the same value
    for name, value in some.items():
        assert value == full[name] or (math.isnan(value) and math.isnan(full[name])), name


def _head(x, drift, weight, bias=None):
    return {
        "head_input": torch.tensor(x, dtype=torch.float32),
        "head_input_drift": torch.tensor(drift, dtype=torch.float32),
        "head_weight": torch.tensor(weight, dtype=torch.float32),
        "head_bias": torch.zeros(len(weight)) if bias is None else torch.tensor(bias),
    }


def test_head_signals_read_the_partner_drift_through_own_head():
    # Two anchors, two classes, W = I: own logits are the head inputs themselves.
    own = _head([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]])
    partner = _head([[0.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]], [[1.0, 0.0]])
    signals = pairwise_signals(_signature("a", own), _signature("b", partner))
    # anchor 0: logits (1, 0) -> (1, 2), its class flips; anchor 1: (0, 1) unchanged
    assert signals["head_flip"] == pytest.approx(0.5)
    # KL(softmax(1, 0) || softmax(1, 2)) = p0 - p1 = (e - 1) / (e + 1); anchor 1 adds 0
    assert signals["head_kl"] == pytest.approx((math.e - 1) / (math.e + 1) / 2)
    # centred W = [[.5, -.5], [-.5, .5]]: partner shift (-1, 1) -> √2, own (.5, -.5) -> √.5
    assert signals["head_logit_shift"] == pytest.approx(2.0)
    # without drift sketches there is no interference ratio, so no head interference
    assert math.isnan(signals["head_interference"])
    # the partner's 1-class head is never used in this direction; in the other it is
    back = pairwise_signals(_signature("b", partner), _signature("a", own))
    assert back["head_flip"] == 0.0 and back["head_kl"] == pytest.approx(0.0, abs=1e-12)


def test_head_signals_are_missing_not_zero_without_a_head_or_with_other_anchors():
    own = _head([[1.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]])
    no_head = _signature("b", {})
    signals = pairwise_signals(_signature("a", own), no_head)
    assert all(math.isnan(signals[k]) for k in ("head_flip", "head_kl", "head_logit_shift"))
    three = _head([[1.0, 0.0]] * 3, [[1.0, 0.0]] * 3, [[1.0, 0.0]])
    signals = pairwise_signals(_signature("a", own), _signature("c", three))
    assert math.isnan(signals["head_kl"])


def _random_signature(name, seed, layers, drift_layers, arch="arch", classes=3):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "update_sketch": torch.randn(len(layers), K, K, generator=g),
        "update_norm": torch.rand(len(layers), generator=g) + 0.1,
        "update_entries": torch.randn(len(layers), 8, generator=g),
        # low-rank drift: the energy cut keeps a few directions, not all
        "drift_sketch": torch.randn(len(drift_layers), 4, 2, generator=g)
        @ torch.randn(len(drift_layers), 2, 3, generator=g),
        "drift_norm": torch.rand(len(drift_layers), generator=g) + 0.1,
        "cka": torch.rand(len(drift_layers), generator=g),
    }
    if classes:  # a task head reading 5-dimensional inputs on the 4 anchors
        tensors.update(
            head_input=torch.randn(4, 5, generator=g),
            head_input_drift=torch.randn(4, 5, generator=g),
            head_weight=torch.randn(classes, 5, generator=g),
            head_bias=torch.randn(classes, generator=g),
        )
    signature = _signature(name, tensors, layers, [2] * len(layers), drift_layers)
    signature.metadata["base_model"]["architecture_fingerprint"] = arch
    return signature


def test_signal_matrices_equal_the_pairwise_values():
    from mergeprobe.signals.compare import MATRIX_SIGNALS, pairwise_signal_matrices

    signatures = [
        _random_signature("a", 1, ("l0", "l1", "l2"), (1, 2)),
        _random_signature("b", 2, ("l0", "l1"), (1, 2)),
        _random_signature("c", 3, ("l1", "l2", "l3"), (2, 3), classes=2),
        _random_signature("d", 4, ("l0", "l1", "l2"), (1, 2), arch="other"),
        _random_signature("e", 5, ("l0", "l1"), (1, 2), classes=0),  # no head
    ]
    matrices = pairwise_signal_matrices(signatures)
    assert set(matrices) == MATRIX_SIGNALS
    for i, a in enumerate(signatures):
        for j, b in enumerate(signatures):
            if i == j or "d" in (a.name, b.name):
                assert all(math.isnan(float(m[i, j])) for m in matrices.values())
                continue
            expected = pairwise_signals(a, b)
            heads = a.name != "e" and b.name != "e"
            assert math.isfinite(expected["head_interference"]) == heads
            for name in MATRIX_SIGNALS:
                assert float(matrices[name][i, j]) == pytest.approx(
                    expected[name], rel=1e-6, abs=1e-9, nan_ok=True
                ), (a.name, b.name, name)


def test_signal_matrices_keep_drift_when_one_signature_has_other_anchors():
    from mergeprobe.signals.compare import pairwise_signal_matrices

    signatures = [_random_signature(n, k, ("l0", "l1"), (1, 2)) for k, n in enumerate("abc")]
    odd = _random_signature("odd", 9, ("l0", "l1"), (1, 2))
    odd.probes[-1].tensors["drift_sketch"] = torch.randn(2, 5, 3)  # other anchor count
    odd.metadata["anchor"] = {"hash": "other", "source": "texts", "n": 5}
    matrices = pairwise_signal_matrices([*signatures, odd])
    expected = pairwise_signals(signatures[0], signatures[1])
    assert float(matrices["drift_cosine"][0, 1]) == pytest.approx(expected["drift_cosine"])
    assert math.isnan(float(matrices["drift_cosine"][0, 3]))
    # a signature without anchor metadata passes check_compatible, so it is compared
    bare = _random_signature("bare", 11, ("l0", "l1"), (1, 2))
    bare.metadata.pop("anchor")
    matrices = pairwise_signal_matrices([*signatures, bare])
    assert math.isfinite(float(matrices["update_norm_ratio"][0, 3]))


def test_the_label_room_scales_the_head_interference_and_stays_missing_without_labels():
    from mergeprobe.signals.compare import pairwise_signal_matrices

    a = _random_signature("a", 1, ("l0", "l1"), (1, 2))
    b = _random_signature("b", 2, ("l0", "l1"), (1, 2))
    c = _random_signature("c", 3, ("l0", "l1"), (1, 2))
    a.metadata["labels"] = {"counts": {"0": 30, "1": 10}, "seen": 40, "majority_fraction": 0.75}
    b.metadata["labels"] = {"counts": {"0": 5, "1": 5}, "seen": 10, "majority_fraction": 0.5}
    ab, ba, ac, ca = (pairwise_signals(x, y) for x, y in ((a, b), (b, a), (a, c), (c, a)))
    # the run's own room: 1 - 30/40 as the run, 1 - 5/10 for b
    assert ab["label_room_self"] == pytest.approx(0.25) and ba["label_room_self"] == 0.5
    assert ab["head_interference_room"] == pytest.approx(0.25 * ab["head_interference"])
    assert ac["head_interference_room"] == pytest.approx(0.25 * ac["head_interference"])
    # c recorded no labels: its room and the scaled signal are missing, never zero
    assert math.isfinite(ca["head_interference"])
    assert math.isnan(ca["label_room_self"]) and math.isnan(ca["head_interference_room"])
    # one class seen is no balance at all: missing, not a room of 0
    c.metadata["labels"] = {"counts": {"1": 8}, "seen": 8, "majority_fraction": 1.0}
    assert math.isnan(pairwise_signals(c, a)["label_room_self"])
    matrices = pairwise_signal_matrices([a, b, c])
    for i, j, expected in ((0, 1, ab), (1, 0, ba), (0, 2, ac), (2, 0, ca)):
        for name in ("label_room_self", "head_interference_room"):
            assert float(matrices[name][i, j]) == pytest.approx(expected[name], nan_ok=True)


def test_the_label_counter_counts_training_class_labels_only():
    from torch import nn

    from mergeprobe.signals.labels import LabelCounter

    class Model(nn.Module):
        def forward(self, input_ids=None, labels=None):
            return input_ids

    model = Model()
    counter = LabelCounter({1: 2})  # a resumed run's earlier batches
    counter.attach(model)
    model.train()
    model(input_ids=torch.ones(4), labels=torch.tensor([0, 1, 1, -100]))  # -100: ignored
    model(input_ids=torch.ones(2), labels=torch.tensor([[0, 1], [1, 1]]))  # token labels
    model(input_ids=torch.ones(2), labels=torch.tensor([0.5, 1.5]))  # regression
    model(input_ids=torch.ones(2))  # no labels
    model.eval()
    model(input_ids=torch.ones(2), labels=torch.tensor([0, 0]))  # evaluation
    model.train()
    assert counter.summary() == {"counts": {"0": 1, "1": 4}, "seen": 5, "majority_fraction": 0.8}
    counter.detach()
    model(input_ids=torch.ones(1), labels=torch.tensor([0]))
    assert counter.summary()["seen"] == 5 and not counter.attached
    assert LabelCounter().summary() is None


def test_given_training_labels_are_counted_as_the_callback_counts_them():
    from mergeprobe.exceptions import InvalidParameterError
    from mergeprobe.signals.labels import count_labels, label_summary

    # class names or ids, a tensor of ids, or counts: the same metadata as a run's
    names = label_summary(count_labels(["pos", "neg", "pos", "pos"]))
    assert names == {"counts": {"neg": 1, "pos": 3}, "seen": 4, "majority_fraction": 0.75}
    ids = label_summary(count_labels(torch.tensor([2, 0, 2, 10])))
    assert ids["counts"] == {"0": 1, "2": 2, "10": 1}  # ids in numeric order
    assert ids["majority_fraction"] == 0.5
    assert label_summary(count_labels({"a": 3, "b": 0, "c": 1}))["counts"] == {"a": 3, "c": 1}
    # 1 and "1" (rows joined from two sources) are one class; numpy values are labels too
    mixed = label_summary(count_labels([1, "1", np.int64(1), np.str_("x")]))
    assert mixed == {"counts": {"1": 3, "x": 1}, "seen": 4, "majority_fraction": 0.75}
    assert count_labels({np.int64(2): np.int64(5)}) == {2: 5}
    for bad, message in (
        ([0.5, 1.5], "integers or strings"),
        ([[0, 1]], "integers or strings"),
        ([True, False], "integers or strings"),
        ("pos", "not a string"),
        ([], "no labels"),
        ({"a": -1}, "non-negative"),
        ({"a": 0}, "no labels"),
        ({None: 1}, "integers or strings"),
        ({0.5: 1}, "integers or strings"),
    ):
        with pytest.raises(InvalidParameterError, match=message):
            count_labels(bad)
