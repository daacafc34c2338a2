//! Multiply-accumulate counts (`densepred_core::flops`, what `densepred analyze flops` prints)
//! against fvcore's per-operator figures for the official SMT-T and Conv2Former-N classifiers
//! (`../shared/fixtures/backbones/param_counts.json`, 1x3x224x224), and MCGA's total against the
//! paper's 0.7 GMACs (within the 10%).
//!
//! Tolerance for the official models: half the file's rounding step per operator (it gives GMACs
//! to 4 decimals: ±5e-5 G) and on the totals (3 decimals: ±5e-4 G).

use candle_core::{DType, Device, Tensor};
use densepred_backbones::{AnyBackbone, BackboneConfig};
use densepred_core::params::SeededVarMap;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn counts(toml_src: &str) -> BTreeMap<&'static str, u64> {
    let cfg: BackboneConfig = toml::from_str(toml_src).unwrap();
    let vars = SeededVarMap::new(0);
    let m = AnyBackbone::new(vars.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    let x = Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu).unwrap();
    let (r, c) = densepred_core::flops::measure(|| -> candle_core::Result<()> {
        let s = m.forward_stages(&x, false)?;
        m.classify(&s[3])?.expect("a classifier");
        Ok(())
    });
    r.unwrap();
    c
}

fn fvcore(family: &str, model: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/backbones/param_counts.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v[family][model].clone()
}

fn check_against_fvcore(ours: &BTreeMap<&'static str, u64>, want: &serde_json::Value, what: &str) {
    let by_op = want["fvcore_by_operator_G"].as_object().unwrap();
    let kinds: Vec<&str> = ours.keys().copied().collect();
    let mut want_kinds: Vec<&str> = by_op.keys().map(String::as_str).collect();
    want_kinds.sort();
    assert_eq!(kinds, want_kinds, "{what}: operator kinds");
    for (k, g) in by_op {
        let got = ours[k.as_str()] as f64 / 1e9;
        let w = g.as_f64().unwrap();
        assert!(
            (got - w).abs() <= 5.0001e-5,
            "{what} {k}: {got} vs fvcore {w}"
        );
    }
    let total = ours.values().sum::<u64>() as f64 / 1e9;
    let w = want["fvcore_flops_224_G"].as_f64().unwrap();
    assert!(
        (total - w).abs() <= 5.0001e-4,
        "{what} total {total} vs {w}"
    );
}

#[test]
fn smt_t_and_conv2former_n_match_fvcore() {
    let smt = counts("type = \"SMT\"\nvariant = \"t\"\nnum_classes = 1000");
    check_against_fvcore(&smt, &fvcore("SMT", "smt_t"), "SMT-T");
    // Without the attention products: the paper's (ptflops) figure, 2.4G.
    let no_mm = (smt.values().sum::<u64>() - smt["matmul"]) as f64 / 1e9;
    let w = fvcore("SMT", "smt_t")["fvcore_flops_224_G_without_attention_matmul"]
        .as_f64()
        .unwrap();
    assert!((no_mm - w).abs() <= 5.0001e-4, "{no_mm} vs {w}");
    let c2f = counts("type = \"Conv2Former\"\nvariant = \"n\"\nnum_classes = 1000");
    check_against_fvcore(
        &c2f,
        &fvcore("Conv2Former", "conv2former_n"),
        "Conv2Former-N",
    );
}

#[test]
fn mcga_is_within_10_percent_of_the_papers_07_gmacs() {
    let c = counts("type = \"MCGA\"\nvariant = \"tiny\"\nnum_classes = 1000");
    let without = (c.values().sum::<u64>() - c["matmul"]) as f64 / 1e9;
    assert!((without / 0.7 - 1.0).abs() <= 0.10, "{without} GMACs");
    let with = c.values().sum::<u64>() as f64 / 1e9;
    assert!(
        (with / 0.7 - 1.0).abs() <= 0.10,
        "{with} GMACs with the attention products"
    );
}
