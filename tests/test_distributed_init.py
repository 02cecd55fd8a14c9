"""`sharding.initialize_distributed` on every launcher: what `jax.distributed.initialize` receives.

Each launcher is simulated by what JAX's detection reads: env vars (SLURM, Open MPI, GKE,
multislice, JAX_*), and for a gcloud TPU VM a fake GCE metadata server on 127.0.0.1 (JAX's
`get_metadata` honours GCE_METADATA_IP) plus the one flag JAX sets at import from the TPU chips on
the PCI bus (`running_in_cloud_tpu_vm`, patched: this machine has none). `jax.distributed.initialize`
is replaced by a recorder, except in the two-process test, which really starts two CPU processes
from a SLURM / Open MPI environment on 127.0.0.1 and checks they see each other.
"""

from __future__ import annotations

import http.server
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading

import jax
import pytest
from jax._src import cloud_tpu_init
from jax._src.clusters import cloud_tpu_cluster

from gte_jax import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
# JAX's fixed coordinator port on TPU slices (jax._src.clusters.cloud_tpu_cluster), used unless
# JAX_COORDINATOR_PORT overrides it.
TPU_PORT = "8482"
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "MEGASCALE_", "TPU_", "JAX_", "KUBERNETES_", "GCE_")


@pytest.fixture
def recorder(monkeypatch):
    """A clean launcher environment and a stand-in `jax.distributed.initialize` that records."""
    for var in list(os.environ):
        if var.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(var)
    # Keeps a stray proxy from catching the fake metadata server's requests.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    return calls


class MetadataServer:
    """GCE's metadata server as JAX asks it: instance attributes by key, `Metadata-Flavor:
    Google` required, 404 for an unknown key. Records every key asked."""

    def __init__(self):
        self.attributes: dict[str, str] = {}
        self.asked: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                prefix = "/computeMetadata/v1/instance/attributes/"
                key = self.path[len(prefix) :] if self.path.startswith(prefix) else None
                server.asked.append(key or self.path)
                ok = key in server.attributes and self.headers["Metadata-Flavor"] == "Google"
                body = (server.attributes[key] if ok else "not found").encode()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def metadata(monkeypatch, recorder):
    server = MetadataServer()
    monkeypatch.setenv("GCE_METADATA_IP", server.address)
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def tpu_vm(monkeypatch, metadata):
    """This process as a Cloud TPU VM: TPU chips seen at import, metadata server reachable."""
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)
    # A GKE node and a queued-resource VM both carry tpu-env; single slice unless it says more.
    metadata.attributes["tpu-env"] = "ACCELERATOR_TYPE: 'v5litepod-16'\nZONE: 'us-west4-a'\n"
    return metadata


def started(calls) -> tuple[str, int, int]:
    assert len(calls) == 1, calls
    args, kwargs = calls[0]
    assert not kwargs, kwargs
    return args


# ----------------------------------------------------------------------------- gcloud TPU VM
@pytest.mark.parametrize(
    "endpoints, ips",
    [
        # worker-network-endpoints in its old (name:id:ip) and new (addresses only) formats
        ("t1v-n-0:0:10.130.0.2,t1v-n-1:1:10.130.0.3,t1v-n-2:2:10.130.0.4,t1v-n-3:3:10.130.0.5",
         ["10.130.0.2", "10.130.0.3", "10.130.0.4", "10.130.0.5"]),
        ("10.130.0.7,10.130.0.8", ["10.130.0.7", "10.130.0.8"]),
    ],
    ids=["name_id_ip", "addresses"],
)  # fmt: skip
def test_distributed_init_gcloud_tpu_vm_metadata_server(tpu_vm, recorder, endpoints, ips):
    """`gcloud compute tpus tpu-vm ssh --worker=all` sets no env var: id, count and worker 0's
    address come from the metadata server only."""
    worker = len(ips) - 1
    tpu_vm.attributes.update(
        {"agent-worker-number": str(worker), "worker-network-endpoints": endpoints}
    )
    assert sharding.initialize_distributed() is True
    assert started(recorder) == (f"{ips[0]}:{TPU_PORT}", len(ips), worker)
    assert {"agent-worker-number", "worker-network-endpoints"} <= set(tpu_vm.asked)


