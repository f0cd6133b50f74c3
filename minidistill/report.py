"""``python -m minidistill.report RUN_DIR``: the documented command, kept where it was; the code
is :mod:`minidistill.reporting.report`."""

import sys

from minidistill.reporting.report import main

if __name__ == "__main__":
    sys.exit(main())
