//! The seed of a randomized test: `FERRY_SEED` if set, random otherwise, and always printed, so
//! any failure replays with `FERRY_SEED=<seed>`.

/// The environment variable that replays a seed.
pub const SEED_ENV: &str = "FERRY_SEED";

/// The seed to replay, when `FERRY_SEED` is set (for tests that run a fixed range of seeds
/// otherwise, like the simulator).
///
/// # Panics
/// If `FERRY_SEED` is set to something other than a `u64`.
#[must_use]
pub fn replay_seed() -> Option<u64> {
    let text = std::env::var(SEED_ENV).ok()?;
    Some(
        text.parse()
            .unwrap_or_else(|_| panic!("{SEED_ENV}={text} is not a u64")),
    )
}

/// The seed of the test `test`: `FERRY_SEED` if set, random otherwise; printed to stderr.
///
/// # Panics
/// If `FERRY_SEED` is set to something other than a `u64` (a mistyped replay must not run
/// another seed in silence).
#[must_use]
pub fn test_seed(test: &str) -> u64 {
    let seed = replay_seed().unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (replay with {SEED_ENV}={seed})");
    seed
}
