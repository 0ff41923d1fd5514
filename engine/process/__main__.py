import sys

from workbench.engine.process.host import main

sys.exit(main())
