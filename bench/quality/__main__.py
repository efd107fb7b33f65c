"""``python -m bench.quality [--quick|--full] [--seeds N] [--out DIR]``: see run.py."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
