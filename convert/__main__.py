"""`python -m convert`: the klein-convert command."""

import sys

from convert.cli import main

sys.exit(main())
