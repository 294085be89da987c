"""rnngen serve under load: 1, 8 and 32 concurrent streaming clients on loopback.

    python bench/bench_serve.py                      # starts `rnngen serve --model songci` on a free port
    python bench/bench_serve.py --clients 1,8 --chars 100 --repeats 1
    python bench/bench_serve.py --url http://127.0.0.1:8000 --model songci   # a server already running
    python bench/bench_serve.py --stall-only         # only the stall case (under a minute)

For each number of clients, every client asks for `--chars` characters at once (stream=true, its
own seed) and reads the server-sent events; the run's aggregate throughput is all characters over
the wall time from the first request to the last [DONE], and each client's time to first character
is from sending its request to the first event that carries text. Figures are the median over
`--repeats` runs. The clients are a small raw-socket HTTP/1.1 reader, so they take little of the
CPU the server shares with them.

The stall case: one client streams `--stall-tokens` characters; once it has had `--stall-lead`
events, a second request joins with a `--stall-prompt`-character prompt (a line of 宋词 repeated)
and n `--stall-n` (20 characters each, streamed), within the server's default limits. The figures
are the running stream's median gap between two events before the join, its worst gap from the
join until the joining request has ended (a prompt read all at once shows here as one long gap),
and the joining request's time to its first character and to its end.
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


async def one_client(host: str, port: int, body: dict, key: str | None, deadline: float,
                     arrivals: list[float] | None = None) -> tuple[int, float | None]:
    """Stream one completion; returns (characters received, seconds to the first character).
    `arrivals` gets the time.perf_counter() at which each event (other than [DONE]) was read."""
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
            now = time.perf_counter()
            for event in events:
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                if arrivals is not None:
                    arrivals.append(now)
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


STALL_LINE = "明月几时有，把酒问青天。不知天上宫阙，今夕是何年。"  # 苏轼《水调歌头》: characters songci knows


async def run_stall(url: str, model: str, key: str | None, timeout: float, prompt_chars: int, n: int,
                    tokens: int, lead: int) -> dict:
    """One stream running, then a request with a long prompt and n choices joins; the running
    stream's gaps between events before and while it joins, and the joining request's times."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    deadline = time.monotonic() + timeout
    arrivals: list[float] = []
    running = asyncio.create_task(one_client(
        host, port, {"model": model, "prompt": "春", "max_tokens": tokens, "seed": 1, "stream": True}, key, deadline,
        arrivals))
    try:
        while len(arrivals) < lead:  # the running stream is well under way before anyone joins
            if running.done():
                running.result()
                raise RuntimeError(f"the running stream ended after {len(arrivals)} events; raise --stall-tokens")
            await asyncio.sleep(0.005)
        prompt = (STALL_LINE * (prompt_chars // len(STALL_LINE) + 1))[:prompt_chars]
        joined = time.perf_counter()
        _, first = await one_client(host, port, {"model": model, "prompt": prompt, "n": n, "max_tokens": 20,
                                                 "seed": 2, "stream": True}, key, deadline)
        ended = time.perf_counter()
        seen = len(arrivals)  # the gap that spans the joining request's end counts too: wait for one more event
        while len(arrivals) == seen and not running.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        cut_short = running.done()  # the running stream ended before the window did
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    gaps = [(a, b - a) for a, b in zip(arrivals, arrivals[1:])]
    before = [g for a, g in gaps if a + g <= joined]
    during = [g for a, g in gaps if a + g > joined and a < ended]
    return {"prompt_chars": prompt_chars, "n": n, "lead_events": lead,
            "median_gap_before_ms": statistics.median(before) * 1000 if before else float("nan"),
            "worst_gap_during_ms": max(during) * 1000 if during else float("nan"),
            "gaps_during": len(during),
            "first_char_ms": first * 1000 if first is not None else float("nan"),
            "end_ms": (ended - joined) * 1000, "running_ended_early": cut_short}


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
    parser.add_argument("--stall-only", action="store_true", help="run only the stall case")
    parser.add_argument("--stall-prompt", type=int, default=4000,
                        help="characters in the joining request's prompt (0: no stall case; default: 4000)")
    parser.add_argument("--stall-n", type=int, default=16, help="the joining request's n (default: 16)")
    parser.add_argument("--stall-tokens", type=int, default=2000, help="characters the running stream asks for")
    parser.add_argument("--stall-lead", type=int, default=200, help="events the running stream has before the join")
    args = parser.parse_args()
    counts = [] if args.stall_only else [int(c) for c in args.clients.split(",")]
    if (not args.stall_only and not counts) or min(counts, default=1) < 1 or max(counts, default=1) > 256 \
            or not 1 <= args.chars <= 4000 or not 1 <= args.repeats <= 10:
        raise SystemExit("--clients 1..256 each, --chars 1..4000, --repeats 1..10")
    if args.stall_only and args.stall_prompt < 1:
        raise SystemExit("--stall-only needs --stall-prompt 1 or more")
    if args.stall_prompt < 0 or args.stall_n < 1 or args.stall_lead < 2 or args.stall_tokens <= args.stall_lead:
        raise SystemExit("--stall-prompt 0 or more, --stall-n 1 or more, --stall-lead 2 or more, "
                         "--stall-tokens above --stall-lead")

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
        stall = None
        if args.stall_prompt:
            stall = asyncio.run(run_stall(url, model, args.api_key, args.timeout, args.stall_prompt, args.stall_n,
                                          args.stall_tokens, args.stall_lead))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
            os.unlink(log)
    base = rows[0]["chars_per_s"] if rows and rows[0]["clients"] == 1 else None
    for row in rows:
        row["vs_one"] = row["chars_per_s"] / base if base else None
    if args.json:
        print(json.dumps({"model": model, "chars_each": args.chars, "repeats": args.repeats, "rows": rows,
                          "stall": stall}))
        return
    if rows:
        print(f"{model}: {args.chars} characters per client, streamed; median of {args.repeats} run(s); "
              f"{os.cpu_count()} CPUs")
        print(f"{'clients':>8} {'chars/s':>9} {'vs 1':>6} {'first char (median)':>20}   runs (chars/s)")
    for row in rows:
        vs = f"{row['vs_one']:.2f}x" if row["vs_one"] else "-"
        print(f"{row['clients']:>8} {row['chars_per_s']:>9.0f} {vs:>6} {row['first_char_ms']:>17.0f} ms   "
              f"{row['runs_chars_per_s']}")
    if stall:
        print(f"{model} stall: a stream running ({args.stall_tokens} characters asked); after {args.stall_lead} "
              f"events a request joins with a {stall['prompt_chars']}-character prompt and n {stall['n']}; "
              f"{os.cpu_count()} CPUs")
        print(f"  running stream, median gap between events before the join: {stall['median_gap_before_ms']:9.1f} ms")
        print(f"  running stream, worst gap between events while it joins:   {stall['worst_gap_during_ms']:9.1f} ms"
              f"   ({stall['gaps_during']} gaps{'; the stream ended first' if stall['running_ended_early'] else ''})")
        print(f"  joining request, time to its first character:             {stall['first_char_ms']:9.1f} ms")
        print(f"  joining request, time to its end (20 characters each):    {stall['end_ms']:9.1f} ms")


if __name__ == "__main__":
    main()
