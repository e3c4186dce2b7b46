"""A real one-host SLURM cluster on loopback (munged, slurmctld and one slurmd per node), in a folder.

Used by the SLURM tests (`tests/test_slurm*.py`) and by `scripts/local_slurm_cluster.sh`:

    cluster = LocalSlurmCluster(Path("/tmp/slurm"), nodes=2).start()   # every daemon up, nodes idle
    subprocess.run(["sbatch", "--wait", ...], env=cluster.env())        # clients find it through SLURM_CONF
    cluster.stop()                                                      # every daemon it started is gone

Everything (config, munge key, state, logs, pid files) lives under the folder, but for the Unix
sockets: the munge socket and the spool (slurmstepd's sockets) go to a short folder under /tmp,
removed at stop, since a socket path may hold at most 107 bytes and pytest's folders (its
`popen-gwN` for each parallel process included) can be longer. The ports are free ones chosen
at start, so the cluster touches nothing system-wide and can run beside another. Each node is a
separate slurmd on the same host (`slurmd -N nodeN`, its own port), which Debian's `slurm-wlm`
build allows, so a job really spans two nodes: `srun` starts one task on each, `SLURM_NODEID`
differs, and the ranks meet over TCP on 127.0.0.1.

The daemons run as root (as slurmd must, to start jobs); `ensure_installed()` installs Debian's
`slurm-wlm` and `munge` with apt-get when they are missing, as CI runs as root.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

PROGRAMS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
"""What a cluster needs on PATH (or in /usr/sbin)."""


class SlurmSetupError(RuntimeError):
    """The cluster could not be installed or started; the message says why and where the logs are."""


def _find(program: str) -> Optional[str]:
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin")


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt-get when one of their programs is missing (needs root)."""
    missing = [program for program in PROGRAMS if _find(program) is None]
    if not missing:
        return
    if os.geteuid() != 0 or _find("apt-get") is None:
        raise SlurmSetupError(
            f"{', '.join(missing)} not found; install Debian's slurm-wlm and munge (as root: "
            "apt-get install slurm-wlm munge)"
        )
    with apt_lock():  # test files run in parallel (pytest-xdist): one apt-get at a time
        if any(_find(program) is None for program in PROGRAMS):
            _apt_install()
    still = [program for program in PROGRAMS if _find(program) is None]
    if still:
        raise SlurmSetupError(f"installed slurm-wlm and munge, but {', '.join(still)} still not found")


