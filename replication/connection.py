"""The replication link's TCP connections: pysyncobj's frames, read within bounds, then sealed.

pysyncobj's own `TcpConnection` reads whatever a peer announces: a connection that has not
proven the secret yet may announce a 2 GB frame and stream it into memory, its buffers are
copied on every read and send (quadratic in the frame), and a connection that never sends a
byte is never closed. `GuardedConnection` speaks the same frames for the key exchange (a
4-byte native length, then Fernet(zlib(pickle(message))), the first frame each way being a
random key that later frames must carry) with four differences:

- **Bounded frames.** Until a frame has decrypted (the peer holds the secret), a frame may be
  at most `HANDSHAKE_FRAME_BYTES`; afterwards at most `frame_limit`. A larger announcement
  closes the connection at once, before its bytes are read: memory per connection is bounded
  by the limit plus one socket read.
- **No quadratic copies.** The read buffer is consumed with an offset and compacted once per
  wake-up; the send buffer is a queue of chunks.
- **Its age is known** (`opened`), and whether it is authenticated: the transport closes
  connections that do not finish the handshake in time (replication/transport.py).
- **Sealed frames after the exchange** (when the transport gives the connection a
  `session_secret`): every frame after the first one each way is AES-256-GCM of the pickled
  message under a key of its own per connection and direction, derived (HKDF-SHA256) from
  the secret and both random keys of the exchange; the nonce is the number of sealed frames
  sent before it in that direction, counted by both ends and never sent. A frame that does
  not open (another key, tampered with, replayed, reordered, or one missing before it)
  closes the connection. Fernet (AES-CBC, HMAC-SHA256 and base64 of every message, ~30 us
  per small message and ~3.4 ms per 256 KiB snapshot chunk both ends together) costs ~100
  times what GCM does; why this is as safe: docs/replication.md, Security.

The exchange frames use zlib level 0 (stored) and pickle protocol 5: the receiver inflates any
level and loads any protocol. A Fernet token's time is read from its header and trusted once
`decrypt` verified the token (pysyncobj's connection verifies it twice).
"""

from __future__ import annotations

import base64
import collections
import pickle
import socket
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from replication.pysyncobj_adapter import (
    CONNECTED,
    CONNECTING,
    DISCONNECTED,
    EVENT_ERROR,
    EVENT_READ,
    EVENT_WRITE,
    pickle_loads,
    set_keepalive,
)

HANDSHAKE_FRAME_BYTES = 4096  # the random key and the node's address fit in a few hundred
COMPRESSION_LEVEL = 0
PICKLE_PROTOCOL = 5
RANDOM_KEY_BYTES = 32  # pysyncobj's random keys (os.urandom(32))
SESSION_INFO = b"cacert-signer replication frames v1"
_TAG_BYTES = 16


def session_secret(secret: bytes) -> bytes:
    """The key that session keys are derived from (the replication secret has at least 128
    bits of entropy, checked on load: HKDF, no password stretching needed)."""
    hkdf = HKDF(hashes.SHA256(), 32, salt=b"cacert-signer replication session", info=b"")
    return hkdf.derive(secret)


def session_key(secret: bytes, sender_key: bytes, receiver_key: bytes) -> AESGCM:
    """The AES-256-GCM key of one direction of one connection: derived from the session
    secret and both random keys of the exchange, in the order the direction gives them (the
    random key the sender's frames carry first), so the two directions differ."""
    if len(sender_key) != RANDOM_KEY_BYTES or len(receiver_key) != RANDOM_KEY_BYTES:
        raise ValueError("random keys of an unexpected size")
    hkdf = HKDF(hashes.SHA256(), 32, salt=sender_key + receiver_key, info=SESSION_INFO)
    return AESGCM(hkdf.derive(secret))


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "big")


_LENGTH = struct.Struct("i")  # pysyncobj's frame header: native int
_READ_BYTES = 256 * 1024  # one recv


class FrameRefused(Exception):
    """A frame over the limit, or one that does not decrypt: the connection is closed."""


