"""Everything MLflow: the client and its retries, the one MLflow run per DAG run, artifact and
metric logging, the model card, registered versions and aliases, and promotion. Imports
``core``, ``data`` and ``training``."""
