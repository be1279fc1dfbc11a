"""Output directories that lose nothing: exclusive locks, guarded removal, atomic publish, orphan clean-up.

    with dir_lock("runs/x"):                       # one writer per directory; another process gets DirectoryLocked
        ...
    check_removable("runs/x")                      # --overwrite only of a directory llmm wrote, holding nothing else
    check_outputs_apart({"--output_dir": out}, {"--runs": runs})  # no output is, holds or lies inside an input
    with atomic_dir("runs/x/adapter") as tmp:      # write into tmp; published by rename-or-fail on success
        model.save_pretrained(tmp)

A lock is ``fcntl.flock`` on a hidden sibling ``.<name>.lock``: the kernel releases it when its process dies (even
by kill -9), so a stale lock file never blocks anyone; it is re-entrant within a process. Temporary directories are
hidden siblings ``.<name>.<random>`` holding a ``.llmm-partial`` marker; the next writer (holding the lock) removes
them."""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import fnmatch
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger("llmm")

RUN_MARKER = ".llmm-run"  # written first into every run directory the scripts create
PARTIAL_MARKER = ".llmm-partial"  # inside a temporary directory until it is published
# Files that make a directory recognisably llmm's: the marker, or what the scripts / save_pretrained write.
RUN_FILES = (RUN_MARKER, "settings.json", "results.json", "quantize_report.json", "adapter_config.json",
             "predictions.jsonl", "prepare_report.json")

# What llmm (and the libraries it calls: save_pretrained, the Trainer) writes at the top of a directory it may
# replace with --overwrite: anything else there is the user's, and --overwrite refuses (foreign_entries).
LLMM_FILE_PATTERNS = RUN_FILES + (
    "curves.png", "reliability-*.png", "predictions.json", "predictions-*.json", "predictions-*.jsonl", "labels.json",
    "table.md", "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "spm.model",
    "added_tokens.json", "chat_template.*", "adapter_model.safetensors", "adapter_model.bin", "trainer_state.json",
    "training_args.bin", "optimizer.pt", "optimizer*.bin", "scheduler.pt", "scaler.pt", "rng_state*.pth",
    "llmm_noise_rng_*.pt", "llmm_loss_sum.json",  # llmm.run.checkpoints', in each checkpoint
    "configuration_*.py", "modeling_*.py", "tokenization_*.py", "spiece.model", "sentencepiece.bpe.model",
    "tekken.json",  # save_pretrained of remote-code models and other tokenizers
    "mean.json", "sample.json", "mc.json",  # eval_glue's eval/<mode>.json
    "events.out.tfevents.*",  # --report_to tensorboard
    "*.distcp", "latest", "zero_to_fp32.py", "*_optim_states.pt", "*_model_states.pt")  # sharded checkpoints' parts
LLMM_DIR_PATTERNS = ("adapter", "mean_adapter", "backbone", "merged", "checkpoints", "checkpoint-*", "llmm_init",
                     "eval", "data", "runs",  # runs: the Trainer's TensorBoard logs (--report_to tensorboard; GLUE)
                     "pytorch_model_fsdp_*", "optimizer_*", "global_step*")
DCP_FOLDERS = ("pytorch_model_fsdp_*", "optimizer_*")  # torch.distributed.checkpoint parts: a .metadata file each
# Written only beside a file that says which command wrote them: save_pretrained's model card, a prepare's splits.
LLMM_FILES_BESIDE = {"adapter_config.json": ("README.md",), "prepare_report.json": ("*.csv", "*.jsonl")}

_held: dict[str, list] = {}  # lock path -> [file descriptor, depth]


class DirectoryLocked(FileExistsError):
    """Another process holds the directory's lock."""


