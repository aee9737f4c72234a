//! Retry policies (`RetryPolicy`): conditions, attempts, backoff and host selection.

use std::time::Duration;

/// The conditions of `retry_on`, as a set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOn(u32);

macro_rules! retry_on {
    ($($(#[$doc:meta])* $name:ident = $bit:expr, $text:expr;)*) => {
        impl RetryOn {
            $($(#[$doc])* pub const $name: RetryOn = RetryOn(1 << $bit);)*

            /// Parses Envoy's comma-separated `retry_on` (HTTP and gRPC conditions). Unknown
            /// names are returned so the caller can report them.
            pub fn parse(list: &str) -> (RetryOn, Vec<String>) {
                let mut set = RetryOn(0);
                let mut unknown = Vec::new();
                for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match item {
                        $($text => set.0 |= 1 << $bit,)*
                        other => unknown.push(other.to_owned()),
                    }
                }
                (set, unknown)
            }

            /// The names of the conditions in the set, comma-separated.
            pub fn names(self) -> String {
                let mut out: Vec<&str> = Vec::new();
                $(if self.contains(Self::$name) { out.push($text); })*
                out.join(",")
            }
        }
    };
}

retry_on! {
    /// Any 5xx response, reset or connect failure.
    FIVE_XX = 0, "5xx";
    /// 502, 503, 504, reset or connect failure.
    GATEWAY_ERROR = 1, "gateway-error";
    /// The connection was reset or the stream ended without a response.
    RESET = 2, "reset";
    /// Reset before any response byte.
    RESET_BEFORE_REQUEST = 3, "reset-before-request";
    /// Connecting to the endpoint failed.
    CONNECT_FAILURE = 4, "connect-failure";
    /// HTTP/2 REFUSED_STREAM.
    REFUSED_STREAM = 5, "refused-stream";
    /// Status in `retriable_status_codes`.
    RETRIABLE_STATUS_CODES = 6, "retriable-status-codes";
    /// Any 4xx.
    RETRIABLE_4XX = 7, "retriable-4xx";
    /// gRPC CANCELLED.
    GRPC_CANCELLED = 8, "cancelled";
    /// gRPC DEADLINE_EXCEEDED.
    GRPC_DEADLINE_EXCEEDED = 9, "deadline-exceeded";
    /// gRPC INTERNAL.
    GRPC_INTERNAL = 10, "internal";
    /// gRPC RESOURCE_EXHAUSTED.
    GRPC_RESOURCE_EXHAUSTED = 11, "resource-exhausted";
    /// gRPC UNAVAILABLE.
    GRPC_UNAVAILABLE = 12, "unavailable";
    /// Envoy-specific: the upstream sent `x-envoy-overloaded`.
    ENVOY_RATELIMITED = 13, "envoy-ratelimited";
    /// HTTP/3 post-connect failure.
    HTTP3_POST_CONNECT_FAILURE = 14, "http3-post-connect-failure";
    /// Retriable response headers matched.
    RETRIABLE_HEADERS = 15, "retriable-headers";
}

impl RetryOn {
    /// Whether every condition of `other` is in the set.
    pub fn contains(self, other: RetryOn) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    /// The union.
    pub fn union(self, other: RetryOn) -> RetryOn {
        RetryOn(self.0 | other.0)
    }

    /// No condition.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// `envoy.config.route.v3.RetryPolicy`.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Conditions that trigger a retry.
    pub retry_on: RetryOn,
    /// Retries after the first attempt (xDS default 1).
    pub num_retries: u32,
    /// Timeout of each attempt.
    pub per_try_timeout: Option<Duration>,
    /// Backoff between attempts.
    pub backoff: RetryBackoff,
    /// Statuses retried under `retriable-status-codes`.
    pub retriable_status_codes: Vec<u16>,
    /// Avoid hosts already tried (`envoy.retry_host_predicates.previous_hosts`).
    pub previous_hosts: bool,
    /// Attempts to pick a host the predicate accepts.
    pub host_selection_max_attempts: u32,
}

impl RetryPolicy {
    /// One attempt and no retry: what a route without a retry policy gets.
    pub fn none() -> Self {
        Self {
            retry_on: RetryOn::default(),
            num_retries: 0,
            per_try_timeout: None,
            backoff: RetryBackoff::default(),
            retriable_status_codes: Vec::new(),
            previous_hosts: false,
            host_selection_max_attempts: 1,
        }
    }
}

/// The names of the gRPC status codes, indexed by code (0 `OK` to 16 `UNAUTHENTICATED`), as
/// gRPC, Envoy and Istio spell them.
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Exponential backoff with full jitter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryBackoff {
    /// First interval (default 25 ms).
    pub base: Duration,
    /// Cap (default 10 × base).
    pub max: Duration,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        }
    }
}
