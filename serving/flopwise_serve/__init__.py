"""flopwise's user surfaces: the ``flopwise`` CLI, the server launcher, the demo and the benchmarks."""
