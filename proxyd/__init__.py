"""proxyd: a transparent L7 proxy daemon with sans-IO protocol parsers (proxylib's model)."""

__version__ = "0.1.0"
