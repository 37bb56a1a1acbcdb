"""A Ray instance that listens on, and talks to, 127.0.0.1 only (the local instance, simulated clusters, CI).

``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray resolves a loopback node address to the
machine's interface address (``resolve_ip_for_localhost``) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which
Ray reads once, when it is imported. With both, the GCS, the raylets, the workers and the runtime-env agents listen
on 127.0.0.1 and tasks report node IP 127.0.0.1 (checked with ``ss -ltnp``). Ray's usage statistics (sent to a
server of Ray's) are turned off too. The processes Ray starts inherit the environment, so setting it in the driver
before ``import ray`` covers the whole instance.
"""

from __future__ import annotations

import os
import sys

LOOPBACK = "127.0.0.1"
ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def is_loopback(address: str | None) -> bool:
    """``127.x.y.z:port``, ``localhost:port``, ``[::1]:port`` (a cluster whose nodes are all on this machine)."""
    if not address:
        return False
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]") if ":" in address else address
    return host == "localhost" or host == "::1" or host.startswith("127.")


def use_loopback() -> None:
    """Make this process (and every Ray process it starts) loopback-only; call before ``import ray``."""
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError("ray was imported before stages.cluster.loopback.use_loopback(): its node address "
                               "would not be loopback (set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing it)")
    os.environ.update(ENVIRONMENT)
