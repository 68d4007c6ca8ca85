"""HiDream-I1 (HiDream-ai/HiDream-I1, Full / Dev / Fast; E1 editing): the original names are diffusers'
``HiDreamImageTransformer2DModel``'s (ComfyUI's ``comfy/lora.py`` maps HiDream LoRAs by the model's own names;
diffusers' ``_convert_non_diffusers_hidream_lora_to_diffusers`` and ``convert_hidream_transformer_to_diffusers``
only strip ``diffusion_model.`` / ``model.diffusion_model.``). SimpleTuner writes diffusers files
(``transformer.double_stream_blocks.0.block.attn1.to_q``) and LyCORIS ones (``lycoris_double_stream_blocks_0_…``),
both read; the MoE feed-forward (``ff_i.experts.N.w1``, ``ff_i.shared_experts``, ``ff_i.gate``) keeps its names.
"""

from __future__ import annotations

from loratool.arch import dit

SPEC = dit.DitFamily(
    name="hidream",
    title="HiDream-I1",
    table="hidream_modules",
    diffusers_class="HiDreamImageTransformer2DModel",
    pipelines=("HiDream",),
    block_lists=("double_stream_blocks", "single_stream_blocks", "caption_projection"),
    metadata=("hidream",),
    markers=(r"^(double|single)_stream_blocks\.",),
    single_file_marks=("double_stream_blocks.0.block.attn1.to_q.weight",),
)
FAMILY = SPEC.family
