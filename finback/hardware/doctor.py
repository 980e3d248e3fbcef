"""`finback doctor`: what this machine offers multi-GPU serving, and why it may be slow.

It reports the GPUs (name, memory, compute capability), driver / CUDA / torch / NCCL versions, the
NCCL_* and GLOO_* environment, peer access between every pair of GPUs, RDMA devices and network
interfaces, and runs an all-reduce bandwidth test over a group: one process per GPU with NCCL (on a
CPU-only machine, gloo over N processes). Bandwidth is reported as nccl-tests does: algbw = bytes /
time, busbw = algbw * 2(n-1)/n (the bytes each rank's link carries in a ring all-reduce, comparable
to the link's speed whatever n is).

The workers run with NCCL_DEBUG=INFO; the transport NCCL picked is read from their log lines
(`Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM`, `... [send] via NET/IB/0/GDRDMA`,
`... via NET/Socket/0`): P2P (NVLink or PCIe peer-to-peer), SHM (through host memory), NET/IB with
or without GPUDirect RDMA, NET/Socket (TCP). Sockets between nodes, or SHM inside one, come with the
advice a person needs (`advice()`).

Several nodes: run `finback doctor --nnodes N --node-rank I --master-addr HOST` on each; every node
spawns its local workers (global rank = node_rank * local GPUs + local rank) and rank 0 reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

RESULT_MARK = "FINBACK_DOCTOR_RESULT "
DEFAULT_SIZES = (1 << 20, 16 << 20, 128 << 20)
ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR",
                "MASTER_PORT", "UCX_")

# ------------------------------------------------------------------------------------ NCCL's log

_VIA = re.compile(r"\bvia\s+(P2P/direct pointer|P2P/\S+|SHM/\S+|SHM\b|NET/\S+|NVLS\b|CollNet\S*)", re.IGNORECASE)
_VERSION = re.compile(r"NCCL version (\S+)")
_NETWORK = re.compile(r"Using network (\S+)")
_SOCKET_IF = re.compile(r"NET/Socket\s*:\s*Using\s+(.+)$")
_IB_IF = re.compile(r"NET/IB\s*:\s*Using\s+(\[.+?)(?:;\s*OOB.*)?$")

TRANSPORT_NAMES = {
    "p2p": "P2P (NVLink or PCIe peer-to-peer)",
    "nvls": "NVLink SHARP (NVLS)",
    "shm": "SHM (through host memory)",
    "ib-gdrdma": "InfiniBand/RoCE with GPUDirect RDMA",
    "ib": "InfiniBand/RoCE without GPUDirect RDMA",
    "net": "network plugin",
    "socket": "TCP sockets",
}
# best first: the worst transport seen is the one that bounds the all-reduce
_RANK = ["nvls", "p2p", "ib-gdrdma", "ib", "net", "shm", "socket"]


def transport_kind(via: str) -> str:
    """The class of one `via ...` path of NCCL's log."""
    v = via.upper()
    if v.startswith("NET/"):
        if "SOCKET" in v:
            return "socket"
        if v.startswith("NET/IB"):  # NET/IB/0, NET/IBext_v8/7/GDRDMA
            return "ib-gdrdma" if "GDRDMA" in v else "ib"
        return "net"  # other plugins (AWS OFI, ...)
    if v.startswith("P2P"):
        return "p2p"
    if v.startswith("SHM"):
        return "shm"
    if v.startswith("NVLS"):
        return "nvls"
    return "net"


@dataclass
class NCCLLog:
    """What NCCL_DEBUG=INFO lines say about the transports of a communicator."""

    transports: dict[str, int] = field(default_factory=dict)  # kind -> channel connections
    paths: dict[str, int] = field(default_factory=dict)       # raw `via` text -> count
    version: str | None = None
    network: str | None = None            # "Using network IB" / "Socket" / a plugin name
    socket_interfaces: str | None = None  # "[0]eth0:10.0.0.1<0>"
    ib_devices: str | None = None         # "[0]mlx5_0:1/IB ; [1]mlx5_1:1/RoCE"
    ib_not_found: bool = False
    gdr_disabled: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def worst(self) -> str | None:
        seen = [k for k in _RANK if self.transports.get(k)]
        return seen[-1] if seen else None


