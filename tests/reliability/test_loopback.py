"""The embedded Ray instance listens on loopback only."""

from __future__ import annotations

import psutil

from repscope.cluster.execute import connect


def test_embedded_ray_listens_on_loopback_only(embedded_ray):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    connect()
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert ray.get(ray.remote(lambda: 1).remote()) == 1
    # This instance's processes: those the driver started and their children (workers,
    # agents); other Ray instances of the test session (the `ray start` fixtures) differ.
    node = ray._private.worker._global_node
    started = [info.process.pid for infos in node.all_processes.values() for info in infos]
    ours = set(started)
    for pid in started:
        ours |= {p.pid for p in psutil.Process(pid).children(recursive=True)}
    listening = [c for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening  # GCS, raylet, workers, agents
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    exposed = [(c.laddr, psutil.Process(c.pid).name()) for c in listening
               if c.laddr.ip not in loopback]
    assert not exposed
