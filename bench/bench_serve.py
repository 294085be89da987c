"""rnngen serve under load: 1, 8 and 32 concurrent streaming clients on loopback.

    python bench/bench_serve.py                      # starts `rnngen serve --model songci` on a free port
    python bench/bench_serve.py --clients 1,8 --chars 100 --repeats 1
    python bench/bench_serve.py --url http://127.0.0.1:8000 --model songci   # a server already running

For each number of clients, every client asks for `--chars` characters at once (stream=true, its
own seed) and reads the server-sent events; the run's aggregate throughput is all characters over
the wall time from the first request to the last [DONE], and each client's time to first character
is from sending its request to the first event that carries text. Figures are the median over
`--repeats` runs. The clients are a small raw-socket HTTP/1.1 reader, so they take little of the
CPU the server shares with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit


async def one_client(host: str, port: int, body: dict, key: str | None, deadline: float) -> tuple[int, float | None]:
    """Stream one completion; returns (characters received, seconds to the first character)."""
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
                  f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload)
    await writer.drain()
    first, chars, buffer = None, 0, b""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), deadline - time.monotonic())
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {(await reader.read(2000)).decode(errors='replace')}")
        chunked = b"transfer-encoding: chunked" in head.lower()
        while True:
            remaining = deadline - time.monotonic()
            if chunked:
                size = int((await asyncio.wait_for(reader.readline(), remaining)).strip() or b"0", 16)
                if size == 0:
                    break
                data = await asyncio.wait_for(reader.readexactly(size + 2), remaining)
                buffer += data[:-2]
            else:
                data = await asyncio.wait_for(reader.read(65536), remaining)
                if not data:
                    break
                buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                for choice in json.loads(event[6:])["choices"]:
                    if choice["text"]:
                        chars += len(choice["text"])
                        if first is None:
                            first = time.perf_counter() - start
    finally:
        writer.close()
    return chars, first


async def run_clients(url: str, clients: int, chars: int, model: str, key: str | None, timeout: float, salt: int):
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    start = time.perf_counter()
    prompts = ["春", "月", "风", "", "我", "花间", "江南", "夜"]
    results = await asyncio.gather(*[
        one_client(parts.hostname, parts.port or 80,
                   {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": chars, "seed": salt * 1000 + i,
                    "stream": True}, key, deadline)
        for i in range(clients)])
    wall = time.perf_counter() - start
    total = sum(c for c, _ in results)
    firsts = [f for _, f in results if f is not None]
    return total / wall, statistics.median(firsts) if firsts else float("nan"), total, wall


def start_server(model: str, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    log = tempfile.NamedTemporaryFile("w+", prefix="rnngen-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "rnngen", "serve", "--model", model, "--port", "0",
                             "--threads", str(threads), *extra], stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = open(log.name, encoding="utf-8").read()
        found = re.search(r"on (http://\S+?)/ ", text)
        if found:
            return proc, found.group(1), log.name
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{open(log.name, encoding='utf-8').read()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--model", default="songci", help="model to serve and ask for (default: the bundled songci)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients per run, comma-separated")
    parser.add_argument("--chars", type=int, default=200, help="characters each client asks for")
    parser.add_argument("--repeats", type=int, default=3, help="runs per number of clients (the median is shown)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds one run may take")
    parser.add_argument("--threads", type=int, default=1, help="the server's --threads")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if not counts or min(counts) < 1 or max(counts) > 256 or not 1 <= args.chars <= 4000 or not 1 <= args.repeats <= 10:
        raise SystemExit("--clients 1..256 each, --chars 1..4000, --repeats 1..10")

    proc = log = None
    url = args.url
    if url is None:
        proc, url, log = start_server(args.model, args.threads, ["--api-key", args.api_key] if args.api_key else [])
    model = args.model if args.url else os.path.basename(os.path.normpath(args.model))
    try:
        asyncio.run(run_clients(url, 2, 20, model, args.api_key, args.timeout, 999))  # warm up
        rows = []
        for clients in counts:
            runs = [asyncio.run(run_clients(url, clients, args.chars, model, args.api_key, args.timeout, r))
                    for r in range(args.repeats)]
            rows.append({"clients": clients, "chars_per_s": statistics.median(r[0] for r in runs),
                         "first_char_ms": statistics.median(r[1] for r in runs) * 1000,
                         "chars": runs[0][2], "runs_chars_per_s": [round(r[0]) for r in runs]})
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
            os.unlink(log)
    base = rows[0]["chars_per_s"] if rows and rows[0]["clients"] == 1 else None
    for row in rows:
        row["vs_one"] = row["chars_per_s"] / base if base else None
    if args.json:
        print(json.dumps({"model": model, "chars_each": args.chars, "repeats": args.repeats, "rows": rows}))
        return
    print(f"{model}: {args.chars} characters per client, streamed; median of {args.repeats} run(s); "
          f"{os.cpu_count()} CPUs")
    print(f"{'clients':>8} {'chars/s':>9} {'vs 1':>6} {'first char (median)':>20}   runs (chars/s)")
    for row in rows:
        vs = f"{row['vs_one']:.2f}x" if row["vs_one"] else "-"
        print(f"{row['clients']:>8} {row['chars_per_s']:>9.0f} {vs:>6} {row['first_char_ms']:>17.0f} ms   "
              f"{row['runs_chars_per_s']}")


if __name__ == "__main__":
    main()
