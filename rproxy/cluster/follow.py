"""
Following a prefix of etcd: read it, then watch it from the revision read, and again after every end.

L{PrefixFollower} hands its owner what etcd holds under the prefix (its C{snapshot} callback) each time it
has read it, and each change after (its C{changed} callback).  When the watch ends (etcd stopped, the
connection lost, the revision compacted away) it reads the prefix again, backing off while etcd does not
answer; while it streams, a probe every few seconds ends a watch that a connection dead without a word holds.
The registrations (L{rproxy.cluster.registrations}) and the configuration document
(L{rproxy.cluster.document}) follow etcd this way.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from rproxy.cluster.etcd import EtcdClient, EtcdError, Event, KeyValue, Watch

_log = Logger()

#: The first and the longest wait before reading etcd again after it did not answer, in seconds.
FIRST_RETRY, LONGEST_RETRY = 0.1, 5.0

#: Seconds between two probes of etcd while a watch streams.
PROBE_INTERVAL = 2.0


class PrefixFollower:
    """
    The keys under C{prefix} in etcd, followed for as long as it runs.

    @ivar read: whether the prefix has been read once.
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: bytes,
        reactor: IReactorTime,
        snapshot: Callable[[list[KeyValue]], object],
        changed: Callable[[list[Event]], object],
        what: str,
    ) -> None:
        """
        @param snapshot: called with every key under C{prefix} each time it was read.
        @param changed: called with each batch of changes the watch streams, in order.
        @param what: what is followed, for the log.
        """
        self.read = False
        self._client = client
        self._prefix = prefix
        self._reactor = reactor
        self._snapshot = snapshot
        self._changed = changed
        self._what = what
        self._running = False
        self._watch: Watch | None = None
        self._probe = LoopingCall(self._probeOnce)
        self._probe.clock = reactor
        self._loop: Deferred[None] | None = None
        self._sleeping: Deferred[None] | None = None

    def pending(self) -> list[str]:
        """Why the owner should not take requests yet: the prefix not read once (none otherwise)."""
        return [] if self.read else [f"{self._what} in etcd are not read yet"]

    def start(self) -> None:
        """Read the prefix, then follow it until L{stop}."""
        self._running = True
        self._loop = Deferred.fromCoroutine(self._run())
        self._probe.start(PROBE_INTERVAL, now=False)

    def stop(self) -> Deferred[None]:
        """Stop following; fires when the watch has ended."""
        self._running = False
        if self._probe.running:
            self._probe.stop()
        if self._watch is not None:
            self._watch.stop()
        if self._sleeping is not None:
            self._sleeping.cancel()  # etcd out of reach: stopping does not wait for the next try
        loop, self._loop = self._loop, None
        return succeed(None) if loop is None else loop

    async def _run(self) -> None:
        wait = FIRST_RETRY
        while self._running:
            try:
                revision, kvs = await self._client.range(self._prefix)
                if self._running:
                    self._snapshot(kvs)
            except Exception as e:  # never ends the loop: etcd may come back, and a bug be one key's
                if not isinstance(e, EtcdError):
                    _log.failure("etcd: reading {what} failed", what=self._what)
                if not self._running:  # stopped during the call: no back-off for stop() to wait out
                    return
                self._sleeping = deferLater(self._reactor, wait, lambda: None)  # type: ignore[arg-type]
                try:
                    await self._sleeping
                except CancelledError:  # stopped
                    return
                finally:
                    self._sleeping = None
                wait = min(wait * 2, LONGEST_RETRY)
                continue
            wait = FIRST_RETRY
            if not self._running:
                return
            self.read = True
            self._watch = self._client.watch(self._prefix, revision + 1, self._changed)
            why = await self._watch.ended
            self._watch = None
            if self._running:
                _log.info("etcd: the watch of {what} ended ({why}): reading them again", what=self._what, why=why)

    def _probeOnce(self) -> None:
        watch = self._watch
        if watch is None:
            return

        def unanswered(failure: object) -> None:
            if self._watch is watch:
                watch.stop()

        self._client.get(self._prefix).addErrback(unanswered)
