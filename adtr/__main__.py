"""`python -m adtr ...`: the command line, as torchrun launches it (`torchrun ... -m adtr fit ...`)."""

import sys

from adtr.cli import main

sys.exit(main())
