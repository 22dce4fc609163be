"""What training records: metrics.csv and TensorBoard events, and loss.png."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class MetricsLog:
    """metrics.csv and TensorBoard events; rows past a resumed checkpoint are dropped."""

    def __init__(self, run_dir: Path, start_step: int, fields: list[str]) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.fields = fields
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self._file = open(self.path, "w", newline="")  # noqa: SIM115 -- closed in close()
        self._csv = csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore")
        self._csv.writeheader()
        self._csv.writerows(rows)
        self._file.flush()
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(run_dir), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict[str, Any]) -> None:
        self._csv.writerow({k: row.get(k, "") for k in self.fields})
        self._file.flush()
        for key in self.fields[3:]:  # lr, the losses and the rate
            if key in row:
                self._tb.add_scalar(key, row[key], row["step"])

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def plot_losses(run_dir: Path) -> None:
    """loss.png: every loss column of metrics.csv (training, validation, each GAN player) by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = [c for c in reader.fieldnames or [] if c.endswith("loss")]
    unit = "nats/token" if "tokens" in (reader.fieldnames or []) else "nats/image"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key in columns:
        points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if points:
            ax.plot(*zip(*points, strict=True), label=key.removesuffix("_loss").replace("val", "validation"),
                    marker="o" if key.startswith("val") else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if "d_loss" in columns else f"loss ({unit})")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    if ax.lines:  # a run shorter than one log interval has nothing to show yet
        ax.legend()
    fig.tight_layout()
    tmp = Path(run_dir) / "loss.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(Path(run_dir) / "loss.png")


__all__ = ["MetricsLog", "plot_losses"]
