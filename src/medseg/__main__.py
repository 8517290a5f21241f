"""`python -m medseg ...`: the same command line as `medseg ...`."""
import sys

from medseg.cli import main

sys.exit(main())
