"""cl: continual learning in PyTorch. Core types, the Strategy protocol, the runner and metrics.

Importing `cl` is cheap: torch loads only when a submodule that needs it is imported, so that
`cl --help` answers at once.
"""

__version__ = "0.1.0"
