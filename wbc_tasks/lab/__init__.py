"""The lab's view inside Airflow: a FastAPI app the ``wbc-lab`` Airflow plugin
(``wbc_airflow.lab_plugin``) mounts in the API server under ``/lab``.

It owns the pages a hematology lab works in (the drops, a drop's review queue, its differential
report, how the model learns the lab's reviews), the thumbnails of reviewed cells (read-only, from
the original files, through the allowed-folder checks of
:func:`wbc_tasks.serving.review_export.review_image_path`), the endpoint that records a decision,
and the predictions table over HTTP (streamed). The data side lives in ``wbc_tasks.serving``
(review queue, decisions and export, report, predictions export, the learning status); this
package only serves it: ``app`` (the FastAPI app), ``pages`` (the HTML pages, from the Jinja2
templates in ``templates/``), ``api`` (thumbnails, JSON, the review endpoint, the streamed table)
and ``auth`` (who calls, what they may do).

Every page and endpoint asks the :class:`~.auth.LabAccess` the app was created with who the caller
is and what they may do (inside Airflow: its auth manager, the UI's login cookie or a REST API
bearer token). This package never imports Airflow.
"""
