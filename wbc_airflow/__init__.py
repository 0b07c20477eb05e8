"""Airflow's side of the product: the adapters that need Airflow itself (its plugin manager and
its auth manager). ``wbc_tasks`` never imports Airflow; this package plugs it in. The DAG files
(``dags/``) wire ``wbc_tasks`` functions into tasks; this package holds what is not a DAG.
"""
