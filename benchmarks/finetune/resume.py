"""Results written as they come, and picked up again by a rerun.

:class:`Saved` keeps, in a folder of its own under the benchmark's ``--out``
(``quality-partial-quick/<task>/`` or ``quality-partial-default/<task>/``, one per task,
so that tasks can run in processes of their own):

* ``progress.json``: every pre-training's record, every fine-tuning run (method,
  learning rate, seed: metrics and seconds), each method's one-off figures (trainable
  parameters, memory estimate), 1LoRA's trained vectors (the deployment check reloads
  the selected run's) and each deployment check; rewritten after each of them;
* ``<task>-<pre-training>-pretrain.pt``: the pre-trained models' weights.

A rerun with the same ``--out`` and mode loads them and runs only what is missing (the
runs are seeded, so a resumed result is the one an uninterrupted run gives, up to the
timings). The file records what it was made with (budget, grids, pre-trainings, torch,
threads); a rerun with anything else stops and says so instead of mixing results.
``--fresh`` deletes the folder first; a completed benchmark deletes it after writing
``quality.json`` and ``quality.png``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

Log = Callable[[str], None]


class Mismatch(RuntimeError):
    """The saved results were made with another protocol or environment."""


class Saved:
    def __init__(self, folder: Path, fingerprint: dict[str, Any], fresh: bool, log: Log):
        self.folder, self.path, self.log = folder, folder / "progress.json", log
        # through JSON once, so that tuples compare equal to the lists read back
        fingerprint = json.loads(json.dumps(fingerprint))
        if fresh and folder.exists():
            shutil.rmtree(folder)
            log(f"--fresh: deleted the saved results in {folder}")
        self.data: dict[str, Any] = {"fingerprint": fingerprint, "entries": {}}
        self.resumed = 0  # fine-tuning runs taken from the file (counted by the protocol)
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("fingerprint") != fingerprint:
                differ = sorted(k for k in fingerprint.keys() | data.get("fingerprint", {}).keys()
                                if fingerprint.get(k) != data.get("fingerprint", {}).get(k))
                raise Mismatch(f"{self.path} holds results made with another setting ({', '.join(differ)}): "
                               "rerun with --fresh to delete them, or give another --out")
            self.data = data
            runs = sum(1 for k in data["entries"] if "/run/" in k)
            log(f"resuming from {self.path}: {runs} fine-tuning run(s) saved, only the rest is run")

    # ------------------------------------------------------------------ entries

    def get(self, key: str) -> Optional[Any]:
        return self.data["entries"].get(key)

    def put(self, key: str, value: Any) -> None:
        self.data["entries"][key] = value
        self._write()

    def _write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))  # NaN (a diverged loss) is written as NaN and read back
        os.replace(tmp, self.path)  # a stop while writing leaves the previous file whole

    # ------------------------------------------------------------------ tensors

    @staticmethod
    def tensors_to_json(state: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                    "values": t.detach().flatten().tolist()} for n, t in state.items()}

    @staticmethod
    def tensors_from_json(data: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {n: torch.tensor(v["values"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
                for n, v in data.items()}

    # ------------------------------------------------------------------ models

    def model(self, key: str, make: Callable[[], tuple[nn.Module, dict[str, Any]]],
              rebuild: Callable[[], nn.Module]) -> tuple[nn.Module, dict[str, Any], bool]:
        """``make()`` -> ``(model, record)``, saved under ``key``; or, when saved, the model
        ``rebuild()`` gives with the saved weights, and the saved record. The third value
        says whether it was loaded."""
        weights = self.folder / f"{key.replace('/', '-')}.pt"
        record = self.get(key)
        if record is not None and weights.exists():
            model = rebuild()
            model.load_state_dict(torch.load(weights, weights_only=True))
            for p in model.parameters():
                p.requires_grad_(False)
            return model, record, True
        model, record = make()
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
        self.put(key, record)
        return model, record, False

    def done(self) -> None:
        """The benchmark finished and wrote its report: the saved results are no longer needed."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
