"""``python -m upgd_ref.cli``: the ``upgd-ref`` command without its entry-point script."""

import sys

from . import main

sys.exit(main())
