"""State stores behind the memory cache: the byte format, the disk store (atomic writes,
restart, corrupt and truncated files, budget, permissions), Redis against a real
redis-server, and two HTTP apps sharing conversations (replicas on one Redis; a restart
over one directory) with exactly the tokens of a cold request."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis
import torch

from samout.errors import SamoutError
from samout.serve import disk_state_store, state_store
from samout.serve.disk_state_store import DiskStateStore, file_name
from samout.serve.loading import open_state_cache, served_model
from samout.serve.redis_state_store import RedisStateStore
from samout.serve.state_cache import StateCache, prefix_key
from samout.serve.state_format import CorruptStateError, decode_state, encode_state, model_fingerprint
from samout.serve.state_store import TieredStateCache
from samout.state import State
from tests.serve.serve_fixtures import free_port, running_server

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _state(value: float, numel: int = 16, dtype=torch.float32) -> State:
    return State([{"running_max": torch.full((1, 2, numel), value, dtype=dtype)},
                  {"key": torch.randn(1, 2, 3, 4).to(dtype), "value": torch.randn(1, 2, 3, 4).to(dtype)}])


# -- the byte format ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_format_round_trips_bit_for_bit_and_refuses_damage(dtype):
    state, key = _state(1.5, dtype=dtype), prefix_key([1, 2, 3])
    data = encode_state(key, state)
    assert decode_state(data, key).equal(state)
    in_place = bytearray(data)  # a disk read: the tensors use these bytes, aligned, not a copy
    decoded = decode_state(in_place, key)
    assert decoded.equal(state)
    assert decoded[0]["running_max"].data_ptr() % 8 == 0  # as aligned as the buffer (malloc)
    in_place[len(data) - 40] ^= 1  # the tensors really are views of it
    assert not decoded.equal(state)
    with pytest.raises(CorruptStateError, match="another prefix"):
        decode_state(data, prefix_key([1, 2, 4]))
    with pytest.raises(CorruptStateError, match="checksum"):
        decode_state(data[:-40] + data[-39:] + b"x", key)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    with pytest.raises(CorruptStateError):
        decode_state(bytes(flipped), key)
    for cut in (0, 5, 20, len(data) - 1):
        with pytest.raises(CorruptStateError):
            decode_state(data[:cut], key)


def test_fingerprint_tells_models_apart(serve_models):
    model, transformer = serve_models[:2]
    assert model_fingerprint(model) == model_fingerprint(model)
    assert model_fingerprint(model) != model_fingerprint(transformer)


# -- disk -----------------------------------------------------------------------------------------
def _disk_cache(directory: Path, budget: int = 1 << 20, memory: int = 0) -> TieredStateCache:
    return TieredStateCache(StateCache(memory), DiskStateStore(directory, budget))


def test_disk_writes_atomically_and_reads_back_after_a_restart(tmp_path):
    directory = tmp_path / "states"
    cache = _disk_cache(directory)
    assert directory.stat().st_mode & 0o777 == 0o700
    state = _state(2.0)
    cache.put([5, 6, 7], state)
    cache.put([5, 6, 7, 8, 9], _state(3.0))
    cache.close()
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted(file_name(prefix_key(ids)) for ids in ([5, 6, 7], [5, 6, 7, 8, 9]))
    assert all((directory / n).stat().st_mode & 0o777 == 0o600 for n in names)
    (directory / ".half-written.state.tmp").write_bytes(b"partial")  # a write cut short by a crash
    (directory / "notes.txt").write_text("not a state")
    again = _disk_cache(directory, memory=1 << 20)
    assert not (directory / ".half-written.state.tmp").exists() and (directory / "notes.txt").exists()
    hit = again.lookup([5, 6, 7, 8])
    assert hit.length == 3 and hit.state.equal(state)
    assert again.lookup([5, 6, 7, 8, 9, 10]).length == 5
    assert again.lookup([5, 6, 7, 1]).length == 3 and again.tier_hits == {"memory": 1, "disk": 2}
    assert again.lookup([4]) is None and again.misses == 1


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "renamed"])
def test_a_damaged_file_is_logged_once_deleted_and_never_served(tmp_path, caplog, damage):
    cache = _disk_cache(tmp_path)
    cache.put([1, 2], _state(1.0))
    cache.put([1, 2, 3, 4], _state(4.0))
    cache.close()
    path = tmp_path / file_name(prefix_key([1, 2, 3, 4]))
    data = path.read_bytes()
    if damage == "corrupt":
        path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    else:  # another prefix's state under this prefix's name
        path.write_bytes((tmp_path / file_name(prefix_key([1, 2]))).read_bytes())
    again = _disk_cache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="samout.serve.state_store"):
        hit = again.lookup([1, 2, 3, 4, 5])
        # The shorter, intact one.
        assert hit.length == 2 and float(hit.state[0]["running_max"][0, 0, 0]) == 1.0
        assert again.lookup([1, 2, 3, 4, 5]).length == 2
    warnings = [r for r in caplog.records if "unusable" in r.getMessage()]
    assert len(warnings) == 1 and not path.exists() and again.corrupt == 1


def test_disk_budget_evicts_the_least_recently_used_files(tmp_path):
    size = len(encode_state(prefix_key([1]), _state(0.0)))
    cache = _disk_cache(tmp_path, budget=2 * size)
    cache.put([1], _state(1.0))
    cache.put([2], _state(2.0))
    cache.flush()
    assert cache.lookup([1, 9]).length == 1  # [1] is now the most recently used
    cache.put([3], _state(3.0))
    cache.close()
    assert {p.name for p in tmp_path.iterdir()} == {file_name(prefix_key([1])), file_name(prefix_key([3]))}
    # The order survives a restart (the files' mtimes), and a smaller budget evicts at start-up.
    # [1] used after [3] (set explicitly: some file systems keep mtimes to the second).
    older = time.time() - 100
    os.utime(tmp_path / file_name(prefix_key([3])), (older, older))
    small = DiskStateStore(tmp_path, size)
    assert [p.name for p in tmp_path.iterdir()] == [file_name(prefix_key([1]))]
    assert small.stats()["entries"] == 1 and small.stats()["evictions"] == 1


def test_a_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    uid = os.getuid()
    monkeypatch.setattr(disk_state_store.os, "getuid", lambda: uid + 1)
    with pytest.raises(SamoutError, match="belongs to another user"):
        DiskStateStore(tmp_path, 1 << 20)
    monkeypatch.undo()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(SamoutError, match="writable by other users"):
        DiskStateStore(shared, 1 << 20)
    (tmp_path / "file").write_text("")
    with pytest.raises(SamoutError, match="not a directory"):
        DiskStateStore(tmp_path / "file", 1 << 20)


def test_a_failing_disk_is_a_miss_not_an_error(tmp_path, caplog):
    cache = _disk_cache(tmp_path / "d", memory=1 << 20)
    cache.put([1, 2], _state(1.0))
    cache.flush()
    shutil.rmtree(tmp_path / "d")  # writes now fail (no directory)
    with caplog.at_level(logging.WARNING, logger="samout.serve.state_store"):
        cache.put([7, 8], _state(2.0))
        cache.put([7, 9], _state(2.0))
        cache.flush()
    assert cache.store_errors == 1 and cache.store_skipped >= 1
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1
    assert cache.lookup([7, 8, 1]).length == 2  # memory still serves


def test_writes_beyond_the_queue_budget_are_skipped_not_queued(tmp_path):
    state = _state(1.0)
    cache = TieredStateCache(StateCache(1 << 20), DiskStateStore(tmp_path, 1 << 20),
                             write_queue_bytes=state.nbytes)
    cache.put([1], state)
    cache.put([2], state)  # may find the first still queued
    cache.flush()
    cache.put([3], state)
    cache.close()
    assert cache.writes + cache.store_skipped == 3 and cache.writes >= 2
    assert cache.lookup([2, 5]).length == 1  # memory holds every one


def test_an_unexpected_store_error_is_a_miss_not_an_engine_failure(tmp_path, monkeypatch):
    cache = _disk_cache(tmp_path, memory=1 << 20)
    cache.put([1, 2], _state(1.0))
    cache.flush()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(state_store, "decode_state", broken)
    fresh = _disk_cache(tmp_path)
    assert fresh.lookup([1, 2, 3]) is None and fresh.store_errors == 1
    assert cache.lookup([1, 2, 3]).length == 2  # memory is not affected
    assert (tmp_path / file_name(prefix_key([1, 2]))).exists()  # not corrupt: kept


# -- Redis ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port for this module, stopped at teardown."""
    if not os.path.exists(REDIS_SERVER):
        message = f"{REDIS_SERVER} is missing"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: the Redis tests must run)")
        pytest.skip(message)
    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(directory)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    try:
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(10)


