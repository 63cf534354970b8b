"""What a gateway adds per request, measured side by side in one run.

An Anthropic Messages request (a small Claude Code-like turn) goes through each gateway to a
stand-in OpenAI Chat Completions provider on loopback that answers instantly; the same logical
request sent straight to the stand-in in OpenAI format is the baseline. Targets:

    direct    the stand-in itself (baseline)
    plano     `python -m plano up` with the stand-in as an openai provider, routing off, metrics and
              tracing off (`metrics: false`, no OTEL_* variables)
    plano+obs the same with metrics on (`metrics: true`) and tracing on: every span exported over
              OTLP/HTTP to a receiver on loopback (a process of its own, like the stand-in)
    haproxy   Debian's haproxy forwarding the direct request (OpenAI format) to the stand-in, in HTTP
              mode with keep-alive: the floor any HTTP gateway pays for two more loopback hops,
              with nothing read or translated (optional: haproxy on PATH)
    LiteLLM   `litellm` proxy, model `hosted_vllm/stub-model` (optional: --litellm PATH)
    ccr       claude-code-router 1.0.73 (optional: --ccr PATH/TO/dist/cli.js)

Requests are interleaved round-robin across targets, so machine noise hits all of them alike.
Reported: p50/p95 latency and the latency added over direct, non-streaming and streaming (time to
last byte); streaming throughput (text deltas per second in a 2000-chunk stream); and plano's
`count_tokens` latency on a ~50 KB Claude Code-like body. The stand-in also answers as a router
server (a request for model `arch-router` gets a route), for bench/shared_state.py. The goal for
monitoring (issue 21): plano with metrics and tracing on adds at most a tenth of what LiteLLM adds.

    python bench/overhead.py [--requests N] [--litellm PATH] [--ccr PATH_TO_CLI_JS]

Everything runs on 127.0.0.1; scratch files go to a temporary directory. `bench/soak.py` reuses
the stand-in and the plano launcher defined here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx

STUB_MODEL = "stub-model"
CLIENT_MODEL = "claude-sonnet-4-5"  # what Claude Code asks for; every gateway maps it to the stub
ROUTER_MODEL = "arch-router"  # a request for this model is a router's question: the stand-in answers a route
ROUTE = "code"
LITELLM_DEFAULT = "/tmp/cc_work/litellm-venv/bin/litellm"
CCR_DEFAULT = "/tmp/cc_work/ccr/node_modules/@musistudio/claude-code-router/dist/cli.js"
LITELLM_KEY = "sk-bench-0123456789abcdef"
CCR_KEY = "ccr-bench-key"


# ═════════════════════════════════════════════════════════════════════════════════════════════
# The stand-in provider: OpenAI Chat Completions over HTTP/1.1 keep-alive, answering at once.
# It runs in its own process so its CPU time is not charged to the client doing the timing.
# ═════════════════════════════════════════════════════════════════════════════════════════════

# A request steers the stand-in with a tag in its message text, because that is the one part of
# the request every gateway carries through unchanged:
#   [stand-in nonce=ID chunks=N status=CODE interval_ms=MS]   (every field optional)
_DIRECTIVE = re.compile(rb"\[stand-in ([^\]]*)\]")


def reply_pieces(nonce: str, chunks: int) -> list[str]:
    """The text the stand-in answers with, one piece per stream chunk; unique per request."""
    return [f"{nonce}:{k} " for k in range(chunks)]


def directive_tag(nonce: str = "n", chunks: int = 20, status: int = 200, interval_ms: int = 0) -> str:
    return f"[stand-in nonce={nonce} chunks={chunks} status={status} interval_ms={interval_ms}]"


def _parse_directive(body: bytes) -> dict[str, str]:
    tags = _DIRECTIVE.findall(body)
    if not tags:
        return {}
    return dict(item.split("=", 1) for item in tags[-1].decode().split() if "=" in item)


async def _stand_in_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # asyncio turns TCP_NODELAY on for its TCP transports, so small writes are not held back by
    # Nagle's algorithm waiting on the peer's delayed ACK (~40 ms per keep-alive request).
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {name.strip().lower(): value.strip()
                       for name, value in (line.split(":", 1) for line in header_lines)}
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = await _read_chunked(reader)
            else:
                body = await reader.readexactly(int(headers.get("content-length") or 0))
            await _stand_in_answer(writer, method, path, body)
            if headers.get("connection", "").lower() == "close":
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass  # the client hung up (e.g. a gateway cancelling a stream whose client went away)
    finally:
        writer.close()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are expected: just the final CRLF
            return bytes(body)
        body += await reader.readexactly(size + 2)
        del body[-2:]


def _http_head(status: int, content_type: str, extra: str = "") -> str:
    reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}
    return f"HTTP/1.1 {status} {reason.get(status, 'Status')}\r\ncontent-type: {content_type}\r\n{extra}"


def _send_json(writer: asyncio.StreamWriter, status: int, payload: dict, extra: str = "") -> None:
    data = json.dumps(payload).encode()
    head = _http_head(status, "application/json", extra) + f"content-length: {len(data)}\r\n\r\n"
    writer.write(head.encode() + data)


async def _stand_in_answer(writer: asyncio.StreamWriter, method: str, path: str, body: bytes) -> None:
    if method == "GET" and path.rstrip("/").endswith("/models"):
        _send_json(writer, 200, {"object": "list", "data": [{"id": STUB_MODEL, "object": "model"}]})
        return
    if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
        _send_json(writer, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})
        return
    request = json.loads(body)
    if request.get("model") == ROUTER_MODEL:  # as a router server (bench/shared_state.py routes every request)
        _send_json(writer, 200, {"id": "chatcmpl-router", "object": "chat.completion", "created": 1700000000,
                                 "model": ROUTER_MODEL, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                     "role": "assistant", "content": json.dumps({"route": ROUTE})}}]})
        return
    directive = _parse_directive(body)
    status = int(directive.get("status", 200))
    if status == 429:
        _send_json(writer, 429, {"error": {"message": "stand-in: rate limited", "type": "rate_limit_exceeded"}},
                   "retry-after: 0\r\n")
        return
    if status != 200:
        _send_json(writer, status, {"error": {"message": "stand-in: upstream failure", "type": "server_error"}})
        return
    pieces = reply_pieces(directive.get("nonce", "n"), int(directive.get("chunks", 20)))
    usage = {"prompt_tokens": len(body) // 4, "completion_tokens": len(pieces),
             "total_tokens": len(body) // 4 + len(pieces)}
    base = {"id": "chatcmpl-standin", "created": 1700000000, "model": request.get("model", STUB_MODEL)}
    if not request.get("stream"):
        message = {"role": "assistant", "content": "".join(pieces)}
        _send_json(writer, 200, {**base, "object": "chat.completion", "usage": usage,
                                 "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
        return
    writer.write(_http_head(200, "text/event-stream", "transfer-encoding: chunked\r\n\r\n").encode())
    chunk = {**base, "object": "chat.completion.chunk"}
    deltas = [{"role": "assistant", "content": ""}] + [{"content": p} for p in pieces]
    events = [{**chunk, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if (request.get("stream_options") or {}).get("include_usage"):
        events.append({**chunk, "choices": [], "usage": usage})
    interval = int(directive.get("interval_ms", 0)) / 1000
    for event in events:
        _write_chunk(writer, f"data: {json.dumps(event)}\n\n".encode())
        if interval:
            await asyncio.sleep(interval)
            if writer.transport.is_closing():
                return
    _write_chunk(writer, b"data: [DONE]\n\n")
    writer.write(b"0\r\n\r\n")
    await writer.drain()


def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    # One HTTP chunk per SSE event, written at once: a provider flushes each token as it comes.
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


def _run_stand_in(port_pipe: multiprocessing.connection.Connection) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_stand_in_connection, "127.0.0.1", 0, backlog=512)
        port_pipe.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it; Ctrl-C there is enough
    asyncio.run(main())


@contextlib.contextmanager
def stand_in() -> Iterator[int]:
    """Run the stand-in provider in a child process; yields its port."""
    with _child_server(_run_stand_in, "the stand-in provider") as (port, _):
        yield port


@contextlib.contextmanager
def _child_server(run, what: str) -> Iterator[tuple[int, multiprocessing.connection.Connection]]:
    """Run `run(pipe)` in a child process; yields the port it sends first, and the pipe."""
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=run, args=(child_end,), daemon=True)
    process.start()
    try:
        ready = multiprocessing.connection.wait([parent_end, process.sentinel], timeout=30)
        if parent_end not in ready:
            raise RuntimeError(f"{what} did not start (see the traceback above)")
        yield parent_end.recv(), parent_end
    finally:
        process.terminate()
        process.join(5)


# ── an OTLP/HTTP collector, for plano's traces ────────────────────────────────────────────────
# It takes POST /v1/traces and answers 200 at once, as a collector does, and counts what came
# (spans too, when opentelemetry-proto is installed to decode them).


async def _otlp_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: dict) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            body = await reader.readexactly(int(length.group(1)) if length else 0)
            counts["posts"] += 1
            counts["bytes"] += len(body)
            counts["spans"] += _span_count(body, head)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


def _span_count(body: bytes, head: bytes) -> int:
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    except ImportError:
        return 0
    if re.search(rb"(?im)^content-encoding:\s*gzip", head):
        import gzip
        body = gzip.decompress(body)
    export = ExportTraceServiceRequest.FromString(body)
    return sum(len(scope.spans) for resource in export.resource_spans for scope in resource.scope_spans)


def _run_otlp_receiver(pipe: multiprocessing.connection.Connection) -> None:
    counts = {"posts": 0, "bytes": 0, "spans": 0}

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: _otlp_connection(r, w, counts), "127.0.0.1", 0)
        pipe.send(server.sockets[0].getsockname()[1])
        while True:  # the parent asks for the counts once, at the end
            await asyncio.get_running_loop().run_in_executor(None, pipe.poll, None)
            pipe.recv()
            pipe.send(dict(counts))

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(main())


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[int, multiprocessing.connection.Connection]]:
    """Run the OTLP receiver in a child process; yields its port and a pipe that answers any
    message with the counts so far."""
    with _child_server(_run_otlp_receiver, "the OTLP receiver") as started:
        yield started


# ═════════════════════════════════════════════════════════════════════════════════════════════
# The request under test: one small Claude Code turn, in both wire formats.
# ═════════════════════════════════════════════════════════════════════════════════════════════

SYSTEM = ("You are Claude Code, Anthropic's official CLI for Claude. You are an interactive CLI tool that "
          "helps users with software engineering tasks. Use the instructions below and the tools "
          "available to you to assist the user. Be concise; answer in fewer than four lines unless "
          "the user asks for detail. When you change code, follow the conventions of the file.")
TOOLS = [
    ("Read", "Reads a file from the local filesystem.",
     {"type": "object", "properties": {"file_path": {"type": "string", "description": "Absolute path"},
                                       "offset": {"type": "number"}, "limit": {"type": "number"}},
      "required": ["file_path"]}),
    ("Bash", "Executes a bash command in a persistent shell session with an optional timeout.",
     {"type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "number"},
                                       "description": {"type": "string"}},
      "required": ["command"]}),
]
TURNS = [
    ("user", "What does the function parse_config in plano.py do?"),
    ("assistant", "It reads the YAML text, validates every field and returns a frozen Config; errors "
                  "name the file, the line and the field."),
]


def anthropic_body(tag: str, stream: bool) -> bytes:
    messages = [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in TURNS]
    messages.append({"role": "user", "content": [{"type": "text", "text": f"Now explain load_config. {tag}"}]})
    return json.dumps({
        "model": CLIENT_MODEL, "max_tokens": 1024, "stream": stream,
        "system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        "messages": messages,
        "tools": [{"name": n, "description": d, "input_schema": s} for n, d, s in TOOLS],
        "metadata": {"user_id": "user_bench_session_0"},
    }).encode()


def openai_body(tag: str, stream: bool) -> bytes:
    """The same logical request as `anthropic_body`, as a gateway would send it upstream."""
    messages = [{"role": "system", "content": SYSTEM}] + [{"role": r, "content": t} for r, t in TURNS]
    messages.append({"role": "user", "content": f"Now explain load_config. {tag}"})
    body = {"model": STUB_MODEL, "max_tokens": 1024, "stream": stream, "messages": messages,
            "tools": [{"type": "function", "function": {"name": n, "description": d, "parameters": s}}
                      for n, d, s in TOOLS],
            "user": "user_bench_session_0"}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def count_tokens_body() -> bytes:
    """~50 KB shaped like Claude Code's count_tokens calls: long system prompt, many tools, history."""
    words = ("the gateway reads a request translates it and streams the answer back while the router "
             "decides which model fits the conversation best given the preferences").split()
    prose = lambda n, seed: " ".join(words[(seed + i * 7) % len(words)] for i in range(n))  # noqa: E731
    tools = [{"name": f"Tool{k}", "description": prose(120, k),
              "input_schema": {"type": "object", "properties": {
                  f"arg{j}": {"type": "string", "description": prose(12, j)} for j in range(6)}}}
             for k in range(16)]
    messages = []
    for k in range(12):
        messages.append({"role": "user", "content": [{"type": "text", "text": prose(60, k)}]})
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": prose(30, k + 1)},
            {"type": "tool_use", "id": f"toolu_{k:04d}", "name": "Tool1", "input": {"arg0": prose(8, k)}}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{k:04d}", "content": prose(90, k + 2)}]})
    messages.append({"role": "user", "content": "Summarise what we did."})
    return json.dumps({"model": CLIENT_MODEL, "system": [{"type": "text", "text": prose(2200, 3)}],
                       "tools": tools, "messages": messages}).encode()


