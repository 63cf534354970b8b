"""What plano's capability check costs per request, and how much of it is the token estimate.

The check (`plano.request_needs` + `plano.fit_decision`) runs on every chat request before it is
sent. Measured on Claude Code-shaped Anthropic bodies (12 tools with JSON schemas, a system of
three blocks, a conversation of tool calls and results) of three sizes: a first turn (~50 kB),
a session at ~40k tokens, one at ~180k tokens (past a 128k model's window, so the decision
moves). Reported per request, p50 over many runs: the whole check, `estimate_tokens` alone
(what count_tokens answers with; the check's dominant cost), and for scale the `json.loads` of
the same body, which plano does for every request anyway.

    python bench/capability_check.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import plano  # noqa: E402

CONFIG = """
llm_providers:
  - model: deepseek/deepseek-chat
    context_window: 128000
    default: true
  - model: anthropic/claude-sonnet-4-5
  - model: openai/gpt-4.1
"""

TOOL = {"name": "Tool", "description": "A tool Claude Code offers. " * 20,
        "input_schema": {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 80}
                                                          for i in range(8)}, "required": ["p0"]}}


def claude_code_body(turns: int) -> dict:
    messages: list[dict] = [{"role": "user", "content": [
        {"type": "text",
         "text": "<system-reminder>\n" + "Codebase and user instructions. " * 20 + "</system-reminder>"},
        {"type": "text", "text": "refactor the parser"}]}]
    for i in range(turns):
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": "Let me look at the file."},
            {"type": "tool_use", "id": f"toolu_{i}", "name": "Read", "input": {"file_path": f"/src/module_{i}.py"}}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": "def f(x):\n    return x + 1\n" * 140}]})
    return {"model": "claude-opus-5-5", "max_tokens": 32000, "stream": True,
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332;"},
                       {"type": "text", "text": "You are Claude Code. " * 400, "cache_control": {"type": "ephemeral"}}],
            "tools": [dict(TOOL, name=f"Tool{i}") for i in range(12)], "messages": messages}


def per_call_us(function, runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    config = plano.parse_config(CONFIG, path="bench.yaml", environ={})
    decision = plano.RouteDecision("deepseek/deepseek-chat", None, "default", reason="no route fits")
    print(f"{'request':<24} {'kB':>5} {'tokens':>7} {'answered by':<28} {'check p50':>10} {'estimate':>9} "
          f"{'json.loads':>10}")
    for label, turns in (("Claude Code first turn", 0), ("session ~40k tokens", 45), ("session ~180k tokens", 210)):
        body = claude_code_body(turns)
        needs = plano.request_needs(body, "anthropic")
        chosen = plano.fit_decision(config, decision, needs).model
        check = per_call_us(lambda: plano.fit_decision(config, decision, plano.request_needs(body, "anthropic")),
                            args.runs)
        estimate = per_call_us(lambda: plano.estimate_tokens(body), args.runs)
        raw = json.dumps(body)
        parse = per_call_us(lambda: json.loads(raw), args.runs)
        print(f"{label:<24} {len(raw) // 1000:>5} {needs.input_tokens:>7} {chosen:<28} {check:>8.0f}µs "
              f"{estimate:>7.0f}µs {parse:>8.0f}µs")


if __name__ == "__main__":
    main()
