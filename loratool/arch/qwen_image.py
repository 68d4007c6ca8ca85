"""Qwen-Image (and Edit / Edit-Plus / Edit-2511 / Layered): native names are diffusers'
``QwenImageTransformer2DModel`` names (ComfyUI's and musubi-tuner's Qwen-Image models keep them), so the
map is the identity; what varies is the spelling of the keys:

* native / ComfyUI / diffusion-pipe: ``diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight``;
* musubi-tuner (kohya): ``lora_unet_transformer_blocks_0_attn_add_q_proj`` — underscores inside names
  (``add_q_proj``, ``img_mod``, ``to_add_out``) are restored from the generated module table;
* diffusers: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``.

Top-level modules: ``img_in``, ``txt_in``, ``proj_out``, ``norm_out.linear``, ``time_text_embed.*`` (diffusers'
``_convert_non_diffusers_qwen_lora_to_diffusers`` names the same). The Edit variants share the architecture:
only metadata (musubi-tuner's ``modelspec.architecture``: ``Qwen-Image-Edit``, ``Qwen-Image-Edit-Plus``,
``Qwen-Image-Edit-2511``, ``Qwen-Image-Layered``) tells them apart.
"""

from __future__ import annotations

from collections.abc import Mapping

from loratool.arch import dit

# modelspec.architecture names (musubi-tuner utils/sai_model_spec.py), most specific first
VARIANTS = ("qwen-image-edit-2511", "qwen-image-edit-plus", "qwen-image-edit", "qwen-image-layered", "qwen-image")
TITLES = {"qwen-image-edit-2511": "Qwen-Image-Edit-2511", "qwen-image-edit-plus": "Qwen-Image-Edit-Plus",
          "qwen-image-edit": "Qwen-Image-Edit", "qwen-image-layered": "Qwen-Image-Layered", "qwen-image": "Qwen-Image"}


def adapter_variant(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str | None:
    arch_ = metadata.get("modelspec.architecture", "").lower()
    return next((TITLES[v] for v in VARIANTS if v in arch_), None)


def base_variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    return "Qwen-Image-Layered" if "time_text_embed.addition_t_embedding.weight" in shapes else None


SPEC = dit.DitFamily(
    name="qwen_image",
    title="Qwen-Image",
    table="qwen_image_modules",
    diffusers_class="QwenImageTransformer2DModel",
    pipelines=("QwenImage",),
    block_lists=("transformer_blocks",),
    metadata=("qwen-image", "qwen_image", "qwenimage"),
    markers=(r"\.(img_mod|txt_mod)\.1$", r"\.(img_mlp|txt_mlp)\.net\.", r"^txt_norm$", r"^(img_in|txt_in)$"),
    single_file_marks=("transformer_blocks.0.img_mod.1.weight", "txt_in.weight"),
    variant=adapter_variant,
    base_variant=base_variant,
)
FAMILY = SPEC.family
