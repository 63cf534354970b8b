"""plano's test-suite: the spec, as tests.

End-to-end tests run the real plano server on loopback and drive it with real clients (the
official `anthropic` and `openai` SDKs, httpx for raw HTTP, the Claude Code CLI). Upstream
providers are stand-in HTTP servers below that speak each provider's wire format for real:
status codes, SSE framing written in small pieces (so events and UTF-8 characters are split
across network reads), usage, error bodies.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import anthropic
import httpx
import openai
import pytest
import trio

import plano

HERE = Path(__file__).resolve().parent
OPENAI_KEY = "sk-test-openai-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-test-0123456789abcdef"
GATEWAY_KEY = "plano-gateway-key-0123456789"
ALL_KEYS = (OPENAI_KEY, ANTHROPIC_KEY, GATEWAY_KEY)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Stand-in providers
# ═════════════════════════════════════════════════════════════════════════════════════════════


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.raw)


@dataclass
class Reply:
    """What a stand-in answers: a status and a JSON body, or a list of SSE byte pieces."""

    status: int = 200
    body: Any = None
    sse: list[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    piece_delay: float = 0.0
    abort_after: int | None = None  # close the connection after this many SSE pieces


def sse_pieces(events: list[tuple[str | None, Any]], piece: int = 7) -> list[bytes]:
    """Encode SSE events, then cut the bytes into `piece`-byte reads (splitting UTF-8)."""
    raw = b"".join((f"event: {name}\n" if name else "").encode() +
                   b"data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)).encode()
                   + b"\n\n" for name, data in events)
    return [raw[i:i + piece] for i in range(0, len(raw), piece)]


def last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        content = message.get("content")
        if message.get("role") == "user":
            if isinstance(content, str):
                return content
            texts = [b.get("text", "") for b in content if b.get("type") == "text"]
            if texts:
                return texts[-1]
    return ""


def tool_result_text(messages: list[dict]) -> str | None:
    """The newest tool result, in either format, or None if the newest turn has none."""
    last = messages[-1]
    if last.get("role") == "tool":
        return last["content"] if isinstance(last["content"], str) else json.dumps(last["content"])
    if last.get("role") == "user" and isinstance(last.get("content"), list):
        for block in last["content"]:
            if block.get("type") == "tool_result":
                content = block.get("content")
                return content if isinstance(content, str) else "".join(b.get("text", "") for b in content)
    return None


# The stand-in models' behaviour, shared by both formats: a request whose newest user text says
# "TOOL:<command>" gets a Bash tool call; a tool result gets "tool said: <result>"; "THINK"
# adds reasoning; anything else is echoed. Tool arguments carry "é€" so that UTF-8 characters
# are split across network reads.
def model_behaviour(messages: list[dict]) -> dict:
    result = tool_result_text(messages)
    if result is not None:
        return {"text": f"tool said: {result}"}
    text = last_user_text(messages)
    match = re.search(r"TOOL:(.+)$", text)
    if match:
        return {"tool": {"id": "call_abc123", "name": "Bash",
                         "arguments": json.dumps({"command": match.group(1).strip(), "note": "é€"},
                                                 ensure_ascii=False)}}
    reply = {"text": f"echo: {text}"}
    if "THINK" in text:
        reply["reasoning"] = "let me think… 🤔"
    return reply


class OpenAIStandIn:
    """A Chat Completions provider at /v1/chat/completions."""

    def openai_reply(self, request: Recorded) -> Reply:
        if request.headers.get("authorization") != f"Bearer {OPENAI_KEY}":
            return Reply(401, {"error": {"message": "Incorrect API key provided: sk-te***ef. You can find your "
                                         f"API key at https://platform.openai.com. ({request.headers.get('authorization', '')})",
                                         "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
        body = request.json
        behaviour = model_behaviour(body["messages"])
        usage = {"prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47,
                 "prompt_tokens_details": {"cached_tokens": 30}}
        finish = "tool_calls" if "tool" in behaviour else "stop"
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": behaviour.get("text")}
            if "reasoning" in behaviour:
                message["reasoning_content"] = behaviour["reasoning"]
            if "tool" in behaviour:
                t = behaviour["tool"]
                message["tool_calls"] = [{"id": t["id"], "type": "function",
                                          "function": {"name": t["name"], "arguments": t["arguments"]}}]
            return Reply(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                               "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                               "usage": usage})
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}

        def chunk(delta: dict, finish_reason: str | None = None) -> tuple[None, dict]:
            return None, dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish_reason}])

        events = [chunk({"role": "assistant", "content": ""})]
        if "reasoning" in behaviour:
            events += [chunk({"reasoning_content": behaviour["reasoning"][:6]}),
                       chunk({"reasoning_content": behaviour["reasoning"][6:]})]
        if "text" in behaviour:
            text = behaviour["text"]
            events += [chunk({"content": text[i:i + 5]}) for i in range(0, len(text), 5)]
        if "tool" in behaviour:
            t = behaviour["tool"]
            args = t["arguments"]
            events.append(chunk({"tool_calls": [{"index": 0, "id": t["id"], "type": "function",
                                                 "function": {"name": t["name"], "arguments": ""}}]}))
            events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i:i + 4]}}]})
                       for i in range(0, len(args), 4)]
        events.append(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append((None, dict(base, choices=[], usage=usage)))
        events.append((None, "[DONE]"))
        return Reply(200, sse=sse_pieces(events))


class AnthropicStandIn:
    """A Messages provider at /v1/messages."""

    def anthropic_reply(self, request: Recorded) -> Reply:
        if request.headers.get("x-api-key") != ANTHROPIC_KEY:
            return Reply(401, {"type": "error", "error": {"type": "authentication_error",
                                                          "message": "invalid x-api-key"}})
        if "anthropic-version" not in request.headers:
            return Reply(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                          "message": "anthropic-version header is required"}})
        body = request.json
        behaviour = model_behaviour(body["messages"])
        usage = {"input_tokens": 12, "output_tokens": 9, "cache_read_input_tokens": 30,
                 "cache_creation_input_tokens": 0}
        content: list[dict] = []
        if "reasoning" in behaviour:
            content.append({"type": "thinking", "thinking": behaviour["reasoning"], "signature": "sig-real"})
        if "text" in behaviour:
            content.append({"type": "text", "text": behaviour["text"]})
        if "tool" in behaviour:
            t = behaviour["tool"]
            content.append({"type": "tool_use", "id": "toolu_01", "name": t["name"], "input": json.loads(t["arguments"])})
        stop = "tool_use" if "tool" in behaviour else "end_turn"
        message = {"id": "msg_01", "type": "message", "role": "assistant", "model": body["model"],
                   "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            return Reply(200, message)
        events: list[tuple[str, Any]] = [("message_start", {"type": "message_start", "message": dict(
            message, content=[], stop_reason=None, usage={"input_tokens": 12, "output_tokens": 1,
                                                         "cache_read_input_tokens": 30})}),
            ("ping", {"type": "ping"})]
        for index, block in enumerate(content):
            if block["type"] == "text":
                start, deltas = {"type": "text", "text": ""}, [
                    {"type": "text_delta", "text": block["text"][i:i + 5]} for i in range(0, len(block["text"]), 5)]
            elif block["type"] == "thinking":
                start, deltas = {"type": "thinking", "thinking": ""}, [
                    {"type": "thinking_delta", "thinking": block["thinking"]},
                    {"type": "signature_delta", "signature": block["signature"]}]
            else:
                args = json.dumps(block["input"], ensure_ascii=False)
                start, deltas = dict(block, input={}), [
                    {"type": "input_json_delta", "partial_json": args[i:i + 4]} for i in range(0, len(args), 4)]
            events.append(("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}))
            events += [("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas]
            events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                      "usage": {"output_tokens": 9}}),
                   ("message_stop", {"type": "message_stop"})]
        return Reply(200, sse=sse_pieces(events))


class StandInProvider(OpenAIStandIn, AnthropicStandIn):
    """One loopback HTTP server that speaks both formats (OpenAI under /v1/chat/completions,
    Anthropic under /v1/messages), records every request, and can be scripted per test."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.script: queue.Queue[Reply | Callable[[Recorded], Reply]] = queue.Queue()
        self.disconnects = 0  # streams the client abandoned before the end
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                recorded = Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, raw)
                provider.requests.append(recorded)
                provider.answer(self, recorded)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def openai_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def then(self, reply: Reply | Callable[[Recorded], Reply]) -> None:
        """Script the next answer (instead of the model behaviour)."""
        self.script.put(reply)

    def answer(self, handler: http.server.BaseHTTPRequestHandler, request: Recorded) -> None:
        try:
            scripted = self.script.get_nowait()
            reply = scripted(request) if callable(scripted) else scripted
        except queue.Empty:
            path = request.path.split("?")[0]
            reply = self.openai_reply(request) if path.endswith("/chat/completions") else self.anthropic_reply(request)
        try:
            if reply.sse is None:
                data = json.dumps(reply.body).encode()
                handler.send_response(reply.status)
                handler.send_header("content-type", "application/json")
                handler.send_header("content-length", str(len(data)))
                for k, v in reply.headers.items():
                    handler.send_header(k, v)
                handler.end_headers()
                handler.wfile.write(data)
                return
            handler.send_response(reply.status)
            handler.send_header("content-type", "text/event-stream")
            handler.send_header("connection", "close")  # body framed by closing the connection
            for k, v in reply.headers.items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.close_connection = True
            for i, piece in enumerate(reply.sse):
                if reply.abort_after is not None and i >= reply.abort_after:
                    return
                handler.wfile.write(piece)
                handler.wfile.flush()
                if reply.piece_delay:
                    time.sleep(reply.piece_delay)
        except (BrokenPipeError, ConnectionResetError):
            self.disconnects += 1

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def provider():
    stand_in = StandInProvider()
    yield stand_in
    stand_in.close()


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Running plano
# ═════════════════════════════════════════════════════════════════════════════════════════════


