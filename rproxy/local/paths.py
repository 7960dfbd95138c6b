"""
A request's path to a file under a root directory, refusing every way out of the root.

The path is the raw request path (no query).  It is refused, before any file system call, when it holds a NUL
byte, a backslash or an encoded slash (C{%2F}, C{%5C}: a segment that names two), or, once its escapes are
decoded, a C{..} segment; hidden names (a segment starting with C{.}) are refused unless allowed.  Then the
path is resolved with its symbolic links, and refused if that leaves the root (a link pointing outside).
Reasons name the request's path, never the file system's.
"""

from __future__ import annotations

import os
from urllib.parse import unquote_to_bytes

from rproxy.errors import ProxyError, clientError


def shown(path: bytes) -> str:
    """C{path} as a reason shows it (at most 200 bytes)."""
    return path[:200].decode("latin-1")


def fileUnder(root: str, path: bytes, hidden: bool = False) -> str:
    """
    The file system path of what the request path C{path} names under C{root}.

    @param root: an absolute directory with its symbolic links resolved (C{os.path.realpath}).
    @param path: the raw request path, relative to the root, from C{/}.
    @param hidden: whether names starting with C{.} may be served.
    @raise ProxyError: 400 for a path that tries to leave the root or is malformed, 404 for a hidden name,
        403 for a symbolic link that leads out of the root.
    """
    lowered = path.lower()
    if b"\x00" in path or b"%00" in lowered:
        raise clientError(400, f"the path {shown(path)!r} has a NUL byte")
    if b"\\" in path or b"%2f" in lowered or b"%5c" in lowered:
        raise clientError(400, f"the path {shown(path)!r} has a backslash or an encoded slash")
    segments = unquote_to_bytes(path).split(b"/")
    if b".." in segments:
        raise clientError(400, f"the path {shown(path)!r} has a '..' segment")
    if not hidden and any(segment[:1] == b"." and segment != b"." for segment in segments):
        raise clientError(404, f"the path {shown(path)!r} names a hidden file")
    relative = os.fsdecode(b"/".join(segment for segment in segments if segment not in (b"", b".")))
    resolved = os.path.realpath(os.path.join(root, relative))
    if resolved != root and not resolved.startswith(root.rstrip(os.sep) + os.sep):
        raise clientError(403, f"the path {shown(path)!r} leads out of the served directory")
    return resolved


def notFound(path: bytes, error: OSError) -> ProxyError:
    """The client's error for a file at C{path} that could not be opened with C{error}."""
    if isinstance(error, PermissionError):
        return clientError(403, f"the file at {shown(path)!r} may not be read")
    return clientError(404, f"no file at {shown(path)!r}")
