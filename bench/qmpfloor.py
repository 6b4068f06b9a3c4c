#!/usr/bin/env python3
"""The floor of adoption: a fresh process that connects to every QMP socket given, negotiates
capabilities and asks query-status, with nothing but the standard library. Prints nothing;
exit status 1 if a guest is not running."""
import json
import socket
import sys


def main() -> int:
    bad = 0
    for path in sys.argv[1:]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        f = s.makefile("rwb")
        f.readline()  # greeting
        for cmd in ("qmp_capabilities", "query-status"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                r = json.loads(f.readline())
                if "return" in r or "error" in r:
                    break
        if r.get("return", {}).get("status") != "running":
            bad += 1
        f.close()
        s.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
