"""Serving soak: N clients for M minutes against the project's Serve application; errors, latency and the
replicas' memory per minute.

What it runs. The Serve application of `ray-unlearn serve` (`serve.build_app`: the FastAPI gateway and
one model replica), in a private Ray instance on 127.0.0.1, serving two models of a built-in
benchmark: `base` (its target model) and `retain` (its retain model, standing in for an unlearned
checkpoint: multiplexed in the same replica). Continuous batching with up to --clients rows.
After a warm-up (each kind of request once per model), --clients threads, each with one keep-alive
connection, send requests in a closed loop for --minutes minutes, drawn at random (seeded per
client) from this mix:

- 30 % `/v1/completions` (a benchmark question, max_tokens 16),
- 30 % `/v1/chat/completions` (the question as a user message, max_completion_tokens 16),
- 30 % the same chat request with `stream: true` (server-sent events, read to `[DONE]`),
- 10 % `/v1/verify` of `retain` against `base` on 4 question/answer items;

generation requests go to either model, half of them greedy and half sampled (temperature 0.8,
top_p 0.95, a seed). A request is an error unless it is answered 200 with a well-formed body (a
stream: `[DONE]` and no error event).

What it prints. A line per minute: requests completed in that minute, errors, p50/p99 latency (of
the whole response, a stream's included), and the resident set (RSS) of every Serve process at the
minute's end: the model replica(s) and the gateway replica(s), and the HTTP proxy and the Serve
controller. The processes are found through Ray's public state API
(`ray.util.state.list_actors`: class name and PID of each alive actor; it queries the dashboard's
HTTP server, which this script starts on 127.0.0.1), their RSS read with psutil.
RSS growth of a process = its largest RSS at the end of minutes 2..M over its RSS at the end of
minute 1, minus 1 (the first minute includes allocator and cache warm-up). The last line is

    soak: R requests, E errors, replica RSS growth after minute 1: +X.X %

with the largest growth over the replica processes (model replicas and gateways); the exit status is 1
when E > 0 or that growth is above 10 %. `--out` receives results.json (every figure), results.md
(the tables) and soak.png (requests, latency and RSS per minute).

    python benchmarks/serve_soak.py                                       # small, 32 clients x 5 min
    python benchmarks/serve_soak.py --model micro --clients 8 --minutes 2  # quick look, ~3 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve_common import Connection, app_config, deploy, percentile, private_serve, questions, run_clients, wait_ready

KINDS = {"completion": 0.3, "chat": 0.3, "stream": 0.3, "verify": 0.1}  # the request mix
MODELS = ("base", "retain")
MAX_TOKENS = 16
VERIFY_ITEMS = 4
GROWTH_LIMIT = 0.10
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", choices=("micro", "small"), help="built-in benchmark whose models "
                                                                               "are served")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--minutes", type=int, default=5, help="length of the soak (>= 2: growth is measured after "
                                                           "minute 1)")
    p.add_argument("--out", default="runs/bench_serve_soak", help="output directory")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per model replica (torch threads: >= 1)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take before it is an error")
    p.add_argument("--seed", type=int, default=0, help="seed of the clients' request mix")
    p.add_argument("--cache-dir", default=os.environ.get("RAY_UNLEARN_TEST_CACHE", "~/.cache/ray_unlearn"),
                   help="benchmark cache (default: $RAY_UNLEARN_TEST_CACHE, else ~/.cache/ray_unlearn)")
    args = p.parse_args(argv)
    if args.minutes < 2:
        p.error("--minutes must be >= 2: RSS growth is measured against the end of minute 1")
    if args.clients < 1:
        p.error("--clients must be >= 1")
    return args


# ---------------------------------------------------------------- pure helpers


@dataclass
class Outcome:
    """One finished request: when it finished (s since the soak started), its kind, whether it succeeded,
    its latency (s) and, for an error, what was answered."""

    end: float
    kind: str
    ok: bool
    latency: float
    error: str = ""


def minute_of(t: float, minutes: int) -> int:
    """The 0-based minute a request finishing at t seconds belongs to; requests in flight at the end count
    in the last minute."""
    return min(minutes - 1, max(0, int(t // 60)))


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """Requests, errors and p50/p99 latency (s, successful requests only) of a set of outcomes."""
    ok = [o.latency for o in outcomes if o.ok]
    return {"requests": len(outcomes), "errors": len(outcomes) - len(ok),
            "p50_s": percentile(ok, 0.5), "p99_s": percentile(ok, 0.99)}


def per_minute(outcomes: list[Outcome], minutes: int) -> list[dict[str, Any]]:
    """`summarize` of each minute's outcomes, minute 1..minutes."""
    buckets: list[list[Outcome]] = [[] for _ in range(minutes)]
    for o in outcomes:
        buckets[minute_of(o.end, minutes)].append(o)
    return [{"minute": m + 1, **summarize(b)} for m, b in enumerate(buckets)]


