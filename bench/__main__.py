"""``python -m bench`` (``make bench``): see bench/cli.py for the options, bench/runner.py for
what one run does."""
import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
