"""ERNIE-Image (baidu): the original naming is diffusers' ``ErnieImageTransformer2DModel``'s (diffusers'
``ErnieImageLoraLoaderMixin``: "the Ernie LoRA naming under diffusion_model.* already matches diffusers module
names"; ``convert_ernie_image_transformer_checkpoint_to_diffusers`` only strips ``model.diffusion_model.``).
Read, ``info``, convert, and merge / extract like any identity-named family.
"""

from __future__ import annotations

from loratool.arch import dit

SPEC = dit.DitFamily(
    name="ernie_image",
    title="ERNIE-Image",
    table="ernie_image_modules",
    diffusers_class="ErnieImageTransformer2DModel",
    pipelines=("ErnieImage",),
    block_lists=("layers",),
    metadata=("ernie-image", "ernie_image", "ernieimage"),
    markers=(r"\.self_attention\.", r"\.adaLN_(sa|mlp)_ln$", r"\.mlp\.linear_fc2$", r"^final_linear$"),
    single_file_marks=("layers.0.adaLN_sa_ln.weight", "final_linear.weight"),
)
FAMILY = SPEC.family
