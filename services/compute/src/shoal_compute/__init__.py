"""shoal_compute: the compute node service."""

__version__ = "0.1.0"
