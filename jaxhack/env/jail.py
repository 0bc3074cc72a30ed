"""The namespace jail of a sandboxed run (isolation "namespaces", see `jaxhack.env.sandbox` and
docs/environment.md): the trusted prologue that unshares the mount, PID, network, IPC and UTS
namespaces, builds a fresh read-only root around the run dir, pivots into it and drops to the run's
uid; and the host dirs that root is made of.
"""
from __future__ import annotations

import glob
import os
import subprocess

SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
DEVICES = ("null", "zero", "full", "random", "urandom")
JAIL_RUN_DIR = "/sandbox"  # where a namespaced run sees its run dir (as JAIL_RUN_DIR/<basename>)
TMPFS_SIZE = "64m"         # per-run private /tmp and /dev/shm

# Trusted source run first, as root, in the process Popen starts (before the limits prologue and the
# job's program). Format fields: flags, jail_root, binds, symlinks, hidden, run_dir, jail_run_dir,
# uid, tmpfs_size. The process unshares the namespaces and forks: the parent stays in the host's
# namespaces and only relays the child's exit status (or dies of the same signal); the child is
# PID 1 of the new PID namespace, builds the root, pivots into it and drops to `uid`.
_NAMESPACE_PROLOGUE = r"""
import _ctypes, os as _os, _signal  # the C modules: `signal` imports enum (~8 ms of CPU per run)
def _jail():
    class ULong(_ctypes._SimpleCData):
        _type_ = "L"
    class Int(_ctypes._SimpleCData):
        _type_ = "i"
    class Function(_ctypes.CFuncPtr):  # what ctypes.CDLL builds, without importing ctypes (~6 ms)
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = Int
    class Libc:
        _handle = _ctypes.dlopen(None, 0)
        def __getattr__(self, name):
            return Function((name, self))
    libc = Libc()
    def check(rc, what):
        if rc != 0:
            _os.write(2, ("jaxhack sandbox: namespace setup failed at %s: %s\n"
                          % (what, _os.strerror(_ctypes.get_errno()))).encode())
            _os._exit(125)
    def mount(src, dst, fstype, flags, data=None):
        check(libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(),
                         ULong(flags), data and data.encode()), "mount " + dst)
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 262144
    check(libc.unshare({flags}), "unshare")
    pid = _os.fork()
    if pid:
        while True:
            try:
                status = _os.waitpid(pid, 0)[1]
                break
            except InterruptedError:
                continue
        if _os.WIFSIGNALED(status):
            import resource
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            _signal.signal(_os.WTERMSIG(status), _signal.SIG_DFL)
            _os.kill(_os.getpid(), _os.WTERMSIG(status))
        _os._exit(_os.waitstatus_to_exitcode(status) & 255)
    root = {jail_root!r}
    mount(None, "/", None, REC | PRIVATE)
    mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "size=1m,mode=755")
    for link, target in {symlinks!r}:
        _os.makedirs(_os.path.dirname(root + link), exist_ok=True)
        _os.symlink(target, root + link)
    for src in {binds!r}:
        _os.makedirs(root + src, exist_ok=True)
        mount(src, root + src, None, BIND | REC)
        mount(None, root + src, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
    for hidden in {hidden!r}:
        mount("tmpfs", root + hidden, "tmpfs", RDONLY | NOSUID | NODEV, "size=4k,mode=755")
    _os.mkdir(root + "/proc")
    mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)
    _os.mkdir(root + "/dev")
    mount("tmpfs", root + "/dev", "tmpfs", NOSUID, "size=64k,mode=755")
    for name in {devices!r}:
        open(root + "/dev/" + name, "w").close()
        mount("/dev/" + name, root + "/dev/" + name, None, BIND)
    for private in ("/tmp", "/dev/shm"):
        _os.mkdir(root + private)
        mount("tmpfs", root + private, "tmpfs", NOSUID | NODEV, "size={tmpfs_size},mode=1777")
    _os.makedirs(root + {jail_run_dir!r})
    mount({run_dir!r}, root + {jail_run_dir!r}, None, BIND)
    mount(None, root + {jail_run_dir!r}, None, REMOUNT | BIND | NOSUID | NODEV)
    mount(None, root + "/dev", None, REMOUNT | RDONLY | NOSUID)
    _os.chdir(root)
    check(libc.pivot_root(b".", b"."), "pivot_root")
    check(libc.umount2(b".", 2), "umount old root")  # MNT_DETACH
    mount(None, "/", None, REMOUNT | RDONLY | NOSUID | NODEV)
    _os.chdir({jail_run_dir!r})
    _os.setgroups([])
    _os.setgid({uid})
    _os.setuid({uid})
    libc.prctl(1, _signal.SIGKILL)  # PR_SET_PDEATHSIG, after setuid (which clears it)
_jail()
del _jail, _os, _signal
"""

