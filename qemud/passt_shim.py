"""Start passt on the connection QEMU makes to the socket qemud listens on.

qemud hands a helper a listening socket (qemud.helpers); passt takes a *connected* one
(``--fd``). This shim, run as the helper, accepts QEMU's one connection and then becomes passt
(exec: same pid, so qemud supervises passt itself)::

    python -m qemud.passt_shim FD /usr/bin/passt ARGS...
"""

from __future__ import annotations

import os
import socket
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m qemud.passt_shim FD PASST [ARGS...]", file=sys.stderr)
        return 2
    listener = socket.socket(fileno=int(argv[0]))
    conn, _ = listener.accept()
    listener.close()
    fd = conn.detach()
    os.set_inheritable(fd, True)
    passt = argv[1:]
    os.execv(passt[0], [*passt, "--fd", str(fd)])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
