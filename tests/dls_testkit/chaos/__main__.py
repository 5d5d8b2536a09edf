"""``python -m dls_testkit.chaos CONFIG``: one chaos worker process (``worker``); not imported by the package,
so that the worker module is loaded once, as the program."""

import sys

from .worker import main

sys.exit(main(sys.argv[1:]))
