import sys

from machine.cli import main

sys.exit(main())
