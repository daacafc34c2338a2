//! UPerHead + FCNHead (auxiliary) and Semantic FPN's FPNHead against mmsegmentation 1.2.2
//! (`../shared/fixtures/models/{uper_head,semfpn_head}`): eval-mode logits on the "even" (exact
//! 2x pyramid) and "odd" (100x136 image) sets, `loss_ce` (logits resized to the labels, CE with
//! ignore 255 over all pixels, aux ×0.4), `acc_seg`, the loss gradient w.r.t. the logits, the
//! argmax labels, and a train-mode forward (BN batch statistics, dropout 0 as the fixture) with
//! the BN running statistics it leaves behind.
//!
//! Tolerances: logits 1e-5 abs (the fixture's own f32-vs-f64 spread is ≤ 1.5e-6; an off-by-one
//! PPM bin or resize tap moves them by > 1e-3); loss 1e-5 relative; gradient 1e-4 of its largest
//! entry; accuracy within the near-tie pixels the fixture counts; pred labels: at most that many
//! mismatches; running stats 1e-5 abs.

use candle_core::{DType, Device, Tensor, Var};
use densepred_core::params::SeededVarMap;
use densepred_core::weights::load_into;
use densepred_heads::seg::{
    predict_labels, seg_accuracy, seg_loss, FcnHead, FcnHeadConfig, FpnHead, FpnHeadConfig,
    UperHead, UperHeadConfig,
};
use densepred_testutil::max_abs;

#[allow(dead_code)]
mod common;
use common::{fixture, Fixture};
use std::collections::BTreeMap;

fn cfg<T: serde::de::DeserializeOwned>(f: &Fixture, head: &str, dropout: Option<f64>) -> T {
    let mut c = f.meta["config"][head].clone();
    let o = c.as_object_mut().unwrap();
    o.remove("type");
    if let Some(p) = dropout {
        o.insert("dropout_ratio".into(), p.into());
    }
    serde_json::from_value(c).unwrap()
}

