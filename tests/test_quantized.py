"""1LoRA over quantized bases: torchao weight-only int8 weights and bitsandbytes NF4 layers.

The quantized call stays as it is and 1LoRA's term is added beside it (it never reads the
weight). The reference is the same quantized model with forward hooks adding
``b * x.sum(-1)`` to each adapted layer's output, written here."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import onelora_fx as ol
from reference import hooked, randomize_adapters
from toolkit import IDS, assert_close, assert_same_state, model_state, quiet_transform, randomize_norms, tiny_llama

transformers = pytest.importorskip("transformers")


def int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn)
    return model


#: bitsandbytes layer kinds: (class, keyword arguments)
BNB = {"nf4": ("Linear4bit", dict(quant_type="nf4")), "fp4": ("Linear4bit", dict(quant_type="fp4")),
       "nf4-double": ("Linear4bit", dict(quant_type="nf4", compress_statistics=True)), "int8-lt": ("Linear8bitLt", {})}


def bnb_layers(model: nn.Module, kind: str) -> nn.Module:
    """Every decoder linear of ``model`` (not ``lm_head``) as a bitsandbytes layer of
    ``kind`` (:data:`BNB`), quantized from that linear's weight; in place."""
    import bitsandbytes as bnb

    cls, options = BNB[kind]

    def make(child: nn.Linear) -> nn.Module:
        if cls == "Linear4bit":
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.float32, device="meta", **options)
            q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, module=q, **options).to("cpu")
        else:
            q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                    has_fp16_weights=False, device="meta")
            q.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
        return q

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                setattr(parent, name, make(child))
    return model


def nf4(model: nn.Module) -> nn.Module:
    return bnb_layers(model, "nf4")


QUANTIZE = {"int8": (int8, "torchao"), "nf4": (nf4, "bitsandbytes")}


@pytest.fixture(scope="module", params=sorted(QUANTIZE))
def quantized(request):
    quantize, library = QUANTIZE[request.param]
    pytest.importorskip(library)
    full = randomize_norms(tiny_llama(hidden_size=64, intermediate_size=128))
    return request.param, full, quantize(copy.deepcopy(full))


def hooked_sites(model: nn.Module, gm: nn.Module):
    """:func:`reference.hooked` at every adapted layer of ``gm`` (all of them ``nn.Linear``
    or quantized layers here, each adapted whole)."""
    return hooked(model, ol.adapter_parameters(gm), {s.owner: s.adapter_name for s in ol.sites(gm) if s.adapted})


def test_quantized_linears_are_sites_and_match_the_hooked_model(quantized):
    kind, _, model = quantized
    gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": IDS})
    adapted = [s for s in ol.sites(gm) if s.adapted]
    assert len(adapted) == 14 and all(s.quantized for s in adapted), [(s.name, s.quantized) for s in adapted]
    assert all(b.dtype == torch.float32 and b.shape == (s.out_features,)
               for s, b in zip(adapted, (gm.get_parameter(s.adapter_name) for s in adapted)))
    assert "0 unadapted" in ol.summary(gm)
    randomize_adapters(gm, 3, scale=0.05)
    ref, vectors = hooked_sites(model, gm)
    out = gm(input_ids=IDS).logits
    expected = ref(input_ids=IDS).logits
    assert_close(out, expected, torch.float32, "output")
    out.square().mean().backward()
    expected.square().mean().backward()
    for name, b in vectors.items():
        got = gm.get_parameter(name).grad
        assert got is not None and got.abs().sum() > 0, name
        assert_close(got, b.grad, torch.float32, f"{name} gradient")
    assert all(not p.requires_grad for n, p in gm.named_parameters() if n not in ol.adapter_parameters(gm))


def test_merge_gives_the_full_precision_model(quantized):
    kind, _, model = quantized
    gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": IDS})
    randomize_adapters(gm, 4, scale=0.05)
    merged = ol.merge(gm)
    assert_close(merged(input_ids=IDS).logits, gm(input_ids=IDS).logits, torch.float32, "merged")
    assert all(type(p) is nn.Parameter and p.is_floating_point() for p in merged.parameters()), "plain weights"
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("_proj", "lm_head")))
    with pytest.raises(ol.MergeError, match="quantized .* cannot be written into its quantized storage"):
        ol.merge(gm, inplace=True)


