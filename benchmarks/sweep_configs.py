"""Tiny configs and inputs for ``coverage_sweep.py``: every architecture of four auto mappings.

:func:`architectures` lists ``(task, model_type, class_name)`` from the installed
transformers' auto mappings. :func:`build_config` takes ``AutoConfig.for_model(type)`` (the
default, full-size config), edits every config of its tree (``text_config``, ``vision_config``,
``encoder``, ...) by attribute name, then builds each config class again from the edited values,
with the fields it derives (default None, not edited on purpose: ``head_dim``, ``layer_types``,
``rope_parameters``, ...) set back to None so that ``__post_init__`` derives them anew:

* layers: 2, or 1 each where the tree has several stacks (encoder + decoder, vision + text);
  per-layer lists (``layer_types``, ``mlp_layer_types``, patterns) keep the first layer of each
  distinct kind (so up to 4 layers for a hybrid), lists of layer indices (``moe_layers``) are
  renumbered, periods and offsets (``*_period``, ``*_step``, ``sliding_window_pattern``, ...)
  shrink with the count; per-stage ``depths`` -> 1 each;
* widths: hidden 64, heads 4 (2 or 1 where the config had fewer; per-stage lists 2), kv heads
  equal to the heads, 2, or 1 as the config had them, ``head_dim`` 16 or re-derived (MLA:
  rope 8, nope 16, latent ranks 32; Mamba: heads x head size = expand x hidden), intermediate
  128, expert intermediate 64; a size-like int that equalled an old hidden / intermediate size
  (projectors, cross-attention) follows it; convolutional channel lists are scaled by one factor
  so the widest is 64 (equal counts stay equal); a few named sizes get a small value (``SMALL``);
* experts 4, top-k 2, one expert group, at most one shared expert and one dense layer;
* vocabularies 256; special token ids >= 192 are renumbered into 192..255 (equal ids stay equal)
  and the inputs avoid every special id; max positions at least 64;
* images 32 (64 without a patch embedding of 4 or more); the patch kept where it divides 32
  at least twice, else 8 / 4; Swin-style windows 2 with the image sized so the last stage holds one;
* ``use_cache=False``.

:data:`REPLACEMENTS`, :data:`OVERRIDES` (config) and :data:`MODEL_FIXES` (built model) hold the few per-architecture
fixes the generic rules cannot guess, one comment each. :func:`build_model` gives a causal-LM
class that only takes the text config (listed for a multimodal model type) that text config.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch

TASKS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}
BATCH, SEQ, DEC_SEQ = 2, 8, 6
HIDDEN, HEADS, HEAD_DIM, FFN, MOE_FFN, EXPERTS, TOP_K, VOCAB, IMAGE, PATCH = 64, 4, 16, 128, 64, 4, 2, 256, 32, 8
SPECIAL_BASE = 192  # special token ids live in [192, 256); inputs are drawn below

LAYERS = {
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
    "num_encoder_layers", "num_decoder_layers", "conf_num_hidden_layers", "speech_encoder_layers",
    "t2u_encoder_layers", "t2u_decoder_layers", "num_layers_per_stack", "n_recurrent_layers",
    "n_input_layers", "n_output_layers", "depth",
}
HIDDEN_NAMES = {"hidden_size", "d_model", "n_embd", "dim", "emb_dim", "model_dim", "embed_dim", "d_latents",
                "hidden_size_global", "embedding_dim"}
HEAD_NAMES = {"num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
              "decoder_attention_heads", "attention_heads", "conf_num_attention_heads", "swa_num_attention_heads",
              "speech_encoder_attention_heads", "t2u_encoder_attention_heads", "t2u_decoder_attention_heads",
              "num_attention_heads_per_layer", "num_cross_attention_heads", "num_self_attention_heads"}
KV_NAMES = {"num_key_value_heads", "n_kv_heads", "num_kv_heads", "kv_n_heads", "multi_query_group_num",
            "swa_num_key_value_heads"}
HEAD_DIM_NAMES = {"head_dim", "d_kv", "d_head", "attention_head_dim", "kv_channels", "dim_head", "swa_head_dim",
                  "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim", "mamba_d_head",
                  "mamba_head_dim", "index_head_dim", "qk_nope_head_dim", "v_head_dim", "key_dim"}
SMALL = {"qk_rope_head_dim": 8, "qk_head_dim": 24, "kv_lora_rank": 32, "q_lora_rank": 32, "o_lora_rank": 32,
         "index_n_heads": 2, "linear_num_heads": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
         "mamba_n_heads": 4, "mamba_num_heads": 4, "n_mamba_heads": 2, "state_size": 16, "ssm_state_size": 16,
         "mamba_d_state": 16, "time_step_rank": 8, "mamba_dt_rank": 8, "mamba_d_ssm": 128, "n_groups": 1,
         "mamba_n_groups": 1, "index_topk": 4, "laurel_rank": 8, "hidden_size_per_layer_input": 16,
         "num_kv_shared_layers": 0, "projection_dim": 32, "projection_size": 32, "num_latents": 16,
         "entity_emb_size": 32, "gated_norm_rank": 8, "hc_lowrank": 16, "loop_gate_rank": 8, "d_rel": 8,
         "ple_embed_dim": 32, "chunk_size": 8, "mamba_chunk_size": 8, "local_attn_chunk_length": 4,
         "lsh_attn_chunk_length": 4, "block_size": 4, "attention_window": 8, "local_attention": 8,
         "sliding_window": 4, "window_size": 4, "attention_chunk_size": 4, "conf_attention_chunk_size": 4,
         "rotary_dim": 8, "intra_bottleneck_size": 32, "num_groups": 2, "num_filters": 8}
FFN_NAMES = {"intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_ff", "d_inner",
             "dff", "dim_ff", "ffn_hidden_size", "hidden_dim", "intermediate_size_mlp", "mlp_dim",
             "speech_encoder_intermediate_size", "t2u_encoder_ffn_dim", "t2u_decoder_ffn_dim",
             "dense_intermediate_size", "prefix_dense_intermediate_size", "feed_forward_size"}
MOE_FFN_NAMES = {"moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
                 "expert_ffn_hidden_size", "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size"}
EXPERT_NAMES = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "zero_expert_num"}
TOPK_NAMES = {"num_experts_per_tok", "moe_top_k", "moe_topk", "moe_k", "top_k_experts", "num_experts_per_token"}
ONE_NAMES = {"n_group", "num_expert_group", "topk_group", "n_shared_experts", "num_shared_experts",
             "moe_num_shared_experts", "first_k_dense_replace", "num_dense_layers", "moe_layer_start_index",
             "num_nextn_predict_layers", "width_coefficient", "depth_coefficient"}
POSITION_NAMES = {"max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "max_target_positions",
                  "max_decoder_position_embeddings", "max_encoder_position_embeddings", "max_2d_position_embeddings"}
PERIOD_SUFFIXES = ("_period", "_step", "_freq", "_interval", "sliding_window_pattern", "_every_n_layers")
INDEX_SUFFIXES = ("_layers", "_idxs", "_indices", "_indexes", "layer_ids", "_layer_index")
SIZE_WORDS = {"size", "dim", "hidden", "channels", "width"}
NOT_SIZES = {"vocab", "position", "positions", "patch", "image", "window", "kernel", "stride", "chunk", "bucket",
             "buckets", "batch", "sampling", "max", "min", "num", "n", "token", "pool", "layer", "layers", "length",
             "step", "group", "groups", "rate"}
CHANNEL_LISTS = ("hidden_sizes", "embed_dim", "channels", "embedding_size", "hidden_dim", "dims", "widths")


def architectures() -> list[tuple[str, str, str]]:
    """``(task, model_type, class_name)`` for every entry of the four auto mappings."""
    from transformers.models.auto import modeling_auto

    out = []
    for task, mapping in TASKS.items():
        for model_type, cls in getattr(modeling_auto, mapping).items():
            out.append((task, model_type, cls[0] if isinstance(cls, (tuple, list)) else cls))
    return out


def _configs(cfg: Any) -> list[Any]:
    from transformers import PretrainedConfig

    out = [cfg]
    for value in list(vars(cfg).values()):
        if isinstance(value, PretrainedConfig):
            out += _configs(value)
    return out


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sizeish(name: str) -> bool:
    words = set(name.strip("_").split("_"))
    return bool(words & SIZE_WORDS) and not words & NOT_SIZES


class _Edit:
    """Attribute edits on a config tree, remembering which ones were made on purpose."""

    def __init__(self) -> None:
        self.touched: dict[int, set[str]] = {}

    def set(self, c: Any, k: str, v: Any) -> None:
        try:
            setattr(c, k, v)
        except AttributeError:  # a read-only property
            return
        if k not in HEAD_DIM_NAMES:  # head sizes are re-derived where the config derives them
            self.touched.setdefault(id(c), set()).add(k)


def _pick_layers(cfg: Any, n: int, m: int, skip: set) -> tuple[list[int], list[str], list[str]]:
    """Which old layers to keep: one of each distinct kind across the per-layer lists."""
    per_layer, index_lists = [], []
    for k, v in vars(cfg).items():
        if k in skip or k.startswith("_") or not isinstance(v, (list, tuple, str)) or isinstance(v, str) and len(v) < 2:
            continue
        is_index = (k.endswith(INDEX_SUFFIXES) or k in ("moe_layers", "mlp_only_layers")) and all(_int(i) for i in v) \
            and all(0 <= i < n for i in v) and list(v) == sorted(set(v))
        if is_index:
            index_lists.append(k)
        elif len(v) == n and n > 1:
            per_layer.append(k)
    kinds = [tuple(repr(getattr(cfg, k)[i]) for k in per_layer) + tuple(i in getattr(cfg, k) for k in index_lists)
             for i in range(n)]
    keep: list[int] = []
    for i in range(n):
        if kinds[i] not in {kinds[j] for j in keep}:
            keep.append(i)
    keep = keep[:4]
    for i in range(n):
        if len(keep) >= m:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep), per_layer, index_lists


def _shrink_layers(ed: _Edit, cfg: Any, several: bool) -> None:
    names = [k for k, v in vars(cfg).items() if k in LAYERS and _int(v) and v > 0]
    for k in names:
        n = getattr(cfg, k)
        m = min(n, 1 if several else 2)
        keep, per_layer, index_lists = _pick_layers(cfg, n, m, set(names))
        if len(names) > 1:  # several stacks in one config: per-layer lists would be ambiguous
            keep, per_layer, index_lists = list(range(m)), [], []
        for p in per_layer:
            v = getattr(cfg, p)
            picked = [v[i] for i in keep]
            ed.set(cfg, p, "".join(picked) if isinstance(v, str) else type(v)(picked))
        for p in index_lists:
            old = set(getattr(cfg, p))
            ed.set(cfg, p, type(getattr(cfg, p))(j for j, i in enumerate(keep) if i in old))
        ed.set(cfg, k, len(keep))
        for p, v in list(vars(cfg).items()):
            if _int(v) and v > len(keep) and (p.endswith(PERIOD_SUFFIXES) or p.endswith("_end_index")):
                ed.set(cfg, p, len(keep) if not p.endswith("_end_index") else len(keep) - 1)
            elif _int(v) and p.endswith("_offset") and v >= len(keep):
                ed.set(cfg, p, len(keep) - 1)
    for k in ("depths", "num_block_repeats", "block_repeats", "stage_num_blocks", "stage_numb_of_layers", "depth"):
        v = getattr(cfg, k, None)
        if isinstance(v, (list, tuple)) and all(_int(i) for i in v):
            ed.set(cfg, k, type(v)(1 for _ in v))


def _scale_channels(ed: _Edit, cfg: Any) -> set[str]:
    """Convolutional stages: every channel count scaled by one factor (equal counts stay equal)."""
    lists = {k: v for k, v in vars(cfg).items() if isinstance(v, (list, tuple)) and v and all(_int(i) for i in v)
             and any(w in k for w in CHANNEL_LISTS)}
    if not lists:
        return set()
    f = max(1.0, max(max(v) for v in lists.values()) / HIDDEN)
    scale = lambda i: i if i <= 8 else max(8, 8 * math.ceil(i / f / 8))  # noqa: E731
    for k, v in lists.items():
        ed.set(cfg, k, type(v)(scale(i) for i in v))
    ints = {k for k, v in vars(cfg).items() if _int(v) and v > 8 and (_sizeish(k) or k in CHANNEL_LISTS)}
    for k in ints:
        ed.set(cfg, k, scale(getattr(cfg, k)))
    return set(lists) | ints


def _heads(old: Any) -> Any:
    if isinstance(old, (list, tuple)):
        return type(old)(min(2, i) if _int(i) else i for i in old)
    return HEADS if old >= HEADS else (2 if old >= 2 else 1)


def _rebuild(ed: _Edit, cfg: Any) -> Any:
    """A fresh config from the edited values, so that ``__post_init__`` re-derives what the
    config derives (fields whose default is None and that were not edited on purpose)."""
    import dataclasses

    from transformers import PretrainedConfig

    if not dataclasses.is_dataclass(cfg):
        return cfg
    kwargs = {}
    for f in dataclasses.fields(cfg):
        if not f.init or not hasattr(cfg, f.name):
            continue
        v = getattr(cfg, f.name)
        if isinstance(v, PretrainedConfig):
            v = _rebuild(ed, v)
        elif f.default is None and v is not None and f.name not in ed.touched.get(id(cfg), ()) and f.name not in KV_NAMES:
            v = None
        kwargs[f.name] = v
    return type(cfg)(**kwargs)


def shrink(root: Any) -> Any:
    """Shrink ``root`` and its sub-configs (see the module docstring); returns the new config."""
    ed = _Edit()
    configs = _configs(root)
    stacks = sum(1 for c in configs for k, v in vars(c).items() if k in LAYERS and _int(v) and v > 0)
    coupled: dict[int, int] = {}  # old width -> new width, for size-like ints that follow it
    specials: dict[int, int] = {}
    for c in configs:
        _shrink_layers(ed, c, stacks > 1)
        done = _scale_channels(ed, c)
        if "use_cache" in vars(c):
            ed.set(c, "use_cache", False)
        old_heads = next((getattr(c, k) for k in HEAD_NAMES if _int(getattr(c, k, None))), None)
        old_hidden = next((getattr(c, k) for k in HIDDEN_NAMES if _int(getattr(c, k, None))), None)
        has_experts = any(_int(getattr(c, k, None)) for k in EXPERT_NAMES)
        for k, v in list(vars(c).items()):
            if k in done or isinstance(v, bool) or k.startswith("_"):
                continue
            if v is None:
                if k in TOPK_NAMES and has_experts:
                    ed.set(c, k, TOP_K)
                elif k in KV_NAMES and old_heads:
                    ed.set(c, k, min(2, _heads(old_heads)))
                continue
            if k in HEAD_NAMES and (_int(v) or isinstance(v, (list, tuple))):
                ed.set(c, k, _heads(v))
            elif k in KV_NAMES and _int(v):
                new_heads = _heads(old_heads) if old_heads else HEADS
                ed.set(c, k, new_heads if v == old_heads else 1 if v == 1 else min(2, new_heads))
            elif k in HIDDEN_NAMES and _int(v) and v > HIDDEN:
                coupled.setdefault(v, HIDDEN)
                ed.set(c, k, HIDDEN)
            elif k == "embedding_size" and _int(v) and v > 32:
                ed.set(c, k, HIDDEN if v == old_hidden else 32)
            elif k in HEAD_DIM_NAMES and _int(v) and v > HEAD_DIM:
                ed.set(c, k, HEAD_DIM)
            elif k in SMALL and _int(v) and v > SMALL[k]:
                ed.set(c, k, SMALL[k])
            elif k in SMALL and isinstance(v, (list, tuple)) and v and all(_int(i) for i in v):
                ed.set(c, k, type(v)(min(i, SMALL[k]) for i in v))
            elif k in FFN_NAMES and _int(v) and v > FFN:
                coupled.setdefault(v, FFN)
                ed.set(c, k, FFN)
            elif k in MOE_FFN_NAMES and _int(v) and v > MOE_FFN:
                ed.set(c, k, MOE_FFN)
            elif k in EXPERT_NAMES and _int(v) and v > EXPERTS:
                ed.set(c, k, EXPERTS)
            elif k in TOPK_NAMES and _int(v) and v > TOP_K:
                ed.set(c, k, TOP_K)
            elif k in ONE_NAMES and isinstance(v, (int, float)) and v > 1:
                ed.set(c, k, type(v)(1))
            elif "vocab" in k and _int(v) and v > VOCAB:
                ed.set(c, k, VOCAB)
            elif k in POSITION_NAMES and _int(v) and 0 < v < 64:
                ed.set(c, k, 64)
            elif k == "image_size" and (_int(v) or isinstance(v, (list, tuple))):
                patch = getattr(c, "patch_size", None)
                size = IMAGE if _int(patch) and patch >= 4 else 2 * IMAGE
                ed.set(c, k, size if _int(v) else type(v)(size for _ in v))
            elif k == "patch_size" and _int(v) and v > 1 and not (IMAGE % v == 0 and IMAGE // v >= 2):
                ed.set(c, k, PATCH if v >= PATCH else 4 if v >= 4 else v)
            elif k.endswith(("_token_id", "_token_index", "_token_ids")):
                ids = v if isinstance(v, (list, tuple)) else [v]
                for i in ids:
                    if _int(i) and i >= SPECIAL_BASE and i not in specials:
                        specials[i] = SPECIAL_BASE + len(specials) % (VOCAB - SPECIAL_BASE)
                new = [specials.get(i, i) if _int(i) else i for i in ids]
                ed.set(c, k, type(v)(new) if isinstance(v, (list, tuple)) else new[0])
    for c in configs:  # widths that followed an old hidden / intermediate size (projectors, cross-attention)
        for k, v in list(vars(c).items()):
            if _int(v) and v in coupled and _sizeish(k) and k not in FFN_NAMES | HIDDEN_NAMES | MOE_FFN_NAMES:
                ed.set(c, k, coupled[v])
    for c in configs:
        v = vars(c)
        depths = v.get("depths")
        if isinstance(depths, (list, tuple)) and _int(v.get("window_size")) and _int(v.get("patch_size")):
            # hierarchical windows (Swin): the last stage must still hold one whole window
            ed.set(c, "window_size", 2)
            ed.set(c, "image_size", c.patch_size * 2 * 2 ** (len(depths) - 1))
    try:
        root = _rebuild(ed, root)
    except Exception:  # keep the edited config; validation will say what is wrong
        pass
    for c in _configs(root):  # what the config checks but does not derive
        v = vars(c)
        hidden = v.get("hidden_size")
        if _int(v.get("qk_rope_head_dim")) and _int(v.get("qk_nope_head_dim")) and _int(v.get("qk_head_dim")):
            c.qk_head_dim = c.qk_rope_head_dim + c.qk_nope_head_dim
        defaults = {f.name: f.default for f in getattr(type(c), "__dataclass_fields__", {}).values()}
        if _int(v.get("head_dim")) and _int(v.get("qk_rope_head_dim")) and defaults.get("head_dim") == defaults.get("qk_rope_head_dim"):
            c.head_dim = c.qk_rope_head_dim  # MLA: head_dim names the rotary part
        for heads, dim, expand in (("mamba_n_heads", "mamba_d_head", "mamba_expand"), ("num_heads", "head_dim", "expand"),
                                   ("mamba_num_heads", "mamba_head_dim", "expand"), ("n_mamba_heads", "mamba_headdim", "mamba_expand")):
            if _int(v.get(heads)) and _int(v.get(dim)) and isinstance(v.get(expand), (int, float)) and _int(hidden):
                setattr(c, dim, int(v[expand] * hidden) // v[heads])
        if _int(v.get("mamba_d_ssm")) and _int(hidden):
            c.mamba_d_ssm = int(v.get("mamba_expand", 2) * hidden)
        if v.get("head_dim") is None and "head_dim" in v and _int(hidden) and _int(v.get("num_attention_heads")):
            c.head_dim = hidden // c.num_attention_heads
    return root


def _encoder_decoder() -> Any:
    import transformers

    kw = dict(num_hidden_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN, vocab_size=VOCAB)
    cfg = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.BertConfig(**kw), transformers.BertConfig(**kw, is_decoder=True, add_cross_attention=True))
    cfg.decoder_start_token_id, cfg.pad_token_id = 2, 0
    return cfg


def _set(**kw: Any) -> Callable[[Any, str], Any]:
    def fix(cfg: Any, task: str) -> Any:
        for k, v in kw.items():
            setattr(cfg, k, v(cfg, task) if callable(v) else v)
        return cfg
    return fix


def _default(*names: str) -> Callable[[Any, str], Any]:
    def fix(cfg: Any, task: str) -> Any:
        import transformers

        full = transformers.AutoConfig.for_model(cfg.model_type)
        for k in names:
            setattr(cfg, k, getattr(full, k))
        return cfg
    return fix


# Model types whose default config cannot be built: model_type -> function() -> tiny config.
REPLACEMENTS: dict[str, Callable[[], Any]] = {
    # needs its two sub-configs given: two 1-layer BERTs (the documented pairing)
    "encoder-decoder": _encoder_decoder,
}
# Per-architecture fixes after the generic shrink: model_type -> function(config, task) -> config.
OVERRIDES: dict[str, Callable[[Any, str], Any]] = {
    # block-sparse attention needs sequences of several 64-token blocks; 8 tokens use full attention anyway
    "big_bird": _set(attention_type="original_full"),
    "bigbird_pegasus": _set(attention_type="original_full"),
    # the three stacks must add up to num_hidden_layers
    "dory": _set(n_input_layers=1, n_recurrent_layers=1, n_output_layers=1, num_hidden_layers=3,
                 layer_types=lambda c, t: (list(c.layer_types) * 3)[:3]),
    # the hybrid layers share one transformer block, tied across them: keep two of them
    "zamba": _set(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"]),
    # axial position embeddings: the factors multiply to max positions and add up to hidden; chunks divide 8
    "reformer": _set(attn_layers=("local", "lsh"), axial_pos_shape=(4, 8), axial_pos_embds_dim=(16, 48),
                     max_position_embeddings=32, num_hashes=1, num_buckets=2, is_decoder=lambda c, t: t == "causal-lm"),
    # ESM's default config has no vocabulary (its tokenizer brings 33 tokens)
    "esm": _set(vocab_size=33, pad_token_id=1, mask_token_id=32),
    # drop-path rates are indexed by stage: stage i needs at least i + 1 blocks
    "cvt": _set(depth=(1, 2, 3)),
    # the stem's 32 channels are hard-coded: keep the default channel plan
    "efficientnet": _default("in_channels", "out_channels", "hidden_dim", "width_coefficient"),
}
# Per-architecture fixes of the built model: model_type -> function(model).
MODEL_FIXES: dict[str, Callable[[Any], None]] = {
    # X-MOD routes through one adapter per language and refuses to guess which
    "xmod": lambda m: m.set_default_language(m.config.languages[0] if getattr(m.config, "languages", None) else "en_XX"),
}


def build_config(model_type: str, task: str) -> Any:
    import transformers

    if model_type in REPLACEMENTS:
        return REPLACEMENTS[model_type]()
    cfg = shrink(transformers.AutoConfig.for_model(model_type))
    if model_type in OVERRIDES:
        cfg = OVERRIDES[model_type](cfg, task)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def build_model(task: str, model_type: str, class_name: str) -> tuple[torch.nn.Module, Any]:
    """The mapping's class on the tiny config (on its text config when the class wants only
    that: a causal-LM class listed for a multimodal config), float32, eval, seed 0."""
    import transformers

    cfg = build_config(model_type, task)
    cls = getattr(transformers, class_name)
    torch.manual_seed(0)
    try:
        model = cls(cfg)
    except (AttributeError, TypeError, KeyError):
        text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        if text is cfg:
            raise
        torch.manual_seed(0)
        model, cfg = cls(text), text
    if model_type in MODEL_FIXES:
        MODEL_FIXES[model_type](model)
    return model.float().eval(), cfg


def special_ids(cfg: Any) -> set[int]:
    out: set[int] = set()
    for c in _configs(cfg):
        for k, v in vars(c).items():
            if k.endswith(("_token_id", "_token_index", "_token_ids", "_index", "_idx")) and v is not None:
                out.update(i for i in (v if isinstance(v, (list, tuple)) else [v]) if _int(i))
    return out


def _vocab(cfg: Any) -> int:
    for c in _configs(cfg):
        v = getattr(c, "vocab_size", None)
        if _int(v) and v > 0:
            return v
    return VOCAB


def _image(cfg: Any) -> tuple[int, int]:
    for c in _configs(cfg):
        size = getattr(c, "image_size", None)
        if size is not None:
            size = size[0] if isinstance(size, (list, tuple)) else size
            return getattr(c, "num_channels", 3) or 3, int(size)
    return next((getattr(c, "num_channels") for c in _configs(cfg) if _int(getattr(c, "num_channels", None))), 3), 64


def make_inputs(task: str, model: torch.nn.Module, cfg: Any) -> dict[str, torch.Tensor]:
    """The example call: ``input_ids [2, 8]`` (+ ``attention_mask``, ``decoder_input_ids [2, 6]``),
    or ``pixel_values [2, C, S, S]`` for image classification (``input_ids`` where the model
    reads pixels as tokens, ImageGPT)."""
    g = torch.Generator().manual_seed(0)
    params = inspect.signature(model.forward).parameters
    if task == "image-classification" and "spatial_shapes" in params:  # NaFlex (SigLIP 2): flattened patches
        c, s = _image(cfg)
        p = next(getattr(x, "patch_size") for x in _configs(cfg) if _int(getattr(x, "patch_size", None)))
        n = (s // p) ** 2
        return {"pixel_values": torch.randn(BATCH, n, c * p * p, generator=g),
                "spatial_shapes": torch.tensor([[s // p, s // p]] * BATCH),
                "pixel_attention_mask": torch.ones(BATCH, n, dtype=torch.long)}
    if task == "image-classification" and "pixel_values" in params:
        c, s = _image(cfg)
        return {"pixel_values": torch.randn(BATCH, c, s, s, generator=g)}
    hi = min(_vocab(cfg), SPECIAL_BASE)
    allowed = torch.tensor([i for i in range(min(4, hi - 1), hi) if i not in special_ids(cfg)])
    # MusicGen's decoder reads one row per codebook: input_ids [batch * num_codebooks, seq]
    rows = BATCH * (cfg.num_codebooks if type(model).__name__.startswith("Musicgen") else 1)

    def ids(n: int) -> torch.Tensor:
        return allowed[torch.randint(0, len(allowed), (rows, n), generator=g)]

    out = {"input_ids": ids(SEQ)}
    if "attention_mask" in params:
        out["attention_mask"] = torch.ones(rows, SEQ, dtype=torch.long)
    if task == "seq2seq-lm" and "decoder_input_ids" in params:
        out["decoder_input_ids"] = ids(DEC_SEQ)
    return out
