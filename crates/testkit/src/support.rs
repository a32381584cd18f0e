//! Helpers the integration tests share. They panic with a message on failure, as a test
//! would.

use std::future::Future;
use std::time::Duration;

use convoy_pki::ClientIdentity;
use convoy_proto::v1 as pb;
use convoy_transport::DialOptions;
use tonic::transport::Channel;

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Dials `addr` trusting `ca_pem`, presenting `identity` if given.
pub async fn dial(addr: &str, ca_pem: &str, identity: Option<&ClientIdentity>) -> Result<Channel, String> {
    let tls = convoy_pki::client_config(ca_pem, identity).map_err(|e| e.to_string())?;
    convoy_transport::connect(addr, tls, &DialOptions::default()).await.map_err(|e| e.to_string())
}

/// The identity stored in an enrolled agent's data directory.
pub fn agent_identity(data_dir: &std::path::Path) -> ClientIdentity {
    let path = data_dir.join(convoy_agent::IDENTITY_FILE);
    let pem = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    ClientIdentity { cert_pem: pem.clone(), key_pem: pem }
}

pub fn hello(agent_id: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            agent_id: agent_id.into(),
            agent_version: "test".into(),
            region: String::new(),
            labels: Default::default(),
            releases: vec![],
            apps: vec![],
            last_order_seq: 0,
        })),
    }
}

/// Lists agents through the admin API.
pub async fn agents(ctl: &crate::LocalController) -> Vec<pb::AgentInfo> {
    let mut admin = ctl.admin().await.expect("an admin client");
    let mut list = admin
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .expect("listing agents")
        .into_inner()
        .agents;
    list.sort_by(|a, b| a.id.cmp(&b.id));
    list
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port on 127.0.0.1")
        .port()
}

/// `GET /` on the demo service, or None if nothing answers, for tests written synchronously:
/// [`crate::http_get_root`] on a thread of its own with its own runtime, so it works from
/// inside a test's runtime as well as outside one.
pub fn get(port: u16) -> Option<String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            rt.block_on(crate::http_get_root(port))
        })
        .join()
        .expect("the GET thread panicked")
    })
}

/// The `convoy-agent` binary next to `convoy` (pass `env!("CARGO_BIN_EXE_convoy")`). A test can
/// name only its own package's binaries; `cargo test --workspace` builds the agent's too.
pub fn agent_bin(convoy_exe: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(convoy_exe)
        .with_file_name(format!("convoy-agent{}", std::env::consts::EXE_SUFFIX));
    assert!(p.exists(), "{} is missing: run the suite with `cargo test --workspace`", p.display());
    p
}

/// Runs the `convoy` binary at `exe` as the controller's first admin: exit code, stdout, stderr.
pub async fn run_convoy(exe: &str, ctl: &crate::LocalController, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(exe)
        .arg("--config")
        .arg(&ctl.config.path)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {exe}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The controller's `convoy_orders_sent_total` counter, from a scrape of its metrics.
pub async fn orders_sent(ctl: &crate::LocalController) -> u64 {
    let url = format!("http://{}/metrics", ctl.http_addr);
    let client = crate::http_client().expect("an HTTP client");
    let body = client.get(&url, Duration::from_secs(10)).await.expect("a metrics scrape").body;
    body.lines()
        .find_map(|l| l.strip_prefix("convoy_orders_sent_total "))
        .unwrap_or_else(|| panic!("no orders counter in {body}"))
        .trim()
        .parse()
        .expect("a count")
}
