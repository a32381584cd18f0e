use std::path::PathBuf;

use convoy_bundle::{Limits, TrustStore};

#[derive(clap::Args, Debug)]
pub struct Args {
    file: PathBuf,
    /// A trusted public key; repeatable.
    #[arg(long = "trust", required = true)]
    trust: Vec<PathBuf>,
    /// Valid signatures needed from distinct trusted keys.
    #[arg(long, default_value_t = 1)]
    require_signatures: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let trust = TrustStore::load(&a.trust, a.require_signatures)?;
    let v = convoy_bundle::verify(&a.file, Some(&trust), &Limits::default())?;
    let signers: Vec<String> = v.signers.iter().map(ToString::to_string).collect();
    println!("ok: {} verified, signed by {}", v.manifest.release_name(), signers.join(", "));
    Ok(())
}
