//! Whole models on the path of a device without our kernels: one training step of the tiny
//! RetinaNet, Mask R-CNN and UperNet runs with every op forced onto its fallback
//! (`ops::dispatch::with_fallback`: candle compositions, as on CUDA for the ops without a kernel
//! of ours) and gives the losses and gradients of our CPU kernels. This checks on the CPU the
//! logic that a GPU run executes (op compositions, and the model code between them), where no
//! GPU is at hand.
//!
//! Tolerance: f32 throughout, the two paths differ in summation order only (op by op they agree
//! to ~1e-7 relative, `core/tests/op_paths.rs` checks them in f64), and the differences grow
//! through the network's depth: every loss within 1e-4 relative, and every parameter's gradient
//! within 1e-3 of the largest gradient of its tensor plus 1e-6 of the model's largest gradient
//! (the floor is for gradients that are zero but for rounding, such as the bias of a convolution
//! that a normalisation follows: ~1e-10 here against gradients of order 1e-1). An error of the
//! composition logic is of the order of the values.
//!
//! The two-stage detector's RoI head runs on the same proposals in both steps (those of the
//! step on our kernels): they are the top-scoring boxes of an untrained RPN, thousands of nearly
//! tied scores whose order the rounding of either path can change, and the seeded sampler would
//! then draw a few different RoIs, a legitimate difference of ~0.3% in the gradients (seen once
//! the dense convolutions moved to per-tap GEMMs, whose rounding differs from candle's im2col).
//! With the proposals shared only the arithmetic is compared.

mod common;

use candle_core::{DType, Device, Tensor};
use common::root;
use densepred_core::ops::dispatch;
use densepred_engine::runner::{
    build_loader, build_model, model_inputs, to_batch, BuiltModel, Net, RunConfig,
};

/// What one step gives: the losses, the gradient of each trainable tensor (by name) and the
/// proposals of a two-stage detector's RoI head (empty otherwise).
type Step = (
    Vec<(String, f64)>,
    Vec<(String, Tensor)>,
    Vec<Vec<[f32; 4]>>,
);

/// One step on `model`'s first training batch; a two-stage detector's RoI head runs on
/// `proposals` when given.
fn step(model: &BuiltModel, cfg: &RunConfig, proposals: Option<&[Vec<[f32; 4]>]>) -> Step {
    let dl = cfg.train_dataloader.as_ref().unwrap();
    let l = build_loader(dl, 0, true).unwrap();
    let batch = l.loader.epoch(0).next().unwrap().unwrap();
    let batch = to_batch(model, batch, &Device::Cpu, true).unwrap();
    // The samplers of the two-stage heads draw from the seeded stream: the same draws twice.
    densepred_core::rng::seed(7);
    let (losses, proposals) = match &model.net {
        Net::Detector(d) => {
            let (x, metas, gts) = model_inputs(&batch);
            d.loss_with_proposals(&x, &metas, &gts, proposals).unwrap()
        }
        Net::Segmentor(_) => (model.loss(&batch).unwrap(), Vec::new()),
    };
    let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    let mut values = Vec::new();
    for (name, v) in &losses {
        values.push((name.clone(), v.to_scalar::<f32>().unwrap() as f64));
        total = (total + v).unwrap();
    }
    let grads = total.backward().unwrap();
    let mut named = model.vars.named_vars();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let gs = named
        .into_iter()
        .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n, g.clone())))
        .collect();
    (values, gs, proposals)
}

fn check(config: &str, overrides: &[String]) {
    let (cfg, _) = RunConfig::load(&root().join(config), overrides).unwrap();
    let model = build_model(&cfg.model, 0, &Device::Cpu).unwrap();
    let (l_ours, g_ours, props) = step(&model, &cfg, None);
    let shared = (!props.is_empty()).then_some(props.as_slice());
    let (l_fb, g_fb, props_fb) = dispatch::with_fallback(|| step(&model, &cfg, shared));
    assert_eq!(props, props_fb, "{config}: the RoI head's proposals");
    assert_eq!(
        l_ours.len(),
        l_fb.len(),
        "{config}: losses {l_ours:?} / {l_fb:?}"
    );
    for ((n, a), (m, b)) in l_ours.iter().zip(&l_fb) {
        assert_eq!(n, m);
        assert!(a.is_finite() && *a != 0.0, "{config}: {n} = {a}");
        assert!(
            (a - b).abs() <= 1e-4 * a.abs(),
            "{config}: {n} = {a} with our kernels, {b} on the fallbacks"
        );
    }
    assert_eq!(
        g_ours.len(),
        g_fb.len(),
        "{config}: tensors with a gradient"
    );
    assert!(g_ours.len() > 50, "{config}: {} gradients", g_ours.len());
    let max_abs = |t: &Tensor| -> f64 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let global = g_ours.iter().map(|(_, g)| max_abs(g)).fold(0f64, f64::max);
    assert!(global > 0.0, "{config}: all gradients are zero");
    for ((n, a), (m, b)) in g_ours.iter().zip(&g_fb) {
        assert_eq!(n, m);
        let scale = max_abs(a);
        let diff = max_abs(&(a - b).unwrap());
        assert!(
            diff <= 1e-3 * scale + 1e-6 * global,
            "{config}: gradient of {n}: max |Δ| {diff:e} against max |g| {scale:e} \
             (largest gradient {global:e})"
        );
    }
    println!(
        "{config}: {} losses, {} gradients agree",
        l_ours.len(),
        g_ours.len()
    );
}

fn coco_overrides() -> Vec<String> {
    let coco = root().join("assets/mini_coco");
    vec![
        format!("train_dataloader.dataset.data_root={}", coco.display()),
        "train_dataloader.batch_size=2".into(),
        "train_dataloader.sampler.shuffle=false".into(),
    ]
}

#[test]
fn tiny_retinanet_step_on_the_fallbacks() {
    check(
        "tests/configs/retinanet_tiny_overfit.toml",
        &coco_overrides(),
    );
}

#[test]
fn tiny_mask_rcnn_step_on_the_fallbacks() {
    check(
        "tests/configs/mask_rcnn_tiny_overfit.toml",
        &coco_overrides(),
    );
}

#[test]
fn tiny_upernet_step_on_the_fallbacks() {
    let prefix = "{ img_path = \"images/validation\", seg_map_path = \"annotations/validation\" }";
    check(
        "tests/configs/upernet_tiny_overfit.toml",
        &[
            format!(
                "train_dataloader.dataset.data_root=\"{}\"",
                root().join("assets/ade20k_samples").display()
            ),
            format!("train_dataloader.dataset.data_prefix={prefix}"),
            "train_dataloader.sampler.shuffle=false".into(),
            "model.decode_head.num_classes=150".into(),
            "model.auxiliary_head.num_classes=150".into(),
        ],
    );
}
