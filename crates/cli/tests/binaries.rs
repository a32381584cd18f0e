//! End to end with the real `convoy` and `convoy-agent` binaries as child processes.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::eventually;

fn convoy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_convoy"))
}

fn agent_bin() -> PathBuf {
    common::agent_bin(env!("CARGO_BIN_EXE_convoy"))
}

/// `convoy-agent enroll` with the usual flags.
fn enroll(grpc: &str, token: &str, region: &str, id: &str, ca: &Path, dir: &Path) -> Command {
    let mut c = Command::new(agent_bin());
    c.args(["enroll", "--controller", grpc, "--token", token, "--region", region, "--id", id]);
    c.arg("--ca").arg(ca).arg("--data-dir").arg(dir);
    c
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    child.wait().unwrap()
}

/// Starts `convoy serve` on ephemeral ports; returns it and its gRPC and HTTP addresses.
fn start_server(config: &Path) -> (Killed, String, String) {
    let mut server = Killed(
        convoy()
            .arg("--config")
            .arg(config)
            .args(["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(server.0.stderr.take().unwrap()).lines();
    let (grpc, http) = loop {
        let line = lines.next().expect("controller exited before listening").unwrap();
        if let Some(rest) = line.strip_prefix("convoy listening grpc=") {
            let (g, h) = rest.split_once(" http=").unwrap();
            break (g.to_string(), h.to_string());
        }
    };
    // Keep draining the controller's log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (server, grpc, http)
}

#[test]
fn init_refuses_to_overwrite_and_leaves_files_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let out = run_ok(convoy().args(["init", "--data-dir"]).arg(&dir));
    assert!(out.trim().ends_with("convoy.toml"));
    let files = convoy_controller::init::init_files(&dir);
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "controller.key", "admin.key"] {
            let mode = std::fs::metadata(dir.join(key)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }
    let err = run_err(convoy().args(["init", "--data-dir"]).arg(&dir));
    assert!(err.contains("refusing to overwrite an existing PKI"), "{err}");
    let after: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert_eq!(before, after);
    // Even a single leftover file blocks a new PKI.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("ca.key"), "keep me").unwrap();
    let err = run_err(convoy().args(["init", "--data-dir"]).arg(&other));
    assert!(err.contains("ca.key"), "{err}");
    assert_eq!(std::fs::read_to_string(other.join("ca.key")).unwrap(), "keep me");
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);
}

#[test]
fn bad_cli_input_and_broken_config_give_specific_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = run_err(convoy().args(["token", "create", "--ttl", "soon"]));
    assert!(err.contains("--ttl"), "{err}");
    let missing = tmp.path().join("missing.toml");
    let err = run_err(convoy().arg("--config").arg(&missing).arg("agents"));
    assert!(err.contains("missing.toml"), "{err}");
    let broken = tmp.path().join("broken.toml");
    std::fs::write(&broken, "trust_domain = \"x\"\ncontroller = \"127.0.0.1:1\"\ngrpc_addr = \"everywhere\"\n[tls]\nca_cert = \"ca.pem\"\n").unwrap();
    let err = run_err(convoy().arg("--config").arg(&broken).arg("serve"));
    assert!(err.contains("grpc_addr"), "{err}");
    let err = run_err(
        convoy().args(["init", "--trust-domain", "Not Valid", "--data-dir"]).arg(tmp.path().join("x")),
    );
    assert!(err.contains("trust domain"), "{err}");
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn real_binaries_enroll_run_list_revoke_and_shut_down_gracefully() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    run_ok(convoy().args(["init", "--data-dir"]).arg(&pki));
    let config = pki.join("convoy.toml");

    let (mut server, grpc, http) = start_server(&config);
    let mut http_get = std::net::TcpStream::connect(&http).unwrap();
    http_get.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    http_get.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200") && body.ends_with("ok\n"), "{body}");

    let admin = |args: &[&str]| {
        let mut c = convoy();
        c.arg("--config").arg(&config).arg("--controller").arg(&grpc).args(args);
        c
    };
    let token = run_ok(&mut admin(&[
        "token",
        "create",
        "--region",
        "eu-west",
        "--ttl",
        "10m",
        "--label",
        "tier=edge",
    ]))
    .trim()
    .to_string();
    assert!(token.starts_with("cvt_"));
    let agent_dir = tmp.path().join("agent");
    // Labels come from the token; the agent's own are refused unless the token allows them.
    let err = run_err(
        enroll(&grpc, &token, "eu-west", "e2e-1", &pki.join("ca.pem"), &agent_dir)
            .args(["--label", "tier=payments"]),
    );
    assert!(err.contains("does not let the agent choose labels"), "{err}");
    let out = run_ok(&mut enroll(&grpc, &token, "eu-west", "e2e-1", &pki.join("ca.pem"), &agent_dir));
    assert!(out.contains("enrolled as e2e-1"), "{out}");
    // The token was single-use.
    let err = run_err(&mut enroll(
        &grpc,
        &token,
        "eu-west",
        "e2e-2",
        &pki.join("ca.pem"),
        &tmp.path().join("agent2"),
    ));
    assert!(err.contains("already used"), "{err}");

    let mut agent = Killed(
        Command::new(agent_bin())
            .arg("run")
            .arg("--data-dir")
            .arg(&agent_dir)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let listed: serde_json::Value =
        rt.block_on(eventually(Duration::from_secs(30), "agent online in `convoy agents -o json`", || {
            let out = admin(&["agents", "--region", "eu-west", "-o", "json"]).output().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let online = v[0]["online"].as_bool() == Some(true);
            async move { online.then_some(v) }
        }));
    assert_eq!(listed[0]["id"], "e2e-1");
    assert_eq!(listed[0]["labels"]["tier"], "edge");
    let table = run_ok(&mut admin(&["agents"]));
    assert!(table.lines().any(|l| l.starts_with("e2e-1") && l.contains("online")), "{table}");
    let none = run_ok(&mut admin(&["agents", "--region", "us-east", "-o", "json"]));
    assert_eq!(none.trim(), "[]");

    // A second admin, with a key made on "their" machine; then revoked.
    let ops_dir = tmp.path().join("ops");
    run_ok(&mut admin(&["admins", "add", "ops", "--role", "viewer", "-o", ops_dir.to_str().unwrap()]));
    let ops = |args: &[&str]| {
        let mut c = convoy();
        c.arg("--config").arg(ops_dir.join("convoy.toml")).arg("--controller").arg(&grpc).args(args);
        c
    };
    assert!(run_ok(&mut ops(&["agents"])).contains("e2e-1"));
    // A viewer reads but cannot create tokens; the refusal names both roles.
    let err = run_err(&mut ops(&["token", "create", "--region", "eu-west", "--ttl", "1h"]));
    assert!(err.contains("role viewer") && err.contains("needs role admin"), "{err}");
    let listed: serde_json::Value =
        serde_json::from_str(&run_ok(&mut admin(&["admins", "list", "-o", "json"]))).unwrap();
    let ops_entry = listed.as_array().unwrap().iter().find(|a| a["name"] == "ops").unwrap().clone();
    assert_eq!(ops_entry["role"], "viewer");
    assert_eq!(ops_entry["certs"][0]["state"], "active");
    let table = run_ok(&mut admin(&["admins", "list"]));
    assert!(
        table.lines().any(|l| l.starts_with("ops") && l.contains("viewer") && l.contains("active")),
        "{table}"
    );
    let err = run_err(&mut admin(&["admins", "revoke", "admin"]));
    assert!(err.contains("cannot revoke their own"), "{err}");
    run_ok(&mut admin(&["admins", "revoke", "ops"]));
    let err = run_err(&mut ops(&["agents"]));
    assert!(err.contains("admin/ops certificate") && err.contains("is revoked"), "{err}");
    let err = run_err(&mut admin(&[
        "admins",
        "add",
        "ops",
        "--role",
        "viewer",
        "-o",
        tmp.path().join("ops2").to_str().unwrap(),
    ]));
    assert!(err.contains("already exists"), "{err}");

    let out = run_ok(&mut admin(&["agents", "revoke", "e2e-1"]));
    assert!(out.contains("revoked e2e-1"), "{out}");
    let table = run_ok(&mut admin(&["agents"]));
    assert!(table.lines().any(|l| l.starts_with("e2e-1") && l.contains("revoked")), "{table}");

    let status = terminate(&mut agent.0);
    assert!(status.success(), "agent exits cleanly on SIGTERM: {status:?}");
    let status = terminate(&mut server.0);
    assert!(status.success(), "controller exits cleanly on SIGTERM: {status:?}");
}

#[test]
fn demo_runs_a_local_fleet_and_exits_zero() {
    let out = run_ok(convoy().arg("demo"));
    for (id, env) in
        [("st-eu-1", "staging"), ("eu-1", "production"), ("us-1", "production"), ("ap-1", "production")]
    {
        assert!(out.lines().any(|l| l.starts_with(id) && l.contains(env) && l.contains("online")), "{out}");
    }
    assert!(out.contains("demo finished"), "{out}");
    // 1.0.0: staging, then production waits for a second admin with nothing moved.
    assert!(out.contains("1/1 staging agents serve 1.0.0"), "{out}");
    assert!(
        out.lines().any(|l| l.contains("is AwaitingApproval: waiting for 1 more approval(s)")
            && l.contains("admin/dana")
            && l.ends_with("nothing moved: 0/6 production agents serve 1.0.0")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.contains("dana approves her own rollout")
            && l.contains("→ refused: ")
            && l.contains("approval needs a second person")),
        "{out}"
    );
    assert!(out.contains("6/6 production agents serve 1.0.0"), "{out}");
    // 2.0.0: caught in staging, refused in production.
    assert!(
        out.lines()
            .any(|l| l.contains("of 2.0.0 in staging: RolledBack") && l.ends_with("2.0.0 is marked bad")),
        "{out}"
    );
    // Refused, and production still serves 1.0.0.
    assert!(
        out.lines().any(|l| l
            .contains("dana deploys shop-api@2.0.0 to production → refused: shop-api@2.0.0 is marked bad")
            && l.ends_with("6/6 production agents serve 1.0.0")),
        "{out}"
    );
    assert!(out.contains("6/6 production agents serve 3.0.0"), "{out}");
    assert!(out.contains("HTTP 200; fleet rolled back"), "{out}");
    assert!(out.contains("6/6 production agents serve 1.0.0 again"), "{out}");
    assert!(out.contains("hash chain intact"), "{out}");
    assert!(out.contains("alert:CheckoutErrorRate"), "{out}");
}

#[test]
fn release_cli_keys_build_verify_inspect_sign_push_list_rm() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let run = |args: &[&str]| run_ok(convoy().current_dir(t).args(args));
    let fail = |args: &[&str]| run_err(convoy().current_dir(t).args(args));

    let id = run(&["keys", "generate", "-o", "release"]);
    assert_eq!(id.trim().len(), 16);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(t.join("release.key")).unwrap().permissions().mode() & 0o777, 0o600);
    }
    assert!(fail(&["keys", "generate", "-o", "release"]).contains("refusing to overwrite"));
    run(&["keys", "generate", "-o", "second"]);

    std::fs::create_dir_all(t.join("app/bin")).unwrap();
    std::fs::write(t.join("app/bin/run"), "#!/bin/sh\n").unwrap();
    std::fs::write(
        t.join("app/convoy.toml"),
        "[service]\ncommand = [\"bin/run\"]\nstop_timeout = \"often\"\n",
    )
    .unwrap();
    let err = fail(&[
        "release",
        "build",
        "app",
        "--app",
        "shop-api",
        "--version",
        "1.0.0",
        "--key",
        "release.key",
        "-o",
        "a.bundle",
    ]);
    assert!(err.contains("stop_timeout") && err.contains("line 3"), "{err}");
    std::fs::write(t.join("app/convoy.toml"), "[service]\ncommand = [\"bin/run\"]\n").unwrap();
    let build = [
        "release",
        "build",
        "app",
        "--app",
        "shop-api",
        "--version",
        "1.0.0",
        "--key",
        "release.key",
        "--created-at",
        "1700000000",
    ];
    run(&[&build[..], &["-o", "a.bundle"]].concat());
    run(&[&build[..], &["-o", "b.bundle"]].concat());
    assert_eq!(
        std::fs::read(t.join("a.bundle")).unwrap(),
        std::fs::read(t.join("b.bundle")).unwrap(),
        "reproducible"
    );

    let out = run(&["release", "verify", "a.bundle", "--trust", "release.pub"]);
    assert!(out.contains("ok: shop-api@1.0.0 verified"), "{out}");
    let err = fail(&["release", "verify", "a.bundle", "--trust", "second.pub"]);
    assert!(err.contains("valid signature"), "{err}");
    let err = fail(&[
        "release",
        "verify",
        "a.bundle",
        "--trust",
        "release.pub",
        "--trust",
        "second.pub",
        "--require-signatures",
        "2",
    ]);
    assert!(err.contains("needs 2 valid signature"), "{err}");
    run(&["release", "sign", "a.bundle", "--key", "second.key"]);
    run(&[
        "release",
        "verify",
        "a.bundle",
        "--trust",
        "release.pub",
        "--trust",
        "second.pub",
        "--require-signatures",
        "2",
    ]);
    let inspected: serde_json::Value =
        serde_json::from_str(&run(&["release", "inspect", "a.bundle", "-o", "json"])).unwrap();
    assert_eq!(inspected["app"], "shop-api");
    assert_eq!(inspected["signatures"].as_array().unwrap().len(), 2);
    assert_eq!(inspected["config"]["service"]["command"][0], "bin/run");
    assert!(run(&["release", "inspect", "a.bundle"]).contains("release     shop-api@1.0.0"));
    std::fs::write(t.join("junk.bundle"), "junk").unwrap();
    assert!(fail(&["release", "verify", "junk.bundle", "--trust", "release.pub"]).contains("truncated"));

    run(&["init", "--data-dir", "pki"]);
    let (mut server, grpc, _http) = start_server(&t.join("pki/convoy.toml"));
    let admin = |args: &[&str]| {
        let mut c = convoy();
        c.current_dir(t)
            .arg("--config")
            .arg(t.join("pki/convoy.toml"))
            .arg("--controller")
            .arg(&grpc)
            .args(args);
        c
    };
    let out = run_ok(&mut admin(&["release", "push", "a.bundle"]));
    assert!(out.starts_with("pushed shop-api@1.0.0"), "{out}");
    let out = run_ok(&mut admin(&["release", "push", "a.bundle"]));
    assert!(out.contains("already present"), "{out}");
    let err = run_err(&mut admin(&["release", "push", "b.bundle"]));
    assert!(err.contains("already exists with a different bundle"), "{err}");
    let listed: serde_json::Value =
        serde_json::from_str(&run_ok(&mut admin(&["release", "list", "-o", "json"]))).unwrap();
    assert_eq!(listed[0]["version"], "1.0.0");
    assert!(run_ok(&mut admin(&["release", "list"])).contains("shop-api@1.0.0"));
    assert!(run_err(&mut admin(&["release", "rm", "shop-api"])).contains("is not APP@VERSION"));
    run_ok(&mut admin(&["release", "rm", "shop-api@1.0.0"]));
    assert!(run_err(&mut admin(&["release", "rm", "shop-api@1.0.0"])).contains("not found"));
    assert!(terminate(&mut server.0).success());
}

