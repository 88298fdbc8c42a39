"""A Jepsen-style nemesis for zmqps: seeded random fault schedules against real processes.

* :mod:`tests.nemesis.schedule` - ``Schedule.generate(seed)``: the mode (bsp, async, ssp,
  pipelines, shards, CURVE, diloco, diloco-async; ``seed % len(MODES)``), K, the job, the start
  order, process faults (kill -9 and restart, SIGSTOP/SIGCONT) and the network proxy's fault
  rates, all drawn from ``random.Random(seed)``; printable in one line. Its docstring lists
  what is excluded and why ([Note: what is excluded]).
* :mod:`tests.nemesis.proxy` - a ZeroMQ proxy between workers and a server that duplicates,
  delays and reorders messages (never drops one), counting each fault by kind and op.
* :mod:`tests.nemesis.jobs` - a schedule's command lines and the checks of its result: θ
  against the single-process reference (bsp, pipeline, diloco) or exactly-once counts (async,
  ssp, diloco-async: one applied push per (rank, round)); local-steps workers each get a
  ``--state-dir``, and a run fails if a restart lost its round files.
* :mod:`tests.nemesis.models` - float64 models that widen the windows the nemesis aims at.
* :mod:`tests.nemesis.runner` - runs a schedule: fork-server processes, faults on time, a
  supervisor that restarts what exited non-zero, a hard deadline, the verdict.
* :mod:`tests.nemesis.triage` - first guesses at a failure's cause (hints, never verdicts).
* :mod:`tests.nemesis.summary` - totals over many runs.

Run it: ``tests/test_nemesis.py`` (a short pass in the default suite, a long one under ``-m
slow``), or ``python -m tests.nemesis --seeds 0-299`` for many seeds and a summary table.
Replay a seed: ``NEMESIS_SEED=<N> .venv/bin/python -m pytest tests/test_nemesis.py -k replay``.
"""
