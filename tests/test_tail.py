"""qemud.tail: following QEMU's logs line by line, for as many guests as a host runs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from qemud.tail import Follower, shared_watcher


def _inotify_instances() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "inotify" in os.readlink(f"/proc/self/fd/{fd}"):
                n += 1
        except OSError:
            continue
    return n


def test_three_hundred_followed_files_share_one_inotify_instance(tmp_path: Path) -> None:
    # two followed files per guest: one inotify instance each ran out of the kernel's 128 per
    # user (fs.inotify.max_user_instances) at about 60 guests, and their lines never reached the
    # journal
    async def run() -> tuple[int, int, int]:
        got: dict[int, list[str]] = {i: [] for i in range(300)}
        tasks = []
        before = _inotify_instances()
        for i in range(300):
            p = tmp_path / f"f{i}.log"
            p.write_text("")
            tasks.append(asyncio.create_task(Follower(p, got[i].append, lambda n: None).run()))
        await asyncio.sleep(0.2)
        for i in range(300):
            with open(tmp_path / f"f{i}.log", "a") as fh:
                fh.write(f"line {i}\n")
        for _ in range(100):
            if all(got[i] == [f"line {i}"] for i in range(300)):
                break
            await asyncio.sleep(0.02)
        instances = _inotify_instances() - before
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return sum(got[i] == [f"line {i}"] for i in range(300)), instances, len(shared_watcher().callbacks)

    delivered, instances, left = asyncio.run(run())
    assert delivered == 300
    assert instances == 1
    assert left == 0, "a stopped follower leaves no watch behind"
