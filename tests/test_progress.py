"""Long silent phases show a live status line, and a diverging run names the settings to change."""

import threading
from pathlib import Path

import pytest

from trustgen import progress
from trustgen.config import TrainConfig
from trustgen.errors import TrustgenError
from trustgen.training.trainer import check_finite


class FakeBar:
    def __init__(self) -> None:
        self.redraws = 0
        self.closed = threading.Event()

    def refresh(self) -> None:
        self.redraws += 1

    def close(self) -> None:
        self.closed.set()


def test_a_status_line_redraws_its_timer_while_the_work_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    bar = FakeBar()
    monkeypatch.setattr(progress, "progress_bar", lambda *args, **kwargs: bar)
    work_done = threading.Event()
    with progress.status("final evaluation on the validation data", True, every=0.01):
        # The work is silent: only the ticker can redraw. Wait for a few redraws (bounded).
        for _ in range(500):
            if bar.redraws >= 3:
                break
            work_done.wait(0.01)
    assert bar.redraws >= 3 and bar.closed.is_set()
    redraws = bar.redraws
    work_done.wait(0.05)
    assert bar.redraws == redraws  # the ticker stops with the work


def test_the_divergence_message_names_real_flags_and_values() -> None:
    config = TrainConfig(max_steps=10, learning_rate=3e-3, grad_clip=0.5)
    with pytest.raises(TrustgenError) as caught:
        check_finite({"train_loss": float("nan")}, 12, config)
    message = str(caught.value)
    assert "train_loss became nan at step 12" in message
    assert "(--lr, learning_rate in Python; now 0.003)" in message
    assert "(--grad-clip, grad_clip in Python; now 0.5)" in message

    off = TrainConfig(max_steps=10, grad_clip=0)
    with pytest.raises(TrustgenError, match=r"turn gradient clipping on \(--grad-clip 1.*now off\)"):
        check_finite({"train_loss": float("inf")}, 3, off)


@pytest.mark.slow
def test_grad_clip_is_a_training_flag(tmp_path: Path) -> None:
    from tests.test_cli import assert_clear_error, trustgen

    result = trustgen("train", "--data", "shakespeare", "--out", str(tmp_path / "run"), "--grad-clip", "-1")
    assert_clear_error(result, "grad_clip must not be negative")
