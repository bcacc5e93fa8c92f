"""Resident memory of a process from /proc (Linux): now, peak since start (or since the last reset), and the reset.

from bench import memory
memory.reset_peak(pid)          # VmHWM := VmRSS (writes 5 to /proc/PID/clear_refs; Linux >= 4.0, same user)
...                             # the work to measure
print(memory.peak_mb(pid), memory.rss_mb(pid))
"""

from __future__ import annotations

from pathlib import Path


def _status_kb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    raise KeyError(key)


def rss_mb(pid: int) -> float:
    """Resident set size now, MiB."""
    return _status_kb(pid, "VmRSS") / 1024


def peak_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) since start or the last `reset_peak`, MiB."""
    return _status_kb(pid, "VmHWM") / 1024


def reset_peak(pid: int) -> bool:
    """Reset the peak to the current RSS; False where the kernel or permissions do not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False
