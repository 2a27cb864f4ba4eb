"""1LoRA on a tiny LLaMA in a dozen lines: adapt, train, check what changed.

    python examples/quickstart.py
"""

import torch
import torch.nn.functional as F
import transformers

import onelora_fx as ol

torch.manual_seed(0)
config = transformers.LlamaConfig(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=64, use_cache=False,
)
model = transformers.LlamaForCausalLM(config)
ids = torch.randint(0, 64, (8, 16))

# One line: capture the model as a graph and put 1LoRA on every linear but the head.
gm = ol.transform(model, "all-linear", example_kwargs={"input_ids": ids})
print(ol.summary(gm))

# Train only the b vectors: learn to predict the next token of a fixed sequence.
opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
for step in range(30):
    logits = gm(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0 or step == 29:
        print(f"step {step:2d}  loss {loss.item():.4f}")

# The base weights share `model`'s storage (no copy) and never moved; `model` keeps its
# own Parameter objects. Other batch and sequence sizes work: the capture is dynamic.
print("base weight shared:", gm.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr(),
      "and the model still trainable:", model.lm_head.weight.requires_grad)
print("other shape:", tuple(gm(input_ids=torch.randint(0, 64, (3, 5))).logits.shape))
