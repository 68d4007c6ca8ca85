"""The model parts an adapter addresses (diffusers folder names; ``model`` for a plain model;
``text_conditioner``: Anima's ``AnimaTextConditioner``, ComfyUI's ``llm_adapter``).

Kept apart from :mod:`loratool.adapter` so that reading checkpoint headers does not import torch.
"""

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "text_conditioner", "model")
