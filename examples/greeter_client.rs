//! # greeter-client: a generated tonic client over the mesh
//!
//! ```sh
//! GRPC_XDS_BOOTSTRAP=examples/greeter-client-bootstrap.json \
//!     cargo run -p mesh-examples --bin greeter-client -- --requests 5
//! ```
//!
//! Connects to `xds:///greeter.default.svc.cluster.local:50051` through a `MeshChannel`
//! (routing, retries, balancing, mTLS with the bootstrap's certificates, metrics, traces)
//! and calls `SayHello`. Exits non-zero if any call fails.
//!
//! Options: `--requests N` (default 5), `--target xds:///NAME:PORT`, `--name NAME`.

use std::time::Duration;

use mesh_examples::helloworld::greeter_client::GreeterClient;
use mesh_examples::helloworld::HelloRequest;
use mesh_tonic::Mesh;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[tokio::main]
async fn main() -> Result<()> {
    let mut requests = 5u32;
    let mut target = "xds:///greeter.default.svc.cluster.local:50051".to_owned();
    let mut name = "mesh".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--requests" => {
                requests = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or("--requests needs a number")?
            }
            "--target" => target = args.next().ok_or("--target needs a value")?,
            "--name" => name = args.next().ok_or("--name needs a value")?,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let mesh = Mesh::from_env()?;
    let mut client = GreeterClient::new(mesh.channel(&target).await?);
    let mut failed = 0;
    for _ in 0..requests {
        let mut req = tonic::Request::new(HelloRequest { name: name.clone() });
        req.set_timeout(Duration::from_secs(5));
        match client.say_hello(req).await {
            Ok(r) => println!("{}", r.into_inner().message),
            Err(s) => {
                failed += 1;
                println!("error: {:?}: {}", s.code(), s.message());
            }
        }
    }
    if failed > 0 {
        return Err(format!("{failed} of {requests} calls failed").into());
    }
    Ok(())
}