def parse_nccl_log(text: str) -> NCCLLog:
    """Read the transports NCCL chose (and what it found) from NCCL_DEBUG=INFO output."""
    out = NCCLLog()
    for line in text.splitlines():
        if "NCCL" not in line:
            continue
        for m in _VIA.finditer(line):
            via = m[1]
            out.paths[via] = out.paths.get(via, 0) + 1
            kind = transport_kind(via)
            out.transports[kind] = out.transports.get(kind, 0) + 1
        if out.version is None and (m := _VERSION.search(line)):
            out.version = m[1]
        if (m := _NETWORK.search(line)):
            out.network = m[1]
        if (m := _SOCKET_IF.search(line)):
            out.socket_interfaces = m[1].strip()
        if (m := _IB_IF.search(line)):
            out.ib_devices = m[1].strip()
        if "NET/IB : No device found" in line:
            out.ib_not_found = True
        if "GPU Direct RDMA Disabled" in line:
            out.gdr_disabled = True
        if " NCCL WARN " in line and len(out.warnings) < 20:
            out.warnings.append(line.split(" NCCL WARN ", 1)[1].strip())
    return out


def advice(log: NCCLLog, env: dict[str, str] | None = None) -> list[str]:
    """What a person should check, given the transports NCCL used."""
    env = dict(os.environ if env is None else env)
    tips: list[str] = []
    if log.transports.get("socket"):
        where = f" (interfaces: {log.socket_interfaces})" if log.socket_interfaces else ""
        tips.append("NCCL moves data over TCP sockets (NET/Socket)" + where + ": a few GB/s at best, far below "
                    "InfiniBand/RoCE; tensor parallelism across these nodes will be slow.")
        if env.get("NCCL_IB_DISABLE", "0") not in ("", "0"):
            tips.append("NCCL_IB_DISABLE is set in the environment, which forces sockets: unset it.")
        if log.ib_not_found or not log.ib_devices:
            tips.append("NCCL found no InfiniBand/RoCE device: `ibv_devinfo` must list the HCAs with ports in "
                        "state PORT_ACTIVE (install rdma-core / MLNX_OFED, load the mlx5_ib module).")
            tips.append("In a container the RDMA devices must be passed in: `docker run --device=/dev/infiniband "
                        "--cap-add=IPC_LOCK --ulimit memlock=-1 --network=host`, or on Kubernetes an RDMA device "
                        "plugin resource (e.g. rdma/hca) with hostNetwork.")
        tips.append("Name the RDMA devices NCCL should use with NCCL_IB_HCA (e.g. NCCL_IB_HCA=mlx5_0,mlx5_1; "
                    "`ibdev2netdev` maps them to interfaces); on RoCE set NCCL_IB_GID_INDEX (3 for RoCEv2 on most "
                    "setups).")
        tips.append("Pin the socket interface with NCCL_SOCKET_IFNAME (e.g. NCCL_SOCKET_IFNAME=eth0 or ^lo,docker; "
                    "see `ip -br addr`): never lo or docker0 between nodes; GLOO_SOCKET_IFNAME likewise for gloo.")
    if log.transports.get("ib") and not log.transports.get("ib-gdrdma"):
        tips.append("InfiniBand/RoCE is used without GPUDirect RDMA: data is staged through host memory. Load "
                    "the peer-memory module (`modprobe nvidia_peermem`; check `lsmod | grep peermem`), and "
                    "check NCCL_NET_GDR_LEVEL is not restricting it.")
    if log.transports.get("shm"):
        tips.append("GPUs of one node talk through host shared memory (SHM), not peer-to-peer: check "
                    "NCCL_P2P_DISABLE is unset, `nvidia-smi topo -m` for NVLink/PCIe paths, and that PCIe ACS / "
                    "the IOMMU (or a VM without P2P) is not blocking peer access.")
    if log.transports.get("socket") is None and log.gdr_disabled and log.transports.get("ib"):
        tips.append("NCCL reports GPU Direct RDMA disabled for the HCA: see nvidia_peermem above.")
    return tips


