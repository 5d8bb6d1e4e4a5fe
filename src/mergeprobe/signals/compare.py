"""Pairwise signals between two signatures, in the direction "i merged with j".

Every value is comparable across ranks, alphas, seeds and initialisations because it is
computed from the fixed-size, layer-seeded sketches and exact norms. A family that either
signature lacks gives NaN (missing), never 0.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from ..exceptions import IncompatibleSignatureError
from ..signature import Probe, Signature, check_compatible
from .labels import label_room

NAN = float("nan")


def _shared(a: Signature, b: Signature) -> tuple[list[int], list[int], list[str]]:
    index_b = {name: i for i, name in enumerate(b.layers)}
    rows_a, rows_b, names = [], [], []
    for i, name in enumerate(a.layers):
        if name in index_b:
            rows_a.append(i)
            rows_b.append(index_b[name])
            names.append(name)
    return rows_a, rows_b, names


def _cosines(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-row cosines and the global cosine of two (rows, ...) stacks (NaN rows dropped)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    ok = torch.isfinite(x).all(1) & torch.isfinite(y).all(1)
    x, y = x[ok], y[ok]
    if x.shape[0] == 0:
        return torch.empty(0), NAN
    dots = (x * y).sum(1)
    nx, ny = x.norm(dim=1), y.norm(dim=1)
    per_row = dots / (nx * ny).clamp_min(1e-30)
    denom = float(nx.square().sum().sqrt() * ny.square().sum().sqrt())
    return per_row, float(dots.sum()) / denom if denom > 0 else NAN


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    """‖num‖ / ‖den‖ over the layers both have (norms combined as one vector)."""
    ok = torch.isfinite(num) & torch.isfinite(den)
    n = float(num[ok].double().square().sum().sqrt())
    d = float(den[ok].double().square().sum().sqrt())
    return n / d if d > 0 else NAN


def _sign_agreement(x: torch.Tensor, y: torch.Tensor, top: float = 0.2) -> float:
    """TIES-style: among sampled entries in both updates' top-``top`` by magnitude, the
    fraction whose signs agree."""
    agree = total = 0
    for row_x, row_y in zip(x, y, strict=True):
        k = max(1, int(round(top * row_x.numel())))
        big_x = torch.zeros_like(row_x, dtype=torch.bool)
        big_y = torch.zeros_like(row_y, dtype=torch.bool)
        big_x[row_x.abs().topk(k).indices] = True
        big_y[row_y.abs().topk(k).indices] = True
        both = big_x & big_y & (row_x != 0) & (row_y != 0)
        agree += int((torch.sign(row_x[both]) == torch.sign(row_y[both])).sum())
        total += int(both.sum())
    return agree / total if total else NAN


_SIDES = {"output": 0, "input": 1}
# The subspace signals and the side of the update sketches each compares. Input: adapters
# trained with the same seed share most of their LoRA A rows (the task head's initialisation
# shifts the random stream by whole rows), so their updates read the same input directions.
_SUBSPACE_SIGNALS = {"update_subspace_excess": "output", "update_input_subspace_excess": "input"}


def _subspace_bases(
    sketches: torch.Tensor, ranks: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per layer, orthonormal bases (k × r) of a sketch's top-r column space (what the update
    writes, B's side) and row space (the input directions it reads, A's side), from one
    decomposition; ``None`` where the layer has no subspace (no update, rank 0, or values
    that are not finite)."""
    sketches = sketches.double()
    k = sketches.shape[-2]
    flat = sketches.flatten(1)
    valid = torch.isfinite(flat).all(1) & (flat.abs().sum(1) > 0)
    valid &= torch.tensor([r > 0 for r in ranks], dtype=torch.bool)
    bases: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(ranks)
    if valid.any():
        chosen = torch.nonzero(valid).flatten().tolist()
        # one batched decomposition: the callback reads every partner's at its horizon
        u, _, vh = torch.linalg.svd(sketches[valid], full_matrices=False)
        for b, i in enumerate(chosen):
            rank = min(ranks[i], k)
            bases[i] = (u[b, :, :rank], vh[b, :rank].T)
    return bases


