"""Tensor names in GGUF files, presented under the names loratool's families use.

Two converters write the GGUF files people merge into:

* **Image / video models** (city96's ComfyUI-GGUF, ``tools/convert.py``): tensors keep the original
  checkpoint's names with the ``model.diffusion_model.`` prefix stripped (``strip_prefix``), and
  ``general.architecture`` names the family (``flux``, ``sd1``, ``sdxl``, ``sd3``, ``wan``,
  ``qwen_image``...; ``loader.py``'s ``IMG_ARCH_LIST``). For the LDM / SGM U-Nets the prefix is put
  back (:data:`IMAGE_PREFIX`), so the single-file key maps of ``loratool.arch.checkpoints`` place
  them; Flux and SD3 names are the bare BFL / MMDiT names those maps read as they are; other
  families keep their stored names (matched as stored, or through a base vocabulary).
* **Language models** (llama.cpp's ``convert_hf_to_gguf.py``): ``blk.N.attn_q.weight``,
  ``token_embd.weight``... Each is presented under its Hugging Face transformers name, found by
  inverting the ``gguf`` package's own ``TensorNameMap`` for the file's architecture (the table the
  converter itself writes names with) and taking the candidate of the ``*ForCausalLM`` /
  ``T5EncoderModel`` naming (:data:`PREFERRED`). llama.cpp's ``LlamaModel`` (``conversion/llama.py``:
  ``undo_permute = True``, ``permute()``) reorders the rows of ``q_proj`` / ``k_proj`` weights and
  biases per head for its rotary layout; :func:`presented_names` returns those tensors with their
  head counts (``<arch>.attention.head_count`` / ``head_count_kv``) so the GGUF codec reads and
  writes them in the HF row order.

This table lives in ``io/`` rather than ``arch/`` because it is needed to open a GGUF file, and
opening base files (``info``, the copy a merge starts) must not import torch, which ``arch`` does.
"""

from __future__ import annotations

import re
from typing import Any

# ComfyUI-GGUF image architectures whose stored names lost this prefix.
IMAGE_PREFIX = {"sd1": "model.diffusion_model.", "sdxl": "model.diffusion_model."}
# ComfyUI-GGUF loader.py IMG_ARCH_LIST: names kept as the original checkpoint's.
IMAGE_ARCHS = frozenset({"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan",
                         "lumina2", "qwen_image", "pig", "cow"})
# HF name prefixes to prefer among TensorNameMap candidates, per naming (first prefix that matches wins).
PREFERRED = {
    "t5": ("encoder.block.", "encoder.final_layer_norm", "decoder.block.", "decoder.final_layer_norm", "shared",
           "lm_head"),
    "default": ("model.layers.", "model.embed_tokens", "model.norm", "lm_head"),
}
T5_ARCHS = frozenset({"t5", "t5encoder"})
# Architectures whose converter class inherits LlamaModel's q/k row permutation (undo_permute = True):
# LlamaModel (llama, Mistral, Mixtral), ArceeModel, SmolLM3Model, GraniteModel / GraniteMoeModel.
PERMUTED_ARCHS = frozenset({"llama", "arcee", "smollm3", "granite", "granitemoe"})
_PERMUTED_PARAM = re.compile(r"\.self_attn\.(q|k)_proj\.(weight|bias)$")
_BLOCK = re.compile(r"^(?:enc\.|dec\.)?blk\.(\d+)\.")


def _block_count(arch: str, fields: dict[str, Any], stored: list[str]) -> int:
    count = fields.get(f"{arch}.block_count")
    if isinstance(count, int) and count > 0:
        return count
    ids = [int(m.group(1)) for s in stored if (m := _BLOCK.match(s))]
    return max(ids) + 1 if ids else 0


def _llm_names(arch: str, fields: dict[str, Any], stored: list[str]) -> dict[str, str]:
    import gguf

    model_arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if model_arch is None:
        return {}
    try:
        tmap = gguf.get_tensor_name_map(model_arch, _block_count(arch, fields, stored))
    except (KeyError, ValueError):
        return {}
    candidates: dict[str, list[str]] = {}
    for hf, (_, gname) in tmap.mapping.items():
        if hf != gname:
            candidates.setdefault(gname, []).append(hf)
    preferred = PREFERRED["t5" if arch in T5_ARCHS else "default"]
    out: dict[str, str] = {}
    for name in stored:
        base, dot, suffix = name.rpartition(".")
        options = candidates.get(base) if dot else None
        if not options:
            continue
        pick = next((c for p in preferred for c in options if c.startswith(p)), None)
        if pick is not None:
            out[name] = f"{pick}.{suffix}"
    return out


def presented_names(arch: str | None, fields: dict[str, Any], stored: list[str]
                    ) -> tuple[dict[str, str], dict[str, int]]:
    """(stored name -> presented name, presented name -> head count of a row-permuted tensor).

    Names absent from the first map are presented as stored.
    """
    if arch is None or arch in IMAGE_ARCHS:
        prefix = IMAGE_PREFIX.get(arch or "")
        if prefix is None:
            return {}, {}
        return {s: prefix + s for s in stored if not s.startswith(prefix)}, {}
    names = _llm_names(arch, fields, stored)
    if arch not in PERMUTED_ARCHS:
        return names, {}
    heads = fields.get(f"{arch}.attention.head_count")
    kv_heads = fields.get(f"{arch}.attention.head_count_kv", heads)
    permutations: dict[str, int] = {}
    for name in names.values():
        m = _PERMUTED_PARAM.search(name)
        count = heads if m and m.group(1) == "q" else kv_heads
        if m and isinstance(count, int) and count > 0:
            permutations[name] = count
    return names, permutations
