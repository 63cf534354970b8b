"""plano's upstream transport against httpx's default one, side by side in one run.

The measurement behind plano's `UpstreamTransport`: the same Chat Completions exchanges with the
stand-in provider from `bench/overhead.py`, made from one trio program through

    httpcore     httpx.AsyncClient() as it comes (its default transport, httpcore)
    client+own   httpx.AsyncClient(transport=plano.UpstreamTransport())
    own          plano.UpstreamTransport() called directly, as plano's gateway does

interleaved round-robin. Reported per exchange: wall time p50/p95 and the CPU time this process
spent (the stand-in runs in its own process), for a short JSON answer; and for a 2000-event
stream, the time to read it all and how many pieces the body arrived in.

    python bench/upstream_client.py [--requests N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import plano  # noqa: E402
from overhead import directive_tag, openai_body, percentile, reply_pieces, stand_in  # noqa: E402

TIMEOUTS = {"connect": 10.0, "read": 60.0, "write": 60.0, "pool": 30.0}


async def exchange(send, url: str, body: bytes) -> tuple[float, float, int, bytes]:
    """(wall seconds, CPU seconds, pieces, body) for one POST whose answer is read to the end."""
    request = httpx.Request("POST", url, content=body, extensions={"timeout": TIMEOUTS},
                            headers={"content-type": "application/json", "authorization": "Bearer dummy"})
    wall, cpu = time.perf_counter(), time.process_time()
    response = await send(request)
    pieces, data = 0, bytearray()
    try:
        async for piece in response.aiter_raw():
            pieces += 1
            data += piece
    finally:
        await response.aclose()
    return time.perf_counter() - wall, time.process_time() - cpu, pieces, bytes(data)


async def measure(url: str, requests: int) -> dict[str, dict[str, list[float]]]:
    own = plano.UpstreamTransport()
    async with httpx.AsyncClient(trust_env=False) as default, \
            httpx.AsyncClient(transport=plano.UpstreamTransport(), trust_env=False) as wrapped:
        senders = {
            "httpcore": lambda request: default.send(request, stream=True),
            "client+own": lambda request: wrapped.send(request, stream=True),
            "own": own.handle_async_request,
        }
        results: dict[str, dict[str, list[float]]] = {
            name: {"wall": [], "cpu": [], "stream_wall": [], "stream_pieces": []} for name in senders}
        short = openai_body(directive_tag("uc", 20), False)
        expected = "".join(reply_pieces("uc", 20))
        long = openai_body(directive_tag("ucs", 2000), True)
        names = list(senders)
        for round_number in range(requests + 20):
            order = names[round_number % len(names):] + names[:round_number % len(names)]
            for name in order:
                wall, cpu, _, data = await exchange(senders[name], url, short)
                if json.loads(data)["choices"][0]["message"]["content"] != expected:
                    raise SystemExit(f"{name}: wrong answer {data[:120]!r}")
                if round_number >= 20:  # the first rounds warm up connections and code paths
                    results[name]["wall"].append(wall)
                    results[name]["cpu"].append(cpu)
        for round_number in range(6):
            for name in names:
                wall, _, pieces, data = await exchange(senders[name], url, long)
                if not data.rstrip().endswith(b"data: [DONE]"):
                    raise SystemExit(f"{name}: stream did not end with [DONE]")
                if round_number:
                    results[name]["stream_wall"].append(wall)
                    results[name]["stream_pieces"].append(pieces)
        await own.aclose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="timed exchanges per client (default 1000)")
    args = parser.parse_args()
    with stand_in() as port:
        results = trio.run(measure, f"http://127.0.0.1:{port}/v1/chat/completions", args.requests)
    base_cpu = percentile(results["httpcore"]["cpu"], 50)
    print(f"\nShort JSON answer, {args.requests} exchanges each, interleaved")
    print(f"  {'client':<11} {'p50 ms':>8} {'p95 ms':>8} {'CPU µs p50':>11} {'CPU vs httpcore':>16}")
    for name, r in results.items():
        cpu = percentile(r["cpu"], 50)
        print(f"  {name:<11} {percentile(r['wall'], 50) * 1000:8.3f} {percentile(r['wall'], 95) * 1000:8.3f} "
              f"{cpu * 1e6:11.0f} {cpu / base_cpu:16.2f}")
    print("\n2000-event stream, median of 5")
    print(f"  {'client':<11} {'ms':>8} {'pieces':>8}")
    for name, r in results.items():
        print(f"  {name:<11} {percentile(r['stream_wall'], 50) * 1000:8.1f} "
              f"{percentile(r['stream_pieces'], 50):8.0f}")
    print(f"\n(on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
