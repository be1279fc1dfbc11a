"""An exported mean adapter evaluates with the lm-eval harness (offline: local YAML task over a local JSONL)."""

import json

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


GSM8K_TASK_YAML = """task: llmm_gsm8k_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}{instruction}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {max_new_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_generations_equal_test_gsm8k(tmp_path):
    """With add_bos_token=True (the README's command), lm-eval's greedy generations over the exported mean adapter
    are test_gsm8k's: the same prompt (bos + question + instruction), the same network."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from test_llama_scripts import save_tiny_llama

    from llmm import save_llmm_adapter
    from llmm.tasks.prompts import GSM8K_INSTRUCTION
    from scripts import test_gsm8k

    base_dir = save_tiny_llama(tmp_path / "base")
    model = get_llmm_model(tiny_llama_from(base_dir), LlmmConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 k=2))
    randomize(model)
    save_llmm_adapter(model, str(tmp_path / "adapter"))
    export_mean_adapter(model, str(tmp_path / "mean"))
    data = REPO_ROOT / "tests" / "data" / "gsm8k.jsonl"
    test_gsm8k.main(["--adapter", str(tmp_path / "adapter"), "--model_name_or_path", str(base_dir), "--data",
                     str(data), "--max_new_tokens", "8", "--load_in_4bit", "false", "--dtype", "float32",
                     "--output_dir", str(tmp_path / "test")])
    predictions = (tmp_path / "test" / "predictions.jsonl").read_text().splitlines()
    ours = [json.loads(line)["generated"] for line in predictions]

    (tmp_path / "tasks").mkdir()
    instruction = json.dumps(GSM8K_INSTRUCTION)[1:-1]  # escaped for a double-quoted YAML string
    (tmp_path / "tasks" / "t.yaml").write_text(GSM8K_TASK_YAML.format(data=data, instruction=instruction,
                                                                      max_new_tokens=8))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={base_dir},peft={tmp_path / 'mean'},dtype=float32,add_bos_token=True",
        tasks=["llmm_gsm8k_tiny"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")), device="cpu",
        batch_size=6, bootstrap_iters=0, log_samples=True)
    samples = sorted(results["samples"]["llmm_gsm8k_tiny"], key=lambda s: s["doc_id"])
    theirs = [sample["resps"][0][0] for sample in samples]
    assert any(text.strip() for text in ours) and theirs == ours


def tiny_llama_from(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path)
