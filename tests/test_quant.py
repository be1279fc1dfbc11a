"""Quantizers and LoftQ: NF4 equals bitsandbytes, the uniform quantizer equals the reference's formula, level
counts, error ordering, LoftQ improvement, compensation, the truncated SVD against the exact one, bad settings."""

import json

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from conftest import REPO_ROOT, tiny_llama, tiny_tokenizer
from peft import LoftQConfig
from safetensors.torch import load_file
from test_model import load_4bit

from llmm import LlmmConfig, get_llmm_model
from llmm.quant import (_normal_float, _normal_float_scratch, fake_quantize, loftq_init, normal_float_code,
                        truncated_svd)
from llmm.run.cli import run_main
from llmm.run.tables import read_yaml

DEFAULTS = LlmmConfig()  # the truncated SVD's default settings, which the tables repeat
SVD_DEFAULTS = dict(svd_oversampling=DEFAULTS.loftq_svd_oversampling, svd_iters=DEFAULTS.loftq_svd_iters)


def test_nf4_equals_bitsandbytes():
    torch.manual_seed(0)
    for shape in [(96, 128), (40, 192)]:  # rows a multiple of the block, as bnb's CPU dequant kernel needs
        weight = torch.randn(shape) * 0.02
        packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4")
        assert torch.equal(fake_quantize(weight, 4, "nf", 64), dequantize_4bit(packed, state))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_nf_lookup_rounds_like_the_midpoints(bits):
    # The table lookup must give code[number of midpoints < x] for every x (bitsandbytes' rule, a tie going down):
    # on random blocks, on each midpoint, code value and their float neighbours, beyond +-1 (a bfloat16-rounded
    # absmax), on a padded weight and through the buffers LoftQ's loop reuses.
    code = normal_float_code(bits)
    midpoints = (code[:-1] + code[1:]) / 2
    points = torch.cat([midpoints, code, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    up, down = torch.nextafter(points, torch.tensor(2.0)), torch.nextafter(points, torch.tensor(-2.0))
    points = torch.cat([points, up, down])
    rows = -(-points.numel() // 63)
    edges = torch.cat([torch.nn.functional.pad(points, (0, rows * 63 - points.numel())).view(rows, 63),
                       torch.ones(rows, 1)], dim=1)  # absmax 1: each block's scaled values are the points
    torch.manual_seed(0)
    for weight, absmax_dtype in [(torch.randn(96, 128), None), (torch.randn(96, 128), torch.bfloat16),
                                 (edges, None), (edges * 3.7, None), (edges, torch.bfloat16),
                                 (torch.randn(37, 29), None)]:
        flat = weight.reshape(-1)
        blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % 64)).view(-1, 64)
        absmax = blocks.abs().amax(1, keepdim=True)
        absmax = absmax if absmax_dtype is None else absmax.to(absmax_dtype).float()
        scaled = (blocks * (1.0 / absmax)).clamp(-1, 1)
        expected = (code[torch.bucketize(scaled, midpoints)] * absmax).view(-1)[: flat.numel()].view(weight.shape)
        assert torch.equal(fake_quantize(weight, bits, "nf", absmax_dtype=absmax_dtype), expected)
        out = torch.empty_like(weight)
        _normal_float(weight, bits, 64, absmax_dtype, out=out, scratch=_normal_float_scratch(weight))
        assert torch.equal(out, expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_level_counts(bits):
    torch.manual_seed(0)
    weight = torch.randn(64, 512)
    blocks = fake_quantize(weight, bits, "nf").view(-1, 64)
    assert max(len(torch.unique(block)) for block in blocks) <= 2**bits
    uniform = fake_quantize(weight, bits, "uniform")
    assert len(torch.unique(uniform)) <= 2**bits
    low, high = weight.mean() - 2 * weight.std(), weight.mean() + 2 * weight.std()
    assert uniform.min() >= low - 1e-5 and uniform.max() <= high + 1e-5


@pytest.mark.parametrize("method", ["nf", "uniform"])
def test_error_falls_as_bits_rise(method):
    torch.manual_seed(0)
    weight = torch.randn(128, 256)
    errors = [torch.linalg.norm(weight - fake_quantize(weight, b, method)) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("method,bits", [("nf", 2), ("nf", 4), ("uniform", 2)])
def test_loftq_beats_plain_quantization_and_does_not_degrade(method, bits):
    torch.manual_seed(0)
    weight = torch.randn(96, 128) @ torch.diag(torch.linspace(2, 0.1, 128))
    plain_error = torch.linalg.norm(weight - fake_quantize(weight, bits, method))
    errors = []
    for iters in (1, 2, 5):
        q, lora_A, lora_B = loftq_init(weight, bits, rank=8, num_iter=iters, method=method)
        assert lora_A.shape == (8, 128) and lora_B.shape == (96, 8)
        errors.append(torch.linalg.norm(weight - q - lora_B @ lora_A))
    assert errors[0] < plain_error
    assert errors[-1] <= errors[0] * 1.001


@pytest.mark.parametrize("svd", ["exact", "truncated"])
def test_loftq_splits_the_singular_values_evenly_over_both_factors(svd):
    """B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T (SPEC §2): A A^T = B^T B = diag(S_r), S_r the residual's top values."""
    torch.manual_seed(0)
    weight = torch.randn(96, 128) @ torch.diag(torch.linspace(2, 0.1, 128))
    q, lora_A, lora_B = loftq_init(weight, 4, rank=8, num_iter=2, svd=svd)
    gram_A, gram_B = lora_A @ lora_A.T, lora_B.T @ lora_B
    singular = torch.linalg.svdvals(weight - q)[:8]
    torch.testing.assert_close(gram_A, torch.diag(gram_A.diagonal()), rtol=0, atol=1e-4)
    torch.testing.assert_close(gram_B, gram_A, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gram_A.diagonal(), singular, rtol=2e-2 if svd == "truncated" else 1e-4, atol=0)


def test_absmax_dtype_makes_16bit_copy_requantize_losslessly():
    torch.manual_seed(0)
    weight = torch.randn(64, 128) * 0.05
    q = fake_quantize(weight, 4, "nf", absmax_dtype=torch.bfloat16).to(torch.bfloat16)
    packed, state = quantize_4bit(q.float(), blocksize=64, quant_type="nf4")
    assert torch.equal(dequantize_4bit(packed, state).to(torch.bfloat16), q)


def _effective_weight(compensate, alpha):
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))
    original = layer[0].weight.detach().clone()
    config = LlmmConfig(r=8, lora_alpha=alpha, target_modules=["0"], k=1, init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=2, loftq_iter=3), loftq_compensate_scaling=compensate)
    model = get_llmm_model(layer, config)
    model.merge_adapter()
    return original, model.base_model.model[0].get_base_layer().weight.detach()


