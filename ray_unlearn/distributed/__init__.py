"""Ray Core glue (actors) for work that is neither a Ray Train run, a Tune search nor a Serve app: today the
evaluation's model passes spread over actors (`EvalPool`). Only this package, train, tune, serve, jobs and
cli import ray."""

from ray_unlearn.distributed.evaluation import EvalPool, eval_pools

__all__ = ["EvalPool", "eval_pools"]
