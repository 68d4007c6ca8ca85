"""DiT families (Wan, HunyuanVideo, LTX, Qwen-Image, Z-Image, Lumina 2, HiDream, Flux.2, Chroma, ...) on tiny
configurations of diffusers' own model classes, against diffusers' own code:

* the native single file loratool maps equals what diffusers' single-file converter reads
  (``diffusers.loaders.single_file_utils.convert_*``; HunyuanVideo 1.5: diffusers' repository script
  ``scripts/convert_hunyuan_video1_5_to_diffusers.py``, transcribed in ``tiny_dit_models``), tensor for tensor;
* native (``diffusion_model.``), kohya / musubi (``lora_unet_``) and diffusers-layout LoRAs are read with
  every key placed;
* ``convert`` to the diffusers layout gives, module for module, the ΔW PEFT builds from what diffusers'
  converter for that family makes of the same file (``lora_conversion_utils``);
* ``merge`` into the native single file and into a diffusers ``transformer/`` folder equals ``fuse_lora``;
* ``extract`` from both bases recovers the fine-tune; ``info`` names family and variant.

Key names: see ``tiny_dit_models.CASES`` (each case cites its source). A test is generated only for the families
and layouts it has an oracle for (a single file diffusers reads, a converter for the layout): nothing is skipped.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_dit_models import (
    CASES,
    check_native_checkpoint,
    converter,
    diffusers_fuse,
    kohya_lora,
    kohya_split_lora,
    lora_factors,
    native_checkpoint,
    native_lora,
    one_thread,  # noqa: F401  (autouse fixture)
    patched_converters,
    peft_deltas,
    pipeline_class,
    tiny_model,
)

import loratool
from loratool.arch import checkpoints, dit
from loratool.ops.convert import convert
from loratool.ops.extract import extract_to_file
from loratool.ops.inspect import inspect
from loratool.ops.merge import merge

FAMILIES = sorted(CASES)


def layouts(case) -> list[str]:
    """The LoRA files built for ``case``: native always, kohya / ComfyUI-spelled where the family has them."""
    kohya = ["kohya"] if case.kohya_split or case.kohya_targets else []
    return ["native", *kohya, *(["comfy"] if case.comfy else [])]


def oracle_of(layout: str) -> str:
    """The layout diffusers' converter is asked about: a ComfyUI-spelled file against the same LoRA in the original
    naming (diffusers reads only that one)."""
    return "native" if layout == "comfy" else layout


def converter_for(case, layout: str):
    return {"native": case.native_converter, "kohya": case.kohya_converter}[oracle_of(layout)]


# parameters only where there is something to hold them against: families diffusers reads a single file of, and
# layouts whose oracle layout diffusers (or, for HunyuanVideo 1.5, its conversion script) has a converter for
SINGLE_FILE_FAMILIES = [f for f in FAMILIES if CASES[f].single_file is not None]
CONVERT_CASES = [pytest.param(f, layout, id=f"{f}-{layout}") for f in FAMILIES for layout in layouts(CASES[f])
                 if converter_for(CASES[f], layout) is not None]
MERGE_CASES = [pytest.param(f, kind, id=f"{f}-{kind}") for f in FAMILIES
               for kind in (["single_file"] if f in SINGLE_FILE_FAMILIES else []) + ["folder"]]


def relerr(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor | None = None) -> float:
    ref = want - base if base is not None else want
    return float((got.double() - want.double()).norm() / ref.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Each family's files, built once per module whatever order the parametrized tests run in."""
    cache: dict[str, tuple] = {}

    def get(family: str) -> tuple:
        if family not in cache:
            cache[family] = build(CASES[family], tmp_path_factory)
        return cache[family]

    return get


@pytest.fixture(params=FAMILIES)
def built(request, builds):
    """The family the test is parametrized with (every family unless the test names its own list), built."""
    return builds(request.param)


