"""audit.json (DESIGN.md §12) and `ray-unlearn verify`, without Ray: `ray_unlearn.train` is replaced
by a stand-in whose `fit` writes the target model's weights as the "unlearned" final checkpoint."""

import hashlib
import json
import shutil
import sys
import types
import uuid
from pathlib import Path

import pytest
import yaml

from ray_unlearn import audit
from ray_unlearn.cli import main

ITEMS = [{"question": "Wer ist é?", "answer": "b", "index": 0}, {"answer": "x y", "question": "q2"}]


@pytest.fixture
def fake_train(monkeypatch):
    fake = types.ModuleType("ray_unlearn.train")

    def fit(cfg, inputs, into):
        for f in Path(inputs.model_path).iterdir():
            if f.suffix in (".json", ".safetensors") and f.name.startswith(("config", "model", "generation")):
                shutil.copy2(f, into / f.name)
        (into / "state.json").write_text(json.dumps({"history": [{"step": 1, "loss": 1.0}]}))

    fake.fit, fake.init_ray, fake.check_resume = fit, lambda cfg: None, lambda cfg: None
    monkeypatch.setitem(sys.modules, "ray_unlearn.train", fake)
    return fake


def test_canonical_hash_by_hand():
    by_hand = ('[{"answer":"b","index":0,"question":"Wer ist é?"},{"answer":"x y","question":"q2"}]').encode("utf-8")
    assert audit.canonical_json(ITEMS) == by_hand
    assert audit.hash_items(ITEMS) == hashlib.sha256(by_hand).hexdigest()
    assert audit.hash_items(ITEMS[::-1]) != audit.hash_items(ITEMS)  # order matters


def test_sha256_file_streams_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "CHUNK", 7)
    data = bytes(range(256)) * 3
    (tmp_path / "w.bin").write_bytes(data)
    assert audit.sha256_file(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()


def fake_run(tmp_path):
    """A tiny run dir: an input model, an output model inside the run dir, and its audit.json."""
    src = tmp_path / "input-model"
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    (src / "model.safetensors").write_bytes(b"\x00" * 100)
    (src / "notes.md").write_text("not a model file")
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text('{"a": 1}')
    (run / "model" / "model.safetensors").write_bytes(b"\x01" * 100)
    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps(it) + "\n" for it in ITEMS[:1]))
    from ray_unlearn.data.loaders import load_forget_items

    items, _ = load_forget_items(forget)
    rec = audit.build_record(request_id="req-1", forget_items=items, forget_source=str(forget), input_model=str(src),
                             output_model=run / "model", run_dir=run, config={"name": "x"}, bench="CUSTOM",
                             summaries=None, started=0.0, finished=1.5)
    audit.write(run, rec)
    return run, src, rec


def test_build_record(tmp_path):
    run, src, rec = fake_run(tmp_path)
    assert rec["request_id"] == "req-1"
    assert rec["started_at"] == "1970-01-01T00:00:00+00:00" and rec["finished_at"] == "1970-01-01T00:00:01.500000+00:00"
    assert rec["input_model"]["files"] == {
        "config.json": hashlib.sha256(b'{"a": 1}').hexdigest(),
        "model.safetensors": hashlib.sha256(b"\x00" * 100).hexdigest()}  # notes.md: not a weight/config file
    assert rec["output_model"] == {"path": "model", "files": {
        "config.json": hashlib.sha256(b'{"a": 1}').hexdigest(),
        "model.safetensors": hashlib.sha256(b"\x01" * 100).hexdigest()}}
    assert rec["forget"]["items"] == 1 and len(rec["forget"]["sha256"]) == 64
    assert rec["versions"]["python"] and rec["versions"]["torch"]
    assert "metrics" not in rec and "evaluation did not run" in rec["verdict_omitted"]
    assert json.loads((run / "audit.json").read_text()) == rec


def test_audit_rows_summarize_the_record(tmp_path):
    from ray_unlearn.eval.report import audit_rows

    run, src, rec = fake_run(tmp_path)
    rows = dict(audit_rows(rec)[1:])
    assert rows["request id"] == "`req-1`" and rows["verdict"].startswith("omitted: evaluation did not run")
    assert rows["forget items"] == f"1 items, SHA-256 {rec['forget']['sha256'][:16]}… (canonical JSON; from " \
                                   f"{rec['forget']['source']})"
    digest = hashlib.sha256(bytes([1]) * 100).hexdigest()
    assert rows["output model"] == f"model: 2 files SHA-256 hashed; weights `model.safetensors` {digest[:12]}…"
    rec["verdict"] = {"verdict": "forgotten", "items": 10, "forgotten_items": 9, "forgotten_fraction": 0.9,
                      "rule": {"es_threshold": 0.4, "prob_ratio": 0.5, "min_forgotten_fraction": 0.9}}
    assert dict(audit_rows(rec)[1:])["verdict"] == ("**forgotten**: 9 of 10 forget items (90 %) have ES ≤ 0.4 and "
                                                    "probability ≤ 0.5 × the target's; forgotten needs ≥ 90 %")


def verify(capsys, run_dir):
    rc = main(["verify", str(run_dir)])
    cap = capsys.readouterr()
    return rc, cap.out.splitlines(), cap.err.splitlines()


def test_verify_untouched_passes(capsys, tmp_path):
    run, _, _ = fake_run(tmp_path)
    rc, out, err = verify(capsys, run)
    assert rc == 0 and err == [] and len(out) == 1
    assert out[0].startswith("OK: request req-1: forget items, 2 output model files, 2 input model files match")


