"""LoftQ-quantize a model's target linear layers and save a backbone + Llmm init adapter directory.

    python -m scripts.quantize_model --preset llama-2-7b-gsm8k            # a row of configs/quantize.yaml
    python -m scripts.quantize_model --model ./my-model --rank 16 --bits 2 --quant uniform --task_type seq_cls

Writes SAVE_DIR/<model-name>-<bits>bit-<rank>rank/: the backbone (each target weight, and with
--quantize_embeddings the embedding tables, replaced by its quantized value Q), llmm_init/ (the Llmm adapter: LoftQ
means, K zero directions) and quantize_report.json (per-layer errors, settings, versions, wall time). LoftQ streams
the checkpoint's safetensors one tensor at a time (llmm.streaming), so host memory stays at about one weight matrix;
the directory is renamed into place on success. Details: README.md; the work is llmm.run.quantize's.
"""

from pathlib import Path

from llmm.run import quantize
from llmm.run.cli import run_main


def main(argv=None) -> Path:
    return quantize.make_init_dir(quantize.resolve(argv))


if __name__ == "__main__":
    run_main(main)
