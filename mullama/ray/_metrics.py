"""A replica's metrics in Ray's: the counters, gauges and histograms its
``/metrics`` shows, as Ray Serve metrics (tagged with the application,
deployment and replica by Ray, and ``model`` here). Ray exports them to
Prometheus with the prefix ``ray_`` (and a counter's name ends in ``_total``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Dict, Optional, Tuple, Union

from ray.serve.metrics import Counter, Gauge, Histogram

from ..server._app import OpenAIApp
from ..server._metrics import Family

__all__ = ["RayMetricsBridge"]

log = logging.getLogger("mullama.ray")

#: seconds between two copies of the live counters and gauges into Ray's
UPDATE_INTERVAL_S = 2.0


class RayMetricsBridge:
    """Copies ``app``'s metrics into Ray's: histogram observations as they are
    made, counters and gauges every :data:`UPDATE_INTERVAL_S` (from :meth:`start`)."""

    def __init__(self, app: OpenAIApp) -> None:
        self._app = app
        self._tags = {"model": app.model_id}
        for h in app.metrics.histograms:
            ray_h = Histogram(h.name, description=h.help, boundaries=list(h.bounds), tag_keys=("model",))
            ray_h.set_default_tags(dict(self._tags))  # (Ray adds its tags to the dict given)
            h.listeners.append(self._guarded(ray_h.observe))
        self._metrics: Dict[str, Union[Counter, Gauge]] = {}
        self._last: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = {}
        self._task: Optional["asyncio.Task[None]"] = None

    @staticmethod
    def _guarded(observe: Callable[[float], None]) -> Callable[[float], None]:
        """``observe``, its errors logged: they must not reach the request that made the observation."""
        def listener(value: float) -> None:
            try:
                observe(value)
            except Exception:
                log.exception("could not record a histogram observation in Ray's metrics")
        return listener

    def update(self) -> None:
        """Copy the counters and gauges now."""
        for family in self._app.metrics.families(self._app.model, self._app.runtime):
            for labels, value in family.samples:
                self._record(family, labels, value)

    def _record(self, family: Family, labels: Tuple[Tuple[str, str], ...], value: float) -> None:
        metric = self._metrics.get(family.name)
        if metric is None:
            keys = ("model", *(k for k, _ in labels))
            if family.kind == "counter":  # (Ray appends _total)
                metric = Counter(family.name.removesuffix("_total"), description=family.help,
                                 tag_keys=keys)  # type: ignore[arg-type]  # (Ray's hint: a 1-tuple)
            else:
                metric = Gauge(family.name, description=family.help, tag_keys=keys)  # type: ignore[arg-type]
            metric.set_default_tags(dict(self._tags))
            self._metrics[family.name] = metric
        tags = dict(labels)
        if isinstance(metric, Counter):
            key = (family.name, labels)
            delta = value - self._last.get(key, 0.0)
            self._last[key] = value
            if delta > 0:
                metric.inc(delta, tags)
        else:
            metric.set(value, tags)

    def start(self) -> None:
        """Update every :data:`UPDATE_INTERVAL_S` on the running event loop until :meth:`stop`."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                self.update()
            except Exception:  # a metric must never take the replica down
                log.exception("could not copy the metrics into Ray's")
            await asyncio.sleep(UPDATE_INTERVAL_S)
