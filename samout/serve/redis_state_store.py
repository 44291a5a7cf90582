"""The Redis tier of the state cache (`--state-store redis://...`): states shared by every
replica serving the same model. See state_store.py."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from samout.errors import SamoutError
from samout.serve.state_format import Key
from samout.serve.state_store import StateStore

# Seconds: the Redis client's connect and socket timeouts. A lookup runs on the engine's
# thread, so a Redis that stops answering stalls decoding this long once per RETRY_SECONDS.
REDIS_TIMEOUT = 0.5


def redacted(url: str) -> str:
    """`url` without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def check_redis_url(url: str) -> None:
    """A SamoutError (one line) for a URL that is not redis://, rediss:// or unix://."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as err:
        raise SamoutError(f"--state-store: not a valid URL: {redacted(url)!r} ({err})") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise SamoutError(f"--state-store must be redis://HOST:PORT/DB, rediss://... or unix://PATH, "
                          f"got {redacted(url)!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise SamoutError(f"--state-store: no host in {redacted(url)!r}")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise SamoutError(f"--state-store: the database must be a number, got {db!r}")


class RedisStateStore(StateStore):
    """States in Redis under `{namespace}{length}:{digest hex}` (the same bytes as on disk),
    with the lengths held in the sorted set `{namespace}lengths`. The namespace carries the
    model's fingerprint, so two different models never share states. `ttl_seconds`: each
    entry expires that long after it was written (None: never; Redis' maxmemory policy,
    e.g. allkeys-lru, evicts)."""

    tier = "redis"

    def __init__(self, url: str, namespace: str, ttl_seconds: int | None = None,
                 client: Any | None = None) -> None:
        check_redis_url(url)
        if ttl_seconds is not None and ttl_seconds < 1:
            raise SamoutError(f"--state-store-ttl must be at least 1 second, got {ttl_seconds}")
        import redis

        self.url, self.namespace, self.ttl = url, namespace.encode(), ttl_seconds
        self.client = client or redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT,
                                                     socket_connect_timeout=REDIS_TIMEOUT)
        self._lengths_key = self.namespace + b"lengths"

    def describe(self) -> str:
        return f"redis {redacted(self.url)}"

    def ping(self) -> None:
        self.client.ping()

    def _key(self, key: Key) -> bytes:
        return self.namespace + f"{key[0]}:{key[1].hex()}".encode()

    def lengths(self, above: int, below: int) -> list[int]:
        if below - above < 2:
            return []
        found = self.client.zrangebyscore(self._lengths_key, f"({above}", f"({below}")
        return [int(n) for n in found]

    def existing(self, keys: list[Key]) -> list[Key]:
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._key(key))
        return [k for k, n in zip(keys, pipe.execute()) if n]

    def read(self, key: Key) -> bytes | None:
        return self.client.get(self._key(key))

    def write(self, key: Key, data: bytes) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self._key(key), data, ex=self.ttl)
        pipe.zadd(self._lengths_key, {str(key[0]): key[0]})
        pipe.execute()

    def discard(self, key: Key) -> None:
        self.client.delete(self._key(key))

    def close(self) -> None:
        self.client.close()
