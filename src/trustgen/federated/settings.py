"""A federation's settings, as config.json records them under "federated", and the names of
the files a federated run adds to its run directory. Free of Flower, so a machine without it
can read a federated run and get a sentence, not an ImportError, when it tries to start one."""

from __future__ import annotations

from typing import Any

from trustgen.errors import TrustgenError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "qfedavg")
PRECISIONS = ("fp32", "bf16", "int8")
DP_DELTA = 1e-5  # each client's delta per round
STATE_FILE = "federation_state.json"
SERVER_OPTIMIZER_FILE = "server_optimizer.safetensors"


def federated_settings(*, clients: int, rounds: int, partition_scheme: str, strategy: str, local_steps: int,
                       min_clients: int | None, proximal_mu: float, server_lr: float, round_timeout: float,
                       tls: bool, client_dp_epsilon: float | None = None, client_dp_clip: float = 1.0,
                       update_precision: str = "fp32", secure_aggregation: bool = False,
                       q: float = 0.1) -> dict[str, Any]:
    if strategy not in STRATEGIES:
        raise TrustgenError(f"--strategy {strategy} is not a strategy; choose one of {', '.join(STRATEGIES)}.")
    if rounds < 1 or local_steps < 1:
        raise TrustgenError("--rounds and --local-steps must be at least 1.")
    min_clients = clients if min_clients is None else min_clients
    if not 1 <= min_clients <= clients:
        raise TrustgenError(f"--min-clients must be between 1 and --clients ({clients}), got {min_clients}.")
    if client_dp_epsilon is not None and not 0 < client_dp_epsilon <= 1:
        raise TrustgenError(f"--client-dp-epsilon must be in (0, 1], got {client_dp_epsilon}: the Gaussian "
                            "mechanism's noise sqrt(2 ln(1.25/delta)) / epsilon is a guarantee there only.")
    if client_dp_clip <= 0:
        raise TrustgenError(f"--client-dp-clip must be positive, got {client_dp_clip}.")
    if q < 0:
        raise TrustgenError(f"--q must not be negative, got {q} (0 is FedAvg with equal client weights).")
    if update_precision not in PRECISIONS:
        raise TrustgenError(f"--update-precision {update_precision} is not one of {', '.join(PRECISIONS)}.")
    if secure_aggregation and (strategy in ("fedadam", "qfedavg") or update_precision != "fp32" or clients < 2):
        raise TrustgenError("--secure-aggregation takes fedavg or fedprox, fp32 updates (SecAgg+ quantizes them "
                            "itself) and at least 2 clients.")
    return {"clients": clients, "rounds": rounds, "partition": partition_scheme, "strategy": strategy,
            "local_steps": local_steps, "min_clients": min_clients, "proximal_mu": proximal_mu,
            "server_lr": server_lr, "round_timeout": round_timeout, "tls": tls,
            "client_dp": None if client_dp_epsilon is None else {"epsilon": client_dp_epsilon, "delta": DP_DELTA,
                                                                 "clip": client_dp_clip},
            "update_precision": update_precision, "secure_aggregation": secure_aggregation,
            **({"q": q} if strategy == "qfedavg" else {})}


__all__ = ["DP_DELTA", "PRECISIONS", "SERVER_OPTIMIZER_FILE", "STATE_FILE", "STRATEGIES", "federated_settings"]
