import sys

from workbench.engine.cli import main

sys.exit(main())
