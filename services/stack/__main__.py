import sys

from services.stack.cli import main

sys.exit(main())
