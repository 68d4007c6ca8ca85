"""Base model checkpoints, opened lazily (headers only) and read one tensor at a time.

Accepted layouts:

* one ``.safetensors`` file (an HF transformers model, a diffusers component such as
  ``unet/diffusion_pytorch_model.safetensors``, or a single-file SD/Flux checkpoint when
  :mod:`loratool.arch.checkpoints` knows its keys);
* one ``.gguf`` file (city96's ComfyUI-GGUF image models, llama.cpp language models), its tensors
  presented under the names of :mod:`loratool.io.gguf_names`;
* a sharded folder holding ``*.safetensors.index.json``;
* a diffusers component folder (``config.json`` + one ``*.safetensors``);
* a diffusers pipeline folder (``model_index.json``, or a modular pipeline's ``modular_model_index.json``:
  Anima's), each component folder as above;
* an ``hf://`` reference to any of these (:func:`loratool.io.hub.resolve`).

A checkpoint is a list of :class:`Group` s, one per component: a single file or a shard set.
``component`` is the diffusers folder name (``unet``, ``text_encoder``...) or ``None`` when the
checkpoint does not say (a bare file): matching then picks the adapter component that fits.

Quantized weights (fp8, scaled fp8, bitsandbytes, GGUF) are described by each file's
:func:`loratool.io.codecs.layout_of`: parameters have their logical shapes, the tensors stored with
them (scales, block maxima, markers) are no parameters, and :meth:`Checkpoint.read_weight` decodes
them to float32.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratool.components import COMPONENTS
from loratool.errors import InputError
from loratool.io import hub
from loratool.io.codecs import layout_of, link_shards, logical_shape, read_weight
from loratool.io.gguf_file import GGUFFile, is_gguf
from loratool.io.safetensors_file import SafetensorsFile

if TYPE_CHECKING:
    import torch

# Folder names that say which model part a weights file is.
KNOWN_COMPONENTS = frozenset(COMPONENTS) | {"vae", "prior", "decoder", "image_encoder", "controlnet", "transformer_2"}
# The index files of a diffusers pipeline folder (a modular pipeline writes the second: Anima's).
PIPELINE_INDEXES = ("model_index.json", "modular_model_index.json")
# Preferred weight file names when a folder holds several (diffusers variants, duplicates).
STANDARD_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
# Files that hold weights: a mirrored folder drops those it does not merge (a stale unmerged
# copy beside the merged one would be loaded by tools that prefer it).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")

# First path segment of a parameter name -> the component such files usually are; only a
# hint for naming (kohya name restoration) when nothing else says.
_FIRST_SEGMENT_HINTS = {
    "text_model": "text_encoder",
    "down_blocks": "unet",
    "up_blocks": "unet",
    "mid_block": "unet",
    "conv_in": "unet",
    "time_embedding": "unet",
    "transformer_blocks": "transformer",
    "single_transformer_blocks": "transformer",
    "x_embedder": "transformer",
    "context_embedder": "transformer",
}

RowSlice = tuple[int, int]


@dataclass(eq=False)
class Part:
    """One safetensors file of a checkpoint."""

    component: str | None
    rel: Path  # relative to the checkpoint root (the file name for a single-file checkpoint)
    file: SafetensorsFile | GGUFFile

    @property
    def path(self) -> Path:
        return self.file.path


class Hit(tuple):
    """Where a canonical parameter is stored: unpacks as ``(part, stored key, row slice)``.

    ``target`` is the arch ``Target`` of a single-file checkpoint (None otherwise); ``transform``
    (None, ``"transpose"`` or ``"swap_halves"``) says the stored tensor is the canonical one
    transposed or with its two row halves swapped: ``loratool.arch.checkpoints.to_stored`` turns
    one orientation into the other (each transform is its own inverse).
    """

    target: tuple | None

    def __new__(cls, part: Part, key: str, rows: RowSlice | None, target: tuple | None = None):
        obj = super().__new__(cls, (part, key, rows))
        obj.target = target
        return obj

    @property
    def transform(self) -> str | None:
        return getattr(self.target, "transform", None)


@dataclass(eq=False)
class Group:
    """The weights of one component: one file, or the shards named by an index."""

    component: str | None
    parts: list[Part]
    index_rel: Path | None = None  # the shard index, relative to the root
    index: dict | None = None
    # Whether the one file may be a single-file SD / Flux checkpoint whose map is looked up on first
    # use of ``targets`` (the maps import torch; opening a checkpoint does not).
    single_file: bool = False
    key_to_part: dict[str, Part] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for part in self.parts:
            for key in part.file.keys():
                self.key_to_part[key] = part
        link_shards([part.file for part in self.parts])  # a quantized weight's scales may be in the next shard

    @functools.cached_property
    def targets(self) -> dict[tuple[str, str], tuple[str, RowSlice | None]] | None:
        """For single-file SD / Flux checkpoints: (component, param) -> (stored key, row slice), a
        ``loratool.arch.checkpoints.Target`` (whose ``transform`` says how the stored tensor is laid out)."""
        if not self.single_file:
            return None
        first = self.parts[0].file
        hidden = layout_of(first).hidden
        # shapes let fused rows (OpenCLIP in_proj, Flux qkv / linear1) follow the file's widths
        return _arch_targets({k: logical_shape(first, k) or first.info(k).shape for k in first.keys()
                              if not hidden(k)})

    def serves(self, component: str) -> bool:
        if self.targets is not None:
            return any(c == component for c, _ in self.targets)
        return self.component is None or self.component == component

    def lookup(self, component: str, param: str) -> Hit | None:
        if self.targets is not None:
            hit = self.targets.get((component, param))
            if hit is None:
                return None
            key, rows = hit
            part = self.key_to_part.get(key)
            return Hit(part, key, rows, hit) if part is not None else None
        if self.component is not None and self.component != component:
            return None
        part = self.key_to_part.get(param)
        return Hit(part, param, None) if part is not None else None

    def params(self) -> dict[str, list[str]]:
        """{component: parameter names} this group holds, as canonical names."""
        if self.targets is not None:
            out: dict[str, list[str]] = {}
            for comp, param in self.targets:
                out.setdefault(comp, []).append(param)
            return out
        comp = self.component or guess_component(self.key_to_part)
        return {comp: [k for k, part in self.key_to_part.items() if not layout_of(part.file).hidden(k)]}


def guess_component(keys) -> str:
    """A best guess at the component a bare weights file is, from its parameter names."""
    votes: dict[str, int] = {}
    for key in keys:
        hint = _FIRST_SEGMENT_HINTS.get(key.split(".", 1)[0])
        if hint:
            votes[hint] = votes.get(hint, 0) + 1
    return max(votes, key=votes.get) if votes else "model"


def _arch_targets(keys: list[str]):
    """Canonical targets of a single-file SD / Flux checkpoint, when that knowledge is installed."""
    if importlib.util.find_spec("loratool.arch") is None:
        return None
    if importlib.util.find_spec("loratool.arch.checkpoints") is None:
        return None
    mod = importlib.import_module("loratool.arch.checkpoints")
    fn = getattr(mod, "canonical_targets", None)
    if fn is None:
        return None
    # transforms=True also maps the weights stored transposed / with swapped halves (callers
    # place ΔW through Hit.transform); an older map without the keyword leaves them out.
    takes_transforms = "transforms" in inspect.signature(fn).parameters
    result = fn(keys, transforms=True) if takes_transforms else fn(keys)
    if not result:
        return None
    out = {}
    for (c, p), target in result.items():
        key, rows = target
        if getattr(target, "transform", None) is None:
            target = (key, tuple(rows) if rows is not None else None)
        out[(c, p)] = target
    return out


def _pick(candidates: list[Path], what: str, folder: Path) -> Path:
    if len(candidates) == 1:
        return candidates[0]
    for name in STANDARD_NAMES:
        for c in candidates:
            if c.name in (name, name + ".index.json"):
                return c
    names = ", ".join(sorted(c.name for c in candidates))
    raise InputError(f"{folder}: several {what} ({names}); point at the one to use")


class Checkpoint:
    """A base model opened for streaming: ``parts()``, ``resolve()``, ``module_vocabulary()``."""

    def __init__(self, root: Path, groups: list[Group], *, is_folder: bool, kind: str):
        self.root = root
        self.groups = groups
        self.is_folder = is_folder
        self.kind = kind  # file | sharded | component | pipeline

    def __repr__(self) -> str:
        return f"Checkpoint({self.root}, kind={self.kind}, components={[g.component for g in self.groups]})"

    # --- reading -------------------------------------------------------------------------
    def parts(self) -> Iterator[tuple[str | None, Path, SafetensorsFile]]:
        """Every weights file: (component or None, path, opened file)."""
        for group in self.groups:
            for part in group.parts:
                yield group.component, part.path, part.file

    def resolve(self, component: str, param: str) -> tuple[SafetensorsFile, str, RowSlice | None] | None:
        """Where canonical parameter ``param`` of ``component`` is stored: (file, key, row slice).

        ``row slice`` (start, stop) is set when the parameter is a block of rows of a fused
        stored tensor (OpenCLIP ``in_proj_weight``, Flux fused qkv). Groups whose component is
        unknown answer for any component. Weights stored transposed / with swapped halves are
        answered too: use :meth:`Group.lookup` (its ``Hit.transform``) to read them the right way.
        """
        for group in self.groups:
            hit = group.lookup(component, param)
            if hit is not None:
                part, key, rows = hit
                return part.file, key, rows
        return None

    def module_vocabulary(self) -> dict[str, set[str]]:
        """{component: dotted module paths} from tensor names only (``x.y.weight`` -> ``x.y``)."""
        vocab: dict[str, set[str]] = {}
        for group in self.groups:
            for comp, params in group.params().items():
                paths = vocab.setdefault(comp, set())
                for param in params:
                    paths.add(param.rsplit(".", 1)[0] if "." in param else param)
        return vocab

    def weight_files(self) -> set[Path]:
        """Absolute paths of the files this checkpoint reads (shards and indexes)."""
        out: set[Path] = set()
        for group in self.groups:
            for part in group.parts:
                out.add((self.root / part.rel) if self.is_folder else part.path)
            if group.index_rel is not None:
                out.add(self.root / group.index_rel)
        return out

    @staticmethod
    def read_weight(file: SafetensorsFile | GGUFFile, key: str) -> torch.Tensor:
        """Stored tensor ``key``, decoded to float32 when its file stores it quantized."""
        return read_weight(file, key)

    @staticmethod
    def read_tensor(file: SafetensorsFile, key: str) -> torch.Tensor:
        """One stored tensor, read straight into its own buffer (no intermediate copy)."""
        import torch

        info = file.info(key)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        fd = os.open(file.path, os.O_RDONLY)
        try:
            read_into(fd, memoryview(buf.numpy()), file.header.data_offset + info.start, file.path, key)
        finally:
            os.close(fd)
        return buf.view(info.dtype).reshape(info.shape)


def read_into(fd: int, view: memoryview, offset: int, path: Path, key: str) -> None:
    """Fill ``view`` with the bytes of ``fd`` from absolute ``offset`` (pread: no seek, no copy)."""
    got = 0
    if hasattr(os, "preadv"):
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if not n:
                break
            got += n
    else:  # Windows: no positional reads in os
        with open(fd, "rb", buffering=0, closefd=False) as fh:
            fh.seek(offset)
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    break
                got += n
    if got < len(view):
        raise InputError(f"{path}: tensor {key!r} is cut short (file changed while reading?)")


# --- opening ---------------------------------------------------------------------------------
def _file_group(path: Path, rel: Path, component: str | None) -> Group:
    return Group(component, [Part(component, rel, SafetensorsFile(path))], single_file=component is None)


def open_gguf(path: Path) -> GGUFFile:
    """A GGUF file, its tensors under the names :mod:`loratool.io.gguf_names` gives them."""
    from loratool.io.gguf_names import presented_names

    plain = GGUFFile(path)
    names, permutations = presented_names(plain.architecture, plain.fields, [i.stored_name for i in
                                                                             plain.header.tensors.values()])
    return GGUFFile(path, names, permutations) if names or permutations else plain


def _gguf_group(path: Path, rel: Path, component: str | None) -> Group:
    return Group(component, [Part(component, rel, open_gguf(path))], single_file=component is None)


def _folder_group(folder: Path, rel_folder: Path, component: str | None) -> Group | None:
    """The weights of one folder: its shard index, else its one safetensors file; None if none."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index_path = _pick(indexes, "shard indexes", folder)
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{index_path}: not a shard index (needs a JSON object with weight_map)") from None
        parts = []
        for shard in dict.fromkeys(weight_map.values()):
            shard_path = folder / shard
            if not shard_path.is_file():
                raise InputError(f"{index_path}: names shard {shard}, which is missing")
            parts.append(Part(component, rel_folder / shard, SafetensorsFile(shard_path)))
        group = Group(component, parts, index_rel=rel_folder / index_path.name, index=index)
        for key, shard in weight_map.items():
            if key not in group.key_to_part:
                raise InputError(f"{index_path}: tensor {key!r} is mapped to {shard} but is not in it")
        return group
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        return None
    chosen = _pick(files, "weight files", folder)
    return Group(component, [Part(component, rel_folder / chosen.name, SafetensorsFile(chosen))])