# ── reading answers ───────────────────────────────────────────────────────────────────────────


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) for each server-sent event in a complete stream."""
    events = []
    for block in raw.decode("utf-8").replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append((name, "\n".join(data)))
    return events


def check_stream(api: str, raw: bytes, expected_text: str) -> tuple[str | None, int]:
    """(problem or None, number of text deltas) for a complete SSE answer in `api`'s format."""
    events = sse_events(raw)
    if not events:
        return "empty stream", 0
    pieces = []
    if api == "openai":
        if events[-1][1] != "[DONE]":
            return "stream does not end with [DONE]", 0
        for _, data in events[:-1]:
            chunk = json.loads(data)
            if "error" in chunk:
                return f"error chunk: {data[:200]}", 0
            pieces += [c["delta"]["content"] for c in chunk.get("choices") or [] if c["delta"].get("content")]
    else:
        types = [json.loads(data).get("type") for _, data in events]
        if types[0] != "message_start" or types[-1] != "message_stop" or types.count("message_stop") != 1:
            return f"malformed Anthropic stream (events: {types[:3]} … {types[-3:]})", 0
        for _, data in events:
            event = json.loads(data)
            if event.get("type") == "content_block_delta" and event["delta"].get("type") == "text_delta":
                pieces.append(event["delta"]["text"])
    text = "".join(pieces)
    if text != expected_text:
        return f"wrong text: {text[:60]!r} (expected {expected_text[:60]!r})", len(pieces)
    return None, len(pieces)


