//! Selector strategies: which eligible proxy of a pool a lease gets.
//!
//! The strategies only name an order; the storage keeps an index per order so that a choice
//! costs O(log n) in the pool size (see `storage::memory`).

use crate::model::string_enum;

string_enum! {
    /// How to choose among the eligible proxies of a pool. Default: `first_available`.
    #[derive(Default)]
    Selector {
        /// The first eligible proxy in inventory order (the order proxies were added).
        #[default]
        FirstAvailable = "first_available",
        /// The fewest live leases; ties go to the oldest `checked_at`, then the smallest id.
        LeastUsed = "least_used",
        /// The next proxy by id after the one chosen last in this pool, wrapping around. The
        /// position is a proxy id, so proxies becoming (in)eligible neither skip nor repeat
        /// the others.
        RoundRobin = "round_robin",
        /// The lowest measured latency, then the fewest leases, then the smallest id;
        /// unmeasured proxies come last.
        LowestLatency = "lowest_latency",
        /// Uniformly at random among the eligible proxies.
        Random = "random",
    }
}

/// The latency order of `lowest_latency`: measured latencies within about 25 % of each other
/// fall in one bucket, where the least-used proxy wins, so that the single fastest proxy is
/// not handed every lease.
pub fn latency_bucket(latency: std::time::Duration) -> u64 {
    let micros = latency.as_micros().max(1) as f64;
    (micros.ln() / 1.25f64.ln()).floor() as u64
}
