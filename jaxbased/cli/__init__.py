"""Console scripts (installed by setup.cfg's entry points)."""
