"""1LoRA with tensor parallelism, alone or under FSDP2 (2-D), on CPU processes (gloo).

    torchrun --nproc-per-node 2 examples/tp_finetune.py           # TP over 2 ranks
    torchrun --nproc-per-node 4 examples/tp_finetune.py --fsdp    # 2-D: FSDP2 (dp=2) over TP (tp=2)

Every rank builds the same model (same seed) and adapts it in the module form (the
model's own class, so its decoder layers are still there to parallelize). Then each
decoder layer is split Megatron-style with ``parallelize_module``: q, k, v, gate and up
column-parallel, o and down row-parallel. Each ``b`` follows its weight: a
column-parallel weight's ``b`` is sharded like the weight's output rows (``Shard(0)``), a
row-parallel weight's ``b`` is replicated (each rank adds ``b * sum(x_local)`` to its
partial output, and the reduction the layer already does sums the parts into
``b * sum(x)``: no extra communication). With ``--fsdp`` every layer, then the model, is
also sharded with FSDP2 over the "dp" dimension of a (dp, tp) mesh, torchtitan's recipe.

The ranks of one tp group read the same rows of the global batch; each dp group reads its
own rows. At the end the adapter is written twice: ``ol.save_adapter`` (the gathered
vectors, one small safetensors file written by rank 0, loadable into a one-process
model) and a distributed checkpoint (DCP) of the adapter state (the vectors and their
AdamW state, each rank writing its shards; it reloads on any number of ranks).

With GPUs present each rank takes ``cuda:<LOCAL_RANK>`` and the ``nccl`` backend (that
path has not been run on a GPU here).
"""

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import onelora_fx as ol
from onelora_fx.tools import zoo

parser = argparse.ArgumentParser()
parser.add_argument("--fsdp", action="store_true", help="2-D: FSDP2 over dp=world/2 on top of TP over tp=2")
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "onelora_tp_finetune"),
                    help="folder for the adapter file and the DCP checkpoint")
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_*
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
if cuda:
    torch.cuda.set_device(device)

KV_HEADS = 2
tp = 2 if args.fsdp else world
dp = world // tp
if tp * dp != world or KV_HEADS % tp:
    raise SystemExit(f"{world} ranks: TP needs a degree dividing the {KV_HEADS} key/value heads "
                     f"(2 ranks, or --fsdp with an even number of ranks)")
mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))

torch.manual_seed(0)  # the same base weights on every rank
model, _, example = zoo.llama(layers=2, hidden=64, intermediate=128, vocab=128, kv_heads=KV_HEADS)
model.to(device)
example = {k: v.to(device) for k, v in example.items()}
vocab = model.config.vocab_size

# Transform first (every rank, the same way), then parallelize: parallelize_module moves
# each b along with its layer (transforming an already parallelized model works too).
gm = ol.transform(model, "all-linear", capture="module", example_kwargs=example)
plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
for layer in gm.model.layers:
    parallelize_module(layer, mesh["tp"], plan)
if args.fsdp:
    for layer in gm.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(gm, mesh=mesh["dp"])

trained = ol.adapter_parameters(gm)  # after parallelizing: it swaps in DTensor parameters
opt = torch.optim.AdamW(trained.values(), lr=3e-3)

# One fixed global batch of 8 sequences; each dp group takes its 8 / dp of them, and the
# ranks of a tp group read the same rows. The loss is a mean over equal shards and FSDP2
# averages gradients over dp, so every step follows the gradient of the global mean.
ids = torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(1)).to(device)
local = ids.chunk(dp)[mesh["dp"].get_local_rank()]
for step in range(args.steps):
    logits = gm(input_ids=local).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), local[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss, op=dist.ReduceOp.AVG)  # the tp ranks of a group hold the same value
    if rank == 0 and (step % 3 == 0 or step == args.steps - 1):
        print(f"step {step:2d}  loss {global_loss.item():.4f}")


def local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


# What each rank stores: its shard of every weight and of every b.
q, o = gm.model.layers[0].self_attn.q_proj, gm.model.layers[0].self_attn.o_proj
line = (f"rank {rank} (dp {mesh['dp'].get_local_rank()}, tp {mesh['tp'].get_local_rank()}): "
        f"{sum(local_numel(p) for p in gm.parameters()):,} of {sum(p.numel() for p in gm.parameters()):,} parameters, "
        f"{sum(local_numel(p) for p in trained.values()):,} of {sum(p.numel() for p in trained.values()):,} b values; "
        f"q_proj b {tuple(q.onelora_b.placements)} {tuple(q.onelora_b.to_local().shape)}, "
        f"o_proj b {tuple(o.onelora_b.placements)} {tuple(o.onelora_b.to_local().shape)}")
lines = [None] * world
dist.all_gather_object(lines, line)
if rank == 0:
    print("\n".join(lines))

# The adapter file: every rank gathers (a collective), rank 0 writes the same file one
# process would write. It loads into a one-process model with ol.load_adapter, and into a
# parallelized one (each rank keeps its shard).
out = Path(args.out)
if rank == 0:
    out.mkdir(parents=True, exist_ok=True)
dist.barrier()
adapter = ol.save_adapter(gm, out / "adapter.safetensors")

# A distributed checkpoint of the adapter state only: the b vectors (frozen base weights
# are left out) and their AdamW state, each rank writing its own shards. Load it with
# get_state_dict, dcp.load and set_state_dict(..., StateDictOptions(ignore_frozen_params=
# True, strict=False)) on any number of ranks, or in one process with no process group.
model_sd, optim_sd = get_state_dict(gm, opt, options=StateDictOptions(ignore_frozen_params=True))
dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "dcp"))

b = {n: p.full_tensor().detach() for n, p in trained.items()}  # a collective: every rank
if rank == 0:
    files = sorted((out / "dcp").iterdir())
    print(f"{len(b)} b vectors, norm {torch.cat(list(b.values())).norm():.4f}")
    print(f"adapter file {adapter} ({adapter.stat().st_size:,} bytes); DCP checkpoint {out / 'dcp'}: "
          f"{len(files)} files, {sum(f.stat().st_size for f in files):,} bytes")
dist.destroy_process_group()
