"""A federation's settings, as config.json records them under "federated", and the names of
the files a federated run adds to its run directory. Free of Flower, so a machine without it
can read a federated run and get a sentence, not an ImportError, when it tries to start one."""

from __future__ import annotations

from typing import Any

from trustgen.errors import TrustgenError

STRATEGIES = ("fedavg", "fedprox", "fedadam")
STATE_FILE = "federation_state.json"
SERVER_OPTIMIZER_FILE = "server_optimizer.safetensors"


def federated_settings(*, clients: int, rounds: int, partition_scheme: str, strategy: str, local_steps: int,
                       min_clients: int | None, proximal_mu: float, server_lr: float, round_timeout: float,
                       tls: bool) -> dict[str, Any]:
    if strategy not in STRATEGIES:
        raise TrustgenError(f"--strategy {strategy} is not a strategy; choose one of {', '.join(STRATEGIES)}.")
    if rounds < 1 or local_steps < 1:
        raise TrustgenError("--rounds and --local-steps must be at least 1.")
    min_clients = clients if min_clients is None else min_clients
    if not 1 <= min_clients <= clients:
        raise TrustgenError(f"--min-clients must be between 1 and --clients ({clients}), got {min_clients}.")
    return {"clients": clients, "rounds": rounds, "partition": partition_scheme, "strategy": strategy,
            "local_steps": local_steps, "min_clients": min_clients, "proximal_mu": proximal_mu,
            "server_lr": server_lr, "round_timeout": round_timeout, "tls": tls}


__all__ = ["SERVER_OPTIMIZER_FILE", "STATE_FILE", "STRATEGIES", "federated_settings"]
