"""A Jepsen-style nemesis for zmqps: seeded random fault schedules against real processes.

* :mod:`tests.nemesis.schedule` - ``Schedule.generate(seed)``: the mode, K, the start order,
  process faults (kill -9 and restart, SIGSTOP/SIGCONT) and the network proxy's fault rates,
  all drawn from ``random.Random(seed)``; one printable line.
* :mod:`tests.nemesis.proxy` - a ZeroMQ proxy between workers and a server that duplicates,
  delays and reorders messages (never drops one), counting each fault by kind and op.
* :mod:`tests.nemesis.jobs` - each mode's command lines and its expected result.
* :mod:`tests.nemesis.runner` - runs a schedule (fork-server processes, a supervisor that
  restarts what exited non-zero, a hard deadline) and checks the result: θ against the
  single-process reference (bsp, pipeline) or exactly-once counts (async, ssp).
* ``python -m tests.nemesis --seeds 0-299``: many seeds, a summary table.

Replaying a seed: ``NEMESIS_SEED=<N> .venv/bin/python -m pytest tests/test_nemesis.py -k replay``
(see :mod:`tests.test_nemesis`).
"""
