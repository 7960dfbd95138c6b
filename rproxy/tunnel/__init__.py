"""Connections spliced after a protocol switch: HTTP/1.1 Upgrade, WebSocket over HTTP/2, WebSocket messages."""
