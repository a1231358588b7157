"""``python -m modeling_segcompass.cli``: the ``segcompass`` command line."""

import sys

from .commands import main

sys.exit(main())
