"""``python -m cser_hooks.plan``: see cser_hooks/plan/cli.py."""
import sys

from .cli import main

sys.exit(main())
