"""Load benchmark of `mrtune serve`: rows/s and latency with 1, 8, 32 and 64 concurrent clients.

    python -m bench.load --run runs/demo                    # starts `mrtune serve runs/demo` itself (CPU or GPU)
    python -m bench.load --url http://127.0.0.1:8000        # a server already running (--api-key if it needs one)
    python -m bench.load --run runs/demo --clients 1 8 --seconds 20 --json load.json

Each client is closed-loop: it sends `POST /v1/parse` with `--rows` sentences of the ViGGO test split, waits for the
answer, and sends the next, until the level's `--seconds` are up (requests then in flight finish and count).
rows/s = rows answered / (last answer - start); latency is per request, from send to answer. The mean batch comes
from the server's own /metrics (rows per decoded batch), showing how far dynamic batching pooled the clients.
Prints a Markdown table (the BENCHMARKS.md section) and, with --json, writes every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from mrtune.task.data import load_split


def start_server(run: str, max_batch: int | None, timeout_s: float, log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "mrtune", "serve", run, "--port", "0", "--log-level", "warning"]
    command += ["--timeout", str(timeout_s)]  # the server answers 504 after this: as long as the client waits
    if max_batch is not None:
        command += ["--max-batch", str(max_batch)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 600  # loading a model (and converting the embedded GGUF once) takes a while
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}:\n{log.read_text()}")
        found = re.search(r"on (http://\S+) \(", log.read_text())
        if found:
            try:
                httpx.get(found.group(1) + "/health", timeout=5).raise_for_status()
                return process, found.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server did not start within 600 s:\n{log.read_text()}")


async def batch_totals(client: httpx.AsyncClient) -> tuple[float, float]:
    """(rows decoded, batches decoded) so far, from the server's /metrics."""
    text = (await client.get("/metrics")).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    return values.get("mrtune_batch_size_sum", 0.0), values.get("mrtune_batch_size_count", 0.0)


async def level(client: httpx.AsyncClient, sentences: list[str], clients: int, rows: int, seconds: float) -> dict:
    """One concurrency level: `clients` closed-loop clients for `seconds`."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    rows_before, batches_before = await batch_totals(client)
    started = time.perf_counter()
    deadline = started + seconds
    last_answer = started

    async def one_client(index: int) -> None:
        nonlocal errors, last_answer
        position = index * 7  # clients start at different sentences
        while time.perf_counter() < deadline:
            chunk = [sentences[(position + i) % len(sentences)] for i in range(rows)]
            position += rows
            sent = time.perf_counter()
            response = await client.post("/v1/parse", json={"sentences": chunk})
            answered = time.perf_counter()
            if response.status_code != 200:
                kind = f"{response.status_code} {response.text[:200]}"
                errors[kind] = errors.get(kind, 0) + 1
                continue
            latencies.append(answered - sent)
            last_answer = max(last_answer, answered)

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    rows_after, batches_after = await batch_totals(client)
    elapsed = last_answer - started
    if not latencies:
        raise SystemExit(f"no request of the {clients}-client level was answered: {errors}")
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    batches = batches_after - batches_before
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "rows": len(latencies) * rows,
        "seconds": round(elapsed, 2),
        "rows_per_s": round(len(latencies) * rows / elapsed, 3) if elapsed > 0 else 0.0,
        "p50_ms": round(1000 * p50),
        "p95_ms": round(1000 * p95),
        "p99_ms": round(1000 * p99),
        "mean_batch": round((rows_after - rows_before) / batches, 2) if batches else None,
    }


def markdown(results: list[dict], health: dict, rows: int) -> str:
    base = results[0]["rows_per_s"] if results and results[0]["rows_per_s"] else None
    lines = [
        f"Model `{health['model']}` on {health['device']}, batches of up to {health['max_batch']}, "
        f"{rows} sentence(s) per request.",
        "",
        "| clients | requests | rows/s | vs 1 client | p50 ms | p95 ms | p99 ms | mean batch | errors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ratio = f"{r['rows_per_s'] / base:.1f}x" if base else "-"
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['rows_per_s']:.2f} | {ratio} | {r['p50_ms']} | {r['p95_ms']} "
            f"| {r['p99_ms']} | {r['mean_batch']} | {r['errors']} |"
        )
    return "\n".join(lines)


async def run_levels(args, url: str) -> tuple[list[dict], dict]:
    sentences = [e.sentence for e in load_split(args.data, output_field=None)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.clients) + 4, max_keepalive_connections=max(args.clients) + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as client:
        health = (await client.get("/health")).json()
        for _ in range(2):  # warm-up: first-call costs (allocations, mask tables) stay out of the numbers
            (await client.post("/v1/parse", json={"sentences": sentences[:4]})).raise_for_status()
        results = []
        for clients in args.clients:
            results.append(await level(client, sentences, clients, args.rows, args.seconds))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results, health


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--run", help="start `mrtune serve RUN` for the benchmark (stopped at the end)")
    target.add_argument("--url", help="benchmark a server already running at this URL")
    parser.add_argument("--api-key", default=os.environ.get("MRTUNE_API_KEY"), help="for --url (default: env)")
    parser.add_argument("--max-batch", type=int, help="--max-batch for the started server (default eval.batch_size)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each level")
    parser.add_argument("--rows", type=int, default=1, help="sentences per request")
    parser.add_argument("--data", default="viggo:test", help="where the sentences come from")
    parser.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, in seconds")
    parser.add_argument("--json", help="write the results (and the machine) to this JSON file")
    args = parser.parse_args()

    process = None
    if args.run:
        log = Path(tempfile.mkdtemp(prefix="mrtune-load-")) / "server.log"
        process, url = start_server(args.run, args.max_batch, args.timeout, log)
    else:
        url = args.url.rstrip("/")
    try:
        results, health = asyncio.run(run_levels(args, url))
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
    print(markdown(results, health, args.rows))
    print(f"\nmachine: {machine}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "server": health, "levels": results}, indent=1))


if __name__ == "__main__":
    main()