def _excess(bases_x: list, bases_y: list, side: str) -> float:
    """Mean over layers of two sketches' overlap above its chance level, on ``side``
    (``"output"``: column spaces, ``"input"``: row spaces): overlap = ‖U_xᵀ U_y‖²_F /
    min(r_x, r_y); two random subspaces of R^k overlap by max(r_x, r_y) / k on average."""
    values = []
    for x, y in zip(bases_x, bases_y, strict=True):
        if x is None or y is None:
            continue
        ux, uy = x[_SIDES[side]], y[_SIDES[side]]
        (k, rx), ry = ux.shape, uy.shape[1]
        overlap = float((ux.T @ uy).square().sum()) / min(rx, ry)
        values.append(overlap - max(rx, ry) / k)
    return sum(values) / len(values) if values else NAN


def shared_input_directions(a: Signature, partners: Collection[Signature]) -> dict[str, float]:
    """``update_input_subspace_excess`` of ``a`` with each compatible partner (every signature
    at its last probe; partners without update sketches left out), with ``a``'s bases
    decomposed once: what the callback reads to tell a run that it shares its LoRA
    initialisation (the same seed) with a partner."""
    pa = a.probe(None)
    if "update_sketch" not in pa.tensors:
        return {}
    ranks = a.metadata["adapter"]["ranks"]
    bases_a = _subspace_bases(pa.tensors["update_sketch"], ranks)
    out = {}
    for b in partners:
        try:
            check_compatible(a, b)
        except IncompatibleSignatureError:
            continue
        pb = b.probe(None)
        rows_a, rows_b, names = _shared(a, b)
        if not names or "update_sketch" not in pb.tensors:
            continue
        ranks_b = [b.metadata["adapter"]["ranks"][i] for i in rows_b]
        bases_b = _subspace_bases(pb.tensors["update_sketch"][rows_b], ranks_b)
        out[b.name] = _excess([bases_a[i] for i in rows_a], bases_b, "input")
    return out


def _interference(d_self: torch.Tensor, d_other: torch.Tensor, energy: float = 0.9) -> float:
    """‖drift_other projected on self's region‖ / ‖drift_self‖, summed over layers.

    Self's region is the span of the right singular vectors that carry ``energy`` of its
    drift: the directions of hidden space that self's adapter moves.
    """
    num = den = 0.0
    for ds, do in zip(d_self, d_other, strict=True):
        ds, do = ds.double(), do.double()
        den_l = float(ds.square().sum())
        if den_l <= 0:
            continue
        _, s, vh = torch.linalg.svd(ds, full_matrices=False)
        cumulative = (s.square().cumsum(0) / s.square().sum()).tolist()
        q = next((i + 1 for i, c in enumerate(cumulative) if c >= energy), len(cumulative))
        num += float((do @ vh[:q].T).square().sum())
        den += den_l
    return math.sqrt(num / den) if den > 0 else NAN


HEAD_KEYS = ("head_input", "head_input_drift", "head_weight", "head_bias")
HEAD_SIGNALS = ("head_flip", "head_kl", "head_logit_shift")


def _head_signals(own: dict[str, torch.Tensor], partner: dict[str, torch.Tensor]) -> dict:
    """The partner's drift at the head input, read through ``own``'s task head on the anchors.

    ``head_flip``: fraction of anchors whose predicted class changes; ``head_kl``: mean
    ``KL(p_alone ‖ p_merged)`` of own's class distributions before and after adding the
    partner's drift;
    ``head_logit_shift``: ‖partner drift · Wᵀ‖ / ‖own drift · Wᵀ‖ with W centred over classes
    (softmax sees only differences of logits). NaN when the shapes differ.
    """
    other = partner["head_input_drift"]
    if other.shape != own["head_input"].shape or own["head_weight"].shape[1] != other.shape[1]:
        return dict.fromkeys(HEAD_SIGNALS, NAN)
    values = _read_through_head(own, other.double()[None])
    return {name: float(v[0]) for name, v in values.items()}


