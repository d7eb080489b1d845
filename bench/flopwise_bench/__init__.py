"""flopwise's benchmarks against stock vLLM (``flopwise bench …``): one module per benchmark, results
committed under bench/results/. A harness, not part of the serving package: it imports flopwise, never
the reverse."""
