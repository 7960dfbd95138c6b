"""The client side: HTTP/1.1 and HTTP/2 server protocols, the request, its body, TLS listeners."""
