"""From resolved settings to an LlmmConfig (the one place K -> k and llmmscale -> scale), range checks, and the
settings an _init.sh directory fixes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from llmm.run import schema


def llmm_config(settings: schema.Settings, target_modules: list[str], **extra):
    """LlmmConfig from resolved settings; the one place K -> k and llmmscale -> scale."""
    from peft import LoftQConfig

    from llmm import LlmmConfig

    loftq = {}
    if settings.init == "loftq":
        loftq = dict(init_lora_weights="loftq",
                     loftq_config=LoftQConfig(loftq_bits=settings.bits, loftq_iter=settings.loftq_iter),
                     loftq_method=settings.quant, loftq_compensate_scaling=settings.compensate_scaling,
                     **{name: settings[name] for name in ("loftq_svd", "loftq_svd_oversampling", "loftq_svd_iters")
                        if name in settings})  # the tables use LlmmConfig's names for these
    return LlmmConfig(
        r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=target_modules, k=settings.K, scale=settings.llmmscale,
        eval_noise=settings.eval_noise, scaled_gradient=settings.scaled_gradient,
        noise_per_example=settings.noise_per_example,
        **loftq, **extra,
    )


def check_settings(settings, blocks=schema.BLOCKS) -> None:
    """Every setting (of a Settings or a table row) is None (not set) or in its field's range; seeds are integers in
    0 .. 2^32 - 1 (numpy's legacy seeding limit); a split's dev and test fractions leave records to train on."""
    from llmm.streams import check_seed

    values = settings.record() if isinstance(settings, schema.Settings) else settings
    for name, value in values.items():
        if name in ("seed", "data_seed") and value is not None:
            check_seed(value, f"--{name}")
        rule = schema.setting_error(name, value, blocks)
        if rule:
            raise ValueError(f"{name} = {value!r} is out of range: it must be {rule}; fix --{name} or the table row "
                             "in configs/")
    # --report_to's package must be installed (the Trainer would fail at its start, after the run directory exists)
    from transformers.integrations import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    report_to = settings.get("report_to")
    if report_to in available and not available[report_to]():
        raise ValueError(f"--report_to {report_to} needs the {report_to} package: pip install {report_to}, or pass "
                         "--report_to none")
    dev, test = settings.get("dev_fraction"), settings.get("test_fraction")  # a Settings gives defaults too
    if dev is not None and test is not None and not dev + test < 1:
        raise ValueError(f"dev_fraction {dev} and test_fraction {test}: pass fractions in (0, 1) that sum to less "
                         "than 1")


def set_method_k(settings, given_k, plain: str) -> None:
    """K of --method: 0 for a baseline (a --K > 0 is an error), > 0 for llmm, whose K = 0 run is ``plain``'s (the
    same run under another name in the tables)."""
    if settings.method != "llmm":
        if given_k not in (None, 0):
            raise ValueError(f"--method {settings.method} trains plain LoRA factors (K = 0); drop --K or use --method "
                             "llmm")
        settings.K = 0
    elif settings.K == 0:
        raise ValueError(f"--method llmm with K = 0 is the --method {plain} run: use --method {plain}, or K > 0")


def check_flags_apply(settings: schema.Settings, given) -> None:
    """Each setting in ``given`` (the flags on the command line) has an effect on this run (its field's
    ``applies``, tested on the resolved settings): a flag the run would ignore is an error, not dropped silently."""
    for name in given:
        f = settings.__dataclass_fields__.get(name)
        applies = f.metadata["applies"] if f else None
        if applies and not applies.test(settings):
            raise ValueError(f"--{name} {settings[name]!r} has no effect on this run: it applies only with "
                             f"{applies.when}; drop --{name}")


def given_flags(args, keys=()) -> list[str]:
    """The settings named on the command line (``args``: the parsed flags), but a table's ``keys`` (row selectors)."""
    return [name for name, value in vars(args).items() if value is not None and name not in keys]


def check_eval_modes(modes) -> None:
    """--eval_modes (None: not given) names each mode once, at least one."""
    if modes is not None and (not modes or len(set(modes)) < len(modes)):
        raise ValueError(f"--eval_modes {' '.join(modes)}: name each mode once, at least one")


def check_sampled_modes(modes, k: int, what: str, fix: str) -> None:
    """Evaluation modes that sample the Llmm noise (mc, sample) need K > 0: with K = 0 they would silently be the
    mean network (train_mcq, test_mcq, eval_glue, test_gsm8k)."""
    sampled = [mode for mode in modes if mode in ("mc", "sample")]
    if sampled and not k > 0:
        raise ValueError(f"evaluation mode(s) {sampled} sample the Llmm noise, which {what} (K = 0) does not have: "
                         f"use {fix}")


