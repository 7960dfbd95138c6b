"""What a client may send and how long it may take: the limits of every client connection, both protocols."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientLimits:
    """
    What a client may send and how long it may take (bytes, counts, seconds).

    @ivar maxRequestLine: longest request line (longer: 414).
    @ivar maxHeaderBytes: largest header section, request line included (larger: 431).
    @ivar maxHeaders: most header fields (more: 431).
    @ivar maxBodySize: largest request body, 0 for no limit (larger: 413, enforced while streaming).
    @ivar headerTimeout: how long the request head may take to arrive (slower: 408).
    @ivar idleTimeout: how long an idle keep-alive connection is kept.
    @ivar maxConnections: client connections at once, per listener group (more: 503 and close).
    @ivar h2MaxConcurrentStreams: HTTP/2 streams a client may have open at once
        (C{SETTINGS_MAX_CONCURRENT_STREAMS}; a client that opens more gets GOAWAY).
    @ivar h2MaxHeaderListSize: largest HTTP/2 header list, as RFC 9113 counts it
        (C{SETTINGS_MAX_HEADER_LIST_SIZE}; a larger one gets GOAWAY).
    @ivar h2ResetBurst: HTTP/2 streams a client may reset in a burst (Rapid Reset, CVE-2023-44487) ...
    @ivar h2ResetRate: ... and per second after it; beyond, GOAWAY(ENHANCE_YOUR_CALM) and close.
    """

    maxRequestLine: int = 8192
    maxHeaderBytes: int = 32768
    maxHeaders: int = 100
    maxBodySize: int = 0
    headerTimeout: float = 10.0
    idleTimeout: float = 60.0
    maxConnections: int = 10000
    h2MaxConcurrentStreams: int = 100
    h2MaxHeaderListSize: int = 65536
    h2ResetBurst: int = 200
    h2ResetRate: int = 33
