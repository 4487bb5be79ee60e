"""``python -m convserve.cli``: the ``convserve`` command."""

import sys

from convserve.cli import main

sys.exit(main())
