"""The drop-ins behave like a native PyTorch loss in the recipes around ``backward()``:
mixed precision, gradient penalties, live attributes, in-place edits, non-finite incoming
gradients, Ctrl-C, memory refusal before converting, and errors naming the argument."""

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest
import torch

import ssdkd
import ssdkd.torch as st
from ssdkd.testing import synthetic_batch

from test_torch import assert_evaluate_gradients, peer_terms, tensors


def kd_args(t, sl=None, sc=None):
    sl = t["student_loc"] if sl is None else sl
    sc = t["student_conf"] if sc is None else sc
    return (sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]), t["targets"]


def leaves(t):
    return (t["student_loc"].clone().requires_grad_(True),
            t["student_conf"].clone().requires_grad_(True))


# 1. Mixed precision.

class Head(torch.nn.Module):
    """A tiny detector head: features [B, F] to loc [B, P, 4] and conf [B, P, C]."""

    def __init__(self, p, c, features=8):
        super().__init__()
        torch.manual_seed(0)
        self.p, self.c = p, c
        self.linear = torch.nn.Linear(features, p * (4 + c))

    def forward(self, x):
        out = self.linear(x).view(x.shape[0], self.p, 4 + self.c)
        return out[..., :4], out[..., 4:]


def train(loss_of, dtype, t, steps=4, scaler=True):
    """SGD steps of a head under CPU autocast with ``dtype``; the losses and the weights."""
    b, p, c = t["student_conf"].shape
    head = Head(p, c)
    opt = torch.optim.SGD(head.parameters(), lr=0.05)
    grad_scaler = torch.amp.GradScaler("cpu", enabled=scaler)
    x = torch.linspace(-1, 1, b * 8).view(b, 8)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loc, conf = head(x)
            assert conf.dtype == dtype
            loss = loss_of(loc, conf)
        assert loss.dtype == torch.float32
        losses.append(float(loss))
        grad_scaler.scale(loss).backward()
        grad_scaler.step(opt)
        grad_scaler.update()
    return losses, head.linear.weight.detach().clone()


@pytest.mark.parametrize("dtype,scaler", [(torch.float16, True), (torch.bfloat16, False)])
def test_autocast_trains_like_the_pytorch_peer(peer, dtype, scaler):
    t = tensors("mobilenet300", 5, 91)
    crit = st.MultiBoxLoss_KD(5, backend="cpu")
    cfg = dict(peer.DEFAULT_CONFIG, num_classes=5)
    weights = (0.3, 0.5, 0.7, 1.0)  # soft, l2, c, l

    def ours(loc, conf):
        out = crit((loc, conf, t["priors"]), (t["teacher_loc"], t["teacher_conf"]), t["targets"])
        assert all(o.dtype == torch.float32 for o in out)
        return sum(w * o for w, o in zip(weights, out))

    def theirs(loc, conf):  # the peer in float32, as autocast runs PyTorch's own losses
        r = peer.kd_loss(loc.float(), conf.float(), t["teacher_loc"], t["teacher_conf"],
                         t["targets"], t["priors"], cfg)
        return sum(w * r[k] for w, k in zip(weights, ("soft_loss", "l2_loss", "loss_c", "loss_l")))

    a, wa = train(ours, dtype, t, scaler=scaler)
    b, wb = train(theirs, dtype, t, scaler=scaler)
    assert all(math.isfinite(x) for x in a) and a[-1] < a[0]
    np.testing.assert_allclose(a, b, rtol=1e-3)
    torch.testing.assert_close(wa, wb, rtol=1e-3, atol=1e-4)


def test_half_inputs_give_float32_terms_and_half_gradients(peer):
    t = tensors("mobilenet300", 21, 92)
    sl, sc = (t[k].half().requires_grad_(True) for k in ("student_loc", "student_conf"))
    out = st.MultiBoxLoss_KD(21, backend="cpu")(*kd_args(t, sl, sc))
    assert all(o.dtype == torch.float32 for o in out)
    (65536.0 * sum(out)).backward()  # GradScaler's first scale: no overflow in the terms
    assert sl.grad.dtype == sc.grad.dtype == torch.float16
    half = {k: v.half().float() if k.startswith("student") else v for k, v in t.items()}
    _, g_loc, g_conf = peer_terms(peer, half, dict(peer.DEFAULT_CONFIG), [65536.0] * 4)
    finite = torch.isfinite(sc.grad)
    np.testing.assert_allclose(sc.grad.float()[finite], g_conf.float()[finite], rtol=2e-3,
                               atol=1e-3)


# 2. A gradient penalty.

