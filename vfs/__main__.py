"""`python -m vfs` is the `lamina-llm-cache` command."""

import sys

from .cli import main

sys.exit(main())
