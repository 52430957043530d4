"""Layer calibration of the planner's cost, on the trained fixture with the real llama.cpp."""
import numpy as np
import pytest

from edgemoe_llamacpp import corpus
from edgemoe_llamacpp.convert.calibrate import calibrated, layer_scales
from edgemoe_llamacpp.convert.plan import measure_costs
from edgemoe_llamacpp.convert.profile import Profile
from edgemoe_llamacpp.convert.record import profile
from edgemoe_llamacpp.convert.rewrite import convert, uniform_plan
from edgemoe_llamacpp.engine.perplexity import perplexities
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.gguf.layout import read_layout

TYPES = ("Q2_K", "Q8_0")


@pytest.fixture(scope="module")
def costs(fixture_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "p.npz"
    profile(str(fixture_path), path, tokens=2048, n_ctx=256, samples=64, progress=False)
    return measure_costs(str(fixture_path), Profile(path), types=TYPES, progress=False)


@pytest.fixture(scope="module")
def scales(fixture_path, costs):
    return layer_scales(str(fixture_path), costs, "Q2_K", tokens=4096, progress=False)


def test_layers_differ_in_how_much_output_error_moves_the_distribution(scales):
    assert scales["scale"].shape == (8,) and (scales["scale"] > 0).all()
    assert scales["tokens"] >= 4000
    # measured on the fixture: the first layer's experts at Q2_K alone give most of the KL, and per unit of
    # output error the layers differ by more than 10x: an uncalibrated cost spends bits in the wrong layers
    assert scales["scale"].max() / scales["scale"].min() > 3
    np.testing.assert_allclose(scales["scale"] * scales["planned"], scales["kld"])


def test_calibrated_cost_predicts_the_kl_of_a_whole_file(fixture_path, costs, scales, tmp_path):
    """Layers' KL add up: the calibrated cost of every expert at Q2_K predicts the uniform Q2_K file's KL on
    the same calibration text (measured: 0.0043 predicted, 0.0034 measured)."""
    cal = calibrated(costs, scales)
    q2 = convert(fixture_path, tmp_path / "q2.gguf", uniform_plan(read_layout(fixture_path), "Q2_K"), progress=False)
    measured = perplexities([str(q2.path)], texts=corpus.split_texts("train"), tokens=4096,
                            reference=str(fixture_path), progress=False)[0]["kld"]
    assert cal["cost"][:, :, 0, 0].sum() == pytest.approx(measured, rel=0.5)
    assert cal["calibration"] is scales


def test_calibration_needs_a_measured_type(fixture_path, costs):
    with pytest.raises(EdgeMoEError, match="IQ2_XXS"):
        layer_scales(str(fixture_path), costs, "IQ2_XXS", progress=False)
