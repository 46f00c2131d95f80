"""The sandbox contains what it claims to: each hostile program is reported as a failure and
leaves no trace on the host (files, connections, processes)."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from balora.evaluation import sandbox
from balora.evaluation.sandbox import (
    OUTPUT_LIMIT_CHARS,
    STATUSES,
    network_isolation_available,
    run_many,
    run_untrusted,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inspects /proc")

FAST = {"timeout_s": 2.0, "memory_mb": 256}
SLACK_S = 3.0  # interpreter start-up + kill + clean-up, generous for a busy 2-core machine


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "Z" not in state.split()[1]


def _processes_with(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if marker.encode() in (entry / "cmdline").read_bytes() and _alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class RecordingServer:
    """A TCP server on 127.0.0.1 that records every connection it accepts."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[tuple] = []
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

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def server():
    srv = RecordingServer()
    # The server really works: a connection from the host is recorded.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=2):
        pass
    deadline = time.monotonic() + 2
    while not srv.accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(srv.accepted) == 1
    srv.accepted.clear()
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
        "for name in ('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_FSIZE', 'RLIMIT_CORE'):\n"
        "    print(name, *resource.getrlimit(getattr(resource, name)))\n"
    )
    result = run_untrusted(program, timeout_s=2.0, memory_mb=300)
    limits = {name: (int(soft), int(hard)) for name, soft, hard in map(str.split, result.stdout.splitlines())}
    assert limits["RLIMIT_AS"] == (300 * 2**20, 300 * 2**20)
    assert limits["RLIMIT_CPU"] == (3, 4)
    assert limits["RLIMIT_FSIZE"] == (sandbox.FILE_SIZE_LIMIT_MB * 2**20,) * 2
    assert limits["RLIMIT_CORE"] == (0, 0)


def test_output_is_truncated_to_head_and_tail():
    result = run_untrusted("print('A' * 50_000 + 'B' * 50_000)\n", **FAST)
    assert result.status == "passed"
    assert len(result.stdout) <= OUTPUT_LIMIT_CHARS + 100
    assert result.stdout.startswith("AAAA") and result.stdout.rstrip().endswith("BBBB")
    assert "bytes cut" in result.stdout


def test_invalid_arguments_and_required_namespace(monkeypatch):
    with pytest.raises(ValueError, match="positive"):
        run_untrusted("pass", timeout_s=0)
    monkeypatch.setattr(sandbox, "_namespace_prefix", lambda: None)
    with pytest.raises(ValueError, match="network namespace"):
        run_untrusted("pass", network_namespace=True)
    assert run_untrusted("pass", network_namespace=None, **FAST).network_isolated is False


# ----------------------------------------------------------------------------- containment


def test_infinite_loop_times_out_quickly():
    start = time.monotonic()
    result = run_untrusted("while True:\n    pass\n", timeout_s=1.0, memory_mb=256)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and not result.passed
    assert 1.0 <= result.seconds < 1.0 + SLACK_S
    assert elapsed < 1.0 + SLACK_S


@linux_only
def test_timeout_kills_the_whole_process_group():
    # posix.fork bypasses the Python guard; the OS-level group kill must still reap both loops.
    program = (
        "import posix, sys, time\n"
        "pid = posix.fork()\n"
        "print(pid if pid else posix.getpid(), flush=True)\n"
        "while True:\n    time.sleep(0.01)\n"
    )
    result = run_untrusted(program, timeout_s=1.0, memory_mb=256)
    assert result.status == "timeout"
    pids = [int(p) for p in result.stdout.split()]
    assert pids, result.stderr
    deadline = time.monotonic() + 2
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


@linux_only
def test_leftover_background_process_is_killed_when_program_ends():
    program = (
        "import posix, time\n"
        "child = posix.fork()\n"
        "if child == 0:\n"
        "    time.sleep(30)\n"
        "else:\n"
        "    print(child, flush=True)\n"
        "    time.sleep(0.2)\n"
    )
    result = run_untrusted(program, **FAST)
    assert result.status == "passed"
    assert result.seconds < FAST["timeout_s"]  # did not wait for the sleeping child
    child = int(result.stdout)
    deadline = time.monotonic() + 2
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


@linux_only
@pytest.mark.parametrize("program", [
    "x = bytearray(8 * 1024 ** 3)\n",  # one 8 GB allocation
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n",  # creeping growth
])
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
def test_writing_outside_the_working_directory_fails(tmp_path, template):
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


@pytest.mark.parametrize("network_namespace", [None, False], ids=["default", "guard-only"])
def test_network_call_to_a_local_server_fails(server, network_namespace):
    program = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {server.port}), timeout=1)\n"
        "s.sendall(b'exfiltrated')\n"
    )
    result = run_untrusted(program, network_namespace=network_namespace, **FAST)
    assert result.status == "failed"
    assert "Error" in result.stderr
    time.sleep(0.2)
    assert server.accepted == []
    also_raw = run_untrusted(
        f"import socket\nsocket.socket().connect(('127.0.0.1', {server.port}))\n",
        network_namespace=network_namespace, **FAST,
    )
    assert also_raw.status == "failed" and server.accepted == []


@pytest.mark.skipif(not network_isolation_available(), reason="no network namespace on this machine")
def test_network_namespace_holds_when_the_guard_is_bypassed(server):
    # _socket.socket is the unpatched C type: only the namespace stands in the way.
    program = (
        "import _socket\n"
        "s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
        "s.settimeout(1)\n"
        f"s.connect(('127.0.0.1', {server.port}))\n"
    )
    result = run_untrusted(program, network_namespace=True, **FAST)
    assert result.network_isolated
    assert result.status == "failed"
    assert "OSError" in result.stderr or "unreachable" in result.stderr.lower()
    time.sleep(0.2)
    assert server.accepted == []


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
    marker = f"balora-fork-bomb-{os.getpid()}-{time.monotonic_ns()}"
    result = run_untrusted(spawner.format(marker=marker) + "\n", **FAST)
    assert result.status == "failed"
    assert "PermissionError" in result.stderr
    assert _processes_with(marker) == []


# ----------------------------------------------------------------------------- many programs


def test_run_many_keeps_order_and_statuses():
    programs = ["print(1)", "assert False", "print(3)", "raise MemoryError", "while True: pass"]
    results = run_many(programs, workers=2, timeout_s=1.0, memory_mb=256, progress=False)
    assert [r.status for r in results] == ["passed", "failed", "passed", "out_of_memory", "timeout"]
    assert results[0].stdout == "1\n" and results[2].stdout == "3\n"
    assert all(r.status in STATUSES for r in results)
    with pytest.raises(ValueError, match="workers"):
        run_many(programs, workers=0)


def test_child_runs_the_host_interpreter():
    result = run_untrusted("import sys\nprint(sys.executable)\nprint(sys.flags.isolated)\n", **FAST)
    executable, isolated = result.stdout.split()
    assert executable == sys.executable and isolated == "1"
