"""`LlmmConfig`: a `peft.LoraConfig` with the Gaussian K-direction fields (K, llmmscale, eval noise, gradient rule).

LoftQ is requested the PEFT way (``init_lora_weights="loftq"``, ``loftq_config=LoftQConfig(loftq_bits,
loftq_iter)``) and runs llmm's own quantizers on CPU or CUDA; ``loftq_method`` picks the quantizer and
``loftq_svd`` (with its oversampling and power iterations) the rank-r step."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from peft import LoraConfig

from llmm.quant import ALLOWED_BITS, ALLOWED_METHODS, check_svd_args

EVAL_NOISE_MODES = ("mean", "sample")

# LlmmConfig field -> the setting of llmm.run.schema whose declared range it must be in.
CONFIG_SETTINGS = {"k": "K", "scale": "llmmscale", "r": "rank", "lora_alpha": "lora_alpha",
                   "lora_dropout": "lora_dropout"}


@dataclass
class LlmmConfig(LoraConfig):
    k: int = field(default=2, metadata={"help": "K, the number of directions per factor (0 = plain LoRA/LoftQ)."})
    scale: float = field(default=400.0, metadata={
        "help": "llmmscale s > 0; the noise std along each direction is 1/sqrt(s)."})
    eval_noise: str = field(default="mean", metadata={
        "help": "In eval mode: 'mean' (eps = 0, deterministic, mergeable) or 'sample' (a fresh draw)."})
    scaled_gradient: bool = field(default=True, metadata={
        "help": "Paper's rule dZ[k] = eps_k dL/dF (True) or the plain pathwise gradient (False)."})
    noise_per_example: bool = field(default=False, metadata={
        "help": "One eps per example (leading batch dimension) instead of one per forward shared by the batch (False, "
                "the paper); computed as K + 1 LoRA paths per layer (llmm.layer)."})
    noise_width: float = field(default=1.0, metadata={
        "help": "Noise-width multiplier m >= 0: F~ = M + m sum_k eps_k Z[k] / sqrt(s) (1 = the paper, 0 = the mean "
                "network); usually chosen after training on validation data (llmm.width)."})
    gaussian_embeddings: bool = field(default=False, metadata={
        "help": "Targeted embedding tables get Gaussian K-direction pairs like the linear layers (True), or plain "
                "low-rank pairs, the reference's GLUE protocol (False; see llmm.embedding)."})
    loftq_method: str = field(default="nf", metadata={"help": "LoftQ quantizer: 'nf' (normal float) or 'uniform'."})
    loftq_block_size: int = field(default=64, metadata={"help": "Block size of the normal-float quantizer."})
    loftq_svd: str = field(default="truncated", metadata={
        "help": "LoftQ's rank-r step: 'truncated' (randomized range finder, warm-started from the previous iteration; "
                "seconds per 4096 x 4096 weight) or 'exact' (full SVD, as the reference)."})
    loftq_svd_oversampling: int = field(default=0, metadata={
        "help": "Truncated SVD: columns beyond r in each Krylov block (>= 0; the iterations' blocks already "
                "oversample)."})
    loftq_svd_iters: int = field(default=6, metadata={
        "help": "Truncated SVD: power (block Krylov) steps per LoftQ iteration (>= 0)."})
    loftq_compensate_scaling: bool = field(default=True, metadata={
        "help": "Divide the LoftQ factors by g = lora_alpha / r so W_q + g B A ~ W. False reproduces the reference, "
                "which wrote B A uncompensated."})

    def __post_init__(self):
        from llmm.run.schema import AdapterSettings, _number, setting_error

        for name, setting in CONFIG_SETTINGS.items():  # before PEFT's own checks: they assume sane types
            rule = setting_error(setting, getattr(self, name), (AdapterSettings,))
            if rule:
                raise ValueError(f"LlmmConfig {name} ({setting}) must be {rule}, got {getattr(self, name)!r}")
        super().__post_init__()
        for name in ("scaled_gradient", "noise_per_example", "gaussian_embeddings", "loftq_compensate_scaling"):
            if not isinstance(getattr(self, name), bool):  # a string such as "false" would act as True
                raise ValueError(f"{name} must be true or false (a bool), got {getattr(self, name)!r}")
        if not (_number(self.noise_width) and self.noise_width >= 0):
            raise ValueError(f"noise_width must be a finite number >= 0 (1 = the paper), got {self.noise_width!r}")
        if self.eval_noise not in EVAL_NOISE_MODES:
            raise ValueError(f"eval_noise must be one of {EVAL_NOISE_MODES}, got {self.eval_noise!r}")
        if self.loftq_method not in ALLOWED_METHODS:
            raise ValueError(f"loftq_method must be one of {ALLOWED_METHODS}, got {self.loftq_method!r}")
        check_svd_args(self.loftq_svd, self.loftq_svd_oversampling, self.loftq_svd_iters)
        if self.init_lora_weights == "loftq":
            bits, iters = self.loftq_config.get("loftq_bits"), self.loftq_config.get("loftq_iter", 1)
            if type(bits) is not int or bits not in ALLOWED_BITS:
                raise ValueError(f"loftq_bits must be one of {ALLOWED_BITS}, got {bits!r}")
            if type(iters) is not int or iters < 1:
                raise ValueError(f"loftq_iter must be an integer >= 1, got {iters!r}")
        if type(self.loftq_block_size) is not int or self.loftq_block_size < 1:
            raise ValueError(f"loftq_block_size must be an integer >= 1, got {self.loftq_block_size!r}")
        for name, kind in (("rank_pattern", "integers"), ("alpha_pattern", "numbers")):
            bad = {key: value for key, value in (getattr(self, name) or {}).items()
                   if not _number(value) or value <= 0 or (kind == "integers" and type(value) is not int)}
            if bad:
                raise ValueError(f"{name} values must be {kind} > 0, got {bad}")
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
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"LlmmConfig has no field {unknown[0]!r}: pass fields of LlmmConfig (e.g. eval_noise, "
                             "scale)")
        return cls(**{key: value for key, value in {**saved, **kwargs}.items() if key in names})
