"""A do-nothing vhost-user network backend: enough of the protocol for QEMU to start.

QEMU's vhost-user netdev waits at start-up until a backend has answered its first requests
(GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM; the rest need no reply with only the
multiqueue protocol feature offered). This stub answers
them, on a socket it listens on (QEMU in client mode) or connects to (QEMU in server mode), so a
guest with a vhost-user NIC can start in tests and the conformance run. It moves no packets.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

GET_FEATURES = 1
GET_VRING_BASE = 11
GET_PROTOCOL_FEATURES = 15
GET_QUEUE_NUM = 17
#: VIRTIO_F_VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES
FEATURES = (1 << 32) | (1 << 30)
#: VHOST_USER_PROTOCOL_F_MQ only (multiqueue NICs need it; nothing that wants replies)
PROTOCOL_FEATURES = 1 << 0
_HDR = struct.Struct("<III")
_REPLY = 0x1 | 0x4  # version 1 | reply


def _serve(conn: socket.socket, stop: threading.Event) -> None:
    conn.settimeout(0.2)
    buf = b""
    with conn:
        while not stop.is_set():
            try:
                data, _, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while len(buf) >= _HDR.size:
                req, _flags, size = _HDR.unpack_from(buf)
                if len(buf) < _HDR.size + size:
                    break
                payload = buf[_HDR.size:_HDR.size + size]
                buf = buf[_HDR.size + size:]
                if req == GET_FEATURES:
                    conn.sendall(_HDR.pack(req, _REPLY, 8) + struct.pack("<Q", FEATURES))
                elif req == GET_PROTOCOL_FEATURES:
                    conn.sendall(_HDR.pack(req, _REPLY, 8) + struct.pack("<Q", PROTOCOL_FEATURES))
                elif req == GET_QUEUE_NUM:
                    conn.sendall(_HDR.pack(req, _REPLY, 8) + struct.pack("<Q", 64))
                elif req == GET_VRING_BASE:  # struct vhost_vring_state {index, num}
                    index = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
                    conn.sendall(_HDR.pack(req, _REPLY, 8) + struct.pack("<II", index, 0))


class VhostUserStub:
    """Serve every (path, mode) until :meth:`close`; mode is QEMU's ('server': QEMU listens,
    the stub connects as soon as the socket appears; 'client': the stub listens)."""

    def __init__(self, endpoints: list[tuple[str, str]]) -> None:
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        for path, mode in endpoints:
            if mode == "client":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(path)
                s.listen(8)
                s.settimeout(0.2)
                self._socks.append(s)
                self._start(self._accept, s)
            else:
                self._start(self._connect, path)

    def _start(self, fn, arg) -> None:  # type: ignore[no-untyped-def]
        t = threading.Thread(target=fn, args=(arg,), daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self, s: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._start(lambda c: _serve(c, self._stop), conn)

    def _connect(self, path: str) -> None:
        while not self._stop.is_set():
            if os.path.exists(path):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    c.connect(path)
                except OSError:
                    c.close()
                    time.sleep(0.02)
                    continue
                _serve(c, self._stop)
                return
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        for s in self._socks:
            s.close()
        for t in self._threads:
            t.join(1)
