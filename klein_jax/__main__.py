"""`python -m klein_jax`: the klein-generate command."""

import sys

from klein_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
