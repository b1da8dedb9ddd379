"""One-off decision scripts: each measured one design choice; ``DECISIONS.md`` records what it
decided, the figures, and the command that reproduces them."""
