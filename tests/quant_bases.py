"""Tiny quantized bases built the way the tools that write them do, plus a PEFT oracle.

* float8 scaled layouts follow their writers' sources: ComfyUI ``comfy/utils.py``
  (``convert_old_quants``: ``scaled_fp8`` marker, ``.scale_weight`` / ``.scale_input``; the
  ``comfy_quant`` JSON, ``.weight_scale`` / ``.input_scale``) and kohya-ss/musubi-tuner
  ``src/musubi_tuner/modules/fp8_optimization_utils.py`` (``quantize_weight``: scale = row / block
  amax / max(float8), clamped at 1e-8, stored in the weight's original dtype, shaped [1], [out, 1]
  or [out, nblocks, 1]); neither package is installed, so the layouts are rebuilt here from them.
* bitsandbytes bases come from bitsandbytes' own ``Linear4bit`` / ``Linear8bitLt`` modules on the
  CPU: their ``state_dict()`` is what transformers' ``save_pretrained`` writes.
* GGUF bases are written by the ``gguf`` package's ``GGUFWriter`` with its own quantizers.
"""

from __future__ import annotations

import json

import torch
from merge_oracles import adapter_from_peft
from tiny_models import randomize_lora, tiny_llama

FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(key: str) -> bool:
    return key.endswith(".weight") and any(f".{n}." in key for n in LINEARS)


def wide_llama(seed: int = 0):
    """A tiny LLaMA whose rows are whole 64-blocks (bitsandbytes' CPU 4-bit kernel needs that, see test_quant_bnb)."""
    return tiny_llama(seed, hidden_size=64, intermediate_size=128)


def peft_oracle(decoded: dict[str, torch.Tensor], targets, strength: float = 1.0, seed: int = 1, std: float = 0.1,
                r: int = 4, alpha: int = 8, model_fn=tiny_llama):
    """(adapter, merged state in float64, ΔW per weight key in float64) for a tiny LLaMA holding ``decoded``."""
    from peft import LoraConfig, get_peft_model

    model = model_fn().double()
    model.load_state_dict({k: v.double() for k, v in decoded.items()})
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets)))
    randomize_lora(pm, seed=seed, std=std)
    adapter = adapter_from_peft(pm)
    deltas = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            mod.set_scale("default", strength)
            deltas[name.removeprefix("base_model.model.") + ".weight"] = mod.get_delta_weight("default").detach()
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return adapter, merged, deltas


def musubi_scaled(w: torch.Tensor, mode: str, code: str = "F8_E4M3", block: int = 16):
    """(fp8 weight, scale_weight) as musubi-tuner's ``quantize_weight`` makes them (mode tensor / channel / block)."""
    dtype = FP8[code]
    fmax = torch.finfo(dtype).max
    t = w.float()
    if mode == "block":
        t = t.view(w.shape[0], w.shape[1] // block, block)
        scale = t.abs().amax(dim=2, keepdim=True) / fmax
    elif mode == "channel":
        scale = t.abs().amax(dim=1, keepdim=True) / fmax
    else:
        scale = t.abs().max() / fmax
    scale = scale.clamp(min=1e-8).float()
    q = (t / scale).nan_to_num(0.0).clamp(-fmax, fmax).to(dtype).view(w.shape)
    stored = scale.to(w.dtype)
    return q, (stored.reshape(1) if mode == "tensor" else stored)


def comfy_scaled(w: torch.Tensor, code: str = "F8_E4M3"):
    """(fp8 weight, float32 scalar scale) as ComfyUI's TensorCoreFP8Layout.quantize makes them."""
    dtype = FP8[code]
    scale = (w.float().abs().amax() / torch.finfo(dtype).max).float()
    return (w.float() * (1.0 / scale)).to(dtype), scale


def comfy_quant_marker(fmt: str = "float8_e4m3fn") -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode("utf-8")), dtype=torch.uint8)


def scaled_decode(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W = w · s in float64 (block-wise for [out, nblocks, 1]), as the runtimes dequantize."""
    w, s = w.double(), scale.double()
    if s.dim() == 3:
        return (w.view(s.shape[0], s.shape[1], -1) * s).view(w.shape)
    return w * s


def bnb_linear_state(weight: torch.Tensor, kind: str, nested: bool = True) -> dict[str, torch.Tensor]:
    """The state dict bitsandbytes' own module writes for one Linear weight (``kind`` nf4 / fp4 / int8)."""
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=weight.dtype, quant_type=kind,
                                  compress_statistics=nested)
        # as transformers does: a Params4bit of the loaded (bf16) weight, quantized when moved to the device
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=kind,
                                         compress_statistics=nested, blocksize=64)
    layer = layer.to("cpu")  # quantizes on the CPU backend
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}
