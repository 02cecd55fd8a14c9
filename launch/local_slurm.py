#!/usr/bin/env python3
"""A one-node Slurm cluster on this machine, for trying `slurm_gpu.sbatch --cpu` without a cluster.

    python3 launch/local_slurm.py --install -- bash -c '
        CONFIG=configs/finetune.py WORKDIR=/tmp/run sbatch --wait --nodes=1 \
            --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 --time=30 \
            launch/slurm_gpu.sbatch --cpu --config.data.train_files=DATA.jsonl'

Runs the command with ``SLURM_CONF`` pointing at a throwaway cluster, then stops it. Without a
command it prints the ``export SLURM_CONF=...`` line and waits for Ctrl-C. The tests
(`tests/test_slurm_cluster.py`) use the same class.

What it does:
1. ``--install``: if ``munged``, ``slurmctld``, ``slurmd`` or ``sbatch`` is missing, runs
   ``apt-get install slurm-wlm munge`` (Debian / Ubuntu, as root; no service is started:
   a ``policy-rc.d`` that refuses starts is put in place for the install if none exists).
2. Writes a munge key and a minimal ``slurm.conf`` (one node with this machine's CPUs, one
   partition ``debug``, no cgroups, no accounting) in a temporary directory. Every path either
   daemon writes (state, spool, logs, pid files, the munge socket and seed) is in that directory,
   and the ports are free ones picked now, so a system Slurm, if any, is not touched.
3. Starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as children of this process,
   each in its own process group, and waits until the node is idle.
4. On exit (also on an exception or Ctrl-C): cancels every job, waits for the queue to drain,
   stops the daemons (SIGTERM, then SIGKILL to the process group) and kills any process still
   carrying this cluster's ``SLURM_CONF`` (job steps outlive ``slurmd`` otherwise).

Jobs run as the submitting user (root here), with the submitter's environment (``sbatch
--export=ALL``, the default). Root is needed: ``slurmd`` must switch to the job's user.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
APT_PACKAGES = ("slurm-wlm", "munge")  # slurm-wlm = slurmctld + slurmd + slurm-client
POLICY_RC = pathlib.Path("/usr/sbin/policy-rc.d")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be had on this machine (not root, no apt, the install failed)."""


def missing_programs() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None]


