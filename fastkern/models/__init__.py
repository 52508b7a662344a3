"""Real models used to measure accuracy (loaded offline; optional dependencies)."""
