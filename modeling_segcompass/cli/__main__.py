"""``python -m modeling_segcompass.cli``: the ``segcompass`` command line."""

import sys

from . import main

sys.exit(main())