@pytest.mark.parametrize("which", ["output", "input"])
def test_verify_one_byte_change_exits_1_naming_the_file(capsys, tmp_path, which):
    run, src, _ = fake_run(tmp_path)
    weights = (run / "model" if which == "output" else src) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[50] ^= 1
    weights.write_bytes(bytes(data))
    rc, out, _ = verify(capsys, run)
    assert rc == 1 and len(out) == 1
    assert out[0].startswith("MISMATCH:") and str(weights) in out[0]


def test_a_lora_runs_adapter_is_recorded_and_verified(capsys, tmp_path):
    run, src, _ = fake_run(tmp_path)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x02" * 50)
    rec = audit.build_record(request_id="req-1", forget_items=ITEMS[:1], forget_source=None, input_model=str(src),
                             output_model=run / "model", run_dir=run, config={}, bench="CUSTOM", summaries=None,
                             started=0.0, finished=1.0)
    assert rec["output_adapter"] == {"path": "adapter", "files": {
        "adapter_config.json": hashlib.sha256(b'{"r": 4}').hexdigest(),
        "adapter_model.safetensors": hashlib.sha256(b"\x02" * 50).hexdigest()}}
    audit.write(run, rec)
    rc, out, _ = verify(capsys, run)
    assert rc == 0 and "2 adapter files" in out[0], out
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x03" * 50)
    rc, out, _ = verify(capsys, run)
    assert rc == 1 and out[0].startswith("MISMATCH: output adapter file") and "adapter_model.safetensors" in out[0]


def test_verify_changed_forget_items_exits_1(capsys, tmp_path):
    run, _, _ = fake_run(tmp_path)
    (tmp_path / "forget.jsonl").write_text(json.dumps({"question": "other", "answer": "b"}) + "\n")
    rc, out, _ = verify(capsys, run)
    assert rc == 1 and "forget items" in out[0]


def test_verify_without_audit_json_exits_2(capsys, tmp_path):
    rc, out, err = verify(capsys, tmp_path)
    assert rc == 2 and out == [] and len(err) == 1
    assert err[0] == f"error: {tmp_path} holds no audit.json: give the output_dir of a `ray-unlearn run`"


def test_verdict_from_results_uses_the_verify_rule():
    def res(es, prob):
        return {"extraction_strength": {"value_by_index": {str(i): {"score": v} for i, v in enumerate(es)}},
                "forget_Q_A_Prob": {"value_by_index": {str(i): {"prob": v} for i, v in enumerate(prob)}}}

    target = res([0.9] * 10, [0.8] * 10)
    v = audit.verdict_from_results(target, res([0.1] * 10, [0.1] * 10))
    assert v["verdict"] == "forgotten" and v["forgotten_items"] == 10
    v = audit.verdict_from_results(target, res([0.1] * 8 + [0.9] * 2, [0.1] * 10))  # 0.8 < 0.9
    assert v["verdict"] == "not forgotten" and v["forgotten_fraction"] == 0.8
    assert "no per-item extraction_strength" in audit.verdict_from_results({}, target)


@pytest.mark.parametrize("evaluate", [False, True])
def test_run_writes_audit_json(capsys, micro_bench, tmp_path, fake_train, evaluate, one_thread):
    out = tmp_path / "out"
    forget = micro_bench.data_dir / "forget10.jsonl"
    args = ["run", f"model.path={micro_bench.target_dir}", f"data.forget_path={forget}",
            f"data.retain_path={micro_bench.data_dir / 'retain.jsonl'}", "ray.num_workers=0", f"output_dir={out}",
            f"eval.enabled={str(evaluate).lower()}", "eval.max_items=4", "eval.mia=[]",
            f"eval.calibrate={str(evaluate).lower()}"]
    if not evaluate:
        args.append("audit.request_id=ticket-42")
    assert main(args) == 0
    capsys.readouterr()
    rec = json.loads((out / "audit.json").read_text())
    if evaluate:
        uuid.UUID(rec["request_id"], version=4)
        assert yaml.safe_load((out / "config.yaml").read_text())["audit"]["request_id"] == rec["request_id"]
        assert set(rec["metrics"]) >= {"before", "after"}
        assert rec["metrics"]["before"]["extraction_strength"] == rec["metrics"]["after"]["extraction_strength"]
        assert rec["verdict"]["verdict"] == "not forgotten" and rec["verdict"]["items"] == 4  # weights unchanged
        calibration = rec["metrics"]["calibration"]  # unchanged weights keep the retain bar at alpha = 1
        assert calibration["alpha"] == 1.0 and "curve" not in calibration
        assert calibration["calibrated"]["extraction_strength"] == rec["metrics"]["after"]["extraction_strength"]
        report = (out / "report.md").read_text()
        calibration_table = report.split("## Model-mixing calibration")[1].split("##")[0]
        assert "| 0.0000 | " in calibration_table and "| 1.0000 (chosen) | " in calibration_table
        section = report.split("## Audit record (audit.json; `ray-unlearn verify` re-checks it)")[1]
        assert f"| request id | `{rec['request_id']}` |" in section
        assert f"| forget items | {rec['forget']['items']} items, SHA-256 {rec['forget']['sha256'][:16]}…" in section
        assert "| verdict | **not forgotten**: 0 of 4 forget items (0 %) have ES ≤ 0.4" in section
        assert f"`model.safetensors` {rec['output_model']['files']['model.safetensors'][:12]}…" in section
    else:
        assert rec["request_id"] == "ticket-42" and "metrics" not in rec and "verdict_omitted" in rec
    assert rec["config"]["output_dir"] == str(out)
    assert rec["forget"]["source"] == str(forget.resolve())
    assert rec["input_model"]["files"]["model.safetensors"] == rec["output_model"]["files"]["model.safetensors"]
    assert rec["started_at"] <= rec["finished_at"]
    rc, lines, _ = verify(capsys, out)
    assert rc == 0, lines
    assert lines[0].startswith("OK:") and "not checked" not in lines[0]
