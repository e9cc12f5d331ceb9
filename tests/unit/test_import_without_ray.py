"""The pure-PyTorch core never imports Ray: every module but the Ray glue imports without it.

A subprocess blocks `ray` and `ray.*` on the meta path (as if Ray were not installed), imports
every `ray_unlearn` module except train/tune/serve, builds a config, and checks that Ray stayed
out of `sys.modules`.
"""

import subprocess
import sys
import textwrap

RAY_GLUE = ("train", "tune", "serve", "jobs", "distributed")

SCRIPT = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys

    class BlockRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, BlockRay())
    try:
        import ray
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker let ray through")

    import ray_unlearn
    glue = set(sys.argv[1].split(","))
    imported = []
    for info in pkgutil.walk_packages(ray_unlearn.__path__, "ray_unlearn."):
        if info.name.split(".")[1] in glue:
            continue
        importlib.import_module(info.name)
        imported.append(info.name)

    from ray_unlearn.config import load_config
    from ray_unlearn.cli import main

    cfg = load_config(None, ["optim.lr=1e-3", "objective.terms.ga=1"])
    assert cfg.optim.lr == 1e-3 and cfg.objective.terms["ga"] == 1.0
    assert main(["config", "train.max_steps=3"]) == 0
    leaked = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
    assert not leaked, leaked
    print("IMPORTED", " ".join(imported))
""")


def test_every_module_but_the_ray_glue_imports_without_ray():
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(RAY_GLUE)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = proc.stdout.split("IMPORTED", 1)[1].split()
    for name in ("ray_unlearn.config", "ray_unlearn.cli", "ray_unlearn.job", "ray_unlearn.pipeline",
                 "ray_unlearn.loop", "ray_unlearn.models.io", "ray_unlearn.models.build", "ray_unlearn.models.tiny",
                 "ray_unlearn.data.loaders", "ray_unlearn.objectives", "ray_unlearn.optim.sophia",
                 "ray_unlearn.eval.suite"):
        assert name in imported, name
    assert not any(name.split(".")[1] in RAY_GLUE for name in imported)


def test_the_ray_glue_does_need_ray():
    """The blocker works: importing ray_unlearn.train under it fails."""
    script = SCRIPT.split("import ray_unlearn\n")[0] + textwrap.dedent("""
        try:
            import ray_unlearn.train
        except ImportError as e:
            print("BLOCKED", e.name)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BLOCKED ray" in proc.stdout
