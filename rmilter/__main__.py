"""``python -m rmilter check-config FILE``: the same as the ``rmilter`` console script."""
import sys

from rmilter.cli import main

sys.exit(main())
