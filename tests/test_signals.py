"""The signal families against independent references: dense ΔW, autograd, numpy CKA.

Every expected value here is computed from first principles (dense float64 matrices, the
gradient autograd puts on a full weight, a numpy CKA), never by calling the function under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import mergeprobe.signals.gradient as gradient_module
from mergeprobe import Probe, Signature, pairwise_signals
from mergeprobe.adapters import find_lora_layers
from mergeprobe.signals.drift import linear_cka
from mergeprobe.signals.gradient import GradientSketcher
from mergeprobe.signals.sketch import _gaussian_cpu, projection
from mergeprobe.signals.update import (
    LowRankUpdate,
    sketch_update,
    update_cosine,
    update_inner,
    update_norm,
)

ALPHA = 8.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: one intra-op thread is faster, and immune to OpenMP spin-waits on a
    busy 2-core machine (measured: a 32×1536 matmul took 15 ms with 2 threads, 0.08 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scale(r: int, rslora: bool) -> float:
    return ALPHA / math.sqrt(r) if rslora else ALPHA / r


def _dense64(u: LowRankUpdate) -> torch.Tensor:
    """The reference ΔW in float64, straight from the definition s·(B A − B0 A0)."""
    dw = u.scale * (u.B.double() @ u.A.double())
    if u.A0 is not None:
        dw = dw - u.scale * (u.B0.double() @ u.A0.double())
    return dw


def _cos64(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float((x * y).sum() / (x.norm() * y.norm()))


# -- 1. update alignment from the factors -------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_update_signals_from_factors_equal_dense_reference(rslora):
    torch.manual_seed(0)
    out_dim, in_dim = 48, 40
    a4, b4 = torch.randn(4, in_dim), torch.randn(out_dim, 4)
    # The rank-16 update shares the rank-4 one's directions (scaled) plus 12 fresh ones, so
    # the true cosine is far from 0 and a relative tolerance is meaningful.
    a16 = torch.cat([a4, torch.randn(12, in_dim)])
    b16 = torch.cat([0.7 * b4, 0.3 * torch.randn(out_dim, 12)], dim=1)
    u = LowRankUpdate(a4, b4, _scale(4, rslora))
    v = LowRankUpdate(a16, b16, _scale(16, rslora))
    x, y = _dense64(u), _dense64(v)

    expected_cos = _cos64(x, y)
    assert abs(expected_cos) > 0.3  # the construction works as intended
    assert u.shape == v.shape == (out_dim, in_dim)
    assert update_inner(u, v) == pytest.approx(float((x * y).sum()), rel=1e-5)
    assert update_inner(v, u) == pytest.approx(float((x * y).sum()), rel=1e-5)
    assert update_norm(u) == pytest.approx(float(x.norm()), rel=1e-5)
    assert update_norm(v) == pytest.approx(float(y.norm()), rel=1e-5)
    assert update_cosine(u, v) == pytest.approx(expected_cos, rel=1e-5)
    assert update_cosine(u, u) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(u.dense().double(), x, rtol=1e-5, atol=1e-5)


def test_update_cosine_of_a_zero_update_is_zero():
    torch.manual_seed(1)
    u = LowRankUpdate(torch.randn(4, 10), torch.randn(12, 4), 2.0)
    zero = LowRankUpdate(torch.randn(4, 10), torch.zeros(12, 4), 2.0)
    assert update_norm(zero) == 0.0
    assert update_cosine(u, zero) == 0.0


class _TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(40, 48)
        self.back = nn.Linear(48, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(torch.relu(self.proj(x)))


def _peft_tiny(r: int, rslora: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=int(ALPHA),
        use_rslora=rslora,
        target_modules=["proj", "back"],
        # False = random A *and* B (PEFT's "gaussian" still zeroes B, so ΔW would be 0).
        init_lora_weights=False,
    )
    return get_peft_model(_TwoLinear(), config)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_update_of_real_peft_layers_equals_get_delta_weight(rslora):
    m4, m16 = _peft_tiny(4, rslora, seed=0), _peft_tiny(16, rslora, seed=1)
    refs4, refs16 = find_lora_layers(m4), find_lora_layers(m16)
    assert [r.name for r in refs4] == [r.name for r in refs16] == ["back", "proj"]
    with torch.no_grad():  # make the two adapters share directions: a cosine far from 0
        for r4, r16 in zip(refs4, refs16, strict=True):
            r16.lora_A[:4] = r4.lora_A
            r16.lora_B[:, :4] = r4.lora_B

    for r4, r16 in zip(refs4, refs16, strict=True):
        assert r4.rank == 4 and r16.rank == 16
        assert r4.scale == pytest.approx(_scale(4, rslora))
        assert r16.scale == pytest.approx(_scale(16, rslora))
        d4 = r4.module.get_delta_weight("default").detach()
        d16 = r16.module.get_delta_weight("default").detach()
        assert float(d4.norm()) > 0 and float(d16.norm()) > 0
        assert r4.shape == tuple(d4.shape)
        torch.testing.assert_close(r4.update().dense(), d4, rtol=0, atol=1e-6)
        torch.testing.assert_close(r16.update().dense(), d16, rtol=0, atol=1e-6)
        expected = _cos64(d4, d16)
        assert abs(expected) > 0.1
        assert update_cosine(r4.update(), r16.update()) == pytest.approx(expected, rel=1e-5)
        assert update_norm(r16.update()) == pytest.approx(float(d16.double().norm()), rel=1e-5)


# -- 2. non-zero initialisation -------------------------------------------------------------


def test_nonzero_init_update_is_relative_to_the_initial_factors():
    torch.manual_seed(2)
    a0, b0 = torch.randn(6, 30), torch.randn(25, 6)
    a, b = a0 + 0.1 * torch.randn(6, 30), b0 + 0.1 * torch.randn(25, 6)
    scale = 0.75
    u = LowRankUpdate(a, b, scale, A0=a0, B0=b0)
    expected = scale * (b.double() @ a.double() - b0.double() @ a0.double())
    torch.testing.assert_close(u.dense().double(), expected, rtol=1e-5, atol=1e-6)
    assert update_norm(u) == pytest.approx(float(expected.norm()), rel=1e-4)
    # Unchanged factors: no update at all.
    still = LowRankUpdate(a0, b0, scale, A0=a0, B0=b0)
    assert float(still.dense().abs().max()) < 1e-5
    assert update_norm(still) < 1e-3


# -- 3. gradient sketches against autograd ------------------------------------------------


OUT, IN, K = 20, 24, 8


class _LinearThenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _layer(kind: str) -> tuple[nn.Module, nn.Parameter]:
    """(module to hook, the full weight whose autograd gradient is the reference)."""
    torch.manual_seed(3)
    if kind == "linear":
        module = nn.Linear(IN, OUT)
        weight = module.weight
    else:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
        peft_model = get_peft_model(_LinearThenHead(), config)
        module = peft_model.base_model.model.proj
        weight = module.base_layer.weight
    weight.requires_grad_(True)
    return module, weight


def _loss(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = module(x)
    return (torch.tanh(h) ** 2).sum() + 0.3 * torch.sin(h[..., :5]).pow(3).sum()


def _inputs(seed: int) -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(seed))


def _reference(grad: torch.Tensor) -> torch.Tensor:
    p = projection("out", "layer", OUT, K).double()
    q = projection("in", "layer", IN, K).double()
    return (p @ grad.double() @ q.T).float()


def _sketcher(module: nn.Module, on_error=None) -> GradientSketcher:
    sketcher = GradientSketcher({"layer": module}, {"layer": (OUT, IN)}, size=K, on_error=on_error)
    sketcher.attach()
    return sketcher


@pytest.mark.parametrize("kind", ["linear", "peft_lora"])
def test_gradient_sketch_equals_sketch_of_autograd_gradient(kind):
    module, weight = _layer(kind)
    sketcher = _sketcher(module)
    assert sketcher.attached
    _loss(module, _inputs(10)).backward()
    assert sketcher.end_step() is True
    assert sketcher.steps == 1
    sketch = sketcher.mean()["layer"]
    assert sketch.shape == (K, K)
    assert float(weight.grad.norm()) > 0
    torch.testing.assert_close(sketch, _reference(weight.grad), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "peft_lora"])
def test_gradient_sketch_sums_micro_batches_and_averages_steps(kind):
    module, weight = _layer(kind)
    sketcher = _sketcher(module)

    # Step 1: two micro-batches accumulate into one step (autograd sums the grads too).
    _loss(module, _inputs(11)).backward()
    _loss(module, _inputs(12)).backward()
    assert sketcher.end_step()
    g1 = weight.grad.detach().clone()
    torch.testing.assert_close(sketcher.mean()["layer"], _reference(g1), rtol=1e-4, atol=1e-6)

    # Step 2: a fresh gradient; the sketcher reports the mean over the two steps.
    weight.grad = None
    _loss(module, _inputs(13)).backward()
    assert sketcher.end_step()
    g2 = weight.grad.detach().clone()
    assert sketcher.steps == 2
    torch.testing.assert_close(
        sketcher.mean()["layer"], _reference((g1 + g2) / 2), rtol=1e-4, atol=1e-6
    )


def test_gradient_sketch_end_step_divides_out_the_loss_scale():
    module, weight = _layer("linear")
    sketcher = _sketcher(module)
    (4.0 * _loss(module, _inputs(14))).backward()
    assert sketcher.end_step(scale=4.0)
    torch.testing.assert_close(
        sketcher.mean()["layer"], _reference(weight.grad / 4.0), rtol=1e-4, atol=1e-6
    )


def test_gradient_sketcher_is_quiet_without_grad_and_after_detach():
    module, _ = _layer("linear")
    sketcher = _sketcher(module)
    with torch.no_grad():
        module(_inputs(15))
    assert sketcher.end_step() is False  # nothing recorded: not a step
    sketcher.detach()
    assert not sketcher.attached
    _loss(module, _inputs(16)).backward()
    assert sketcher.end_step() is False
    assert sketcher.mean() == {}


@pytest.mark.parametrize("failing_family", ["in", "out"], ids=["forward_hook", "grad_hook"])
def test_gradient_hook_error_never_escapes_backward(monkeypatch, failing_family):
    module, weight = _layer("linear")
    errors: list[BaseException] = []
    sketcher = _sketcher(module, on_error=errors.append)
    real_projection = gradient_module.projection

    def broken(family, *args, **kwargs):
        if family == failing_family:
            raise RuntimeError("boom")
        return real_projection(family, *args, **kwargs)

    monkeypatch.setattr(gradient_module, "projection", broken)
    _loss(module, _inputs(17)).backward()  # must not raise
    _loss(module, _inputs(18)).backward()  # the sketcher has gone quiet: no second report
    assert sketcher.failed is True
    assert len(errors) == 1 and str(errors[0]) == "boom"
    assert float(weight.grad.norm()) > 0  # the user's backward pass completed
    assert sketcher.end_step() is False
    assert sketcher.mean() == {}


# -- 4. linear CKA against a numpy reference ---------------------------------------------


def _cka_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Feature-space linear CKA: ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on column-centred X, Y."""
    x = x - x.mean(axis=0, keepdims=True)
    y = y - y.mean(axis=0, keepdims=True)
    return float(
        np.linalg.norm(y.T @ x, "fro") ** 2
        / (np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro"))
    )


def test_linear_cka_equals_numpy_reference_and_invariances():
    rng = np.random.default_rng(0)
    n, d1, d2 = 30, 16, 50
    x = rng.normal(size=(n, d1))
    y = x @ rng.normal(size=(d1, d2)) + 2.0 * rng.normal(size=(n, d2)) + 5.0  # offset: centring
    expected = _cka_numpy(x, y)
    assert 0.05 < expected < 0.95  # a non-trivial case
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-9)
    # float32 inputs agree too (the library works in float64 internally)
    assert linear_cka(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == pytest.approx(
        expected, rel=1e-5
    )

    yt = torch.from_numpy(y)
    assert linear_cka(yt, yt) == pytest.approx(1.0, abs=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(d2, d2)))
    rotated = torch.from_numpy(3.7 * y @ q)
    assert linear_cka(yt, rotated) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(torch.from_numpy(x), rotated) == pytest.approx(expected, rel=1e-9)


