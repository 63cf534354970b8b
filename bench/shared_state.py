"""What keeping the shared state in Redis (`state.url`) adds per request, against the state in the
process, measured side by side in one run.

Two `python -m plano up` on the same config but for `state:` answer the same requests, interleaved
round-robin so machine noise hits both alike: one keeps its state in the process (the default), the
other in a redis-server this script starts on a free loopback port (AOF on, as the tests run it).
The provider is bench/overhead.py's stand-in, which also answers as the router server, so every
request is routed and pinned as Claude Code's are, and every request carries a developer's key
(`keys:`) with a budget, a team's budget and an `rpm`, so every request is admitted (the minute's
count and both budgets' spend, one round trip) and charged once answered (one more). Two kinds of
request, one session each time:

    new turn    new user text: the pin is read (to weigh a switch), the router decides (its answer
                is cached after the first: the router's own time is not what is measured), and the
                turn is pinned (a write)
    tool loop   a tool result in the same session: the pin is read and renewed, the model is kept

Both check the provider's health (cool-downs) before going upstream, which with Redis is read at
most once a second per replica. Reported: p50/p95 latency per kind and target, and what Redis adds
(the differences), with the Redis round trips each kind makes.

    python bench/shared_state.py [--requests N]

Needs Debian's redis-server (apt install redis-server) and the `redis` package (pip install
'plano[team]'). Everything runs on 127.0.0.1; scratch files go to a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import httpx

import overhead  # the stand-in provider, the gateway launcher, the statistics (bench/ is on the path)

KINDS = ("new turn", "tool loop")
KEY = "plano-bench-developer-key-0123"  # a developer's key with a budget, its team's, and an rpm: all counted


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    port = overhead.free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                                "--save", "", "--appendonly", "yes"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def start_plano(name: str, upstream_port: int, workdir: Path, state: str) -> overhead.Target:
    port = overhead.free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(textwrap.dedent(f"""\
        llm_providers:
          - model: openai/{overhead.STUB_MODEL}
            base_url: http://127.0.0.1:{upstream_port}/v1
            access_key: dummy
            default: true
            prices: {{input: 1, output: 2}}
            routing_preferences:
              - name: {overhead.ROUTE}
                description: anything about code
        listeners:
          - address: 127.0.0.1
            port: {port}
        keys:
          - name: bench
            key: {KEY}
            team: bench-team
            budget: {{usd: 1000000, per: day}}
            rpm: 1000000
        teams:
          - name: bench-team
            budget: {{usd: 1000000, per: month}}
        router:
          endpoint: http://127.0.0.1:{upstream_port}/v1
          model: {overhead.ROUTER_MODEL}
        stats: false
        """) + state)
    target = overhead._start_gateway(name, [sys.executable, "-m", "plano", "up", "--config", str(config)], workdir,
                                     port, key=KEY, health="/healthz", timeout=30,
                                     cwd=str(Path(__file__).resolve().parent.parent))
    target.latencies = {kind: [] for kind in KINDS}
    return target


def turn_bodies(session: int) -> dict[str, bytes]:
    """The two requests of one session: its turn, then the turn's tool loop."""
    tag = overhead.directive_tag(f"s{session}", overhead.LATENCY_CHUNKS)
    turn = json.loads(overhead.anthropic_body(tag, stream=False))
    loop = dict(turn, messages=turn["messages"] + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read",
                                           "input": {"file_path": "/w/plano.py"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": f"done {tag}"}]}])
    return {"new turn": json.dumps(turn).encode(), "tool loop": json.dumps(loop).encode()}


EXPECTED_DECISION = {"new turn": "router", "tool loop": "pinned"}


def measure(client: httpx.Client, targets: list[overhead.Target], requests: int, warmup: int) -> None:
    for i, target in enumerate(overhead.rotations(targets, warmup + requests)):
        session = f"bench-{i}"  # a new session each time: every turn is pinned anew
        expected = "".join(overhead.reply_pieces(f"s{i}", overhead.LATENCY_CHUNKS))
        for kind, body in turn_bodies(i).items():
            headers = {**target.headers, "x-claude-code-session-id": session}
            start = time.perf_counter()
            response = client.post(target.url, content=body, headers=headers)
            seconds = time.perf_counter() - start
            problem, _ = overhead.check_answer(target, response.status_code, response.content, False, expected)
            decision = response.headers.get("x-plano-decision")
            if problem or decision != EXPECTED_DECISION[kind]:
                target.errors.append(problem or f"{kind}: decided {decision}, not {EXPECTED_DECISION[kind]}")
            elif i >= warmup * len(targets):
                target.latencies[kind].append(seconds)


def report(targets: list[overhead.Target], requests: int) -> None:
    local, redis = targets
    for target in targets:
        if target.errors:
            print(f"  {target.name}: {len(target.errors)} failed requests, e.g. {target.errors[0]}")
    if not all(target.latencies[kind] for target in targets for kind in KINDS):
        return
    print(f"\n{requests} sessions per target (a new turn, then its tool loop), non-streaming /v1/messages, "
          "latency to the last byte")
    print(f"  {'kind':<10} {'target':<8} {'n':>5} {'p50 ms':>8} {'p95 ms':>8}")
    for kind in KINDS:
        for target in targets:
            values = target.latencies[kind]
            print(f"  {kind:<10} {target.name:<8} {len(values):>5} {overhead.ms(overhead.percentile(values, 50))} "
                  f"{overhead.ms(overhead.percentile(values, 95))}")
    print("\nWhat Redis adds per request")
    for kind, trips in (("new turn", "4 round trips: admission, the pin read, the pin written, the charge"),
                        ("tool loop", "3 round trips: admission, the pin read, the charge")):
        added = [overhead.percentile(redis.latencies[kind], q) - overhead.percentile(local.latencies[kind], q)
                 for q in (50, 95)]
        print(f"  {kind:<10} +{added[0] * 1000:.2f} ms p50, +{added[1] * 1000:.2f} ms p95 ({trips})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="timed sessions per target (default 300)")
    args = parser.parse_args()
    if not shutil.which("redis-server"):
        print("redis-server is not installed (apt install redis-server)", file=sys.stderr)
        return 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shared-state-") as scratch, overhead.stand_in() as upstream_port, \
            redis_server(Path(scratch)) as url:
        workdir = Path(scratch)
        targets: list[overhead.Target] = []
        try:
            targets.append(start_plano("local", upstream_port, workdir, ""))
            targets.append(start_plano("redis", upstream_port, workdir, f"state:\n  url: {url}\n"))
            print(f"measuring plano with its state in the process and in Redis ({url})…", flush=True)
            with httpx.Client(timeout=httpx.Timeout(60.0), trust_env=False) as client:
                measure(client, targets, args.requests, warmup=20)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        finally:
            notes = [note for note in map(overhead.stop, targets) if note]
    report(targets, args.requests)
    for note in notes:
        print(f"  shutdown: {note}")
    print(f"\n(total run time {time.monotonic() - started:.0f} s on {os.cpu_count()} CPUs)")
    return 1 if any(t.errors for t in targets) or notes else 0


if __name__ == "__main__":
    sys.exit(main())