def check_json(api: str, payload: dict, expected_text: str) -> str | None:
    """A problem with a non-streaming answer in `api`'s format, or None."""
    if api == "openai":
        text = payload["choices"][0]["message"]["content"]
    else:
        text = "".join(b.get("text", "") for b in payload.get("content", []) if b.get("type") == "text")
    return None if text == expected_text else f"wrong text: {text[:60]!r} (expected {expected_text[:60]!r})"


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Targets: the gateways, each started as its own process on a free loopback port.
# ═════════════════════════════════════════════════════════════════════════════════════════════


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    name: str
    api: str  # the wire format the client speaks to it: "anthropic" or "openai"
    url: str  # the chat endpoint
    headers: dict[str, str]
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    count_tokens_url: str | None = None
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"json": [], "stream": []})
    errors: list[str] = field(default_factory=list)

    def body(self, tag: str, stream: bool) -> bytes:
        return (anthropic_body if self.api == "anthropic" else openai_body)(tag, stream)


def _anthropic_headers(key: str) -> dict[str, str]:
    return {"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": key}


def _launch(command: list[str], log_path: Path, env: dict[str, str] | None = None,
            cwd: str | None = None) -> subprocess.Popen:
    # A session of its own, so stopping it also stops any worker processes it forks.
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)


