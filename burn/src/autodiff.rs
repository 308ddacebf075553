//! The backward: the `[4]` terms' incoming gradient is the total's weights (SPEC §6). The
//! forward evaluates the gradient with the weights the loss's last backward brought; the
//! backward uses it when its weights are the same bits, and evaluates again otherwise.

use crate::backend::{lock, LossInputs, LossSpec, SsdkdBackend};
use crate::host::read_f32;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend};
use ssdkd::Tensors;

/// The inputs, the spec, and the gradients (conf's, loc's) the forward evaluated with `weights`.
#[derive(Clone, Debug)]
struct State<B: Backend> {
    inputs: LossInputs<B>,
    spec: LossSpec,
    weights: [f32; 4],
    gradients: [FloatTensor<B>; 2],
}

/// The terms operation's backward: parents `student_loc`, `student_conf`.
#[derive(Debug)]
struct TermsBackward;

/// The gradient of `weights · terms`, one evaluation when all are finite. A non-finite `w`
/// adds `w` times its term's own gradient (as Burn's operations would) where the term
/// reaches: soft and conf student_conf, l2 and loc student_loc.
fn weighted<B: SsdkdBackend>(state: &State<B>, weights: [f32; 4]) -> [FloatTensor<B>; 2] {
    let evaluate = |w: [f32; 4]| {
        let (_, conf, loc) = B::ssdkd_evaluate(state.inputs.clone(), state.spec.weighted(w));
        [conf, loc]
    };
    let mut gradients = evaluate(weights.map(|w| if w.is_finite() { w } else { 0.0 }));
    for (term, w) in weights.into_iter().enumerate().filter(|(_, w)| !w.is_finite()) {
        let (mut unit, reached) = ([0.0; 4], term % 2);
        unit[term] = 1.0;
        let own = B::float_mul_scalar(evaluate(unit)[reached].clone(), w.into());
        gradients[reached] = B::float_add(gradients[reached].clone(), own);
    }
    gradients
}

impl<B: SsdkdBackend> Backward<B, 2> for TermsBackward {
    type State = State<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let weights =
            read_f32::<B>(grads.consume::<B>(&ops.node)).ok().and_then(|w| w.try_into().ok());
        let weights = ops.state.spec.effective(weights.expect("the terms' gradient, [4] f32"));
        let state = ops.state;
        let [conf, loc] = match weights.map(f32::to_bits) == state.weights.map(f32::to_bits) {
            true => state.gradients.clone(),
            false => weighted(&state, weights),
        };
        if weights.iter().all(|w| w.is_finite()) {
            *lock(&state.spec.predicted) = Some(weights);
        }
        let [student_loc, student_conf] = ops.parents;
        for (node, gradient) in [(student_loc, loc), (student_conf, conf)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, gradient);
            }
        }
    }
}

impl<B: SsdkdBackend, C: CheckpointStrategy> SsdkdBackend for Autodiff<B, C> {
    fn ssdkd_terms(inputs: LossInputs<Self>, spec: LossSpec) -> FloatTensor<Self> {
        let nodes = [inputs.student_loc.node(), inputs.student_conf.node()];
        // The teacher, the targets and the priors are constants: no gradient flows to them.
        let inputs: LossInputs<B> = Tensors::from(inputs).map(|t| t.into_primitive()).into();
        match TermsBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let weights = spec.predicted();
                let (terms, conf, loc) = B::ssdkd_evaluate(inputs.clone(), spec.weighted(weights));
                prep.finish(State { inputs, spec, weights, gradients: [conf, loc] }, terms)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::ssdkd_terms(inputs, spec)),
        }
    }
}
