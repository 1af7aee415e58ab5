//! Retry policy for acquiring under pressure, and the time seams (clock, sleeper) that
//! tests replace.
//!
//! The schedule is the seed's: the sleep before attempt k+1 is
//! `min(backoff · multiplier^(k-1), max_backoff)`, there is no sleep after the last attempt,
//! and a zero delay never sleeps. Optional jitter shortens each sleep by up to a fraction.

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::storage::LeaseError;

/// How `acquire_proxy_with_retry` retries a miss.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, at least 1. Default: 3.
    pub max_attempts: u32,
    /// Sleep before the second attempt. Default: 0.5 s.
    pub backoff: Duration,
    /// Growth of the sleep per attempt, at least 1. Default: 2.
    pub multiplier: f64,
    /// Cap on any one sleep. Default: none.
    pub max_backoff: Option<Duration>,
    /// Fraction in [0, 1]: each sleep is shortened by a random part of up to this fraction
    /// (0 = exact schedule). Default: 0.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff: Duration::from_millis(500),
            multiplier: 2.0,
            max_backoff: None,
            jitter: 0.0,
        }
    }
}

impl RetryPolicy {
    /// A single attempt, no sleeping.
    pub fn once() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Checks the bounds of every field.
    pub fn validate(&self) -> Result<(), LeaseError> {
        let bad = |m: &str| Err(LeaseError::InvalidRetry(m.to_owned()));
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1");
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return bad("multiplier must be a finite number >= 1");
        }
        if self.max_backoff == Some(Duration::ZERO) {
            return bad("max_backoff must be positive (omit it for no cap)");
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return bad("jitter must be between 0 and 1");
        }
        Ok(())
    }

    /// The sleep after failed attempt `k` (1-based), before attempt k+1, without jitter.
    pub fn delay_after(&self, k: u32) -> Duration {
        let exp = i32::try_from(k.saturating_sub(1)).unwrap_or(i32::MAX);
        let nanos = self.backoff.as_nanos() as f64 * self.multiplier.powi(exp);
        let cap = self.max_backoff.map_or(f64::MAX, |m| m.as_nanos() as f64);
        let nanos = nanos.min(cap);
        if nanos >= u64::MAX as f64 {
            Duration::MAX
        } else {
            Duration::from_nanos(nanos.round() as u64)
        }
    }

    /// The sleeps of a run that misses every attempt, without jitter.
    pub fn schedule(&self) -> Vec<Duration> {
        (1..self.max_attempts)
            .map(|k| self.delay_after(k))
            .filter(|d| !d.is_zero())
            .collect()
    }

    /// The sleep after attempt `k`, with jitter applied.
    pub(crate) fn jittered_delay_after(&self, k: u32) -> Duration {
        let d = self.delay_after(k);
        if self.jitter == 0.0 || d.is_zero() {
            return d;
        }
        d.mul_f64(1.0 - self.jitter * fastrand::f64())
    }
}

/// A boxed future that sleeps.
pub type SleepFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Source of "now" for lease times: wall-clock time, as stored in leases. The default reads
/// tokio's clock (which tests can pause) from a wall-clock anchor taken once per process, so it
/// never steps backwards when the system clock is set.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// How the retry loop sleeps between attempts. Tests inject one that records the delays.
pub trait Sleeper: Send + Sync + 'static {
    /// A future that completes after `d`.
    fn sleep(&self, d: Duration) -> SleepFuture;
}

/// The tokio clock (`tokio::time::Instant::now`), read as wall-clock time.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        wall_now()
    }
}

/// Now on the wall clock, advanced by tokio's monotonic clock from an anchor taken once per
/// process (paused tokio time in tests moves it too).
pub fn wall_now() -> SystemTime {
    static ANCHOR: LazyLock<(Instant, SystemTime)> =
        LazyLock::new(|| (Instant::now(), SystemTime::now()));
    let (mono, wall) = *ANCHOR;
    let now = Instant::now();
    if now >= mono {
        wall + (now - mono)
    } else {
        wall - (mono - now)
    }
}

/// Sleeps with `tokio::time::sleep`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, d: Duration) -> SleepFuture {
        Box::pin(tokio::time::sleep(d))
    }
}
