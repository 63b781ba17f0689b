"""The peer: ``borg create --compression lz4`` into a repokey-encrypted repository, same bytes.

The sample (exactly the records the ceiling seals) is written to a file first;
only ``borg create`` is timed. borg is single-threaded and also chunks, hashes
(HMAC-SHA256 ids) and writes its segments with fsync: it does the same job —
compress, encrypt, store durably — that the engine does. If borg is not
installed the result says so and carries no number.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

MB = 1e6


def borg_env(home: Path) -> dict[str, str]:
    return dict(
        os.environ,
        BORG_PASSPHRASE="blockferry-bench",
        BORG_DISPLAY_PASSPHRASE="no",
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        BORG_BASE_DIR=str(home),
        BORG_CACHE_DIR=str(home / "cache"),
        BORG_CONFIG_DIR=str(home / "config"),
        BORG_SECURITY_DIR=str(home / "security"),
        BORG_KEYS_DIR=str(home / "keys"),
    )


def measure_borg(batches: list[bytes], workdir: Path, *, timeout: float = 600.0) -> dict:
    exe = shutil.which("borg")
    if exe is None:
        return {"available": False, "mbps": None,
                "note": "borg is not installed (Debian: apt-get install borgbackup); no peer figure"}
    workdir.mkdir(parents=True, exist_ok=True)
    home, repo, sample = workdir / "borg-home", workdir / "borg-repo", workdir / "sample.bin"
    for path in (home, repo):
        shutil.rmtree(path, ignore_errors=True)
    home.mkdir()
    env = borg_env(home)
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env,
                                 timeout=60, check=False).stdout.strip()
        with open(sample, "wb") as handle:
            handle.writelines(batches)
            handle.flush()
            os.fsync(handle.fileno())
        size = sample.stat().st_size
        init = subprocess.run([exe, "init", "--encryption", "repokey", str(repo)], capture_output=True, text=True,
                              env=env, timeout=120, check=False)
        if init.returncode != 0:
            return {"available": True, "mbps": None, "version": version,
                    "error": f"borg init failed: {init.stderr.strip()[-500:]}"}
        command = [exe, "create", "--compression", "lz4", f"{repo}::bench", sample.name]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir, timeout=timeout,
                             check=False)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if run.returncode not in (0, 1):  # 1 = warnings
            return {"available": True, "mbps": None, "version": version,
                    "error": f"borg create failed ({run.returncode}): {run.stderr.strip()[-500:]}"}
        return {
            "available": True,
            "version": version,
            "mbps": size / elapsed / MB,
            "bytes": size,
            "seconds": elapsed,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "repo_bytes": sum(p.stat().st_size for p in repo.rglob("*") if p.is_file()),
            "command": "borg init --encryption repokey REPO; borg create --compression lz4 REPO::bench sample.bin",
        }
    except subprocess.TimeoutExpired as exc:
        return {"available": True, "mbps": None, "error": f"borg timed out: {exc}"}
    finally:
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        sample.unlink(missing_ok=True)
