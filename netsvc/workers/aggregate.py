"""
The metrics of the whole daemon, whichever worker is asked.

Each worker writes a snapshot of its registry to C{state_dir/workers/metrics-N.json}
every second (atomically).  The worker answering C{/metrics} or C{/status}
merges its live registry with the other workers' latest snapshots: every
series appears once per worker (label C{worker="N"}) and once summed over the
workers (C{worker="all"}: counters, gauges and histogram buckets added up).
Figures of other workers are up to a second old; a restarted worker's
counters start again from 0 (Prometheus sees a counter reset for that worker).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from netsvc.metrics import Counter, Family, Gauge, Histogram, Registry


def snapshot(registry: Registry) -> dict[str, Any]:
    """A JSON-able copy of every family of C{registry} (its own, not merged)."""
    out: dict[str, Any] = {}
    for family in Registry.families(registry):
        kind = getattr(family, "kind", None)
        children = []
        for key, child in family.children.items():
            if isinstance(child, Histogram):
                children.append([list(key), {"bounds": list(child.bounds), "counts": list(child.counts),
                                             "sum": child.sum, "count": child.count}])
            elif isinstance(child, Gauge):
                children.append([list(key), child.read()])
            else:
                children.append([list(key), child.value])
        out[family.name] = {"help": family.help, "labels": list(family.labelnames),
                            "kind": {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}.get(kind, "gauge"),
                            "children": children}
    return out


def writeSnapshot(registry: Registry, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(snapshot(registry)))
    os.replace(tmp, path)


def readSnapshots(folder: Path, count: int, skip: int) -> dict[int, dict[str, Any]]:
    """The latest snapshot of each worker but C{skip} (missing or unreadable ones are left out)."""
    out = {}
    for i in range(count):
        if i == skip:
            continue
        try:
            out[i] = json.loads((folder / f"metrics-{i}.json").read_text())
        except (OSError, ValueError):
            continue
    return out


def merge(snapshots: dict[int, dict[str, Any]]) -> list[Family]:
    """Families with a C{worker} label: each worker's series, and their sum as C{worker="all"}."""
    names = sorted({name for snap in snapshots.values() for name in snap})
    families = []
    for name in names:
        first = next(snap[name] for snap in snapshots.values() if name in snap)
        labels = list(first["labels"])
        kind = first["kind"]
        make = {"counter": Counter, "gauge": Gauge}.get(kind)
        family = Family(name, first["help"], labels + ["worker"], make or Counter)
        family.kind = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[kind]  # type: ignore[attr-defined]
        for index in sorted(snapshots):
            data = snapshots[index].get(name)
            if data is None or list(data["labels"]) != labels or data["kind"] != kind:
                continue
            for key, value in data["children"]:
                for worker in (str(index), "all"):
                    full = tuple(key) + (worker,)
                    child = family.children.get(full)
                    if kind == "histogram":
                        if child is None:
                            child = family.children[full] = Histogram(value["bounds"])
                        if list(child.bounds) != list(value["bounds"]):
                            continue
                        child.counts = [a + b for a, b in zip(child.counts, value["counts"])]
                        child.sum += value["sum"]
                        child.count += value["count"]
                    else:
                        if child is None:
                            child = family.children[full] = make()  # type: ignore[misc]
                        child.value += value
        families.append(family)
    return families


class WholeDaemon:
    """
    Installed on a worker's registry: C{families()} (hence C{render()} and the
    status page's snapshot) answer for every worker.
    """

    def __init__(self, registry: Registry, folder: Path, index: int, count: int) -> None:
        self.registry = registry
        self.folder = folder
        self.index = index
        self.count = count

    def families(self) -> list[Family]:
        snapshots = readSnapshots(self.folder, self.count, self.index)
        snapshots[self.index] = snapshot(self.registry)
        return merge(snapshots)

    def install(self) -> None:
        self.registry.families = self.families  # type: ignore[method-assign]
