"""What the bounds on others' bytes cost and save: request JSON, one large SSE event, a gzip bomb.

1. Request JSON, per body shape at 1 MiB and 32 MiB (the body limit): `json.loads` time and its
   peak memory (tracemalloc) as a multiple of the body's size, what plano's structure check
   (depth and number of values, `plano.check_json_structure`) costs on the same bytes, and the
   whole `plano.parse_json` (check, duplicate keys, lone surrogates, parse). The shapes: a long
   text, a base64 image, a Claude Code conversation (bench/capability_check.py's), and dense
   structure (`[{},{},…]`, `[[],[],…]`, floats) such as only a hostile client sends.
2. One 4 MiB SSE event arriving in 1 KiB reads: the decoder that searched its whole buffer again
   on every read (plano's before issue 18, kept here to compare) against plano.SSEDecoder.
3. A gzip bomb (64 KiB of gzip that inflates to 64 MiB): what one network read of it costs
   through httpx's own decoder (whole), and through plano's (`_InflatedBody`, in 64 KiB steps).

    python bench/wire_bounds.py
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import plano  # noqa: E402
from bench.capability_check import claude_code_body  # noqa: E402

MIB = 1 << 20


def bodies(size: int) -> dict[str, bytes]:
    conversation = claude_code_body(10)
    while len(json.dumps(conversation)) < size:
        conversation["messages"] += conversation["messages"][1:21]
    return {
        "text": json.dumps({"model": "m", "messages": [{"role": "user", "content": "word " * (size // 5)}]}).encode(),
        "image": json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png",
            "data": base64.b64encode(os.urandom(size * 3 // 4)).decode()}}]}]}).encode(),
        "conversation": json.dumps(conversation).encode(),
        "dense [{},…]": b'{"model":"m","x":[' + b",".join([b"{}"] * (size // 3)) + b"]}",
        "dense [[],…]": b'{"model":"m","x":[' + b",".join([b"[]"] * (size // 3)) + b"]}",
        "floats": b'{"model":"m","x":[' + b",".join([b"1.5"] * (size // 4)) + b"]}",
    }


def best_ms(function, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        try:
            function()
        except ValueError:
            pass
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def request_json() -> None:
    print("request JSON: json.loads (time, peak memory) | structure check | parse_json")
    for size in (MIB, 32 * MIB):
        for name, raw in bodies(size).items():
            tracemalloc.start()
            value = json.loads(raw)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            del value
            loads = best_ms(lambda: json.loads(raw))
            check = best_ms(lambda: plano.check_json_structure(raw))
            whole = best_ms(lambda: plano.parse_json(raw))
            print(f"  {len(raw) / MIB:5.1f} MiB {name:13s} loads {loads:7.1f} ms, {peak / MIB:6.1f} MiB "
                  f"({peak / len(raw):4.1f}x) | check {check:6.1f} ms | parse_json {whole:7.1f} ms")


def rescanning_feed(buffer: bytearray, chunk: bytes) -> int:
    """The old decoder's way: append, then search the whole buffer for a line end again."""
    buffer += chunk
    lines = 0
    while (match := re.search(rb"\r\n?|\n", buffer)) is not None:
        del buffer[:match.end()]
        lines += 1
    return lines


def one_large_event() -> None:
    event = b"data: " + b"x" * (4 * MIB) + b"\n\n"
    pieces = [event[i:i + 1024] for i in range(0, len(event), 1024)]
    started = time.perf_counter()
    buffer = bytearray()
    for piece in pieces:
        rescanning_feed(buffer, piece)
    rescanning = time.perf_counter() - started
    decoder = plano.SSEDecoder()
    started = time.perf_counter()
    for piece in pieces:
        decoder.feed(piece)
    linear = time.perf_counter() - started
    print(f"one 4 MiB SSE event in 1 KiB reads: searching the whole buffer again {rescanning * 1000:.0f} ms, "
          f"plano.SSEDecoder {linear * 1000:.1f} ms ({decoder.scanned:,} bytes searched for {decoder.fed:,} fed)")


async def gzip_bomb() -> None:
    squeeze = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    bomb = squeeze.compress(bytes(64 * MIB)) + squeeze.flush()
    tracemalloc.start()
    started = time.perf_counter()
    inflated = httpx.Response(200, headers={"content-encoding": "gzip"}, content=bomb).content
    httpx_time = time.perf_counter() - started
    httpx_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del inflated

    class Whole(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield bomb

    tracemalloc.start()
    started = time.perf_counter()
    largest_step, steps = 0, 0
    async for piece in plano._InflatedBody(Whole(), ["gzip"], 128 * MIB):
        largest_step, steps = max(largest_step, time.perf_counter() - started), steps + 1
        started = time.perf_counter()
    plano_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"gzip bomb, {len(bomb) / 1024:.0f} KiB → 64 MiB in one read: httpx's decoder {httpx_time * 1000:.0f} ms "
          f"at once, peak {httpx_peak / MIB:.0f} MiB; plano's {steps} steps of ≤ {largest_step * 1000:.2f} ms, "
          f"peak {plano_peak / MIB:.1f} MiB")


if __name__ == "__main__":
    request_json()
    one_large_event()
    trio.run(gzip_bomb)
