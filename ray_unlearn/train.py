"""Ray Train glue: run the unlearning loop in a TorchTrainer (gloo on CPU, NCCL on GPU).

This module and tune.py / serve.py are the only ones that import ray. The loop itself is
`ray_unlearn.loop.Unlearner`, whose `ray_unlearn.parallel` strategy (ddp, fsdp2) wraps the model
in the process group Ray Train sets up; here we only translate between it and Ray: ranks,
devices, `ray.train.report` (from every rank that wrote a checkpoint shard), resume.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import sys
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_unlearn import storage
from ray_unlearn.config import JobConfig, from_dict, to_dict
from ray_unlearn.errors import UnlearnError
from ray_unlearn.job import JobInputs
from ray_unlearn.loop import LoopEnv, Unlearner, load_run

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_S = "0.05"  # how often the controller drains reports (and checks workers); set the variable to override


def train_func(config: dict[str, Any]) -> None:
    """Per-worker entry point: load, wrap, resume, run the loop, report."""
    from ray_unlearn.cli import quiet_libraries

    quiet_libraries()
    _quiet_report_logs()
    cfg: JobConfig = from_dict(JobConfig, config["cfg"])
    inputs: JobInputs = config["inputs"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.ray.max_workers > 0 else torch.device("cpu")
    torch.manual_seed(cfg.train.seed + rank)
    if rank == 0 and config.get("placement_group_file"):
        _record_placement_group(Path(config["placement_group_file"]))

    model, ref, data, tokenizer = load_run(cfg, inputs, rank, world)  # ray.strategy places and wraps them

    # Ray Train workers write checkpoints to a temporary directory of their own, which Ray copies to the
    # run's storage when they are reported; local mode keeps them under output_dir (its only copy)
    temporary = not config.get("local_checkpoints")

    def report(metrics: dict[str, float], ckpt: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None
        ray.train.report(dict(metrics), checkpoint=checkpoint)
        if temporary and ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)  # persisted by report(): free the worker's disk

    tag = "[finetune]" if "nll" in cfg.objective.terms else "[unlearn]"  # ray-unlearn finetune's models

    def on_step(step: int, total: int, logs: dict[str, float]) -> None:
        if rank == 0 and (step % cfg.train.log_every == 0 or step == total):
            shown = " ".join(f"{k}={v:.4g}" for k, v in logs.items() if k.startswith(("loss/total", "nll/")))
            _say(f"{tag} step {step}/{total} {shown}")

    local_ckpts = Path(tempfile.mkdtemp(prefix="ray_unlearn_ckpt_")) if temporary else Path(config["local_checkpoints"])
    env = LoopEnv(rank=rank, world_size=world, device=device, checkpoint_dir=local_ckpts,
                  report=report, on_step=on_step, evaluate=_evaluator(cfg, inputs, tokenizer, config))
    checkpoint = ray.train.get_checkpoint()  # Ray's latest; local mode passes its own in resume_from
    source = checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(
        config.get("resume_from"))
    with source as resume_dir:
        env.resume_from = Path(resume_dir) if resume_dir else None
        unlearner = Unlearner(cfg, model, ref, data, tokenizer.pad_token_id, env)
    if rank == 0 and env.resume_from is not None:
        _say(f"{tag} resumed from step {unlearner.step}")
    try:
        unlearner.run()
    finally:
        if temporary:
            shutil.rmtree(local_ckpts, ignore_errors=True)


def _evaluator(cfg: JobConfig, inputs: JobInputs, tokenizer: Any,
               config: dict[str, Any]) -> Callable[[Any, int], dict[str, float]] | None:
    """The loop's in-training evaluation (summary metrics of the eval section), or None when off.

    On when `train.eval_every` > 0 or the caller asks for it (`evaluate_at_end`: Tune trials);
    forget quality, privleak and the reference attack read `references` in the loop config
    (`eval.suite.References` as a dict).
    """
    if not (cfg.train.eval_every > 0 or config.get("evaluate_at_end")):
        return None
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.eval.suite import References, evaluate_model, summary

    references = References.from_dict(config.get("references"))

    def plain(module: Any) -> dict[str, float]:
        results = evaluate_model(module, tokenizer, inputs.eval_splits, cfg.eval, prompt_format(cfg.data),
                                 cfg.data.max_length, references=references)
        return {k: float(v) for k, v in summary(results).items()}

    calibrated = _calibrator(cfg, inputs, plain, config) if config.get("calibrate") else None

    def evaluate(module: Any, step: int) -> dict[str, float]:
        metrics = plain(module)
        return {**metrics, **calibrated(module, metrics)} if calibrated else metrics

    return evaluate


def _calibrator(cfg: JobConfig, inputs: JobInputs, plain: Callable[[Any], dict[str, float]],
                config: dict[str, Any]) -> Callable[[Any, dict[str, float]], dict[str, float]]:
    """calibrated(module, its metrics): model-mixing calibration of the module against the target (loaded on
    first use, on the module's device), as calibration_alpha and calibrated_<metric>; the target's summary
    (`target_summary` in the loop config) and the module's own spare those two evaluations."""
    from ray_unlearn.eval.calibration import calibrated_metrics
    from ray_unlearn.models.io import load_model

    target: list[Any] = []

    def calibrated(module: Any, metrics: dict[str, float]) -> dict[str, float]:
        if not target:
            device = next(module.parameters()).device
            target.append(load_model(inputs.model_path, cfg.model.dtype, cfg.model.trust_remote_code).to(device))
        known = {1.0: metrics, **({0.0: config["target_summary"]} if config.get("target_summary") else {})}
        return calibrated_metrics(target[0], module, plain, cfg.eval.calibration_tau, cfg.eval.calibration_steps,
                                  known)

    return calibrated


def _record_placement_group(path: Path) -> None:
    """Write the id of the worker group's placement group (a Tune trial stopped early frees it)."""
    pg = ray.util.get_current_placement_group()
    if pg is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pg.id.hex())


