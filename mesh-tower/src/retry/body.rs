use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::cluster::MeshBody;
use crate::error::BoxError;

/// The part of a body already read (while deciding retryability), then the rest.
#[derive(Debug)]
pub struct PrefixedBody {
    prefix: Option<Bytes>,
    rest: MeshBody,
}

impl PrefixedBody {
    /// `prefix` first, then `rest`.
    pub fn new(prefix: Bytes, rest: MeshBody) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
        }
    }
}

impl Body for PrefixedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut h = self.rest.size_hint();
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        h.set_lower(h.lower() + extra);
        if let Some(u) = h.upper() {
            h.set_upper(u + extra);
        }
        h
    }
}
