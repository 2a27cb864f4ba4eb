"""1LoRA with torch.distributed: data-parallel fine-tuning over 2 CPU processes (gloo).

    torchrun --nproc-per-node 2 examples/ddp_finetune.py           # DistributedDataParallel
    torchrun --nproc-per-node 2 examples/ddp_finetune.py --fsdp    # FSDP2, layer by layer

Every rank builds the same model (same seed), adapts it, and trains on its slice of one
fixed global batch. Only the ``b`` vectors require grad, so they are all that DDP
all-reduces (frozen base weights never enter a gradient bucket) and all that FSDP2
reduce-scatters. DDP runs on the graph form; FSDP2 shards the module form (the model's
own class) one decoder layer at a time, so no rank ever holds more than one layer's full
weights. With GPUs present each rank takes ``cuda:<LOCAL_RANK>`` and the ``nccl``
backend (that path has not been run on a GPU here).
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import onelora_fx as ol
from onelora_fx.tools import zoo

parser = argparse.ArgumentParser()
parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--batch", type=int, default=8, help="global batch (sequences); a multiple of the number of ranks")
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_*
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
if cuda:
    torch.cuda.set_device(device)
torch.manual_seed(0)  # the same base weights on every rank
model, _, example = zoo.llama(layers=2, hidden=64, intermediate=128, vocab=128)
model.to(device)
example = {k: v.to(device) for k, v in example.items()}
vocab = model.config.vocab_size

sent = []  # elements each DDP all-reduce carries
if args.fsdp:
    # The module form runs the model's own layers, so each can be its own FSDP2 unit:
    # a layer's weights are gathered just for its forward and backward.
    gm = ol.transform(model, "all-linear", capture="module", example_kwargs=example)
    for layer in gm.model.layers:
        fully_shard(layer)
    fully_shard(gm)
    net = gm
else:
    gm = ol.transform(model, "all-linear", example_kwargs=example)
    net = DistributedDataParallel(gm)

    def counting_allreduce(state, bucket):
        sent.append(bucket.buffer().numel())
        return allreduce_hook(None, bucket)

    net.register_comm_hook(None, counting_allreduce)

trained = ol.adapter_parameters(gm)  # after fully_shard: FSDP2 swaps in sharded tensors
opt = torch.optim.AdamW(trained.values(), lr=3e-3)

# One fixed global batch (8 sequences by default); each rank takes batch / world of them. The loss is
# a mean over equal shards, and DDP / FSDP2 average gradients over ranks, so every step
# follows the gradient of the mean loss over the global batch.
if args.batch % world:
    raise SystemExit(f"the global batch of {args.batch} does not split evenly over {world} ranks: "
                     f"give --batch a multiple of {world}")
ids = torch.randint(0, vocab, (args.batch, 16), generator=torch.Generator().manual_seed(1)).to(device)
local = ids.chunk(world)[rank]
for step in range(args.steps):
    logits = net(input_ids=local).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), local[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss, op=dist.ReduceOp.AVG)
    if rank == 0 and (step % 3 == 0 or step == args.steps - 1):
        print(f"step {step:2d}  loss {global_loss.item():.4f}")

params = list(gm.parameters())
n_total = sum(p.numel() for p in params)
n_trained = sum(p.numel() for p in params if p.requires_grad)
if args.fsdp:
    # Each rank stores 1/world of every parameter; forward all-gathers them, backward
    # reduce-scatters the gradients of the b vectors only.
    local_numel = sum(p.to_local().numel() for p in params)
    summary = f"FSDP2: this rank stores {local_numel:,} of {n_total:,} parameters"
else:
    per_step = sum(sent) // args.steps
    summary = f"DDP: all-reduced {per_step:,} gradient elements per step"
    if per_step != n_trained:
        raise RuntimeError(f"DDP all-reduced {per_step} elements per step, expected {n_trained}")
# Gather the b vectors (a collective under FSDP2: every rank calls it), e.g. to save them.
b = {n: (p.full_tensor() if args.fsdp else p).detach() for n, p in trained.items()}
if rank == 0:
    print(f"world {world}; trainable {n_trained:,} of {n_total:,} parameters; {summary}")
    print(f"{len(b)} b vectors, norm {torch.cat(list(b.values())).norm():.4f}")
dist.destroy_process_group()
