"""Soak: 10,000 mixed requests through plano; its memory and open file descriptors must stay flat.

plano runs as `python -m plano up` in front of the stand-in OpenAI provider from
`bench/overhead.py`. The mix: Anthropic and OpenAI requests, streaming and not, clients that hang
up mid-stream, invalid bodies (400), and upstream failures (the stand-in answers 500 or 429). Every
answer is checked. plano's RSS (/proc/PID/status VmRSS) and open descriptors (/proc/PID/fd) are
read after a warm-up and at checkpoints, each time with the load paused and client connections
closed, so the numbers compare like with like.

    python bench/soak.py [--requests 10000] [--concurrency 20]

The same plan runs twice, one plano after the other: with the usage ledger off, then on (one
SQLite row per answer, written by its own thread), and the two are compared: requests per second
and memory, and the ledger's row count against the answers that had a model.

Exit status 0 when, in both runs, memory grew by less than 10%, descriptors by fewer than 10,
every answer was right, plano is still up, its log has no traceback and it stops on SIGTERM, and
the ledger holds a row for every answer that had a model; 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from plano import read_usage
from overhead import (CLIENT_MODEL, anthropic_body, check_json, check_stream, directive_tag,
                      openai_body, percentile, reply_pieces, stand_in, start_plano, stop)

# (kind, weight): what share of the requests does what.
MIX = [
    ("messages", 30),           # Anthropic → OpenAI, JSON
    ("messages_stream", 25),    # Anthropic → OpenAI, SSE
    ("chat", 10),               # OpenAI passthrough, JSON
    ("chat_stream", 10),        # OpenAI passthrough, SSE
    ("hang_up", 8),             # Anthropic stream; the client leaves after a few deltas
    ("invalid", 7),             # bodies plano must refuse with 400
    ("upstream_500", 5),
    ("upstream_429", 5),
]
CHUNKS = 12  # pieces in an ordinary answer
WARMUP_SHARE = 0.05
CHECKPOINTS = (0.25, 0.5, 0.75, 1.0)
RSS_LIMIT = 0.10  # growth from after warm-up to the end
FD_LIMIT = 10
TIME_LIMIT = 1800  # seconds: a hang is a finding, not a reason to wait forever

INVALID_BODIES = [
    b"{not json",
    json.dumps({"model": CLIENT_MODEL, "max_tokens": 64, "messages": "hello"}).encode(),
    json.dumps({"model": CLIENT_MODEL, "messages": [{"role": "user", "content": "no max_tokens"}]}).encode(),
]


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind, _ in MIX})
    wrong: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind, _ in MIX})


def plan(requests: int, seed: int = 7) -> list[str]:
    """The kind of each request, fixed by the seed so runs are comparable."""
    kinds, weights = zip(*MIX)
    return random.Random(seed).choices(kinds, weights, k=requests)


def anthropic_error(raw: bytes, status: int, error_type: str, actual: int) -> str | None:
    if actual != status:
        return f"expected HTTP {status}, got {actual}: {raw[:200]!r}"
    payload = json.loads(raw)
    if payload.get("type") != "error" or payload.get("error", {}).get("type") != error_type:
        return f"expected an Anthropic {error_type}, got {raw[:200]!r}"
    return None


async def one_request(client: httpx.AsyncClient, base: str, i: int, kind: str) -> str | None:
    """Send request number `i` of `kind`; the problem with its answer, or None when it is right."""
    nonce = f"r{i}"
    expected = "".join(reply_pieces(nonce, CHUNKS))
    anthropic_headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
    openai_headers = {"content-type": "application/json"}
    messages_url, chat_url = f"{base}/v1/messages", f"{base}/v1/chat/completions"
    if kind in ("messages", "messages_stream", "chat", "chat_stream"):
        api = "anthropic" if kind.startswith("messages") else "openai"
        url, headers, body = ((messages_url, anthropic_headers, anthropic_body) if api == "anthropic"
                              else (chat_url, openai_headers, openai_body))
        stream = kind.endswith("_stream")
        response = await client.post(url, headers=headers, content=body(directive_tag(nonce, CHUNKS), stream))
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:200]}"
        if stream:
            return check_stream(api, response.content, expected)[0]
        return check_json(api, response.json(), expected)
    if kind == "hang_up":
        # A long, paced stream (200 chunks, 2 ms apart): leaving after 3 deltas is surely mid-stream.
        body = anthropic_body(directive_tag(nonce, 200, interval_ms=2), True)
        async with client.stream("POST", messages_url, headers=anthropic_headers, content=body) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}"
            deltas = 0
            async for chunk in response.aiter_raw():
                deltas += chunk.count(b"text_delta")
                if deltas >= 3:
                    return None  # leaving the block unread closes the connection: a hang-up
        return "the stream ended before the client could hang up"
    if kind == "invalid":
        response = await client.post(messages_url, headers=anthropic_headers,
                                     content=INVALID_BODIES[i % len(INVALID_BODIES)])
        return anthropic_error(response.content, 400, "invalid_request_error", response.status_code)
    status = 500 if kind == "upstream_500" else 429
    response = await client.post(messages_url, headers=anthropic_headers,
                                 content=anthropic_body(directive_tag(nonce, CHUNKS, status=status), False))
    if status == 429:
        problem = anthropic_error(response.content, 429, "rate_limit_error", response.status_code)
        if problem is None and "retry-after" not in response.headers:
            problem = "429 without the provider's retry-after"
        return problem
    if response.status_code < 500:
        return f"expected a 5xx for an upstream 500, got {response.status_code}: {response.text[:200]}"
    return anthropic_error(response.content, response.status_code, "api_error", response.status_code)


async def run_phase(base: str, kinds: list[str], indices: range, concurrency: int, tally: Tally) -> None:
    """Send the requests numbered `indices`, `concurrency` at a time, with a client of its own."""
    pending = iter(indices)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0), trust_env=False) as client:

        async def worker() -> None:
            for i in pending:
                kind = kinds[i]
                start = time.perf_counter()
                try:
                    problem = await one_request(client, base, i, kind)
                except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
                    problem = f"{type(e).__name__}: {e}"
                tally.latencies[kind].append(time.perf_counter() - start)
                if problem:
                    tally.wrong[kind].append(f"#{i}: {problem}")

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled_fds(pid: int) -> int:
    """The descriptor count once plano has noticed the closed client connections (≤ 5 s)."""
    previous = open_fds(pid)
    for _ in range(25):
        await trio.sleep(0.2)
        current = open_fds(pid)
        if current == previous:
            return current
        previous = current
    return previous


async def soak(base: str, pid: int, requests: int,
               concurrency: int) -> tuple[Tally, list[tuple[str, int, int, int]]]:
    kinds = plan(requests)
    tally = Tally()
    marks = [("after warm-up", int(requests * WARMUP_SHARE))] + \
            [(f"{share:.0%}", int(requests * share)) for share in CHECKPOINTS]
    readings = []
    done = 0
    with trio.fail_after(TIME_LIMIT):
        for label, upto in marks:
            await run_phase(base, kinds, range(done, upto), concurrency, tally)
            done = upto
            fds = await settled_fds(pid)
            rss = rss_kib(pid)
            readings.append((label, done, rss, fds))
            print(f"  {label:<14} {done:>6} requests  RSS {rss / 1024:7.1f} MiB  fds {fds:>4}", flush=True)
    return tally, readings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    runs = {}
    for ledger in (False, True):
        print(f"\n── usage ledger {'on' if ledger else 'off'} ──", flush=True)
        runs[ledger] = one_run(args.requests, args.concurrency, ledger)
    (off_ok, off_rate, off_rss), (on_ok, on_rate, on_rss) = runs[False][:3], runs[True][:3]
    rows, expected = runs[True][3]
    rows_ok = rows == expected
    print(f"\nusage ledger on vs off: {on_rate:.0f} vs {off_rate:.0f} requests/s ({on_rate / off_rate:.2f}x); "
          f"RSS at the end {on_rss / 1024:.1f} vs {off_rss / 1024:.1f} MiB; ledger rows {rows} for {expected} "
          f"answers with a model: {'all there' if rows_ok else 'MISSING ROWS'}")
    return 0 if off_ok and on_ok and rows_ok else 1


def one_run(requests: int, concurrency: int, ledger: bool) -> tuple[bool, float, int, tuple[int, int]]:
    """(passed, requests per second, RSS at the end in KiB, (ledger rows, answers that had a model))."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch, stand_in() as upstream_port:
        workdir = Path(scratch)
        try:
            plano = start_plano(sys.executable, upstream_port, workdir, ledger=ledger)
        except RuntimeError as e:
            print(f"plano failed to start: {e}\n{(workdir / 'plano.log').read_text()}", file=sys.stderr)
            return False, 0.0, 0, (0, 0)
        try:
            base = plano.url.removesuffix("/v1/messages")
            pid = plano.process.pid
            print(f"soak: {requests} requests, {concurrency} at a time, through plano "
                  f"(pid {pid}) to the stand-in on port {upstream_port}", flush=True)
            load_started = time.monotonic()
            try:
                tally, readings = trio.run(soak, base, pid, requests, concurrency)
            except trio.TooSlowError:
                print(f"FAIL: the requests did not finish within {TIME_LIMIT} s; see plano's log:\n"
                      f"{plano.log_path.read_text(errors='replace')[-3000:]}")
                return False, 0.0, 0, (0, 0)
            load_seconds = time.monotonic() - load_started
            alive = plano.process.poll() is None and httpx.get(f"{base}/healthz", timeout=5).status_code == 200
            log = plano.log_path.read_text(errors="replace")
        finally:
            shutdown_note = stop(plano)
        # Every request but the invalid bodies got a model (and so a ledger row), answered or not.
        expected = sum(1 for kind in plan(requests) if kind != "invalid")
        rows = len(read_usage(str(workdir / "usage.sqlite3"))) if ledger else expected
    ok = report(tally, readings, load_seconds, alive, log, shutdown_note, requests,
                time.monotonic() - started) == 0
    return ok, requests / load_seconds, readings[-1][2], (rows, expected)


