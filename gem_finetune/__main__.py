"""``python -m gem_finetune``: the same command as ``gem-finetune``."""
import sys

from .cli import main

sys.exit(main())