@contextlib.contextmanager
def apt_lock() -> Iterator[None]:
    """One apt-get at a time among this machine's test processes (test files run in parallel)."""
    with open(os.path.join(tempfile.gettempdir(), "dalle2-decoder-tests-apt.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _apt_install() -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise SlurmSetupError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def free_ports(count: int) -> List[int]:
    """Ports free on 127.0.0.1 now (all held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class LocalSlurmCluster:
    """A SLURM cluster of `nodes` slurmd on this host, each with `cpus` CPUs, configured under `root`."""

    def __init__(self, root: Path, *, nodes: int = 2, cpus: int = 2, partition: str = "debug") -> None:
        self.root = Path(root).resolve()
        self.nodes = [f"node{n}" for n in range(1, nodes + 1)]
        self.cpus = cpus
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self._daemons: Dict[str, subprocess.Popen] = {}
        self.sockets = Path(tempfile.mkdtemp(prefix="d2slurm-", dir="/tmp"))
        """Short, for Unix socket paths: the munge socket and the spool (slurmstepd's sockets)."""

    # --- configuration -------------------------------------------------------------------------

    def _write_config(self) -> None:
        for folder in ("munge", "state", "log", "run"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        (self.sockets / "spool").mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        lines = [
            "# Written by tests/slurm_cluster.py: a one-host cluster on loopback.",
            "ClusterName=dalle2local",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={node_ports[0]}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: also how long a requeued job waits before it may start again (120 s by
            # default); short here, so the pre-emption test does not sit out two minutes.
            f"AuthInfo=socket={self.sockets / 'munge.socket'},cred_expire=10",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.sockets / 'spool'}/%n",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups: the process tree is tracked through /proc, which works in any container.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            # Nodes declare more CPUs than the host has (each slurmd sees the same cores).
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=600",
            "KillWait=20",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "SchedulerParameters=sched_interval=2",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} State=UNKNOWN"
            )
        lines.append(f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)

    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """The environment for client commands (sbatch, squeue, ...) to reach this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for name in list(env):  # inherited job variables would confuse srun inside the cluster's jobs
            if name.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_NODE", "SLURM_PROCID", "SLURM_NTASKS")):
                del env[name]
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        return env

    # --- start and stop ------------------------------------------------------------------------

    def _daemon(self, name: str, command: List[str]) -> None:
        log = open(self.logs / f"{name}.stdout", "ab")
        # A session of its own: the daemon and whatever it starts can be signalled as one group.
        self._daemons[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )
        log.close()

    def start(self, timeout: float = 60.0) -> "LocalSlurmCluster":
        """Write the config, start munged, slurmctld and the slurmd, and wait until every node is idle."""
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmSetupError(
                "the local SLURM cluster runs its daemons as root (slurmd starts the jobs); run as root"
            )
        self._write_config()
        try:
            munge = self.root / "munge"
            self._daemon(
                "munged",
                [
                    _find("munged"),
                    "--foreground",
                    "--force",
                    f"--socket={self.sockets / 'munge.socket'}",
                    f"--key-file={munge / 'munge.key'}",
                    f"--pid-file={munge / 'munged.pid'}",
                    f"--log-file={self.logs / 'munged.log'}",
                    f"--seed-file={munge / 'munged.seed'}",
                ],
            )
            self._wait_for(lambda: (self.sockets / "munge.socket").exists(), timeout, "munged to open its socket")
            self._daemon("slurmctld", [_find("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait_for(
                lambda: self._run("scontrol", "ping").returncode == 0 and "UP" in self._run("scontrol", "ping").stdout,
                timeout,
                "slurmctld to answer",
            )
            for node in self.nodes:
                self._daemon(f"slurmd-{node}", [_find("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
            self._wait_for(self._all_idle, timeout, "every node to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, program: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([_find(program), *args], env=self.env(), capture_output=True, text=True, timeout=timeout)

    def _all_idle(self) -> bool:
        result = self._run("sinfo", "-h", "-N", "-o", "%N %t")
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return result.returncode == 0 and all(states.get(node) == "idle" for node in self.nodes)

    def _wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self._daemons.items():
                if process.poll() is not None:
                    raise SlurmSetupError(
                        f"{name} exited with status {process.returncode} while waiting for {what}; "
                        f"logs in {self.logs}:\n{self.log_tail()}"
                    )
            try:
                if condition():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.3)
        raise SlurmSetupError(
            f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.logs}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for path in sorted(self.logs.glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            if text:
                parts.append(f"== {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, then end every daemon this object started (and anything they left behind)."""
        if "slurmctld" in self._daemons and self._daemons["slurmctld"].poll() is None:
            try:
                self._run("scancel", "--full", "--quiet", f"--partition={self.partition}", timeout=10)
            except (subprocess.SubprocessError, OSError):
                pass
        # Jobs first (their steps hang off the slurmd: slurmstepd and the tasks), then the daemons.
        for name in sorted(self._daemons, key=lambda n: (not n.startswith("slurmd"), n == "munged")):
            process = self._daemons[name]
            _end_tree(process.pid)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self._daemons.clear()
        # slurmstepd daemonise out of slurmd's session: find them (and their tasks) through their environment.
        for pid in _processes_of(self.conf):
            _end_tree(pid)
        shutil.rmtree(self.sockets, ignore_errors=True)

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- process helpers -------------------------------------------------------------------------------


def _children(pid: int) -> List[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _tree(pid: int) -> List[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(_children(current))
    return pids


def _end_tree(pid: int, grace: float = 5.0) -> None:
    """SIGTERM a process and its descendants, then SIGKILL what is left after `grace` seconds."""
    pids = _tree(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in pids:
            try:
                os.kill(target, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        if not any(_alive(p) for p in pids):
            return


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state == "Z":  # a zombie: reap it when it is our child
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def _ancestors() -> List[int]:
    pids, pid = [], os.getpid()
    while pid > 1:
        pids.append(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    return pids


def _processes_of(conf: Path) -> List[int]:
    """Processes started for the cluster whose config is `conf`: the daemons, slurmstepd and the job tasks.

    Every one of them carries `SLURM_CONF=conf` in its environment (the daemons are started with it
    and pass it on); this process and its parents are left out (a shell that exported it, say).
    """
    marker = f"SLURM_CONF={conf}".encode()
    mine = set(_ancestors())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def running_processes(root: Path) -> List[str]:
    """Command lines of live processes that belong to the cluster under `root` (empty when all is stopped)."""
    lines = []
    for pid in _processes_of(Path(root).resolve() / "slurm.conf"):
        if _alive(pid):
            try:
                lines.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                pass
    return lines


def main(argv: List[str]) -> int:
    """`python tests/slurm_cluster.py start|stop FOLDER [NODES]`: used by scripts/local_slurm_cluster.sh."""
    if len(argv) < 2 or argv[0] not in ("start", "stop"):
        print("usage: slurm_cluster.py start|stop FOLDER [NODES]", file=sys.stderr)
        return 2
    root = Path(argv[1])
    if argv[0] == "start":
        cluster = LocalSlurmCluster(root, nodes=int(argv[2]) if len(argv) > 2 else 2)
        cluster.start()
        # The daemons outlive this command; `stop` finds them again through the folder.
        for process in cluster._daemons.values():
            process.returncode = 0  # keep Popen's destructor from warning about live children
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    cluster = LocalSlurmCluster(root)
    for pid in _processes_of(cluster.conf):
        _end_tree(pid)
    left = running_processes(cluster.root)
    if left:
        print("still running:\n" + "\n".join(left), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
