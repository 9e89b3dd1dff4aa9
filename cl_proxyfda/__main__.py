import sys

from cl_proxyfda.cli import main

sys.exit(main())
