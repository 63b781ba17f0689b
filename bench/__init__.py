"""blockferry's benchmark instrument (issue 5).

A process server in its own process (``blockferry serve``), agents as real
protocol clients over TLS in one or more generator processes, and, measured in
the same run over the same bytes, the machine's ceiling (lz4 + AES-256-GCM with
the engine's number of seal threads, no I/O), the floor (the least CPU every
acknowledged byte costs here, step by step) and a peer (``borg create
--compression lz4`` into a repokey repository). Results are JSON, a Markdown
table and PNG plots; ``python -m bench compare OLD NEW`` shows the change.

Modules, one job each:

- :mod:`bench.stats`     histograms, percentiles, per-disk sequence logs, lag
- :mod:`bench.profiles`  workload profiles (what each disk writes, and when)
- :mod:`bench.loadgen`   generator processes of agents; closed and open loop
- :mod:`bench.serverproc` the server subprocess and the probe that watches it
- :mod:`bench.ceiling`   lz4 + AES-GCM over the same bytes, no I/O
- :mod:`bench.floor`     every step of an acknowledged byte over the same bytes, in C: what can be sustained
- :mod:`bench.borg`      the borg peer over the same bytes
- :mod:`bench.phases`    one measured load phase (server + generators + probe)
- :mod:`bench.drain`     the applier's capacity on a backlog
- :mod:`bench.scaling`   1 … 1000 agent connections at the same offered load
- :mod:`bench.pyspy`     optional server profile with py-spy, and its hot-spot summary
- :mod:`bench.suite`     the whole run: which phases, in which order, ratios, targets
- :mod:`bench.report`    JSON, Markdown and plots
- :mod:`bench.compare`   the change between two runs
"""

SCHEMA = 1
