"""Helpers for the merge tests: save bases, build in-memory adapters from live PEFT / LyCORIS
modules (so the merge maths is tested even where a file reader is not ready), compare results.

The adapters built here copy the libraries' own tensors and settings; the expected merged
weights always come from the library (``merge_and_unload``, ``fuse_lora``, ``merge_to``,
loralib ``eval()``), never from loratool code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loratool.adapter import Adapter, LoraModule


def save_base(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> Path:
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path),
              metadata=metadata or {"format": "pt"})
    return path


def save_component(model, folder: Path, name: str = "diffusion_pytorch_model.safetensors") -> dict:
    """Save ``model``'s weights as a diffusers component folder (``folder`` named after the component,
    e.g. ``.../unet``, which is how the checkpoint says what it is); returns the saved state."""
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True)
    save_base(base, folder / name)
    return base


def adapter_from_peft(peft_model, component: str = "model", strip: str = "base_model.model.") -> Adapter:
    """Canonical modules from the LoRA layers of a live PEFT model (adapter ``default``)."""
    from peft.tuners.lora import LoraLayer

    adapter = Adapter(source_format="peft-memory")
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLayer) or "default" not in mod.r:
            continue
        path = name[len(strip):] if name.startswith(strip) else name
        alpha, rs = mod.lora_alpha["default"], mod.use_rslora["default"]
        base = mod.get_base_layer()
        magnitude = None
        if "default" in mod.lora_magnitude_vector:
            magnitude = mod.lora_magnitude_vector["default"].weight.detach().clone()
        if "default" in mod.lora_embedding_A:
            tensors = {"down": mod.lora_embedding_A["default"].detach().clone(),
                       "up": mod.lora_embedding_B["default"].detach().clone()}
            layer = "embedding"
        else:
            tensors = {"down": mod.lora_A["default"].weight.detach().clone(),
                       "up": mod.lora_B["default"].weight.detach().clone()}
            layer = "conv" if isinstance(base, torch.nn.Conv2d) else "linear"
            if mod.lora_B["default"].bias is not None:
                tensors["bias"] = mod.lora_B["default"].bias.detach().clone()
        adapter.add(LoraModule(component, path, "lora", layer, tensors, alpha=float(alpha), rslora=bool(rs),
                               magnitude=magnitude, fan_in_fan_out=bool(getattr(mod, "fan_in_fan_out", False))))
    assert len(adapter), "no LoRA layers found"
    return adapter


def relative_error(ours: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> float:
    """‖ours − expected‖ / ‖expected − base‖ (error relative to the update), in float64."""
    ours, expected, base = (t.double() for t in (ours, expected, base))
    update = (expected - base).norm()
    assert update > 0, "the oracle did not change this weight"
    return float((ours - expected).norm() / update)


def assert_merged(out_file: Path, expected: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                  tol: float = 1e-5) -> int:
    """Every changed weight within ``tol`` of the oracle relative to its update; unchanged ones equal.

    Returns how many weights changed (so a test can assert the merge did something).
    """
    ours = load_file(str(out_file))
    assert set(ours) == set(base), set(ours) ^ set(base)
    changed = 0
    for key, b in base.items():
        e = expected[key]
        assert ours[key].dtype == b.dtype and ours[key].shape == b.shape, key
        if torch.equal(e.to(b.dtype), b):
            assert torch.equal(ours[key], b), f"{key} changed but the oracle left it alone"
            continue
        changed += 1
        err = relative_error(ours[key], e, b)
        assert err < tol, f"{key}: relative error {err:.3g}"
    return changed
