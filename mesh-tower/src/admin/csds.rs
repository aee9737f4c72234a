//! xDS Client Status Discovery Service (CSDS) over the client's [`ConfigStore`]: what
//! `grpcdebug`, Istio's `istioctl x describe`-style tools and Envoy's CSDS clients read.

use std::pin::Pin;
use std::time::SystemTime;

use envoy_types::pb::envoy::admin::v3::{ClientResourceStatus, UpdateFailureState};
use envoy_types::pb::envoy::service::status::v3::client_config::GenericXdsConfig;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::{
    ClientStatusDiscoveryService, ClientStatusDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::status::v3::{
    ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus,
};
use envoy_types::pb::google::protobuf::Timestamp;
use futures::Stream;
use mesh_core::ConfigStore;
use mesh_core::ResourceStatus;
use tonic::{Request, Response, Status, Streaming};

/// The CSDS service of one xDS client (see `mesh_tower::admin`).
#[derive(Clone, Debug)]
pub struct Csds {
    store: ConfigStore,
}

impl Csds {
    /// Reports what `store`'s xDS client holds.
    pub fn new(store: ConfigStore) -> Self {
        Self { store }
    }

    /// As a tonic service, to add to a tonic server (the admin endpoint serves it too).
    pub fn into_service(self) -> ClientStatusDiscoveryServiceServer<Csds> {
        ClientStatusDiscoveryServiceServer::new(self)
    }

    /// The client's status as CSDS reports it.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for node matchers (a client reports only itself).
    pub fn status(&self, req: &ClientStatusRequest) -> Result<ClientStatusResponse, Status> {
        if !req.node_matchers.is_empty() {
            return Err(Status::invalid_argument(
                "node_matchers are not supported: this endpoint reports its own client only",
            ));
        }
        let dump = self.store.dump();
        let generic_xds_configs = dump
            .resources
            .iter()
            .map(|r| {
                let (client_status, config_status) = match r.status {
                    ResourceStatus::Requested => {
                        (ClientResourceStatus::Requested, ConfigStatus::Unknown)
                    }
                    ResourceStatus::Acked => (ClientResourceStatus::Acked, ConfigStatus::Synced),
                    ResourceStatus::Nacked => (ClientResourceStatus::Nacked, ConfigStatus::Error),
                    ResourceStatus::DoesNotExist => {
                        (ClientResourceStatus::DoesNotExist, ConfigStatus::Unknown)
                    }
                };
                GenericXdsConfig {
                    type_url: r.resource_type.type_url().to_owned(),
                    name: r.name.clone(),
                    version_info: r.version.clone(),
                    xds_config: if req.exclude_resource_contents {
                        None
                    } else {
                        r.raw.as_deref().cloned()
                    },
                    last_updated: r.updated.map(timestamp),
                    config_status: config_status as i32,
                    client_status: client_status as i32,
                    error_state: r.error.as_ref().map(|rejected| UpdateFailureState {
                        failed_configuration: None,
                        last_update_attempt: r.updated.map(timestamp),
                        details: rejected.error.to_string(),
                        version_info: rejected.version.clone(),
                    }),
                    is_static_resource: false,
                }
            })
            .collect();
        #[allow(deprecated)]
        let config = ClientConfig {
            node: dump.node.clone(),
            xds_config: Vec::new(),
            generic_xds_configs,
            client_scope: String::new(),
        };
        Ok(ClientStatusResponse {
            config: vec![config],
        })
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<ClientStatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ClientStatusDiscoveryService for Csds {
    type StreamClientStatusStream = StatusStream;

    async fn stream_client_status(
        &self,
        request: Request<Streaming<ClientStatusRequest>>,
    ) -> Result<Response<StatusStream>, Status> {
        use futures::StreamExt;
        let csds = self.clone();
        // One response per request, as the stream's client asks.
        let out = request
            .into_inner()
            .map(move |req| req.and_then(|r| csds.status(&r)));
        Ok(Response::new(Box::pin(out)))
    }

    async fn fetch_client_status(
        &self,
        request: Request<ClientStatusRequest>,
    ) -> Result<Response<ClientStatusResponse>, Status> {
        self.status(request.get_ref()).map(Response::new)
    }
}
