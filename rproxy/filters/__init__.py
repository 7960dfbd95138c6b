"""
Edge policy: the filters a route's requests and responses go through, and how they are found.

L{rproxy.filters.chain} runs a route's filters in order.  The built-in kinds, one module each (auth,
rate limits, IP rules, CORS, header rules, compression), are plugins registered in
L{rproxy.plugins.filters}, found the way a third party's are (L{rproxy.filters.factory}).
"""
