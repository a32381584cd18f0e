use convoy_proto::v1 as pb;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// APP@VERSION
    release: String,
}

pub async fn run(config: &crate::cli::Globals, a: Args) -> anyhow::Result<()> {
    let (app, version) = super::parse_release(&a.release)?;
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    client
        .remove_release(pb::RemoveReleaseRequest { app: app.clone(), version: version.clone() })
        .await
        .map_err(crate::cli::status_error)?;
    println!("removed {app}@{version}");
    Ok(())
}
