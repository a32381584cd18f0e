//! The `convoy-agent` binary refuses bad input with specific messages and writes nothing.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_convoy-agent"))
}

fn check(args: &[&str], expected_stderr: &str) {
    let out = agent().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(expected_stderr),
        "{args:?}: stderr {stderr:?} should mention {expected_stderr:?}"
    );
}

#[test]
fn bad_arguments_are_refused_with_specific_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("agent");
    let data = data.to_str().unwrap();
    let ca = tmp.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    let ca = ca.to_str().unwrap();
    check(&["run", "--data-dir", data], "is not enrolled");
    check(
        &[
            "enroll",
            "--controller",
            "127.0.0.1:1",
            "--ca",
            "/nonexistent/ca.pem",
            "--token",
            "t",
            "--region",
            "r",
            "--data-dir",
            data,
        ],
        "cannot read CA certificate",
    );
    check(
        &[
            "enroll",
            "--controller",
            "127.0.0.1:1",
            "--ca",
            ca,
            "--token",
            "t",
            "--region",
            "r",
            "--data-dir",
            data,
        ],
        "certificate",
    );
    check(
        &[
            "enroll",
            "--controller",
            "127.0.0.1:1",
            "--ca",
            ca,
            "--token",
            "t",
            "--region",
            "r",
            "--label",
            "novalue",
            "--data-dir",
            data,
        ],
        "is not KEY=VALUE",
    );
    check(&["enroll", "--controller", "127.0.0.1:1", "--token", "t"], "--ca");
    check(&["launch"], "unrecognized subcommand");
    assert!(!tmp.path().join("agent").exists(), "refusals write nothing");
}
