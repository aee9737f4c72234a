//! The one ADS stream loop, shared by both variants of the protocol: requests in, responses
//! out, a push to every subscription when the cache changes or per-node resources must be
//! renewed, and an `UNAVAILABLE` when the server stops. What differs between SotW and delta
//! (how a request changes a subscription, what a response holds) is a [`Variant`].
//!
//! Pushes are flow controlled: while a type's last push is unanswered (no ACK or NACK yet,
//! for at most the cache's ACK wait), changes of that type are held and sent together when
//! the client answers, and the types pushed after it wait too, so make-before-break holds.
//! A client slower than the rate of change so gets the latest state, merged, instead of a
//! queue of stale responses it must work through first.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::Node;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::source::{earliest, push_order, stopped, BoxStream, EventLog, Source};

/// What both variants' requests carry: the node (on a stream's first request) and the
/// resource type.
pub(super) trait AdsRequest {
    /// The node a request carries (the first request of a stream must).
    fn node(&self) -> Option<&Node>;
    /// The resource type a request is about.
    fn type_url(&self) -> &str;
    /// The nonce of the response a request answers (empty on a request that answers none).
    fn response_nonce(&self) -> &str;
}

macro_rules! ads_request {
    ($($t:ty),*) => {$(
        impl AdsRequest for $t {
            fn node(&self) -> Option<&Node> {
                self.node.as_ref()
            }
            fn type_url(&self) -> &str {
                &self.type_url
            }
            fn response_nonce(&self) -> &str {
                &self.response_nonce
            }
        }
    )*};
}

ads_request!(
    envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest,
    envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest
);

/// One variant of the ADS protocol: state of the world or incremental.
pub(super) trait Variant {
    /// What the client sends.
    type Request: AdsRequest + Send + 'static;
    /// What the server sends.
    type Response: Send + 'static;
    /// What the server keeps per resource type for one stream.
    type Subscription: Default + Send;
    /// The variant's name in logs and in the event log (`sotw`, `delta`).
    const NAME: &'static str;

    /// Applies a request to its type's subscription (`first`: the stream's first request for
    /// the type), recording an ACK or NACK in `events`; whether it needs an answer.
    fn on_request(
        sub: &mut Self::Subscription,
        req: &Self::Request,
        first: bool,
        cx: &Ctx<'_>,
    ) -> bool;

    /// The response a subscription is owed (`None` when the client is up to date), with the
    /// next time per-node resources must be renewed. `pushed`: answering a change of the
    /// cache rather than a request.
    fn respond(
        sub: &mut Self::Subscription,
        cx: &Ctx<'_>,
        nonce: u64,
        pushed: bool,
    ) -> (Option<Self::Response>, Option<Instant>);
}

/// What a variant sees of the stream while it handles one resource type.
pub(super) struct Ctx<'a> {
    /// What the stream serves.
    pub(super) source: &'a Source,
    /// The client's node, once it said.
    pub(super) node: Option<&'a Node>,
    /// The node's id (empty until it said), for the event log.
    pub(super) node_id: &'a str,
    /// Where ACKs and NACKs are recorded.
    pub(super) events: &'a EventLog,
    /// The resource type at hand.
    pub(super) type_url: &'a str,
}

type Sender<T> = mpsc::Sender<Result<T, tonic::Status>>;

/// Serves one ADS stream of variant `V` until the client goes, the server stops or the
/// response side closes.
pub(super) fn serve<V: Variant + 'static>(
    source: Source,
    events: EventLog,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    mut dropping: tokio::sync::watch::Receiver<u64>,
    mut requests: Streaming<V::Request>,
) -> BoxStream<V::Response> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let ack_wait = source.cache.ack_wait();
        let mut stream = Stream::<V> {
            source,
            events,
            tx,
            subs: HashMap::new(),
            node: None,
            node_id: String::new(),
            nonce: 0,
            renew_at: None,
            ack_wait,
            held_until: None,
        };
        let mut changes = stream.source.cache.subscribe();
        loop {
            let sent = tokio::select! {
                _ = dropping.changed() => {
                    let dropped = tonic::Status::unavailable("xDS stream dropped by the server");
                    let _ = stream.tx.send(Err(dropped)).await;
                    return;
                }
                _ = stopped(&mut stopping) => {
                    let down = tonic::Status::unavailable("xDS server shutting down");
                    let _ = stream.tx.send(Err(down)).await;
                    return;
                }
                req = requests.next() => match req {
                    Some(Ok(req)) => stream.on_request(req).await,
                    Some(Err(status)) => {
                        tracing::debug!(node = %stream.node_id, %status, kind = V::NAME, "ADS stream error");
                        return;
                    }
                    None => return,
                },
                changed = changes.changed() => match changed {
                    Ok(()) => stream.push_all().await,
                    Err(_) => return,
                },
                _ = sleep_until_opt(stream.renew_at) => {
                    stream.renew_at = None;
                    stream.push_all().await
                }
                _ = sleep_until_opt(stream.held_until) => {
                    stream.held_until = None;
                    stream.push_owed().await
                }
            };
            if !sent {
                return;
            }
        }
    });
    Box::pin(ReceiverStream::new(rx).fuse())
}

