"""
Observability: one record per exchange (L{rproxy.observe.record}), and what is made of it: the access
log, metrics, request ids and tracing, the status page.
"""
