"""`python -m ditserve ...`: the same as the `ditserve` command."""

import sys

from ditserve.cli import main

if __name__ == "__main__":
    sys.exit(main())
