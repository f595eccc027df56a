//! Unit tests; `tests/redis_store.rs` drives the store through its public API.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::conn::slot_of;
use super::shared::{escape_key, new_instance_id};
use super::sweep::sweep_pattern;
use super::table::{lock, Table};
use super::tasks::{gt_unsupported, heartbeat_with, Step};
use super::{RedisStore, RedisStoreBuilder};

fn key_of(k: &str) -> String {
    let mut s = String::new();
    escape_key(&mut s, k);
    s
}

#[test]
fn escaping_is_injective_and_keeps_the_tag_closed() {
    let keys = [
        "a", "a}", "a%7D", "{a}", "a b", "a%20b", "ü", "%C3%BC", "", "-_.~@:",
    ];
    let escaped: HashSet<String> = keys.iter().map(|k| key_of(k)).collect();
    assert_eq!(escaped.len(), keys.len());
    for k in &escaped {
        assert!(!k.contains(['{', '}', ' ']), "{k}");
    }
    assert_eq!(key_of("a}b c"), "a%7Db%20c");
    assert_eq!(key_of("ü"), "%C3%BC");
}

#[test]
fn instance_ids_differ() {
    let ids: HashSet<String> = (0..1000).map(|_| new_instance_id()).collect();
    assert_eq!(ids.len(), 1000);
    assert!(ids.iter().all(|i| i.len() == 16));
}

#[test]
fn table_release_paths() {
    let t = Table::new();
    let k: Arc<str> = Arc::from("k");
    t.insert(&k, 1);
    t.insert(&k, 2);
    assert_eq!(t.live_count(), 2);
    assert!(t.release(&k, 1, true));
    assert!(!t.release(&k, 1, true), "released once");
    assert_eq!(t.releasing("k"), vec![1]);
    t.released(&k, &[1]);
    assert!(t.releasing("k").is_empty());
    let all = t.take_all();
    assert_eq!(all.len(), 1);
    assert!(!t.release(&k, 2, true), "taken by shutdown");
    assert!(lock(t.shard("k")).is_empty());
}

#[test]
fn build_rejects_bad_settings_and_needs_a_runtime() {
    assert!(
        RedisStore::builder("redis://127.0.0.1/").build().is_err(),
        "no runtime"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = || RedisStore::builder("redis://127.0.0.1:1/");
        let setting = |b: RedisStoreBuilder| b.build().unwrap_err().config().unwrap().setting();
        assert_eq!(setting(b().prefix("a{b")), "prefix");
        assert_eq!(
            setting(b().lease_ttl(Duration::from_millis(1))),
            "lease_ttl"
        );
        let hb = |d| setting(b().heartbeat_interval(d));
        assert_eq!(hb(Duration::from_secs(30)), "heartbeat_interval");
        assert_eq!(hb(Duration::ZERO), "heartbeat_interval");
        assert_eq!(
            setting(b().acquire_timeout(Duration::ZERO)),
            "acquire_timeout"
        );
        assert_eq!(
            setting(b().command_timeout(Duration::ZERO)),
            "command_timeout"
        );
        assert_eq!(setting(b().release_queue(0)), "release_queue");
        assert_eq!(setting(b().release_batch(0)), "release_batch");
        assert_eq!(setting(b().sweep_batch(0)), "sweep_batch");
        assert_eq!(setting(b().cleanup_batch(0)), "cleanup_batch");
        assert_eq!(
            setting(b().cleanup_max_iterations(0)),
            "cleanup_max_iterations"
        );
        #[cfg(feature = "redis-cluster")]
        assert_eq!(
            setting(RedisStore::cluster_builder(Vec::<String>::new())),
            "cluster_builder"
        );
        let url = RedisStore::builder("nonsense://x").build().unwrap_err();
        assert!(url.config().is_none(), "{url}");
        assert!(b().build().is_ok(), "builds without a reachable Redis");
    });
}

// ---------------------------------------------------------------------------------------------
// Against a real redis-server, for what the public API cannot reach: the order of a release
// against a heartbeat in flight.

struct TestServer {
    child: std::process::Child,
    url: String,
}

