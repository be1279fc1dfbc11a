"""Evaluate an Llmm GSM8K adapter: batched generation, answer extraction, exact-match accuracy.

    python -m scripts.test_gsm8k --adapter runs/gsm8k-llama-2-7b/adapter --output_dir runs/gsm8k-llama-2-7b/test
    python -m scripts.test_gsm8k --adapter ... --output_dir ... --decoding reference      # the reference's sampling
    python -m scripts.test_gsm8k --adapter ... --output_dir ... --mode mc --mc_samples 8  # Monte-Carlo vote

The backbone is --model_name_or_path, else the adapter's. Modes: mean (the mean adapter, merged unless over NF4,
where merging would re-quantize); sample (fresh noise at every decoded token, the reference's; seeded with (--seed,
process index)); mc (mc_samples networks, one noise draw each for the whole test set, majority answer). Several
processes (accelerate launch) split the questions. Settings: configs/gsm8k_test.yaml. Writes
OUTPUT_DIR/predictions.jsonl (question, generated, extracted, gold, correct) and results.json (accuracy).
"""

from llmm.run.cli import run_main
from llmm.run.gsm8k_test import main

if __name__ == "__main__":
    run_main(main)
