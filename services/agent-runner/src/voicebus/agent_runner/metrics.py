"""Prometheus metrics for one runner: its load (what autoscaling reads) and counts of calls by outcome.

The load gauges are computed when scraped, from the runner's own state, so they can never drift from
what the runner actually gates offers on: ``active_calls`` is the number of slots taken (a call holds
its slot from the moment its offer is accepted until its pipeline stops), ``free_slots`` the number of
offers it would take right now (0 while draining). ``deploy/k8s/keda`` scales the runner Deployment on
these names; ``tests/deploy`` imports them from here so a rename cannot silently break autoscaling.

Each runner gets its own registry rather than the process-global one: tests run several runners in one
process, and a runner's ``/metrics`` must describe that runner only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Counter, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

ACTIVE_CALLS = "voicebus_runner_active_calls"
CAPACITY = "voicebus_runner_capacity"
FREE_SLOTS = "voicebus_runner_free_slots"
DRAINING = "voicebus_runner_draining"
INFO = "voicebus_runner_info"
# Counter names without the ``_total`` suffix prometheus_client appends on exposition.
CALLS_ACCEPTED = "voicebus_runner_calls_accepted"
CALLS_ENDED = "voicebus_runner_calls_ended"

METRICS_PATH = "/metrics"
# What a session ended without setting a reason is reported as (the same default the bus contract uses).
UNKNOWN_REASON = "pipeline_error"


class _Settings(Protocol):
    @property
    def capacity(self) -> int: ...


class RunnerState(Protocol):
    """What the metrics read from the runner; a Protocol so this module does not import the runner."""

    @property
    def settings(self) -> _Settings: ...
    @property
    def runner_id(self) -> str: ...
    @property
    def draining(self) -> bool: ...
    @property
    def free_slots(self) -> int: ...


class EndedSession(Protocol):
    @property
    def call_id(self) -> str: ...
    @property
    def end_reason(self) -> str | None: ...
    @property
    def end_state(self) -> str: ...


class _LoadCollector(Collector):
    def __init__(self, runner: RunnerState) -> None:
        self._runner = runner

    def collect(self) -> Iterator[Metric]:
        r = self._runner
        capacity = r.settings.capacity
        active = capacity - r.free_slots
        yield GaugeMetricFamily(ACTIVE_CALLS, "Calls holding a slot on this runner (accepted, pipeline running).",
                                value=active)
        yield GaugeMetricFamily(CAPACITY, "Calls this runner runs at once (VOICEBUS_RUNNER_CAPACITY).",
                                value=capacity)
        yield GaugeMetricFamily(FREE_SLOTS, "Offers this runner would accept now (0 while draining).",
                                value=0 if r.draining else max(0, r.free_slots))
        yield GaugeMetricFamily(DRAINING, "1 once the runner stopped taking offers to shut down, else 0.",
                                value=1 if r.draining else 0)
        info = GaugeMetricFamily(INFO, "Constant 1, labelled with the runner id used in heartbeats.",
                                 labels=["runner_id"])
        info.add_metric([r.runner_id], 1)
        yield info


class RunnerMetrics:
    """The registry behind one runner's ``/metrics``. Call :meth:`call_accepted` and :meth:`call_ended`."""

    def __init__(self, runner: RunnerState, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_LoadCollector(runner))
        if process:  # CPU and memory of this process, the fallback HPA's signal, visible next to the load
            ProcessCollector(registry=self.registry)
        self.accepted = Counter(CALLS_ACCEPTED, "Call offers this runner accepted.", ["resume"],
                                registry=self.registry)
        self.ended = Counter(CALLS_ENDED, "Accepted calls that ended on this runner, by end reason and state.",
                             ["reason", "state"], registry=self.registry)
        for resume in ("false", "true"):  # export zeros up front: rate() needs the series before the first call
            self.accepted.labels(resume=resume)
        self._live: set[str] = set()

    def call_accepted(self, call_id: str, *, resume: bool) -> None:
        self._live.add(call_id)
        self.accepted.labels(resume="true" if resume else "false").inc()

    def call_ended(self, session: EndedSession) -> None:
        """Count a session that is being forgotten; one whose offer was never accepted is not a call."""
        if session.call_id not in self._live:
            return
        self._live.discard(session.call_id)
        reason = session.end_reason or UNKNOWN_REASON
        self.ended.labels(reason=reason, state=session.end_state if session.end_reason else "failed").inc()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def router(self) -> APIRouter:
        router = APIRouter(tags=["metrics"])

        @router.get(METRICS_PATH, include_in_schema=False)
        async def metrics(request: Request) -> Response:
            body, content_type = self.render(request.headers.get("accept"))
            return Response(content=body, media_type=content_type)

        return router