impl TestServer {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("cannot start `redis-server`: install Redis (apt-get install redis-server)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn inspect(url: &str) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn zcard(c: &mut ::redis::aio::MultiplexedConnection, key: &str) -> u64 {
    ::redis::cmd("ZCARD").arg(key).query_async(c).await.unwrap()
}

fn quiet_store(url: &str) -> RedisStore {
    // Timers far away: only the test drives heartbeats.
    RedisStore::builder(url)
        .lease_ttl(Duration::from_secs(600))
        .heartbeat_interval(Duration::from_secs(300))
        .sweep_interval(Duration::ZERO)
        .acquire_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Lets the release task run its `ZREM` and waits until Redis has answered it: one `PING`
/// round trip through the store's own connection queues behind the `ZREM` when it was sent.
async fn let_release_task_run(store: &RedisStore) {
    tokio::task::yield_now().await;
    let mut conn = store.handle.shared.conn();
    let _: () = ::redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map(|_: String| ())
        .unwrap();
}

/// Runs one heartbeat that drops `lease` when it reaches `at` (and lets the release task run
/// then); how many leases it re-added.
async fn heartbeat_releasing_at(store: &RedisStore, at: Step, lease: crate::track::Lease) -> u64 {
    let mut lease = Some(lease);
    let shared = store.handle.shared.clone();
    heartbeat_with(&shared, |step| {
        let lease = if step == at { lease.take() } else { None };
        let store = store.clone();
        async move {
            if let Some(lease) = lease {
                drop(lease);
                let_release_task_run(&store).await;
            }
        }
    })
    .await
}

/// A fresh server, a quiet store on it and two leases on key `k` (limit 5).
async fn two_leases_on_k() -> (
    TestServer,
    RedisStore,
    crate::track::Lease,
    crate::track::Lease,
) {
    let server = TestServer::start();
    let store = quiet_store(&server.url);
    let a = store.acquire_lease("k", 5).await;
    let b = store.acquire_lease("k", 5).await;
    (server, store, a, b)
}

/// Issue 15, item 12: a lease released between the heartbeat's snapshot and its pipeline is
/// not "lost": no re-add, no false "Redis restarted" warning.
#[tokio::test(flavor = "current_thread")]
async fn a_release_during_a_heartbeat_is_not_counted_as_lost() {
    let (server, store, a, b) = two_leases_on_k().await;
    let readded = heartbeat_releasing_at(&store, Step::Snapshot, b).await;
    assert_eq!(
        readded, 0,
        "the released lease was not lost, and the live one was not either"
    );
    let mut c = inspect(&server.url).await;
    assert_eq!(zcard(&mut c, &store.redis_key("k")).await, 1);
    drop(a);
}

/// Issue 15, item 12: a lease released while lost leases are being re-added is not re-added
/// (it would hold a slot until its TTL: a false 429).
#[tokio::test(flavor = "current_thread")]
async fn a_lease_released_during_a_re_add_is_not_re_added() {
    let (server, store, a, b) = two_leases_on_k().await;
    let key = store.redis_key("k");
    let mut c = inspect(&server.url).await;
    let _: () = ::redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        heartbeat_releasing_at(&store, Step::ReaddSnapshot, b).await,
        2,
        "both leases were read as live and re-added"
    );
    // Whatever the order, once the release is through only the live lease is in Redis.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.pending_releases() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the release went through"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let members: Vec<String> = ::redis::cmd("ZRANGE")
        .arg(&key)
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(members.len(), 1, "only the live lease is back: {members:?}");
    drop(a);
}

/// A lease from the store, for the tests above.
trait AcquireLease {
    async fn acquire_lease(&self, key: &str, limit: u32) -> crate::track::Lease;
}

impl AcquireLease for RedisStore {
    async fn acquire_lease(&self, key: &str, limit: u32) -> crate::track::Lease {
        use crate::track::ConnectionStore;
        self.acquire(key, limit).await.unwrap().expect("granted")
    }
}

#[test]
fn slots_match_redis_cluster() {
    // Reference values from `CLUSTER KEYSLOT`.
    assert_eq!(slot_of("123456789"), 12739);
    assert_eq!(slot_of("foo"), 12182);
    assert_eq!(slot_of("tower-drain:{alice}"), slot_of("alice"));
    assert_eq!(slot_of("a{}b"), slot_of("a{}b"));
}

#[test]
fn gt_errors_of_old_servers_are_recognised() {
    assert!(gt_unsupported(
        "ERR wrong number of arguments for 'pexpire' command"
    ));
    assert!(!gt_unsupported("WRONGTYPE Operation against a key"));
    assert_eq!(sweep_pattern("a*b"), "a\\*b:{*");
}
