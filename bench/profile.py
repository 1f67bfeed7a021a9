"""Optional profiles (BENCH_PROFILE=1): py-spy samples a process tree while a scenario runs, only
where the GIL is held (so it is CPU time, and a thread waiting on a socket is not counted), and
the collapsed stacks are summed into the frames that dominate.

py-spy is for profiling only and not in requirements.lock: `.venv/bin/pip install py-spy`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^\S.* \([^()]+:\d+\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class Recording:
    name: str
    output: Path
    popen: subprocess.Popen[bytes]

    def finish(self) -> Profile | None:
        try:
            self.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        if not self.output.exists():
            return None
        return Profile.read(self.name, self.output)


def record(name: str, pid: int, seconds: float, output: Path) -> Recording | None:
    """Start sampling `pid` and its children for `seconds` in the background."""
    binary = py_spy()
    if binary is None:
        return None
    argv = [binary, "record", "--pid", str(pid), "--subprocesses", "--gil", "--nonblocking"]
    argv += ["--rate", "100", "--duration", str(max(1, int(seconds))), "--format", "raw"]
    argv += ["--output", str(output)]
    popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Recording(name, output, popen)


@dataclass
class Profile:
    name: str
    samples: int
    own: Counter[str]  # samples whose innermost frame is this one
    total: Counter[str]  # samples with this frame anywhere on the stack

    @classmethod
    def read(cls, name: str, path: Path) -> Profile:
        own: Counter[str] = Counter()
        total: Counter[str] = Counter()
        samples = 0
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            # py-spy prefixes each stack with the process (whose command line may hold ";")
            # and the thread; keep the Python frames, `function (file.py:line)`.
            frames = [f for f in stack.split(";") if _FRAME.match(f)]
            if not frames:
                continue
            samples += n
            own[frames[-1]] += n
            for frame in set(frames):
                total[frame] += n
        return cls(name, samples, own, total)

    def share(self, counter: Counter[str], frame: str) -> float:
        return 100 * counter[frame] / self.samples if self.samples else 0.0

    def top(self, *, own: bool, count: int = 15, ours: bool = False) -> list[tuple[float, str]]:
        counter = self.own if own else self.total
        rows = []
        for frame, _ in counter.most_common():
            if ours and not any(f"({pkg}/" in frame for pkg in ("api", "shared", "worker")):
                continue
            rows.append((self.share(counter, frame), frame))
            if len(rows) == count:
                break
        return rows

    def by_library(self) -> list[tuple[float, str]]:
        """Own time by the package its innermost frame lives in (psycopg, sqlalchemy, ...)."""
        libraries: Counter[str] = Counter()
        for frame, n in self.own.items():
            libraries[_library(frame)] += n
        return [(100 * n / self.samples, lib) for lib, n in libraries.most_common(12)]

    def report(self) -> str:
        lines = [f"== profile: {self.name} ({self.samples} samples with the GIL held) =="]
        lines.append("own time by library:")
        lines += [f"  {pct:5.1f}%  {lib}" for pct, lib in self.by_library()]
        lines.append("top frames by own time:")
        lines += [f"  {pct:5.1f}%  {frame}" for pct, frame in self.top(own=True)]
        lines.append("our functions by total time (own + what they call):")
        lines += [f"  {pct:5.1f}%  {frame}" for pct, frame in self.top(own=False, ours=True)]
        return "\n".join(lines)


def _library(frame: str) -> str:
    location = frame[frame.rfind("(") + 1 :]
    if "site-packages/" in location:
        return location.split("site-packages/", 1)[1].split("/", 1)[0].split(".py", 1)[0]
    if "/lib/python3" in location:
        return "stdlib"
    return location.split("/", 1)[0].split(".py", 1)[0] or "?"
