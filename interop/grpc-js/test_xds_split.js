// @grpc/grpc-js-xds 1.14, a second proxyless xDS client this project did not write, against
// `meshctl serve`: an `xds:///` channel must follow a 90/10 split between two versions, then
// a 50/50 split after the Istio YAML is rewritten, with no failed call.
//
// The YAML is written as Istio's documentation writes a canary: a ServiceEntry, a
// DestinationRule with subsets v1 and v2 and no TLS settings, and a VirtualService with
// weights; no PeerAuthentication. grpc-js needs `node.locality` in its bootstrap.
//
// Run: npm ci && MESHCTL=../../target/debug/meshctl node test_xds_split.js
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn } = require('child_process');
const readline = require('readline');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const HOST = 'greeter.default.svc.cluster.local';
const TARGET = `xds:///${HOST}:50051`;

const yaml = (v1, v2, w1, w2) => `\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: greeter, namespace: default}
spec:
  hosts: [${HOST}]
  ports: [{number: 50051, name: grpc, protocol: GRPC}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, ports: {grpc: ${v1}}, labels: {version: v1}}
  - {address: 127.0.0.1, ports: {grpc: ${v2}}, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: greeter, namespace: default}
spec:
  host: ${HOST}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: greeter, namespace: default}
spec:
  hosts: [${HOST}]
  http:
  - route:
    - {destination: {host: ${HOST}, subset: v1}, weight: ${w1}}
    - {destination: {host: ${HOST}, subset: v2}, weight: ${w2}}
`;

const proto = grpc.loadPackageDefinition(
  protoLoader.loadSync(path.join(__dirname, 'helloworld.proto')),
).helloworld;

function backend(version) {
  const server = new grpc.Server();
  server.addService(proto.Greeter.service, {
    SayHello: (call, cb) => cb(null, { message: version }),
  });
  return new Promise((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, port) =>
      e ? reject(e) : resolve({ server, port }),
    ),
  );
}

function call(client) {
  return new Promise((resolve) => {
    const deadline = new Date(Date.now() + 5000);
    client.SayHello({ name: 'mesh' }, { deadline }, (err, reply) =>
      resolve(err ? { err } : { version: reply.message }),
    );
  });
}

async function measure(client, n, failures) {
  let v2 = 0;
  for (let i = 0; i < n; i++) {
    const r = await call(client);
    if (r.err) {
      failures.push(`${r.err.code}: ${r.err.details}`);
    } else if (r.version === 'v2') {
      v2++;
    }
  }
  return v2 / n;
}

async function main() {
  const meshctl = process.env.MESHCTL || 'target/debug/meshctl';
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'mesh-grpc-js-'));
  const [b1, b2] = await Promise.all([backend('v1'), backend('v2')]);
  const config = path.join(work, 'canary.yaml');
  fs.writeFileSync(config, yaml(b1.port, b2.port, 90, 10));

  const server = spawn(meshctl, ['serve', '--listen', '127.0.0.1:0', '--config', config], {
    stdio: ['ignore', 'pipe', fs.openSync(path.join(work, 'meshctl.log'), 'w')],
  });
  const results = [];
  let client;
  try {
    const first = await new Promise((resolve, reject) => {
      const rl = readline.createInterface({ input: server.stdout });
      rl.once('line', resolve);
      server.once('exit', (code) => reject(new Error(`meshctl exited ${code}`)));
    });
    if (!first.startsWith('listening on ')) throw new Error(first);
    const addr = first.trim().split(' ').pop();

    const bootstrap = {
      xds_servers: [
        { server_uri: addr, channel_creds: [{ type: 'insecure' }], server_features: ['xds_v3'] },
      ],
      node: { id: 'grpc-js-interop', locality: {}, metadata: { GENERATOR: 'grpc' } },
    };
    const bootstrapPath = path.join(work, 'bootstrap.json');
    fs.writeFileSync(bootstrapPath, JSON.stringify(bootstrap));
    process.env.GRPC_XDS_BOOTSTRAP = bootstrapPath;
    require('@grpc/grpc-js-xds').register();

    client = new proto.Greeter(TARGET, grpc.credentials.createInsecure());
    const failures = [];
    const share90 = await measure(client, 1000, failures);
    console.log(`grpc-js: v2 share at 90/10 = ${share90.toFixed(3)} over 1000 calls`);
    results.push(['90/10 split followed', Math.abs(share90 - 0.1) <= 0.03]);

    fs.writeFileSync(config, yaml(b1.port, b2.port, 50, 50));
    // Calls keep going while the update arrives; none may fail.
    let share50 = 0;
    for (let round = 0; round < 50; round++) {
      share50 = await measure(client, 200, failures);
      if (share50 > 0.3) break;
    }
    share50 = await measure(client, 1000, failures);
    console.log(`grpc-js: v2 share at 50/50 = ${share50.toFixed(3)} over 1000 calls`);
    results.push(['50/50 split followed after a hot reload', Math.abs(share50 - 0.5) <= 0.05]);
    console.log(`grpc-js: ${failures.length} failed calls ${failures.slice(0, 3).join('; ')}`);
    results.push(['no failed call', failures.length === 0]);
  } catch (e) {
    console.log(`grpc-js: ${e.stack || e}`);
    results.push(['ran', false]);
  } finally {
    if (client) client.close();
    server.kill();
    b1.server.forceShutdown();
    b2.server.forceShutdown();
  }
  for (const [name, ok] of results) console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}`);
  const failed = results.filter(([, ok]) => !ok).length;
  console.log(`${results.length - failed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main();
