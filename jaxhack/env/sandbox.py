"""Run a Python program on untrusted code in a fresh, resource-limited, isolated subprocess.

Every run gets:
- a fresh interpreter started as `python -I -S -B -c PROGRAM` (isolated mode: no user site, no
  PYTHON* variables, no site-packages), an empty environment, and a fresh temp dir as its cwd;
- a new session (process group), killed as a whole when the run ends or times out;
- resource limits (CPU seconds, address space, file size, open files, processes, no core dumps) set
  as both soft and hard limits by a prologue that runs before anything else in the child;
- a wall-clock limit and an output cap per stream, enforced by the parent: past either, the run is
  killed and reported as such (never a hang);
- a private result channel: a pipe whose write end the child gets as `CHANNEL_FD`; the parent reads
  it like stdout/stderr, capped.

Isolation levels (`sandbox_identity().isolation`, chosen once per process, see docs/environment.md):
- "namespaces" (root with a working unshare(2), the default here and in CI): a trusted prologue
  gives each run its own mount, PID, network, IPC and UTS namespaces, then builds a fresh root:
  read-only bind mounts of the system dirs (/usr, /lib*, /bin, /sbin) and of the interpreter's
  prefix (site-packages and dist-packages dirs hidden), a private empty /tmp and /dev/shm (tmpfs), a minimal /dev
  (null, zero, full, random, urandom), a /proc of the run's own PID namespace, and the run dir as
  the only writable host directory; pivot_root into it, drop to the run's own uid, set the limits,
  then run the program. The program sees none of the host's other files or processes and has no
  network (only a loopback device that is down); when its first process exits, the kernel kills
  every process of the run.
- "uid" (root, but namespaces refused): each run drops to an unprivileged uid of its own
  (`SLOT_UID_BASE + slot`, no supplementary groups; a uid is held with a flock in SLOT_LOCK_DIR, so
  concurrent grader processes on one host never share one), and every process of that uid is killed
  when the run ends. It can still read world-readable host files and use the network.
- "none" (not root): runs use the grader's own uid; only the limits above hold.
Below "namespaces" the sandbox says so once, loudly (a warning and a line on stderr).

The interpreter must be usable by the run's uid: /usr/bin/python3 is tried first, then the base
interpreter of `sys.executable` (JAXHACK_SANDBOX_PYTHON before both when set).
"""
from __future__ import annotations

import atexit
import fcntl
import functools
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Sequence

from jaxhack.env.jail import jail_dirs, namespace_prologue

