"""Serving throughput and latency with dynamic batching on vs. off, measured in one run.

What it measures. Two copies of the Serve application run side by side on 127.0.0.1, each with
one model replica holding the built-in benchmark's target model: `batched` (`@serve.batch`
with max_batch_size = the number of clients) and `unbatched` (batch size 1: requests decoded
one at a time). N concurrent HTTP clients send greedy `/v1/completions` requests (questions of
the benchmark, `--max-tokens` new tokens at most) to one copy, then the other, alternating for
`--rounds` rounds so that outside load falls on both alike; each round is bounded by
`--requests` requests and `--max-seconds` seconds. The headline

    batched / unbatched throughput = X.XX

is the ratio of completed requests per second (pooled over rounds); below it are p50 and p99
latency per configuration and the mean batch size the batched replica formed. Traffic goes to
127.0.0.1 only.

    python benchmarks/serve_load.py                              # micro model, 16 clients, ~1-2 min
    python benchmarks/serve_load.py --clients 32 --rounds 3 --size small
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import requests

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, reachable on loopback only


@dataclass
class Measured:
    """Latencies (s) and wall time of the completed requests of one configuration, over rounds."""

    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    errors: int = 0

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="micro", help="built-in benchmark whose target model is served")
    p.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    p.add_argument("--requests", type=int, default=96, help="requests per configuration per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per configuration")
    p.add_argument("--max-seconds", type=float, default=60.0, help="time bound of one round")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request")
    p.add_argument("--batch-wait", type=float, default=0.05, help="batch_wait_timeout_s of the batched copy")
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs reserved per model replica")
    p.add_argument("--cache-dir", default="~/.cache/ray_unlearn", help="benchmark cache")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(args: argparse.Namespace, port: int) -> dict[str, str]:
    """Start Serve on 127.0.0.1:port with the batched and unbatched applications; name -> base URL."""
    from ray import serve

    from ray_unlearn.serve import build_app
    from ray_unlearn.serving.config import serve_config_from_dict

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    for name, enabled in (("batched", True), ("unbatched", False)):
        cfg = serve_config_from_dict({
            "name": name, "models": {"base": f"builtin:{args.size}:target"},
            "benchmark": {"cache_dir": args.cache_dir}, "http": {"port": port, "route_prefix": f"/{name}"},
            "batching": {"enabled": enabled, "max_batch_size": args.clients,
                         "batch_wait_timeout_s": args.batch_wait if enabled else 0.0},
            "limits": {"max_tokens": max(args.max_tokens, 64)},
            "deployment": {"num_cpus": args.num_cpus, "max_ongoing_requests": 2 * args.clients}})
        serve.run(build_app(cfg, api_key=""), name=name, route_prefix=f"/{name}", blocking=False)
        urls[name] = f"http://127.0.0.1:{port}/{name}"
    return urls


def prompts(args: argparse.Namespace) -> list[str]:
    from ray_unlearn.config import BenchmarkConfig
    from ray_unlearn.models.build import ensure_benchmark

    splits = ensure_benchmark(BenchmarkConfig(size=args.size, cache_dir=args.cache_dir)).splits()
    return [f"Question: {it['question']}\nAnswer:" for it in splits["forget10"] + splits["retain"]]


def run_round(url: str, texts: list[str], args: argparse.Namespace, out: Measured) -> None:
    """args.clients threads send requests until args.requests are done or args.max_seconds pass."""
    lock, counter = threading.Lock(), [0]
    deadline = time.monotonic() + args.max_seconds

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                if counter[0] >= args.requests:
                    return
                i = counter[0]
                counter[0] += 1
            body = {"model": "base", "prompt": texts[i % len(texts)], "temperature": 0, "max_tokens": args.max_tokens}
            t0 = time.perf_counter()
            r = session.post(url + "/v1/completions", json=body, timeout=args.max_seconds)
            with lock:
                if r.status_code == 200:
                    out.latencies.append(time.perf_counter() - t0)
                else:
                    out.errors += 1

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.wall += time.perf_counter() - start


def batching_counts(url: str) -> dict[str, int]:
    return requests.get(url + "/healthz", timeout=30).json()["batching"]


def report(args: argparse.Namespace, results: dict[str, Measured], mean_batch: float) -> None:
    print(f"\nserve load: {args.size} target model, {args.clients} clients, max_tokens {args.max_tokens}, "
          f"{args.rounds} rounds x {args.requests} requests per configuration, 127.0.0.1")
    print(f"{'config':<10} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, m in results.items():
        print(f"{name:<10} {len(m.latencies):>8} {m.errors:>6} {m.throughput:>8.2f} "
              f"{1000 * m.percentile(0.5):>8.0f} {1000 * m.percentile(0.99):>8.0f}")
    b, u = results["batched"], results["unbatched"]
    print(f"\nbatched / unbatched throughput = {b.throughput / u.throughput:.2f}")
    print(f"batched / unbatched latency: p50 {b.percentile(0.5) / u.percentile(0.5):.2f}, "
          f"p99 {b.percentile(0.99) / u.percentile(0.99):.2f} (below 1 = batching is faster)")
    print(f"mean batch size formed by the batched replica: {mean_batch:.1f} (max {args.clients})")


def main() -> None:
    import ray
    from ray import serve

    args = parse_args()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    texts = prompts(args)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        urls = deploy(args, free_port())
        for url in urls.values():  # warm-up: load the model, first batches
            run_round(url, texts, argparse.Namespace(**{**vars(args), "requests": args.clients}), Measured())
        before = batching_counts(urls["batched"])
        results = {name: Measured() for name in urls}
        for r in range(args.rounds):
            order = list(urls) if r % 2 == 0 else list(reversed(urls))
            for name in order:
                run_round(urls[name], texts, args, results[name])
        after = batching_counts(urls["batched"])
        mean_batch = (after["requests"] - before["requests"]) / max(1, after["batches"] - before["batches"])
        report(args, results, mean_batch)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
