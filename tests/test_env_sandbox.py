"""The sandbox against hostile programs: every run ends, is reported as a failure, and leaves the
grader, its files and the other runs alone. Limits are short (2 s) to keep this file fast."""
from __future__ import annotations

import os
import time

import pytest

from jaxhack.env.sandbox import SandboxJob, SandboxLimits, run_program, run_programs, sandbox_identity

FAST = SandboxLimits(wall_s=2.0, cpu_s=2, max_output_bytes=1 << 16)


def _live_processes_with(token: str) -> list[int]:
    """Live processes whose command line holds `token` (forked children keep their parent's)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if token.encode() in cmdline and state != b"Z":
            pids.append(int(entry))
    return pids


def _needs_own_uid():
    if not sandbox_identity().drop_privileges:
        pytest.skip("runs use the grader's own uid (not root, or no interpreter readable by the "
                    "sandbox uid): this protection is not available, see docs/environment.md")


def test_plain_program_runs_with_empty_env_in_fresh_dir(monkeypatch):
    monkeypatch.setenv("JAXHACK_TEST_SECRET", "do-not-leak")
    program = ("import os, sys\n"
               "print(sorted(k for k in os.environ if 'SECRET' in k or 'PATH' in k))\n"
               "print(os.getcwd())\nprint(sys.stdin.read())\n"
               "os.write(CHANNEL_FD, b'verdict')\n")
    result = run_program(SandboxJob(program, b"payload"), FAST)
    lines = result.stdout.decode().splitlines()
    assert result.exited_cleanly
    assert lines[0] == "[]"
    assert "jaxhack_sandbox_" in lines[1] and lines[1] != os.getcwd()
    assert result.stderr == b""
    assert lines[2] == "payload"
    assert result.channel == b"verdict"


def test_hostile_programs_all_end_as_failures_in_one_parallel_batch():
    programs = {
        "infinite_loop": "while True:\n    pass\n",
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "memory_hog": "block = bytearray(8 << 30)\n",
        "sleeping_daemon": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                            "time.sleep(60)\n"),
        "closes_pipes_and_spins": "import os\nos.close(1)\nos.close(2)\nwhile True:\n    pass\n",
        "fine": "print('ok')\n",
    }
    token = f"hostile-batch-{os.getpid()}-{time.time_ns()}"
    start = time.monotonic()
    results = dict(zip(programs, run_programs([SandboxJob(f"# {token}\n{p}") for p in programs.values()],
                                              FAST, max_workers=len(programs))))
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"hostile batch took {elapsed:.1f}s"
    # the output cap, in a batch of its own: beside the fork bomb and the spinners on a loaded 2-core
    # box (the suite's other xdist worker) it could be starved past the 2 s wall limit before writing
    big = "import sys\nsys.stdout.write('x' * 100_000_000)\n"
    results["big_print"], = run_programs([SandboxJob(f"# {token}\n{big}")], FAST)
    assert results["fine"].exited_cleanly and results["fine"].stdout == b"ok\n"
    assert results["infinite_loop"].timed_out
    assert results["closes_pipes_and_spins"].timed_out or results["closes_pipes_and_spins"].exit_code != 0
    assert not results["fork_bomb"].exited_cleanly
    assert not results["memory_hog"].timed_out and b"MemoryError" in results["memory_hog"].stderr
    assert results["big_print"].output_exceeded and len(results["big_print"].stdout) == 1 << 16
    assert not results["sleeping_daemon"].exited_cleanly
    if sandbox_identity().drop_privileges:  # every process of the runs' uids was killed, daemons too
        assert _live_processes_with(token) == []


def test_child_cannot_kill_the_grader():
    _needs_own_uid()
    program = ("import os, signal\n"
               "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
               f"for target in (os.getppid(), -1, {os.getpid()}):\n"
               "    try:\n        os.kill(target, signal.SIGKILL)\n"
               "    except OSError as err:\n        print(type(err).__name__)\n")
    result = run_program(SandboxJob(program), FAST)
    assert os.getpid() > 0  # still here
    lines = result.stdout.decode().splitlines()
    if sandbox_identity().isolation == "namespaces":  # the grader is not even visible: own PID namespace
        assert lines[0] == "[1]"
        assert lines[-1] == "ProcessLookupError"  # the grader's pid does not exist in there
    else:
        assert lines[1] == "PermissionError"  # getppid() is the grader


def test_child_cannot_write_outside_its_dir(tmp_path):
    _needs_own_uid()
    target = tmp_path / "clobbered.txt"
    repo_file = __file__
    before = open(repo_file, "rb").read()
    program = (f"for path in ({str(target)!r}, {repo_file!r}):\n"
               "    try:\n        open(path, 'w').write('x')\n"
               "    except OSError as err:\n        print(type(err).__name__)\n"
               "open('relative.txt', 'w').write('inside')\n")
    result = run_program(SandboxJob(program, read_files=("relative.txt",)), FAST)
    assert not target.exists()
    assert open(repo_file, "rb").read() == before
    # the uid sandbox refuses (PermissionError); in the namespace sandbox neither path exists
    assert result.stdout.decode().split() in (["PermissionError"] * 2, ["FileNotFoundError"] * 2)
    assert result.files == {"relative.txt": b"inside"}
    assert not os.path.exists("relative.txt")


def test_read_back_ignores_symlinks_and_fifos():
    program = ("import os\nos.symlink('/etc/hostname', 'result.txt')\nos.mkfifo('fifo.txt')\n")
    result = run_program(SandboxJob(program, read_files=("result.txt", "fifo.txt")), FAST)
    assert result.exited_cleanly
    assert result.files == {}


def test_concurrent_grader_processes_never_share_a_sandbox_uid():
    _needs_own_uid()
    import subprocess
    import sys

    from jaxhack.env.sandbox import _acquire_uid, _release_uid

    holder = subprocess.Popen(
        [sys.executable, "-c", "from jaxhack.env.sandbox import _acquire_uid\nimport sys, time\n"
         "uid, _ = _acquire_uid()\nprint(uid, flush=True)\ntime.sleep(30)\n"],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        held_elsewhere = int(holder.stdout.readline())
        mine = [_acquire_uid() for _ in range(3)]
        assert held_elsewhere not in [uid for uid, _ in mine]
        assert len({uid for uid, _ in mine}) == 3
        for _, fd in mine:
            _release_uid(fd)
    finally:
        holder.kill()
        holder.wait()
