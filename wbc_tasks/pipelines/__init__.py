"""What the DAGs' tasks call where it composes several layers: ``training`` (the training DAG's
steps, with ``step_helpers``, ``data_folder`` (which labelled folder a run uses, shared with ``wbc
train``) and ``champion`` (the champion re-evaluated on a run's test images)), ``params`` (the
three DAGs' trigger forms) and ``parse_time`` (one setting at a time, for DAG parsing). Each step
reads settings and params and returns the small dict Airflow's XCom carries."""
