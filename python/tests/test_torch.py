"""ssdkd.torch against the PyTorch peer's autograd (bench/pytorch_peer.py), SPEC §5-7."""

import numpy as np
import pytest
import torch

import ssdkd
import ssdkd.torch as st
from ssdkd.testing import synthetic_batch

# (preset, C, T, pos_w, neg_w, reg_m, targets form, seed)
CASES = [
    ("mobilenet300", 21, 1.0, 1.0, 1.5, 0.0, "list", 1),
    ("mobilenet300", 5, 4.0, 0.8, 2.0, 0.3, "padded", 2),
    ("ssd300", 21, 2.0, 1.0, 1.0, 0.5, "list", 3),       # plain KL (neg_w <= 1)
    ("ssd300-strided", 8, 1.5, 1.2, 3.0, 0.0, "padded", 4),
    ("mobilenet300", 3, 1.0, 1.0, 0.5, 0.0, "list", 5),   # plain KL, few classes
]
TERMS = ("soft_loss", "l2_loss", "loss_c", "loss_l")


def tensors(preset, classes, seed, batch=2):
    return {k: torch.from_numpy(v) for k, v in
            synthetic_batch(batch=batch, classes=classes, preset=preset, seed=seed).items()}


def targets_of(t, form):
    if form == "list":
        return [img[img[:, 4] >= 0] for img in t["targets"]]
    return t["targets"]


def peer_terms(peer, t, cfg, weights, teacher=True):
    """The peer in float64: its terms and the autograd gradients of Σ weights·terms."""
    sl = t["student_loc"].double().requires_grad_(True)
    sc = t["student_conf"].double().requires_grad_(True)
    tl = t["teacher_loc"].double() if teacher else sl.detach()
    tc = t["teacher_conf"].double() if teacher else sc.detach()
    r = peer.kd_loss(sl, sc, tl, tc, t["targets"].double(), t["priors"].double(), cfg)
    total = sum(w * r[k] for w, k in zip(weights, TERMS))
    total.backward()
    return [float(r[k].detach()) for k in TERMS], sl.grad, sc.grad


def assert_term(got, want):
    tol = 1e-6 if abs(want) < 1e-2 else 1e-4 * abs(want)
    assert abs(got - want) <= tol, (got, want)


def assert_grad(got, want):
    assert got.shape == want.shape
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-C{c[1]}-T{c[2]}-{c[6]}")
def test_kd_forward_backward_matches_peer(peer, case):
    preset, classes, temp, pos_w, neg_w, reg_m, form, seed = case
    t = tensors(preset, classes, seed)
    rng = np.random.default_rng(seed)
    weights = [float(w) for w in rng.uniform(0.1, 2.0, 4)]  # soft, l2, c, l
    crit = st.MultiBoxLoss_KD(classes, 0.5, True, 0, True, 3, 0.5, False, False, 100.0,
                              neg_w, pos_w, temp, reg_m, backend="cpu")
    sl = t["student_loc"].clone().requires_grad_(True)
    sc = t["student_conf"].clone().requires_grad_(True)
    out = crit((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]),
               targets_of(t, form))
    assert len(out) == 4
    assert all(o.dim() == 0 and o.dtype == torch.float32 for o in out)
    loss = sum(w * o for w, o in zip(weights, out))
    loss.backward()

    cfg = dict(peer.DEFAULT_CONFIG, num_classes=classes, temperature=temp, pos_w=pos_w,
               neg_w=neg_w, reg_m=reg_m)
    want, g_loc, g_conf = peer_terms(peer, t, cfg, weights)
    for got, w in zip(out, want):
        assert_term(float(got.detach()), w)
    assert_grad(sl.grad, g_loc)
    assert_grad(sc.grad, g_conf)


def test_kd_partial_combination_and_teacher_gets_no_gradient(peer):
    """Only some terms in the loss: the others' weights are 0 in the one evaluation."""
    t = tensors("mobilenet300", 21, 11)
    crit = st.MultiBoxLoss_KD(21, backend="cpu")
    sl = t["student_loc"].clone().requires_grad_(True)
    sc = t["student_conf"].clone().requires_grad_(True)
    tl = t["teacher_loc"].clone().requires_grad_(True)
    tc = t["teacher_conf"].clone().requires_grad_(True)
    soft, l2, loss_c, loss_l = crit((sl, sc, t["priors"]), (tl, tc), targets_of(t, "list"))
    (0.25 * soft + 2.0 * loss_l).backward()
    assert tl.grad is None and tc.grad is None
    _, g_loc, g_conf = peer_terms(peer, t, dict(peer.DEFAULT_CONFIG), [0.25, 0.0, 0.0, 2.0])
    assert_grad(sl.grad, g_loc)
    assert_grad(sc.grad, g_conf)


