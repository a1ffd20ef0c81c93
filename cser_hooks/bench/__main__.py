"""Entry point of ``python -m cser_hooks.bench`` (and the ``cser-bench`` console script)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