def _redis_cache(url: str, namespace: str = "test:", memory: int = 0, ttl=None) -> TieredStateCache:
    return TieredStateCache(StateCache(memory), RedisStateStore(url, namespace, ttl))


def test_redis_store_finds_the_longest_prefix_across_caches(redis_url):
    namespace = f"t{time.monotonic_ns()}:"
    a, b = (_redis_cache(redis_url, namespace, memory=1 << 20) for _ in range(2))
    short, long = _state(1.0), _state(2.0)
    a.put([3, 4], short)
    a.put([3, 4, 5, 6], long)
    a.flush()
    hit = b.lookup([3, 4, 5, 6, 7])
    assert hit.length == 4 and hit.state.equal(long) and b.tier_hits["redis"] == 1
    assert b.lookup([3, 4, 5, 6, 7]).length == 4 and b.tier_hits["memory"] == 1  # promoted
    # Memory holds a shorter prefix than Redis: the longer one wins.
    b.put([8, 9], short)
    a.put([8, 9, 10], long)
    a.flush()
    assert b.lookup([8, 9, 10, 11]).length == 3
    other = _redis_cache(redis_url, "another-model:")
    assert other.lookup([3, 4, 5, 6, 7]) is None  # another namespace (model) shares nothing
    # A corrupt value is deleted, never served.
    client = redis.Redis.from_url(redis_url)
    key = f"{namespace}4:{prefix_key([3, 4, 5, 6])[1].hex()}"
    client.set(key, client.get(key)[:-1] + b"\0")
    fresh = _redis_cache(redis_url, namespace)
    assert fresh.lookup([3, 4, 5, 6, 7]).length == 2 and fresh.corrupt == 1 and client.get(key) is None
    for cache in (a, b, other, fresh):
        cache.close()


