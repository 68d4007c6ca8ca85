"""How ``info`` shows a trainer's metadata: the ``ss_*`` keys in the order people read a run
(what, from which model, which network, how long, which optimizer, which data), dates as dates,
and no rows that say nothing (unset ``None`` values, safetensors' own ``format: pt``).

Key names are those sd-scripts writes (kohya-ss/sd-scripts ``train_network.py``); keys not
listed here follow in natural order. ``--json`` keeps every key and value exactly as stored.
"""

from __future__ import annotations

import datetime as dt
import math

from loratool.cli.render import natural_key

ORDER = (
    # the run
    "ss_output_name", "ss_training_comment", "ss_training_started_at", "ss_training_finished_at",
    # the model it was trained on
    "ss_base_model_version", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_vae_name",
    "ss_v2", "ss_v_parameterization", "ss_clip_skip",
    # the network
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_dropout", "ss_network_args",
    # how long
    "ss_num_epochs", "ss_epoch", "ss_steps", "ss_max_train_steps", "ss_num_batches_per_epoch",
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_gradient_accumulation_steps",
    # the optimizer
    "ss_optimizer", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_lr_scheduler",
    "ss_lr_warmup_steps", "ss_max_grad_norm", "ss_seed",
    # precision and memory
    "ss_mixed_precision", "ss_full_fp16", "ss_fp8_base", "ss_fp8_base_unet", "ss_gradient_checkpointing",
    "ss_cache_latents", "ss_lowram",
    # the data
    "ss_num_train_images", "ss_num_reg_images", "ss_num_validation_images", "ss_resolution", "ss_enable_bucket",
    "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_bucket_no_upscale", "ss_keep_tokens", "ss_shuffle_caption",
    "ss_caption_dropout_rate", "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate",
    "ss_color_aug", "ss_flip_aug", "ss_random_crop", "ss_face_crop_aug_range", "ss_max_token_length",
    "ss_prior_loss_weight",
    # noise and loss
    "ss_noise_offset", "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_adaptive_noise_scale",
    "ss_min_snr_gamma", "ss_zero_terminal_snr", "ss_debiased_estimation", "ss_loss_type", "ss_huber_schedule",
    "ss_huber_c", "ss_huber_scale", "ss_ip_noise_gamma", "ss_scale_weight_norms",
)
_RANK = {k: i for i, k in enumerate(ORDER)}
# Unix timestamps (seconds) sd-scripts stores as text.
TIMESTAMP_KEYS = frozenset({"ss_training_started_at", "ss_training_finished_at"})
# Values that mean "not set": sd-scripts writes str(None) for every option left at its default.
_UNSET = frozenset({"", "None", "none", "null"})
# (key, value) pairs every writer adds and no reader needs to see.
NOISE = frozenset({("format", "pt"), ("format", "np"), ("format", "tf"), ("format", "flax"), ("format", "mlx")})


def as_date(value: str) -> str:
    """A Unix timestamp (``1716543210.12``) as ``2024-05-24 09:33:30 UTC``; other text unchanged."""
    try:
        seconds = float(value)
    except ValueError:
        return value
    if not math.isfinite(seconds) or not 0 < seconds < 2**33:
        return value
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def training_rows(training: dict[str, str]) -> list[tuple[str, str]]:
    """The training table: known keys in :data:`ORDER`, then the rest; dates readable; unset dropped."""
    rows = []
    for key in sorted(training, key=lambda k: (_RANK.get(k, len(_RANK)), natural_key(k))):
        value = training[key]
        if value.strip() in _UNSET:
            continue
        if key in TIMESTAMP_KEYS:
            value = as_date(value)
        rows.append((key, value))
    start, end = training.get("ss_training_started_at"), training.get("ss_training_finished_at")
    try:
        took = float(end) - float(start)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        took = -1.0
    if 0 < took < 10**7:
        rows = [(k, f"{v} (after {_duration(took)})" if k == "ss_training_finished_at" else v) for k, v in rows]
    return rows


def other_rows(metadata: dict[str, str]) -> list[tuple[str, str]]:
    """Metadata no other table shows, without the noise rows."""
    return [(k, v) for k, v in sorted(metadata.items(), key=lambda kv: natural_key(kv[0]))
            if (k, v) not in NOISE and v.strip() not in _UNSET]