def _lock_path(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    return path.parent / f".{path.name}.lock"


def _check_nonempty_name(path) -> Path:
    if str(path).strip() == "":
        raise ValueError("the output directory is the empty string: pass a directory name")
    return Path(path)


def locked_by_other(path: str | Path) -> bool:
    """Whether another process holds ``path``'s lock (creates nothing)."""
    lock = _lock_path(path)
    if str(lock) in _held or not lock.is_file():
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # closing the file gives it back
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def in_use(path: str | Path, resume: bool = False) -> DirectoryLocked:
    """The error for a directory whose lock another process holds: wait (a resume of that run), or go elsewhere."""
    elsewhere = "" if resume else ", or choose another directory"
    return DirectoryLocked(f"{str(path)!r} is in use by another process (it holds {str(_lock_path(Path(path)))!r}): "
                           f"wait for it to finish{elsewhere}")


def acquire(path: str | Path) -> None:
    """Take ``path``'s exclusive lock for this process (re-entrant); DirectoryLocked if another process holds it."""
    lock = _lock_path(_check_nonempty_name(path))
    key = str(lock)
    if key in _held:
        _held[key][1] += 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise in_use(path) from None
        try:  # the holder before us may have unlinked the file after we opened it: lock the file that is there
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            _held[key] = [fd, 1]
            return
        os.close(fd)


def release(path: str | Path) -> None:
    """Give back one level of ``path``'s lock; the last one removes the lock file and unlocks."""
    key = str(_lock_path(path))
    if key in _held:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            _let_go(key)


def _let_go(key: str) -> None:
    fd, _ = _held.pop(key)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(key)
    os.close(fd)  # unlink before unlock: a waiter that locks the old file sees it is gone and retries


@atexit.register
def release_all() -> None:
    """Give back every lock this process holds (run_main calls it at the end; also at interpreter exit)."""
    for key in list(_held):
        _let_go(key)


@contextlib.contextmanager
def dir_lock(path: str | Path):
    acquire(path)
    try:
        yield Path(path)
    finally:
        release(path)


def protected_reason(path: str | Path) -> str | None:
    """Why ``path`` must never be removed, or None."""
    target = Path(os.path.realpath(_check_nonempty_name(path)))
    cwd = Path(os.path.realpath(os.getcwd()))
    if target == Path(target.anchor):
        return "it is the file system root"
    if target == Path(os.path.realpath(Path.home())):
        return "it is your home directory"
    if target == cwd or target in cwd.parents:
        return "it is the current directory or one above it"
    if (target / ".git").exists():
        return "it is a git repository"
    if target in Path(os.path.realpath(__file__)).parents:
        return "it holds the llmm code"
    return None


def recognisably_ours(path: str | Path) -> bool:
    """An empty directory, one holding a RUN_FILES file, or one directly inside a run directory (RUN_MARKER)."""
    path = Path(os.path.abspath(path))
    return path.is_dir() and (not any(path.iterdir()) or any((path / name).exists() for name in RUN_FILES)
                              or (path.parent / RUN_MARKER).is_file())


def _llmm_name(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def foreign_entries(path: str | Path, within_ours: bool = False) -> list[str]:
    """The sorted paths in ``path`` that llmm did not write. A folder with an llmm name or a run file is looked into:
    it names what inside it is foreign ("eval/notes.txt"). Another folder is llmm's only when it holds llmm files
    alone (test_mcq's per-rule plots ``llmm_tfb/reliability-*.png``), or, inside an llmm folder (``within_ours``:
    TensorBoard's runs/<date>/<time>/), when everything below it is; else it is named whole ("analysis/")."""
    path = Path(path)
    names = {entry.name for entry in path.iterdir()}
    files = LLMM_FILE_PATTERNS + tuple(p for key, extra in LLMM_FILES_BESIDE.items() if key in names for p in extra)
    foreign = []
    for entry in sorted(path.iterdir()):
        name, folder = entry.name, entry.is_dir() and not entry.is_symlink()
        if folder and not name.startswith("."):
            if _llmm_name(name, LLMM_DIR_PATTERNS) or any((entry / f).exists() for f in RUN_FILES):
                foreign += [f"{name}/{nested}" for nested in foreign_entries(entry, within_ours=True)]
            elif (foreign_entries(entry, within_ours=True) if within_ours else
                  not all(child.is_file() and not child.is_symlink() and _llmm_name(child.name, LLMM_FILE_PATTERNS)
                          for child in entry.iterdir())):
                foreign.append(f"{name}/")
            continue
        if name.startswith("."):  # .<name>.lock, .<name>.<random>: a lock, a temporary write (file or folder)
            stems = {name[1:].split(".")[0], name[1:].rsplit(".", 1)[0]}
            ours = name.startswith(".llmm-") or bool(stems & names) or any(
                _llmm_name(stem, files + LLMM_DIR_PATTERNS) for stem in stems) or (
                folder and (entry / PARTIAL_MARKER).is_file()) or (
                name == ".metadata" and entry.is_file() and _llmm_name(path.name, DCP_FOLDERS))
        else:
            ours = _llmm_name(name, files) and not entry.is_symlink()  # llmm writes no links
        if not ours:
            foreign.append(name + "/" * folder)
    return foreign


def remove_ours(folder: str | Path) -> tuple[list[str], list[str]]:
    """Remove what llmm wrote in ``folder`` (and it, if then empty): (removed, kept). A link is kept, never followed."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return [], [folder.name]
    kept, removed = foreign_entries(folder, within_ours=True), []
    for entry in sorted(folder.iterdir()):
        is_folder = entry.is_dir() and not entry.is_symlink()
        if (entry.name + "/" * is_folder) in kept:
            continue
        if is_folder and any(path.startswith(f"{entry.name}/") for path in kept):
            removed += [f"{entry.name}/{name}" for name in remove_ours(entry)[0]]
            continue
        if is_folder:
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name + "/" * is_folder)
    if not any(folder.iterdir()):
        folder.rmdir()
    return removed, kept


def remove_stale(folder: str | Path, why: str) -> None:
    """``remove_ours`` of results made stale (``why``), said in one line with what was kept."""
    removed, kept = remove_ours(folder)
    if removed:
        logger.info("removed %s in %s: %s%s", ", ".join(removed), folder, why,
                    f"; kept {', '.join(kept)}, which llmm did not write" * bool(kept))


def check_removable(path: str | Path) -> None:
    """Raise unless ``path`` is an llmm directory (not protected, not a link, no foreign entries) to replace."""
    if Path(path).is_symlink():
        raise FileExistsError(f"refusing to replace {str(path)!r} (--overwrite): it is a symbolic link (to "
                              f"{os.path.realpath(path)!r}); pass the directory it points to, or another output "
                              "directory")
    reason = protected_reason(path)
    if reason is None and not recognisably_ours(path):
        reason = f"it holds none of {', '.join(RUN_FILES)}, so it is not a directory llmm wrote"
    if reason is None and Path(path).is_dir():
        foreign = foreign_entries(path)
        if foreign:
            shown = ", ".join(repr(name) for name in foreign[:5]) + (f" and {len(foreign) - 5} more"
                                                                     if len(foreign) > 5 else "")
            reason = f"it holds {shown}, which llmm did not write"
    if reason:
        raise FileExistsError(f"refusing to replace {str(path)!r} (--overwrite): {reason}; choose another output "
                              "directory (or remove it yourself)")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(out_dir: Path) -> Path:
    """A hidden sibling ``.<name>.<random>`` of ``out_dir`` marked PARTIAL_MARKER, with mkdir's permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private
    (tmp / PARTIAL_MARKER).touch()
    return tmp


def clean_orphans(out_dir: Path) -> None:
    """Remove the temporary siblings a killed writer left (marked PARTIAL_MARKER), log others; hold the lock."""
    for path in out_dir.parent.glob(f".{out_dir.name}.*"):
        if not path.is_dir() or path.is_symlink():
            continue
        if (path / PARTIAL_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
            logger.warning("removed %s, the temporary directory of an interrupted write", path)
        else:
            logger.warning("found %s beside %s, left by an interrupted write? Not recognisably llmm's, so kept: "
                           "remove it yourself if it is not needed", path, out_dir)


def check_new_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """Raise unless ``out_dir`` may be written (no file, unlocked, empty / absent, or removable with ``overwrite``).
    Creates nothing."""
    out_dir = _check_nonempty_name(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output directory {str(out_dir)!r} is a file: choose another directory")
    for parent in out_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"{str(parent)!r} (above output directory {str(out_dir)!r}) is a file: "
                                      "choose another directory")
            if not out_dir.exists() and not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(f"cannot create output directory {str(out_dir)!r}: {str(parent)!r} is not "
                                      "writable; choose another directory")
            break
    if locked_by_other(out_dir):
        raise DirectoryLocked(f"{str(out_dir)!r} is in use by another process: wait for it to finish, or choose "
                              "another directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {str(out_dir)!r} exists and is not empty: choose another or "
                                  "pass overwrite=True / --overwrite")
        check_removable(out_dir)


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out_dir``; an old ``out_dir`` (``overwrite``) is first renamed aside into a marked
    temporary directory, so a crash never leaves neither."""
    (tmp / PARTIAL_MARKER).unlink()
    aside = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{str(out_dir)!r} appeared while this was written (another writer?): it is "
                                  f"kept as it is; the new files are lost. Choose another directory")
        check_removable(out_dir)
        aside = make_temp_dir(out_dir)  # marked: clean_orphans removes it if we die before the end
        os.rename(out_dir, aside / "old")
    try:
        os.rename(tmp, out_dir)  # replaces only an empty directory; never a non-empty one
    except OSError as error:
        if aside is not None:
            os.rename(aside / "old", out_dir)
            shutil.rmtree(aside, ignore_errors=True)
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(f"{str(out_dir)!r} appeared while this was written (another writer?): it is "
                                  "kept as it is. Choose another directory") from error
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False):
    """Yield a temporary sibling that becomes ``out_dir`` only once the block succeeds (locked, checked before and
    after, published by rename-or-fail: a crash mid-write leaves ``out_dir`` as it was)."""
    out_dir = Path(os.path.abspath(_check_nonempty_name(out_dir)))
    check_new_dir(out_dir, overwrite)
    with dir_lock(out_dir):
        check_new_dir(out_dir, overwrite)
        clean_orphans(out_dir)
        tmp = make_temp_dir(out_dir)
        try:
            yield str(tmp)
            _publish(tmp, out_dir, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# --- outputs apart from inputs ---------------------------------------------------------------------------------------

def resolved(path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _paths(value) -> list:
    values = [value] if value is None or isinstance(value, (str, os.PathLike)) else value
    return [v for v in values if v is not None and str(v).strip()]


# Files of an input directory the commands read (a run's, a model's, data files): a single output file may never
# take one of these names there.
READ_FILES = RUN_FILES + ("config.json", "model*.safetensors", "adapter_model.safetensors", "tokenizer*",
                          "trainer_state.json", "predictions.json", "predictions-*.json", "*.png", "*.jsonl", "*.tsv",
                          "*.csv", "*.parquet", "*.txt")


def _clobbers_input(file: Path) -> bool:
    """Whether an output ``file`` in an input directory replaces what is read there (READ_FILES, a saved model)."""
    return _llmm_name(file.name, READ_FILES) or any((file.parent / name).is_file()
                                                      for name in ("config.json", "adapter_config.json"))


def check_outputs_apart(outputs: dict, inputs: dict, files: tuple[str, ...] = ()) -> None:
    """Raise ValueError when an output is, contains or lies inside an input (flag -> path or paths; hub ids skipped).

    The outputs named in ``files`` are single files (a table's ``--output``): they may lie inside an input directory
    (``runs/mcq/table.md``) unless they would replace a file read there."""
    for out_flag, out_value in outputs.items():
        for out_path in _paths(out_value):
            out = resolved(out_path)
            for in_flag, in_value in inputs.items():
                for in_path in _paths(in_value):
                    if not os.path.lexists(os.path.expanduser(str(in_path))):
                        continue  # a hub id, or nothing yet: not a local input
                    source = resolved(in_path)
                    if out == source:
                        relation = "is"
                    elif out in source.parents:
                        relation = "contains"
                    elif source in out.parents and (out_flag not in files or _clobbers_input(out)):
                        relation = "lies inside"
                    else:
                        continue
                    raise ValueError(f"{out_flag} {str(out_path)!r} {relation} {in_flag} {str(in_path)!r}: writing "
                                     f"there would replace what the command reads; choose an {out_flag} outside "
                                     f"its inputs")


def check_output_file(path: str | Path) -> None:
    """Raise unless a single output file may be written at ``path`` (not a directory, its folder not a file)."""
    if str(path).strip() == "":
        raise ValueError("--output is the empty string: pass a file name")
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir() or str(path).endswith(os.sep):
        raise ValueError(f"--output {str(path)!r} is a directory, not a file: pass a file name such as "
                         f"{str(path / 'table.md')!r}")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"--output {str(path)!r}: {str(parent)!r} is a file, not a directory; choose another path")


def check_output_dir(path: str | Path, overwrite: bool = False, resume: bool | None = None) -> None:
    """Raise unless ``path`` may become this run's directory: a non-empty one only with ``resume`` (continue it) or
    ``overwrite`` (replace it, if check_removable allows). Creates nothing. ``resume`` None: the command cannot
    resume (its error names --overwrite only)."""
    if not str(path).strip():
        raise ValueError("--output_dir is the empty string: pass a directory name")
    path = Path(path)
    if resume and path.exists() and not path.is_dir():
        raise FileExistsError(f"output directory {str(path)!r} is a file: choose another --output_dir")
    if locked_by_other(path):  # a run in progress: that first, not what the directory holds so far
        raise in_use(path, resume)
    if resume:
        return
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        resumable = " / --resume_from_checkpoint (continue)" if resume is not None else ""
        raise FileExistsError(f"output directory {str(path)!r} exists and is not empty: choose another, or pass "
                              f"--overwrite (replace){resumable}")
    check_new_dir(path, overwrite)


def prepare_output_dir(path: str | Path, overwrite: bool = False, resume: bool | None = None) -> Path:
    """Lock ``path`` for the rest of this process, check it, replace it if overwriting, create it with RUN_MARKER."""
    check_output_dir(path, overwrite, resume)
    path = Path(path)
    acquire(path)  # held until the process ends (run_main gives it back)
    check_output_dir(path, overwrite, resume)  # again, now that no other process can change it (check_removable)
    if path.is_dir() and any(path.iterdir()) and overwrite and not resume:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).touch()
    return path


def make_output_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> None:
    """``prepare_output_dir`` on the main process only, the others waiting for it (torchrun / accelerate launch)."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        prepare_output_dir(path, overwrite, resume)
    state.wait_for_everyone()
