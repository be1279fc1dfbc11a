"""The README's Python API example runs as written (on a tiny Llama saved locally instead of "my-model")."""

import re

from conftest import REPO_ROOT, tiny_llama
from peft import PeftModel

from llmm import load_llmm_model


def test_readme_api_example_runs(tmp_path, monkeypatch):
    readme = (REPO_ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    tiny_llama().save_pretrained(tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model, PeftModel) and (tmp_path / "out" / "mean" / "adapter_config.json").is_file()
    # The backbone the adapter belongs to is the LoftQ-quantized one the example left in memory.
    inputs = tiny_llama().dummy_inputs["input_ids"]
    model.eval()
    expected = model(inputs).logits
    loaded = load_llmm_model(model.unload(), "out/adapter", k=2)
    assert (loaded(inputs).logits - expected).abs().max() == 0