def read_run_settings(path: Path, blocks, remedy: str, needed=()) -> dict:
    """A run's settings.json (old names taken as the current ones) holding the ``needed`` keys (checked first: a run
    of another family lacks them), each value in its field's range; ``remedy`` is the fix an error line names."""
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}): {remedy}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{str(path)!r} holds a {type(settings).__name__}, not a run's settings object: {remedy}")
    settings = schema.current_names(settings)
    missing = [key for key in needed if key not in settings]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {', '.join(missing)}: it is another family's run or an older "
                         f"version's; {remedy}")
    for name, value in settings.items():
        rule = schema.setting_error(name, value, blocks)
        if rule:
            raise ValueError(f"{str(path)!r} has {name} = {value!r}, which must be {rule}: {remedy}")
    return settings


def check_init_targets(init_dir: str | Path, init_targets, given: list[str] | None) -> None:
    """An _init.sh directory fixes the adapted modules (its LoftQ means): another --target_modules is an error."""
    if given and set(given) != set(init_targets or ()):
        raise ValueError(f"--target_modules {sorted(given)} differ from the targets of the _init.sh adapter "
                         f"{str(init_dir)!r} ({sorted(init_targets or ())}): drop --target_modules (the directory "
                         "decides), or make a directory with those targets (_init.sh --target_modules ...)")


INIT_DIR_LOFTQ = tuple(f.name for f in dataclasses.fields(schema.LoftQSettings)
                       if f.metadata["role"] == schema.INIT_DIR)  # what an _init.sh directory fixes


NF4_EXACT = {("nf", 4, 64), ("nf", 2, 64)}  # (quant, bits, block size) of a Q that a bitsandbytes NF4 load keeps


def init_dir_settings(model_dir: str | Path) -> dict:
    """The settings an _init.sh directory was made with (its quantize_report.json; {} without one), the names of
    directories made by earlier versions filled in."""
    report = Path(model_dir) / "quantize_report.json"
    if not report.is_file():
        return {}
    made = dict(json.loads(report.read_text(encoding="utf-8")).get("settings", {}))
    made.setdefault("loftq_svd", "exact")  # made before the truncated SVD existed
    made.setdefault("compensate_scaling", not made.get("reference_scaling", False))  # its old name, negated
    made.setdefault("quantize_embeddings", False)  # made before embeddings were quantized
    return made


def adopt_init_dir_settings(model_dir: str | Path, settings: schema.Settings, given: set[str]) -> None:
    """The LoftQ settings of an _init.sh directory's quantize_report.json replace the table's in ``settings`` (so
    settings.json and the cell say what was run); a flag in ``given`` asking for another value is an error, and so is
    a bitsandbytes NF4 load of a Q it would change."""
    made = init_dir_settings(model_dir)
    if not made:
        return
    for name in INIT_DIR_LOFTQ:
        if name not in made or name not in settings:
            continue
        if name in given and settings[name] != made[name]:
            raise ValueError(f"{str(model_dir)!r} was quantized with {name}={made[name]!r} but --{name} "
                             f"{settings[name]!r} was given: drop --{name} (the directory decides), or quantize "
                             "again with _init.sh")
        settings[name] = made[name]
    stored = (made.get("quant"), made.get("bits"), made.get("block_size", 64))
    if settings.get("load_in_4bit") and stored not in NF4_EXACT:
        raise ValueError(f"{str(model_dir)!r} holds Q as {stored[0]}{stored[1]} at block size {stored[2]}, which "
                         "bitsandbytes NF4 would re-quantize (another backbone than its LoftQ means were fitted to): "
                         "pass --load_in_4bit false (Q in 16/32 bits, exactly), or quantize again with --quant nf "
                         "--bits 4 (block size 64)")


def head_modules(model) -> list[str]:
    """The task head's modules, which stay full precision (neither quantized nor adapted): the top-level children
    beside the backbone that hold parameters, plus a pooler kept inside the backbone (BERT)."""
    heads = [name for name, child in model.named_children()
             if name != model.base_model_prefix and any(True for _ in child.parameters())]
    if "pooler" not in heads and getattr(model.base_model, "pooler", None) is not None:
        heads.append("pooler")
    return heads


def inside(name: str, modules: list[str]) -> bool:
    """Whether the module path ``name`` lies in (or is) one of ``modules`` (matched by path component)."""
    return any(part in modules for part in name.split("."))
