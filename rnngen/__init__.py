"""rnngen: a recurrent-network lyrics and text generator."""

__version__ = "0.1.0"
