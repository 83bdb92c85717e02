import pytest

from bench.errors import BenchError
from bench.space import GENERIC_POLICIES, PRESETS, TARGET_SETS, VISION_POLICIES, alpha_for, build_cells


def test_alpha_rules():
    assert alpha_for(8, "2r") == 16
    assert alpha_for(8, "r") == 8
    assert alpha_for(8, "0.5r") == 4
    assert alpha_for(8, "32") == 32
    with pytest.raises(BenchError, match="alpha rule"):
        alpha_for(8, "twice")
    with pytest.raises(BenchError, match="positive"):
        alpha_for(8, "0")


def test_matrix_is_the_product_without_duplicates():
    cells = build_cells(["qk", "qv", "qk"], [4, 16], ["frozen", "resampler"], "2r")
    assert len(cells) == 2 * 2 * 2
    assert len({c.name for c in cells}) == len(cells)
    assert {c.alpha for c in cells if c.rank == 16} == {32}


@pytest.mark.parametrize(
    "targets,ranks,vision,message",
    [
        (["qz"], [4], ["frozen"], "unknown target set 'qz'"),
        (["qk"], [0], ["frozen"], "rank 0 is not positive"),
        (["qk"], [-2], ["frozen"], "rank -2 is not positive"),
        (["qk"], [4], ["vit"], "unknown vision policy 'vit'"),
        ([], [4], ["frozen"], "--targets is empty"),
        (["qk"], [], ["frozen"], "--ranks is empty"),
    ],
)
def test_bad_factors(targets, ranks, vision, message):
    with pytest.raises(BenchError, match=message):
        build_cells(targets, ranks, vision)


def test_presets_cover_the_space():
    default = PRESETS["default"]
    assert set(default.targets) == set(TARGET_SETS)
    assert set(default.vision) == set(GENERIC_POLICIES) == set(VISION_POLICIES) - {"minicpmv-recipe"}  # a family's own recipe is asked for by name
    assert len(default.seeds) >= 3 and len(default.lrs) >= 3  # the sound protocol: seed noise and a rate per cell
    smoke = PRESETS["smoke"]
    assert len(build_cells(smoke.targets, smoke.ranks, smoke.vision)) <= 6


def test_a_grid_rate_keeps_the_parts_ratio():
    from bench.space import TrainSettings

    base = TrainSettings(steps=10, batch_size=4, lr=1e-3, lr_connector=1e-4, lr_vision=5e-5)
    high = base.at(1e-2)
    assert (high.lr, high.lr_connector, high.lr_vision) == pytest.approx((1e-2, 1e-3, 5e-4))
    assert high.to_dict()["lr_vision"] == pytest.approx(5e-4)
