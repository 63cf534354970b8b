"""What routing costs on this CPU: plano's router against the naive method, side by side in one run.

The model is a "shape twin" of Arch-Router-1.5B (same Qwen2 dimensions, the real Qwen vocabulary,
Q4_K_M, random weights; see bench/qwen2_gguf.py): it costs exactly the compute of the real model
and gives exactly its token counts, so its latency is the latency plano will see. It is built once
into the cache directory (~75 s) and reused afterwards.

One loaded model (plano's EmbeddedRouterBackend, its llama.cpp settings, 2 threads) serves both
methods:

- plano: the route-set prefix is evaluated once (warm) and reused; per decision the conversation,
  the instruction tail and the answer prefix `{"route": "` are evaluated, and the route name is
  chosen over a prefix tree of the names.
- naive (what the upstream project does): the whole prompt evaluated from scratch every time, then
  greedy decoding of `{"route": "..."}` until its closing brace.

Measured:
1. Per decision, Claude Code-like first turns: full request bodies as Claude Code sends them,
   trimmed by plano's own conversation_for_router → trim_conversation; the shipped config's routes
   plus three more coding routes. plano through `backend.choose` and through `Router.decide`; the
   methods alternate per conversation, so machine noise hits both. Goal: plano/naive ≤ 0.40 (p50).
   Also shown: the naive method on the conversation the upstream project builds, which keeps the
   ~600-character <system-reminder> Claude Code puts in the first user message.
2. Per turn, a 10-request Claude Code tool loop (one user message, nine tool-result
   continuations): plano's Router.decide_for_request (one decision, then the session's pin)
   against the naive method on every request. Goal: plano/naive ≤ 0.10.
3. Model load, prefix warm-up, prompt tokens/s and decode ms/token on this CPU.
4. Library use: four `plano.route()` calls in one process, the first (load, prefix, decision) and
   the later ones (one decision each).

The twin's random weights pick arbitrary routes, and the route picked changes the work: the
shipped routes "code generation" and "code understanding" share their first token, so either costs
plano one decode step more than "debugging" does, and a longer name costs the naive method more
steps. So both methods are steered to the route the real model would give each conversation (its
label below): same compute as the real model's answer, whatever the weights say.

    python bench/router_latency.py [--model PATH] [--cache-dir DIR] [--runs N]

--model measures another GGUF (e.g. the real Arch-Router-1.5B-Q4_K_M.gguf) instead of the twin.
Default settings take about 2.5 minutes on a 2-core machine once the twin is cached.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import trio

import plano

try:
    plano._LlamaModel.library()  # llama-cpp-python, reached only through plano's adapter
    import numpy as np  # a llama-cpp-python dependency
except (plano.RouterUnavailable, ImportError):
    sys.exit("router_latency: llama-cpp-python is not installed (pip install llama-cpp-python); "
             "the router model runs through it")

ROOT = Path(__file__).resolve().parent.parent
TWIN_FILE = "arch-router-twin-Q4_K_M.gguf"
THREADS = 2  # this machine's cores (plano's default is os.cpu_count())
REQUESTED_MODEL = "claude-opus-5-5"  # Claude Code's default: not configured, so plano routes it
ANSWER_PREFIX = '{"route": "'
GOAL_DECISION = 0.40
GOAL_TURN = 0.10
PINNED, UNPINNED, NAIVE = ("plano decide_for_request (pinning)", "plano decide, no pin, no cache",
                           "naive on every request")

# Routes beyond the shipped config's two, as a team using Claude Code might add them. They go to
# the default model; which model serves a route does not change what the router computes.
EXTRA_ROUTES = (
    plano.RoutingPreference("debugging", "finding and fixing bugs: diagnosing errors, stack traces, failing "
                                         "tests or unexpected behaviour in existing code"),
    plano.RoutingPreference("documentation", "writing or improving documentation: docstrings, comments, "
                                             "READMEs, API references and changelogs"),
    plano.RoutingPreference("architecture", "designing software architecture: system design, module "
                                            "boundaries, data models and trade-offs between approaches"),
)

# First turns: (the route the real model gives, the user's words). Different words, so the
# decision cache never answers; short asks, a pasted traceback, multi-sentence requests.
FIRST_TURNS = (
    ("code generation", "Add a --dry-run flag to scripts/migrate.py that prints the SQL statements "
                        "instead of executing them, and cover it with a test."),
    ("debugging", "Why does `pytest tests/test_orders.py::test_refund` fail since yesterday's merge?\n\n"
                  "Traceback (most recent call last):\n  File \"shop/orders.py\", line 212, in refund\n"
                  "    amount = Money(total, order[\"currency\"])\nKeyError: 'currency'"),
    ("code understanding", "Explain what the retry decorator in shop/http/backoff.py does, especially "
                           "how the jitter and the max_elapsed budget interact."),
    ("documentation", "Write docstrings for the public functions in shop/pricing.py and update the "
                      "README's \"Pricing rules\" section to match what the code does now."),
    ("architecture", "We need to split the monolithic OrderService into separate payment and fulfilment "
                     "services. Propose a module structure and how the two should communicate (events or "
                     "direct calls?). Don't write code yet."),
    ("code generation", "Implement an LRU cache with a per-entry TTL in shop/cache.py (thread-safe, O(1) "
                        "get and put) and use it in ProductRepository.get_by_sku."),
    ("debugging", "The nightly export job got 3x slower after we upgraded SQLAlchemy to 2.0. Can you find "
                  "out why? The slow query is built in shop/export/nightly.py."),
    ("code understanding", "What's the difference between how CartSerializer and OrderSerializer round "
                           "decimal amounts? I think one of them is wrong."),
)
TOOL_LOOP = ("code generation", "Rename the `usr` parameter to `user` across the shop/accounts package "
                                "and fix every call site.")
# Another session's first turn: what the backend evaluated last when a new session's first request
# arrives in a running gateway (no measured conversation starts with the same word).
PREVIOUS_TURN = [{"role": "user", "content": "Fix the flaky timeout in tests/test_http.py."}]


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Claude Code's requests (FACTS §1): the shape plano receives, noise included, so that plano's
# trimming does the work it does in production.
# ═════════════════════════════════════════════════════════════════════════════════════════════

_SYSTEM_REMINDER = (
    "<system-reminder>\nAs you answer the user's questions, you can use the following context:\n"
    "# claudeMd\nCodebase and user instructions are shown below. Be sure to adhere to these instructions. "
    "IMPORTANT: These instructions OVERRIDE any default behavior and you MUST follow them exactly as "
    "written.\n\nContents of /home/dev/shop/CLAUDE.md (project instructions, checked into the codebase):\n\n"
    "- Run the tests with `make test`; money amounts are Decimal, never float.\n"
    "# currentDate\nToday's date is 2026-11-25.\n\n"
    "      IMPORTANT: this context may or may not be relevant to your tasks. You should not respond to "
    "this context unless it is highly relevant to your task.\n</system-reminder>\n")
_TODO_REMINDER = ("<system-reminder>\nThe TodoWrite tool hasn't been used recently. If you're working on "
                  "tasks that would benefit from tracking progress, consider using the TodoWrite tool to "
                  "track progress. Only use it if it's relevant to the current work.\n</system-reminder>")
_SYSTEM_PROMPT = (
    "You are an interactive CLI tool that helps users with software engineering tasks. Use the "
    "instructions below and the tools available to you to assist the user.\n\n"
    + "".join(f"# {topic}\n" + "Follow the conventions of the codebase; read before you edit; keep changes "
              "minimal and verify them with the project's tests. Prefer the dedicated tools over shell "
              "commands for reading, searching and editing files. " * 6 + "\n\n"
              for topic in ("Tone and style", "Proactiveness", "Following conventions", "Code style",
                            "Task management", "Doing tasks", "Tool usage policy", "Code references")))
# Claude Code's tool descriptions run to kilobytes each (~30 KB for the twelve): usage notes like these.
_USAGE_NOTES = "\n\nUsage notes:\n" + "".join(f" - {note}\n" for note in (
    "Always prefer this tool over an equivalent shell command: its output is shaped for the model.",
    "Use absolute paths; relative paths are resolved against the working directory of the session.",
    "When several independent calls are needed, make them in the same response so they run in parallel.",
    "Results longer than 30000 characters are truncated; narrow the request instead of paging through it.",
    "Never use this tool to communicate with the user; all text you output outside tools is shown to them.",
    "If the call fails, read the error message carefully before retrying with corrected arguments.",
    "Respect the project's conventions, found in CLAUDE.md and in the surrounding code.",
    "Do not create files unless they are necessary to achieve the goal; prefer editing existing files.",
)) * 2
_TOOLS = {
    "Agent": {"description": "Launch a new agent to handle complex, multi-step tasks autonomously.",
              "input_schema": {"type": "object", "required": ["description", "prompt"], "properties": {
                  "description": {"type": "string"}, "prompt": {"type": "string"},
                  "subagent_type": {"type": "string"}}}},
    "Bash": {"description": "Executes a given bash command in a persistent shell session with optional timeout.",
             "input_schema": {"type": "object", "required": ["command"], "properties": {
                 "command": {"type": "string"}, "timeout": {"type": "number"},
                 "description": {"type": "string"}, "run_in_background": {"type": "boolean"}}}},
    "Edit": {"description": "Performs exact string replacements in files.",
             "input_schema": {"type": "object", "required": ["file_path", "old_string", "new_string"],
                              "properties": {"file_path": {"type": "string"}, "old_string": {"type": "string"},
                                             "new_string": {"type": "string"},
                                             "replace_all": {"type": "boolean", "default": False}}}},
    "Read": {"description": "Reads a file from the local filesystem.",
             "input_schema": {"type": "object", "required": ["file_path"], "properties": {
                 "file_path": {"type": "string"}, "offset": {"type": "number"}, "limit": {"type": "number"}}}},
    "Write": {"description": "Writes a file to the local filesystem.",
              "input_schema": {"type": "object", "required": ["file_path", "content"], "properties": {
                  "file_path": {"type": "string"}, "content": {"type": "string"}}}},
    "Skill": {"description": "Execute a skill within the main conversation.",
              "input_schema": {"type": "object", "required": ["command"],
                               "properties": {"command": {"type": "string"}}}},
    "ToolSearch": {"description": "Search for deferred tools by keyword and load their definitions.",
                   "input_schema": {"type": "object", "required": ["query"],
                                    "properties": {"query": {"type": "string"}}}},
    "Glob": {"description": "Fast file pattern matching tool that works with any codebase size.",
             "input_schema": {"type": "object", "required": ["pattern"], "properties": {
                 "pattern": {"type": "string"}, "path": {"type": "string"}}}},
    "Grep": {"description": "A powerful search tool built on ripgrep.",
             "input_schema": {"type": "object", "required": ["pattern"], "properties": {
                 "pattern": {"type": "string"}, "path": {"type": "string"}, "glob": {"type": "string"},
                 "output_mode": {"type": "string", "enum": ["content", "files_with_matches", "count"]}}}},
    "TodoWrite": {"description": "Create and manage a structured task list for your current coding session.",
                  "input_schema": {"type": "object", "required": ["todos"], "properties": {
                      "todos": {"type": "array", "items": {"type": "object"}}}}},
    "WebFetch": {"description": "Fetches content from a specified URL and processes it using an AI model.",
                 "input_schema": {"type": "object", "required": ["url", "prompt"], "properties": {
                     "url": {"type": "string", "format": "uri"}, "prompt": {"type": "string"}}}},
    "WebSearch": {"description": "Allows Claude to search the web and use the results to inform responses.",
                  "input_schema": {"type": "object", "required": ["query"],
                                   "properties": {"query": {"type": "string"}}}},
}
# The environment message (role "system" inside `messages`, ~9 KB): working directory, platform,
# git status and the project's files.
_ENVIRONMENT = (
    "<env>\nWorking directory: /home/dev/shop\nIs directory a git repo: Yes\nPlatform: linux\n"
    "OS Version: Linux 6.8.0\nToday's date: 2026-11-25\n</env>\n"
    "gitStatus: This is the git status at the start of the conversation.\nCurrent branch: main\n"
    "Status:\n M shop/orders.py\n?? notes.txt\n\nRecent commits:\n"
    + "".join(f"{0xa1b2c3 + 7919 * k:07x} Fix rounding in order totals (#{400 + k})\n" for k in range(5))
    + "\nFiles:\n"
    + "".join(f"shop/{package}/{module}.py\n" for package in
              ("accounts", "orders", "pricing", "export", "http", "catalog", "payments", "fulfilment",
               "cache", "search", "shipping", "inventory", "notifications", "reports", "auth", "core")
              for module in ("__init__", "models", "service", "repository", "serializers", "views",
                             "tasks", "errors", "utils", "admin", "signals", "schemas", "forms",
                             "permissions", "filters", "urls", "constants", "events"))
    + "".join(f"tests/test_{name}.py\n" for name in
              ("orders", "pricing", "accounts", "export", "cache", "catalog", "payments", "http")) * 4)


def first_turn_body(words: str, session: str) -> dict:
    """The first request of a Claude Code session: what plano receives, not what the router sees."""
    user_id = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": session})
    return {
        "model": REQUESTED_MODEL,
        "max_tokens": 128000,
        "stream": True,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.a1f; cc_entrypoint=cli;"},
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": _SYSTEM_PROMPT, "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": _SYSTEM_REMINDER},
                {"type": "text", "text": words, "cache_control": {"type": "ephemeral"}},
            ]},
            {"role": "system", "content": _ENVIRONMENT},
        ],
        "tools": [{"name": name, "description": tool["description"] + _USAGE_NOTES,
                   "input_schema": tool["input_schema"]} for name, tool in _TOOLS.items()],
        "metadata": {"user_id": user_id},
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
    }


# The agent's steps in the tool loop: (tool, input, result). No assistant text, no new user words,
# so the conversation the router sees is the same for all ten requests.
_LOOP_STEPS = (
    ("Grep", {"pattern": r"\busr\b", "path": "shop/accounts", "output_mode": "files_with_matches"},
     "shop/accounts/service.py\nshop/accounts/views.py\nshop/accounts/permissions.py"),
    ("Read", {"file_path": "/home/dev/shop/shop/accounts/service.py"},
     "     1\tfrom .models import Account\n     2\t\n     3\tdef activate(usr, token):\n     4\t    ..."),
    ("Edit", {"file_path": "/home/dev/shop/shop/accounts/service.py", "old_string": "def activate(usr, token):",
              "new_string": "def activate(user, token):"}, "The file has been updated."),
    ("Read", {"file_path": "/home/dev/shop/shop/accounts/views.py"},
     "    40\t    activate(usr=request.user, token=form.token)"),
    ("Edit", {"file_path": "/home/dev/shop/shop/accounts/views.py", "old_string": "activate(usr=",
              "new_string": "activate(user="}, "The file has been updated."),
    ("Read", {"file_path": "/home/dev/shop/shop/accounts/permissions.py"},
     "    12\tdef can_edit(usr, account):\n    13\t    return usr.is_staff or account.owner_id == usr.id"),
    ("Edit", {"file_path": "/home/dev/shop/shop/accounts/permissions.py", "old_string": "usr", "new_string": "user",
              "replace_all": True}, "The file has been updated. All occurrences were replaced."),
    ("Grep", {"pattern": r"usr=", "path": "shop", "output_mode": "content"}, "No matches found"),
    ("Bash", {"command": "make test", "description": "Run the test suite"},
     "==== 214 passed in 9.81s ===="),
)


def tool_loop_bodies(words: str, session: str) -> list[dict]:
    """The requests of one Claude Code agent turn: the first, then one per tool round trip."""
    bodies = [first_turn_body(words, session)]
    for k, (tool, tool_input, result) in enumerate(_LOOP_STEPS):
        body = dict(bodies[-1])
        tool_id = f"toolu_01{k:022d}"
        result_message = [{"type": "tool_result", "tool_use_id": tool_id, "content": result, "is_error": False,
                           "cache_control": {"type": "ephemeral"}}]
        if k % 3 == 2:  # Claude Code appends reminders to some tool results: harness text, not user text
            result_message.append({"type": "text", "text": _TODO_REMINDER})
        body["messages"] = body["messages"] + [
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "", "signature": f"sig{k:04d}" * 16},
                {"type": "tool_use", "id": tool_id, "name": tool, "input": tool_input},
            ]},
            {"role": "user", "content": result_message},
        ]
        bodies.append(body)
    return bodies


def routed_conversation(backend: plano.EmbeddedRouterBackend, routes: tuple, body: dict) -> list[dict]:
    """What plano's router reads of a request (plano's own trimming and budget)."""
    return backend.trimmed(routes, plano.conversation_for_router(body["messages"]))


def upstream_conversation(backend: plano.EmbeddedRouterBackend, routes: tuple, body: dict) -> list[dict]:
    """What the upstream project routes (FACTS §3): user and assistant text as sent, Claude Code's
    harness blocks included (text blocks joined as plano joins them; same budget)."""
    conversation = []
    for message in body["messages"]:
        if message["role"] in ("user", "assistant"):
            content = message["content"]
            text = content if isinstance(content, str) else "\n".join(
                block["text"] for block in content if block.get("type") == "text")
            if text.strip():
                conversation.append({"role": message["role"], "content": text})
    return plano.trim_conversation(conversation, backend.conversation_budget(routes), backend.count_tokens)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# The two methods
# ═════════════════════════════════════════════════════════════════════════════════════════════


class SteeredBackend(plano.EmbeddedRouterBackend):
    """plano's embedded backend, its choice steered to a given route (see the module docstring).

    At each branch of plano's prefix tree the wanted token's logit is raised to +inf in a copy of
    the logits; what is evaluated, and when, is plano's own. A choice that still differs means
    plano's backend no longer works the way this benchmark assumes, and stops the run.
    """

    def __init__(self, settings: plano.RouterSettings):
        super().__init__(settings)
        self.wanted: str | None = None
        self._wanted_tokens: list[int] = []  # the answer's tokens after `{"route": "`
        self._taken: list[int] = []  # of those, the ones the decision under way has taken

    def steer(self, name: str | None) -> None:
        """Steer the following decisions to `name` (None: the model's own choice)."""
        self.wanted = name
        if name is not None:
            prefix = self.tokenize(ANSWER_PREFIX)
            self._wanted_tokens = self.tokenize(ANSWER_PREFIX + name + '"}')[len(prefix):]

    def choose(self, routes, conversation, cancel) -> plano.RouteChoice:
        self._taken = []
        choice = super().choose(routes, conversation, cancel)
        if self.wanted is not None and choice.name != self.wanted:
            raise SystemExit(f"router_latency: steering to {self.wanted!r} failed (got {choice.name!r}): "
                             "plano's EmbeddedRouterBackend changed; update SteeredBackend")
        return choice

    def _logits_after(self, pending: list[int]):
        logits = super()._logits_after(pending)
        if self.wanted is None:
            return logits
        self._taken += pending
        steered = np.array(logits)  # a copy: the original is llama.cpp's own buffer
        steered[self._wanted_tokens[len(self._taken)]] = np.inf
        return steered


@dataclass
class Sample:
    ms: float
    tokens: int  # tokens evaluated (run through the model)
    kind: str = ""  # in a turn: router, pinned, naive


@dataclass
class NaiveSample(Sample):
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    decode_evals: int = 0  # tokens fed back during decoding
    decode_s: float = 0.0


@dataclass
class Row:
    """One first-turn conversation, measured every way."""
    answer: str
    routed_tokens: int  # the conversation plano routes, as JSON
    body_bytes: int  # the request Claude Code sends
    choose: Sample
    decide: Sample
    naive: NaiveSample
    naive_upstream: NaiveSample
    choose_no_guess: Sample  # plano choose without evaluating a shared first route token early


def follow_previous_decision(backend: SteeredBackend, routes: tuple) -> None:
    """Leave the backend as a running gateway's is before a new session's decision (untimed).

    plano reuses the longest prefix it evaluated. After another session's decision that is the
    route-set prefix plus the conversation's opening `[{"role": "user", "content": "` (11 tokens).
    Every plano measurement starts from this state, whatever ran before it, so the order of the
    methods does not matter.
    """
    backend.steer(None)
    backend.choose(routes, PREVIOUS_TURN, threading.Event())


def plano_choose(backend: SteeredBackend, routes: tuple, conversation: list[dict], answer: str,
                 speculate: bool = True) -> Sample:
    follow_previous_decision(backend, routes)
    backend.steer(answer)
    backend.speculate = speculate
    try:
        started = time.perf_counter()
        backend.choose(routes, conversation, threading.Event())
        return Sample((time.perf_counter() - started) * 1000, backend.tokens_evaluated)
    finally:
        backend.speculate = True


async def plano_decide(router: plano.Router, messages: list[dict], answer: str) -> Sample:
    follow_previous_decision(router.backend, router.routes)
    router.backend.steer(answer)
    ms, decision = await timed(router.decide, messages)
    return Sample(ms, tokens_run(router.backend, decision))


def naive_decision(backend: SteeredBackend, routes: tuple, conversation: list[dict], answer: str) -> NaiveSample:
    """The naive method: the whole prompt from scratch, then free greedy decoding of the answer.

    Each step picks the argmax over the whole vocabulary, as a server does, and decoding stops at
    the JSON's closing brace. The token fed back is the real answer's, `{"route": "<answer>"}`
    (7 tokens for "code generation"), not the random twin's pick: same compute, the real step count.
    """
    model = backend.model  # the naive method drives the model as a server would, through plano's adapter
    started = time.perf_counter()
    prompt = backend.tokenize(backend.chat_head + plano.router_prompt(routes, conversation) + backend.chat_tail)
    answer_tokens = backend.tokenize(json.dumps({"route": answer}))
    model.truncate(0)  # no reuse: evaluation drops the KV cache from n_tokens on, i.e. all of it
    eval_started = time.perf_counter()
    model.evaluate(prompt)
    prompt_done = time.perf_counter()
    for step, token in enumerate(answer_tokens):
        int(np.argmax(model.logits()))  # the greedy pick (overruled by the real answer: see above)
        if step == len(answer_tokens) - 1:
            break  # the closing `"}` completes the answer: nothing more to evaluate
        model.evaluate([token])
    done = time.perf_counter()
    fed = len(answer_tokens) - 1
    return NaiveSample((done - started) * 1000, len(prompt) + fed, "naive", prompt_tokens=len(prompt),
                       prompt_s=prompt_done - eval_started, decode_evals=fed, decode_s=done - prompt_done)


def ready_router(config: plano.Config, backend: SteeredBackend) -> plano.Router:
    """A Router on the backend loaded and warmed above (timed separately), with an empty decision
    cache and no pins: marked ready rather than started, so that nothing here is timed twice."""
    router = plano.Router(config, backend)
    router.status = "ready"
    return router


async def timed(call, *args) -> tuple[float, plano.RouteDecision]:
    started = time.perf_counter()
    decision = await call(*args)
    return (time.perf_counter() - started) * 1000, decision


def tokens_run(backend: SteeredBackend, decision: plano.RouteDecision) -> int:
    """Tokens the model evaluated for this decision: none when it was pinned or cached."""
    if decision.decision == "fallback":
        raise SystemExit(f"router_latency: plano fell back instead of deciding: {decision.reason}")
    ran = decision.decision in ("router", "default") and "(cached)" not in decision.reason
    return backend.tokens_evaluated if ran else 0


# ═════════════════════════════════════════════════════════════════════════════════════════════
# The run
# ═════════════════════════════════════════════════════════════════════════════════════════════


def twin_path(cache_dir: Path) -> tuple[Path, str]:
    """The twin from the cache, built there first if missing."""
    path = cache_dir / TWIN_FILE
    if path.exists():
        return path, "cached"
    try:
        from qwen2_gguf import fetch_qwen_vocab, write_arch_router_twin
    except ImportError as e:
        sys.exit(f"router_latency: building the twin needs the `gguf` package ({e}); pip install gguf")
    print(f"building the Arch-Router-1.5B shape twin in {cache_dir} (once: ~75 s, ~3 GB temporary disk) …",
          flush=True)
    started = time.perf_counter()
    # llama.cpp logs every tensor it quantizes; only its errors belong in the benchmark's output.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    write_arch_router_twin(path, fetch_qwen_vocab(cache_dir))
    return path, f"built in {time.perf_counter() - started:.0f} s"


def bench_config(model_path: Path) -> plano.Config:
    """The shipped config.yaml with three more routes, routing through `model_path`."""
    config = plano.load_config(str(ROOT / "config.yaml"),
                               environ={"OPENAI_API_KEY": "unused", "ANTHROPIC_API_KEY": "unused"})
    default = config.default_model
    models = tuple(dataclasses.replace(m, routing_preferences=m.routing_preferences + EXTRA_ROUTES)
                   if m is default else m for m in config.models)
    # A generous timeout: a slow decision must be measured, not replaced by the fallback.
    router = dataclasses.replace(config.router, model=str(model_path), threads=THREADS, timeout_ms=600_000)
    return dataclasses.replace(config, models=models, router=router)


async def measure(args: argparse.Namespace) -> None:
    if args.model:
        model_path, origin = Path(args.model), "given"
    else:
        model_path, origin = twin_path(Path(args.cache_dir).expanduser())
    config = bench_config(model_path)
    backend = SteeredBackend(config.router)
    started = time.perf_counter()
    try:
        backend.load_model()
    except plano.RouterUnavailable as e:
        sys.exit(f"router_latency: {e}")
    load_s = time.perf_counter() - started
    routes = tuple(pref for pref, _ in config.routes)
    prefix_tokens = len(backend.tokenize(backend.chat_head + plano.router_prompt_prefix(routes)))
    started = time.perf_counter()
    backend.warm(routes)  # what Router.start() does, once per route set
    warm_s = time.perf_counter() - started
    print(f"model   {model_path} ({model_path.stat().st_size / 1e6:.0f} MB, {origin})")
    print(f"llama   n_ctx {backend.model.n_ctx}, n_batch {backend.model.n_batch}, {THREADS} threads "
          f"({backend.model.where}); "
          f"load {load_s:.2f} s; warm {warm_s:.2f} s for the {prefix_tokens}-token prefix "
          f"(chat head + {len(routes)} routes)")
    print(f"routes  {', '.join(r.name for r in routes)} (+ {plano.NO_ROUTE})")

    rows = await measure_decisions(config, backend, routes, args.runs)
    print_decisions(rows)
    turns = await measure_turn(config, backend, routes)
    print_turn(turns)

    naive_runs = [run for row in rows for run in (row.naive, row.naive_upstream)] + turns[NAIVE]
    prompt_rate = sum(n.prompt_tokens for n in naive_runs) / sum(n.prompt_s for n in naive_runs)
    decode_ms = 1000 * sum(n.decode_s for n in naive_runs) / sum(n.decode_evals for n in naive_runs)
    sizes = sorted(n.prompt_tokens for n in naive_runs)
    print(f"\n3. This CPU, from the {len(naive_runs)} naive runs: prompt {prompt_rate:.0f} tokens/s "
          f"({sizes[0]}-{sizes[-1]}-token prompts from scratch), decode {decode_ms:.0f} ms/token")
    backend.close_model()  # the library's route() loads its own copy, as a program using it would
    print_library_use(await measure_library_use(config))


LIBRARY_TEXTS = ("write a quicksort in Rust", "explain what this regex does: ^a+$",
                 "fix the off-by-one error in my loop", "add type hints to this module")


async def measure_library_use(config: plano.Config) -> list[float]:
    """Part 4: `plano.route()` as a program calls it, four times in one process (milliseconds each).
    The first call loads the model and evaluates the route-set prefix; the later ones must cost one
    decision each (the loaded model is kept for the life of the process)."""
    times = []
    for text in LIBRARY_TEXTS:
        started = time.perf_counter()
        decision = await plano.route_async(text, config)
        times.append((time.perf_counter() - started) * 1000)
        if decision.decision == "fallback":
            raise SystemExit(f"router_latency: route() fell back instead of deciding: {decision.reason}")
    return times


def print_library_use(times: list[float]) -> None:
    later = times[1:]
    print(f"\n4. Library use, plano.route() x{len(times)} in one process: first {times[0] / 1000:.2f} s "
          f"(load + prefix + decision), later {statistics.median(later):.0f} ms p50 "
          f"({', '.join(f'{t:.0f}' for t in later)} ms: one decision each)")


async def measure_decisions(config: plano.Config, backend: SteeredBackend, routes: tuple, runs: int) -> list[Row]:
    """Part 1: each first turn through plano (choose, Router.decide) and the naive method."""
    router = ready_router(config, backend)
    rows = []
    for k, (answer, words) in enumerate(FIRST_TURNS[:runs]):
        body = first_turn_body(words, f"session-{k}")
        conversation = routed_conversation(backend, routes, body)
        with_reminder = upstream_conversation(backend, routes, body)

        def run_naive() -> tuple[NaiveSample, NaiveSample]:
            return (naive_decision(backend, routes, conversation, answer),
                    naive_decision(backend, routes, with_reminder, answer))

        if k % 2:  # alternate which method goes first, so a drift in machine speed hits both
            naive, naive_upstream = run_naive()
            no_guess = plano_choose(backend, routes, conversation, answer, speculate=False)
        choose = plano_choose(backend, routes, conversation, answer)
        decide = await plano_decide(router, body["messages"], answer)
        if not k % 2:
            no_guess = plano_choose(backend, routes, conversation, answer, speculate=False)
            naive, naive_upstream = run_naive()
        rows.append(Row(answer, backend.count_tokens(json.dumps(conversation)), len(json.dumps(body)),
                        choose, decide, naive, naive_upstream, no_guess))
    return rows


async def measure_turn(config: plano.Config, backend: SteeredBackend, routes: tuple) -> dict[str, list[Sample]]:
    """Part 2: the router compute of every request of one tool-loop turn, three ways."""
    answer, words = TOOL_LOOP
    session = "session-tool-loop"
    bodies = tool_loop_bodies(words, session)
    headers = {"x-claude-code-session-id": session}
    conversations = [routed_conversation(backend, routes, body) for body in bodies]
    assert all(c == conversations[0] for c in conversations), "the tool loop must not add routed text"
    turns: dict[str, list[Sample]] = {PINNED: [], UNPINNED: [], NAIVE: []}

    follow_previous_decision(backend, routes)
    backend.steer(answer)
    pinned_router = ready_router(config, backend)
    for body in bodies:
        ms, decision = await timed(pinned_router.decide_for_request, body, plano.session_key(body, headers))
        turns[PINNED].append(Sample(ms, tokens_run(backend, decision), decision.decision))

    follow_previous_decision(backend, routes)
    backend.steer(answer)
    for body in bodies:
        # A fresh Router per request: no pin, no decision cache. The backend still reuses the
        # longest prefix it evaluated, which for an unchanged conversation is all but one token.
        ms, decision = await timed(ready_router(config, backend).decide, body["messages"])
        turns[UNPINNED].append(Sample(ms, tokens_run(backend, decision), decision.decision))

    for body in bodies:
        started = time.perf_counter()
        conversation = routed_conversation(backend, routes, body)  # a naive gateway trims as well
        naive = naive_decision(backend, routes, conversation, answer)
        turns[NAIVE].append(dataclasses.replace(naive, ms=(time.perf_counter() - started) * 1000))
    return turns


def verdict(ratio: float, goal: float) -> str:
    return f"goal ≤ {goal:.2f}: {'met' if ratio <= goal else 'NOT met'}"


def print_decisions(rows: list[Row]) -> None:
    p50 = statistics.median
    methods = ("choose", "decide", "naive", "naive_upstream")

    def table_line(label: str, routed: float, cells: list[tuple[float, float]]) -> str:
        (choose_ms, _), _, (naive_ms, _), (upstream_ms, _) = cells
        timings = "".join(f"   {ms:>5.0f} ms {tokens:>4.0f}" for ms, tokens in cells)
        return (f"   {label:<18} {routed:>8.0f}{timings}   {choose_ms / naive_ms:>11.2f}  "
                f"{choose_ms / upstream_ms:>20.2f}")

    print(f"\n1. Per decision: Claude Code-like first turns ({len(rows)} conversation{'s' * (len(rows) > 1)}, "
          f"request bodies ~{p50(row.body_bytes for row in rows) / 1000:.0f} KB; routed = tokens of the "
          "conversation after plano's trimming)")
    print("   answer               routed   plano choose   Router.decide  naive          naive+reminder"
          "   plano/naive  plano/naive+reminder")
    for row in rows:
        print(table_line(row.answer, row.routed_tokens,
                         [(getattr(row, m).ms, getattr(row, m).tokens) for m in methods]))
    medians = [(p50(getattr(row, m).ms for row in rows), p50(getattr(row, m).tokens for row in rows))
               for m in methods]
    print(table_line("p50", p50(row.routed_tokens for row in rows), medians))
    fed = sorted({row.naive.decode_evals for row in rows})
    fed_text = str(fed[0]) if len(fed) == 1 else f"{fed[0]}-{fed[-1]}"
    print(f"   (ms, then tokens evaluated. naive: the whole prompt + {fed_text} decoded tokens fed back;\n"
          "    naive+reminder: the same for the conversation the upstream project builds, which keeps\n"
          "    Claude Code's <system-reminder>)")
    (choose_ms, _), (decide_ms, _), (naive_ms, _), (upstream_ms, _) = medians
    # FACTS §4's naive decision is the Claude Code request routed the way the upstream project
    # builds its prompt (system-reminder kept): that is the goal's baseline. The same comparison
    # on plano's own trimmed conversation isolates prefix reuse + constrained decoding alone.
    print(f"   plano/naive at p50, the Claude Code request as upstream routes it (naive+reminder): "
          f"{choose_ms / upstream_ms:.2f}   {verdict(choose_ms / upstream_ms, GOAL_DECISION)}")
    print(f"   plano/naive at p50, same trimmed conversation: choose {choose_ms / naive_ms:.2f}, "
          f"Router.decide {decide_ms / naive_ms:.2f} (prefix reuse and constrained decoding alone)")
    shared = [row for row in rows if row.answer.startswith("code ")]  # the routes that share "code"
    if shared:
        with_guess, without = (p50(getattr(row, m).ms for row in shared) for m in ("choose", "choose_no_guess"))
        print(f"   the shared first token evaluated with the prompt ({len(shared)} decisions for a \"code …\" "
              f"route): choose p50 {with_guess:.0f} ms vs {without:.0f} ms without ({with_guess / without:.2f})")


def print_turn(turns: dict[str, list[Sample]]) -> None:
    requests = len(turns[NAIVE])
    print(f"\n2. Per turn: a {requests}-request tool loop (1 user message + {requests - 1} tool-result "
          f"continuations; the routed conversation is the same each time: {turns[NAIVE][0].prompt_tokens}-token "
          "naive prompt)")
    print("   method                                router ms   tokens   requests")
    for label, samples in turns.items():
        kinds = collections.Counter(s.kind for s in samples)
        print(f"   {label:<36} {sum(s.ms for s in samples):>10.0f}   {sum(s.tokens for s in samples):>6}   "
              + " + ".join(f"{n} {kind}" for kind, n in kinds.items()))
    naive_ms = sum(s.ms for s in turns[NAIVE])
    pinned, unpinned = (sum(s.ms for s in turns[label]) / naive_ms for label in (PINNED, UNPINNED))
    print(f"   plano/naive per turn: {pinned:.3f} with pinning ({unpinned:.3f} without pin and cache)   "
          f"{verdict(pinned, GOAL_TURN)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a GGUF to route with instead of the shape twin")
    parser.add_argument("--cache-dir", default="~/.cache/plano-bench", help="where the twin is built and kept")
    parser.add_argument("--runs", type=int, default=len(FIRST_TURNS),
                        help=f"first-turn conversations measured per method (1-{len(FIRST_TURNS)}, "
                             f"default {len(FIRST_TURNS)})")
    args = parser.parse_args()
    if not 1 <= args.runs <= len(FIRST_TURNS):
        parser.error(f"--runs must be between 1 and {len(FIRST_TURNS)}")
    if args.model and not Path(args.model).is_file():
        parser.error(f"--model {args.model}: no such file")
    trio.run(measure, args)


if __name__ == "__main__":
    main()
