import sys

from wbc_tasks.cli.main import main

sys.exit(main())
