"""ssdkd.priors (SPEC §2) against the peer's PriorBox, and batch files (SPEC §8)."""

import numpy as np
import pytest

import ssdkd
from ssdkd.testing import synthetic_batch


@pytest.mark.parametrize("name,count", [("ssd300", 8732), ("ssd300-strided", 8732),
                                        ("ssd512", 24656), ("mobilenet300", 3000)])
def test_presets_match_the_peer(peer, name, count):
    p = ssdkd.priors(name)
    assert p.shape == (count, 4) and p.dtype == np.float32
    np.testing.assert_array_equal(p, peer.preset_priors(name).numpy())


def test_custom_configuration_matches_the_peer(peer):
    fields = dict(image_size=320, feature_maps=[20, 10, 5], steps=[16, 32, 64],
                  min_sizes=[32, 96, 160], max_sizes=[96, 160, 224],
                  aspect_ratios=[[2], [2, 3], [3]], clip=False)
    p = ssdkd.priors(**fields)
    want = peer.prior_boxes(**fields).numpy()
    assert p.shape == want.shape == (20 * 20 * 4 + 10 * 10 * 6 + 5 * 5 * 4, 4)
    np.testing.assert_array_equal(p, want)
    np.testing.assert_array_equal(ssdkd.priors(fields), p)


@pytest.mark.parametrize("fields,key", [
    (dict(image_size=300, feature_maps=[10], aspect_ratios=[[2], [3]]), "min_sizes"),
    (dict(image_size=0, feature_maps=[10], min_sizes=[30], max_sizes=[60],
          aspect_ratios=[[2]]), "image_size"),
    (dict(image_size=300, feature_maps=[0], min_sizes=[30], max_sizes=[60],
          aspect_ratios=[[2]]), "feature_maps"),
    (dict(image_size=300, feature_maps=[100000], min_sizes=[30], max_sizes=[60],
          aspect_ratios=[[2]]), "feature_maps"),
    (dict(image_size=300, feature_maps=[10], min_sizes=[30], max_sizes=[60],
          aspect_ratios=[[-2]]), "aspect_ratios"),
])
def test_bad_prior_fields_name_the_key(fields, key):
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.priors(**fields)
    assert e.value.key == key


def test_unknown_preset():
    with pytest.raises(ssdkd.InputError, match="unknown preset"):
        ssdkd.priors("ssd1000")


def test_write_then_read_batch_round_trips(tmp_path):
    t = synthetic_batch(batch=2, classes=5, preset="mobilenet300", seed=9)
    config = {"num_classes": 5, "temperature": 3.0, "weights": (1.0, 1.0, 0.0, 2.0)}
    path = tmp_path / "b.safetensors"
    ssdkd.write_batch(path, t, config)
    back, cfg = ssdkd.read_batch(path)
    for k, v in t.items():
        np.testing.assert_array_equal(back[k], v)
    assert cfg["num_classes"] == 5 and cfg["temperature"] == 3.0
    assert cfg["weights"] == (1.0, 1.0, 0.0, 2.0) and cfg["negpos_ratio"] == 3
    a = ssdkd.evaluate(**t, **config, backend="cpu")
    b = ssdkd.evaluate(**back, **cfg, backend="cpu")
    assert a.total == b.total and a.total != 0.0


def test_write_batch_checks_the_config_against_the_tensors(tmp_path):
    t = synthetic_batch(batch=1, classes=5, preset="mobilenet300", seed=9)
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.write_batch(tmp_path / "b.safetensors", t, {"num_classes": 21})  # C = 5
    assert e.value.key == "num_classes"
    assert not list(tmp_path.iterdir())


def test_batch_file_without_teacher_round_trips(tmp_path):
    """Both teacher tensors may be left out (SPEC §10.1): written without them, read
    back as None, evaluated as the plain MultiBox loss."""
    t = synthetic_batch(batch=2, classes=5, preset="mobilenet300", seed=9)
    plain = {k: v for k, v in t.items() if not k.startswith("teacher")}
    path = tmp_path / "plain.safetensors"
    ssdkd.write_batch(path, plain, {"temperature": 2.0})
    back, cfg = ssdkd.read_batch(path)
    assert back["teacher_loc"] is None and back["teacher_conf"] is None
    for k, v in plain.items():
        np.testing.assert_array_equal(back[k], v)
    ev = ssdkd.evaluate(**back, **cfg, backend="cpu")
    kd = ssdkd.evaluate(**t, **cfg, backend="cpu")
    assert (ev.soft_loss, ev.l2_loss, ev.num_bounded) == (0.0, 0.0, 0)
    assert (ev.loss_c, ev.loss_l, ev.num_pos) == (kd.loss_c, kd.loss_l, kd.num_pos)
    assert kd.soft_loss > 0.0


@pytest.mark.parametrize("name", ssdkd.PRESETS)
def test_a_presets_fields_give_its_priors(name):
    fields = ssdkd._ssdkd.preset_config(name)
    np.testing.assert_array_equal(ssdkd.priors(fields), ssdkd.priors(name))
