"""Tiny models of libraries other than transformers, for ``coverage_sweep.py --libraries``.

:data:`MODELS` lists ``(library, name)``; :func:`build` gives ``(model, inputs)`` for one
(``inputs`` are keyword arguments of the model's ``forward``), random init, float32, eval.
Each is a small instance of the library's own class (a config of a few layers and widths
of 16-64), not a copy of its code. ``pattern`` rows are written here: they reproduce, in
a few lines, what a library does that a graph pass can miss (an ``torch.fx.wrap``-ed
attention function reading weights, a bias computed in the forward, a fused fast path
behind data-dependent control flow, stochastic depth, float64, a sequence-first layer),
so that the sweep covers each pattern even where the library cannot be installed.

:func:`unavailable` says why a library cannot be imported here (then its rows are
``unavailable``, not counted). torchvision's wheel for torch 2.13 on the registry is
built for CUDA: its C ops (``nms``, ``roi_align``) fail to register against the CPU torch,
and importing it raises; the models do not use those ops, so :func:`_import_torchvision`
imports it with the fake-kernel registrations of missing ops skipped (timm and open_clip
import torchvision). torchtune 0.6.1 imports ``torchao.dtypes.nf4tensor``, which torchao
0.18 moved: it cannot be imported next to the torchao this project uses.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

B = 2

#: library -> why it cannot be imported (filled by :func:`unavailable`)
_MISSING: dict[str, str] = {}


def _import_torchvision() -> Any:
    """``import torchvision`` with a CUDA build's fake-kernel registrations of missing C
    ops skipped (see the module docstring); the plain import when it works."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    import torch._library.fake_impl as fake_impl

    original = fake_impl.FakeImplHolder.register

    class _Nothing:
        def destroy(self) -> None:
            pass

    def register(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except RuntimeError as e:
            if "does not exist" not in str(e):
                raise
            return _Nothing()

    fake_impl.FakeImplHolder.register = register
    try:
        return importlib.import_module("torchvision")
    finally:
        fake_impl.FakeImplHolder.register = original


def unavailable(library: str) -> str | None:
    """Why ``library`` cannot be used here, or None."""
    if library in _MISSING:
        return _MISSING[library] or None
    why = ""
    try:
        # transformers and diffusers import torchvision too where it is installed
        if library in ("timm", "torchvision", "open_clip") or importlib.util.find_spec("torchvision") is not None:
            _import_torchvision()
        if library != "pattern" and library != "torch.nn":
            importlib.import_module(library)
        if library == "torchtune":
            importlib.import_module("torchtune.models")
    except Exception as e:  # any import failure: say which
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    _MISSING[library] = why
    return why or None


def _image(size: int = 32, channels: int = 3) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(B, channels, size, size)}


# ----------------------------------------------------------------------------- timm


def _timm(name: str, size: int = 32, **kw: Any) -> Callable[[], tuple[nn.Module, dict]]:
    def build() -> tuple[nn.Module, dict]:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=5, **kw)
        return model, _image(size)

    return build


def _timm_class(path: str, **kw: Any) -> tuple[nn.Module, dict]:
    """A timm model class itself (its registered names fix sizes the tiny config changes)."""
    module, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(f"timm.models.{module}"), cls)(num_classes=5, **kw), _image()


_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TIMM = {
    "vit": _timm("vit_tiny_patch16_224", **_VIT),
    "deit": _timm("deit_tiny_distilled_patch16_224", **_VIT),
    "eva": _timm("eva02_tiny_patch14_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    "beit": _timm("beit_base_patch16_224", **_VIT),
    "swin": _timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, embed_dim=16, depths=(1, 1),
                  num_heads=(2, 2), window_size=4),
    "convnext": _timm("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
    "mixer": lambda: _timm_class("mlp_mixer.MlpMixer", img_size=32, patch_size=8, num_blocks=2, embed_dim=32),
    # its last stage's attention biases are sized for 7 x 7 tokens: a 224 image
    "efficientformer": _timm("efficientformer_l1", 224, depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64)),
    "levit": _timm("levit_128s", 64, img_size=64, embed_dim=(32, 48, 64), depth=(1, 1, 1), num_heads=(2, 2, 2),
                   key_dim=8),
    "maxvit": _timm("maxvit_tiny_tf_224", 64, img_size=64, embed_dim=(32, 64), depths=(1, 1), stem_width=8,
                    head_hidden_size=None),
}


# ----------------------------------------------------------------------------- torchvision


def _tv_vit() -> tuple[nn.Module, dict]:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=5), _image()


