//! Multiply-accumulate counting for `densepred analyze flops`, with fvcore's conventions (the
//! convention `../shared/fixtures/backbones/param_counts.json` documents): one fused
//! multiply-add counts 1; convolutions `B·C_out·H_out·W_out·(C_in / groups)·k²`, linear layers
//! `rows·in·out`, attention matmuls `B·N·M·C` each, LayerNorm `5·numel`, BatchNorm in
//! evaluation `2·numel`; element-wise ops (activations, softmax, products, pooling) are not
//! counted.
//!
//! The layers of [`crate::nn`] count themselves; model code counts its fused ops (which do the
//! work of several layers in one kernel) with [`count`]. Nothing is counted unless a
//! [`measure`] call is running on this thread.

use std::cell::RefCell;
use std::collections::BTreeMap;

thread_local! {
    static COUNTS: RefCell<Option<BTreeMap<&'static str, u64>>> = const { RefCell::new(None) };
}

/// The kind of an attention matrix product (`q·kᵀ`, `attn·v`): fvcore counts it, ptflops (which
/// the SMT authors used) does not.
pub const MATMUL: &str = "matmul";

/// Adds `macs` multiply-accumulates of `kind` (`"conv"`, `"linear"`, `"matmul"`,
/// `"layer_norm"`, `"batch_norm"`) while a [`measure`] runs on this thread; a no-op otherwise.
pub fn count(kind: &'static str, macs: u64) {
    COUNTS.with(|c| {
        if let Some(m) = c.borrow_mut().as_mut() {
            *m.entry(kind).or_insert(0) += macs;
        }
    });
}

/// Whether a [`measure`] runs on this thread (to skip computing counts otherwise).
pub fn active() -> bool {
    COUNTS.with(|c| c.borrow().is_some())
}

/// Runs `f` counting the multiply-accumulates of every layer it calls on this thread; returns
/// its result and the counts by kind. Not re-entrant: a nested call restarts the counts.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, BTreeMap<&'static str, u64>) {
    COUNTS.with(|c| *c.borrow_mut() = Some(BTreeMap::new()));
    let out = f();
    let counts = COUNTS.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (out, counts)
}

/// Counts [`crate::ops::token_attention`]'s two products for `q` `(B, N, C)` and `kv`
/// `(B, M, 2C)`: `2·B·N·M·C` of kind [`MATMUL`].
pub fn count_token_attention(q: &candle_core::Tensor, kv: &candle_core::Tensor) {
    if let (Ok((b, n, c)), Ok(m)) = (q.dims3(), kv.dim(1)) {
        count(MATMUL, (2 * b * n * m * c) as u64);
    }
}

/// Counts a depthwise `k×k` convolution over tokens `(B, L, C)` (`B·L·C·k²`, kind `"conv"`).
pub fn count_token_dwconv(x: &candle_core::Tensor, k: usize) {
    count("conv", (x.elem_count() * k * k) as u64);
}