def test_double_backward_raises_instead_of_a_constant():
    t = tensors("mobilenet300", 21, 93)
    sl, sc = leaves(t)
    soft, l2, loss_c, loss_l = st.MultiBoxLoss_KD(21, backend="cpu")(*kd_args(t, sl, sc))
    loss = soft + loss_c + l2 + loss_l
    (g,) = torch.autograd.grad(loss, sc, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (loss + 10 * (g ** 2).sum()).backward()


# 3. Live attributes.

ATTRIBUTES = [("T", 4.0, dict(Temp=4.0)), ("neg_w", 1.0, dict(neg_w=1.0)),
              ("pos_w", 0.5, dict(pos_w=0.5)), ("reg_m", -100.0, dict(reg_m=-100.0)),
              ("threshold", 0.6, dict(overlap_thresh=0.6)),
              ("negpos_ratio", 2, dict(neg_pos=2)),
              ("variance", (0.2, 0.3), dict(variance=(0.2, 0.3))),
              ("negatives_for_hard", 7, dict(negatives_for_hard=7))]


@pytest.mark.parametrize("attr,value,kwargs", ATTRIBUTES, ids=[a[0] for a in ATTRIBUTES])
def test_attribute_set_after_construction_is_read_at_forward(attr, value, kwargs):
    t = tensors("mobilenet300", 21, 94)
    t["targets"][1, :, 4] = -1.0  # an image without objects: negatives_for_hard counts
    crit = st.MultiBoxLoss_KD(21, backend="cpu")
    before = [float(x) for x in crit(*kd_args(t))]
    setattr(crit, attr, value)
    sl, sc = leaves(t)
    after = crit(*kd_args(t, sl, sc))
    sum(after).backward()
    want = st.MultiBoxLoss_KD(21, backend="cpu", **kwargs)
    wl, wc = leaves(t)
    expected = want(*kd_args(t, wl, wc))
    sum(expected).backward()
    assert [float(x.detach()) for x in after] == [float(x) for x in expected] != before
    assert torch.equal(sc.grad, wc.grad) and torch.equal(sl.grad, wl.grad)


@pytest.mark.parametrize("attr,value", [("T", -1.0), ("T", "hot"), ("negpos_ratio", 2.5),
                                        ("variance", (0.1,)), ("threshold", None),
                                        ("num_classes", 7), ("reduction", "none"),
                                        ("background_label", 1)])
def test_invalid_attribute_is_an_input_error_at_the_next_forward(attr, value):
    t = tensors("mobilenet300", 21, 95)
    crit = st.MultiBoxLoss_KD(21, backend="cpu")
    setattr(crit, attr, value)
    with pytest.raises(ssdkd.InputError) as e:
        crit(*kd_args(t))
    assert e.value.key == attr and f"`{attr}`" in str(e.value)


def test_a_module_copy_has_its_own_backend():
    import copy
    t = tensors("mobilenet300", 21, 96)
    crit = st.MultiBoxLoss_KD(21, backend="cpu")
    first = [float(x) for x in crit(*kd_args(t))]
    twin = copy.deepcopy(crit)
    assert twin._device is None and [float(x) for x in twin(*kd_args(t))] == first
    assert twin._device[1] is not crit._device[1]


# 4. In-place edits between forward and backward.

@pytest.mark.parametrize("tensor", ["student_conf", "student_loc", "teacher_conf", "priors"])
def test_in_place_edit_after_forward_raises_pytorchs_error(tensor):
    t = tensors("mobilenet300", 21, 97)
    sl, sc = leaves(t)
    t["student_loc"], t["student_conf"] = sl, sc
    out = st.MultiBoxLoss_KD(21, backend="cpu")(*kd_args(t))
    with torch.no_grad():
        t[tensor].mul_(1.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sum(out).backward()


def test_gradients_taken_from_the_forward_are_of_what_the_forward_saw():
    """With fixed weights the forward evaluates the gradients; an edit that bypasses
    version counters (``.data``) after it does not change them."""
    t = tensors("mobilenet300", 21, 98)
    crit = st.MultiBoxLoss_KD(21, backend="cpu")
    weights = (0.3, 0.5, 0.7, 1.0)
    for _ in range(3):
        sl, sc = leaves(t)
        out = crit(*kd_args(t, sl, sc))
        sc.data.mul_(1.5)
        sl.data.add_(0.5)
        sum(w * o for w, o in zip(weights, out)).backward()
    assert_evaluate_gradients(sl, sc, t, weights)


# 5. Non-finite incoming gradients.

@pytest.mark.parametrize("make", [lambda s, l2, c, l: s * math.inf,
                                  lambda s, l2, c, l: torch.sqrt(c * 0) + l,
                                  lambda s, l2, c, l: c * math.nan])
def test_non_finite_incoming_gradients_propagate(make):
    t = tensors("mobilenet300", 21, 99)
    sl, sc = leaves(t)
    make(*st.MultiBoxLoss_KD(21, backend="cpu")(*kd_args(t, sl, sc))).backward()
    assert not torch.isfinite(sc.grad).all()
    assert (sc.grad[:, :, 0] == 0).any()  # rows outside the selection get nothing


# 6. Ctrl-C.

INTERRUPTED = textwrap.dedent("""
    import sys, time, torch, ssdkd, ssdkd.torch as st
    from ssdkd.testing import synthetic_batch
    t = synthetic_batch(batch=48, classes=81, preset="ssd512", seed=1)
    if sys.argv[1] == "evaluate":
        run = lambda: ssdkd.evaluate(**t, backend="cpu", gradients=True)
    else:
        t = {k: torch.from_numpy(v) for k, v in t.items()}
        crit = st.MultiBoxLoss_KD(81, backend="cpu")
        run = lambda: sum(crit((t["student_loc"], t["student_conf"].requires_grad_(),
                                t["priors"]), (t["teacher_loc"], t["teacher_conf"]),
                               t["targets"])).backward()
    start = time.time(); run(); once = time.time() - start
    # Enough evaluations in a row to last about 2 s on any machine, so that the SIGINT
    # sent 0.3 s in always lands inside one.
    repeats = max(1, round(2.0 / once))
    print("expected", once * repeats, flush=True)
    try:
        for _ in range(repeats):
            run()
        print("finished", flush=True)
    except KeyboardInterrupt:
        print("interrupted", time.time(), flush=True)
    print(ssdkd.evaluate(**synthetic_batch(batch=1, classes=3, preset="mobilenet300"),
                         backend="cpu").num_pos > 0)
""")


@pytest.mark.parametrize("call", ["evaluate", "drop-in"])
def test_ctrl_c_interrupts_within_0_2_s(call):
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED, call], stdout=subprocess.PIPE,
                             text=True)
    expected = float(child.stdout.readline().split()[1])
    assert expected > 0.6, f"the evaluations would take {expected:.2f} s: too short to interrupt"
    time.sleep(0.3)
    sent = time.time()
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=120)
    words = out.split()
    assert words[0] == "interrupted", out
    assert float(words[1]) - sent < 0.2, f"{float(words[1]) - sent:.3f} s after SIGINT"
    assert words[2] == "True" and child.returncode == 0


