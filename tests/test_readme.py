"""The README's Python API example runs as written (on a tiny Llama saved locally instead of "my-model")."""

import json
import re

import torch
from conftest import REPO_ROOT, tiny_llama
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llmm import load_llmm_model


def test_readme_api_example_runs(tmp_path, monkeypatch):
    readme = (REPO_ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    tiny_llama().save_pretrained(tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "mean" / "adapter_config.json").is_file()
    # Both adapters name the LoftQ-quantized backbone the example saved, and reload onto it exactly.
    for name in ("adapter", "mean"):
        assert json.loads((tmp_path / "out" / name / "adapter_config.json").read_text())[
            "base_model_name_or_path"] == "out/backbone"
    inputs = tiny_llama().dummy_inputs["input_ids"]
    quantized = AutoModelForCausalLM.from_pretrained("out/backbone")
    original = tiny_llama().model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(quantized.model.layers[0].self_attn.q_proj.weight, original)  # Q, not W
    loaded = load_llmm_model(quantized, "out/adapter", k=2).eval()
    mean = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("out/backbone"), "out/mean").eval()
    with torch.no_grad():
        expected = loaded(inputs).logits
        assert torch.allclose(mean(inputs).logits, expected, atol=1e-5)
    merged = mean.merge_and_unload().model.layers[0].self_attn.q_proj.weight  # Q + g M_B M_A
    assert (merged - original).norm() < (quantized.model.layers[0].self_attn.q_proj.weight - original).norm()
