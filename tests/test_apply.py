"""Carrying out plans: merged PEFT adapters that reload with the right logits, identities
that catch PEFT's known merge bugs (rsLoRA, mixed ranks, rank_pattern), and apply_plan's
all-or-nothing output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, BertModel

from mergeprobe import InvalidParameterError
from mergeprobe.merge import (
    apply_plan,
    load_served_model,
    merge_adapters,
    merge_deltas,
    read_adapter,
    save_merged_adapter,
)
from mergeprobe.policy import PLAN_SCHEMA

HIDDEN = 32


def _base_dir(tmp_path, hidden=HIDDEN):
    path = tmp_path / f"base{hidden}"
    if not path.exists():
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=50,
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
        )
        BertModel(config).save_pretrained(path)  # a bare encoder, as real bases are
    return path


def _adapter(tmp_path, name, *, seed, num_labels=3, hidden=HIDDEN, **lora):
    """A saved SEQ_CLS LoRA adapter with random (non-zero) A and B and a trained-looking head."""
    base = BertForSequenceClassification.from_pretrained(
        _base_dir(tmp_path, hidden=hidden), num_labels=num_labels
    )
    torch.manual_seed(seed)
    config = LoraConfig(
        task_type="SEQ_CLS",
        init_lora_weights=False,  # B random too: ΔW != 0
        **{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], **lora},
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(0.3)
            elif "classifier" in n and "modules_to_save" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model.eval()


INPUTS = {
    "input_ids": torch.tensor([[2, 5, 9, 11, 3, 0], [2, 7, 7, 30, 41, 3]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
}


def _dense_reference(tmp_path, adapters, weights, head_of, num_labels=3):
    """The base model with W0 + Σ w_k ΔW_k written into its weights and one member's head."""
    model = BertForSequenceClassification.from_pretrained(
        _base_dir(tmp_path), num_labels=num_labels
    )
    with torch.no_grad():
        for adapter, w in zip(adapters, weights, strict=True):
            for module, (a, b, s) in adapter.factors.items():
                model.get_parameter(f"{module}.weight").add_(w * s * b @ a)
        for key, value in head_of.extras.items():
            model.get_parameter(key.removeprefix("base_model.model.")).copy_(value)
    return model.eval()


@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"layer.1.attention.self.value": 2}, "alpha_pattern": {"query": 3}},
        {"use_rslora": True, "r": 6, "rank_pattern": {"layer.0.attention.self.query": 3}},
    ],
    ids=["plain", "rslora", "rank_and_alpha_pattern", "rslora_rank_pattern"],
)
def test_one_adapter_with_weight_one_reproduces_it(tmp_path, lora):
    path, original = _adapter(tmp_path, "a", seed=1, **lora)
    adapter = read_adapter(path)
    # scales read from the files are PEFT's own
    from peft.tuners.lora import LoraLayer

    checked = 0
    for name, module in original.named_modules():
        if isinstance(module, LoraLayer):
            key = name.removeprefix("base_model.model.")
            assert adapter.factors[key][2] == pytest.approx(module.scaling["default"])
            checked += 1
    assert checked == 4
    merged = merge_adapters([adapter], "direct", [1.0])
    out = save_merged_adapter(merged, adapter, tmp_path / "merged", extras=adapter.extras)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and not config["use_rslora"]
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    reloaded = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(_base_dir(tmp_path), num_labels=3), out
    ).eval()
    head = {k.removeprefix("base_model.model."): v for k, v in adapter.extras.items()}
    reloaded.get_base_model().load_state_dict(head, strict=False)
    with torch.no_grad():
        want, got = original(**INPUTS).logits, reloaded(**INPUTS).logits
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _plan(paths, served, pruned=()):
    return {
        "schema": PLAN_SCHEMA,
        "adapters": {n: {"path": str(p)} for n, p in paths.items()},
        "served": served,
        "pruned": list(pruned),
        "base_model": None,
    }


