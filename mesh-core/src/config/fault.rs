//! Fault injection configuration (`envoy.extensions.filters.http.fault.v3.HTTPFault`).

use std::time::Duration;

use super::matcher::{Fraction, HeaderMatcher};

/// Delay and/or abort a fraction of requests (the default: neither, i.e. no fault).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultConfig {
    /// Added latency.
    pub delay: Option<FaultDelay>,
    /// Failed requests.
    pub abort: Option<FaultAbort>,
    /// Cap on requests with an active fault at once (`None`: unlimited).
    pub max_active_faults: Option<u32>,
    /// The fault applies only to requests whose headers all match.
    pub headers: Vec<HeaderMatcher>,
}

/// A fixed delay for a fraction of requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultDelay {
    /// How long.
    pub duration: Duration,
    /// How many.
    pub fraction: Fraction,
}

/// How an aborted request fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortKind {
    /// An HTTP status (200..600).
    Http(u16),
    /// A gRPC status code, sent as a trailers-only response.
    Grpc(u32),
}

/// An abort for a fraction of requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultAbort {
    /// The failure.
    pub kind: AbortKind,
    /// How many.
    pub fraction: Fraction,
}
