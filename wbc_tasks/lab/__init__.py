"""The lab's view inside Airflow: a FastAPI app the ``wbc-lab`` Airflow plugin mounts in the API
server under ``/lab``, and the links to it in Airflow's navigation.

It owns the pages a hematology lab works in (the drops, a drop's review queue, its differential
report), the thumbnails of reviewed cells (read-only, from the original files, through the
allowed-folder checks of :func:`wbc_tasks.serving.reviews.review_image_path`), the endpoint that
records a decision, and the predictions table over HTTP (streamed). The data side lives in
``wbc_tasks.serving`` (reviews, report, queries); this package only serves it.

Every page and endpoint asks Airflow's auth manager who the caller is (the UI's login cookie or a
REST API bearer token: :mod:`.auth`); Airflow is imported only inside the API server, when the
plugin builds the app or a request is checked, so importing this package stays cheap.
"""
