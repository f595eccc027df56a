//! The rolling deploy, CI-sized: `examples/rolling_deploy` runs HAProxy, 3 replicas and 300
//! clients (270 SSE streams, 30 WebSockets on `/ws`) through one rolling restart, once with the reference server (tower-drain) and
//! once with the baseline (plain axum graceful shutdown, `SIGKILL` after the grace period).
//!
//! Needs `haproxy` (Debian: `apt-get install haproxy`; `.ci/run` installs it). Without it the
//! test fails, naming the package.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const CLIENTS: u64 = 300;
/// Of `CLIENTS`, the ones on `/ws`.
const WEBSOCKETS: u64 = 30;
const REPLICAS: u64 = 3;
const GRACE_S: u64 = 3;
const WATCHDOG: Duration = Duration::from_secs(150);

/// `target/<profile>`, from `target/<profile>/deps/<this test>`.
fn profile_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_owned()
}

fn example(name: &str) -> std::path::PathBuf {
    profile_dir().join("examples").join(name)
}

/// The crate's features this test was built with, for building the examples alike.
fn features() -> String {
    let all = [
        ("default", cfg!(feature = "default")),
        ("redis", cfg!(feature = "redis")),
        ("redis-cluster", cfg!(feature = "redis-cluster")),
        ("redis-tls-rustls", cfg!(feature = "redis-tls-rustls")),
        ("redis-tls-native", cfg!(feature = "redis-tls-native")),
        ("hyper", cfg!(feature = "hyper")),
        ("tonic-health", cfg!(feature = "tonic-health")),
        ("axum-ws", cfg!(feature = "axum-ws")),
        ("tungstenite", cfg!(feature = "tungstenite")),
    ];
    let on: Vec<&str> = all.iter().filter(|f| f.1).map(|f| f.0).collect();
    on.join(",")
}

/// Builds the tool and the two servers it runs, in this test's profile and with its
/// features: `cargo test --test rolling_deploy` builds no example by itself, and binaries
/// left from an older build would test old code. A no-op when `cargo test` built them.
fn build_examples() {
    let profile = profile_dir();
    let profile = profile.file_name().unwrap().to_str().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // Without the variables cargo set for this test (`CARGO_PKG_NAME`, …): build scripts
    // that watch them would run again and rebuild half the dependencies, twice per test.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let ours = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_PRIMARY_PACKAGE",
        ]
        .iter()
        .any(|p| k.starts_with(p))
            || k == "CARGO_TARGET_TMPDIR";
        if ours {
            cmd.env_remove(&*k);
        }
    }
    cmd.arg("build")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--example", "rolling_deploy"])
        .args(["--example", "sse_server"])
        .args(["--example", "baseline_server"])
        .args(["--no-default-features", "--features", &features()]);
    if profile != "debug" {
        cmd.args(["--profile", profile]);
    }
    let status = cmd.stdout(Stdio::null()).status().expect("run cargo build");
    assert!(status.success(), "cargo build of the examples failed");
}

/// Runs the tool and returns its JSON.
fn roll() -> Value {
    assert!(
        Command::new("haproxy")
            .arg("-v")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "this test needs haproxy on PATH; on Debian: `apt-get install haproxy` (.ci/run does this)"
    );
    build_examples();
    let json =
        std::env::temp_dir().join(format!("rolling-deploy-test-{}.json", std::process::id()));
    let mut child = Command::new(example("rolling_deploy"))
        .args(["--no-build", "--rounds", "1"])
        .args(["--clients", &CLIENTS.to_string()])
        .args(["--replicas", &REPLICAS.to_string()])
        .args(["--grace", &GRACE_S.to_string()])
        .args([
            "--ws-share",
            &(WEBSOCKETS as f64 / CLIENTS as f64).to_string(),
        ])
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run examples/rolling_deploy");
    // Its table and per-replica lines go to the test's captured output (shown on failure).
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > WATCHDOG {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rolling_deploy did not finish within {WATCHDOG:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "{}{}",
        stderr.join().unwrap_or_default(),
        stdout.join().unwrap_or_default()
    );
    assert!(status.success(), "rolling_deploy failed: {status}");
    let text = std::fs::read_to_string(&json).unwrap();
    let _ = std::fs::remove_file(&json);
    serde_json::from_str(&text).unwrap()
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v:#}"))
}

#[test]
fn a_rolling_deploy_is_invisible_with_tower_drain_and_visible_without() {
    let out = roll();
    let runs = out["runs"].as_array().unwrap();
    let drain = runs.iter().find(|r| r["server"] == "tower-drain").unwrap();
    let baseline = runs.iter().find(|r| r["server"] == "baseline").unwrap();
    let retry_ms = u(drain, "retry_ms") as f64;

    // tower-drain: nothing a client can see.
    for k in [
        "client_visible_failures",
        "streams_cut",
        "non_200",
        "clients_gave_up",
        "connect_errors",
        "ws_closed_1006",
    ] {
        assert_eq!(u(drain, k), 0, "tower-drain: {k}\n{drain:#}");
    }
    // Every client was moved once (each replica was replaced once), by a final frame.
    assert!(u(drain, "reconnects") >= CLIENTS, "{drain:#}");
    assert!(
        u(drain, "streams_ended_with_final_frame") >= CLIENTS,
        "{drain:#}"
    );
    // Every WebSocket was moved by the drain's close frame, not cut.
    assert!(u(drain, "ws_closed_1001") >= WEBSOCKETS, "{drain:#}");
    // Each old replica drained, reported and exited by itself, well within its grace period.
    let replicas = drain["replicas"].as_array().unwrap();
    assert_eq!(replicas.len() as u64, REPLICAS);
    for r in replicas {
        assert_eq!(r["exit_code"], 0, "{r:#}");
        assert_eq!(r["killed"], false, "{r:#}");
        assert!(
            r["sigterm_to_exit_ms"].as_f64().unwrap() < (GRACE_S * 1000) as f64,
            "{r:#}"
        );
        let report = &r["shutdown_report"];
        assert_eq!(report["force_closed"], 0, "{r:#}");
        assert_eq!(report["notified"], report["streams_at_drain"], "{r:#}");
    }
    // The longest time a client spent without a stream: about one `retry:` (the goal on an
    // idle machine is 2 x retry; a second of slack for a loaded CI machine).
    let gap = drain["longest_gap_without_stream_ms"].as_f64().unwrap();
    assert!(
        gap < 2.0 * retry_ms + 1000.0,
        "longest gap {gap} ms\n{drain:#}"
    );

    // The baseline: the same roll cuts streams, and its replicas are killed at the deadline.
    assert!(u(baseline, "client_visible_failures") >= 1, "{baseline:#}");
    assert!(u(baseline, "streams_cut") >= 1, "{baseline:#}");
    assert!(u(baseline, "ws_closed_1006") >= 1, "{baseline:#}");
    assert_eq!(u(baseline, "replicas_killed"), REPLICAS, "{baseline:#}");
}
