"""The upstream side: one contract every protocol implements, HTTP/1.1 and HTTP/2 connections, pools, TLS."""
