"""The canonical adapter schema every layout reads into and writes out of.

An :class:`Adapter` is a set of :class:`LoraModule` objects keyed by ``(component, path)``:
``component`` is the model part the module belongs to (``unet``, ``text_encoder``,
``text_encoder_2``, ``text_encoder_3``, ``transformer`` or ``model`` for a plain
transformers/torch model) and ``path`` is the dotted module path *inside* that component in
the naming of the HF / diffusers implementation (``down_blocks.0.attentions.0.proj_in``,
``text_model.encoder.layers.0.self_attn.q_proj``, ``model.layers.0.mlp.up_proj``).

Tensors keep the dtype they were stored in; maths upcasts (see :mod:`loratool.delta`).

Module kinds and the tensors each one holds (``LoraModule.tensors``):

=========  =====================================================================
kind       tensors
=========  =====================================================================
``lora``   ``down`` [r, in] or [r, in, kh, kw]; ``up`` [out, r] or [out, r, 1, 1];
           optional ``mid`` [r, r, kh, kw] (LoCon Tucker core, then ``down`` is
           [r, in, 1, 1]); optional ``bias`` [out] (PEFT ``lora_bias``).
``loha``   ``w1a`` [out, r], ``w1b`` [r, in·k·k], ``w2a``, ``w2b`` likewise;
           optional ``t1``, ``t2`` [r, r, kh, kw] Tucker cores (then ``w1b`` is [r, in]).
``lokr``   ``w1`` or (``w1a``, ``w1b``); ``w2`` or (``w2a``, ``w2b``); optional ``t2``.
``full``   ``diff`` (shaped like the weight), optional ``diff_b`` (bias delta).
``oft``    LyCORIS DiagOFT: ``blocks`` [n, b, b] (skew-symmetric generator; ``alpha`` is
           the constraint, not a scale) or ``rotation`` [n, b, b] (old ``oft_diag``: R
           stored); optional ``rescale`` [out, 1(, 1, 1)].
``boft``   LyCORIS butterfly OFT: ``blocks`` [m, n, b, b]; optional ``rescale``.
``glora``  ``a1`` [in, r], ``a2`` [r, in], ``b1`` [out, r(, 1, 1)], ``b2`` [r, in(, kh, kw)].
``norm``   ``w_norm`` [dim], optional ``b_norm`` [dim] (LyCORIS norm-layer deltas).
``set``    ``value``: the weight replaces the base's (BFL control LoRAs' qk-norm scales).
=========  =====================================================================

``oft``, ``boft`` and ``glora`` change W by a function of W itself, so their ΔW exists only
against a base weight (:mod:`loratool.delta`).

``magnitude`` is the DoRA magnitude vector when the module is a DoRA module.

``layer`` is what the module adapts: ``linear``, ``conv``, ``embedding`` or ``norm`` (a 1-D
normalisation weight). For ``embedding``
(PEFT ``lora_embedding_A`` / ``_B``, loralib ``Embedding``) ``down`` is [r, num_embeddings]
and ``up`` is [dim, r]; ΔW = (up @ down)ᵀ. ``fan_in_fan_out`` marks a base weight stored as
[in, out] (GPT-2 ``Conv1D``): ΔW is transposed to match it.

Scale: for ``lora`` modules ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``);
``alpha`` None means alpha = r (scale 1), and alpha 0 means scale 0 (PEFT's ``lora_alpha=0``).
Layout conventions are the readers' business (kohya's "alpha 0 means alpha = r" is resolved by
the kohya reader). Readers resolve ``rank_pattern`` / ``alpha_pattern`` so every module carries
its own alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

KINDS = ("lora", "loha", "lokr", "full", "oft", "boft", "glora", "norm", "set")
LAYERS = ("linear", "conv", "embedding", "norm")


@dataclass(eq=False, repr=False)
class LoraModule:
    """One adapted weight: the factors of ΔW, its alpha, and where it goes.

    ``component`` / ``path`` name the base weight (``unet`` / ``down_blocks.0.attentions.0.proj_in``,
    HF / diffusers naming); ``tensors`` hold the factors of ``kind`` in their stored dtype (table in
    the module docstring). ``alpha`` is dimensionless; ``scale`` = alpha / rank (alpha / √rank with
    ``rslora``; 1 when alpha is None). For a ``lora`` linear module ΔW = scale · up @ down, shape
    [out, in], in the units of the base weight it is added to (W' = W + λ·ΔW for a strength λ);
    :func:`loratool.delta.delta_weight` computes ΔW for every kind and layer.
    """

    component: str
    path: str
    kind: str = "lora"
    layer: str = "linear"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None
    rslora: bool = False
    magnitude: torch.Tensor | None = None
    fan_in_fan_out: bool = False
    # Layout-specific hints that let a writer reproduce its own file bit for bit
    # (e.g. loralib's ``enable_lora`` groups). Never needed for the maths.
    hints: dict[str, Any] = field(default_factory=dict)
    # The rank a config declares where the tensors show none (PEFT LoKr with both Kronecker
    # factors whole still scales by alpha / r); None: the rank is read from the tensors.
    declared_rank: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.component, self.path)

    def __repr__(self) -> str:
        try:
            shape = "×".join(map(str, self.weight_shape))
        except Exception:  # a half-built module (a reader's intermediate) still prints
            shape = "?"
        dtype = str(self.dtype).removeprefix("torch.") if self.tensors else "no tensors"
        alpha = "None" if self.alpha is None else f"{self.alpha:g}"
        flags = "".join((", DoRA" if self.magnitude is not None else "", ", rsLoRA" if self.rslora else "",
                         ", fan_in_fan_out" if self.fan_in_fan_out else ""))
        from loratool.delta_rank import delta_rank

        rank = f"rank {delta_rank(self)} (kron)" if self.kind == "lokr" else f"rank {self.rank}"
        return (f"LoraModule({self.component}:{self.path}, {self.kind} {self.layer}, {rank}, "
                f"alpha {alpha}, scale {self.scale:.4g}, {shape} {dtype}{flags})")

    @property
    def rank(self) -> int:
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["w1b"].shape[0])
        if self.kind == "lokr":
            if "w2b" in t:
                return int(t["w2b"].shape[0])
            if "w1b" in t:
                return int(t["w1b"].shape[0])
            # both factors stored whole: no rank (scale 1) unless a config declares one
            return self.declared_rank or 0
        if self.kind == "glora":
            return int(t["a2"].shape[0])
        return 0  # full, oft, boft, norm, set

    @property
    def scale(self) -> float:
        """The multiplier applied to the product of the factors."""
        r = self.rank
        if self.kind == "full" or r == 0:
            return 1.0
        if self.kind == "lokr" and "w1" in self.tensors and "w2" in self.tensors and self.declared_rank is None:
            return 1.0
        alpha = float(r) if self.alpha is None else float(self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    @property
    def effective_alpha(self) -> float:
        """alpha as kohya means it: scale · r (so alpha/r reproduces the scale)."""
        return self.scale * self.rank if self.rank else 1.0

    @property
    def out_features(self) -> int:
        return int(self.weight_shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module adapts (as the base stores it)."""
        from loratool.shapes import weight_shape

        return weight_shape(self)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    def all_tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.tensors)
        if self.magnitude is not None:
            out["magnitude"] = self.magnitude
        return out


