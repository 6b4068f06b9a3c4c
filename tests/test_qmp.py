"""qemud.qmp, the one module that speaks QMP, against a real QEMU."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile

import pytest

from qemud.qmp import Qmp, QmpError

pytestmark = pytest.mark.qemu


def test_a_command_qemu_refuses_is_a_qmp_error_carrying_qemus_reason() -> None:
    async def run() -> str:
        with tempfile.TemporaryDirectory(prefix="qq", dir="/tmp") as d:
            sock = os.path.join(d, "q.sock")
            proc = subprocess.Popen(["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults",
                                     "-chardev", f"socket,id=q,path={sock},server=on,wait=off",
                                     "-mon", "chardev=q,mode=control"], stdin=subprocess.DEVNULL)
            q = Qmp("t")
            try:
                for _ in range(200):
                    if os.path.exists(sock):
                        break
                    await asyncio.sleep(0.025)
                await q.connect(sock, 10)
                with pytest.raises(QmpError) as exc:
                    await q.execute("qom-get", {"path": "/nowhere", "property": "x"})
                return str(exc.value)
            finally:
                await q.close()
                proc.kill()
                proc.wait()

    assert asyncio.run(run()) == "QMP command qom-get failed: Device '/nowhere' not found"
