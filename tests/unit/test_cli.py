"""`ray-unlearn`: bad input ends with exit 2, one `error:` line on stderr, and nothing written.

Every check happens in the driver before Ray starts: `ray_unlearn.train` is replaced by a
stand-in whose `fit` raises, so a test that got as far as training fails loudly.
"""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from ray_unlearn.cli import main


class ReachedTraining(Exception):
    """Raised by the stand-in `fit`: every input check passed."""


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Replace ray_unlearn.train so no test here can start Ray; returns the stand-in module."""
    fake = types.ModuleType("ray_unlearn.train")

    def fit(cfg, inputs, into):
        fake.inputs = inputs
        raise ReachedTraining()

    def init_ray(cfg):
        pass  # fit (next) stops the run

    def check_resume(cfg):
        pass

    fake.fit, fake.init_ray, fake.check_resume = fit, init_ray, check_resume
    monkeypatch.setitem(sys.modules, "ray_unlearn.train", fake)
    return fake


def run_cli(capsys, *args):
    """main([...]) -> (exit status, stdout, stderr lines)."""
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.splitlines()


def expect_exit_2(capsys, out_dir, *args, match=""):
    """The run must exit 2 with one `error: ...` line containing `match`, and create no output dir."""
    rc, _, err = run_cli(capsys, "run", *args, f"output_dir={out_dir}")
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert match in err[0]
    assert not Path(out_dir).exists()
    return err[0]


def micro_args(bench_cache):
    return ["benchmark.size=micro", f"benchmark.cache_dir={bench_cache}", "ray.num_workers=0"]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path / "out"


@pytest.fixture
def files(micro_bench, tmp_path):
    """Paths of the micro benchmark's model and data for runs that need no benchmark build."""
    retain = read_jsonl(micro_bench.data_dir / "retain.jsonl")
    forget = read_jsonl(micro_bench.data_dir / "forget10.jsonl")
    return types.SimpleNamespace(model=str(micro_bench.target_dir), retain_items=retain, forget_items=forget,
                                 retain=str(micro_bench.data_dir / "retain.jsonl"),
                                 forget=str(micro_bench.data_dir / "forget10.jsonl"))


# ---------------------------------------------------------------------------- config errors


def test_missing_job_file(capsys, tmp_path, out_dir):
    missing = tmp_path / "missing.yaml"
    expect_exit_2(capsys, out_dir, str(missing), match=f"job file {missing} does not exist")


def test_unknown_config_key(capsys, out_dir):
    expect_exit_2(capsys, out_dir, "optim.lrr=1e-3", match="unknown config key optim.lrr")


def test_bad_value(capsys, out_dir):
    expect_exit_2(capsys, out_dir, "optim.lr=-1", match="optim.lr: must be > 0")


def test_two_job_files(capsys, out_dir):
    expect_exit_2(capsys, out_dir, "a.yaml", "b.yaml", match="unexpected argument 'b.yaml'")


def test_unknown_objective_term(capsys, bench_cache, out_dir):
    expect_exit_2(capsys, out_dir, *micro_args(bench_cache), "objective.terms.foo=1",
                  match="unknown objective term 'foo'")


def test_unknown_optimizer(capsys, bench_cache, out_dir):
    msg = expect_exit_2(capsys, out_dir, *micro_args(bench_cache), "optim.name=lion",
                        match="optim.name: unknown optimizer 'lion'")
    assert "adamw" in msg and "sophia" in msg


def test_rmu_layer_out_of_range_names_the_valid_range(capsys, micro_bench, bench_cache, out_dir):
    # the micro model has 2 decoder layers; RMU's default layer is 7 (OpenUnlearning's)
    expect_exit_2(capsys, out_dir, *micro_args(bench_cache), "objective.terms={rmu: 1}",
                  match="objective.rmu.layer=7 is out of range: the model has 2 decoder layers, valid 0..1")


def test_term_setting_of_the_wrong_type(capsys, bench_cache, out_dir):
    expect_exit_2(capsys, out_dir, *micro_args(bench_cache), "objective.terms={pdu: 1}", "objective.pdu.dual_init=high",
                  match="objective.pdu.dual_init: expected float, got str 'high'")


# ---------------------------------------------------------------------------- model errors


def test_model_path_does_not_exist(capsys, micro_bench, bench_cache, tmp_path, out_dir):
    missing = tmp_path / "no-model"
    expect_exit_2(capsys, out_dir, *micro_args(bench_cache), f"model.path={missing}",
                  match=f"model path {missing} does not exist")


def test_model_path_holds_no_model(capsys, micro_bench, bench_cache, tmp_path, out_dir):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    expect_exit_2(capsys, out_dir, *micro_args(bench_cache), f"model.path={empty}",
                  match=f"model path {empty} holds no model")