# 7. Memory refusal before anything is converted.

def test_a_huge_broadcast_view_is_refused_before_it_is_converted():
    t = synthetic_batch(batch=1, classes=3, preset="mobilenet300")
    shape = (4096, 24656, 1024)
    huge = dict(t, student_conf=np.broadcast_to(np.zeros(1, np.float64), shape),
                teacher_conf=np.broadcast_to(np.zeros(1, np.float32), shape),
                student_loc=np.broadcast_to(np.zeros(1, np.float32), shape[:2] + (4,)),
                teacher_loc=np.broadcast_to(np.zeros(1, np.float32), shape[:2] + (4,)),
                targets=np.broadcast_to(t["targets"][:1], (4096, 6, 5)),
                priors=np.broadcast_to(np.zeros(1, np.float32), (24656, 4)))
    tracemalloc.start()
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.evaluate(**huge, backend="cpu")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert e.value.key == "batch" and peak < 50e6, (str(e.value), peak)
    view = {k: torch.from_numpy(np.ascontiguousarray(v)) if v.ndim < 3 or k == "targets"
            else torch.zeros(1, 1, 1, dtype=torch.float16).expand(*v.shape) for k, v in huge.items()}
    with pytest.raises(ssdkd.InputError) as e:
        st.MultiBoxLoss_KD(1024, backend="cpu")(*kd_args(view))
    assert e.value.key == "batch"


# 9. Every bad argument is an InputError naming it.

@pytest.mark.parametrize("args,kwargs,key", [((None,), {}, "num_classes"),
                                             (("twenty",), {}, "num_classes"),
                                             ((21,), dict(Temp="x"), "T"),
                                             ((21,), dict(neg_pos=-1), "negpos_ratio"),
                                             ((21,), dict(variance=None), "variance"),
                                             ((21,), dict(reduction=None), "reduction")])
def test_bad_constructor_arguments_name_the_attribute(args, kwargs, key):
    with pytest.raises(ssdkd.InputError) as e:
        st.MultiBoxLoss_KD(*args, **kwargs)
    assert e.value.key == key