def wait_ready(process: subprocess.Popen, health_url: str, timeout: float) -> None:
    """Poll `health_url` until it answers 200; raise if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with code {process.returncode} during start-up")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(health_url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"not ready after {timeout:.0f} s ({health_url})")


def stop(target: Target, grace: float = 12.0) -> str | None:
    """SIGTERM, then SIGKILL after `grace` seconds; says so when the kill was needed.

    Nothing is in flight when this is called, so a gateway that drains on SIGTERM (plano waits up
    to 10 s for in-flight answers) should be gone well within the grace period.
    """
    process = target.process
    if process.poll() is not None:
        return f"{target.name} had already exited (code {process.returncode}); see {target.log_path}"
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
        return None
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
        return f"{target.name} did not exit within {grace:.0f} s of SIGTERM with nothing in flight; killed"


def knows_metrics_switch(python: str) -> bool:
    """Whether the plano under test reads the `metrics` switch (issue 21's Prometheus endpoint)."""
    check = ("import plano; plano.parse_config('llm_providers:\\n  - model: openai/x\\n    access_key: k\\n"
             "metrics: false\\n', environ={})")
    return subprocess.run([python, "-c", check], cwd=str(Path(__file__).resolve().parent.parent),
                          capture_output=True).returncode == 0


def start_plano(python: str, upstream_port: int, workdir: Path, ledger: bool = True, *, name: str = "plano",
                metrics: bool | None = None, otlp_port: int | None = None) -> Target:
    """plano as configured by default (its usage ledger on, kept in `workdir`), routing off;
    `metrics` written as the config's switch unless None, traces sent to `otlp_port` when given
    (and no OTEL_* variable of this process's otherwise)."""
    port = free_port()
    config = workdir / f"{name}.yaml"
    stats = f"stats:\n  path: {workdir / f'{name}-usage.sqlite3'}" if ledger else "stats: false"
    if metrics is not None:
        stats += f"\nmetrics: {'true' if metrics else 'false'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if otlp_port is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{otlp_port}"
    config.write_text(textwrap.dedent(f"""\
        llm_providers:
          - model: openai/{STUB_MODEL}
            base_url: http://127.0.0.1:{upstream_port}/v1
            access_key: dummy
            default: true
        listeners:
          - address: 127.0.0.1
            port: {port}
        router:
          enabled: false
        """) + stats + "\n")
    return _start_gateway(name, [python, "-m", "plano", "up", "--config", str(config)], workdir, port,
                          key="unused-by-plano", health="/healthz", timeout=30, env=env,
                          cwd=str(Path(__file__).resolve().parent.parent))


def start_litellm(binary: str, upstream_port: int, workdir: Path) -> Target:
    port = free_port()
    home = workdir / "litellm-home"
    home.mkdir()
    config = workdir / "litellm.yaml"
    config.write_text(textwrap.dedent(f"""\
        model_list:
          - model_name: "*"
            litellm_params:
              model: hosted_vllm/{STUB_MODEL}
              api_base: http://127.0.0.1:{upstream_port}/v1
              api_key: dummy
        litellm_settings:
          telemetry: false
          drop_params: true
        general_settings:
          master_key: {LITELLM_KEY}
        """))
    env = {**os.environ, "HOME": str(home), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return _start_gateway("LiteLLM", [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                          workdir, port, key=LITELLM_KEY, health="/health/liveliness", timeout=90, env=env)


def start_haproxy(binary: str, upstream_port: int, workdir: Path) -> Target:
    """haproxy relaying the OpenAI-format request as it is: a request's cost in a C proxy."""
    port = free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(textwrap.dedent(f"""\
        global
          maxconn 256
        defaults
          mode http
          option http-keep-alive
          timeout connect 5s
          timeout client 60s
          timeout server 60s
        frontend bench
          bind 127.0.0.1:{port}
          monitor-uri /healthz
          default_backend stand_in
        backend stand_in
          http-reuse always
          server stand_in 127.0.0.1:{upstream_port}
        """))
    log_path = workdir / "haproxy.log"
    process = _launch([binary, "-db", "-f", str(config)], log_path)
    base = f"http://127.0.0.1:{port}"
    target = Target("haproxy", "openai", f"{base}/v1/chat/completions",
                    {"content-type": "application/json", "authorization": "Bearer dummy"}, process, log_path)
    try:
        wait_ready(process, base + "/healthz", 10)
    except RuntimeError:
        stop(target)
        raise
    return target


def start_ccr(cli_js: str, upstream_port: int, workdir: Path) -> Target:
    port = free_port()
    home = workdir / "ccr-home"
    (home / ".claude-code-router").mkdir(parents=True)
    (home / ".claude-code-router" / "config.json").write_text(json.dumps({
        "LOG": False, "HOST": "127.0.0.1", "PORT": port, "APIKEY": CCR_KEY, "API_TIMEOUT_MS": 600000,
        "NON_INTERACTIVE_MODE": True,
        "Providers": [{"name": "stub", "api_base_url": f"http://127.0.0.1:{upstream_port}/v1/chat/completions",
                       "api_key": "dummy", "models": [STUB_MODEL]}],
        "Router": {"default": f"stub,{STUB_MODEL}"},
    }))
    # `cli.js start` serves in the foreground, so the process we hold is the server itself.
    command = ["node", cli_js, "start"] if cli_js.endswith(".js") else [cli_js, "start"]
    return _start_gateway("ccr", command, workdir, port, key=CCR_KEY, health="/health", timeout=30,
                          env={**os.environ, "HOME": str(home)})


def _start_gateway(name: str, command: list[str], workdir: Path, port: int, *, key: str, health: str,
                   timeout: float, env: dict[str, str] | None = None, cwd: str | None = None) -> Target:
    """Launch a gateway that serves Anthropic /v1/messages on `port`; wait until it is healthy."""
    log_path = workdir / f"{name.lower()}.log"
    process = _launch(command, log_path, env=env, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    target = Target(name, "anthropic", f"{base}/v1/messages", _anthropic_headers(key),
                    process, log_path, count_tokens_url=f"{base}/v1/messages/count_tokens")
    try:
        wait_ready(process, base + health, timeout)
    except RuntimeError:
        stop(target)
        raise
    return target


def find_peer(explicit: str | None, default: str, command: str) -> str | None:
    if explicit:
        return explicit if os.path.exists(explicit) or shutil.which(explicit) else None
    if os.path.exists(default):
        return default
    return shutil.which(command)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Measuring
# ═════════════════════════════════════════════════════════════════════════════════════════════

LATENCY_CHUNKS = 20  # a short streamed answer
THROUGHPUT_CHUNKS = 2000  # a long one: gateway cost per event dominates


def timed_request(client: httpx.Client, target: Target, body: bytes, stream: bool) -> tuple[float, int, bytes]:
    """(seconds to the last byte, status, body). Checking the answer happens outside the timing."""
    start = time.perf_counter()
    if stream:
        with client.stream("POST", target.url, content=body, headers=target.headers) as response:
            raw = b"".join(response.iter_raw())
    else:
        response = client.post(target.url, content=body, headers=target.headers)
        raw = response.content
    return time.perf_counter() - start, response.status_code, raw


def check_answer(target: Target, status: int, raw: bytes, stream: bool, expected: str) -> tuple[str | None, int]:
    if status != 200:
        return f"HTTP {status}: {raw[:200]!r}", 0
    try:
        if stream:
            return check_stream(target.api, raw, expected)
        return check_json(target.api, json.loads(raw), expected), 1
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return f"unreadable answer ({type(e).__name__}: {e}): {raw[:200]!r}", 0


def rotations(targets: list[Target], rounds: int) -> Iterator[Target]:
    """Round-robin over targets, starting one further each round so no target always goes first."""
    for r in range(rounds):
        k = r % len(targets)
        yield from targets[k:] + targets[:k]


def measure_latency(client: httpx.Client, targets: list[Target], requests: int, warmup: int) -> None:
    expected = "".join(reply_pieces("lat", LATENCY_CHUNKS))
    tag = directive_tag("lat", LATENCY_CHUNKS)
    bodies = {(t.name, stream): t.body(tag, stream) for t in targets for stream in (False, True)}
    for i, target in enumerate(rotations(targets, warmup + requests)):
        for stream in (False, True):
            seconds, status, raw = timed_request(client, target, bodies[target.name, stream], stream)
            problem, _ = check_answer(target, status, raw, stream, expected)
            if problem:
                target.errors.append(problem)
            elif i >= warmup * len(targets):  # warm-up answers are checked, not timed
                target.latencies["stream" if stream else "json"].append(seconds)


def measure_throughput(client: httpx.Client, targets: list[Target], rounds: int) -> dict[str, list[float]]:
    """Text deltas per second through each target, one value per round (the first is warm-up)."""
    expected = "".join(reply_pieces("tp", THROUGHPUT_CHUNKS))
    rates: dict[str, list[float]] = {t.name: [] for t in targets}
    for i, target in enumerate(rotations(targets, rounds + 1)):
        body = target.body(directive_tag("tp", THROUGHPUT_CHUNKS), True)
        seconds, status, raw = timed_request(client, target, body, True)
        problem, deltas = check_answer(target, status, raw, True, expected)
        if problem:
            target.errors.append(f"long stream: {problem}")
        elif i >= len(targets):
            rates[target.name].append(deltas / seconds)
    return rates


def measure_count_tokens(client: httpx.Client, targets: list[Target], requests: int,
                         warmup: int) -> dict[str, list[float]]:
    body = count_tokens_body()
    timings: dict[str, list[float]] = {t.name: [] for t in targets}
    for i, target in enumerate(rotations(targets, warmup + requests)):
        start = time.perf_counter()
        response = client.post(target.count_tokens_url, content=body, headers=target.headers)
        seconds = time.perf_counter() - start
        try:
            counted = response.status_code == 200 and isinstance(response.json().get("input_tokens"), int)
        except ValueError:
            counted = False
        if not counted:
            target.errors.append(f"count_tokens: HTTP {response.status_code}: {response.text[:200]}")
        elif i >= warmup * len(targets):
            timings[target.name].append(seconds)
    return timings


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Report
# ═════════════════════════════════════════════════════════════════════════════════════════════


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def latency_table(title: str, targets: list[Target], kind: str) -> dict[str, float]:
    """Print one table; returns each gateway's added p50 (seconds)."""
    direct = targets[0].latencies[kind]
    base50, base95 = percentile(direct, 50), percentile(direct, 95)
    print(f"\n{title}")
    print(f"  {'target':<9} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'+p50 ms':>8} {'+p95 ms':>8}")
    added = {}
    for target in targets:
        values = target.latencies[kind]
        if not values:
            print(f"  {target.name:<9} {'0':>5}   (no successful requests)")
            continue
        p50, p95 = percentile(values, 50), percentile(values, 95)
        extra = "" if target is targets[0] else f" {ms(p50 - base50)} {ms(p95 - base95)}"
        print(f"  {target.name:<9} {len(values):>5} {ms(p50)} {ms(p95)}{extra}")
        added[target.name] = p50 - base50
    return added


def compare(label: str, added: dict[str, float]) -> None:
    for name in ("plano", "plano+obs"):
        plano = added.get(name)
        if plano is None:
            continue
        line = f"  {label}: {name} adds {plano * 1000:.2f} ms p50"
        for peer in ("LiteLLM", "ccr"):
            if added.get(peer):
                line += f"; {peer} adds {added[peer] * 1000:.2f} ms ({name}/{peer} = {plano / added[peer]:.3f})"
        print(line)
    if added.get("haproxy") and "plano" in added:
        print(f"  {label}: haproxy adds {added['haproxy'] * 1000:.2f} ms p50 (two more loopback hops, nothing "
              f"read); plano's own work beyond that: {(added['plano'] - added['haproxy']) * 1000:.2f} ms")
    if "plano" in added and "plano+obs" in added:
        cost = added["plano+obs"] - added["plano"]
        line = f"  {label}: metrics and tracing on cost {cost * 1000:+.2f} ms p50"
        if added.get("LiteLLM"):
            line += (f"; plano+obs adds {added['plano+obs'] / added['LiteLLM']:.3f}x LiteLLM's added latency "
                     f"(goal: at most 0.10x)")
        print(line)


def throughput_table(targets: list[Target], rates: dict[str, list[float]]) -> dict[str, float]:
    """Print the long-stream table; returns each target's median rate (deltas per second)."""
    print(f"\nStreaming throughput: one {THROUGHPUT_CHUNKS}-chunk stream at a time, median of "
          f"{len(rates[targets[0].name])} rounds")
    print(f"  {'target':<9} {'deltas/s':>10} {'stream ms':>10} {'vs direct':>10}")
    medians = {name: statistics.median(values) for name, values in rates.items() if values}
    for target in targets:
        rate = medians.get(target.name)
        if rate is None:
            print(f"  {target.name:<9}   (no successful streams)")
            continue
        share = f"{rate / medians['direct']:.1%}" if "direct" in medians else "-"
        print(f"  {target.name:<9} {rate:>10.0f} {THROUGHPUT_CHUNKS / rate * 1000:>10.1f} {share:>10}")
    return medians


def count_tokens_table(count_tokens: dict[str, list[float]]) -> None:
    print(f"\ncount_tokens, ~{len(count_tokens_body()) // 1000} KB Claude Code-like body")
    print(f"  {'target':<9} {'n':>5} {'p50 ms':>8} {'p95 ms':>8}")
    for name, values in count_tokens.items():
        if values:
            print(f"  {name:<9} {len(values):>5} {ms(percentile(values, 50))} {ms(percentile(values, 95))}")
        else:
            print(f"  {name:<9}     0   (no successful requests)")


def report(targets: list[Target], rates: dict[str, list[float]], count_tokens: dict[str, list[float]],
           skipped: list[str], requests: int, observed: str) -> None:
    print(f"\nTargets: {', '.join(t.name for t in targets)}" + "".join(f"\n  {s}" for s in skipped))
    print(f"  plano+obs: {observed}")
    added_json = latency_table(f"Non-streaming /v1/messages ({LATENCY_CHUNKS}-piece answer), "
                               f"{requests} requests per target, latency to last byte", targets, "json")
    added_stream = latency_table(f"Streaming /v1/messages ({LATENCY_CHUNKS} chunks), "
                                 f"{requests} requests per target, time to last byte", targets, "stream")
    medians = throughput_table(targets, rates)
    count_tokens_table(count_tokens)
    print("\nSummary")
    compare("non-streaming", added_json)
    compare("streaming    ", added_stream)
    if "direct" in medians:
        print("  long stream: " + "; ".join(f"{name} delivers {rate / medians['direct']:.1%} of direct's "
                                             f"rate ({rate:,.0f} deltas/s)"
                                             for name, rate in medians.items() if name != "direct"))
    plano_ct = count_tokens.get("plano")
    if plano_ct:
        print(f"  count_tokens through plano: p50 {percentile(plano_ct, 50) * 1000:.2f} ms, "
              f"p95 {percentile(plano_ct, 95) * 1000:.2f} ms (goal: well under 10 ms)")
    for target in targets:
        if target.errors:
            print(f"  {target.name}: {len(target.errors)} failed requests, e.g. {target.errors[0]}")


# ═════════════════════════════════════════════════════════════════════════════════════════════
# CLI
# ═════════════════════════════════════════════════════════════════════════════════════════════


def start_gateways(args: argparse.Namespace, upstream_port: int, workdir: Path,
                   otlp_port: int) -> tuple[list[Target], list[str]]:
    """Every gateway that can run here, and a line for each one skipped. Both planos must start:
    with metrics and tracing off, and on (the `metrics` switch only where this plano has one)."""
    switch = knows_metrics_switch(sys.executable)
    gateways = [
        # haproxy first: plano then follows it in each round as before it followed the direct request.
        ("haproxy", shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.path.exists(p)), None),
         start_haproxy, "apt-get install haproxy"),
        ("plano", sys.executable, functools.partial(start_plano, metrics=False if switch else None), ""),
        ("plano+obs", sys.executable, functools.partial(start_plano, name="plano+obs", metrics=True if switch else None,
                                                        otlp_port=otlp_port), ""),
        ("LiteLLM", find_peer(args.litellm, LITELLM_DEFAULT, "litellm"), start_litellm,
         "pip install 'litellm[proxy]' in a venv, then --litellm VENV/bin/litellm"),
        ("ccr", find_peer(args.ccr, CCR_DEFAULT, "ccr"), start_ccr,
         "npm install @musistudio/claude-code-router@1.0.73, then "
         "--ccr node_modules/@musistudio/claude-code-router/dist/cli.js"),
    ]
    started, skipped = [], []
    for name, program, start, how in gateways:
        if program is None:
            skipped.append(f"{name}: skipped: not installed ({how})")
            continue
        try:
            started.append(start(program, upstream_port, workdir))
        except RuntimeError as e:
            if name.startswith("plano"):
                for target in started:
                    stop(target)
                raise RuntimeError(f"{name} failed to start: {e}\n{(workdir / f'{name}.log').read_text()}") from None
            skipped.append(f"{name}: skipped: failed to start: {e}")
    return started, skipped


def scrape_metrics(client: httpx.Client, target: Target) -> str:
    """What GET /metrics of plano+obs says, in a few words (this plano may have no metrics yet)."""
    response = client.get(target.url.replace("/v1/messages", "/metrics"))
    if response.status_code != 200:
        return f"GET /metrics: HTTP {response.status_code} (metrics not measured: this plano has none)"
    samples = [line for line in response.text.splitlines() if line and not line.startswith("#")]
    return f"GET /metrics: {len(samples)} samples"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300,
                        help="timed requests per target, each of non-streaming and streaming (default 300)")
    parser.add_argument("--litellm", help=f"the litellm proxy binary (default {LITELLM_DEFAULT} or PATH)")
    parser.add_argument("--ccr", help=f"claude-code-router's dist/cli.js (default {CCR_DEFAULT} or `ccr` on PATH)")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="overhead-") as scratch, stand_in() as upstream_port, \
            otlp_receiver() as (otlp_port, otlp_counts):
        print(f"stand-in provider on 127.0.0.1:{upstream_port}, OTLP receiver on 127.0.0.1:{otlp_port}; "
              "starting gateways…", flush=True)
        try:
            gateways, skipped = start_gateways(args, upstream_port, Path(scratch), otlp_port)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        direct = Target("direct", "openai", f"http://127.0.0.1:{upstream_port}/v1/chat/completions",
                        {"content-type": "application/json", "authorization": "Bearer dummy"})
        targets = [direct] + gateways
        print(f"measuring {', '.join(t.name for t in targets)}…", flush=True)
        try:
            with httpx.Client(timeout=httpx.Timeout(60.0), trust_env=False) as client:
                measure_latency(client, targets, args.requests, warmup=20)
                rates = measure_throughput(client, targets, rounds=5)
                count_tokens = measure_count_tokens(client, [t for t in gateways if t.count_tokens_url],
                                                    args.requests, warmup=10)
                scraped = scrape_metrics(client, next(t for t in gateways if t.name == "plano+obs"))
        finally:
            shutdown_notes = [note for note in map(stop, gateways) if note]
        otlp_counts.send("counts")  # after plano+obs stopped: its last spans were flushed
        counts = otlp_counts.recv()
    observed = (f"{counts['spans']:,} spans in {counts['posts']} OTLP exports ({counts['bytes'] / 1e6:.1f} MB) reached "
                f"the receiver; {scraped}")
    report(targets, rates, count_tokens, skipped, args.requests, observed)
    for note in shutdown_notes:
        print(f"  shutdown: {note}")
    print(f"\n(total run time {time.monotonic() - started:.0f} s on {os.cpu_count()} CPUs)")
    return 1 if any(t.errors for t in targets) or shutdown_notes else 0


if __name__ == "__main__":
    sys.exit(main())
