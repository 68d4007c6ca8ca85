"""The Python API: ``load`` any layout into an :class:`Adapter`, ``save`` it in any layout."""

from __future__ import annotations

import os
from pathlib import Path

from loratool import formats
from loratool.adapter import Adapter
from loratool.errors import FormatError, InputError
from loratool.formats.source import Source, open_source
from loratool.validate import check_adapter

# Exceptions a reader raises when a file breaks its assumptions; anything else stays a bug.
_READER_SLIPS = (KeyError, IndexError, ValueError, RuntimeError, TypeError, NotImplementedError)
# Layouts whose keys are kohya names (their key-based family scores apply).
KOHYA_NAMED = ("kohya", "lycoris")


def base_vocabulary(base: str | os.PathLike) -> dict[str, set[str]]:
    """{component: dotted module paths} of a base model, from its tensor names only."""
    from loratool.io.checkpoint import open_checkpoint

    return open_checkpoint(base).module_vocabulary()


def load(
    path: str | os.PathLike,
    format: str | None = None,
    *,
    base: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    family: str | None = None,
) -> Adapter:
    """Read an adapter file or folder (or ``hf://`` reference) into the canonical schema.

    ``format`` overrides detection; ``base`` gives kohya names a vocabulary to be restored
    from; ``config`` is a loralib sidecar or PEFT ``adapter_config.json``.
    """
    src = open_source(path, config=config)
    name = format or formats.detect(src)
    opts = formats.ReadOptions(vocabulary=base_vocabulary(base) if base else None, family=family)
    return read_source(src, name, opts, path)


def read_source(src: Source, name: str, opts: formats.ReadOptions, path: str | os.PathLike) -> Adapter:
    """Run layout ``name``'s reader on an opened source and check what it built.

    Readers map keys; a malformed but parseable file (missing partner key, odd shape,
    non-tensor value) can still trip one, and then the file is at fault: the error names the
    file, not the line where the reader fell.
    """
    try:
        if src.parts:
            adapter = join_components([formats.layout(name).read(part, opts) for part in src.parts], src)
        else:
            adapter = formats.layout(name).read(src, opts)
    except _READER_SLIPS as exc:
        detail = " ".join(str(exc).split())[:160]
        raise InputError(
            f"{path}: malformed {name} adapter ({exc.__class__.__name__}: {detail}); run with --debug for details"
        ) from exc
    if not len(adapter) and not adapter.extras:
        raise FormatError(f"{path}: no LoRA modules found")
    check_adapter(adapter, str(path))
    set_family(adapter, src, name, opts)
    return adapter


def join_components(adapters: list[Adapter], src: Source) -> Adapter:
    """One adapter from the adapters of a folder's component folders (``P/unet``, ``P/text_encoder``...)."""
    out = Adapter(source_format=adapters[0].source_format)
    for adapter, part in zip(adapters, src.parts):
        for comp in adapter.components:
            if comp in out.components:
                raise FormatError(f"{part.folder}: component {comp!r} is also in another folder of {src.path}")
        for m in adapter:
            out.add(m)
        out.extras.update(adapter.extras)
        out.config.update(adapter.config)
        for k, v in adapter.metadata.items():
            out.metadata.setdefault(k, v)
    return out


def set_family(adapter: Adapter, src: Source, name: str, opts: formats.ReadOptions) -> None:
    """``Adapter.family``: ``--family`` when given and plausible, else what the names, shapes and metadata
    say (:func:`loratool.arch.family_of`), else what the reader decided."""
    from loratool import arch

    kohya_keys = tuple(src.keys) if name in KOHYA_NAMED else ()
    if opts.family:
        adapter.family = arch.check_family(opts.family, adapter, kohya_keys).name
    else:
        adapter.family = arch.family_of(adapter, kohya_keys) or adapter.family


def save(
    adapter: Adapter,
    path: str | os.PathLike,
    format: str,
    *,
    force: bool = False,
    inputs: tuple = (),
    family: str | None = None,
) -> list[Path]:
    """Write ``adapter`` in layout ``format``; returns the files written."""
    if format not in formats.WRITABLE:
        raise FormatError(f"cannot write layout {format!r}; writable: {', '.join(formats.WRITABLE)}")
    opts = formats.WriteOptions(force=force, inputs=tuple(inputs), family=family)
    return formats.layout(format).write(adapter, Path(path), opts)