def test_tokenizer_vocab_does_not_match_model(capsys, micro_bench, files, tmp_path, out_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_bench.target_dir)
    rows = json.loads((micro_bench.target_dir / "config.json").read_text())["vocab_size"]
    assert len(tok) <= rows
    added = [f"zzextra{i}" for i in range(rows - len(tok) + 5)]
    tok.add_tokens(added)
    tok.save_pretrained(tmp_path / "big-tokenizer")
    expect_exit_2(capsys, out_dir, f"model.path={files.model}", f"model.tokenizer={tmp_path / 'big-tokenizer'}",
                  f"data.forget_path={files.forget}", f"data.retain_path={files.retain}",
                  match=f"tokenizer has {rows + 5} tokens but model embeds only {rows}")


# ---------------------------------------------------------------------------- data errors


def test_data_file_with_missing_fields(capsys, files, tmp_path, out_dir):
    bad = write_jsonl(tmp_path / "forget.jsonl", [{"question": q["question"]} for q in files.forget_items[:3]])
    expect_exit_2(capsys, out_dir, f"model.path={files.model}", f"data.forget_path={bad}",
                  f"data.retain_path={files.retain}", match="item 0 has no 'answer' field")


def test_empty_forget_set(capsys, files, tmp_path, out_dir):
    empty = tmp_path / "forget.jsonl"
    empty.write_text("")
    expect_exit_2(capsys, out_dir, f"model.path={files.model}", f"data.forget_path={empty}",
                  f"data.retain_path={files.retain}", match="holds no items")


def overlapping_retain(files, tmp_path, n=3):
    """A retain file holding the whole retain split plus the first n forget items."""
    items = files.retain_items + files.forget_items[:n]
    return write_jsonl(tmp_path / "retain.jsonl", [{k: v for k, v in it.items() if k != "index"} for it in items])


def test_overlap_error_mode(capsys, files, tmp_path, out_dir):
    retain = overlapping_retain(files, tmp_path)
    expect_exit_2(capsys, out_dir, f"model.path={files.model}", f"data.forget_path={files.forget}",
                  f"data.retain_path={retain}", "data.overlap=error",
                  match="3 retain items also appear in the forget set")


def test_overlap_warn_mode_drops_them_from_retain(capsys, files, tmp_path, out_dir, no_ray):
    retain = overlapping_retain(files, tmp_path)
    with pytest.warns(UserWarning, match="3 retain items also appear in the forget set"):
        with pytest.raises(ReachedTraining):
            main(["run", f"model.path={files.model}", f"data.forget_path={files.forget}",
                  f"data.retain_path={retain}", f"output_dir={out_dir}"])
    assert len(no_ray.inputs.retain) == len(files.retain_items)
    assert len(no_ray.inputs.forget) == len(files.forget_items)


def test_keyboard_interrupt_exits_130(capsys, monkeypatch):
    import ray_unlearn.pipeline

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_unlearn.pipeline, "run_job", interrupted)
    rc, _, err = run_cli(capsys, "run", "train.max_steps=1")
    assert rc == 130
    assert len(err) == 1 and "run the same command again to resume" in err[0]


