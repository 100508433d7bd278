import sys

from qblock.cli import main

sys.exit(main())