def test_scaling_compensation_reproduces_weight_better():
    original, compensated = _effective_weight(True, alpha=16)
    _, reference = _effective_weight(False, alpha=16)
    assert torch.linalg.norm(original - compensated) < 0.8 * torch.linalg.norm(original - reference)
    _, equal_at_alpha_r = _effective_weight(False, alpha=8)
    torch.testing.assert_close(compensated, equal_at_alpha_r, atol=1e-5, rtol=1e-5)


def reference_uniform(weight, bits):
    """LoftQ's glue/utils_qaunt.py (weight_quant_fn + quant_uniform), transcribed operation for operation."""
    mean, std = weight.mean(), weight.std()
    low_clip, high_clip = mean - 2 * std, mean + 2 * std
    clipped = torch.where(weight < high_clip, weight, high_clip)
    clipped = torch.where(clipped > low_clip, clipped, low_clip)
    alpha, beta = clipped.max() - clipped.min(), clipped.min()
    normalized = (clipped - beta) / (alpha + 1e-8)
    steps = 2**bits - 1
    return torch.round(normalized * steps).div(steps) * (alpha + 1e-8) + beta


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_matches_the_reference_on_a_skewed_tensor(bits):
    torch.manual_seed(0)
    skewed = torch.distributions.Exponential(torch.tensor(30.0)).sample((64, 96))  # no value below mean - 2 std
    mean, std = skewed.mean(), skewed.std()
    assert skewed.min() > mean - 2 * std and skewed.max() > mean + 2 * std
    quantized = fake_quantize(skewed, bits, "uniform")
    torch.testing.assert_close(quantized, reference_uniform(skewed, bits), rtol=0, atol=1e-7)
    levels = torch.unique(quantized)
    # Levels span [min, max] of the clipped tensor: the low end is the data's minimum, not mean - 2 std.
    assert len(levels) <= 2**bits
    torch.testing.assert_close(levels.min(), skewed.min(), rtol=0, atol=1e-7)
    torch.testing.assert_close(levels.max(), mean + 2 * std, rtol=0, atol=1e-7)
    constant = torch.full((8, 8), 0.25)
    assert torch.equal(fake_quantize(constant, bits, "uniform"), constant)