def log_tracebacks(log: str) -> collections.Counter[str]:
    """Tracebacks in plano's log, counted by the exception that ended each one."""
    found: collections.Counter[str] = collections.Counter()
    # Frames are indented; the first unindented line after "Traceback" is the exception.
    unindented = [line for line in log.splitlines() if line and not line.startswith(" ")] + [""]
    for k, line in enumerate(unindented[:-2]):
        if line.startswith("Traceback"):
            exception, after = unindented[k + 1], unindented[k + 2]
            # A chained exception is followed by "The above exception…" and another traceback,
            # whose exception is the one that reached plano's handler: count that one.
            if not after.startswith(("The above exception", "During handling")):
                found[exception] += 1
    return found


def report(tally: Tally, readings: list[tuple[str, int, int, int]], load_seconds: float, alive: bool,
           log: str, shutdown_note: str | None, requests: int, total_seconds: float) -> int:
    print(f"\n{'kind':<16} {'n':>6} {'wrong':>6} {'p50 ms':>8} {'p95 ms':>8}")
    for kind, _ in MIX:
        values = tally.latencies[kind]
        if values:
            print(f"{kind:<16} {len(values):>6} {len(tally.wrong[kind]):>6} "
                  f"{percentile(values, 50) * 1000:8.1f} {percentile(values, 95) * 1000:8.1f}")
    wrong = [w for kind, _ in MIX for w in tally.wrong[kind]]
    print(f"\n{requests} requests in {load_seconds:.1f} s ({requests / load_seconds:.0f}/s); "
          f"wrong answers: {len(wrong)}")
    for example in wrong[:10]:
        print(f"  {example}")
    (_, _, rss_start, fds_start), (_, _, rss_end, fds_end) = readings[0], readings[-1]
    rss_growth = (rss_end - rss_start) / rss_start
    rss_flat, fds_flat = rss_growth < RSS_LIMIT, fds_end - fds_start < FD_LIMIT
    print(f"RSS after warm-up → end: {rss_start / 1024:.1f} → {rss_end / 1024:.1f} MiB ({rss_growth:+.1%}): "
          f"{'flat' if rss_flat else 'GREW'} (limit +{RSS_LIMIT:.0%})")
    print(f"open fds after warm-up → end: {fds_start} → {fds_end} ({fds_end - fds_start:+d}): "
          f"{'flat' if fds_flat else 'GREW'} (limit +{FD_LIMIT})")
    tracebacks = log_tracebacks(log)
    print(f"plano still serving: {'yes' if alive else 'NO'}; tracebacks in its log: {sum(tracebacks.values())}")
    for exception, count in tracebacks.most_common(5):
        print(f"  {count} × {exception}")
    if shutdown_note:
        print(f"shutdown: {shutdown_note}")
    ok = rss_flat and fds_flat and not wrong and alive and not tracebacks and not shutdown_note
    print(f"result: {'OK' if ok else 'FAIL'}   (total run time {total_seconds:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
