"""Library messages a user of the entry points cannot act on, filtered out; every other warning still shows.

Installed by ``llmm.run.cli.run_main``; the bitsandbytes filter alone by ``import llmm`` (before bitsandbytes loads:
it logs at import time), ``install_import_filter``:

- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community": without the optional ``kernels``
  package it uses its own CPU kernel (the same numbers).
- transformers' FutureWarning that ``gradient_checkpointing`` is renamed ``activation_checkpointing`` (the settings
  keep the name researchers know).
- transformers' LOAD REPORT whose only entries are a fresh task head (MISSING classifier / pooler / score) and the
  checkpoint's unused pretraining head (UNEXPECTED cls / lm_predictions / mask_predictions / lm_head): one line
  instead. A report with anything else (a missing backbone weight, a size mismatch) is printed as it is.
- PEFT's "Could not find a config file in ... - will assume that the vocabulary was not modified": said offline when
  an adapter's base is a directory written in the same run; the vocabulary is never modified here. Its companion
  "Unable to fetch remote file ... for the file config.json" comes first when the base is a hub id and the hub
  cannot be reached (quantize_model offline): the same lookup, for the same check.
- PEFT's "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter": the multiple-choice family
  adapts the LM head of models whose head shares the embedding's weight (SmolLM2); the adapter's delta goes to the
  head's output only, as intended, and is never merged, so ``ensure_weight_tying`` would change the method.
- bitsandbytes' "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16", logged at every forward of an
  LLM.int8 layer (the multiple-choice family's default backbone): shown once, as the fact it is.
- transformers' "mtime may not be reliable on this filesystem": checkpoints saved within a second (a smoke run)
  are ordered by their step number instead, which is their order.

Outside a terminal (the output sent to a log file), the libraries' redrawn progress bars are off: in a file each is
thousands of carriage returns. The Trainer then prints its logs as lines (``disable_tqdm``, llmm.run.trainer), and
llmm's own long loops log one line per tenth of the work (``progress``)."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings

FRESH_HEAD = ("classifier", "pooler", "score")
PRETRAINING_HEAD = ("cls", "lm_predictions", "mask_predictions", "lm_head")
_ROW = re.compile(r"^(\S+)\s*\|\s*([A-Z]+)\s*\|", re.MULTILINE)  # "key | STATUS |" (not the header)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _DropMessage(logging.Filter):
    """Drops the records starting with ``start``; ``keep_first``: lets the first of them through."""

    def __init__(self, start: str, keep_first: bool = False):
        super().__init__()
        self.start, self.keep_first = start, keep_first

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.start):
            return True
        keep, self.keep_first = self.keep_first, False
        return keep


class _FreshHeadReport(logging.Filter):
    """A LOAD REPORT of only a fresh head (and an unused pretraining head) becomes one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = _ANSI.sub("", str(record.msg))
        if "LOAD REPORT" not in text:
            return True
        rows = _ROW.findall(text)
        missing = [key for key, status in rows if status == "MISSING"]
        expected = missing and all(
            key.split(".")[0] in (FRESH_HEAD if status == "MISSING" else PRETRAINING_HEAD)
            and status in ("MISSING", "UNEXPECTED") for key, status in rows)
        if expected:
            record.msg, record.args = f"classifier head initialised fresh ({', '.join(sorted(missing))})", ()
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _add(name: str, flt: logging.Filter) -> None:
    logger = logging.getLogger(name)
    if not any(type(f) is type(flt) and getattr(f, "start", None) == getattr(flt, "start", None)
               for f in logger.filters):
        logger.addFilter(flt)


def install_import_filter() -> None:
    """bitsandbytes' import-time "Failed to load CPU gemm_4bit_forward" (idempotent)."""
    _add("bitsandbytes.backends.cpu.ops", _DropMessage("Failed to load CPU gemm_4bit_forward"))


def install() -> None:
    """Add every filter (idempotent)."""
    install_import_filter()
    _add("transformers.modeling_utils", _FreshHeadReport())
    _add("bitsandbytes.autograd._functions", _DropMessage("MatMul8bitLt: inputs will be cast", keep_first=True))
    _add("transformers.trainer_utils", _DropMessage("mtime may not be reliable on this filesystem"))
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Could not find a config file in .* the vocabulary was not modified")
    warnings.filterwarnings("ignore", message=r"Unable to fetch remote file due to the following error .* for the file "
                            r"config\.json in ")
    warnings.filterwarnings("ignore", message=r"Model has `tie_word_embeddings=True` and a tied layer is part of the "
                            r"adapter")
    if not sys.stderr.isatty():  # the libraries read these when they load; those loaded already are told
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()


def progress(items, desc: str, unit: str):
    """tqdm's bar over ``items`` on a terminal; else a log line per tenth of them (a bar in a log file is not read)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit=unit)
    return _logged(list(items), desc, unit)


def _logged(items: list, desc: str, unit: str):
    started, every = time.perf_counter(), max(1, len(items) // 10)
    for done, item in enumerate(items, 1):
        yield item
        if done % every == 0 or done == len(items):
            logging.getLogger("llmm").info("%s: %d / %d %ss, %.0f s", desc, done, len(items), unit,
                                           time.perf_counter() - started)
