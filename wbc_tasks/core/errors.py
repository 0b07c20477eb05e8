"""Errors that say "retrying will not help".

A task that fails with a :class:`PermanentError` (a missing or empty data folder, fewer than two
classes, a path outside the configured folders, a bad param, missing weights) fails at once:
the DAGs' retry policy (``dags/``) matches this class and skips the retries, so a user waits
seconds for the answer instead of minutes of back-off. Everything else (MLflow or the database
unreachable, a worker lost) keeps its retries. Standard library only: the DAG files import it
while the scheduler parses them.
"""

from __future__ import annotations


class PermanentError(Exception):
    """Base class of errors no retry can fix; subclasses also derive from the built-in error
    they used to be (``ValueError``, ``FileNotFoundError``), so callers catching those still do."""
