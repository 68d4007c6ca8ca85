"""``loratool check LORA BASE``: which modules a merge would place, and why each other one would be skipped.

Nothing is written and nothing is merged: the adapter is read and matched to the base's headers by the
same :func:`loratool.ops.matching.match` a merge runs (``refuse=False``: shape errors and zero matches are
recorded instead of raised), after the same family check (:mod:`loratool.ops.family_check`). Every module
gets one cause, the first of :data:`CAUSES` (in order) that explains it:

============  =======================================================================================
cause         when
============  =======================================================================================
matched       it has a place whose shape fits ΔW: the merge adds it
family        the LoRA's family and the base's are both known and unrelated (an SD 1.x LoRA on SDXL):
              the merge refuses every module (``--ignore-family`` merges what fits anyway)
shape         a weight of its name exists but its shape is not ΔW's (both shapes, and the likely cause
              from :data:`SHAPE_RULES`: grouped-query key/value widths, cross-attention width, ...);
              the merge refuses then
component     the base holds no weights of its component (a text-encoder module on a U-Net file)
dialect       another naming of the same module is in the base (a family's native ↔ diffusers names:
              BFL / SGM names in a diffusers-named folder)
variant       the base's family says another variant lacks it (``Family.mismatches``: FLUX.1-dev guidance
              on schnell, Flux.1 modulation on Chroma, ``lm_head`` on a tied head; Wan 2.1 I2V image
              cross-attention on Wan 2.2 when that family lists it)
fused         the base fuses what the LoRA holds split, or the reverse (:data:`FUSED`: ``qkv_proj`` ↔
              ``q_proj`` / ``k_proj`` / ``v_proj``, ...)
prefix        the base has the same name behind another leading prefix that the matcher's prefix rule
              did not apply (it needs two modules and half of a component placed by one rule)
missing       none of the above: the base has no such weight
============  =======================================================================================

Modules with the same cause and the same group (the variant's module group, the shape rule and widths, the
prefix pair, ...) are reported as one line with a fix. The numbers are the merge's: ``matched_total`` is
what ``merge`` merges (0 when it refuses), and ``merge`` prints these same groups for what it skips.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from loratool.adapter import Adapter, LoraModule
from loratool.ops.matching import BaseIndex, MatchPlan, Rejected, _keys_by_suffix, match


@dataclass(frozen=True)
class Cause:
    name: str
    title: str  # what the line says
    fix: str  # what to do, formatted with the group's fields ({family}, {base_family}, {component}, ...)


CAUSES = {c.name: c for c in (
    Cause("matched", "would merge", ""),
    Cause("family", "wrong family", "use a {family} base (merge --ignore-family would merge them into the "
          "{base_family} weights of the same names anyway)"),
    Cause("shape", "shape mismatch", "use the base the LoRA was trained for (it needs {needs}); merge refuses "
          "a LoRA while any module does not fit"),
    Cause("component", "component not in the base",
          "merge into a base that holds {component} (the pipeline folder or a single-file checkpoint), or leave them: "
          "merge skips them"),
    Cause("dialect", "layout dialect", "the base names the module in another naming: point merge at a base in "
          "{naming} naming (a single-file checkpoint maps both), or convert the base"),
    Cause("variant", "wrong variant", "use a base of the variant the LoRA was trained for, or leave them: merge "
          "skips them"),
    Cause("fused", "fused ↔ split", "the base and the LoRA group these projections differently: use the base "
          "the LoRA was trained for (or split / fuse the LoRA to the base's layout)"),
    Cause("prefix", "wrong prefix", "{rename} (the matcher applies a prefix rule on its own only when it places "
          "at least two modules and half of a component)"),
    Cause("missing", "no such weight", "the base lacks these weights: use the model the LoRA was trained for"),
)}

# Fused projection -> the split ones it holds, in row order: transformers' Phi-3 (``qkv_proj``, ``gate_up_proj``),
# Falcon / GPT-NeoX / BLOOM (``query_key_value``), Baichuan (``W_pack``); diffusers' ``Attention.fuse_projections``
# (``to_qkv``, ``to_added_qkv``).
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "query_key_value": ("query", "key", "value"),
    "W_pack": ("q_proj", "k_proj", "v_proj"),
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


@dataclass(frozen=True)
class ShapeRule:
    """A likely cause of a shape mismatch: ``applies(path, lora shape, base shape)``; ``why`` and ``group`` are
    formatted with ``got`` / ``want`` (the two shapes) and their dims (``got0``, ``want1``, ...)."""

    name: str
    applies: Callable[[str, tuple[int, ...], tuple[int, ...]], bool]
    group: str
    why: str


_KV = re.compile(r"(^|\.)(k_proj|v_proj|key|value|to_k|to_v|add_k_proj|add_v_proj)$")
_CROSS = re.compile(r"\.attn2\.(to_k|to_v)$")
_VOCAB = re.compile(r"(^|\.)(embed_tokens|wte|lm_head|token_embedding|shared)$")


def _dims(a: tuple[int, ...], b: tuple[int, ...], n: int) -> bool:
    return len(a) >= n and len(b) >= n


SHAPE_RULES = (
    ShapeRule("transposed", lambda p, a, b: len(a) == 2 and tuple(a) == tuple(b)[::-1],
              "stored transposed", "the base stores this weight [in, out] (a Conv1D / fan_in_fan_out layout) where "
              "the LoRA expects [out, in], or the reverse"),
    ShapeRule("cross_attention", lambda p, a, b: bool(_CROSS.search(p)) and _dims(a, b, 2) and a[1] != b[1],
              "cross-attention width {got1} vs {want1}", "text conditioning of another model (768 CLIP-L: SD 1.x; "
              "1024 OpenCLIP-H: SD 2.x; 2048: SDXL)"),
    ShapeRule("kv_heads", lambda p, a, b: bool(_KV.search(p)) and not _CROSS.search(p) and _dims(a, b, 2)
              and a[1] == b[1] and a[0] != b[0],
              "key/value width {got0} vs {want0}", "another number of key/value heads: grouped-query attention "
              "of another model size"),
    ShapeRule("vocab", lambda p, a, b: bool(_VOCAB.search(p)) and _dims(a, b, 2) and a[0] != b[0] and a[1:] == b[1:],
              "vocabulary {got0} vs {want0}", "another tokenizer (or added tokens)"),
    ShapeRule("kernel", lambda p, a, b: len(a) == len(b) == 4 and a[:2] == b[:2],
              "conv kernel {got2}×{got3} vs {want2}×{want3}", "a convolution of another kernel size"),
    ShapeRule("in_width", lambda p, a, b: _dims(a, b, 2) and a[1] != b[1],
              "input width {got1} vs {want1}", "another model size"),
    ShapeRule("out_width", lambda p, a, b: _dims(a, b, 1) and a[0] != b[0],
              "output width {got0} vs {want0}", "another model size"),
    ShapeRule("other", lambda p, a, b: True, "{got} vs {want}", "another model"),
)


@dataclass
class Group:
    """Modules sharing a cause and a group: one line of the report."""

    cause: str
    group: str  # what they have in common (the variant's module group, "key/value width 32 vs 16", ...)
    reason: str  # why they do not merge (one example's details included)
    fix: str
    labels: list[str] = field(default_factory=list)  # component:path of each module

    @property
    def title(self) -> str:
        return CAUSES[self.cause].title

    def to_json(self) -> dict[str, Any]:
        return {"cause": self.cause, "title": self.title, "group": self.group, "reason": self.reason,
                "fix": self.fix, "module_count": len(self.labels), "examples": self.labels[:3],
                "labels": list(self.labels)}


@dataclass
class CheckReport:
    lora: str
    base: str
    format: str | None  # the LoRA's layout
    family: str | None  # the LoRA's family (its identity: see ``identity``)
    identity: dict[str, Any]  # {family, variant, widths, why} of the base the LoRA needs
    base_family: str | None
    base_architecture: str | None
    module_count: int  # modules and whole tensors of the LoRA
    matched: dict[str, int]  # component -> modules the merge would merge (empty when it refuses)
    placed: int  # modules that found a weight of their name and shape (what --ignore-family would merge)
    groups: list[Group]  # every module not merged, one group per (cause, group)
    refused: str | None = None  # why ``merge`` would refuse the whole LoRA (it then merges nothing)
    warnings: list[str] = field(default_factory=list)

    @property
    def matched_total(self) -> int:
        return sum(self.matched.values())

    @property
    def share(self) -> float:
        return self.matched_total / self.module_count if self.module_count else 0.0

    @property
    def exit_code(self) -> int:
        """0 when the merge would place every module, 1 when it would skip or refuse any."""
        return 0 if self.refused is None and self.matched_total == self.module_count else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "lora": self.lora, "base": self.base, "format": self.format, "family": self.family,
            "identity": self.identity, "base_family": self.base_family, "base_architecture": self.base_architecture,
            "module_count": self.module_count, "matched": self.matched, "matched_total": self.matched_total,
            "share": round(self.share, 6), "placed": self.placed, "refused": self.refused,
            "groups": [g.to_json() for g in self.groups], "warnings": self.warnings,
        }


# ---------------------------------------------------------------- why a module was not placed


@dataclass
class _Context:
    ckpt: Any
    index: BaseIndex
    plan: MatchPlan
    base_family: str | None
    # canonical parameter names of every group (single files: through their key maps), for suffix searches
    params: list[str]
    param_set: frozenset[str] = frozenset()

    def has(self, component: str, param: str) -> bool:
        return self.index.lookup(component, param) is not None


def _param_names(ckpt) -> list[str]:
    out: list[str] = []
    for group in ckpt.groups:
        for names in group.params().values():
            out += names
    return list(dict.fromkeys(out))


def _finding(cause: str, group: str, reason: str, **fields: str) -> tuple[str, str, str, str]:
    return cause, group, reason, CAUSES[cause].fix.format(**fields)


def _component(ctx: _Context, comp: str, path: str) -> tuple | None:
    if comp in ctx.plan.base_components:
        return None
    held = ", ".join(sorted(ctx.plan.base_components)) or "nothing the LoRA names"
    return _finding("component", comp, f"the base holds {held} only", component=comp)


def _variant(ctx: _Context, comp: str, path: str) -> tuple | None:
    from loratool import arch

    fam = arch.families().get(ctx.base_family or "")
    for rule in getattr(fam, "mismatches", ()):
        if re.search(rule.pattern, path):
            return _finding("variant", rule.group, rule.reason)
    return None


def _dialect(ctx: _Context, m: LoraModule, family: str | None) -> tuple | None:
    """The module's name in a family's other naming (native ↔ diffusers) is in the base: the base's family
    asked first, then the LoRA's (``family``), then the others (SD3 and Flux.1 share some native names)."""
    from loratool import arch

    fams = arch.families()
    order = dict.fromkeys(n for n in (ctx.base_family, family, *fams) if n in fams)
    for fam in (fams[n] for n in order):
        for naming, convert in (("native", fam.from_canonical), ("diffusers", fam.to_canonical)):
            try:
                renamed = convert([replace(m, hints=dict(m.hints))])
            except Exception:  # noqa: BLE001 - a name another family cannot convert says nothing
                continue
            for r in renamed:
                if r.path != m.path and ctx.has(m.component, r.path + ".weight"):
                    return _finding("dialect", f"{fam.name} {naming} names",
                                    f"the base holds {m.path} as {r.path} ({fam.name} {naming} naming)",
                                    naming=f"{fam.name} {'diffusers' if naming == 'native' else 'native'}")
    return None


