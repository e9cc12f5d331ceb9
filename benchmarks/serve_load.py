"""Serving throughput and latency: continuous batching vs. unbatched, measured side by side in one run.

What it measures. Two copies of the Serve application run side by side on 127.0.0.1, each with
one model replica holding the built-in benchmark's target model: `continuous` (continuous
batching: a request joins the running decode batch at the next step and leaves it when it
finishes; up to --clients rows) and `unbatched` (`batching.enabled=false`: one request decodes
at a time). N concurrent clients send greedy `/v1/completions` requests (questions of the
benchmark, `--max-tokens` new tokens at most) in a closed loop to one copy, then the other,
alternating for `--rounds` rounds so that outside load falls on both alike; each round is
bounded by `--requests` requests and `--max-seconds` seconds. Below a table of completed requests
per second (pooled over rounds) and p50/p99 latency per configuration, and the mean number of rows
the continuous replica decoded per step, the last line is

    continuous batching / unbatched throughput = X.XX

Ray Serve's own per-request work (HTTP proxy, gateway, the handle call to the model replica) runs
on the same cores as decoding and the load generator; `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` in the
environment (Ray's switch for leaner request handling) is passed to the Ray instance it starts.

`--in-process` runs the same load without Ray and HTTP: the replica's `Scheduler` (continuous:
max_running = clients; unbatched: 1) driven by N asyncio clients in this process, with the torch
threads a replica gets (for when Ray is busy, or to see the decoding engine alone).

    python benchmarks/serve_load.py                          # small model, 32 clients (~3-5 min on 2 cores)
    python benchmarks/serve_load.py --in-process             # the same load on the engine alone (~2 min)
    python benchmarks/serve_load.py --size micro --clients 16 --rounds 1   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass, field

from serve_common import Connection, app_config, deploy, healthz, percentile, private_serve, run_clients
from serve_common import prompts as benchmark_prompts

CONFIGS = ("continuous", "unbatched")


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
        return percentile(self.latencies, q)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", help="built-in benchmark whose target model is served")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--requests", type=int, default=128, help="requests per configuration per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per configuration")
    p.add_argument("--max-seconds", type=float, default=90.0, help="time bound of one round")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request")
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per model replica (torch threads: >= 1)")
    p.add_argument("--in-process", action="store_true", help="drive the Scheduler in process: no Ray, no HTTP")
    p.add_argument("--cache-dir", default="~/.cache/ray_unlearn", help="benchmark cache")
    return p.parse_args()


def prompts(args: argparse.Namespace) -> list[str]:
    return benchmark_prompts(args.size, args.cache_dir)


# ---------------------------------------------------------------- over HTTP, in Ray Serve


def deploy_both(args: argparse.Namespace, port: int) -> dict[str, str]:
    """The continuous and unbatched applications on the running Serve instance; name -> base URL."""
    urls = {}
    for name in CONFIGS:
        urls[name] = deploy(app_config(
            name, {"base": f"builtin:{args.size}:target"}, args.cache_dir, port,
            batching={"enabled": name == "continuous", "max_batch_size": args.clients,
                      "max_queued_requests": 2 * args.clients},
            limits={"max_tokens": max(args.max_tokens, 64)},
            deployment={"num_cpus": args.num_cpus, "max_ongoing_requests": 2 * args.clients}))
    return urls


def http_round(url: str, texts: list[str], args: argparse.Namespace, out: Measured) -> None:
    """args.clients threads send requests until args.requests are done or args.max_seconds pass, each on
    its own keep-alive connection."""
    lock, counter = threading.Lock(), [0]
    deadline = time.monotonic() + args.max_seconds

    def client(_: int) -> None:
        conn = Connection(url, timeout=args.max_seconds)
        while time.monotonic() < deadline:
            with lock:
                if counter[0] >= args.requests:
                    break
                i = counter[0]
                counter[0] += 1
            body = json.dumps({"model": "base", "prompt": texts[i % len(texts)], "temperature": 0,
                               "max_tokens": args.max_tokens})
            t0 = time.perf_counter()
            ok = conn.post("/v1/completions", body)[0] == 200
            with lock:
                if ok:
                    out.latencies.append(time.perf_counter() - t0)
                else:
                    out.errors += 1
        conn.close()

    out.wall += run_clients(args.clients, client)


def batching_stats(url: str) -> dict[str, int]:
    return healthz(url)["batching"]


def run_serve(args: argparse.Namespace, texts: list[str]) -> tuple[dict[str, Measured], dict[str, int]]:
    with private_serve() as port:
        urls = deploy_both(args, port)
        for url in urls.values():  # warm-up: load the model, first steps
            http_round(url, texts, argparse.Namespace(**{**vars(args), "requests": args.clients}), Measured())
        before = batching_stats(urls["continuous"])
        results = {name: Measured() for name in urls}
        for r in range(args.rounds):
            for name in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
                http_round(urls[name], texts, args, results[name])
        after = batching_stats(urls["continuous"])
        return results, {k: after[k] - before[k] for k in ("steps", "row_steps", "requests")} | {
            "largest": after["largest"]}


# ---------------------------------------------------------------- in process: the Scheduler alone


async def engine_round(scheduler, loaded, prompt_ids: list[tuple[int, ...]], args: argparse.Namespace,
                       out: Measured) -> None:
    """args.clients asyncio clients stream requests through `scheduler` until args.requests are done."""
    from ray_unlearn.serving.engine import GenerationRequest, SamplingParams

    counter = [0]
    deadline = time.monotonic() + args.max_seconds
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)

    async def client() -> None:
        while time.monotonic() < deadline and counter[0] < args.requests:
            i = counter[0]
            counter[0] += 1
            t0 = time.perf_counter()
            request = GenerationRequest("base", prompt_ids[i % len(prompt_ids)], params)
            result = await scheduler.complete(loaded, request)
            if result.error is None:
                out.latencies.append(time.perf_counter() - t0)
            else:
                out.errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.clients)))
    out.wall += time.perf_counter() - start


def run_in_process(args: argparse.Namespace, texts: list[str]) -> tuple[dict[str, Measured], dict[str, int]]:
    import torch

    from ray_unlearn.data.collate import prompt_format, stop_token_ids
    from ray_unlearn.models.io import load_model, load_tokenizer
    from ray_unlearn.serving.config import resolve_models, serve_config_from_dict
    from ray_unlearn.serving.engine import LoadedModel, render_completion
    from ray_unlearn.serving.scheduler import Scheduler

    torch.set_num_threads(max(1, int(args.num_cpus)))  # as ModelServer does
    cfg = serve_config_from_dict({"models": {"base": f"builtin:{args.size}:target"},
                                  "benchmark": {"cache_dir": args.cache_dir}})
    path = resolve_models(cfg)["base"]
    model, tokenizer = load_model(path).eval(), load_tokenizer(path)  # as ModelServer._load_sync
    loaded = LoadedModel(model, tokenizer, stop_token_ids(tokenizer, prompt_format(cfg, prefix="")))
    prompt_ids = [tuple(render_completion(tokenizer, t)) for t in texts]
    schedulers = {"continuous": Scheduler(args.clients, 2 * args.clients), "unbatched": Scheduler(1, 2 * args.clients)}

    async def main() -> dict[str, Measured]:
        for s in schedulers.values():  # warm-up
            await engine_round(s, loaded, prompt_ids, argparse.Namespace(**{**vars(args), "requests": args.clients}),
                               Measured())
        before = dict(schedulers["continuous"].stats())
        results = {name: Measured() for name in CONFIGS}
        for r in range(args.rounds):
            for name in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
                await engine_round(schedulers[name], loaded, prompt_ids, args, results[name])
        after = schedulers["continuous"].stats()
        for s in schedulers.values():
            await s.close()
        return results, {k: after[k] - before[k] for k in ("steps", "row_steps", "requests")} | {
            "largest": after["largest"]}

    return asyncio.run(main())


# ---------------------------------------------------------------- report


def report(args: argparse.Namespace, results: dict[str, Measured], rows: dict[str, int]) -> None:
    import torch

    where = ("in process: the Scheduler driven by asyncio clients, no Ray, no HTTP" if args.in_process else
             "Ray Serve over HTTP on 127.0.0.1, RAY_SERVE_THROUGHPUT_OPTIMIZED="
             f"{os.environ.get('RAY_SERVE_THROUGHPUT_OPTIMIZED', '0')}")
    print(f"\nserve load: {args.size} target model, {args.clients} clients, max_tokens {args.max_tokens}, greedy, "
          f"{args.rounds} rounds x {args.requests} requests per configuration; {where}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; replica torch threads "
          f"{max(1, int(args.num_cpus))}; torch {torch.__version__}")
    print(f"{'config':<11} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, m in results.items():
        print(f"{name:<11} {len(m.latencies):>8} {m.errors:>6} {m.throughput:>8.2f} "
              f"{1000 * m.percentile(0.5):>8.0f} {1000 * m.percentile(0.99):>8.0f}")
    c, u = results["continuous"], results["unbatched"]
    print(f"\ncontinuous / unbatched latency: p50 {c.percentile(0.5) / u.percentile(0.5):.2f}, "
          f"p99 {c.percentile(0.99) / u.percentile(0.99):.2f} (below 1 = continuous batching is faster)")
    print(f"rows per decode step of the continuous replica: mean {rows['row_steps'] / max(1, rows['steps']):.1f}, "
          f"largest {rows['largest']} (max {args.clients}); {rows['steps']} steps for {rows['requests']} requests")
    print(f"continuous batching / unbatched throughput = {c.throughput / u.throughput:.2f}")


def main() -> None:
    args = parse_args()
    args.cache_dir = os.path.expanduser(args.cache_dir)
    texts = prompts(args)
    results, rows = (run_in_process if args.in_process else run_serve)(args, texts)
    report(args, results, rows)


if __name__ == "__main__":
    main()