def test_redis_ttl_expires_entries(redis_url):
    cache = _redis_cache(redis_url, f"ttl{time.monotonic_ns()}:", ttl=1)
    cache.put([1, 2], _state(1.0))
    cache.flush()
    key = f"{cache.store.namespace.decode()}2:{prefix_key([1, 2])[1].hex()}"
    ttl = redis.Redis.from_url(redis_url).ttl(key)
    assert 0 < ttl <= 1
    cache.close()


def test_a_redis_that_is_down_is_a_miss_logged_once(caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(SamoutError, match="cannot reach the state store"):
        open_state_cache(torch.nn.Linear(2, 2), 1 << 20, url=url)
    cache = _redis_cache(url, memory=1 << 20)
    with caplog.at_level(logging.WARNING, logger="samout.serve.state_store"):
        cache.put([1, 2], _state(1.0))
        cache.flush()
        assert cache.lookup([1, 2, 3]).length == 2  # memory serves
        assert cache.lookup([5, 6]) is None
    assert cache.store_errors == 1 and cache.store_skipped >= 1
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1
    cache.close()


@pytest.mark.parametrize("url, message", [
    ("http://localhost:6379", "must be redis://"), ("redis://", "no host"),
    ("redis://h:notaport/0", "not a valid URL"), ("redis://h:6379/db", "must be a number")])
def test_a_malformed_url_is_a_one_line_error(url, message):
    with pytest.raises(SamoutError, match=message) as err:
        open_state_cache(torch.nn.Linear(2, 2), 0, url=url)
    assert "\n" not in str(err.value)


def test_a_password_never_reaches_a_message():
    with pytest.raises(SamoutError) as err:
        open_state_cache(torch.nn.Linear(2, 2), 0, url="redis://:s3cret@127.0.0.1:1/x")
    assert "s3cret" not in str(err.value)


# -- through the HTTP app -------------------------------------------------------------------------
def _complete(url: str, model: str, prompt: list[int], **sampling) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "ignore_eos": True, **sampling}
    answer = httpx.post(url + "/v1/completions", json=body, timeout=60)
    answer.raise_for_status()
    return answer.json()


