"""Which model family an adapter is for, from its module names, shapes and metadata together.

Never from tensor values: an :class:`Evidence` holds what a header-only read knows. Each family
scores it (``Family.evidence``, next to its naming tables) on one scale, highest wins:

========  ==================================================================================
score     meaning
========  ==================================================================================
``100``   declared: ``ss_base_model_version`` / ``modelspec.architecture`` / PEFT
          ``base_model_name_or_path`` / ``auto_mapping`` / ``task_type`` name the family
``90``    module names (or shapes) only this family has (Flux ``single_transformer_blocks``,
          SD3 ``pos_embed.proj`` / pre-only context modulation, a U-Net beside ``text_encoder_2``)
``80``    a U-Net block layout only this family has (SDXL: attention in ``up_blocks.0``; SD 1.x/2.x,
          which share it: attention in ``down_blocks.0``)
``70``    the widths of a published model of the family (Flux.1 3072, SD3 1536 / 2432, ...)
``40``    a structure few families share (an SD-style U-Net, MMDiT-style transformer blocks)
``20``    only the components fit
========  ==================================================================================

Family modules may keep a kohya-key ``detect(keys, metadata)`` as well; its score (same scale) counts
for files with kohya keys. A tie at the top between families that are not related
(``Family.merges_into``) is no answer: the family is unknown then, never guessed.

:func:`conflict` answers "is ``--family X`` plausible for this adapter": it refuses X when names or
widths (declarations left out: the user may know better than a stale header) point at another
family with a score of at least :data:`STRONG`.

:func:`identify` names the base an adapter needs from the same evidence: the family (:func:`best`), its
variant (``Family.variant``: e.g. FLUX.1-dev from its guidance-embedder modules) and the widths the adapted
weights fix (``Family.widths``: a table of :class:`Width` rows, read from the modules' shapes). A family's
:class:`Mismatch` rows (``Family.mismatches``) explain modules a base of the family may lack — another
variant's (FLUX.1-dev guidance on schnell, Flux.1 modulation on Chroma, a tied ``lm_head``): ``check`` and
``merge`` group unmatched modules by them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratool.adapter import Adapter
    from loratool.arch import Family

DECLARED, UNIQUE, LAYOUT, WIDTHS, STRUCTURE, WEAK = 100, 90, 80, 70, 40, 20
STRONG = WIDTHS  # what it takes to overrule a --family the user gave
# PEFT ``auto_mapping.base_model_class`` of transformers language models (heads over a decoder / seq2seq LM).
LM_CLASSES = re.compile(r"(ForCausalLM|LMHeadModel|ForSeq2SeqLM|ForConditionalGeneration|ForSequenceClassification|"
                        r"ForTokenClassification|ForQuestionAnswering)$")
LM_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


@dataclass(frozen=True)
class Evidence:
    """What an adapter file says about its model, without tensor values."""

    # canonical (component, module path) -> shape of the weight the module adapts (None: unknown)
    modules: Mapping[tuple[str, str], tuple[int, ...] | None]
    metadata: Mapping[str, str] = field(default_factory=dict)
    configs: Sequence[Mapping[str, Any]] = ()  # PEFT adapter_config.json, diffusers lora_adapter_metadata, ...
    kohya_keys: Sequence[str] = ()  # the file's keys when they are kohya-named (for ``Family.detect``)

    @classmethod
    def of(cls, adapter: Adapter, kohya_keys: Sequence[str] = ()) -> Evidence:
        modules: dict[tuple[str, str], tuple[int, ...] | None] = {}
        for m in adapter:
            try:
                modules[m.key] = tuple(int(x) for x in m.weight_shape)
            except (ArithmeticError, LookupError, RuntimeError, ValueError, TypeError):
                modules[m.key] = None  # malformed factors: the reader or the maths reports them
        comps = {c for c, _ in adapter.extras}
        # components holding only whole tensors (modules_to_save) still count as components
        modules.update({(c, ""): None for c in comps if not any(k[0] == c for k in modules)})
        return cls(modules, dict(adapter.metadata), tuple(adapter.config.values()), tuple(kohya_keys))

    @cached_property
    def components(self) -> frozenset[str]:
        return frozenset(c for c, _ in self.modules)

    @cached_property
    def _paths(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for c, p in self.modules:
            if p:
                out.setdefault(c, []).append(p)
        return out

    def paths(self, component: str) -> list[str]:
        return self._paths.get(component, [])

    def any_path(self, component: str, pattern: re.Pattern[str]) -> bool:
        return any(pattern.search(p) for p in self.paths(component))

    def in_features(self, component: str, pattern: re.Pattern[str]) -> set[int]:
        """Input widths of the modules of ``component`` whose path matches ``pattern``."""
        return {s[1] for p in self.paths(component) if pattern.search(p)
                for s in [self.modules[(component, p)]] if s is not None and len(s) >= 2}

    def only(self, component: str, templates: frozenset[str]) -> bool:
        """Every module path of ``component`` is one of ``templates`` (paths with block indices as ``#``):
        names a family shares with others count for it only when no module is foreign to it."""
        from loratool.formats.kohya_names import template

        return all(template(p) in templates for p in self.paths(component))

    def shapes(self, component: str, pattern: re.Pattern[str]) -> list[tuple[int, ...]]:
        return [s for p in self.paths(component) if pattern.search(p)
                for s in [self.modules[(component, p)]] if s is not None]

    @cached_property
    def declared(self) -> str:
        """Lower-case text of everything that names a base model (metadata and configs)."""
        parts = [str(self.metadata.get(k, "")) for k in ("ss_base_model_version", "modelspec.architecture",
                                                           "ss_sd_model_name")]
        for cfg in self.configs:
            parts.append(str(cfg.get("base_model_name_or_path") or ""))
            mapping = cfg.get("auto_mapping")
            if isinstance(mapping, Mapping):
                parts += [str(v) for v in mapping.values()]
        return " | ".join(p for p in parts if p).lower()

    def declares(self, pattern: re.Pattern[str]) -> bool:
        return bool(pattern.search(self.declared))

    @cached_property
    def lm_declared(self) -> bool:
        """A PEFT config says the base is a transformers language model (auto_mapping / task_type)."""
        for cfg in self.configs:
            mapping = cfg.get("auto_mapping")
            cls = str(mapping.get("base_model_class", "")) if isinstance(mapping, Mapping) else ""
            if LM_CLASSES.search(cls) or str(cfg.get("task_type") or "").upper() in LM_TASKS:
                return True
        return False

    def undeclared(self) -> Evidence:
        """The same names and shapes with no metadata and no configs."""
        return replace(self, metadata={}, configs=())


@dataclass(frozen=True)
class Width:
    """A width the adapted weights fix: dim ``dim`` (0 out, 1 in) of the modules of ``component`` whose path
    matches ``pattern``; ``what`` says what it is (``cross-attention (text) width``)."""

    name: str
    component: str
    pattern: str
    dim: int
    what: str


@dataclass(frozen=True)
class Mismatch:
    """Canonical modules matching ``pattern`` that a base of the family may lack: ``group`` names them,
    ``reason`` says which variants have them (DiT families list theirs in ``arch.dit.DitFamily.mismatches``)."""

    pattern: str
    group: str
    reason: str


@dataclass(frozen=True)
class Identity:
    """The base an adapter needs: family (None: unknown), variant, widths {name: sorted values}, and why."""

    family: str | None
    variant: str | None = None
    widths: dict[str, list[int]] = field(default_factory=dict)
    why: str = ""
    score: int = 0


def measured_widths(ev: Evidence, table: Sequence[Width]) -> dict[str, list[int]]:
    """{width name: the sorted distinct values} of every :class:`Width` row the adapter's shapes show."""
    out: dict[str, list[int]] = {}
    for w in table:
        pattern = re.compile(w.pattern)
        values = {s[w.dim] for s in ev.shapes(w.component, pattern) if len(s) > w.dim}
        if values:
            out[w.name] = sorted(values)
    return out


def identify(ev: Evidence, families: Mapping[str, Family], family: str | None = None) -> Identity:
    """Family, variant and widths of the base ``ev``'s adapter was trained for: the family as :func:`best`
    decides it, or ``family`` when the reader / ``--family`` decided it already."""
    top = best(ev, families)
    name = family or (top.family if top is not None else None)
    if name is None:
        return Identity(None)
    why, score = (top.why, top.score) if top is not None and top.family == name else ("as read", 0)
    fam = families.get(name)
    variant = fam.variant(ev) if fam is not None and fam.variant is not None else None
    widths = measured_widths(ev, fam.widths) if fam is not None else {}
    return Identity(name, variant, widths, why, score)


@dataclass(frozen=True)
class Verdict:
    family: str
    score: int
    why: str


def verdicts(ev: Evidence, families: Mapping[str, Family]) -> list[Verdict]:
    """Every family's best score on ``ev``, highest first (ties in registry order)."""
    out = []
    for name, fam in families.items():
        best = Verdict(name, 0, "")
        legacy = fam.detect(list(ev.kohya_keys), dict(ev.metadata))
        if legacy > 0:
            best = Verdict(name, legacy, "kohya key names" if ev.kohya_keys else "metadata")
        if fam.evidence is not None:
            score, why = fam.evidence(ev)
            if score > best.score:
                best = Verdict(name, score, why)
        out.append(best)
    return sorted(out, key=lambda v: -v.score)


def related(a: str, b: str, families: Mapping[str, Family]) -> bool:
    """Whether LoRAs of family ``a`` may go into models of family ``b`` (or the reverse) by their names:
    the same family, or one lists the other in ``merges_into`` (SD1 / SD2, a family and its text encoders)."""
    if a == b:
        return True
    fa, fb = families.get(a), families.get(b)
    return (fa is not None and b in fa.merges_into) or (fb is not None and a in fb.merges_into)


def best(ev: Evidence, families: Mapping[str, Family]) -> Verdict | None:
    """The family ``ev`` points at; None when nothing scores or unrelated families tie at the top."""
    ranked = verdicts(ev, families)
    if not ranked or ranked[0].score <= 0:
        return None
    top = ranked[0]
    if any(v.score == top.score and not related(v.family, top.family, families) for v in ranked[1:]):
        return None
    return top


def conflict(name: str, ev: Evidence, families: Mapping[str, Family]) -> str | None:
    """Why ``--family name`` does not fit ``ev`` (its names or widths are another family's), or None."""
    ranked = verdicts(ev.undeclared(), families)
    own = next((v.score for v in ranked if v.family == name), 0)
    for v in ranked:
        if v.score < STRONG:
            break
        if v.score > own and not related(v.family, name, families):
            return f"--family {name}: the adapter's module names and shapes are those of {v.family} ({v.why})"
    return None
