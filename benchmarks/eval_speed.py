"""Evaluation that scales out: the full metric suite of one model with eval.num_workers = 1 vs 2 Ray actors.

What it measures. The target model of the built-in benchmark (`small` by default) is evaluated with the
job's evaluation settings (forget10, retain, world_facts, holdout; `eval.max_items` items per split, every
MIA attack that needs no second model, GradNorm included with --gradnorm) by `evaluate_model` with an
`EvalPool` of 1 actor and of 2 actors (`ray_unlearn.distributed`): each actor holds the model and scores
whole batches of every pass (teacher-forced, generation, truth ratio, GradNorm). Each round runs both sides
back to back, alternating which goes first; the pool start (actors loading the model) is left out, and both
sides are checked to give the same results item by item. The last line is

    eval 2 workers / 1 worker: R

the items-per-second of 2 actors over 1 actor (the median of --rounds per-round ratios): 2.00 is perfect
scaling. Ray gives each actor one CPU (and OMP_NUM_THREADS=1), so on a 2-core machine 2 actors can at best
double 1 actor's pace; the driver's own single-process suite uses every core and is printed for reference.

Not measured here: OpenUnlearning's per-metric evaluation loop on the same model and items. It runs only
through its Hydra configs with models and data from the Hugging Face hub (none reachable here), and its
code may not be vendored into this repository; the metric values themselves are checked equal to its
definitions item by item in tests/unit/eval.

    python benchmarks/eval_speed.py [--size small] [--rounds 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time


def _timed(fn) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gradnorm", action="store_true", help="add GradNorm (a backward pass per item)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.max_items=100")
    args = parser.parse_args()

    import ray

    from ray_unlearn.config import load_config
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.distributed import eval_pools
    from ray_unlearn.eval.suite import evaluate_model
    from ray_unlearn.job import resolve_inputs
    from ray_unlearn.models.io import load_model, load_tokenizer

    mia = "[loss, zlib, min_k, min_k_plus_plus, gradnorm]" if args.gradnorm else "[loss, zlib, min_k, min_k_plus_plus]"
    cfg = load_config(None, [f"benchmark.size={args.size}", f"eval.mia={mia}", *args.overrides])
    inputs = resolve_inputs(cfg)
    tokenizer, fmt = load_tokenizer(inputs.tokenizer_path), prompt_format(cfg.data)
    items = sum(min(len(v), cfg.eval.max_items or len(v)) for v in inputs.eval_splits.values())
    settings = dict(dtype=cfg.model.dtype, trust_remote_code=False, tokenizer_path=inputs.tokenizer_path, fmt=fmt,
                    max_length=cfg.data.max_length, batch_size=cfg.eval.batch_size,
                    max_new_tokens=cfg.eval.max_new_tokens)

    def evaluate(pool=None, model=None):
        return evaluate_model(model, tokenizer, inputs.eval_splits, cfg.eval, fmt, cfg.data.max_length, pool=pool)

    driver_s, alone = _timed(lambda: evaluate(model=load_model(inputs.model_path)))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    times: dict[int, list[float]] = {1: [], 2: []}
    try:
        for r in range(args.rounds):
            for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                with eval_pools(workers, **settings) as open_pool:
                    pool = open_pool(inputs.model_path)
                    evaluate(pool)  # warm-up: the actors load the model and run once
                    seconds, out = _timed(lambda: evaluate(pool))
                assert out.keys() == alone.keys() and all(
                    out[k]["agg_value"] == alone[k]["agg_value"] or out[k]["agg_value"] != out[k]["agg_value"]
                    for k in out), "the actors' results differ from the driver's"
                times[workers].append(seconds)
                print(f"round {r + 1}: {workers} worker(s) {seconds:.1f} s ({items / seconds:.1f} items/s)", flush=True)
    finally:
        ray.shutdown()
    print(f"{args.size}: {items} items over {len(inputs.eval_splits)} splits; the driver alone (all cores) "
          f"{driver_s:.1f} s incl. model load")
    ratios = [one / two for one, two in zip(times[1], times[2])]
    print(f"eval 2 workers / 1 worker: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