def _fused(ctx: _Context, comp: str, path: str) -> tuple | None:
    parent, _, leaf = path.rpartition(".")
    head = parent + "." if parent else ""
    for fused, parts in FUSED.items():
        if leaf in parts and ctx.has(comp, f"{head}{fused}.weight"):
            return _finding("fused", f"{' / '.join(parts)} held fused as {fused}",
                            f"the base fuses {', '.join(parts)} into one {head}{fused}; the LoRA adapts them apart")
        if leaf == fused and all(ctx.has(comp, f"{head}{p}.weight") for p in parts):
            return _finding("fused", f"{fused} held split as {' / '.join(parts)}",
                            f"the LoRA adapts one fused {path}; the base keeps {', '.join(parts)} apart")
    return None


def _prefix(ctx: _Context, comp: str, path: str, suffixes: dict[str, list[str]]) -> tuple | None:
    """The longest tail of ``path`` (two segments at least) that one base parameter ends with, behind another prefix."""
    segs = path.split(".")
    for strip in range(len(segs) - 1):
        tail = ".".join(segs[strip:]) + ".weight"
        hits = [k for k in suffixes.get(tail, ()) if k != tail or strip]
        if strip and tail in ctx.param_set:
            hits.append(tail)
        hits = list(dict.fromkeys(hits))
        if len(hits) == 1:
            base_prefix = hits[0][: -len(tail)]
            lora_prefix = ".".join(segs[:strip]) + "." if strip else ""
            rename = (f"strip {lora_prefix} from the LoRA's module names" if not base_prefix else
                      f"prefix the LoRA's module names with {base_prefix}" if not lora_prefix else
                      f"rename the LoRA's {lora_prefix} modules to {base_prefix}")
            return _finding("prefix", f"LoRA prefix {lora_prefix or '(none)'} ↔ base prefix {base_prefix or '(none)'}",
                            f"the base has {hits[0].removesuffix('.weight')} for {path}", rename=rename)
        if len(hits) > 1:
            break  # a shorter tail only matches more
    return None