def test_kd_float64_inputs_keep_their_dtype(peer):
    t = tensors("mobilenet300", 21, 12)
    crit = st.MultiBoxLoss_KD(21, backend="cpu")
    sl = t["student_loc"].double().requires_grad_(True)
    sc = t["student_conf"].double().requires_grad_(True)
    out = crit((sl, sc, t["priors"].double()),
               (t["teacher_loc"].double(), t["teacher_conf"].double()), t["targets"].double())
    assert all(o.dtype == torch.float64 for o in out)
    sum(out).backward()
    assert sl.grad.dtype == torch.float64 and sc.grad.dtype == torch.float64
    want, g_loc, g_conf = peer_terms(peer, t, dict(peer.DEFAULT_CONFIG), [1.0] * 4)
    for got, w in zip(out, want):
        assert_term(float(got.detach()), w)
    assert_grad(sl.grad.float(), g_loc)
    assert_grad(sc.grad.float(), g_conf)


@pytest.mark.parametrize("form", ["list", "padded"])
def test_plain_multibox_matches_peer(peer, form):
    t = tensors("mobilenet300", 7, 21)
    crit = st.MultiBoxLoss(7, 0.5, True, 0, True, 3, 0.5, False, False, 100.0, backend="cpu")
    sl = t["student_loc"].clone().requires_grad_(True)
    sc = t["student_conf"].clone().requires_grad_(True)
    loss_l, loss_c = crit((sl, sc, t["priors"]), targets_of(t, form))
    (loss_l + 0.7 * loss_c).backward()
    cfg = dict(peer.DEFAULT_CONFIG, num_classes=7)
    want, g_loc, g_conf = peer_terms(peer, t, cfg, [0.0, 0.0, 0.7, 1.0], teacher=False)
    assert_term(float(loss_c.detach()), want[2])
    assert_term(float(loss_l.detach()), want[3])
    assert_grad(sl.grad, g_loc)
    assert_grad(sc.grad, g_conf)


def test_evaluate_without_teacher_equals_kd_loss_c_and_loss_l():
    t = synthetic_batch(batch=2, classes=21, preset="mobilenet300", seed=31)
    kd = ssdkd.evaluate(**t, backend="cpu", gradients=True)
    plain = dict(t, teacher_loc=None, teacher_conf=None)
    ev = ssdkd.evaluate(**plain, backend="cpu", weights=(0.0, 0.7, 0.0, 1.0), gradients=True)
    assert (ev.soft_loss, ev.l2_loss, ev.num_bounded) == (0.0, 0.0, 0)
    assert ev.loss_c == kd.loss_c and ev.loss_l == kd.loss_l
    assert (ev.num_pos, ev.num_neg) == (kd.num_pos, kd.num_neg)
    assert ev.total == pytest.approx(0.7 * kd.loss_c + kd.loss_l, rel=1e-6)


def test_reduction_sum_gives_unnormalised_sums_and_their_gradient(peer):
    t = tensors("mobilenet300", 21, 41)
    crit = st.MultiBoxLoss_KD(21, backend="cpu", reduction="sum")
    sl = t["student_loc"].clone().requires_grad_(True)
    sc = t["student_conf"].clone().requires_grad_(True)
    soft, l2, conf, loc, num_pos = crit((sl, sc, t["priors"]),
                                        (t["teacher_loc"], t["teacher_conf"]), t["targets"])
    assert num_pos.dtype == torch.int64 and not num_pos.requires_grad
    n = max(int(num_pos), 1)
    want, g_loc, g_conf = peer_terms(peer, t, dict(peer.DEFAULT_CONFIG), [n, 0.0, n, 0.0])
    assert_term(float(soft.detach()) / n, want[0])
    assert_term(float(l2.detach()) / n, want[1])
    assert_term(float(conf.detach()) / n, want[2])
    assert_term(float(loc.detach()) / n, want[3])
    (soft + conf).backward()
    assert_grad(sl.grad, g_loc)
    assert_grad(sc.grad, g_conf)


def test_cpu_float32_tensors_are_shared_without_a_copy():
    x = torch.randn(2, 3, 4)
    a = st._host(x, "student_loc")
    assert np.shares_memory(a, x.numpy())
    y = x.double()
    assert not np.shares_memory(st._host(y, "student_loc"), y.numpy())


def test_pad_targets_marks_padding_rows():
    targets = [torch.tensor([[0.1, 0.1, 0.5, 0.5, 3.0], [0.2, 0.2, 0.9, 0.8, 0.0]]),
               torch.zeros(0, 5)]
    out = st.pad_targets(targets)
    assert out.shape == (2, 2, 5)
    np.testing.assert_array_equal(out[0], targets[0].numpy())
    np.testing.assert_array_equal(out[1, :, 4], [-1.0, -1.0])


def test_kd_on_gpu_backend_matches_cpu(gpu_available):
    t = tensors("mobilenet300", 21, 51)
    results = []
    for backend in ("cpu", "gpu"):
        crit = st.MultiBoxLoss_KD(21, backend=backend)
        sl = t["student_loc"].clone().requires_grad_(True)
        sc = t["student_conf"].clone().requires_grad_(True)
        out = crit((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]), t["targets"])
        (0.3 * out[0] + 0.5 * out[1] + 0.7 * out[2] + out[3]).backward()
        results.append(([float(o.detach()) for o in out], sl.grad, sc.grad))
    (a, la, ca), (b, lb, cb) = results
    for x, y in zip(a, b):
        assert_term(y, x)
    assert_grad(lb, la.double())
    assert_grad(cb, ca.double())


