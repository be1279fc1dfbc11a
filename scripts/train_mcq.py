"""Fine-tune a causal LM on a multiple-choice task (BLoB's calibration protocol), then measure its calibration.

    python -m scripts.train_mcq --task obqa --method llmm --seed 1 --output_dir runs/mcq/obqa-llmm-int8-s1
    python -m scripts.train_mcq --task obqa --method map --seed 1 --output_dir runs/mcq/obqa-map-int8-s1
    python -m scripts.train_mcq --task obqa --method map --init loftq --load_in_8bit false --bits 4 ...  # LoftQ NF4
    python -m scripts.train_mcq --task obqa --method mcdropout --eval_modes mean dropout ...
    python -m scripts.train_mcq --task arc_e --model_name_or_path ./tiny --train_data arc.jsonl \
        --test_data arc.jsonl --max_steps 2 --load_in_8bit false --dtype float32 --output_dir /tmp/run

Settings: configs/mcq.yaml (row = task), any of them overridable by a flag. The loss is the cross-entropy of the
answer letter under the next-token distribution restricted to the question's letters. After training the test
split and the row's OOD sets are evaluated in every --eval_modes mode (mean, sample, mc, dropout): accuracy, ECE
(15 bins), NLL and Brier; the learned Gaussian's width (llmm.width) is recorded every logging_steps.
Writes OUTPUT_DIR/{adapter/, mean_adapter/, results.json, settings.json, curves.png, reliability-<set>.png}; each
evaluation records its seed and cell (what scripts.mcq_table pools seeds by).
"""

from llmm.run.cli import run_main
from llmm.run.mcq import train as main

if __name__ == "__main__":
    run_main(main)
