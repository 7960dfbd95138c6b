"""
A static directory served by a local route: L{StaticDirectory}.

Written here rather than built on C{twisted.web.static.File}: that class sends no C{ETag}, lists directories
unless told not to, answers with its own HTML error pages rather than the proxy's one-line reasons, and
writes through a pull producer, which rproxy's HTTP/2 streams do not take.  The request's path below the
route's prefix names a file under the root (L{rproxy.local.paths} refuses every way out of it); the file is
served by L{rproxy.local.files.FileAnswer} (ranges, conditional requests, streaming).  A directory is
answered with its first index file, else its listing when listing is on, else 403; a directory's path
without its final slash is redirected (301) to the path with it, as a browser needs it for relative links.
"""

from __future__ import annotations

import html
import os
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from rproxy.errors import ProxyError, clientError
from rproxy.interfaces import ILocalAnswer
from rproxy.local.files import FileAnswer, checkMethod
from rproxy.local.paths import joinUnder, notFound, openFile, shown
from rproxy.proxy.message import LocalResponse

if TYPE_CHECKING:
    from rproxy.local.responder import Responder
    from rproxy.proxy.message import RequestContext


@implementer(ILocalAnswer)
class StaticDirectory:
    """
    The files under a directory (see the module).

    @ivar root: the directory, absolute, its symbolic links resolved.
    @ivar index: the names of a directory's index files, tried in order.
    @ivar listing: whether a directory without an index file is listed.
    @ivar hidden: whether names starting with C{.} are served.
    @ivar fields: fields sent with every file (C{Cache-Control}).
    """

    def __init__(
        self,
        root: str,
        index: Sequence[str] = ("index.html",),
        listing: bool = False,
        hidden: bool = False,
        fields: Sequence[tuple[bytes, bytes]] = (),
        reactor: IReactorTime | None = None,
    ) -> None:
        self.root = os.path.realpath(root)
        self.index = tuple(index)
        self.listing = listing
        self.hidden = hidden
        self.fields = tuple(fields)
        self._reactor = reactor

    def __repr__(self) -> str:
        return f"<StaticDirectory {self.root!r}>"

    def serve(self, context: RequestContext, responder: Responder) -> None:
        checkMethod(context)
        path = context.outbound.target.partition(b"?")[0]
        if not path.startswith(b"/"):
            raise clientError(400, f"the target {shown(path)!r} is not a path")
        name = joinUnder(self.root, path, self.hidden)
        fd, status = openFile(name, path, (self.root,))
        if stat.S_ISDIR(status.st_mode):
            os.close(fd)
            if not path.endswith(b"/"):
                self._redirect(context, responder)
                return
            directory = name
            for index in self.index:
                name = os.path.join(directory, index)
                try:
                    fd, status = openFile(name, path, (self.root,))
                except ProxyError:
                    continue
                if stat.S_ISREG(status.st_mode):
                    break
                os.close(fd)
            else:
                if not self.listing:
                    raise clientError(403, f"the directory at {shown(path)!r} has no index file and is not listed")
                responder.answer(self._listing(directory, path))
                return
        FileAnswer(name, path, self.fields, self._reactor).serveOpen(fd, status, context, responder)

    def _redirect(self, context: RequestContext, responder: Responder) -> None:
        """Send the client to the directory's path with a final slash (never to another host: one leading slash)."""
        path, question, query = context.inbound.target.partition(b"?")
        location = b"/" + path.lstrip(b"/") + b"/" + question + query
        responder.answer(LocalResponse(301, [(b"Location", location), (b"Content-Type", b"text/plain")], b""))

    def _listing(self, directory: str, path: bytes) -> LocalResponse:
        """An HTML page linking the entries of C{directory} (hidden ones only when they are served)."""
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as e:
            raise notFound(path, e) from None
        title = html.escape(path.decode("utf-8", "replace"))
        rows = []
        for entry in entries:
            if entry.name.startswith(".") and not self.hidden:
                continue
            name = entry.name + ("/" if entry.is_dir() else "")
            href = quote(os.fsencode(entry.name)) + ("/" if entry.is_dir() else "")
            rows.append(f'<li><a href="{html.escape(href)}">{html.escape(name)}</a></li>')
        page = f"<!DOCTYPE html>\n<title>{title}</title>\n<h1>{title}</h1>\n<ul>\n" + "\n".join(rows) + "\n</ul>\n"
        return LocalResponse(200, [(b"Content-Type", b"text/html; charset=utf-8")], page.encode("utf-8"))
