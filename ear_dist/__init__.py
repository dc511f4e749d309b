"""ear-dist: distributed concept erasure for autoregressive text-to-image models."""

__version__ = "0.1.0"
