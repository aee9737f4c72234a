//! The request body read more than once: every attempt (and mirror) of a request reads its
//! own [`ReplayBody`] clone. Shared by [`retry`](crate::retry) and
//! [`mirror`](crate::mirror): the layer that first needs it wraps the body and leaves it in
//! the request's extensions ([`Replaying`]) for the other, so it is copied once.
//!
//! The request body of a retryable request: every attempt (and mirror) reads its own
//! [`ReplayBody`] clone, the first one live as the caller's body arrives, later ones replaying
//! what was read so far and then reading on. Nothing waits for the body to end before the first
//! attempt goes out, so streams flow at once. The copy is bounded: once more than the cap has
//! been read, the copy is dropped and the request is no longer replayable (the live reader
//! carries on).

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::body::MeshBody;
use crate::error::BoxError;

/// The replay copy of a request's body, left in its extensions by the layer that made it; a
/// layer below reads new clones of it instead of wrapping the body again.
#[derive(Clone, Debug)]
pub struct Replaying(pub ReplayBody);

/// A body that can be read again from its start by each clone, while the copy lasts.
///
/// ```
/// # async fn run() {
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use mesh_tower::replay::ReplayBody;
///
/// let body = Full::new(Bytes::from_static(b"hello")).map_err(|e| match e {}).boxed_unsync();
/// let first = ReplayBody::new(body, 64 * 1024);
/// let attempt = first.clone().collect().await.unwrap().to_bytes();
/// assert!(first.is_replayable());
/// let retry = first.clone().collect().await.unwrap().to_bytes();
/// assert_eq!(attempt, retry);
/// # }
/// ```
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Shared>,
    /// Index (in the whole sequence of data frames) of the next frame this clone returns.
    next: usize,
    /// Bytes this clone has returned.
    read: u64,
    /// This clone returned the trailers.
    trailers_sent: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes every clone waiting on the source, not only the last one to poll it.
    fanout: Arc<Fanout>,
    waker: Waker,
    max: usize,
    hint: SizeHint,
}

#[derive(Debug)]
struct State {
    source: Option<MeshBody>,
    /// Data frames kept for replay; `chunks[0]` is frame number `base`.
    chunks: Vec<Bytes>,
    base: usize,
    /// Bytes in `chunks`.
    len: usize,
    trailers: Option<HeaderMap>,
    ended: bool,
    error: Option<String>,
    /// The copy was given up (over the cap, or no more attempts will be made).
    capped: bool,
}

#[derive(Debug, Default)]
struct Fanout(Mutex<Vec<Waker>>);

impl Wake for Fanout {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let wakers = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        for w in wakers {
            w.wake();
        }
    }
}

impl ReplayBody {
    /// Wraps `body`, keeping up to `max` bytes for replay.
    pub fn new(body: MeshBody, max: usize) -> Self {
        let fanout = Arc::new(Fanout::default());
        let hint = body.size_hint();
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    source: Some(body),
                    chunks: Vec::new(),
                    base: 0,
                    len: 0,
                    trailers: None,
                    ended: false,
                    error: None,
                    capped: false,
                }),
                waker: Waker::from(fanout.clone()),
                fanout,
                max,
                hint,
            }),
            next: 0,
            read: 0,
            trailers_sent: false,
        }
    }

    /// Whether a new clone would see the whole body: the copy is intact.
    pub fn is_replayable(&self) -> bool {
        let s = self.shared.lock();
        !s.capped && s.error.is_none()
    }

    /// No further attempt will be made: stop keeping a copy (the live reader carries on).
    pub fn stop_replaying(&self) {
        let mut s = self.shared.lock();
        s.give_up();
    }

    /// Bytes kept for replay now.
    pub fn buffered(&self) -> usize {
        self.shared.lock().len
    }
}

impl Shared {
    /// The state; a panic while it was held (in the caller's body) leaves it consistent
    /// enough to read on, so poisoning is not passed on to the other readers.
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn give_up(&mut self) {
        self.capped = true;
        self.base += self.chunks.len();
        self.chunks = Vec::new();
        self.len = 0;
    }

    fn frames(&self) -> usize {
        self.base + self.chunks.len()
    }
}

