"""
A request's path to a file under a root directory, refusing every way out of the root.

The path is the raw request path (no query).  It is refused, before any file system call, when it holds a NUL
byte, a backslash or an encoded slash (C{%2F}, C{%5C}: a segment that names two), or, once its escapes are
decoded, a C{..} segment; hidden names (a segment starting with C{.}) are refused unless allowed.  Then the
file is refused if it lies outside the root once its symbolic links are resolved (a link pointing outside):
L{openFile} asks the descriptor it opened where the file is (one system call, and no race with a link
swapped in after a check), L{fileUnder} resolves the path before.  Reasons name the request's path, never
the file system's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

from rproxy.errors import ProxyError, clientError


def shown(path: bytes) -> str:
    """C{path} as a reason shows it (at most 200 bytes)."""
    return path[:200].decode("latin-1")


def joinUnder(root: str, path: bytes, hidden: bool = False) -> str:
    """
    The file system path of what the request path C{path} names under C{root}, its symbolic links not yet
    resolved (L{openFile} checks where the file it opens lies; L{fileUnder} resolves them first).

    @param root: an absolute directory with its symbolic links resolved (C{os.path.realpath}).
    @param path: the raw request path, relative to the root, from C{/}.
    @param hidden: whether names starting with C{.} may be served.
    @raise ProxyError: 400 for a path that tries to leave the root or is malformed, 404 for a hidden name.
    """
    lowered = path.lower()
    if b"\x00" in path or b"%00" in lowered:
        raise clientError(400, f"the path {shown(path)!r} has a NUL byte")
    if b"\\" in path or b"%2f" in lowered or b"%5c" in lowered:
        raise clientError(400, f"the path {shown(path)!r} has a backslash or an encoded slash")
    segments = unquote_to_bytes(path).split(b"/") if b"%" in path else path.split(b"/")
    if b".." in segments:
        raise clientError(400, f"the path {shown(path)!r} has a '..' segment")
    if not hidden and any(segment[:1] == b"." and segment != b"." for segment in segments):
        raise clientError(404, f"the path {shown(path)!r} names a hidden file")
    return os.path.join(root, os.fsdecode(b"/".join(segment for segment in segments if segment not in (b"", b"."))))


def inside(path: str, root: str) -> bool:
    """Whether C{path} is C{root} or lies below it (both absolute, resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def fileUnder(root: str, path: bytes, hidden: bool = False) -> str:
    """
    L{joinUnder}, with its symbolic links resolved: 403 if that leads out of C{root}.

    @raise ProxyError: as L{joinUnder} does, and 403 for a symbolic link out of the root.
    """
    resolved = os.path.realpath(joinUnder(root, path, hidden))
    if not inside(resolved, root):
        raise clientError(403, f"the path {shown(path)!r} leads out of the served directory")
    return resolved


def openFile(name: str, shownPath: bytes, roots: Sequence[str] = ()) -> tuple[int, os.stat_result]:
    """
    Open C{name} for reading and C{fstat} it; with C{roots}, the file opened must lie in one of them.

    Where it lies is read from the open descriptor (C{/proc/self/fd}), so that no symbolic link swapped in
    between a check and the open can lead out; without C{/proc}, from C{os.path.realpath}.  The caller
    closes the descriptor.

    @param shownPath: what reasons call the file (the request's path).
    @raise ProxyError: 404 (no such file), 403 (not readable, or out of the roots).
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise notFound(shownPath, e) from None
    try:
        if roots:
            try:
                where = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                where = os.path.realpath(name)
            if not any(inside(where, root) for root in roots):
                raise clientError(403, f"the path {shown(shownPath)!r} leads out of the served directory")
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def notFound(path: bytes, error: OSError) -> ProxyError:
    """The client's error for a file at C{path} that could not be opened with C{error}."""
    if isinstance(error, PermissionError):
        return clientError(403, f"the file at {shown(path)!r} may not be read")
    return clientError(404, f"no file at {shown(path)!r}")
