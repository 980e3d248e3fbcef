"""finback doctor: NCCL's transport read from real NCCL_DEBUG=INFO lines, the advice for sockets, the
gloo all-reduce bandwidth test over 2 processes, and the CLI."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from finback.hardware import doctor
from finback.hardware.doctor import (
    advice,
    allreduce_bench,
    bus_bandwidth,
    parse_nccl_log,
)

# Log lines as NCCL printed them in public bug reports (hosts as posted):
# NVLink/PCIe P2P: NVIDIA/nccl#1538 (P2P/CUMEM), NVIDIA/nccl#952 (P2P/IPC/read), NVIDIA/nccl-tests#213
P2P_LOG = """\
job-3bb823c0-6d27-4312-8094-1c5910bf9b51-worker-0:5670:5810 [7] NCCL INFO Channel 02/0 : 7[7] -> 0[0] via P2P/CUMEM
job-3bb823c0-6d27-4312-8094-1c5910bf9b51-worker-0:5669:5807 [6] NCCL INFO Channel 00/0 : 6[6] -> 5[5] via P2P/CUMEM
<cluster_name>:921:1146 [2] NCCL INFO Channel 00/0 : 10[2] -> 9[1] via P2P/IPC/read
hw14:798:812 [2] NCCL INFO Channel 05/0 : 2[2] -> 1[1] via P2P/direct pointer
"""
# InfiniBand with GPUDirect RDMA: NVIDIA/nccl#707 (NET/IB), NVIDIA/nccl#1453 (the IBext plugin)
IB_GDR_LOG = """\
NCCL version 2.18.5+cuda11.8
10-90-43-152:120890:121560 [0] NCCL INFO Channel 01 : 2[c7000] -> 0[87000] [receive] via NET/IB/5/GDRDMA
10-90-43-152:120890:121563 [3] NCCL INFO Channel 01 : 3[ca000] -> 2[c7000] [send] via NET/IB/2/GDRDMA
[0] h100clust-worker-1:497888:498087 [0] NCCL INFO Channel 00/0 : 16[0] -> 0[0] [receive] via NET/IBext_v8/7/GDRDMA
H20-GPU-05:1789225:1789736 [1] NCCL INFO Channel 01/0 : 1[1] -> 0[0] via P2P/CUMEM
"""
# InfiniBand without GPUDirect RDMA: NVIDIA/nccl#1814
IB_LOG = """\
hostname-test:987:1260 [7] NCCL INFO Channel 03/0 : 47[7] -> 39[7] [receive] via NET/IBext_v8/2
hostname-test:986:1254 [6] NCCL INFO Channel 00/0 : 6[6] -> 38[6] [receive] via NET/IBext_v8/1
"""
# TCP sockets: NVIDIA/nccl#1121 (no IB device, socket on eno1) and NVIDIA/nccl#952 (the channel line)
SOCKET_LOG = """\
ps-SYS-420GP-TNR:1697708:1698247 [1] NCCL INFO NET/IB : No device found.
ps-SYS-420GP-TNR:1697708:1698247 [1] NCCL INFO NET/Socket : Using [0]eno1:192.168.223.11<0>
ps-SYS-420GP-TNR:1697708:1698247 [1] NCCL INFO Using network Socket
<cluster_name>:926:1151 [7] NCCL INFO Channel 03/0 : 15[7] -> 6[6] [send] via NET/Socket/3
<cluster_name>:926:1151 [7] NCCL INFO Channel 07/0 : 15[7] -> 6[6] [send] via NET/Socket/3
<cluster_name>:919:1150 [0] NCCL INFO Channel 01/0 : 8[0] -> 15[7] via P2P/IPC/read
"""


def test_p2p_lines():
    log = parse_nccl_log(P2P_LOG)
    assert log.transports == {"p2p": 4}
    assert log.paths["P2P/direct pointer"] == 1 and log.paths["P2P/IPC/read"] == 1
    assert log.worst == "p2p" and advice(log, env={}) == []


def test_ib_gdrdma_lines():
    log = parse_nccl_log(IB_GDR_LOG)
    assert log.transports == {"ib-gdrdma": 3, "p2p": 1}
    assert log.version == "2.18.5+cuda11.8" and log.worst == "ib-gdrdma"
    assert advice(log, env={}) == []


def test_ib_without_gdrdma_lines():
    log = parse_nccl_log(IB_LOG)
    assert log.transports == {"ib": 2}
    tips = advice(log, env={})
    assert len(tips) == 1 and "nvidia_peermem" in tips[0]


def test_socket_lines_and_advice():
    log = parse_nccl_log(SOCKET_LOG)
    assert log.transports == {"socket": 2, "p2p": 1} and log.worst == "socket"
    assert log.ib_not_found and log.network == "Socket" and log.socket_interfaces == "[0]eno1:192.168.223.11<0>"
    text = "\n".join(advice(log, env={"NCCL_IB_DISABLE": "1"}))
    print("\n" + text)
    for needed in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "ibv_devinfo", "/dev/infiniband", "eno1",
                   "NCCL_IB_DISABLE is set"):
        assert needed in text
    assert "NCCL_IB_DISABLE" not in "\n".join(advice(log, env={}))


def test_sockets_case_is_printed_by_the_cli(capsys):
    from finback.cli.doctor import print_report

    log = parse_nccl_log(SOCKET_LOG)
    report = {"versions": {"torch": "x"}, "gpus": [], "environment": {}, "network": {"interfaces": [], "rdma_devices": []},
              "allreduce": {"backend": "nccl", "world_size": 16, "local_processes": 8, "correct": True, "error": None,
                            "rows": [{"bytes": 1 << 20, "time_us": 900.0, "algbw_gbps": 1.17, "busbw_gbps": 2.19}],
                            "nccl": {**asdict(log), "worst": log.worst}, "advice": advice(log, env={})}}
    print_report(report)
    out = capsys.readouterr().out
    assert "TCP sockets" in out and "advice:" in out and "NCCL_SOCKET_IFNAME" in out


def test_gloo_allreduce_two_processes():
    sizes = (4096, 1 << 20)
    r = allreduce_bench(2, "gloo", sizes=sizes, iters=3, warmup=1, timeout=60)
    assert r.error is None, r.log_tail
    assert r.correct is True and r.world_size == 2 and r.nccl is None
    print("\n   bytes   time_us  algbw GB/s  busbw GB/s")
    for row, size in zip(r.rows, sizes):
        print(f"{row['bytes']:>8} {row['time_us']:>9.1f} {row['algbw_gbps']:>11.3f} {row['busbw_gbps']:>11.3f}")
        assert row["bytes"] == size and row["time_us"] > 0
        assert row["algbw_gbps"] == pytest.approx(size / (row["time_us"] * 1e-6) / 1e9)
        assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"])  # 2(n-1)/n = 1 for n = 2


def test_bus_bandwidth_and_bad_groups():
    assert bus_bandwidth(10.0, 8) == pytest.approx(17.5)
    assert bus_bandwidth(10.0, 1) == 0.0
    with pytest.raises(ValueError):
        allreduce_bench(0, "gloo")
    with pytest.raises(ValueError, match="backend"):
        allreduce_bench(2, "mpi")
    with pytest.raises(ValueError, match="at least 4 bytes"):
        allreduce_bench(2, "gloo", sizes=(2,))


def test_a_missing_peer_is_reported_not_hung():
    # two nodes asked for, one present: the workers' rendezvous times out and the doctor says so
    r = allreduce_bench(1, "gloo", sizes=(4096,), iters=1, warmup=0, timeout=3, nnodes=2, node_rank=0,
                        master_port=doctor._free_port())
    assert r.error is not None and r.rows == [] and r.log_tail


def test_cli_json(monkeypatch, capsys):
    import torch

    from finback.cli.main import main

    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    assert main(["doctor", "--no-bench", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["environment"]["NCCL_SOCKET_IFNAME"] == "eth0"
    assert data["versions"]["torch"] == torch.__version__
    assert len(data["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="gloo"):
            doctor.diagnose(bench=False, backend="nccl")
