"""Resource Intelligence: LLM spend, tokens, impact and waste of SciDEX as Prometheus metrics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("resource-intelligence")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
