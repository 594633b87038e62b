"""First-party Tightwad plugins. Each module registers through the
``tightwad`` entry-point group in pyproject.toml, as a third-party one would."""
