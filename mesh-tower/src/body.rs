//! A response body that reports how it ended, for the layers that can only judge a response
//! once it is over: a gRPC status arrives in the trailers, a span ends with the last frame.

use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// The request body type inside the stack.
pub type MeshBody =
    http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, crate::error::BoxError>;

/// How a response body ended.
pub enum End<'a> {
    /// The last frame was read; the trailers, if any.
    Complete(Option<&'a HeaderMap>),
    /// The body failed while being read.
    Failed(&'a dyn std::fmt::Display),
    /// The body was dropped before its end (the caller cancelled, or stopped reading).
    Dropped,
}

impl std::fmt::Debug for End<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Complete(t) => f.debug_tuple("Complete").field(t).finish(),
            Self::Failed(e) => f.debug_tuple("Failed").field(&e.to_string()).finish(),
            Self::Dropped => f.write_str("Dropped"),
        }
    }
}

/// Told once, when the body it watches ends.
pub trait OnEnd {
    /// The body ended as `end`.
    fn on_end(self, end: End<'_>);
}

impl OnEnd for () {
    fn on_end(self, _: End<'_>) {}
}

impl<O: OnEnd> OnEnd for Option<O> {
    fn on_end(self, end: End<'_>) {
        if let Some(o) = self {
            o.on_end(end);
        }
    }
}

pin_project! {
    /// A body passed through unchanged, whose end is reported to an observer.
    #[derive(Debug)]
    pub struct Observed<B, O: OnEnd> {
        #[pin]
        inner: B,
        observer: Option<O>,
    }

    impl<B, O> PinnedDrop for Observed<B, O>
    where
        O: OnEnd,
    {
        fn drop(this: Pin<&mut Self>) {
            if let Some(o) = this.project().observer.take() {
                o.on_end(End::Dropped);
            }
        }
    }
}

impl<B, O: OnEnd> Observed<B, O> {
    /// Watches `inner`.
    pub fn new(inner: B, observer: O) -> Self {
        Self {
            inner,
            observer: Some(observer),
        }
    }
}

impl<B, O> Body for Observed<B, O>
where
    B: Body,
    B::Error: std::fmt::Display,
    O: OnEnd,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = futures::ready!(this.inner.poll_frame(cx));
        match &frame {
            None => {
                if let Some(o) = this.observer.take() {
                    o.on_end(End::Complete(None));
                }
            }
            Some(Ok(f)) => {
                if let Some(t) = f.trailers_ref() {
                    if let Some(o) = this.observer.take() {
                        o.on_end(End::Complete(Some(t)));
                    }
                }
            }
            Some(Err(e)) => {
                if let Some(o) = this.observer.take() {
                    o.on_end(End::Failed(e));
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// gRPC helpers shared by the layers that classify responses.
pub(crate) mod grpc {
    use http::HeaderMap;

    /// Whether the message is gRPC (`content-type: application/grpc*`).
    pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
        headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
    }

    /// `grpc-status`, as a constant: looking up by `&str` parses the name on every call.
    pub(crate) const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

    /// The `grpc-status` in `headers` (trailers, or the headers of a trailers-only response).
    pub(crate) fn status(headers: &HeaderMap) -> Option<u32> {
        if headers.is_empty() {
            return None;
        }
        headers
            .get(GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    /// The status of a gRPC call whose body ended as `end` (UNKNOWN when the trailers have
    /// none, CANCELLED when the caller stopped reading, UNAVAILABLE when the stream broke).
    pub(crate) fn status_at_end(end: &super::End<'_>) -> u32 {
        match end {
            super::End::Complete(t) => t.and_then(status).unwrap_or(2),
            super::End::Failed(_) => 14,
            super::End::Dropped => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::BodyExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl OnEnd for Seen {
        fn on_end(self, end: End<'_>) {
            let s = match end {
                End::Complete(t) => format!("complete {:?}", t.and_then(grpc::status)),
                End::Failed(e) => format!("failed {e}"),
                End::Dropped => "dropped".into(),
            };
            self.0.lock().unwrap().push(s);
        }
    }

    #[tokio::test]
    async fn reports_trailers_once_then_nothing_on_drop() {
        let seen = Seen::default();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let collected = Observed::new(body, seen.clone()).collect().await.unwrap();
        assert_eq!(collected.trailers().and_then(grpc::status), Some(14));
        assert_eq!(*seen.0.lock().unwrap(), ["complete Some(14)"]);
    }

    #[tokio::test]
    async fn reports_a_body_dropped_early() {
        let seen = Seen::default();
        let body = http_body_util::Full::new(Bytes::from_static(b"x"));
        drop(Observed::new(body, seen.clone()));
        assert_eq!(*seen.0.lock().unwrap(), ["dropped"]);
        let seen = Seen::default();
        let _ = Observed::new(http_body_util::Empty::<Bytes>::new(), seen.clone())
            .collect()
            .await;
        assert_eq!(*seen.0.lock().unwrap(), ["complete None"]);
    }
}
