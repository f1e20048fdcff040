import sys

from services.model_server.main import main

if __name__ == "__main__":  # not where a worker process (json_worker.py) imports this file as its parent's main
    sys.exit(main())
