"""Fine-tune an encoder on one GLUE task with Llmm adapters over a LoftQ-quantized backbone, or a baseline.

    python -m scripts.train_glue --task cola --quant nf --rank 32                     # configs/glue.yaml row, 2-bit
    python -m scripts.train_glue --task mrpc --quant uniform --rank 16 --bits 4 --method loftq
    python -m scripts.train_glue --task stsb --quant nf --rank 16 --data_dir glue_data/STS-B --max_steps 2
    torchrun --nproc_per_node 2 -m scripts.train_glue --task cola --quant nf --rank 32   # or: accelerate launch -m
    python -m scripts.train_glue --task cola --quant nf --rank 32 --resume_from_checkpoint   # continue a stopped run

Every hyperparameter comes from the row of configs/glue.yaml selected by (task, quant, rank); the flag of the same
name overrides it (--help lists them). --method picks what is trained, always through the llmm package:

    llmm   LoftQ-quantized encoder, LoftQ init, K directions from the row      (MeMoTune / Llmm)
    loftq  LoftQ-quantized encoder, LoftQ init, K = 0                          (LoftQ)
    qlora  encoder fake-quantized with the same quantizer, standard LoRA init, K = 0   (QLoRA-style)
    lora   full-precision encoder, standard LoRA init, K = 0                   (LoRA)

The embedding tables of configs/embedding_targets.yaml are quantized too, each with its own low-rank pair
(--quantize_embeddings, on by default; lora leaves them alone). Dev evaluation every epoch with --eval_noise mean,
sample or mc. Writes to --output_dir (default runs/glue/<method>-<quant><bits>-r<rank>[-fpemb]/<task>/seed<seed>):
settings.json, results.json (per-epoch dev metrics, best and last epoch), predictions.json (last epoch),
predictions-best.json (the best epoch's dev outputs), adapter/ (M and Z), mean_adapter/ (plain PEFT LoRA), backbone/
(after in-process quantization), curves.png and checkpoint-N/ for --resume_from_checkpoint. Re-score a saved run with
python -m scripts.eval_glue.
"""

from llmm.run.cli import run_main
from llmm.run.glue import train as main

if __name__ == "__main__":
    run_main(main)
