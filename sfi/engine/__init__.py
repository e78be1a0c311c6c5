"""The engine: `sfi run` (run: jobs in, results out), the scheduler (length buckets, the KV budget, shared
prefixes, admission) and the continuous decode loop (decoder). Importing the package stays light (no torch):
the CLI answers `--help`, `--strict` and a refused lock without loading torch."""

from .run import Observer, Runner, RunOptions, RunSummary, Silent, run

__all__ = ["Observer", "RunOptions", "RunSummary", "Runner", "Silent", "run"]