fn load(f: &Fixture, vars: &SeededVarMap) {
    let params: BTreeMap<String, Tensor> =
        f.t.iter()
            .filter(|(k, _)| k.starts_with("decode_head.") || k.starts_with("auxiliary_head."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    let r = load_into(vars, &params, &|k| Some(k.to_string()), true, &f.path).unwrap();
    assert!(r.is_exact(), "{r}");
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
}

fn inputs(f: &Fixture, set: &str) -> Vec<Tensor> {
    (0..4)
        .map(|i| f.t[&format!("input.{set}.{i}")].clone())
        .collect()
}

/// Checks one head's eval outputs for one input set.
fn check_eval(
    f: &Fixture,
    head: &str,
    set: &str,
    logits: &Tensor,
    loss_weight: f64,
    loss_cfg: &densepred_heads::seg::SegLossConfig,
) {
    let p = format!("out.{head}.eval.{set}");
    let err = max_abs(logits, &f.t[&format!("{p}.seg_logits")]);
    assert!(err < 1e-5, "{p}: logits err {err}");
    let labels = &f.t[&format!("label.{set}")];
    // Loss and its gradient w.r.t. the logits.
    let lv = Var::from_tensor(logits).unwrap();
    let loss = seg_loss(&lv, labels, loss_cfg, 255, false).unwrap();
    let want = scalar(&f.t[&format!("{p}.loss_ce")]);
    let got = scalar(&loss);
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "{p}: loss {got} vs {want} (weight {loss_weight})"
    );
    let g = loss.backward().unwrap();
    let gl = g.get(&lv).unwrap();
    let gw = &f.t[&format!("{p}.grad_seg_logits")];
    let scale = scalar(&gw.abs().unwrap().flatten_all().unwrap().max(0).unwrap());
    let gerr = max_abs(gl, gw);
    assert!(
        gerr <= 1e-4 * scale as f64,
        "{p}: grad err {gerr} (max {scale})"
    );
    // Argmax labels and accuracy, allowing the pixels the fixture lists as near-ties.
    let near = f.meta["input_sets"][set][format!("{head}_pred_label_pixels_with_gap_below_1e-5")]
        .as_u64()
        .unwrap() as usize;
    let (_, h, w) = labels.dims3().unwrap();
    let pred: Vec<u32> = predict_labels(logits, h, w, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want_pred: Vec<u8> = f.t[&format!("{p}.pred_label")]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(pred.len(), want_pred.len(), "{p}: label map sizes");
    let mismatches = pred
        .iter()
        .zip(&want_pred)
        .filter(|(a, b)| **a != **b as u32)
        .count();
    assert!(
        mismatches <= near,
        "{p}: {mismatches} label mismatches (allowed {near})"
    );
    let acc = seg_accuracy(logits, labels, 255, false).unwrap();
    let want_acc = scalar(&f.t[&format!("{p}.acc_seg")]) as f64;
    let valid = labels
        .to_dtype(DType::U32)
        .unwrap()
        .ne(255u32)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let tol = 100.0 * (near as f64 + 0.01) / valid;
    assert!(
        (acc - want_acc).abs() <= tol,
        "{p}: acc {acc} vs {want_acc}"
    );
}

fn check_running_stats(f: &Fixture, head: &str, vars: &SeededVarMap) {
    let named: BTreeMap<String, Var> = vars.named_vars().into_iter().collect();
    let prefix = format!("out.{head}.train.even.after.");
    let mut n = 0;
    for (k, want) in f.t.iter().filter(|(k, _)| k.starts_with(&prefix)) {
        let name = format!("{head}.{}", &k[prefix.len()..]);
        let got = named
            .get(&name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        let err = max_abs(got.as_tensor(), want);
        assert!(err < 1e-5, "{name}: running stat err {err}");
        n += 1;
    }
    assert!(n > 0, "no running statistics checked for {head}");
}

#[test]
fn uper_head_and_fcn_aux_match_mmseg() {
    let f = fixture("uper_head");
    let dev = Device::Cpu;
    let vars = SeededVarMap::new(0);
    let vb = vars.var_builder(DType::F32, &dev);
    let dcfg: UperHeadConfig = cfg(&f, "decode_head", None);
    let acfg: FcnHeadConfig = cfg(&f, "auxiliary_head", None);
    let decode = UperHead::new(vb.pp("decode_head"), &dcfg).unwrap();
    let aux = FcnHead::new(vb.pp("auxiliary_head"), &acfg).unwrap();
    load(&f, &vars);
    for set in ["even", "odd"] {
        let x = inputs(&f, set);
        let d = decode.forward(&x, false).unwrap();
        check_eval(&f, "decode_head", set, &d, 1.0, &dcfg.common.loss_decode);
        let a = aux.forward(&x, false).unwrap();
        check_eval(&f, "auxiliary_head", set, &a, 0.4, &acfg.common.loss_decode);
    }
    // Train mode with dropout 0 (the fixture zeroed p at run time; parameters unchanged).
    let decode0 = UperHead::new(vb.pp("decode_head"), &cfg(&f, "decode_head", Some(0.0))).unwrap();
    let aux0 = FcnHead::new(
        vb.pp("auxiliary_head"),
        &cfg(&f, "auxiliary_head", Some(0.0)),
    )
    .unwrap();
    let x = inputs(&f, "even");
    for (head, logits, lc) in [
        (
            "decode_head",
            decode0.forward(&x, true).unwrap(),
            &dcfg.common.loss_decode,
        ),
        (
            "auxiliary_head",
            aux0.forward(&x, true).unwrap(),
            &acfg.common.loss_decode,
        ),
    ] {
        let p = format!("out.{head}.train.even");
        let err = max_abs(&logits, &f.t[&format!("{p}.seg_logits")]);
        assert!(err < 1e-5, "{p}: logits err {err}");
        let loss = scalar(&seg_loss(&logits, &f.t["label.even"], lc, 255, false).unwrap());
        let want = scalar(&f.t[&format!("{p}.loss_ce")]);
        assert!(
            (loss - want).abs() <= 1e-5 * want.abs(),
            "{p}: loss {loss} vs {want}"
        );
        check_running_stats(&f, head, &vars);
    }
}

#[test]
fn semantic_fpn_head_matches_mmseg() {
    let f = fixture("semfpn_head");
    let dev = Device::Cpu;
    let vars = SeededVarMap::new(0);
    let vb = vars.var_builder(DType::F32, &dev);
    let dcfg: FpnHeadConfig = cfg(&f, "decode_head", None);
    let head = FpnHead::new(vb.pp("decode_head"), &dcfg).unwrap();
    load(&f, &vars);
    for set in ["even", "odd"] {
        let x = inputs(&f, set);
        let d = head.forward(&x, false).unwrap();
        check_eval(&f, "decode_head", set, &d, 1.0, &dcfg.common.loss_decode);
    }
    let head0 = FpnHead::new(vb.pp("decode_head"), &cfg(&f, "decode_head", Some(0.0))).unwrap();
    let logits = head0.forward(&inputs(&f, "even"), true).unwrap();
    let err = max_abs(&logits, &f.t["out.decode_head.train.even.seg_logits"]);
    assert!(err < 1e-5, "train logits err {err}");
    check_running_stats(&f, "decode_head", &vars);
}

#[test]
fn bad_head_configs_are_rejected() {
    let dev = Device::Cpu;
    let vars = SeededVarMap::new(0);
    let vb = vars.var_builder(DType::F32, &dev);
    let mut c: serde_json::Value = serde_json::json!({
        "in_channels": [8, 16], "in_index": [0], "channels": 8, "num_classes": 3,
        "norm_cfg": {"type": "BN"}
    });
    let u: UperHeadConfig = serde_json::from_value(c.clone()).unwrap();
    assert!(UperHead::new(vb.pp("u"), &u).is_err());
    c["feature_strides"] = serde_json::json!([4, 12]);
    c["in_index"] = serde_json::json!([0, 1]);
    let p: FpnHeadConfig = serde_json::from_value(c).unwrap();
    assert!(FpnHead::new(vb.pp("p"), &p).is_err());
}
