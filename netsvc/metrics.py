"""
Counters, gauges and histograms, rendered in the Prometheus text format (0.0.4).

Why not prometheus_client: its metrics take a lock on every update, and the
reactor is single-threaded; here an update on a hot path (bytes of every read) is
one attribute increment on a pre-bound child.  The exposition format is small.

Usage::

    registry = Registry()
    accepted = registry.counter("netsvc_connections_accepted_total",
                                "Connections accepted.", ["service"])
    echoAccepted = accepted.labels(service="echo")   # bind once
    echoAccepted.inc()                               # hot path
    registry.render()                                # text for /metrics
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence


class Counter:
    """A monotonically increasing value; C{inc()} it, or add to C{value}."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Gauge:
    """A value that goes up and down, or is read from a callback at render time."""

    __slots__ = ("value", "callback")

    def __init__(self) -> None:
        self.value: float = 0
        self.callback: Callable[[], float] | None = None

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value

    def setFunction(self, callback: Callable[[], float]) -> None:
        """Report C{callback()} instead of C{value}."""
        self.callback = callback

    def read(self) -> float:
        return self.callback() if self.callback is not None else self.value


DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Histogram:
    """Observations counted into cumulative buckets (upper bounds, seconds by convention)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


_KINDS = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}


class Family:
    """A named metric with label names; L{labels} returns (and keeps) one child per label set."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str], make: Callable) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._make = make
        self.children: dict[tuple[str, ...], Counter | Gauge | Histogram] = {}
        if not self.labelnames:
            self.children[()] = make()

    def labels(self, **labels: str) -> Counter | Gauge | Histogram:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        key = tuple(str(labels[n]) for n in self.labelnames)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = self._make()
        return child

    def remove(self, **labels: str) -> None:
        self.children.pop(tuple(str(labels[n]) for n in self.labelnames), None)

    # Without labels, the family acts as its only child.
    def inc(self, amount: float = 1) -> None:
        self.children[()].inc(amount)  # type: ignore[union-attr]

    @property
    def value(self) -> float:
        child = self.children[()]
        return child.read() if isinstance(child, Gauge) else child.value  # type: ignore[union-attr]

    def render(self) -> Iterable[str]:
        if not self.children:
            return
        kind = _KINDS[type(next(iter(self.children.values())))]
        yield f"# HELP {self.name} {_escapeHelp(self.help)}"
        yield f"# TYPE {self.name} {kind}"
        for key, child in sorted(self.children.items()):
            pairs = list(zip(self.labelnames, key))
            if isinstance(child, Histogram):
                cumulative = 0
                for bound, n in zip(child.bounds + (math.inf,), child.counts):
                    cumulative += n
                    le = "+Inf" if bound == math.inf else _number(bound)
                    yield f"{self.name}_bucket{_labels(pairs + [('le', le)])} {cumulative}"
                yield f"{self.name}_sum{_labels(pairs)} {_number(child.sum)}"
                yield f"{self.name}_count{_labels(pairs)} {child.count}"
            else:
                value = child.read() if isinstance(child, Gauge) else child.value
                yield f"{self.name}{_labels(pairs)} {_number(value)}"


class Registry:
    """All metrics of one process.  Registering a name twice returns the same family."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}

    def _family(self, kind: type, name: str, help: str, labelnames: Sequence[str], make) -> Family:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = Family(name, help, labelnames, make)
            family.kind = kind  # type: ignore[attr-defined]
        elif family.kind is not kind or family.labelnames != tuple(labelnames):  # type: ignore[attr-defined]
            raise ValueError(f"metric {name} already registered with another kind or labels")
        return family

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Family:
        return self._family(Counter, name, help, labelnames, Counter)

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Family:
        return self._family(Gauge, name, help, labelnames, Gauge)

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Family:
        return self._family(Histogram, name, help, labelnames, lambda: Histogram(buckets))

    def get(self, name: str) -> Family:
        return self._families[name]

    def families(self) -> list[Family]:
        """Every family, sorted by name."""
        return [self._families[name] for name in sorted(self._families)]

    def render(self) -> str:
        """The whole registry in the Prometheus text exposition format."""
        lines: list[str] = []
        for family in self.families():
            lines.extend(family.render())
        return "\n".join(lines) + "\n" if lines else ""


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if value != value:
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{_escapeValue(v)}"' for k, v in pairs)
    return "{" + inner + "}"


def _escapeValue(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escapeHelp(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


class ServiceMetrics:
    """
    The standard metrics of one service, bound to its C{service} label.

    Every listener-owning service gets one; it is what L{netsvc.policies.Guard}
    counts into.
    """

    def __init__(self, registry: Registry, service: str) -> None:
        self.registry = registry
        self.service = service
        s = {"service": service}
        self.accepted = registry.counter(
            "netsvc_connections_accepted_total", "Connections accepted.", ["service"]).labels(**s)
        self.active = registry.gauge(
            "netsvc_connections_active", "Connections open now.", ["service"]).labels(**s)
        self._refused = registry.counter(
            "netsvc_connections_refused_total", "Connections refused, by reason.",
            ["service", "reason"])
        self.bytesIn = registry.counter(
            "netsvc_received_bytes_total", "Bytes received from clients.", ["service"]).labels(**s)
        self.bytesOut = registry.counter(
            "netsvc_sent_bytes_total", "Bytes sent to clients.", ["service"]).labels(**s)
        self.datagramsIn = registry.counter(
            "netsvc_datagrams_received_total", "Datagrams received.", ["service"]).labels(**s)
        self._limits = registry.counter(
            "netsvc_limits_triggered_total", "Times a limit was enforced, by limit.",
            ["service", "limit"])
        self._errors = registry.counter(
            "netsvc_errors_total", "Errors, by kind.", ["service", "kind"])

    def refused(self, reason: str) -> Counter:
        return self._refused.labels(service=self.service, reason=reason)  # type: ignore[return-value]

    def limit(self, name: str) -> Counter:
        return self._limits.labels(service=self.service, limit=name)  # type: ignore[return-value]

    def error(self, kind: str) -> Counter:
        return self._errors.labels(service=self.service, kind=kind)  # type: ignore[return-value]