def test_linear_cka_is_in_unit_interval_and_checks_rows():
    rng = np.random.default_rng(1)
    for trial in range(10):
        x = rng.normal(size=(12, 3 + trial))
        y = rng.normal(size=(12, 40 - 3 * trial)) * rng.uniform(0.01, 100)
        value = linear_cka(torch.from_numpy(x), torch.from_numpy(y))
        assert 0.0 <= value <= 1.0 + 1e-12
        assert value == pytest.approx(_cka_numpy(x, y), rel=1e-9)
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(torch.zeros(3, 2), torch.zeros(4, 2))


# -- 5. sketched cosines and norms track the exact ones -------------------------------------


def _random_update_pairs(seed: int, n: int = 40):
    """(layer name, u, v, target cosine) with the true cosine spread over [-0.9, 0.9].

    v = c·ΔW_u/‖ΔW_u‖ + √(1−c²)·ΔW_new/‖ΔW_new‖ written as one low-rank update with stacked
    factors [B_u·c', B_new·s'] and [A_u; A_new], so its rank is r_u + r_new.
    """
    g = torch.Generator().manual_seed(seed)
    shapes, ranks = [(384, 384), (384, 1536)], [4, 8, 16]
    pairs = []
    for i in range(n):
        out_dim, in_dim = shapes[i % 2]
        r1, r2 = ranks[i % 3], ranks[(i // 3) % 3]
        c = -0.9 + 1.8 * i / (n - 1)
        a1 = torch.randn(r1, in_dim, generator=g, dtype=torch.float64)
        b1 = torch.randn(out_dim, r1, generator=g, dtype=torch.float64)
        a_new = torch.randn(r2, in_dim, generator=g, dtype=torch.float64)
        b_new = torch.randn(out_dim, r2, generator=g, dtype=torch.float64)
        n1, n_new = (b1 @ a1).norm(), (b_new @ a_new).norm()
        b2 = torch.cat([b1 * (c / n1), b_new * (math.sqrt(1 - c * c) / n_new)], dim=1)
        a2 = torch.cat([a1, a_new])
        u = LowRankUpdate(a1.float(), b1.float(), 0.5)
        v = LowRankUpdate(a2.float(), b2.float(), 2.0)
        pairs.append((f"encoder.layer.{i}.proj", u, v, c))
    return pairs


def _sketch_errors(seed: int, size: int = 32):
    cos_err, norm_ratio, exact_cos = [], [], []
    for layer, u, v, _ in _random_update_pairs(seed):
        du, dv = _dense64(u), _dense64(v)
        exact = _cos64(du, dv)
        su, sv = sketch_update(u, layer, size), sketch_update(v, layer, size)
        assert su.shape == sv.shape == (size, size)
        cos_err.append(abs(_cos64(su, sv) - exact))
        norm_ratio += [float(su.double().norm() / du.norm()), float(sv.double().norm() / dv.norm())]
        exact_cos.append(exact)
    return np.array(cos_err), np.array(norm_ratio), np.array(exact_cos)


def test_sketch_cosines_track_exact_cosines():
    """k = 32 sketches of 40 random low-rank pairs (ranks 4/8/16, 384×384 and 384×1536).

    Tolerance: max |sketch cos − exact cos| < 0.2 and mean < 0.06.
    Measured with this seed: max 0.090, mean 0.034; over seeds 0..49 of the same construction
    the worst max was 0.173 and the worst per-seed mean 0.037 (median 0.030).
    """
    err, _, exact = _sketch_errors(seed=0)
    assert exact.min() < -0.8 and exact.max() > 0.8  # the true cosines do span the range
    assert err.max() < 0.2
    assert err.mean() < 0.06


def test_sketch_norm_estimates_exact_norm():
    """‖P ΔW Qᵀ‖_F / ‖ΔW‖_F for the same 80 updates, k = 32.

    Tolerance: every ratio in [0.65, 1.35] and their mean within 0.05 of 1 (unbiased in the
    square). Measured with this seed: range [0.810, 1.155], mean 1.007; over seeds 0..49 the
    range was [0.737, 1.290] and the mean stayed in [0.978, 1.019].
    """
    _, ratio, _ = _sketch_errors(seed=0)
    assert ratio.min() > 0.65 and ratio.max() < 1.35
    assert abs(ratio.mean() - 1.0) < 0.05


# -- 6. projections --------------------------------------------------------------------------


def test_projections_are_deterministic_and_seeded_by_layer_name():
    first = projection("out", "encoder.layer.0.query", 64, 16).clone()
    torch.manual_seed(12345)  # the global RNG must play no part
    _gaussian_cpu.cache_clear()  # recompute rather than return the cached tensor
    again = projection("out", "encoder.layer.0.query", 64, 16)
    assert first.shape == (16, 64) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, projection("out", "encoder.layer.1.query", 64, 16))
    assert not torch.equal(first, projection("in", "encoder.layer.0.query", 64, 16))
    # entries are N(0, 1/size): the variance is about 1/16
    assert float(first.var()) == pytest.approx(1 / 16, rel=0.25)


# -- 7. pairwise signals on hand-built signatures ------------------------------------------


def _metadata(layers, drift_layers, ranks, anchor_hash="anchor-1"):
    return {
        "base_model": {
            "name_or_path": "tiny-base",
            "model_type": "bert",
            "architecture_fingerprint": "arch0000",
            "weights_fingerprint": "weights0000",
        },
        "adapter": {"ranks": list(ranks), "alphas": [8.0] * len(ranks)},
        "layers": list(layers),
        "layer_shapes": [[8, 8]] * len(layers),
        "drift_layers": list(drift_layers),
        "anchor": {"hash": anchor_hash, "source": "inputs", "n": 10},
        "sketch": {"update": 8, "entries": 16, "drift": 6},
    }


def _hand_signatures():
    g = torch.Generator().manual_seed(7)
    sketches = torch.randn(4, 8, 8, generator=g)
    entries = torch.randn(4, 16, generator=g)
    drift = torch.randn(2, 10, 6, generator=g)
    a = Signature(
        "a",
        _metadata(["l0", "l1", "l2", "l3"], [1, 2], [4, 8, 4, 4]),
        probes=[
            Probe(
                step=10,
                fraction=0.5,
                kind="probe",
                tensors={
                    "update_sketch": sketches,
                    "update_norm": torch.tensor([3.0, 4.0, 12.0, 100.0]),
                    "update_entries": entries,
                    "drift_sketch": drift,
                    "drift_norm": torch.tensor([1.0, 2.0]),
                    "cka": torch.tensor([0.9, 0.8]),
                },
            )
        ],
    )
    # b shares l0..l2 (in another order), lacks l3, and has no drift family at all.
    order = [2, 0, 1]
    b = Signature(
        "b",
        _metadata(["l2", "l0", "l1"], [], [16, 16, 16]),
        probes=[
            Probe(
                step=20,
                fraction=1.0,
                kind="final",
                tensors={
                    "update_sketch": 2.5 * sketches[order],
                    "update_norm": torch.tensor([5.0, 6.0, 8.0]),
                    "update_entries": -entries[order],
                },
            )
        ],
    )
    return a, b


def test_pairwise_signals_on_hand_built_signatures():
    a, b = _hand_signatures()
    s = pairwise_signals(a, b)
    assert s["fraction_self"] == 0.5 and s["fraction_other"] == 1.0
    assert s["shared_layers"] == 3.0
    assert s["layer_coverage"] == pytest.approx(3 / 4)
    # Shared layers l0, l1, l2: a's norms (3, 4, 12) -> 13; b's (6, 8, 5) in a's order -> √125.
    assert s["update_norm_ratio"] == pytest.approx(math.sqrt(125) / 13, rel=1e-6)
    # b's sketches are 2.5 × a's, layer by layer: every cosine is 1.
    assert s["update_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert s["update_cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert s["update_conflict_fraction"] == 0.0
    assert s["update_sign_agreement"] == 0.0  # b's entries are a's negated
    # Families a signature lacks stay missing (NaN), never 0.
    for key in ("grad_cosine", "grad_conflict_fraction", "grad_norm_ratio"):
        assert math.isnan(s[key]), key
    for key in ("drift_cosine", "drift_norm_ratio", "interference_ratio", "cka_self"):
        assert math.isnan(s[key]), key


def test_pairwise_signals_of_a_signature_with_itself():
    a, _ = _hand_signatures()
    s = pairwise_signals(a, a)
    assert s["update_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert s["update_norm_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert s["update_sign_agreement"] == 1.0
    assert s["drift_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert s["drift_norm_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert s["cka_self"] == s["cka_other"] == pytest.approx(0.85)
    # ‖D P‖/‖D‖ with P spanning ≥ 90% of D's own energy: in [√0.9, 1].
    assert math.sqrt(0.9) - 1e-6 < s["interference_ratio"] <= 1.0 + 1e-9
    assert math.isnan(s["grad_cosine"])
