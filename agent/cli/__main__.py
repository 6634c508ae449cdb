"""``python -m agent.cli``: the ``hust19`` command without the console script."""

import sys

from agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
