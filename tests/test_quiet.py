"""llmm.run.quiet: the entry points hide library noise a user cannot act on, and nothing else."""

import logging
import warnings

from transformers import BertConfig, BertForPreTraining, BertForSequenceClassification

from llmm.run import quiet

BERT = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def load_report(loader, path, **kwargs) -> list[logging.LogRecord]:
    """The records transformers' loader logs (its loggers do not propagate to pytest's caplog)."""
    quiet.install()
    logger, handler = logging.getLogger("transformers.modeling_utils"), Collect()
    logger.addHandler(handler)
    try:
        loader.from_pretrained(path, **kwargs)
    finally:
        logger.removeHandler(handler)
    return handler.records


def test_a_fresh_classifier_head_is_one_line_and_a_real_problem_the_full_report(tmp_path):
    BertForPreTraining(BERT).save_pretrained(tmp_path / "pretrained")  # an MLM + NSP head, no classifier
    records = load_report(BertForSequenceClassification, tmp_path / "pretrained", num_labels=3)
    assert [r.getMessage() for r in records] == ["classifier head initialised fresh (classifier.bias, "
                                                 "classifier.weight)"]
    assert records[0].levelno == logging.INFO
    BertForSequenceClassification(BERT).bert.save_pretrained(tmp_path / "encoder")  # no pretraining head
    records = load_report(BertForPreTraining, tmp_path / "encoder")  # its whole head is missing: real
    assert any("LOAD REPORT" in r.getMessage() and r.levelno == logging.WARNING for r in records)


def test_known_library_warnings_are_filtered_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6. Use "
                      "`activation_checkpointing` instead.", FutureWarning)
        warnings.warn("Could not find a config file in runs/x/backbone - will assume that the vocabulary was not "
                      "modified.", UserWarning)
        warnings.warn("Unable to fetch remote file due to the following error (MaxRetryError('...')) - silently "
                      "ignoring the lookup for the file config.json in sentence-transformers/all-MiniLM-L6-v2.")
        warnings.warn("Unable to fetch remote file due to the following error x - silently ignoring the lookup for "
                      "the file tokenizer_config.json in org/model.")  # another file's lookup: shown
        warnings.warn("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
                      "`ensure_weight_tying` is not set to True.", UserWarning)
        warnings.warn("`something_else` is deprecated", FutureWarning)
    assert [str(w.message).split(" - ")[0] for w in caught] == [
        "Unable to fetch remote file due to the following error x", "`something_else` is deprecated"]


def test_the_bitsandbytes_kernels_line_is_dropped_and_other_bitsandbytes_messages_pass():
    quiet.install()  # the entry points' subprocess check: test_llama_scripts.test_command_line_errors_exit_2...
    logger, handler = logging.getLogger("bitsandbytes.backends.cpu.ops"), Collect()
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "x")
        logger.warning("some other bitsandbytes problem")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in handler.records] == ["some other bitsandbytes problem"]


def test_the_int8_cast_is_said_once_and_the_smoke_runs_checkpoint_order_not_at_all(tmp_path):
    """A real LLM.int8 layer's bfloat16 forwards log the float16 cast every time: the first line passes."""
    import bitsandbytes as bnb
    import torch

    quiet.install()
    for once in [f for f in logging.getLogger("bitsandbytes.autograd._functions").filters if hasattr(f, "seen")]:
        once.seen = False  # as in a fresh process (an earlier test may have said it)
    layer = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False, threshold=0.0).to("cpu").eval()  # evaluation
    logger, handler = logging.getLogger("bitsandbytes.autograd._functions"), Collect()
    logger.addHandler(handler)
    try:
        for _ in range(3):
            layer(torch.randn(2, 16, dtype=torch.bfloat16))
        logger.warning("MatMul8bitLt: something else")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in handler.records] == [
        "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization",
        "MatMul8bitLt: something else"]
    logger, handler = logging.getLogger("transformers.trainer_utils"), Collect()
    logger.addHandler(handler)
    try:
        logger.warning("mtime may not be reliable on this filesystem, falling back to numerical ordering")
    finally:
        logger.removeHandler(handler)
    assert handler.records == []
