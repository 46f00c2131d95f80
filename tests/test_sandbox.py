"""The sandbox contains what it claims to: each hostile program is reported as a failure and
leaves no trace on the host (files, connections, processes).

The OS-level tests need Linux namespaces; where they are unavailable on Linux they FAIL (with
the reason), they are not skipped. Each attack on a layer also runs once without that layer (a
control), to show that the attack is real and that the layer is what stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from balora.evaluation import sandbox
from balora.evaluation.sandbox import (
    ISOLATION_KEYS,
    NPROC_LIMIT,
    OUTPUT_LIMIT_CHARS,
    STATUSES,
    IsolationUnavailable,
    check_isolation,
    format_isolation,
    run_many,
    run_untrusted,
    seccomp_filter,
    summarize_isolation,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OS-level sandbox is Linux-only")

FAST = {"timeout_s": 2.0, "memory_mb": 256}
SLACK_S = 3.0  # interpreter start-up + kill + clean-up, generous for a busy 2-core machine
# The same program without namespaces (as root: explicitly allowed): limits, seccomp and the guard only.
NO_NAMESPACES = {**FAST, "namespaces": False, "unsafe_allow_root": True}


@pytest.fixture(scope="module")
def isolation():
    """Every protection must be in force on this Linux machine: a failure names what is missing."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the OS-level sandbox is Linux-only")
    report = check_isolation()
    missing = [key for key in ISOLATION_KEYS if not report[key]]
    assert not missing, f"the sandbox cannot isolate here: {missing} missing ({report['notes']})"
    return report


