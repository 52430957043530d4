"""GET /metrics of `edgemoe serve`: edgemoe's expert-cache counters and the server's request counts, in
Prometheus' text format (version 0.0.4).

At each scrape a custom collector turns a `Snapshot` into metric families: the loaded model's statistics
as `Llama.edgemoe_stats()` gives them without waiting (while a request runs, the figures as of the model's
last evaluation), the queue, and the request counts kept by `RequestCounter`, an ASGI middleware. Nothing
here waits for the model. prometheus_client (the server extra) is imported when the app is built, so a
server without it still runs, and its /metrics says what to install.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"      # prometheus_client's CONTENT_TYPE_PLAIN_0_0_4
UNMATCHED = "unmatched"     # the route label of a path no route serves (a label per path would grow unbounded)

# (type, name, help, where in edgemoe_stats()); a value of None (budget_bytes without a limit) gives no sample
MODEL_METRICS = (
    ("counter", "edgemoe_expert_hits", "Chosen experts that were already in memory.", ("total", "hits")),
    ("counter", "edgemoe_expert_misses", "Chosen experts read from storage while llama.cpp waited.",
     ("total", "misses")),
    ("counter", "edgemoe_expert_fetched_bytes", "Bytes of experts read from storage on demand.",
     ("total", "bytes_fetched")),
    ("counter", "edgemoe_expert_evicted_bytes", "Bytes of experts dropped from memory.", ("total", "bytes_evicted")),
    ("counter", "edgemoe_stall_seconds", "Seconds llama.cpp waited for expert reads.", ("total", "stall_s")),
    ("counter", "edgemoe_substituted_experts", "Chosen experts run from their low-bit copies.",
     ("total", "substituted")),
    ("counter", "edgemoe_substituted_bytes", "Bytes of low-bit expert copies read.", ("total", "substituted_bytes")),
    ("counter", "edgemoe_reclaimed_experts", "Experts the cache held whose pages the kernel reclaimed.",
     ("total", "reclaimed")),
    ("gauge", "edgemoe_capacity_given_up_bytes", "Bytes of the expert budget given up to memory pressure.",
     ("capacity_given_up_bytes",)),
    ("counter", "edgemoe_prefetches", "Experts read ahead on a prediction.", ("total", "prefetches")),
    ("counter", "edgemoe_prefetch_bytes", "Bytes of experts read ahead on a prediction.", ("total", "prefetch_bytes")),
    ("counter", "edgemoe_prefetch_used", "Prefetched experts chosen before they were evicted.",
     ("total", "prefetch_used")),
    ("counter", "edgemoe_prefetch_wasted", "Prefetched experts evicted unused.", ("total", "prefetch_wasted")),
    ("counter", "edgemoe_moe_routings", "MoE layer evaluations routed (one per layer per batch).", ("routes",)),
    ("counter", "edgemoe_prompt_tokens", "Prompt tokens the model evaluated (a reused prefix is not).",
     ("tokens", "prompt")),
    ("counter", "edgemoe_generated_tokens", "Tokens the model generated (sampled).", ("tokens", "generated")),
    ("gauge", "edgemoe_resident_expert_bytes", "Bytes of experts in memory.", ("resident_expert_bytes",)),
    ("gauge", "edgemoe_budget_bytes", "The memory budget for experts, in bytes (absent: no limit).",
     ("budget_bytes",)),
    ("gauge", "edgemoe_expert_bytes", "Bytes of all experts in the model file.", ("expert_bytes",)),
    ("gauge", "edgemoe_resident_experts", "Experts in memory.", ("resident_experts",)),
    ("gauge", "edgemoe_pinned_edge_bytes", "Expert bytes kept in memory at tensor edges, inside the budget.",
     ("pinned_edge_bytes",)),
)


@dataclass(frozen=True)
class Snapshot:
    """What one scrape reports, read without waiting for the model."""

    model: str | None               # the loaded model's alias (None while one loads)
    stats: dict | None              # its edgemoe_stats()
    running: bool                   # a request holds the model
    waiting: int                    # requests queued for it
    queue_size: int
    requests: dict[tuple[str, str, str], int]    # (route, method, status) -> requests answered
    in_flight: int                  # HTTP requests being answered, streams included


class RequestCounts:
    """What the middleware counts (on the event loop only)."""

    def __init__(self):
        self.answered: Counter[tuple[str, str, str]] = Counter()
        self.in_flight = 0


class RequestCounter:
    """ASGI middleware counting HTTP requests by route (its path template), method and status, and those in
    flight. A request that fails before it answers counts as 500, as its client sees it."""

    def __init__(self, app, counts: RequestCounts):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = None

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.counts.in_flight += 1
        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            status = status or 500
            raise
        finally:
            self.counts.in_flight -= 1
            if status is not None:
                route = getattr(scope.get("route"), "path", None) or UNMATCHED
                self.counts.answered[(route, scope["method"], str(status))] += 1


def _lookup(stats: dict, path: tuple[str, ...]):
    for key in path:
        stats = stats[key]
    return stats


class Collector:
    """Metric families from `snapshot()` at each scrape (a prometheus_client collector)."""

    def __init__(self, snapshot: Callable[[], Snapshot]):
        self.snapshot = snapshot

    def describe(self) -> list:
        return []                   # the families depend on the snapshot: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.snapshot()
        requests = CounterMetricFamily("edgemoe_http_requests", "HTTP requests answered, by route, method and "
                                       "status.", labels=["route", "method", "status"])
        for labels, n in sorted(s.requests.items()):
            requests.add_metric(list(labels), n)
        yield requests
        for name, doc, value in (
                ("edgemoe_http_requests_in_flight", "HTTP requests being answered, streams included.", s.in_flight),
                ("edgemoe_requests_running", "Requests holding the model (0 or 1).", int(s.running)),
                ("edgemoe_requests_waiting", "Requests queued for the model.", s.waiting),
                ("edgemoe_queue_size", "Requests that may wait before more are refused with 503.", s.queue_size)):
            yield GaugeMetricFamily(name, doc, value=value)
        kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
        for kind, name, doc, path in MODEL_METRICS:     # the loaded model's, labelled with its alias
            family = kinds[kind](name, doc, labels=["model"])
            value = None if s.model is None or s.stats is None else _lookup(s.stats, path)
            if value is not None:
                family.add_metric([s.model], value)
            yield family


def registry(snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) with edgemoe's collector and the process's
    (resident memory, CPU seconds, open files). ImportError without prometheus_client."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(snapshot))
    ProcessCollector(registry=reg)
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    """The registry's metrics in the text format CONTENT_TYPE names."""
    from prometheus_client import generate_latest

    return generate_latest(reg)
