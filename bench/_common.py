"""What the bench scripts share: the project on the path (installed or not), the child
environment, percentiles, CPU time from /proc, bounded reads and waits, and stopping a
child by pid."""

from __future__ import annotations

import glob
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

# The project measured: this checkout, or the copy MESHD_BENCH_ROOT names (bench/compare.py
# runs these same scripts against a copy of each version, each with its own daemon and SDK).
ROOT = Path(os.environ.get("MESHD_BENCH_ROOT")
            or Path(__file__).resolve().parent.parent).resolve()
for _p in (str(ROOT / "sdk"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
# Children find the project the same way; the bench names its own sockets and addresses.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (str(ROOT), str(ROOT / "sdk"), os.environ.get("PYTHONPATH", "")) if p))
for _v in ("MESHD_BENCH_ROOT", "MESHD_SOCKET", "MESHD_BIND", "MESHD_ADVERTISE", "MESHD_JOIN",
           "MESHD_DATA_DIR", "MESHD_LOG_LEVEL", "MESHD_DURABILITY"):
    ENV.pop(_v, None)
# No mDNS on this machine's network: only bench_discovery turns it on, inside namespaces.
ENV["MESHD_DISCOVERY"] = "0"


class BenchError(RuntimeError):
    """The bench cannot go on (a child did not start, a phase broke)."""


class BenchTimeout(BenchError, TimeoutError):
    """A bounded wait ran out."""


def percentile(samples: list[float] | list[int], p: float) -> float:
    """Nearest-rank percentile (nan when there are no samples)."""
    if not samples:
        return float("nan")
    s = sorted(samples)
    return float(s[max(0, min(len(s) - 1, math.ceil(p * len(s)) - 1))])


def pct_us(samples_ns: list[int], p: float) -> float:
    """Nearest-rank percentile of nanosecond samples, in µs."""
    return percentile(samples_ns, p) / 1000.0


def cpu_ns(pid: int) -> int | None:
    """CPU time used so far by every thread of a process (ns), from /proc."""
    total, found = 0, False
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
                found = True
        except (OSError, ValueError, IndexError):
            pass
    if found:
        return total
    try:                                          # no schedstat: clock ticks of /proc/pid/stat
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 10**9 // os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line of a child's stdout, waiting at most `timeout` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        return b""
    return proc.stdout.readline()


def stop_pid(proc: subprocess.Popen[Any], timeout: float) -> str:
    """SIGTERM by pid, then SIGKILL after `timeout`; says how it ended."""
    if proc.poll() is not None:
        return f"had already exited ({proc.returncode})"
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
        return f"stopped by SIGTERM (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
        return f"did NOT stop within {timeout:g}s of SIGTERM: killed (SIGKILL)"


def eventually(pred: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.1) -> float:
    """Poll `pred` until true (bounded); returns the seconds it took, raises BenchTimeout.
    Exceptions from `pred` count as not yet (the last one is reported)."""
    t0 = time.monotonic()
    last = ""
    while True:
        try:
            if pred():
                return time.monotonic() - t0
        except Exception as exc:
            last = f" (last error: {type(exc).__name__}: {exc})"
        if time.monotonic() - t0 > timeout:
            raise BenchTimeout(f"timed out after {timeout:g}s waiting for {what}{last}")
        time.sleep(interval)


# --- machine-readable results (--json PATH), for bench/compare.py ----------------------------

CODE_PROBE = ("import json, meshd, sessions; "
              "print(json.dumps({'meshd': meshd.__file__, 'sessions': sessions.__file__}))")


def code_paths() -> dict[str, Any]:
    """Where the project's packages come from: in this process, and in a child started as
    the daemons are (this python, ENV, cwd ROOT), so that a comparison can check that each
    version ran its own daemon and SDK."""
    import json
    import meshd
    import sessions
    out: dict[str, Any] = {"root": str(ROOT), "python": sys.executable,
                           "bench": {"meshd": meshd.__file__, "sessions": sessions.__file__}}
    try:
        r = subprocess.run([sys.executable, "-c", CODE_PROBE], env=ENV, cwd=str(ROOT),
                           capture_output=True, text=True, timeout=30)
        out["child"] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]}
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        out["child"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """Write a bench's results to `path` (nothing when no --json was given)."""
    if not path:
        return
    import json
    result = dict(result, code=code_paths())
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)
