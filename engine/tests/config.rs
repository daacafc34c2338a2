//! `_base_` inheritance, `_delete_` and `--set` overrides.

use densepred_engine::config::{load, load_with_overrides, parse_value, set};
use toml::Value;

#[test]
fn base_merge_delete_and_overrides() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("_base_")).unwrap();
    std::fs::write(
        d.path().join("_base_/model.toml"),
        "[model]\ntype = \"RetinaNet\"\n[model.backbone]\ntype = \"SMT\"\nvariant = \"s\"\ndrop_path_rate = 0.2\n[model.neck]\ntype = \"FPN\"\nnum_outs = 5\nstart_level = 1\n",
    )
    .unwrap();
    std::fs::write(
        d.path().join("_base_/sched.toml"),
        "[train_cfg]\ntype = \"EpochBasedTrainLoop\"\nmax_epochs = 12\n",
    )
    .unwrap();
    std::fs::write(
        d.path().join("cfg.toml"),
        "_base_ = [\"_base_/model.toml\", \"_base_/sched.toml\"]\n[model.backbone]\nvariant = \"t\"\n[model.neck]\n_delete_ = true\ntype = \"FPN\"\nnum_outs = 3\n[train_cfg]\nmax_epochs = 36\n",
    )
    .unwrap();
    let c = load(&d.path().join("cfg.toml")).unwrap();
    let bb = c["model"]["backbone"].as_table().unwrap();
    assert_eq!(bb["variant"].as_str(), Some("t"), "own keys win");
    assert_eq!(
        bb["drop_path_rate"].as_float(),
        Some(0.2),
        "inherited keys stay"
    );
    let neck = c["model"]["neck"].as_table().unwrap();
    assert!(
        neck.get("start_level").is_none() && neck.get("_delete_").is_none(),
        "_delete_ replaces the table: {neck:?}"
    );
    assert_eq!(c["train_cfg"]["max_epochs"].as_integer(), Some(36));
    assert_eq!(c["train_cfg"]["type"].as_str(), Some("EpochBasedTrainLoop"));

    let c = load_with_overrides(
        &d.path().join("cfg.toml"),
        &[
            "train_cfg.max_iters=20".into(),
            "model.backbone.drop_path_rate=1e-1".into(),
            "test_dataloader.dataset.ann_file=annotations/val.json".into(),
        ],
    )
    .unwrap();
    assert_eq!(c["train_cfg"]["max_iters"].as_integer(), Some(20));
    assert_eq!(
        c["model"]["backbone"]["drop_path_rate"].as_float(),
        Some(0.1)
    );
    assert_eq!(
        c["test_dataloader"]["dataset"]["ann_file"].as_str(),
        Some("annotations/val.json"),
        "plain strings need no quotes; missing tables are created"
    );
}

#[test]
fn override_values_and_errors() {
    assert_eq!(parse_value("3"), Value::Integer(3));
    assert_eq!(parse_value("true"), Value::Boolean(true));
    assert_eq!(
        parse_value("[1, 2]"),
        Value::Array(vec![Value::Integer(1), Value::Integer(2)])
    );
    assert_eq!(parse_value("\"x\""), Value::String("x".into()));
    assert_eq!(
        parse_value("work_dirs/a b"),
        Value::String("work_dirs/a b".into())
    );
    let mut t: toml::Table = toml::from_str("a = 1\nl = [{ x = 1 }, { x = 2 }]\n").unwrap();
    set(&mut t, "l.1.x=5").unwrap();
    assert_eq!(t["l"][1]["x"].as_integer(), Some(5));
    assert!(set(&mut t, "a.b=2")
        .unwrap_err()
        .to_string()
        .contains("a is not a table"));
    assert!(set(&mut t, "l.9.x=1")
        .unwrap_err()
        .to_string()
        .contains("out of range"));
    assert!(set(&mut t, "novalue").is_err());
    assert_eq!(
        t["a"].as_integer(),
        Some(1),
        "a failed override leaves the config intact"
    );
}

#[test]
fn cycles_and_missing_bases_are_errors() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("a.toml"), "_base_ = [\"b.toml\"]\n").unwrap();
    std::fs::write(d.path().join("b.toml"), "_base_ = [\"a.toml\"]\n").unwrap();
    assert!(load(&d.path().join("a.toml"))
        .unwrap_err()
        .to_string()
        .contains("cycle"));
    std::fs::write(d.path().join("c.toml"), "_base_ = [\"missing.toml\"]\n").unwrap();
    assert!(load(&d.path().join("c.toml"))
        .unwrap_err()
        .to_string()
        .contains("missing.toml"));
}