def _quiet_report_logs() -> None:
    """Silence Ray Train's per-report INFO line (its logger is named after the file, so the
    RunConfig log level does not reach it); the loop prints its own progress."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _say(line: str) -> None:
    """Write a progress line to the worker's stdout (Ray Train's print patch would log it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def init_ray(cfg: JobConfig) -> None:
    """Start or join Ray, then check the cluster can hold the requested workers."""
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address or None, log_to_driver=True,
                 configure_logging=False)
    workers = cfg.ray.min_workers  # an elastic run starts once its minimum fits
    need = workers * cfg.ray.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    scorers = cfg.eval.num_workers if cfg.eval.enabled else 0  # eval actors: one CPU each, after training
    if scorers > have:
        raise UnlearnError(f"eval.num_workers={scorers} needs {scorers} CPUs (one per actor) but the cluster has "
                           f"{have:g}; lower eval.num_workers")
    if need > have:
        raise UnlearnError(f"ray.num_workers={workers} x ray.cpus_per_worker={cfg.ray.cpus_per_worker} "
                           f"needs {need:g} CPUs but the cluster has {have:g}; lower ray.num_workers")
    if cfg.ray.use_gpu and ray.cluster_resources().get("GPU", 0) < workers:
        raise UnlearnError(f"ray.use_gpu=true needs {workers} GPUs but the cluster has "
                           f"{ray.cluster_resources().get('GPU', 0):g}; set ray.use_gpu=false")


def ray_storage(cfg: JobConfig) -> str:
    """Where Ray Train keeps this run's checkpoints: `ray.storage_path`, else <output_dir>/ray."""
    return cfg.ray.storage_path or storage.join(cfg.output_dir, "ray")


def latest_checkpoint(cfg: JobConfig) -> str | None:
    """The checkpoint a rerun of `cfg` resumes from (Ray's latest, or the driver mode's): a path or URI."""
    if cfg.ray.max_workers == 0:
        local = _latest_local(Path(cfg.output_dir).resolve() / "checkpoints")
        return str(local) if local else None
    run = storage.join(ray_storage(cfg), cfg.name)
    ckpts = [storage.join(run, d) for d in storage.subdirs(run) if d.startswith("checkpoint_")]
    ckpts = [c for c in ckpts if storage.read_text(storage.join(c, "state.json")) is not None]
    return ckpts[-1] if ckpts else None


def check_resume(cfg: JobConfig) -> None:
    """Refuse, before any work, to resume a checkpoint written by another strategy."""
    import json

    from ray_unlearn.parallel import build_strategy

    ckpt = latest_checkpoint(cfg)
    if ckpt is not None:
        state = json.loads(storage.read_text(storage.join(ckpt, "state.json")) or "{}")
        if state.get("strategy") is None:
            raise UnlearnError(f"checkpoint {ckpt} was written by an older ray_unlearn; start fresh with a new "
                               "name or output_dir")
        strategy = build_strategy(cfg.ray.strategy, world_size=max(1, cfg.ray.max_workers))
        strategy.check_checkpoint(Path(ckpt) if not storage.is_remote(ckpt) else ckpt, state["strategy"])


