"""``python -m wbc_tasks.cli``: the ``wbc`` command, for an environment without its script."""

import sys

from wbc_tasks.cli.main import main

sys.exit(main())
