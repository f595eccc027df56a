//! Runs a compiled example (`cargo test` builds every example) as a child process: reads its
//! `listening on http://ADDR` line, signals it, and waits for its exit and report line.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// One running example; killed on drop, so a failing test leaves nothing behind.
pub struct Example {
    child: Child,
    stdout: Option<BufReader<ChildStdout>>,
    pub addr: SocketAddr,
}

/// How the process ended.
#[derive(Debug)]
pub struct Exit {
    pub code: Option<i32>,
    /// Its stdout after the `listening on` line.
    pub stdout: String,
    /// From the start of the wait (just after the signal) to the exit.
    pub after_signal: Duration,
}

impl Exit {
    /// The `shutdown_report` object of the last stdout line.
    pub fn report(&self) -> serde_json::Value {
        let line = self.stdout.lines().last().expect("a report line on stdout");
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("report line {line:?} is not JSON: {e}"));
        v["shutdown_report"].clone()
    }
}

fn binary(name: &str) -> std::path::PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

impl Example {
    /// Starts `examples/<name>` on a free port of 127.0.0.1 with `env`.
    pub fn start(name: &str, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(binary(name));
        cmd.env("ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            // In-memory unless the test asks for Redis itself.
            .env_remove("REDIS_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("run examples/{name} (built by cargo test): {e}"));
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("examples/{name}: unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Self {
            child,
            stdout: Some(stdout),
            addr,
        }
    }

    /// Sends a signal (`"-TERM"`, `"-KILL"`, …) to the process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill {sig}");
    }

    /// Sends `SIGTERM`, then waits (at most `limit`) for the exit.
    pub async fn terminate_within(self, limit: Duration) -> Exit {
        self.signal("-TERM");
        self.exit_within(limit).await
    }

    /// Waits (at most `limit`) for the process to exit by itself (after a signal or a drain
    /// started over HTTP); kills it and fails the test otherwise.
    pub async fn exit_within(mut self, limit: Duration) -> Exit {
        let started = Instant::now();
        let mut stdout = self.stdout.take().unwrap();
        let mut child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        let pid = child.id();
        let wait = tokio::task::spawn_blocking(move || {
            let mut rest = String::new();
            stdout.read_to_string(&mut rest).unwrap();
            (child.wait().unwrap().code(), rest)
        });
        match tokio::time::timeout(limit, wait).await {
            Ok(res) => {
                let (code, stdout) = res.unwrap();
                Exit {
                    code,
                    stdout,
                    after_signal: started.elapsed(),
                }
            }
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("the process did not exit within {limit:?}");
            }
        }
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
