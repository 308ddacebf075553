"""The drop-ins as PyTorch operators: ``torch.compile`` traces a training step without a
graph break, compiled steps give eager's values and gradients (SPEC §5-6), ``torch.func``
transforms work or refuse clearly, and the fake implementation gives the outputs' shapes."""

import math

import pytest
import torch

import ssdkd
import ssdkd.torch as st

from test_native import Head
from test_torch import assert_evaluate_gradients, tensors

WEIGHTS = (0.3, 0.5, 0.7, 1.0)  # soft, l2, c, l (the outputs' order)


def kd_step(head, crit):
    """A training step's forward: the head's outputs through the distillation loss."""
    def step(x, priors, teacher_loc, teacher_conf, targets):
        loc, conf = head(x)
        soft, l2, c, l = crit((loc, conf, priors), (teacher_loc, teacher_conf), targets)
        return WEIGHTS[0] * soft + WEIGHTS[1] * l2 + WEIGHTS[2] * c + WEIGHTS[3] * l
    return step


def plain_step(head, crit):
    def step(x, priors, targets):
        loc, conf = head(x)
        loss_l, loss_c = crit((loc, conf, priors), targets)
        return loss_l + 0.7 * loss_c
    return step


def setup(seed=101, classes=5):
    t = tensors("mobilenet300", classes, seed)
    b, p, c = t["student_conf"].shape
    return t, Head(p, c), torch.linspace(-1, 1, b * 8).view(b, 8)


def image_list(t):
    return [img[img[:, 4] >= 0] for img in t["targets"]]


@pytest.mark.parametrize("form", ["padded", "list"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_explain_counts_no_graph_break_in_a_kd_training_step(form, reduction):
    t, head, x = setup()
    crit = st.MultiBoxLoss_KD(5, backend="cpu", reduction=reduction)
    targets = t["targets"] if form == "padded" else image_list(t)
    if reduction == "sum":
        def step(x, priors, teacher_loc, teacher_conf, targets):
            loc, conf = head(x)
            out = crit((loc, conf, priors), (teacher_loc, teacher_conf), targets)
            return sum(out[:4]) / out[4].clamp(min=1)
    else:
        step = kd_step(head, crit)
    explanation = torch._dynamo.explain(step)(x, t["priors"], t["teacher_loc"],
                                              t["teacher_conf"], targets)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops = [str(n.target) for g in explanation.graphs for n in g.graph.nodes
           if n.op == "call_function"]
    assert "ssdkd.loss.default" in ops, ops


@pytest.mark.parametrize("form", ["padded", "list"])
def test_explain_counts_no_graph_break_in_a_multibox_training_step(form):
    t, head, x = setup(102)
    crit = st.MultiBoxLoss(5, backend="cpu")
    targets = t["targets"] if form == "padded" else image_list(t)
    explanation = torch._dynamo.explain(plain_step(head, crit))(x, t["priors"], targets)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_fullgraph_compiled_training_matches_eager_with_one_evaluation_per_step():
    """Four SGD steps compiled with fullgraph=True (any graph break is an error) give
    eager's losses and weights; from the third step on, each step is one evaluation."""
    t, _, x = setup(103)
    b, p, c = t["student_conf"].shape
    args = (t["priors"], t["teacher_loc"], t["teacher_conf"], t["targets"])

    def train(compiled):
        head = Head(p, c)
        crit = st.MultiBoxLoss_KD(5, backend="cpu", validate=False)
        step = kd_step(head, crit)
        if compiled:
            step = torch.compile(step, backend="aot_eager", fullgraph=True)
        opt = torch.optim.SGD(head.parameters(), lr=0.05)
        losses, calls = [], []
        for _ in range(4):
            recorder = Recorder()
            crit._device = (crit.backend, recorder)
            opt.zero_grad()
            loss = step(x, *args)
            loss.backward()
            opt.step()
            losses.append(float(loss))
            calls.append(recorder.calls)
        return losses, head.linear.weight.detach().clone(), calls

    eager_losses, eager_weight, eager_calls = train(False)
    losses, weight, calls = train(True)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(weight, eager_weight, rtol=1e-5, atol=1e-6)
    split, fused = ["forward", "forward+gradients"], ["forward+gradients"]
    assert eager_calls == [split, split, fused, fused]
    assert calls == eager_calls


class Recorder:
    def __init__(self):
        self.backend, self.calls = ssdkd.Backend("cpu"), []

    def evaluate(self, *args):
        self.calls.append("forward+gradients" if args[7] else "forward")
        return self.backend.evaluate(*args)


def test_compiled_loss_reads_attributes_changed_after_compiling():
    t, _, _ = setup(104)
    crit = st.MultiBoxLoss_KD(5, backend="cpu")

    def loss(sl, sc):
        return crit((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]),
                    t["targets"])[0]

    compiled = torch.compile(loss, backend="eager", fullgraph=True)
    first = float(compiled(t["student_loc"], t["student_conf"]))
    assert first == float(loss(t["student_loc"], t["student_conf"]))
    crit.T = 4.0
    hot = float(compiled(t["student_loc"], t["student_conf"]))
    assert hot != first
    assert hot == float(st.MultiBoxLoss_KD(5, backend="cpu", Temp=4.0)(
        (t["student_loc"], t["student_conf"], t["priors"]),
        (t["teacher_loc"], t["teacher_conf"]), t["targets"])[0])
    crit.T = -1.0
    with pytest.raises(ssdkd.InputError) as e:
        compiled(t["student_loc"], t["student_conf"])
    assert e.value.key == "T"


def test_compiled_backward_gives_evaluate_gradients():
    t, _, _ = setup(105)
    crit = st.MultiBoxLoss_KD(5, backend="cpu", validate=False)

    def loss(sl, sc):
        out = crit((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]), t["targets"])
        return sum(w * o for w, o in zip(WEIGHTS, out))

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        sl = t["student_loc"].clone().requires_grad_(True)
        sc = t["student_conf"].clone().requires_grad_(True)
        compiled(sl, sc).backward()
        assert_evaluate_gradients(sl, sc, t, WEIGHTS)


