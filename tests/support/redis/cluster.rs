//! A local Redis Cluster for the tests: `redis-server --cluster-enabled yes` nodes on free
//! private ports, joined with `redis-cli --cluster create`, every node killed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::ping;

/// One cluster node process.
pub(crate) struct Node {
    pub(crate) port: u16,
    tls: bool,
    child: Mutex<Option<Child>>,
}

impl Node {
    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// SIGKILL, as a crash would.
    pub(crate) fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running cluster: `primaries` primaries, each with `replicas` replicas.
pub(crate) struct Cluster {
    pub(crate) nodes: Vec<Node>,
    dir: PathBuf,
    /// With TLS: the directory of the test CA and node certificate (see `make_certs`).
    tls: Option<PathBuf>,
}

impl Cluster {
    /// Starts and joins the cluster; panics with a clear message when it cannot.
    pub(crate) fn start(primaries: usize, replicas: usize) -> Cluster {
        Cluster::start_on(cluster_ports(primaries * (1 + replicas)), replicas)
    }

    /// Starts and joins a cluster on `ports` (see [`cluster_ports`]).
    pub(crate) fn start_on(ports: Vec<u16>, replicas: usize) -> Cluster {
        Cluster::start_with(ports, replicas, None)
    }

    /// A 3-primary cluster serving TLS only (`tls-cluster yes`), with a test CA's certificate;
    /// returns it and the CA (PEM).
    pub(crate) fn start_tls() -> (Cluster, Vec<u8>) {
        let certs = std::env::temp_dir().join(format!(
            "td-cluster-tls-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        super::make_certs(&certs);
        let ca = std::fs::read(certs.join("ca.pem")).unwrap();
        (Cluster::start_with(cluster_ports(3), 0, Some(certs)), ca)
    }

    fn tls_args(&self) -> Vec<String> {
        match &self.tls {
            Some(d) => vec![
                "--tls".into(),
                "--cacert".into(),
                d.join("ca.pem").display().to_string(),
            ],
            None => Vec::new(),
        }
    }

    fn start_with(ports: Vec<u16>, replicas: usize, tls: Option<PathBuf>) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "td-cluster-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nodes = Vec::new();
        for &port in &ports {
            let mut cmd = Command::new("redis-server");
            match &tls {
                None => cmd.args(["--port", &port.to_string()]),
                Some(certs) => cmd
                    .args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                    .args(["--tls-auth-clients", "no"])
                    .arg("--tls-cert-file")
                    .arg(certs.join("server.pem"))
                    .arg("--tls-key-file")
                    .arg(certs.join("server.key"))
                    .arg("--tls-ca-cert-file")
                    .arg(certs.join("ca.pem")),
            };
            let child = cmd
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                // Fast failure detection, and the other slots keep serving meanwhile.
                .args(["--cluster-node-timeout", "500"])
                .args(["--cluster-require-full-coverage", "no"])
                .args(["--cluster-replica-validity-factor", "0"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start `redis-server` ({e}): install Redis 7 (apt-get install redis-server)")
                });
            nodes.push(Node {
                port,
                tls: tls.is_some(),
                child: Mutex::new(Some(child)),
            });
        }
        let cluster = Cluster { nodes, dir, tls };
        let deadline = Instant::now() + Duration::from_secs(10);
        for node in &cluster.nodes {
            while !(ping(node.port)
                || (cluster.tls.is_some()
                    && std::net::TcpStream::connect(("127.0.0.1", node.port)).is_ok()))
            {
                assert!(
                    Instant::now() < deadline,
                    "cluster node {} did not start",
                    node.port
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let out = Command::new("redis-cli")
            .args(cluster.tls_args())
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("cannot run `redis-cli` (package redis-tools / redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok(Duration::from_secs(15));
        cluster
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// `redis-cli -p <port> <args>` output.
    pub(crate) fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(self.tls_args())
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Live nodes: (port, node id, is primary, slot ranges) from `CLUSTER NODES`.
    pub(crate) fn topology(&self) -> Vec<(u16, String, bool, Vec<(u16, u16)>)> {
        let live = self
            .nodes
            .iter()
            .find(|n| n.child.lock().unwrap().is_some())
            .expect("a live node");
        let text = self.cli(live.port, &["cluster", "nodes"]);
        let mut out = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[2].contains("fail") {
                continue;
            }
            let port: u16 = f[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let primary = f[2].contains("master");
            let ranges = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| {
                    let mut it = s.split('-');
                    let a: u16 = it.next()?.parse().ok()?;
                    let b: u16 = it.next().map_or(Some(a), |b| b.parse().ok())?;
                    Some((a, b))
                })
                .collect();
            out.push((port, f[0].to_owned(), primary, ranges));
        }
        out
    }

    /// Port of the primary serving `slot`.
    pub(crate) fn primary_of(&self, slot: u16) -> u16 {
        self.topology()
            .into_iter()
            .find(|(_, _, primary, ranges)| {
                *primary && ranges.iter().any(|&(a, b)| a <= slot && slot <= b)
            })
            .map(|(port, ..)| port)
            .expect("a primary serves every slot")
    }

    /// Waits until every live node reports `cluster_state:ok`, every slot is served by a live
    /// primary, and every live replica's link to its primary is up.
    pub(crate) fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn is_ok(&self) -> bool {
        let live: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|n| n.child.lock().unwrap().is_some())
            .collect();
        let all_ok = live.iter().all(|n| {
            self.cli(n.port, &["cluster", "info"])
                .contains("cluster_state:ok")
        });
        if !all_ok {
            return false;
        }
        let topo = self.topology();
        let served: u32 = topo
            .iter()
            .filter(|(port, _, primary, _)| *primary && live.iter().any(|n| n.port == *port))
            .flat_map(|(_, _, _, r)| r.iter().map(|&(a, b)| u32::from(b - a) + 1))
            .sum();
        served == 16_384
            && topo.iter().filter(|t| !t.2).all(|(port, ..)| {
                self.cli(*port, &["info", "replication"])
                    .contains("master_link_status:up")
            })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(certs) = &self.tls {
            let _ = std::fs::remove_dir_all(certs);
        }
    }
}

/// `n` free ports whose cluster bus ports (+10000) are free too.
pub(crate) fn cluster_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut held = Vec::new();
    for _ in 0..1000 {
        if ports.len() == n {
            break;
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 55_000 {
            if let Ok(bus) = TcpListener::bind(("127.0.0.1", p + 10_000)) {
                ports.push(p);
                held.push((l, bus));
            }
        }
    }
    assert_eq!(ports.len(), n, "found free ports for the cluster");
    ports
}

impl Cluster {
    /// The 3-primary cluster shared by this test binary's non-destructive tests.
    pub(crate) fn shared() -> std::sync::Arc<Cluster> {
        use std::sync::{Arc, Weak};
        static SHARED: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.upgrade() {
            return c;
        }
        let c = Arc::new(Cluster::start(3, 0));
        *slot = Arc::downgrade(&c);
        c
    }

    /// A cluster connection for inspecting keys from a test.
    pub(crate) async fn conn(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .unwrap()
            .get_async_connection()
            .await
            .expect("connect to the test cluster")
    }
}

/// The hash slot of `key` (CRC16 of its hash tag), as Redis Cluster computes it.
pub(crate) fn slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let tag = b.iter().position(|&c| c == b'{').and_then(|o| {
        let rest = &b[o + 1..];
        rest.iter()
            .position(|&c| c == b'}')
            .filter(|&e| e > 0)
            .map(|e| &rest[..e])
    });
    let mut crc: u16 = 0;
    for &byte in tag.unwrap_or(b) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}
