//! `convoy status`: per app, environment and region, the desired release, agents per actual release,
//! unhealthy, offline, and drift (agents not running what they should).

use convoy_proto::v1 as pb;

use super::Output;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

pub async fn run(config: &super::Globals, a: Args) -> anyhow::Result<()> {
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let status = client.status(pb::StatusRequest {}).await.map_err(super::status_error)?.into_inner();
    let status = super::json::status(status);
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let mut rows = vec![
        ["APP", "ENV", "REGION", "DESIRED", "RUNNING", "UNHEALTHY", "OFFLINE", "DRIFT"].map(String::from)
    ];
    for (app, envs) in status {
        for (env, regions) in envs {
            for (region, r) in regions {
                let running: Vec<String> = r.running.iter().map(|(ver, n)| format!("{ver}×{n}")).collect();
                rows.push([
                    app.clone(),
                    env.clone(),
                    region,
                    list(&r.desired),
                    running.join(" "),
                    list(&r.unhealthy),
                    list(&r.offline),
                    list(&r.drift),
                ]);
            }
        }
    }
    print!("{}", super::agents::table(&rows));
    Ok(())
}
