"""How many CPU cores this process may use: its affinity mask, capped by the cgroup's CPU quota.

``os.cpu_count()`` reports the host; a container limited to 2 CPUs on a 64-core node, or a process
pinned with ``taskset``, must size its workers and thread pools by what it may actually run on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cgroup_quota_cores", "usable_cores"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _own_cgroup_dirs(root: Path, membership: str | None) -> list[Path]:
    """The folders holding this process's CPU controller files, innermost first."""
    dirs: list[Path] = []
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            return [root, root / "cpu", root / "cpu,cpuacct"]
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2: one unified hierarchy
            dirs += [root / rel, root]
        elif "cpu" in controllers.split(","):
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                dirs += [root / mount / rel, root / mount]
    return [d for d in dirs if d.is_dir()]


def cgroup_quota_cores(root: Path = _CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The CPU quota in cores (``cpu.max`` in v2, ``cpu.cfs_quota_us / cpu.cfs_period_us`` in v1), or
    None when there is none. A container's quota is what Kubernetes sets from a pod's CPU limit.
    ``membership`` is the text of /proc/self/cgroup (read when None)."""
    for folder in _own_cgroup_dirs(root, membership):
        try:
            v2 = (folder / "cpu.max").read_text().split()
        except OSError:
            v2 = []
        if len(v2) == 2:
            return None if v2[0] == "max" else int(v2[0]) / int(v2[1])
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def usable_cores() -> int:
    """Cores this process may run on: the affinity mask's size, capped by the cgroup quota rounded up
    (a 1.5-CPU limit still lets two threads run, each part of the time); at least 1."""
    cores = _affinity_cores()
    quota = cgroup_quota_cores()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)
