//! The bottom layer of the workspace: small pieces of shared infrastructure that every other
//! crate may use and that depend on nothing of Convoy's. Synchronous, no tokio.
//!
//! - [`files`]: crash-safe file writes (temporary sibling, fsync, rename, fsync the directory).
//! - [`record`]: the versioned JSON envelope every stored record is wrapped in.
//! - [`pairs`]: `KEY=VALUE` arguments (labels, variables, selectors) into a map.
//! - `logging` (feature `logging`, for the binaries): how `convoy` and `convoy-agent` log.

#![forbid(unsafe_code)]

pub mod files;
#[cfg(feature = "logging")]
pub mod logging;
pub mod pairs;
pub mod record;