def structured_weight(rows, cols, seed=0):
    """A weight with a decaying spectrum and a few outlier entries, like trained linear layers."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=generator) @ torch.diag(torch.linspace(1.0, 0.05, cols))
    outliers = torch.rand(rows, cols, generator=generator) < 0.002
    return (base + 8 * base.abs().max() * outliers * torch.randn(rows, cols, generator=generator)) * 0.02


def relative_residual(weight, q, lora_A, lora_B):
    return (torch.linalg.norm(weight - q - lora_B @ lora_A) / torch.linalg.norm(weight)).item()


@pytest.mark.parametrize("shape,rank", [((192, 192), 8), ((128, 320), 8), ((320, 128), 12), ((48, 160), 44)],
                         ids=["square", "wide", "tall", "rank-near-min"])
@pytest.mark.parametrize("bits,allowed_ratio", [(2, 1.005), (4, 1.001)])
def test_truncated_svd_keeps_the_exact_residual(shape, rank, bits, allowed_ratio):
    weight = structured_weight(*shape)
    exact = relative_residual(weight, *loftq_init(weight, bits, rank, 5, svd="exact"))
    q, lora_A, lora_B = loftq_init(weight, bits, rank, 5, svd="truncated", **SVD_DEFAULTS)
    assert lora_A.shape == (rank, shape[1]) and lora_B.shape == (shape[0], rank)
    assert relative_residual(weight, q, lora_A, lora_B) <= allowed_ratio * exact


def test_truncated_svd_finds_the_top_triplets():
    weight = structured_weight(200, 300)
    u, s, vh, basis = truncated_svd(weight, 10, 8, 3, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.svdvals(weight)
    torch.testing.assert_close(s, exact[:10], rtol=1e-3, atol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(vh @ vh.T, torch.eye(10), atol=1e-5, rtol=0)
    assert basis.shape == (300, 18)
    # Warm-started from its own basis, one more call lands on the same triplets.
    _, again, _, _ = truncated_svd(weight, 10, 8, 1, start=basis)
    torch.testing.assert_close(again, exact[:10], rtol=1e-4, atol=0)


def test_truncated_loftq_is_deterministic_and_leaves_the_global_rng_alone():
    weight = structured_weight(96, 160)
    state = torch.random.get_rng_state()
    first = loftq_init(weight, 2, 8, 3, svd="truncated", **SVD_DEFAULTS)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = loftq_init(weight, 2, 8, 3, svd="truncated", **SVD_DEFAULTS)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("settings,message", [
    (dict(svd="fast"), r"loftq_svd must be one of \('exact', 'truncated'\), got 'fast'"),
    (dict(svd_oversampling=-1), "loftq_svd_oversampling must be an integer >= 0, got -1"),
    (dict(svd_iters=-2), "loftq_svd_iters must be an integer >= 0, got -2"),
    (dict(rank=33), r"LoRA rank must be in \[1, 32\] for a weight of shape \(32, 48\), got 33"),
])
def test_bad_svd_settings_are_one_clear_error(settings, message):
    arguments = dict(bits=2, rank=4, svd="truncated", **SVD_DEFAULTS) | settings
    with pytest.raises(ValueError, match=message):
        loftq_init(torch.randn(32, 48), **arguments)


@pytest.mark.parametrize("field,value,message", [
    ("loftq_svd", "randomized", "loftq_svd must be one of"),
    ("loftq_svd_oversampling", -1, "loftq_svd_oversampling must be an integer >= 0"),
    ("loftq_svd_iters", 1.5, "loftq_svd_iters must be an integer >= 0"),
])
def test_bad_svd_settings_in_the_config(field, value, message):
    with pytest.raises(ValueError, match=message):
        LlmmConfig(r=4, target_modules=["q_proj"], **{field: value})


def test_bad_svd_setting_is_an_error_line_of_the_cli(tmp_path, capsys):
    from scripts import quantize_model

    argv = ["--model", str(tmp_path / "m"), "--rank", "8", "--save_dir", str(tmp_path / "q"), "--loftq_svd_iters", "-1"]
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: quantize_model.main(argv))  # what `python -m scripts.quantize_model` runs
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: loftq_svd_iters = -1 is out of range: it must be an integer >= 0; fix --loftq_svd_iters or the table "
        "row in configs/")
    assert not (tmp_path / "q").exists()


def test_init_directory_with_the_truncated_svd_reloads_in_nf4_exactly(tmp_path):
    from scripts import quantize_model

    tiny_llama(initializer_range=0.1).save_pretrained(tmp_path / "tiny-llama")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny-llama")
    out = quantize_model.main(["--model", str(tmp_path / "tiny-llama"), "--save_dir", str(tmp_path / "q"),
                               "--bits", "4", "--rank", "4", "--loftq_iter", "2", "--dtype", "bfloat16",
                               "--loftq_svd", "truncated"])
    saved = load_file(out / "model.safetensors")
    quantized = load_4bit(out)
    for name in ["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"]:
        layer = quantized.get_submodule(f"model.layers.0.{name}")
        dequantized = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        assert torch.equal(dequantized, saved[f"model.layers.0.{name}.weight"]), name
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["settings"]["loftq_svd"] == "truncated"
    layers = report["layers"].values()
    assert all(layer["svd"] == "truncated" and layer["loftq_time_s"] > 0 for layer in layers)
    assert all(layer["rel_error_loftq"] < layer["rel_error_q"] for layer in layers)


@pytest.mark.parametrize("table", ["quantize", "glue", "gsm8k", "nlg"])
def test_tables_repeat_the_config_defaults_of_the_svd(table):
    defaults = read_yaml(REPO_ROOT / "configs" / f"{table}.yaml")["defaults"]
    for name in ("loftq_svd", "loftq_svd_oversampling", "loftq_svd_iters"):
        assert defaults[name] == getattr(DEFAULTS, name), (table, name)
