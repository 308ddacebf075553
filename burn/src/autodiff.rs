//! The backward pass: ssdkd's analytic gradient registered in Burn's autodiff graph, from
//! one evaluation per step. The forward's output is one `[4]` tensor of the terms, so its
//! backward receives one `[4]` gradient: the weights of the total it differentiates (SPEC
//! §6: the total is linear in them). The forward evaluates the gradient along with the
//! terms, with the weights the loss's last backward brought (the configuration's at
//! first); the backward uses it when the weights are the same bits, and evaluates again
//! otherwise.

use crate::backend::{LossInputs, LossSpec, SsdkdBackend};
use crate::host::read_f32;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend};
use ssdkd::Tensors;

/// What the backward needs: the inputs, the spec, and the gradient the forward evaluated
/// with `weights`.
#[derive(Clone, Debug)]
struct State<B: Backend> {
    inputs: LossInputs<B>,
    spec: LossSpec,
    weights: [f32; 4],
    /// ∂/∂student_conf, ∂/∂student_loc.
    gradients: [FloatTensor<B>; 2],
}

/// The terms operation's backward: parents `student_loc`, `student_conf`.
#[derive(Debug)]
struct TermsBackward;

/// The gradient of `weights` (soft, l2, conf, loc) · terms: one evaluation when every
/// weight is finite. A non-finite weight `w` adds `w` times its own term's gradient (one
/// evaluation each, what multiplying Burn's own operations by it would give), to the
/// tensor that term reaches: soft and conf reach student_conf, l2 and loc student_loc.
fn weighted_gradients<B: SsdkdBackend>(state: &State<B>, weights: [f32; 4]) -> [FloatTensor<B>; 2] {
    let evaluate = |w: [f32; 4]| {
        let (_, conf, loc) = B::ssdkd_evaluate(state.inputs.clone(), state.spec.weighted(w));
        [conf, loc]
    };
    let finite = weights.map(|w| if w.is_finite() { w } else { 0.0 });
    let mut gradients = evaluate(finite);
    for (term, w) in weights.into_iter().enumerate() {
        if !w.is_finite() {
            let mut unit = [0.0; 4];
            unit[term] = 1.0;
            let reached = usize::from(term % 2 == 1); // soft 0, l2 1, conf 2, loc 3
            let own = evaluate(unit)[reached].clone();
            let g = gradients[reached].clone();
            gradients[reached] = B::float_add(g, B::float_mul_scalar(own, w.into()));
        }
    }
    gradients
}

impl<B: SsdkdBackend> Backward<B, 2> for TermsBackward {
    type State = State<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let weights: [f32; 4] = read_f32::<B>(grad)
            .ok()
            .and_then(|w| w.try_into().ok())
            .unwrap_or_else(|| panic!("ssdkd-burn: reading the terms' [4] gradient failed"));
        let state = ops.state;
        let weights = state.spec.effective(weights);
        let same = weights.map(f32::to_bits) == state.weights.map(f32::to_bits);
        let [conf, loc] = if same {
            state.gradients.clone()
        } else {
            weighted_gradients(&state, weights)
        };
        if weights.iter().all(|w| w.is_finite()) {
            state.spec.predict(weights);
        }
        let [student_loc, student_conf] = ops.parents;
        if let Some(node) = student_loc {
            grads.register::<B>(node.id, loc);
        }
        if let Some(node) = student_conf {
            grads.register::<B>(node.id, conf);
        }
    }
}

/// The inputs as the inner backend's tensors (outside the graph).
fn inner<B: Backend, C: CheckpointStrategy>(inputs: LossInputs<Autodiff<B, C>>) -> LossInputs<B> {
    Tensors::from(inputs).map(|t| t.into_primitive()).into()
}

impl<B: SsdkdBackend, C: CheckpointStrategy> SsdkdBackend for Autodiff<B, C> {
    fn ssdkd_terms(inputs: LossInputs<Self>, spec: LossSpec) -> FloatTensor<Self> {
        let nodes = [inputs.student_loc.node(), inputs.student_conf.node()];
        // The teacher, the targets and the priors are constants: no gradient flows to them.
        let inner = inner(inputs);
        match TermsBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let weights = spec.predicted();
                let (terms, conf, loc) = B::ssdkd_evaluate(inner.clone(), spec.weighted(weights));
                let state = State {
                    inputs: inner,
                    spec,
                    weights,
                    gradients: [conf, loc],
                };
                prep.finish(state, terms)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::ssdkd_terms(inner, spec)),
        }
    }

    fn ssdkd_evaluate(
        inputs: LossInputs<Self>,
        spec: LossSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let inner = inner(inputs);
        let (terms, conf, loc) = B::ssdkd_evaluate(inner, spec);
        (
            FloatTensor::<Self>::new(terms),
            FloatTensor::<Self>::new(conf),
            FloatTensor::<Self>::new(loc),
        )
    }
}
