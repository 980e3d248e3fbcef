"""What this machine has and what fits where: `fit` (the memory planner behind `finback fit` and the
engine's up-front refusal) and `doctor` (GPUs, NCCL, the network, all-reduce bandwidth)."""
