//! Fleet-scale control plane: N in-process agents (10, 100, 500) on this machine, a small bundle
//! with no service (so the numbers are Convoy's own overhead, not an app's start-up).
//!
//!     cargo bench -p convoy-controller --bench fleet [-- 10 100 500]
//!
//! Prints the time for a full rollout (pre-staging plus waves, no bake), the controller's time
//! per wave, and a fleet rollback: total, and per agent p50/p99 from order sent to the agent
//! reporting the previous release active.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use convoy_bundle::{BuildOptions, SecretKey};
use convoy_controller::logic::rollouts::{RolloutSpec, RolloutState};
use convoy_controller::logic::Target;
use convoy_testkit::{LocalAgent, LocalController, LocalOptions};

async fn run(n: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = LocalController::start(&tmp.path().join("ctl"), LocalOptions::default()).await.unwrap();
    let key = SecretKey::generate();
    for v in ["1.0.0", "1.1.0"] {
        let src = tmp.path().join(format!("src-{v}"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("convoy.toml"), "").unwrap();
        std::fs::write(src.join("index.html"), format!("release {v}\n")).unwrap();
        let out = tmp.path().join(format!("{v}.bundle"));
        let opts = BuildOptions {
            app: "site".into(),
            version: v.into(),
            created_at: 0,
            target: None,
            zstd_level: 1,
        };
        convoy_bundle::build(&src, &opts, &key, &out).unwrap();
        ctl.push_file(&out).await.unwrap();
    }
    let regions = ["ap-south", "eu-west", "us-east"];
    let t = Instant::now();
    let mut agents = Vec::new();
    for i in 0..n {
        let id = format!("a{i:04}");
        let dir = tmp.path().join(&id);
        ctl.enroll(&dir, &id, regions[i % 3]).await.unwrap();
        let public = key.public();
        agents.push(LocalAgent::spawn_with(&dir, |c| c.trust = vec![public]).unwrap());
    }
    for a in &mut agents {
        a.wait_for(Duration::from_secs(120), |s| s.connected).await.unwrap();
    }
    println!("n={n}: {n} agents enrolled and connected in {:.2} s", t.elapsed().as_secs_f64());
    let c = &ctl.controller;
    let mut last_waves = 0;
    for v in ["1.0.0", "1.1.0"] {
        let t = Instant::now();
        let spec = RolloutSpec { max_parallel: 64, ..RolloutSpec::new("site", v) };
        let id = c.rollouts().deploy(spec, "admin/bench").await.unwrap();
        let r = loop {
            let r = c.rollouts().rollout(Some(id.clone())).await.unwrap();
            if r.state.is_final() {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(r.state, RolloutState::Completed, "{:?}", r.events);
        last_waves = r.waves.len();
        let took = t.elapsed();
        println!(
            "n={n}: rollout of {v} in {} waves: {:.2} s total, {:.0} ms per wave",
            r.waves.len(),
            took.as_secs_f64(),
            took.as_secs_f64() * 1e3 / r.waves.len() as f64
        );
    }
    let _ = last_waves;
    let (results, total) =
        c.rollouts().rollback("site", &Target::All.into(), None, None, "bench", "admin/bench").await.unwrap();
    let mut per: Vec<Duration> = results
        .iter()
        .map(|(_, r, d)| {
            assert!(r.as_ref().is_ok_and(|o| o.is_done()), "{r:?}");
            *d
        })
        .collect();
    per.sort();
    let pct = |p: f64| per[((per.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "n={n}: fleet rollback of {} agents: {:.0} ms total; per agent p50 {:.1} ms, p99 {:.1} ms",
        per.len(),
        total.as_secs_f64() * 1e3,
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
    for a in agents {
        a.stop().await.unwrap();
    }
    ctl.stop().await.unwrap();
}

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![10, 100, 500] } else { sizes };
    let rt = tokio::runtime::Runtime::new().unwrap();
    for n in sizes {
        rt.block_on(run(n));
    }
}