def test_torch_func_transforms_work_or_refuse_clearly():
    """torch.func.grad gives ssdkd.evaluate's gradients where torch supports custom
    operators' autograd rules under torch.func, else a RuntimeError saying what to use;
    torch.func.vmap is an InputError (the loss is batched already)."""
    t, _, _ = setup(106)
    crit = st.MultiBoxLoss_KD(5, backend="cpu", validate=False)

    def loss(sl, sc):
        out = crit((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]), t["targets"])
        return sum(w * o for w, o in zip(WEIGHTS, out))

    try:
        g_loc, g_conf = torch.func.grad(loss, argnums=(0, 1))(t["student_loc"],
                                                               t["student_conf"])
    except RuntimeError as e:
        assert str(e).startswith("ssdkd.torch: torch ") and "loss.backward()" in str(e), e
        assert "functorch transforms" in str(e.__cause__)
    else:
        sl = t["student_loc"].clone().requires_grad_(True)
        sc = t["student_conf"].clone().requires_grad_(True)
        sl.grad, sc.grad = g_loc, g_conf
        assert_evaluate_gradients(sl, sc, t, WEIGHTS)
    with pytest.raises(ssdkd.InputError, match="vmap") as e:
        torch.func.vmap(loss)(t["student_loc"][None], t["student_conf"][None])
    assert e.value.key == "vmap"


def test_fake_implementation_gives_the_outputs_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    t, _, _ = setup(107)
    crit = st.MultiBoxLoss_KD(5, backend="cpu")
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in t.items()}
        terms, num_pos, token = torch.ops.ssdkd.loss(
            fake["student_loc"], fake["student_conf"].double(), fake["teacher_loc"],
            fake["teacher_conf"], fake["targets"], fake["priors"], crit._settings_text(),
            crit._handle, False)
    assert terms.shape == (4,) and terms.dtype == torch.float64
    assert num_pos.shape == () and num_pos.dtype == torch.int64
    assert token.device.type == "cpu"


