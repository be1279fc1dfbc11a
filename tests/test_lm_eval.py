"""An exported mean adapter evaluates with the lm-eval harness (offline: local YAML task over a local JSONL)."""

import pytest
from conftest import REPO_ROOT, tiny_llama, tiny_tokenizer
from test_layer import randomize

from llmm import LlmmConfig, export_mean_adapter, get_llmm_model

TASK_YAML = """task: llmm_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: " {{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


def test_mean_adapter_runs_under_lm_eval(tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "mean"
    tiny_llama().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], k=2))
    randomize(model)
    export_mean_adapter(model, str(adapter_dir))
    (tmp_path / "tasks").mkdir()
    data = REPO_ROOT / "tests" / "data" / "lm_eval" / "llmm_tiny.jsonl"
    (tmp_path / "tasks" / "llmm_tiny.yaml").write_text(TASK_YAML.format(data=data))
    tasks = TaskManager(include_path=str(tmp_path / "tasks"))
    perplexity = {}
    # The CLI equivalent: lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER --tasks llmm_tiny
    for name, args in {"base": f"pretrained={base_dir}", "adapter": f"pretrained={base_dir},peft={adapter_dir}"}.items():
        results = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=["llmm_tiny"], task_manager=tasks,
                                          device="cpu", batch_size=2, bootstrap_iters=0)
        perplexity[name] = results["results"]["llmm_tiny"]["perplexity,none"]
    assert perplexity["base"] > 0 and perplexity["adapter"] > 0
    assert abs(perplexity["base"] - perplexity["adapter"]) > 1e-3 * perplexity["base"]  # the adapter is applied