def test_adapters_move_between_quantized_and_full_precision(quantized, tmp_path):
    """The same names, shapes and dtypes: trained on the quantized base, loaded onto the
    full-precision one, and back."""
    kind, full, model = quantized
    q = quiet_transform(model, "all-linear", example_kwargs={"input_ids": IDS})
    randomize_adapters(q, 5, scale=0.05)
    f = quiet_transform(full, "all-linear", example_kwargs={"input_ids": IDS})
    ol.load_adapter(f, ol.save_adapter(q, tmp_path / "q.safetensors"))
    back = quiet_transform(model, "all-linear", example_kwargs={"input_ids": IDS})
    ol.load_adapter(back, ol.save_adapter(f, tmp_path / "f.safetensors"))
    for name, b in ol.adapter_parameters(q).items():
        assert torch.equal(ol.adapter_parameters(back)[name], b), name
    assert torch.equal(back(input_ids=IDS).logits, q(input_ids=IDS).logits)


def test_peft_loads_the_adapter_onto_the_bitsandbytes_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    model = nf4(randomize_norms(tiny_llama(hidden_size=64, intermediate_size=128)))
    gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": IDS})
    randomize_adapters(gm, 6, scale=0.05)
    ol.save_peft(gm, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 1
    served = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
    for m in served.modules():  # bitsandbytes' CPU inference kernel (AVX512-BF16 CPUs) computes in bfloat16:
        if hasattr(m, "support_avx512bf16_for_cpu"):  # the float32 path on every CPU, as gm takes
            m.support_avx512bf16_for_cpu = False
    assert_close(served(input_ids=IDS).logits, gm(input_ids=IDS).logits, torch.float32, "PEFT on NF4")


def assert_matches(gm: nn.Module, ref: nn.Module, vectors: dict) -> torch.Tensor:
    """``gm``'s logits and every ``b`` gradient (of the mean square of the logits) equal
    the reference's; returns ``gm``'s logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Linear8bitLt: "inputs will be cast from torch.float32 to float16"
        out, expected = gm(input_ids=IDS).logits, ref(input_ids=IDS).logits
        assert_close(out, expected, torch.float32, "output")
        out.square().mean().backward()
        expected.square().mean().backward()
    for name, b in vectors.items():
        assert_close(gm.get_parameter(name).grad, b.grad, torch.float32, f"{name} gradient")
    return out.detach()


@pytest.mark.parametrize("kind", ["fp4", "int8-lt"])
def test_other_bitsandbytes_layers_match_the_hooked_model_and_merge(kind):
    """FP4 ``Linear4bit`` and ``Linear8bitLt``: the same sites, numbers and merge as NF4."""
    pytest.importorskip("bitsandbytes")
    model = bnb_layers(randomize_norms(tiny_llama(hidden_size=64, intermediate_size=128)), kind)
    gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": IDS})
    adapted = [s for s in ol.sites(gm) if s.adapted]
    assert len(adapted) == 14 and {s.quantized for s in adapted} == {"Linear4bit" if kind == "fp4" else "Linear8bitLt"}
    randomize_adapters(gm, 7, scale=0.05)
    out = assert_matches(gm, *hooked_sites(model, gm))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = ol.merge(gm)
        assert_close(merged(input_ids=IDS).logits, out, torch.float32, "merged")
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("_proj"))


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """What bitsandbytes does to each 4-bit layer on its first forward in eval mode
    without gradients on a CPU with AVX512-BF16, done directly so that it happens on any
    CPU: the weight repacked for the CPU inference kernel, in place."""
    import bitsandbytes.functional as bnb_f

    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if type(m).__name__ == "Linear4bit" and not getattr(state, "packing_format_for_cpu", False):
            m.weight.data, m.weight.quant_state = bnb_f._convert_weight_packed_for_cpu(m.weight.data, state)
    return model


def float_weight(layer: nn.Module, packed: bool) -> torch.Tensor:
    """The float32 weight a quantized layer stands for, read here from its unpacked
    storage (not with onelora_fx's code): 4-bit codes dequantized with their absmax
    (double quantization undone first), the absmax rounded to bfloat16 when the layer is
    about to be packed (the packing does that); 8-bit rows as ``CB * SCB / 127``; a
    torchao weight dequantized by torchao."""
    import bitsandbytes.functional as bnb_f

    w = layer.weight
    state = getattr(w, "quant_state", None)
    if type(layer).__name__ == "Linear8bitLt":
        return w.data.float() * w.SCB.float()[:, None] / 127
    if state is None:
        return w.dequantize().float()
    state = copy.copy(state)
    if state.nested:
        state.absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
        state.nested = False
    if packed:
        state.absmax = state.absmax.to(torch.bfloat16).float()
    return bnb_f.dequantize_4bit(w.data, state).float()


def dequantized_reference(full: nn.Module, weights: dict[str, torch.Tensor], gm: nn.Module) -> tuple[nn.Module, dict]:
    """The float model holding the dequantized weights, with ``b * x.sum(-1)`` added to
    each adapted layer's output by a hook, and those b's (leaves of their own)."""
    dequantized = copy.deepcopy(full)
    with torch.no_grad():
        for name, w in weights.items():
            dequantized.get_submodule(name).weight.copy_(w)
    return hooked_sites(dequantized, gm)


@pytest.mark.parametrize("mode", ["train", "eval-packed"])
@pytest.mark.parametrize("kind", [*sorted(BNB), "torchao-int8"])
def test_the_users_quantized_model_is_untouched_and_the_adapted_one_exact(kind, mode):
    """A quantized LLaMA in train mode, or in eval mode after the user's own inference
    (bitsandbytes' 4-bit weights then packed for the CPU kernel, forced here on any CPU):
    ``transform``, an inference call, training and ``merge`` leave every tensor, quant
    state field and flag of the user's model as it was, and forward, every ``b``
    gradient and the merged model equal the float model holding the dequantized weights."""
    pytest.importorskip("torchao" if kind == "torchao-int8" else "bitsandbytes")
    full = randomize_norms(tiny_llama(hidden_size=64, intermediate_size=128))
    model = int8(copy.deepcopy(full)) if kind == "torchao-int8" else bnb_layers(copy.deepcopy(full), kind)
    model.train(mode == "train")
    packed = mode == "eval-packed" and kind in BNB and BNB[kind][0] == "Linear4bit"
    quantized = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
    weights = {n: float_weight(m, packed) for n, m in quantized.items()}
    for m in quantized.values():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = True  # as on a CPU with AVX512-BF16 (bitsandbytes reads only this)
    if packed:
        pack_for_cpu(model)
    before = model_state(model)

    gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": IDS})
    assert_same_state(before, model_state(model), "the user's model after transform")
    assert sorted(s.owner for s in ol.sites(gm) if s.adapted) == sorted(quantized)
    randomize_adapters(gm, 3, scale=0.05)
    ref, vectors = dequantized_reference(full, weights, gm)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Linear8bitLt: "inputs will be cast from torch.float32 to float16"
        gm.eval()(input_ids=IDS)  # an inference call on the adapted model repacks nothing either
        assert_same_state(before, model_state(model), "the user's model after an inference call of the adapted one")
    # the numbers in training mode, what trains b (Linear8bitLt's eval kernel also
    # quantizes the activations, which no float model reproduces)
    gm.train(), ref.train()
    assert_matches(gm, ref, vectors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = ol.merge(gm).eval()
        assert_close(merged(input_ids=IDS).logits, ref.eval()(input_ids=IDS).logits, torch.float32, "merged")
    assert_same_state(before, model_state(model), "the user's model after training and merge")


def test_a_graph_capture_of_bitsandbytes_layers_is_refused_before_it_runs_them():
    pytest.importorskip("bitsandbytes")
    model = bnb_layers(tiny_llama(), "nf4").eval()
    before = model_state(model)
    for capture in ("fx", "export"):
        with pytest.raises(ol.CaptureError, match="bitsandbytes quantized layers .*Use capture='module'"):
            ol.transform(model, capture=capture, example_kwargs={"input_ids": IDS})
    assert_same_state(before, model_state(model))


def test_a_graph_capture_of_torchao_weights_names_them_and_the_way_out():
    """torch.export decomposes torchao's quantized linears into integer ops: no site is
    left, and the error names the quantized weights and says to use the module form."""
    pytest.importorskip("torchao")
    model = int8(tiny_llama())
    with pytest.raises(ol.PatternError, match=r"14 quantized weights \(model\.layers\.0\..*capture='module'"):
        quiet_transform(model, "all-linear", capture="export", example_kwargs={"input_ids": IDS})