def _cached(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


SAMPLINGS = [{"temperature": 0}, {"temperature": 0.9, "seed": 7}]


def _cold(model, tokenizer, requests: list[tuple[list[int], dict]]) -> list[str]:
    """The texts a server without any cache answers to (prompt, sampling) `requests`."""
    with running_server([served_model(model, tokenizer, "m", state_cache_mb=0)]) as url:
        answers = [_complete(url, "m", p, **s) for p, s in requests]
    assert all(_cached(a) == 0 for a in answers)
    return [a["choices"][0]["text"] for a in answers]


@pytest.mark.parametrize("which", ["samout", "transformer"])
def test_replicas_on_one_redis_share_conversations(serve_models, redis_url, which):
    model = serve_models[0] if which == "samout" else serve_models[1]
    tokenizer = serve_models[2]
    redis.Redis.from_url(redis_url).flushdb()
    prompt = [1] + list(range(40, 70))
    follow = [prompt + [80 + i, 81, 82] for i in range(len(SAMPLINGS))]  # two conversations' next turns
    want = _cold(model, tokenizer, list(zip(follow, SAMPLINGS)))
    replica_a = served_model(model, tokenizer, "m", state_store=redis_url)
    replica_b = served_model(model, tokenizer, "m", state_store=redis_url)
    with running_server([replica_a]) as a, running_server([replica_b]) as b:
        assert _cached(_complete(a, "m", prompt, temperature=0)) == 0
        replica_a.engine.cache.flush()
        got = [_complete(b, "m", p, **s) for p, s in zip(follow, SAMPLINGS)]
        assert [_cached(g) for g in got] == [len(prompt)] * len(SAMPLINGS)
        assert replica_b.engine.cache.tier_hits["redis"] >= 1
        metrics = httpx.get(b + "/metrics").text
        assert 'samout_state_cache_tier_hits_total{model="m",tier="redis"}' in metrics
    assert [g["choices"][0]["text"] for g in got] == want


@pytest.mark.parametrize("which", ["samout", "transformer"])
def test_a_restarted_server_resumes_from_its_state_directory(serve_models, tmp_path, which):
    model = serve_models[0] if which == "samout" else serve_models[1]
    tokenizer = serve_models[2]
    prompt = [1] + list(range(20, 50))
    follow = prompt + [90, 91]
    want = _cold(model, tokenizer, [(follow, s) for s in SAMPLINGS])
    with running_server([served_model(model, tokenizer, "m", state_cache_dir=tmp_path)]) as url:
        first = _complete(url, "m", prompt, temperature=0)
    assert _cached(first) == 0
    restarted = served_model(model, tokenizer, "m", state_cache_dir=tmp_path)
    with running_server([restarted]) as url:
        got = [_complete(url, "m", follow, **s) for s in SAMPLINGS]
    assert [_cached(g) for g in got] == [len(prompt), len(prompt)]
    assert restarted.engine.cache.tier_hits == {"disk": 1, "memory": 1}  # read once, then promoted
    assert [g["choices"][0]["text"] for g in got] == want