def test_apply_writes_an_exact_merge_with_mixed_ranks_and_target_sets(tmp_path):
    pa, _ = _adapter(tmp_path, "a", seed=1, r=4, target_modules=["query", "value"])
    pb, _ = _adapter(tmp_path, "b", seed=2, r=8, target_modules=["query", "key"], num_labels=5)
    pc, original_c = _adapter(tmp_path, "c", seed=3)
    plan = _plan(
        {"a": pa, "b": pb, "c": pc},
        [
            {"name": "merged-01", "decision": "merge", "method": "direct", "members": ["a", "b"]},
            {"name": "c", "decision": "route", "method": None, "members": ["c"]},
        ],
        pruned=[{"name": "d", "served_by": "a", "reasons": ["redundant with a"]}],
    )
    manifest = apply_plan(plan, tmp_path / "served", base_model=str(_base_dir(tmp_path)))
    assert manifest["routes"]["d"] == {
        "model": "merged-01",
        "head": "merged-01/heads/a.safetensors",
        "pruned_in_favour_of": "a",
    }
    assert manifest["models"]["merged-01"]["rank"] == 12  # r_a + r_b, exact
    adapters = [read_adapter(pa), read_adapter(pb)]
    for member, head_of, labels in (("a", adapters[0], 3), ("b", adapters[1], 5)):
        served = load_served_model(tmp_path / "served", member)
        reference = _dense_reference(tmp_path, adapters, [1, 1], head_of, labels)
        with torch.no_grad():
            torch.testing.assert_close(
                served(**INPUTS).logits, reference(**INPUTS).logits, atol=1e-5, rtol=1e-5
            )
    served_c = load_served_model(tmp_path / "served", "c")
    with torch.no_grad():
        torch.testing.assert_close(served_c(**INPUTS).logits, original_c(**INPUTS).logits)
    assert (tmp_path / "served" / "mergekit" / "merged-01.yaml").is_file()
    calls = (tmp_path / "served" / "peft_merge.py").read_text()
    assert "combination_type='cat'" in calls
    compile(calls, "peft_merge.py", "exec")


