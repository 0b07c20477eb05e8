"""The white-blood-cell pipeline as plain Python: importable and testable without Airflow.

Layers, lowest first; a module imports only from its own layer or lower ones (the DAG files in
``dags/`` and the ``wbc`` command sit on top):

    core       settings, errors, paths inside allowed folders, retries, work folders, privacy
    data       image loader (training AND serving), dataset scan + split, stores, preprocess,
               augment, balance, demo images
    training   params, model, training loop, evaluation
    registry   MLflow: client, runs, artifacts, model card, versions, promotion
    serving    nightly classification: scan drops, infer, commit, summary; the predictions DB
    ops        retention and failure alerts
    pipelines  one facade per DAG: the functions its tasks call
    cli        the ``wbc`` command
"""
