import sys

from services.rollout.main import main

sys.exit(main())