def test_console_script_exit_2_one_line(tmp_path):
    script = Path(sys.executable).parent / "ray-unlearn"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    out = tmp_path / "out"
    proc = subprocess.run([str(script), "run", "optim.lrr=1", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: unknown config key optim.lrr")
    assert not out.exists()


# ---------------------------------------------------------------------------- config and data commands


def test_config_prints_yaml(capsys):
    rc, out, err = run_cli(capsys, "config", "optim.lr=3e-4", "objective.terms.ga=1")
    assert rc == 0 and err == []
    printed = yaml.safe_load(out)
    assert printed["optim"]["lr"] == 3e-4
    assert printed["objective"]["terms"] == {"npo": 1.0, "retain_nll": 2.0, "ga": 1.0}
    assert set(printed) >= {"benchmark", "data", "model", "objective", "optim", "train", "ray", "eval"}


def test_config_write_then_load(capsys, tmp_path):
    from ray_unlearn.config import load_config

    path = tmp_path / "job.yaml"
    rc, out, _ = run_cli(capsys, "config", "train.max_steps=9", "--write", str(path))
    assert rc == 0 and f"wrote {path}" in out
    assert load_config(path).train.max_steps == 9
    rc, out, _ = run_cli(capsys, "config", str(path), "optim.name=adamw")
    assert rc == 0
    assert yaml.safe_load(out)["train"]["max_steps"] == 9
    assert yaml.safe_load(out)["optim"]["name"] == "adamw"


def test_config_bad_input_exit_2(capsys):
    rc, out, err = run_cli(capsys, "config", "optim.hessian=exact")
    assert rc == 2 and out == ""
    assert err == ["error: optim.hessian: 'exact' is not one of gnb, hutchinson, empirical"]


def test_data_prints_the_cached_manifest(capsys, micro_bench, bench_cache, monkeypatch):
    import ray_unlearn.models.build as build

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached micro benchmark was rebuilt")

    monkeypatch.setattr(build, "_build_into", no_rebuild)
    rc, out, err = run_cli(capsys, "data", "benchmark.size=micro", f"benchmark.cache_dir={bench_cache}")
    assert rc == 0
    assert "benchmark micro at" in out
    manifest = micro_bench.manifest
    for key, value in manifest.items():
        assert f"{key}: {value}" in out


# ---------------------------------------------------------------------------- storage errors


def test_output_dir_in_a_missing_bucket(capsys, bench_cache, s3_env):
    missing = "s3://no-such-bucket-cli/run"
    expect_exit_2(capsys, missing, "benchmark.size=micro", f"benchmark.cache_dir={bench_cache}",
                  "ray.num_workers=1", match="output_dir: bucket 'no-such-bucket-cli' does not exist")


def test_storage_path_on_an_unreachable_server(capsys, bench_cache, s3_env, monkeypatch, out_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    expect_exit_2(capsys, out_dir, "benchmark.size=micro", f"benchmark.cache_dir={bench_cache}",
                  "ray.num_workers=1", "ray.storage_path=s3://ckpts/run",
                  match="ray.storage_path: cannot write to s3://ckpts/run: ")


def test_storage_uri_without_a_filesystem(capsys, out_dir):
    expect_exit_2(capsys, "hdfs://nn/run", match="output_dir: no filesystem for hdfs:// URIs")


def test_tune_keeps_its_output_dir_local(capsys, bench_cache):
    rc, _, err = run_cli(capsys, "tune", "benchmark.size=micro", f"benchmark.cache_dir={bench_cache}",
                         "output_dir=s3://b/search")
    assert rc == 2 and len(err) == 1 and "set ray.storage_path=s3://" in err[0]


# ---------------------------------------------------------------------------- ray-unlearn eval


def test_eval_a_model_without_unlearning(capsys, micro_bench, bench_cache, tmp_path, out_dir):
    """`ray-unlearn eval MODEL`: a copy of the micro target evaluated beside the target and retain models
    scores exactly as the target does (same weights, same items), and the run writes the EVAL/SUMMARY
    files, the others' under eval/<name>, the attacks and the report."""
    import shutil

    copy = tmp_path / "copy-of-target"
    shutil.copytree(micro_bench.target_dir, copy)
    rc, out, err = run_cli(capsys, "eval", str(copy), *micro_args(bench_cache), "eval.max_items=4",
                           "eval.attacks=[quantize_int8]", "--output-dir", str(out_dir))
    assert rc == 0, err
    bench = "BUILTIN_micro_forget10"
    mine = json.loads((out_dir / "eval" / f"{bench}_SUMMARY.json").read_text())
    target = json.loads((out_dir / "eval" / "target" / f"{bench}_SUMMARY.json").read_text())
    assert mine == target and mine["forget_keyword_accuracy"] == 1.0
    assert (out_dir / "eval" / "retain" / f"{bench}_SUMMARY.json").is_file()
    assert set(json.loads((out_dir / "eval" / "attacks.json").read_text())) == {"quantize_int8"}
    report = (out_dir / "report.md").read_text()
    assert "| metric | target | evaluated | retain |" in report and f"evaluated model: {copy}" in report
    assert "forget ES gap closed: 0" in report
    assert (out_dir / "plots" / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_of_the_target_itself_leaves_it_out_of_the_comparison(capsys, micro_bench, bench_cache, tmp_path,
                                                                    monkeypatch):
    """MODEL = the target: compared with the retain model only; no output_dir: runs/eval/<MODEL's name>."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, "eval", str(micro_bench.target_dir), *micro_args(bench_cache), "eval.max_items=2",
                         "eval.mia=[]")
    assert rc == 0, err
    out_dir = tmp_path / "runs" / "eval" / micro_bench.target_dir.name
    assert sorted(p.name for p in (out_dir / "eval").iterdir() if p.is_dir()) == ["retain"]


@pytest.mark.parametrize("what", ["missing", "no weights", "other vocabulary"])
def test_eval_bad_model_exits_2_writing_nothing(capsys, micro_bench, bench_cache, tmp_path, out_dir, what):
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    if what != "missing":
        model.mkdir()
        (model / "config.json").write_text((micro_bench.target_dir / "config.json").read_text())
    if what == "other vocabulary":  # its own tokenizer has more tokens than the target and retain models embed
        import shutil

        shutil.copy(micro_bench.target_dir / "model.safetensors", model / "model.safetensors")
        tok = AutoTokenizer.from_pretrained(micro_bench.target_dir)
        tok.add_tokens([f"zzextra{i}" for i in range(2000)])
        tok.save_pretrained(model)
    rc, _, err = run_cli(capsys, "eval", str(model), *micro_args(bench_cache), f"output_dir={out_dir}")
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert {"missing": "does not exist", "no weights": "no .safetensors weights",
            "other vocabulary": "tokenizer has"}[what] in err[0]
    assert not out_dir.exists()