def _missing(ctx: _Context, comp: str, path: str) -> tuple:
    return _finding("missing", comp, f"the base has no {comp} weight of these names (nor another naming or prefix)")


def _shape(r: Rejected, identity_widths: str) -> tuple:
    if r.reason != "shape" or r.got is None or r.want is None:
        return _finding("shape", {"rows": "fused rows out of range", "halves": "odd row count",
                                  "bias": "bias delta without a base bias", "factors": "malformed factors",
                                  "widen": "widening a fused slice"}
                        .get(r.reason, r.reason), r.message, needs=identity_widths)
    got, want = tuple(r.got), tuple(r.want)
    path = r.label.split(":", 1)[1].split(" (", 1)[0]
    fields = {"got": list(got), "want": list(want)}
    fields.update({f"got{i}": v for i, v in enumerate(got)})
    fields.update({f"want{i}": v for i, v in enumerate(want)})
    rule = next(rule for rule in SHAPE_RULES if rule.applies(path, got, want))
    group = rule.group.format(**fields)
    return _finding("shape", group, f"{rule.why}; {path}: LoRA {list(got)}, base {list(want)}",
                    needs=identity_widths)


def _widths_text(widths: dict[str, list[int]]) -> str:
    return ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in widths.items()) or "its own widths"


def explain(adapters: Sequence[Adapter], plan: MatchPlan, ckpt, base_family: str | None = None) -> list[Group]:
    """The modules ``plan`` did not merge (rejected and unplaced), grouped by cause (see the module docstring)."""
    from loratool import arch

    params = _param_names(ckpt)
    ctx = _Context(ckpt, BaseIndex(list(adapters), ckpt), plan, base_family, params, frozenset(params))
    suffixes = _keys_by_suffix(ctx.params)
    groups: dict[tuple[str, str], Group] = {}

    def add(finding: tuple, label: str) -> None:
        cause, group, reason, fix = finding
        g = groups.setdefault((cause, group), Group(cause, group, reason, fix))
        g.labels.append(label)

    widths = {i: _widths_text(arch.identity_of(a).widths) for i, a in enumerate(adapters)}
    for r in plan.rejected:
        add(_shape(r, widths[r.adapter]), r.label)
    explained = [(ai, m.component, m.path, m) for ai, m in plan.unplaced]
    explained += [(ai, comp, name.removesuffix(".weight"), None) for ai, comp, name, _ in plan.unplaced_extras]
    labels = iter(plan.unmatched)
    for ai, comp, path, module in explained:
        label = next(labels)
        finding = (_component(ctx, comp, path)
                   or (_dialect(ctx, module, adapters[ai].family) if module is not None else None)
                   or _variant(ctx, comp, path) or _fused(ctx, comp, path) or _prefix(ctx, comp, path, suffixes)
                   or _missing(ctx, comp, path))
        add(finding, label)
    order = list(CAUSES)
    return sorted(groups.values(), key=lambda g: (order.index(g.cause), -len(g.labels)))


