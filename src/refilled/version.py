"""refilled's version: the one place it is written (read by pyproject.toml, the CLI and exports)."""

__version__ = "0.3.0"
