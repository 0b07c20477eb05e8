"""Nightly classification: scan the drop folders, plan chunks, infer with a registered model,
commit rows per chunk, summarise the night; the predictions database (schema, migrations,
look-ups, export); people's reviews and the differential report of a drop; drift per drop,
alerted through ``ops.alerts``.

Modules, lowest first: ``predictions`` (tables, migrations, writes) and ``queries`` (the nightly
look-ups); ``export`` (the predictions table as CSV, Parquet or JSON) and ``export_stream`` (the
same, streamed); ``model`` (which version a run uses); ``scan`` (what lies in the classify
folder); ``archive``; ``infer`` (decode and predict); ``commit`` (rows, the chunk task); ``plan``
(what is new, chunk files); ``review_queue`` (what people review: a drop's cells, the queue, the
drops), ``review_decisions`` (recording a decision), ``review_export`` (reviewed images as files)
and ``report`` (the differential of a drop, its HTML from ``templates/report.html``); ``drift``
(a drop against the training labs); ``summary``; ``nightly`` (one run in one process) and
``single`` (``wbc classify``). The DAG's tasks are ``model.resolve_run_model``,
``plan.find_new_images``, ``commit.classify_chunk`` and ``summary.summarise_run``."""
