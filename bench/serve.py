"""`ditserve serve` under load: open-loop requests at several rates, throughput and latency percentiles.

Starts `python -m ditserve serve` on a free loopback port (or targets --url), warmed up at the bench's size
and steps, then:
  1. capacity: a closed-loop burst (2 x max-batch-size clients back to back) for --probe-seconds gives the
     sustainable request rate C (requests/s);
  2. for each rate (--rates, or the fractions --load of C): an open loop, Poisson arrivals at that rate for
     --duration seconds (the arrival times do not wait for answers, as real clients do not), each request a
     `POST /v1/images/generations` (b64_json, a fresh seed each) answered or failed on its own;
  3. per rate: requests sent, answered 200, errors by status, throughput (answers/s over the time from the
     first send to the last answer), images/s, latency p50/p95/p99/mean/max of the 200s; and the server's own
     stage means (queue, text_encode, denoise, decode, encode) and mean batch size from /metrics.
Prints a table to stderr and ONE JSON line last on stdout.

    python bench/serve.py                                        # CPU: the packaged default model
    python bench/serve.py --model flux.1-dev --load-format dummy --device cuda --size 512x512 --steps 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time

import httpx2
from benchutil import commit, log

URL = "/v1/images/generations"



def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation between order statistics; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class Server:
    """`python -m ditserve serve --port 0 ...` in a subprocess; `url` once it is ready."""

    def __init__(self, args: list[str], ready_timeout: float):
        cmd = [sys.executable, "-m", "ditserve", "serve", "--port", "0", *args]
        log("starting: " + " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url = None
        start = time.monotonic()
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit(f"server exited with {self.proc.wait()}:\n{''.join(self.lines)}")
            self.lines.append(line)
            if m := re.search(r"listening on (http://\S+)", line):
                self.url = m[1]
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        while True:
            try:
                if httpx2.get(self.url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() - start > ready_timeout:
                self.stop()
                raise SystemExit(f"server did not get ready:\n{''.join(self.lines)}")
            time.sleep(0.2)
        self.ready_s = time.monotonic() - start

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def one_request(client: httpx2.AsyncClient, url: str, body: dict, timeout: float) -> tuple[int, float]:
    """(HTTP status or 0 for a transport error, latency s) of one request; the images are read, not decoded."""
    start = time.monotonic()
    try:
        r = await client.post(url + URL, json=body, timeout=timeout)
        await r.aread()
        return r.status_code, time.monotonic() - start
    except httpx2.HTTPError:
        return 0, time.monotonic() - start


def request_body(args, seed: int) -> dict:
    body = {"prompt": "a red circle on a blue background", "n": args.n, "seed": seed,
            "response_format": "b64_json"}
    if args.size:
        body["size"] = args.size
    if args.steps:
        body["num_inference_steps"] = args.steps
    return body


async def closed_loop(url: str, args, clients: int, seconds: float) -> float:
    """Requests/s with `clients` clients each sending back to back for `seconds`."""
    done = 0
    seed = iter(range(10**9, 2 * 10**9))
    deadline = time.monotonic() + seconds

    async def client_loop(client):
        nonlocal done
        while time.monotonic() < deadline:
            status, _ = await one_request(client, url, request_body(args, next(seed)), args.timeout)
            done += status == 200

    start = time.monotonic()
    async with httpx2.AsyncClient(limits=httpx2.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return done / (time.monotonic() - start)


async def open_loop(url: str, args, rate: float, seconds: float, seed: int) -> dict:
    """Poisson arrivals at `rate` req/s for `seconds`; every request is answered (or times out) on its own."""
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < seconds:
        arrivals.append(t)
        t += rng.expovariate(rate)
    results: list[tuple[int, float, float]] = []  # (status, latency, finish time)

    async with httpx2.AsyncClient(limits=httpx2.Limits(max_connections=None, max_keepalive_connections=256)) as c:
        async def fire(i: int) -> None:
            status, latency = await one_request(c, url, request_body(args, seed * 100_000 + i), args.timeout)
            results.append((status, latency, time.monotonic()))

        start = time.monotonic()
        tasks = []
        for i, at in enumerate(arrivals):
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fire(i)))
        await asyncio.gather(*tasks)
    ok = [lat for status, lat, _ in results if status == 200]
    errors: dict[str, int] = {}
    for status, _, _ in results:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    span = (max(f for _, _, f in results) - start) if results else seconds
    r3 = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {
        "rate_rps": round(rate, 3), "sent": len(results), "ok": len(ok), "errors": errors,
        "throughput_rps": round(len(ok) / span, 3), "images_per_s": round(len(ok) * args.n / span, 3),
        "latency_s": {"p50": r3(percentile(ok, 0.5)), "p95": r3(percentile(ok, 0.95)),
                      "p99": r3(percentile(ok, 0.99)), "mean": r3(sum(ok) / len(ok) if ok else None),
                      "max": r3(max(ok) if ok else None)},
    }


def scrape(url: str) -> dict[str, float]:
    """Sums and counts of the server's stage and batch histograms."""
    text = httpx2.get(url + "/metrics", timeout=10).text
    out = {}
    for m in re.finditer(r'^(ditserve_stage_seconds|ditserve_batch_images)_(sum|count)(?:\{stage="(\w+)"\})? (\S+)$',
                         text, re.M):
        name = m[3] or "batch_images"
        out[f"{name}_{m[2]}"] = float(m[4])
    return out