def pipeline_index(folder: Path) -> Path | None:
    """The ``model_index.json`` (or ``modular_model_index.json``) of a diffusers pipeline folder; None if none."""
    return next((folder / n for n in PIPELINE_INDEXES if (folder / n).is_file()), None)


def _component_of(name: str) -> str | None:
    return name if name in KNOWN_COMPONENTS else None


def _component_from_config(folder: Path) -> str | None:
    """The component a diffusers model folder under another name is (``config.json`` ``_class_name``):
    a merged ``transformer/`` written to ``my_finetune/`` still is a transformer."""
    try:
        cls = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(cls, str):
        return None
    if "Transformer" in cls and cls.endswith("Model"):
        return "transformer"
    if cls.startswith("UNet") and cls.endswith("ConditionModel"):
        return "unet"
    from loratool.arch import dit

    for spec in dit.specs().values():  # sub-models: Anima's AnimaTextConditioner is a text_conditioner
        for sub in spec.submodels:
            if cls == sub.diffusers_class:
                return sub.component
    return None


def open_checkpoint(ref: str | os.PathLike) -> Checkpoint:
    """Open a base model (file, sharded folder, component folder, pipeline folder, ``hf://``)."""
    root = hub.resolve(ref)
    if not root.exists():
        raise InputError(f"{ref}: no such file or folder")
    if root.is_file():
        if root.name.endswith(".safetensors.index.json"):
            root = root.parent
        else:
            gguf = root.suffix.lower() == ".gguf" or (root.suffix.lower() != ".safetensors" and is_gguf(root))
            if root.suffix.lower() != ".safetensors" and not gguf:
                raise InputError(f"{root}: base models must be safetensors or GGUF (got {root.suffix or 'no suffix'})")
            opener = _gguf_group if gguf else _file_group
            group = opener(root, Path(root.name), _component_of(root.parent.name))
            return Checkpoint(root, [group], is_folder=False, kind="file")
    model_index = pipeline_index(root)
    if model_index is not None:
        try:
            spec = json.loads(model_index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{model_index}: not readable JSON") from None
        groups = []
        for name in spec if isinstance(spec, dict) else ():
            sub = root / name
            if name.startswith("_") or not sub.is_dir():
                continue
            group = _folder_group(sub, Path(name), name)
            if group is not None:
                groups.append(group)
        if not groups:
            raise InputError(f"{root}: pipeline folder without safetensors weights in its component folders")
        return Checkpoint(root, groups, is_folder=True, kind="pipeline")
    component = _component_of(root.name) or _component_from_config(root)
    if component == "transformer_2":  # Wan 2.2 A14B's low-noise expert opened on its own: a transformer
        component = "transformer"
    group = _folder_group(root, Path("."), component)
    if group is None:
        raise InputError(
            f"{root}: no safetensors weights here (expected a .safetensors file, a *.safetensors.index.json, "
            f"or a diffusers model_index.json / modular_model_index.json)"
        )
    group.single_file = group.index is None and group.component is None
    kind = "sharded" if group.index is not None else "component"
    return Checkpoint(root, [group], is_folder=True, kind=kind)