def build(case, tmp_path_factory):
    """A tiny model of the family, its native single file, a transformer/ folder and its LoRA files."""
    tmp = tmp_path_factory.mktemp(case.family)
    model = tiny_model(case)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    native = native_checkpoint(case, state) if case.single_file is not None else None
    if native is not None:
        save_file(native, tmp / "base.safetensors")
    model.save_pretrained(tmp / "transformer", safe_serialization=True)
    factors = lora_factors(case, state, seed=3)
    builders = {
        "native": lambda: native_lora(case, factors),
        "kohya": lambda: kohya_split_lora(case, factors, state) if case.kohya_split
        else kohya_lora({p: factors[p] for p in case.kohya_targets}),
        "comfy": lambda: native_lora(case, factors, prefix="diffusion_model.", names=case.comfy),
    }
    files = {layout: builders[layout]() for layout in layouts(case)}
    for name, sd in files.items():
        save_file(sd, tmp / f"{name}.safetensors", metadata=case.metadata or None)
    return case, model, state, native, tmp, files


def expected_paths(case, natives) -> set[str]:
    naming = dit.get(case.family).primary
    return {t for n in natives for t in naming.diffusers_of(n)}


@pytest.mark.parametrize("built", SINGLE_FILE_FAMILIES, indirect=True)
def test_native_single_file_is_what_diffusers_reads(built):
    case, _, state, native, _, _ = built
    check_native_checkpoint(case, native, state)
    targets = checkpoints.canonical_targets({k: tuple(v.shape) for k, v in native.items()}, transforms=True)
    assert checkpoints.checkpoint_family(native) == case.family
    assert {p for _, p in targets} == set(state)  # every diffusers parameter found in the single file


def test_every_key_is_placed(built, tmp_path):
    case, _, state, _, tmp, files = built
    for layout in files:
        adapter = loratool.load(tmp / f"{layout}.safetensors")
        natives = case.kohya_targets if layout == "kohya" else case.targets
        assert {m.path for m in adapter} == expected_paths(case, natives), layout
        if layout == "kohya" and case.kohya_split:
            # diffusers names in a kohya file: each part its own module, none fused back
            assert len(adapter) == len(expected_paths(case, natives))
        assert adapter.source_format == ("kohya" if layout == "kohya" else "native")
        assert all(f"{m.path}.weight" in state for m in adapter)
    # the diffusers layout, as diffusers' own converter writes it

    # (a copy: diffusers' Wan converter scales cross-attention factors in place)
    with patched_converters(case):
        conv = pipeline_class(case).lora_state_dict({k: v.clone() for k, v in
                                                                  files[case.oracle_layout].items()})
    # (diffusers' Flux kohya converter leaves the embedders without the component prefix)
    conv = {k if k.startswith("transformer.") else "transformer." + k: v for k, v in conv.items()}
    save_file({k: v.clone().contiguous() for k, v in conv.items()}, tmp_path / "d.safetensors")
    adapter = loratool.load(tmp_path / "d.safetensors")
    assert {m.path for m in adapter} == expected_paths(case, oracle_targets(case))


def oracle_targets(case) -> list[str]:
    return case.targets if case.oracle_layout == "native" else case.kohya_targets


def load_deltas(case, tiny, lora_file=None, state=None, metadata=None):
    """PEFT ΔW per module after diffusers loads ``lora_file`` (converted by its pipeline loader) into a fresh
    copy of the tiny model."""

    pipe = pipeline_class(case)
    model = tiny_model(case)
    if lora_file is not None:
        with patched_converters(case):
            state, metadata = pipe.lora_state_dict(str(lora_file), return_lora_metadata=True)
        state = {k if k.startswith("transformer.") else "transformer." + k: v for k, v in state.items()}
    model.load_lora_adapter(state, prefix="transformer", metadata=metadata)
    return peft_deltas(model)


