"""``python -m personajudge``: the command line."""

import sys

from personajudge.cli import main

sys.exit(main())
