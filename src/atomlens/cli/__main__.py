"""``python -m atomlens.cli``: the same as the ``atomlens`` command."""

import sys

from . import main

sys.exit(main())
