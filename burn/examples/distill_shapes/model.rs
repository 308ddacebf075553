//! The SSD-style detector of the example: a small conv backbone with three feature maps and
//! a 3×3 convolution head per map for box offsets and class logits, in the prior order of
//! SPEC §2 (cells row-major, boxes per cell innermost).

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;

/// Convolution (3×3, no bias), batch norm, ReLU.
#[derive(Module, Debug)]
pub struct ConvBn {
    conv: Conv2d,
    norm: BatchNorm,
}

impl ConvBn {
    fn new(cin: usize, cout: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv: Conv2dConfig::new([cin, cout], [3, 3])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(device),
            norm: BatchNormConfig::new(cout).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        relu(self.norm.forward(self.conv.forward(x)))
    }
}

fn run(layers: &[ConvBn], x: Tensor<4>) -> Tensor<4> {
    layers.iter().fold(x, |x, layer| layer.forward(x))
}

/// Three feature maps, at strides 8, 16 and 32 of the input; `width` sets the channels
/// (the teacher is wider than the student).
#[derive(Module, Debug)]
pub struct TinySsd {
    stem: Vec<ConvBn>,
    down1: Vec<ConvBn>,
    down2: Vec<ConvBn>,
    loc_heads: Vec<Conv2d>,
    conf_heads: Vec<Conv2d>,
    num_classes: usize,
}

impl TinySsd {
    /// `boxes_per_cell[k]`: priors per cell of map k.
    pub fn new(
        width: usize, num_classes: usize, boxes_per_cell: [usize; 3], device: &Device,
    ) -> Self {
        let w = width;
        let channels = [4 * w, 8 * w, 8 * w];
        let head = |c: usize, out: usize| {
            Conv2dConfig::new([c, out], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        let model = Self {
            stem: vec![
                ConvBn::new(3, w, 2, device),
                ConvBn::new(w, 2 * w, 2, device),
                ConvBn::new(2 * w, 2 * w, 1, device),
                ConvBn::new(2 * w, 4 * w, 2, device),
                ConvBn::new(4 * w, 4 * w, 1, device),
            ],
            down1: vec![ConvBn::new(4 * w, 8 * w, 2, device), ConvBn::new(8 * w, 8 * w, 1, device)],
            down2: vec![ConvBn::new(8 * w, 8 * w, 2, device)],
            loc_heads: (0..3).map(|k| head(channels[k], boxes_per_cell[k] * 4)).collect(),
            conf_heads: (0..3)
                .map(|k| head(channels[k], boxes_per_cell[k] * num_classes))
                .collect(),
            num_classes,
        };
        // Burn initialises parameters lazily; draw them all now, in a fixed order, so that
        // the seed set just before fixes them.
        model.visit(&mut Initialise);
        model
    }

    /// Box offsets `[B, P, 4]` and class logits `[B, P, C]`.
    pub fn forward(&self, x: Tensor<4>) -> (Tensor<3>, Tensor<3>) {
        let f1 = run(&self.stem, x);
        let f2 = run(&self.down1, f1.clone());
        let f3 = run(&self.down2, f2.clone());
        let maps = [f1, f2, f3];
        let flatten = |y: Tensor<4>, per_prior: usize| {
            let [b, ch, h, w] = y.dims();
            y.permute([0, 2, 3, 1]).reshape([b, h * w * ch / per_prior, per_prior])
        };
        let mut loc = Vec::with_capacity(3);
        let mut conf = Vec::with_capacity(3);
        for (k, f) in maps.into_iter().enumerate() {
            loc.push(flatten(self.loc_heads[k].forward(f.clone()), 4));
            conf.push(flatten(self.conf_heads[k].forward(f), self.num_classes));
        }
        (Tensor::cat(loc, 1), Tensor::cat(conf, 1))
    }
}

/// Touches every float parameter, which initialises it.
struct Initialise;

impl ModuleVisitor for Initialise {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}
