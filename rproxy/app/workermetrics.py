"""
C{/metrics} under C{--workers}: every worker's metrics in one answer, on the supervisor's C{--metrics-listen}
and on worker 0's admin listener.

The supervisor asks each worker for its metrics over its control channel (L{rproxy.app.workers}; worker 0
asks the supervisor to), then answers with all of them, each sample labelled with its C{worker} and
C{generation}, in the format the C{Accept} field asks for (L{rproxy.observe.metrics.metricsResource}).
Labelled, not summed: a gauge such as an upstream's health is a per-process fact, and Prometheus sums
counters across labels at query time.  A module of its own so that prometheus_client is imported only
where metrics are served.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from rproxy.downstream.limits import ClientLimits
from rproxy.downstream.site import ProxySite
from rproxy.observe.metrics import metricsResource

__all__ = ["allWorkersMetrics", "allWorkersMetricsSite"]

_log = Logger()

#: What a client of the supervisor's metrics listener may send and keep open.
_METRICS_LIMITS = ClientLimits(maxBodySize=0, maxHeaders=50, maxConnections=100)


class _Answering(Protocol):
    """A worker that answered: its number and generation."""

    index: int
    generation: int


#: What gathers the metrics of every worker: each worker, and its metrics as it writes them.
Gather = Callable[[], "Deferred[list[tuple[Any, str]]]"]


def allWorkersMetricsSite(gather: Gather, reactor: IReactorTime) -> ProxySite:
    """The supervisor's metrics listener: the metrics C{gather} collects at C{/metrics}, anything else 404."""
    root = Resource()
    root.putChild(b"metrics", allWorkersMetrics(gather))
    return ProxySite(root, _METRICS_LIMITS, reactor)


def allWorkersMetrics(gather: Gather) -> Resource:
    """A resource that answers with the metrics C{gather} collects, each sample labelled with its worker."""
    return _AllWorkersMetrics(gather)


class _AllWorkersMetrics(Resource):
    """C{/metrics}: every worker's samples, labelled with its C{worker} and C{generation}."""

    isLeaf = True

    def __init__(self, gather: Gather) -> None:
        super().__init__()
        self._gather = gather

    def render(self, request: Request) -> Any:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def answer(texts: list[tuple[_Answering, str]]) -> None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Merged(texts))  # type: ignore[arg-type]
            body = metricsResource(registry).render(request)
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            _log.failure("cannot gather the workers' metrics", failure)
            if not gone:
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                request.write(b"cannot gather the workers' metrics: see the log\n")
                request.finish()

        self._gather().addCallback(answer).addErrback(failed)
        return NOT_DONE_YET


class _Merged:
    """A collector of the metric families of several workers, each sample labelled with its worker."""

    def __init__(self, texts: list[tuple[_Answering, str]]) -> None:
        self._texts = texts

    def collect(self) -> list[Metric]:
        families: dict[str, Metric] = {}
        for worker, text in self._texts:
            labels = {"worker": str(worker.index), "generation": str(worker.generation)}
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                merged.samples.extend(s._replace(labels={**s.labels, **labels}) for s in family.samples)
        return list(families.values())