# ------------------------------------------------------------------------------------ the machine

def gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory),
                    "compute_capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
    return out


def peer_access(n: int) -> list[list[bool | None]]:
    """matrix[i][j]: can GPU i access GPU j's memory directly (None on the diagonal)."""
    import torch

    return [[None if i == j else bool(torch.cuda.can_device_access_peer(i, j)) for j in range(n)] for i in range(n)]


def _run(cmd: list[str], timeout: float = 10) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def versions() -> dict[str, str | None]:
    import torch

    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if driver is None and os.path.exists("/proc/driver/nvidia/version"):
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(\S+)", f.read())
            driver = m[1] if m else None
    nccl = None
    if torch.cuda.is_available():
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
        except (RuntimeError, AttributeError):
            nccl = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "driver": driver.splitlines()[0] if driver else None,
            "nccl": nccl, "python": sys.version.split()[0]}


def environment() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def network() -> dict[str, Any]:
    """RDMA devices (/sys/class/infiniband) and network interfaces with their addresses and speed."""
    rdma = sorted(os.listdir("/sys/class/infiniband")) if os.path.isdir("/sys/class/infiniband") else []
    ifaces = []
    try:
        import psutil

        stats = psutil.net_if_stats()
        for name, addrs in sorted(psutil.net_if_addrs().items()):
            ips = [a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
            st = stats.get(name)
            ifaces.append({"name": name, "addresses": ips, "up": bool(st and st.isup),
                           "speed_mbps": st.speed if st else 0})
    except ImportError:
        pass
    return {"rdma_devices": rdma, "interfaces": ifaces}


# ------------------------------------------------------------------------------------ all-reduce

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bus_bandwidth(algbw: float, n: int) -> float:
    """nccl-tests' busbw of an all-reduce over n ranks."""
    return algbw * 2 * (n - 1) / n if n > 1 else 0.0


def _worker(cfg: dict[str, Any]) -> None:
    """One rank of the bandwidth test (run as `python -m finback.hardware.doctor --worker JSON`)."""
    import datetime

    import torch
    import torch.distributed as dist

    rank, world, local, backend = cfg["rank"], cfg["world_size"], cfg["local_rank"], cfg["backend"]
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    extra = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://{cfg['master_addr']}:{cfg['master_port']}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=cfg["timeout"]), **extra)
    check = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(check)
    correct = bool((check == world * (world + 1) / 2).all())
    rows = []
    for size in cfg["sizes"]:
        x = torch.ones(max(1, size // 4), dtype=torch.float32, device=device)
        for _ in range(cfg["warmup"]):
            dist.all_reduce(x)
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(cfg["iters"]):
            dist.all_reduce(x)
        sync()
        elapsed = torch.tensor([(time.perf_counter() - t0) / cfg["iters"]], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        t = float(elapsed.item())
        algbw = x.numel() * 4 / t / 1e9
        rows.append({"bytes": x.numel() * 4, "time_us": t * 1e6, "algbw_gbps": algbw,
                     "busbw_gbps": bus_bandwidth(algbw, world)})
    if rank == 0:
        print(RESULT_MARK + json.dumps({"correct": correct, "rows": rows}), flush=True)
    dist.destroy_process_group()


@dataclass
class BenchResult:
    backend: str
    world_size: int
    local_processes: int
    rows: list[dict[str, float]]   # bytes, time_us, algbw_gbps, busbw_gbps (rank 0's node only)
    correct: bool | None
    nccl: NCCLLog | None
    advice: list[str]
    error: str | None = None
    log_tail: str = ""


def allreduce_bench(nprocs: int, backend: str, sizes: tuple[int, ...] = DEFAULT_SIZES, iters: int = 20,
                    warmup: int = 5, timeout: float = 300, nnodes: int = 1, node_rank: int = 0,
                    master_addr: str = "127.0.0.1", master_port: int | None = None) -> BenchResult:
    """Spawn `nprocs` local worker processes (global ranks node_rank*nprocs + i of nprocs*nnodes),
    time all-reduces of `sizes` bytes, and read the transports from their NCCL log."""
    if nprocs < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"bad group: {nprocs} processes a node, node {node_rank} of {nnodes}")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be nccl or gloo, not {backend!r}")
    if any(s < 4 for s in sizes):
        raise ValueError("all-reduce sizes must be at least 4 bytes")
    world = nprocs * nnodes
    port = master_port or (_free_port() if nnodes == 1 else 29511)
    env = dict(os.environ)
    if backend == "nccl":
        env.setdefault("NCCL_DEBUG", "INFO")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), env.get("PYTHONPATH", "")] if p)
    procs: list[tuple[subprocess.Popen, Any]] = []
    error = None
    with tempfile.TemporaryDirectory(prefix="finback-doctor-") as tmp, contextlib.ExitStack() as files:
        try:
            for i in range(nprocs):
                cfg = {"rank": node_rank * nprocs + i, "local_rank": i, "world_size": world, "backend": backend,
                       "master_addr": master_addr, "master_port": port, "sizes": list(sizes), "iters": iters,
                       "warmup": warmup, "timeout": timeout}
                log = files.enter_context(open(os.path.join(tmp, f"rank{i}.log"), "w+"))
                p = subprocess.Popen([sys.executable, "-m", "finback.hardware.doctor", "--worker", json.dumps(cfg)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
                procs.append((p, log))
            deadline = time.monotonic() + timeout + 60
            for p, _ in procs:
                try:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    error = f"the workers did not finish within {timeout + 60:.0f} s"
                    break
        finally:
            for p, _ in procs:  # only the processes started here
                if p.poll() is None:
                    p.kill()
                    p.wait()
        text = []
        for p, log in procs:
            log.seek(0)
            text.append(log.read())
            if error is None and p.returncode != 0:
                error = f"a worker exited with status {p.returncode}"
    output = "\n".join(text)
    result = None
    for line in output.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
    if result is None and error is None and node_rank == 0:
        error = "rank 0 printed no result"
    nccl = parse_nccl_log(output) if backend == "nccl" else None
    tail = "" if error is None else "\n".join(output.splitlines()[-30:])
    return BenchResult(backend, world, nprocs, (result or {}).get("rows", []), (result or {}).get("correct"),
                       nccl, advice(nccl) if nccl else [], error, tail)


# ------------------------------------------------------------------------------------ the report

def diagnose(*, bench: bool = True, nprocs: int | None = None, backend: str | None = None,
             sizes: tuple[int, ...] = DEFAULT_SIZES, iters: int = 20, warmup: int = 5, timeout: float = 300,
             nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1",
             master_port: int | None = None) -> dict[str, Any]:
    """Everything `finback doctor` reports, as plain data (what `--json` prints)."""
    found = gpus()
    backend = backend or ("nccl" if found else "gloo")
    if backend == "nccl" and not found:
        raise ValueError("the nccl backend needs CUDA GPUs; use --backend gloo on this machine")
    nprocs = nprocs or (len(found) if backend == "nccl" else 2)
    if backend == "nccl" and nprocs > len(found):
        raise ValueError(f"{nprocs} NCCL processes need {nprocs} GPUs; this machine has {len(found)}")
    out: dict[str, Any] = {"gpus": found, "versions": versions(), "environment": environment(),
                           "peer_access": peer_access(len(found)) if found else [], "network": network(),
                           "topology": _run(["nvidia-smi", "topo", "-m"]) if found else None}
    if bench and nprocs * nnodes < 2:
        out["allreduce"] = {"skipped": "one process: nothing to all-reduce with (give --nprocs or --nnodes)"}
    elif bench:
        r = allreduce_bench(nprocs, backend, sizes, iters, warmup, timeout, nnodes, node_rank, master_addr,
                            master_port)
        res = asdict(r)
        if r.nccl is not None:
            res["nccl"] = asdict(r.nccl) | {"worst": r.nccl.worst}
        out["allreduce"] = res
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: finback doctor (this module's entry point is for its worker processes)")
