import sys

from fdbhook.cli import main

sys.exit(main())