/// The state of one stream.
struct Stream<V: Variant> {
    source: Source,
    events: EventLog,
    tx: Sender<V::Response>,
    subs: HashMap<String, Slot<V::Subscription>>,
    node: Option<Node>,
    node_id: String,
    nonce: u64,
    renew_at: Option<Instant>,
    /// How long a push may stay unanswered before the next one goes anyway.
    ack_wait: std::time::Duration,
    /// When the earliest held push stops waiting for its type's answer.
    held_until: Option<Instant>,
}

/// One resource type of a stream: its subscription, and its flow control.
#[derive(Default)]
struct Slot<S> {
    sub: S,
    /// The nonce of the last response sent, and when, until the client answers it.
    unanswered: Option<(String, Instant)>,
    /// What the type is owed.
    owed: Owed,
}

/// What a type of a stream is owed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
enum Owed {
    #[default]
    Nothing,
    /// The cache changed: what the client lacks, if anything.
    Push,
    /// A request needs an answer (a first request, a change of subscription).
    Answer,
}

impl<V: Variant> Stream<V> {
    /// Handles a request; `false` once the response side is closed.
    async fn on_request(&mut self, req: V::Request) -> bool {
        if self.node.is_none() {
            if let Some(n) = req.node() {
                self.node_id = n.id.clone();
                self.node = Some(n.clone());
                self.events.connected(&self.node_id, V::NAME);
            }
        }
        let type_url = req.type_url().to_owned();
        let first = !self.subs.contains_key(&type_url);
        let slot = self.subs.entry(type_url.clone()).or_default();
        let answered = slot
            .unanswered
            .as_ref()
            .is_some_and(|(nonce, _)| *nonce == req.response_nonce());
        if answered {
            slot.unanswered = None;
        }
        let cx = Ctx {
            source: &self.source,
            node: self.node.as_ref(),
            node_id: &self.node_id,
            events: &self.events,
            type_url: &type_url,
        };
        let needs_answer = V::on_request(&mut slot.sub, &req, first, &cx);
        if needs_answer {
            slot.owed = Owed::Answer;
        }
        if answered || needs_answer {
            // The answer, and pushes held for this type's answer (of this type, or of types
            // after it), go now, in push order.
            return self.push_owed().await;
        }
        true
    }

    /// A change: every subscription is owed what it lacks.
    async fn push_all(&mut self) -> bool {
        for slot in self.subs.values_mut() {
            slot.owed = slot.owed.max(Owed::Push);
        }
        self.push_owed().await
    }

    /// Sends every subscription that is owed a push what it lacks, make-before-break: in
    /// push order, holding a type whose last push is unanswered, and every type after a held
    /// one. `false` once the response side is closed.
    async fn push_owed(&mut self) -> bool {
        let now = Instant::now();
        let wait = self.ack_wait;
        // The earliest time a held type stops waiting; set while a type is held.
        let mut held: Option<Instant> = None;
        self.held_until = None;
        for (type_url, slot) in push_order(&mut self.subs) {
            if slot.owed == Owed::Nothing {
                continue;
            }
            let waiting = slot
                .unanswered
                .as_ref()
                .map(|(_, at)| *at + wait)
                .filter(|until| *until > now);
            if let Some(until) = waiting {
                held = earliest(held, Some(until));
            }
            if held.is_some() {
                continue;
            }
            let pushed = slot.owed == Owed::Push;
            slot.owed = Owed::Nothing;
            self.nonce += 1;
            let cx = Ctx {
                source: &self.source,
                node: self.node.as_ref(),
                node_id: &self.node_id,
                events: &self.events,
                type_url,
            };
            let (resp, renew) = V::respond(&mut slot.sub, &cx, self.nonce, pushed);
            self.renew_at = earliest(self.renew_at, renew);
            if let Some(resp) = resp {
                slot.unanswered = Some((self.nonce.to_string(), now));
                if self.tx.send(Ok(resp)).await.is_err() {
                    return false;
                }
            }
        }
        self.held_until = held;
        true
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
