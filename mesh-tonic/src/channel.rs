//! [`MeshChannel`]: the outbound stack as a tonic channel.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::{Authority, Scheme, Uri};
use http::{Request, Response};
use mesh_tower::{BoxError, MeshClient, ResponseBody};
use pin_project_lite::pin_project;
use tonic::{Code, Status};
use tower::Service;

/// A channel for generated tonic clients over the mesh's outbound stack; cheap to clone
/// (clones share pools, breakers and balancer state).
///
/// Requests are addressed to the target's authority (what virtual hosts match), whatever
/// origin the tonic client uses.
#[derive(Clone, Debug)]
pub struct MeshChannel {
    client: MeshClient,
    authority: Authority,
}

impl MeshChannel {
    /// A channel over `client`, sending requests to `authority` (e.g.
    /// `greeter.default.svc.cluster.local:50051`).
    pub fn new(client: MeshClient, authority: Authority) -> Self {
        Self { client, authority }
    }

    /// The outbound stack (for its metrics and registry).
    pub fn client(&self) -> &MeshClient {
        &self.client
    }
}

/// The gRPC status for a request the mesh could not complete.
fn status_of(e: &BoxError) -> Status {
    use mesh_tower::MeshError as E;
    let code = match e.downcast_ref::<E>() {
        Some(E::NoRoute { .. }) => Code::Unimplemented,
        Some(E::Timeout { .. }) | Some(E::PerTryTimeout { .. }) => Code::DeadlineExceeded,
        Some(E::MissingDecision) => Code::Internal,
        Some(_) => Code::Unavailable,
        None => Code::Unavailable,
    };
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Status::new(code, message)
}

/// A trailers-only gRPC response carrying `status`.
fn status_response(status: Status) -> Response<ResponseBody> {
    use http_body_util::BodyExt;
    let body = http_body_util::Empty::<bytes::Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    // Correctness: a status's message is percent-encoded by tonic; this cannot fail for
    // the codes and messages made here, and a failure leaves the code alone.
    let _ = status.add_header(resp.headers_mut());
    resp
}

/// Any request body: tonic's, or one a tower layer above wrapped (e.g. tower-http's body
/// limit).
impl<B> Service<Request<B>> for MeshChannel
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request<B>>::poll_ready(&mut self.client, cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(parts.scheme.unwrap_or(Scheme::HTTP));
        parts.authority = Some(self.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        // Correctness: scheme, authority and path are all set, so the parts form a URI.
        *req.uri_mut() = Uri::from_parts(parts).expect("absolute URI");
        // `grpc-timeout` is applied inside the stack (the timeout layer), so that metrics and
        // traces see the call end as DEADLINE_EXCEEDED.
        ResponseFuture {
            inner: self.client.call(req),
        }
    }
}

pin_project! {
    /// The future of [`MeshChannel`].
    pub struct ResponseFuture {
        #[pin]
        inner: mesh_tower::ResponseFuture,
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<ResponseBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = futures::ready!(self.project().inner.poll(cx));
        Poll::Ready(Ok(match out {
            Ok(resp) => resp,
            Err(e) => status_response(status_of(&e)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    use mesh_tower::timeout::parse_grpc_timeout;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "10", "10x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn refusals_become_grpc_statuses() {
        let e: BoxError = Box::new(mesh_tower::MeshError::NoHealthyEndpoint {
            cluster: "outbound|50051||greeter".into(),
        });
        let resp = status_response(status_of(&e));
        let status = Status::from_header_map(resp.headers()).unwrap();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("has no healthy endpoint"),
            "{status:?}"
        );
        let e: BoxError = Box::new(mesh_tower::MeshError::NoRoute {
            listener: "l".into(),
            authority: "a".into(),
            path: "/p".into(),
        });
        assert_eq!(status_of(&e).code(), Code::Unimplemented);
    }
}
