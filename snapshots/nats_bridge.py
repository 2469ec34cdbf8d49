"""The one place where the synchronous store meets nats-py's asyncio client.

Why a thread of its own: ``AgentStore`` is synchronous (the runtime calls it from worker
threads, from the server's event loop through ``to_thread``, from the CLI), and nats-py is
asyncio only. The bridge owns a private event loop running in a daemon thread, and the
one NATS connection, created on that loop; every call from another thread is a coroutine
handed to that loop with ``run_coroutine_threadsafe`` and waited for with a timeout. No
caller's event loop is ever borrowed (the server's loop may be the caller, blocked in a
worker thread: sharing it would deadlock), and no nats-py object leaves this module.

Messages of a subscription are handed to a plain callback on the bridge's thread: the
callback must only queue them (the store's applier thread does the work).

Errors: a connection that cannot be made, a request that times out, a server that answers
with an error are ``StoreUnavailable`` (the cluster is not there for us now);
``WrongLastSequence`` is the answer to a conditional publish that lost a race.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import StoreConfigError, StoreError, StoreUnavailable

__all__ = ["LogMessage", "NatsBridge", "WorkMessage", "WrongLastSequence"]

T = TypeVar("T")
_log = logging.getLogger("torpor.store.nats")
#: The JetStream error codes of "wrong last sequence" (an expected-sequence header not met):
#: with the sequence found, and without it (a subject's, in some paths of the server).
_WRONG_LAST_SEQUENCE = 10071
_WRONG_LAST_SEQUENCE_CONSTANT = 10164
#: "no suitable peers for placement": fewer nodes than replicas are up (for now).
_NO_SUITABLE_PEERS = 10005
#: "stream name already in use": created by another host meanwhile.
_STREAM_NAME_IN_USE = 10058
#: "duplicate message id is in process": the same message id published at the same moment.
_DUPLICATE_IN_PROCESS = 10158


class WrongLastSequence(StoreError):
    """A conditional publish was refused: the stream moved on since the sequence expected.

    ``ambiguous``: an earlier attempt of the same publish got no answer, so the stream
    may have moved on because of that very attempt (the caller looks for its message).
    """

    ambiguous = False
    #: The stream's last sequence as the refusal named it ("wrong last sequence: N"), if it did.
    last_seq: int | None = None


@dataclass(frozen=True, slots=True)
class WorkMessage:
    """One delivered work message: its payload, how many times it was delivered (1 the first
    time), its stream sequence; ``token`` names it to the bridge for its answer."""

    token: int
    data: bytes
    deliveries: int
    seq: int


@dataclass(frozen=True, slots=True)
class LogMessage:
    """One stored message: its stream sequence, payload, headers and subject."""

    seq: int
    data: bytes
    headers: dict[str, str]
    subject: str = ""


def _import_nats() -> Any:
    try:
        import nats
    except ImportError as exc:  # the fleet extra is not installed
        raise StoreConfigError("a nats:// store needs nats-py: pip install 'torpor[fleet]'") from exc
    return nats


class NatsBridge:
    """A NATS connection on a private event loop, called synchronously from any thread."""

    def __init__(self, servers: Sequence[str], *, timeout: float = 10.0, name: str = "torpor") -> None:
        self._nats = _import_nats()
        self.servers = list(servers)
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="torpor-nats", daemon=True)
        self._thread.start()
        self._closed = False
        self._subs: list[Any] = []
        self._work_subs: dict[tuple[str, str], Any] = {}
        self._work_msgs: dict[int, Any] = {}  # delivered work messages not answered yet, by token
        self._work_ids = 0
        self._last_error, self._last_error_at = "", 0.0
        self._connected = False
        self._closing = False
        try:
            self._nc: Any = self._run(self._connect(name), timeout)
            self._connected = True
        except BaseException:
            self._stop_loop()
            raise
        self._js: Any = self._nc.jetstream(timeout=timeout)

    async def _connect(self, name: str) -> Any:
        try:
            # A few tries to connect at all (a wrong address fails in seconds), then, once
            # connected, reconnect for ever: a node that dies is the cluster's business.
            # The per-try timeout grows with the caller's: a loaded machine (CI on two cores)
            # can take seconds to answer a first connect; a closed port is refused at once.
            nc = await self._nats.connect(servers=self.servers, name=name,
                                          connect_timeout=max(2.0, self.timeout / 3),
                                          max_reconnect_attempts=2, reconnect_time_wait=0.2,
                                          allow_reconnect=True, error_cb=self._on_error,
                                          disconnected_cb=self._on_disconnected,
                                          reconnected_cb=self._on_reconnected)
        except Exception as exc:
            raise StoreUnavailable(f"cannot connect to NATS at {','.join(self.servers)}: {exc}") from exc
        nc.options["max_reconnect_attempts"] = -1
        return nc

    # nats-py prints a traceback for every failed reconnect (five a second while the cluster
    # is away): one line per kind of error instead, at most every 10 s.
    async def _on_error(self, exc: Exception) -> None:
        if not self._connected:  # the first connection's failure is the exception connect raises
            return
        now = self._loop.time()
        what = f"{type(exc).__name__}: {exc}"
        if what != self._last_error or now - self._last_error_at > 10.0:
            _log.warning("NATS at %s: %s", ",".join(self.servers), what)
            self._last_error, self._last_error_at = what, now

    async def _on_disconnected(self) -> None:
        if self._closing:  # our own close
            return
        _log.warning("NATS: disconnected from %s; reconnecting", ",".join(self.servers))

    async def _on_reconnected(self) -> None:
        _log.warning("NATS: reconnected")
        self._last_error = ""

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise StoreUnavailable("the NATS store is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout + 1.0 if timeout is None else timeout)
        except FutureTimeout as exc:
            future.cancel()
            raise StoreUnavailable(f"NATS at {','.join(self.servers)} did not answer in time") from exc

    def _translate(self, exc: Exception, what: str) -> StoreError:
        code = getattr(exc, "err_code", None)
        if code in (_WRONG_LAST_SEQUENCE, _WRONG_LAST_SEQUENCE_CONSTANT):
            error = WrongLastSequence(f"{what}: {exc}")
            tail = str(getattr(exc, "description", None) or exc).rsplit(":", 1)[-1].strip().rstrip("'\"")
            error.last_seq = int(tail) if tail.isdigit() else None
            return error
        return StoreUnavailable(f"{what} failed at NATS {','.join(self.servers)}: {exc}")

    async def _guard(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except StoreError:
            raise
        except Exception as exc:
            raise self._translate(exc, what) from exc

    # --------------------------------------------------------------- streams

    def ensure_stream(self, name: str, subject: str, replicas: int) -> str:
        """Create the stream if it is missing; return its creation time, which names this very stream."""
        from nats.js.api import StorageType, StreamConfig

        async def go() -> str:
            try:
                # Asked again while the cluster is slow to answer (a loaded machine, a leader
                # being elected), up to the timeout: a real absence of the cluster still fails.
                info = await self._settled(lambda: self._js.stream_info(name))
                if list(info.config.subjects or []) != [subject]:  # a stream of an older layout
                    info.config.subjects = [subject]
                    info = await self._js.update_stream(info.config)
            except self._nats.js.errors.NotFoundError:
                config = StreamConfig(name=name, subjects=[subject], num_replicas=replicas,
                                      storage=StorageType.FILE, allow_atomic=True, allow_direct=True,
                                      duplicate_window=120.0)
                deadline = self._loop.time() + 3 * self.timeout
                while True:
                    try:
                        info = await self._js.add_stream(config)
                        break
                    except self._nats.js.errors.BadRequestError as exc:
                        if exc.err_code == _NO_SUITABLE_PEERS and self._loop.time() < deadline:
                            await asyncio.sleep(0.2)  # a node just back is not yet a placement peer
                            continue
                        if exc.err_code != _STREAM_NAME_IN_USE:
                            raise
                        info = await self._js.stream_info(name)  # another host created it first
                        break
                    except (self._nats.errors.TimeoutError, self._nats.js.errors.ServiceUnavailableError):
                        # a loaded cluster placing the replicas: created meanwhile, or ask again
                        if self._loop.time() > deadline:
                            raise
                        try:
                            info = await self._settled(lambda: self._js.stream_info(name))
                            break
                        except self._nats.js.errors.NotFoundError:
                            await asyncio.sleep(0.2)
            return str(info.created)

        return self._run(self._guard(f"opening stream {name}", go()), 4 * self.timeout)

    def stream_state(self, stream: str) -> dict[str, Any]:
        """The server's version and the stream's messages, leader and replicas (``torpor doctor``)."""
        async def go() -> dict[str, Any]:
            info = await self._js.stream_info(stream)
            cluster = info.cluster
            replicas = [{"name": r.name, "current": bool(r.current), "offline": bool(r.offline), "lag": r.lag}
                        for r in (cluster.replicas or [])] if cluster is not None else []
            return {"server": self._nc.connected_url.netloc if self._nc.connected_url else None,
                    "server_version": str((getattr(self._nc, "_server_info", None) or {}).get("version")),
                    "stream": stream, "messages": int(info.state.messages), "last_seq": int(info.state.last_seq),
                    "bytes": int(info.state.bytes), "replicas_configured": int(info.config.num_replicas or 1),
                    "leader": cluster.leader if cluster is not None else None, "followers": replicas}

        return self._run(self._guard(f"reading stream {stream}", go()))

    def last_seq(self, stream: str) -> int:
        """The stream's last sequence (0 when it is empty)."""
        async def go() -> int:
            info = await self._js.stream_info(stream)
            return int(info.state.last_seq)

        return self._run(self._guard(f"reading stream {stream}", go()))

    def get(self, stream: str, seq: int) -> LogMessage | None:
        """Message ``seq`` of the stream, or None if there is none (deleted or not yet written)."""
        async def go() -> LogMessage | None:
            try:
                m = await self._js.get_msg(stream, seq, direct=True)
            except self._nats.js.errors.NotFoundError:
                return None
            return LogMessage(int(m.seq), bytes(m.data or b""), dict(m.headers or {}), str(m.subject or ""))

        return self._run(self._guard(f"reading message {seq} of {stream}", go()))

    def first_seq(self, stream: str) -> int:
        """The stream's first sequence still held (after a purge, the one after it)."""
        async def go() -> int:
            info = await self._js.stream_info(stream)
            return int(info.state.first_seq)

        return self._run(self._guard(f"reading stream {stream}", go()))

    def purge(self, stream: str, upto: int) -> None:
        """Delete the stream's messages before sequence ``upto`` (compaction)."""
        async def go() -> None:
            await self._js.purge_stream(stream, seq=upto)

        self._run(self._guard(f"purging stream {stream}", go()))

    # ----------------------------------------------- positions and snapshots

    async def _settled(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, again while a stream just created (a KV bucket, an object store) or one
        whose leader just died has no leader to answer yet, until the timeout."""
        deadline = self._loop.time() + self.timeout
        pause = 0.05
        while True:
            try:
                return await call()
            except (self._nats.errors.TimeoutError, self._nats.errors.NoRespondersError,
                    self._nats.js.errors.NoStreamResponseError, self._nats.js.errors.ServiceUnavailableError):
                if self._loop.time() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)

    async def _kv(self, bucket: str, replicas: int, ttl: float) -> Any:
        from nats.js.api import KeyValueConfig, StorageType

        try:
            return await self._js.key_value(bucket)
        except self._nats.js.errors.BucketNotFoundError:
            return await self._js.create_key_value(KeyValueConfig(bucket=bucket, ttl=ttl, replicas=replicas,
                                                                  storage=StorageType.FILE, history=1))

    def put_position(self, bucket: str, key: str, seq: int, *, replicas: int, ttl: float) -> None:
        """Say, in KV bucket ``bucket`` (entries expire after ``ttl`` s), that copy ``key`` is at ``seq``."""
        async def go() -> None:
            kv = await self._settled(lambda: self._kv(bucket, replicas, ttl))
            await self._settled(lambda: kv.put(key, str(seq).encode()))

        self._run(self._guard(f"writing position to {bucket}", go()), self.timeout + 2.0)

    def positions(self, bucket: str, *, replicas: int, ttl: float) -> dict[str, int]:
        """Every live copy's position in ``bucket`` (those that said so within ``ttl``)."""
        async def go() -> dict[str, int]:
            kv = await self._settled(lambda: self._kv(bucket, replicas, ttl))
            try:
                keys = await self._settled(kv.keys)
            except self._nats.js.errors.NoKeysError:
                return {}
            out = {}
            for key in keys:
                try:
                    entry = await kv.get(key)
                except self._nats.js.errors.KeyNotFoundError:
                    continue  # expired meanwhile
                if entry.value:
                    out[key] = int(entry.value)
            return out

        return self._run(self._guard(f"reading positions from {bucket}", go()), self.timeout * 2 + 2.0)

    async def _objects(self, bucket: str, replicas: int) -> Any:
        from nats.js.api import ObjectStoreConfig, StorageType

        try:
            return await self._js.object_store(bucket)
        except self._nats.js.errors.BucketNotFoundError:
            return await self._js.create_object_store(bucket, ObjectStoreConfig(bucket=bucket, replicas=replicas,
                                                                                storage=StorageType.FILE))

    def snapshots(self, bucket: str, *, replicas: int) -> list[str]:
        """The names of the objects in object store ``bucket``, sorted."""
        async def go() -> list[str]:
            obs = await self._settled(lambda: self._objects(bucket, replicas))
            try:
                infos = await obs.list(ignore_deletes=True)
            except self._nats.js.errors.NotFoundError:
                return []
            return sorted(str(i.name) for i in infos)

        return self._run(self._guard(f"listing {bucket}", go()))

    def put_snapshot(self, bucket: str, name: str, data: bytes, *, replicas: int) -> None:
        """Store ``data`` as object ``name`` (chunked by the object store), on a quorum."""
        async def go() -> None:
            obs = await self._settled(lambda: self._objects(bucket, replicas))
            await self._settled(lambda: obs.put(name, data))

        self._run(self._guard(f"writing {name} to {bucket}", go()), self.timeout * 6)

    def get_snapshot(self, bucket: str, name: str, *, replicas: int) -> bytes:
        """Object ``name`` of ``bucket`` (its digest checked by the object store)."""
        async def go() -> bytes:
            obs = await self._settled(lambda: self._objects(bucket, replicas))
            return bytes((await obs.get(name)).data or b"")

        return self._run(self._guard(f"reading {name} from {bucket}", go()), self.timeout * 6)

    def delete_snapshot(self, bucket: str, name: str, *, replicas: int) -> None:
        async def go() -> None:
            obs = await self._settled(lambda: self._objects(bucket, replicas))
            with contextlib.suppress(self._nats.js.errors.NotFoundError):
                await obs.delete(name)

        self._run(self._guard(f"deleting {name} from {bucket}", go()))

    # -------------------------------------------------------------- publishes

    def publish(self, subject: str, payload: bytes, *, headers: dict[str, str]) -> int:
        """Publish one message; its sequence. ``headers`` carry its condition
        (``Nats-Expected-Last-Sequence``, ``Nats-Expected-Last-Subject-Sequence``), if any.

        A message id makes the retry after a lost answer safe: JetStream drops the second
        copy and answers with the first one's sequence.
        """
        h = {"Nats-Msg-Id": uuid.uuid4().hex, **headers}

        async def go() -> int:
            # Retried while the cluster elects a stream leader (no answer, no responders),
            # with the same message id, until the deadline.
            deadline = self._loop.time() + self.timeout
            pause, unanswered = 0.05, False
            while True:
                try:
                    ack = await self._js.publish(subject, payload, headers=h, timeout=self.timeout / 4)
                    return int(ack.seq)
                except (self._nats.errors.TimeoutError, self._nats.errors.NoRespondersError,
                        self._nats.js.errors.NoStreamResponseError, self._nats.js.errors.ServiceUnavailableError,
                        self._nats.errors.ConnectionReconnectingError) as exc:
                    unanswered = unanswered or not isinstance(exc, self._nats.errors.NoRespondersError)
                    if self._loop.time() + pause > deadline:
                        raise
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.5)
                except Exception as exc:
                    error = self._translate(exc, f"publishing to {subject}")
                    if isinstance(error, WrongLastSequence):
                        error.ambiguous = unanswered
                    raise error from exc

        return self._run(self._guard(f"publishing to {subject}", go()), self.timeout + 2.0)

    def publish_batch(self, messages: Sequence[tuple[str, bytes, dict[str, str]]]) -> int:
        """Publish ``messages`` (subject, payload, headers) as one atomic batch (NATS 2.12+).

        Either every message is stored, contiguously, or none is: each message's condition
        in its headers must hold (``Nats-Expected-Last-Sequence`` on the first only). Returns
        the sequence of the last message. Only the commit (the last message) is answered.

        A batch with a condition is sent again while the cluster elects a stream leader (no
        answer): if the first was stored after all, the condition refuses the second, and the
        refusal says so (``ambiguous``). One without a condition is sent once.
        """
        import json

        conditional = any(k.startswith("Nats-Expected-") for _, _, h in messages for k in h)

        async def once() -> int:
            batch = uuid.uuid4().hex
            reply: Any = None
            n = len(messages)
            for i, (subject, payload, headers) in enumerate(messages, 1):
                h = {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(i), **headers}
                if i < n:
                    await self._nc.publish(subject, payload, headers=h)
                else:
                    h["Nats-Batch-Commit"] = "1"
                    reply = await self._nc.request(subject, payload, timeout=self.timeout / 4, headers=h)
            answer = json.loads(reply.data)
            if "error" in answer:
                err = answer["error"]
                exc = RuntimeError(err.get("description", "batch refused"))
                exc.err_code = err.get("err_code")  # type: ignore[attr-defined]
                raise exc
            return int(answer["seq"])

        async def go() -> int:
            deadline = self._loop.time() + self.timeout
            pause, unanswered = 0.05, False
            while True:
                try:
                    return await once()
                except (self._nats.errors.TimeoutError, self._nats.errors.NoRespondersError,
                        self._nats.errors.ConnectionReconnectingError) as exc:
                    unanswered = unanswered or not isinstance(exc, self._nats.errors.NoRespondersError)
                    if not conditional or self._loop.time() + pause > deadline:
                        raise
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.5)
                except Exception as exc:
                    error = self._translate(exc, "publishing a batch")
                    if isinstance(error, WrongLastSequence):
                        error.ambiguous = unanswered
                    raise error from exc

        return self._run(self._guard("publishing a batch", go()), self.timeout * 2 + 2.0)

    # ------------------------------------------------------------- work queue

    def ensure_work_queue(self, name: str, subject: str, replicas: int, *, durable: str, ack_wait: float,
                          max_deliver: int) -> float:
        """Create the work-queue stream ``name`` (WorkQueue retention: a message is gone once
        acknowledged) and its durable pull consumer ``durable``, shared by every host, if missing.
        The consumer's ack wait, in seconds (the first host's, when it existed already)."""
        from nats.js.api import (
            AckPolicy,
            ConsumerConfig,
            RetentionPolicy,
            StorageType,
            StreamConfig,
        )

        async def go() -> float:
            try:
                await self._settled(lambda: self._js.stream_info(name))
            except self._nats.js.errors.NotFoundError:
                config = StreamConfig(name=name, subjects=[subject], num_replicas=replicas,
                                      storage=StorageType.FILE, retention=RetentionPolicy.WORK_QUEUE,
                                      duplicate_window=120.0)
                try:
                    await self._settled(lambda: self._js.add_stream(config))
                except self._nats.js.errors.BadRequestError as exc:
                    if exc.err_code != _STREAM_NAME_IN_USE:
                        raise
            consumer = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait,
                                      max_deliver=max_deliver, filter_subject=subject, max_ack_pending=-1)
            try:
                info = await self._settled(lambda: self._js.consumer_info(name, durable))
            except self._nats.js.errors.NotFoundError:
                with contextlib.suppress(self._nats.js.errors.BadRequestError):  # another host created it
                    await self._settled(lambda: self._js.add_consumer(name, consumer))
                info = await self._settled(lambda: self._js.consumer_info(name, durable))
            sub = await self._settled(lambda: self._js.pull_subscribe_bind(durable, stream=name))
            self._work_subs[(name, durable)] = sub
            return float(info.config.ack_wait or ack_wait)

        return self._run(self._guard(f"opening work queue {name}", go()), 4 * self.timeout)

    def publish_work(self, subject: str, payload: bytes, *, msg_id: str) -> int:
        """Publish one work message; ``msg_id`` makes it once (JetStream drops a second message
        with the same id within the stream's duplicate window). Its sequence."""
        async def go() -> int:
            try:
                ack = await self._settled(lambda: self._js.publish(
                    subject, payload, headers={"Nats-Msg-Id": msg_id}, timeout=self.timeout / 4))
            except self._nats.js.errors.APIError as exc:
                if exc.err_code == _DUPLICATE_IN_PROCESS:
                    return 0  # another host publishes the same event right now: one message
                raise
            return int(ack.seq)

        return self._run(self._guard(f"publishing work to {subject}", go()), self.timeout + 2.0)

    def fetch_work(self, name: str, durable: str, batch: int, wait: float) -> list[WorkMessage]:
        """Up to ``batch`` work messages, waiting at most ``wait`` seconds for the first."""
        async def go() -> list[WorkMessage]:
            sub = self._work_subs[(name, durable)]
            try:
                msgs = await sub.fetch(batch, timeout=wait)
            except TimeoutError:
                return []  # nats-py raises its own or asyncio's when no message came in time
            out = []
            for m in msgs:
                self._work_ids += 1
                self._work_msgs[self._work_ids] = m
                md = m.metadata
                out.append(WorkMessage(self._work_ids, bytes(m.data or b""), int(md.num_delivered or 1),
                                       int(md.sequence.stream)))
            return out

        return self._run(self._guard(f"fetching work from {name}", go()), wait + self.timeout + 2.0)

    def work_reply(self, msg: WorkMessage, what: str, delay: float | None = None) -> None:
        """Answer a work message: ``ack`` (done: the queue drops it), ``nak`` (deliver it again,
        after ``delay``), ``progress`` (still at it: its AckWait starts again), ``term`` (never again)."""
        async def go() -> None:
            m = self._work_msgs.get(msg.token)
            if m is None:
                return  # answered already
            if what == "progress":
                await m.in_progress()
                return
            del self._work_msgs[msg.token]
            if what == "ack":
                await m.ack()
            elif what == "nak":
                await m.nak(delay=delay)
            else:
                await m.term()

        self._run(self._guard(f"answering work message {msg.seq}", go()))

    def work_state(self, name: str, durable: str) -> dict[str, int]:
        """What the queue holds: messages waiting, delivered and unacknowledged, redelivered."""
        async def go() -> dict[str, int]:
            info = await self._js.consumer_info(name, durable)
            return {"pending": int(info.num_pending or 0), "unacknowledged": int(info.num_ack_pending or 0),
                    "redelivered": int(info.num_redelivered or 0), "waiting_pulls": int(info.num_waiting or 0)}

        return self._run(self._guard(f"reading work queue {name}", go()))

    # ---------------------------------------------------------- subscriptions

    def follow(self, subject: str, start_seq: int, on_message: Callable[[LogMessage], None]) -> None:
        """Deliver every message of ``subject`` from ``start_seq`` on, in order, to ``on_message``.

        An ordered consumer: JetStream resends from the last sequence seen after any gap
        or reconnection, so nothing is skipped or repeated out of order.
        """
        from nats.js.api import DeliverPolicy

        async def handler(msg: Any) -> None:
            on_message(LogMessage(int(msg.metadata.sequence.stream), bytes(msg.data or b""),
                                  dict(msg.headers or {}), str(msg.subject)))

        async def go() -> None:
            sub = await self._settled(lambda: self._js.subscribe(
                subject, cb=handler, ordered_consumer=True, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                config=self._nats.js.api.ConsumerConfig(opt_start_seq=max(1, start_seq))))
            self._subs.append(sub)

        self._run(self._guard(f"following {subject}", go()))

    # ------------------------------------------------------------------ close

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def close(self) -> None:
        """Drain the connection and stop the loop thread (idempotent)."""
        if self._closed or self._closing:
            return
        self._closing = True

        async def go() -> None:
            with contextlib.suppress(Exception):  # closing: nothing left to report it to
                for sub in self._subs:
                    await sub.unsubscribe()
                await asyncio.wait_for(self._nc.close(), 2.0)
            # What nats-py leaves running (an ordered consumer's checks) ends with the loop.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(StoreError):
            self._run(go(), 5.0)
        self._stop_loop()
