"""The tools built on the library: `sfi eval` (quality against dense)."""
