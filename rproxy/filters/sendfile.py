"""
The C{sendfile} filter: an upstream answers with ``X-Accel-Redirect`` (nginx's name) or ``X-Sendfile``
(Apache's, lighttpd's) and the proxy serves the file it names, in the response's place.

The application decides who may download what; the proxy streams the bytes, so the application's worker is
free at once.  ``X-Accel-Redirect`` carries a URI path that must start with one of C{roots}' prefixes (as
nginx's C{internal} locations): the rest of it, its escapes decoded, names a file under that prefix's
directory.  ``X-Sendfile`` carries a file system path that must lie in one of C{sendfile-roots}.  Everything
else is refused with a 502 (the upstream's fault) and a one-line reason, logged: a value outside the roots, a
C{..} segment, a symbolic link out of a root.  A missing file is a 404.

The file is served by L{rproxy.local.files.FileAnswer} as a static route would serve it: the client's
C{Range} and conditional fields are evaluated against the file.  The upstream's body is not read (its
connection is closed if a body was coming; an empty one goes back to its pool), and of its fields only
those that do not describe its own body pass (C{Content-Type} and C{Content-Disposition} do, and take
precedence; C{Content-Length}, C{ETag}, C{Last-Modified}, C{Content-Range}, C{Content-Encoding} and
``X-Accel-*`` do not).  The header never reaches the client.  It acts only on upstreams' responses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from zope.interface import implementer

from rproxy.errors import ProxyError, upstreamError
from rproxy.headers import isToken
from rproxy.interfaces import FilterEnvironment, IBodyTransform, ILocalAnswer, IResponseFilter
from rproxy.local.files import FileAnswer
from rproxy.local.paths import fileUnder, inside, shown
from rproxy.local.responder import Responder
from rproxy.options import PluginOptions
from rproxy.proxy.message import RequestContext

#: The upstream's fields that describe its own body, never sent with the file.
_BODY_FIELDS = frozenset(
    {b"content-length", b"content-range", b"etag", b"last-modified", b"accept-ranges", b"content-encoding"}
)


@implementer(ILocalAnswer)
class _Refusal:
    """The answer to a header naming a file the upstream may not name: the upstream's fault."""

    def __init__(self, error: ProxyError) -> None:
        self.error = error

    def serve(self, context: RequestContext, responder: Responder) -> None:
        raise self.error


@implementer(IResponseFilter)
class Sendfile:
    """
    Serve the file an upstream names (see the module).

    @ivar accelHeader: the lower-case name of the X-Accel-Redirect field (C{None}: not honoured).
    @ivar sendfileHeader: the lower-case name of the X-Sendfile field (C{None}: not honoured).
    @ivar roots: URI prefixes and the directories they stand for, the longest prefix first.
    @ivar sendfileRoots: the directories X-Sendfile paths may lie in (symbolic links resolved).
    """

    def __init__(
        self,
        accelHeader: bytes | None,
        sendfileHeader: bytes | None,
        roots: Sequence[tuple[bytes, str]],
        sendfileRoots: Sequence[str],
    ) -> None:
        self.accelHeader = accelHeader
        self.sendfileHeader = sendfileHeader
        self.roots = sorted(((prefix, os.path.realpath(d)) for prefix, d in roots), key=lambda r: -len(r[0]))
        self.sendfileRoots = tuple(os.path.realpath(directory) for directory in sendfileRoots)
        self._names = {name for name in (accelHeader, sendfileHeader) if name is not None}

    def onResponse(
        self, context: RequestContext, status: int, headers: list[tuple[bytes, bytes]]
    ) -> IBodyTransform | ILocalAnswer | None:
        if context.upstream is None or not any(name.lower() in self._names for name, _ in headers):
            return None
        named = {name.lower(): value for name, value in headers if name.lower() in self._names}
        kept = [
            (name, value)
            for name, value in headers
            if name.lower() not in _BODY_FIELDS
            and not name.lower().startswith(b"x-accel-")
            and name.lower() not in named
        ]
        headers[:] = kept
        try:
            if self.accelHeader in named:
                path, shownPath, roots = self._accel(named[self.accelHeader])  # type: ignore[index]
            else:
                path, shownPath, roots = self._sendfile(named[self.sendfileHeader])  # type: ignore[index]
        except ProxyError as error:
            return _Refusal(error)
        return FileAnswer(path, shownPath, kept, roots=roots)

    def _accel(self, value: bytes) -> tuple[str, bytes, tuple[str, ...]]:
        """
        The file an X-Accel-Redirect value names, how reasons show it, and the root it must lie in (checked
        again on the opened file: L{rproxy.local.paths.openFile}).
        """
        uri = value.strip().partition(b"?")[0]
        for prefix, directory in self.roots:
            if uri.startswith(prefix):
                rest = b"/" + uri[len(prefix) :].lstrip(b"/")
                try:
                    return fileUnder(directory, rest), uri, (directory,)
                except ProxyError as e:
                    raise _refused("X-Accel-Redirect", uri, e.reason) from None
        raise _refused("X-Accel-Redirect", uri, "outside the allowed locations")

    def _sendfile(self, value: bytes) -> tuple[str, bytes, tuple[str, ...]]:
        """The file an X-Sendfile value names, how reasons show it, and the roots it must lie in."""
        path = value.strip()
        if b"\x00" in path or not path.startswith(b"/"):
            raise _refused("X-Sendfile", path, "not an absolute path")
        resolved = os.path.realpath(os.fsdecode(path))
        for root in self.sendfileRoots:
            if inside(resolved, root):
                return resolved, os.path.basename(path), self.sendfileRoots  # reasons show no upstream directory
        raise _refused("X-Sendfile", path, "outside the allowed directories")


def _refused(kind: str, value: bytes, why: str) -> ProxyError:
    return upstreamError(502, f"the upstream's {kind} {shown(value)!r} is refused: {why}", "http_response_header")


def _header(options: PluginOptions, name: str, default: str) -> bytes | None:
    value = options.text(name, default) or ""
    if value and not isToken(value.encode("ascii", "replace")):
        raise options.error(name, f"not a field name: {value!r}")
    return value.lower().encode("ascii") or None


def _directory(options: PluginOptions, name: str, directory: object, base: str) -> str:
    if not isinstance(directory, str) or not os.path.isdir(os.path.join(base, directory)):
        raise options.error(name, f"no directory {directory!r}")
    return os.path.join(base, directory)


def buildSendfile(options: PluginOptions, environment: FilterEnvironment) -> Sendfile:
    """A L{Sendfile} from the options of a C{[filters.X]} table with C{type = "sendfile"}."""
    accel = _header(options, "accel-header", "X-Accel-Redirect")
    sendfile = _header(options, "sendfile-header", "X-Sendfile")
    roots = []
    for prefix, directory in options.table("roots").items():
        if not prefix.startswith("/") or not prefix.isascii():
            raise options.error("roots", f"a location is a path from '/', not {prefix!r}")
        roots.append((prefix.encode("ascii"), _directory(options, "roots", directory, environment.base)))
    sendfileRoots = [
        _directory(options, "sendfile-roots", d, environment.base) for d in options.strings("sendfile-roots")
    ]
    if not (roots and accel) and not (sendfileRoots and sendfile):
        raise options.error("roots", "give roots (for X-Accel-Redirect) or sendfile-roots (for X-Sendfile)")
    return Sendfile(accel, sendfile, roots, sendfileRoots)
