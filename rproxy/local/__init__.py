"""
The smart proxy's local serving: routes answered in the proxy itself, and responses an upstream hands back to
it to serve (``X-Sendfile``, ``X-Accel-Redirect``).

The seam is L{rproxy.interfaces.ILocalAnswer}.  A local route is a route to a L{rproxy.proxy.service.Service}
whose C{local} is such an answer (L{target}): the exchange runs the director and the route's filters as for
any service (authentication, rate limits and CORS apply, the access log and metrics name the route), then,
instead of picking an upstream, gives the answer a L{responder.Responder}, through which its head passes
the response filters before it reaches the client, HTTP/1.1 or HTTP/2 alike.  A response filter replaces an
upstream's response the same way: it returns an answer from C{onResponse} (L{rproxy.filters.sendfile}).

One file per concern: L{responder} (what an answer speaks to), L{paths} (a request path to a file under a
root, refusing traversal), L{files} (one file with ranges and conditional requests, streamed by a producer),
L{static} (a directory), L{handlers} (a twisted.web resource or an C{async def} named by a dotted path),
L{canned} (a fixed response), L{target} (the C{local} table of a route).
"""
