"""`python -m graphc VERB ...`: the same as the `graphc` command."""
import sys

from graphc.cli import main

if __name__ == "__main__":
    sys.exit(main())
