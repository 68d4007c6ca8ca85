"""Hugging Face transformers language models (LLaMA, Mistral, Qwen2, Gemma, Phi, GPT-2, T5).

There is no agreed kohya prefix for LLM adapters. sd-scripts names LLM text encoders of
image models ``lora_te`` (Lumina's Gemma2, Anima's Qwen3:
``lora_te_model_layers_0_self_attn_q_proj``, or ``lora_te_layers_0_...`` on a bare ``*Model``);
``lora_model`` and ``lora_llm`` are accepted too, all mapping to the ``model`` component, and
with a base vocabulary any prefix works (see :mod:`loratool.formats.kohya_names`).

Paths come from ``llm.json`` (generated from tiny configs of each architecture by
``arch/generate.py``; name templates generalise the layer indices): those of the
``*ForCausalLM`` models plus the same without the leading ``model.`` (bare ``*Model``). Native
names are the HF names; the one thing names alone do not carry is GPT-2's ``Conv1D`` (weights
stored [in, out]), so :func:`to_canonical` marks those modules ``fan_in_fan_out`` (the factors
are the usual down [r, in] / up [out, r]).

:func:`paths` also serves other families: SD3 / Flux T5 text encoders use ``t5_encoder``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import cache

from loratool.adapter import LoraModule
from loratool.arch import Family, identity, load_table
from loratool.arch.evidence import DECLARED, UNIQUE, Evidence, Mismatch, Width

# No bare "lora": "lora_model_layers_0" would read both as lora + model.layers.0 and lora_model + layers.0.
PREFIXES = {"lora_te": "model", "lora_model": "model", "lora_llm": "model"}
ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "t5")
# GPT-2 modules that are transformers ``Conv1D`` (weight [in, out]).
CONV1D = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$")
_LLM_BODY = re.compile(r"_(layers_\d+_(self_attn|mlp)|h_\d+_(attn|mlp)|block_\d+_layer_\d+)_")


def paths(architecture: str) -> set[str]:
    """Dotted weight-module paths of one architecture (``llama``, ``t5_encoder``, ...)."""
    return set(load_table("llm")[architecture])


def native_paths(component: str) -> set[str]:
    if component != "model":
        return set()
    out: set[str] = set()
    for name in ARCHITECTURES:
        out |= paths(name)
    return out | {p[len("model."):] for p in out if p.startswith("model.")}


def to_canonical(modules: list[LoraModule]) -> list[LoraModule]:
    return [replace(m, fan_in_fan_out=True) if m.kind == "lora" and CONV1D.match(m.path) else m for m in modules]


def detect(keys: list[str], metadata: dict[str, str]) -> int:
    if any(k.startswith(("lora_unet_", "lora_te_text_model_", "lora_te1_", "lora_te2_", "lora_te3_")) for k in keys):
        return 0
    return 30 if any(_LLM_BODY.search(k) for k in keys) else 0


# Hub names of language-model series (PEFT ``base_model_name_or_path``); weaker than auto_mapping.
LM_NAMES = re.compile(r"llama|mistral|mixtral|qwen|gemma|phi-?\d|gpt|falcon|\bopt-|bloom|\bt5\b|flan|deepseek|"
                      r"smollm|olmo|granite")


@cache
def _templates() -> frozenset[str]:
    """Name templates (digits → #) of every known LLM module path, also without its first segment
    (a bare ``GPT2Model`` / ``LlamaModel``: ``h.#.attn.c_attn``, ``layers.#.mlp.up_proj``)."""
    from loratool.formats.kohya_names import template

    out = {template(p) for p in native_paths("model")}
    return frozenset(out | {t.split(".", 1)[1] for t in out if "." in t})


def evidence(ev: Evidence) -> tuple[int, str]:
    """A plain ``model`` adapter whose PEFT config names a transformers LM (auto_mapping / task_type), or
    whose module names are mostly HF language-model names, or whose base is named like an LLM series."""
    if ev.components != {"model"}:
        return 0, ""
    if ev.lm_declared:
        return DECLARED, "its PEFT config names a transformers language model"
    from loratool.formats.kohya_names import template

    paths = ev.paths("model")
    known = sum(template(p) in _templates() for p in paths)
    if paths and 2 * known >= len(paths):
        return UNIQUE, "HF language-model module names"
    if ev.declares(LM_NAMES):
        return UNIQUE - 30, "base_model_name_or_path names a language model"
    return 0, ""


# Widths an HF language-model LoRA fixes: hidden size, query and key/value widths (n_kv_heads · head_dim: grouped-
# query attention when smaller than the query's), MLP width, vocabulary.
LLM_WIDTHS = (
    Width("hidden", "model", r"(^|\.)(q_proj|query)$", 1, "hidden size"),
    Width("q", "model", r"(^|\.)(q_proj|query)$", 0, "query width (heads · head_dim)"),
    Width("kv", "model", r"(^|\.)(k_proj|v_proj|key|value)$", 0, "key/value width (kv heads · head_dim)"),
    Width("intermediate", "model", r"(^|\.)(up_proj|gate_proj|fc1|c_fc)$", 0, "MLP width"),
    Width("vocab", "model", r"(^|\.)(embed_tokens|wte|lm_head)$", 0, "vocabulary"),
)
# transformers ``architectures`` by the llm.json table they come from (for the variant line)
_ARCH_TITLES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma", "phi": "Phi",
                "gpt2": "GPT-2", "t5": "T5"}


def variant(ev: Evidence) -> str | None:
    """The base class a PEFT config names (``auto_mapping``), else the architectures whose module names cover
    every path (``Llama / Mistral / Qwen2`` share theirs)."""
    for cfg in ev.configs:
        mapping = cfg.get("auto_mapping")
        if isinstance(mapping, dict) and mapping.get("base_model_class"):
            return str(mapping["base_model_class"])
    from loratool.formats.kohya_names import template

    tmpl = {template(p) for p in ev.paths("model")}
    if not tmpl:
        return None
    fits = []
    for name, title in _ARCH_TITLES.items():
        known = {template(p) for p in paths(name)}
        known |= {t.split(".", 1)[1] for t in known if "." in t}
        if tmpl <= known:
            fits.append(title)
    return " / ".join(fits) or None


# Stored tensors with one row per token (transformers' input / output embeddings): a PEFT adapter trained after
# ``resize_token_embeddings`` saves them whole with more rows, and the merged model's config then says so.
VOCAB_TENSORS = r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|embed_out|lm_head|shared)\.weight$"
VOCAB_FIELD = "vocab_size"

# A LoRA on lm_head meets bases whose head is the input embedding (tie_word_embeddings: no lm_head.weight stored).
MISMATCHES = (
    Mismatch(r"(^|\.)lm_head$", "output head (lm_head)", "the base stores no lm_head weight: it ties the head to "
             "the input embeddings (tie_word_embeddings) or has no head (a bare *Model)"),
)

FAMILY = Family(name="llm", kohya_prefixes=dict(PREFIXES), native_paths=native_paths, to_canonical=to_canonical,
                from_canonical=identity, detect=detect, evidence=evidence, merges_into=("t5",), variant=variant,
                widths=LLM_WIDTHS, mismatches=MISMATCHES)