@pytest.mark.parametrize("built, layout", CONVERT_CASES, indirect=["built"])
def test_convert_to_diffusers_equals_diffusers_converter(built, layout, tmp_path):
    """ΔW for ΔW (PEFT's get_delta_weight on what diffusers loads). The ComfyUI-spelled file is held against
    diffusers' conversion of the same LoRA in the original naming (diffusers reads only that one)."""
    case, _, _, _, tmp, files = built
    oracle = oracle_of(layout)
    convert(tmp / f"{layout}.safetensors", "diffusers", tmp_path / "out.safetensors")
    ours = load_deltas(case, None, tmp_path / "out.safetensors")
    theirs = load_deltas(case, None, tmp / f"{oracle}.safetensors")
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:6]
    worst = max(relerr(ours[k], theirs[k]) for k in theirs)
    assert worst <= 1e-14, worst  # measured ≤ 1.6e-16 (float64)


@pytest.mark.parametrize("built, base_kind", MERGE_CASES, indirect=["built"])
def test_merge_equals_fuse_lora(built, base_kind, tmp_path):
    case, _, state, native, tmp, files = built
    layout = case.oracle_layout
    oracle = diffusers_fuse(case, tiny_model(case), files[layout])
    touched = {k for k in oracle if not torch.equal(oracle[k], state[k])}
    assert touched >= {t + ".weight" for t in expected_paths(case, oracle_targets(case))}
    base, out = (tmp / "transformer", tmp_path / "out") if base_kind == "folder" else \
        (tmp / "base.safetensors", tmp_path / "out.safetensors")
    # a split kohya file holds the native file's ΔW: both must merge to diffusers' result
    for source in {layout, "native"} if case.kohya_split else {layout}:
        result = merge(base, [tmp / f"{source}.safetensors"], out, force=True)
        got = canonical_weights(out, case)
        assert not result.unmatched, result.unmatched
        for k in state:
            if k in touched:
                assert relerr(got[k], oracle[k], state[k]) <= 1e-14, (source, k)  # measured ≤ 2.3e-16
            else:
                assert torch.equal(got[k], state[k]), (source, k)


def test_extract_from_both_bases(built, tmp_path):
    case, _, state, native, tmp, files = built
    pairs = [(tmp_path / "ft", tmp / "transformer")]
    if case.single_file is not None:
        pairs.append((tmp_path / "ft.safetensors", tmp / "base.safetensors"))
    for ft, base in pairs:
        merge(base, [tmp / f"{case.oracle_layout}.safetensors"], ft)
        out = tmp_path / f"x_{ft.name}.safetensors"
        result = extract_to_file(ft, base, out, rank=64, exact=True, dtype=torch.float64, out_dtype=torch.float64)
        assert result.modules and max(m.rel_error for m in result.modules) <= 1e-10
        back = tmp_path / f"back_{ft.name}" if base.is_dir() else tmp_path / f"back_{ft.name}.safetensors"
        merge(base, [out], back)
        want, got = canonical_weights(ft, case), canonical_weights(back, case)
        assert set(want) == set(got) == set(state)
        # bias deltas (diff_b) are 1-D: reported as not extracted, never dropped silently
        skipped = {s.name for s in result.not_extracted}
        assert skipped == {t + ".bias" for t in expected_paths(case, case.diff_b)}
        for k in want:
            if k not in skipped:
                assert torch.allclose(got[k], want[k], rtol=0, atol=1e-12), k


def canonical_weights(path, case) -> dict[str, torch.Tensor]:
    """{diffusers parameter: tensor} of a transformer/ folder, or of a native single file as the family's single-file
    converter reads it (diffusers' own; HunyuanVideo 1.5: its conversion script's rules), never through loratool's
    map."""
    if path.is_dir():
        return load_file(path / "diffusion_pytorch_model.safetensors")
    return converter(case, case.single_file)(load_file(path))


def test_info_names_family_and_variant(built):
    case, _, _, _, tmp, files = built
    for layout in files:
        report = inspect(tmp / f"{layout}.safetensors")
        assert report.family == case.family, layout
        assert case.variant in (report.variant or ""), (layout, report.variant)
    folder = inspect(tmp / "transformer")
    assert folder.family == case.family
    if case.single_file is None:
        return
    base = inspect(tmp / "base.safetensors")
    assert base.family == case.family
    if case.base_variant is not None:
        assert case.base_variant in (base.variant or ""), base.variant


