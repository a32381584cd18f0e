use convoy_proto::v1 as pb;
use serde::Serialize;

use crate::cli::Output;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    app: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Serialize)]
struct ReleaseJson {
    app: String,
    version: String,
    digest: String,
    size: u64,
    unpacked_size: u64,
    files: u32,
    created_at: i64,
    pushed_at: i64,
    pushed_by: String,
    signers: Vec<String>,
}

pub async fn run(config: &crate::cli::Globals, a: Args) -> anyhow::Result<()> {
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let list = client
        .list_releases(pb::ListReleasesRequest { app: a.app.unwrap_or_default() })
        .await
        .map_err(crate::cli::status_error)?
        .into_inner()
        .releases;
    if a.output == Output::Json {
        let v: Vec<ReleaseJson> = list
            .into_iter()
            .map(|r| ReleaseJson {
                app: r.app,
                version: r.version,
                digest: r.digest,
                size: r.size,
                unpacked_size: r.unpacked_size,
                files: r.files,
                created_at: r.created_at_unix,
                pushed_at: r.pushed_at_unix,
                pushed_by: r.pushed_by,
                signers: r.signers,
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut rows = vec![["RELEASE", "SHA256", "SIZE", "FILES", "PUSHED", "BY"].map(String::from)];
    for r in list {
        rows.push([
            format!("{}@{}", r.app, r.version),
            r.digest[..16.min(r.digest.len())].to_string(),
            super::human_bytes(r.size),
            r.files.to_string(),
            crate::cli::fmt_time(r.pushed_at_unix),
            r.pushed_by,
        ]);
    }
    print!("{}", crate::cli::agents::table(&rows));
    Ok(())
}
