"""FLOP-cutting techniques, one per file: a config plus the plain-torch algorithm (the oracle)."""
