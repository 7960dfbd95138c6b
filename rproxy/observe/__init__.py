"""
Observability: the access log pipeline, metrics, request ids, tracing and the status page.
"""
