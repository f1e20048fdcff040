"""The local stack: Redis, the model server, the gateway, Prometheus and TensorBoard as loopback processes whose pids,
ports and logs live in one run folder (``var/run/<timestamp>/``). Used by ``scripts/stack.py`` and by the tests."""