SLOT_UID_BASE = 64100  # uids SLOT_UID_BASE .. SLOT_UID_BASE + MAX_SLOTS - 1 serve as sandbox users
MAX_SLOTS = 1024       # shared by every grader process on the host (see _acquire_uid)
MAX_WORKERS = 64       # parallel runs per run_programs call
SLOT_LOCK_DIR = "/run/jaxhack-sandbox-slots"  # root-only; one flock'd file per uid in use


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run.

    wall_s: wall-clock seconds before the run is killed. cpu_s: CPU seconds (RLIMIT_CPU).
    memory_bytes: address-space limit (RLIMIT_AS). max_processes: RLIMIT_NPROC (only effective when
    the run has its own uid). max_output_bytes: cap per stream (stdout, stderr, channel); past it the
    run is killed. max_file_bytes: largest file the child may write (RLIMIT_FSIZE). max_open_files:
    RLIMIT_NOFILE.
    """

    wall_s: float = 30.0
    cpu_s: int = 30
    memory_bytes: int = 1 << 30
    max_processes: int = 32
    max_output_bytes: int = 1 << 20
    max_file_bytes: int = 16 << 20
    max_open_files: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SandboxJob:
    """One run: `program` (trusted harness source, run after the limits prologue), `stdin` bytes fed
    to it, and `read_files` (names in the run dir to read back after it ends)."""

    program: str
    stdin: bytes = b""
    read_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecResult:
    """What one run did.

    exit_code: the child's status (negative: killed by that signal); None when it never started.
    timed_out: killed at the wall limit. output_exceeded: killed for passing an output cap.
    stdout, stderr, channel: bytes read from each stream (at most the cap). files: the requested
    files that existed as regular files (at most max_file_bytes each). wall_s: seconds it ran.
    error: why the run could not start, "" otherwise.
    """

    exit_code: int | None
    timed_out: bool
    output_exceeded: bool
    stdout: bytes
    stderr: bytes
    channel: bytes
    files: dict[str, bytes] = field(default_factory=dict)
    wall_s: float = 0.0
    error: str = ""

    @property
    def exited_cleanly(self) -> bool:
        """Exit status 0 and not killed by the sandbox."""
        return self.exit_code == 0 and not self.timed_out and not self.output_exceeded


@dataclass(frozen=True)
class _Identity:
    """interpreter: the Python that runs sandboxed code. drop_privileges: runs get their own uid.
    isolation: "namespaces", "uid" or "none" (see the module docstring). bind_dirs: host dirs bound
    read-only into a namespaced run's root (system dirs and the interpreter's prefix). hidden_dirs:
    dirs under them covered by an empty read-only tmpfs (the prefix's site-packages). jail_root: the
    host dir on which each namespaced run mounts its own root tmpfs."""

    interpreter: str
    drop_privileges: bool
    isolation: str = "uid"
    bind_dirs: tuple[str, ...] = ()
    hidden_dirs: tuple[str, ...] = ()
    jail_root: str = ""


def _limits_prologue(limits: SandboxLimits, channel_fd: int) -> str:
    """Source that sets every limit (soft = hard) and defines CHANNEL_FD, run first in the child."""
    settings = [
        ("RLIMIT_CPU", limits.cpu_s),
        ("RLIMIT_AS", limits.memory_bytes),
        ("RLIMIT_FSIZE", limits.max_file_bytes),
        ("RLIMIT_NOFILE", limits.max_open_files),
        ("RLIMIT_NPROC", limits.max_processes),
        ("RLIMIT_CORE", 0),
    ]
    lines = ["import resource as _resource"]
    for name, value in settings:
        lines.append(f"_resource.setrlimit(_resource.{name}, ({int(value)}, {int(value)}))")
    lines += ["del _resource", f"CHANNEL_FD = {channel_fd}", ""]
    return "\n".join(lines)


def _namespace_identity(candidates: list[str]) -> _Identity | None:
    """The namespaced identity when a candidate interpreter runs a probe job inside a jail; None
    when namespaces are refused here (then the caller falls back)."""
    if not os.path.exists("/proc/self/ns/pid"):
        return None
    jail_root = tempfile.mkdtemp(prefix="jaxhack_jailroot_")  # stays empty on the host
    os.chmod(jail_root, 0o755)
    atexit.register(_remove_empty_dir, jail_root)
    for interpreter in candidates:
        found = jail_dirs(interpreter)
        if found is None:
            continue
        real, bind_dirs, hidden = found
        identity = _Identity(real, True, "namespaces", bind_dirs, hidden, jail_root)
        probe = run_program(SandboxJob("import json, hashlib, os\nprint(os.getpid(), os.getuid())\n"),
                            SandboxLimits(wall_s=30.0), identity=identity)
        if probe.exited_cleanly and probe.stdout.split()[:1] == [b"1"]:
            return identity
        detail = (probe.error or probe.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        _announce(f"namespaced run with {interpreter} failed ({detail})")
    return None


def _remove_empty_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


_ANNOUNCED: set[str] = set()


def _announce(message: str) -> None:
    """Say `message` once per process, loudly: a warning and a line on stderr."""
    if message in _ANNOUNCED:
        return
    _ANNOUNCED.add(message)
    warnings.warn("jaxhack sandbox: " + message, stacklevel=3)
    print(f"WARNING jaxhack sandbox: {message}", file=sys.stderr, flush=True)


def _interpreter_works(interpreter: str, uid: int | None) -> bool:
    ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    try:
        done = subprocess.run(
            [interpreter, "-I", "-S", "-B", "-c", "import json, hashlib, resource"],
            env={}, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=30, **ids,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@functools.lru_cache(maxsize=1)
def sandbox_identity() -> _Identity:
    """How runs are isolated (see the module docstring): "namespaces" when root and unshare(2)
    works, else "uid" (root), else "none"; anything below "namespaces" is announced once, loudly.
    JAXHACK_SANDBOX_ISOLATION=uid forces the uid sandbox (for comparisons and tests)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    # The system interpreter first: it is what the uid sandbox always ended up using (a home-dir
    # interpreter is not readable by the sandbox uids), and distribution builds are PGO-optimized
    # (here ~30% less CPU on the tests than the pyenv build that runs the grader).
    candidates = [os.environ.get("JAXHACK_SANDBOX_PYTHON"), "/usr/bin/python3", base, sys.executable]
    candidates = list(dict.fromkeys(c for c in candidates if c))
    if os.geteuid() != 0:
        _announce("not running as root: no namespaces and no own uid per run; sandboxed code runs "
                  "as the grader's uid and can read its files and use the network (isolation "
                  "'none', see docs/environment.md)")
        return _Identity(sys.executable, drop_privileges=False, isolation="none")
    if os.environ.get("JAXHACK_SANDBOX_ISOLATION", "") != "uid":
        identity = _namespace_identity(candidates)
        if identity is not None:
            return identity
    uid, lock_fd = _acquire_uid()
    try:
        for interpreter in candidates:
            if _interpreter_works(interpreter, uid):
                _announce("namespaces unavailable (or JAXHACK_SANDBOX_ISOLATION=uid): falling back to "
                          "the uid sandbox; sandboxed code can read world-readable host files and "
                          "use the network (isolation 'uid', see docs/environment.md)")
                return _Identity(interpreter, drop_privileges=True, isolation="uid")
    finally:
        _release_uid(lock_fd)
    _announce("no Python interpreter is usable by an unprivileged uid; sandboxed code runs as root "
              "(isolation 'none', see docs/environment.md)")
    return _Identity(sys.executable, drop_privileges=False, isolation="none")


@functools.lru_cache(maxsize=1)
def _slot_lock_dir() -> str:
    """A directory only root can enter, for the slot lock files; falls back to a private temp dir
    (no coordination with other grader processes) when /run cannot hold one."""
    try:
        os.makedirs(SLOT_LOCK_DIR, mode=0o700, exist_ok=True)
        info = os.lstat(SLOT_LOCK_DIR)
        if stat.S_ISDIR(info.st_mode) and info.st_uid == 0 and stat.S_IMODE(info.st_mode) == 0o700:
            return SLOT_LOCK_DIR
    except OSError:
        pass
    warnings.warn(f"jaxhack sandbox: cannot use {SLOT_LOCK_DIR}; sandbox uids are not coordinated "
                  "with other grader processes on this host", stacklevel=2)
    return tempfile.mkdtemp(prefix="jaxhack_slots_")


def _acquire_uid() -> tuple[int, int]:
    """(uid, lock fd): the first sandbox uid no thread or process on the host holds, locked with
    flock until `_release_uid`. Another grader process's sweep would otherwise kill our runs."""
    lock_dir = _slot_lock_dir()
    while True:
        for slot in range(MAX_SLOTS):
            fd = os.open(os.path.join(lock_dir, f"uid_{SLOT_UID_BASE + slot}"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return SLOT_UID_BASE + slot, fd
        time.sleep(0.05)


def _release_uid(lock_fd: int) -> None:
    os.close(lock_fd)  # closing the only descriptor releases the flock


def _uid_processes(uid: int) -> list[int]:
    """Pids of live (non-zombie) processes owned by `uid` (the owner of /proc/PID)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z":
            pids.append(int(entry))
    return pids


def _kill_everything(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the run's process group, and when it has its own uid, every process of that uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        _kill_uid(uid)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` until none is left (a fork bomb refills between passes)."""
    for _ in range(500):
        pids = _uid_processes(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)


def _read_back(run_dir: str, name: str, cap: int) -> bytes | None:
    """A regular file's first `cap` bytes from the run dir; None when absent or not a plain file."""
    try:
        fd = os.open(os.path.join(run_dir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, cap)
    finally:
        os.close(fd)


def _pump(proc: subprocess.Popen, channel_read: int, stdin_data: bytes, limits: SandboxLimits,
          start: float) -> tuple[dict[str, bytearray], bool, bool]:
    """Feed stdin and read stdout/stderr/channel until all close, the wall limit passes, or a cap is
    exceeded. Returns (outputs by stream, timed_out, output_exceeded)."""
    outputs = {"stdout": bytearray(), "stderr": bytearray(), "channel": bytearray()}
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ, "stdout")
    selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
    selector.register(channel_read, selectors.EVENT_READ, "channel")
    stdin_fd = proc.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    selector.register(stdin_fd, selectors.EVENT_WRITE, "stdin")
    pending = memoryview(stdin_data)
    deadline = start + limits.wall_s
    exited_at = None
    try:
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                return outputs, True, False
            if proc.poll() is not None:
                exited_at = exited_at or now
                if now - exited_at > 0.2:  # descendants still hold a pipe open: stop waiting
                    break
            for key, _ in selector.select(timeout=min(0.05, deadline - now)):
                name = key.data
                if name == "stdin":
                    try:
                        pending = pending[os.write(stdin_fd, pending[:65536]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the child closed stdin early: drop the rest
                        pending = pending[:0]
                    if not len(pending):
                        selector.unregister(stdin_fd)
                        proc.stdin.close()
                    continue
                fd = key.fd
                chunk = os.read(fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                outputs[name] += chunk
                if len(outputs[name]) > limits.max_output_bytes:
                    del outputs[name][limits.max_output_bytes:]
                    return outputs, False, True
        return outputs, False, False
    finally:
        selector.close()


def run_program(job: SandboxJob, limits: SandboxLimits = SandboxLimits(),
                identity: _Identity | None = None) -> ExecResult:
    """Run one job in a fresh sandboxed process and return what it did. Never raises for anything
    the program does; a failure to start is reported in `error`. identity: how to isolate it
    (default `sandbox_identity()`)."""
    identity = identity or sandbox_identity()
    uid, lock_fd = _acquire_uid() if identity.drop_privileges else (None, -1)
    run_dir = tempfile.mkdtemp(prefix="jaxhack_sandbox_")
    channel_read, channel_write = os.pipe()
    start = time.monotonic()
    proc = None
    try:
        namespaced = identity.isolation == "namespaces"
        if uid is not None:
            if not namespaced:  # a namespaced run leaves nothing: its PID namespace dies with it
                _kill_uid(uid)  # leftovers of an earlier run (there should be none)
            os.chown(run_dir, uid, uid)
        os.chmod(run_dir, 0o700)
        source = _limits_prologue(limits, channel_write) + job.program
        cwd = run_dir
        if namespaced:
            jail, _ = namespace_prologue(identity, run_dir, uid)
            source = jail + source
            cwd = "/"
        ids = {} if uid is None or namespaced else {"user": uid, "group": uid, "extra_groups": []}
        try:
            proc = subprocess.Popen(
                [identity.interpreter, "-I", "-S", "-B", "-c", source],
                cwd=cwd, env={}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=(channel_write,), start_new_session=True,
                close_fds=True, **ids,
            )
        except (OSError, subprocess.SubprocessError, ValueError) as err:
            return ExecResult(None, False, False, b"", b"", b"", {}, 0.0, f"could not start: {err}")
        os.close(channel_write)
        channel_write = -1
        outputs, timed_out, exceeded = _pump(proc, channel_read, job.stdin, limits, start)
        if not namespaced or proc.poll() is None:
            # A namespaced run whose relay exited by itself is already gone: the relay waits for PID 1,
            # and PID 1 exits only after the kernel has killed and reaped the rest of its namespace.
            _kill_everything(proc, uid)
        exit_code = proc.wait()
        wall = time.monotonic() - start
        files = {}
        for name in job.read_files:
            content = _read_back(run_dir, name, limits.max_file_bytes)
            if content is not None:
                files[name] = content
        return ExecResult(
            exit_code=exit_code, timed_out=timed_out, output_exceeded=exceeded,
            stdout=bytes(outputs["stdout"]), stderr=bytes(outputs["stderr"]),
            channel=bytes(outputs["channel"]), files=files, wall_s=wall,
        )
    finally:
        if proc is not None:
            if proc.poll() is None:
                _kill_everything(proc, uid)
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None and not stream.closed:
                    stream.close()
        for fd in (channel_read, channel_write):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(run_dir, ignore_errors=True)
        if lock_fd >= 0:
            _release_uid(lock_fd)


def run_programs(jobs: Sequence[SandboxJob], limits: SandboxLimits = SandboxLimits(),
                 max_workers: int | None = None, on_done=None) -> list[ExecResult]:
    """Run `jobs` in parallel (one fresh process each), results in the order of `jobs`.

    max_workers: parallel runs (default: CPU count, at most MAX_WORKERS). on_done: optional callable
    invoked once per finished job (e.g. a progress bar's update).
    """
    workers = max(1, min(max_workers or os.cpu_count() or 1, MAX_WORKERS))
    sandbox_identity()  # probe once before the threads start

    def run_one(job: SandboxJob) -> ExecResult:
        result = run_program(job, limits)
        if on_done is not None:
            on_done()
        return result

    if workers == 1 or len(jobs) <= 1:
        return [run_one(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run_one, jobs))
