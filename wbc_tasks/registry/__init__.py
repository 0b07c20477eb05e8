"""Everything MLflow, one module per job, lowest first: ``client`` (set-up, retries, the
experiment), ``tags`` (tag names, metrics as version tags), ``runs`` (one MLflow run per DAG
run), ``artifacts`` (what the steps log), ``model_card``, ``versions`` (finding, waiting for and
loading a version), ``registration`` (logging and registering a trained model), ``decision``
(floors and the comparison, a pure function of metrics) and ``promotion`` (applying it: the lock,
the champion and rollback aliases, hand moves). The registry stores and decides: the champion's
metrics on a run's test images come from the training pipeline."""
