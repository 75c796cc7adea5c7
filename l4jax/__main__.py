import sys

from l4jax.cli import main

sys.exit(main())
