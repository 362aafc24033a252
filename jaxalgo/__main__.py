"""``python -m jaxalgo`` is the ``jaxalgo`` command."""

import sys

from jaxalgo.cli import main

sys.exit(main())