def config_for(provider: StandInProvider, extra: str = "", **env: str) -> plano.Config:
    """A config with one OpenAI-format and one Anthropic-format model on the stand-in."""
    text = f"""
llm_providers:
  - model: openai/gpt-4o
    base_url: {provider.openai_base}
    access_key: $OPENAI_API_KEY
    default: true
  - model: anthropic/claude-sonnet-4-5
    base_url: {provider.anthropic_base}
    access_key: $ANTHROPIC_API_KEY
model_aliases:
  fast:
    target: openai/gpt-4o
{extra}"""
    environ = {"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY, **env}
    return plano.parse_config(text, path="test-config.yaml", environ=environ)


class RunningPlano:
    """plano serving on loopback in a background thread (its own trio loop), for sync clients."""

    def __init__(self, config: plano.Config, router: Any = None, limits: plano.ServerLimits | None = None):
        self.config = config
        ready = threading.Event()
        self.failure: BaseException | None = None

        async def run() -> None:
            self.token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self.scope:
                async with trio.open_nursery() as nursery:
                    self.info = await nursery.start(lambda task_status: plano.serve(
                        config, host="127.0.0.1", port=0, router=router, limits=limits, task_status=task_status))
                    ready.set()

        def thread_main() -> None:
            try:
                trio.run(run)
            except BaseException as e:  # surfaced by the test that started it
                self.failure = e
                ready.set()

        self.thread = threading.Thread(target=thread_main, daemon=True)
        self.thread.start()
        ready.wait(30)
        if self.failure:
            raise self.failure

    @property
    def url(self) -> str:
        return self.info.url

    @property
    def gateway(self) -> plano.Gateway:
        return self.info.gateway

    def stop(self) -> None:
        trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
        self.thread.join(10)


@pytest.fixture
def gateway(provider):
    running = RunningPlano(config_for(provider))
    yield running
    running.stop()


def anthropic_client(running: RunningPlano, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=running.url, api_key=kw.pop("api_key", "client-key-not-forwarded"),
                               max_retries=0, **kw)


def openai_client(running: RunningPlano, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.url + "/v1", api_key=kw.pop("api_key", "client-key-not-forwarded"),
                         max_retries=0, **kw)


BASH_TOOL = {"name": "Bash", "description": "Run a shell command",
             "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                              "required": ["command"]}}
BASH_FUNCTION = {"type": "function", "function": {"name": "Bash", "description": "Run a shell command",
                                                   "parameters": BASH_TOOL["input_schema"]}}


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Gateway core: both SDKs × both upstream formats, streaming and not
# ═════════════════════════════════════════════════════════════════════════════════════════════

UPSTREAMS = pytest.mark.parametrize("model", ["openai/gpt-4o", "anthropic/claude-sonnet-4-5"])


@UPSTREAMS
def test_anthropic_sdk_gets_a_text_answer(gateway, provider, model):
    raw = anthropic_client(gateway).messages.with_raw_response.create(
        model=model, max_tokens=100, messages=[{"role": "user", "content": "hello wörld"}])
    message = raw.parse()
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "echo: hello wörld"
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0
    assert raw.headers["x-plano-model"] == model
    assert raw.headers["x-plano-decision"] == "explicit"


@UPSTREAMS
def test_anthropic_sdk_streams_a_text_answer(gateway, provider, model):
    with anthropic_client(gateway).messages.stream(
            model=model, max_tokens=100, messages=[{"role": "user", "content": "stream me ünïcode 😀"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: stream me ünïcode 😀"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0
    assert final.usage.cache_read_input_tokens == 30  # cached tokens survive both formats


@UPSTREAMS
@pytest.mark.parametrize("streaming", [False, True])
def test_anthropic_sdk_tool_round_trip(gateway, provider, model, streaming):
    client = anthropic_client(gateway)
    messages = [{"role": "user", "content": "TOOL:echo plano"}]

    def ask(messages):
        if streaming:
            with client.messages.stream(model=model, max_tokens=100, tools=[BASH_TOOL], messages=messages) as s:
                return s.get_final_message()
        return client.messages.create(model=model, max_tokens=100, tools=[BASH_TOOL], messages=messages)

    first = ask(messages)
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "Bash"
    assert call.input == {"command": "echo plano", "note": "é€"}  # UTF-8 split across reads
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": "plano-42", "is_error": False}]}]
    second = ask(messages)
    assert second.content[-1].text == "tool said: plano-42"
    if model.startswith("openai/"):
        sent = provider.requests[-1].json["messages"]
        assert sent[-1] == {"role": "tool", "tool_call_id": "call_abc123", "content": "plano-42"}
        assert sent[-2]["tool_calls"][0]["function"]["name"] == "Bash"


def test_anthropic_sdk_streams_reasoning_as_thinking(gateway, provider):
    with anthropic_client(gateway).messages.stream(
            model="openai/gpt-4o", max_tokens=100, messages=[{"role": "user", "content": "THINK hard"}]) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "let me think… 🤔"
    assert final.content[0].signature == ""  # never a made-up signature


@UPSTREAMS
def test_openai_sdk_gets_a_text_answer(gateway, provider, model):
    raw = openai_client(gateway).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: héllo"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens_details.cached_tokens == 30
    assert raw.headers["x-plano-model"] == model


@UPSTREAMS
def test_openai_sdk_streams_with_usage(gateway, provider, model):
    stream = openai_client(gateway).chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "stream €uro"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream €uro"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


@UPSTREAMS
@pytest.mark.parametrize("streaming", [False, True])
def test_openai_sdk_tool_round_trip(gateway, provider, model, streaming):
    client = openai_client(gateway)
    messages: list[dict] = [{"role": "user", "content": "TOOL:ls -la"}]
    if streaming:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in client.chat.completions.create(model=model, messages=messages, tools=[BASH_FUNCTION], stream=True):
            for c in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                entry = calls.setdefault(c.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = c.id or entry["id"]
                entry["name"] = (c.function.name if c.function else None) or entry["name"]
                entry["arguments"] += (c.function.arguments or "") if c.function else ""
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert finish == "tool_calls" and len(calls) == 1
        call_id, name, arguments = calls[0]["id"], calls[0]["name"], calls[0]["arguments"]
    else:
        completion = client.chat.completions.create(model=model, messages=messages, tools=[BASH_FUNCTION])
        assert completion.choices[0].finish_reason == "tool_calls"
        call = completion.choices[0].message.tool_calls[0]
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert name == "Bash" and json.loads(arguments) == {"command": "ls -la", "note": "é€"}
    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
                 {"role": "tool", "tool_call_id": call_id, "content": "file-list"}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=[BASH_FUNCTION])
    assert answer.choices[0].message.content == "tool said: file-list"


def test_openai_sdk_gets_reasoning_from_anthropic_thinking(gateway, provider):
    completion = openai_client(gateway).chat.completions.create(
        model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": "THINK"}])
    assert completion.choices[0].message.model_extra["reasoning_content"] == "let me think… 🤔"


def test_images_reach_an_openai_upstream_as_image_parts(gateway, provider):
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    anthropic_client(gateway).messages.create(model="openai/gpt-4o", max_tokens=50, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "text", "text": "what is this"}]}])
    parts = provider.requests[-1].json["messages"][-1]["content"]
    assert parts == [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                     {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                     {"type": "text", "text": "what is this"}]


def test_images_reach_an_anthropic_upstream_as_image_blocks(gateway, provider):
    openai_client(gateway).chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}]}])
    assert provider.requests[-1].json["messages"][-1]["content"] == [
        {"type": "text", "text": "see"}, {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}}]


