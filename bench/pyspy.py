"""Optional: profile the server of each load phase with py-spy (``--py-spy``), and summarise the hot spots.

py-spy (``pip install py-spy``) samples the running server from outside, so the
figures of the phase are measured with the profiler attached (it costs a few
per cent; compare like with like). The raw collapsed stacks are kept
(``<phase>.pyspy.txt``: open them in speedscope, or pipe through flamegraph.pl),
and the summary lists, per thread group, how busy it was, and the hottest
lines: *self* (innermost Python frame, i.e. where the time is spent or the C
call made) and *inclusive* (frames of engine/ and protocol/).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_THREAD = re.compile(r"^thread \((?P<tid>\w+)\): (?P<name>[^;]*)")


def pyspy_path() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class PySpy:
    def __init__(self, pid: int, out: Path, *, rate: int = 100, native: bool = False) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self.native = native
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None

    def start(self) -> bool:
        exe = pyspy_path()
        if exe is None:
            return False
        cmd = [exe, "record", "--pid", str(self.pid), "--format", "raw", "-o", str(self.out), "--rate",
               str(self.rate), "--threads"]
        # native frames (lz4, OpenSSL, libc) need py-spy to pause the process per sample; without them it need not
        cmd.append("--native" if self.native else "--nonblocking")
        self.log = self.out.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _thread_group(name: str) -> str:
    name = name.strip()
    base = re.sub(r"[_-]?\d+$", "", name)
    if base.startswith(("asyncio", "uvloop", "ThreadPoolExecutor")):
        return "default executor"  # the loop's own pool: asyncio.to_thread, run_in_executor(None), aiofiles
    return base or name


def _parse(line: str) -> tuple[str, list[tuple[str, str, int | None]], int] | None:
    line = line.rstrip("\n")
    stack, _, count = line.rpartition(" ")
    if not count.isdigit():
        return None
    m = _THREAD.match(stack)
    thread = _thread_group(m.group("name")) if m else "?"
    parts = stack.split(";")
    frames = []
    for part in parts[1:]:
        fm = _FRAME.match(part)
        if fm:
            frames.append((fm.group("func"), fm.group("file"), int(fm.group("line")) if fm.group("line") else None))
    return thread, frames, int(count)


def _is_python(file: str) -> bool:
    return file.endswith(".py") or file in ("blockferry",)


def summarize(raw: Path, *, seconds: float, rate: int = 100, top: int = 15) -> dict:
    threads: Counter[str] = Counter()
    self_py: Counter[str] = Counter()
    self_native: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        parsed = _parse(line)
        if parsed is None:
            continue
        thread, frames, count = parsed
        total += count
        threads[thread] += count
        py = [f for f in frames if _is_python(f[1])]
        if py:
            func, file, lineno = py[-1]
            self_py[f"{file}:{lineno} {func} [{thread}]"] += count
        if frames:
            func, file, lineno = frames[-1]
            if not _is_python(file):
                self_native[f"{func} ({file}) [{thread}]"] += count
        seen = set()
        for func, file, lineno in py:
            if file.startswith(("engine/", "protocol/")):
                key = f"{file}:{lineno} {func}"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += count
    per_s = max(seconds, 1e-9) * rate

    def rows(counter: Counter[str]) -> list[dict]:
        return [{"where": k, "samples": n, "share": n / total if total else 0.0, "cores": n / per_s}
                for k, n in counter.most_common(top)]

    return {
        "samples": total,
        "seconds": seconds,
        "rate": rate,
        "busy_cores": total / per_s,
        "threads": [{"thread": k, "samples": n, "cores": n / per_s} for k, n in threads.most_common()],
        "self_python": rows(self_py),
        "self_native": rows(self_native),
        "inclusive": rows(inclusive),
        "raw": raw.name,
    }


def markdown(name: str, summary: dict) -> list[str]:
    lines = [(f"### {name}: {summary['samples']} samples over {summary['seconds']:.1f} s "
              f"({summary['busy_cores']:.2f} threads active on average — running, waiting for a CPU or blocked in "
              f"a syscall such as fsync; raw stacks: `{summary['raw']}`)"), ""]
    lines.append("Active threads: " + ", ".join(f"{t['thread']} {t['cores']:.2f}" for t in summary["threads"][:8]))
    lines.append("")
    for title, key in (("self time, innermost Python line (a C call is charged to the line that made it)",
                        "self_python"),
                       ("self time, native leaf (--native only)", "self_native"),
                       ("inclusive, engine/ and protocol/", "inclusive")):
        rows = [r for r in summary[key][:12] if r["share"] >= 0.01]
        if not rows:
            continue
        lines += [f"{title}:", "", "| share | threads | where |", "|---:|---:|---|"]
        lines += [f"| {r['share']:.1%} | {r['cores']:.2f} | `{r['where']}` |" for r in rows]
        lines.append("")
    return lines
