use http::Response;
use mesh_core::config::{RetryOn, RetryPolicy};

use crate::error::{BoxError, MeshError};

/// Why an attempt is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// An HTTP status matched.
    Status(u16),
    /// A gRPC status (trailers-only response) matched.
    Grpc(u32),
    /// The connection could not be made.
    ConnectFailure,
    /// The connection or stream failed after sending.
    Reset,
    /// The attempt's per-try timeout expired.
    PerTryTimeout,
}

/// Whether `result` is to be retried under `policy` (not counting limits), and why.
pub fn classify<B>(
    policy: &RetryPolicy,
    result: &Result<Response<B>, BoxError>,
) -> Option<RetryReason> {
    let on = policy.retry_on;
    match result {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let retry_status = (on.contains(RetryOn::FIVE_XX) && status >= 500)
                || (on.contains(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504))
                || (on.contains(RetryOn::RETRIABLE_4XX) && status == 409)
                || (on.contains(RetryOn::RETRIABLE_STATUS_CODES)
                    && policy.retriable_status_codes.contains(&status));
            if retry_status {
                return Some(RetryReason::Status(status));
            }
            // gRPC: a trailers-only response carries grpc-status in its headers.
            let code = crate::body::grpc::status(resp.headers())?;
            let grpc = match code {
                1 => RetryOn::GRPC_CANCELLED,
                4 => RetryOn::GRPC_DEADLINE_EXCEEDED,
                8 => RetryOn::GRPC_RESOURCE_EXHAUSTED,
                13 => RetryOn::GRPC_INTERNAL,
                14 => RetryOn::GRPC_UNAVAILABLE,
                _ => return None,
            };
            on.contains(grpc).then_some(RetryReason::Grpc(code))
        }
        Err(e) => match e.downcast_ref::<MeshError>()? {
            MeshError::Upstream { connect: true, .. } => (on.contains(RetryOn::CONNECT_FAILURE)
                || on.contains(RetryOn::FIVE_XX)
                || on.contains(RetryOn::GATEWAY_ERROR)
                || on.contains(RetryOn::RESET_BEFORE_REQUEST))
            .then_some(RetryReason::ConnectFailure),
            MeshError::Upstream { connect: false, .. } => (on.contains(RetryOn::RESET)
                || on.contains(RetryOn::FIVE_XX)
                || on.contains(RetryOn::GATEWAY_ERROR))
            .then_some(RetryReason::Reset),
            MeshError::PerTryTimeout { .. } => (on.contains(RetryOn::FIVE_XX)
                || on.contains(RetryOn::GATEWAY_ERROR)
                || on.contains(RetryOn::RESET)
                || on.contains(RetryOn::GRPC_DEADLINE_EXCEEDED))
            .then_some(RetryReason::PerTryTimeout),
            // Local decisions (breaker, no endpoint, no route) are not retried.
            _ => None,
        },
    }
}
