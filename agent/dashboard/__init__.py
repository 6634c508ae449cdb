"""The triage dashboard: the ``dashboard`` role (``hust19 dashboard``).

It consumes ``triage.results``, ``triage.evidence`` and ``triage.dlq`` as a consumer group of
its own, keeps a worklist in a database through SQLAlchemy, and serves it over HTTP behind a
login. Modules, by what they are:

* :mod:`~agent.dashboard.settings`: the role's settings (flags, ``[dashboard]`` in the TOML
  file, ``HUST19_DASHBOARD_*`` variables).
* :mod:`~agent.dashboard.store`: the database (worklist, revisions, evidence, dead letters,
  acknowledgements and their audit, sessions).
* :mod:`~agent.dashboard.consumer`: the bus consumer that fills the store (idempotent on
  redelivery; offsets committed after the store) and wakes the live pages.
* :mod:`~agent.dashboard.feed`: the change feed from the consumer thread to the live pages.
* :mod:`~agent.dashboard.auth`: users file (argon2), sessions, CSRF, the reverse-proxy mode,
  login rate limiting.
* :mod:`~agent.dashboard.probes`: ``/readyz`` and lag of the agent's other roles, for IT.
* :mod:`~agent.dashboard.app`: the Starlette application (pages, live stream, CSV export).
* :mod:`~agent.dashboard.service`: all of it composed, started and stopped.

The operator's guide is ``docs/dashboard.md``.
"""
