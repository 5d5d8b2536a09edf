"""``python -m dls_daemon`` is ``jdls``: handy where the entry-point scripts are not on PATH."""

import sys

from .cli import main

sys.exit(main())
