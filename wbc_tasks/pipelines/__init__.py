"""One facade per DAG: the functions its tasks call, each reading settings and params and
returning the small dict Airflow's XCom carries. The only place that composes the layers
below into steps. Imports everything below it; never Airflow."""
