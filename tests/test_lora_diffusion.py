"""cloneofsimo/lora ``lora_diffusion`` files, as ``save_safeloras_with_embeds`` writes them
(``lora_diffusion/lora.py``): ``unet:<i>:up`` / ``unet:<i>:down``, header ``unet`` = the target classes as JSON,
``unet:<i>:rank``; ``<s1>`` embeddings with header ``"<embed>"``.

Oracle for the module order: lora_diffusion's own walk (``_find_modules_v2``: ``model.modules()``, then each
target's ``named_modules()``) replayed here on diffusers' SD 1.5 UNet and transformers' CLIP-L, built on the
``meta`` device; for diffusers < 0.15 the transformer block registered ``ff`` before ``attn2``
(diffusers 0.11 ``BasicTransformerBlock.__init__``), which the test builds by reordering each block.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool
from loratool.arch.generate import CLIP_L, SD15_UNET, meta_model
from loratool.errors import FormatError
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect

UNET_TARGETS = ["CrossAttention", "Attention", "GEGLU"]  # lora_diffusion UNET_DEFAULT_TARGET_REPLACE
TE_TARGETS = ["CLIPAttention"]  # TEXT_ENCODER_DEFAULT_TARGET_REPLACE


def walk(model, targets) -> list[tuple[str, tuple[int, int]]]:
    """lora_diffusion's ``_find_modules_v2`` over a model: (path, weight shape) of each Linear it would take."""
    out = []
    for name, module in model.named_modules():
        if type(module).__name__ in targets:
            for sub, child in module.named_modules():
                if isinstance(child, torch.nn.Linear):
                    out.append((f"{name}.{sub}", tuple(child.weight.shape)))
    return out


@pytest.fixture(scope="module")
def orders():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = meta_model(lambda: UNet2DConditionModel(**SD15_UNET))
    te = meta_model(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))
    te_order = [(p if p.startswith("text_model.") else "text_model." + p, s) for p, s in walk(te, TE_TARGETS)]
    return walk(unet, UNET_TARGETS), te_order


def old_diffusers(order):
    """The same modules as diffusers 0.11 registered them: attn1, ff, attn2 in every transformer block."""
    blocks: dict[str, list] = {}
    for path, shape in order:
        blocks.setdefault(path.split(".attn")[0].split(".ff.")[0], []).append((path, shape))
    out = []
    for entries in blocks.values():
        rank = {".attn1.": 0, ".ff.": 1, ".attn2.": 2}
        out += sorted(entries, key=lambda e: next(v for k, v in rank.items() if k in e[0]))
    return out


