//! The Convoy controller: it holds the CA, the agent registry and (in later stages) releases and
//! rollouts, and serves agents and admins over mutual-TLS gRPC.
//!
//! Layers, top to bottom: [`cli`] (the `convoy` command), [`server`] (listeners and lifecycle),
//! [`grpc`] (wire translation and authorization by certificate identity), [`logic`] (decisions,
//! no tonic), [`store`] (sled). [`init`] creates a PKI and config; [`client`] is the admin's
//! connection to a controller.

#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod config;
pub mod grpc;
pub mod hooks;
pub mod http;
pub mod init;
pub mod logic;
pub mod metrics;
pub mod notify;
pub mod server;
pub mod store;
pub mod time;

/// Formats a Unix time for messages: `2026-11-29 14:31:39Z` (see [`time::fmt_time`]).
pub(crate) fn cli_time(unix: i64) -> String {
    time::fmt_time(unix)
}