def growth(rss: list[int]) -> float:
    """Growth of a process's RSS after minute 1: max(rss[2:]) / rss[1] - 1, where rss[k] is the RSS at the
    end of minute k (rss[0]: at the start). Needs the end of minute 2 at least."""
    if len(rss) < 3:
        raise ValueError(f"growth needs RSS at the start and at the end of minutes 1 and 2, got {len(rss)} values")
    return max(rss[2:]) / rss[1] - 1 if rss[1] else float("inf")  # 0: the process was gone


def fmt_ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{1000 * seconds:.0f}"


# ---------------------------------------------------------------- requests


def request_body(kind: str, rng: random.Random, items: list[dict[str, str]]) -> tuple[str, str]:
    """(path, JSON body) of one request of `kind`, with a random question, model and sampling."""
    item = rng.choice(items)
    model = rng.choice(MODELS)
    sampling = {"temperature": 0} if rng.random() < 0.5 else {
        "temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(2**32)}
    if kind == "completion":
        body = {"model": model, "prompt": f"Question: {item['question']}\nAnswer:", "max_tokens": MAX_TOKENS,
                **sampling}
        return "/v1/completions", json.dumps(body)
    if kind in ("chat", "stream"):
        body = {"model": model, "messages": [{"role": "user", "content": item["question"]}],
                "max_completion_tokens": MAX_TOKENS, "stream": kind == "stream", **sampling}
        return "/v1/chat/completions", json.dumps(body)
    body = {"model": "retain", "items": rng.sample(items, min(VERIFY_ITEMS, len(items)))}
    return "/v1/verify", json.dumps(body)


def check_response(kind: str, status: int, raw: bytes) -> str:
    """'' when the response is a success of its kind, else what was wrong (status and the body's start)."""
    text = raw.decode("utf-8", "replace")
    if status != 200:
        return f"{status}: {text[:200]}"
    if kind == "stream":
        events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"stream without [DONE]: {text[-200:]}"
        bad = [e for e in events if e.startswith('{"error"')]
        return f"error event: {bad[0][:200]}" if bad else ""
    try:
        body = json.loads(text)
    except ValueError:
        return f"not JSON: {text[:200]}"
    expected = "verdict" if kind == "verify" else "choices"
    return "" if expected in body else f"no {expected!r}: {text[:200]}"


class Load:
    """The clients' shared state: the outcomes so far and the soak's clock."""

    def __init__(self, url: str, args: argparse.Namespace, items: list[dict[str, str]]) -> None:
        self.url, self.args, self.items = url, args, items
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.start = self.deadline = 0.0

    def one(self, conn: Connection, kind: str, rng: random.Random) -> Outcome:
        path, body = request_body(kind, rng, self.items)
        t0 = time.monotonic()
        error = check_response(kind, *conn.post(path, body))
        t1 = time.monotonic()
        return Outcome(t1 - self.start, kind, not error, t1 - t0, error)

    def client(self, i: int) -> None:
        rng = random.Random(self.args.seed * 100_003 + i)
        conn = Connection(self.url, self.args.timeout)
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < self.deadline:
            outcome = self.one(conn, rng.choices(kinds, weights)[0], rng)
            with self.lock:
                self.outcomes.append(outcome)
        conn.close()

    def warm_up(self) -> list[str]:
        """Each kind of request once per model (loads both models in the replica); the errors."""
        conn, rng, errors = Connection(self.url, self.args.timeout), random.Random(-1), []
        self.start = time.monotonic()
        for kind in KINDS:
            for _ in MODELS:
                o = self.one(conn, kind, rng)
                errors += [] if o.ok else [f"{kind}: {o.error}"]
        conn.close()
        return errors

    def run(self, minutes: int) -> threading.Thread:
        """Start the clients for `minutes` minutes in the background; the thread that joins them."""
        self.start = time.monotonic()
        self.deadline = self.start + 60 * minutes
        t = threading.Thread(target=run_clients, args=(self.args.clients, self.client), daemon=True)
        t.start()
        return t

    def snapshot(self) -> list[Outcome]:
        with self.lock:
            return list(self.outcomes)


# ---------------------------------------------------------------- Serve's processes


ROLES = {"ModelServer": "model replica", "Gateway": "gateway", "ProxyActor": "proxy",
         "ServeController": "controller"}  # the last part of a Serve actor's class name -> its role here


def serve_processes() -> dict[str, int]:
    """Label -> PID of every alive Serve actor (model replicas, gateways, proxy, controller), from Ray's state
    API (`list_actors`: class name and PID). Labels: `model replica 1`, `gateway 1`, `proxy`, `controller`
    (numbered when there are several)."""
    from ray.util.state import list_actors

    found: dict[str, list[int]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False):
        role = ROLES.get(actor.class_name.rsplit(":", 1)[-1])
        if role and actor.pid:
            found.setdefault(role, []).append(actor.pid)
    return process_labels(found)


def process_labels(found: dict[str, list[int]]) -> dict[str, int]:
    """Role -> PIDs as label -> PID: `proxy` alone, `model replica 1`, `model replica 2`, ... (ordered by role)."""
    labels = {}
    for role in ROLES.values():
        pids = sorted(found.get(role, []))
        for n, pid in enumerate(pids, 1):
            labels[role if role in ("proxy", "controller") and len(pids) == 1 else f"{role} {n}"] = pid
    return labels


def is_replica(label: str) -> bool:
    return label.startswith(("model replica", "gateway"))


def sample_rss(pids: dict[str, int]) -> dict[str, int]:
    """Label -> RSS in bytes now (0 for a process that is gone)."""
    import psutil

    out = {}
    for label, pid in pids.items():
        try:
            out[label] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            out[label] = 0
    return out


# ---------------------------------------------------------------- the soak


def app(args: argparse.Namespace, port: int) -> dict[str, Any]:
    """The SERVE.yaml mapping of the soaked application: base and retain models, batching up to --clients."""
    models = {m: f"builtin:{args.model}:{'target' if m == 'base' else m}" for m in MODELS}
    return app_config("soak", models, args.cache_dir, port,
                      batching={"max_batch_size": args.clients, "max_queued_requests": 2 * args.clients},
                      deployment={"num_cpus": args.num_cpus, "max_ongoing_requests": 2 * args.clients})


def minute_line(row: dict[str, Any], minutes: int, rss: dict[str, int]) -> str:
    memory = ", ".join(f"{label} {value / MIB:.1f}" for label, value in rss.items())
    return (f"minute {row['minute']}/{minutes}: {row['requests']} requests, {row['errors']} errors, "
            f"p50 {fmt_ms(row['p50_s'])} ms, p99 {fmt_ms(row['p99_s'])} ms | RSS MiB: {memory}")


def soak(args: argparse.Namespace, items: list[dict[str, str]]) -> dict[str, Any]:
    """Deploy, warm up, run the clients for --minutes minutes printing a line per minute; every figure."""
    with private_serve(dashboard=True) as port:  # the state API needs the dashboard's server
        url = deploy(app(args, port))
        wait_ready(url)
        load = Load(url, args, items)
        warm_errors = load.warm_up()
        for e in warm_errors:
            print(f"warm-up error (not counted): {e}", file=sys.stderr)
        pids = serve_processes()
        rss = {label: [value] for label, value in sample_rss(pids).items()}
        print(f"soak: {args.model} models (base, retain), {args.clients} clients x {args.minutes} min on {url}; "
              f"processes: {', '.join(f'{k} (pid {v})' for k, v in pids.items())}", flush=True)
        clients = load.run(args.minutes)
        for m in range(1, args.minutes + 1):
            time.sleep(max(0.0, load.start + 60 * m - time.monotonic()))
            for label, value in sample_rss(pids).items():
                rss[label].append(value)
            if m == args.minutes:
                clients.join()  # the requests in flight at the end count in the last minute
            row = per_minute(load.snapshot(), args.minutes)[m - 1]
            print(minute_line(row, args.minutes, {k: v[-1] for k, v in rss.items()}), flush=True)
        try:
            changed = sorted(k for k, v in serve_processes().items() if pids.get(k) != v)
        except Exception as e:  # noqa: BLE001 - keep the figures measured so far
            changed = [f"unknown ({type(e).__name__}: {e})"]
    return {"url": url, "pids": pids, "rss": rss, "outcomes": load.snapshot(), "warm_up_errors": warm_errors,
            "restarted": changed}


def results_of(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    """The figures written to results.json (the outcomes reduced to per-minute and per-kind summaries)."""
    import torch

    outcomes: list[Outcome] = run["outcomes"]
    growths = {label: growth(series) for label, series in run["rss"].items()}
    replica_growth = max(g for label, g in growths.items() if is_replica(label))
    errors = [asdict(o) for o in outcomes if not o.ok]
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": {**vars(args), "mix": KINDS, "models": MODELS, "max_tokens": MAX_TOKENS,
                   "verify_items": VERIFY_ITEMS},
        "machine": {"cores": os.cpu_count(), "load_average_end": os.getloadavg()[0], "torch": torch.__version__},
        "url": run["url"], "pids": run["pids"],
        "total": summarize(outcomes),
        "by_kind": {k: summarize([o for o in outcomes if o.kind == k]) for k in KINDS},
        "per_minute": [{**row, "rss_bytes": {label: s[row["minute"]] for label, s in run["rss"].items()}}
                       for row in per_minute(outcomes, args.minutes)],
        "rss_bytes_start": {label: s[0] for label, s in run["rss"].items()},
        "rss_growth_after_minute_1": growths,
        "replica_rss_growth": replica_growth,
        "errors": len(errors), "first_errors": errors[:20],
        "warm_up_errors": run["warm_up_errors"], "restarted": run["restarted"],
    }


