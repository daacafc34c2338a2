//! SMT construction: variant presets and parameter counts against the official model, config
//! parsing, gradient flow, and checkpoint key handling.

use candle_core::{DType, Device, Tensor};
use densepred_backbones::smt::{map_checkpoint_key, Smt, SmtConfig};
use densepred_backbones::{AnyBackbone, Backbone, BackboneConfig};
use densepred_core::params::SeededVarMap;
use densepred_core::weights::{load_into, read_checkpoint, WeightsError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/backbones")
}

fn parse(toml_src: &str) -> BackboneConfig {
    #[derive(serde::Deserialize)]
    struct File {
        backbone: BackboneConfig,
    }
    toml::from_str::<File>(toml_src).unwrap().backbone
}

fn count(cfg: &BackboneConfig) -> usize {
    let vars = SeededVarMap::new(0);
    AnyBackbone::new(vars.var_builder(DType::F32, &Device::Cpu), cfg).unwrap();
    vars.num_parameters()
}

/// Every variant preset equals the official factory's configuration, and the built model has
/// exactly the official number of parameters (`param_counts.json`, measured by instantiating the
/// official PyTorch classes), with and without the 1000-class head.
#[test]
fn variant_presets_match_official_parameter_counts() {
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shared().join("param_counts.json")).unwrap())
            .unwrap();
    for (v, key, extra) in [
        ("t", "smt_t", ""),
        ("s", "smt_s", ""),
        ("b", "smt_b", ""),
        ("l", "smt_l", "use_layerscale = true\n"),
    ] {
        let official = &counts["SMT"][key];
        let with_head = count(&parse(&format!(
            "[backbone]\ntype = \"SMT\"\nvariant = \"{v}\"\nnum_classes = 1000\n{extra}"
        )));
        assert_eq!(
            with_head as u64,
            official["params"].as_u64().unwrap(),
            "SMT-{v} with head"
        );
        let without = count(&parse(&format!(
            "[backbone]\ntype = \"SMT\"\nvariant = \"{v}\"\n{extra}"
        )));
        assert_eq!(
            without as u64,
            official["params_without_classifier_head"].as_u64().unwrap(),
            "SMT-{v} backbone"
        );
        // The preset resolves to the official constructor arguments.
        let BackboneConfig::Smt(c) =
            parse(&format!("[backbone]\ntype = \"SMT\"\nvariant = \"{v}\"\n"))
        else {
            panic!("an SMT config")
        };
        let p = c.resolve().unwrap();
        let oc = &official["config"];
        let ints = |k: &str| -> Vec<i64> {
            oc[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        };
        assert_eq!(
            p.embed_dims.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            ints("embed_dims")
        );
        assert_eq!(
            p.depths.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            ints("depths")
        );
        assert_eq!(p.ca_num_heads.to_vec(), ints("ca_num_heads"));
        assert_eq!(p.sa_num_heads.to_vec(), ints("sa_num_heads"));
        assert_eq!(
            p.mlp_ratios.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            ints("mlp_ratios")
        );
        assert_eq!(p.head_conv as i64, oc["head_conv"].as_i64().unwrap());
        assert_eq!(p.qkv_bias, oc["qkv_bias"].as_bool().unwrap());
    }
}

#[test]
fn explicit_fields_override_the_preset_and_typos_are_errors() {
    let BackboneConfig::Smt(c) = parse("[backbone]\ntype = \"SMT\"\nvariant = \"t\"\ndepths = [1, 1, 2, 1]\nout_indices = [1, 2, 3]\n") else {
        panic!("an SMT config")
    };
    let p = c.resolve().unwrap();
    assert_eq!(p.depths, [1, 1, 2, 1]);
    assert_eq!(p.embed_dims, [64, 128, 256, 512]);
    assert_eq!(p.out_indices, vec![1, 2, 3]);
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct File {
        backbone: BackboneConfig,
    }
    let err = toml::from_str::<File>("[backbone]\ntype = \"SMT\"\nembed_dim = [1, 2, 3, 4]\n")
        .unwrap_err();
    assert!(err.to_string().contains("embed_dim"), "{err}");
    let bad = SmtConfig {
        embed_dims: Some(vec![64, 128, 256]),
        ..Default::default()
    };
    assert!(bad.resolve().unwrap_err().contains("embed_dims"));
    let bad_heads = SmtConfig {
        embed_dims: Some(vec![30, 64, 128, 256]),
        ..Default::default()
    };
    assert!(bad_heads.resolve().unwrap_err().contains("ca_num_heads[0]"));
}

fn tiny() -> SmtConfig {
    SmtConfig {
        embed_dims: Some(vec![16, 32, 64, 64]),
        sa_num_heads: Some(vec![-1, -1, 2, 2]),
        depths: Some(vec![1, 1, 2, 1]),
        mlp_ratios: Some(vec![2.0, 2.0, 2.0, 2.0]),
        qkv_bias: Some(true),
        num_classes: Some(5),
        drop_path_rate: Some(0.1),
        ..Default::default()
    }
}

