"""Helpers for the trainer-dialect tests: Flux module shapes, LoRA factor builders, ΔW comparisons.

ΔW of two factor pairs is compared exactly without forming it (full-size Flux modules would need
GBs in float64): ‖s₁B₁A₁ − s₂B₂A₂‖²_F = tr((XᵀX)(YYᵀ)) with X = [s₁B₁, −s₂B₂], Y = [A₁; A₂].
Scales of a diffusers / PEFT file come from PEFT's own pattern rule (``peft.utils.other.get_pattern_key``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

FULL_FLUX = dict(dim=3072, mlp=12288, context=4096, vec=768, time=256, img=64, double=19, single=38)


def bfl_shapes(dim: int, mlp: int, context: int, vec: int, time: int, img: int, double: int, single: int,
               guidance: bool = True) -> dict[str, tuple[int, int]]:
    """{BFL module path: (out, in)} of a Flux.1 transformer (black-forest-labs/flux model.py names)."""
    out: dict[str, tuple[int, int]] = {}
    for i in range(double):
        b = f"double_blocks.{i}."
        for side in ("img", "txt"):
            out[b + f"{side}_mod.lin"] = (6 * dim, dim)
            out[b + f"{side}_attn.qkv"] = (3 * dim, dim)
            out[b + f"{side}_attn.proj"] = (dim, dim)
            out[b + f"{side}_mlp.0"] = (mlp, dim)
            out[b + f"{side}_mlp.2"] = (dim, mlp)
    for i in range(single):
        b = f"single_blocks.{i}."
        out[b + "modulation.lin"] = (3 * dim, dim)
        out[b + "linear1"] = (3 * dim + mlp, dim)
        out[b + "linear2"] = (dim, dim + mlp)
    out.update({"img_in": (dim, img), "txt_in": (dim, context), "time_in.in_layer": (dim, time),
                "time_in.out_layer": (dim, dim), "vector_in.in_layer": (dim, vec), "vector_in.out_layer": (dim, dim),
                "final_layer.linear": (img, dim), "final_layer.adaLN_modulation.1": (2 * dim, dim)})
    if guidance:
        out.update({"guidance_in.in_layer": (dim, time), "guidance_in.out_layer": (dim, dim)})
    return out


def bfl_norms(dim_head: int, double: int, single: int) -> dict[str, int]:
    """{BFL qk-norm scale parameter: size}."""
    out = {}
    for i in range(double):
        for side in ("img", "txt"):
            for q in ("query", "key"):
                out[f"double_blocks.{i}.{side}_attn.norm.{q}_norm.scale"] = dim_head
    for i in range(single):
        for q in ("query", "key"):
            out[f"single_blocks.{i}.norm.{q}_norm.scale"] = dim_head
    return out


def factors(shapes: dict[str, tuple[int, ...]], rank: int, seed: int, names=("lora_A.weight", "lora_B.weight"),
            prefix: str = "", dtype=torch.float32, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Random down / up factors for every module (keys ``prefix + path + '.' + name``)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (o, i) in shapes.items():
        sd[f"{prefix}{path}.{names[0]}"] = (torch.randn(rank, i, generator=gen) * 0.1).to(dtype)
        sd[f"{prefix}{path}.{names[1]}"] = (torch.randn(o, rank, generator=gen) * 0.1).to(dtype)
        if alpha is not None:
            sd[f"{prefix}{path}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd


def lowrank_error(up1, down1, s1, up2, down2, s2) -> float:
    """‖s₁·up₁@down₁ − s₂·up₂@down₂‖_F / ‖s₂·up₂@down₂‖_F, exactly, in float64."""
    x = torch.cat([s1 * up1.double().reshape(up1.shape[0], -1), -s2 * up2.double().reshape(up2.shape[0], -1)], 1)
    y = torch.cat([down1.double().reshape(down1.shape[0], -1), down2.double().reshape(down2.shape[0], -1)], 0)
    diff = torch.trace((x.T @ x) @ (y @ y.T)).clamp_min(0).sqrt()
    ref = s2 * up2.double().reshape(up2.shape[0], -1)
    d2 = down2.double().reshape(down2.shape[0], -1)
    norm = torch.trace((ref.T @ ref) @ (d2 @ d2.T)).clamp_min(0).sqrt()
    return float(diff / norm)


def as_loaded(state: dict[str, torch.Tensor], components=("transformer", "unet", "text_encoder", "text_encoder_2"),
              default: str = "transformer") -> dict[str, torch.Tensor]:
    """A diffusers converter's output under the names its loaders finally use: keys it leaves without a
    component prefix go to ``default`` (the Flux converter's embedders), text-encoder keys through
    ``convert_state_dict_to_diffusers`` + ``convert_state_dict_to_peft``
    (``lora_base._load_lora_into_text_encoder``)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    out: dict[str, torch.Tensor] = {}
    for comp in ("text_encoder", "text_encoder_2"):
        part = {k[len(comp) + 1:]: v for k, v in state.items() if k.startswith(comp + ".")}
        if part:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            out.update({f"{comp}.{k}": v for k, v in part.items()})
    for k, v in state.items():
        comp = k.split(".", 1)[0]
        if comp in ("text_encoder", "text_encoder_2"):
            continue
        out[k if comp in components else f"{default}.{k}"] = v
    return out


def read_diffusers_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(tensors, {module key: scale}) of a diffusers LoRA file, scales as PEFT resolves its header config."""
    from peft.utils.other import get_pattern_key

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    packed = json.loads(meta.get("lora_adapter_metadata", "{}"))
    scales = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        comp, name = module.split(".", 1)
        cfg = {k[len(comp) + 1:]: v for k, v in packed.items() if k.startswith(comp + ".")}
        r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        k = get_pattern_key((cfg.get("rank_pattern") or {}).keys(), name)
        if k in (cfg.get("rank_pattern") or {}):
            r = cfg["rank_pattern"][k]
        k = get_pattern_key((cfg.get("alpha_pattern") or {}).keys(), name)
        if k in (cfg.get("alpha_pattern") or {}):
            alpha = cfg["alpha_pattern"][k]
        scales[module] = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
    return tensors, scales


def assert_same_lora(ours: dict[str, torch.Tensor], our_scales: dict[str, float], theirs: dict[str, torch.Tensor],
                     their_scales: dict[str, float] | None = None, tol: float = 1e-6) -> int:
    """Same keys; every module's ΔW (and lora_B bias, other whole tensors) equal within ``tol``; returns modules."""
    assert set(ours) == set(theirs), (sorted(set(ours) - set(theirs))[:5], sorted(set(theirs) - set(ours))[:5])
    their_scales = their_scales or {}
    n = 0
    for key in ours:
        if key.endswith(".lora_A.weight"):
            m = key[: -len(".lora_A.weight")]
            err = lowrank_error(ours[m + ".lora_B.weight"], ours[key], our_scales[m],
                                theirs[m + ".lora_B.weight"], theirs[key], their_scales.get(m, 1.0))
            assert err <= tol, (m, err)
            n += 1
        elif key.endswith(".lora_B.bias"):
            m = key[: -len(".lora_B.bias")]
            torch.testing.assert_close(ours[key].double() * our_scales[m],
                                       theirs[key].double() * their_scales.get(m, 1.0), rtol=tol, atol=0)
        elif not key.endswith(".lora_B.weight"):
            assert torch.equal(ours[key], theirs[key]), key
    return n
