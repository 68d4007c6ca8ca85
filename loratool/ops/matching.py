"""Which base tensor each adapter module changes.

A module ``(component, path)`` adapts the parameter ``<path>.weight`` of that component (and
``<path>.bias`` when it carries a bias delta). The checkpoint says where that parameter is
stored (:meth:`loratool.io.checkpoint.Group.lookup`): a file, a key, for fused tensors of
single-file SD / Flux checkpoints a block of rows, and for weights such files store transposed or
with their two row halves swapped the transform (shapes are then checked on the canonical
orientation: a transposed [in, out] tensor holds an [out, in] weight).

A group whose component is unknown (a bare ``model.safetensors``) takes the adapter component
whose modules it holds most of; modules of the other components are reported unmatched. When
names differ only by a leading prefix (an adapter trained on ``LlamaModel`` — ``layers.0...`` —
merged into a ``LlamaForCausalLM`` file — ``model.layers.0...``), the one prefix change that
places most modules is applied to the modules that did not match as they are.

Shapes are checked here, before anything is written, with the reshape rules of
:func:`loratool.delta.delta_weight` (the ``meta`` device would do it too, but its first use
imports torch's compiler stack: seconds per run).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.delta import _numel, _same_matrix, has_bias_delta, weight_shape
from loratool.errors import MatchError
from loratool.io.checkpoint import Checkpoint, Group, Hit, RowSlice
from loratool.io.codecs import logical_shape
from loratool.ops.orientation import oriented


@dataclass
class Application:
    """One module applied to one stored tensor (in adapter order)."""

    adapter: int
    module: LoraModule
    strength: float
    rows: RowSlice | None = None
    bias: bool = False  # this application adds Δb to a bias tensor
    # How the stored tensor (or its rows) holds the canonical weight: None, "transpose" (OpenCLIP
    # text_projection) or "swap_halves" (Flux / SD3 final modulation); see arch.checkpoints.to_stored.
    transform: str | None = None


@dataclass
class Rejected:
    """A module placed by name on a stored tensor that cannot take it (a merge refuses the whole merge)."""

    adapter: int
    module: LoraModule | None  # None: a whole tensor (PEFT modules_to_save)
    label: str
    key: str  # the stored tensor it was placed on
    reason: str  # "shape", "rows", "halves", "bias", "widen" or "factors"
    message: str
    got: tuple[int, ...] | None = None  # ΔW's shape (reason "shape")
    want: tuple[int, ...] | None = None  # the base weight's canonical shape


@dataclass
class MatchPlan:
    # (file path, stored key) -> what to apply, in order
    applications: dict[tuple[Path, str], list[Application]] = field(default_factory=dict)
    # (file path, stored key) -> whole tensor replacing it (PEFT modules_to_save)
    replacements: dict[tuple[Path, str], tuple[int, str, torch.Tensor]] = field(default_factory=dict)
    matched: dict[str, int] = field(default_factory=dict)  # adapter component -> modules placed
    unmatched: list[str] = field(default_factory=list)  # "component:path" (with the adapter when several)
    # (file path, stored key) -> the larger shape a widening module gives it (Flux control LoRAs)
    reshaped: dict[tuple[Path, str], tuple[int, ...]] = field(default_factory=dict)
    # the modules behind ``unmatched``, in its order: (adapter index, module); and the unplaced whole tensors:
    # (adapter index, component, tensor name, shape)
    unplaced: list[tuple[int, LoraModule]] = field(default_factory=list)
    unplaced_extras: list[tuple[int, str, str, tuple[int, ...]]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)  # placed by name, refused (shape, rows, bias)
    # the components the base serves once bare files took the component they fit (see :func:`match`)
    base_components: set[str] = field(default_factory=set)
    # the unmatched modules by cause, one group each (:func:`loratool.ops.check.unmatched_groups`)
    unmatched_groups: list[dict] = field(default_factory=list)

    @property
    def total_matched(self) -> int:
        return sum(self.matched.values())


def _keys_by_suffix(keys) -> dict[str, list[str]]:
    """Every dotted suffix of every key -> keys ending with it (``a.b.w`` gives ``b.w`` and ``w``)."""
    out: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            out.setdefault(".".join(parts[i:]), []).append(key)
    return out


def _prefix_rule(group: Group, paths: list[str]) -> tuple[int, str] | None:
    """The (strip n leading segments, then prepend P) rule that places most ``paths`` on distinct keys.

    Counting distinct keys keeps a rule such as "prepend ``model.layers.0.``" (every ``q_proj``
    onto one tensor) from winning; at least two modules and half of them must be placed. ``paths`` are
    counted once each: several adapters adapting the same modules (``merge base K K K``) must not
    raise the bar beyond what any one of them can reach.
    """
    paths = list(dict.fromkeys(paths))
    keys = group.key_to_part
    suffixes = _keys_by_suffix(keys)
    hits: dict[tuple[int, str], set[str]] = {}
    for path in paths:
        segs = path.split(".")
        for strip in range(len(segs) - 1):
            tail = ".".join(segs[strip:]) + ".weight"
            if strip and tail in keys:
                hits.setdefault((strip, ""), set()).add(tail)
            for key in suffixes.get(tail, ()):
                hits.setdefault((strip, key[: -len(tail)]), set()).add(key)
    if not hits:
        return None
    rule = max(hits, key=lambda r: (len(hits[r]), -r[0]))
    count = len(hits[rule])
    return rule if count >= 2 and count * 2 >= len(paths) else None


def _apply_rule(path: str, rule: tuple[int, str]) -> str:
    strip, prefix = rule
    return prefix + ".".join(path.split(".")[strip:])


class BaseIndex:
    """Where a canonical parameter of an adapter component lives in ``ckpt``, as :func:`match` looks it up.

    Groups whose component is unknown (a bare ``model.safetensors``) take the adapter component
    they hold most modules of (``assigned``); ``check`` asks the same index why a module found no place.
    """

    def __init__(self, adapters: list[Adapter], ckpt: Checkpoint):
        self.ckpt = ckpt
        self.assigned: dict[int, str | None] = {}
        for gi, group in enumerate(ckpt.groups):
            if group.component is not None or group.targets is not None:
                continue
            score: Counter = Counter()
            for adapter in adapters:
                for m in adapter:
                    score[m.component] += f"{m.path}.weight" in group.key_to_part
            if not any(score.values()):
                # nothing matches as named: fall back to the component the prefix rule places most
                for comp in dict.fromkeys(m.component for a in adapters for m in a):
                    rule = _prefix_rule(group, [m.path for a in adapters for m in a if m.component == comp])
                    if rule is not None:
                        score[comp] += 1
            self.assigned[gi] = score.most_common(1)[0][0] if score and any(score.values()) else None

    def owner(self, group_index: int, group: Group, component: str) -> bool:
        if group_index in self.assigned:
            return self.assigned[group_index] == component
        return group.serves(component)

    def lookup(self, component: str, param: str) -> Hit | None:
        for gi, group in enumerate(self.ckpt.groups):
            if not self.owner(gi, group, component):
                continue
            hit = group.lookup(group.component or component, param) if group.targets is None \
                else group.lookup(component, param)
            if hit is not None:
                return hit
        return None

    def components(self) -> set[str]:
        """The adapter components some group of the base serves."""
        out: set[str] = set()
        for gi, group in enumerate(self.ckpt.groups):
            if gi in self.assigned:
                if self.assigned[gi] is not None:
                    out.add(self.assigned[gi])
            elif group.targets is not None:
                out |= {c for c, _ in group.targets}
            elif group.component is not None:
                out.add(group.component)
        return out


def match(
    adapters: list[Adapter],
    strengths: list[float],
    ckpt: Checkpoint,
    *,
    names: list[str] | None = None,
    refuse: bool = True,
) -> MatchPlan:
    """Place every module of every adapter.

    ``refuse`` (a merge): raise :class:`MatchError` on a shape mismatch or zero matches. Without it (``check``)
    the plan records them (``rejected``, empty ``applications``) and nothing is raised.
    """
    names = names or [f"adapter {i + 1}" for i in range(len(adapters))]
    plan = MatchPlan()

    index = BaseIndex(adapters, ckpt)
    owner, lookup = index.owner, index.lookup
    plan.base_components = index.components()

    # First pass: names as they are; then one prefix rule per (group, component) for the rest.
    placed: dict[tuple[int, str], Hit] = {}
    missing: dict[str, list[tuple[int, LoraModule]]] = {}
    for ai, adapter in enumerate(adapters):
        for m in adapter:
            hit = lookup(m.component, f"{m.path}.weight")
            if hit is not None:
                placed[(ai, m.path + "\0" + m.component)] = hit
            else:
                missing.setdefault(m.component, []).append((ai, m))
    placed_comps = {m.component for a in adapters for m in a} - set(missing)
    placed_comps |= {c for c, mods in missing.items()
                     if len(mods) < sum(1 for a in adapters for m in a if m.component == c)}
    for comp, mods in missing.items():
        if comp in placed_comps:
            continue  # names work for this component: the missing ones are really missing
        for gi, group in enumerate(ckpt.groups):
            if group.targets is not None or not owner(gi, group, comp):
                continue
            rule = _prefix_rule(group, [m.path for _, m in mods])
            if rule is None:
                continue
            for ai, m in mods:
                hit = group.lookup(group.component or comp, _apply_rule(m.path, rule) + ".weight")
                if hit is not None:
                    placed[(ai, m.path + "\0" + m.component)] = hit

    # whole tensors replace their base weights before modules add to them (PEFT: the saved base layer is loaded,
    # then merged); a vocabulary-resized embedding replaces with more rows
    extra_hits = {(ai, key): lookup(key[0], base_weight_name(key[1]))
                  for ai, adapter in enumerate(adapters) for key in adapter.extras}
    resized = _resized_weights(adapters, extra_hits)

    errors: list[Rejected] = []
    for ai, adapter in enumerate(adapters):
        for m in adapter:
            hit = placed.get((ai, m.path + "\0" + m.component))
            label = f"{m.component}:{m.path}" + (f" ({names[ai]})" if len(adapters) > 1 else "")
            if hit is None:
                plan.unmatched.append(label)
                plan.unplaced.append((ai, m))
                continue
            part, key, rows = hit
            transform = getattr(hit, "transform", None)

            def reject(reason: str, message: str, got=None, want=None, *, m=m, ai=ai, label=label, key=key) -> None:
                errors.append(Rejected(ai, m, label, key, reason, message, got, want))

            # the weight as the model uses it (quantized kinds store it otherwise); None: the kind
            # hides it, and the merge refuses that kind with its own message
            stored_shape = resized.get((part.path, key)) or logical_shape(part.file, key)
            if stored_shape is not None:
                shape = stored_shape if rows is None else (rows[1] - rows[0], *stored_shape[1:])
                if rows is not None and not (0 <= rows[0] < rows[1] <= stored_shape[0]):
                    reject("rows", f"{label}: rows {rows} lie outside {key} {stored_shape}")
                    continue
                if transform == "transpose":
                    shape = tuple(shape)[::-1]  # the canonical weight is the stored tensor transposed
                elif transform == "swap_halves" and shape[0] % 2:
                    reject("halves", f"{label}: {key} {stored_shape} has an odd row count; "
                           "its halves cannot be swapped")
                    continue
                m = oriented(m, tuple(shape), part.path, key)  # [out, in] or Conv1D's [in, out]: the base decides
                err = _check_shapes(m, shape, strengths[ai], names[ai], key)
                if err:
                    reject(err[0], err[1], err[2], tuple(shape))
                    continue
                if m.hints.get("widen") and tuple(weight_shape(m)) != tuple(shape):
                    if rows is not None or transform is not None:
                        reject("widen", f"{label}: {key} is a slice of a fused tensor; it cannot be widened")
                        continue
                    plan.reshaped[(part.path, key)] = tuple(weight_shape(m))
            plan.applications.setdefault((part.path, key), []).append(
                Application(ai, m, strengths[ai], rows, transform=transform))
            bias_key = key[: -len("weight")] + "bias" if key.endswith("weight") else None
            if _has_bias_delta(m):
                if bias_key is None or bias_key not in part.file:
                    where = bias_key or f"bias for {key}"
                    reject("bias", f"{label}: the adapter changes a bias but the base has no {where}")
                    continue
                # a bias has no transpose; swapped halves apply to it as to the weight's rows
                plan.applications.setdefault((part.path, bias_key), []).append(Application(
                    ai, m, strengths[ai], rows, bias=True, transform=transform if transform == "swap_halves" else None))
            plan.matched[m.component] = plan.matched.get(m.component, 0) + 1
    for ai, adapter in enumerate(adapters):
        for (comp, name), tensor in adapter.extras.items():
            hit = extra_hits[(ai, (comp, name))]
            label = f"{comp}:{name}" + (f" ({names[ai]})" if len(adapters) > 1 else "")
            if hit is None:
                plan.unmatched.append(label)
                plan.unplaced_extras.append((ai, comp, name, tuple(int(x) for x in tensor.shape)))
                continue
            part, key, rows = hit
            base_shape = logical_shape(part.file, key)
            if getattr(hit, "transform", None) is not None:
                from loratool.arch.checkpoints import to_stored

                tensor = to_stored(tensor, hit.target)  # the file holds this weight transposed / halves swapped
            if (part.path, key) in resized:
                plan.reshaped[(part.path, key)] = resized[(part.path, key)]
            elif rows is not None or tuple(tensor.shape) != base_shape:
                errors.append(Rejected(ai, None, label, key, "shape",
                                       f"{label}: saved tensor is {tuple(tensor.shape)}, base {key} is {base_shape}",
                                       tuple(int(x) for x in tensor.shape),
                                       None if base_shape is None else tuple(base_shape)))
                continue
            plan.replacements[(part.path, key)] = (ai, label, tensor)
            plan.matched[comp] = plan.matched.get(comp, 0) + 1
    plan.rejected = errors
    if not refuse:
        return plan
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise MatchError("; ".join(e.message for e in errors[:3]) + more)
    if not plan.total_matched:
        comps = ", ".join(str(g.component or "unknown") for g in ckpt.groups)
        sample = ", ".join(plan.unmatched[:3])
        raise MatchError(
            f"{ckpt.root}: no adapter module matches a base weight (base components: {comps}; "
            f"adapter modules such as {sample}); is this the right base model?"
        )
    return plan


def base_weight_name(name: str) -> str:
    """The base weight a saved whole tensor replaces: PEFT saves the wrapped layer's own weight of a LoRA module
    (``save_embedding_layers``) as ``<path>.base_layer.weight`` (``BaseTunerLayer.base_layer``)."""
    return name.replace(".base_layer.", ".")


def _resized_weights(adapters: list[Adapter], hits: dict) -> dict[tuple[Path, str], tuple[int, ...]]:
    """(file, stored key) -> the new shape, for whole tensors that replace a vocabulary-sized base weight
    (:data:`loratool.arch.llm.VOCAB_TENSORS`) with another row count and the same width; ``hits``: where each
    (adapter index, extras key) is stored."""
    import re

    from loratool.arch.llm import VOCAB_TENSORS

    out: dict[tuple[Path, str], tuple[int, ...]] = {}
    for ai, adapter in enumerate(adapters):
        for key, tensor in adapter.extras.items():
            hit = hits[(ai, key)]
            if hit is None:
                continue
            part, key, rows = hit
            if rows is not None or getattr(hit, "transform", None) is not None or not re.search(VOCAB_TENSORS, key):
                continue
            base = logical_shape(part.file, key)
            got = tuple(int(x) for x in tensor.shape)
            if base is not None and len(got) == len(base) == 2 and got[1] == base[1] and got[0] != base[0]:
                out[(part.path, key)] = got
    return out


def _has_bias_delta(m: LoraModule) -> bool:
    return has_bias_delta(m)


def _check_shapes(m: LoraModule, shape: tuple[int, ...], strength: float, name: str, key: str
                  ) -> tuple[str, str, tuple[int, ...] | None] | None:
    """Whether ΔW fits the base tensor under the same reshape rules :func:`delta_weight` applies:
    None, or (reason, message, ΔW's shape).

    (lora / full shapes come from the factors' shapes; LoHa / LoKr from their product.)
    """
    try:
        got = tuple(weight_shape(m))
    except (RuntimeError, ValueError, IndexError, KeyError) as exc:
        return ("factors", f"{m.component}:{m.path} ({name}): cannot form ΔW "
                f"({exc.__class__.__name__}: {str(exc)[:160]})", None)
    if got == tuple(shape):
        return None
    if _numel(got) == _numel(shape) and (m.kind in ("loha", "lokr") or _same_matrix(got, shape)):
        return None
    if len(got) == 1 and m.kind in ("oft", "boft") and got[0] == shape[0]:
        return None  # OFT rotates the output rows; the rest of W's shape is its own
    if m.hints.get("widen") and len(got) == len(shape) and all(a >= b for a, b in zip(got, shape)):
        return None  # a control LoRA widens the weight (delta.widen)
    return "shape", f"{m.component}:{m.path}: adapter gives shape {got}, base weight {key} is {tuple(shape)}", got
