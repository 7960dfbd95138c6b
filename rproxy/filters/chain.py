"""
A route's filters in order, and one exchange's way through them (L{FilterChain}, L{ChainRun}).

Request filters run in the chain's order once the route is chosen, before an upstream is; the first that
answers ends the way in.  Response filters run in the reverse order (an onion, as Envoy's encoder filters),
and only those whose request side ran: a filter never sees a response to a request it did not let through,
or an answer of a filter that ran before it.  A filter that fails unexpectedly is the proxy's 500, logged
with its name; it never lets the request through.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.errors import ProxyError, proxyError
from rproxy.interfaces import IBodyTransform, ILocalAnswer, IRequestFilter, IResponseFilter
from rproxy.proxy.message import FilterVerdict, LocalResponse, RequestContext

_log = Logger()


class FilterChain:
    """
    Named filters in the order they run; each provides L{IRequestFilter}, L{IResponseFilter} or both.

    @ivar names: the filters' names, for logs and errors.
    @ivar consumes: the request fields any of its request filters consumes (removed before they run, with
        the fields a client spells with C{_} for C{-}: see L{isConsumed}).
    """

    def __init__(self, filters: Iterable[tuple[str, object]] = ()) -> None:
        named = tuple(filters)
        self.names = tuple(name for name, _ in named)
        self._filters = tuple(each for _, each in named)
        for name, each in named:
            if not (IRequestFilter.providedBy(each) or IResponseFilter.providedBy(each)):
                raise TypeError(f"filter {name!r} provides neither IRequestFilter nor IResponseFilter: {each!r}")
        self._request = tuple(
            (i, IRequestFilter(each)) for i, each in enumerate(self._filters) if IRequestFilter.providedBy(each)
        )
        self._response = tuple(
            (i, IResponseFilter(each)) for i, each in enumerate(self._filters) if IResponseFilter.providedBy(each)
        )
        self.consumes = tuple(
            {name.lower(): None for _, each in self._request for name in getattr(each, "consumes", ()) or ()}
        )
        self._consumed = frozenset(self.consumes)
        # Only a name with a hyphen has another spelling (X_Auth_User for X-Auth-User) to look for.
        self._aliased = any(b"-" in name for name in self.consumes)

    def __bool__(self) -> bool:
        return bool(self._filters)

    def __len__(self) -> int:
        return len(self._filters)

    def __iter__(self) -> Iterator[tuple[str, object]]:
        return iter(zip(self.names, self._filters, strict=True))

    def __repr__(self) -> str:
        return f"<FilterChain {list(self.names)}>"

    def isConsumed(self, name: bytes) -> bool:
        """
        Whether a field named C{name} (in any case) is one the chain consumes, or is spelled with C{_} for C{-}
        as one: CGI, WSGI, PHP and some servers (Puma before 6.4.2) read C{X_Auth_User} as C{X-Auth-User}, so
        a client's C{X_Auth_User} would stand for the field a filter sets from what it verified.
        """
        lowered = name.lower()
        return lowered in self._consumed or (self._aliased and lowered.replace(b"_", b"-") in self._consumed)

    def start(self, context: RequestContext) -> ChainRun:
        """The way of one exchange, with C{context}, through this chain."""
        return ChainRun(self, context)


#: The chain of routes and services without filters.
NO_FILTERS = FilterChain()


class ChainRun:
    """
    One exchange's way through a L{FilterChain}: its request filters, then its response filters.

    @ivar context: what the filters see and share.
    @ivar replacement: what a response filter answered instead of the upstream's response, if one did.
    """

    replacement: ILocalAnswer | None = None
    _waiting: Deferred[FilterVerdict] | None = None
    _cancelled = False

    def __init__(self, chain: FilterChain, context: RequestContext) -> None:
        self.chain = chain
        self.context = context
        self._next = 0  # index into chain._request of the next request filter
        self._reached = 0  # the filters before this index let the request through (or have no request side)

    def request(self, decided: Callable[[FilterVerdict], None]) -> None:
        """
        Run the request filters (waiting for those that need I/O), then call C{decided} once, with C{None}
        when every filter let the request through, or with the answer of the one that did not.  The fields
        the chain's filters consume (and their C{_} spellings, L{FilterChain.isConsumed}) are removed from the
        outbound request before the first one runs: what the client sent of them never reaches the upstream,
        and filters (which read them inbound) may set them on purpose.
        """
        filters = self.chain._request
        if self._next == 0 and self.chain.consumes:
            self._removeConsumed()
        while self._next < len(filters):
            index, each = filters[self._next]
            self._next += 1
            self._reached = index
            try:
                verdict = each.onRequest(self.context)
            except Exception:
                decided(self._failed(Failure(), index))
                return
            if isinstance(verdict, Deferred) or inspect.isawaitable(verdict):
                waiting = self._waiting = ensureDeferred(verdict)  # type: ignore[arg-type]
                waiting.addCallbacks(self._resumed, self._failed, errbackArgs=(index,))
                waiting.addCallback(self._continue, decided)
                return
            if verdict is not None:
                decided(verdict)
                return
        self._reached = len(self.chain.names)
        decided(None)

    def _resumed(self, verdict: FilterVerdict) -> FilterVerdict:
        self._waiting = None
        return verdict

    def _continue(self, verdict: FilterVerdict, decided: Callable[[FilterVerdict], None]) -> None:
        if self._cancelled:
            return
        if verdict is not None:
            decided(verdict)
        else:
            self.request(decided)

    def _failed(self, failure: Failure, index: int) -> FilterVerdict:
        self._waiting = None
        if self._cancelled and failure.check(CancelledError):
            return None  # the client left: nothing will be answered
        if isinstance(failure.value, ProxyError):
            return failure.value
        name = self.chain.names[index]
        _log.failure("filter {name} failed on {target}", failure, name=name, target=self._target())
        return proxyError(500, f"filter {name!r} failed: {failure.getErrorMessage()[:200]}", "proxy_internal_error")

    def cancel(self) -> None:
        """The client is gone: stop waiting for a filter."""
        self._cancelled = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()

    def _removeConsumed(self) -> None:
        chain = self.chain
        inbound = self.context.inbound.headers
        present = [name for name in chain.consumes if inbound.hasHeader(name)]
        if chain._aliased:
            present += [
                lowered
                for name, _ in inbound.getAllRawHeaders()
                if b"_" in name and chain.isConsumed(lowered := name.lower())
            ]
        if present:
            self.context.outbound.removeFields(present)

    def response(self, status: int, headers: list[tuple[bytes, bytes]]) -> IBodyTransform | None:
        """
        Run the response filters of the filters whose request side ran, last first, on C{headers} (changed
        in place); return the transform the body must go through, if any filter rewrites it.  A filter that
        answers in the response's place (L{ILocalAnswer}) ends the run: its answer is L{replacement}, and
        from then on only the filters before it see a response.
        """
        transforms = []
        for index, each in reversed(self.chain._response):
            if index >= self._reached:
                continue
            transform = each.onResponse(self.context, status, headers)
            if ILocalAnswer.providedBy(transform):
                self.replacement, self._reached = transform, index
                return None
            if transform is not None:
                transforms.append(transform)
        if not transforms:
            return None
        return transforms[0] if len(transforms) == 1 else _Composed(transforms)

    def localAnswer(self, response: LocalResponse) -> LocalResponse:
        """
        C{response} (a filter's answer) as the response filters before the one that gave it leave it: they
        see its length in C{Content-Length} (the proxy frames the body it sends itself).
        """
        if not any(name.lower() == b"content-length" for name, _ in response.headers):
            response.headers.append((b"Content-Length", b"%d" % len(response.body)))
        transform = self.response(response.status, response.headers)
        if transform is not None:
            response.body = transform.transform(response.body) + transform.finish()
        return response

    def errorFields(self, error: ProxyError) -> None:
        """
        Let the response filters add to C{error}'s own fields (a new list: a filter may answer with one error
        object every time); the fields every error has, and its body, are the proxy's.
        """
        error.headers = list(error.headers)
        self.response(error.status, error.headers)

    def _target(self) -> str:
        return self.context.inbound.target[:200].decode("latin-1")


@implementer(IBodyTransform)
class _Composed:
    """Body transforms applied one after the other (the innermost filter's first)."""

    def __init__(self, transforms: Sequence[IBodyTransform]) -> None:
        self._transforms = transforms

    def transform(self, data: bytes) -> bytes:
        for each in self._transforms:
            if not data:
                break
            data = each.transform(data)
        return data

    def finish(self) -> bytes:
        data = b""
        for each in self._transforms:
            data = (each.transform(data) if data else b"") + each.finish()
        return data
