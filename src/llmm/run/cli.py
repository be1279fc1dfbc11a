"""What every entry point shares around its ``main``: flags, logging, the library's log filters, one ``error:`` line.

Exit codes (``run_main``): 2 = bad input or an environment fault (one ``error: ...`` line naming the problem, the
file and the fix; bad input is found before anything is written), 3 = training diverged (a non-finite loss or
gradient; the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys

import torch
from safetensors import SafetensorError

from llmm import outdirs
from llmm.run import adapters, fileio, quiet, schema

logger = logging.getLogger("llmm")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (a missing flag, a value of the wrong type or choice) are one ``error:`` line, exit 2,
    like every other bad input: no usage block. --debug (run_main takes it) is listed by --help."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="on an error, show its traceback instead of the one error line")

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        vars(parsed).pop("debug", None)  # run_main's, never a setting
        return parsed, rest

    def error(self, message):
        self.exit(2, f"error: {message} ({self.prog} --help lists the flags)\n")


def add_output_flags(parser, required: bool = True, default: str | None = None) -> None:
    """--output_dir (RunSettings' field) and --overwrite, the same in every entry point that writes a run directory."""
    help_text = schema.RunSettings.__dataclass_fields__["output_dir"].metadata["help"]
    parser.add_argument("--output_dir", required=required, default=default, help=help_text)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing llmm run directory (never a "
                        "directory llmm did not write)")


def parse_fields(settings_class, argv, description: str, flags, required=(), renamed=None):
    """The settings of a job whose flags are the fields ``flags`` of ``settings_class`` (llmm.run.schema) and
    --overwrite: typed and range-checked by their fields (one error line), a missing ``required`` one too."""
    parser = ArgumentParser(description=description.splitlines()[0], allow_abbrev=False)
    schema.add_flags(parser, [settings_class], only=flags, renamed=renamed)
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty output directory")
    args = parser.parse_args(argv)
    schema.take_renamed(args, [settings_class])
    missing = [name for name in required if getattr(args, name) is None]
    if missing:
        raise ValueError(f"--{missing[0]} is required: pass it (python -m ... --help lists the flags)")
    settings = settings_class.of({name: value for name, value in vars(args).items() if value is not None})
    adapters.check_settings(settings, [settings_class])
    return settings


TABLE_MARK = "<!-- written by an llmm seed table (python -m scripts.*_table): replaced when it is run again -->\n"


def table_main(doc: str, argv, baseline: str, render, flags: dict | None = None) -> str:
    """The seed tables' entry points (glue_table, lm_table, mcq_table): PATHS (run directories or results.json files),
    --baseline, --output (never a directory, never over a file the table reads, over another file only with
    --overwrite: a table it wrote, marked by TABLE_MARK, is replaced) and the table's own ``flags`` ({name:
    add_argument's keywords}); ``render(args)`` makes the markdown, printed and, with --output, written."""
    parser = ArgumentParser(description=doc.split("\n\n")[0].strip(), allow_abbrev=False)
    parser.add_argument("paths", nargs="+", help="run directories (searched recursively) or results.json files")
    parser.add_argument("--baseline", default=None, help=f"method the others are paired with (same settings, "
                        f"same seeds; default {baseline})")
    parser.add_argument("--output", default=None, help="also write the tables to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output file no llmm table wrote")
    for name, keywords in (flags or {}).items():
        parser.add_argument(name, **keywords)
    args = parser.parse_args(argv)
    args.given_baseline, args.baseline = args.baseline, args.baseline or baseline
    if args.output is not None:
        outdirs.check_output_file(args.output)
        read = {name: getattr(args, name.lstrip("-")) for name in flags or {}}
        read = {name: value for name, value in read.items() if isinstance(value, str)}  # mcq_table's --published
        outdirs.check_outputs_apart({"--output": args.output}, {"paths": args.paths, **read}, files=("--output",))
        if os.path.isfile(args.output) and not _written_by_a_table(args.output):
            out = outdirs.resolved(args.output)
            held = [path for path in args.paths if outdirs.resolved(path) in out.parents]
            if held:  # a run's own file (a plot, a log): never replaced, --overwrite or not
                raise ValueError(f"--output {args.output!r} is a file inside {held[0]!r}, which the table reads: "
                                 "choose another --output")
            if not args.overwrite:
                raise FileExistsError(f"--output {args.output!r} exists and no llmm table wrote it: pass --overwrite "
                                      "to replace it, or another --output")
    text = render(args)
    if args.output:
        fileio.write_text(args.output, text + "\n" + TABLE_MARK)
    print(text, end="")
    return text


def _written_by_a_table(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(max(os.path.getsize(path) - len(TABLE_MARK.encode()), 0))
        return handle.read().decode("utf-8", errors="replace") == TABLE_MARK


def complete_runs(records: list, skipped: list, given_baseline: str | None = None) -> list:
    """The records of the complete runs; each incomplete one is named on stderr, and none complete is an error, as is
    a --baseline given that is none of their methods (its difference columns would be empty)."""
    for file in skipped:
        print(f"skipped (incomplete): {file}", file=sys.stderr)
    if not records:
        raise ValueError(f"none of the {len(skipped)} results.json files is complete: let the runs finish (or "
                         "continue them with --resume_from_checkpoint)")
    methods = sorted({str((record.get("cell") or {}).get("method")) for record in records})
    if given_baseline is not None and given_baseline not in methods:
        raise ValueError(f"--baseline {given_baseline!r} is none of the runs' methods ({', '.join(methods)}): pass "
                         "one of them")
    return records


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)


class TrainingDiverged(RuntimeError):
    """The training loss, gradients or parameters became NaN or infinite (exit code 3)."""


OS_FIXES = {
    errno.EACCES: "permission denied: check its permissions or choose another path",
    errno.EPERM: "operation not permitted: check its permissions or choose another path",
    errno.EROFS: "read-only file system: choose a writable directory",
    errno.ENOSPC: "no space left on device: free space or write elsewhere, then run again (with "
                  "--resume_from_checkpoint for a training run: complete checkpoints are kept)",
    errno.EDQUOT: "disk quota exceeded: free space or write elsewhere, then run again (with --resume_from_checkpoint "
                  "for a training run)",
    errno.EISDIR: "is a directory: pass a file",
    errno.ENOTDIR: "a part of the path is a file, not a directory: fix the path",
    errno.ENOENT: "no such file or directory (an output: it cannot be made there): check the path",
}


def disk_full(error: BaseException) -> bool:
    """A write that failed for lack of space: an OSError ENOSPC, or torch.save's / safetensors' wrapped form (torch's
    zip writer reports a short write as "unexpected pos N vs M" from inline_container.cc)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return any(sign in text for sign in ("No space left on device", "StorageFull", "code: 28,",
                                         "PytorchStreamWriter failed writing file"))\
        or ("inline_container.cc" in text and "unexpected pos" in text)


def out_of_memory(error: BaseException) -> bool:
    """An allocation that failed: torch's OutOfMemoryError (CUDA), its CPU allocator's error, or Python's."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error)


def error_line(error: BaseException) -> str:
    """The one line that run_main prints for ``error``: the problem, the file, the fix."""
    if out_of_memory(error):
        return (f"out of memory ({' '.join(str(error).split())[:160]}): lower the batch size, the sequence length, "
                "the rank or K, or run on a device with more memory")
    if disk_full(error):
        where = f"{error.filename!r}: " if isinstance(error, OSError) and error.filename else ""
        return f"{where}{OS_FIXES[errno.ENOSPC]} ({' '.join(str(error).split())[:200]})"
    if isinstance(error, OSError) and error.errno in OS_FIXES:
        where = f"{error.filename!r}" if error.filename else "a file"
        detail = error.strerror if error.strerror and error.strerror != os.strerror(error.errno) else ""
        return f"{where}: {OS_FIXES[error.errno]}" + (f" ({detail})" if detail else "")
    if isinstance(error, SafetensorError):
        return (f"a .safetensors file could not be read ({error}): it is truncated or corrupt; write it again "
                "(re-run the command that made it) or re-download it")
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({error}): convert it to UTF-8"
    if isinstance(error, json.JSONDecodeError):
        return f"a JSON file is malformed ({error}): fix it or write it again"
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def run_main(main) -> None:
    """Run an entry point; bad input and environment faults (exit code 2) and a diverged training (exit code 3)
    become one ``error:`` line and no traceback (``--debug`` on the command line shows the traceback instead).
    Locks on output directories are given back at the end."""
    quiet.install()
    debug = "--debug" in sys.argv[1:]
    sys.argv[1:] = [arg for arg in sys.argv[1:] if arg != "--debug"]
    setup_logging()
    try:
        main()
    except (ValueError, OSError, SafetensorError, TrainingDiverged, RuntimeError, MemoryError) as error:
        if debug or (isinstance(error, RuntimeError) and not isinstance(error, TrainingDiverged)
                     and not disk_full(error) and not out_of_memory(error)):
            raise  # a RuntimeError other than a full disk or memory is a bug: show the traceback
        print(f"error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(3 if isinstance(error, TrainingDiverged) else 2) from None
    finally:
        outdirs.release_all()


def require_cuda_for(option: str) -> None:
    """CUDA-only options fail early on a machine without CUDA."""
    if not torch.cuda.is_available():
        raise ValueError(f"{option} needs CUDA, and torch.cuda.is_available() is False: drop the option")
