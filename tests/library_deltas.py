"""ΔW of every module of an adapter file as the layout's own library computes it, on the fixture
base models (float64): the oracle for conversions (a conversion is right when the target layout's
library gives the same ΔW from the output as the source layout's library gives from the input).

* PEFT folder: ``PeftModel.from_pretrained`` then each layer's ``get_delta_weight``;
* diffusers file: ``lora_state_dict`` + ``load_lora_into_unet`` (U-Net) and diffusers' text-encoder
  key conversions + PEFT injection (what ``_load_lora_into_text_encoder`` does), then
  ``get_delta_weight``;
* kohya / LyCORIS file: lycoris' own loader (``create_lycoris_from_weights``) and each module's
  rebuild as its ``forward`` applies it (``make_weight`` · scale for LoCon, ``get_weight`` for
  LoHa / LoKr);
* loralib ``.pt`` + sidecar: loralib layers built from the sidecar, merged by ``eval()``.

Keys are (component, module path) with CLIP's ``text_model.`` dropped (transformers ≥ 5 module
names), ΔW in the orientation the base stores the weight.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import loralib
import lycoris
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, LlamaForCausalLM

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BASES = {
    "model": lambda: LlamaForCausalLM.from_pretrained(FIXTURES / "base" / "tiny_llama"),
    "unet": lambda: UNet2DConditionModel.from_pretrained(FIXTURES / "base" / "tiny_sd" / "unet"),
    "text_encoder": lambda: CLIPTextModel.from_pretrained(FIXTURES / "base" / "tiny_sd" / "text_encoder"),
}
# kohya prefix of each component (sd-scripts; loratool names LLM adapters lora_te) and the part of
# the kohya name the transformers ≥ 5 CLIP module names no longer have
KOHYA = {"unet": ("lora_unet_", ""), "text_encoder": ("lora_te_", "text_model_"), "model": ("lora_te_", "")}

Deltas = dict[tuple[str, str], torch.Tensor]


def base_model(component: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BASES[component]().double().eval()


def _name(path: str) -> str:
    return path.removeprefix("text_model.")


def _peft_layers(model, component: str, adapter: str, strip: str = "") -> Deltas:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and (adapter in mod.lora_A or adapter in mod.lora_embedding_A):
            with torch.no_grad():
                out[(component, _name(name.removeprefix(strip)))] = mod.get_delta_weight(adapter).double()
    return out


def peft_deltas(folder: Path, component: str) -> Deltas:
    model = base_model(component)
    sd = load_file(folder / "adapter_model.safetensors")
    if not hasattr(model, "text_model") and any(".text_model." in k for k in sd):
        # transformers ≥ 5 CLIP has no text_model. in its module names while checkpoints (and PEFT
        # folders named after them) keep it: drop it from keys and targets, as diffusers does for CLIP
        config = json.loads((folder / "adapter_config.json").read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = [t.removeprefix("text_model.") for t in config["target_modules"]]
        return _inject(model, component, config,
                       {k.removeprefix("base_model.model.").removeprefix("text_model."): v for k, v in sd.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, str(folder))
    return _peft_layers(pm, component, "default", "base_model.model.")


def _inject(model, component: str, config: dict, sd: dict) -> Deltas:
    fields = set(LoraConfig.__dataclass_fields__)
    cfg = LoraConfig(**{k: v for k, v in config.items() if k in fields})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(cfg, model, adapter_name="x")
        result = set_peft_model_state_dict(model, sd, adapter_name="x")
    assert not result.unexpected_keys, result.unexpected_keys[:3]
    return _peft_layers(model, component, "x")


def diffusers_deltas(path: Path) -> Deltas:
    out: Deltas = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd, alphas, meta = Loader.lora_state_dict(str(path), return_lora_metadata=True)
        if any(k.startswith("unet.") for k in sd):
            unet = base_model("unet")
            Loader.load_lora_into_unet(sd, alphas, unet, adapter_name="x", metadata=meta)
            out.update(_peft_layers(unet, "unet", "x"))
    tensors = load_file(path)
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata().get("lora_adapter_metadata", "{}"))
    te = {k[len("text_encoder."):]: v for k, v in tensors.items() if k.startswith("text_encoder.")}
    if te:
        config = {k[len("text_encoder."):]: v for k, v in header.items() if k.startswith("text_encoder.")}
        te = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te))
        out.update(_inject(base_model("text_encoder"), "text_encoder", config,
                           {k.removeprefix("text_model."): v for k, v in te.items()}))
    return out


def _lycoris_delta(module) -> torch.Tensor:
    """ΔW as the lycoris module's forward adds it (scale once: 4.1.3's get_diff_weight doubles LoHa/LoKr's)."""
    with torch.no_grad():
        if hasattr(module, "make_weight"):  # LoCon
            return (module.make_weight() * module.scale).double().reshape(module.shape)
        return module.get_weight(module.shape).double().reshape(module.shape)


def kohya_deltas(path: Path) -> Deltas:
    sd = load_file(path)
    sd_names = any(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in sd)
    out: Deltas = {}
    for component in ("unet", "text_encoder") if sd_names else ("model",):
        prefix, dropped = KOHYA[component]
        named = {"lycoris_" + k[len(prefix):].removeprefix(dropped): v.double() for k, v in sd.items()
                 if k.startswith(prefix)}
        if not named:
            continue
        model = base_model(component)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net, _ = lycoris.create_lycoris_from_weights(1.0, "", model, weights_sd=named)
        names = {id(m): n for n, m in model.named_modules()}
        assert len(net.loras) == len({k.split(".")[0] for k in named}), "lycoris left modules out"
        for m in net.loras:
            m.double()
            out[(component, _name(names[id(m.org_module[0])]))] = _lycoris_delta(m)
    return out


def loralib_deltas(path: Path) -> Deltas:
    state = torch.load(path, weights_only=True)
    side = json.loads(Path(str(path) + ".json").read_text())
    out: Deltas = {}
    for name in (k.removesuffix(".lora_A") for k in state if k.endswith(".lora_A")):
        entry = side.get("modules", {}).get(name, {})  # per-module entries override the defaults
        a, b = state[name + ".lora_A"].double(), state[name + ".lora_B"].double()
        r, alpha, fifo = entry.get("r", side.get("r")), entry.get("lora_alpha", side.get("lora_alpha")), \
            entry.get("fan_in_fan_out", side.get("fan_in_fan_out", False))
        if entry.get("layer") == "embedding":
            layer = loralib.Embedding(a.shape[1], b.shape[0], r=r, lora_alpha=alpha)
        elif "enable_lora" in entry:
            enable = entry["enable_lora"]
            out_f = b.shape[0] * len(enable) // sum(enable)
            layer = loralib.MergedLinear(a.shape[1], out_f, r=r, lora_alpha=alpha, enable_lora=enable,
                                         fan_in_fan_out=fifo)
        else:
            layer = loralib.Linear(a.shape[1], b.shape[0], r=r, lora_alpha=alpha, fan_in_fan_out=fifo)
        layer.double().train()
        with torch.no_grad():
            layer.weight.zero_()
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        layer.eval()  # loralib merges ΔW into the (zero) weight here
        component, _, path_ = name.partition(".") if "components" in side else (side.get("component", "model"), "",
                                                                                    name)
        out[(component, _name(path_))] = layer.weight.detach().clone()
    return out
