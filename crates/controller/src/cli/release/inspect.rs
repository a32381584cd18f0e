use std::path::PathBuf;

use crate::cli::Output;

#[derive(clap::Args, Debug)]
pub struct Args {
    file: PathBuf,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(&a.file).map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
    let header = convoy_bundle::read_header(&mut f, 64 << 20)?;
    let m = header.manifest()?;
    if a.output == Output::Json {
        let mut v: serde_json::Value = serde_json::from_slice(&header.manifest_bytes)?;
        v["signatures"] = header.signatures.iter().map(|s| s.key_id.to_string()).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("release     {}", m.release_name());
    println!("created     {}", crate::cli::fmt_time(m.created_at));
    println!("payload     {} sha256:{}", super::human_bytes(m.payload.size), m.payload.sha256);
    println!("unpacked    {} in {} entries", super::human_bytes(m.unpacked_size), m.files.len());
    let sigs: Vec<String> = header.signatures.iter().map(|s| s.key_id.to_string()).collect();
    println!(
        "signatures  {} (not verified; use `convoy release verify`)",
        if sigs.is_empty() { "none".into() } else { sigs.join(", ") }
    );
    if let Some(s) = &m.config.service {
        println!("service     {}", s.command.join(" "));
    }
    if let Some(h) = &m.config.health {
        println!(
            "health      {:?} every {:?}, {} successes within {:?}",
            h.check(),
            h.interval,
            h.successes,
            h.deadline
        );
    }
    if let Some(t) = &m.target {
        println!("target      os={:?} arch={:?} labels={:?}", t.os, t.arch, t.labels);
    }
    Ok(())
}
