"""Object outputs as separate target channels (issue 22): each channel is its own class's raster, centre
and offset cover all object outputs together, boxes carry their channel; class_groups and bad names."""

import numpy as np
import pytest
from conftest import make_dataset

from bevtrain.classes import ClassSpecError
from bevtrain.config import ConfigError, resolve_config
from bevtrain.data.dataset import MAX_BOXES, ClassMatchError

OBJECTS = ["vehicle", "pedestrian", "traffic_cone", "barrier"]
# The same boxes as one output: its centre / offset maps are the class-agnostic ones.
ALL_OBJECTS = {"all_objects": {"categories": ["vehicle", "human.pedestrian", "movable_object.trafficcone",
                                              "movable_object.barrier"]}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("index_cache")


def _ds(root, cache, **kw):
    return make_dataset(root, "val", False, res_scale=0.25, cache_dir=cache, **kw)


@pytest.mark.parametrize("raster", ["simplebev", "exact"])
def test_each_object_output_is_its_own_raster_and_centres_cover_them_all(synthetic_root, cache, raster):
    multi = _ds(synthetic_root, cache, classes=OBJECTS, target_raster=raster)
    singles = [_ds(synthetic_root, cache, classes=[c], target_raster=raster) for c in OBJECTS]
    union = _ds(synthetic_root, cache, classes=["all_objects"], class_groups=ALL_OBJECTS,
                target_raster=raster)
    pixels = np.zeros(len(OBJECTS))
    for i in range(len(multi)):
        m, u = multi[i], union[i]
        assert m["seg_bev"].shape == m["valid_bev"].shape == (len(OBJECTS), 200, 200)
        assert m["center_bev"].shape == (1, 200, 200) and m["offset_bev"].shape == (2, 200, 200)
        np.testing.assert_array_equal(m["center_bev"], u["center_bev"])
        np.testing.assert_array_equal(m["offset_bev"], u["offset_bev"])
        np.testing.assert_array_equal(m["box_corners"], u["box_corners"])
        n = int(m["box_count"])
        assert n == int(u["box_count"]) and n < MAX_BOXES  # all boxes drawn, so the counts below are exact
        assert (m["box_class"][n:] == -1).all() and (m["box_class"][:n] >= 0).all()
        for k, single in enumerate(singles):
            s = single[i]
            np.testing.assert_array_equal(m["seg_bev"][k], s["seg_bev"][0], err_msg=OBJECTS[k])
            np.testing.assert_array_equal(m["valid_bev"][k], s["valid_bev"][0], err_msg=OBJECTS[k])
            assert int((m["box_class"][:n] == k).sum()) == int(s["box_count"]), OBJECTS[k]
            assert (s["box_class"][: int(s["box_count"])] == 0).all()
            pixels[k] += float(s["seg_bev"].sum())
    assert (pixels > 0).all(), f"every class should appear in the synthetic val split: {pixels}"


def test_a_box_in_two_outputs_is_drawn_in_both_and_owned_by_the_first(synthetic_root, cache):
    ds = _ds(synthetic_root, cache, classes=["car", "vehicle"], target_raster="exact")
    seen = 0
    for i in range(len(ds)):
        out = ds[i]
        seg = out["seg_bev"].numpy()
        assert (seg[0] <= seg[1]).all()  # every car is a vehicle
        n = int(out["box_count"])
        assert set(out["box_class"][:n].tolist()) <= {0, 1}
        seen += int((out["box_class"][:n] == 0).sum())
    assert seen > 0


def test_class_groups_flag_from_yaml_and_the_command_line(tmp_path):
    preset = tmp_path / "mc.yaml"
    preset.write_text("classes: [vehicle, cones]\nclass_groups:\n"
                      "  cones: {categories: [movable_object.trafficcone], color: [255, 140, 0]}\n")
    cfg, _ = resolve_config({"config": str(preset)})
    assert cfg.data.classes == ("vehicle", "cones")
    assert cfg.data.class_groups["cones"]["categories"] == ("movable_object.trafficcone",)
    hash(cfg.data)  # sections stay hashable values
    cli, _ = resolve_config({"classes": ["vehicle", "cones"],
                             "class_groups": "{cones: {categories: [movable_object.trafficcone]}}"})
    assert cli.class_groups == {"cones": {"categories": ["movable_object.trafficcone"]}}
    assert resolve_config({})[0].class_groups == {}
    with pytest.raises(ConfigError, match="did you mean 'ped_crossing'"):
        resolve_config({"classes": ["vehicle", "ped_crosing"]})
    with pytest.raises(ConfigError, match="class_groups' expects a mapping"):
        resolve_config({"class_groups": "[a, b]"})
    with pytest.raises(ConfigError, match="unknown map layer"):
        resolve_config({"classes": ["lines"], "class_groups": {"lines": {"layers": ["road_dividr"]}}})
    with pytest.raises(ClassSpecError, match="did you mean 'animal'"):
        make_dataset(tmp_path, classes=["anmial"])  # checked before the (absent) dataroot is read


def test_a_group_that_matches_no_category_is_an_error_listing_the_categories(synthetic_root, cache):
    groups = {"spaceships": {"categories": ["vehicle.spaceship"]}}
    with pytest.raises(ClassMatchError, match=r"'spaceships'.*vehicle\.spaceship.*vehicle\.car"):
        _ds(synthetic_root, cache, classes=["vehicle", "spaceships"], class_groups=groups)
