"""Evaluate an Llmm GSM8K adapter: batched generation, answer extraction, exact-match accuracy.

    python -m scripts.test_gsm8k --adapter runs/gsm8k-llama-2-7b/adapter --output_dir runs/gsm8k-llama-2-7b/test
    python -m scripts.test_gsm8k --adapter ... --output_dir ... --decoding reference      # the reference's sampling
    python -m scripts.test_gsm8k --adapter ... --output_dir ... --mode mc --mc_samples 8  # Monte-Carlo vote

The backbone is --model_name_or_path, else the one the adapter was trained on (adapter_config.json). Modes:
mean (default) uses the mean adapter (merged into a 16/32-bit backbone; unmerged over NF4, where merging would
re-quantize W_q + g M_B M_A); sample draws fresh noise at every forward, i.e. every decoded token (the reference;
the noise generator is seeded with (--seed, process index));
mc draws mc_samples networks (one noise draw each for the whole test set) and takes the majority answer. Both
draw the noise m times as wide, m the adapter's noise_width (1 unless train_gsm8k's --noise_width_search chose it).
Left padding, KV cache; several processes (accelerate launch) split the questions. Settings: configs/gsm8k_test.yaml.
Writes OUTPUT_DIR/predictions.jsonl (question, generated, extracted, gold, correct) and results.json (accuracy).
"""

import sys

from llmm.run.cli import run_main
from llmm.run.gsm8k_test import main

if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
