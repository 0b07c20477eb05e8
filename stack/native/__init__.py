"""Run the production stack natively: the docker-compose topology as local processes.

For machines without Docker and for the system tests. PostgreSQL and Redis are expected to run
already (their URLs are options); everything else is started here, each process in its own
process group with a log file and a pid file in a state folder:

    stack/start   create the databases if missing, write the env file, migrate Airflow's
                  database, start whatever is not running, wait until it is healthy
    stack/stop    stop every process group (workers first), clean stale pid files
    stack/status  what runs, where the UIs are, where the env file is

The services, queues and shared settings come from ``stack/stack.toml``, the same declaration
tests/test_stack_config.py checks docker-compose.yml against. Every name this stack creates
(databases, Redis keys, the state folder) carries its prefix, so a throwaway prefix never touches
another stack. Written by hand (no library runs Airflow + MLflow as supervised local processes
without Docker); it uses only the standard library and packages the project already depends on
(psutil to inspect processes).

Modules, each importing only those listed above it (no cycles):

    config.py     what a stack is: StackConfig, stack.toml, secrets, env files, the process plan
    databases.py  PostgreSQL and Redis: the prefixed databases and keys, Airflow's migration
    processes.py  the supervisor: start in an own session, pid files, stop by process group
    health.py     health checks of every service and waiting until they pass
    cli.py        the start / stop / status / plan commands and their options
    __main__.py   ``python stack/native <command>`` (what the scripts run), ``python -m stack.native``

This package is not installed (it is no part of the ``wbc_tasks`` wheel): the scripts run it by
path; tests and ``python -m`` import it as ``stack.native`` from the repository root.
"""
