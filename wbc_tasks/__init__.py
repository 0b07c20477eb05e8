"""The white-blood-cell pipeline as plain Python: importable and testable without Airflow.

Layers, lowest first; a module imports only from its own layer or lower ones (the DAG files in
``dags/`` and the ``wbc`` command sit on top):

    core       settings, errors, paths inside allowed folders, retries, work folders, privacy
    data       image loader (training AND serving), dataset scan + split, stores, preprocess,
               augment, balance, demo images
    training   params, model, training loop, evaluation; calibration and the trust policy
               (review threshold, blast flag, unfamiliar score, drift limits)
    registry   MLflow: client, runs, artifacts, model card, versions, promotion
    ops        retention and failure alerts
    serving    nightly classification: scan drops, infer, commit, summary, drift per drop;
               the predictions DB, reviews and the differential report
    pipelines  one facade per DAG: the functions its tasks call
    lab        the Airflow plugin: review pages, report pages, predictions over HTTP
    cli        the ``wbc`` command
"""
