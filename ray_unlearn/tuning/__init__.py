"""Ray-free parts of the Ray Tune search (`ray_unlearn.tune` is the Ray glue).

- `space`: parse and check the `tune.space` section, convert it to Optuna distributions, and
  turn one sampled point into a complete `JobConfig`;
- `pareto`: non-dominated sorting of the trials, the Pareto-front tables, plot, job files of
  the front members, and the Optuna study (SQLite) for `optuna-dashboard`.
"""