impl Clone for ReplayBody {
    /// A reader from the start.
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            next: 0,
            read: 0,
            trailers_sent: false,
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let shared = this.shared.clone();
        let mut s = shared.lock();
        loop {
            // Replay what others read first.
            if this.next < s.frames() {
                if this.next < s.base {
                    return Poll::Ready(Some(Err(
                        "the request body grew past the retry buffer and cannot be replayed".into(),
                    )));
                }
                let chunk = s.chunks[this.next - s.base].clone();
                this.next += 1;
                this.read += chunk.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if s.ended {
                if !this.trailers_sent {
                    this.trailers_sent = true;
                    if let Some(t) = s.trailers.clone() {
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                }
                return Poll::Ready(None);
            }
            if let Some(e) = &s.error {
                return Poll::Ready(Some(Err(e.clone().into())));
            }
            // At the live edge: read the source on behalf of every clone.
            {
                let mut wakers = shared
                    .fanout
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    wakers.push(cx.waker().clone());
                }
            }
            let Some(source) = s.source.as_mut() else {
                return Poll::Ready(None);
            };
            let mut fan = Context::from_waker(&shared.waker);
            match Pin::new(source).poll_frame(&mut fan) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    s.ended = true;
                    s.source = None;
                }
                Poll::Ready(Some(Err(e))) => {
                    s.error = Some(e.to_string());
                    s.source = None;
                    this.next = usize::MAX;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) => {
                        let data = data.copy_to_bytes(data.remaining());
                        if !s.capped {
                            s.len += data.len();
                            s.chunks.push(data.clone());
                            if s.len > shared.max {
                                s.give_up();
                            }
                        } else {
                            s.base += 1;
                        }
                        this.next += 1;
                        this.read += data.len() as u64;
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            s.trailers = Some(t);
                            s.ended = true;
                            s.source = None;
                        }
                        // Other frame kinds carry nothing to replay: read on.
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock();
        if self.next < s.frames() {
            return false;
        }
        if s.ended {
            return s.trailers.is_none() || self.trailers_sent;
        }
        s.error.is_none() && s.source.as_ref().is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let mut h = SizeHint::new();
        h.set_lower(self.shared.hint.lower().saturating_sub(self.read));
        if let Some(u) = self.shared.hint.upper() {
            h.set_upper(u.saturating_sub(self.read));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn streaming() -> (tokio::sync::mpsc::Sender<Bytes>, MeshBody) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            let b = rx.recv().await?;
            Some((Ok::<_, BoxError>(Frame::data(b)), rx))
        });
        (tx, http_body_util::StreamBody::new(stream).boxed_unsync())
    }

    #[tokio::test]
    async fn frames_flow_at_once_and_replay_from_the_start() {
        let (tx, body) = streaming();
        let first = ReplayBody::new(body, 1024);
        let mut live = first.clone();
        tx.send(Bytes::from_static(b"ping")).await.unwrap();
        // The first frame is readable before the body ends.
        let f = live.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ping");
        tx.send(Bytes::from_static(b"pong")).await.unwrap();
        drop(tx);
        assert!(first.is_replayable());
        // A retry reads everything from the start, including what the first attempt has
        // not read yet, and the first attempt still sees it too.
        let retry = first.clone().collect().await.unwrap().to_bytes();
        assert_eq!(retry, "pingpong");
        let rest = live.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "pong");
    }

    #[tokio::test]
    async fn past_the_cap_the_live_reader_goes_on_and_replay_stops() {
        let (tx, body) = streaming();
        let first = ReplayBody::new(body, 8);
        let mut live = first.clone();
        for part in ["12345", "67890", "abc"] {
            tx.send(Bytes::from(part)).await.unwrap();
            live.frame().await.unwrap().unwrap();
        }
        drop(tx);
        assert!(live.frame().await.is_none());
        assert!(!first.is_replayable());
        assert_eq!(first.buffered(), 0, "the copy is dropped");
        let err = first.clone().collect().await.unwrap_err();
        assert!(err.to_string().contains("cannot be replayed"), "{err}");
    }

    #[tokio::test]
    async fn trailers_and_size_hints_are_replayed() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync();
        let first = ReplayBody::new(body, 64);
        for _ in 0..2 {
            let got = first.clone().collect().await.unwrap();
            assert_eq!(got.trailers().unwrap()["x-sum"], "1");
            assert_eq!(got.to_bytes(), "abc");
        }
        let full = http_body_util::Full::new(Bytes::from_static(b"hello"))
            .map_err(|e| match e {})
            .boxed_unsync();
        let r = ReplayBody::new(full, 64);
        assert_eq!(r.size_hint().exact(), Some(5));
        assert!(!r.is_end_stream());
        let empty = ReplayBody::new(
            http_body_util::Empty::new()
                .map_err(|e| match e {})
                .boxed_unsync(),
            64,
        );
        assert!(empty.is_end_stream(), "an empty body says so up front");
    }
}