def stage_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    means = {}
    for key in after:
        if key.endswith("_count"):
            name = key[:-len("_count")]
            n = after[key] - before.get(key, 0.0)
            s = after[f"{name}_sum"] - before.get(f"{name}_sum", 0.0)
            means[name] = round(s / n, 4) if n else None
    return means


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="bench a running server instead of starting one")
    p.add_argument("--model", default=None, help="the server's --model (default: the packaged default model)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT of every request (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="steps of every request (default: the model's)")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--rates", default=None, help="comma-separated request rates (req/s); default: --load x capacity")
    p.add_argument("--load", default="0.25,0.5,0.75,1.0,1.25",
                   help="fractions of the measured capacity to run at when --rates is not given")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per rate")
    p.add_argument("--probe-seconds", type=float, default=8.0, help="seconds of the closed-loop capacity probe")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the server's /ready")
    p.add_argument("--output", default=None, help="also write the JSON record to this file")
    args = p.parse_args()

    server = None
    url = args.url
    if url is None:
        # Connections beyond the queue: an open-loop overload is measured at the queue (429), not the connection cap.
        serve_args = ["--load-format", args.load_format, "--max-batch-size", str(args.max_batch_size),
                      "--max-queue", str(args.max_queue), "--request-timeout", str(args.timeout),
                      "--max-connections", str(args.max_queue + 64)]
        for flag, value in (("--model", args.model), ("--device", args.device), ("--dtype", args.dtype),
                            ("--warmup-size", args.size), ("--warmup-steps", args.steps)):
            if value is not None:
                serve_args += [flag, str(value)]
        if args.compile:
            serve_args.append("--compile")
        server = Server(serve_args, args.ready_timeout)
        url = server.url
        log(f"server ready in {server.ready_s:.1f} s at {url}")
    try:
        ready = httpx2.get(url + "/ready", timeout=10).json()
        rec: dict = {"bench": "serve", "commit": commit(), "date": time.strftime("%Y-%m-%d"),
                     "model": ready.get("model"), "load_format": args.load_format, "device": args.device,
                     "size": args.size or ready.get("default_size"), "steps": args.steps or ready.get("default_steps"),
                     "n": args.n, "max_batch_size": args.max_batch_size, "compile": args.compile,
                     "duration_s": args.duration, "server_ready_s": round(server.ready_s, 2) if server else None,
                     "env": {"python": platform.python_version(), "machine": platform.machine(),
                             "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}}
        try:
            import torch

            rec["env"]["torch"] = torch.__version__
            if torch.cuda.is_available():
                rec["env"]["gpu"] = torch.cuda.get_device_name()
        except ImportError:
            pass

        if args.rates:
            rates = [float(r) for r in args.rates.split(",")]
        else:
            clients = 2 * args.max_batch_size
            capacity = asyncio.run(closed_loop(url, args, clients, args.probe_seconds))
            rec["capacity_rps"] = round(capacity, 3)
            log(f"capacity (closed loop, {clients} clients): {capacity:.2f} req/s")
            rates = [round(float(f) * capacity, 3) for f in args.load.split(",")]
        rec["rates_rps"] = rates

        rec["results"] = []
        log(f"{'rate':>8} {'sent':>5} {'ok':>5} {'err':>5} {'thr/s':>7} {'img/s':>7} {'p50':>7} {'p95':>7} "
            f"{'p99':>7} {'batch':>6} {'queue':>7} {'denoise':>8}")
        for i, rate in enumerate(rates):
            before = scrape(url)
            res = asyncio.run(open_loop(url, args, rate, args.duration, seed=i + 1))
            res["server_mean_s"] = stage_means(before, scrape(url))
            rec["results"].append(res)
            lat, m = res["latency_s"], res["server_mean_s"]
            fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            log(f"{rate:>8.2f} {res['sent']:>5} {res['ok']:>5} {sum(res['errors'].values()):>5} "
                f"{res['throughput_rps']:>7.2f} {res['images_per_s']:>7.2f} {fmt(lat['p50']):>7} "
                f"{fmt(lat['p95']):>7} {fmt(lat['p99']):>7} {fmt(m.get('batch_images')):>6} "
                f"{fmt(m.get('queue')):>7} {fmt(m.get('denoise')):>8}")
    finally:
        if server is not None:
            server.stop()
    # Other work on the machine skews a CPU run badly (torch's threads wait on each other): the 1-minute load
    # average after the run should be about what the bench itself makes.
    rec["env"]["loadavg_after"] = os.getloadavg()
    line = json.dumps(rec)
    if args.output:
        with open(args.output, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
