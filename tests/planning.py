"""Planning helpers for tests: the resources an executor would offer, and a plan from them."""

from __future__ import annotations

from repscope.cluster.execute import Resources, machine_memory
from repscope.jobs.plan import make_plan, select


def resources(workers: int = 2, *, memory_per_worker: int | None = None,
              driver_memory: int | None = None, node_cpus: int | None = None) -> Resources:
    """What a machine of ``workers`` CPUs and this machine's memory offers (as the
    executors compute it), with optional overrides."""
    memory = machine_memory()
    return Resources(
        workers=workers,
        node_cpus=node_cpus or workers,
        memory_per_worker=memory_per_worker or max(256 << 20, memory // (2 * workers)),
        driver_cpus=workers,
        driver_memory=driver_memory or memory // 2,
        where="process",
    )


def plan_for(spec, store, workers: int = 2, **kw):
    """The plan of ``spec`` on ``store`` for ``workers`` CPUs (spec's memory_per_worker if
    set); keyword arguments go to :func:`resources`."""
    kw.setdefault("memory_per_worker", spec.compute.memory_per_worker)
    return make_plan(spec, select(spec, store), resources(workers, **kw))
