"""Common random numbers: the Llmm noise has its own generator, so methods with one seed share every other draw.

With the directions frozen at Z = 0 the Llmm sample equals the mean, so a K = 2 run and a K = 0 run of the same
seed compute the same network; they give identical losses only if the noise consumes none of torch's global random
numbers (dropout masks, data order). A run that takes one extra global draw is the control: the test can fail.
"""

import numpy as np
import pytest
import torch
from conftest import DEBERTA_TARGETS, tiny_deberta
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments

from llmm import LlmmConfig, get_llmm_model, noise_source, seed_noise
from llmm.run import trainer as training


class ExtraGlobalDraw(TrainerCallback):
    """What drawing eps from torch's global generator did: one more global draw per step."""

    def on_step_begin(self, args, state, control, **kwargs):
        torch.randn(2, 2)


def losses(k: int, out, callbacks=()) -> list[float]:
    """3 Trainer steps on a tiny DeBERTa with dropout (hidden, attention and adapter); directions frozen at 0."""
    config = LlmmConfig(r=4, lora_alpha=4, target_modules=DEBERTA_TARGETS, k=k, scale=4.0, lora_dropout=0.3,
                        modules_to_save=["classifier", "pooler"])
    model = get_llmm_model(tiny_deberta(0, num_labels=2), config)
    for name, parameter in model.named_parameters():
        if "lora_llmm_" in name:
            parameter.requires_grad_(False)  # Z = 0 throughout: the noise scale is irrelevant
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(5, 128, (12, 10), generator=generator).tolist(),
                              "labels": torch.randint(0, 2, (12,), generator=generator).tolist()})
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                             learning_rate=1e-2, seed=3, report_to="none", use_cpu=True, save_strategy="no")
    trainer = training.LlmmTrainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_k2_and_k0_runs_of_one_seed_give_identical_losses(tmp_path):
    k2, k0 = losses(2, tmp_path / "k2"), losses(0, tmp_path / "k0")
    assert len(k2) == 3 and k2 == k0  # bit-identical: same data order, same dropout masks
    assert losses(2, tmp_path / "control", [ExtraGlobalDraw()]) != k2  # one global draw more changes the masks


def test_noise_is_per_model_and_seeded_by_seed_and_process():
    config = LlmmConfig(r=4, lora_alpha=4, target_modules=DEBERTA_TARGETS, k=2)
    model = get_llmm_model(tiny_deberta(0), config)
    source = noise_source(model)
    cpu = torch.device("cpu")

    def first_draw(seed, process):
        seed_noise(model, seed, process)
        return torch.randn(3, generator=source.generator(cpu))

    assert torch.equal(first_draw(5, 0), first_draw(5, 0))
    assert torch.equal(first_draw(np.int64(5), 0), first_draw(5, 0))  # numpy's integers are integers too
    assert not torch.equal(first_draw(5, 0), first_draw(5, 1)) and not torch.equal(first_draw(5, 0), first_draw(6, 0))
    other = get_llmm_model(tiny_deberta(0), LlmmConfig(r=4, lora_alpha=4, target_modules=DEBERTA_TARGETS, k=0))
    assert noise_source(other) is not source
    state = source.state_dict()
    again = torch.randn(4, generator=source.generator(cpu))
    source.load_state_dict(state)
    assert torch.equal(torch.randn(4, generator=source.generator(cpu)), again)  # the checkpoint round trip
    with pytest.raises(ValueError, match="integer >= 0"):
        seed_noise(model, -1)


def test_a_new_model_takes_torchs_seed():
    config = LlmmConfig(r=4, lora_alpha=4, target_modules=DEBERTA_TARGETS, k=2)

    def first_draw(torch_seed):
        base = tiny_deberta(0)
        torch.manual_seed(torch_seed)  # the seed a script sets before wrapping its model
        model = get_llmm_model(base, config)
        return torch.randn(3, generator=noise_source(model).generator(torch.device("cpu")))

    assert torch.equal(first_draw(9), first_draw(9)) and not torch.equal(first_draw(9), first_draw(10))