def _read_through_head(own: dict[str, torch.Tensor], drifts: torch.Tensor) -> dict:
    """``_head_signals`` of ``own`` against each of ``drifts`` (partners, anchors, hidden)."""
    x, drift = own["head_input"].double(), own["head_input_drift"].double()
    w, b = own["head_weight"].double(), own["head_bias"].double()
    alone = x @ w.T + b  # (anchors, classes)
    merged = alone[None] + drifts @ w.T  # (partners, anchors, classes)
    log_p = torch.log_softmax(alone, dim=1)[None]
    log_q = torch.log_softmax(merged, dim=2)
    centred = w - w.mean(0, keepdim=True)
    own_shift = float(torch.linalg.norm(drift @ centred.T))
    shifts = (drifts @ centred.T).flatten(1).norm(dim=1)
    return {
        "head_flip": (alone.argmax(1)[None] != merged.argmax(2)).double().mean(1),
        "head_kl": (log_p.exp() * (log_p - log_q)).sum(2).mean(1),
        "head_logit_shift": shifts / own_shift if own_shift > 0 else torch.full_like(shifts, NAN),
    }


# Signals that cost a decomposition or a top-k per layer; the rest are dot products and norms.
EXPENSIVE = frozenset(
    {
        "update_sign_agreement",
        "update_subspace_excess",
        "update_input_subspace_excess",
        "interference_ratio",
        "interference_ratio_last",
        "head_interference",
        "head_interference_room",
    }
)