def _run_peft_script(served, out):
    done = subprocess.run(
        [sys.executable, str(served / "peft_merge.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _same_updates(ours_dir, peft_dir, atol=1e-6):
    ours, peft_made = read_adapter(ours_dir), read_adapter(peft_dir)
    assert set(peft_made.factors) == set(ours.factors)
    for module in ours.factors:
        torch.testing.assert_close(
            peft_made.delta(module), ours.delta(module), atol=atol, rtol=1e-4
        )


def test_generated_peft_script_runs_and_equals_the_written_merges(tmp_path):
    """peft_merge.py, run as a user would, gives PEFT adapters with the merges apply_plan
    wrote: exact for direct and mean (cat), TIES through ties_svd at the written rank, tuned
    coefficients, rsLoRA members, dotted names, and a rank budget (svd)."""
    paths = {
        "a.v1": _adapter(tmp_path, "a", seed=1, r=4)[0],
        "b": _adapter(tmp_path, "b", seed=2, r=8, num_labels=5)[0],  # heads of other sizes
        "c": _adapter(tmp_path, "c", seed=3, r=4, use_rslora=True)[0],
        "d": _adapter(tmp_path, "d", seed=4, r=8, num_labels=2)[0],
        "e": _adapter(tmp_path, "e", seed=5, r=4)[0],
        "f": _adapter(tmp_path, "f", seed=6, r=4)[0],
    }
    plan = _plan(
        paths,
        [
            {"name": "sum.ab", "decision": "merge", "method": "direct", "members": ["a.v1", "b"]},
            {"name": "mean-cd", "decision": "reweight", "method": "mean", "members": ["c", "d"]},
            {"name": "ties-ef", "decision": "reweight", "method": "ties", "members": ["e", "f"]},
        ],
    )
    plan["served"][1]["weights"] = {"c": 0.7, "d": 0.2}  # tuned coefficients win over 1/n
    base = str(_base_dir(tmp_path))
    manifest = apply_plan(plan, tmp_path / "served", base_model=base)
    assert manifest["models"]["mean-cd"]["weights"] == {"c": 0.7, "d": 0.2}
    assert (
        "AutoModelForSequenceClassification" in (tmp_path / "served" / "peft_merge.py").read_text()
    )
    _run_peft_script(tmp_path / "served", tmp_path / "peft_out")
    for name in ("sum.ab", "mean-cd", "ties-ef"):
        _same_updates(tmp_path / "served" / name, tmp_path / "peft_out" / name)
    members = [read_adapter(paths[m]) for m in ("c", "d")]
    module = next(iter(members[0].factors))
    torch.testing.assert_close(
        read_adapter(tmp_path / "peft_out" / "mean-cd").delta(module),
        0.7 * members[0].delta(module) + 0.2 * members[1].delta(module),
        atol=1e-6,
        rtol=1e-5,
    )
    # a rank budget: PEFT's svd combination, the same best rank-3 approximation
    apply_plan(plan, tmp_path / "served-r3", base_model=base, rank=3)
    assert "svd_rank=3" in (tmp_path / "served-r3" / "peft_merge.py").read_text()
    _run_peft_script(tmp_path / "served-r3", tmp_path / "peft_out_r3")
    for name in ("sum.ab", "mean-cd"):
        assert (
            read_adapter(tmp_path / "peft_out_r3" / name).ranks
            == read_adapter(tmp_path / "served-r3" / name).ranks
        )
        _same_updates(tmp_path / "served-r3" / name, tmp_path / "peft_out_r3" / name, atol=1e-5)


def test_ties_dare_and_rank_budget_factor_the_dense_merge(tmp_path):
    adapters = [read_adapter(_adapter(tmp_path, n, seed=s)[0]) for n, s in (("a", 1), ("b", 2))]
    module = "bert.encoder.layer.0.attention.self.query"
    deltas = [{module: s * b @ a} for a, b, s in (x.factors[module] for x in adapters)]
    for method in ("ties", "dare", "mean"):
        a, b = merge_adapters(adapters, method, seed=3)[module]
        want = merge_deltas(deltas, method, seed=3)[module]
        torch.testing.assert_close(b @ a, want, atol=1e-5, rtol=1e-4)
    exact = deltas[0][module] + deltas[1][module]
    a, b = merge_adapters(adapters, "direct", rank=2)[module]
    assert a.shape[0] == 2
    u, s, vh = torch.linalg.svd(exact.double())
    best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young: the best rank-2 approximation
    torch.testing.assert_close((b @ a).double(), best, atol=1e-5, rtol=1e-4)


def test_reweighted_groups_use_their_coefficients(tmp_path):
    pa, _ = _adapter(tmp_path, "a", seed=1)
    pb, _ = _adapter(tmp_path, "b", seed=2)
    plan = _plan(
        {"a": pa, "b": pb},
        [
            {
                "name": "merged-01",
                "decision": "reweight",
                "method": "direct",
                "members": ["a", "b"],
                "weights": {"a": 0.7, "b": 0.4},
            }
        ],
    )
    apply_plan(plan, tmp_path / "served", base_model=str(_base_dir(tmp_path)))
    adapters = [read_adapter(pa), read_adapter(pb)]
    served = load_served_model(tmp_path / "served", "b")
    reference = _dense_reference(tmp_path, adapters, [0.7, 0.4], adapters[1])
    with torch.no_grad():
        torch.testing.assert_close(
            served(**INPUTS).logits, reference(**INPUTS).logits, atol=1e-5, rtol=1e-5
        )


def test_incompatible_adapters_leave_nothing_written(tmp_path):
    pa, _ = _adapter(tmp_path, "a", seed=1)
    pb, _ = _adapter(tmp_path, "wide", seed=2, hidden=48)  # another base model's shapes
    plan = _plan(
        {"a": pa, "wide": pb},
        [{"name": "m", "decision": "merge", "method": "direct", "members": ["a", "wide"]}],
    )
    with pytest.raises(InvalidParameterError, match="different shapes"):
        apply_plan(plan, tmp_path / "served")
    assert not (tmp_path / "served").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".served")]


def test_dora_and_pickled_adapters_are_refused(tmp_path):
    path, _ = _adapter(tmp_path, "dora", seed=1, use_dora=True)
    with pytest.raises(InvalidParameterError, match="DoRA"):
        read_adapter(path)
    path, model = _adapter(tmp_path, "pickled", seed=1)
    (path / "adapter_model.safetensors").unlink()
    torch.save({}, path / "adapter_model.bin")
    with pytest.raises(InvalidParameterError, match="pickle"):
        read_adapter(path)


def test_tuned_weights_turn_down_an_adapter_that_hurts_the_task(tmp_path):
    from mergeprobe.merge import tune_weights

    good_path, good = _adapter(tmp_path, "good", seed=1)
    noise_path, _ = _adapter(tmp_path, "noise", seed=2)
    noise = read_adapter(noise_path)
    for module, (a, b, s) in list(noise.factors.items()):  # a large random update
        noise.factors[module] = (a * 6, b * 6, s)
    noise.extras = {}
    good_weights = read_adapter(good_path)
    # a confident head, so the good adapter's own labels have a low loss under it
    with torch.no_grad():
        for name, p in good.named_parameters():
            if "classifier" in name and "modules_to_save" in name:
                p.mul_(20)
    good_weights.extras = {k: v * 20 for k, v in good_weights.extras.items()}
    # labels the good adapter's model gives: its task, as data
    torch.manual_seed(5)
    ids = torch.randint(4, 50, (32, 6))
    with torch.no_grad():
        labels = good(input_ids=ids).logits.argmax(-1)
    batches = [{"input_ids": ids[k : k + 16], "labels": labels[k : k + 16]} for k in (0, 16)]
    model = BertForSequenceClassification.from_pretrained(_base_dir(tmp_path), num_labels=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = tune_weights(
        model,
        {"good": good_weights, "noise": noise},
        {"good": batches, "noise": batches},
        budget=30,
        progress=True,
    )
    assert result["evaluations"] <= 30
    assert result["loss"] < result["loss_init"]
    assert result["weights"]["noise"] < 0.5  # the harmful update is turned down
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is restored


def test_dare_masks_match_merge_deltas_over_all_modules(tmp_path):
    adapters = [read_adapter(_adapter(tmp_path, n, seed=s)[0]) for n, s in (("a", 1), ("b", 2))]
    dense = [{m: s * b @ a for m, (a, b, s) in adapter.factors.items()} for adapter in adapters]
    want = merge_deltas(dense, "dare", seed=4)
    got = merge_adapters(adapters, "dare", seed=4)
    for module, (a, b) in got.items():
        torch.testing.assert_close(b @ a, want[module], atol=1e-5, rtol=1e-4)
    masks = {tuple((want[m] == 0).flatten()[:64].tolist()) for m in want if "query" in m}
    assert len(masks) > 1  # layers of one shape get different masks


def test_apply_refuses_unsafe_names_mixed_classes_and_missing_weights(tmp_path):
    pa, _ = _adapter(tmp_path, "a", seed=1)
    pb, _ = _adapter(tmp_path, "b", seed=2)
    group = {"decision": "merge", "method": "direct", "members": ["a", "b"]}
    for bad in ("../escaped", "/abs", "routing.json", "a b"):
        plan = _plan({"a": pa, "b": pb}, [{**group, "name": bad}])
        with pytest.raises(InvalidParameterError, match="safe directory name"):
            apply_plan(plan, tmp_path / "served")
    # the same layers under another model class's names (bare encoder vs task model)
    renamed = read_adapter(pb)
    renamed.factors = {k.removeprefix("bert."): v for k, v in renamed.factors.items()}
    with pytest.raises(InvalidParameterError, match="different model classes"):
        merge_adapters([read_adapter(pa), renamed])
    (pb / "adapter_model.safetensors").unlink()
    plan = _plan({"a": pa, "b": pb}, [{"name": "b", "decision": "route", "members": ["b"]}])
    with pytest.raises(InvalidParameterError, match="no adapter_model.safetensors"):
        apply_plan(plan, tmp_path / "served")
    assert not (tmp_path / "served").exists()
