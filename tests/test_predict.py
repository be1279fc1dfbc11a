"""Monte-Carlo prediction (llmm.predict) and calibration metrics (llmm.metrics) on a tiny DeBERTa, CPU."""

import math

import numpy as np
import pytest
import torch
from conftest import DEBERTA_TARGETS, tiny_deberta

from llmm import LlmmConfig, get_llmm_model, llmm_layers, noise_mode, seed_noise
from llmm.metrics import brier, calibration_metrics, ece, nll
from llmm.predict import mc_predict, mc_regress


def llmm_deberta(num_labels: int = 3, random_directions: bool = True):
    """Tiny DeBERTa with K=2 Llmm layers, means (and optionally directions) set to random values."""
    config = LlmmConfig(r=4, lora_alpha=4, target_modules=DEBERTA_TARGETS, k=2, scale=4.0)
    model = get_llmm_model(tiny_deberta(0, num_labels), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_A" in name or "lora_B" in name or ("lora_llmm" in name and random_directions):
                parameter.normal_(0, 0.3)
    return model.eval()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, 128, (3, 9), generator=generator),
            "attention_mask": torch.ones(3, 9, dtype=torch.long), "labels": torch.tensor([0, 2, 1])}


def forward_probs(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits.float().softmax(-1)


def test_one_sample_equals_one_sample_forward(batch):
    model = llmm_deberta()
    seed_noise(model, 7)
    probs = mc_predict(model, batch, 1)
    seed_noise(model, 7)
    with torch.no_grad(), noise_mode(model, "sample"):
        expected = forward_probs(model, batch)
    assert torch.equal(probs, expected)
    with torch.no_grad():
        mean = forward_probs(model, batch)
    assert not torch.allclose(probs, mean, atol=1e-4), "the sampled network must differ from the mean"


def test_mc_samples_average_n_sampled_networks(batch):
    model = llmm_deberta()
    seed_noise(model, 3)
    probs = mc_predict(model, batch, 4)
    seed_noise(model, 3)
    with torch.no_grad(), noise_mode(model, "sample"):
        draws = torch.stack([forward_probs(model, batch) for _ in range(4)])
    torch.testing.assert_close(probs, draws.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    assert not torch.allclose(draws[0], draws[1], atol=1e-4), "each network draws its own noise"


def test_mc_regress_averages_n_sampled_networks(batch):
    """A regression head (STS-B): the mean of N sampled networks' raw outputs, each network its own draw."""
    model = llmm_deberta(num_labels=1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    seed_noise(model, 3)
    got = mc_regress(model, batch, 4)
    seed_noise(model, 3)
    with torch.no_grad(), noise_mode(model, "sample"):
        draws = torch.stack([model(**inputs).logits.float() for _ in range(4)])
    torch.testing.assert_close(got, draws.mean(0), rtol=0, atol=1e-6)
    assert not torch.allclose(draws[0], draws[1], atol=1e-4), "each network draws its own noise"
    torch.testing.assert_close(mc_regress(model, batch, 4, seed=5, batched=True), mc_regress(model, batch, 4, seed=5),
                               rtol=0, atol=1e-5)


def test_zero_directions_equal_the_mean_network(batch):
    model = llmm_deberta(random_directions=False)  # Z = 0, means non-trivial
    with torch.no_grad():
        mean = forward_probs(model, batch)
    torch.testing.assert_close(mc_predict(model, batch, 5), mean, rtol=0, atol=1e-6)
    regression = llmm_deberta(num_labels=1, random_directions=False)
    with torch.no_grad():
        expected = regression(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(mc_regress(regression, batch, 3), expected, rtol=0, atol=1e-6)


def test_restores_training_mode_and_noise_setting(batch):
    model = llmm_deberta().train()
    mc_predict(model, batch, 2)
    assert model.training
    assert all(s["eval_noise"] == "mean" for layer in llmm_layers(model) for s in layer.llmm_settings.values())


def test_bad_sample_count_and_plain_model(batch):
    with pytest.raises(ValueError, match="mc_samples"):
        mc_predict(llmm_deberta(), batch, 0)
    with pytest.raises(ValueError, match="Llmm layers"):
        mc_predict(tiny_deberta(0, 3), batch, 2)


# ------------------------------------------------------------------------------------------- calibration metrics

# confidence, correct: .95 yes | .92 no | .70 yes | .55 no | .93 yes. 15 bins of width 1/15: .92 and .93 share
# (13/15, 14/15]; the others are alone. ECE = (.05 + 2 * |.5 - .925| + .30 + .55) / 5 = 0.35.
ECE_PROBS = np.array([[0.95, 0.05], [0.08, 0.92], [0.30, 0.70], [0.45, 0.55], [0.93, 0.07]])
ECE_LABELS = np.array([0, 0, 1, 0, 0])


def test_ece_hand_computed():
    assert ece(ECE_PROBS, ECE_LABELS) == pytest.approx(0.35, abs=1e-12)
    assert ece(ECE_PROBS, ECE_LABELS, n_bins=1) == pytest.approx(abs(3 / 5 - ECE_PROBS.max(1).mean()))


def test_nll_and_brier_hand_computed():
    probs, labels = np.array([[0.8, 0.2], [0.3, 0.7]]), np.array([0, 0])
    assert nll(probs, labels) == pytest.approx(-(math.log(0.8) + math.log(0.3)) / 2)
    assert brier(probs, labels) == pytest.approx(((0.2**2 + 0.2**2) + (0.7**2 + 0.7**2)) / 2)  # 0.53
    perfect = calibration_metrics(np.eye(3), np.arange(3))
    assert perfect["nll"] == pytest.approx(0, abs=1e-9) and perfect["brier"] == 0 and perfect["ece"] == 0


def test_calibration_rejects_logits_and_bad_labels():
    with pytest.raises(ValueError, match="softmax"):
        nll(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="class ids"):
        brier(np.array([[0.5, 0.5]]), np.array([2]))
    with pytest.raises(ValueError, match="probs hold NaN or inf: the model's outputs are not finite"):
        ece(np.array([[np.nan, np.nan]]), np.array([0]))  # a diverged model: named as such, not as logits


def test_ece_bins_are_right_closed_at_exact_edges():
    from llmm.metrics import ece

    # Confidence 0.4 lies exactly on the edge 6/15: it belongs to bin (5/15, 6/15], with the 0.35 example,
    # so the bin's accuracy (1/2) is compared with its mean confidence 0.375: ECE = |0.5 - 0.375| = 0.125.
    probs = np.array([[0.4, 0.3, 0.3], [0.35, 0.33, 0.32]])
    assert ece(probs, np.array([0, 1])) == pytest.approx(0.125)