@pytest.fixture
def shared_dir():
    """A world-writable directory under the temporary directory: any uid could write into it
    (and in the sandbox it is hidden and read-only)."""
    path = Path(tempfile.mkdtemp(prefix="balora-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def no_seccomp(monkeypatch):
    monkeypatch.setattr(sandbox, "seccomp_filter", lambda machine=None: None)


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "Z" not in state.split()[1]


def _processes_with(marker: str) -> list[int]:
    """Pids (host view) of live processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if marker.encode() in (entry / "cmdline").read_bytes() and _alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _marker() -> str:
    return f"balora-sandbox-test-{os.getpid()}-{time.monotonic_ns()}"


def _sleeper(marker: str, code: str = "import time; time.sleep(30)") -> str:
    """Source lines that replace the current (forked) process by a Python that runs ``code``
    with ``marker`` in its command line, so the host can find it in /proc."""
    return f"posix.execv(sys.executable, [sys.executable, '-c', {code!r}, {marker!r}])"


class RecordingServer:
    """A stream server (TCP on 127.0.0.1, or AF_UNIX at a path) that records every connection."""

    def __init__(self, unix_path: Path | None = None):
        if unix_path is None:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", 0))
            self.address = self.sock.getsockname()
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(str(unix_path))
            unix_path.chmod(0o777)  # anyone may connect
            self.address = str(unix_path)
        self.sock.listen(8)
        self.sock.settimeout(0.05)
        self.accepted: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except (TimeoutError, socket.timeout, OSError):
                continue
            self.accepted.append(addr)
            conn.close()

    def reached(self) -> bool:
        time.sleep(0.2)
        return bool(self.accepted)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def _working_server(srv: RecordingServer) -> RecordingServer:
    family = socket.AF_INET if isinstance(srv.address, tuple) else socket.AF_UNIX
    with socket.socket(family, socket.SOCK_STREAM) as client:  # a connection from the host is recorded
        client.settimeout(2)
        client.connect(srv.address)
    deadline = time.monotonic() + 2
    while not srv.accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(srv.accepted) == 1
    srv.accepted.clear()
    return srv


@pytest.fixture
def server():
    srv = _working_server(RecordingServer())
    yield srv
    srv.close()


@pytest.fixture
def unix_server(shared_dir):
    srv = _working_server(RecordingServer(shared_dir / "host.sock"))
    yield srv
    srv.close()


# ----------------------------------------------------------------------------- ordinary programs


def test_correct_program_passes_and_stdout_is_captured():
    result = run_untrusted("def f(x):\n    return 2 * x\n\nassert f(21) == 42\nprint('answer', f(21))\n", **FAST)
    assert result.status == "passed" and result.passed
    assert result.returncode == 0
    assert result.stdout == "answer 42\n"
    assert result.stderr == ""
    assert 0 < result.seconds < FAST["timeout_s"]


def test_failing_assert_and_syntax_error_fail():
    result = run_untrusted("print('before')\nassert False, 'wrong answer'\n", **FAST)
    assert result.status == "failed" and result.returncode == 1
    assert result.stdout == "before\n"
    assert "AssertionError: wrong answer" in result.stderr
    broken = run_untrusted("def f(:\n    pass\n", **FAST)
    assert broken.status == "failed" and "SyntaxError" in broken.stderr


def test_exiting_early_is_not_a_pass():
    # A solution that calls sys.exit(0) before the tests would otherwise look like a pass.
    result = run_untrusted("import sys\nsys.exit(0)\nassert False\n", **FAST)
    assert result.status == "failed"
    assert "SystemExit" in result.stderr


@pytest.mark.parametrize("exit_call", ["import os\nos._exit(0)", "import posix\nposix._exit(0)"])
def test_exiting_with_code_zero_before_the_end_is_not_a_pass(exit_call):
    # os._exit skips every handler: the exit code alone (0) would call this a pass
    result = run_untrusted(f"print('partial', flush=True)\n{exit_call}\nassert False\n", **FAST)
    assert result.returncode == 0
    assert result.status == "failed" and not result.passed
    assert result.stdout == "partial\n"


def test_the_completion_token_is_not_part_of_the_output_and_differs_per_run():
    program = "import sys\nprint(sys.stdin.read() == '')\n"  # stdin is empty for the program
    first, second = run_untrusted(program, **FAST), run_untrusted(program, **FAST)
    assert first.passed and second.passed
    assert first.stdout == second.stdout == "True\n"


def test_fresh_working_directory_is_writable_and_deleted_afterwards():
    program = (
        "import os, tempfile, pathlib\n"
        "pathlib.Path('notes.txt').write_text('scratch')\n"
        "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n"
        "    f.write('x')\n"
        "os.mkdir('sub'); os.remove('notes.txt')\n"
        "print(os.getcwd())\n"
        "print(sorted(os.listdir('.')))\n"
    )
    first = run_untrusted(program, **FAST)
    second = run_untrusted(program, **FAST)
    assert first.status == "passed", first.stderr
    cwd, listing = first.stdout.splitlines()
    assert "sub" in listing and "notes.txt" not in listing
    assert cwd != second.stdout.splitlines()[0]  # a new directory for every run
    assert not Path(cwd).exists() and not Path(cwd).parent.exists()


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("BALORA_FAKE_TOKEN", "s3cret")
    result = run_untrusted("import os, json\nprint(json.dumps(dict(os.environ)))\nprint(os.getcwd())\n", **FAST)
    env_line, cwd = result.stdout.splitlines()
    env = json.loads(env_line)
    assert "HTTPS_PROXY" not in env and "BALORA_FAKE_TOKEN" not in env
    assert "s3cret" not in result.stdout
    assert env["HOME"] == cwd and env["TMPDIR"] == cwd
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE",
                        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}


def test_resource_limits_are_set_in_the_child():
    program = (
        "import resource\n"
        "for name in ('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_FSIZE', 'RLIMIT_CORE', 'RLIMIT_NPROC'):\n"
        "    print(name, *resource.getrlimit(getattr(resource, name)))\n"
    )
    result = run_untrusted(program, timeout_s=2.0, memory_mb=300)
    limits = {name: (int(soft), int(hard)) for name, soft, hard in map(str.split, result.stdout.splitlines())}
    assert limits["RLIMIT_AS"] == (300 * 2**20, 300 * 2**20)
    assert limits["RLIMIT_CPU"] == (3, 4)
    assert limits["RLIMIT_FSIZE"] == (sandbox.FILE_SIZE_LIMIT_MB * 2**20,) * 2
    assert limits["RLIMIT_CORE"] == (0, 0)
    if result.unprivileged and sys.platform.startswith("linux"):  # the count is the dropped uid's alone
        assert limits["RLIMIT_NPROC"] == (NPROC_LIMIT, NPROC_LIMIT)


def test_output_is_truncated_to_head_and_tail():
    result = run_untrusted("print('A' * 50_000 + 'B' * 50_000)\n", **FAST)
    assert result.status == "passed"
    assert len(result.stdout) <= OUTPUT_LIMIT_CHARS + 100
    assert result.stdout.startswith("AAAA") and result.stdout.rstrip().endswith("BBBB")
    assert "bytes cut" in result.stdout


def test_invalid_arguments():
    for bad in ({"timeout_s": 0}, {"timeout_s": float("nan")}, {"timeout_s": float("inf")}, {"memory_mb": -1}):
        with pytest.raises(ValueError, match="finite and positive"):
            run_untrusted("pass", **bad)
    with pytest.raises(ValueError, match="namespaces must be None, True or False"):
        run_untrusted("pass", namespaces="yes")
    with pytest.raises(ValueError, match="workers"):
        run_many(["pass"], workers=0)


# ----------------------------------------------------------------------------- what is in force


@linux_only
def test_every_protection_is_in_force_and_reported(isolation):
    result = run_untrusted("pass", **FAST)
    assert result.passed
    assert result.isolation == {**dict.fromkeys(ISOLATION_KEYS, True), "unsafe_allow_root": False, "notes": []}
    assert isolation == result.isolation  # the probe predicts what a run gets
    line = format_isolation(summarize_isolation([result, result]))
    assert line == " ".join(f"{key}=yes" for key in ISOLATION_KEYS) and "\n" not in line
    assert summarize_isolation([]) == {}


@linux_only
def test_inside_the_sandbox(isolation):
    """What the program sees: PID 1 of its own namespace, no capabilities, the seccomp filter,
    only a loopback interface, and nothing writable but its directory."""
    program = (
        "import os, json\n"
        "status = dict(l.rstrip('\\n').split(':\\t', 1) for l in open('/proc/self/status') if ':\\t' in l)\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "writable = [m.split()[4] for m in open('/proc/self/mountinfo') if 'ro' not in m.split()[5].split(',')]\n"
        "print(json.dumps({'pid': os.getpid(), 'pids': pids, 'cap': status['CapEff'], 'bnd': status['CapBnd'],\n"
        "                  'nnp': status['NoNewPrivs'], 'seccomp': status['Seccomp'], 'writable': writable,\n"
        "                  'tmp': os.listdir('/tmp'), 'cwd': os.getcwd()}))\n"
    )
    result = run_untrusted(program, **FAST)
    seen = json.loads(result.stdout)
    assert seen["pid"] == 1 and seen["pids"] == [1]
    assert int(seen["cap"], 16) == 0 and int(seen["bnd"], 16) == 0
    assert (seen["nnp"], seen["seccomp"]) == ("1", "2")
    visible_writable = [m for m in seen["writable"] if m == seen["cwd"]]
    assert visible_writable, "the working directory must be a writable mount"
    # /tmp is empty but for the run's own directory (and the Python installation, bound back in,
    # when it lives under /tmp, as in a checkout there)
    python_dirs = {Path(os.path.realpath(p)) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                       sys.base_exec_prefix, os.path.dirname(sys.executable))}
    under_tmp = {d.relative_to("/tmp").parts[0] for d in python_dirs if d.is_relative_to("/tmp")}
    assert sorted(seen["tmp"]) == sorted({Path(seen["cwd"]).parent.name, *under_tmp})


@linux_only
def test_the_host_file_system_is_untouched_by_a_run(isolation, tmp_path):
    """The read-only remounts happen in the child's mount namespace only."""
    before = Path("/proc/self/mountinfo").read_text()
    assert run_untrusted("pass", **FAST).read_only_fs
    assert Path("/proc/self/mountinfo").read_text() == before
    (tmp_path / "still-writable").write_text("yes")


def test_root_without_isolation_is_refused_unless_allowed(monkeypatch):
    real_probe = sandbox._probe
    monkeypatch.setattr(sandbox, "_probe", lambda namespaced: (None, {"notes": ["simulated: no unshare"]})
                        if namespaced else real_probe(False))
    with pytest.raises(ValueError, match="namespaces were required.*simulated"):
        run_untrusted("pass", namespaces=True)
    if os.geteuid() == 0:
        for namespaces in (None, False):
            refused = "refusing to run generated code as root.*unsafe-allow-root"
            with pytest.raises(IsolationUnavailable, match=refused) as info:
                run_untrusted("pass", namespaces=namespaces)
            assert "\n" not in str(info.value)
        with pytest.raises(IsolationUnavailable, match="pid_namespace"):
            check_isolation()
        with pytest.raises(IsolationUnavailable):
            run_many(["pass"], progress=False)
    result = run_untrusted("pass", unsafe_allow_root=True, **FAST)
    assert result.passed
    assert result.unsafe_allow_root and not result.pid_namespace and not result.read_only_fs
    assert "simulated: no unshare" in result.isolation["notes"]
    assert "unsafe_allow_root=yes" in format_isolation(result.isolation)


@linux_only
def test_the_runner_refuses_what_root_needs_but_cannot_get(isolation, monkeypatch):
    # A user namespace that maps root to root: the namespaces work but uid 65534 does not exist
    # in it, so the privilege drop fails. The runner itself must refuse before the program.
    if os.geteuid() != 0:
        pytest.skip("only root is refused")
    command = (shutil.which("unshare"), *sandbox.USER_NAMESPACE_FLAGS, *sandbox.NAMESPACE_FLAGS)
    monkeypatch.setattr(sandbox, "_probe", lambda namespaced: (command, {**dict.fromkeys(ISOLATION_KEYS, True)}))
    start = time.monotonic()
    with pytest.raises(IsolationUnavailable, match="without unprivileged"):
        run_untrusted("import time\ntime.sleep(5)\n", **FAST)
    assert time.monotonic() - start < FAST["timeout_s"]  # refused before the program, not timed out


# ----------------------------------------------------------------------------- containment


def test_infinite_loop_times_out_quickly():
    start = time.monotonic()
    result = run_untrusted("while True:\n    pass\n", timeout_s=1.0, memory_mb=256)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and not result.passed
    assert 1.0 <= result.seconds < 1.0 + SLACK_S
    assert elapsed < 1.0 + SLACK_S


@linux_only
def test_timeout_kills_every_process_of_the_program():
    # posix.fork bypasses the Python guard; the OS must still reap both loops.
    marker = _marker()
    program = (f"import posix, sys\nif posix.fork() == 0:\n    {_sleeper(marker, 'while True: pass')}\n"
               "while True:\n    pass\n")
    result = run_untrusted(program, timeout_s=1.0, memory_mb=256)
    assert result.status == "timeout"
    assert _processes_with(marker) == []


@linux_only
def test_leftover_background_process_is_killed_when_program_ends():
    marker = _marker()
    program = f"import posix, sys, time\nif posix.fork() == 0:\n    {_sleeper(marker)}\ntime.sleep(0.3)\n"
    result = run_untrusted(program, **FAST)
    assert result.status == "passed"
    assert result.seconds < FAST["timeout_s"]  # did not wait for the sleeping child
    assert _processes_with(marker) == []


@linux_only
def test_a_setsid_escape_dies_with_the_sandbox(isolation, shared_dir):
    """A grandchild in its own session (out of the process group) that would write a file later."""
    target = shared_dir / "written-after-the-result"
    late_write = f"import time, pathlib; time.sleep(1.0); pathlib.Path({str(target)!r}).write_text('escaped')"

    def escape(marker):  # the program ends once its grandchild runs (as a marked process) in a new session
        return (f"import posix, sys, time\nchild = posix.fork()\nif child == 0:\n    posix.setsid()\n"
                f"    if posix.fork() == 0:\n        {_sleeper(marker, late_write)}\n    posix._exit(0)\n"
                "posix.waitpid(child, 0)\ntime.sleep(0.5)\n")

    marker = _marker()
    result = run_untrusted(escape(marker), **FAST)
    assert result.passed and result.pid_namespace
    assert _processes_with(marker) == []  # gone when the result is back
    time.sleep(1.5)
    assert not target.exists()

    control = _marker()  # without a PID namespace the escape survives the process-group kill
    assert run_untrusted(escape(control), **NO_NAMESPACES).passed
    survivors = _processes_with(control)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors, "the control escape should have outlived the run without a PID namespace"


@linux_only
def test_fork_bomb_hits_the_process_limit(isolation):
    """100 forks with posix.fork (past the guard): as root on the host too, since the program runs
    as an unprivileged uid, RLIMIT_NPROC stops it; nothing is left afterwards."""
    marker = _marker()
    program = (
        "import posix, sys\nforks = 0\ntry:\n    for _ in range(100):\n"
        f"        if posix.fork() == 0:\n            {_sleeper(marker)}\n        forks += 1\n"
        "finally:\n    print(forks, flush=True)\n"
    )
    result = run_untrusted(program, timeout_s=5.0, memory_mb=256)
    assert result.unprivileged
    assert result.status == "failed" and "BlockingIOError" in result.stderr
    assert int(result.stdout) < NPROC_LIMIT
    assert _processes_with(marker) == []


@linux_only
@pytest.mark.parametrize("attack", [
    "import posix\nposix.close(posix.open({target!r}, posix.O_WRONLY | posix.O_CREAT))",
    "import _io\n_io.FileIO({target!r}, 'w').close()",
    "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "assert libc.open({target!r}.encode(), os.O_WRONLY | os.O_CREAT, 0o644) >= 0, os.strerror(ctypes.get_errno())",
    "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "assert libc.rename({victim!r}.encode(), {moved!r}.encode()) == 0, os.strerror(ctypes.get_errno())",
    "import posix\nposix.rename({victim!r}, {moved!r})",
], ids=["posix.open", "_io.FileIO", "ctypes-open", "ctypes-rename", "posix.rename"])
def test_writes_that_bypass_the_guard_leave_the_host_unchanged(isolation, shared_dir, monkeypatch, attack):
    target, victim, moved = shared_dir / "created", shared_dir / "victim", shared_dir / "moved"
    program = attack.format(target=str(target), victim=str(victim), moved=str(moved)) + "\n"

    def untouched():
        return not target.exists() and not moved.exists() and victim.read_text() == "precious"

    victim.write_text("precious")
    victim.chmod(0o666)
    result = run_untrusted(program, **FAST)  # the directory is hidden (tmpfs over /tmp)
    assert result.status == "failed" and untouched()
    with monkeypatch.context() as m:  # nothing hidden: the read-only mount alone stops it
        m.setattr(sandbox, "HIDDEN_DIRS", ())
        alone = run_untrusted(program, **FAST)
    assert alone.status == "failed" and untouched()
    assert "Read-only file system" in alone.stderr or "EROFS" in alone.stderr
    control = run_untrusted(program, **NO_NAMESPACES)  # the attack works without the mount namespace
    assert control.passed and not untouched()


@linux_only
def test_a_root_only_file_is_not_readable(isolation, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("a root-only file is readable by its owner anyway")
    folder = Path(tempfile.mkdtemp(prefix="balora-test-"))
    try:
        secret = folder / "secret"
        secret.write_text("s3cret-value")
        secret.chmod(0o600)
        folder.chmod(0o755)
        program = f"print(open({str(secret)!r}).read())\n"
        with monkeypatch.context() as m:  # visible: only the dropped uid stands in the way
            m.setattr(sandbox, "HIDDEN_DIRS", ())
            visible = run_untrusted(program, **FAST)
        hidden = run_untrusted(program, **FAST)
    finally:
        shutil.rmtree(folder)
    assert visible.status == "failed" and "PermissionError" in visible.stderr
    assert hidden.status == "failed" and "FileNotFoundError" in hidden.stderr
    assert "s3cret-value" not in visible.stdout + visible.stderr + hidden.stdout + hidden.stderr


@linux_only
@pytest.mark.parametrize("mode", ["isolated", "seccomp-only", "control"])
def test_raw_socket_to_a_loopback_server(isolation, server, request, mode):
    # _socket.socket is the unpatched C type: the guard does not stand in the way
    program = (
        "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(1)\n"
        f"s.connect(('127.0.0.1', {server.address[1]}))\n"
    )
    if mode == "control":  # neither a network namespace nor seccomp: the server is reached
        request.getfixturevalue("no_seccomp")
    result = run_untrusted(program, **(FAST if mode == "isolated" else NO_NAMESPACES))
    if mode == "control":
        assert result.passed and server.reached()
        return
    assert result.status == "failed" and "PermissionError" in result.stderr
    assert not server.reached()


@linux_only
@pytest.mark.parametrize("mode", ["isolated", "seccomp-only", "control"])
def test_af_unix_connect_to_a_host_socket(isolation, unix_server, request, mode):
    # AF_UNIX crosses network namespaces: seccomp (and hiding /tmp) must stop it
    program = (
        "import _socket\ns = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
        f"s.connect({unix_server.address!r})\n"
    )
    if mode == "control":
        request.getfixturevalue("no_seccomp")
    result = run_untrusted(program, **(FAST if mode == "isolated" else NO_NAMESPACES))
    if mode == "control":
        assert result.passed and unix_server.reached()
        return
    assert result.status == "failed" and "PermissionError" in result.stderr
    assert not unix_server.reached()


@pytest.mark.parametrize("namespaces", [None, False], ids=["default", "guard-only"])
def test_network_call_through_the_socket_module_fails(server, namespaces):
    program = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {server.address[1]}), timeout=1)\n"
        "s.sendall(b'exfiltrated')\n"
    )
    options = {**FAST, "namespaces": namespaces, "unsafe_allow_root": namespaces is False}
    result = run_untrusted(program, **options)
    assert result.status == "failed" and "PermissionError" in result.stderr
    also = run_untrusted(f"import socket\nsocket.socket().connect(('127.0.0.1', {server.address[1]}))\n", **options)
    assert also.status == "failed"
    assert not server.reached()