@pytest.mark.parametrize("base_kind", ["single_file", "folder"])
def test_wan21_i2v_lora_on_t2v_base_is_reported_per_group(tmp_path, base_kind):
    """A Wan 2.1 I2V LoRA (image cross-attention k_img / v_img, img_emb) merged into a T2V base: everything
    else merges, the I2V-only modules are reported in named groups with the reason, never dropped silently
    (``--strict`` refuses). Key names: diffusers' _convert_non_diffusers_wan_lora_to_diffusers (k_img / v_img)."""
    from tiny_dit_models import WAN_TINY

    from loratool.errors import MatchError

    case = CASES["wan"]
    i2v_state = tiny_model(case).state_dict()
    t2v = tiny_model(case, WAN_TINY)
    state = {k: v.clone() for k, v in t2v.state_dict().items()}
    if base_kind == "folder":
        t2v.save_pretrained(tmp_path / "transformer", safe_serialization=True)
        base, out = tmp_path / "transformer", tmp_path / "out"
    else:
        save_file(native_checkpoint(case, state), tmp_path / "base.safetensors")
        base, out = tmp_path / "base.safetensors", tmp_path / "out.safetensors"
    save_file(native_lora(case, lora_factors(case, i2v_state, seed=3)), tmp_path / "i2v.safetensors")
    result = merge(base, [tmp_path / "i2v.safetensors"], out)
    groups = {g["group"]: g for g in result.unmatched_groups}
    assert set(groups) == {"image cross-attention (cross_attn.k_img / v_img)", "image embedder (img_emb)"}
    assert groups["image cross-attention (cross_attn.k_img / v_img)"]["module_count"] == 4
    assert "only Wan 2.1 I2V" in groups["image embedder (img_emb)"]["reason"]
    assert sorted(result.unmatched) == sorted(lab for g in result.unmatched_groups for lab in g["labels"])
    assert sum(result.matched.values()) == len(case.targets) - 6
    with pytest.raises(MatchError, match="--strict"):
        merge(base, [tmp_path / "i2v.safetensors"], tmp_path / "strict.safetensors" if base_kind != "folder"
              else tmp_path / "strict", strict=True)


def test_native_and_kohya_names_round_trip(built, tmp_path):
    """native -> diffusers -> native and kohya -> canonical -> kohya: the same ΔW per module (native names written
    back from diffusers ones: fused modules fuse again exactly), and the kohya file key for key."""
    from loratool.delta import delta_weight

    case, _, _, _, tmp, files = built
    family = case.family
    convert(tmp / "native.safetensors", "diffusers", tmp_path / "d.safetensors")
    back = convert(tmp_path / "d.safetensors", "native", tmp_path / "n.safetensors", family=family)
    assert back.modules == len(expected_paths(case, case.targets))
    first = {m.path: m for m in loratool.load(tmp / "native.safetensors")}
    again = {m.path: m for m in loratool.load(tmp_path / "n.safetensors", family=family)}
    assert set(first) == set(again)
    for path, m in first.items():
        want, got = delta_weight(m, dtype=torch.float64), delta_weight(again[path], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=0, atol=1e-12), path
    if "kohya" in files and not case.kohya_split:
        convert(tmp / "kohya.safetensors", "kohya", tmp_path / "k.safetensors")
        k = load_file(tmp_path / "k.safetensors")
        assert set(k) == set(files["kohya"])
        for key, v in files["kohya"].items():
            assert torch.allclose(k[key].double(), v.double(), rtol=0, atol=1e-12), key


def test_tables_cover_the_tiny_models():
    """Every weight-owning module of each tiny diffusers model is in its family's generated table, and has a
    native name (partial namings excepted)."""
    import diffusers

    from loratool.arch.generate import meta_model, weight_paths

    for case in CASES.values():
        spec = dit.get(case.family)
        model = meta_model(lambda c=case: getattr(diffusers, c.cls)(**c.config))
        for path in weight_paths(model):
            assert dit.diffusers_module(path), (case.family, path)
            if not spec.partial:
                assert spec.primary.native_of(path) is not None, (case.family, path)
