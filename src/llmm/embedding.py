"""Adapters on embedding tables: a (LoftQ-)quantized ``nn.Embedding`` plus a trainable low-rank pair.

The GLUE protocol of the reference and of LoftQ (``--quant_embedding``): each table W (num_embeddings x dim) becomes
Q plus a rank-r pair initialised from LoftQ's factors. The layer is PEFT's LoRA ``Embedding`` with its layout:
``lora_embedding_A`` (r x num_embeddings), ``lora_embedding_B`` (dim x r), scaling g = lora_alpha / r::

    out    = Q[x] + g * A^T[x] B^T         a looked-up row (the model calls the layer: word / position embeddings)
    weight = Q + g * (B A)^T                the whole table (the model reads ``.weight``: DeBERTa's rel_embeddings)

PEFT's own ``Embedding.weight`` is the base table Q, so a model that reads the table (DeBERTa's
``encoder.rel_embeddings``) silently never sees the adapter, as in the reference. Here ``weight`` is the adapted
table; with plain PEFT, merge that one layer (``layer.merge()``) to get the same table, bit for bit.

LoftQ runs on W in the reference's layout: (Q, M_A, M_B) = ``loftq_factors(W)``, so A = M_B^T and B = M_A^T.
With ``gaussian_embeddings=True`` each factor is a Gaussian with K directions as in the linear layers; a table the
model reads whole draws one pair shared by the batch, and batched Monte-Carlo networks refuse such a model."""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Embedding as LoraEmbedding
from torch import nn

from llmm.layer import LlmmVariant, loftq_factors


class LlmmEmbeddingVariant(LlmmVariant):
    """Gaussian K-direction factors on an embedding pair: the linear variant with PEFT's embedding layout (a lookup
    of A^T, no dropout, the model's embedding scale on the update)."""

    @staticmethod
    def means(module, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return module.lora_embedding_A[adapter_name], module.lora_embedding_B[adapter_name]

    @staticmethod
    def project(module, adapter_name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return module._embed(x, weight.T)

    @staticmethod
    def project_groups(module, adapter_name: str, x: torch.Tensor, factors_A: torch.Tensor) -> torch.Tensor:
        return torch.stack([module._embed(rows, factor.T) for rows, factor in zip(x, factors_A)])

    @staticmethod
    def lora_path(module, adapter_name: str, x: torch.Tensor, factor_A, factor_B) -> torch.Tensor:
        return (module._embed(x, factor_A.T) @ factor_B.T) * module.scaling[adapter_name]

    @staticmethod
    def finish(module, adapter_name: str, result: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        embed_scale = module._get_embed_scale()
        if embed_scale is not None:
            update = update * embed_scale.to(update.dtype)
        return result + update


class LlmmEmbedding(LoraEmbedding):
    """PEFT's LoRA Embedding with llmm's LoftQ init, an optional Gaussian pair, and ``weight`` = the adapted table."""

    def resolve_lora_variant(self, *, config, **kwargs):
        return LlmmEmbeddingVariant() if getattr(config, "gaussian_embeddings", False) else None

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        self._init_config = config  # PEFT's Embedding calls loftq_init(adapter_name) without the config
        try:
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        finally:
            del self._init_config

    @torch.no_grad()
    def loftq_init(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        q_weight, factor_A, factor_B = loftq_factors(base.weight, self.r[adapter_name], self.scaling[adapter_name],
                                                     self._init_config)
        table_A, table_B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        table_A.data = factor_B.T.contiguous().to(table_A.dtype).to(table_A.device)
        table_B.data = factor_A.T.contiguous().to(table_B.dtype).to(table_B.device)
        base.weight.data = q_weight.to(base.weight.dtype).to(base.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The table the model sees: Q plus the active adapters' low-rank tables (Q alone when disabled or merged)."""
        table = self.get_base_layer().weight
        if self.disable_adapters or self.merged:
            return table
        for adapter in self.active_adapters:
            if adapter not in self.lora_embedding_A:
                continue
            if adapter in getattr(self, "llmm_settings", {}):
                factor_A, factor_B = LlmmEmbeddingVariant.factors(self, adapter)
                table = table + (factor_B @ factor_A).T * self.scaling[adapter]
            else:  # the very sum PEFT's merge writes, so a merged plain-PEFT table is bitwise the same
                table = table + self.get_delta_weight(adapter).to(table.dtype)
        return table


EMBEDDING_MODULES: dict[type[nn.Module], type[nn.Module]] = {nn.Embedding: LlmmEmbedding}


def embedding_targets(model: nn.Module, names: list[str]) -> dict[str, nn.Embedding]:
    """Module path -> nn.Embedding for every module whose last name is in ``names`` (absent names are skipped);
    an error if there is none."""
    found = {path: module for path, module in model.named_modules()
             if path.split(".")[-1] in names and isinstance(module, nn.Embedding)}
    if not found:
        raise ValueError(f"no embedding table named {names} in this model: fix the model_type's row of "
                         "configs/embedding_targets.yaml, or turn quantize_embeddings off")
    return found
