"""1LoRA with TRL's SFTTrainer on a tiny LLaMA, offline: the default (graph) form, a
word-level tokenizer built in place, adapter-sized checkpoints, and a resume.

    python examples/sft_trl.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from trl import SFTConfig, SFTTrainer

import onelora_fx as ol

WORDS = "the a cat dog sat ran on under mat rug and then".split()


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer (no download): 4 special tokens, then the words."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def main(out: Path, steps: int = 6, capture: str = "auto") -> dict:
    torch.manual_seed(0)
    tok = tokenizer()
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=len(tok), pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (8,), generator=g).tolist()) for _ in range(32)]
    data = Dataset.from_dict({"text": texts})

    example = tok(texts[:2], return_tensors="pt")
    gm = ol.transform(model, "all-linear", example_kwargs={"input_ids": example["input_ids"]}, capture=capture)
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                     save_strategy="steps", save_steps=steps // 2, logging_steps=1, report_to=[], use_cpu=True,
                     disable_tqdm=True, seed=0, max_length=16,
                     # TRL's default is True; the graph form has no per-layer checkpointing
                     # (capture="module" has: the model's own layers)
                     gradient_checkpointing=capture == "module")
    trainer = ol.adapter_checkpoints(SFTTrainer(model=gm, args=args, train_dataset=data, processing_class=tok))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    checkpoint = out / f"checkpoint-{steps // 2}"
    print(f"{type(gm).__name__} trained with SFTTrainer: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"{checkpoint.name}: {sorted(p.name for p in checkpoint.iterdir())}")

    # the same run, resumed from the middle checkpoint (a new adapted module)
    again = ol.transform(model, "all-linear", example_kwargs={"input_ids": example["input_ids"]}, capture=capture)
    resumed = ol.adapter_checkpoints(SFTTrainer(model=again, args=args, train_dataset=data, processing_class=tok))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    gap = max((a - b).abs().max().item() for a, b in zip(ol.adapter_parameters(gm).values(),
                                                        ol.adapter_parameters(again).values()))
    print(f"resumed run vs straight run: max |b difference| {gap:.1e}")
    return {"gm": gm, "resumed": again, "losses": losses, "checkpoint": checkpoint, "gap": gap}


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
