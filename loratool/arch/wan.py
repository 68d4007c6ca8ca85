"""Wan 2.1 / 2.2 (T2V, I2V, FLF2V 14B, T2V 1.3B, TI2V 5B, the two A14B experts): the original naming
(Wan-Video/Wan2.1 ``wan/modules/model.py``: ComfyUI, musubi-tuner, diffusion-pipe, lightx2v files)
and its map to diffusers' ``WanTransformer3DModel`` (diffusers' ``convert_wan_transformer_to_diffusers``
and ``_convert_non_diffusers_wan_lora_to_diffusers`` spell the same map).

Every native module maps to one diffusers module (pure renames, exact). Key spellings read:

* native / ComfyUI / diffusion-pipe: ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` (``lora_down`` /
  ``lora_up``, ``.alpha``; lightx2v / CausVid ``.diff`` / ``.diff_b`` incl. norm layers);
* musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight``; VideoX-Fun (Wan-Fun): ``lora_unet__blocks_0_...``;
* diffusers: ``transformer.blocks.0.attn1.to_q.lora_A.weight``.

Variants differ in which modules exist (Wan 2.1 I2V / FLF2V add the image cross-attention
``cross_attn.k_img`` / ``v_img`` and ``img_emb``) and in widths (1.3B: 1536, TI2V 5B: 3072, 14B: 5120);
Wan 2.2 A14B is two 14B experts (high-noise: early steps, low-noise: late), told apart only by metadata.
"""

from __future__ import annotations

from collections.abc import Mapping

from loratool.arch import dit, fused

BLOCK = {
    "self_attn.q": ("attn1.to_q",),
    "self_attn.k": ("attn1.to_k",),
    "self_attn.v": ("attn1.to_v",),
    "self_attn.o": ("attn1.to_out.0",),
    "self_attn.norm_q": ("attn1.norm_q",),
    "self_attn.norm_k": ("attn1.norm_k",),
    "cross_attn.q": ("attn2.to_q",),
    "cross_attn.k": ("attn2.to_k",),
    "cross_attn.v": ("attn2.to_v",),
    "cross_attn.o": ("attn2.to_out.0",),
    "cross_attn.norm_q": ("attn2.norm_q",),
    "cross_attn.norm_k": ("attn2.norm_k",),
    "cross_attn.k_img": ("attn2.add_k_proj",),
    "cross_attn.v_img": ("attn2.add_v_proj",),
    "cross_attn.norm_k_img": ("attn2.norm_added_k",),
    "norm3": ("norm2",),  # the cross-attention LayerNorm (affine); Wan's norm1 / norm2 have no weights
    "ffn.0": ("ffn.net.0.proj",),
    "ffn.2": ("ffn.net.2",),
}
TOP = {
    "patch_embedding": ("patch_embedding",),
    "text_embedding.0": ("condition_embedder.text_embedder.linear_1",),
    "text_embedding.2": ("condition_embedder.text_embedder.linear_2",),
    "time_embedding.0": ("condition_embedder.time_embedder.linear_1",),
    "time_embedding.2": ("condition_embedder.time_embedder.linear_2",),
    "time_projection.1": ("condition_embedder.time_proj",),
    "img_emb.proj.0": ("condition_embedder.image_embedder.norm1",),
    "img_emb.proj.1": ("condition_embedder.image_embedder.ff.net.0.proj",),
    "img_emb.proj.3": ("condition_embedder.image_embedder.ff.net.2",),
    "img_emb.proj.4": ("condition_embedder.image_embedder.norm2",),
    "head.head": ("proj_out",),
}
NAMING = fused.FusedNaming(
    what="a Wan transformer module",
    blocks=(fused.Block("blocks", "blocks", BLOCK),),
    top=TOP,
    swapped=lambda native, module: False,
)
PARAMS = fused.FusedNaming(
    what="a Wan transformer parameter",
    blocks=(fused.Block("blocks", "blocks", {"modulation": ("scale_shift_table",)}),),
    # FLF2V's learned image-token positions (Wan2.1 MLPProj.emb_pos)
    top={"head.modulation": ("scale_shift_table",),
         "img_emb.emb_pos": ("condition_embedder.image_embedder.pos_embed",)},
    swapped=lambda native, module: False,
)

