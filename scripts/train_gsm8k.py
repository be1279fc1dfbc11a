"""Fine-tune a (4-bit) Llama-2 with Llmm adapters on GSM8K (LoftQ's prompt and target format, loss on the target).

    python -m scripts.train_gsm8k --model llama-2-7b --rank 64 --output_dir runs/gsm8k-llama-2-7b
    python -m scripts.train_gsm8k --model llama-2-7b --rank 64 --method loftq --output_dir runs/gsm8k-loftq
    python -m scripts.train_gsm8k --model_name_or_path quantized/my-llama-4bit-16rank --rank 16 \
        --data my_gsm8k/ --output_dir runs/mine          # any model (bash _init.sh --model ...), defaults + flags

Settings: configs/gsm8k.yaml: its defaults, or the row --model names (its checkpoints; --rank picks among a
model's rows), then any flag. Prompt and target: LoftQ's format (llmm.tasks.prompts), at most max_length tokens.
Writes OUTPUT_DIR/{adapter/, mean_adapter/, results.json, settings.json, curves.png} (and backbone/, the
quantized Q, when --init loftq ran LoftQ in-process); evaluate with test_gsm8k.
"""

from __future__ import annotations

from llmm.run import cli, tables
from llmm.tasks.prompts import encode_joint, gsm8k_pair
from llmm.run.causal_lm import BLOCKS, CausalLMRecipe, parse_settings

TABLE = tables.CONFIGS / "gsm8k.yaml"


def encode(tokenizer, settings, record: dict) -> dict:
    return encode_joint(tokenizer, *gsm8k_pair(record), max_length=settings.max_length)


def main(argv=None) -> dict:
    settings = parse_settings(tables.read_table(TABLE, BLOCKS), argv, __doc__.splitlines()[0])
    return CausalLMRecipe(settings, "gsm8k", encode).run()


if __name__ == "__main__":
    cli.run_main(main)