def pairwise_signals(
    a: Signature,
    b: Signature,
    probe_a: Probe | float | None = None,
    probe_b: Probe | float | None = None,
    *,
    only: Collection[str] | None = None,
) -> dict[str, float]:
    """Signals of ``a`` merged with ``b`` (asymmetric: ratios are partner-to-own, b over a).

    ``probe_a`` / ``probe_b`` pick the probes: a ``Probe``, a fraction (last probe at or
    before it) or ``None`` (the last probe). ``only`` names the signals needed: the costly
    ones (``EXPENSIVE``) not named are left out of the result (the cheap ones are always
    there). Raises ``IncompatibleSignatureError`` when the two were made on different base
    models, anchor sets or sketch sizes.
    """
    check_compatible(a, b)

    def wanted(name: str) -> bool:
        return only is None or name in only or name not in EXPENSIVE

    pa = probe_a if isinstance(probe_a, Probe) else a.probe(probe_a)
    pb = probe_b if isinstance(probe_b, Probe) else b.probe(probe_b)
    rows_a, rows_b, names = _shared(a, b)
    out: dict[str, float] = {
        "fraction_self": pa.fraction if pa.fraction is not None else NAN,
        "fraction_other": pb.fraction if pb.fraction is not None else NAN,
        "shared_layers": float(len(names)),
        "layer_coverage": len(names) / max(len(a.layers), 1),
        "label_room_self": label_room(a),
    }
    ta, tb = pa.tensors, pb.tensors
    ia, ib = torch.tensor(rows_a, dtype=torch.long), torch.tensor(rows_b, dtype=torch.long)

    if names and "update_sketch" in ta and "update_sketch" in tb:
        per_layer, total = _cosines(ta["update_sketch"][ia], tb["update_sketch"][ib])
        ranks_a = [a.metadata["adapter"]["ranks"][i] for i in rows_a]
        ranks_b = [b.metadata["adapter"]["ranks"][i] for i in rows_b]
        out.update(
            update_cosine=total,
            update_cosine_min=float(per_layer.min()) if per_layer.numel() else NAN,
            update_conflict_fraction=float((per_layer < 0).double().mean())
            if per_layer.numel()
            else NAN,
            update_norm_ratio=_ratio(tb["update_norm"][ib], ta["update_norm"][ia]),
            update_norm_self=float(ta["update_norm"][ia].double().square().sum().sqrt()),
            update_norm_other=float(tb["update_norm"][ib].double().square().sum().sqrt()),
        )
        if wanted("update_sign_agreement"):
            out["update_sign_agreement"] = _sign_agreement(
                ta["update_entries"][ia], tb["update_entries"][ib]
            )
        subspaces = {name: side for name, side in _SUBSPACE_SIGNALS.items() if wanted(name)}
        if subspaces:
            bases_a = _subspace_bases(ta["update_sketch"][ia], ranks_a)
            bases_b = _subspace_bases(tb["update_sketch"][ib], ranks_b)
            for name, side in subspaces.items():
                out[name] = _excess(bases_a, bases_b, side)
    else:
        out.update(
            update_cosine=NAN,
            update_cosine_min=NAN,
            update_conflict_fraction=NAN,
            update_norm_ratio=NAN,
            update_norm_self=NAN,
            update_norm_other=NAN,
            update_sign_agreement=NAN,
            update_subspace_excess=NAN,
            update_input_subspace_excess=NAN,
        )

    if names and "grad_sketch" in ta and "grad_sketch" in tb:
        per_layer, total = _cosines(ta["grad_sketch"][ia], tb["grad_sketch"][ib])
        out.update(
            grad_cosine=total,
            grad_conflict_fraction=float((per_layer < 0).double().mean())
            if per_layer.numel()
            else NAN,
            grad_norm_ratio=_ratio(tb["grad_norm"][ib], ta["grad_norm"][ia]),
        )
    else:
        out.update(grad_cosine=NAN, grad_conflict_fraction=NAN, grad_norm_ratio=NAN)

    shared_drift = [i for i in a.drift_layers if i in set(b.drift_layers)]
    if shared_drift and "drift_sketch" in ta and "drift_sketch" in tb:
        da = ta["drift_sketch"][[a.drift_layers.index(i) for i in shared_drift]]
        db = tb["drift_sketch"][[b.drift_layers.index(i) for i in shared_drift]]
        na = ta["drift_norm"][[a.drift_layers.index(i) for i in shared_drift]]
        nb = tb["drift_norm"][[b.drift_layers.index(i) for i in shared_drift]]
        _, total = _cosines(da, db)
        out.update(
            drift_cosine=total,
            drift_norm_ratio=_ratio(nb, na),
            drift_norm_self=float(na.double().square().sum().sqrt()),
            drift_norm_other=float(nb.double().square().sum().sqrt()),
            cka_self=float(ta["cka"][[a.drift_layers.index(i) for i in shared_drift]].mean()),
            cka_other=float(tb["cka"][[b.drift_layers.index(i) for i in shared_drift]].mean()),
        )
        if wanted("interference_ratio"):
            out["interference_ratio"] = _interference(da, db)
        if (
            wanted("interference_ratio_last")
            or wanted("head_interference")
            or wanted("head_interference_room")
        ):
            # The last hidden layer is what a task head reads.
            out["interference_ratio_last"] = _interference(da[-1:], db[-1:])
    else:
        out.update(
            drift_cosine=NAN,
            drift_norm_ratio=NAN,
            interference_ratio=NAN,
            interference_ratio_last=NAN,
            drift_norm_self=NAN,
            drift_norm_other=NAN,
            cka_self=NAN,
            cka_other=NAN,
        )

    if all(k in ta for k in HEAD_KEYS) and all(k in tb for k in HEAD_KEYS):
        out.update(_head_signals(ta, tb))
    else:
        out.update(dict.fromkeys(HEAD_SIGNALS, NAN))
    if wanted("head_interference") or wanted("head_interference_room"):
        # Geometric mean of how much of the partner's drift lands in own's drift region (last
        # hidden layer) and how much it moves own's predictions: both must be large to hurt.
        ratio, kl = out.get("interference_ratio_last", NAN), out["head_kl"]
        ok = ratio >= 0 and kl > -1e-12  # a KL of -1e-17 is rounding, not a signal
        out["head_interference"] = math.sqrt(ratio * max(kl, 0.0)) if ok else NAN
    if wanted("head_interference_room"):
        # NaN times anything stays NaN: no label room, no value (never a zero).
        out["head_interference_room"] = out["head_interference"] * out["label_room_self"]
    return out


