"""Everything MLflow, one module per job, lowest first: ``client`` (set-up, retries, the
experiment), ``tags`` (tag names, metrics as version tags), ``runs`` (one MLflow run per DAG
run), ``artifacts`` (what the steps log), ``model_card``, ``versions`` (finding, waiting for and
loading a version), ``registration`` (logging and registering a trained model) and
``promotion`` (champion and challenger, aliases). Imports ``core``, ``data`` and ``training``."""
