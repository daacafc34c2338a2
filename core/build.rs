//! Build script of densepred-core. With the `cuda` feature it compiles `kernels/densepred.cu` to
//! PTX with nvcc (found as candle-kernels finds it: `$NVCC`, `nvcc` on `PATH`, `$CUDA_HOME/bin`,
//! `/usr/local/cuda/bin`) for `compute_$CUDA_COMPUTE_CAP` (default 80; the driver JIT-compiles
//! PTX for newer GPUs). Without the feature it does nothing, so CPU builds need no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return p.into();
    }
    let on_path = Command::new("nvcc").arg("--version").output();
    if on_path.is_ok_and(|o| o.status.success()) {
        return "nvcc".into();
    }
    for root in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(r) = std::env::var_os(root) {
            let p = PathBuf::from(r).join("bin/nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    "/usr/local/cuda/bin/nvcc".into()
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/densepred.cu");
    for v in [
        "CUDA_COMPUTE_CAP",
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_ROOT",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("densepred_kernels.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".to_string());
    let cap: u32 = cap
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP must be a number like 90, got {cap:?}"));
    let nvcc = nvcc();
    let status = Command::new(&nvcc)
        .args(["--ptx", &format!("-arch=compute_{cap}"), "-O3", "-o"])
        .arg(&out)
        .arg("kernels/densepred.cu")
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "the `cuda` feature needs nvcc (tried {}): {e}; see ../shared/notes/cuda_build.md",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "nvcc failed ({status}) compiling kernels/densepred.cu"
    );
}
