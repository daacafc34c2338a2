//! FPN against mmdetection 3.3 on `../shared/fixtures/models/fpn_*` (even and odd input sizes).
//! Gate 1e-5 abs: the sidecars give an f32-vs-f64 spread of ≤ 4e-6.

use candle_core::{DType, Device, Tensor};
use densepred_core::params::SeededVarMap;
use densepred_core::weights::{load_into, read_checkpoint};
use densepred_necks::fpn::{Fpn, FpnConfig};
use std::path::PathBuf;

fn run(name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/models");
    let path = dir.join(format!("{name}.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let mut cfg = meta["config"].clone();
    cfg.as_object_mut().unwrap().remove("type");
    let cfg: FpnConfig = serde_json::from_value(cfg).unwrap();
    let t = read_checkpoint(&path).unwrap();
    let vars = SeededVarMap::new(0);
    let fpn = Fpn::new(vars.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    let params: std::collections::BTreeMap<String, Tensor> = t
        .iter()
        .filter(|(k, _)| k.starts_with("neck."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let r = load_into(
        &vars,
        &params,
        &|k| k.strip_prefix("neck.").map(String::from),
        true,
        &path,
    )
    .unwrap();
    assert!(r.is_exact(), "{r}");
    for set in ["even", "odd"] {
        let inputs: Vec<Tensor> = (0..4)
            .map(|i| t[&format!("input.{set}.{i}")].clone())
            .collect();
        let outs = fpn.forward(&inputs).unwrap();
        assert_eq!(outs.len(), cfg.num_outs);
        for (l, o) in outs.iter().enumerate() {
            let want = &t[&format!("output.{set}.{l}")];
            let err = densepred_testutil::max_abs(&o, &want);
            assert!(err <= 1e-5, "{name} {set} level {l}: {err}");
        }
        // Training on un-padded sizes: the top-down path's non-integer resizes backpropagate.
        let vars_in: Vec<candle_core::Var> = inputs
            .iter()
            .map(|x| candle_core::Var::from_tensor(x).unwrap())
            .collect();
        let ins: Vec<Tensor> = vars_in.iter().map(|v| v.as_tensor().clone()).collect();
        let loss = fpn
            .forward(&ins)
            .unwrap()
            .iter()
            .map(|o| o.sum_all().unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get(&vars_in[3]).is_some());
    }
}

#[test]
fn fpn_retinanet_on_input_matches_mmdet() {
    run("fpn_retinanet");
}

#[test]
fn fpn_on_output_matches_mmdet() {
    run("fpn_on_output");
}

#[test]
fn fpn_maskrcnn_maxpool_matches_mmdet() {
    run("fpn_maskrcnn");
}
