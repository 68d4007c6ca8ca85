"""``convert --as-lora``: LoHa, LoKr, LoCon Tucker, full and DoRA modules become plain LoRA that PEFT and
diffusers load with no missing or unexpected keys, exact where the rank allows (Hadamard / Kronecker
products have rank ≤ r₁·r₂), else the best rank N, and the error the tool prints is the ΔW error of
what it wrote.

Oracles: the ``lycoris`` package's own modules (their forward's ΔW; lycoris 4.1.3's ``merge_to`` squares
the LoHa / LoKr scale, see test_format_lycoris), PEFT's ``set_peft_model_state_dict`` / ``get_delta_weight``
/ ``merge_and_unload`` (DoRA), diffusers' ``load_lora_weights``, numpy's float64 SVD for the optimum.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from test_format_lycoris import _network
from tiny_models import randomize_lora, tiny_llama, tiny_unet

import loratool
from loratool.cli import main
from loratool.delta import delta_weight
from loratool.ops.as_lora import as_lora

_FILES: dict[str, object] = {}
_SHAPES: dict[str, tuple[int, ...]] = {}


def _lycoris_file(tmp_path, algo, **kw):
    """A LyCORIS file of the tiny U-Net, built once per configuration for the whole module."""
    name = algo + "".join(f"_{k}{v}" for k, v in sorted(kw.items()))
    if name not in _FILES:
        _FILES[name] = _build_lycoris(tmp_path, name, algo, **kw)
    return _FILES[name]


def _build_lycoris(tmp_path, name, algo, **kw):
    net = _network(tiny_unet(), algo, **kw)
    path = tmp_path / f"{name}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return path


def _unet_base(tmp_path):
    """The tiny U-Net's weights (only their shapes are read: LyCORIS stores conv LoHa factors flattened)."""
    folder = tmp_path / "base" / "unet"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "diffusion_pytorch_model.safetensors"
    if not path.exists():
        save_file({k: v.contiguous() for k, v in tiny_unet().state_dict().items()}, str(path))
    return path


