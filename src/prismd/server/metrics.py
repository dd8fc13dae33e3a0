"""`/metrics` in the Prometheus text format, from a registry of this server's own.

Turn figures are taken from the session events as they are published (`done` and turn-ending
`error`), so the runner needs no hooks; request errors from the WebSocket handler.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from ..protocol import ServerEvent

router = APIRouter()

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    def __init__(self, connections: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.turns = Counter(
            "prismd_turns", "Turns ended, by agent and stop reason", ["agent", "stop_reason"],
            registry=r,
        )  # fmt: skip
        self.tokens_in = Counter(
            "prismd_tokens_in", "Input tokens used by turns", ["agent"], registry=r
        )
        self.tokens_out = Counter(
            "prismd_tokens_out", "Output tokens produced by turns", ["agent"], registry=r
        )
        self.cost = Counter(
            "prismd_cost_usd", "Cost of turns in US dollars (where prices are known)", registry=r
        )
        self.latency = Histogram(
            "prismd_turn_duration_seconds",
            "Wall time of a turn, from chat to done",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "prismd_turn_first_token_seconds",
            "Time from chat to the first token of the answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter("prismd_errors", "Error frames sent, by code", ["code"], registry=r)
        connections_gauge = Gauge(
            "prismd_open_connections", "Open WebSocket connections", registry=r
        )
        connections_gauge.set_function(lambda: len(connections))

    def on_event(self, agent_id: str, event: ServerEvent) -> None:
        if event["type"] == "done":
            self._turns(agent_id, event["stopReason"] or "end").inc()
            tokens_in, tokens_out = self._tokens(agent_id)
            tokens_in.inc(event["tokensIn"])
            tokens_out.inc(event["tokensOut"])
            cost = event["costUsd"]
            if cost:
                self.cost.inc(cost)
            self.latency.observe(event["durationMs"] / 1000)
            latency = event.get("latency")
            first = latency["firstTokenMs"] if latency is not None else None
            if first is not None:
                self.first_token.observe(first / 1000)
        elif event["type"] == "error":
            self.errors.labels(event.get("code") or "internal").inc()
            if event.get("turnId"):  # a turn that ended in an error (there is no `done`)
                self._turns(agent_id, "error").inc()

    # prometheus_client's labels() locks and validates on every call: the children are kept.
    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one Metrics per server, kept for its life
    def _turns(self, agent_id: str, stop_reason: str) -> Any:
        return self.turns.labels(agent_id, stop_reason)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - as above
    def _tokens(self, agent_id: str) -> tuple[Any, Any]:
        return self.tokens_in.labels(agent_id), self.tokens_out.labels(agent_id)

    def on_error(self, code: str) -> None:
        self.errors.labels(code).inc()


@router.get(
    "/metrics",
    summary="Prometheus metrics: turns, tokens, cost, turn latency, connections, errors",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def metrics(request: Request) -> Response:
    # Admins only (a scraper uses an admin's token or [auth] token): the labels name every
    # user's agents.
    user = getattr(request.state, "user", None)
    if user is None or not user.admin:
        body = '{"error": "Only an admin may read the metrics", "code": "unauthorized"}'
        return Response(body, status_code=403, media_type="application/json")
    registry = request.app.state.prismd.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
