"""Operations: ``retention`` (which old training work folders may go), ``mlflow_retention``
(MLflow artifacts of old unregistered runs), ``cleanup`` (both, as the maintenance DAG's task and
``wbc cleanup``) and ``alerts`` (webhook, e-mail, callback on failures). ``alerts`` uses the
standard library and ``core`` only, since the DAG files import it while the scheduler parses
them. Imports ``core`` and ``registry``; ``serving`` sits above it (its drift alerts go out through
``alerts``)."""