@dataclass(eq=False, repr=False)
class Adapter:
    """A LoRA adapter in canonical form: :class:`LoraModule` objects keyed by ``(component, path)``.

    ``adapter[component, path]`` is one module, ``len(adapter)`` the module count, iterating
    yields the modules. ``metadata`` is the file's string metadata (kohya ``ss_*``,
    ``modelspec.*``), ``extras`` the whole tensors that are no factors (PEFT ``modules_to_save``).
    Every module carries its own alpha, so ΔW = scale · up @ down holds module by module with
    scale = alpha / rank; merging with strength λ adds λ·ΔW to the base weight.
    """

    modules: dict[tuple[str, str], LoraModule] = field(default_factory=dict)
    # Header metadata (kohya ``ss_*`` / ``modelspec.*``; string values only).
    metadata: dict[str, str] = field(default_factory=dict)
    # The layout it was read from (``kohya``, ``diffusers``, ``peft``, ``loralib``, ``lycoris``).
    source_format: str | None = None
    # The model family it targets (an ``arch`` family name: ``sd1``, ``sdxl``, ``flux``, ``llm``...),
    # as the reader decided it from keys, shapes and metadata; None when unknown.
    family: str | None = None
    # The trainer dialect of the layout (``ai-toolkit``, ``onetrainer``, ``xlabs``...); None when
    # the file is the layout's plain form.
    dialect: str | None = None
    # Per-component layout configuration worth keeping (PEFT ``adapter_config.json`` minus the
    # fields the modules now carry: ``target_modules``, ``task_type``, ``base_model_name_or_path``...).
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Whole tensors that are not LoRA factors but belong to the adapter (PEFT
    # ``modules_to_save``, trained embeddings): {(component, tensor name): tensor}.
    extras: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    def add(self, module: LoraModule) -> None:
        if module.key in self.modules:
            from loratool.errors import FormatError

            raise FormatError(f"module {module.component}:{module.path} appears twice")
        self.modules[module.key] = module

    @property
    def components(self) -> list[str]:
        seen: dict[str, None] = {}
        for comp, _ in self.modules:
            seen[comp] = None
        for comp, _ in self.extras:
            seen[comp] = None
        return list(seen)

    def by_component(self, component: str) -> list[LoraModule]:
        return [m for (c, _), m in self.modules.items() if c == component]

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self):
        return iter(self.modules.values())

    def __getitem__(self, key: tuple[str, str]) -> LoraModule:
        """``adapter["unet", "down_blocks.0.attentions.0.proj_in"]``: the module at (component, path)."""
        try:
            return self.modules[tuple(key)]
        except (KeyError, TypeError):
            raise KeyError(f"no module {key!r}; keys are (component, path) pairs such as "
                           f"{next(iter(self.modules), ('unet', 'down_blocks.0.attentions.0.proj_in'))!r}") from None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and key in self.modules

    def __repr__(self) -> str:
        comps = ", ".join(f"{c} {len(self.by_component(c))}" for c in self.components if self.by_component(c))
        kinds = "/".join(dict.fromkeys(m.kind for m in self)) or "no kinds"
        from loratool.delta_rank import delta_rank

        ranks = sorted({delta_rank(m) for m in self})
        span = "-" if not ranks else str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
        extras = f", {len(self.extras)} extra tensors" if self.extras else ""
        where = ", ".join(x for x in (self.source_format, self.dialect, self.family) if x) or "unknown layout"
        return f"Adapter({where}; {len(self)} modules ({comps or 'none'}); {kinds}; rank {span}{extras})"
