"""Running an untrusted program: isolation with bubblewrap, resource limits, cleanup.

Code rewards run programs a policy wrote. Under RL a policy finds whatever earns reward,
and a program running with the trainer's authority can kill the trainer, read the
grader's memory or environment through ``/proc``, open sockets, write anywhere the trainer
can, or leave processes behind. So each test run gets, with ``mode="bwrap"`` (the
default):

* **an unprivileged user.** A trainer running as root (containers, this project's CI)
  drops to a uid of its own per concurrent run (``uid_base`` + the launching thread's id)
  with util-linux's ``setpriv`` inside the sandbox: no capabilities, no supplementary
  groups, ``no_new_privs``, an empty bounding set. (bubblewrap's ``--uid`` alone is no
  drop for root: the program would still be uid 0 outside its user namespace.) A
  trainer running as an ordinary user is unprivileged already; bubblewrap then maps it
  to uid 65534 in a user namespace of its own and forbids nested user namespaces;
* **namespaces of its own** (bubblewrap): PID (it sees only itself, as PID 2, and
  bubblewrap's init as PID 1; the trainer cannot be named, signalled or read through
  ``/proc``), network (only a loopback interface that no one else shares: no TCP or
  abstract-socket connection leaves the sandbox), mount, IPC, UTS and cgroup;
* **a filesystem of its own**: ``/usr`` (and the ``/bin``, ``/lib*`` links), the
  interpreter's installation read-only, a fresh writable ``/sandbox`` (its working
  directory, holding ``main.py``), a private ``/tmp``, a fresh ``/proc`` and a minimal
  ``/dev``. No ``/etc``, home, run or checkpoint directory is visible;
* **limits**: wall time (the parent kills the sandbox), CPU time (``RLIMIT_CPU``), memory
  (``RLIMIT_AS``), output size (``RLIMIT_FSIZE``: stdout and stderr are files), process
  count (``RLIMIT_NPROC``, applied inside the sandbox so it counts only this run's
  processes), no core files;
* **cleanup**: the program is PID 2 of its PID namespace. When the run ends (or the
  parent, or the thread that started it, dies: ``--die-with-parent``) the namespace's
  init exits and the kernel kills every process left in it, including ones that
  double-forked with ``setsid()`` to escape a process-group kill.

What it does not isolate: the kernel itself (no seccomp filter: a kernel exploit is
an escape), CPU and memory bandwidth shared with the trainer (rlimits, not cgroups),
and the contents of ``/usr`` and the interpreter's directory, which are readable.

``mode="none"`` keeps only the limits and the process-group kill (the program runs as
the trainer's user, in its namespaces); it exists for machines without bubblewrap and
must be chosen explicitly. :meth:`Sandbox.create` refuses ``bwrap`` when the machine
cannot provide it, naming what is missing.

Measured: bubblewrap 0.8.0 (Debian 12) and util-linux 2.38 on Linux 6.x.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "SANDBOX_MODES",
    "Limits",
    "RunResult",
    "Sandbox",
    "SandboxUnavailable",
    "run_program",
]

SANDBOX_MODES = ("bwrap", "none")
SANDBOX_DIR = "/sandbox"
# Root trainers run each program as uid UID_BASE + the launching thread's id: thread ids
# are unique on the machine (< 2**22), so concurrent runs never share a uid, and
# RLIMIT_NPROC (a per-uid count) is a per-run limit. Far above the uids of real users.
UID_BASE = 1 << 30
NOBODY = 65534
PATH_IN_SANDBOX = "/usr/local/bin:/usr/bin:/bin"
_STDERR_TAIL = 2000
_INSTALL_HINT = "Debian/Ubuntu: apt-get install --no-install-recommends bubblewrap"


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate programs as asked; the message says what is missing."""


@dataclass(frozen=True)
class Limits:
    """What one run may use."""

    timeout_s: float = 5.0  # wall clock
    memory_mb: int = 512  # address space
    max_output_mb: int = 16  # each of stdout / stderr / any file written
    max_processes: int | None = 64  # processes and threads, this run's only (bwrap mode)


@dataclass(slots=True)
class RunResult:
    """One execution. ``status``: ok | timeout | memory | output_limit | runtime_error."""

    status: str
    stdout: str
    stderr: str  # the last 2000 characters
    returncode: int | None
    seconds: float


