"""Data-parallel 1LoRA on 2 CPU processes (gloo) trains exactly what one process trains.

Each rank takes half of one fixed global batch; after a few SGD steps the ``b`` vectors
must equal those of a single-process run on the whole batch (the loss is a mean over
equal shards and DDP / FSDP2 average gradients over ranks, so both follow the gradient
of the global mean), and the frozen base weights must not have moved by a single bit.
Three setups: DDP on the graph form, FSDP2 on the graph form as one unit, and FSDP2
layer by layer on the module form (how a model too big for one device is trained).
"""

from __future__ import annotations

import copy
import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import onelora_fx as ol
from onelora_fx import zoo
from reference import tolerance

pytest.importorskip("transformers")

WORLD = 2
STEPS = 3
LR = 1.0
VOCAB = 128


def _global_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4 * WORLD, 8), generator=torch.Generator().manual_seed(1))


def _train(net, ids: torch.Tensor, params) -> None:
    opt = torch.optim.SGD(params, lr=LR)
    for _ in range(STEPS):
        logits = net(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: FSDP2 turns every registered parameter into a sharded DTensor."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _base(gm) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in gm.named_parameters() if not p.requires_grad}


def _adapters(gm) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in ol.adapter_parameters(gm).items()}


def _worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    torch.manual_seed(0)
    model, _, example = zoo.llama(layers=1, vocab=VOCAB)
    ids = _global_batch()
    local = ids.chunk(WORLD)[rank]
    result = {"model_before": {n: p.detach().clone() for n, p in model.named_parameters()}}

    gm = ol.transform(model, "all-linear", example_kwargs=example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree, deep-copying the input spec
        to_shard = copy.deepcopy(gm)  # an independent copy for FSDP2: exporting again costs seconds

    # The single-process reference on the whole batch (no process group involved), then
    # b back to zero so that DDP starts from the same state.
    _train(gm, ids, ol.adapter_parameters(gm).values())
    result["single"] = _adapters(gm)
    with torch.no_grad():
        for b in ol.adapter_parameters(gm).values():
            b.zero_()
            b.grad = None

    result["base_before"] = _base(gm)
    _train(DistributedDataParallel(gm), local, ol.adapter_parameters(gm).values())
    result["ddp"], result["ddp_base"] = _adapters(gm), _base(gm)

    fully_shard(to_shard)  # the whole graph as one unit (see examples/ddp_finetune.py)
    _train(to_shard, local, ol.adapter_parameters(to_shard).values())
    result["fsdp"], result["fsdp_base"] = _adapters(to_shard), _base(to_shard)

    # The module form, sharded layer by layer and then as a whole (no rank ever holds
    # more than one layer's unsharded weights outside its forward)
    layered = ol.transform(model, "all-linear", capture="module", example_kwargs=example)
    result["layered_base_before"] = _base(layered)
    for layer in layered.model.layers:
        fully_shard(layer)
    fully_shard(layered)
    _train(layered, local, ol.adapter_parameters(layered).values())
    result["layered"], result["layered_base"] = _adapters(layered), _base(layered)
    result["layered_dtensors"] = sum(type(p).__name__ == "DTensor" for p in layered.model.layers[0].parameters())
    result["model_after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    result["model_after"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks trained and saw, from one spawn (imports and export
    dominate the cost, so DDP and FSDP2 share the processes)."""
    tmp = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _assert_bit_identical(after: dict, before: dict) -> None:
    assert after.keys() == before.keys()
    changed = [n for n in before if not torch.equal(after[n], before[n])]
    assert not changed, f"base weights moved: {changed}"


def test_reference_is_not_trivial(ranks):
    single = ranks[0]["single"]
    assert len(single) == 7  # q, k, v, o, gate, up, down; lm_head is the head
    # every b moved 500x the tolerance: an error of 0.2% of its largest entry fails
    atol = tolerance(torch.float32)["atol"]
    assert all(b.abs().max() > 500 * atol for b in single.values()), "b barely moved: the comparisons would be vacuous"


@pytest.mark.parametrize("how", ["ddp", "fsdp", "layered"])
def test_two_ranks_train_what_one_process_trains(ranks, how):
    single = ranks[0]["single"]
    for rank, r in enumerate(ranks):
        assert r[how].keys() == single.keys()
        for name, b in r[how].items():
            torch.testing.assert_close(b, single[name], **tolerance(torch.float32), msg=lambda m: f"rank {rank} {name}: {m}")
    for name in single:
        assert torch.equal(ranks[0][how][name], ranks[1][how][name]), f"ranks disagree on {name}"


@pytest.mark.parametrize("how", ["ddp", "fsdp", "layered"])
def test_base_weights_are_bit_identical_on_every_rank(ranks, how):
    for r in ranks:
        _assert_bit_identical(r[f"{how}_base"], r["layered_base_before" if how == "layered" else "base_before"])
        _assert_bit_identical(r["model_after"], r["model_before"])


def test_layer_by_layer_sharding_shards_each_layer(ranks):
    # every parameter of a decoder layer (its weights and its b vectors) is a sharded DTensor
    assert all(r["layered_dtensors"] == 9 + 7 for r in ranks)