@linux_only
def test_what_the_seccomp_filter_still_allows(isolation):
    """Stream socketpairs (asyncio's self-pipe) and threads (clone3 -> ENOSYS -> clone) still work."""
    program = (
        "import socket, threading\na, b = socket.socketpair()\na.sendall(b'x')\nassert b.recv(1) == b'x'\n"
        "box = []\nt = threading.Thread(target=box.append, args=(1,))\nt.start()\nt.join()\nassert box == [1]\n"
        "try:\n    socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "except PermissionError:\n    print('dgram pair refused')\n"
    )
    result = run_untrusted(program, **FAST)
    assert result.passed, result.stderr
    assert result.stdout == "dgram pair refused\n"


@linux_only
def test_no_filter_on_an_unknown_machine_is_reported(isolation, no_seccomp):
    result = run_untrusted("import _socket\n_socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n", **FAST)
    assert result.passed and not result.seccomp
    assert any("no seccomp filter" in note for note in result.isolation_notes)
    assert result.pid_namespace and result.network_isolated  # the rest still holds


def _bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = (0,) * 6) -> int:
    """A naive classic-BPF interpreter over struct seccomp_data (int nr, u32 arch, u64 ip, u64 args[6])."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *args)
    code = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    pc = acc = 0
    while True:
        op, jt, jf, k = code[pc]
        if op == 0x20:  # ld [k]
            acc, pc = struct.unpack_from("=I", data, k)[0], pc + 1
        elif op == 0x54:  # and k
            acc, pc = acc & k, pc + 1
        elif op in (0x15, 0x35, 0x45):  # jeq / jge / jset
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[op]
            pc += 1 + (jt if taken else jf)
        elif op == 0x06:  # ret k
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {op:#x}")


def test_seccomp_filter_decisions_against_a_reference_interpreter():
    allow, eperm, enosys = 0x7FFF0000, 0x50001, 0x50026
    x86, arm = 0xC000003E, 0xC00000B7
    flt = seccomp_filter("x86_64")
    assert len(flt) % 8 == 0
    decisions = {
        "read": (0, x86, ()), "socket AF_UNIX": (41, x86, (1, 1)), "socket AF_INET": (41, x86, (2, 1)),
        "mount": (165, x86, ()), "unshare": (272, x86, ()), "io_uring_setup": (425, x86, ()),
        "fork-like clone": (56, x86, (0x01200011,)), "clone NEWUSER": (56, x86, (0x10000000 | 17,)),
        "clone NEWNET": (56, x86, (0x40000000,)), "clone3": (435, x86, ()),
        "socketpair stream|cloexec": (53, x86, (1, 0x80001)), "socketpair dgram": (53, x86, (1, 2)),
        "i386 socketcall": (102, 0x40000003, ()), "x32 socket": (41 | 0x40000000, x86, ()),
    }
    expected = {"read": allow, "fork-like clone": allow, "socketpair stream|cloexec": allow, "clone3": enosys}
    for name, (nr, arch, args) in decisions.items():
        padded = tuple(args) + (0,) * (6 - len(args))
        assert _bpf(flt, nr, arch, padded) == expected.get(name, eperm), name
    arm_filter = seccomp_filter("aarch64")
    assert _bpf(arm_filter, 198, arm) == eperm  # socket
    assert _bpf(arm_filter, 41, arm) == eperm  # pivot_root (41 is socket on x86_64)
    assert _bpf(arm_filter, 56, arm) == allow  # openat
    assert _bpf(arm_filter, 0, x86) == eperm  # another architecture
    assert seccomp_filter("riscv64") is None


@pytest.mark.parametrize("program", [
    "x = bytearray(8 * 1024 ** 3)\n",  # one 8 GB allocation
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n",  # creeping growth
])
@linux_only
def test_memory_bomb_is_stopped(program):
    # Peak resident memory of this process image in MB (ru_maxrss would include the host
    # process that forked it, since Linux keeps that maximum across exec).
    probe = (
        "try:\n" + "".join("    " + line + "\n" for line in program.splitlines()) +
        "except MemoryError:\n"
        "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "    print(int(hwm.split()[1]) // 1024)\n"
        "    raise\n"
    )
    result = run_untrusted(probe, timeout_s=2.0, memory_mb=256)
    assert result.status == "out_of_memory"
    assert "MemoryError" in result.stderr
    assert 0 < int(result.stdout) < 256  # the child never held more than its limit


def test_os_system_cannot_touch_a_file_outside(tmp_path):
    target = tmp_path / "touched_by_os_system"
    result = run_untrusted(f"import os\nos.system('touch {target}')\n", **FAST)
    assert result.status == "failed"
    assert "os.system is disabled" in result.stderr
    assert not target.exists()


@pytest.mark.parametrize("template", [
    "open({target!r}, 'w').write('pwned')",
    "open({target!r}, 'a').write('pwned')",
    "import pathlib\npathlib.Path({target!r}).write_text('pwned')",
    "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
    "import io\nio.FileIO({target!r}, 'w').close()",
    "import os\nos.chdir('/')\nopen({target!r}.lstrip('/'), 'w')",
    "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('pwned')",
])
def test_the_guard_stops_ordinary_writes_outside_with_a_clear_error(tmp_path, template):
    target = str(tmp_path / "written_outside")
    result = run_untrusted(template.format(target=target) + "\n", **FAST)
    assert result.status == "failed"
    assert "PermissionError" in result.stderr
    assert not Path(target).exists()


def test_deleting_outside_the_working_directory_fails(tmp_path):
    victim = tmp_path / "keep"
    victim.mkdir()
    (victim / "data.txt").write_text("precious")
    program = (
        "import os, shutil\n"
        f"for attempt in (lambda: shutil.rmtree({str(victim)!r}), lambda: os.remove({str(victim / 'data.txt')!r}),\n"
        f"                lambda: os.rename({str(victim / 'data.txt')!r}, 'stolen.txt')):\n"
        "    try:\n        attempt()\n    except PermissionError:\n        print('blocked')\n"
    )
    result = run_untrusted(program, **FAST)
    assert result.stdout.split() == ["blocked"] * 3
    assert (victim / "data.txt").read_text() == "precious"


@linux_only
@pytest.mark.parametrize("spawner", [
    "import subprocess, sys\nfor _ in range(50):\n"
    "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', '{marker}'])",
    "import os\nfor _ in range(50):\n    os.fork()",
    "import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', '{marker}'])",
    "import multiprocessing, time\nfor _ in range(20):\n"
    "    multiprocessing.Process(target=time.sleep, args=(30,), name='{marker}').start()",
], ids=["popen", "fork", "exec", "multiprocessing"])
def test_process_spawning_is_blocked(spawner):
    marker = _marker()
    result = run_untrusted(spawner.format(marker=marker) + "\n", **FAST)
    assert result.status == "failed"
    assert "PermissionError" in result.stderr
    assert _processes_with(marker) == []


# ----------------------------------------------------------------------------- an ordinary user


def _python_for(uid: int) -> str | None:
    """An interpreter that ``uid`` can run, and that can start itself again (as the sandbox
    does) and import tqdm: this one, else the system's python3."""
    check = "import subprocess, sys, tqdm; subprocess.run([sys.executable, '-c', 'pass'], check=True)"
    for candidate in (sys.executable, shutil.which("python3", path="/usr/bin:/bin")):
        if candidate and subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", candidate, "-c", check],
            capture_output=True, env={"PATH": os.defpath, "PYTHONPATH": _import_path()},
        ).returncode == 0:
            return candidate
    return None


