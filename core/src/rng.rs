//! A seeded, thread-local random generator for stochastic layers (DropPath, dropout) so that a
//! training run is reproducible on CPU for a given `randomness.seed`.

use rand::{rngs::StdRng, SeedableRng};
use std::cell::RefCell;

thread_local! {
    static RNG: RefCell<StdRng> = RefCell::new(StdRng::seed_from_u64(0));
}

/// Re-seeds the generator of the calling thread.
pub fn seed(seed: u64) {
    RNG.with(|r| *r.borrow_mut() = StdRng::seed_from_u64(seed));
}

/// Runs `f` with the calling thread's generator.
pub fn with_rng<T>(f: impl FnOnce(&mut StdRng) -> T) -> T {
    RNG.with(|r| f(&mut r.borrow_mut()))
}
