"""
What rproxy's HTTP/2 server sees of a client's frames besides h2's events: where frames begin and end,
and which error code a broken one earns.

h2 buffers a frame until all of it has arrived, and a header block until its last CONTINUATION, without
saying so: a client that sends them a byte at a time would hold a connection open for ever while looking
busy.  L{FrameWatch} follows the 9-byte frame headers of the byte stream (it reads nothing else), so the
connection knows when something other than request body data is incomplete, and can give it the same
deadline as an HTTP/1.1 request head.

h2 ends a connection with PROTOCOL_ERROR for some errors that RFC 9113 and RFC 7541 give another code:
a field block that cannot be decoded is a COMPRESSION_ERROR (RFC 9113 section 4.3), and a SETTINGS
acknowledgement with a payload a FRAME_SIZE_ERROR (section 6.5).  L{connectionErrorCode} says which
code an error earns, and L{withGoAwayCode} puts it in the GOAWAY frame h2 has already queued.
"""

from __future__ import annotations

import h2.exceptions
import hpack.exceptions
import hyperframe.exceptions
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

#: Frame types and flags this watch tells apart (RFC 9113 section 6).
_DATA, _HEADERS, _SETTINGS, _CONTINUATION = 0x0, 0x1, 0x4, 0x9
_END_HEADERS = 0x4
_ACK = _END_STREAM = 0x1

#: CONTINUATION frames a header block may have: a block of the largest allowed size needs a handful; more is
#: the CONTINUATION flood of CVE-2024-27316, refused before h2 buffers the frames.
MAX_CONTINUATIONS = 32
#: DATA frames that carry nothing and end nothing a connection may send: no client needs them, and a flood of
#: them costs the proxy a frame's work each for nothing (the empty frames flood of CVE-2019-9518).
MAX_EMPTY_DATA = 1000

#: What opens a client's byte stream before its first frame (RFC 9113 section 3.4).
PREFACE_LENGTH = 24

#: The size of a GOAWAY frame without debug data.
_GOAWAY_SIZE = 17


class FrameWatch:
    """
    Follows the frame boundaries of a client's byte stream, from its connection preface on.

    @ivar pending: whether something other than DATA is incomplete: the preface, a frame other than
        DATA, or a header block still waiting for its last CONTINUATION.
    @ivar started: how many such things have begun: it changes when a new one begins, so that a deadline
        runs from the first byte of each (a header block's CONTINUATION frames are part of its HEADERS).
    @ivar settingsAckWithPayload: whether a SETTINGS acknowledgement with a payload was seen.
    @ivar flood: what makes the frames so far a flood (more than L{MAX_CONTINUATIONS} CONTINUATION frames in
        a header block, more than L{MAX_EMPTY_DATA} empty DATA frames), or C{None}.
    """

    def __init__(self) -> None:
        self._remaining = PREFACE_LENGTH  # payload bytes of the current frame (or preface) still to come
        self._header = b""  # the part of a frame header that has arrived
        self._inData = False  # the current frame is DATA
        self._inBlock = False  # a header block is open (HEADERS without END_HEADERS)
        self.pending = True
        self.started = 0
        self.settingsAckWithPayload = False
        self.flood: str | None = None
        self._continuations = 0  # of the latest header block
        self._emptyData = 0

    def feed(self, data: bytes) -> None:
        """Follow C{data}, the next bytes from the client."""
        pos = 0
        end = len(data)
        while pos < end:
            if self._remaining:
                taken = min(self._remaining, end - pos)
                self._remaining -= taken
                pos += taken
                continue
            if not self._header and pos + 9 <= end:  # a whole frame header: read it in place
                self._frame(int.from_bytes(data[pos : pos + 3], "big"), data[pos + 3], data[pos + 4])
                pos += 9
                continue
            header = self._header + data[pos : pos + 9 - len(self._header)]
            pos += len(header) - len(self._header)
            if len(header) < 9:
                self._header = header
                break
            self._header = b""
            self._frame(int.from_bytes(header[:3], "big"), header[3], header[4])
        self.pending = bool(self._header) or self._inBlock or (self._remaining > 0 and not self._inData)

    def _frame(self, length: int, kind: int, flags: int) -> None:
        self._remaining = length
        self._inData = kind == _DATA
        if not self._inBlock:
            self.started += 1
        if kind == _DATA:
            if not length and not flags & _END_STREAM:
                self._emptyData += 1
                if self._emptyData > MAX_EMPTY_DATA:
                    self.flood = f"more than {MAX_EMPTY_DATA} empty DATA frames"
        elif kind == _HEADERS:
            self._inBlock = not flags & _END_HEADERS
            self._continuations = 0
        elif kind == _CONTINUATION:
            self._continuations += 1
            if self._continuations > MAX_CONTINUATIONS:
                self.flood = f"a header block of more than {MAX_CONTINUATIONS} CONTINUATION frames"
            if flags & _END_HEADERS:
                self._inBlock = False
        elif kind == _SETTINGS and flags & _ACK and length:
            self.settingsAckWithPayload = True


def connectionErrorCode(error: h2.exceptions.ProtocolError, watch: FrameWatch) -> ErrorCodes:
    """The error code that RFC 9113 and RFC 7541 give the connection error h2 raised as C{error}."""
    cause = error.__cause__
    if isinstance(cause, hpack.exceptions.OversizedHeaderListError):
        # Not a decoding error: a header list beyond every limit (smaller ones are refused with 431).
        return ErrorCodes.ENHANCE_YOUR_CALM
    if isinstance(cause, hpack.exceptions.HPACKError):
        return ErrorCodes.COMPRESSION_ERROR
    if watch.settingsAckWithPayload and isinstance(cause, hyperframe.exceptions.InvalidDataError):
        return ErrorCodes.FRAME_SIZE_ERROR
    return ErrorCodes(error.error_code)


def withGoAwayCode(pending: bytes, code: ErrorCodes) -> bytes:
    """
    C{pending} (what h2 queued for the client, ending with the GOAWAY of a connection error) with that
    GOAWAY's error code replaced by C{code}; C{pending} unchanged if it does not end with a GOAWAY.
    """
    if len(pending) < _GOAWAY_SIZE:
        return pending
    frame, length = Frame.parse_frame_header(memoryview(pending[-_GOAWAY_SIZE:-8]))
    if not isinstance(frame, GoAwayFrame) or length != 8:
        return pending
    frame.parse_body(memoryview(pending[-8:]))
    if frame.error_code == code:
        return pending
    frame.error_code = code
    return pending[:-_GOAWAY_SIZE] + frame.serialize()