# diffusers width of the attention -> model size
SIZES = {1536: "1.3B", 3072: "5B", 5120: "14B"}
# patch_embedding input channels -> task (16 latent channels; I2V adds 4 mask + 16 image channels)
TASKS = {16: "T2V", 36: "I2V", 48: "TI2V"}
IMAGE_ATTN = ("attn2.add_k_proj", "attn2.add_v_proj")


def _describe(dim: int | None, in_channels: int | None, image_attention: bool, expert: str | None) -> str | None:
    """Variant text from the attention width, the patch embedder's input channels, whether the CLIP image
    cross-attention is there, and the A14B expert metadata names."""
    size = SIZES.get(dim) if dim else None
    task = TASKS.get(in_channels) if in_channels else None
    a14b = f" (Wan 2.2 A14B {expert} expert)" if expert else ""
    if image_attention:  # only Wan 2.1 I2V / FLF2V carry it
        return " ".join(w for w in ("Wan 2.1 I2V", size) if w)
    if size == "5B":
        return "Wan 2.2 TI2V 5B"
    if task == "I2V":  # image latents concatenated, no image cross-attention
        return " ".join(w for w in ("Wan 2.2 I2V", size) if w) + a14b
    if task == "T2V" or size == "1.3B":
        return " ".join(w for w in ("T2V", size) if w) + a14b
    if expert:
        return f"Wan 2.2 A14B {expert} expert (T2V or I2V)"
    if size:
        return f"{size} (T2V or Wan 2.2 I2V: no image cross-attention)"
    return None


def adapter_variant(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str | None:
    """Task / size / expert of a Wan LoRA from its modules' shapes and its metadata."""
    dim = next((s[1] for p, s in shapes.items() if p.endswith(("attn1.to_q", "attn1.to_k", "attn2.to_q"))), None)
    dim = dim or next((s[0] for p, s in shapes.items() if p.endswith("attn1.to_out.0")), None)
    patch = shapes.get("patch_embedding")
    image = any(p.endswith(IMAGE_ATTN) or ".image_embedder." in p for p in shapes)
    return _describe(dim, patch[1] if patch else None, image, dit.timestep_expert(metadata))


def base_variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Task / size of a Wan base from its canonical parameter shapes."""
    q = shapes.get("blocks.0.attn1.to_q.weight")
    patch = shapes.get("patch_embedding.weight")
    image = "blocks.0.attn2.add_k_proj.weight" in shapes
    return _describe(q[1] if q else None, patch[1] if patch else None, image, None)


SPEC = dit.DitFamily(
    name="wan",
    title="Wan 2.1 / 2.2",
    table="wan_modules",
    diffusers_class="WanTransformer3DModel",
    pipelines=("Wan",),
    naming=NAMING,
    params=PARAMS,
    metadata=("wan2", "wan-2", "wan_2", "wan21", "wan22"),
    markers=(r"^blocks\.\d+\.(self_attn|cross_attn|attn1|attn2|ffn)\.",),
    single_file_marks=("blocks.0.self_attn.q.weight", "head.head.weight"),
    variant=adapter_variant,
    base_variant=base_variant,
    mismatches=(
        dit.Mismatch(r"\.attn2\.(add_k_proj|add_v_proj|norm_added_k)$",
                     "image cross-attention (cross_attn.k_img / v_img)",
                     "only Wan 2.1 I2V / FLF2V 14B have it (CLIP image conditioning); this base has none "
                     "(T2V, or a Wan 2.2 model)"),
        dit.Mismatch(r"^condition_embedder\.image_embedder\.", "image embedder (img_emb)",
                     "only Wan 2.1 I2V / FLF2V 14B have it; this base has none"),
    ),
)
FAMILY = SPEC.family
