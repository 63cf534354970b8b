"""The usage ledger at team scale: SQLite (the default) against PostgreSQL (`stats.url`), same rows.

Starts its own PostgreSQL (Debian's, /usr/lib/postgresql/15/bin: initdb in a temporary directory,
on a free loopback port, as the `postgres` user when run as root) and measures, on both ledgers:

- `record()`: what an answer pays to hand its row over (p50 and p99, microseconds);
- the writer: rows per second from the first `record()` until every row is committed;
- a summary (what `/plano/usage`, `plano stats` and every refresh of the live page read) for
  ledgers of growing size, the whole ledger and `?key=` (one key among 50): each database adds up
  the rows per combination of model, route, key and team, and plano adds up those lines.

    python bench/usage_ledger.py [--rows 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import plano  # noqa: E402

POSTGRES_BIN = Path(os.environ.get("PLANO_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
KEYS = [(f"dev{n:02d}", f"team{n % 5}") for n in range(50)]
MODELS = ["anthropic/claude-sonnet-4-5", "openai/gpt-4.1", "deepseek/deepseek-chat", "openai/gpt-4.1-mini"]


def row(when: float) -> dict:
    key, team = random.choice(KEYS)
    tokens = random.randint(100, 50_000)
    return {"time": when, "session": f"s{random.randint(0, 5000)}", "api": "/v1/messages",
            "requested_model": "claude-sonnet-4-5", "model": random.choice(MODELS),
            "route": random.choice(["code", "docs", None]), "decision": "router", "status": 200,
            "input_tokens": tokens // 10, "cache_read_tokens": tokens, "cache_write_tokens": 0,
            "output_tokens": tokens // 20, "reasoning_tokens": 0, "cost_usd": tokens * 3e-7,
            "baseline_cost_usd": tokens * 5e-7, "key_name": key, "team": team}


class Postgres:
    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="plano-bench-pg-"))
        self.user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.user:
            shutil.chown(self.directory, "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        subprocess.run([*self.user, str(POSTGRES_BIN / "initdb"), "-D", str(self.directory / "data"), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL)
        self.process = subprocess.Popen([*self.user, str(POSTGRES_BIN / "postgres"), "-D", str(self.directory / "data"),
                                         "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.directory)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while subprocess.run([str(POSTGRES_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                             stdout=subprocess.DEVNULL).returncode != 0:
            time.sleep(0.1)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def close(self) -> None:
        subprocess.run([*self.user, str(POSTGRES_BIN / "pg_ctl"), "stop", "-D", str(self.directory / "data"),
                        "-m", "fast", "-w"], stdout=subprocess.DEVNULL)
        self.process.wait(30)
        shutil.rmtree(self.directory, ignore_errors=True)


def writer(ledger: plano._LedgerWriter, rows: list[dict]) -> tuple[float, float, float]:
    """(record p50 µs, record p99 µs, rows per second until all are committed)."""
    samples = []
    started = time.perf_counter()
    for r in rows:
        t = time.perf_counter()
        ledger.record(r)
        samples.append((time.perf_counter() - t) * 1e6)
    assert ledger.flush(600) and ledger.dropped == 0
    elapsed = time.perf_counter() - started
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)], len(rows) / elapsed


def best_of(function, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000,1000000")
    sizes = [int(n) for n in parser.parse_args().rows.split(",")]
    random.seed(1)
    postgres, directory = Postgres(), Path(tempfile.mkdtemp(prefix="plano-bench-sqlite-"))
    try:
        sqlite = plano.UsageLedger(str(directory / "usage.sqlite3"), queue_size=2_000_000)
        shared = plano.PostgresLedger(postgres.url, queue_size=2_000_000)
        print(f"{'':28} {'SQLite':>14} {'PostgreSQL':>14}")
        first = [row(time.time() - 86400) for _ in range(10_000)]
        (sp50, sp99, srate), (pp50, pp99, prate) = writer(sqlite, first), writer(shared, first)
        print(f"{'record(), p50 / p99 µs':28} {sp50:6.1f} / {sp99:5.1f} {pp50:6.1f} / {pp99:5.1f}")
        print(f"{'writer, rows/s (10,000)':28} {srate:14,.0f} {prate:14,.0f}")
        stored = len(first)
        for size in sizes:
            more = [row(time.time() - 86400 * random.random()) for _ in range(size - stored)]
            if more:
                writer(sqlite, more)
                writer(shared, more)
            stored = max(size, stored)
            both = [best_of(lambda: ledger.summary()) for ledger in (sqlite, shared)]
            print(f"{f'summary, {size:,} rows, ms':28} {both[0]:14,.1f} {both[1]:14,.1f}")
            one = [best_of(lambda: ledger.summary(key_name="dev07")) for ledger in (sqlite, shared)]
            print(f"{'  ?key=dev07 (1 of 50), ms':28} {one[0]:14,.1f} {one[1]:14,.1f}")
        sqlite.close()
        shared.close()
    finally:
        postgres.close()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
