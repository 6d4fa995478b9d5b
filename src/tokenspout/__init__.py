"""tokenspout: stream LLM tokens to people as they are generated."""

__version__ = "0.1.0"