def safeloras(unet_order, te_order, embeds: dict[str, torch.Tensor], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weights, meta = {}, {}
    for name, order, targets in (("unet", unet_order, UNET_TARGETS), ("text_encoder", te_order, TE_TARGETS)):
        meta[name] = json.dumps(targets)
        for i, (_, (o, inp)) in enumerate(order):
            weights[f"{name}:{i}:up"] = torch.randn(o, 1, generator=gen).half()
            weights[f"{name}:{i}:down"] = torch.randn(1, inp, generator=gen).half()
            meta[f"{name}:{i}:rank"] = "1"
    for token, t in embeds.items():
        weights[token] = t
        meta[token] = "<embed>"
    return weights, meta


@pytest.mark.parametrize("old", [False, True], ids=["diffusers>=0.15", "diffusers<0.15"])
def test_lora_diffusion_file_reads_in_module_order_and_converts_to_kohya(tmp_path, orders, old):
    unet_order, te_order = orders
    order = old_diffusers(unet_order) if old else unet_order
    weights, meta = safeloras(order, te_order, {"<s1>": torch.randn(768)})
    save_file(weights, tmp_path / "lora.safetensors", metadata=meta)

    info = inspect(tmp_path / "lora.safetensors").to_json()
    assert (info["format"], info["dialect"], info["family"]) == ("lora_diffusion", "cloneofsimo", "sd1")
    assert info["component_modules"] == {"unet": len(order), "text_encoder": len(te_order)}
    assert [e["name"] for e in info["extras"]] == ["bundle_emb.<s1>.string_to_param.*"]
    adapter = loratool.load(tmp_path / "lora.safetensors")
    for i, (path, _) in enumerate(order):
        m = adapter.modules[("unet", path)]
        assert torch.equal(m.tensors["up"], weights[f"unet:{i}:up"]) and m.scale == 1.0
    for i, (path, _) in enumerate(te_order):
        assert torch.equal(adapter.modules[("text_encoder", path)].tensors["down"], weights[f"text_encoder:{i}:down"])

    convert(tmp_path / "lora.safetensors", "kohya", tmp_path / "kohya.safetensors")
    kohya = load_file(tmp_path / "kohya.safetensors")
    path0, _ = order[0]
    head = "lora_unet_" + path0.replace(".", "_")
    assert torch.equal(kohya[head + ".lora_up.weight"], weights["unet:0:up"]) and float(kohya[head + ".alpha"]) == 1.0
    te0 = "lora_te_" + te_order[2][0].replace(".", "_")  # the third CLIP module is q_proj
    assert te0.endswith("self_attn_q_proj") and torch.equal(kohya[te0 + ".lora_down.weight"],
                                                            weights["text_encoder:2:down"])
    assert torch.equal(kohya["bundle_emb.<s1>.string_to_param.*"], weights["<s1>"].reshape(1, 768))
    assert loratool.load(tmp_path / "kohya.safetensors").extras  # kohya reads the bundled embedding back


def test_lora_diffusion_to_diffusers_and_refusals(tmp_path, orders):
    unet_order, te_order = orders
    weights, meta = safeloras(unet_order, [], {})
    del meta["text_encoder"]
    save_file(weights, tmp_path / "unet.safetensors", metadata=meta)
    convert(tmp_path / "unet.safetensors", "diffusers", tmp_path / "d.safetensors")
    back = loratool.load(tmp_path / "d.safetensors")
    assert {m.path for m in back} == {p for p, _ in unet_order}

    with_emb, meta2 = safeloras(unet_order, [], {"<s1>": torch.randn(768)})
    del meta2["text_encoder"]
    save_file(with_emb, tmp_path / "emb.safetensors", metadata=meta2)
    with pytest.raises(FormatError, match="hold no textual-inversion embeddings"):
        convert(tmp_path / "emb.safetensors", "diffusers", tmp_path / "e.safetensors")

    # one module too many (e.g. a model lora_diffusion walked differently): the order cannot be known
    extra = dict(weights, **{f"unet:{len(unet_order)}:up": torch.zeros(320, 1), f"unet:{len(unet_order)}:down":
                             torch.zeros(1, 320)})
    save_file(extra, tmp_path / "odd.safetensors", metadata=meta)
    with pytest.raises(FormatError, match="module order of unet cannot be known"):
        loratool.load(tmp_path / "odd.safetensors")
    swapped = dict(weights)  # two modules of different shapes in each other's place
    swapped["unet:0:up"], swapped["unet:8:up"] = weights["unet:8:up"], weights["unet:0:up"]
    swapped["unet:0:down"], swapped["unet:8:down"] = weights["unet:8:down"], weights["unet:0:down"]
    save_file(swapped, tmp_path / "swapped.safetensors", metadata=meta)
    with pytest.raises(FormatError, match="first misfit at unet:0"):
        loratool.load(tmp_path / "swapped.safetensors")


def pt_lists(weights: dict[str, torch.Tensor], name: str, n: int) -> list[torch.Tensor]:
    """What ``save_lora_weight`` (lora_diffusion/lora.py) saves: [up₀, down₀, up₁, down₁, …]; its own
    converter (cli_pt_to_safetensors → convert_loras_to_safeloras_with_embeds) maps entry 2i to
    ``<name>:i:up`` and 2i+1 to ``<name>:i:down``, which is what this list inverts."""
    return [weights[f"{name}:{i}:{slot}"] for i in range(n) for slot in ("up", "down")]


@pytest.mark.parametrize("targets", ["default", "no_geglu"])
def test_save_lora_weight_pickles_read_as_their_safetensors_conversion(tmp_path, orders, targets):
    unet_order, te_order = orders
    if targets == "no_geglu":  # the first releases trained ["CrossAttention", "Attention"] only
        unet_order = [(p, s) for p, s in unet_order if ".ff." not in p]
    weights, meta = safeloras(unet_order, te_order, {})
    if targets == "no_geglu":
        meta["unet"] = json.dumps(["CrossAttention", "Attention"])
    save_file(weights, tmp_path / "lora.safetensors", metadata=meta)
    torch.save(pt_lists(weights, "unet", len(unet_order)), tmp_path / "lora_weight.pt")
    torch.save(pt_lists(weights, "text_encoder", len(te_order)), tmp_path / "lora_weight_e9_s90.text_encoder.pt")

    want = loratool.load(tmp_path / "lora.safetensors")
    for name, comp, n in (("lora_weight.pt", "unet", len(unet_order)),
                          ("lora_weight_e9_s90.text_encoder.pt", "text_encoder", len(te_order))):
        got = loratool.load(tmp_path / name)
        assert got.source_format == "lora_diffusion" and got.family == "sd1" and got.components == [comp]
        expected = want.by_component(comp)
        assert [m.path for m in got] == [m.path for m in expected]
        for m, e in zip(got, expected):
            assert torch.equal(m.tensors["up"], e.tensors["up"]) and torch.equal(m.tensors["down"], e.tensors["down"])
            assert m.scale == e.scale == 1.0
        info = inspect(tmp_path / name).to_json()  # header-only: the pickle's tensor table, not its data
        assert (info["format"], info["module_count"], info["header_only"]) == ("lora_diffusion", n, True)
    convert(tmp_path / "lora_weight.pt", "kohya", tmp_path / "k.safetensors")
    head = "lora_unet_" + unet_order[0][0].replace(".", "_")
    assert torch.equal(load_file(tmp_path / "k.safetensors")[head + ".lora_up.weight"], weights["unet:0:up"])
