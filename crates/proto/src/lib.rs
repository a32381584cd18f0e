//! Generated code for the `convoy.v1` gRPC contract in `proto/`.
//!
//! This is the only crate that depends on prost. Client stubs sit behind the `client` feature and
//! server stubs behind `server`, so the agent never compiles server code.

#![allow(clippy::all, missing_docs)]

/// The `convoy.v1` package.
pub mod v1 {
    tonic::include_proto!("convoy.v1");
}