def _tv_swin(v2: bool) -> Callable[[], tuple[nn.Module, dict]]:
    def build() -> tuple[nn.Module, dict]:
        from torchvision.models import swin_transformer as st

        extra = dict(block=st.SwinTransformerBlockV2, downsample_layer=st.PatchMergingV2) if v2 else {}
        return st.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                                  num_classes=5, **extra), _image()

    return build


def _tv_maxvit() -> tuple[nn.Module, dict]:
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32], block_layers=[1, 1],
                  head_dim=8, stochastic_depth_prob=0.0, num_classes=5), _image()


TORCHVISION = {"vit": _tv_vit, "swin": _tv_swin(False), "swin_v2": _tv_swin(True), "maxvit": _tv_maxvit}


# ----------------------------------------------------------------------------- open_clip

_VISION = dict(layers=2, width=32, patch_size=8, image_size=32, head_width=16)
_TEXT = dict(context_length=8, vocab_size=100, width=32, heads=2, layers=2)


def _clip_inputs() -> dict[str, torch.Tensor]:
    return {"image": torch.randn(B, 3, 32, 32), "text": torch.randint(1, 100, (B, 8))}


def _open_clip(kind: str) -> Callable[[], tuple[nn.Module, dict]]:
    def build() -> tuple[nn.Module, dict]:
        import open_clip

        if kind == "coca":
            # as open_clip's coca_ViT-B-32.json: token outputs, a CLS embedding, an attentional pool
            model = open_clip.CoCa(embed_dim=32, multimodal_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2,
                                                                    layers=1, attn_pooler_heads=2),
                                   text_cfg=dict(_TEXT, embed_cls=True, output_tokens=True),
                                   vision_cfg=dict(_VISION, attentional_pool=True, attn_pooler_queries=4,
                                                   attn_pooler_heads=2, output_tokens=True))
            return model, _clip_inputs()
        vision = dict(_VISION, attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2) \
            if kind == "attentional_pool" else _VISION
        return open_clip.CLIP(embed_dim=32, vision_cfg=dict(vision), text_cfg=dict(_TEXT)), _clip_inputs()

    return build


OPEN_CLIP = {"clip": _open_clip("clip"), "clip_attentional_pool": _open_clip("attentional_pool"),
             "coca": _open_clip("coca")}


# ----------------------------------------------------------------------------- diffusers


def _unet() -> tuple[nn.Module, dict]:
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                 attention_head_dim=8, norm_num_groups=8)
    return model, {"sample": torch.randn(B, 4, 8, 8), "timestep": torch.tensor([3, 7]),
                   "encoder_hidden_states": torch.randn(B, 5, 16)}


def _sd3() -> tuple[nn.Module, dict]:
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    return model, {"hidden_states": torch.randn(B, 4, 8, 8), "encoder_hidden_states": torch.randn(B, 5, 16),
                   "pooled_projections": torch.randn(B, 16), "timestep": torch.tensor([3, 7])}


def _flux() -> tuple[nn.Module, dict]:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                   axes_dims_rope=(2, 2, 4))
    return model, {"hidden_states": torch.randn(B, 16, 8), "encoder_hidden_states": torch.randn(B, 5, 16),
                   "pooled_projections": torch.randn(B, 16), "timestep": torch.tensor([0.3, 0.7]),
                   "img_ids": torch.randn(16, 3), "txt_ids": torch.zeros(5, 3)}


def _pixart() -> tuple[nn.Module, dict]:
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                     in_channels=4, out_channels=8, cross_attention_dim=16, caption_channels=16,
                                     patch_size=2, use_additional_conditions=False)
    return model, {"hidden_states": torch.randn(B, 4, 8, 8), "encoder_hidden_states": torch.randn(B, 5, 16),
                   "timestep": torch.tensor([3, 7])}


def _dit() -> tuple[nn.Module, dict]:
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return model, {"hidden_states": torch.randn(B, 4, 8, 8), "timestep": torch.tensor([3, 7]),
                   "class_labels": torch.tensor([1, 4])}


DIFFUSERS = {"unet2d_condition": _unet, "sd3": _sd3, "flux": _flux, "pixart": _pixart, "dit": _dit}


# ----------------------------------------------------------------------------- torch.nn


