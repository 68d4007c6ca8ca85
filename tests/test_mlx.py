"""MLX-LM adapters (``adapters.safetensors`` + ``adapter_config.json`` with ``lora_parameters``), read and written.

Names and maths from ml-explore/mlx-lm: ``mlx_lm/tuner/trainer.py`` saves ``tree_flatten(model.trainable_parameters())``
(``model.layers.0.self_attn.q_proj.lora_a`` [in, r], ``.lora_b`` [r, out], DoRA ``.m``); ``mlx_lm/tuner/lora.py``
``LoRALinear.fuse``: W' = W + scale · lora_bᵀ @ lora_aᵀ; ``dora.py`` ``DoRALinear.fuse``: m / ‖W'‖_row ⊙ W'.
mlx itself does not run here (no Linux wheel in this environment), so the files are built from a PEFT adapter by
that parameterisation (lora_a = Aᵀ, lora_b = Bᵀ, scale = alpha / r) and PEFT's ``merge_and_unload`` is the oracle.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from merge_oracles import assert_merged, save_base
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import randomize_lora, tiny_llama

import loratool
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect
from loratool.ops.merge import merge


@pytest.fixture(scope="module")
def llama():
    return tiny_llama().double()


def _peft(model, dora=False, **kw):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora, **kw)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    randomize_lora(peft_model, seed=3)
    return peft_model


def mlx_from_peft(peft_model, folder, dora=False):
    """The adapter mlx-lm would hold for the same update (see module doc), as its trainer saves it."""
    from peft.tuners.lora import LoraLayer

    folder.mkdir()
    tensors = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer):
            path = name.removeprefix("base_model.model.")
            tensors[f"{path}.lora_a"] = mod.lora_A["default"].weight.detach().T.contiguous()
            tensors[f"{path}.lora_b"] = mod.lora_B["default"].weight.detach().T.contiguous()
            if dora:
                tensors[f"{path}.m"] = mod.lora_magnitude_vector["default"].weight.detach().clone()
    save_file(tensors, folder / "adapters.safetensors")
    save_file(tensors, folder / "0000100_adapters.safetensors")  # a training checkpoint beside it
    config = {"model": "tiny-llama", "fine_tune_type": "dora" if dora else "lora", "num_layers": 2,
              "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}, "iters": 100}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return len(tensors) // (3 if dora else 2)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_mlx_adapter_merges_as_peft(tmp_path, llama, dora):
    base = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    peft_model = _peft(llama, dora=dora)
    n = mlx_from_peft(peft_model, tmp_path / "mlx", dora=dora)
    info = inspect(tmp_path / "mlx").to_json()
    assert (info["format"], info["dialect"], info["family"], info["module_count"]) == ("mlx", "mlx-lm", "llm", n)
    assert info["scales"] == {"2": n} and info["dora_modules"] == (n if dora else 0)
    base_path = save_base(base, tmp_path / "model.safetensors")
    merge(base_path, [tmp_path / "mlx"], tmp_path / "merged.safetensors")
    expected = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    assert assert_merged(tmp_path / "merged.safetensors", expected, base, tol=1e-12) == n


def test_to_mlx_pads_ranks_folds_scales_and_peft_gets_it_back(tmp_path, llama):
    """PEFT with rank / alpha patterns -> --to mlx (one rank, one scale) -> --to peft: PEFT loads the result and
    merges the weights the original adapter merges."""
    base = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    peft_model = _peft(llama, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 2})
    peft_model.save_pretrained(tmp_path / "peft")
    expected = {k: v.detach().clone() for k, v in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()}

    convert(tmp_path / "peft", "mlx", tmp_path / "mlx")
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == -1
    assert config["lora_parameters"]["rank"] == 4 and config["lora_parameters"]["scale"] in (0.5, 2.0, 4.0)
    assert config["lora_parameters"]["keys"] == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    written = load_file(tmp_path / "mlx" / "adapters.safetensors")
    assert written["model.layers.0.self_attn.v_proj.lora_a"].shape == (32, 4)  # rank 2 padded to 4
    assert written["model.layers.1.mlp.down_proj.lora_b"].shape == (4, 32)

    merge(save_base(base, tmp_path / "model.safetensors"), [tmp_path / "mlx"], tmp_path / "m1.safetensors")
    assert assert_merged(tmp_path / "m1.safetensors", expected, base, tol=1e-12) == 6

    convert(tmp_path / "mlx", "peft", tmp_path / "back")
    back = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "back").merge_and_unload().state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(back[k], v, rtol=1e-12, atol=1e-12)
    assert loratool.load(tmp_path / "back").source_format == "peft"
