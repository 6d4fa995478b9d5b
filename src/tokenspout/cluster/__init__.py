"""Streams shared by several replicas through Redis (``--redis-url``)."""
