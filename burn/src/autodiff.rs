//! The backward pass: ssdkd's analytic gradient registered in Burn's autodiff graph. The
//! forward's output is one `[4]` tensor of the terms, so its backward receives one `[4]`
//! gradient: those four numbers (the only host read of the backward) are the weights of
//! one gradient evaluation, which is exactly the gradient of the incoming combination of
//! the terms (SPEC §6: the total is linear in its weights).

use crate::backend::{LossSpec, SsdkdBackend};
use crate::host::read_f32;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::Autodiff;
use ssdkd::Tensors;

/// The six inputs of an evaluation, as the inner backend's tensors.
#[derive(Clone, Debug)]
struct Inputs<B: burn::backend::Backend> {
    tensors: Tensors<FloatTensor<B>>,
    spec: LossSpec,
}

/// The terms operation's backward: parents `student_loc`, `student_conf`.
#[derive(Debug)]
struct TermsBackward;

impl<B: SsdkdBackend> Backward<B, 2> for TermsBackward {
    type State = Inputs<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let weights = read_f32::<B>(grad);
        let weights: [f32; 4] = weights
            .try_into()
            .expect("the terms' gradient has the terms' shape [4]");
        let [student_loc, student_conf] = ops.parents;
        let [sl, sc, tl, tc, tg, pr] = ops.state.tensors.to_array();
        let (grad_conf, grad_loc) =
            B::ssdkd_gradients(sl, sc, tl, tc, tg, pr, ops.state.spec.weighted(weights));
        if let Some(node) = student_loc {
            grads.register::<B>(node.id, grad_loc);
        }
        if let Some(node) = student_conf {
            grads.register::<B>(node.id, grad_conf);
        }
    }
}

impl<B: SsdkdBackend, C: CheckpointStrategy> SsdkdBackend for Autodiff<B, C> {
    fn ssdkd_terms(
        student_loc: FloatTensor<Self>,
        student_conf: FloatTensor<Self>,
        teacher_loc: FloatTensor<Self>,
        teacher_conf: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        priors: FloatTensor<Self>,
        spec: LossSpec,
    ) -> FloatTensor<Self> {
        // The teacher, the targets and the priors are constants: no gradient flows to them.
        let tensors = Tensors {
            student_loc: student_loc.primitive().clone(),
            student_conf: student_conf.primitive().clone(),
            teacher_loc: teacher_loc.into_primitive(),
            teacher_conf: teacher_conf.into_primitive(),
            targets: targets.into_primitive(),
            priors: priors.into_primitive(),
        };
        let evaluate = |tensors: Tensors<FloatTensor<B>>, spec: LossSpec| {
            let [sl, sc, tl, tc, tg, pr] = tensors.to_array();
            B::ssdkd_terms(sl, sc, tl, tc, tg, pr, spec)
        };
        match TermsBackward
            .prepare::<C>([student_loc.node(), student_conf.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = Inputs {
                    tensors: tensors.clone(),
                    spec: spec.clone(),
                };
                prep.finish(state, evaluate(tensors, spec))
            }
            OpsKind::UnTracked(prep) => prep.finish(evaluate(tensors, spec)),
        }
    }

    fn ssdkd_gradients(
        student_loc: FloatTensor<Self>,
        student_conf: FloatTensor<Self>,
        teacher_loc: FloatTensor<Self>,
        teacher_conf: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        priors: FloatTensor<Self>,
        spec: LossSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (conf, loc) = B::ssdkd_gradients(
            student_loc.into_primitive(),
            student_conf.into_primitive(),
            teacher_loc.into_primitive(),
            teacher_conf.into_primitive(),
            targets.into_primitive(),
            priors.into_primitive(),
            spec,
        );
        (
            FloatTensor::<Self>::new(conf),
            FloatTensor::<Self>::new(loc),
        )
    }
}
