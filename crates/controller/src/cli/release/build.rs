use std::path::PathBuf;

use convoy_bundle::{BuildOptions, SecretKey, Target};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The release directory.
    dir: PathBuf,
    #[arg(long)]
    app: String,
    #[arg(long)]
    version: String,
    /// The ed25519 signing key (from `convoy keys generate`).
    #[arg(long)]
    key: PathBuf,
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Creation time, Unix seconds; defaults to SOURCE_DATE_EPOCH, then now. Fix it for
    /// reproducible builds.
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    created_at: Option<i64>,
    /// Only agents on this OS may install it (e.g. linux).
    #[arg(long)]
    os: Option<String>,
    /// Only agents on this architecture may install it (e.g. x86_64).
    #[arg(long)]
    arch: Option<String>,
    /// Only agents with this label may install it, KEY=VALUE; repeatable.
    #[arg(long = "target-label", value_name = "KEY=VALUE")]
    target_labels: Vec<String>,
    /// zstd compression level (1-19).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    level: i32,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let key = SecretKey::load(&a.key)?;
    let labels = convoy_base::pairs::parse_pairs("target label", &a.target_labels)?;
    let wanted = a.os.is_some() || a.arch.is_some() || !labels.is_empty();
    let target = wanted.then_some(Target { os: a.os, arch: a.arch, labels });
    let created_at = a.created_at.unwrap_or_else(crate::logic::now);
    let opts = BuildOptions { app: a.app, version: a.version, created_at, target, zstd_level: a.level };
    let m = convoy_bundle::build(&a.dir, &opts, &key, &a.output)?;
    println!("{}", a.output.display());
    eprintln!(
        "built {} ({} files, {} unpacked, {} compressed), signed by {}",
        m.release_name(),
        m.files.len(),
        super::human_bytes(m.unpacked_size),
        super::human_bytes(m.payload.size),
        key.public().id()
    );
    Ok(())
}
