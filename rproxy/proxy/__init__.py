"""The middle: one exchange per request, the request as directors and filters see it, routing, balancing."""
