//! The one ADS stream loop, shared by both variants of the protocol: requests in, responses
//! out, a push to every subscription when the cache changes or per-node resources must be
//! renewed, and an `UNAVAILABLE` when the server stops. What differs between SotW and delta
//! (how a request changes a subscription, what a response holds) is a [`Variant`].

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
        let mut stream = Stream::<V> {
            source,
            events,
            tx,
            subs: HashMap::new(),
            node: None,
            node_id: String::new(),
            nonce: 0,
            renew_at: None,
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
    subs: HashMap<String, V::Subscription>,
    node: Option<Node>,
    node_id: String,
    nonce: u64,
    renew_at: Option<Instant>,
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
        let sub = self.subs.entry(type_url.clone()).or_default();
        let cx = Ctx {
            source: &self.source,
            node: self.node.as_ref(),
            node_id: &self.node_id,
            events: &self.events,
            type_url: &type_url,
        };
        if !V::on_request(sub, &req, first, &cx) {
            return true;
        }
        self.nonce += 1;
        let (resp, renew) = V::respond(sub, &cx, self.nonce, false);
        self.renew_at = earliest(self.renew_at, renew);
        match resp {
            Some(resp) => self.tx.send(Ok(resp)).await.is_ok(),
            None => true,
        }
    }

    /// Sends every subscription what it lacks, make-before-break; `false` once the response
    /// side is closed.
    async fn push_all(&mut self) -> bool {
        for (type_url, sub) in push_order(&mut self.subs) {
            self.nonce += 1;
            let cx = Ctx {
                source: &self.source,
                node: self.node.as_ref(),
                node_id: &self.node_id,
                events: &self.events,
                type_url,
            };
            let (resp, renew) = V::respond(sub, &cx, self.nonce, true);
            self.renew_at = earliest(self.renew_at, renew);
            if let Some(resp) = resp {
                if self.tx.send(Ok(resp)).await.is_err() {
                    return false;
                }
            }
        }
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
