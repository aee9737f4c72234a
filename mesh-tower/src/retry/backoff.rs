//! The waits of a retried request: exponential backoff with full jitter between attempts,
//! and each attempt's per-try timeout.

use std::pin::Pin;
use std::time::Duration;

use mesh_core::config::RetryPolicy;
use tokio::time::Sleep;

/// The wait before retry number `retry` (0 for the first): uniform in
/// `[0, min(max, base * 2^retry)]` (full jitter).
pub(super) fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let cap = policy
        .backoff
        .base
        .saturating_mul(1u32.checked_shl(retry.min(16)).unwrap_or(u32::MAX))
        .min(policy.backoff.max);
    cap.mul_f64(fastrand::f64())
}

/// The timer of one attempt, when the policy sets a per-try timeout.
pub(super) fn per_try(policy: &RetryPolicy) -> Option<Pin<Box<Sleep>>> {
    policy
        .per_try_timeout
        .map(|d| Box::pin(tokio::time::sleep(d)))
}