# ── choosing the model ────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("requested, used, decision", [
    ("openai/gpt-4o", "openai/gpt-4o", "explicit"),
    ("claude-sonnet-4-5", "anthropic/claude-sonnet-4-5", "explicit"),  # a bare id naming one model
    ("fast", "openai/gpt-4o", "alias"),
    ("claude-opus-5-5", "openai/gpt-4o", "default"),  # not configured, routing off → default
])
def test_model_choice_is_reported_in_headers(gateway, provider, requested, used, decision):
    raw = anthropic_client(gateway).messages.with_raw_response.create(
        model=requested, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert (raw.headers["x-plano-model"], raw.headers["x-plano-decision"]) == (used, decision)
    upstream_model = provider.requests[-1].json["model"]
    assert upstream_model == used.split("/", 1)[1]


# ── passthrough ───────────────────────────────────────────────────────────────────────────

def test_anthropic_passthrough_changes_only_the_model_bytes(gateway, provider):
    body = ('{ "max_tokens" :64,"model":  "anthropic/claude-sonnet-4-5" ,"messages":[{"role":"user","content":'
            '[{"type":"text","text":"caf\\u00e9 ☕","cache_control":{"type":"ephemeral"}}]}],'
            '"future_field":{"keep":[1,2.50,true]},"system":[{"type":"text","text":"s"}]}')
    response = httpx.post(gateway.url + "/v1/messages?beta=true", content=body.encode(), headers={
        "x-api-key": "client-key", "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219,x-y",
        "content-type": "application/json"})
    assert response.status_code == 200, response.text
    sent = provider.requests[-1]
    assert sent.raw == body.replace('"anthropic/claude-sonnet-4-5"', '"claude-sonnet-4-5"').encode()
    assert sent.path == "/v1/messages?beta=true"
    assert sent.headers["anthropic-beta"] == "claude-code-20250219,x-y"
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY


def test_openai_passthrough_changes_only_the_model_bytes(gateway, provider):
    body = '{"messages": [{"role": "user", "content": "x"}],  "model": "openai/gpt-4o", "seed": 7, "logit_bias": {}}'
    response = httpx.post(gateway.url + "/v1/chat/completions", content=body.encode(),
                          headers={"authorization": "Bearer client-key", "content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert provider.requests[-1].raw == body.replace('"openai/gpt-4o"', '"gpt-4o"').encode()


def test_passthrough_streams_bytes_as_the_provider_sent_them(gateway, provider):
    events = [("message_start", {"type": "message_start", "message": {
                  "id": "m", "type": "message", "role": "assistant", "model": "x", "content": [],
                  "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}}),
              ("custom_future_event", {"type": "custom_future_event", "x": "ünknown"}),
              ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
              ("message_stop", {"type": "message_stop"})]
    provider.then(Reply(sse=sse_pieces(events, piece=3)))
    response = httpx.post(gateway.url + "/v1/messages", json={
        "model": "anthropic/claude-sonnet-4-5", "max_tokens": 5, "stream": True,
        "messages": [{"role": "user", "content": "hi"}]})
    assert response.content == b"".join(sse_pieces(events))


# ── keys ──────────────────────────────────────────────────────────────────────────────────

@UPSTREAMS
def test_client_keys_are_replaced_by_the_configured_key(gateway, provider, model):
    anthropic_client(gateway, api_key="client-secret-xyz").messages.create(
        model=model, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    sent = json.dumps(provider.requests[-1].headers)
    assert "client-secret-xyz" not in sent
    assert (OPENAI_KEY if model.startswith("openai") else ANTHROPIC_KEY) in sent


def test_a_missing_key_variable_is_named_in_an_authentication_error(provider):
    running = RunningPlano(plano.parse_config(f"""
llm_providers:
  - model: openai/gpt-4o
    base_url: {provider.openai_base}
    access_key: $PLANO_TEST_UNSET_KEY
""", environ={}))
    try:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=5,
                                                      messages=[{"role": "user", "content": "hi"}])
        assert "PLANO_TEST_UNSET_KEY" in str(caught.value)
        assert provider.requests == []  # nothing was sent without a key
    finally:
        running.stop()


def test_a_rejected_key_is_reported_without_echoing_it(provider):
    running = RunningPlano(config_for(provider, OPENAI_API_KEY="sk-wrong-key-000000000000"))
    try:
        with pytest.raises(openai.AuthenticationError) as caught:
            openai_client(running).chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "x"}])
        message = json.dumps(caught.value.body)
        assert "OPENAI_API_KEY" in message
        assert "sk-wrong-key" not in message  # the stand-in echoes the header it got; plano scrubs it
    finally:
        running.stop()


# ── errors in the caller's format ─────────────────────────────────────────────────────────

def test_invalid_json_is_a_400_in_anthropic_shape(gateway):
    response = httpx.post(gateway.url + "/v1/messages", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_bad_field_is_named_in_openai_shape(gateway):
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "openai/gpt-4o", "messages": "nope"})
    assert response.status_code == 400
    assert "messages" in response.json()["error"]["message"]


def test_a_bad_nested_field_is_named(gateway):
    response = httpx.post(gateway.url + "/v1/messages", json={
        "model": "openai/gpt-4o", "max_tokens": 5,
        "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]})
    assert response.status_code == 400
    assert "messages[0].content[0]" in response.json()["error"]["message"]


def test_unknown_paths_are_404(gateway):
    response = httpx.get(gateway.url + "/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_an_oversized_body_is_refused_with_413_before_it_is_read(gateway):
    host, port = "127.0.0.1", int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 40000000\r\n\r\n{")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413")
    assert "request_too_large" in answer


@pytest.mark.parametrize("status, anthropic_error, openai_error", [
    (429, anthropic.RateLimitError, openai.RateLimitError),
    (500, anthropic.InternalServerError, openai.InternalServerError),
    (529, anthropic.InternalServerError, openai.InternalServerError),
])
def test_upstream_errors_reach_both_sdks_with_status_and_type(gateway, provider, status, anthropic_error, openai_error):
    body = {"error": {"message": f"upstream said {status}", "type": "server_error", "code": None}}
    provider.then(Reply(status, body, headers={"retry-after": "7"}))
    with pytest.raises(anthropic_error) as a:
        anthropic_client(gateway).messages.create(model="openai/gpt-4o", max_tokens=5,
                                                  messages=[{"role": "user", "content": "x"}])
    assert a.value.status_code == status
    assert a.value.body["error"]["type"] == {429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}[status]
    assert f"upstream said {status}" in a.value.body["error"]["message"]
    if status == 429:
        assert a.value.response.headers["retry-after"] == "7"
    provider.then(Reply(status, {"type": "error", "error": {"type": "overloaded_error" if status == 529 else "api_error",
                                                            "message": f"anthropic said {status}"}}))
    with pytest.raises(openai_error) as o:
        openai_client(gateway).chat.completions.create(model="anthropic/claude-sonnet-4-5",
                                                       messages=[{"role": "user", "content": "x"}])
    assert o.value.status_code == status
    assert f"anthropic said {status}" in o.value.message


def test_a_stream_that_breaks_after_it_started_ends_with_an_error_event(gateway, provider):
    provider.then(lambda request: dataclass_replace(provider.openai_reply(request), abort_after=20))
    with pytest.raises(anthropic.APIStatusError) as caught:
        with anthropic_client(gateway).messages.stream(model="openai/gpt-4o", max_tokens=50,
                                                       messages=[{"role": "user", "content": "a long answer please"}]) as s:
            for _ in s:
                pass
    assert "ended before it finished" in str(caught.value)


def test_a_broken_openai_stream_reaches_an_openai_client_as_an_error_not_done(gateway, provider):
    events = [("message_start", {"type": "message_start", "message": {"id": "m", "usage": {}}}),
              ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})]
    provider.then(Reply(sse=sse_pieces(events)))
    response = httpx.post(gateway.url + "/v1/chat/completions", json={
        "model": "anthropic/claude-sonnet-4-5", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 200
    assert "[DONE]" not in response.text
    last = [line for line in response.text.splitlines() if line.startswith("data:")][-1]
    assert "error" in json.loads(last[5:])


def test_malformed_upstream_sse_becomes_an_error_event(gateway, provider):
    provider.then(Reply(sse=[b"data: {\"choices\": [{\"delta\": {\"content\": \"hi\"}}]}\n\n", b"data: {oops\n\n"]))
    response = httpx.post(gateway.url + "/v1/messages", json={
        "model": "openai/gpt-4o", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 200
    assert "event: error" in response.text
    assert "message_stop" not in response.text


def dataclass_replace(reply: Reply, **changes: Any) -> Reply:
    import dataclasses
    return dataclasses.replace(reply, **changes)


def test_a_client_that_hangs_up_cancels_the_upstream_request(gateway, provider):
    events = [(None, {"choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}]})
              for i in range(400)]
    provider.then(Reply(sse=sse_pieces(events, piece=200), piece_delay=0.02))
    with httpx.stream("POST", gateway.url + "/v1/messages", json={
            "model": "openai/gpt-4o", "max_tokens": 5, "stream": True,
            "messages": [{"role": "user", "content": "x"}]}) as response:
        next(response.iter_bytes())
    deadline = time.monotonic() + 5
    while provider.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert provider.disconnects == 1


# ── small endpoints ───────────────────────────────────────────────────────────────────────

def test_count_tokens_is_answered_locally(gateway, provider):
    client = anthropic_client(gateway)
    small = client.messages.count_tokens(model="claude-opus-5-5", messages=[{"role": "user", "content": "hi"}])
    big = client.messages.count_tokens(model="claude-opus-5-5", system="You are helpful. " * 100, tools=[BASH_TOOL],
                                       messages=[{"role": "user", "content": "hi " * 400}])
    assert 0 < small.input_tokens < 20
    assert big.input_tokens > small.input_tokens + 500
    assert provider.requests == []


def test_models_lists_configured_models_and_aliases_in_both_formats(gateway):
    assert {m.id for m in openai_client(gateway).models.list()} == {"openai/gpt-4o", "anthropic/claude-sonnet-4-5", "fast"}
    assert {m.id for m in anthropic_client(gateway).models.list()} == {"openai/gpt-4o", "anthropic/claude-sonnet-4-5", "fast"}


def test_healthz(gateway):
    assert httpx.get(gateway.url + "/healthz").json()["status"] == "ok"


def test_keep_alive_serves_many_requests_on_one_connection(gateway, provider):
    with httpx.Client(base_url=gateway.url) as client:
        for i in range(5):
            r = client.post("/v1/chat/completions", json={"model": "fast", "messages": [{"role": "user", "content": str(i)}]})
            assert r.json()["choices"][0]["message"]["content"] == f"echo: {i}"
    assert len(provider.requests) == 5


def test_access_log_has_one_line_per_request_and_no_keys(gateway, provider, caplog):
    caplog.set_level("INFO", logger="plano")
    anthropic_client(gateway).messages.create(model="fast", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    lines = [r.getMessage() for r in caplog.records if "/v1/messages" in r.getMessage()]
    assert len(lines) == 1
    assert "fast -> openai/gpt-4o [alias] 200" in lines[0]
    assert "tokens=40/7" in lines[0]
    assert not any(key in caplog.text for key in ALL_KEYS)


# ── library ───────────────────────────────────────────────────────────────────────────────

async def test_serve_embeds_in_a_trio_program_and_reports_readiness(provider):
    config = config_for(provider)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(lambda task_status: plano.serve(config, port=0, router=None, task_status=task_status))
        async with httpx.AsyncClient() as client:
            r = await client.post(info.url + "/v1/chat/completions",
                                  json={"model": "fast", "messages": [{"role": "user", "content": "lib"}]})
        assert r.json()["choices"][0]["message"]["content"] == "echo: lib"
        nursery.cancel_scope.cancel()


# ── CLI ───────────────────────────────────────────────────────────────────────────────────

def run_plano_cli(*args: str, env: dict | None = None, timeout: float = 30, cwd: Path = HERE) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "plano", *args], capture_output=True, text=True,
                          timeout=timeout, env=environment, cwd=cwd)


def test_up_with_the_shipped_config_and_no_keys_starts_and_names_the_variables(tmp_path):
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = subprocess.Popen([sys.executable, "-m", "plano", "up", "--config", str(HERE / "config.yaml"),
                             "--port", str(port)], stderr=subprocess.PIPE, text=True, env=environment, cwd=tmp_path)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "OPENAI_API_KEY" in err and "ANTHROPIC_API_KEY" in err
    assert f"listening on http://127.0.0.1:{port}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("text, expected", [
    ("llm_providers:\n  - model: openai/gpt-4o\n    default: [oops\n", "bad.yaml:3: invalid YAML"),
    ("llm_providers:\n  - model: openai/gpt-4o\n    access_key: x\n    colour: blue\n", "bad.yaml:4: `colour`"),
    ("llm_providers:\n  - model: mystery/m1\n", "bad.yaml:2: `model` unknown provider `mystery`"),
    ("llm_providers:\n  - model: openai/gpt-4o\n    access_key: x\nlisteners:\n  - port: high\n", "bad.yaml:5: `port`"),
])
def test_a_bad_config_exits_with_one_line_naming_file_line_and_field(tmp_path, text, expected):
    (tmp_path / "bad.yaml").write_text(text)
    result = run_plano_cli("up", "--config", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_config_is_found_through_plano_config(tmp_path):
    (tmp_path / "elsewhere.yaml").write_text("llm_providers:\n  - model: nope\n")
    result = run_plano_cli("up", env={"PLANO_CONFIG": str(tmp_path / "elsewhere.yaml")}, cwd=tmp_path)
    assert result.returncode == 2 and "elsewhere.yaml:2" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 20) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
