"""llama.cpp LoRA GGUF: ``convert --to gguf`` writes what ggml-org/llama.cpp's ``convert_lora_to_gguf.py``
writes, the installed ``gguf`` package reads it back, and loratool reads it back to the same ΔW.

Rules of that script (and of llama.cpp's loader, ``src/llama-adapter.*``) checked here, with the
reference built independently of loratool's writer:

1. KV: ``general.architecture`` = the GGUF arch of the base's HF architecture (``llama`` for
   Llama / Mistral, ``qwen2``), ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``
   (FLOAT32) = ``lora_alpha`` of adapter_config.json, ``general.name``, ``general.quantization_version``;
   no other keys.
2. Tensor names: gguf-py's ``TensorNameMap`` for the arch (what ``ModelBase.map_tensor_name`` uses) of
   ``<module>.weight`` + ``.lora_a`` / ``.lora_b``, A before B, module after module; nothing else.
3. Shapes and type: lora_a = A (ggml ne [in, r]), lora_b = B (ne [r, out]), F32 (``--outtype f32``);
   llama.cpp's shape checks: weight ne[0] == a.ne[0], weight ne[1] == b.ne[1], a.ne[1] == b.ne[0].
4. llama-family q_proj / k_proj: B's rows carry ``LlamaModel.permute`` (head count; KV heads for k),
   written here as the dense permutation of the weight the script applies to base models; qwen2 none.
5. Scale: llama.cpp multiplies B·A by alpha / ne[0](lora_b); with per-module ranks / alphas
   (rank_pattern / alpha_pattern) the product must still be PEFT's ΔW (the per-module scale folded in).
6. Token embeddings: lora_a = Aᵀ (ne [r, n_vocab]), so that rows gathered by token id give ΔE.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import randomize_lora, tiny_llama

import loratool
from loratool.cli import main
from loratool.delta import delta_weight

ALPHA = 8


def _reference_permute(w: torch.Tensor, n_head: int, n_kv: int | None) -> torch.Tensor:
    """LlamaModel.permute (convert_hf_to_gguf.py) on a dense weight."""
    if n_kv is not None and n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


ARCHS = {"llama": (tiny_llama, "LlamaForCausalLM"), "qwen2": (_qwen2, "Qwen2ForCausalLM")}


def _setup(tmp_path, arch, *, embeddings=False):
    factory, hf_arch = ARCHS[arch]
    model = factory()
    base = tmp_path / f"base_{arch}"
    base.mkdir()
    cfg = model.config.to_dict()
    cfg["architectures"] = [hf_arch]
    cfg["_name_or_path"] = f"tiny/{arch}-base"
    (base / "config.json").write_text(json.dumps(cfg))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    targets += ["embed_tokens", "lm_head"] if embeddings else []
    lcfg = LoraConfig(r=4, lora_alpha=ALPHA, target_modules=targets,
                      rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
                      alpha_pattern={"k_proj": 3})
    pm = get_peft_model(model, lcfg)
    randomize_lora(pm, std=0.2)
    folder = tmp_path / f"peft_{arch}"
    pm.save_pretrained(str(folder))
    deltas = {n.removeprefix("base_model.model."): m.get_delta_weight("default").detach().double()
              for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.r}
    weights = {n.removeprefix("base_model.model."): m.get_base_layer().weight.detach()
               for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.r}
    return folder, base, cfg, deltas, weights


def _read(path):
    reader = gguf.GGUFReader(str(path))
    kv = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    return reader, kv


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_follows_convert_lora_to_gguf(tmp_path, arch):
    folder, base, cfg, deltas, weights = _setup(tmp_path, arch)
    out = tmp_path / "adapter.gguf"
    assert main(["convert", str(folder), "--to", "gguf", "-o", str(out), "--base", str(base)]) == 0
    reader, kv = _read(out)
    # rule 1
    assert set(kv) == {"general.architecture", "general.type", "general.name", "general.quantization_version",
                       "adapter.type", "adapter.lora.alpha"}
    assert kv["general.architecture"].contents() == arch
    assert kv["general.type"].contents() == "adapter" and kv["adapter.type"].contents() == "lora"
    assert kv["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert kv["adapter.lora.alpha"].contents() == ALPHA
    assert kv["general.name"].contents() == f"{arch}-base"
    # rule 2: names in the order A, B, module after module (the adapter file's module order)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), 2)
    modules = list(loratool.load(folder).modules)
    expected = []
    for _, path in modules:
        mapped = names.get_name(path + ".weight", try_suffixes=(".weight",))
        expected += [mapped + ".lora_a", mapped + ".lora_b"]
    assert [t.name for t in reader.tensors] == expected
    by_name = {t.name: t for t in reader.tensors}
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads")
    for (_, path), a_name in zip(modules, expected[::2]):
        ta, tb = by_name[a_name], by_name[a_name[: -1] + "b"]
        # rule 3
        assert ta.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.F32
        w_ne = list(weights[path].shape[::-1])  # ggml ne of the base weight [in, out]
        a_ne, b_ne = [int(x) for x in ta.shape], [int(x) for x in tb.shape]
        assert w_ne[0] == a_ne[0] and w_ne[1] == b_ne[1] and a_ne[1] == b_ne[0]
        # rules 4 and 5: what llama.cpp adds to the (converted) base weight
        a = torch.from_numpy(np.array(ta.data)).double()
        b = torch.from_numpy(np.array(tb.data)).double()
        llama_delta = (ALPHA / b_ne[0]) * b @ a
        want = deltas[path]
        if arch == "llama" and path.endswith("q_proj"):
            want = _reference_permute(want, n_head, n_head)
        elif arch == "llama" and path.endswith("k_proj"):
            want = _reference_permute(want, n_head, n_kv)
        assert float((llama_delta - want).norm() / want.norm()) < 1e-6, path
    # the installed gguf package's own reader agrees with loratool's read-back
    back = loratool.load(out, config=str(base / "config.json"))
    assert back.source_format == "gguf"
    for (_, path) in modules:
        got = delta_weight(back.modules[("model", path)], dtype=torch.float64)
        assert float((got - deltas[path]).norm() / deltas[path].norm()) < 1e-6, path


def test_embeddings_follow_the_script(tmp_path):
    folder, base, _, deltas, _ = _setup(tmp_path, "llama", embeddings=True)
    out = tmp_path / "emb.gguf"
    assert main(["convert", str(folder), "--to", "gguf", "-o", str(out), "--base", str(base)]) == 0
    reader, _ = _read(out)
    t = {x.name: x for x in reader.tensors}
    a = torch.from_numpy(np.array(t["token_embd.weight.lora_a"].data)).double()  # [n_vocab, r] (ne [r, n_vocab])
    b = torch.from_numpy(np.array(t["token_embd.weight.lora_b"].data)).double()  # [dim, r]
    token = 5
    row = (ALPHA / b.shape[1]) * b @ a[token]  # llama.cpp: get_rows(a, token), then b
    assert float((row - deltas["model.embed_tokens"][token]).norm()) < 1e-6 * float(row.norm())
    assert "output.weight.lora_a" in t
    back = loratool.load(out, config=str(base / "config.json"))
    got = delta_weight(back.modules[("model", "model.embed_tokens")], dtype=torch.float64)
    assert float((got - deltas["model.embed_tokens"]).norm() / got.norm()) < 1e-6


def test_reading_llama_qk_needs_the_config(tmp_path, capsys):
    folder, base, _, _, _ = _setup(tmp_path, "llama")
    out = tmp_path / "a.gguf"
    assert main(["convert", str(folder), "--to", "gguf", "-o", str(out), "--base", str(base)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize("case,message", [("no-base", "--base"), ("dora", "DoRA")])
def test_refusals(tmp_path, capsys, case, message):
    model = tiny_llama()
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, use_dora=case == "dora", target_modules=["q_proj"]))
    randomize_lora(pm)
    pm.save_pretrained(str(tmp_path / "p"))
    base = tmp_path / "base"
    base.mkdir()
    cfg = model.config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    args = ["convert", str(tmp_path / "p"), "--to", "gguf", "-o", str(tmp_path / "o.gguf")]
    if case != "no-base":
        args += ["--base", str(base)]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.gguf").exists()


def test_name_table_agrees_with_gguf_py():
    """Every entry of arch/llm_gguf.json is what gguf-py's TensorNameMap gives for each listed arch."""
    from loratool.formats.gguf_lora import gguf_name, hf_name, table

    for spec in table()["architectures"].values():
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec["gguf_arch"])
        names = gguf.get_tensor_name_map(arch, 3)
        known = 0
        for hf in table()["modules"]:
            for bid in ("0", "2"):
                module = hf.replace("{bid}", bid)
                want = names.get_name(module)
                if want is None:  # e.g. q_norm / k_norm exist in qwen3 only
                    continue
                known += 1
                assert gguf_name(module) == want, (spec["gguf_arch"], module)
                assert hf_name(want) == module
        assert known >= 2 * 12
