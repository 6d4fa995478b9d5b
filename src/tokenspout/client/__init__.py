"""Python client (sync and async) for tokenspout and any OpenAI-compatible server."""

from tokenspout.client.chunk_reader import StreamError, StreamResult
from tokenspout.client.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client", "StreamError", "StreamResult"]
