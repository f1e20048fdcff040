import sys

from services.model_server.main import main

sys.exit(main())
