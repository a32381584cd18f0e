//! `convoy release …`: build, sign, verify and inspect bundles offline; push, list and remove
//! them on the controller.

mod build;
mod inspect;
mod list;
mod push;
mod rm;
mod sign;
mod verify;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Pack and sign a release directory (it must contain convoy.toml).
    Build(build::Args),
    /// Check a bundle offline: signatures, digests, every file.
    Verify(verify::Args),
    /// Show a bundle's manifest (without verifying it).
    Inspect(inspect::Args),
    /// Add a signature to a bundle.
    Sign(sign::Args),
    /// Upload a bundle to the controller.
    Push(push::Args),
    /// List the controller's releases.
    List(list::Args),
    /// Remove a release nobody runs or keeps.
    Rm(rm::Args),
}

pub async fn run(config: &super::Globals, cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Build(a) => blocking(move || build::run(a)).await,
        Command::Verify(a) => blocking(move || verify::run(a)).await,
        Command::Inspect(a) => inspect::run(a),
        Command::Sign(a) => blocking(move || sign::run(a)).await,
        Command::Push(a) => push::run(config, a).await,
        Command::List(a) => list::run(config, a).await,
        Command::Rm(a) => rm::run(config, a).await,
    }
}

async fn blocking(f: impl FnOnce() -> anyhow::Result<()> + Send + 'static) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(f).await?
}

/// Splits `APP@VERSION`.
pub(crate) fn parse_release(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('@') {
        Some((a, v)) if !a.is_empty() && !v.is_empty() => Ok((a.to_owned(), v.to_owned())),
        _ => anyhow::bail!("{s:?} is not APP@VERSION"),
    }
}

pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
