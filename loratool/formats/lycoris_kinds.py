"""LyCORIS module kinds beyond LoCon / LoHa / LoKr / full: their key suffixes and canonical tensors.

Read from kohya-named files (``lora_unet_<path>.<suffix>``, ``lycoris_<path>.<suffix>``) and from
the dotted dialects (``diffusion_model.<path>.<suffix>``, :mod:`loratool.formats.dialects`). Key
names are those ``lycoris-lora`` 4.1.3 writes (``weight_list`` of each module class in
``lycoris/modules/``) and ComfyUI loads (``comfy/weight_adapter/``):

==================================  ========  ===============================================
suffix                              kind      canonical tensor
==================================  ========  ===============================================
``oft_blocks`` [n, b, b]            oft       ``blocks`` (DiagOFT, ``diag_oft.py``)
``oft_blocks`` [m, n, b, b]         boft      ``blocks`` (butterfly OFT, ``boft.py``)
``oft_diag`` [n, b, b]              oft       ``rotation`` (LyCORIS < 2.1 stored R = get_r())
``rescale`` [out, 1(, 1, 1)]        oft/boft  ``rescale``
``alpha``                           oft/boft  the constraint (``LoraModule.alpha``, not a scale)
``a1.weight`` ``a2.weight``         glora     ``a1`` [in, r], ``a2`` [r, in]
``b1.weight`` ``b2.weight``         glora     ``b1`` [out, r], ``b2`` [r, in(, k, k)]
``w_norm`` / ``b_norm``             norm      ``w_norm`` / ``b_norm`` (LayerNorm / GroupNorm deltas)
==================================  ========  ===============================================

GLoRA's Tucker core ``bm.weight`` is not read: lycoris 4.1.3 never creates it (its ``use_tucker``
test requires a 1×1 kernel and then a larger one) and ComfyUI ignores it. The update formulas are
in :mod:`loratool.delta`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays unimported for header-only info
    import torch

SUFFIXES: dict[str, tuple[str, str]] = {
    "oft_blocks": ("oft", "blocks"),
    "oft_diag": ("oft", "rotation"),
    "rescale": ("oft", "rescale"),
    "a1.weight": ("glora", "a1"),
    "a2.weight": ("glora", "a2"),
    "b1.weight": ("glora", "b1"),
    "b2.weight": ("glora", "b2"),
    "w_norm": ("norm", "w_norm"),
    "b_norm": ("norm", "b_norm"),
}
# canonical tensor -> suffix, per kind (boft shares oft's names)
SUFFIX_OF = {**{k: s for s, k in SUFFIXES.items()}, ("boft", "blocks"): "oft_blocks", ("boft", "rescale"): "rescale"}
REQUIRED = {"oft": ("blocks|rotation",), "boft": ("blocks",), "glora": ("a1", "a2", "b1", "b2"), "norm": ("w_norm",)}


def refine(kind: str, tensors: dict[str, torch.Tensor]) -> str:
    """The kind the tensors make: 4-D OFT blocks are butterfly OFT (LyCORIS ``algo_check``)."""
    if kind == "oft" and "blocks" in tensors and tensors["blocks"].dim() == 4:
        return "boft"
    return kind


def layer_of(kind: str, tensors: dict[str, torch.Tensor]) -> str:
    """The layer type a module of a new kind adapts (as far as its tensors tell)."""
    if kind == "norm":
        return "norm"
    if kind in ("oft", "boft"):
        rescale = tensors.get("rescale")
        return "conv" if rescale is not None and rescale.dim() > 2 else "linear"
    return "conv" if tensors["b2"].dim() > 2 else "linear"