/// Training mode (batch-norm statistics, stochastic depth) runs forward and backward, and every
/// parameter gets a non-zero gradient; the dense output shapes follow the strides 4..32 with ceil
/// rounding.
#[test]
fn forward_backward_reaches_every_parameter() {
    let vars = SeededVarMap::new(3);
    let model = Smt::new(vars.var_builder(DType::F32, &Device::Cpu), &tiny()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 50, 70), &Device::Cpu).unwrap();
    let (stages, _) = model.forward_all(&x, true, false).unwrap();
    let dims: Vec<Vec<usize>> = stages.iter().map(|s| s.dims().to_vec()).collect();
    assert_eq!(
        dims,
        vec![
            vec![2, 16, 12, 17],
            vec![2, 32, 6, 9],
            vec![2, 64, 3, 5],
            vec![2, 64, 2, 3]
        ]
    );
    let logits = model.classify(&stages[3]).unwrap();
    let mut loss = logits.sqr().unwrap().mean_all().unwrap();
    for s in &stages {
        loss = (loss + s.sqr().unwrap().mean_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    let mut n = 0;
    for (name, var) in vars.named_vars() {
        if densepred_core::params::is_buffer(&name) {
            continue;
        }
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
        n += 1;
    }
    assert!(n > 50);
}

/// Detection checkpoints (`backbone.` prefix, MSA depthwise conv named `attn.dw_conv`) load into
/// the same parameters; mismatches are reported by name.
#[test]
fn detection_checkpoint_names_and_mismatch_report() {
    assert_eq!(
        map_checkpoint_key("backbone.block3.1.attn.dw_conv.weight"),
        "block3.1.attn.local_conv.weight"
    );
    assert_eq!(
        map_checkpoint_key("block1.0.attn.local_conv_2.bias"),
        "block1.0.attn.local_conv_2.bias"
    );
    let path = shared().join("smt_small.safetensors");
    let tensors = read_checkpoint(&path).unwrap();
    // Rewrite the fixture as an mmdet checkpoint would store it.
    let det: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("head.") && !k.starts_with("__"))
        .map(|(k, t)| {
            (
                format!(
                    "backbone.{}",
                    k.replace(".attn.local_conv.", ".attn.dw_conv.")
                ),
                t.clone(),
            )
        })
        .collect();
    let mut cfg = SmtConfig {
        embed_dims: Some(vec![16, 32, 64, 128]),
        sa_num_heads: Some(vec![-1, -1, 2, 4]),
        mlp_ratios: Some(vec![4.0, 4.0, 4.0, 2.0]),
        qkv_bias: Some(true),
        depths: Some(vec![1, 1, 2, 1]),
        ..Default::default()
    };
    let vars = SeededVarMap::new(0);
    let model = Smt::new(vars.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    let report = load_into(
        &vars,
        &det,
        &|k| Some(map_checkpoint_key(k)),
        true,
        Path::new("det.pth"),
    )
    .unwrap();
    assert!(report.is_exact(), "{report}");
    assert!(report
        .loaded
        .contains(&"block3.1.attn.local_conv.weight".to_string()));
    let out = model.forward(&tensors["__input__"], false).unwrap();
    let err = densepred_testutil::max_abs(&out[3], &tensors["__stage4__"]);
    assert!(err <= 2.5e-5, "{err}");

    // A model of another width: the error names the file and lists the first shape mismatches
    // (then how many more).
    cfg.embed_dims = Some(vec![16, 32, 64, 64]);
    cfg.sa_num_heads = Some(vec![-1, -1, 2, 2]);
    let vars = SeededVarMap::new(0);
    Smt::new(vars.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    let err = load_into(
        &vars,
        &det,
        &|k| Some(map_checkpoint_key(k)),
        true,
        Path::new("det.pth"),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightsError::Mismatch { .. }));
    assert!(
        msg.contains("det.pth")
            && msg.contains("shape mismatch for block4.0.attn.kv.weight: model [128, 64], checkpoint [256, 128]")
            && msg.contains("more shape mismatches"),
        "{msg}"
    );
    // Missing and unexpected keys are listed too (a classifier checkpoint into a model without a
    // head: head.* are unexpected).
    let vars = SeededVarMap::new(0);
    cfg.embed_dims = Some(vec![16, 32, 64, 128]);
    cfg.sa_num_heads = Some(vec![-1, -1, 2, 4]);
    cfg.depths = Some(vec![1, 1, 2, 2]);
    Smt::new(vars.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    let msg = load_into(
        &vars,
        &tensors,
        &|k| Some(map_checkpoint_key(k)),
        true,
        &path,
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("missing keys") && msg.contains("block4.1.attn.q.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("unexpected keys") && msg.contains("head.weight"),
        "{msg}"
    );
}