@pytest.mark.parametrize("fields,key", [(dict(feature_maps=[2**40]), "feature_maps"),
                                        (dict(feature_maps=[10**30]), "feature_maps"),
                                        (dict(feature_maps=[-1]), "feature_maps"),
                                        (dict(min_sizes=["a"]), "min_sizes"),
                                        (dict(aspect_ratios=[[0.0]]), "aspect_ratios"),
                                        (dict(image_size=None), "image_size")])
def test_bad_prior_fields_name_the_field(fields, key):
    config = dict(image_size=300, feature_maps=[2], min_sizes=[30], max_sizes=[60],
                  aspect_ratios=[[2]])
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.priors(**dict(config, **fields))
    assert e.value.key == key


@pytest.mark.parametrize("kwargs,key", [(dict(backend=5), "backend"),
                                        (dict(backend="tpu"), "backend"),
                                        (dict(weights="heavy"), "weights")])
def test_bad_evaluate_arguments_name_the_field(kwargs, key):
    t = synthetic_batch(batch=1, classes=3, preset="mobilenet300")
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.evaluate(**t, **kwargs)
    assert e.value.key == key


def test_memory_message_uses_units_that_fit():
    """A batch of a few MB over a 1 MB limit is refused with sizes in MB, not "0.0 GB"."""
    code = ("import ssdkd, ssdkd.testing as T\n"
            "b = T.synthetic_batch(batch=8, classes=21, preset='ssd300')\n"
            "try:\n    ssdkd.evaluate(**b, backend='cpu', gradients=True)\n"
            "except ssdkd.InputError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, SSDKD_MEMORY_LIMIT="1M"), timeout=120)
    assert "needs ~" in out.stdout, out.stdout + out.stderr
    assert "0.0 GB" not in out.stdout and "MB" in out.stdout, out.stdout + out.stderr


def test_stubs_name_what_the_modules_have():
    """Every public name of the modules is in their stub, and every stubbed name exists."""
    import ast
    import importlib

    here = os.path.dirname(ssdkd.__file__)
    for module in ("ssdkd", "ssdkd._ssdkd", "ssdkd.torch", "ssdkd.testing"):
        mod = importlib.import_module(module)
        stub = os.path.join(here, module.split(".")[-1] + ".pyi")
        if module == "ssdkd":
            stub = os.path.join(here, "__init__.pyi")
        tree = ast.parse(open(stub, encoding="utf-8").read())
        stubbed = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                stubbed.add(node.name)
                for item in node.body if isinstance(node, ast.ClassDef) else []:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                        assert hasattr(getattr(mod, node.name), item.name), (module, node.name, item.name)
            elif isinstance(node, ast.AnnAssign):
                stubbed.add(node.target.id)
            elif isinstance(node, ast.ImportFrom) and node.module == "_ssdkd":
                stubbed.update(a.asname for a in node.names)
        public = set(getattr(mod, "__all__", None) or
                     [n for n in dir(mod) if not n.startswith("_")])
        assert public <= stubbed, (module, public - stubbed)
        assert all(hasattr(mod, n) for n in stubbed), (module, [n for n in stubbed
                                                                if not hasattr(mod, n)])


def hostile_calls():
    import ssdkd.testing as T
    t = synthetic_batch(batch=1, classes=3, preset="mobilenet300")
    kd = st.MultiBoxLoss_KD(3, backend="cpu")
    targets = torch.from_numpy(t["targets"])
    return [
        ("path", lambda: ssdkd.read_batch(None)),
        ("tensors", lambda: ssdkd.write_batch("unused.safetensors", "x")),
        ("config", lambda: ssdkd.write_batch("unused.safetensors", t, 5)),
        ("batch", lambda: T.synthetic_batch(batch="x")),
        ("batch", lambda: T.synthetic_batch(batch=0)),
        ("preset", lambda: ssdkd.priors(5)),
        ("prior_preset", lambda: ssdkd.priors("nope")),
        ("backend", lambda: ssdkd.Backend(5)),
        ("dtype", lambda: T.compare(lambda *a: 0, dtype="x")),
        ("config", lambda: T.compare(lambda *a: 0, config=5)),
        ("predictions", lambda: kd(5, (None, None), targets)),
        ("pred_t", lambda: kd((targets, targets, targets), None, targets)),
        ("backend", lambda: st.MultiBoxLoss_KD(3, backend=5)(
            *kd_args({k: torch.from_numpy(v) for k, v in t.items()}))),
    ]


@pytest.mark.parametrize("index", range(13))
def test_hostile_arguments_are_input_errors_naming_the_argument(index):
    key, call = hostile_calls()[index]
    with pytest.raises(ssdkd.InputError) as e:
        call()
    assert e.value.key == key, str(e.value)
