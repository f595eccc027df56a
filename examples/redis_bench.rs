//! Measures `RedisStore` against one Redis on 127.0.0.1 (see BENCHMARKS-redis.md):
//!
//! - acquire and release latency (p50/p99) next to a bare `PING` on the same kind of
//!   connection, with `INFO commandstats` deltas showing one command (one round trip) each;
//! - one heartbeat of 10,000 leases (over 10,000 keys, the worst case: 20,001 commands in one
//!   pipeline), and the worst `PING` latency another client sees while it runs;
//! - the shutdown clean-up of 100,000 leases over 10,000 keys.
//!
//! With the feature `redis-cluster`, `CLUSTER=1` measures the same against a local 3-primary
//! Redis Cluster (started on free ports, stopped at the end) next to a single node: acquire
//! p50/p99, a heartbeat of 10,000 leases spread over all slots (and the worst latency another
//! client sees on each primary meanwhile), and the clean-up of 100,000 leases over 10,000 keys.
//!
//! ```text
//! cargo run --release --example redis_bench            # starts a private redis-server
//! CLUSTER=1 cargo run --release --features redis-cluster --example redis_bench
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --release --example redis_bench
//! RUNS=5 cargo run --release --example redis_bench     # default 3 runs, medians at the end
//! ```

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tower_drain::track::{ConnectionStore, Lease, RedisStore};

const SAMPLES: usize = 5_000;

struct Server(Option<Child>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_redis() -> (Server, String) {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return (Server(None), url);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("cannot start `redis-server`: install it or set REDIS_URL");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    (Server(Some(child)), format!("redis://127.0.0.1:{port}/"))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn reset_stats(c: &mut ConnectionManager) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(c)
        .await
        .unwrap();
}

/// `cmdstat_<name>` → calls, from `INFO commandstats` (the INFO call itself excluded).
async fn command_calls(c: &mut ConnectionManager) -> HashMap<String, u64> {
    command_stats(c)
        .await
        .into_iter()
        .map(|(k, (calls, _))| (k, calls))
        .collect()
}

/// `cmdstat_<name>` → (calls, usec spent in Redis).
async fn command_stats(c: &mut ConnectionManager) -> HashMap<String, (u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .unwrap();
    let mut out = HashMap::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let (name, stats) = rest.split_once(':').unwrap();
        let field = |f: &str| -> u64 {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(f))
                .unwrap()
                .parse()
                .unwrap()
        };
        if name != "info" && name != "config|resetstat" {
            out.insert(name.to_owned(), (field("calls="), field("usec=")));
        }
    }
    out
}

#[derive(Default, Clone)]
struct Run {
    ping_p50: f64,
    ping_p99: f64,
    acquire_p50: f64,
    acquire_p99: f64,
    release_p50: f64,
    release_p99: f64,
    heartbeat_ms: f64,
    heartbeat_max_ping_ms: f64,
    cleanup_ms: f64,
}

