"""mrantool: multi-scale feature caching and MIL heads (MRAN and baselines) for whole slide images."""

__version__ = "0.1.0"
