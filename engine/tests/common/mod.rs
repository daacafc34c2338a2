//! Helpers shared by the engine's end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Writes the annotations of the mini_coco train images `ids` (all their instances, all
/// categories) to `out`.
pub fn coco_subset(ids: &[u64], out: &Path) {
    let src = root().join("assets/mini_coco/annotations/instances_train.json");
    let mut d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    let keep = |v: &serde_json::Value, key: &str| ids.contains(&v[key].as_u64().unwrap());
    let images: Vec<_> = d["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| keep(v, "id"))
        .cloned()
        .collect();
    let anns: Vec<_> = d["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| keep(v, "image_id"))
        .cloned()
        .collect();
    assert_eq!(images.len(), ids.len());
    d["images"] = images.into();
    d["annotations"] = anns.into();
    std::fs::write(out, d.to_string()).unwrap();
}