def test_backward_twice_with_retained_graph_accumulates(peer):
    t = tensors("mobilenet300", 21, 61)
    crit = st.MultiBoxLoss_KD(21, backend="cpu")
    sl = t["student_loc"].clone().requires_grad_(True)
    sc = t["student_conf"].clone().requires_grad_(True)
    out = crit((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]), t["targets"])
    loss = out[0] + out[2]
    loss.backward(retain_graph=True)
    first = sc.grad.clone()
    loss.backward()
    torch.testing.assert_close(sc.grad, 2 * first)
    _, _, g_conf = peer_terms(peer, t, dict(peer.DEFAULT_CONFIG), [1.0, 0.0, 1.0, 0.0])
    assert_grad(first, g_conf)


def assert_evaluate_gradients(sl, sc, t, out_weights):
    """``sl.grad`` and ``sc.grad`` are bit for bit ``ssdkd.evaluate``'s for the weights of
    the outputs ``(soft, l2, c, l)``."""
    soft, l2, c, l = out_weights
    ev = ssdkd.evaluate(*(t[k].numpy() for k in ssdkd._TENSORS), backend="cpu", gradients=True,
                        weights=(soft, c, l2, l))  # soft, conf, l2, loc
    np.testing.assert_array_equal(sc.grad.numpy(), ev.grad_student_conf)
    np.testing.assert_array_equal(sl.grad.numpy(), ev.grad_student_loc)


def test_backward_after_other_evaluations_gives_each_forwards_gradients():
    """Two forwards, then their backwards in reverse order: each gets the gradients of
    its own batch, exactly ``ssdkd.evaluate``'s (nothing depends on what ran between)."""
    crit = st.MultiBoxLoss_KD(21, backend="cpu", validate=False)
    batches = [tensors("mobilenet300", 21, seed) for seed in (71, 72)]
    out_weights = (0.4, 0.9, 1.3, 0.6)  # soft, l2, c, l (the outputs' order)

    def step(t):
        sl = t["student_loc"].clone().requires_grad_(True)
        sc = t["student_conf"].clone().requires_grad_(True)
        out = crit((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]), t["targets"])
        return sl, sc, sum(w * o for w, o in zip(out_weights, out))

    for _ in range(3):  # the third step's forward evaluates the gradients (fixed weights)
        first, second = step(batches[0]), step(batches[1])
        second[2].backward()
        first[2].backward()
        assert_evaluate_gradients(first[0], first[1], batches[0], out_weights)
        assert_evaluate_gradients(second[0], second[1], batches[1], out_weights)


class Recorder:
    """A module's own backend, recording whether each evaluation had gradients."""

    def __init__(self):
        self.backend, self.calls = ssdkd.Backend("cpu"), []

    def evaluate(self, *args):
        self.calls.append("forward+gradients" if args[7] else "forward")
        return self.backend.evaluate(*args)


def test_fixed_weights_take_their_gradients_from_the_forward():
    """Once two backward calls got the same weights, the forward evaluates the gradients
    for them and backward takes them; other weights, no_grad and ``reduction="sum"``
    evaluate in backward. Every step's gradients are ``ssdkd.evaluate``'s, bit for bit."""
    t = tensors("mobilenet300", 21, 81)

    def step(crit, out_weights, grad=True):
        """One step, its gradients checked to be exact; the evaluations it made."""
        recorder = Recorder()
        crit._device = (crit.backend, recorder)
        sl = t["student_loc"].clone().requires_grad_(grad)
        sc = t["student_conf"].clone().requires_grad_(grad)
        out = crit((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]), t["targets"])
        if grad:
            sum(w * o for w, o in zip(out_weights, out[:4])).backward()
            assert_evaluate_gradients(sl, sc, t, out_weights)
        return recorder.calls

    split = ["forward", "forward+gradients"]
    fused = ["forward+gradients"]
    w1, w2 = (0.3, 0.5, 0.7, 1.0), (0.6, 0.5, 0.7, 1.0)
    crit = st.MultiBoxLoss_KD(21, backend="cpu", validate=False)
    assert step(crit, w1) == split
    assert step(crit, w1) == split
    assert step(crit, w1) == fused
    assert step(crit, w1) == fused
    with torch.no_grad():
        assert step(crit, w1, grad=False) == ["forward"]
    assert step(crit, w1, grad=False) == ["forward"]
    # Other weights: the forward's gradients are not used, and the next step is split.
    assert step(crit, w2) == fused + fused
    assert step(crit, w2) == split
    assert step(crit, w2) == fused
    total = st.MultiBoxLoss_KD(21, backend="cpu", validate=False, reduction="sum")
    for _ in range(3):
        recorder = Recorder()
        total._device = ("cpu", recorder)
        sc = t["student_conf"].clone().requires_grad_(True)
        out = total((t["student_loc"], sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]),
                    t["targets"])
        sum(w * o for w, o in zip(w1, out[:4])).backward()
        assert recorder.calls == split
