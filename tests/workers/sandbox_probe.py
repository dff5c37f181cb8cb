"""Run a hostile program in the code reward's sandbox and report what it achieved.

Usage: ``python sandbox_probe.py MODE`` (``bwrap`` or ``none``); prints one JSON object.

The program gets the pid of a *victim* process that stands in for the trainer (it holds a
secret in its environment, its command line and its memory), a TCP port and an abstract
Unix socket this process listens on, and a world-writable directory outside its own. It
tries every escape the code reward must contain: signal the victim, read its
``/proc/<pid>/environ`` and ``/proc/<pid>/mem``, connect out, write outside its
directory, and leave a ``setsid()`` double-forked process behind. This script then checks
from the outside: is the victim alive, did a connection arrive, does the file exist, is a
left-behind process still running.

It loads ``r1mega/rewards/sandbox.py`` by path and imports nothing else of the project,
so it also runs under an interpreter without the project's dependencies (the tests run it
as an unprivileged user with the system's Python, the way a cluster user runs a trainer).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ATTACK = r'''
import json, os, signal, socket, sys
cfg = json.loads(sys.stdin.read())
secret = cfg["secret"].encode()
victim = cfg["victim"]
report = {"pid": os.getpid(), "ppid": os.getppid(), "uid": os.getuid()}

def attempt(name, fn):
    try:
        report[name] = fn()
    except Exception as e:
        report[name] = "denied: " + type(e).__name__

def read_mem():
    found = 0
    with open(f"/proc/{victim}/mem", "rb") as mem, open(f"/proc/{victim}/maps") as maps:
        for line in maps:
            fields = line.split()
            if "rw" not in fields[1]:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                found += mem.read(min(end - start, 1 << 26)).count(secret)
            except OSError:
                pass
    return found

def connect_tcp():
    socket.create_connection(("127.0.0.1", cfg["port"]), timeout=2).close()
    return "connected"

def connect_unix():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect("\0" + cfg["abstract"])
    s.close()
    return "connected"

def write_outside():
    with open(os.path.join(cfg["outside"], "pwned"), "w") as f:
        f.write("escaped")
    return "wrote"

attempt("environ", lambda: open(f"/proc/{victim}/environ", "rb").read().count(secret))
attempt("cmdline", lambda: open(f"/proc/{victim}/cmdline", "rb").read().count(secret))
attempt("mem", read_mem)
attempt("tcp", connect_tcp)
attempt("unix", connect_unix)
attempt("write_outside", write_outside)
attempt("interfaces", lambda: [name for _, name in socket.if_nameindex()])
attempt("visible_pids", lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
attempt("kill_victim", lambda: os.kill(victim, signal.SIGKILL) or "sent")
if os.fork() == 0:  # a daemon that escapes the process group: setsid + double fork
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", cfg["token"]])
    os._exit(0)
print(json.dumps(report), flush=True)
if cfg.get("hang"):
    while True:
        pass
'''

FORK_BOMB = r'''
import os, time
made = 0
for _ in range(40):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        made += 1
    except OSError:
        break
print(made)
'''


def load_sandbox():
    spec = importlib.util.spec_from_file_location(
        "r1mega_sandbox", ROOT / "r1mega" / "rewards" / "sandbox.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def processes_with(token: str) -> list[int]:
    """Live (non-zombie) processes whose command line holds ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if token.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def main() -> None:
    mode = sys.argv[1]
    sandbox_module = load_sandbox()
    sandbox = sandbox_module.Sandbox.create(mode, sys.executable)
    secret = "grader-secret-" + uuid.uuid4().hex
    victim = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "expected = ''.join(sys.argv[1:])\ntime.sleep(120)", secret],
                              env={"PATH": os.defpath, "GRADER_SECRET": secret})
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.setblocking(False)
    abstract = "r1mega-probe-" + uuid.uuid4().hex
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind("\0" + abstract)
    unix.listen()
    unix.setblocking(False)
    outside = tempfile.mkdtemp(prefix="r1mega-outside-")
    os.chmod(outside, 0o777)
    out: dict[str, object] = {}
    try:
        for hang in (False, True):
            token = f"{time.time() % 1000:.6f}{os.getpid() % 1000:03d}{int(hang)}"
            cfg = {"secret": secret, "victim": victim.pid, "port": tcp.getsockname()[1],
                   "abstract": abstract, "outside": outside, "token": token, "hang": hang}
            # The hanging program must get through its attacks and leave its daemon
            # before the timeout kills it; on a loaded 2-core machine 3 s was too short.
            limits = sandbox_module.Limits(timeout_s=10.0 if hang else 20.0)
            result = sandbox_module.run_program(ATTACK, json.dumps(cfg), limits=limits,
                                                sandbox=sandbox)
            key = "hanging" if hang else "exiting"
            out[f"{key}_status"] = result.status
            out[f"{key}_report"] = (json.loads(result.stdout.splitlines()[0])
                                    if result.stdout else result.stderr[-2000:])
            # The kernel kills what is left in the PID namespace as the sandbox ends;
            # give a process killed that way a moment to be reaped before looking.
            deadline = time.monotonic() + (2.0 if mode == "bwrap" else 0.0)
            while processes_with(token) and time.monotonic() < deadline:
                time.sleep(0.1)
            out[f"{key}_survivors"] = len(processes_with(token))
            for pid in processes_with(token):  # without isolation: clean up
                os.kill(pid, 9)
        accepted = 0
        for server in (tcp, unix):
            try:
                server.accept()[0].close()
                accepted += 1
            except BlockingIOError:
                pass
        out["connections_accepted"] = accepted
        out["victim_alive"] = victim.poll() is None
        out["outside_written"] = os.path.exists(os.path.join(outside, "pwned"))
        out["secret"] = secret
        if mode == "none":  # RLIMIT_NPROC counts the trainer's user: no per-run limit
            print(json.dumps(out))
            return
        bomb = sandbox_module.run_program(
            FORK_BOMB, "", limits=sandbox_module.Limits(timeout_s=20.0, max_processes=8),
            sandbox=sandbox)
        out["fork_bomb"] = [bomb.status, bomb.stdout.strip()]
        print(json.dumps(out))
    finally:
        victim.kill()
        victim.wait()


if __name__ == "__main__":
    main()
