"""kohya key heads ↔ (component, dotted module path).

kohya builds a key head as ``prefix + "_" + path.replace(".", "_")``; the dots are lost, and
``_`` also occurs inside identifiers (``down_blocks``, ``self_attn``, ``q_proj``), so turning a
head back into a path needs a vocabulary. Two sources, tried in this order:

1. a base model's module paths (``ReadOptions.vocabulary``): an exact map
   ``path.replace(".", "_") → path``;
2. the family's name tables (:mod:`loratool.arch`): every native path is turned into a
   *template* by replacing each all-digit segment with ``#`` (``down_blocks.#.attentions.#.
   proj_in``, ``time_embedding.linear_#``). A head body is templated the same way
   (all-digit ``_``-separated words → ``#``), looked up by its underscore form, and the numbers
   are put back in order. The lookup is the plausibility check: a body whose template the
   family never produces is not restored. Templates make the tables independent of layer
   counts (any LLaMA depth, any U-Net width), and two native paths sharing an underscore
   form (``a_b.c`` / ``a.b_c``) are detected, never guessed.

Case is kept (T5 ``SelfAttention_q``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from loratool.errors import FormatError

# All-digit segments between separators (``.`` in paths, ``_`` in heads): ``layers.0``, ``linear_1``.
_NUMBER = re.compile(r"(?<![^._])\d+(?![^._])")
# kohya's generic LyCORIS prefix (``lycoris.create_lycoris``): the component comes from the body.
GENERIC_PREFIXES = ("lycoris",)


def template(path: str) -> str:
    return _NUMBER.sub("#", path)


def to_head(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


@dataclass
class PathIndex:
    """Restores underscore bodies to dotted paths of one component."""

    exact: dict[str, set[str]] = field(default_factory=dict)
    templates: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def from_paths(cls, paths: Iterable[str], *, templated: bool) -> PathIndex:
        index = cls()
        for p in paths:
            index.exact.setdefault(p.replace(".", "_"), set()).add(p)
            if templated:
                t = template(p)
                index.templates.setdefault(t.replace(".", "_"), set()).add(t)
        return index

    def restore(self, body: str) -> str | None:
        """The dotted path for ``body``; None when unknown; FormatError when ambiguous."""
        hits = self.exact.get(body)
        if not hits:
            cands = self.templates.get(template(body))
            if not cands:
                return None
            numbers = _NUMBER.findall(body)
            hits = {_fill(t, numbers) for t in cands}
        if len(hits) > 1:
            raise FormatError(f"{body!r} could be any of {', '.join(sorted(hits))}")
        return next(iter(hits))


def _fill(tmpl: str, numbers: list[str]) -> str:
    parts = tmpl.split("#")
    out = [parts[0]]
    for num, rest in zip(numbers, parts[1:]):
        out.append(num)
        out.append(rest)
    return "".join(out)


@lru_cache(maxsize=64)
def _family_index(family_name: str, component: str) -> PathIndex:
    from loratool import arch
    from loratool.arch.clip import CLIP_COMPONENTS, TEXT_MODEL

    paths = set(arch.get(family_name).native_paths(component))
    if component in CLIP_COMPONENTS:
        # a transformers-5 CLIPTextModel has no text_model. level: diffusers' convert_state_dict_to_kohya
        # then writes lora_te1_encoder_layers_0_...; the reader restores the text_model. form
        paths |= {p[len(TEXT_MODEL):] for p in paths if p.startswith(TEXT_MODEL)}
    return PathIndex.from_paths(paths, templated=True)


class HeadResolver:
    """Maps kohya key heads of one file to (component, native path, prefix).

    ``family`` may be None when a vocabulary is given (then any prefix is accepted and the
    component is the one whose vocabulary holds the body).
    """

    def __init__(self, family, vocabulary: dict[str, set[str]] | None):
        self.family = family
        self.vocab = {c: PathIndex.from_paths(p, templated=False) for c, p in (vocabulary or {}).items()}
        prefixes = dict(family.kohya_prefixes) if family is not None else {}
        self.prefixes = sorted(prefixes.items(), key=lambda kv: -len(kv[0]))

    def _components(self) -> list[str]:
        comps = list(self.family.components) if self.family is not None else []
        return comps + [c for c in self.vocab if c not in comps]

    def _candidates(self, head: str) -> list[tuple[str, str]]:
        """(prefix, component) pairs worth trying, most specific first."""
        out = [(p, c) for p, c in self.prefixes if head.startswith(p + "_")]
        for p in GENERIC_PREFIXES:
            if head.startswith(p + "_"):
                out += [(p, c) for c in self._components()]
        if self.vocab and not out:
            # Unknown prefix (LLM files have no agreed one): every split point is a candidate.
            for m in re.finditer("_", head):
                out += [(head[: m.start()], c) for c in self.vocab]
        return out

    def _restore(self, component: str, body: str) -> tuple[str, bool] | None:
        """(path, from_vocabulary) or None."""
        if component in self.vocab:
            path = self.vocab[component].restore(body)
            if path is not None:
                return path, True
        if self.family is not None and component in self.family.components:
            path = _family_index(self.family.name, component).restore(body)
            if path is not None:
                return path, False
        return None

    def resolve(self, head: str) -> tuple[str, str, str, bool]:
        """(component, path, prefix, from_vocabulary) for a key head; FormatError when unknown."""
        cands = self._candidates(head)
        for prefix, comp in cands:
            try:
                hit = self._restore(comp, head[len(prefix) + 1:])
            except FormatError as exc:
                raise FormatError(f"key {head!r}: module path is ambiguous: {exc}") from None
            if hit is not None:
                return comp, hit[0], prefix, hit[1]
        fam = f"family {self.family.name}" if self.family is not None else "no model family"
        if not cands:
            known = ", ".join(p for p, _ in self.prefixes) or "none"
            raise FormatError(f"key {head!r}: unknown kohya prefix for {fam} (known prefixes: {known}); "
                              f"pass --family or --base <model> to restore its name")
        raise FormatError(f"key {head!r}: not a module of {fam}; cannot restore its dotted path "
                          f"(pass --base <model> to read names from the base weights, or --family)")

    def prefix_for(self, component: str) -> str:
        for p, c in self.family.kohya_prefixes.items() if self.family is not None else ():
            if c == component:
                return p
        raise FormatError(f"family {self.family.name if self.family else '?'} has no kohya prefix for "
                          f"component {component!r}")
