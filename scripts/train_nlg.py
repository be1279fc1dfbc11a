"""Fine-tune a (4-bit) causal LM with Llmm adapters on Alpaca or HH-RLHF; held-out loss and perplexity.

    python -m scripts.train_nlg --task alpaca --model llama-2-7b --rank 16 --output_dir runs/alpaca-llama-2-7b
    python -m scripts.train_nlg --task hh-rlhf --model llama-2-7b --rank 16 --method qlora --output_dir ...
    python -m scripts.train_nlg --task alpaca --model_name_or_path quantized/my-llama-4bit-8rank --rank 8 \
        --data my_alpaca.jsonl --eval_size 100 --output_dir runs/mine   # any model (bash _init.sh --model ...)

Settings: configs/nlg.yaml: its defaults (with the task's dataset and eval_split), or the row --model names (its
checkpoints), then any flag. Alpaca: the instruction prompt, loss on the response only (source_max_len,
target_max_len), held out: a seeded slice of train.
HH-RLHF: the chosen transcript, no prompt part, held out: the official test split (src/llmm/tasks/prompts.py).
Writes OUTPUT_DIR/{adapter/, mean_adapter/, results.json, settings.json, curves.png} (and backbone/, the
quantized Q, when --init loftq ran LoftQ in-process).
"""

from __future__ import annotations

from llmm.run import cli, tables
from llmm.tasks.prompts import PAIRS, encode_source_target
from llmm.run.causal_lm import BLOCKS, CausalLMRecipe, parse_settings

TABLE = tables.CONFIGS / "nlg.yaml"


def encode(tokenizer, settings, record: dict) -> dict:
    source, target = PAIRS[settings.task](record)
    return encode_source_target(tokenizer, source, target, settings.source_max_len, settings.target_max_len)


def main(argv=None) -> dict:
    settings = parse_settings(tables.read_table(TABLE, BLOCKS), argv, __doc__.splitlines()[0],
                              task_columns=("dataset", "eval_split"), required_keys=("task",))
    return CausalLMRecipe(settings, settings.task, encode).run()


if __name__ == "__main__":
    cli.run_main(main)
