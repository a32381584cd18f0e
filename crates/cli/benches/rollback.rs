//! Rollback speed on one agent:
//! - the switch alone: the atomic `current` swap plus the journal writes around it;
//! - end to end: rollback order sent → previous release serving and healthy, for a service that
//!   starts in well under 50 ms (the demo HTTP service with a 10 ms health interval).
//!
//!     cargo bench -p convoy-controller --bench rollback
//!
//! With `BENCH_TRACE=1` it prints the agent's activation steps as spans with their durations.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use convoy_agent::state::{Activation, ActivationKind, State, Step};
use convoy_agent::Layout;
use convoy_bundle::{BuildOptions, SecretKey};
use convoy_controller::logic::OrderKind;
use convoy_testkit::{write_demo_release, LocalAgent, LocalController, LocalOptions};

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    println!(
        "{name:<34} n={:<4} mean {:>8.2} ms  p50 {:>8.2} ms  p99 {:>8.2} ms",
        v.len(),
        mean.as_secs_f64() * 1e3,
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
}

fn switch_alone(dir: &Path) {
    let layout = Layout::new(dir);
    for v in ["1.0.0", "2.0.0"] {
        std::fs::create_dir_all(layout.release_dir("app", v)).unwrap();
    }
    let state = State::open(&layout.state_dir()).unwrap();
    let mut times = Vec::new();
    for i in 0..200 {
        let (from, to) = if i % 2 == 0 { ("1.0.0", "2.0.0") } else { ("2.0.0", "1.0.0") };
        let t = Instant::now();
        let mut a = Activation {
            app: "app".into(),
            from: Some(from.into()),
            to: to.into(),
            kind: ActivationKind::Rollback,
            step: Step::Started,
            health_deadline_ms: 1000,
        };
        state.put_activation(&a).unwrap();
        layout.swap_current("app", to).unwrap();
        a.step = Step::Switched;
        state.put_activation(&a).unwrap();
        state.clear_activation("app").unwrap();
        times.push(t.elapsed());
    }
    summary("switch (symlink swap + journal)", times);
}

async fn end_to_end(dir: &Path) {
    let ctl = LocalController::start(&dir.join("ctl"), LocalOptions::default()).await.unwrap();
    let key = SecretKey::generate();
    let fast = "\n";
    let mut digests = Vec::new();
    for v in ["1.0.0", "1.1.0"] {
        let src = dir.join(format!("src-{v}"));
        write_demo_release(&src, Path::new(env!("CARGO_BIN_EXE_convoy")), v, "healthy", fast).unwrap();
        // A tight health check: the measurement is the switch and restart, not the probe period.
        let toml = std::fs::read_to_string(src.join("convoy.toml")).unwrap();
        let toml = toml
            .replace("interval = \"100ms\"", "interval = \"5ms\"")
            .replace("successes = 2", "successes = 1");
        std::fs::write(src.join("convoy.toml"), toml).unwrap();
        let out = dir.join(format!("{v}.bundle"));
        let opts = BuildOptions {
            app: "shop-api".into(),
            version: v.into(),
            created_at: 0,
            target: None,
            zstd_level: 1,
        };
        convoy_bundle::build(&src, &opts, &key, &out).unwrap();
        digests.push((v, ctl.push_file(&out).await.unwrap().digest));
    }
    let agent_dir = dir.join("a1");
    ctl.enroll(&agent_dir, "a1", "eu-west").await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let public = key.public();
    let mut agent = LocalAgent::spawn_with(&agent_dir, |c| {
        c.trust = vec![public];
        c.vars.insert("PORT".into(), port.to_string());
    })
    .unwrap();
    agent.wait_for(Duration::from_secs(20), |s| s.connected).await.unwrap();
    let c = &ctl.controller;
    let long = Duration::from_secs(30);
    for (v, d) in &digests {
        let o = c
            .orders()
            .send_order(
                "a1",
                OrderKind::Install { app: "shop-api".into(), version: v.to_string(), digest: d.clone() },
                long,
            )
            .await
            .unwrap();
        assert!(o.is_done(), "{}", o.message);
        let o = c
            .orders()
            .send_order(
                "a1",
                OrderKind::Activate { app: "shop-api".into(), version: v.to_string(), health_deadline: None },
                long,
            )
            .await
            .unwrap();
        assert!(o.is_done(), "{}", o.message);
    }
    // Rollbacks only go back, so the bench flips between the last two releases by naming both.
    let mut pair = [digests[digests.len() - 1].0.to_string(), digests[digests.len() - 2].0.to_string()];
    let mut times = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let kind = OrderKind::Rollback {
            app: "shop-api".into(),
            from: pair[0].clone(),
            to: Some(pair[1].clone()),
            reason: "bench".into(),
        };
        pair.swap(0, 1);
        let o = c.orders().send_order("a1", kind, long).await.unwrap();
        times.push(t.elapsed());
        assert!(o.is_done(), "{}", o.message);
    }
    summary("rollback order → serving healthy", times);
    agent.stop().await.unwrap();
    ctl.stop().await.unwrap();
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    switch_alone(&tmp.path().join("switch"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    if std::env::var_os("BENCH_TRACE").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter("convoy_agent=debug")
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .init();
    }
    rt.block_on(end_to_end(tmp.path()));
}
