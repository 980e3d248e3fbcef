"""The Ray executor: the workers of finback/runtime/worker.py as Ray actors, on a cluster the user
started (`ray start --head` on one node, `ray start --address=HEAD:6379` on the others; RAY_ADDRESS
says where it is, "auto" finds a local one).

One placement group holds one bundle per rank ({"GPU": 1, "CPU": 1} on GPUs, {"CPU": 1} on CPU),
packed (a tensor-parallel group lands on one node when it fits there); rank r is bundle r. Each
GPU actor sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES), so it computes on cuda:0. The
NCCL/gloo settings of the engine's environment (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, GLOO_SOCKET_IFNAME,
NCCL_DEBUG, ...) are passed to every actor through its runtime_env, so one `export` on the head node
configures the interconnect of all of them. The control channel is the same authenticated JSON
channel as with worker processes, from the actors to this node's address; the actors' `run` calls
return only when a worker stops.
"""

from __future__ import annotations

import os

import torch

from finback.runtime.distributed import free_port
from finback.runtime.executor import DistributedExecutor

# passed from the engine's environment to every worker, when set
WORKER_ENV = ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_DISABLE", "NCCL_IB_GID_INDEX", "NCCL_NET_GDR_LEVEL",
              "NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_CROSS_NIC", "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS",
              "NCCL_SOCKET_NTHREADS", "NCCL_NSOCKS_PERTHREAD", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME",
              "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS")


class RayWorker:
    """The actor: where it runs, a free port there (rank 0 hosts the process group), then the worker."""

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_port(self.node_ip())

    def run(self, cfg: dict, secret_hex: str) -> None:
        from finback.runtime.worker import run_worker

        run_worker(cfg, bytes.fromhex(secret_hex))


class RayExecutor(DistributedExecutor):
    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        try:
            import ray
        except ImportError:
            raise ValueError("distributed_executor_backend='ray' needs Ray: pip install ray") from None
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS", "auto")
            try:
                ray.init(address=address, logging_level="warning", log_to_driver=True)
            except ConnectionError as exc:
                why = f"{exc}: {exc.__cause__}" if exc.__cause__ is not None else str(exc)
                raise ValueError(f"cannot join the Ray cluster at {address!r} ({why}); start one with "
                                 f"`ray start --head`, set RAY_ADDRESS, and RAY_AUTH_MODE=token if it uses "
                                 f"token authentication") from None
        self.listen_host = ray.util.get_node_ip_address()
        self.actors: list = []
        self.refs: list = []
        self.pg = None
        super().__init__(args, device, dtype)

    def _launch(self, common: dict) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpu = self.device.type == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(self.world)], strategy="PACK")
        wait_s = float(os.environ.get("FINBACK_RAY_PLACEMENT_TIMEOUT", "120"))
        ready, _ = ray.wait([self.pg.ready()], timeout=wait_s)
        if not ready:
            raise ValueError(f"the Ray cluster did not give {self.world} bundles of {bundle} within {wait_s:.0f} s "
                             f"(its free resources: {ray.available_resources()})")
        env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
        actor = ray.remote(RayWorker)
        for rank in range(self.world):
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=rank)
            self.actors.append(actor.options(num_cpus=1, num_gpus=1 if gpu else 0, scheduling_strategy=strategy,
                                             runtime_env={"env_vars": env}).remote())
        head_ip = ray.get(self.actors[0].node_ip.remote())
        port = ray.get(self.actors[0].free_port.remote())
        common = dict(common, init_method=f"tcp://{head_ip}:{port}", threads=1)
        self.refs = [a.run.remote(dict(common, rank=rank, local_rank=0), self._secret.hex())
                     for rank, a in enumerate(self.actors)]

    def _exit_status(self, rank: int) -> str | None:
        import ray

        if rank >= len(self.refs):
            return None
        done, _ = ray.wait([self.refs[rank]], timeout=0)
        if not done:
            return None
        try:
            ray.get(done[0])
        except Exception as exc:  # RayActorError, the worker's own exception
            return f"failed: {type(exc).__name__}: {exc}"
        return "stopped"

    def _kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
