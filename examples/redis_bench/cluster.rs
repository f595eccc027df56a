//! The cluster half of `redis_bench` (`CLUSTER=1`, feature `redis-cluster`).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tower_drain::track::{ConnectionStore, Lease, RedisStore, RedisStoreBuilder};

use super::{median, pct, us, Server, SAMPLES};

/// Three cluster primaries on free ports, killed on drop.
struct Cluster {
    nodes: Vec<Server>,
    ports: Vec<u16>,
    dir: std::path::PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_cluster_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

fn start_cluster() -> Cluster {
    let dir = std::env::temp_dir().join(format!("td-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < 3 {
        let p = free_cluster_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    let nodes = ports
        .iter()
        .map(|p| {
            let child: Child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{p}.conf")])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("cannot start `redis-server`");
            Server(Some(child))
        })
        .collect();
    for p in &ports {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", *p)).is_err() {
            assert!(Instant::now() < deadline, "cluster node did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let out = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .arg("--cluster-yes")
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli --cluster create failed");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ports.iter().all(|p| {
        let out = Command::new("redis-cli")
            .args(["-p", &p.to_string(), "cluster", "info"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok")
    }) {
        assert!(Instant::now() < deadline, "cluster not ok");
        std::thread::sleep(Duration::from_millis(50));
    }
    Cluster { nodes, ports, dir }
}

#[derive(Default, Clone)]
struct Figures {
    acquire_p50: f64,
    acquire_p99: f64,
    heartbeat_ms: f64,
    heartbeat_max_ping_ms: f64,
    cleanup_ms: f64,
    cleanup_iterations: u32,
}

async fn measure(builder: RedisStoreBuilder, watch_urls: &[String]) -> Figures {
    let mut f = Figures::default();
    let store = builder
        .lease_ttl(Duration::from_secs(600))
        .acquire_timeout(Duration::from_secs(5))
        .command_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for i in 0..1000 {
        drop(store.acquire(&format!("warm-{i}"), 10).await.unwrap());
    }
    while store.pending_releases() > 0 {
        tokio::task::yield_now().await;
    }
    // Acquire latency, SAMPLES keys over all slots.
    let mut leases: Vec<Lease> = Vec::with_capacity(SAMPLES);
    let mut t = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let key = format!("user-{i}");
        let s = Instant::now();
        leases.push(store.acquire(&key, 10).await.unwrap().unwrap());
        t.push(s.elapsed());
    }
    t.sort();
    (f.acquire_p50, f.acquire_p99) = (us(pct(&t, 0.5)), us(pct(&t, 0.99)));
    drop(leases);
    while store.pending_releases() > 0 {
        tokio::task::yield_now().await;
    }

    // Heartbeat of 10,000 leases on 10,000 keys while other clients PING every node.
    let hb: Vec<Lease> = super::acquire_leases(&store, "hb", 10_000, 10_000, 10, 128).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicBool::new(false));
    let mut watchers = Vec::new();
    for url in watch_urls {
        let (stop, running) = (stop.clone(), running.clone());
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut c = ConnectionManager::new(client).await.unwrap();
        watchers.push(tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let s = Instant::now();
                let _: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
                if running.load(Ordering::Relaxed) {
                    worst = worst.max(s.elapsed());
                }
            }
            worst
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    running.store(true, Ordering::Relaxed);
    let s = Instant::now();
    let readded = store.heartbeat_now().await;
    f.heartbeat_ms = s.elapsed().as_secs_f64() * 1e3;
    tokio::time::sleep(Duration::from_millis(20)).await;
    running.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for w in watchers {
        let worst = w.await.unwrap().as_secs_f64() * 1e3;
        f.heartbeat_max_ping_ms = f.heartbeat_max_ping_ms.max(worst);
    }
    assert_eq!(readded, 0);
    drop(hb);
    while store.pending_releases() > 0 {
        tokio::task::yield_now().await;
    }

    // Clean-up of 100,000 leases over 10,000 keys.
    let big: Vec<Lease> = super::acquire_leases(&store, "big", 100_000, 10_000, 100, 256).await;
    let s = Instant::now();
    let summary = store.shutdown().await.unwrap();
    f.cleanup_ms = s.elapsed().as_secs_f64() * 1e3;
    f.cleanup_iterations = summary.iterations;
    assert_eq!(
        (summary.before, summary.total_cleaned, summary.after),
        (100_000, 100_000, 0)
    );
    drop(big);
    f
}

pub(super) async fn main(runs: usize) {
    let cluster = start_cluster();
    let urls: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}/"))
        .collect();
    let (_single, single_url) = super::start_redis();
    let mut single = Vec::new();
    let mut clustered = Vec::new();
    for n in 0..runs {
        let s = measure(
            RedisStore::builder(single_url.as_str()).prefix(format!("bench-single-{n}")),
            std::slice::from_ref(&single_url),
        )
        .await;
        let c = measure(
            RedisStore::cluster_builder(urls.clone()).prefix(format!("bench-cluster-{n}")),
            &urls,
        )
        .await;
        for (name, r) in [("single", &s), ("cluster", &c)] {
            println!(
                "run {n} {name}: acquire p50 {:.1} µs p99 {:.1} µs | heartbeat 10k {:.1} ms, worst other PING {:.2} ms | clean-up 100k/10k keys {:.1} ms in {} rounds",
                r.acquire_p50, r.acquire_p99, r.heartbeat_ms, r.heartbeat_max_ping_ms, r.cleanup_ms, r.cleanup_iterations
            );
        }
        single.push(s);
        clustered.push(c);
    }
    println!("\nmedian of {runs} runs:");
    println!("| measurement | single node | 3-primary cluster |");
    println!("|---|---|---|");
    let m = |v: &[Figures], f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
    let rows: [(&str, fn(&Figures) -> f64, &str); 5] = [
        ("acquire p50", |r| r.acquire_p50, "µs"),
        ("acquire p99", |r| r.acquire_p99, "µs"),
        ("heartbeat, 10,000 leases", |r| r.heartbeat_ms, "ms"),
        (
            "worst PING of another client during it",
            |r| r.heartbeat_max_ping_ms,
            "ms",
        ),
        (
            "clean-up, 100,000 leases / 10,000 keys",
            |r| r.cleanup_ms,
            "ms",
        ),
    ];
    for (name, f, unit) in rows {
        println!(
            "| {name} | {:.1} {unit} | {:.1} {unit} |",
            m(&single, f),
            m(&clustered, f)
        );
    }
    drop(cluster);
}
