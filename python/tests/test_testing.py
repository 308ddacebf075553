"""ssdkd.testing.compare / assert_matches: the PyTorch peer passes; broken copies of it fail
and the report names the term."""

import pytest
import torch

from ssdkd.testing import assert_matches, compare, synthetic_batch
from conftest import GOLDEN


def peer_loss(peer, cfg, broken=None):
    """A loss_fn with the original forward signature around the peer's kd_loss."""

    def loss_fn(predictions, pred_t, targets):
        loc, conf, priors = predictions
        if isinstance(targets, (list, tuple)):
            m = max(1, max(t.shape[0] for t in targets))
            padded = torch.zeros(len(targets), m, 5, dtype=loc.dtype)
            padded[..., 4] = -1
            for i, t in enumerate(targets):
                padded[i, : t.shape[0]] = t
            targets = padded
        r = peer.kd_loss(loc, conf, pred_t[0], pred_t[1], targets, priors, cfg)
        soft, l2, loss_c, loss_l = r["soft_loss"], r["l2_loss"], r["loss_c"], r["loss_l"]
        if broken == "no_T2":
            soft = soft / (cfg["temperature"] ** 2)  # soft loss without T²
        if broken == "l2_plus_1pct":
            l2 = l2 * 1.01
        return soft, l2, loss_c, loss_l

    return loss_fn


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("targets", ["list", "padded"])
def test_peer_passes_on_synthetic_batches(peer, seed, targets):
    cfg = dict(peer.DEFAULT_CONFIG, num_classes=11, temperature=2.0)
    report = compare(peer_loss(peer, cfg), config=cfg, seed=seed, preset="mobilenet300",
                     targets=targets)
    assert report.ok, str(report)
    assert [r.name for r in report.rows] == ["soft_loss", "l2_loss", "loss_c", "loss_l",
                                             "total", "grad_student_conf", "grad_student_loc"]
    table = str(report)
    assert "all match" in table and "FAIL" not in table


def test_peer_passes_on_a_golden_file(peer):
    path = f"{GOLDEN}/mobilenet_c5_t4_b2.safetensors"
    _, cfg, _ = peer.load_batch(path)
    assert_matches(peer_loss(peer, cfg), path)


def test_soft_loss_without_t2_fails_and_is_named(peer):
    cfg = dict(peer.DEFAULT_CONFIG, num_classes=11, temperature=2.0)
    report = compare(peer_loss(peer, cfg, broken="no_T2"), config=cfg, seed=0,
                     preset="mobilenet300")
    assert not report.ok
    assert "soft_loss" in report.failed and "loss_c" not in report.failed
    assert "grad_student_conf" in report.failed and "grad_student_loc" not in report.failed
    with pytest.raises(AssertionError) as e:
        assert_matches(peer_loss(peer, cfg, broken="no_T2"), config=cfg, seed=0,
                       preset="mobilenet300")
    line = next(x for x in str(e.value).splitlines() if x.startswith("soft_loss"))
    assert line.rstrip().endswith("FAIL: out of tolerance")
    assert "MISMATCH in soft_loss" in str(e.value)


def test_mining_without_the_tie_rule_fails_and_is_named(peer, monkeypatch):
    """Mining that breaks equal scores by the HIGHER prior index (a strict `>` scan from
    the end) instead of the lower (SPEC §4): on a batch whose negatives all have the same
    logits, it selects other rows, so the conf gradient lands elsewhere."""

    def mine_high_index_first(score, k):
        P = score.shape[1]
        flipped = score.flip(1)
        _, order = flipped.sort(dim=1, descending=True, stable=True)
        order = P - 1 - order
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(P).expand_as(order))
        return rank < k[:, None]

    cfg = dict(peer.DEFAULT_CONFIG, num_classes=5)
    batch = synthetic_batch(batch=2, classes=5, preset="mobilenet300", seed=3)
    batch["student_conf"][:] = batch["student_conf"][:, :1, :]  # every row the same logits
    assert_matches(peer_loss(peer, cfg), batch, config=cfg)
    monkeypatch.setattr(peer, "mine_two_sort", mine_high_index_first)
    report = compare(peer_loss(peer, cfg), batch, config=cfg)
    assert not report.ok, str(report)
    assert "grad_student_conf" in report.failed and "grad_student_loc" not in report.failed


def test_bounded_l2_off_by_one_percent_fails_and_is_named(peer):
    cfg = dict(peer.DEFAULT_CONFIG, num_classes=11)
    report = compare(peer_loss(peer, cfg, broken="l2_plus_1pct"), config=cfg, seed=0,
                     preset="mobilenet300")
    assert report.failed[:1] == ["l2_loss"]


def broken(peer, cfg, how):
    """The peer's loss, broken the ways a user's loss can be."""
    loss = peer_loss(peer, cfg)

    def loss_fn(predictions, pred_t, targets):
        if how == "raises":
            raise KeyError("conf")
        out = loss(predictions, pred_t, targets)
        if how == "detached":
            return tuple(x.detach() for x in out)
        if how == "floats":
            return tuple(float(x) for x in out)
        if how == "three":
            return out[:3]
        if how == "nan":
            return (out[0] * float("nan"),) + out[1:]
        if how == "no student_loc":
            return (out[0], out[1].detach(), out[2], out[3].detach())
        return out

    return loss_fn


@pytest.mark.parametrize("how,failed,reason", [
    ("detached", ["grad_student_conf", "grad_student_loc"], "detached"),
    ("floats", ["grad_student_conf", "grad_student_loc"], "Python numbers"),
    ("three", "all", "returned 3 values"),
    ("raises", "all", "loss_fn raised KeyError"),
    ("nan", ["soft_loss", "total", "grad_student_conf"], "not finite"),
    ("no student_loc", ["l2_loss", "loss_l", "grad_student_loc"], "no gradient reached"),
])
def test_a_broken_loss_gets_fail_rows_with_the_reason(peer, how, failed, reason):
    cfg = dict(peer.DEFAULT_CONFIG, num_classes=11)
    report = compare(broken(peer, cfg, how), config=cfg, seed=0, preset="mobilenet300")
    names = [r.name for r in report.rows]
    if failed == "all":
        failed = names
    assert not report.ok
    if how == "no student_loc":  # detached terms still match in value; their gradient is missing
        assert "grad_student_loc" in report.failed and "grad_student_conf" not in report.failed
    else:
        assert report.failed == failed, str(report)
    assert any(reason in r.reason for r in report.rows if not r.ok), str(report)
    with pytest.raises(AssertionError) as e:
        assert_matches(broken(peer, cfg, how), config=cfg, seed=0, preset="mobilenet300")
    assert reason in str(e.value) and "MISMATCH" in str(e.value)