# Signals ``pairwise_signal_matrices`` computes for a whole set at once (what plans need).
MATRIX_SIGNALS = frozenset(
    {
        "fraction_self",
        "fraction_other",
        "update_norm_self",
        "update_norm_other",
        "update_norm_ratio",
        "drift_norm_self",
        "drift_norm_other",
        "drift_norm_ratio",
        "drift_cosine",
        "interference_ratio",
        "interference_ratio_last",
        "cka_self",
        "cka_other",
        "head_flip",
        "head_kl",
        "head_logit_shift",
        "head_interference",
        "label_room_self",
        "head_interference_room",
    }
)


def _head_matrices(probes: list[Probe]) -> dict[str, torch.Tensor]:
    """``_head_signals`` of every ordered pair: per own head, all partners' drifts at once."""
    n = len(probes)
    out = {k: torch.full((n, n), NAN, dtype=torch.float64) for k in HEAD_SIGNALS}
    have = [all(k in p.tensors for k in HEAD_KEYS) for p in probes]
    shapes = {
        tuple(p.tensors["head_input_drift"].shape) for p, h in zip(probes, have, strict=True) if h
    }
    for shape in sorted(shapes):
        members = [
            k
            for k, (p, h) in enumerate(zip(probes, have, strict=True))
            if h and tuple(p.tensors["head_input_drift"].shape) == shape
        ]
        columns = torch.tensor(members, dtype=torch.long)
        drifts = torch.stack([probes[k].tensors["head_input_drift"].double() for k in members])
        for i in members:
            t = probes[i].tensors
            if t["head_input"].shape != shape or t["head_weight"].shape[1] != shape[1]:
                continue
            for name, values in _read_through_head(t, drifts).items():
                out[name][i, columns] = values
    return out


def compatibility_matrix(signatures: list[Signature]) -> torch.Tensor:
    """(n, n) bool: ``check_compatible`` passes for the pair (diagonal included).

    Decided once per distinct metadata combination, not per pair: a thousand signatures
    usually share a handful."""
    import json

    def key(signature: Signature) -> str:
        meta = signature.metadata
        base = meta.get("base_model") or {}
        return json.dumps(
            [
                base.get("architecture_fingerprint"),
                base.get("weights_fingerprint"),
                meta.get("anchor") or {},
                meta.get("sketch", {}),
            ],
            sort_keys=True,
            default=str,
        )

    keys = [key(s) for s in signatures]
    distinct = sorted(set(keys))
    first = {k: signatures[keys.index(k)] for k in distinct}
    ok = torch.zeros((len(distinct), len(distinct)), dtype=torch.bool)
    for i, a in enumerate(distinct):
        for j, b in enumerate(distinct):
            try:
                check_compatible(first[a], first[b])
                ok[i, j] = True
            except IncompatibleSignatureError:
                pass
    codes = torch.tensor([distinct.index(k) for k in keys], dtype=torch.long)
    return ok[codes][:, codes]


def _stack(rows: list, keys: list, shape: tuple[int, ...]):
    """(n, len(keys), *shape) float64 values and (n, len(keys)) mask of finite entries, from
    rows ``(row_keys, tensor)`` (``None`` for a row without this family)."""
    n = len(rows)
    values = torch.zeros((n, len(keys), *shape), dtype=torch.float64)
    mask = torch.zeros((n, len(keys)), dtype=torch.float64)
    index = {k: i for i, k in enumerate(keys)}
    for r, row in enumerate(rows):
        if row is None:
            continue
        row_keys, tensor = row
        positions = torch.tensor([index[k] for k in row_keys], dtype=torch.long)
        tensor = tensor.double()
        finite = torch.isfinite(tensor.reshape(len(row_keys), -1)).all(1)
        values[r, positions] = torch.where(
            finite.view(-1, *([1] * len(shape))), tensor, torch.zeros_like(tensor)
        )
        mask[r, positions] = finite.double()
    return values, mask


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, NAN))


