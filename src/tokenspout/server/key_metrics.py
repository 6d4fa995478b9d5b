"""Per-key metrics, labelled by the key's name (never its secret).

Names come from the operator's keys file, so the label set is what the operator wrote; a
cap still bounds it (a keys file of a million tenants must not make every scrape huge):
past ``MAX_LABELLED_KEYS`` names, the rest share the label ``_other``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

MAX_LABELLED_KEYS = 1000
OTHER = "_other"


class KeyMetrics:
    def __init__(self, registry: CollectorRegistry):
        self._labelled: set[str] = set()
        self.requests = Counter(
            "tokenspout_key_requests",
            "Generation requests admitted, by API key name.",
            ["key"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "tokenspout_key_rate_limited",
            "Requests refused with 429 by a per-key limit (streams, requests, tokens).",
            ["key", "limit"],
            registry=registry,
        )
        self.tokens = Counter(
            "tokenspout_key_tokens",
            "Prompt and completion tokens of finished streams, by API key name.",
            ["key", "kind"],
            registry=registry,
        )
        self.streams_open = Gauge(
            "tokenspout_key_streams_open",
            "Streams generating, by API key name.",
            ["key"],
            registry=registry,
        )

    def label(self, name: str) -> str:
        if name in self._labelled:
            return name
        if len(self._labelled) < MAX_LABELLED_KEYS:
            self._labelled.add(name)
            return name
        return OTHER

    def admitted(self, name: str, streams: int = 1) -> None:
        """A request of ``streams`` streams (its ``n``); ``finished`` ends each one."""
        label = self.label(name)
        self.requests.labels(label).inc()
        self.streams_open.labels(label).inc(streams)

    def adopted(self, name: str) -> None:
        """A stream of ``name`` taken over from a dead replica: open here until it finishes
        (its request was counted where it began)."""
        self.streams_open.labels(self.label(name)).inc()

    def refused(self, name: str, limit: str) -> None:
        self.rate_limited.labels(self.label(name), limit).inc()

    def finished(self, name: str, prompt_tokens: int, completion_tokens: int) -> None:
        label = self.label(name)
        self.streams_open.labels(label).dec()
        self.tokens.labels(label, "prompt").inc(prompt_tokens)
        self.tokens.labels(label, "completion").inc(completion_tokens)
