"""What tracing costs plano per chat request, measured on plano's own objects.

With the OTEL_* variables asking for traces, the gateway calls the hooks of a `_RequestTrace` for
each chat request: before the answer has gone out (what the client waits for) it starts the
request's span, an upstream attempt's span, puts that attempt's `traceparent` on the provider
request, and reads the answer (whole, or each stream event) for its id, model and finish reasons;
after the answer has gone out, `finish` sets the attributes and ends the spans, handing them to
the SDK's BatchSpanProcessor. Its thread then encodes them (protobuf) and sends them: that CPU is
not the request's, but it holds the GIL while it runs. Each is measured here, p50 of many calls,
for an Anthropic client's request to an OpenAI-format model (the shape bench/overhead.py sends),
whole and as a 20-chunk stream; and the same hooks with tracing off (`_NO_TRACE`).

    python bench/traces_cost.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import plano  # noqa: E402

CONFIG = """
llm_providers:
  - model: openai/gpt-4.1
    base_url: http://127.0.0.1:9/v1
    access_key: unused
"""
BODY = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [{"role": "user", "content": "explain this"}]}
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4.1-2025-04-14",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "an answer"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 812, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 700}}}


def stream_events(chunks: int = 20) -> list[plano.SSEEvent]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4.1-2025-04-14"}
    deltas = [{"role": "assistant", "content": ""}] + [{"content": f"piece {k} "} for k in range(chunks)]
    events = [dict(base, choices=[{"index": 0, "delta": d, "finish_reason": None}]) for d in deltas]
    events.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    events.append(dict(base, choices=[], usage=ANSWER["usage"]))
    return [plano.SSEEvent(None, json.dumps(e)) for e in events] + [plano.SSEEvent(None, "[DONE]")]


def request_through(tracing: plano.Tracing | None, config: plano.Config, stream: bool,
                    events: list[plano.SSEEvent]) -> tuple[float, float]:
    """(seconds before the answer goes out, seconds after) of one request's tracing hooks, in the
    order the gateway calls them."""
    model = config.models[0]
    request = plano.Request("POST", "/v1/messages", {}, {"host": "127.0.0.1", "content-type": "application/json"})
    exchange = plano._Exchange(request, config=config, body=BODY, requested_model="openai/gpt-4.1",
                               wants_stream=stream, session="session-1")
    call = plano.provider_request(model, "anthropic", BODY, json.dumps(BODY).encode(), request.headers, {})
    started = time.perf_counter()
    if tracing is not None:
        exchange.trace = tracing.begin(request, exchange.started)
    traced = exchange.trace.attempt(model)
    traced.carrying(call)
    traced.answered(200)
    if stream:
        observe = exchange.trace.stream_event
        for event in events if observe is not None else ():
            observe(event)
    else:
        exchange.trace.answer(ANSWER)
    answered = time.perf_counter()
    exchange.decision = plano.RouteDecision(model.name, None, "explicit", reason="the request named it")
    exchange.model, exchange.status, exchange.first_byte_ms = model, 200, 1.0
    exchange.used({"input_tokens": 112, "cache_read_input_tokens": 700, "output_tokens": 20}, None)
    exchange.trace.finish(exchange)
    return answered - started, time.perf_counter() - answered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3000, help="requests per measurement (default 3000)")
    args = parser.parse_args()
    # Spans to a port nothing listens on, batched for longer than the run: nothing is exported
    # while the hooks are timed (the export's own cost is measured apart, below).
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_BSP_SCHEDULE_DELAY="3600000",
                      OTEL_BSP_MAX_QUEUE_SIZE="10000000", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="10000000")
    config = plano.parse_config(CONFIG, environ={})
    tracing = plano.Tracing.from_environment(os.environ)
    assert tracing is not None
    events = stream_events()
    print(f"tracing cost per chat request, p50 of {args.runs} (µs)")
    print(f"  {'':<22} {'before the answer':>18} {'after it':>10}")
    for label, traced, stream in (("off, whole", None, False), ("off, 20-chunk stream", None, True),
                                  ("on, whole", tracing, False), ("on, 20-chunk stream", tracing, True)):
        for _ in range(200):  # warm-up
            request_through(traced, config, stream, events)
        before, after = zip(*(request_through(traced, config, stream, events) for _ in range(args.runs)))
        print(f"  {label:<22} {statistics.median(before) * 1e6:>18.1f} {statistics.median(after) * 1e6:>10.1f}")

    # What the BatchSpanProcessor's thread spends on a request's spans: the OTLP/protobuf encoding
    # of a batch of them (sending it is I/O, done with the GIL released).
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    kept = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(kept))
    for _ in range(256):
        request_through(tracing, config, False, events)
    spans = kept.get_finished_spans()
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        encode_spans(spans).SerializeToString()
        timings.append(time.perf_counter() - started)
    per_span = statistics.median(timings) / len(spans)
    print(f"\nexporter thread: {per_span * 1e6:.1f} µs to encode a span (batches of {len(spans)}), "
          f"{per_span * len(spans) / 256 * 1e6:.0f} µs per request ({len(spans) / 256:.0f} spans)")
    print(f"\n(on {os.cpu_count()} CPUs; python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
