"""``ray start`` for the tests' local cluster, on loopback only: ``python ray_loopback.py start ...``.

``ray start --node-ip-address 127.0.0.1`` alone does not keep Ray on loopback: Ray replaces a loopback
address with the machine's routable one (``services.resolve_ip_for_localhost``, meant for clusters of many
machines), and its servers then listen on every interface or on that address. Ray keeps loopback addresses
only where it believes it runs on a single host (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which the test sets
for every Ray process and driver), and there it refuses to add a second node. This launcher lets the worker
node join anyway and keeps the address the test gives; then it runs Ray's own ``ray`` command unchanged, and
every process Ray starts from it inherits the single-host setting, so all of them bind 127.0.0.1.
"""
from __future__ import annotations

import sys

import ray._private.ray_constants as ray_constants
import ray._private.services as services
from ray.scripts.scripts import main

ray_constants.ENABLE_RAY_CLUSTER = True  # allow `ray start --address` (a second node on this host)
services.resolve_ip_for_localhost = lambda host: host  # 127.0.0.1 stays 127.0.0.1

if __name__ == "__main__":
    sys.argv[0] = "ray"
    sys.exit(main())
