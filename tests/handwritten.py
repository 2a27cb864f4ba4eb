"""Hand-written modules covering every linear form, each with an explicit Listing 1
reference forward (``reference(x, bs)``, where ``bs`` maps site names to b vectors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def l1(y, x, b):
    """Listing 1's update, written out: y + b * x.sum(-1, keepdim=True)."""
    return y if b is None else y + b * x.sum(-1, keepdim=True)


class MLP(nn.Module):
    def __init__(self, d_in=8, d_hidden=16, d_out=4, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden, bias=bias)
        self.fc2 = nn.Linear(d_hidden, d_hidden, bias=bias)
        self.head = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = h + F.gelu(self.fc2(h))
        return self.head(h)

    def reference(self, x, bs):
        h = F.relu(l1(self.fc1(x), x, bs.get("fc1")))
        h = h + F.gelu(l1(self.fc2(h), h, bs.get("fc2")))
        return l1(self.head(h), h, bs.get("head"))


class RawParams(nn.Module):
    """F.linear on raw parameters (an MoE router, say), with and without bias."""

    def __init__(self, d_in=8, d_hidden=16, d_out=4, bias=True):
        super().__init__()
        self.router = nn.Parameter(torch.randn(d_hidden, d_in) / d_in**0.5)
        self.router_bias = nn.Parameter(torch.randn(d_hidden) * 0.1) if bias else None
        self.w2 = nn.Parameter(torch.randn(d_out, d_hidden) / d_hidden**0.5)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.router, self.router_bias))
        return F.linear(h, self.w2).softmax(-1)

    def reference(self, x, bs):
        h = torch.tanh(l1(F.linear(x, self.router, self.router_bias), x, bs.get("router")))
        return l1(F.linear(h, self.w2), h, bs.get("w2")).softmax(-1)


class Shared(nn.Module):
    """One layer called twice: one b, used by both calls."""

    def __init__(self, d_in=8, d_hidden=16, d_out=4, bias=True):
        super().__init__()
        self.inp = nn.Linear(d_in, d_hidden, bias=bias)
        self.block = nn.Linear(d_hidden, d_hidden, bias=bias)
        self.out = nn.Linear(d_hidden, d_out, bias=bias)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.block(F.silu(h))
        h = h + self.block(F.silu(h))
        return self.norm(self.out(h))

    def reference(self, x, bs):
        h = l1(self.inp(x), x, bs.get("inp"))
        for _ in range(2):
            a = F.silu(h)
            h = h + l1(self.block(a), a, bs.get("block"))
        return self.norm(l1(self.out(h), h, bs.get("out")))


class Tied(nn.Module):
    """A language model whose head is tied to its embedding (GPT-2, T5)."""

    def __init__(self, d_in=8, d_hidden=16, d_out=4, bias=True):
        super().__init__()
        vocab = d_out * 4
        self.embed = nn.Embedding(vocab, d_hidden)
        self.mix = nn.Linear(d_hidden, d_hidden, bias=bias)
        self.lm_head = nn.Linear(d_hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight
        self.vocab = vocab

    def forward(self, ids):
        h = self.embed(ids)
        h = h + torch.relu(self.mix(h))
        return self.lm_head(h)

    def reference(self, ids, bs):
        h = self.embed(ids)
        h = h + torch.relu(l1(self.mix(h), h, bs.get("mix")))
        return l1(self.lm_head(h), h, bs.get("lm_head"))


class TiedFunctional(nn.Module):
    """A head written as ``F.linear(h, self.embed.weight)`` in the root's own forward."""

    def __init__(self, d_in=8, d_hidden=16, d_out=4, bias=True):
        super().__init__()
        self.embed = nn.Embedding(d_out * 4, d_hidden)
        self.mix = nn.Linear(d_hidden, d_hidden, bias=bias)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + torch.relu(self.mix(h))
        return F.linear(h, self.embed.weight)

    def reference(self, ids, bs):
        h = self.embed(ids)
        h = h + torch.relu(l1(self.mix(h), h, bs.get("mix")))
        return l1(F.linear(h, self.embed.weight), h, bs.get("embed"))


class Layouts(nn.Module):
    """x @ W ([in, out], GPT-2 style), addmm(bias, x, W), matmul(x, W.t())."""

    def __init__(self, d_in=8, d_hidden=16, d_out=4, bias=True):
        super().__init__()
        self.w_in_out = nn.Parameter(torch.randn(d_in, d_hidden) / d_in**0.5)
        self.conv_w = nn.Parameter(torch.randn(d_hidden, d_hidden) / d_hidden**0.5)
        self.conv_b = nn.Parameter(torch.randn(d_hidden) * 0.1)
        self.w_out_in = nn.Parameter(torch.randn(d_out, d_hidden) / d_hidden**0.5)

    def forward(self, x):
        h = torch.relu(x @ self.w_in_out)
        shape = h.shape
        h2 = torch.addmm(self.conv_b, h.reshape(-1, shape[-1]), self.conv_w).view(shape)
        return torch.matmul(torch.sigmoid(h2), self.w_out_in.t())

    def reference(self, x, bs):
        h = torch.relu(l1(x @ self.w_in_out, x, bs.get("w_in_out")))
        shape = h.shape
        h2d = h.reshape(-1, shape[-1])
        h2 = l1(torch.addmm(self.conv_b, h2d, self.conv_w), h2d, bs.get("conv_w")).view(shape)
        a = torch.sigmoid(h2)
        return l1(torch.matmul(a, self.w_out_in.t()), a, bs.get("w_out_in"))


MODULES = {"mlp": MLP, "raw": RawParams, "shared": Shared, "tied": Tied, "tied_fn": TiedFunctional, "layouts": Layouts}
# the site names each module has, and its head
SITES = {
    "mlp": (["fc1", "fc2", "head"], ["head"]),
    "raw": (["router", "w2"], ["w2"]),
    "shared": (["inp", "block", "out"], []),
    "tied": (["mix", "lm_head"], ["lm_head"]),
    "tied_fn": (["mix", "embed"], ["embed"]),
    "layouts": (["w_in_out", "conv_w", "w_out_in"], ["w_out_in"]),
}


def example(name: str, batch: tuple[int, ...], d_in: int, d_out: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if name in ("tied", "tied_fn"):
        return torch.randint(0, d_out * 4, batch, generator=g)
    return torch.randn(*batch, d_in, generator=g).to(dtype)