async fn run(url: &str, n: usize) -> Run {
    let mut r = Run::default();
    let client = redis::Client::open(url).unwrap();
    let mut admin = ConnectionManager::new(client.clone()).await.unwrap();
    let mut pinger = ConnectionManager::new(client.clone()).await.unwrap();
    let prefix = format!("bench-{n}-{}", std::process::id());
    // Long TTL: no background heartbeat or sweep runs during the latency phases.
    let store = RedisStore::builder(url)
        .prefix(&prefix)
        .lease_ttl(Duration::from_secs(600))
        .acquire_timeout(Duration::from_secs(5))
        .command_timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // Warm-up (connection, script cache, allocator).
    for i in 0..1000 {
        let _: String = redis::cmd("PING").query_async(&mut pinger).await.unwrap();
        drop(store.acquire(&format!("warm-{i}"), 10).await.unwrap());
    }
    while store.pending_releases() > 0 {
        tokio::task::yield_now().await;
    }

    // 1. PING.
    reset_stats(&mut admin).await;
    let mut t = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let s = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut pinger).await.unwrap();
        t.push(s.elapsed());
    }
    t.sort();
    (r.ping_p50, r.ping_p99) = (us(pct(&t, 0.5)), us(pct(&t, 0.99)));
    let ping_calls = command_calls(&mut admin).await;

    // 2. Acquire: SAMPLES leases on distinct keys, held.
    reset_stats(&mut admin).await;
    let mut leases: Vec<Lease> = Vec::with_capacity(SAMPLES);
    let mut t = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let key = format!("user-{i}");
        let s = Instant::now();
        let lease = store.acquire(&key, 10).await.unwrap().unwrap();
        t.push(s.elapsed());
        leases.push(lease);
    }
    t.sort();
    (r.acquire_p50, r.acquire_p99) = (us(pct(&t, 0.5)), us(pct(&t, 0.99)));
    let acquire_stats = command_stats(&mut admin).await;
    let acquire_calls: HashMap<String, u64> = acquire_stats
        .iter()
        .map(|(k, v)| (k.clone(), v.0))
        .collect();

    // 3. Release: drop one lease, wait until Redis has answered its ZREM.
    reset_stats(&mut admin).await;
    let mut t = Vec::with_capacity(SAMPLES);
    for lease in leases.drain(..) {
        let s = Instant::now();
        drop(lease);
        while store.pending_releases() > 0 {
            tokio::task::yield_now().await;
        }
        t.push(s.elapsed());
    }
    t.sort();
    (r.release_p50, r.release_p99) = (us(pct(&t, 0.5)), us(pct(&t, 0.99)));
    let release_calls = command_calls(&mut admin).await;

    if n == 0 {
        println!("INFO commandstats deltas ({SAMPLES} operations each):");
        println!("  PING phase:    {ping_calls:?}");
        println!("  acquire phase: {acquire_calls:?}");
        println!(
            "  time inside Redis per acquire (EVALSHA incl. the script): {:.1} µs",
            acquire_stats["evalsha"].1 as f64 / SAMPLES as f64
        );
        println!("  release phase: {release_calls:?}");
    }
    assert_eq!(acquire_calls.get("evalsha"), Some(&(SAMPLES as u64)));
    // commandstats also counts the commands run inside the script (one of each per EVALSHA);
    // the client itself sent nothing but EVALSHA.
    for (cmd, calls) in &acquire_calls {
        let inside_script = [
            "time",
            "zrem",
            "zremrangebyscore",
            "zcard",
            "zadd",
            "pttl",
            "pexpire",
        ];
        assert!(
            cmd == "evalsha" || (inside_script.contains(&cmd.as_str()) && *calls <= SAMPLES as u64),
            "acquire sent {cmd} ({calls} calls)"
        );
    }
    assert_eq!(release_calls.get("zrem"), Some(&(SAMPLES as u64)));
    assert_eq!(release_calls.len(), 1, "release sends nothing but ZREM");

    // 4. Heartbeat of 10,000 leases over 10,000 keys while another client PINGs.
    let hb_leases: Vec<Lease> = acquire_leases(&store, "hb", 10_000, 10_000, 10, 128).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, running) = (stop.clone(), running.clone());
        let mut c = ConnectionManager::new(client.clone()).await.unwrap();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let s = Instant::now();
                let _: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
                let d = s.elapsed();
                if running.load(Ordering::Relaxed) {
                    worst = worst.max(d);
                }
            }
            worst
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    reset_stats(&mut admin).await;
    running.store(true, Ordering::Relaxed);
    let s = Instant::now();
    let readded = store.heartbeat_now().await;
    r.heartbeat_ms = s.elapsed().as_secs_f64() * 1e3;
    // Let a PING that was queued behind the pipeline finish inside the window.
    tokio::time::sleep(Duration::from_millis(20)).await;
    running.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    r.heartbeat_max_ping_ms = watcher.await.unwrap().as_secs_f64() * 1e3;
    let hb_stats = command_stats(&mut admin).await;
    let hb_calls: HashMap<String, u64> = hb_stats.iter().map(|(k, v)| (k.clone(), v.0)).collect();
    let hb_redis_ms = hb_stats
        .iter()
        .filter(|(k, _)| *k != "ping")
        .map(|(_, v)| v.1)
        .sum::<u64>() as f64
        / 1e3;
    assert_eq!(readded, 0);
    if n == 0 {
        println!("  heartbeat (10,000 leases / 10,000 keys): {hb_calls:?} (ping = the watcher), {hb_redis_ms:.1} ms inside Redis");
    }
    drop(hb_leases);
    while store.pending_releases() > 0 {
        tokio::task::yield_now().await;
    }

    // 5. Shutdown clean-up of 100,000 leases over 10,000 keys.
    let big: Vec<Lease> = acquire_leases(&store, "big", 100_000, 10_000, 100, 256).await;
    assert_eq!(store.held(), 100_000);
    let s = Instant::now();
    let summary = store.shutdown().await.unwrap();
    r.cleanup_ms = s.elapsed().as_secs_f64() * 1e3;
    if n == 0 {
        println!(
            "  clean-up summary: {}",
            serde_json::to_string(&summary).unwrap()
        );
    }
    assert_eq!(
        (summary.before, summary.total_cleaned, summary.after),
        (100_000, 100_000, 0)
    );
    drop(big);
    r
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    #[cfg(feature = "redis-cluster")]
    if std::env::var("CLUSTER").is_ok_and(|v| v == "1") {
        cluster::main(runs).await;
        return;
    }
    let (_server, url) = start_redis();
    let mut all = Vec::new();
    for n in 0..runs {
        let r = run(&url, n).await;
        println!(
            "run {n}: PING p50 {:.1} µs p99 {:.1} µs | acquire p50 {:.1} µs p99 {:.1} µs | release p50 {:.1} µs p99 {:.1} µs | heartbeat 10k {:.1} ms, worst other PING {:.2} ms | clean-up 100k/10k keys {:.1} ms",
            r.ping_p50, r.ping_p99, r.acquire_p50, r.acquire_p99, r.release_p50, r.release_p99,
            r.heartbeat_ms, r.heartbeat_max_ping_ms, r.cleanup_ms
        );
        all.push(r);
    }
    let m = |f: fn(&Run) -> f64| median(all.iter().map(f).collect());
    println!("\nmedian of {runs} runs:");
    println!("| measurement | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| PING | {:.1} µs | {:.1} µs |",
        m(|r| r.ping_p50),
        m(|r| r.ping_p99)
    );
    println!(
        "| acquire (1 EVALSHA) | {:.1} µs | {:.1} µs |",
        m(|r| r.acquire_p50),
        m(|r| r.acquire_p99)
    );
    println!(
        "| release (drop → ZREM answered) | {:.1} µs | {:.1} µs |",
        m(|r| r.release_p50),
        m(|r| r.release_p99)
    );
    println!(
        "heartbeat of 10,000 leases: {:.1} ms; worst PING of another client meanwhile: {:.2} ms",
        m(|r| r.heartbeat_ms),
        m(|r| r.heartbeat_max_ping_ms)
    );
    println!(
        "shutdown clean-up of 100,000 leases over 10,000 keys: {:.1} ms",
        m(|r| r.cleanup_ms)
    );
}

#[cfg(feature = "redis-cluster")]
/// `n` leases, the `i`-th on key `{prefix}-{i % keys}`, acquired `parallel` at a time.
async fn acquire_leases(
    store: &RedisStore,
    prefix: &str,
    n: usize,
    keys: usize,
    limit: u32,
    parallel: usize,
) -> Vec<Lease> {
    futures_util::stream::iter(0..n)
        .map(|i| {
            let s = store.clone();
            let key = format!("{prefix}-{}", i % keys);
            async move { s.acquire(&key, limit).await.unwrap().unwrap() }
        })
        .buffer_unordered(parallel)
        .collect()
        .await
}

#[path = "redis_bench/cluster.rs"]
mod cluster;