def unmatched_groups(adapters: Sequence[Adapter], plan: MatchPlan, ckpt) -> list[dict]:
    """:func:`explain` as JSON objects: what a merge reports for the modules it skipped."""
    from loratool.ops.family_check import base_family_of

    if not plan.unmatched and not plan.rejected:
        return []
    base, _ = base_family_of(ckpt)
    return [g.to_json() for g in explain(adapters, plan, ckpt, base)]


# ---------------------------------------------------------------- the report


def check_order(lora: str | os.PathLike | Adapter, base: str | os.PathLike) -> None:
    """A :class:`~loratool.errors.UsageError` when the arguments look swapped (``check`` takes the LoRA first)."""
    from loratool.errors import UsageError
    from loratool.ops.argument_order import local_kind

    lora_kind = None if isinstance(lora, Adapter) else local_kind(lora)
    if local_kind(base) == "lora":
        hint = f"did you mean `loratool check {base} {lora}`?" if lora_kind == "model" else \
            "check takes the LoRA first, then the base model: `loratool check LORA BASE`"
        raise UsageError(f"{base}: this is a LoRA, not a base model; {hint}")
    if lora_kind == "model":
        raise UsageError(f"{lora}: this is a model, not a LoRA; `loratool check LORA BASE` takes the LoRA first")


