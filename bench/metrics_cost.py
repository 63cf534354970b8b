"""What recording Prometheus metrics costs plano per request, and what a scrape costs.

Per chat request with `metrics: true` the gateway runs, besides its other work: `Metrics.finished`
(the requests counter, the GenAI duration, first-token and token histograms, plano's added-latency
histogram, token and cost counters), the in-flight gauge around the request and, for a routed
request, the decisions-waiting gauge and the router histogram around the decision. Each is
measured here on plano's own objects (a config of four models with routes and prices, the
exchanges a routed streamed answer and an explicit whole one leave behind), in steady state
(every series already exists), p50 of many calls. A scrape is `GET /metrics`'s rendering after
those exchanges have spread over every model, route, decision and a few statuses.

    python bench/metrics_cost.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import plano  # noqa: E402
from capability_check import per_call_us  # noqa: E402  (this folder is on the path: run as a script)

CONFIG = """
llm_providers:
  - model: openai/gpt-4.1
    routing_preferences:
      - {name: code generation, description: writing new code}
      - {name: code understanding, description: explaining code}
  - model: anthropic/claude-sonnet-4-5
    default: true
  - model: deepseek/deepseek-chat
    routing_preferences:
      - {name: quick questions, description: short questions}
  - model: groq/llama-3.3-70b-versatile
    prices: {input: 0.59, output: 0.79}
"""


def finished_exchange(config: plano.Config, model: str, route: str | None, kind: str, status: int,
                      api: str) -> plano._Exchange:
    """An exchange as the gateway leaves it at its end: decided, answered, timed, with usage."""
    exchange = plano._Exchange(plano.Request("POST", {"anthropic": "/v1/messages", "openai": "/v1/chat/completions",
                                                      "responses": "/v1/responses"}[api], {}, {}))
    exchange.config, exchange.status = config, status
    exchange.decision = plano.RouteDecision(model, route, kind, 2.5, "bench")
    exchange.model = config.model_named(model)
    exchange.upstream_ms, exchange.first_byte_ms = 180.0, 181.2
    exchange.used({"input_tokens": 1200, "cache_read_input_tokens": 30000, "cache_creation_input_tokens": 800,
                   "output_tokens": 350}, 120)
    return exchange


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20000)
    args = parser.parse_args()
    config = plano.parse_config(CONFIG, path="bench.yaml", environ={})
    metrics = plano.Metrics(lambda: (config, {}, None))
    routed = finished_exchange(config, "openai/gpt-4.1", "code generation", "router", 200, "anthropic")
    explicit = finished_exchange(config, "anthropic/claude-sonnet-4-5", None, "explicit", 200, "openai")
    routed_row, explicit_row = plano.usage_row(routed, config), plano.usage_row(explicit, config)
    decision = routed.decision

    # Spread exchanges over every model, route, decision kind and a few statuses, as a day's traffic would.
    for model, route in [(m.name, None) for m in config.models] + [(m.name, p.name) for p, m in config.routes]:
        for kind in ("router", "default", "explicit", "alias", "pinned", "sticky", "fallback"):
            for status in (200, 400, 429, 502):
                for api in ("anthropic", "openai", "responses"):
                    exchange = finished_exchange(config, model, route, kind, status, api)
                    metrics.finished(exchange, plano.usage_row(exchange, config), config)

    async def decided() -> plano.RouteDecision:
        return decision

    async def deciding_pairs(runs: int, wrapped: bool) -> list[float]:
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            await (metrics.deciding(decided()) if wrapped else decided())
            samples.append((time.perf_counter() - started) * 1e6)
        return samples

    def in_flight() -> None:
        with metrics.in_flight.track_inprogress():
            pass

    finished_routed = per_call_us(lambda: metrics.finished(routed, routed_row, config), args.runs)
    finished_explicit = per_call_us(lambda: metrics.finished(explicit, explicit_row, config), args.runs)
    row = per_call_us(lambda: plano.usage_row(routed, config), args.runs)
    gauge = per_call_us(in_flight, args.runs)
    wrapped = statistics.median(trio.run(deciding_pairs, args.runs, True))
    bare = statistics.median(trio.run(deciding_pairs, args.runs, False))
    body, _ = metrics.exposition("")
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    scrape = per_call_us(lambda: metrics.exposition(""), 200)
    openmetrics = per_call_us(lambda: metrics.exposition("application/openmetrics-text; version=1.0.0"), 200)

    print(f"per request, p50 of {args.runs:,} calls:")
    print(f"  Metrics.finished, a routed streamed answer     {finished_routed:7.1f} µs")
    print(f"  Metrics.finished, an explicit whole answer     {finished_explicit:7.1f} µs")
    print(f"  usage_row (computed once for ledger and metrics) {row:5.1f} µs")
    print(f"  in-flight gauge around the request             {gauge:7.1f} µs")
    print(f"  router decision through Metrics.deciding       {wrapped - bare:7.1f} µs more than without")
    print(f"a scrape with {series:,} samples: text {scrape / 1000:.1f} ms, OpenMetrics {openmetrics / 1000:.1f} ms "
          f"({len(body) // 1024} KiB)")


if __name__ == "__main__":
    main()
