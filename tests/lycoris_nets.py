"""LyCORIS networks on chosen modules of a tiny model, built by lycoris itself (tests stay fast)."""

from __future__ import annotations

import lycoris
import torch
from tiny_models import randomize_lora


def lycoris_network(model, algo: str, targets: list[str] | None = None, seed: int = 3, **kw):
    """``create_lycoris`` on ``targets`` only (module paths; all Linear / Conv modules when None), applied,
    with random factors (std 0.2) and in float64. lycoris presets are class-wide: restored after."""
    cls = lycoris.LycorisNetwork
    saved = {"target_module": cls.TARGET_REPLACE_MODULE, "target_name": cls.TARGET_REPLACE_NAME}
    if targets is not None:
        cls.apply_preset({"target_module": [], "target_name": targets})
    try:
        net = lycoris.create_lycoris(model, 1.0, algo=algo, **{"linear_dim": 4, **kw})
    finally:
        cls.apply_preset(saved)
    net.apply_to()
    randomize_lora(net, seed=seed, std=0.2)
    net.double()
    assert targets is None or len(net.loras) == len(targets), [m.lora_name for m in net.loras]
    return net


def save(net, path, dtype=torch.float64):
    net.save_weights(str(path), dtype, {"ss_network_module": "lycoris.kohya"})
    return path
