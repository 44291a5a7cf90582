"""Prometheus metrics for `samout serve` (GET /metrics) and the one-line access log.

Each app holds its own CollectorRegistry (never the process-wide default: one process may
build many apps). Counters and histograms are updated where a request's Run sees its
events; the engine and state-cache figures are read from each model when /metrics is
scraped, so serving does no extra work for them and a scrape costs a constant per model.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ACCESS_LOG = logging.getLogger("samout.access")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Where the usage of the request in flight is left for the access log (the ASGI scope).
USAGE_SCOPE_KEY = "samout.usage"

TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class ModelMetrics:
    """One model's label children, bound once so that a token costs one observation."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.model, self.parent = model, metrics
        self.prompt_tokens = metrics.prompt_tokens.labels(model)
        self.generated_tokens = metrics.generated_tokens.labels(model)
        self.ttft = metrics.ttft.labels(model)
        self.itl = metrics.itl.labels(model)
        self.e2e = metrics.e2e.labels(model)

    def success(self, finish_reason: str) -> None:
        self.parent.success.labels(self.model, finish_reason).inc()


class ServerMetrics:
    def __init__(self, models: list) -> None:
        self.registry = CollectorRegistry()
        kw = {"registry": self.registry}
        self.success = Counter("samout_request_success", "Finished choices, by finish reason",
                               ["model", "finish_reason"], **kw)
        self.prompt_tokens = Counter("samout_prompt_tokens", "Prompt tokens of the finished requests",
                                     ["model"], **kw)
        self.generated_tokens = Counter("samout_generated_tokens", "Tokens generated for finished requests",
                                        ["model"], **kw)
        self.ttft = Histogram("samout_time_to_first_token_seconds", "Submission to a choice's first token",
                              ["model"], buckets=REQUEST_BUCKETS, **kw)
        self.itl = Histogram("samout_inter_token_latency_seconds", "Between a choice's successive tokens",
                             ["model"], buckets=TOKEN_BUCKETS, **kw)
        self.e2e = Histogram("samout_e2e_request_latency_seconds", "From submission to a request's end",
                             ["model"], buckets=REQUEST_BUCKETS, **kw)
        self.registry.register(_EngineCollector(models))
        self.models = {m.name: ModelMetrics(self, m.name) for m in models}

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the engines' queues and the state caches at scrape time."""

    def __init__(self, models: list) -> None:
        self.models = models

    def describe(self) -> list:
        return []

    def collect(self):
        running = GaugeMetricFamily("samout_requests_running", "Requests in the running batch",
                                    labels=["model"])
        waiting = GaugeMetricFamily("samout_requests_waiting", "Requests waiting for a batch slot",
                                    labels=["model"])
        hits = CounterMetricFamily("samout_state_cache_hits", "State cache lookups that found a prefix",
                                   labels=["model"])
        misses = CounterMetricFamily("samout_state_cache_misses", "State cache lookups that found none",
                                     labels=["model"])
        nbytes = GaugeMetricFamily("samout_state_cache_bytes", "Bytes the state cache holds",
                                   labels=["model"])
        # By tier (memory, disk, redis): the totals above stay as they were for dashboards.
        tier_hits = CounterMetricFamily("samout_state_cache_tier_hits",
                                        "State cache hits, by the tier that held the state",
                                        labels=["model", "tier"])
        store_errors = CounterMetricFamily("samout_state_store_errors", "Failed calls to the persistent "
                                           "state store (each a miss, never a failed request)",
                                           labels=["model", "store"])
        store_corrupt = CounterMetricFamily("samout_state_store_corrupt", "Stored states that failed their "
                                            "checks (deleted, never served)", labels=["model", "store"])
        store_bytes = GaugeMetricFamily("samout_state_store_bytes", "Bytes the state directory holds "
                                        "(disk store only)", labels=["model", "store"])
        for m in self.models:
            n_running, n_waiting = m.engine.load()
            running.add_metric([m.name], n_running)
            waiting.add_metric([m.name], n_waiting)
            cache = m.engine.cache
            if cache is not None:
                hits.add_metric([m.name], cache.hits)
                misses.add_metric([m.name], cache.misses)
                nbytes.add_metric([m.name], cache.nbytes)
                for tier, n in getattr(cache, "tier_hits", {"memory": cache.hits}).items():
                    tier_hits.add_metric([m.name, tier], n)
                store = getattr(cache, "store", None)
                if store is not None:
                    store_errors.add_metric([m.name, store.tier], cache.store_errors)
                    store_corrupt.add_metric([m.name, store.tier], cache.corrupt)
                    if store.tier == "disk":
                        store_bytes.add_metric([m.name, store.tier], store.stats()["bytes"])
        yield from (running, waiting, hits, misses, nbytes, tier_hits, store_errors, store_corrupt,
                    store_bytes)


class AccessLog:
    """One INFO line per HTTP request on `samout.access`: method, path, status, the tokens
    when a generation reported them, seconds. Never the query or the body. A plain ASGI
    middleware, like the others in api_server.py."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not ACCESS_LOG.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        usage: dict = {}
        scope[USAGE_SCOPE_KEY] = usage

        async def send_seen(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        finally:
            tokens = (f" prompt_tokens={usage['prompt_tokens']} generated_tokens={usage['completion_tokens']}"
                      if usage else "")
            path = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "replace")
            path = path[:200].decode("latin-1").encode("unicode_escape").decode("ascii")  # one line
            ACCESS_LOG.info("%s %s %d%s %.3fs", scope.get("method", "?"), path, status, tokens,
                            time.perf_counter() - start)