def _latest_local(path: Path) -> Path | None:
    ckpts = sorted(path.glob("step-*")) if path.is_dir() else []
    return ckpts[-1] if ckpts else None


def make_trainer(cfg: JobConfig, inputs: JobInputs, callbacks: Sequence[Any] = (),
                 **loop_extras: Any) -> TorchTrainer:
    """The TorchTrainer of one unlearning run (storage: `ray_storage(cfg)`/<name>, so a rerun resumes).

    `callbacks` are Ray Train user callbacks (Tune's report callback); `loop_extras` go to every
    worker's loop config (`evaluate_at_end`, `references`: see `_evaluator`;
    `placement_group_file`: where rank 0 writes its placement group's id).
    """
    # Ray Train 2.60's controller takes a worker's report off its one-slot queue only when it polls the
    # worker, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so each report after the first
    # blocked the loop for up to 2 s (benchmarks/ray_overhead.py: 2.5 steps/s on micro instead of 30).
    # The trainer propagates this variable from the driver to its controller.
    os.environ.setdefault(HEALTH_CHECK_ENV, REPORT_POLL_S)
    out = Path(cfg.output_dir).resolve()
    loop_config: dict[str, Any] = {"cfg": to_dict(cfg), "inputs": inputs, **loop_extras}
    if cfg.ray.max_workers == 0:  # local mode keeps no Ray checkpoints: the loop writes them under output_dir
        loop_config["local_checkpoints"] = str(out / "checkpoints")
        latest = _latest_local(out / "checkpoints")
        loop_config["resume_from"] = str(latest) if latest else None
    location = ray_storage(cfg)
    fs, storage_path = storage.filesystem(location)  # a bucket's filesystem carries its endpoint
    return TorchTrainer(
        train_func, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=(cfg.ray.min_workers, cfg.ray.max_workers) if cfg.ray.elastic
                                     else cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=cfg.ray.resize_interval_s),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path,
                             storage_filesystem=fs if storage.is_remote(location) else None,
                             callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))


def run_trainer(trainer: TorchTrainer) -> ray.train.Result:
    """`trainer.fit()`, with a failed run turned into a one-line UnlearnError."""
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise UnlearnError(_worker_error(e)) from None
    if result.checkpoint is None:
        raise UnlearnError("the run reported no checkpoint; see the worker logs above")
    return result


def fit(cfg: JobConfig, inputs: JobInputs, into: Path, **loop_extras: Any) -> ray.train.Result:
    """Run the unlearning with Ray Train; copies the final checkpoint's HF model files, state.json,
    localize masks and LoRA adapter directory (not its optimizer state) into `into`, and returns Ray's result.
    `loop_extras` go to the workers' loop config (`references`: see `make_trainer`).

    Run again with the same `name` and `output_dir` to resume from the latest checkpoint.
    """
    from ray_unlearn.localize import LOCALIZE_FILE
    from ray_unlearn.models.lora import ADAPTER_DIR
    from ray_unlearn.parallel import HF_FILES

    init_ray(cfg)
    out = Path(cfg.output_dir).resolve()
    result = run_trainer(make_trainer(cfg, inputs, **loop_extras))
    if cfg.ray.max_workers == 0:
        for old in sorted((out / "checkpoints").glob("step-*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    fs, path = result.checkpoint.filesystem, result.checkpoint.path
    kept = ("state.json", LOCALIZE_FILE, ADAPTER_DIR, *HF_FILES)  # ADAPTER_DIR: a directory, copied whole
    into.mkdir(parents=True, exist_ok=True)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path)):
        if any(fnmatch.fnmatch(info.base_name, pattern) for pattern in kept):
            if info.type == pyarrow.fs.FileType.Directory:
                (into / info.base_name).mkdir(exist_ok=True)  # copy_files writes into it, creating no parent
            pyarrow.fs.copy_files(info.path, str(into / info.base_name), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
    return result


def _worker_error(e: Exception) -> str:
    """A one-line message for a failed Train run (an UnlearnError from a worker keeps its text)."""
    text = str(e)
    for line in text.splitlines():
        if "UnlearnError:" in line:
            return line.split("UnlearnError:", 1)[1].strip()
    last = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"unlearning failed on a Ray Train worker: {last[-1] if last else type(e).__name__}"

