//! Helpers shared by the end-to-end tests of the `densepred` binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The checkout's root (where the binary runs, so that config paths are repository-relative).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `densepred args…` in [`root`]: (success, stdout, stderr).
pub fn densepred(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_densepred"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The count on the `total` line `densepred analyze params` ends with.
///
/// # Panics
/// Without a `total N` line (the output is in the message).
pub fn params_total(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("total"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `total N` line in:\n{text}"))
}
