"""Bad input across every entry point: a table of (script, arguments, problem, fix).

Each case runs the script's ``main(argv)`` the way its command line does (``llmm.run.cli.run_main``), in-process to
keep CI time down, and asserts: a non-zero exit, exactly one ``error:`` line, last on stderr, naming the problem
and the fix, and not a single file or directory under the test's world created, changed or removed. A few cases
run as real subprocesses, through ``python -m scripts.X``.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LLAMA_TARGETS, REPO_ROOT, tiny_llama
from test_glue import DATA as GLUE_DATA
from test_glue import save_tiny_model
from test_llama_scripts import save_tiny_llama
from transformers import AutoModelForCausalLM

from llmm.run import cli
from llmm import LlmmConfig, get_llmm_model
from scripts import (eval_glue, glue_table, prepare_bbcnews, prepare_mcq_bbcnews, quantize_model, quickstart, test_gsm8k,
                     train_glue, train_gsm8k, train_nlg)

SCRIPTS = {module.__name__.split(".")[-1]: module for module in
           (train_glue, train_nlg, train_gsm8k, test_gsm8k, quantize_model, glue_table, prepare_bbcnews,
            prepare_mcq_bbcnews, quickstart, eval_glue)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
DATA = REPO_ROOT / "tests" / "data"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything the cases read: tiny models, an init directory, adapters, data files good and bad, used output
    directories. The cases must leave all of it exactly as it is."""
    w = tmp_path_factory.mktemp("world")
    save_tiny_model(w / "deberta")
    save_tiny_llama(w / "llama")
    quantize_model.main(["--model", str(w / "llama"), "--save_dir", str(w / "quantized"), "--rank", "16", "--bits",
                         "4", "--K", "2", "--loftq_iter", "1", "--lora_alpha", "16", "--dtype", "float32"])
    quantize_model.main(["--model", str(w / "deberta"), "--save_dir", str(w / "quantized_cls"), "--rank", "16",
                         "--bits", "4", "--task_type", "seq_cls", "--num_labels", "2", "--loftq_iter", "1",
                         "--dtype", "float32"])
    quantize_model.main(["--model", str(w / "llama"), "--save_dir", str(w / "quantized_uniform"), "--rank", "16",
                         "--bits", "4", "--quant", "uniform", "--loftq_iter", "1", "--dtype", "float32"])
    shutil.copytree(GLUE_DATA, w / "glue")
    for name in ("gsm8k.jsonl", "alpaca.jsonl"):
        shutil.copy(DATA / name, w / name)
    files = {
        "broken.jsonl": '{"sentence": "a", "label": 0}\n{"sentence": "b", \n',
        "sst2_bad_label.csv": "sentence,label\ngood,maybe\n",
        "stsb_flat.csv": "sentence1,sentence2,label\na,b,2.5\nc,d,2.5\n",
        "gsm8k_broken.jsonl": '{"question": "q", "answer": "#### 1"}\n{"question": \n',
        "gsm8k_no_gold.jsonl": '{"question": "How many?", "answer": "three"}\n',
        "gsm8k_no_answer.jsonl": '{"question": "How many?"}\n',
        "gsm8k_number_answer.jsonl": '{"question": "How many?", "answer": "#### 3"}\n{"question": "q", "answer": 3}\n',
        "data.txt": "not json\n",
        "used/keep.txt": "precious",
        "used_checkpoints/checkpoints/notes.txt": "no checkpoint here",
        "results_broken/results.json": "{not json",
        "results_other/results.json": json.dumps({"task": "gsm8k", "complete": True}),
        "results_incomplete/results.json": json.dumps({"task": "cola", "complete": False}),
        "results_text_seed/results.json": json.dumps({"task": "cola", "complete": True, "seed": "zero"}),
        "mcq_finished_run/settings.json": json.dumps({"task": "arc_e", "method": "llmm", "K": 2}),
        "mcq_finished_run/adapter/adapter_config.json": "{}",
        "corpus_one_class/business/001.txt": "a story",
        "corpus_two_classes/a/001.txt": "a story",
        "corpus_two_classes/b/001.txt": "another story",
        **{f"corpus_eleven_classes/{topic}/001.txt": f"a story of {topic}" for topic in "abcdefghijk"},
        "corpus_empty_texts/a/001.txt": "", "corpus_empty_texts/b/001.txt": "  \n",
        "bbc_out/train.csv": "sentence,label\n",
        "glue_run/checkpoint-1/trainer_state.json": '{"global_step": 1}',
        "gsm8k_run/checkpoints/checkpoint-1/trainer_state.json": '{"global_step": 1}',
    }
    for name, text in files.items():
        (w / name).parent.mkdir(parents=True, exist_ok=True)
        (w / name).write_text(text)
    (w / "empty").mkdir()
    (w / "gsm8k_latin1.jsonl").write_bytes('{"question": "Caf\u00e9?", "answer": "#### 1"}\n'.encode("latin-1"))
    (w / "sst2_latin1.csv").write_bytes("sentence,label\ncaf\u00e9 cr\u00e8me,1\n".encode("latin-1"))
    (w / "gsm8k_empty.jsonl").write_text("")
    (w / "empty.csv").write_text("\n")
    # a model directory without its tokenizer, one with a truncated model.safetensors
    shutil.copytree(w / "llama", w / "llama_no_tokenizer", ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    shutil.copytree(w / "deberta", w / "deberta_no_tokenizer",
                    ignore=shutil.ignore_patterns(*TOKENIZER_FILES, "spm.model", "tokenizer*"))
    shutil.copytree(w / "llama", w / "llama_truncated")
    weights = w / "llama_truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # checkpoints of runs with another K / rank than the table rows the cases select
    LlmmConfig(r=16, lora_alpha=16, k=2, target_modules=["query_proj"]).save_pretrained(w / "glue_run/checkpoint-1")
    LlmmConfig(r=16, lora_alpha=16, k=2, target_modules=LLAMA_TARGETS).save_pretrained(
        w / "gsm8k_run/checkpoints/checkpoint-1")
    # an Llmm adapter (K = 2, r = 8) for the tiny Llama, and one made for another (narrower) backbone
    for name, model in (("adapter_k2", AutoModelForCausalLM.from_pretrained(w / "llama")),
                        ("adapter_other", tiny_llama(vocab_size=384))):
        peft_model = get_llmm_model(model, LlmmConfig(r=8, lora_alpha=16, k=2, target_modules=LLAMA_TARGETS))
        peft_model.peft_config["default"].base_model_name_or_path = str(w / "llama")
        peft_model.save_pretrained(w / name)
    shutil.copytree(w / "adapter_k2", w / "adapter_bad_config")
    (w / "adapter_bad_config" / "adapter_config.json").write_text('{"k": 2, "r": ')
    shutil.copytree(w / "adapter_k2", w / "adapter_truncated")
    weights = w / "adapter_truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    garbage = w / "gsm8k_garbage" / "checkpoints" / "checkpoint-1"
    shutil.copytree(w / "adapter_bad_config", garbage)
    (garbage / "trainer_state.json").write_text('{"global_step": 1}')
    return w


def snapshot(root: Path) -> dict:
    """Every path below ``root`` with its modification time and size (directories: None)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


GLUE = ["--quant", "nf", "--rank", "16", "--model", "{w}/deberta", "--output_dir", "{w}/new", "--max_steps", "1"]
COLA = ["--task", "cola", *GLUE, "--data_dir", "{w}/glue"]
LM = ["--model_name_or_path", "{w}/llama", "--load_in_4bit", "false", "--dtype", "float32", "--max_steps", "1",
      "--output_dir", "{w}/new"]
GSM8K = ["--model", "llama-2-7b", "--rank", "64", *LM, "--init", "lora", "--data", "{w}/gsm8k.jsonl",
         "--eval_split", "heldout", "--eval_size", "2"]
NLG = ["--task", "alpaca", "--model", "llama-2-7b", "--rank", "16", *LM, "--init", "lora", "--data",
       "{w}/alpaca.jsonl", "--eval_size", "2"]
TEST = ["--adapter", "{w}/adapter_k2", "--data", "{w}/gsm8k.jsonl", "--load_in_4bit", "false", "--dtype",
        "float32", "--max_new_tokens", "2", "--output_dir", "{w}/new"]
QUANTIZE = ["--model", "{w}/llama", "--save_dir", "{w}/new", "--rank", "8", "--bits", "4", "--loftq_iter", "1",
            "--dtype", "float32"]

NLG_INIT = ["--task", "alpaca", "--model", "llama-2-7b", "--rank", "16", "--model_name_or_path",
            "{w}/quantized/llama-4bit-16rank", "--load_in_4bit", "false", "--dtype", "float32", "--data",
            "{w}/alpaca.jsonl", "--eval_size", "2", "--output_dir", "{w}/new"]

# (id, script, arguments, the problem (a regex), the fix (a regex)); {w} is the world directory.
CASES = [
    # --- train_glue
    ("glue-logging-steps", "train_glue", [*COLA, "--logging_steps", "5"], r"GLUE logs the training loss at every "
     r"evaluation", r"drop --logging_steps"),
    ("glue-old-and-new-name", "train_glue", [*COLA, "--batch_size", "2", "--per_device_train_batch_size", "4"],
     r"--batch_size and --per_device_train_batch_size name one setting", r"pass only --per_device_train_batch_size"),
    ("glue-old-name-not-a-number", "train_glue", [*COLA, "--batch_size", "abc"],
     r"--batch_size 'abc' is not a number", r"pass --per_device_train_batch_size with one"),
    ("glue-no-model", "train_glue", [*COLA, "--model", "{w}/nope"], r"model path .*nope' does not exist",
     "pass a local directory or a hub id"),
    ("glue-no-data-dir", "train_glue", [*COLA, "--data_dir", "{w}/nope"], r"--data_dir .*nope' does not exist",
     r"pass an existing file or directory"),
    ("glue-malformed-jsonl", "train_glue", ["--task", "cola", *GLUE, "--train_file", "{w}/broken.jsonl",
                                            "--validation_file", "{w}/broken.jsonl"], r"line 2.*JSON", r"fix|write"),
    ("glue-wrong-label", "train_glue", ["--task", "sst2", *GLUE, "--train_file", "{w}/sst2_bad_label.csv",
                                        "--validation_file", "{w}/sst2_bad_label.csv"],
     r"label 'maybe' in row 1 is not a sst2 label", r"use integers"),
    ("glue-unknown-task", "train_glue", ["--task", "colaa", *GLUE], r"unknown GLUE task 'colaa'", r"choose one of"),
    ("glue-unknown-row", "train_glue", [*COLA, "--rank", "8"], r"no row for .*'rank': 8",
     r"rows \(task, quant, rank\)"),
    ("glue-K", "train_glue", [*COLA, "--K", "-1"], r"K = -1 is out of range", r"integer >= 0.*fix --K"),
    ("glue-stsb-flat-scores", "train_glue", ["--task", "stsb", *GLUE, "--train_file", "{w}/stsb_flat.csv",
                                             "--validation_file", "{w}/stsb_flat.csv"],
     r"stsb_flat.csv': its 2 scores are all equal, so Pearson and Spearman are undefined",
     r"pass a dev file whose scores vary"),
    ("glue-mnli-one-dev-file", "train_glue", ["--task", "mnli", *GLUE, "--train_file", "{w}/gsm8k.jsonl",
                                              "--validation_file", "{w}/gsm8k.jsonl"],
     r"mnli has 2 dev split\(s\) \['validation_matched', 'validation_mismatched'\], got 1", r"one file per split"),
    # --- a flag the run would ignore (its field's ``applies``)
    ("glue-bits-full-precision", "train_glue", [*COLA, "--method", "lora", "--bits", "2"],
     r"--bits 2 has no effect on this run: it applies only with a backbone quantized by llmm", r"drop --bits"),
    ("glue-mc-samples-mean", "train_glue", [*COLA, "--mc_samples", "4"],
     r"--mc_samples 4 has no effect.*--eval_noise mc or a noise width search", r"drop --mc_samples"),
    ("glue-llmmscale-k0", "train_glue", [*COLA, "--method", "loftq", "--llmmscale", "100"],
     r"--llmmscale 100.0 has no effect.*the Llmm noise \(--method llmm, K > 0\)", r"drop --llmmscale"),
    ("glue-epochs-with-max-steps", "train_glue", [*COLA, "--num_train_epochs", "2"],
     r"--num_train_epochs 2 has no effect.*no max_steps", r"drop --num_train_epochs"),
    ("gsm8k-loftq-iter-lora-init", "train_gsm8k", [*GSM8K, "--loftq_iter", "3"],
     r"--loftq_iter 3 has no effect.*LoftQ init", r"drop --loftq_iter"),
    ("gsm8k-scale-qlora", "train_gsm8k", [*GSM8K, "--method", "qlora", "--scaled_gradient", "false"],
     r"--scaled_gradient False has no effect.*K > 0", r"drop --scaled_gradient"),
    ("gsm8k-tolerance-without-tfb", "train_gsm8k", [*GSM8K, "--noise_width_tolerance", "0.01"],
     r"--noise_width_tolerance 0.01 has no effect.*--noise_width_search tfb", r"drop --noise_width_tolerance"),
    ("nlg-eval-size-with-eval-data", "train_nlg", [*NLG, "--eval_data", "{w}/alpaca.jsonl"],
     r"--eval_size 2 has no effect.*--eval_split heldout and no --eval_data", r"drop --eval_size"),
    ("nlg-hh-rlhf-source-length", "train_nlg", [*NLG, "--task", "hh-rlhf", "--eval_split", "heldout",
                                                     "--source_max_len", "5"],
     r"--source_max_len 5 has no effect.*hh-rlhf has none", r"drop --source_max_len"),
    ("nlg-eval-data-directory", "train_nlg", [*NLG, "--eval_data", "{w}/glue", "--eval_split", "heldout"],
     r"--eval_data .*glue': it takes a .json/.jsonl file", r"pass it as --data with --eval_split NAME"),
    ("gsm8k-seq-cls-init-dir", "train_gsm8k", ["--rank", "16", "--model_name_or_path",
                                               "{w}/quantized_cls/deberta-4bit-16rank", "--data", "{w}/gsm8k.jsonl",
                                               "--eval_split", "heldout", "--eval_size", "2", "--output_dir",
                                               "{w}/new", "--load_in_4bit", "false"],
     r"was made with --task_type seq_cls \(a classifier\)", r"use it with train_glue"),
    ("quantize-encoder-as-causal-lm", "quantize_model", ["--model", "{w}/deberta", *QUANTIZE[2:]],
     r"is a deberta-v2 model, which transformers has no --task_type causal_lm head for", r"pass --task_type seq_cls"),
    ("quantize-block-size-uniform", "quantize_model", [*QUANTIZE, "--quant", "uniform", "--block_size", "32"],
     r"--block_size 32 has no effect on this run: it applies only with --quant nf", r"drop --block_size"),
    ("quantize-num-labels-causal", "quantize_model", [*QUANTIZE, "--num_labels", "3"],
     r"--num_labels sizes the classifier of --task_type seq_cls", r"drop it"),
    ("quantize-save-dir-in-model", "quantize_model", [*QUANTIZE[:2], "--save_dir", "{w}/llama", *QUANTIZE[4:]],
     r"--save_dir .* lies inside --model", r"choose an --save_dir outside its inputs"),
    ("nlg-kbit-16-bit", "train_nlg", [*NLG, "--prepare_kbit_training", "false"],
     r"--prepare_kbit_training False has no effect.*a bitsandbytes NF4 backbone", r"drop --prepare_kbit_training"),
    ("glue-llmmscale", "train_glue", [*COLA, "--llmmscale", "0"], r"llmmscale = 0.0 is out of range",
     r"fix --llmmscale"),
    ("glue-bits", "train_glue", [*COLA, "--bits", "3"], r"bits = 3 is out of range", r"one of \(2, 4, 8\)"),
    ("glue-mc-samples", "train_glue", [*COLA, "--mc_samples", "0"], r"mc_samples = 0 is out of range",
     r"fix --mc_samples"),
    ("glue-output-exists", "train_glue", [*COLA, "--output_dir", "{w}/used"], r"exists and is not empty",
     r"--overwrite.*--resume_from_checkpoint"),
    ("glue-resume-nothing", "train_glue", [*COLA, "--output_dir", "{w}/used", "--resume_from_checkpoint"],
     r"no complete checkpoint-N in .*used'", r"drop --resume_from_checkpoint"),
    ("glue-resume-other-K", "train_glue", [*COLA, "--output_dir", "{w}/glue_run", "--resume_from_checkpoint"],
     r"adapter with K=2, rank=16 but the settings say K=1", r"resume with the run's settings"),
    ("glue-unknown-flag", "train_glue", [*COLA, "--lr", "1e-4"], r"unrecognized arguments: --lr", r"--lr"),
    ("glue-lora-alpha-0", "train_glue", [*COLA, "--lora_alpha", "0"], r"lora_alpha = 0 is out of range",
     r"a finite number > 0; fix --lora_alpha"),
    ("glue-llmmscale-inf", "train_glue", [*COLA, "--llmmscale", "inf"], r"llmmscale = inf is out of range",
     r"finite number > 0.*fix --llmmscale"),
    ("glue-max-steps-0", "train_glue", [*COLA, "--max_steps", "0"], r"max_steps = 0 is out of range",
     r"integer >= 1; fix --max_steps"),
    ("glue-negative-lr", "train_glue", [*COLA, "--learning_rate=-1e-4"], r"learning_rate = -0.0001 is out of range",
     r"fix --learning_rate"),
    ("glue-nan-lr", "train_glue", [*COLA, "--learning_rate", "nan"], r"learning_rate = nan is out of range",
     r"finite number > 0"),
    ("glue-batch-0", "train_glue", [*COLA, "--per_device_train_batch_size", "0"],
     r"per_device_train_batch_size = 0 is out of range", r"fix --per_device_train_batch_size"),
    ("glue-old-name-batch-0", "train_glue", [*COLA, "--batch_size", "0"],  # the old name: accepted, then checked
     r"per_device_train_batch_size = 0 is out of range", r"fix --per_device_train_batch_size"),
    ("glue-grad-accum-0", "train_glue", [*COLA, "--gradient_accumulation_steps", "0"],
     r"gradient_accumulation_steps = 0 is out of range", r"fix --gradient_accumulation_steps"),
    ("glue-max-length-0", "train_glue", [*COLA, "--max_length", "0"], r"max_length = 0 is out of range",
     r"fix --max_length"),
    ("glue-loftq-svd-iters", "train_glue", [*COLA, "--loftq_svd_iters", "-1"],
     r"loftq_svd_iters = -1 is out of range", r"integer >= 0.*fix --loftq_svd_iters"),
    ("glue-loftq-svd", "train_glue", [*COLA, "--loftq_svd", "full"], r"loftq_svd = 'full' is out of range",
     r"one of \('exact', 'truncated'\)"),
    ("glue-lora-dropout", "train_glue", [*COLA, "--lora_dropout", "1.5"], r"lora_dropout = 1.5 is out of range",
     r"in \[0, 1\)"),
    ("glue-non-utf8", "train_glue", ["--task", "sst2", *GLUE, "--train_file", "{w}/sst2_latin1.csv",
                                     "--validation_file", "{w}/sst2_latin1.csv"],
     r"sst2_latin1.csv' is not UTF-8 text \(byte 0xe9", r"convert it to UTF-8"),
    ("glue-empty-train-file", "train_glue", ["--task", "sst2", *GLUE, "--train_file", "{w}/empty.csv",
                                             "--validation_file", "{w}/empty.csv"], r"empty.csv' is empty",
     r"pass a file with at least one record"),
    ("glue-output-is-a-file", "train_glue", [*COLA, "--output_dir", "{w}/used/keep.txt"], r"keep.txt' is a file",
     r"choose another"),
    ("glue-no-tokenizer", "train_glue", [*COLA, "--model", "{w}/deberta_no_tokenizer"],
     r"deberta_no_tokenizer' has no tokenizer", r"tokenizer.save_pretrained"),
    # --- train_gsm8k (llmm.run.causal_lm)
    ("gsm8k-lora-alpha-0", "train_gsm8k", [*GSM8K, "--lora_alpha", "0"], r"lora_alpha = 0 is out of range",
     r"fix --lora_alpha"),
    ("gsm8k-llmmscale-inf", "train_gsm8k", [*GSM8K, "--llmmscale", "inf"], r"llmmscale = inf is out of range",
     r"fix --llmmscale"),
    ("gsm8k-max-steps-0", "train_gsm8k", [*GSM8K, "--max_steps", "0"], r"max_steps = 0 is out of range",
     r"fix --max_steps"),
    ("gsm8k-negative-lr", "train_gsm8k", [*GSM8K, "--learning_rate", "-1"], r"learning_rate = -1.0 is out of range",
     r"fix --learning_rate"),
    ("gsm8k-grad-accum-0", "train_gsm8k", [*GSM8K, "--gradient_accumulation_steps", "0"],
     r"gradient_accumulation_steps = 0 is out of range", r"fix --gradient_accumulation_steps"),
    ("gsm8k-max-length-0", "train_gsm8k", [*GSM8K, "--max_length", "0"], r"max_length = 0 is out of range",
     r"fix --max_length"),
    ("gsm8k-batch-0", "train_gsm8k", [*GSM8K, "--per_device_train_batch_size", "0"],
     r"per_device_train_batch_size = 0 is out of range", r"fix --per_device_train_batch_size"),
    ("gsm8k-no-tokenizer", "train_gsm8k", [*GSM8K, "--model_name_or_path", "{w}/llama_no_tokenizer"],
     r"llama_no_tokenizer' has no tokenizer \(none of tokenizer.json", r"save one into it"),
    ("gsm8k-truncated-model", "train_gsm8k", [*GSM8K, "--model_name_or_path", "{w}/llama_truncated"],
     r"llama_truncated/model.safetensors' is truncated or corrupt", r"write it again"),
    ("gsm8k-non-utf8", "train_gsm8k", [*GSM8K, "--data", "{w}/gsm8k_latin1.jsonl"],
     r"gsm8k_latin1.jsonl' is not UTF-8 text", r"convert it to UTF-8"),
    ("gsm8k-empty-data", "train_gsm8k", [*GSM8K, "--data", "{w}/gsm8k_empty.jsonl"], r"gsm8k_empty.jsonl' is empty",
     r"at least one record"),
    ("gsm8k-garbage-checkpoint", "train_gsm8k", [*GSM8K, "--output_dir", "{w}/gsm8k_garbage",
                                                 "--resume_from_checkpoint"],
     r"checkpoint-1/adapter_config.json' is not valid JSON", r"write the adapter again"),
    ("gsm8k-output-empty-string", "train_gsm8k", [*GSM8K, "--output_dir", ""], r"output_dir = '' is out of range",
     r"a directory name, not empty; fix --output_dir"),
    ("gsm8k-output-is-a-file", "train_gsm8k", [*GSM8K, "--output_dir", "{w}/used/keep.txt/run"],
     r"keep.txt' \(above output directory .*\) is a file", r"choose another directory"),
    ("nlg-init-dir-other-targets", "train_nlg", [*NLG_INIT, "--target_modules", "q_proj"],
     r"--target_modules \['q_proj'\] differ from the targets of .*llmm_init", r"drop --target_modules"),
    ("gsm8k-no-model", "train_gsm8k", [*GSM8K, "--model_name_or_path", "{w}/nope"],
     r"model path .*nope' does not exist", r"pass a local directory"),
    ("gsm8k-no-data", "train_gsm8k", [*GSM8K, "--data", "{w}/nope.jsonl"], r"--data .*nope.jsonl' does not exist",
     r"pass an existing file"),
    ("gsm8k-data-format", "train_gsm8k", [*GSM8K, "--data", "{w}/data.txt"], r"data.txt.*must be \.json or \.jsonl",
     r"pass a dataset directory"),
    ("gsm8k-malformed-jsonl", "train_gsm8k", [*GSM8K, "--data", "{w}/gsm8k_broken.jsonl"], r"line 2: malformed JSON",
     r"fix or remove the line"),
    ("gsm8k-missing-field", "train_gsm8k", [*GSM8K, "--data", "{w}/gsm8k_no_answer.jsonl"],
     r"record 1 lacks field\(s\) \['answer'\]", r"records need"),
    ("gsm8k-wrong-type", "train_gsm8k", [*GSM8K, "--data", "{w}/gsm8k_number_answer.jsonl"],
     r"record 2's 'answer' is a int, not text", r"write it as a JSON string"),
    ("gsm8k-unknown-row", "train_gsm8k", [*GSM8K, "--rank", "8"], r"no row for .*'rank': 8", r"rows \(model, rank\)"),
    ("gsm8k-loftq-svd-oversampling", "train_gsm8k", [*GSM8K, "--init", "loftq", "--loftq_svd_oversampling", "-4"],
     r"loftq_svd_oversampling = -4 is out of range", r"fix --loftq_svd_oversampling"),
    ("gsm8k-K", "train_gsm8k", [*GSM8K, "--K", "-2"], r"K = -2 is out of range", r"fix --K"),
    ("gsm8k-K-beyond-memory", "train_gsm8k", [*GSM8K, "--K", "100000000000"], r"out of memory \(.*allocate",
     r"lower the batch size, the sequence length, the rank or K"),
    ("gsm8k-data-dir-of-other-columns", "train_gsm8k", [*GSM8K, "--data", "{w}/glue/CoLA"],
     r"cannot load .*CoLA' as a dataset", r"a dataset directory whose data files share their columns"),
    ("gsm8k-data-dir-without-data", "train_gsm8k", [*GSM8K, "--data", "{w}/empty"],
     r"cannot load .*empty' as a dataset", r"or a .json/.jsonl file"),
    ("gsm8k-init-dir-beside-model-path", "train_gsm8k", [*GSM8K, "--init_dir", "{w}/quantized/llama-4bit-16rank"],
     r"--init_dir names the checkpoint of a run without --model_name_or_path", r"drop one of them"),
    ("nlg-base-model-beside-model-path", "train_nlg", [*NLG, "--base_model", "{w}/llama"],
     r"--base_model names the checkpoint", r"drop one of them"),
    ("quantize-old-and-new-scaling", "quantize_model", [*QUANTIZE, "--reference_scaling", "--compensate_scaling",
                                                         "true"],
     r"--reference_scaling is the old name of --compensate_scaling false", r"pass only --compensate_scaling"),
    ("quantize-embeddings-of-no-row", "quantize_model", [*QUANTIZE, "--quantize_embeddings", "true"],
     r"no row for model_type 'llama' in configs/embedding_targets.yaml", r""),
    ("gsm8k-target-of-no-module", "train_gsm8k", [*GSM8K, "--target_modules", "q_proj", "qproj"],
     r"target module\(s\) \['qproj'\] match no module of the model", r"fix the name\(s\) in target_modules"),
    ("gsm8k-no-targets", "train_gsm8k", [*GSM8K, "--target_modules"], r"target_modules = \[\] is out of range",
     r"one or more values"),
    ("glue-no-grid", "train_glue", [*COLA, "--noise_width_search", "tfb", "--noise_width_grid"],
     r"noise_width_grid = \[\] is out of range", r"one or more values"),
    ("gsm8k-llmmscale", "train_gsm8k", [*GSM8K, "--llmmscale", "-1"], r"llmmscale = -1(\.0)? is out of range",
     r"fix --llmmscale"),
    ("gsm8k-bits", "train_gsm8k", [*GSM8K, "--init", "loftq", "--bits", "5"], r"bits = 5 is out of range",
     r"one of \(2, 4, 8\)"),
    ("gsm8k-init-rank", "train_gsm8k", [*GSM8K, "--init", "loftq", "--model_name_or_path",
                                        "{w}/quantized/llama-4bit-16rank"],
     r"LoftQ means for r=16 but the settings say rank=64", r"use the _init.sh directory made with that rank"),
    ("gsm8k-output-exists", "train_gsm8k", [*GSM8K, "--output_dir", "{w}/used"], r"exists and is not empty",
     r"--overwrite"),
    ("gsm8k-resume-nothing", "train_gsm8k", [*GSM8K, "--output_dir", "{w}/used_checkpoints",
                                             "--resume_from_checkpoint", "latest"],
     r"no complete checkpoint-N in .*used_checkpoints/checkpoints'", r"drop --resume_from_checkpoint"),
    ("gsm8k-resume-other-rank", "train_gsm8k", [*GSM8K, "--output_dir", "{w}/gsm8k_run", "--resume_from_checkpoint"],
     r"K=2, rank=16 but the settings say K=2, rank=64", r"resume with the run's settings"),
    ("gsm8k-resume-not-a-checkpoint", "train_gsm8k", [*GSM8K, "--resume_from_checkpoint", "{w}/empty"],
     r"empty' is not a complete checkpoint", r"pass a checkpoint-N directory"),
    # --- train_nlg
    ("nlg-unknown-task", "train_nlg", [*NLG, "--task", "dolly"], r"argument --task: invalid choice: 'dolly'",
     r"choose from"),
    ("nlg-uniform-dir-in-nf4", "train_nlg", ["--task", "alpaca", "--model", "llama-2-7b", "--rank", "16",
                                             "--model_name_or_path", "{w}/quantized_uniform/llama-4bit-16rank",
                                             "--data", "{w}/alpaca.jsonl", "--eval_size", "2", "--output_dir",
                                             "{w}/new", "--load_in_4bit", "true"],
     r"holds Q as uniform4 at block size 64, which bitsandbytes NF4 would re-quantize", r"--load_in_4bit false"),
    ("nlg-records-of-another-task", "train_nlg", [*NLG, "--task", "hh-rlhf", "--data", "{w}/alpaca.jsonl",
                                                                 "--eval_split", "heldout"],
     r"lacks field\(s\) \['chosen'\]", r"records need"),
    ("gsm8k-llmm-K0", "train_gsm8k", [*GSM8K, "--K", "0"], r"--method llmm with K = 0 is the --method qlora run",
     r"use --method qlora, or K > 0"),
    ("gsm8k-qlora-unquantized", "train_gsm8k", [*GSM8K, "--method", "qlora"],  # GSM8K: --load_in_4bit false
     r"--method qlora is LoRA on the NF4-quantized checkpoint.*float32, unquantized", r"drop --load_in_4bit false"),
    ("nlg-method-K", "train_nlg", [*NLG, "--method", "loftq", "--K", "2"], r"--method loftq trains plain LoRA factors",
     r"drop --K or use --method llmm"),
    ("nlg-qlora-init-dir", "train_nlg", [*NLG, "--method", "qlora", "--init", "lora", "--model_name_or_path",
                                        "{w}/quantized/llama-4bit-16rank"],
     r"--method qlora", r"drop --init|original checkpoint"),
    ("nlg-4bit-loftq", "train_nlg", [*NLG, "--init", "loftq", "--load_in_4bit", "true"],
     r"LoftQ init needs the full-precision weights", r"--load_in_4bit false"),
    # --- test_gsm8k
    ("test-adapter-is-a-file", "test_gsm8k", [*TEST, "--adapter", "{w}/gsm8k.jsonl"],
     r"adapter directory .*gsm8k.jsonl' is a file, not a directory", r"pass the adapter/ folder"),
    ("glue-data-dir-is-a-file", "train_glue", [*COLA[:-1], "{w}/glue/CoLA/train.tsv"],
     r"data directory .*train.tsv' is a file, not a directory", r"pass a GLUE task folder"),
    ("test-no-adapter", "test_gsm8k", [*TEST, "--adapter", "{w}/nope"], r"adapter directory .*nope' does not exist",
     r"pass the adapter/ folder"),
    ("test-plain-dir-adapter", "test_gsm8k", [*TEST, "--adapter", "{w}/llama"], r"no adapter_config.json",
     r"pass a directory written by save_pretrained"),
    ("test-other-K", "test_gsm8k", [*TEST, "--K", "3"], r"has K=2 but --K 3 was given", r"drop --K or pass --K 2"),
    ("test-other-backbone", "test_gsm8k", [*TEST, "--adapter", "{w}/adapter_other", "--model_name_or_path",
                                           "{w}/llama"], r"the model expects", r"backbone it was trained"),
    ("test-no-model", "test_gsm8k", [*TEST, "--model_name_or_path", "{w}/nope"], r"model path .*nope' does not exist",
     r"pass a local directory"),
    ("test-malformed-jsonl", "test_gsm8k", [*TEST, "--data", "{w}/gsm8k_broken.jsonl"], r"line 2: malformed JSON",
     r"fix or remove"),
    ("test-no-gold", "test_gsm8k", [*TEST, "--data", "{w}/gsm8k_no_gold.jsonl"],
     r"record 1's answer has no '#### <number>' gold answer", r"add|####"),
    ("test-wrong-type", "test_gsm8k", [*TEST, "--data", "{w}/gsm8k_number_answer.jsonl"],
     r"record 2's 'answer' is a int, not text", r"write it as a JSON string"),
    ("test-unknown-decoding", "test_gsm8k", [*TEST, "--decoding", "beam"], r"invalid choice: 'beam'", r"choose from"),
    ("test-sampling-option", "test_gsm8k", [*TEST, "--temperature", "0.5"],
     r"--temperature 0.5 has no effect on this run: it applies only with sampled decoding \(--decoding reference",
     r"drop --temperature"),
    ("test-split-of-a-file", "test_gsm8k", [*TEST, "--split", "validation"],
     r"--split 'validation' has no effect on this run: it applies only with a dataset, not a .json/.jsonl --data file",
     r"drop --split"),
    ("test-dataset-with-data", "test_gsm8k", [*TEST, "--dataset", "foo/bar"],
     r"--dataset 'foo/bar' has no effect.*no --data", r"drop --dataset"),
    ("gsm8k-dataset-with-data", "train_gsm8k", [*GSM8K, "--dataset", "foo/bar"],
     r"--dataset 'foo/bar' has no effect.*no --data", r"drop --dataset"),
    ("test-output-exists", "test_gsm8k", [*TEST, "--output_dir", "{w}/used"], r"exists and is not empty",
     r"pass --overwrite \(replace\)$"),  # no --resume_from_checkpoint: an evaluation does not continue
    ("test-batch-0", "test_gsm8k", [*TEST, "--batch_size", "0"], r"batch_size = 0 is out of range",
     r"fix --batch_size"),
    ("test-mc-samples-0", "test_gsm8k", [*TEST, "--mode", "mc", "--mc_samples", "0"],
     r"mc_samples = 0 is out of range", r"fix --mc_samples"),
    ("test-max-new-tokens-0", "test_gsm8k", [*TEST, "--max_new_tokens", "0"], r"max_new_tokens = 0 is out of range",
     r"fix --max_new_tokens"),
    ("test-corrupt-adapter-config", "test_gsm8k", [*TEST, "--adapter", "{w}/adapter_bad_config"],
     r"adapter_bad_config/adapter_config.json' is not valid JSON", r"write the adapter again"),
    ("test-truncated-adapter", "test_gsm8k", [*TEST, "--adapter", "{w}/adapter_truncated"],
     r"adapter_truncated/adapter_model.safetensors' is truncated or corrupt", r"write it again"),
    ("test-no-tokenizer", "test_gsm8k", [*TEST, "--model_name_or_path", "{w}/llama_no_tokenizer"],
     r"has no tokenizer", r"save one into it"),
    ("test-empty-data", "test_gsm8k", [*TEST, "--data", "{w}/gsm8k_empty.jsonl"], r"gsm8k_empty.jsonl' is empty",
     r"at least one record"),
    ("test-non-utf8", "test_gsm8k", [*TEST, "--data", "{w}/gsm8k_latin1.jsonl"], r"is not UTF-8 text",
     r"convert it to UTF-8"),
    # --- quantize_model
    ("quantize-lora-alpha-0", "quantize_model", [*QUANTIZE, "--lora_alpha", "0"], r"lora_alpha = 0 is out of range",
     r"fix --lora_alpha"),
    ("quantize-lm-head", "quantize_model", [*QUANTIZE, "--target_modules", "q_proj", "lm_head"],
     r"target module\(s\) \['lm_head'\] lie only in the task head \(lm_head\)", r"drop them from --target_modules"),
    ("quantize-llmmscale-inf", "quantize_model", [*QUANTIZE, "--llmmscale", "inf"], r"llmmscale = inf is out of range",
     r"fix --llmmscale"),
    ("quantize-rank-over-width", "quantize_model", [*QUANTIZE, "--rank", "130"],
     r"rank 130 exceeds min\(shape\) = 128 of 'model.layers.0.self_attn.q_proj'", r"pass --rank 128 or less"),
    ("quantize-save-dir-is-a-file", "quantize_model", [*QUANTIZE, "--save_dir", "{w}/used/keep.txt"],
     r"keep.txt' \(above output directory .*\) is a file", r"choose another directory"),
    ("quantize-no-tokenizer", "quantize_model", [*QUANTIZE, "--model", "{w}/llama_no_tokenizer"],
     r"has no tokenizer", r"save one into it"),
    # --- quickstart
    ("quickstart-no-model", "quickstart", ["--model", "{w}/nope", "--output_dir", "{w}/new"],
     r"model path .*nope' does not exist", r"pass a local directory"),
    ("quickstart-no-corpus", "quickstart", ["--model", "{w}/deberta", "--corpus_dir", "{w}/nope", "--output_dir",
                                            "{w}/new"], r"--corpus_dir .*nope' does not exist", r"pass an existing"),
    ("quickstart-max-steps-0", "quickstart", ["--model", "{w}/deberta", "--max_steps", "0", "--output_dir",
                                              "{w}/new"], r"max_steps = 0 is out of range", r"fix --max_steps"),
    ("quickstart-seeds-0", "quickstart", ["--model", "{w}/deberta", "--seeds", "0", "--output_dir", "{w}/new"],
     r"seeds = 0 is out of range", r"integer >= 1.*fix --seeds"),
    ("quickstart-no-methods", "quickstart", ["--model", "{w}/deberta", "--methods", "--output_dir", "{w}/new"],
     r"methods = \[\] is out of range", r"one or more values of \('llmm'"),
    ("quickstart-unknown-method", "quickstart", ["--model", "{w}/deberta", "--methods", "dora", "--output_dir",
                                                 "{w}/new"], r"methods = \['dora'\] is out of range", r"one of"),
    ("quickstart-method-twice", "quickstart", ["--model", "{w}/deberta", "--methods", "llmm", "llmm",
                                               "--output_dir", "{w}/new"], r"names a method twice", r"name each once"),
    ("quickstart-used-output", "quickstart", ["--model", "{w}/deberta", "--output_dir", "{w}/used"],
     r"output directory .*used' exists and is not empty", r"--overwrite \(replace it\)$"),  # no quick start there
    ("quickstart-corpus-is-output", "quickstart", ["--model", "{w}/deberta", "--corpus_dir", "{w}/bbc_out",
                                                   "--output_dir", "{w}/bbc_out", "--overwrite"],
     r"--output_dir .*bbc_out' is --corpus_dir", r"outside its inputs"),
    ("quickstart-other-classes", "quickstart", ["--model", "{w}/deberta", "--corpus_dir", "{w}/corpus_two_classes",
                                                "--output_dir", "{w}/new"], r"the corpus has classes \['a', 'b'\]",
     r"pass the BBC News corpus"),
    ("eval-glue-output-empty", "eval_glue", ["{w}/new", "--output", ""], r"--output is the empty string",
     r"pass a file name"),
    ("eval-glue-output-directory", "eval_glue", ["{w}/new", "--output", "{w}"], r"--output .* is a directory",
     r"pass a file name"),
    ("eval-glue-another-familys-run", "eval_glue", ["{w}/mcq_finished_run"],
     r"mcq_finished_run' is no train_glue run \(its task is 'arc_e'\)", r"a multiple-choice run with test_mcq"),
    ("eval-glue-unknown-mode", "eval_glue", ["{w}/new", "--mode", "best"], r"mode = 'best' is out of range",
     r"one of \('mean', 'sample', 'mc'\)"),
    ("prepare-mcq-fractions", "prepare_mcq_bbcnews", ["--out_dir", "{w}/new", "--article_words", "5", "--max_train",
                                                      "2", "--max_test", "2", "--dev_fraction", "0.8"],
     r"dev_fraction 0.8 and test_fraction 0.2", r"fractions in \(0, 1\) that sum to less than 1"),
    ("prepare-mcq-eleven-topics", "prepare_mcq_bbcnews", ["--out_dir", "{w}/new", "--article_words", "5",
                                                          "--max_train", "2", "--max_test", "2", "--corpus_dir",
                                                          "{w}/corpus_eleven_classes"],
     r"has 11 topics, and a question takes at most 10 choices", r"pass a corpus of fewer category folders"),
    ("prepare-empty-texts", "prepare_bbcnews", ["--out_dir", "{w}/new", "--corpus_dir", "{w}/corpus_empty_texts"],
     r"corpus_empty_texts' holds no usable document \(2 .txt files", r"put the articles"),
    ("prepare-mcq-no-words", "prepare_mcq_bbcnews", ["--out_dir", "{w}/new", "--max_train", "2", "--max_test", "2"],
     r"--article_words is required", r"--help lists the flags"),
    ("quantize-svd-oversampling", "quantize_model", [*QUANTIZE, "--loftq_svd_oversampling", "-1"],
     r"loftq_svd_oversampling.*-1", r"integer >= 0"),
    ("quantize-no-model", "quantize_model", [*QUANTIZE, "--model", "{w}/nope"], r"model path .*nope' does not exist",
     r"pass a local directory"),
    ("quantize-bits", "quantize_model", [*QUANTIZE, "--bits", "3"], r"bits = 3 is out of range",
     r"one of \(2, 4, 8\); fix --bits"),
    ("quantize-rank", "quantize_model", [*QUANTIZE, "--rank", "0"], r"rank = 0 is out of range", r"integer >= 1"),
    ("quantize-K", "quantize_model", [*QUANTIZE, "--K", "-1"], r"K = -1 is out of range", r"integer >= 0"),
    ("quantize-loftq-iter", "quantize_model", [*QUANTIZE, "--loftq_iter", "0"], r"loftq_iter = 0 is out of range",
     r"integer >= 1; fix --loftq_iter"),
    ("quantize-device", "quantize_model", [*QUANTIZE, "--device", "tpu"], r"device = 'tpu' is out of range",
     r"one of \('cpu', 'cuda'\)"),
    ("quantize-rank-too-wide", "quantize_model", [*QUANTIZE, "--rank", "512"], r"rank 512 exceeds", r"min\(shape\)"),
    ("quantize-cuda", "quantize_model", [*QUANTIZE, "--device", "cuda"], r"--device cuda needs CUDA",
     r"drop the option"),
    ("quantize-unknown-preset", "quantize_model", [*QUANTIZE, "--preset", "llama-1b"], r"no row for",
     r"rows \(preset\)"),
    ("quantize-embeddings-maybe", "quantize_model", [*QUANTIZE, "--quantize_embeddings", "maybe"],
     r"--quantize_embeddings: expected true, false or null", r"got 'maybe'"),
    ("quantize-output-exists", "quantize_model", [*QUANTIZE, "--save_dir", "{w}/quantized", "--rank", "16"],
     r"exists and is not empty", r"pass --overwrite or another --save_dir"),
    # --- glue_table
    ("table-output-empty", "glue_table", ["{w}/empty", "--output", ""], r"--output is the empty string",
     r"pass a file name"),
    ("table-text-seed", "glue_table", ["{w}/results_text_seed"], r"has seed 'zero', not an integer",
     r"train the run again \(scripts/train_glue.py\) or leave it out"),
    ("table-no-path", "glue_table", ["{w}/nope"], r"nope' does not exist", r"pass run directories"),
    ("table-no-results", "glue_table", ["{w}/empty"], r"no results.json below", r"train with scripts/train_glue.py"),
    ("table-malformed-results", "glue_table", ["{w}/results_broken"], r"results_broken/results.json.* not valid JSON",
     r"delete it or re-run"),
    ("table-other-task", "glue_table", ["{w}/results_other"], r"is not a GLUE results.json \(task 'gsm8k'\)",
     r"pass GLUE run directories"),
    ("table-over-a-users-file", "glue_table", ["{w}/results_other", "--output", "{w}/used/keep.txt"],
     r"--output .*keep.txt' exists and no llmm table wrote it", r"pass --overwrite to replace it"),
    ("table-incomplete", "glue_table", ["{w}/results_incomplete", "--output", "{w}/used/table.md"],
     r"none of the 1 results.json files is complete", r"continue them with --resume_from_checkpoint"),
    ("table-which", "glue_table", ["{w}/results_incomplete", "--which", "first"], r"invalid choice: 'first'",
     r"choose from"),
    # --- prepare_bbcnews
    ("bbc-no-corpus", "prepare_bbcnews", ["--out_dir", "{w}/new", "--corpus_dir", "{w}/nope"],
     r"corpus directory .*nope' does not exist", r"pass --corpus_dir"),
    ("bbc-one-class", "prepare_bbcnews", ["--out_dir", "{w}/new", "--corpus_dir", "{w}/corpus_one_class"],
     r"needs one sub-folder per class", r"found \['business'\]"),
    ("bbc-one-document-class", "prepare_bbcnews", ["--out_dir", "{w}/new", "--corpus_dir", "{w}/corpus_two_classes"],
     r"too few documents for a stratified split \(per label id: \{0: 1, 1: 1\}",
     r"add documents.*or change dev_fraction / test_fraction"),
    ("bbc-output-in-corpus", "prepare_bbcnews", ["--out_dir", "{w}/corpus_two_classes/split", "--corpus_dir",
                                                 "{w}/corpus_two_classes"], r"--out_dir .* lies inside --corpus_dir",
     r"choose an --out_dir outside its inputs"),
    ("mcq-bbc-output-in-corpus", "prepare_mcq_bbcnews", ["--out_dir", "{w}/corpus_two_classes/q", "--corpus_dir",
                                                         "{w}/corpus_two_classes", "--article_words", "5",
                                                         "--max_train", "2", "--max_test", "2"],
     r"--out_dir .* lies inside --corpus_dir", r"choose an --out_dir outside its inputs"),
    ("bbc-output-exists", "prepare_bbcnews", ["--out_dir", "{w}/bbc_out", "--corpus_dir", "{w}/corpus_one_class"],
     r"exists and is not empty", r"--overwrite"),
    ("bbc-seed-twice", "prepare_bbcnews", ["--out_dir", "{w}/new", "--seed", "1", "--split_seed", "2"],
     r"--seed and --split_seed name one setting", r"pass only --split_seed"),
    ("bbc-fraction", "prepare_bbcnews", ["--out_dir", "{w}/new", "--corpus_dir", "{w}/corpus_one_class",
                                         "--dev_fraction", "0.9"], r"dev_fraction 0.9 and test_fraction 0.2",
     r"fractions in \(0, 1\) that sum to less than 1"),
]


def run_cli(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``python -m scripts.<script> argv``, run in-process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(lambda: SCRIPTS[script].main(argv))
    return exit_info.value.code, capsys.readouterr().err


def check_one_error_line(stderr: str, problem: str, fix: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert errors and errors == [lines[-1]], stderr[-2000:]  # one error line, the last thing on stderr
    assert re.search(problem, errors[0]), errors[0]
    assert re.search(fix, errors[0]), errors[0]
    return errors[0]


@pytest.mark.parametrize("script, argv, problem, fix", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input(world, capsys, script, argv, problem, fix):
    before = snapshot(world)
    code, stderr = run_cli(script, [a.replace("{w}", str(world)) for a in argv], capsys)
    assert code == 2
    check_one_error_line(stderr, problem, fix)
    assert snapshot(world) == before  # nothing created, changed or removed


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
@pytest.mark.parametrize("script, argv", [("train_gsm8k", GSM8K), ("train_nlg", NLG), ("train_glue", COLA)])
def test_report_to_a_logger_that_is_not_installed_is_one_line_before_anything_is_written(world, capsys, script, argv):
    before = snapshot(world)
    code, stderr = run_cli(script, [a.replace("{w}", str(world)) for a in [*argv, "--report_to", "tensorboard"]],
                           capsys)
    assert code == 2 and snapshot(world) == before
    check_one_error_line(stderr, r"--report_to tensorboard needs the tensorboard package", r"pip install tensorboard")


@pytest.mark.skipif(torch.cuda.is_available(), reason="paged optimizers run on CUDA")
def test_a_paged_optimizer_is_refused_as_a_flag_without_cuda_and_replaced_as_the_tables(world, capsys, tmp_path):
    """--optim paged_* on a machine without CUDA would run adamw_torch: refused. The table's paged optimizer (nlg.yaml)
    is replaced, and settings.json says so (optim_used)."""
    argv = [a.replace("{w}", str(world)) for a in NLG]
    code, stderr = run_cli("train_nlg", [*argv, "--optim", "paged_adamw_32bit"], capsys)
    assert code == 2
    check_one_error_line(stderr, r"--optim 'paged_adamw_32bit' has no effect on this run.*CUDA", r"drop --optim")
    out = tmp_path / "run"
    train_nlg.main([*argv[:argv.index("--output_dir")], *argv[argv.index("--output_dir") + 2:], "--output_dir",
                    str(out), "--max_train_samples", "2", "--max_eval_samples", "2"])
    saved = json.loads((out / "settings.json").read_text())
    assert saved["optim"] == "paged_adamw_32bit" and saved["optim_used"] == "adamw_torch"


def test_real_command_lines(world):
    """Through ``python -m`` (the scripts' __main__ wiring), several at once to save time."""
    cases = [case for case in CASES if case[0] in ("gsm8k-K", "table-malformed-results", "bbc-output-exists")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    before = snapshot(world)
    runs = [(case, subprocess.Popen([sys.executable, "-m", f"scripts.{case[1]}",
                                     *[a.replace("{w}", str(world)) for a in case[2]]],
                                    cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for case in cases]
    for (name, _, _, problem, fix), run in runs:
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 2, (name, stderr[-2000:])
        check_one_error_line(stderr, problem, fix)
    assert snapshot(world) == before


def test_split_fractions_of_a_table_are_checked_together():
    """The quick start's table gives the fractions: they are checked as a pair where every setting is checked."""
    from llmm.run import adapters

    adapters.check_settings({"dev_fraction": 0.3, "test_fraction": 0.6})
    with pytest.raises(ValueError, match=r"dev_fraction 0.5 and test_fraction 0.5: pass fractions in \(0, 1\)"):
        adapters.check_settings({"dev_fraction": 0.5, "test_fraction": 0.5})


@pytest.mark.parametrize("driver, flag, variable", [
    ("train_gsm8k.sh", "--seed", "SEEDS="), ("train_nlg_llama.sh", "--method=loftq", "METHODS="),
    ("train_glue_llmm.sh", "--seed", "SEEDS="), ("train_glue_llmm.sh", "--bits", "BITS="),
    ("train_mcq.sh", "--variant", "METHODS="), ("train_mcq.sh", "--dtype", "BACKBONES="),
    ("test_gsm8k.sh", "--mode", "MODES="), ("train_gsm8k.sh", "--model_name_or_path", "MODELS="),
    ("train_nlg_llama.sh", "--model_name_or_path=x", "MODELS=")])
def test_drivers_refuse_a_flag_their_loop_sets_for_each_run(tmp_path, driver, flag, variable):
    """argparse keeps the last of a flag given twice, so the extra argument would win for every run."""
    env = {**os.environ, "LAUNCH": "echo", "OUT": str(tmp_path / "runs"), "RUNS": str(tmp_path / "run")}
    done = subprocess.run(["bash", driver, "--max_steps", "1", flag, "7"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env=env)
    name = flag.split("=")[0]
    assert done.returncode == 2 and done.stdout == "" and not (tmp_path / "runs").exists()
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {name} is set by {driver} for each run") and variable in line.split("use ")[1]


@pytest.mark.parametrize("driver, seeds", [("train_gsm8k.sh", "0 abc"), ("train_nlg_llama.sh", "-1"),
                                           ("train_glue_llmm.sh", "table"), ("train_mcq.sh", "1.5")])
def test_drivers_refuse_seeds_that_are_no_seeds(tmp_path, driver, seeds):
    """A bad SEEDS= entry is named as such, not as the --seed argparse saw."""
    env = {**os.environ, "LAUNCH": "echo", "OUT": str(tmp_path / "runs"), "SEEDS": seeds}
    done = subprocess.run(["bash", driver], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and done.stdout == "" and not (tmp_path / "runs").exists()
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f'error: SEEDS="{seeds}" holds ') and "which is not a seed" in line


@pytest.mark.parametrize("driver", ["train_gsm8k.sh", "train_nlg_llama.sh"])
def test_llama_drivers_name_a_models_entry_that_is_no_directory(tmp_path, driver):
    """A mistyped directory in MODELS is named before any run starts (the script would call it an unknown row)."""
    env = {**os.environ, "LAUNCH": "echo", "OUT": str(tmp_path / "runs"), "SEEDS": "0",
           "MODELS": f"llama-2-7b {tmp_path / 'no-such-dir'}"}
    done = subprocess.run(["bash", driver], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and done.stdout == "" and not (tmp_path / "runs").exists()
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: MODELS=") and f"holds {tmp_path / 'no-such-dir'}, which is not a directory" in line


def test_test_gsm8k_sh_without_runs_is_an_error_line(tmp_path):
    done = subprocess.run(["bash", str(REPO_ROOT / "test_gsm8k.sh")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "LAUNCH": "echo", "RUNS": ""})
    assert done.returncode == 2 and done.stderr.startswith("error: no runs under runs/gsm8k/")


def test_the_llama_drivers_take_a_directory_of_your_own_in_models(tmp_path):
    """MODELS holds table rows (--model) or directories (--model_name_or_path, the table's defaults), each run named
    after its row or directory: your own checkpoint never runs under a row's name."""
    (tmp_path / "my-llama-4bit-16rank").mkdir()
    env = {**os.environ, "LAUNCH": "echo", "OUT": str(tmp_path / "runs"), "SEEDS": "0", "TASKS": "alpaca",
           "MODELS": f"llama-2-7b {tmp_path / 'my-llama-4bit-16rank'}/"}
    for driver in ("train_gsm8k.sh", "train_nlg_llama.sh"):
        done = subprocess.run(["bash", driver, "--max_steps", "1"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=60, env=env)
        row, own = [line for line in done.stdout.splitlines() if "--output_dir" in line]
        assert "--model llama-2-7b " in row and "--model_name_or_path" not in row and "llama-2-7b-r" in row
        assert f"--model_name_or_path {tmp_path / 'my-llama-4bit-16rank'}/ " in own and "--model " not in own
        name = own.split("--output_dir ")[1].split()[0].split("/")[-1]
        assert name.removeprefix("alpaca-").startswith("my-llama-4bit-16rank-r")


def test_drivers_pass_a_flag_only_to_the_runs_it_acts_in(tmp_path):
    """A flag a run would ignore is refused, so the drivers give such flags only where they act: test_gsm8k.sh's
    MC_SAMPLES to mc mode and SEED where something is drawn, train_glue_llmm.sh's BITS not to the 16-bit lora."""
    env = {**os.environ, "LAUNCH": "echo", "OUT": str(tmp_path / "runs")}  # echo: the driver's command lines
    for run, k in (("run", 2), ("baseline", 0)):
        (tmp_path / run / "adapter").mkdir(parents=True)
        (tmp_path / run / "adapter" / "adapter_config.json").write_text(json.dumps({"k": k}))
    done = subprocess.run(["bash", "test_gsm8k.sh"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**env, "RUNS": f"{tmp_path / 'run'} {tmp_path / 'baseline'}", "MODES": "mean sample mc",
                               "MC_SAMPLES": "16", "SEED": "1"})
    lines = {line.split("--mode ")[1].split()[0]: line for line in done.stdout.splitlines()
             if "--mode " in line and "/run/" in line}
    assert "--mc_samples" not in lines["mean"] + lines["sample"] and "--mc_samples 16" in lines["mc"]
    assert "--seed" not in lines["mean"] and "--seed 1" in lines["sample"] and "--seed 1" in lines["mc"]
    # the K = 0 baseline is tested in mean mode only (its noisy modes would be refused), each skip said
    baseline = [line for line in done.stdout.splitlines() if "baseline" in line]
    assert [line.split("--mode ")[1].split()[0] for line in baseline if "scripts.test_gsm8k" in line] == ["mean"]
    assert sum(line.startswith("skip: ") and "K = 0" in line for line in baseline) == 2
    for method, bits in (("lora", False), ("llmm", True)):
        done = subprocess.run(["bash", "train_glue_llmm.sh"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=60, env={**env, "METHOD": method, "BITS": "4", "TASKS": "cola", "QUANTS": "nf",
                                               "RANKS": "16", "SEEDS": "0"})
        runs = [line for line in done.stdout.splitlines() if "scripts.train_glue" in line]
        assert len(runs) == 1 and ("--bits 4" in runs[0]) is bits, done.stdout + done.stderr


def test_debug_is_never_a_setting():
    """--debug (run_main's: the traceback instead of the error line) stays out of the settings, the record and the
    cell, however often it is given."""
    from llmm import stats
    from llmm.run import mcq

    settings = mcq.parse_settings(["--task", "obqa", "--output_dir", "x", "--debug", "--debug"])
    assert "debug" not in settings.record() and "debug" not in stats.cell_of(settings)
    assert vars(cli.ArgumentParser().parse_args(["--debug"])) == {}


def test_a_list_setting_takes_one_or_more_values_where_none_would_mean_nothing():
    """--eval_modes with no mode would train and evaluate nothing; --ood with none is the table's own "no OOD set"."""
    from llmm.run import mcq

    with pytest.raises(ValueError, match=r"--eval_modes : name each mode once, at least one"):
        mcq.parse_settings(["--task", "obqa", "--output_dir", "x", "--eval_modes"])
    assert mcq.parse_settings(["--task", "obqa", "--output_dir", "x", "--ood"]).ood == []


@pytest.mark.parametrize("flag, data", [("--train_split", "--train_data"), ("--test_split", "--test_data")])
def test_a_split_beside_its_local_file_is_refused(flag, data):
    """train_mcq reads a local file whole: a split named beside it would be ignored, so it is one error line."""
    from llmm.run import mcq

    arc = str(REPO_ROOT / "tests" / "data" / "mcq" / "arc.jsonl")
    argv = ["--task", "arc_e", "--train_data", arc, "--test_data", arc, "--output_dir", "x"]
    with pytest.raises(ValueError, match=rf"{flag} .*no {data} \(the file is the"):
        mcq.parse_settings([*argv, flag, "validation"])
    assert mcq.parse_settings(["--task", "arc_e", "--output_dir", "x", flag, "validation"])[flag[2:]] == "validation"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be made")
def test_a_write_that_cannot_start_names_the_file_asked_for():
    from llmm.run import fileio

    with pytest.raises(OSError) as raised:
        fileio.write_text("/proc/llmm-table.md", "text")
    assert raised.value.filename == "/proc/llmm-table.md"  # not the hidden temporary file beside it
    assert cli.error_line(raised.value).startswith("'/proc/llmm-table.md': no such file or directory")


@pytest.mark.parametrize("script, argv", [("train_gsm8k", GSM8K), ("train_glue", COLA)])
def test_a_target_of_no_module_is_refused_before_the_weights_load(world, capsys, monkeypatch, script, argv):
    """A typo in --target_modules is found on the model's config (meta device), not after minutes of loading."""
    from llmm.run import causal_lm, glue

    def no_loading(*args, **kwargs):
        pytest.fail("the weights were loaded before the target modules were checked")

    monkeypatch.setattr(causal_lm, "load_backbone", no_loading)
    monkeypatch.setattr(glue, "load_model", no_loading)
    args = [a.replace("{w}", str(world)) for a in argv] + ["--target_modules", "qproj"]
    code, stderr = run_cli(script, args, capsys)
    assert code == 2
    check_one_error_line(stderr, r"target module\(s\) \['qproj'\] match no module", r"fix the name\(s\)")
