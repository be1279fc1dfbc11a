"""LoftQ-quantize a model's target linear layers and save a backbone + Llmm init adapter directory.

    python -m scripts.quantize_model --preset llama-2-7b-gsm8k            # a row of configs/quantize.yaml
    python -m scripts.quantize_model --model ./my-model --rank 16 --bits 2 --quant uniform --task_type seq_cls

Writes SAVE_DIR/<model-name>-<bits>bit-<rank>rank/:
  - the backbone (each target weight replaced by its quantized value Q, ``dtype`` safetensors), config, tokenizer;
    with --quantize_embeddings true (the table's null: by architecture, on for --task_type seq_cls, the GLUE
    protocol) also the embedding tables of configs/embedding_targets.yaml, each with its LoftQ pair in llmm_init/
    (llmm.embedding); with nf at 4 bits, loading it with bitsandbytes NF4 (blocksize 64, no double quant)
    reproduces Q exactly;
  - llmm_init/: the Llmm adapter with the LoftQ means M_A, M_B and zero directions (K of them);
  - quantize_report.json: per layer ||W - Q|| / ||W||, ||W - Q - g B A|| / ||W||, the SVD method and LoftQ's time;
    settings, versions, wall time.
LoftQ runs matrix by matrix on ``--device``, streamed from the checkpoint's safetensors (llmm.streaming): one
tensor is read, quantized and written at a time, so host memory stays at about one weight matrix plus LoftQ's
buffers whatever the model's size (benchmarks/README.md), and the output equals the whole-model path bit for bit.
The whole model is loaded instead only when streaming does not apply: no safetensors (a pytorch_model.bin), or
tensors the checkpoint lacks that transformers initialises (a new classifier head, e.g. --task_type seq_cls on a
bare encoder); the log says which. The directory is written under a temporary name and renamed on success, so an
interrupted run leaves nothing half-written. The work is llmm.run.quantize's.
"""

import sys
from pathlib import Path

from llmm.run import quantize
from llmm.run.cli import run_main


def main(argv=None) -> Path:
    return quantize.make_init_dir(quantize.resolve(argv))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
