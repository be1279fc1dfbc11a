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

Embeddings (--quantize_embeddings, on by default: the protocol behind the paper's and LoftQ's numbers): the tables
of configs/embedding_targets.yaml (DeBERTa: word_embeddings, rel_embeddings) are quantized like the linear layers,
each with its own trainable low-rank pair (llmm.embedding): LoftQ-initialised for llmm / loftq, standard PEFT init
over the plainly quantized table for qlora; lora leaves them alone. The pairs are plain (the reference's) unless
--gaussian_embeddings true. The classifier head and pooler train in full precision (PEFT modules_to_save).

Dev evaluation every epoch with --eval_noise mean (eps = 0), sample (one draw per batch, the reference's behaviour)
or mc (the average of --mc_samples sampled networks, llmm.predict.mc_predict). Writes to --output_dir (default
runs/glue/<method>-<quant><bits>-r<rank>[-fpemb]/<task>/seed<seed>): settings.json, results.json (dev metrics and
training loss per epoch, best (MRPC, QQP: by F1) and last epoch; NLL/Brier/ECE for classification),
predictions.json (the final mean network's dev outputs), adapter/ (M and Z, for llmm.load_llmm_model),
mean_adapter/ (a plain PEFT LoRA adapter), backbone/ (after in-process quantization: the quantized encoder both
adapters name as their base) and curves.png, and checkpoint-N/ (every save_steps steps, or every epoch; the newest
save_total_limit kept) for --resume_from_checkpoint. Re-score a saved run with python -m scripts.eval_glue.
"""

from llmm.run.cli import run_main
from llmm.run.glue import train as main

if __name__ == "__main__":
    run_main(main)
