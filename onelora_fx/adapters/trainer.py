"""Adapter-sized checkpoints for Hugging Face ``Trainer`` (and the trainers built on it:
TRL's ``SFTTrainer``, ``DPOTrainer``).

``Trainer`` writes the whole model into every checkpoint (``model.safetensors``: the
frozen base too), although a 1LoRA run changes only its vectors. :func:`adapter_checkpoints`
makes a trainer write the adapter file instead (:func:`onelora_fx.save_adapter`, plus the
processing class and training arguments as ``Trainer`` writes them) and read it back on
``resume_from_checkpoint`` and ``load_best_model_at_end``. ``Trainer`` itself keeps
writing and restoring the optimizer, scheduler, RNG and trainer state, so a resumed run
continues exactly where it stopped. It does so by overriding ``Trainer``'s two saving
and loading methods in a subclass, as Hugging Face documents for customizing a trainer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, TypeVar

from .files import load_adapter, save_adapter

__all__ = ["adapter_checkpoints", "ADAPTER_FILE"]

#: the adapter file in each checkpoint folder
ADAPTER_FILE = "onelora_adapter.safetensors"

T = TypeVar("T")


class AdapterCheckpoints:
    """``Trainer`` methods that write and read only the adapter (see the module docstring)."""

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        args = self.args  # type: ignore[attr-defined]
        output_dir = output_dir if output_dir is not None else args.output_dir
        model = self.model  # type: ignore[attr-defined]
        # a DTensor adapter (FSDP2, tensor parallelism) is gathered on every rank
        if args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        save_adapter(model, Path(output_dir) / ADAPTER_FILE)
        if not args.should_save:
            return
        processing_class = getattr(self, "processing_class", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        import torch

        torch.save(args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        path = Path(resume_from_checkpoint) / ADAPTER_FILE
        if not path.is_file():  # a checkpoint Trainer itself wrote
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        load_adapter(model if model is not None else self.model, path)  # type: ignore[attr-defined]

    def _load_best_model(self) -> None:
        path = Path(self.state.best_model_checkpoint) / ADAPTER_FILE  # type: ignore[attr-defined]
        if not path.is_file():
            return super()._load_best_model()  # type: ignore[misc]
        load_adapter(self.model, path)  # type: ignore[attr-defined]


_CLASSES: dict[type, type] = {}


def adapter_checkpoints(trainer: T) -> T:
    """Make ``trainer`` save and resume adapter-sized checkpoints; returns it.

    Each checkpoint folder holds ``onelora_adapter.safetensors`` (the 1LoRA vectors and
    ``train=`` extras) instead of the whole model; resuming loads it into the adapted
    module, and ``Trainer`` restores the optimizer, scheduler and RNG states as always.
    Works with the graph and the module form, and with trainers derived from
    ``transformers.Trainer`` (TRL's).

    Examples:
        >>> trainer = ol.adapter_checkpoints(Trainer(model=gm, args=args, train_dataset=data))   # doctest: +SKIP
        >>> trainer.train()                                       # checkpoint-*/onelora_adapter.safetensors   # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=True)            # exact continuation                       # doctest: +SKIP

    Raises:
        TypeError: ``trainer`` is not a ``transformers.Trainer``.
    """
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise TypeError(f"adapter_checkpoints() takes a transformers.Trainer (or a subclass such as TRL's SFTTrainer), "
                        f"got {type(trainer).__name__}")
    cls = type(trainer)
    if issubclass(cls, AdapterCheckpoints):
        return trainer
    sub = _CLASSES.get(cls)
    if sub is None:
        sub = _CLASSES[cls] = type(cls.__name__, (AdapterCheckpoints, cls), {"__module__": cls.__module__})
    trainer.__class__ = sub
    return trainer