def test_distributed_init_gcloud_tpu_vm_coordinator_port_and_explicit_address(
    tpu_vm, recorder, monkeypatch
):
    tpu_vm.attributes.update(
        {"agent-worker-number": "0", "worker-network-endpoints": "10.1.0.1,10.1.0.2"}
    )
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "9999")
    assert sharding.initialize_distributed() is True
    assert started(recorder) == ("10.1.0.1:9999", 2, 0)
    recorder.clear()
    # A coordinator given explicitly wins; count and id still come from the metadata server.
    assert sharding.initialize_distributed("10.9.9.9:1234") is True
    assert started(recorder) == ("10.9.9.9:1234", 2, 0)


# ----------------------------------------------------------------------------- GKE, multislice
def gke_pod(monkeypatch, hosts: list[str], worker: int) -> None:
    """What GKE's TPU device plugin puts in a pod's env (TPU_SKIP_MDS_QUERY: the pod is no gcloud
    TPU VM; without it JAX would first ask the metadata server for a worker number)."""
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "true")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", ",".join(hosts))
    monkeypatch.setenv("TPU_WORKER_ID", str(worker))


def test_distributed_init_gke_tpu_worker_hostnames(tpu_vm, recorder, monkeypatch):
    hosts = ["10.8.0.11", "10.8.0.12", "10.8.0.13", "10.8.0.14"]
    gke_pod(monkeypatch, hosts, worker=2)
    assert sharding.initialize_distributed() is True
    assert started(recorder) == (f"{hosts[0]}:{TPU_PORT}", len(hosts), 2)
    # GKE's env vars were enough: the gcloud-VM path (worker number from metadata) was not taken.
    assert "agent-worker-number" not in tpu_vm.asked


@pytest.mark.parametrize("where", ["gke_env", "queued_resource_metadata"])
def test_distributed_init_multislice(tpu_vm, recorder, monkeypatch, where):
    """Two slices: process ids run slice by slice; the coordinator is MEGASCALE's host. On GKE
    the MEGASCALE_* values are env vars, on a gcloud queued resource lines of tpu-env."""
    slices, slice_id, megascale_host = 2, 1, "10.0.0.9"
    megascale = {
        "MEGASCALE_COORDINATOR_ADDRESS": f"{megascale_host}:8080",
        "MEGASCALE_NUM_SLICES": str(slices),
        "MEGASCALE_SLICE_ID": str(slice_id),
    }
    if where == "gke_env":
        hosts, worker = ["10.8.1.1"], 0  # one host per slice: only MEGASCALE says "2 processes"
        gke_pod(monkeypatch, hosts, worker)
        for key, value in megascale.items():
            monkeypatch.setenv(key, value)
    else:
        hosts, worker = ["10.8.2.1", "10.8.2.2"], 1
        tpu_vm.attributes["tpu-env"] += "".join(f"{k}: '{v}'\n" for k, v in megascale.items())
        tpu_vm.attributes.update(
            {"agent-worker-number": str(worker), "worker-network-endpoints": ",".join(hosts)}
        )
    assert sharding.initialize_distributed() is True
    want = (f"{megascale_host}:{TPU_PORT}", slices * len(hosts), slice_id * len(hosts) + worker)
    assert started(recorder) == want


# ----------------------------------------------------------------------------- SLURM, Open MPI
def slurm_env(monkeypatch, ntasks: int, procid: int, nodelist: str = "node[003-004]") -> None:
    for key, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": nodelist,
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % 2),
    }.items():
        monkeypatch.setenv(key, value)


def test_distributed_init_slurm(recorder, monkeypatch):
    slurm_env(monkeypatch, ntasks=4, procid=3)
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "23456")
    assert sharding.initialize_distributed() is True
    assert started(recorder) == ("node003:23456", 4, 3)  # the first node of node[003-004]
    recorder.clear()
    # launch/slurm_gpu.sbatch: it names the coordinator (from scontrol); Slurm gives the rest.
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "gpu-a17:31337")
    assert sharding.initialize_distributed() is True
    assert started(recorder) == ("gpu-a17:31337", 4, 3)


def test_distributed_init_open_mpi(recorder, monkeypatch):
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "23457")
    assert sharding.initialize_distributed() is True
    assert started(recorder) == ("10.96.0.1:23457", 3, 2)  # mpirun's host, from the URI


def test_distributed_init_launcher_read_failure_names_the_way_out(recorder, monkeypatch):
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "not-a-uri")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    with pytest.raises(RuntimeError, match=r"OmpiCluster.*--coordinator_address"):
        sharding.initialize_distributed()
    assert recorder == []