def _import_path() -> str:
    import tqdm
    return os.pathsep.join([str(Path(sandbox.__file__).parents[2]), str(Path(tqdm.__file__).parents[1])])


@linux_only
def test_an_ordinary_user_gets_the_same_isolation(isolation, shared_dir):
    """Run as uid 65534 (the user-namespace path: --user --map-root-user, capabilities dropped)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to become an ordinary user")
    python = _python_for(sandbox.UNPRIVILEGED_ID)
    assert python, "no Python interpreter that uid 65534 may run here"
    target = shared_dir / "created-by-an-ordinary-user"
    attack = f"import posix\nposix.close(posix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT))\n"
    script = (
        "import json, sys\nfrom balora.evaluation.sandbox import run_untrusted\n"
        f"r = run_untrusted({attack!r}, timeout_s=3, memory_mb=256)\n"
        "print(json.dumps({'status': r.status, **r.isolation}))\n"
    )
    user = ["setpriv", f"--reuid={sandbox.UNPRIVILEGED_ID}", f"--regid={sandbox.UNPRIVILEGED_ID}", "--clear-groups"]
    env = {"PATH": os.defpath, "PYTHONPATH": _import_path()}
    done = subprocess.run([*user, python, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["status"] == "failed" and not target.exists()
    assert all(seen[key] for key in ISOLATION_KEYS), seen
    control = subprocess.run([*user, python, "-c", f"open({str(target)!r}, 'w')"], env=env)
    assert control.returncode == 0 and target.exists()  # outside the sandbox the same user could write


# ----------------------------------------------------------------------------- many programs


def test_run_many_keeps_order_and_statuses():
    programs = ["print(1)", "assert False", "print(3)", "raise MemoryError", "while True: pass"]
    results = run_many(programs, workers=2, timeout_s=1.0, memory_mb=256, progress=False)
    assert [r.status for r in results] == ["passed", "failed", "passed", "out_of_memory", "timeout"]
    assert results[0].stdout == "1\n" and results[2].stdout == "3\n"
    assert all(r.status in STATUSES for r in results)


def test_child_runs_the_host_interpreter():
    result = run_untrusted("import sys\nprint(sys.executable)\nprint(sys.flags.isolated)\n", **FAST)
    executable, isolated = result.stdout.split()
    assert executable == sys.executable and isolated == "1"
