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

import os

# TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with AVX512 VNNI/BF16 or AMX.
# Elsewhere (an AVX2 AMD EPYC here) they train the project's VGG16 1.4 times and predict 1.2 times
# as fast (bench/bench_onednn.py, docs/benchmarks.md). TensorFlow reads the variable once, when it loads,
# so it is set here, before any module of this package imports it; a value already set wins
# (TF_ENABLE_ONEDNN_OPTS=0 turns the kernels off).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