# ----------------------------------------------------------------------------- explicit, no-op
def test_distributed_init_explicit_env_and_cli_arguments(recorder, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:5000")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "8")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    slurm_env(monkeypatch, ntasks=4, procid=3)  # explicit values win over a launcher
    assert sharding.initialize_distributed() is True
    assert started(recorder) == ("10.0.0.1:5000", 8, 5)
    recorder.clear()
    # `gte-jax train --coordinator_address --num_processes --process_id` win over JAX_*.
    assert sharding.initialize_distributed("10.0.0.2:6000", 2, 1) is True
    assert started(recorder) == ("10.0.0.2:6000", 2, 1)


def test_distributed_init_incomplete_settings_exit_2(recorder, monkeypatch, tmp_path, capsys):
    from gte_jax.commands import train

    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")  # no coordinator, no process id, no launcher
    config = str(REPO / "configs" / "finetune.py")
    assert train.main(["--config", config, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "coordinator_address" in err[0], err
    assert recorder == []


@pytest.mark.parametrize(
    "launcher", ["plain", "jax_env_1", "slurm_1_task", "open_mpi_1", "gke_1_host", "tpu_vm_1_host"]
)
def test_distributed_init_single_process_is_a_noop(tpu_vm, recorder, monkeypatch, launcher):
    if launcher == "jax_env_1":
        monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
        monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:5000")
    elif launcher == "slurm_1_task":
        slurm_env(monkeypatch, ntasks=1, procid=0, nodelist="node001")
    elif launcher == "open_mpi_1":
        monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
        monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
        monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
        monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    elif launcher == "gke_1_host":
        gke_pod(monkeypatch, ["10.8.0.11"], worker=0)
    elif launcher == "tpu_vm_1_host":  # e.g. a v5litepod-8 from `gcloud compute tpus tpu-vm create`
        tpu_vm.attributes.update(
            {"agent-worker-number": "0", "worker-network-endpoints": "t1v-n-0:0:10.130.0.2"}
        )
    else:  # not a TPU VM either
        monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)
    assert sharding.initialize_distributed() is False
    assert recorder == []
    if launcher == "tpu_vm_1_host":
        assert "worker-network-endpoints" in tpu_vm.asked  # the count was read, and was 1


def test_distributed_init_plain_machine_asks_no_metadata_server(metadata, recorder, monkeypatch):
    """On a machine without TPU chips (libtpu installed or not) JAX's TPU VM detection sends no
    request, even with TPU_SKIP_MDS_QUERY unset: it cannot hang on a laptop or CI machine."""
    if cloud_tpu_init.running_in_cloud_tpu_vm:
        pytest.skip("this machine is a Cloud TPU VM")
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)
    metadata.attributes.update(
        {"agent-worker-number": "1", "worker-network-endpoints": "10.130.0.2,10.130.0.3"}
    )
    assert sharding.launcher_environment() is None
    assert sharding.initialize_distributed() is False
    assert metadata.asked == [] and recorder == []


# ----------------------------------------------------------------------------- two real processes
WORKER = """
import json, jax, numpy as np
from jax.experimental import multihost_utils
from gte_jax import sharding
started = sharding.initialize_distributed()
ids = multihost_utils.process_allgather(np.array(jax.process_index()))
print(json.dumps({"started": started, "count": jax.process_count(), "index": jax.process_index(),
                  "ids": np.asarray(ids).tolist()}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["slurm"])
def test_distributed_init_two_processes_from_launcher_env(launcher):
    """Two CPU processes started with only a launcher's env vars (no JAX_* address, count or id)
    find each other through `initialize_distributed` and run a cross-process all-gather."""
    env = {k: v for k, v in os.environ.items() if not k.startswith((*LAUNCHER_PREFIXES, "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_PORT=str(_free_port()), NO_PROXY="127.0.0.1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])

    def task_env(i: int) -> dict[str, str]:
        if launcher == "slurm":
            return dict(SLURM_JOB_ID="77", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                        SLURM_PROCID=str(i), SLURM_LOCALID=str(i))  # fmt: skip
        return dict(OMPI_MCA_orte_hnp_uri="4096.0;tcp://127.0.0.1:34911", OMPI_COMM_WORLD_SIZE="2",
                    OMPI_COMM_WORLD_RANK=str(i), OMPI_COMM_WORLD_LOCAL_RANK=str(i))  # fmt: skip

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env={**env, **task_env(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for i, got in enumerate(results):
        assert got == {"started": True, "count": 2, "index": i, "ids": [0, 1]}