def _interpreter(python: str | None) -> str:
    """The real path of the interpreter that runs programs (default: the trainer's own,
    resolved through a virtual environment to the installation it was created from)."""
    if python is None:
        base = getattr(sys, "_base_executable", None) or sys.executable
        return os.path.realpath(base)
    found = shutil.which(python)
    if found is None:
        raise SandboxUnavailable(f"the interpreter {python!r} does not exist")
    return os.path.realpath(found)


def _installation(interpreter: str) -> Path:
    """The directory an interpreter's installation lives in (``<prefix>/bin/python``)."""
    return Path(interpreter).parent.parent


@dataclass(frozen=True)
class Sandbox:
    """How programs are run; build with :meth:`create` (which checks it works)."""

    mode: Literal["bwrap", "none"]
    python: str
    bwrap: str | None = None
    setpriv: str | None = None  # root trainers only
    prlimit: str | None = None
    as_root: bool = False

    @classmethod
    def create(cls, mode: str = "bwrap", python: str | None = None) -> Sandbox:
        """A working sandbox of ``mode``; raises :class:`SandboxUnavailable` naming what
        is missing (a tool, namespaces the kernel or container refuses, ...)."""
        if mode not in SANDBOX_MODES:
            raise ValueError(f"unknown sandbox mode {mode!r}: expected one of {SANDBOX_MODES}")
        interpreter = _interpreter(python)
        if mode == "none":
            return cls("none", interpreter)
        as_root = os.geteuid() == 0
        tools = {"bwrap": "bubblewrap", "prlimit": "util-linux"}
        if as_root:
            tools["setpriv"] = "util-linux"
        found = {tool: shutil.which(tool) for tool in tools}
        missing = [f"{tool} (package {package})" for tool, package in tools.items()
                   if found[tool] is None]
        if missing:
            raise SandboxUnavailable(
                f"cannot isolate programs: {', '.join(missing)} not found on PATH "
                f"({_INSTALL_HINT})")
        sandbox = cls("bwrap", interpreter, found["bwrap"], found.get("setpriv"),
                      found["prlimit"], as_root)
        sandbox.check()
        return sandbox

    def check(self) -> None:
        """Run a probe program and confirm the isolation took effect."""
        probe = ("import os, socket\n"
                 "print(os.getuid(), os.getpid(), len(socket.if_nameindex()),"
                 " sorted(p for p in os.listdir('/proc') if p.isdigit()))\n")
        result = run_program(probe, "", limits=Limits(timeout_s=30.0), sandbox=self)
        if result.status != "ok":
            why = result.stderr.strip().splitlines()
            raise SandboxUnavailable(
                "cannot isolate programs: bubblewrap failed to start a sandbox "
                f"({why[-1] if why else f'exit status {result.returncode}'}); it needs "
                "user or PID/network/mount namespaces, which this kernel or container "
                "refuses")
        uid, pid, interfaces, pids = result.stdout.split(maxsplit=3)
        if int(uid) == 0 or int(pid) > 2 or int(interfaces) > 1:
            raise SandboxUnavailable(
                f"cannot isolate programs: the probe ran as uid {uid}, pid {pid}, with "
                f"{interfaces} network interfaces and processes {pids.strip()}")

    # ------------------------------------------------------------------ command line

    def _mounts(self, work: Path) -> list[str]:
        args = ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        prefix = _installation(self.python)
        if not prefix.is_relative_to("/usr") and prefix != Path("/"):
            # Parent directories get mode 0755 here whatever they have outside (a pyenv
            # under a 0700 /root would otherwise be unreachable for the sandbox user).
            for parent in reversed(prefix.parents[:-1]):
                args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind", str(prefix), str(prefix)]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                 "--bind", str(work), SANDBOX_DIR, "--chdir", SANDBOX_DIR]
        return args

    def command(self, work: Path, uid: int, limits: Limits) -> list[str]:
        """The command line that runs ``main.py`` in ``work`` as ``uid``."""
        program = [self.python, "-I", "-S", "main.py"]
        if self.mode == "none":
            return program
        assert self.bwrap is not None and self.prlimit is not None
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                      "--unshare-cgroup-try"]
        if not self.as_root:
            namespaces += ["--unshare-user", "--disable-userns", "--uid", str(NOBODY),
                           "--gid", str(NOBODY)]
        cmd = [self.bwrap, *namespaces, "--die-with-parent", "--new-session", "--clearenv",
               "--setenv", "PATH", PATH_IN_SANDBOX, *self._mounts(work), "--"]
        if self.as_root:
            assert self.setpriv is not None
            cmd += [self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        if limits.max_processes is not None:
            # Set inside the sandbox: there the count is this run's processes only.
            n = limits.max_processes
            cmd += [self.prlimit, f"--nproc={n}:{n}", "--"]
        return cmd + program


def _pair(limit: int, soft: int, hard: int | None = None) -> tuple[int, int]:
    """(soft, hard) clamped to the hard limit this process already has.

    An unprivileged process cannot raise its hard limit; asking for more would make
    ``setrlimit`` fail in the child and the test error out for reasons of the host.
    """
    hard = soft if hard is None else hard
    _, current = resource.getrlimit(limit)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    return soft, hard


def _limits_fn(limits: Limits, cpu_s: int, with_nproc: bool):
    """The ``preexec_fn``; every value is computed here, in the parent, beforehand (it
    only calls ``setrlimit`` after ``fork``, which is safe in a threaded parent)."""
    values = [
        (resource.RLIMIT_AS, _pair(resource.RLIMIT_AS, limits.memory_mb * 2**20)),
        # SIGXCPU at the soft limit, SIGKILL one second later at the hard one.
        (resource.RLIMIT_CPU, _pair(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)),
        (resource.RLIMIT_FSIZE, _pair(resource.RLIMIT_FSIZE, limits.max_output_mb * 2**20)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if with_nproc and limits.max_processes is not None:
        values.append((resource.RLIMIT_NPROC,
                       _pair(resource.RLIMIT_NPROC, limits.max_processes)))

    def apply() -> None:
        for which, pair in values:
            resource.setrlimit(which, pair)

    return apply


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        return f.read().decode("utf-8", errors="replace")


def _status(returncode: int, timed_out: bool, stderr: str, via_bwrap: bool) -> str:
    signum = -returncode if returncode < 0 else 0
    if via_bwrap and returncode > 128:
        signum = returncode - 128  # bubblewrap reports a child killed by N as 128 + N
    if timed_out or signum in (signal.SIGXCPU, signal.SIGKILL):
        return "timeout"
    if signum == signal.SIGXFSZ or (returncode != 0 and "File too large" in stderr):
        # Python ignores SIGXFSZ, so hitting RLIMIT_FSIZE surfaces as OSError(EFBIG).
        return "output_limit"
    if returncode != 0 and ("MemoryError" in stderr or "Cannot allocate memory" in stderr):
        return "memory"
    return "runtime_error" if returncode != 0 else "ok"


def run_program(program: str, stdin: str, *, limits: Limits, sandbox: Sandbox) -> RunResult:
    """Run ``program`` once (``python -I -S main.py``) with ``stdin``; see the module
    docstring. stdout and stderr are files (a program printing forever fills at most
    ``max_output_mb``, not the trainer's memory)."""
    uid = UID_BASE + threading.get_native_id()
    with tempfile.TemporaryDirectory(prefix="r1mega-code-") as tmp:
        # The program's directory holds only the program; the I/O files live beside it.
        work, io_dir = Path(tmp, "work"), Path(tmp, "io")
        work.mkdir()
        io_dir.mkdir()
        (work / "main.py").write_text(program, encoding="utf-8")
        if sandbox.mode == "bwrap" and sandbox.as_root:
            os.chown(work, uid, uid)
            os.chown(work / "main.py", uid, uid)
        in_path, out_path, err_path = io_dir / "stdin", io_dir / "stdout", io_dir / "stderr"
        in_path.write_text(stdin, encoding="utf-8")
        preexec = _limits_fn(limits, math.ceil(limits.timeout_s) + 1,
                             with_nproc=sandbox.mode == "none")
        cmd = sandbox.command(work, uid, limits)
        start = time.monotonic()
        with open(in_path, "rb") as fin, open(out_path, "wb") as fout, \
                open(err_path, "wb") as ferr:
            proc = subprocess.Popen(
                cmd, stdin=fin, stdout=fout, stderr=ferr,
                cwd=work if sandbox.mode == "none" else tmp,
                env={"PATH": os.environ.get("PATH", os.defpath)},
                preexec_fn=preexec, start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the program (or bubblewrap) and anything left in its group
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.monotonic() - start
        stdout = out_path.read_bytes().decode("utf-8", errors="replace")
        stderr = _tail(err_path, _STDERR_TAIL)
    rc = proc.returncode
    return RunResult(_status(rc, timed_out, stderr, sandbox.mode == "bwrap"), stdout, stderr,
                     rc, seconds)
