"""Nightly classification: scan the drop folders, plan chunks, infer with a registered model,
commit rows per chunk, summarise the night; and the predictions database (schema, migrations,
look-ups, export); drift per drop, alerted through ``ops.alerts``. Imports ``core``, ``data``,
``training``, ``registry`` and ``ops``.

Modules, lowest first: ``predictions`` (tables, migrations, writes) and ``queries`` (reads,
export); ``model`` (which version a run uses); ``scan`` (what lies in the classify folder);
``archive``; ``infer`` (decode and predict); ``commit`` (rows, the chunk task); ``plan`` (what is
new, chunk files); ``reviews`` (the review queue, people's decisions, reviewed images as files)
and ``report`` (the differential of a drop); ``drift`` (a drop against the training labs);
``summary``; ``nightly`` (one run in one process)
and ``single`` (``wbc classify``). The DAG's tasks are ``model.resolve_run_model``,
``plan.find_new_images``, ``commit.classify_chunk`` and ``summary.summarise_run``."""