def ensure_installed(log=print) -> float:
    """Installs Slurm and munge with apt-get when a program is missing; returns the seconds spent
    (0.0 when all were there). Raises SlurmUnavailable with the reason when it cannot."""
    if not missing_programs():
        return 0.0
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"{', '.join(missing_programs())} not installed, and installing needs root"
        )
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing_programs())} not installed, and no apt-get")
    # One installer at a time (parallel test workers); the second finds everything there.
    with open(os.path.join(tempfile.gettempdir(), "local_slurm_install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = missing_programs()
        if not missing:
            return 0.0
        log(f"local_slurm: installing {' '.join(APT_PACKAGES)} (missing: {', '.join(missing)})")
        return _apt_install()


def _apt_install() -> float:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Package scripts must not start the system's munge/slurm services.
    own_policy = not POLICY_RC.exists()
    if own_policy:
        POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC.chmod(0o755)
    t0 = time.monotonic()
    wait_lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt-get on the machine: wait
    try:
        for cmd in (
            ["apt-get", *wait_lock, "update", "-q"],
            ["apt-get", *wait_lock, "install", "-y", "-q", "--no-install-recommends",
             *APT_PACKAGES],
        ):  # fmt: skip
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                raise SlurmUnavailable(
                    f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr[-1500:]}"
                )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmUnavailable(f"apt-get failed: {e}") from e
    finally:
        if own_policy:
            POLICY_RC.unlink(missing_ok=True)
    still = missing_programs()
    if still:
        raise SlurmUnavailable(f"installed {APT_PACKAGES}, but {', '.join(still)} still missing")
    return time.monotonic() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurmCluster:
    """munged + slurmctld + slurmd for one node, everything under ``root``.

    Use as a context manager; ``env`` is the environment for ``sbatch``/``squeue``/``scancel``.
    """

    def __init__(self, root: str | os.PathLike, cpus: int | None = None, kill_wait: int = 30):
        self.root = pathlib.Path(root).resolve()
        # The node is this host; jobs reach the coordinator by the node's name, so it must resolve.
        self.node = socket.gethostname().split(".")[0]
        try:
            socket.gethostbyname(self.node)
        except OSError:
            self.node = "localhost"
        # At least 2, so a 2-task job fits on a 1-core machine (slurmd is told to trust the
        # config: SlurmdParameters=config_overrides).
        self.cpus = cpus or max(2, os.cpu_count() or 1)
        self.kill_wait = kill_wait
        self.conf = self.root / "slurm.conf"
        # munged wants every directory above its socket traversable by all, which a private temp
        # dir (pytest's, mkdtemp's) is not: the socket gets a directory of its own in /tmp.
        self.socket_dir = pathlib.Path(tempfile.mkdtemp(prefix="munge_"))
        self.munge_socket = self.socket_dir / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if key != "SLURM_CONF":
                del self.env[key]

    # ------------------------------------------------------------------ files
    def _write_files(self) -> None:
        r = self.root
        for sub in ("munge", "key", "state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        self.socket_dir.chmod(0o755)  # munged refuses a socket directory others cannot traverse
        (r / "key").chmod(0o700)
        key = r / "key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (r / "plugstack.conf").write_text("")
        lines = {
            "ClusterName": "gtejax",
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmctldPort": _free_port(),
            "SlurmdPort": _free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "StateSaveLocation": r / "state",
            "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": r / "slurmctld.pid",
            "SlurmdPidFile": r / "slurmd.pid",
            "SlurmctldLogFile": r / "log" / "slurmctld.log",
            "SlurmdLogFile": r / "log" / "slurmd.log",
            "PlugStackConfig": r / "plugstack.conf",
            "ProctrackType": "proctrack/linuxproc",  # no cgroups needed
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SlurmdParameters": "config_overrides",
            "MpiDefault": "none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "ReturnToService": 2,
            "KillWait": self.kill_wait,  # seconds from SIGTERM to SIGKILL on scancel/time limit
            "MinJobAge": 600,  # keep finished jobs visible to `scontrol show job`
            # Job ids, and so the coordinator ports slurm_gpu.sbatch derives from them, differ
            # between clusters started at the same time on one machine (parallel tests).
            "FirstJobId": random.randrange(1000, 19000, 100),
            "SchedulerParameters": "sched_interval=1",
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        text += (
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN\n"
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n"
        )
        self.conf.write_text(text)

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()

    def _wait_for(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> str:
        """Runs a Slurm client command against this cluster; returns its stdout."""
        result = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {result.returncode}\n{result.stderr}")
        return result.stdout

    def start(self) -> LocalSlurmCluster:
        missing = missing_programs()
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (use ensure_installed)")
        self._write_files()
        r = self.root
        try:
            self._spawn(
                "munged",
                ["munged", "--foreground", f"--socket={self.munge_socket}",
                 f"--key-file={r / 'key' / 'munge.key'}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                 f"--seed-file={r / 'munge' / 'munged.seed'}", f"--log-file={r / 'log' / 'munged.log'}"],
            )  # fmt: skip
            self._wait_for("munged", self.munge_socket.exists, 20)
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])

            def idle() -> bool:
                out = subprocess.run(
                    ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True,
                    text=True, timeout=20, check=False,
                )  # fmt: skip
                return out.returncode == 0 and out.stdout.strip().startswith("idle")

            self._wait_for("the node to become idle", idle, 60)
        except BaseException:
            self.stop()
            raise
        return self

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")[-3000:]
            parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)

    def leftover_pids(self) -> list[int]:
        """Processes started by this cluster that are still alive: the daemons and anything
        (job steps, tasks) whose environment carries this cluster's SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = {p.pid for p in self.procs.values() if p.poll() is None}
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except (OSError, IndexError):
                continue
            if zombie:  # dead, waiting for its parent to reap it
                continue
            if marker in environ.split(b"\0"):
                pids.add(int(entry.name))
        return sorted(pids)

    def stop(self) -> None:
        """Cancels all jobs and stops everything this cluster started; safe to call twice."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--user", "root", timeout=20, check=False)
                deadline = time.monotonic() + self.kill_wait + 10
                while time.monotonic() < deadline:
                    if not self.run("squeue", "-h", "-o", "%i", timeout=20, check=False).strip():
                        break
                    time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the daemon and anything in its group
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)
        deadline = time.monotonic() + 10
        while (pids := self.leftover_pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="apt-get install what is missing")
    parser.add_argument("--dir", help="cluster directory (default: a new temporary one)")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the node")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND to run, then stop")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.install:
            ensure_installed(log=lambda m: print(m, file=sys.stderr))
    except SlurmUnavailable as e:
        print(f"local_slurm: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="local_slurm_") as tmp:
        with LocalSlurmCluster(args.dir or tmp, cpus=args.cpus) as cluster:
            print(f"local_slurm: up; export SLURM_CONF={cluster.conf}", file=sys.stderr)
            if command:
                return subprocess.run(command, env=cluster.env, check=False).returncode
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
