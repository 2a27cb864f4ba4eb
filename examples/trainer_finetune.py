"""1LoRA with Hugging Face Trainer on a tiny LLaMA: the default (graph) form, adapter-sized
checkpoints, an exact resume, and the adapter loaded back into the base model in one call.

    python examples/trainer_finetune.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers

import onelora_fx as ol


class Sequences(torch.utils.data.Dataset):
    """Counting sequences (token i+1 follows token i) from random starts: a pattern to learn."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        start = torch.randint(0, 48, (), generator=torch.Generator().manual_seed(i))
        ids = torch.arange(start, start + 16) % 64
        return {"input_ids": ids, "labels": ids.clone()}


def main(out: Path, steps: int = 12) -> dict:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64,
                                      # with the KV cache on (pretrained configs' default), "auto" takes the module
                                      # form: torch.export cannot return a cache object
                                      use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    example = {"input_ids": torch.stack([Sequences()[i]["input_ids"] for i in range(2)])}

    def run(output_dir: Path, resume: str | None = None) -> tuple[torch.nn.Module, transformers.Trainer]:
        gm = ol.transform(model, "all-linear", example_kwargs=example)
        args = transformers.TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=8,
                                              learning_rate=1e-1, lr_scheduler_type="linear", save_strategy="steps",
                                              save_steps=steps // 2, logging_steps=3, report_to=[], use_cpu=True,
                                              disable_tqdm=True, seed=0)
        trainer = ol.adapter_checkpoints(transformers.Trainer(model=gm, args=args, train_dataset=Sequences()))
        trainer.train(resume_from_checkpoint=resume)
        return gm, trainer

    gm, trainer = run(out / "run")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    checkpoint = out / "run" / f"checkpoint-{steps // 2}"
    size = sum(p.stat().st_size for p in checkpoint.iterdir())
    print(f"{type(gm).__name__} ({'graph' if isinstance(gm, torch.fx.GraphModule) else 'module'} form): "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"{checkpoint.name}: {sorted(p.name for p in checkpoint.iterdir())}, {size:,} bytes")

    resumed, _ = run(out / "resumed", resume=str(checkpoint))
    gap = max((a - b).abs().max().item() for a, b in zip(ol.adapter_parameters(gm).values(),
                                                        ol.adapter_parameters(resumed).values()))
    print(f"resumed from {checkpoint.name} vs straight through: max |b difference| {gap:.1e}")

    adapter = ol.save_adapter(gm, out / "adapter.safetensors")
    loaded = ol.load(model, adapter, example_kwargs=example)  # pattern and sites from the file
    same = torch.equal(loaded(**example).logits, gm(**example).logits)
    print(f"{adapter.name}: {adapter.stat().st_size:,} bytes; loaded into the base model: same logits {same}")
    return {"gm": gm, "losses": losses, "checkpoint": checkpoint, "gap": gap, "same": same, "adapter": adapter}


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