class GuardedConnection:
    """One TCP connection of the replication link (the interface pysyncobj's transport uses)."""

    def __init__(
        self,
        poller: Any,
        onMessageReceived: Callable[[Any], None] | None = None,
        onConnected: Callable[[], None] | None = None,
        onDisconnected: Callable[[], None] | None = None,
        socket: socket.socket | None = None,
        timeout: float = 10.0,
        sendBufferSize: int = 2**13,
        recvBufferSize: int = 2**13,
        keepalive: Any = None,
        frame_limit: int = 1 << 24,
        on_refused: Callable[[str], None] | None = None,
    ):
        self.sendRandKey: bytes | None = None
        self.recvRandKey: bytes | None = None
        self.recvLastTimestamp = 0
        self.encryptor: Any = None
        self.session_secret: bytes | None = None  # set: frames after the exchange are sealed
        self._sent = self._received = 0  # frames so far (the first each way: the exchange)
        self._seal: AESGCM | None = None
        self._open: AESGCM | None = None
        self.authenticated = False  # a frame from the peer decrypted
        self.identified = False  # the transport knows which node this is
        self.opened = time.monotonic()
        self.peer_ip: str | None = None  # an accepted connection's remote address
        self.frame_limit = frame_limit
        self._on_refused = on_refused
        self._poller = poller
        self._timeout = timeout
        self._keepalive = keepalive
        self._send_size, self._recv_size = sendBufferSize, recvBufferSize
        self._on_message = onMessageReceived
        self._on_connected = onConnected
        self._on_disconnected = onDisconnected
        self._in = bytearray()
        self._out: collections.deque[memoryview] = collections.deque()
        self._out_bytes = 0
        self._last_read = time.monotonic()
        self._socket = socket
        self._fileno: int | None = None
        self._state = DISCONNECTED
        if socket is not None:
            self._fileno = socket.fileno()
            self._state = CONNECTED
            self._set_keepalive()
            self._subscribe(EVENT_READ | EVENT_WRITE | EVENT_ERROR)

    # --- pysyncobj's interface ------------------------------------------------------------

    @property
    def state(self) -> int:
        return self._state

    def setOnConnectedCallback(self, callback: Callable[[], None] | None) -> None:
        self._on_connected = callback

    def setOnMessageReceivedCallback(self, callback: Callable[[Any], None] | None) -> None:
        self._on_message = callback

    def setOnDisconnectedCallback(self, callback: Callable[[], None] | None) -> None:
        self._on_disconnected = callback

    def fileno(self) -> int | None:
        return self._fileno

    def getSendBufferSize(self) -> int:
        return self._out_bytes

    def connect(self, host: str | None, port: int) -> bool:
        if host is None:
            return False
        self._reset()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_size)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self._socket = sock
        self._set_keepalive()
        try:
            sock.connect((host, port))
        except BlockingIOError:
            pass
        except OSError:
            self._socket = None
            sock.close()
            return False
        self._fileno = sock.fileno()
        self._state = CONNECTING
        self.opened = time.monotonic()
        self._subscribe(EVENT_READ | EVENT_WRITE | EVENT_ERROR)
        return True

    def send(self, message: Any) -> None:
        if self._sealed(self._sent):
            try:
                data = self._sealed_frame(message)
            except ValueError:
                self.disconnect()  # no key exchange before: nothing can be sent safely
                return
        else:
            if self.sendRandKey:
                message = (self.sendRandKey, message)
            data = zlib.compress(pickle.dumps(message, PICKLE_PROTOCOL), COMPRESSION_LEVEL)
            if self.encryptor:
                data = self.encryptor.encrypt_at_time(data, int(time.monotonic()))
        self._sent += 1
        frame = _LENGTH.pack(len(data)) + data
        self._out.append(memoryview(frame))
        self._out_bytes += len(frame)
        self._flush()
        if self._out and self._state == CONNECTED:
            self._subscribe(EVENT_READ | EVENT_WRITE | EVENT_ERROR)  # the rest when writable

    def disconnect(self) -> None:
        notify = self._on_disconnected is not None and self._state != DISCONNECTED
        self.sendRandKey = self.recvRandKey = None
        self.recvLastTimestamp = 0
        self._reset_session()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._fileno is not None:
            self._poller.unsubscribe(self._fileno)
            self._fileno = None
        self._reset_buffers()
        self._state = DISCONNECTED
        if notify and self._on_disconnected is not None:
            self._on_disconnected()

    # --- events ---------------------------------------------------------------------------

    def _subscribe(self, mask: int) -> None:
        assert self._fileno is not None
        self._poller.subscribe(self._fileno, self._on_event, mask)

    def _on_event(self, descr: int, event: int) -> None:
        if descr != self._fileno:
            self._poller.unsubscribe(descr)
            return
        if event & EVENT_ERROR or self._timed_out():
            self.disconnect()
            return
        assert self._socket is not None
        if self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.disconnect()
            return
        if self._state == CONNECTING:
            if self._on_connected is not None:
                self._on_connected()
            if self._state == DISCONNECTED:
                return
            self._state = CONNECTED
            self._last_read = time.monotonic()
            return
        if event & EVENT_WRITE:
            self._flush()
            if self._state == DISCONNECTED:
                return
            self._subscribe(EVENT_READ | EVENT_ERROR | (EVENT_WRITE if self._out else 0))
        if event & EVENT_READ:
            self._read()

    def _timed_out(self) -> bool:
        return time.monotonic() - self._last_read > self._timeout

    def _flush(self) -> None:
        if self._timed_out():
            self.disconnect()
            return
        while self._out and self._socket is not None:
            chunk = self._out[0]
            try:
                sent = self._socket.send(chunk)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.disconnect()
                return
            if sent <= 0:
                return
            self._out_bytes -= sent
            if sent == len(chunk):
                self._out.popleft()
            else:
                self._out[0] = chunk[sent:]

    def _read(self) -> None:
        """Read what the socket holds, but never more than one frame over the limit."""
        budget = self._limit() + _LENGTH.size + _READ_BYTES
        while self._socket is not None and len(self._in) < budget:
            try:
                incoming = self._socket.recv(self._recv_size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.disconnect()
                return
            if not incoming:
                self.disconnect()
                return
            self._in += incoming
        self._last_read = time.monotonic()
        self._parse()

    def _parse(self) -> None:
        offset = 0
        try:
            while self._state != DISCONNECTED and len(self._in) - offset >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(self._in, offset)
                if length < 0 or length > self._limit():
                    raise FrameRefused(f"a frame of {length} bytes (limit {self._limit()})")
                end = offset + _LENGTH.size + length
                if len(self._in) < end:
                    break
                message = self._decode(bytes(self._in[offset + _LENGTH.size : end]))
                offset = end
                if self._on_message is not None:
                    self._on_message(message)
        except FrameRefused as refused:
            if self._on_refused is not None:
                self._on_refused(str(refused))
            self.disconnect()
            return
        if self._state != DISCONNECTED and offset:
            del self._in[:offset]

    def _limit(self) -> int:
        return self.frame_limit if self.authenticated else HANDSHAKE_FRAME_BYTES

    def _decode(self, data: bytes) -> Any:
        if self._sealed(self._received):
            return self._open_frame(data)
        try:
            if self.encryptor:
                stamp = _token_time(data)
                data = self.encryptor.decrypt(data)  # verifies the token, its time included
                if stamp < self.recvLastTimestamp:
                    raise ValueError("a frame older than the last one")
                self.recvLastTimestamp = stamp
            inflater = zlib.decompressobj()
            raw = inflater.decompress(data, 4 * self.frame_limit)
            if inflater.unconsumed_tail:
                raise ValueError("a frame inflates past the limit")
            message = pickle_loads(raw)
            self.authenticated = True
            if self.recvRandKey:
                key, message = message
                if key != self.recvRandKey:
                    raise ValueError("a frame without this connection's key")
        except FrameRefused:
            raise
        except Exception as exc:  # a wrong secret, a replay, garbage: nothing is trusted
            reason = "does not decrypt" if not self.authenticated else type(exc).__name__
            raise FrameRefused(f"a frame that {reason}") from None
        self._received += 1
        return message

    # --- the session: frames after the key exchange ---------------------------------------

    def _sealed(self, frames: int) -> bool:
        """Whether the next frame in a direction that has carried `frames` is sealed: every
        frame after the first one each way (the random keys, pysyncobj's exchange), when the
        connection has a session secret."""
        return frames > 0 and self.session_secret is not None and self.encryptor is not None

    def _sealed_frame(self, message: Any) -> bytes:
        """AES-256-GCM of the pickled message under this direction's key, the nonce the
        number of sealed frames sent before it (never sent: both ends count)."""
        if self._seal is None:
            self._seal = self._direction_key(self.sendRandKey, self.recvRandKey)
        nonce = _nonce(self._sent - 1)
        return self._seal.encrypt(nonce, pickle.dumps(message, PICKLE_PROTOCOL), None)

    def _open_frame(self, data: bytes) -> Any:
        """The message of a sealed frame; a frame that does not open (another key, tampered
        with, replayed, reordered or one missing before it) closes the connection."""
        try:
            if self._open is None:
                self._open = self._direction_key(self.recvRandKey, self.sendRandKey)
            if len(data) < _TAG_BYTES:
                raise ValueError("a frame shorter than its tag")
            raw = self._open.decrypt(_nonce(self._received - 1), data, None)
            message = pickle_loads(raw)
        except (InvalidTag, ValueError):
            raise FrameRefused("a sealed frame that does not open") from None
        except Exception as exc:
            raise FrameRefused(f"a sealed frame that {type(exc).__name__}") from None
        self.authenticated = True
        self._received += 1
        return message

    def _direction_key(self, sender_key: bytes | None, receiver_key: bytes | None) -> AESGCM:
        if not sender_key or not receiver_key or self.session_secret is None:
            raise ValueError("no key exchange yet")
        return session_key(self.session_secret, sender_key, receiver_key)

    def _reset_session(self) -> None:
        self._sent = self._received = 0
        self._seal = self._open = None

    # --- internals ------------------------------------------------------------------------

    def _set_keepalive(self) -> None:
        if self._socket is not None and self._keepalive is not None:
            set_keepalive(self._socket, *self._keepalive)

    def _reset(self) -> None:
        self._reset_session()
        self._state = DISCONNECTED
        self._fileno = None
        self._socket = None
        self._reset_buffers()
        self._last_read = time.monotonic()
        self.authenticated = False
        self.identified = False

    def _reset_buffers(self) -> None:
        self._in = bytearray()
        self._out.clear()
        self._out_bytes = 0


def _token_time(token: bytes) -> int:
    """The time in a Fernet token's header (version 0x80, then 8 bytes big-endian)."""
    head = base64.urlsafe_b64decode(token[:12])
    if head[:1] != b"\x80":
        raise ValueError("not a Fernet token")
    return int.from_bytes(head[1:9], "big")


class GuardedServer:
    """The listening socket: accepted connections are `GuardedConnection`s (pysyncobj's
    `TcpServer` interface: bind, unbind)."""

    def __init__(
        self,
        poller: Any,
        host: str,
        port: int,
        on_connection: Callable[[socket.socket], None],
        sendBufferSize: int,
        recvBufferSize: int,
    ):
        self._poller = poller
        self._host, self._port = host, int(port)
        self._on_connection = on_connection
        self._send_size, self._recv_size = sendBufferSize, recvBufferSize
        self._socket: socket.socket | None = None
        self._fileno: int | None = None

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_size)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((self._host, self._port))
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._fileno = sock.fileno()
        self._poller.subscribe(self._fileno, self._on_event, EVENT_READ | EVENT_ERROR)

    def unbind(self) -> None:
        if self._fileno is not None:
            self._poller.unsubscribe(self._fileno)
            self._fileno = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _on_event(self, _descr: int, event: int) -> None:
        if event & EVENT_READ and self._socket is not None:
            while True:
                try:
                    sock, _ = self._socket.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break  # out of descriptors, say: the next wake-up tries again
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_size)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_size)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                self._on_connection(sock)
        if event & EVENT_ERROR:
            self.unbind()
