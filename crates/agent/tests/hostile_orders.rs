//! Hostile orders, each refused at the agent's boundary with the field that was wrong, and
//! never a byte changed outside the scratch area: a canary directory next to the data dir stays
//! byte-for-byte the same and the data dir gets no new app entries.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use convoy_proto::v1 as pb;
use pb::OrderOutcome;
use support::*;

/// An app whose release logs a line on activation, so a legitimate Logs order has something
/// to return.
const SHOP_TOML: &str = "[hooks]\npost_activate = [\"sh\", \"-c\", \"echo hello from shop\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_orders_are_refused_with_the_field_and_change_nothing() {
    let env = Env::new();
    let exec = env.open(env.config(&[&env.key])).await;
    env.deploy(&exec, &env.key, "shop", "1.0.0", SHOP_TOML, &[]).await;
    // The hook's output reaches its log shortly after the hook ends.
    let log = env.data.join("apps/shop/logs/1.0.0.log");
    eventually("the hook's output is in its log", Duration::from_secs(20), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.ends_with("hello from shop\n"))
    })
    .await;
    let apps = env.data.join("apps");
    let data_before = snapshot(&apps);
    let cache_before = snapshot(&env.data.join("cache"));

    let canary = env.canary.to_str().unwrap().to_owned();
    let digest = "0".repeat(64);
    let long_version = format!("1.0.0-{}", "a".repeat(100));
    let huge = "x".repeat(1 << 20);
    let long_app = "a".repeat(65);
    // Relative to `apps/<app>/releases/`, this is the canary.
    let up_version = "../../../../canary";
    let up_version_named = "../../../../canary/1.0.0";
    let up_app = "../../canary";

    let mut cases: Vec<(String, Option<pb::order::Kind>, u64, &str)> = Vec::new();
    let mut case = |name: &str, kind: Option<pb::order::Kind>, field: &'static str| {
        cases.push((name.to_owned(), kind, env.next_seq(), field));
    };
    // App names, in every kind of order.
    for (what, app) in [
        ("absolute", canary.as_str()),
        ("dot-dot", up_app),
        ("dot-dot short", ".."),
        ("empty", ""),
        ("oversized", long_app.as_str()),
        ("huge", huge.as_str()),
        ("slash inside", "shop/../../x"),
        ("uppercase", "Shop"),
    ] {
        case(&format!("install app {what}"), Some(install(app, "1.0.0", &digest)), "app");
        case(&format!("activate app {what}"), Some(activate(app, "1.0.0", 0)), "app");
        case(&format!("rollback app {what}"), Some(rollback(app, "1.0.0", "", "r")), "app");
        case(&format!("logs app {what}"), Some(logs(app, 10)), "app");
    }
    // Versions.
    for (what, v) in [
        ("absolute", canary.as_str()),
        ("dot-dot to the canary", up_version),
        ("dot-dot to a version-named dir", up_version_named),
        ("empty", ""),
        ("oversized", long_version.as_str()),
        ("huge", huge.as_str()),
        ("not semver", "1.0"),
        ("trailing newline", "1.0.0\n"),
    ] {
        case(&format!("install version {what}"), Some(install("shop", v, &digest)), "version");
        case(&format!("activate version {what}"), Some(activate("shop", v, 0)), "version");
        case(&format!("rollback from {what}"), Some(rollback("shop", v, "", "r")), "from_version");
        // An empty `to_version` means "the default target", not a bad one.
        if !v.is_empty() {
            case(&format!("rollback to {what}"), Some(rollback("shop", "1.0.0", v, "r")), "to_version");
        }
    }
    // Digests.
    for (what, d) in [
        ("uppercase", "A".repeat(64)),
        ("mixed case", format!("{}F", "a".repeat(63))),
        ("short", "abc123".to_owned()),
        ("long", "a".repeat(65)),
        ("traversal", "../x".to_owned()),
        ("traversal of digest length", format!("../../canary/{}", "a".repeat(51))),
        ("empty", String::new()),
    ] {
        case(&format!("install digest {what}"), Some(install("shop", "2.0.0", &d)), "digest");
    }
    // Kinds, bounds.
    case("no kind (an unknown kind on the wire)", None, "kind");
    case("health deadline u32::MAX", Some(activate("shop", "1.0.0", u32::MAX)), "health_deadline_secs");
    case(
        "health deadline a second over a day",
        Some(activate("shop", "1.0.0", 24 * 3600 + 1)),
        "health_deadline_secs",
    );
    case("log lines u32::MAX", Some(logs("shop", u32::MAX)), "lines");
    case("log lines over the maximum", Some(logs("shop", 10_001)), "lines");
    case("rollback reason over 1024 bytes", Some(rollback("shop", "1.0.0", "", &"r".repeat(1025))), "reason");
    case("rollback reason of 1 MiB", Some(rollback("shop", "1.0.0", "", &huge)), "reason");
    // Sequence number zero, with an otherwise valid order.
    cases.push(("seq 0".into(), Some(activate("shop", "1.0.0", 0)), 0, "seq"));
    // Numbers that would make every later order stale: the top half, and a jump past the bound.
    for seq in [u64::MAX, u64::MAX / 2] {
        cases.push((format!("seq {seq}"), Some(activate("shop", "1.0.0", 0)), seq, "seq"));
    }
    let applied = exec.last_seq();
    assert!(applied > 0, "the fixture applied orders before the hostile ones");
    let far = applied + convoy_agent::MAX_SEQ_JUMP + 1;
    cases.push(("seq past the jump bound".into(), Some(activate("shop", "1.0.0", 0)), far, "seq"));

    let last_seq = exec.last_seq();
    for (name, kind, seq, field) in cases {
        let r = submit(&exec, pb::Order { seq, kind }).await;
        assert_eq!(
            (outcome(&r), r.field.as_str()),
            (OrderOutcome::Refused, field),
            "{name}: {:?} field {:?}: {}",
            outcome(&r),
            r.field,
            r.message
        );
        assert!(!r.message.is_empty(), "{name}: a refusal says why");
        assert!(
            r.message.len() < 1024,
            "{name}: hostile input is not echoed in full ({} bytes)",
            r.message.len()
        );
        assert_eq!(r.agent_last_seq, last_seq, "{name}: a refused order moved the sequence number");
        assert_eq!(exec.last_seq(), last_seq, "{name}: a refused order was admitted");
        env.assert_canary_unchanged();
        assert_same(&data_before, &snapshot(&apps), &format!("{name}: the data dir's apps"));
        assert_same(
            &cache_before,
            &snapshot(&env.data.join("cache")),
            &format!("{name}: the download cache"),
        );
        assert_eq!(current(&env.data, "shop").as_deref(), Some("1.0.0"), "{name}");
    }
    env.finish(exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_do_not_follow_links_out_of_the_data_dir() {
    let env = Env::new();
    let exec = env.open(env.config(&[&env.key])).await;
    env.deploy(&exec, &env.key, "shop", "1.0.0", SHOP_TOML, &[]).await;

    // The legitimate read works and returns the release's own output.
    let r = env.order(&exec, logs("shop", 10)).await;
    expect(&r, OrderOutcome::Applied, "");
    assert!(r.output.contains("hello from shop"), "{:?}", r.output);

    // `apps/shop/logs` replaced by a link to the canary, which holds a `1.0.0.log`.
    let logs_dir = env.data.join("apps/shop/logs");
    std::fs::remove_dir_all(&logs_dir).unwrap();
    std::os::unix::fs::symlink(&env.canary, &logs_dir).unwrap();
    assert_eq!(current(&env.data, "shop").as_deref(), Some("1.0.0"));
    let r = env.order(&exec, logs("shop", 100)).await;
    expect(&r, OrderOutcome::Failed, "");
    assert!(r.output.is_empty(), "canary content returned: {:?}", r.output);
    assert!(!r.message.contains("CANARY"), "{}", r.message);
    assert!(r.message.contains("symbolic link"), "{}", r.message);

    // A whole app directory that is a link to the canary (whose `current` points at `1.0.0`).
    std::os::unix::fs::symlink(&env.canary, env.data.join("apps/evil")).unwrap();
    assert_eq!(current(&env.data, "evil").as_deref(), Some("1.0.0"));
    let r = env.order(&exec, logs("evil", 100)).await;
    expect(&r, OrderOutcome::Failed, "");
    assert!(r.output.is_empty(), "canary content returned: {:?}", r.output);
    assert!(!r.message.contains("CANARY"), "{}", r.message);

    // An app without a current release is refused naming the app.
    let r = env.order(&exec, logs("nothing-here", 10)).await;
    expect(&r, OrderOutcome::Refused, "app");
    assert!(!env.data.join("apps/nothing-here").exists());

    env.finish(exec).await;
}