class _Heads(nn.Module):
    """A recurrent or bilinear body with linear heads."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body, self.head = body, nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x, y) if isinstance(self.body, nn.Bilinear) else self.body(x)[0]
        return self.head(h)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(query, key, value, need_weights=False)[0])


def _nn_transformer() -> tuple[nn.Module, dict]:
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                           dropout=0.0, batch_first=True)
    return model, {"src": torch.randn(B, 5, 16), "tgt": torch.randn(B, 4, 16)}


def _nn_encoder() -> tuple[nn.Module, dict]:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), {"src": torch.randn(B, 5, 16)}


TORCH_NN = {
    "transformer": _nn_transformer,
    "transformer_encoder": _nn_encoder,
    "multihead_attention_kdim_vdim": lambda: (_Attention(), {"query": torch.randn(B, 5, 16), "key": torch.randn(B, 6, 8),
                                                             "value": torch.randn(B, 6, 12)}),
    "lstm_head": lambda: (_Heads(nn.LSTM(8, 16, batch_first=True)), {"x": torch.randn(B, 5, 8)}),
    "gru_head": lambda: (_Heads(nn.GRU(8, 16, batch_first=True)), {"x": torch.randn(B, 5, 8)}),
    "bilinear_head": lambda: (_Heads(nn.Bilinear(8, 6, 16)), {"x": torch.randn(B, 8), "y": torch.randn(B, 6)}),
}


# ----------------------------------------------------------------------------- patterns


@torch.fx.wrap
def _window_attention(x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor, heads: int) -> torch.Tensor:
    """torchvision Swin's ``shifted_window_attention`` in small: an ``fx.wrap``-ed function
    that reads the layers' weights (symbolic_trace keeps it as one opaque call)."""
    b, n, c = x.shape
    q, k, v = F.linear(x, qkv_weight).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
    return F.linear(out, proj_weight)


class _WrappedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(16, 48, bias=False), nn.Linear(16, 16, bias=False), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_window_attention(x, self.qkv.weight, self.proj.weight, 2))


class _ComputedBias(nn.Module):
    """timm EVA / BEiT: ``F.linear(x, qkv.weight, cat(q_bias, zeros, v_bias))``."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(16)), nn.Parameter(torch.randn(16))
        self.register_buffer("k_bias", torch.zeros(16), persistent=False)
        self.proj = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias))))


class _FastPathBehindBranch(nn.Module):
    """A fused-fast-path encoder layer behind data-dependent control flow: no graph
    capture takes it, so ``auto`` falls back to the module form, in eval."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        if h.abs().sum() > 0:
            h = h * 2
        return self.out(h)


class _DropPath(nn.Module):
    """timm's stochastic depth: a Python branch on ``self.training``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in (self.fc1, self.fc2):
            h = fc(x)
            if self.training:
                h = h * x.new_empty(x.shape[0], 1).bernoulli_(0.5).div_(0.5)
            x = x + h
        return self.head(x)


class _SequenceFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x.transpose(0, 1)).transpose(0, 1))


PATTERN = {
    "fx_wrapped_attention": lambda: (_WrappedAttention(), {"x": torch.randn(B, 5, 16)}),
    "computed_bias": lambda: (_ComputedBias(), {"x": torch.randn(B, 5, 16)}),
    "fast_path_behind_branch": lambda: (_FastPathBehindBranch(), {"x": torch.randn(B, 5, 16)}),
    "drop_path": lambda: (_DropPath(), {"x": torch.randn(B, 16)}),
    "float64": lambda: (nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)).double(),
                        {"input": torch.randn(B, 16, dtype=torch.float64)}),
    "sequence_first": lambda: (_SequenceFirst(), {"x": torch.randn(B, 5, 16)}),
}

def _torchtune_llama() -> tuple[nn.Module, dict]:
    from torchtune.models.llama3 import llama3

    model = llama3(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64,
                   intermediate_dim=128)
    return model, {"tokens": torch.randint(0, 256, (B, 8))}


TORCHTUNE = {"llama3": _torchtune_llama}

LIBRARIES = {"timm": TIMM, "torchvision": TORCHVISION, "open_clip": OPEN_CLIP, "diffusers": DIFFUSERS,
             "torch.nn": TORCH_NN, "pattern": PATTERN, "torchtune": TORCHTUNE}
MODELS = [(library, name) for library, models in LIBRARIES.items() for name in models]


def build(library: str, name: str) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, inputs)``: the tiny model, float32 (float64 where named), eval mode."""
    why = unavailable(library)
    if why:
        raise ImportError(f"{library} cannot be imported here: {why}")
    torch.manual_seed(0)
    model, inputs = LIBRARIES[library][name]()
    with torch.no_grad():  # open_clip's CoCa leaves its decoder's text_projection as torch.empty memory
        for p in model.parameters():
            if p.is_floating_point() and not torch.isfinite(p).all():
                p.normal_(0, 0.02)
    return model.eval(), inputs
