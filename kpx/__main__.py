import sys

from kpx.cli import main

sys.exit(main())
