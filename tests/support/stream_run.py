"""``modalign train ...`` that records each step's sample ids, for the streamed-resume test.

Usage: ``python stream_run.py IDS_LOG [STALL_AFTER_STEP] -- modalign arguments...``

Appends ``{"step", "epoch", "ids"}`` per optimiser step to ``IDS_LOG`` (under ``torchrun``:
``IDS_LOG.rankR`` per rank). With
``STALL_AFTER_STEP`` it stops after that step (writing ``IDS_LOG.stalled``) and waits to be
killed, so the test can ``kill -9`` it at a known place inside an epoch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from modalign.cli.main import main
from modalign.train import loop


def install_recorder(log: Path, stall_after: int | None) -> None:
    """Wrap ``Trainer._step`` to append each step's ids to ``log`` (and stall after ``stall_after``)."""
    original = loop.Trainer._step

    def recording(self: loop.Trainer, batch: Any, epoch: int) -> Any:
        out = original(self, batch, epoch)
        step = self.state.step + 1
        with log.open("a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "ids": batch.ids.tolist()}) + "\n")
        if stall_after is not None and step == stall_after:
            Path(f"{log}.stalled").write_text(str(step))
            time.sleep(600)
        return out

    loop.Trainer._step = recording  # type: ignore[method-assign]


if __name__ == "__main__":
    split = sys.argv.index("--")
    own, rest = sys.argv[1:split], sys.argv[split + 1 :]
    log = Path(own[0] + (f".rank{os.environ['RANK']}" if "RANK" in os.environ else ""))
    install_recorder(log, int(own[1]) if len(own) > 1 else None)
    sys.argv = ["modalign", *rest]
    main()