# unshare(2) flags: CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET
_UNSHARE_FLAGS = 0x00020000 | 0x04000000 | 0x08000000 | 0x20000000 | 0x40000000


def namespace_prologue(identity, run_dir: str, uid: int) -> tuple[str, str]:
    """(prologue source, the run dir's path inside the jail) for one namespaced run."""
    binds, symlinks = [], []
    for path in identity.bind_dirs:
        if os.path.islink(path):
            symlinks.append((path, os.readlink(path)))
        else:
            binds.append(path)
    jail_run_dir = f"{JAIL_RUN_DIR}/{os.path.basename(run_dir)}"
    source = _NAMESPACE_PROLOGUE.format(
        flags=_UNSHARE_FLAGS, jail_root=identity.jail_root, symlinks=tuple(symlinks),
        binds=tuple(binds), hidden=identity.hidden_dirs, devices=DEVICES, run_dir=run_dir,
        jail_run_dir=jail_run_dir, uid=int(uid), tmpfs_size=TMPFS_SIZE)
    return source, jail_run_dir


def interpreter_prefix(interpreter: str) -> tuple[str, str] | None:
    """(sys.base_prefix, real path of the interpreter) as the interpreter reports them; None when it
    does not run."""
    try:
        done = subprocess.run(
            [interpreter, "-I", "-S", "-B", "-c",
             "import os, sys; print(sys.base_prefix); print(os.path.realpath(sys.executable))"],
            env={}, cwd="/", stdin=subprocess.DEVNULL, capture_output=True, timeout=30, text=True)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.splitlines()
    return (lines[0], lines[1]) if done.returncode == 0 and len(lines) == 2 else None




def jail_dirs(interpreter: str) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    """(real interpreter path, dirs bound read-only into the jail, dirs hidden under them) for
    `interpreter`; None when it does not run. Bound: the system dirs and the interpreter's prefix;
    hidden: that prefix's site-packages and the system's dist-/site-packages dirs."""
    found = interpreter_prefix(interpreter)
    if found is None:
        return None
    prefix, real = found
    extra = [d for d in (prefix, os.path.dirname(os.path.dirname(real)))
             if not any(d == s or d.startswith(s + "/") for s in SYSTEM_DIRS)]
    bind_dirs = tuple(d for d in SYSTEM_DIRS if os.path.lexists(d)) + tuple(dict.fromkeys(extra))
    hidden = tuple(
        os.path.join(base, "lib", name, "site-packages") for base in dict.fromkeys(extra)
        for name in (os.listdir(os.path.join(base, "lib")) if os.path.isdir(os.path.join(base, "lib")) else ())
        if name.startswith("python") and os.path.isdir(os.path.join(base, "lib", name, "site-packages")))
    hidden += tuple(sorted(d for d in glob.glob("/usr/lib/python3*/dist-packages")
                           + glob.glob("/usr/local/lib/python3*/*-packages") if os.path.isdir(d)))
    return real, bind_dirs, hidden
