"""`LlmmConfig`: a `peft.LoraConfig` with the Gaussian K-direction fields (K, llmmscale, eval noise, gradient rule).

LoftQ is requested the PEFT way (``init_lora_weights="loftq"``, ``loftq_config=LoftQConfig(loftq_bits,
loftq_iter)``) and runs llmm's own quantizers on CPU or CUDA; ``loftq_method`` picks the quantizer and
``loftq_svd`` (with its oversampling and power iterations) the rank-r step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from peft import LoraConfig

from llmm.quant import ALLOWED_BITS, ALLOWED_METHODS, ALLOWED_SVD, check_svd_args

EVAL_NOISE_MODES = ("mean", "sample")


def _integer(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _in(low: float, high: float, closed_high: bool = False):
    return lambda v: _number(v) and low <= v and (v <= high if closed_high else v < high)


# The declared range of every numeric setting: one schema for LlmmConfig (config_field -> setting below), the
# tables in configs/ and every command-line flag (llmm.run.adapters.check_settings). name: (accepts, what it must be).
SETTING_RULES = {
    "K": (lambda v: _integer(v, 0), "an integer >= 0 (directions per factor; 0 = plain LoRA/LoftQ)"),
    "llmmscale": (lambda v: _number(v) and v > 0, "a finite number > 0 (the noise std is 1/sqrt(llmmscale))"),
    "rank": (lambda v: _integer(v, 1), "an integer >= 1"),
    "lora_alpha": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "lora_dropout": (_in(0, 1), "a number in [0, 1)"),
    "bits": (lambda v: v in ALLOWED_BITS, f"one of {ALLOWED_BITS}"),
    "quant": (lambda v: v in ALLOWED_METHODS, f"one of {ALLOWED_METHODS}"),
    "loftq_iter": (lambda v: _integer(v, 1), "an integer >= 1"),
    "loftq_svd": (lambda v: v in ALLOWED_SVD, f"one of {ALLOWED_SVD}"),
    "loftq_svd_oversampling": (lambda v: _integer(v, 0), "an integer >= 0 (columns beyond the rank)"),
    "loftq_svd_iters": (lambda v: _integer(v, 0), "an integer >= 0 (power steps)"),
    "block_size": (lambda v: _integer(v, 1), "an integer >= 1"),
    "learning_rate": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "max_grad_norm": (lambda v: _number(v) and v >= 0, "a finite number >= 0 (0 = no clipping)"),
    "warmup_ratio": (_in(0, 1), "a number in [0, 1)"),
    "epochs": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "max_steps": (lambda v: _integer(v, 1), "an integer >= 1"),
    "mc_samples": (lambda v: _integer(v, 1), "an integer >= 1"),
    "batch_size": (lambda v: _integer(v, 1), "an integer >= 1"),
    "eval_batch_size": (lambda v: _integer(v, 1), "an integer >= 1"),
    "per_device_train_batch_size": (lambda v: _integer(v, 1), "an integer >= 1"),
    "per_device_eval_batch_size": (lambda v: _integer(v, 1), "an integer >= 1"),
    "grad_accum": (lambda v: _integer(v, 1), "an integer >= 1"),
    "gradient_accumulation_steps": (lambda v: _integer(v, 1), "an integer >= 1"),
    "max_length": (lambda v: _integer(v, 1), "an integer >= 1"),
    "source_max_len": (lambda v: _integer(v, 1), "an integer >= 1"),
    "target_max_len": (lambda v: _integer(v, 1), "an integer >= 1"),
    "max_new_tokens": (lambda v: _integer(v, 1), "an integer >= 1"),
    "logging_steps": (lambda v: _integer(v, 1), "an integer >= 1"),
    "eval_steps": (lambda v: _integer(v, 0), "an integer >= 0"),
    "save_steps": (lambda v: _integer(v, 0), "an integer >= 0"),
    "save_total_limit": (lambda v: _integer(v, 1), "an integer >= 1"),
    "eval_size": (lambda v: _integer(v, 0), "an integer >= 0"),
    "max_train_samples": (lambda v: _integer(v, 1), "an integer >= 1"),
    "max_eval_samples": (lambda v: _integer(v, 1), "an integer >= 1"),
    "max_samples": (lambda v: _integer(v, 1), "an integer >= 1"),
    "num_labels": (lambda v: _integer(v, 1), "an integer >= 1"),
    "seed": (lambda v: _integer(v, 0), "an integer >= 0"),
    "seeds": (lambda v: _integer(v, 1), "an integer >= 1 (the number of seeds)"),
    "dev_fraction": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
    "test_fraction": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
    "mc_dropout": (_in(0, 1), "a number in [0, 1)"),
    "data_seed": (lambda v: _integer(v, 0), "an integer >= 0"),
    "temperature": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "top_k": (lambda v: _integer(v, 0), "an integer >= 0"),
    "top_p": (_in(0, 1, closed_high=True), "a number in [0, 1]"),
    "output_dir": (lambda v: isinstance(v, str) and v.strip() != "", "a directory name, not empty"),
    "save_dir": (lambda v: isinstance(v, str) and v.strip() != "", "a directory name, not empty"),
}
CONFIG_SETTINGS = {"k": "K", "scale": "llmmscale", "r": "rank", "lora_alpha": "lora_alpha",
                   "lora_dropout": "lora_dropout"}


def setting_error(name: str, value) -> str | None:
    """None if ``value`` is in the declared range of setting ``name`` (or ``name`` has none), else what it must be."""
    accepts, rule = SETTING_RULES.get(name, (lambda v: True, ""))
    return None if accepts(value) else rule


@dataclass
class LlmmConfig(LoraConfig):
    k: int = field(default=2, metadata={"help": "K, the number of directions per factor (0 = plain LoRA/LoftQ)."})
    scale: float = field(
        default=400.0, metadata={"help": "llmmscale s > 0; the noise std along each direction is 1/sqrt(s)."}
    )
    eval_noise: str = field(
        default="mean",
        metadata={"help": "In eval mode: 'mean' (eps = 0, deterministic, mergeable) or 'sample' (a fresh draw)."},
    )
    scaled_gradient: bool = field(
        default=True,
        metadata={"help": "Paper's rule dZ[k] = eps_k dL/dF (True) or the plain pathwise gradient (False)."},
    )
    gaussian_embeddings: bool = field(
        default=False,
        metadata={"help": "Targeted embedding tables get Gaussian K-direction pairs like the linear layers (True), "
                  "or plain low-rank pairs, the reference's GLUE protocol (False; see llmm.embedding)."},
    )
    loftq_method: str = field(default="nf", metadata={"help": "LoftQ quantizer: 'nf' (normal float) or 'uniform'."})
    loftq_block_size: int = field(default=64, metadata={"help": "Block size of the normal-float quantizer."})
    loftq_svd: str = field(
        default="truncated",
        metadata={"help": "LoftQ's rank-r step: 'truncated' (randomized range finder, warm-started from the previous "
                  "iteration; seconds per 4096 x 4096 weight) or 'exact' (full SVD, as the reference)."},
    )
    loftq_svd_oversampling: int = field(
        default=0,
        metadata={"help": "Truncated SVD: columns beyond r in each Krylov block (>= 0; the iterations' blocks "
                  "already oversample)."},
    )
    loftq_svd_iters: int = field(
        default=6, metadata={"help": "Truncated SVD: power (block Krylov) steps per LoftQ iteration (>= 0)."}
    )
    loftq_compensate_scaling: bool = field(
        default=True,
        metadata={
            "help": "Divide the LoftQ factors by g = lora_alpha / r so W_q + g B A ~ W. False reproduces the "
            "reference, which wrote B A uncompensated."
        },
    )

    def __post_init__(self):
        for name, setting in CONFIG_SETTINGS.items():  # before PEFT's own checks: they assume sane types
            rule = setting_error(setting, getattr(self, name))
            if rule:
                raise ValueError(f"LlmmConfig {name} ({setting}) must be {rule}, got {getattr(self, name)!r}")
        super().__post_init__()
        if self.eval_noise not in EVAL_NOISE_MODES:
            raise ValueError(f"eval_noise must be one of {EVAL_NOISE_MODES}, got {self.eval_noise!r}")
        if self.loftq_method not in ALLOWED_METHODS:
            raise ValueError(f"loftq_method must be one of {ALLOWED_METHODS}, got {self.loftq_method!r}")
        check_svd_args(self.loftq_svd, self.loftq_svd_oversampling, self.loftq_svd_iters)
        if self.init_lora_weights == "loftq":
            bits = self.loftq_config.get("loftq_bits")
            if bits not in ALLOWED_BITS:
                raise ValueError(f"loftq_bits must be one of {ALLOWED_BITS}, got {bits!r}")
        other_variants = [name for name in ("use_dora", "use_bdlora", "arrow_config", "velora_config",
                                            "monteclora_config", "kasa_config", "alora_invocation_tokens")
                          if getattr(self, name, None)]
        if other_variants:
            raise ValueError(f"LlmmConfig cannot combine with other LoRA variants ({', '.join(other_variants)}): "
                             "unset them; the Llmm layer replaces PEFT's variant for every adapted layer")
        from llmm.embedding import EMBEDDING_MODULES
        from llmm.layer import CUSTOM_MODULES

        self._register_custom_module({**CUSTOM_MODULES, **EMBEDDING_MODULES})

    @classmethod
    def from_pretrained(cls, adapter_dir: str, **kwargs) -> "LlmmConfig":
        """Read ``adapter_config.json`` of an llmm adapter directory (local)."""
        path = os.path.join(adapter_dir, "adapter_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no adapter_config.json in {adapter_dir!r}: pass a directory written by "
                                    "save_pretrained of an llmm model")
        try:
            with open(path, encoding="utf-8") as handle:
                saved = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path!r} is not valid JSON ({error}): it is corrupt; write the adapter again "
                             "(save_pretrained) or restore the file") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{path!r} holds no JSON object: write the adapter again (save_pretrained)")
        if "k" not in saved or "scale" not in saved:
            raise ValueError(f"{adapter_dir!r} holds a plain LoRA adapter (no 'k'/'scale' in adapter_config.json); "
                             "load it with peft.PeftModel.from_pretrained")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{key: value for key, value in {**saved, **kwargs}.items() if key in names})
