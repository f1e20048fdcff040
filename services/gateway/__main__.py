"""`python -m services.gateway` and the `mushroom-gateway` console script.

With MUSHROOM_GATEWAY_PROFILE=<file> the run is profiled (cProfile, CPU time of the event loop's thread) and the profile written to
<file> when the gateway stops (SIGTERM), for bench/gateway_cpu_bench.py --profile."""
import os
import sys

from services.gateway.light_tf import use_light_tensorflow_protos

PROFILE_ENV = "MUSHROOM_GATEWAY_PROFILE"


def main() -> int:
    use_light_tensorflow_protos()  # before any TF Serving stub import: the gateway needs TF's protos, not TF
    from services.gateway.main import main as gateway_main

    profile_path = os.environ.get(PROFILE_ENV)
    if not profile_path:
        return gateway_main()
    import cProfile
    import time

    profiler = cProfile.Profile(time.thread_time)  # CPU time of the loop's thread, not wall time
    try:
        return profiler.runcall(gateway_main)
    finally:
        profiler.dump_stats(profile_path)


if __name__ == "__main__":
    sys.exit(main())