#[test]
fn rollout_with_real_binaries_deploy_watch_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    run_ok(convoy().current_dir(t).args(["init", "--data-dir", "pki"]));
    run_ok(convoy().current_dir(t).args(["keys", "generate", "-o", "release"]));
    let config = t.join("pki/convoy.toml");
    let (mut server, grpc, _http) = start_server(&config);
    let admin = |args: &[&str]| {
        let mut c = convoy();
        c.current_dir(t).arg("--config").arg(&config).arg("--controller").arg(&grpc).args(args);
        c
    };
    for v in ["1.0.0", "1.1.0"] {
        let src = t.join(format!("src-{v}"));
        convoy_testkit::write_demo_release(&src, Path::new(env!("CARGO_BIN_EXE_convoy")), v, "healthy", "")
            .unwrap();
        let out = format!("{v}.bundle");
        run_ok(convoy().current_dir(t).args([
            "release",
            "build",
            src.to_str().unwrap(),
            "--app",
            "shop-api",
            "--version",
            v,
            "--key",
            "release.key",
            "-o",
            &out,
        ]));
        run_ok(&mut admin(&["release", "push", &out]));
    }
    let mut agents = Vec::new();
    let mut ports = Vec::new();
    for (id, region) in [("ap-1", "ap-south"), ("eu-1", "eu-west"), ("us-1", "us-east")] {
        let token = run_ok(&mut admin(&["token", "create", "--region", region])).trim().to_string();
        let dir = t.join(id);
        run_ok(&mut enroll(&grpc, &token, region, id, &t.join("pki/ca.pem"), &dir));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        ports.push(port);
        agents.push(Killed(
            Command::new(agent_bin())
                .args(["run", "--var", &format!("PORT={port}"), "--trust"])
                .arg(t.join("release.pub"))
                .arg("--data-dir")
                .arg(&dir)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(eventually(Duration::from_secs(30), "three agents online", || {
        let out = admin(&["agents", "-o", "json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let n = v.as_array().map(|a| a.iter().filter(|x| x["online"] == true).count()).unwrap_or(0);
        async move { (n == 3).then_some(()) }
    }));
    let serving =
        |v: &str| ports.iter().all(|p| common::get(*p).as_deref() == Some(&format!("demo-app {v}")));

    let id = run_ok(&mut admin(&["deploy", "shop-api@1.0.0", "--waves", "100%"])).trim().to_string();
    assert!(id.starts_with("ro-"), "{id}");
    let watch = run_ok(&mut admin(&["rollout", "status", &id, "--watch"]));
    assert!(watch.contains("completed"), "{watch}");
    assert!(serving("1.0.0"));

    std::fs::write(t.join("rollout.toml"), "release = \"shop-api@1.1.0\"\nregion_order = [\"eu\", \"us\", \"ap\"]\nwaves = [\"100%\"]\nmax_failures = \"0\"\n").unwrap();
    let id = run_ok(&mut admin(&["deploy", "-f", "rollout.toml"])).trim().to_string();
    let watch = run_ok(&mut admin(&["rollout", "status", &id, "--watch", "-o", "json"]));
    let events: Vec<serde_json::Value> = watch.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(events.last().unwrap()["message"].as_str().unwrap().contains("completed"), "{watch}");
    let status: serde_json::Value =
        serde_json::from_str(&run_ok(&mut admin(&["rollout", "status", &id, "-o", "json"]))).unwrap();
    assert_eq!(status["waves"][0][0], "eu-1", "region order from the file");
    assert!(serving("1.1.0"));
    let list = run_ok(&mut admin(&["rollout", "list"]));
    assert_eq!(list.lines().filter(|l| l.contains("completed")).count(), 2, "{list}");
    assert!(run_err(&mut admin(&["deploy", "shop-api@9.9.9"])).contains("not found"));
    assert!(run_err(&mut admin(&["deploy", "shop-api@1.1.0", "--waves", "50%,20%"]))
        .contains("--waves must increase"));
    assert!(run_err(&mut admin(&["deploy", "shop-api@1.1.0", "--max-failures", "lots"]))
        .contains("--max-failures"));

    let err = run_err(&mut admin(&["deploy", "shop-api@1.0.0"]));
    assert!(err.contains("older than 1.1.0") && err.contains("--downgrade"), "{err}");
    let fz = run_ok(&mut admin(&[
        "freeze", "add", "--from", "now", "--to", "now+1h", "--reason", "peak", "--region", "us-east",
    ]));
    let fz = fz.trim();
    assert!(run_ok(&mut admin(&["freeze", "list"])).contains("peak"));
    let err = run_err(&mut admin(&["deploy", "shop-api@1.1.0", "--force"]));
    assert!(err.contains("frozen"), "{err}");
    assert!(run_err(&mut admin(&["freeze", "add", "--from", "soon", "--to", "now", "--reason", "x"]))
        .contains("--from"));
    run_ok(&mut admin(&["freeze", "rm", fz]));
    let out = run_ok(&mut admin(&["rollback", "shop-api", "--all", "--reason", "conversion dropped"]));
    assert_eq!(out.lines().filter(|l| l.contains("rolled back")).count(), 3, "{out}");
    assert!(serving("1.0.0"));
    let status = run_ok(&mut admin(&["status"]));
    let rows: Vec<&str> = status.lines().filter(|l| l.starts_with("shop-api")).collect();
    assert!(!rows.is_empty() && rows.iter().all(|l| l.contains("1.0.0×1")), "{status}");
    let audit: serde_json::Value =
        serde_json::from_str(&run_ok(&mut admin(&["audit", "-o", "json"]))).unwrap();
    let entries = audit.as_array().unwrap();
    // Each action has an intent written before it and an outcome naming that intent, both by
    // the admin who ran it; outcomes about the app name it.
    for (want, target) in [
        ("release.push", Some("shop-api")),
        ("deploy", Some("shop-api")),
        ("freeze.add", None),
        ("freeze.rm", None),
        ("rollback", Some("shop-api")),
    ] {
        let outcome = entries
            .iter()
            .find(|e| {
                e["action"] == want && e["phase"].as_str().is_some_and(|p| p.eq_ignore_ascii_case("outcome"))
            })
            .unwrap_or_else(|| panic!("no outcome of {want} audited: {audit:#}"));
        let intent = entries
            .iter()
            .find(|e| e["seq"] == outcome["intent"])
            .unwrap_or_else(|| panic!("the intent of {want} is missing: {outcome:#}"));
        assert_eq!(intent["action"], want, "{intent:#}");
        assert!(intent["seq"].as_u64() < outcome["seq"].as_u64(), "{intent:#} {outcome:#}");
        for e in [intent, outcome] {
            assert!(e["actor"].as_str().unwrap().starts_with("admin/"), "{e:#}");
        }
        // (A push's intent names only the upload: which release it is is known afterwards.)
        if let Some(t) = target {
            assert!(outcome["target"].as_str().unwrap().contains(t), "{outcome:#}");
        }
    }
    let filtered = run_ok(&mut admin(&["audit", "--app", "shop-api", "--since", "1h", "-o", "json"]));
    let filtered: serde_json::Value = serde_json::from_str(&filtered).unwrap();
    let filtered = filtered.as_array().unwrap();
    assert!(filtered.iter().any(|e| e["action"] == "rollback"), "{filtered:?}");
    assert!(filtered.iter().all(|e| e["target"].as_str().unwrap().contains("shop-api")), "{filtered:?}");
    assert!(run_ok(&mut admin(&["audit", "verify"])).contains("hash chain verified"));

    for mut a in agents {
        assert!(terminate(&mut a.0).success());
    }
    assert!(terminate(&mut server.0).success());
}
