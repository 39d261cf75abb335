"""The side-by-side benchmark behind ``python bench/run.py`` (bench/README.md).

One module a job: ``common`` (what is measured, as data), ``tools`` (installs,
limits, the machine), ``procs`` (the processes started, /proc accounting),
``arms`` (temp dir, nginx templates, the proxies), ``wrk`` (running and parsing
wrk), ``measure`` (one function per figure group, the long-poll load),
``rounds`` (one arm in one round), ``stats`` (medians, ratios, targets),
``report`` (JSON, Markdown, chart) and ``cli`` (options and the whole run);
``steps`` holds the processes bench/profile_steps.py measures.
"""
