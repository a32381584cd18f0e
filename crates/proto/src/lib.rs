//! Generated code for the `convoy.v1` gRPC contract in `proto/`.
//!
//! This is the only crate that depends on prost. Client stubs sit behind the `client` feature and
//! server stubs behind `server`, so the agent never compiles server code.

#![allow(clippy::all, missing_docs)]

/// The `convoy.v1` package.
pub mod v1 {
    tonic::include_proto!("convoy.v1");
}

impl v1::Health {
    /// The name an app's health is stored and shown under: `unknown`, `checking`, `healthy`,
    /// `unhealthy`, `no-check`. The one mapping between the wire enum and text.
    pub fn name(self) -> &'static str {
        match self {
            v1::Health::Unknown => "unknown",
            v1::Health::Checking => "checking",
            v1::Health::Healthy => "healthy",
            v1::Health::Unhealthy => "unhealthy",
            v1::Health::None => "no-check",
        }
    }

    /// The health [`Self::name`] gives `name`; anything else is `Unknown`.
    pub fn from_name(name: &str) -> Self {
        [v1::Health::Checking, v1::Health::Healthy, v1::Health::Unhealthy, v1::Health::None]
            .into_iter()
            .find(|h| h.name() == name)
            .unwrap_or(v1::Health::Unknown)
    }

    /// The health in a message's `health` field; an unknown number is `Unknown`.
    pub fn from_wire(value: i32) -> Self {
        v1::Health::try_from(value).unwrap_or(v1::Health::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::v1::Health;

    #[test]
    fn health_names_round_trip() {
        for h in [Health::Unknown, Health::Checking, Health::Healthy, Health::Unhealthy, Health::None] {
            assert_eq!(Health::from_name(h.name()), h);
            assert_eq!(Health::from_wire(h as i32), h);
        }
        assert_eq!(Health::from_name("bogus"), Health::Unknown);
        assert_eq!(Health::from_wire(99), Health::Unknown);
    }
}