def test_meta_tensor_and_wrong_image_count_are_input_errors_naming_them():
    t, _, _ = setup(108)
    crit = st.MultiBoxLoss_KD(5, backend="cpu")
    meta = t["student_conf"].to("meta")
    with pytest.raises(ssdkd.InputError, match="`student_conf`: on the meta device") as e:
        crit((t["student_loc"], meta, t["priors"]), (t["teacher_loc"], t["teacher_conf"]),
             t["targets"])
    assert e.value.tensor == "student_conf"
    with pytest.raises(ssdkd.InputError) as e:
        crit((t["student_loc"], t["student_conf"], t["priors"]),
             (t["teacher_loc"], t["teacher_conf"].to("meta")), t["targets"])
    assert e.value.tensor == "teacher_conf"
    sparse = t["priors"].to_sparse()
    with pytest.raises(ssdkd.InputError, match="layout") as e:
        crit((t["student_loc"], t["student_conf"], sparse),
             (t["teacher_loc"], t["teacher_conf"]), t["targets"])
    assert e.value.tensor == "priors"
    b = t["student_conf"].shape[0]
    assert b == 2
    for targets, given in (([], 0), (image_list(t)[:1], 1), (t["targets"][:1], 1),
                           (image_list(t) * 2, 4)):
        with pytest.raises(ssdkd.InputError) as e:
            crit((t["student_loc"], t["student_conf"], t["priors"]),
                 (t["teacher_loc"], t["teacher_conf"]), targets)
        assert e.value.tensor == "targets"
        assert f"{given} images given, 2 needed" in str(e.value), str(e.value)


def test_double_backward_error_comes_from_the_registered_rule():
    """The once-differentiable error is ssdkd's own autograd rule on the backward
    operator (no private torch API); this fails loudly if torch stops calling it."""
    t, _, _ = setup(109)
    sl = t["student_loc"].clone().requires_grad_(True)
    sc = t["student_conf"].clone().requires_grad_(True)
    out = st.MultiBoxLoss_KD(5, backend="cpu")((sl, sc, t["priors"]),
                                               (t["teacher_loc"], t["teacher_conf"]),
                                               t["targets"])
    (g,) = torch.autograd.grad(sum(out), sc, create_graph=True)
    assert "ssdkd_loss_backward" in g.grad_fn.name(), g.grad_fn.name()
    with pytest.raises(RuntimeError, match=st._ONCE.split(":")[0]):
        (g ** 2).sum().backward()
    assert math.isfinite(float(sum(out)))


@pytest.mark.parametrize("teacher", [True, False])
def test_opcheck_passes_for_the_loss_operator(teacher):
    """torch.library.opcheck: schema, autograd registration, fake tensors and AOT dispatch
    with dynamic shapes agree with the real operator."""
    t, _, _ = setup(110)
    crit = st.MultiBoxLoss_KD(5, backend="cpu")
    sl = t["student_loc"].clone().requires_grad_(True)
    sc = t["student_conf"].clone().requires_grad_(True)
    args = (sl, sc, t["teacher_loc"] if teacher else None,
            t["teacher_conf"] if teacher else None, t["targets"], t["priors"],
            crit._settings(), crit._handle, True)
    result = torch.library.opcheck(torch.ops.ssdkd.loss.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_gradients_handed_to_autograd_are_not_overwritten_by_the_next_step():
    """A step's gradients (taken from the forward once the weights repeat) own their
    memory: later steps on other batches leave them as they were."""
    crit = st.MultiBoxLoss_KD(5, backend="cpu", validate=False)
    kept = []
    for seed in (111, 112, 113, 114, 115):
        t = tensors("mobilenet300", 5, seed)
        sl = t["student_loc"].clone().requires_grad_(True)
        sc = t["student_conf"].clone().requires_grad_(True)
        out = crit((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]), t["targets"])
        sum(w * o for w, o in zip(WEIGHTS, out)).backward()
        kept.append((sl.grad, sc.grad, sl.grad.clone(), sc.grad.clone(), t))
    for g_loc, g_conf, loc_copy, conf_copy, t in kept:
        assert torch.equal(g_loc, loc_copy) and torch.equal(g_conf, conf_copy)
    storages = {g.untyped_storage().data_ptr() for k in kept for g in k[:2]}
    assert len(storages) == 2 * len(kept)
    sl, sc = kept[-1][0], kept[-1][1]
    last = kept[-1][4]
    leaf_loc = last["student_loc"].clone().requires_grad_(True)
    leaf_conf = last["student_conf"].clone().requires_grad_(True)
    leaf_loc.grad, leaf_conf.grad = sl, sc
    assert_evaluate_gradients(leaf_loc, leaf_conf, last, WEIGHTS)
