"""
The built-in filters, registered as plugins so they are found like anyone else's.

Each L{FilterFactory} here is one C{type = NAME} of a C{[filters.X]} table; docs/filters.md lists them with their
options.  Each names its build function by module (L{builtBy}): finding the filter kinds (C{getPlugins},
C{--list-filters}) imports no filter, and a configuration imports only the kinds it uses.
"""

from __future__ import annotations

from rproxy.filters.factory import FilterFactory, builtBy

basicAuth = FilterFactory(
    "basic-auth",
    "HTTP Basic authentication against an htpasswd file (bcrypt, apr1, SHA, crypt)",
    builtBy("rproxy.filters.basicauth.buildBasicAuth"),
)
jwtAuth = FilterFactory(
    "jwt",
    "Bearer JWT verification (HS256, RS256, ES256, EdDSA; a key, a secret or a JWKS URL)",
    builtBy("rproxy.filters.bearer.buildBearerFilter"),
)
buffer = FilterFactory(
    "buffer",
    "reads whole request (and response) bodies before passing them on",
    builtBy("rproxy.filters.buffer.buildBuffer"),
)
compress = FilterFactory(
    "compress",
    "compresses responses with zstd, brotli or gzip, as the client accepts",
    builtBy("rproxy.filters.compress.buildCompress"),
)
cors = FilterFactory(
    "cors",
    "Cross-origin resource sharing: answers preflights, writes the Access-Control-* fields",
    builtBy("rproxy.filters.cors.buildCORS"),
)
forwardAuth = FilterFactory(
    "forward-auth",
    "ask an auth service about each request (nginx auth_request, Traefik ForwardAuth)",
    builtBy("rproxy.filters.forwardauth.buildForwardAuth"),
)
headerRules = FilterFactory(
    "headers",
    "Header rules: fields removed, set or added on requests and responses (errors too)",
    builtBy("rproxy.filters.headers.buildHeaderRules"),
)
ipRules = FilterFactory(
    "ip-rules",
    "Allow and deny lists of client networks (IPv4 and IPv6 CIDRs)",
    builtBy("rproxy.filters.iprules.buildIPRules"),
)
rateLimit = FilterFactory(
    "rate-limit",
    "token buckets per client, field, claim or route: 429 with Retry-After past the rate",
    builtBy("rproxy.filters.ratelimit.buildRateLimit"),
)
concurrencyLimit = FilterFactory(
    "concurrency-limit",
    "at most N requests in flight per client, field, claim or route",
    builtBy("rproxy.filters.ratelimit.buildConcurrencyLimit"),
)
sendfile = FilterFactory(
    "sendfile",
    "serves the file an upstream names with X-Accel-Redirect or X-Sendfile, with ranges",
    builtBy("rproxy.filters.sendfile.buildSendfile"),
)
upload = FilterFactory(
    "upload",
    "store request bodies (files of forms) and forward signed notes of them",
    builtBy("rproxy.filters.upload.buildUpload"),
)
