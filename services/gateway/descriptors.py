"""File descriptors of the gateway process: every client connection (HTTP or gRPC) holds one, and so does every
connection to Redis and the model server. At the process's limit (RLIMIT_NOFILE) the kernel refuses new client
connections and the gateway cannot open new ones of its own, which its clients see only as refused or hanging
connects. ``process_open_fds`` and ``process_max_fds`` (prometheus_client's process collector, metrics.py) show it
(alert GatewayFileDescriptorsNearLimit), and ``DescriptorWatch`` logs a warning when the count passes WARN_SHARE of
the limit and a note when it is back below CLEAR_SHARE."""
from __future__ import annotations

import logging
import os
import resource

log = logging.getLogger("gateway.descriptors")
WARN_SHARE = 0.9
CLEAR_SHARE = 0.8
CHECK_INTERVAL_S = 2.0


class DescriptorWatch:
    def __init__(self, fd_dir: str = "/proc/self/fd"):
        self.fd_dir = fd_dir
        self.warned = False

    async def check(self) -> None:
        """One look (a step of the gateway's supervised "descriptors" loop): open descriptors against the soft
        limit, logged on crossing WARN_SHARE and CLEAR_SHARE."""
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            return
        in_use = len(os.listdir(self.fd_dir))
        if in_use >= WARN_SHARE * limit and not self.warned:
            log.warning("%d of %d file descriptors in use (RLIMIT_NOFILE): at the limit new client connections are "
                        "refused; raise the limit (ulimit -n, the container's nofile) or spread clients over more "
                        "replicas", in_use, limit)
            self.warned = True
        elif in_use < CLEAR_SHARE * limit and self.warned:
            log.info("file descriptors back to %d of %d", in_use, limit)
            self.warned = False
