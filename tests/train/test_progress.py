"""Progress: a bar on a terminal, one plain line per epoch (or per `every` steps) elsewhere."""

from __future__ import annotations

import io

from modalign.train.progress import BarProgress, LineProgress, format_duration, make_progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drive(progress: LineProgress | BarProgress, epochs: int = 2, steps: int = 3) -> None:
    step = 0
    for epoch in range(epochs):
        progress.start_epoch(epoch, steps)
        for _ in range(steps):
            step += 1
            progress.step(step, loss=1.0 / step, samples=4)
        progress.end_epoch(epoch, mean_loss=0.5)


def test_lines_per_epoch_with_loss_rate_and_time_left() -> None:
    stream = io.StringIO()
    drive(LineProgress(2, 6, stream))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2 step 3/6: epoch loss 0.5000, ")
    assert lines[1].startswith("epoch 2/2 step 6/6: epoch loss 0.5000, ")
    assert all("samples/s, elapsed " in line and ", left " in line for line in lines)
    assert lines[1].endswith("left 0:00:00")
    assert "\r" not in stream.getvalue()


def test_lines_every_n_steps() -> None:
    stream = io.StringIO()
    drive(LineProgress(2, 6, stream, every=2))
    lines = stream.getvalue().splitlines()
    steps = [line.split(":")[0] for line in lines]
    # every 2 steps, plus the epoch lines (steps 3 and 6)
    assert steps == [f"epoch {e}/2 step {s}/6" for e, s in [(1, 2), (1, 3), (2, 4), (2, 6), (2, 6)]]
    assert lines[0].startswith("epoch 1/2 step 2/6: loss 0.5000, ")


def test_terminal_gets_a_bar_and_anything_else_lines() -> None:
    assert isinstance(make_progress(2, 6, stream=FakeTerminal()), BarProgress)
    assert isinstance(make_progress(2, 6, stream=io.StringIO()), LineProgress)
    terminal = FakeTerminal()
    drive(make_progress(2, 6, stream=terminal))
    assert "epoch 2/2" in terminal.getvalue()


def test_format_duration() -> None:
    assert format_duration(0) == "0:00:00"
    assert format_duration(61.4) == "0:01:01"
    assert format_duration(3 * 3600 + 5) == "3:00:05"
    assert format_duration(-3) == "0:00:00"
