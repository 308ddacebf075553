//! One training step of a student SSD head with the distillation loss: on Burn's wgpu
//! device shared with ssdkd when there is one (the loss then runs on Burn's buffers), on
//! Flex (Burn's CPU backend) otherwise.
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor};
use ssdkd_burn::{LossConfig, LossWeights, MultiBoxLossKd, PriorPreset};

/// A stand-in for a student's SSD head: box offsets and class logits per prior.
#[derive(Module, Debug)]
struct Head {
    loc: Linear,
    conf: Linear,
}

fn main() -> Result<(), ssdkd_burn::Error> {
    // Open Burn's wgpu device through ssdkd-burn (so both share it), or fall back to Flex.
    let device = match ssdkd_burn::wgpu_device() {
        Ok(device) => device,
        Err(why) => {
            eprintln!("no wgpu device ({why}); on the CPU");
            Device::flex()
        }
    }
    .autodiff();
    let (b, p, c, features) = (2, 8732, 21, 8);
    let criterion = MultiBoxLossKd::new(LossConfig::DEFAULT, PriorPreset::Ssd300);
    let mut head = Head {
        loc: LinearConfig::new(features, 4).init(&device),
        conf: LinearConfig::new(features, c).init(&device),
    };
    let mut optimizer = AdamWConfig::new().init();

    let normal = Distribution::Normal(0.0, 1.0);
    let x = Tensor::<3>::random([b, p, features], normal, &device);
    let (teacher_loc, teacher_conf) = (
        Tensor::<3>::random([b, p, 4], normal, &device),
        Tensor::<3>::random([b, p, c], normal, &device),
    );
    // Per image: xmin, ymin, xmax, ymax, label (0..C-2); a negative label pads.
    let targets = Tensor::<3>::from_floats(
        [
            [[0.1, 0.2, 0.5, 0.7, 14.0], [0.0, 0.0, 0.0, 0.0, -1.0]],
            [[0.3, 0.3, 0.9, 0.8, 6.0], [0.0, 0.5, 0.4, 1.0, 0.0]],
        ],
        &device,
    );

    let terms = criterion.forward(
        head.loc.forward(x.clone()),
        head.conf.forward(x),
        teacher_loc,
        teacher_conf,
        targets,
    )?;
    let total = terms.weighted(LossWeights::DEFAULT); // 0.3·soft + 0.7·conf + 0.5·l2 + loc
    let grads = GradientsParams::from_grads(total.backward(), &head);
    head = optimizer.step(1e-3, head, grads);
    println!("loss {:.4}", total.into_scalar::<f32>());
    drop(head);
    Ok(())
}
