"""``python stack/native <command>`` (what stack/start, stop and status run) or ``python -m stack.native``.

Run as a folder, Python puts the folder itself first on ``sys.path``; the repository root takes
its place, so the package imports under its one name, ``stack.native``, from any working folder.
"""

import sys
from pathlib import Path


def _main() -> int:
    """Run the command line, importing the package by name first when run as a folder."""
    if not __package__:
        sys.path[0] = str(Path(__file__).resolve().parents[2])
    from stack.native.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(_main())
