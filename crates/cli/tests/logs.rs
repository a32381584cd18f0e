//! Logs for operators: the real `convoy serve` and `convoy-agent run`, their stderr a pipe.
//! Text logs carry no ANSI colour codes when not written to a terminal, and with
//! `--log-format json` every line is a JSON object with a level and a message.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

fn convoy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_convoy"))
}

fn agent_bin() -> PathBuf {
    common::agent_bin(env!("CARGO_BIN_EXE_convoy"))
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped, so no test leaves one behind.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // Already gone is fine: the kill's outcome changes nothing here.
            let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
            let until = Instant::now() + Duration::from_secs(10);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Every line a child writes to stderr, forwarded as it comes.
fn lines(stderr: ChildStderr) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Collects lines until one satisfies `done`; panics after [`WAIT`].
fn until(rx: &mpsc::Receiver<String>, seen: &mut Vec<String>, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = done(&line);
                seen.push(line);
                if hit {
                    return;
                }
            }
            Err(_) => panic!("no line for {what} within {WAIT:?}; got: {seen:#?}"),
        }
    }
}

/// Stops the child with SIGTERM and returns the rest of its stderr.
fn stop(p: Proc, rx: mpsc::Receiver<String>, seen: &mut Vec<String>) {
    drop(p);
    seen.extend(rx.iter());
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a controller and an enrolled agent as child processes with `--log-format format`, until
/// the agent has a session; returns what each wrote to stderr.
fn fleet(format: &str, tmp: &Path) -> (Vec<String>, Vec<String>) {
    let pki = tmp.join(format!("pki-{format}"));
    run_ok(convoy().args(["init", "--data-dir"]).arg(&pki));
    let config = pki.join("convoy.toml");
    let mut server = convoy()
        .arg("--config")
        .arg(&config)
        .args(["--log-format", format, "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let server_rx = lines(server.stderr.take().unwrap());
    let server = Proc(server);
    let mut server_lines = Vec::new();
    until(&server_rx, &mut server_lines, "the listening line", |l| l.contains("convoy listening grpc="));
    let listening = server_lines.last().unwrap();
    let grpc = listening[listening.find("grpc=").unwrap() + 5..].split([' ', '"']).next().unwrap().to_owned();

    let token = run_ok(
        convoy()
            .arg("--config")
            .arg(&config)
            .arg("--controller")
            .arg(&grpc)
            .args(["token", "create", "--region", "eu-west", "--ttl", "10m"]),
    )
    .trim()
    .to_owned();
    let agent_dir = tmp.join(format!("agent-{format}"));
    run_ok(
        Command::new(agent_bin())
            .args(["--log-format", format, "enroll", "--controller", &grpc, "--token", &token])
            .args(["--region", "eu-west", "--id", "a1", "--ca"])
            .arg(pki.join("ca.pem"))
            .arg("--data-dir")
            .arg(&agent_dir),
    );
    let mut agent = Command::new(agent_bin())
        .args(["--log-format", format, "run", "--data-dir"])
        .arg(&agent_dir)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let agent_rx = lines(agent.stderr.take().unwrap());
    let agent = Proc(agent);
    let mut agent_lines = Vec::new();
    until(&agent_rx, &mut agent_lines, "the agent's session", |l| l.contains("session established"));
    stop(agent, agent_rx, &mut agent_lines);
    stop(server, server_rx, &mut server_lines);
    (server_lines, agent_lines)
}

fn assert_no_ansi(who: &str, lines: &[String]) {
    for l in lines {
        assert!(!l.contains("\x1b["), "{who} wrote an ANSI escape to a pipe: {l:?}");
    }
}

#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, agent) = fleet("text", tmp.path());
    assert!(server.iter().any(|l| l.contains("INFO")), "{server:#?}");
    assert!(agent.iter().any(|l| l.contains("INFO") && l.contains("session established")), "{agent:#?}");
    assert_no_ansi("convoy serve", &server);
    assert_no_ansi("convoy-agent run", &agent);
}

#[test]
fn json_logs_are_one_object_per_line_with_level_and_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, agent) = fleet("json", tmp.path());
    for (who, lines) in [("convoy serve", &server), ("convoy-agent run", &agent)] {
        assert!(lines.len() >= 2, "{who}: {lines:#?}");
        assert_no_ansi(who, lines);
        for l in lines {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{who}: not JSON ({e}): {l:?}"));
            assert!(v["level"].is_string(), "{who}: no level: {l}");
            assert!(v["message"].is_string(), "{who}: no message: {l}");
        }
    }
    let listening = server.iter().find(|l| l.contains("convoy listening")).unwrap();
    let v: serde_json::Value = serde_json::from_str(listening).unwrap();
    assert_eq!(v["level"], "INFO");
    assert!(v["grpc_addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{listening}");
    // A daemon's fatal error is a log line too: an agent that was never enrolled.
    let out = Command::new(agent_bin())
        .args(["--log-format", "json", "run", "--data-dir"])
        .arg(tmp.path().join("nowhere"))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let last: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR", "{stderr}");
    assert!(last["message"].as_str().unwrap().contains("not enrolled"), "{stderr}");
}
