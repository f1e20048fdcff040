"""`python -m services.gateway` and the `mushroom-gateway` console script."""
import sys

from services.gateway.light_tf import use_light_tensorflow_protos


def main() -> int:
    use_light_tensorflow_protos()  # before any TF Serving stub import: the gateway needs TF's protos, not TF
    from services.gateway.main import main as gateway_main

    return gateway_main()


if __name__ == "__main__":
    sys.exit(main())
