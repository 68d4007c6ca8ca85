"""The Python API: ``load`` any layout into an :class:`Adapter`, ``save`` it in any layout, and the
command line's operations (``inspect``, ``convert``, ``merge``, ``resize``, ``stack``, ``extract``)
as functions; ``import loratool`` gives every one of them (docs/python-api.md)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from loratool import formats
from loratool.adapter import Adapter
from loratool.errors import FormatError, InputError
from loratool.formats.source import Source, open_source
from loratool.io.local_paths import local_names
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
    from; ``config`` is a loralib sidecar or PEFT ``adapter_config.json``. Tensors keep their
    stored dtype; every module carries its own alpha, so ``module.scale`` = alpha / rank
    (alpha / √rank for rsLoRA) and ΔW = scale · up @ down (:func:`loratool.delta.delta_weight`).
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
    model_config: dict | None = None,
) -> list[Path]:
    """Write ``adapter`` in layout ``format`` (kohya, diffusers, peft, loralib, gguf); returns the files written.

    The tensors are written as they are (no maths); each writer stores every module's scale =
    alpha / rank its own way. Absolute local paths in the metadata and configs are written as
    their last part (:mod:`loratool.io.local_paths`). ``force`` replaces an existing output;
    ``inputs`` are paths the output must not overwrite; ``model_config`` is the base model's HF
    ``config.json`` (needed by ``gguf``).
    """
    if format not in formats.WRITABLE:
        raise FormatError(f"cannot write layout {format!r}; writable: {', '.join(formats.WRITABLE)}")
    opts = formats.WriteOptions(force=force, inputs=tuple(inputs), family=family, model_config=model_config)
    # A shared file must not tell where its author keeps things: absolute paths become names.
    shared = dataclasses.replace(adapter, metadata=local_names(adapter.metadata), config=local_names(adapter.config))
    return formats.layout(format).write(shared, Path(path), opts)


# ---------------------------------------------------------------- operations, from the top level
#
# ``loratool.merge(...)`` and friends: the command line's operations with the same arguments, for
# paths or in-memory adapters. Each returns the operation's result object (``.to_json()`` is the
# ``--json`` document) and writes only when given an output.

Lora = Adapter | str | os.PathLike


def _adapter(item: Lora) -> Adapter:
    return item if isinstance(item, Adapter) else load(item)


def _label(item: Lora, i: int) -> str:
    return f"adapter {i + 1}" if isinstance(item, Adapter) else Path(str(item)).name


def inspect(path: str | os.PathLike, **options):
    """Describe an adapter (``InfoReport``) or a base model (``CheckpointReport``), as ``loratool info``.

    Reads the safetensors header only unless ``stats=True``; sizes are bytes. With ``stats`` each
    module gets, from the singular values σᵢ of its ΔW (float64): ``norm`` = ‖ΔW‖F = √Σσᵢ² (the
    weight's own units), ``effective_rank`` = exp(−Σ pᵢ log pᵢ) with pᵢ = σᵢ/Σσⱼ,
    ``numerical_rank`` and ``sigma_max`` = σ₁. ``options``: ``format``, ``base``, ``config``,
    ``family``, ``stats``, ``progress``.
    """
    from loratool.ops.inspect import inspect as run

    return run(path, **options)


def convert(lora: str | os.PathLike, to: str, output: str | os.PathLike, **options):
    """Write ``lora`` in layout ``to`` at ``output`` (``ConvertResult``), as ``loratool convert``.

    No maths: every module keeps its factors and its scale = alpha / rank; only names and the way
    alpha is stored change. ``options``: ``from_format``, ``base``, ``config``, ``family``, ``force``.
    """
    from loratool.ops.convert import convert as run

    return run(lora, to, output, **options)


def merge(base: str | os.PathLike, loras, output: str | os.PathLike, strengths=None, **options):
    """Merge LoRAs into a base model and write ``output`` (``MergeResult``), as ``loratool merge``.

    W' = W + Σᵢ λᵢ·ΔWᵢ for every weight a module adapts, with ΔW = scale · up @ down (scale =
    alpha / rank; ``loratool.delta`` has every kind) and λᵢ = ``strengths`` (dimensionless; one
    number for all, one per LoRA, default 1), computed in float32 and cast back to each tensor's
    dtype once; DoRA modules as PEFT merges them. ``loras``: one or a list of paths, ``hf://``
    references or :class:`Adapter` objects. ``options``: ``dtype``, ``device``, ``strict``, ``force``,
    ``allow_nonfinite``, ``sync``, ``progress``.
    """
    from loratool.ops.merge import merge as run

    items = [loras] if isinstance(loras, (str, os.PathLike, Adapter)) else list(loras)
    return run(base, items, output, strengths, **options)


def resize(lora: Lora, rank: int, *, output: str | os.PathLike | None = None, to: str | None = None,
           force: bool = False, **options):
    """Re-rank every module to its best rank-k approximation (``ResizeResult``), as ``loratool resize``.

    ΔW_k = U_k Σ_k V_kᵀ, the truncated SVD of ΔW (Eckart–Young: the closest rank-k matrix in
    Frobenius norm), from QR of the factors and an r×r SVD; k = ``rank`` or, with ``dynamic`` /
    ``param``, the rule's choice capped at ``rank``. Each report's ``fro_kept`` = ‖ΔW_k‖F / ‖ΔW‖F
    (a fraction, 1 = exact). The scale is kept (kohya alpha rescaled to alpha·k/r). Writes ``output``
    in ``to`` or the input's layout when given. ``options``: ``conv_rank``, ``dynamic``, ``param``,
    ``device``, ``progress``.
    """
    from loratool.ops.resize import output_layout, resize_file
    from loratool.ops.resize import resize as run

    if output is not None and not isinstance(lora, Adapter):
        return resize_file(lora, output, rank, to=to, force=force, **options)
    adapter = _adapter(lora)
    result = run(adapter, rank, **options)
    if output is not None:
        layout = output_layout(adapter.source_format, to)
        result.files = save(result.adapter, output, layout, force=force)
        result.output, result.output_format = Path(output), layout
    return result


def stack(loras, weights=None, *, output: str | os.PathLike | None = None, to: str | None = None,
          dtype: str | None = None, force: bool = False, **options):
    """Add LoRAs into one adapter (``StackResult``), as ``loratool stack``.

    ΔW = Σᵢ wᵢ·ΔWᵢ over the union of the modules (``weights`` wᵢ dimensionless, default 1 each).
    ``method="concat"`` is exact (the factors are stacked, ranks add up); ``method="svd"`` with
    ``rank=N`` gives the best rank-N approximation of the same sum. ``loras``: paths or
    :class:`Adapter` objects; ``dtype`` (fp16, bf16, fp32) stores the factors in that dtype. Writes
    ``output`` in ``to`` or the first input's layout when given. ``options``: ``method``, ``rank``,
    ``device``, ``progress``.
    """
    from loratool.ops.resize import output_layout
    from loratool.ops.stack import cast_factors, stack_files
    from loratool.ops.stack import stack as run

    items = list(loras)
    if output is not None and not any(isinstance(x, Adapter) for x in items):
        return stack_files(items, output, weights, to=to, dtype=dtype, force=force, **options)
    adapters = [_adapter(x) for x in items]
    result = run(adapters, weights, labels=[_label(x, i) for i, x in enumerate(items)], **options)
    if dtype is not None:
        cast_factors(result, dtype)
    if output is not None:
        layout = output_layout(adapters[0].source_format, to)
        result.files = save(result.adapter, output, layout, force=force)
        result.output, result.output_format = Path(output), layout
    return result


def extract(finetuned: str | os.PathLike, base: str | os.PathLike, *, output: str | os.PathLike | None = None,
            to: str | None = None, force: bool = False, **options):
    """A LoRA from the difference of two models (``ExtractResult``), as ``loratool extract``.

    For every weight pair ΔW = W_finetuned − W_base ≈ U_k Σ_k V_kᵀ (randomized SVD, ``exact=True``
    for a full one), written as up = U_k Σ_k, down = V_kᵀ, alpha = k (scale 1); k = ``rank``
    (default 16). Each report's ``captured`` = ‖ΔW_k‖F / ‖ΔW‖F and ``rel_error`` = ‖ΔW − up·down‖F /
    ‖ΔW‖F (fractions). Writes ``output`` in ``to`` (default: kohya for Stable Diffusion / Flux
    parts, PEFT for transformers models) when given. ``options``: ``rank``, ``conv_rank``,
    ``dynamic``, ``param``, ``exact``, ``include``, ``exclude``, ``min_diff``, ``device``, ``seed``...
    """
    from loratool.ops.extract import extract as run
    from loratool.ops.extract import extract_to_file

    if output is not None:
        return extract_to_file(finetuned, base, output, to=to, force=force, **options)
    return run(finetuned, base, **options)
