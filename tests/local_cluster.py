"""A local autoscaling Ray cluster for tests: `ray start --head` with cluster-local.yaml (Ray's
fake_multinode provider launches worker nodes as local processes), on ports of its own, stopped
by killing the process tree it started (never `ray stop`, which stops every Ray on the machine)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a live process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[0]
    except (OSError, IndexError, ValueError):
        return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def marked(mark: str) -> list[int]:
    """Live processes whose environment holds `mark` (NAME=VALUE): everything a cluster started
    inherits its head's environment, even processes orphaned when their parent died."""
    needle = mark.encode() + b"\0"
    out = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and needle in (p / "environ").read_bytes() + b"\0" and _stat(int(p.name))[1] != "Z":
                out.append(int(p.name))
        except (OSError, TypeError):
            continue
    return out


def descendants(root: int) -> list[int]:
    """Every live (non-zombie) process below `root`, by parent pid."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (st := _stat(int(p.name))) and st[1] != "Z":
            children.setdefault(st[0], []).append(int(p.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class LocalCluster:
    """cluster-local.yaml started the way its README walkthrough says, with the GCS, dashboard and
    agents on free ports (the provider is told the GCS address, so its nodes join this head)."""

    def __init__(self, workdir: Path, env: dict[str, str], yaml_path: Path = ROOT / "cluster-local.yaml"):
        self.workdir = Path(workdir)
        self.mark = f"HYDRA_LOCAL_CLUSTER={uuid.uuid4().hex}"  # how stop() knows this cluster's processes
        self.env = {**env, self.mark.split("=")[0]: self.mark.split("=")[1]}
        self.port, self.dash_port, *self._agent_ports = free_ports(6)
        cfg = yaml.safe_load(Path(yaml_path).read_text())
        cfg["provider"]["gcs_address"] = f"127.0.0.1:{self.port}"
        self.config = cfg
        self.config_path = self.workdir / "cluster-local.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen | None = None
        self.ray = str(Path(sys.executable).parent / "ray")

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    def start(self, timeout: float = 120) -> None:
        head = self.config["available_node_types"][self.config["head_node_type"]]["resources"]
        agent, agent_grpc, metrics, runtime_env = self._agent_ports
        cmd = [self.ray, "start", "--head", "--block", f"--port={self.port}", f"--num-cpus={head.get('CPU', 0)}",
               f"--autoscaling-config={self.config_path}", "--include-dashboard=true",
               f"--dashboard-port={self.dash_port}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={runtime_env}", "--object-store-memory=268435456", "--disable-usage-stats"]
        self.proc = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=open(self.workdir / "head.log", "w"),
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited: {(self.workdir / 'head.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.dashboard + "/api/version", timeout=1)
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError("the head's dashboard did not come up")

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ray ARGS...` against this cluster's dashboard (job and serve commands)."""
        return subprocess.run([self.ray, *args], env={**self.env, "RAY_ADDRESS": self.dashboard},
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def worker_raylets(self) -> list[int]:
        """PIDs of the worker nodes' raylets: the provider starts them from the autoscaler's monitor."""
        monitors = [p for p in descendants(self.proc.pid) if "autoscaler/_private/monitor.py" in cmdline(p)]
        return [p for m in monitors for p in descendants(m) if _stat(p) and _stat(p)[0] == m
                and cmdline(p).split(" ", 1)[0].endswith("/raylet")]

    def train_workers_by_raylet(self) -> dict[int, list[int]]:
        """Ray Train worker processes ({raylet pid: [worker pids]}) on the worker nodes."""
        out: dict[int, list[int]] = {}
        for raylet in self.worker_raylets():
            workers = [p for p in descendants(raylet) if cmdline(p).startswith("ray::RayTrainWorker")]
            if workers:
                out[raylet] = workers
        return out

    def stop(self) -> None:
        """Kill every process this cluster started, by PID: the head's process tree (nodes and
        workers are descendants of `ray start`) and whatever carries its environment mark, then
        forget its address."""
        if self.proc is None:
            return
        for _ in range(3):
            tree = {self.proc.pid, *descendants(self.proc.pid), *marked(self.mark)}
            for pid in tree - {os.getpid()}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.proc.poll() is None:
                self.proc.wait(timeout=30)
            if not marked(self.mark):
                break
            time.sleep(0.5)
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and str(self.port) in current.read_text():
            current.unlink()
        self.proc = None
