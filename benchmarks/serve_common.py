"""What the serving benchmarks share: a private Ray instance with the project's Serve application on
127.0.0.1, a pool of HTTP clients, prompts from a built-in benchmark, and percentiles.

The clients are threads with one keep-alive `http.client` connection each: the load generator
shares the cores with the server, so it should cost little. Ray is imported only by the functions
that start it, so the pure helpers (`percentile`, `Connection`) load without it.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from ray_unlearn.parallel.local import free_port

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, reachable on loopback only

HOST = "127.0.0.1"


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of xs by the nearest-rank rule on the sorted values (xs[int(q n)], the
    last value for q = 1); NaN for no values."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def prompts(size: str, cache_dir: str) -> list[str]:
    """Completion prompts from the questions of the built-in benchmark `size` (forget10, then retain)."""
    return [f"Question: {it['question']}\nAnswer:" for it in questions(size, cache_dir)]


def questions(size: str, cache_dir: str) -> list[dict[str, str]]:
    """The question/answer items of forget10 and retain of the built-in benchmark `size` (built if needed)."""
    from ray_unlearn.config import BenchmarkConfig
    from ray_unlearn.models.build import ensure_benchmark

    splits = ensure_benchmark(BenchmarkConfig(size=size, cache_dir=os.path.expanduser(cache_dir))).splits()
    return [{"question": it["question"], "answer": it["answer"]} for it in splits["forget10"] + splits["retain"]]


# ---------------------------------------------------------------- Ray and Serve


@contextlib.contextmanager
def private_serve(port: int | None = None, dashboard: bool = False) -> Iterator[int]:
    """A private Ray instance (never a cluster already running) with Serve's HTTP proxy on 127.0.0.1:port
    (a free port when None); yields the port, shuts Serve and Ray down on exit. `dashboard`: with the
    dashboard's HTTP server on 127.0.0.1 (a free port), which Ray's state API (`ray.util.state`) queries."""
    import ray
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    port = port or free_port()
    where = {"dashboard_host": HOST, "dashboard_port": free_port()} if dashboard else {}
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=dashboard, configure_logging=False,
             log_to_driver=False, **where)
    try:
        serve.start(http_options={"host": HOST, "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def app_config(name: str, models: dict[str, str], cache_dir: str, port: int, **sections: Any) -> dict[str, Any]:
    """A SERVE.yaml mapping for application `name` under route /name on 127.0.0.1:port; `sections` (batching,
    limits, deployment, ...) are merged in as given."""
    return {"name": name, "models": models, "benchmark": {"cache_dir": os.path.expanduser(cache_dir)},
            "http": {"host": HOST, "port": port, "route_prefix": f"/{name}"}, **sections}


def deploy(data: dict[str, Any]) -> str:
    """Deploy the project's Serve application (`serve.build_app`, no API key) for the SERVE.yaml mapping
    `data` on the running Serve instance; returns its base URL. Returns at once: the first requests wait
    for the replicas (see `wait_ready`)."""
    from ray import serve

    from ray_unlearn.serve import build_app
    from ray_unlearn.serving.config import serve_config_from_dict

    cfg = serve_config_from_dict(data)
    prefix = cfg.http.route_prefix
    serve.run(build_app(cfg, api_key=""), name=cfg.name, route_prefix=prefix, blocking=False)
    return f"http://{HOST}:{cfg.http.port}{prefix.rstrip('/')}"


def healthz(url: str, timeout: float = 30) -> dict[str, Any]:
    import requests

    return requests.get(url + "/healthz", timeout=timeout).json()


def wait_ready(url: str, timeout: float = 600) -> dict[str, Any]:
    """Poll /healthz until the application answers ready (its replicas started); its body."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            body = healthz(url)
            if body.get("ready"):
                return body
        except Exception:  # noqa: BLE001 - the proxy may not route the application yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout:.0f} s")
        time.sleep(1)


# ---------------------------------------------------------------- clients


class Connection:
    """One keep-alive HTTP/1.1 connection to a base URL; after a failed request it reconnects on the next."""

    def __init__(self, url: str, timeout: float) -> None:
        where = urlsplit(url)
        self.host, self.port, self.prefix, self.timeout = where.hostname, where.port, where.path, timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: str) -> tuple[int, bytes]:
        """(status, whole body) of POST prefix+path with a JSON body (a stream is read to its end); status 0
        and the error's text as bytes when the connection failed."""
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.conn.request("POST", self.prefix + path, body, {"Content-Type": "application/json"})
            response = self.conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            return 0, f"{type(e).__name__}: {e}".encode()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_clients(n: int, client: Callable[[int], None]) -> float:
    """Run client(0) .. client(n-1) in n threads until all return; the wall time in seconds."""
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start
