"""Where the cluster's state lives in Redis: every key name, in one place.

* ``stream(id)``: a Redis Stream of the stream's chunks. An entry's id is
  ``<end position>-0`` (``end position``: the position after its last chunk), so ids grow
  with positions, a reader at position ``p`` reads from ``<p + 1>-0``, and an append at a
  position already written is refused by Redis itself. The end is one more entry,
  ``<end position>-1``;
* ``meta(id)``: a hash: how to read and continue the stream (``StreamRecord``);
* ``replicas``: a sorted set, replica id → lease expiry (ms, Redis clock);
* ``owned(replica)``: the ids of the unfinished streams a replica generates;
* ``admission``: a hash, ``s:<replica>`` → streams generating there, ``q:<replica>`` →
  requests queued there;
* ``key(name)``: a hash per API key: ``s:<replica>`` → its streams there, and the
  request and token buckets (``rl``/``rt``, ``tl``/``tt``: level and time);
* ``readers(id)``: set (with a lease's expiry) while readers on a replica that does not
  generate the stream follow it there: its owner does not end it for want of a reader;
* ``expired(id)``: the key name that opened an ended stream, kept ``EXPIRED_KEPT_S`` after
  its keys expired, so that every replica, not only its owner, says it expired (410);
* ``CANCEL``: the pub/sub channel cancels travel on;
* ``HANDED``: the pub/sub channel on which a stopping replica says it handed its streams
  over (its id): the others claim them at once, not at their next lease refresh.
"""

from __future__ import annotations

PREFIX = "tokenspout:"
CANCEL = PREFIX + "cancel"
HANDED = PREFIX + "handed"
REPLICAS = PREFIX + "replicas"
ADMISSION = PREFIX + "admission"
#: How long an ended stream's id is remembered after its keys expired (~100 bytes each).
EXPIRED_KEPT_S = 3600


def stream(stream_id: str) -> str:
    return f"{PREFIX}s:{stream_id}"


def meta(stream_id: str) -> str:
    return f"{PREFIX}m:{stream_id}"


def expired(stream_id: str) -> str:
    return f"{PREFIX}x:{stream_id}"


def owned(replica: str) -> str:
    return f"{PREFIX}o:{replica}"


def draining(replica: str) -> str:
    """Set while ``replica`` drains: it is no replica to hand streams over to."""
    return f"{PREFIX}d:{replica}"


def readers(stream_id: str) -> str:
    return f"{PREFIX}r:{stream_id}"


def key(name: str) -> str:
    return f"{PREFIX}k:{name}"


def entry_id(end: int, final: bool = False) -> str:
    return f"{end}-{1 if final else 0}"


def entry_end(entry: bytes | str) -> tuple[int, bool]:
    """(end position, whether it is the end entry) of an entry id."""
    text = entry.decode() if isinstance(entry, bytes) else entry
    end, _, seq = text.partition("-")
    return int(end), seq == "1"
