"""The ``wbc`` command: the pipeline for people and scripts, without writing Python."""

from wbc_tasks.cli.main import main

__all__ = ["main"]