def pairwise_signal_matrices(
    signatures: list[Signature],
    fraction: float | None = None,
    *,
    only: Collection[str] | None = None,
    energy: float = 0.9,
) -> dict[str, torch.Tensor]:
    """``MATRIX_SIGNALS`` of every ordered pair at once: ``out[name][i, j]`` is the value of
    ``pairwise_signals(signatures[i], signatures[j], fraction, fraction)[name]``.

    Norms, cosines and the interference ratio reduce to matrix products over the union of
    layers (``‖drift_j P_i‖² = <P_i, drift_jᵀ drift_j>`` with ``P_i`` the projector on i's drift
    region), so a thousand signatures take seconds instead of hours of pairwise loops.
    Incompatible pairs (``compatibility_key``) and the diagonal are NaN.
    """
    names = sorted(MATRIX_SIGNALS if only is None else set(only) & MATRIX_SIGNALS)
    n = len(signatures)
    probes = [s.probe(fraction) for s in signatures]
    out: dict[str, torch.Tensor] = {}
    frac = torch.tensor(
        [p.fraction if p.fraction is not None else NAN for p in probes], dtype=torch.float64
    )
    out["fraction_self"] = frac[:, None].expand(n, n).clone()
    out["fraction_other"] = frac[None, :].expand(n, n).clone()

    # update norms over the shared LoRA layers
    rows = [
        (s.layers, p.tensors["update_norm"])
        if "update_norm" in p.tensors and "update_sketch" in p.tensors
        else None
        for s, p in zip(signatures, probes, strict=True)
    ]
    layers = sorted({k for row in rows if row is not None for k in row[0]})
    norms, mask = _stack(rows, layers, ())
    shared = mask @ mask.T
    self_sq = (norms.square() * mask) @ mask.T
    nan = torch.full((n, n), NAN, dtype=torch.float64)
    out["update_norm_self"] = torch.where(shared > 0, self_sq.sqrt(), nan)
    out["update_norm_other"] = out["update_norm_self"].T.clone()
    out["update_norm_ratio"] = _safe_div(out["update_norm_other"], out["update_norm_self"])

    # drift over the shared probed hidden layers
    drift_rows, sketch_rows, cka_rows = [], [], []
    for s, p in zip(signatures, probes, strict=True):
        t = p.tensors
        if all(k in t for k in DRIFT_MATRIX_KEYS):
            drift_rows.append((s.drift_layers, t["drift_norm"]))
            sketch_rows.append((s.drift_layers, t["drift_sketch"]))
            cka_rows.append((s.drift_layers, t["cka"]))
        else:
            drift_rows.append(None), sketch_rows.append(None), cka_rows.append(None)
    drift_layers = sorted({k for row in drift_rows if row is not None for k in row[0]})
    shapes = {tuple(row[1].shape[1:]) for row in sketch_rows if row is not None}
    dnorm, dmask = _stack(drift_rows, drift_layers, ())
    cka, _ = _stack(cka_rows, drift_layers, ())
    dshared = dmask @ dmask.T
    dself = (dnorm.square() * dmask) @ dmask.T
    out["drift_norm_self"] = torch.where(dshared > 0, dself.sqrt(), nan)
    out["drift_norm_other"] = out["drift_norm_self"].T.clone()
    out["drift_norm_ratio"] = _safe_div(out["drift_norm_other"], out["drift_norm_self"])
    cka_sum = (cka * dmask) @ dmask.T
    out["cka_self"] = torch.where(dshared > 0, cka_sum / dshared.clamp_min(1), nan)
    out["cka_other"] = out["cka_self"].T.clone()
    interference = {"interference_ratio", "interference_ratio_last"} & set(names)
    head = {"head_interference", "head_interference_room"} & set(names)
    if head:
        interference.add("interference_ratio_last")
    if shapes and (interference or "drift_cosine" in names):
        # One hidden layer (and sketch shape: other shapes are other anchor sets, never
        # compared) at a time: memory stays O(n · anchors · sketch).
        dots = torch.zeros((n, n), dtype=torch.float64)
        num = torch.zeros((n, n), dtype=torch.float64)
        self_energy = torch.zeros((n, n), dtype=torch.float64)
        # the last hidden layer both signatures probed (layers ascend, so the last write wins)
        last_num = torch.zeros((n, n), dtype=torch.float64)
        last_self = torch.zeros((n, n), dtype=torch.float64)
        for layer, shape in ((layer, shape) for layer in drift_layers for shape in sorted(shapes)):
            sketch, present = _stack(
                [
                    ([0], r[1][r[0].index(layer)][None])
                    if r is not None and layer in r[0] and tuple(r[1].shape[1:]) == shape
                    else None
                    for r in sketch_rows
                ],
                [0],
                shape,
            )
            sketch, present = sketch[:, 0], present[:, 0]  # (n, anchors, k), (n,)
            flat = sketch.flatten(1) * present[:, None]
            both = present[:, None] * present[None, :]
            layer_self = flat.square().sum(1)[:, None] * both
            self_energy += layer_self
            if "drift_cosine" in names:
                dots += flat @ flat.T
            if interference:
                gram = sketch.transpose(-1, -2) @ sketch  # (n, k, k): Dᵀ D
                evals, evecs = torch.linalg.eigh(gram)  # ascending
                evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
                total = evals.sum(-1, keepdim=True)
                share = evals / total.clamp_min(1e-300)
                # the directions up to and including the first that reaches ``energy``
                keep = ((share.cumsum(-1) - share) < energy - 1e-12) & (total > 0)
                projector = (evecs * keep[:, None, :].double()) @ evecs.transpose(-1, -2)
                layer_num = (projector.flatten(1) * present[:, None]) @ (
                    gram.flatten(1) * present[:, None]
                ).T
                num += layer_num
                last_num = torch.where(both > 0, layer_num, last_num)
                last_self = torch.where(both > 0, layer_self, last_self)
        if "drift_cosine" in names:
            out["drift_cosine"] = _safe_div(dots, (self_energy * self_energy.T).sqrt())
        if "interference_ratio" in names:
            out["interference_ratio"] = _safe_div(num, self_energy).sqrt()
        if "interference_ratio_last" in interference:
            out["interference_ratio_last"] = _safe_div(last_num, last_self).sqrt()
    for name in ("drift_cosine", "interference_ratio", "interference_ratio_last"):
        out.setdefault(name, nan.clone())

    if set(HEAD_SIGNALS) & set(names) or head:
        out.update(_head_matrices(probes))
        if head:
            ratio, kl = out["interference_ratio_last"], out["head_kl"]
            ok = (ratio >= 0) & (kl > -1e-12)
            out["head_interference"] = torch.where(ok, (ratio * kl.clamp_min(0)).sqrt(), nan)
    room = torch.tensor([label_room(s) for s in signatures], dtype=torch.float64)
    out["label_room_self"] = room[:, None].expand(n, n).clone()
    if "head_interference_room" in names:
        out["head_interference_room"] = out["head_interference"] * out["label_room_self"]

    # incompatible pairs and the diagonal are not comparisons
    invalid = ~compatibility_matrix(signatures) | torch.eye(n, dtype=torch.bool)
    return {k: torch.where(invalid, nan, out[k]) for k in names}


DRIFT_MATRIX_KEYS = ("drift_sketch", "drift_norm", "cka")
