//! # greeter-server: a tonic service on the mesh, configured by `meshctl serve`
//!
//! ```sh
//! cargo run -p mesh-control --bin meshctl -- certs --out certs default/greeter default/client
//! cargo run -p mesh-control --bin meshctl -- serve --config examples/greeter.yaml &
//! GRPC_XDS_BOOTSTRAP=examples/greeter-server-bootstrap.json \
//!     cargo run -p mesh-examples --bin greeter-server -- --port 50051
//! ```
//!
//! The bootstrap (gRPC's format, as Istio writes it for proxyless servers) names the xDS
//! server, the workload certificates (`certificate_providers.default`, file_watcher) and the
//! server listener template. The server waits for its listener
//! (`xds.istio.io/grpc/lds/inbound/0.0.0.0:PORT`): mTLS or plaintext by the
//! PeerAuthentication, RBAC by the AuthorizationPolicies, both followed live. It answers
//! `SayHello` with the caller's SPIFFE identity, serves until Ctrl-C, then drains.
//!
//! Options: `--port N` (default 50051), `--version NAME` (put in replies, default `v1`).

use mesh_examples::helloworld::greeter_server::{Greeter, GreeterServer};
use mesh_examples::helloworld::{HelloReply, HelloRequest};
use mesh_tonic::{Mesh, ServeOptions};
use mesh_tower::tls::PeerIdentity;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Hello {
    version: String,
}

#[tonic::async_trait]
impl Greeter for Hello {
    async fn say_hello(
        &self,
        request: tonic::Request<HelloRequest>,
    ) -> std::result::Result<tonic::Response<HelloReply>, tonic::Status> {
        let peer = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.0.as_ref())
            .map_or_else(|| "an anonymous caller".to_owned(), |p| p.to_string());
        let name = request.into_inner().name;
        Ok(tonic::Response::new(HelloReply {
            message: format!("hello {name}, from greeter {} to {peer}", self.version),
        }))
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut port = 50051u16;
    let mut version = "v1".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => {
                port = args
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or("--port needs a number")?
            }
            "--version" => version = args.next().ok_or("--version needs a name")?,
            other => {
                return Err(
                    format!("unknown argument {other:?}; try --port N --version NAME").into(),
                )
            }
        }
    }
    let mesh = Mesh::from_env()?;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    println!("listening on {}", listener.local_addr()?);
    let routes = tonic::service::Routes::new(GreeterServer::new(Hello { version }));
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("draining");
    };
    mesh_tonic::serve(
        &mesh,
        listener,
        routes,
        ServeOptions::new("greeter"),
        shutdown,
    )
    .await?;
    Ok(())
}
