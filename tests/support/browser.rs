//! The browser for the end-to-end tests: chromedriver and headless Chromium (Debian's
//! `chromium` and `chromium-driver`), driven through WebDriver with fantoccini. The test page
//! keeps a record of what it saw and exposes `window.until(predicate)`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::wd::TimeoutConfiguration;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};

use super::WATCHDOG;

/// `name` from the environment variable `var`, else the first of `candidates` on `PATH`.
pub fn find_binary(var: &str, candidates: &[&str]) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for c in candidates {
            let p = dir.join(c);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "the browser tests need {} on PATH (or ${var}); on Debian: \
         `apt-get install chromium chromium-driver` (.ci/run does this)",
        candidates.join(" or ")
    );
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A chromedriver process, the Chromium it starts, and one WebDriver session (fantoccini).
/// Dropping it kills both and removes the profile directory.
pub struct Browser {
    driver: Child,
    pub client: fantoccini::Client,
    profile: PathBuf,
}

impl Browser {
    pub async fn start() -> Self {
        let chromium = find_binary("CHROMIUM", &["chromium", "chromium-browser"]);
        let chromedriver = find_binary("CHROMEDRIVER", &["chromedriver"]);
        let port = free_port();
        let mut driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", chromedriver.display()));
        let profile = std::env::temp_dir().join(format!(
            "tower-drain-chromium-{}-{port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();

        // chromedriver says when it listens.
        let stdout = driver.stdout.take().unwrap();
        let ready = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout).lines();
            let ok = lines
                .by_ref()
                .map_while(Result::ok)
                .any(|l| l.contains("started successfully"));
            // Keep draining its stdout so it never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            ok
        });
        let ready = tokio::time::timeout(WATCHDOG, ready).await;
        if !matches!(ready, Ok(Ok(true))) {
            let _ = driver.kill();
            panic!("chromedriver did not start: {ready:?}");
        }

        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let client = tokio::time::timeout(
            WATCHDOG,
            fantoccini::ClientBuilder::new(HttpConnector::new())
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .expect("a WebDriver session within the watchdog")
        .expect("a WebDriver session");
        let mut timeouts = TimeoutConfiguration::default();
        timeouts.set_script(Some(Duration::from_secs(15)));
        client.update_timeouts(timeouts).await.unwrap();
        Browser {
            driver,
            client,
            profile,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// Waits (inside the page, woken by its own events) until the JavaScript predicate `test`
    /// over the record holds, and returns the record.
    pub async fn until(&self, what: &str, test: &str) -> Vec<Value> {
        let script = format!(
            "const done = arguments[arguments.length - 1]; window.until({test}).then(done);"
        );
        let v = tokio::time::timeout(WATCHDOG, self.client.execute_async(&script, vec![]))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for the page: {what}"))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        v.as_array()
            .unwrap_or_else(|| panic!("{what}: no record: {v}"))
            .clone()
    }

    pub async fn record(&self) -> Vec<Value> {
        self.until("the record", "() => true").await
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver, then every Chromium process of this session, found by its unique
        // profile directory. Only positive pids are signalled, one by one.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let profile = self.profile.to_string_lossy().into_owned();
        for pid in processes_mentioning(&profile) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The pids (> 1) of processes whose command line contains `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid > 1 && pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}