def markdown(res: dict[str, Any]) -> str:
    c, labels = res["config"], list(res["rss_bytes_start"])
    lines = [f"# Serve soak, {res['date']}", "",
             f"`{c['model']}` models (base, retain), {c['clients']} clients x {c['minutes']} min on 127.0.0.1; "
             f"{res['machine']['cores']} cores, load average {res['machine']['load_average_end']:.1f} at the end.", "",
             "| minute | requests | errors | p50 ms | p99 ms | " + " | ".join(f"{k} MiB" for k in labels) + " |",
             "|---" * (5 + len(labels)) + "|"]
    for row in res["per_minute"]:
        lines.append(f"| {row['minute']} | {row['requests']} | {row['errors']} | {fmt_ms(row['p50_s'])} | "
                     f"{fmt_ms(row['p99_s'])} | " + " | ".join(f"{row['rss_bytes'][k] / MIB:.1f}" for k in labels)
                     + " |")
    lines += ["", "| kind | requests | errors | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for kind, s in res["by_kind"].items():
        lines.append(f"| {kind} | {s['requests']} | {s['errors']} | {fmt_ms(s['p50_s'])} | {fmt_ms(s['p99_s'])} |")
    lines += ["", "RSS growth after minute 1 (largest at the end of minutes 2.., over the end of minute 1): "
              + ", ".join(f"{k} {g:+.1%}" for k, g in res["rss_growth_after_minute_1"].items()), ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["per_minute"]
    minutes = [r["minute"] for r in rows]
    fig, (ax_n, ax_lat, ax_rss) = plt.subplots(1, 3, figsize=(15, 4))
    ax_n.bar(minutes, [r["requests"] for r in rows], label="requests")
    ax_n.bar(minutes, [r["errors"] for r in rows], color="red", label="errors")
    ax_n.set(xlabel="minute", ylabel="requests", title="requests per minute")
    ax_n.legend()
    for q in ("p50", "p99"):
        ax_lat.plot(minutes, [1000 * r[f"{q}_s"] for r in rows], marker="o", label=q)
    ax_lat.set(xlabel="minute", ylabel="latency (ms)", title="latency", ylim=(0, None))
    ax_lat.legend()
    starts = res["rss_bytes_start"]
    for label in starts:
        ax_rss.plot([0] + minutes, [starts[label] / MIB] + [r["rss_bytes"][label] / MIB for r in rows], marker="o",
                    label=label)
    ax_rss.set(xlabel="minute (end of)", ylabel="RSS (MiB)", title="RSS of Serve's processes", ylim=(0, None))
    ax_rss.legend(fontsize="small")
    for ax in (ax_n, ax_lat, ax_rss):
        ax.set_xticks([0] + minutes if ax is ax_rss else minutes)
    fig.suptitle(f"serve soak: {res['config']['model']}, {res['config']['clients']} clients")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.cache_dir = os.path.expanduser(args.cache_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = results_of(args, soak(args, questions(args.model, args.cache_dir)))
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    plot(res, out / "soak.png")
    print(markdown(res).split("\n\n", 2)[2].rstrip())
    for e in res["first_errors"][:5]:
        print(f"error: {e['kind']} at {e['end']:.1f} s: {e['error']}")
    if res["restarted"]:
        print(f"restarted during the soak (new PID): {', '.join(res['restarted'])}")
    print(f"outputs: {out}/results.json, results.md, soak.png")
    t, g = res["total"], res["replica_rss_growth"]
    print(f"soak: {t['requests']} requests, {t['errors']} errors, replica RSS growth after minute 1: {100 * g:+.1f} %")
    return 1 if t["errors"] or g > GROWTH_LIMIT or res["restarted"] else 0


if __name__ == "__main__":
    sys.exit(main())
