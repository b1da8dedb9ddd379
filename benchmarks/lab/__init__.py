"""The lab: decision scripts and GPU experiments, apart from the suite (``benchmarks``).

Each script measured one design choice; ``DECISIONS.md`` records what it decided, the
figures and the command that reproduces them, and ``README.md`` indexes every script. The
lab may import the suite; the suite never imports the lab."""
