"""Airflow's side of the product: what needs Airflow itself. ``wbc_tasks`` never imports Airflow;
this package plugs it in. ``dag_helpers``: what the three DAG files (``dags/``, which wire
``wbc_tasks`` functions into tasks) share: parse-time settings, the retry policy, the failure
callbacks, the running task's params. ``lab_plugin``: the lab's app in Airflow's API server,
behind its auth manager.
"""
