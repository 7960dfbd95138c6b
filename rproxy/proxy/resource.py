"""
L{ReverseProxyResource}: the proxy as a twisted.web resource, and the tree the command line builds.

It subclasses C{twisted.web.proxy.ReverseProxyResource} and takes the same constructor, so an existing
Twisted site switches by changing one import; none of the stock behaviour is kept (the stock class
buffers bodies, speaks HTTP/1.0 with a connection per request and leaks hop-by-hop fields).  It is a
leaf: everything below its mount point is forwarded, the path byte-exact.
"""

from __future__ import annotations

import warnings
from typing import Any

from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from rproxy.downstream.body import RequestBodyPipe, fileBody
from rproxy.downstream.request import ProxyRequest
from rproxy.downstream.webrequest import WebRequestDownstream
from rproxy.interfaces import IStreamingResource
from rproxy.proxy.balancers import RoundRobin
from rproxy.proxy.directors import SingleServiceDirector
from rproxy.proxy.exchange import Proxy
from rproxy.proxy.registry import MemoryRegistry
from rproxy.proxy.service import Service
from rproxy.upstream.settings import PoolSettings
from rproxy.upstream.upstreams import Upstream

with warnings.catch_warnings():
    # Importing twisted.web.proxy warns because its HTTPClient is deprecated; we use none of it.
    warnings.simplefilter("ignore", DeprecationWarning)
    from twisted.web import proxy as _stockProxy


@implementer(IStreamingResource)
class ReverseProxyResource(_stockProxy.ReverseProxyResource):
    """
    Forward every request below this resource to upstreams, streaming both ways.

    C{ReverseProxyResource(host, port, path)} proxies to C{http://host:port} with C{path} as base path,
    like the stock class; L{fromProxy} mounts a fully configured L{Proxy} (routing, balancing).
    """

    isLeaf = True
    proxy: Proxy

    def __init__(self, host: str, port: int, path: bytes, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        super().__init__(host, port, path, reactor)
        authority = f"[{host}]" if ":" in host else host
        base = path.decode("ascii") if isinstance(path, bytes) else path
        upstream = Upstream.fromURL(f"http://{authority}:{port}{base}", reactor, PoolSettings())
        registry = MemoryRegistry()
        registry.add("default", upstream)
        self.proxy = Proxy(reactor, SingleServiceDirector(Service("default", registry, RoundRobin())))

    @classmethod
    def fromProxy(cls, proxy: Proxy) -> ReverseProxyResource:
        """A resource forwarding through an already configured L{Proxy}."""
        resource = cls.__new__(cls)
        resource.children = {}
        resource.reactor = proxy.reactor
        resource.proxy = proxy
        return resource

    def getChild(self, path: bytes, request: http.Request) -> IResource:
        return self  # a leaf: never reached, but the stock class's version would lose this subclass

    def renderStreaming(self, request: ProxyRequest) -> None:
        """Start proxying while the body is still arriving (the L{ProxyRequest} path)."""
        self.proxy.handle(request, _target(request))

    def render(self, request: http.Request) -> int:
        """Proxy a request whose body Twisted already buffered (a plain C{twisted.web} site)."""
        body: RequestBodyPipe | None = None
        content = request.content
        assert content is not None
        size = content.seek(0, 2)
        content.seek(0)
        if size or request.getHeader(b"content-length") is not None or request.getHeader(b"transfer-encoding"):
            body = fileBody(content, size)
        self.proxy.handle(WebRequestDownstream(request, body), _target(request))
        return NOT_DONE_YET


def _target(request: http.Request) -> bytes:
    """The raw request-target below the resource's mount point (no unquoting, no cleaning)."""
    uri: bytes = request.uri
    consumed = len(getattr(request, "prepath", None) or ())
    if not consumed:
        return uri
    path, sep, query = uri.partition(b"?")
    rest = path.split(b"/", consumed + 1)
    remainder = b"/" + rest[consumed + 1] if len(rest) > consumed + 1 else b""
    return remainder + sep + query


def buildResource(proxy: Proxy) -> IResource:
    """The resource tree of a proxy listener: everything is forwarded."""
    return ReverseProxyResource.fromProxy(proxy)
