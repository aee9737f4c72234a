//! Shared parts of the examples: the `helloworld.Greeter` service of the gRPC examples.

pub mod helloworld;
