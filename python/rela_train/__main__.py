"""``python -m rela_train``: the ``rela-train`` command line."""

import sys

from rela_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