def check(lora: str | os.PathLike | Adapter, base: str | os.PathLike, *, ignore_family: bool = False) -> CheckReport:
    """What ``merge BASE LORA`` would merge, and why it would skip the rest (nothing is written).

    ``ignore_family`` checks as ``merge --ignore-family`` merges: unrelated families are then no refusal.
    """
    from loratool import arch
    from loratool.io.checkpoint import open_checkpoint
    from loratool.ops.family_check import base_family_of, family_mismatches
    from loratool.ops.merge_tensors import load_adapters

    check_order(lora, base)
    ckpt = open_checkpoint(base)
    adapters, names = load_adapters(ckpt, [lora])
    adapter = adapters[0]
    base_family, architecture = base_family_of(ckpt)
    plan = match(adapters, [1.0], ckpt, names=names, refuse=False)
    identity = arch.identity_of(adapter)
    total = len(adapter) + len(adapter.extras)
    placed = plan.total_matched
    groups = explain(adapters, plan, ckpt, base_family)
    refused = None
    _, wrong = family_mismatches(adapters, names, ckpt)
    if wrong and not ignore_family:
        fam = wrong[0][1]
        refused = (f"the LoRA is for the {fam} family, the base is {base_family}: merge refuses it "
                   f"(--ignore-family merges the {placed} modules that fit by name and shape)")
        why = identity.why or "its names and shapes"
        everything = [lab for g in groups for lab in g.labels]
        skipped = set(everything)
        placed_labels = [lab for lab in _placed_labels(plan) if lab not in skipped]
        groups = [Group("family", f"{fam} LoRA on a {base_family} base",
                        f"the LoRA is {fam} ({why}); the base is {base_family} ({architecture or 'its weights'})",
                        CAUSES["family"].fix.format(family=fam, base_family=base_family),
                        placed_labels + everything)]
    elif plan.rejected:
        refused = (f"{len(plan.rejected)} module(s) do not fit the shape of their weight: merge refuses the LoRA "
                   f"(it checks every shape before writing)")
    elif not placed:
        refused = "no module matches a base weight: merge refuses the LoRA"
    matched = {} if refused else dict(plan.matched)
    return CheckReport(
        lora=str(lora if not isinstance(lora, Adapter) else names[0]), base=str(base), format=adapter.source_format,
        family=adapter.family, identity={"family": identity.family, "variant": identity.variant,
                                         "widths": identity.widths, "why": identity.why},
        base_family=base_family, base_architecture=architecture, module_count=total, matched=matched,
        placed=placed, groups=groups, refused=refused,
    )


def _placed_labels(plan: MatchPlan) -> list[str]:
    """component:path of every module and whole tensor the plan placed."""
    out = [f"{app.module.component}:{app.module.path}" for apps in plan.applications.values() for app in apps
           if not app.bias]
    out += [label for _, label, _ in plan.replacements.values()]
    return list(dict.fromkeys(out))

