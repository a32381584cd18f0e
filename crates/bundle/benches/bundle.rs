//! Bundle throughput: build, verify and unpack a generated release of about 200 MB in 20,000
//! files, next to `sha256sum` and `tar --zstd -x` on the same data.
//!
//!     cargo bench -p convoy-bundle --bench bundle [-- --files N --kib-per-file K]
//!
//! Prints MB/s per stage (MB of unpacked data). The external tools are skipped if missing.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use convoy_bundle::{build, unpack, verify, BuildOptions, Limits, SecretKey, TrustStore};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Deterministic, partly compressible content: a random half and a repetitive half.
fn fill(buf: &mut [u8], seed: &mut u64) {
    let half = buf.len() / 2;
    for chunk in buf[..half].chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    for (i, b) in buf[half..].iter_mut().enumerate() {
        *b = b"convoy release payload "[i % 23];
    }
}

fn generate(dir: &Path, files: usize, kib: usize) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("convoy.toml"), "").unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut total = 0u64;
    let mut buf = vec![0u8; kib * 1024];
    for i in 0..files {
        let sub = dir.join(format!("d{:03}", i % 200));
        if i < 200 {
            std::fs::create_dir_all(&sub).unwrap();
        }
        // Sizes vary between half and one and a half times the average.
        let len = kib * 1024 / 2 + (i * 7919) % (kib * 1024);
        let len = len.min(buf.len());
        fill(&mut buf[..len], &mut seed);
        std::fs::write(sub.join(format!("f{i:05}.dat")), &buf[..len]).unwrap();
        total += len as u64;
    }
    total
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Flushes earlier stages' dirty pages first, so one stage's writeback is not billed to the next.
fn settle() {
    let _ = Command::new("sync").status();
}

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    settle();
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

fn tool(cmd: &mut Command) -> Option<Duration> {
    settle();
    let t = Instant::now();
    let ok = cmd.status().ok()?.success();
    ok.then(|| t.elapsed())
}

fn main() {
    let files = arg("--files", 20_000);
    let kib = arg("--kib-per-file", 10);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let total = generate(&src, files, kib);
    println!("data: {files} files, {:.1} MB", total as f64 / 1e6);
    let key = SecretKey::generate();
    let trust = TrustStore::new(vec![key.public()], 1);
    let bundle = tmp.path().join("b.bundle");
    let opts = BuildOptions {
        app: "bench".into(),
        version: "1.0.0".into(),
        created_at: 0,
        target: None,
        zstd_level: 3,
    };
    let (m, t_build) = time(|| build(&src, &opts, &key, &bundle).unwrap());
    println!("bundle: {:.1} MB compressed", m.payload.size as f64 / 1e6);
    let (_, t_verify) = time(|| verify(&bundle, Some(&trust), &Limits::default()).unwrap());
    let (_, t_unpack) =
        time(|| unpack(&bundle, &trust, &tmp.path().join("out"), &Limits::default()).unwrap());
    println!("{:<28} {:>8.2} s {:>9.1} MB/s", "convoy build", t_build.as_secs_f64(), mbps(total, t_build));
    println!("{:<28} {:>8.2} s {:>9.1} MB/s", "convoy verify", t_verify.as_secs_f64(), mbps(total, t_verify));
    println!(
        "{:<28} {:>8.2} s {:>9.1} MB/s",
        "convoy unpack (verifying)",
        t_unpack.as_secs_f64(),
        mbps(total, t_unpack)
    );

    let tarball = tmp.path().join("ref.tar.zst");
    let made =
        Command::new("tar").arg("--zstd").arg("-cf").arg(&tarball).arg("-C").arg(&src).arg(".").status();
    let sha = tool(Command::new("sha256sum").arg(&bundle).stdout(std::process::Stdio::null()));
    let untar = if made.is_ok_and(|s| s.success()) {
        let out = tmp.path().join("ref-out");
        std::fs::create_dir_all(&out).unwrap();
        let plain = tool(Command::new("tar").arg("--zstd").arg("-xf").arg(&tarball).arg("-C").arg(&out));
        // Convoy's unpack is durable (every file fsynced); the fair reference syncs too.
        let out2 = tmp.path().join("ref-out-sync");
        std::fs::create_dir_all(&out2).unwrap();
        let script = format!("tar --zstd -xf '{}' -C '{}' && sync", tarball.display(), out2.display());
        let synced = tool(Command::new("sh").arg("-c").arg(script));
        plain.zip(synced)
    } else {
        None
    };
    match (sha, untar) {
        (Some(s), Some((u, us))) => {
            println!(
                "{:<28} {:>8.2} s {:>9.1} MB/s",
                "sha256sum (bundle file)",
                s.as_secs_f64(),
                mbps(total, s)
            );
            println!("{:<28} {:>8.2} s {:>9.1} MB/s", "tar --zstd -x", u.as_secs_f64(), mbps(total, u));
            println!(
                "{:<28} {:>8.2} s {:>9.1} MB/s",
                "tar --zstd -x && sync",
                us.as_secs_f64(),
                mbps(total, us)
            );
            let ours = (t_verify + t_unpack).as_secs_f64();
            println!(
                "verify + unpack: {ours:.2} s; vs sha256sum + tar -x: {:.2}x; vs sha256sum + tar -x + sync: {:.2}x (goal <= 1.5x)",
                ours / (s + u).as_secs_f64(),
                ours / (s + us).as_secs_f64()
            );
        }
        _ => println!("sha256sum or tar --zstd not available: reference timings skipped"),
    }
}