def _sample(items: dict, n: int = 24):
    """Every module of each kind of layer shape, then a fixed sample (numpy SVDs of all 121 modules
    would cost seconds)."""
    keys = sorted(items)
    picked = keys[:: max(1, len(keys) // n)]
    return [(k, items[k]) for k in picked]


def _deltas(adapter) -> dict[str, torch.Tensor]:
    """ΔW of every module shaped like the tiny U-Net's weight."""
    if not _SHAPES:
        _SHAPES.update({n: tuple(p.shape) for n, p in tiny_unet().named_parameters()})
    shapes = _SHAPES
    return {m.path: delta_weight(m, dtype=torch.float64, shape=shapes[m.path + ".weight"]) for m in adapter}


def _convert(tmp_path, src, to, *extra, capsys):
    out = tmp_path / ("peft_out" if to == "peft" else f"out_{to}.safetensors")
    code = main(["convert", str(src), "--to", to, "-o", str(out), "--as-lora", "--family", "sd1",
                 "--base", str(_unet_base(tmp_path)), *extra, "--json"])
    assert code == 0
    return out, json.loads(capsys.readouterr().out)


def _peft_load(folder):
    """Load a PEFT folder into a fresh tiny U-Net the way PeftModel does, returning the model and
    the incompatible keys."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    unet = tiny_unet().double()
    config = LoraConfig(**{k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__})
    unet = inject_adapter_in_model(config, unet)
    state = load_file(str(folder / "adapter_model.safetensors"))
    state = {k.removeprefix("base_model.model."): v.double() for k, v in state.items()}
    result = set_peft_model_state_dict(unet, state)
    return unet, result


@pytest.mark.parametrize("algo,kw", [
    ("loha", {}), ("loha", {"use_tucker": True, "conv_dim": 2, "conv_alpha": 1.0}),
    ("lokr", {"factor": 4}), ("lokr", {"factor": 8, "decompose_both": True, "dim": 2}),
    ("locon", {"use_tucker": True, "conv_dim": 4, "conv_alpha": 1.0}), ("full", {}),
])
def test_exact_conversion_loads_in_peft_without_key_errors(tmp_path, capsys, algo, kw):
    src = _lycoris_file(tmp_path, algo, **kw)
    want = _deltas(loratool.load(src, family="sd1"))
    out, doc = _convert(tmp_path, src, "peft", capsys=capsys)
    assert doc["modules"], "nothing was converted"
    unet, result = _peft_load(out)
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if "lora_" in k]
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == set(want)
    printed = {c["path"]: c for c in doc["modules"]}
    for path, layer in _sample(layers):
        got = layer.get_delta_weight("default").detach().double()
        err = float((got - want[path]).norm())
        norm = float(want[path].norm())
        assert err <= 2e-6 * norm, (path, err / norm)  # exact up to the float32 factors written
        if path in printed:  # plain LoCon modules beside the Tucker ones are copied as they are
            assert printed[path]["error"] == pytest.approx(err, rel=0.05, abs=2e-7 * norm)
            assert printed[path]["norm"] == pytest.approx(norm, rel=1e-6)


def test_lokr_rank_is_the_product_of_the_factor_ranks(tmp_path):
    src = _lycoris_file(tmp_path, "lokr", factor=8, decompose_both=True, dim=2)
    adapter = loratool.load(src, family="sd1")
    res = as_lora(adapter, device="cpu", base=_unet_base(tmp_path))
    for rep in res.modules:
        m = adapter.modules[(rep.component, rep.path)]
        w1 = m.tensors["w1"] if "w1" in m.tensors else m.tensors["w1a"] @ m.tensors["w1b"]
        bound = int(torch.linalg.matrix_rank(w1.double())) * (m.tensors["w2b"].shape[0] if "w2b" in m.tensors
                                                               else min(m.tensors["w2"].reshape(
                                                                   m.tensors["w2"].shape[0], -1).shape))
        assert rep.rank_out <= bound


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_truncated_conversion_is_optimal_and_prints_its_error(tmp_path, capsys, algo):
    src = _lycoris_file(tmp_path, algo, **({"factor": 4} if algo == "lokr" else {}))
    adapter = loratool.load(src, family="sd1")
    want = _deltas(adapter)
    out, doc = _convert(tmp_path, src, "kohya", "--rank", "3", capsys=capsys)
    written = loratool.load(out, family="sd1")
    for _, c in _sample({f'{c["component"]}:{c["path"]}': c for c in doc["modules"]}):
        path = c["path"]
        mod = next(m for m in written if m.path == path)
        assert mod.kind == "lora" and mod.rank == c["rank_out"] <= 3
        delta = want[path]
        matrix = delta.reshape(delta.shape[0], -1).numpy()
        s = np.linalg.svd(matrix, compute_uv=False)
        optimum = float(np.sqrt((s[c["rank_out"]:] ** 2).sum()))
        err = float((delta_weight(mod, dtype=torch.float64, shape=tuple(delta.shape)) - delta).norm())
        assert err <= optimum * (1 + 1e-6) + 1e-6 * float(np.linalg.norm(matrix))
        assert c["error"] == pytest.approx(err, rel=1e-4, abs=1e-6 * float(np.linalg.norm(matrix)))


def test_diffusers_output_loads_in_diffusers(tmp_path, capsys):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class _Pipe(StableDiffusionLoraLoaderMixin):
        hf_device_map = None

        def __init__(self, unet):
            self.unet = unet
            self.text_encoder = None

        @property
        def components(self):
            return {"unet": self.unet}

    src = _lycoris_file(tmp_path, "loha")
    want = _deltas(loratool.load(src, family="sd1"))
    out, _ = _convert(tmp_path, src, "diffusers", capsys=capsys)
    pipe = _Pipe(tiny_unet().double())
    pipe.load_lora_weights(str(out))
    layers = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == set(want)
    for path, layer in _sample(layers):
        name = next(iter(layer.lora_A))
        got = layer.get_delta_weight(name).detach().double()
        assert float((got - want[path]).norm()) <= 2e-6 * float(want[path].norm()), path


def test_dora_becomes_plain_lora_for_a_base(tmp_path, capsys):
    """PEFT DoRA on a tiny Llama: the plain LoRA at full rank reproduces PEFT's merged DoRA weights; at
    the DoRA's own rank its printed error is the measured distance to them."""
    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = tmp_path / "base"
    base.mkdir()
    save_file(base_state, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps(model.config.to_dict()))
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"]))
    randomize_lora(pm, std=0.3)
    folder = tmp_path / "dora"
    pm.save_pretrained(str(folder))
    merged = pm.merge_and_unload().state_dict()
    for rank, tol in ((None, None), (32, 1e-6)):
        out = tmp_path / f"plain_{rank}"
        args = ["convert", str(folder), "--to", "peft", "-o", str(out), "--as-lora", "--base", str(base), "--json"]
        if rank:
            args += ["--rank", str(rank)]
        assert main(args) == 0
        doc = json.loads(capsys.readouterr().out)
        assert {c["kind"] for c in doc["modules"]} == {"dora"} and len(doc["modules"]) == 4
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert not cfg["use_dora"]
        plain = loratool.load(out)
        for c in doc["modules"]:
            path = c["path"]
            key = path + ".weight"
            target = merged[key].double() - base_state[key].double()
            got = delta_weight(plain.modules[("model", path)], dtype=torch.float64)
            err = float((got - target).norm())
            assert c["error"] == pytest.approx(err, rel=1e-3, abs=1e-6 * float(target.norm()))
            if tol is None:
                assert c["rank_out"] == 2 and c["rel_error"] > 1e-4  # DoRA is not rank 2: the error shows
            else:
                assert c["rank_out"] == min(32, *target.shape) and err <= tol * float(target.norm())


def test_dora_without_base_is_refused(tmp_path, capsys):
    model = tiny_llama()
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj"]))
    randomize_lora(pm)
    pm.save_pretrained(str(tmp_path / "dora"))
    code = main(["convert", str(tmp_path / "dora"), "--to", "peft", "-o", str(tmp_path / "o"), "--as-lora"])
    err = capsys.readouterr().err
    assert code == 2 and "needs the base weight" in err and not (tmp_path / "o").exists()


def test_flattened_unet_products_need_the_base(tmp_path, capsys):
    src = _lycoris_file(tmp_path, "loha")
    code = main(["convert", str(src), "--to", "kohya", "-o", str(tmp_path / "o.safetensors"), "--as-lora"])
    err = capsys.readouterr().err
    assert code == 2 and "--base" in err and not (tmp_path / "o.safetensors").exists()
