//! `RedisStore` against a real Redis: `REDIS_URL` when set, else a private `redis-server`
//! (see `support::redis`). Fault tests start servers of their own.
#![cfg(feature = "redis")]

mod support;

use std::convert::Infallible;
use std::mem::ManuallyDrop;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use redis::AsyncCommands;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_drain::track::{
    ConnectionStore, Lease, RedisStore, RedisStoreBuilder, StoreFailure, TrackLayer,
};
use tower_drain::{DrainController, DrainReason};

use support::redis::{conn, eventually, redis_now, unique_prefix, Server};

fn builder(url: &str, prefix: &str) -> RedisStoreBuilder {
    // A generous acquire timeout: debug builds on a loaded 2-core machine.
    RedisStore::builder(url)
        .prefix(prefix)
        .acquire_timeout(Duration::from_secs(5))
}

async fn zcard(c: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    c.zcard(key).await.unwrap()
}

/// Members of every key under `prefix` that belong to `instance`.
async fn members_of(
    c: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    instance: &str,
) -> u64 {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(c)
            .await
            .unwrap();
        keys.extend(page);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut n = 0;
    for k in keys {
        let members: Vec<String> = c.zrange(&k, 0, -1).await.unwrap();
        n += members
            .iter()
            .filter(|m| m.starts_with(&format!("{instance}:")))
            .count() as u64;
    }
    n
}

fn counter(snap: &Snapshotter, name: &str) -> u64 {
    snap.snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, _, _, _)| k.key().name() == name)
        .map(|(_, _, _, v)| match v {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

type TestSvc = tower::util::BoxCloneService<
    Request<()>,
    Response<tower_drain::track::TrackedBody<Full<Bytes>>>,
    Infallible,
>;

fn limited_service(
    drain: &DrainController,
    store: RedisStore,
    limit: u32,
    on_error: StoreFailure,
) -> TestSvc {
    ServiceBuilder::new()
        .layer(
            TrackLayer::with_store(drain.watch(), store)
                .max_per_key(limit)
                .key_header(http::HeaderName::from_static("x-client-id"))
                .on_store_error(on_error),
        )
        .service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("data: hi\n\n"))))
        })
        .boxed_clone()
}

fn req(client: &str) -> Request<()> {
    Request::builder()
        .header("x-client-id", client)
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_holds_under_200_concurrent_acquirers() {
    let server = Server::shared();
    let prefix = unique_prefix("contention");
    let store = builder(server.url(), &prefix).build().unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.acquire("hot", 7).await.unwrap() })
        })
        .collect();
    let mut leases = Vec::new();
    for t in tasks {
        if let Some(l) = t.await.unwrap() {
            leases.push(l);
        }
    }
    assert_eq!(leases.len(), 7, "exactly the limit was granted");
    let mut c = conn(server.url()).await;
    assert_eq!(zcard(&mut c, &store.redis_key("hot")).await, 7);
    assert_eq!(store.held(), 7);
    drop(leases);
    assert_eq!(store.held(), 0);
    let key = store.redis_key("hot");
    assert!(
        eventually(Duration::from_secs(2), || {
            let mut c = c.clone();
            let key = key.clone();
            async move { zcard(&mut c, &key).await == 0 }
        })
        .await
    );
}

#[tokio::test]
async fn release_frees_at_once() {
    let server = Server::shared();
    let prefix = unique_prefix("release");
    let store = builder(server.url(), &prefix).build().unwrap();
    for _ in 0..20 {
        let lease = store.acquire("u", 1).await.unwrap().expect("granted");
        assert!(
            store.acquire("u", 1).await.unwrap().is_none(),
            "at the limit"
        );
        drop(lease);
        // No wait: the very next acquire (even before the release task ran) gets the slot.
        let again = store.acquire("u", 1).await.unwrap();
        assert!(again.is_some(), "a dropped lease frees its slot at once");
    }
    // And another process sees it freed as soon as the release task has sent its ZREM.
    let mut c = conn(server.url()).await;
    let key = store.redis_key("u");
    assert!(
        eventually(Duration::from_secs(2), || {
            let mut c = c.clone();
            let key = key.clone();
            async move { zcard(&mut c, &key).await == 0 }
        })
        .await
    );
    assert_eq!(zcard(&mut c, &key).await, 0);
}

#[tokio::test]
async fn two_stores_share_one_limit_and_keys_do_not_collide() {
    let server = Server::shared();
    let prefix = unique_prefix("pods");
    let pod_a = builder(server.url(), &prefix).build().unwrap();
    let pod_b = builder(server.url(), &prefix).build().unwrap();
    assert_ne!(pod_a.instance_id(), pod_b.instance_id());
    let a1 = pod_a.acquire("alice", 3).await.unwrap().unwrap();
    let _a2 = pod_a.acquire("alice", 3).await.unwrap().unwrap();
    let _b1 = pod_b.acquire("alice", 3).await.unwrap().unwrap();
    assert!(pod_b.acquire("alice", 3).await.unwrap().is_none());
    assert!(pod_a.acquire("alice", 3).await.unwrap().is_none());
    // Another user is independent, whichever pod asks.
    let _bob = pod_b.acquire("bob", 3).await.unwrap().unwrap();
    drop(a1);
    // Pod B's acquire may reach Redis before pod A's release task has sent its ZREM.
    let b2 = acquire_within(&pod_b, "alice", 3, Duration::from_secs(2))
        .await
        .expect("the slot pod A released");
    assert!(pod_a.acquire("alice", 3).await.unwrap().is_none());
    drop(b2);

    // Keys that look alike once escaped naively stay apart.
    let store = builder(server.url(), &prefix).build().unwrap();
    let tricky = [
        "a}", "a%7D", "a", "{a}", "a b", "a%20b", "ü", "%C3%BC", "a:b", "a:{b}",
    ];
    let mut leases = Vec::new();
    for k in tricky {
        leases.push(
            store
                .acquire(k, 1)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{k} collided")),
        );
    }
    let keys: std::collections::HashSet<String> =
        tricky.iter().map(|k| store.redis_key(k)).collect();
    assert_eq!(keys.len(), tricky.len());
    let mut c = conn(server.url()).await;
    for k in tricky {
        assert_eq!(zcard(&mut c, &store.redis_key(k)).await, 1, "{k}");
        assert!(
            store.acquire(k, 1).await.unwrap().is_none(),
            "{k} is at its own limit"
        );
    }
}

#[tokio::test]
async fn odd_characters_stay_inside_the_hash_tag() {
    let server = Server::shared();
    let prefix = unique_prefix("odd");
    let store = builder(server.url(), &prefix).build().unwrap();
    let user = "}{ weird user } 名前 🚀 {";
    let key = store.redis_key(user);
    // The hash tag is the part between the first `{` and the next `}`: the whole escaped key.
    let open = key.find('{').unwrap();
    let close = key[open..].find('}').unwrap() + open;
    assert_eq!(
        close,
        key.len() - 1,
        "the user key cannot close the tag early: {key}"
    );
    assert!(key.is_ascii());
    let l1 = store.acquire(user, 2).await.unwrap().unwrap();
    let _l2 = store.acquire(user, 2).await.unwrap().unwrap();
    assert!(store.acquire(user, 2).await.unwrap().is_none());
    let mut c = conn(server.url()).await;
    assert_eq!(zcard(&mut c, &key).await, 2);
    // The slot Redis Cluster would use is the tag's, so the key hashes like its tag alone.
    let tag = &key[open + 1..close];
    let slot_key: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap_or(-1);
    let slot_tag: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(tag)
        .query_async(&mut c)
        .await
        .unwrap_or(-2);
    if slot_key >= 0 {
        assert_eq!(slot_key, slot_tag);
    }
    drop(l1);
    assert!(store.acquire(user, 2).await.unwrap().is_some());
}

#[tokio::test]
async fn crashed_store_holds_slots_until_the_ttl_and_not_longer() {
    let server = Server::shared();
    let prefix = unique_prefix("crash");
    let ttl = Duration::from_secs(1);
    let crashed = builder(server.url(), &prefix)
        .lease_ttl(ttl)
        .build()
        .unwrap();
    let held = ManuallyDrop::new(vec![
        crashed.acquire("carol", 2).await.unwrap().unwrap(),
        crashed.acquire("carol", 2).await.unwrap().unwrap(),
    ]);
    let key = crashed.redis_key("carol");
    drop(crashed); // the "process" is gone: no heartbeat, no release
    let mut c = conn(server.url()).await;
    let scores: Vec<(String, f64)> = c.zrange_withscores(&key, 0, -1).await.unwrap();
    let expiry = scores.iter().map(|(_, s)| *s as i64).max().unwrap();

    let survivor = builder(server.url(), &prefix)
        .lease_ttl(ttl)
        .build()
        .unwrap();
    let mut refused_before = 0;
    let granted = loop {
        let now_before = redis_now(&mut c).await;
        match survivor.acquire("carol", 2).await.unwrap() {
            Some(l) => {
                let now_after = redis_now(&mut c).await;
                // A heartbeat already in flight when the store was dropped may rewrite the
                // scores from its estimate of the Redis clock, which can lag by a round trip;
                // allow the same 50 ms on this side as on the other.
                assert!(
                    now_after + 50 >= expiry,
                    "granted {} ms before the crashed leases expired",
                    expiry - now_after
                );
                break l;
            }
            None => {
                assert!(
                    now_before <= expiry + 50,
                    "still refused {} ms after the TTL",
                    now_before - expiry
                );
                refused_before += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(
        refused_before > 0,
        "the crashed slots were held until their TTL"
    );
    drop(granted);
    drop(ManuallyDrop::into_inner(held)); // their store is gone: dropping them sends nothing
}

#[tokio::test]
async fn heartbeat_keeps_leases_and_key_alive_past_several_ttls() {
    let server = Server::shared();
    let prefix = unique_prefix("heartbeat");
    let ttl = Duration::from_millis(900);
    let store = builder(server.url(), &prefix)
        .lease_ttl(ttl)
        .build()
        .unwrap();
    let other = builder(server.url(), &prefix)
        .lease_ttl(ttl)
        .build()
        .unwrap();
    let _a = store.acquire("dave", 2).await.unwrap().unwrap();
    let _b = store.acquire("dave", 2).await.unwrap().unwrap();
    let key = store.redis_key("dave");
    let mut c = conn(server.url()).await;
    let started = tokio::time::Instant::now();
    let mut last_scores = 0i64;
    while started.elapsed() < ttl * 4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now = redis_now(&mut c).await;
        let scores: Vec<(String, f64)> = c.zrange_withscores(&key, 0, -1).await.unwrap();
        assert_eq!(
            scores.len(),
            2,
            "both leases still there after {:?}",
            started.elapsed()
        );
        for (_, s) in &scores {
            assert!(*s as i64 > now, "lease score is in the future");
        }
        let pttl: i64 = c.pttl(&key).await.unwrap();
        assert!(
            pttl > 0,
            "the key's expiry moves with the leases (pttl {pttl})"
        );
        last_scores = last_scores.max(scores[0].1 as i64);
        assert!(other.acquire("dave", 2).await.unwrap().is_none());
    }
    assert!(last_scores > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cleans_up_10000_leases_and_reports_the_iteration_cap() {
    let server = Server::shared();
    let prefix = unique_prefix("cleanup");
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let store =
        metrics::with_local_recorder(&rec, || builder(server.url(), &prefix).build().unwrap());
    let leases: Vec<Lease> = futures_util::stream::iter(0..10_000)
        .map(|i| {
            let s = store.clone();
            async move {
                s.acquire(&format!("user-{}", i % 500), 100)
                    .await
                    .unwrap()
                    .unwrap()
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert_eq!(store.held(), 10_000);
    let mut c = conn(server.url()).await;
    assert_eq!(
        members_of(&mut c, &prefix, store.instance_id()).await,
        10_000
    );

    let summary = store.shutdown().await.expect("a summary");
    assert_eq!(summary.before, 10_000);
    assert_eq!(summary.total_cleaned, 10_000);
    assert_eq!(summary.after, 0);
    assert_eq!(summary.iterations, 10, "batches of 1000");
    assert!(!summary.max_iterations_reached);
    assert_eq!(members_of(&mut c, &prefix, store.instance_id()).await, 0);
    assert_eq!(
        counter(&snap, tower_drain::metrics::STALE_LEASES_CLEANED_TOTAL),
        10_000
    );
    assert!(store.is_shut_down());
    assert!(
        store.acquire("user-1", 100).await.is_err(),
        "no acquire after shutdown"
    );
    drop(leases); // dropping them afterwards sends nothing and cannot panic
    assert_eq!(members_of(&mut c, &prefix, store.instance_id()).await, 0);

    // The iteration cap: 2000 leases, 100 per batch, at most 5 batches.
    let prefix2 = unique_prefix("cleanup-cap");
    let capped = builder(server.url(), &prefix2)
        .cleanup_batch(100)
        .cleanup_max_iterations(5)
        .build()
        .unwrap();
    let _leases: Vec<Lease> = futures_util::stream::iter(0..2_000)
        .map(|i| {
            let s = capped.clone();
            async move {
                s.acquire(&format!("user-{}", i % 7), 1000)
                    .await
                    .unwrap()
                    .unwrap()
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let s = capped.shutdown().await.unwrap();
    assert_eq!(
        (s.before, s.total_cleaned, s.after, s.iterations),
        (2_000, 500, 1_500, 5)
    );
    assert!(s.max_iterations_reached);
    assert_eq!(
        members_of(&mut c, &prefix2, capped.instance_id()).await,
        1_500
    );
}

#[tokio::test]
async fn redis_killed_mid_run_fail_open_serves_and_counts_fail_closed_answers_503() {
    let server = Server::start();
    let prefix = unique_prefix("killed");
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let (drain, store) = metrics::with_local_recorder(&rec, || {
        let drain = DrainController::new();
        let store = RedisStore::builder(server.url())
            .prefix(&prefix)
            .acquire_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        (drain, store)
    });
    let open = limited_service(&drain, store.clone(), 1, StoreFailure::Open);
    let closed = limited_service(&drain, store.clone(), 1, StoreFailure::Closed);

    let first = open.clone().oneshot(req("erin")).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let second = open.clone().oneshot(req("erin")).await.unwrap();
    assert_eq!(
        second.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the limit works while Redis is up"
    );
    drop(second);

    server.kill();
    let errors_before = counter(&snap, tower_drain::metrics::STORE_ERRORS_TOTAL);
    let mut served = Vec::new();
    for _ in 0..3 {
        let res = open.clone().oneshot(req("erin")).await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::OK,
            "fail-open serves without the limit"
        );
        served.push(res);
    }
    let res = closed.clone().oneshot(req("erin")).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "fail-closed answers 503"
    );
    assert!(res.headers().contains_key(http::header::RETRY_AFTER));
    assert!(counter(&snap, tower_drain::metrics::STORE_ERRORS_TOTAL) >= errors_before + 4);
    drop(first); // its release fails quietly (counted), the TTL would reclaim it

    // Redis comes back (empty): the store reconnects by itself and limits again.
    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let _held = loop {
        let res = closed.clone().oneshot(req("frank")).await.unwrap();
        if res.status() == StatusCode::OK {
            break res;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reconnected after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let res = closed.clone().oneshot(req("frank")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    drop(served);
}

/// Acquires, retrying while refused, for at most `within`.
async fn acquire_within(
    store: &RedisStore,
    key: &str,
    limit: u32,
    within: Duration,
) -> Option<Lease> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(l) = store.acquire(key, limit).await.unwrap() {
            return Some(l);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn restarted_empty_leases_reappear(flush: bool) {
    let server = Server::start();
    let prefix = unique_prefix(if flush { "flushall" } else { "restart" });
    let ttl = Duration::from_millis(1500);
    let store = builder(server.url(), &prefix)
        .lease_ttl(ttl)
        .build()
        .unwrap();
    let _held: Vec<Lease> = vec![
        store.acquire("gina", 3).await.unwrap().unwrap(),
        store.acquire("gina", 3).await.unwrap().unwrap(),
        store.acquire("gina", 3).await.unwrap().unwrap(),
    ];
    let key = store.redis_key("gina");
    let lost_at = tokio::time::Instant::now();
    if flush {
        let mut c = conn(server.url()).await;
        let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    } else {
        server.restart();
    }
    let mut c = conn(server.url()).await;
    assert_eq!(zcard(&mut c, &key).await, 0, "Redis lost every lease");
    let other = builder(server.url(), &prefix)
        .lease_ttl(ttl)
        .build()
        .unwrap();
    // Within one heartbeat (ttl / 3 = 500 ms, plus the reconnect) the leases are back.
    assert!(
        eventually(Duration::from_secs(3), || {
            let mut c = c.clone();
            let key = key.clone();
            async move { zcard(&mut c, &key).await == 3 }
        })
        .await,
        "leases re-appeared"
    );
    assert!(
        lost_at.elapsed() < ttl + Duration::from_millis(1500),
        "took {:?}",
        lost_at.elapsed()
    );
    let pttl: i64 = c.pttl(&key).await.unwrap();
    assert!(pttl > 0, "the re-added key expires");
    assert!(
        other.acquire("gina", 3).await.unwrap().is_none(),
        "the limit holds again"
    );
}

#[tokio::test]
async fn redis_restarted_empty_leases_reappear_after_one_heartbeat() {
    restarted_empty_leases_reappear(false).await;
}

#[tokio::test]
async fn redis_flushall_leases_reappear_after_one_heartbeat() {
    restarted_empty_leases_reappear(true).await;
}

#[tokio::test]
async fn a_restarted_process_never_reuses_lease_ids() {
    let server = Server::shared();
    let prefix = unique_prefix("ids");
    let mut c = conn(server.url()).await;
    let first = builder(server.url(), &prefix).build().unwrap();
    let old = ManuallyDrop::new(first.acquire("hank", 10).await.unwrap().unwrap());
    let key = first.redis_key("hank");
    let old_id = first.instance_id().to_owned();
    drop(first); // crash: its lease stays until the TTL
    let second = builder(server.url(), &prefix).build().unwrap();
    assert_ne!(second.instance_id(), old_id);
    let _new = second.acquire("hank", 10).await.unwrap().unwrap();
    let members: Vec<String> = c.zrange(&key, 0, -1).await.unwrap();
    assert_eq!(
        members.len(),
        2,
        "the new lease did not overwrite the old one: {members:?}"
    );
    assert!(members.iter().any(|m| m.starts_with(&format!("{old_id}:"))));
    assert!(members
        .iter()
        .any(|m| m.starts_with(&format!("{}:", second.instance_id()))));
    // Many "restarts": every instance id is new.
    let ids: std::collections::HashSet<String> = (0..200)
        .map(|_| {
            builder(server.url(), &prefix)
                .build()
                .unwrap()
                .instance_id()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 200);
    drop(ManuallyDrop::into_inner(old));
}

#[tokio::test]
async fn noscript_is_recovered() {
    let server = Server::start();
    let prefix = unique_prefix("noscript");
    let store = builder(server.url(), &prefix).build().unwrap();
    let a = store.acquire("ivy", 2).await.unwrap().unwrap();
    let mut c = conn(server.url()).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    let b = store
        .acquire("ivy", 2)
        .await
        .unwrap()
        .expect("acquire after SCRIPT FLUSH");
    assert!(store.acquire("ivy", 2).await.unwrap().is_none());
    assert_eq!(zcard(&mut c, &store.redis_key("ivy")).await, 2);
    drop((a, b));
}

#[tokio::test]
async fn sweep_removes_expired_leases_of_a_crashed_store() {
    let server = Server::shared();
    let prefix = unique_prefix("sweep");
    let ttl = Duration::from_millis(600);
    let crashed = builder(server.url(), &prefix)
        .lease_ttl(ttl)
        .build()
        .unwrap();
    let leaked = ManuallyDrop::new(vec![
        crashed.acquire("jay", 10).await.unwrap().unwrap(),
        crashed.acquire("jay", 10).await.unwrap().unwrap(),
        crashed.acquire("kim", 10).await.unwrap().unwrap(),
    ]);
    drop(crashed);
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let alive = metrics::with_local_recorder(&rec, || {
        builder(server.url(), &prefix)
            .lease_ttl(ttl)
            .sweep_interval(Duration::from_millis(300))
            .build()
            .unwrap()
    });
    // A live lease on the same key keeps the key (and so the expired members) around.
    let _mine = alive.acquire("jay", 10).await.unwrap().unwrap();
    let key = alive.redis_key("jay");
    let c = conn(server.url()).await;
    assert!(
        eventually(Duration::from_secs(3), || {
            let mut c = c.clone();
            let key = key.clone();
            async move { zcard(&mut c, &key).await == 1 }
        })
        .await,
        "expired leases were swept"
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            counter(&snap, tower_drain::metrics::STALE_LEASES_CLEANED_TOTAL) >= 2
        })
        .await
    );
    drop(ManuallyDrop::into_inner(leaked));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_summary_lands_in_the_shutdown_report() {
    let server = Server::shared();
    let prefix = unique_prefix("report");
    let drain = DrainController::builder()
        .grace_period(Duration::from_millis(300))
        .build()
        .unwrap();
    let store = builder(server.url(), &prefix).build().unwrap();
    let mut svc = limited_service(&drain, store.clone(), 2, StoreFailure::Closed);
    // Two streams that never end by themselves (their bodies are held).
    let s1 = svc.ready().await.unwrap().call(req("lee")).await.unwrap();
    let s2 = svc.ready().await.unwrap().call(req("lee")).await.unwrap();
    assert_eq!((s1.status(), s2.status()), (StatusCode::OK, StatusCode::OK));
    let third = svc.ready().await.unwrap().call(req("lee")).await.unwrap();
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    let mut c = conn(server.url()).await;
    assert_eq!(zcard(&mut c, &store.redis_key("lee")).await, 2);

    drain.drain(DrainReason::Manual);
    let report = drain.report().await;
    let cleanup = report
        .store_cleanup
        .clone()
        .expect("the redis store reports its clean-up");
    assert_eq!(
        (cleanup.before, cleanup.total_cleaned, cleanup.after),
        (2, 2, 0)
    );
    assert!(!cleanup.max_iterations_reached);
    assert_eq!(report.force_closed, 2);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["store_cleanup"]["total_cleaned"], 2);
    assert_eq!(
        zcard(&mut c, &store.redis_key("lee")).await,
        0,
        "nothing left in Redis"
    );
    drop((s1, s2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_without_redis_and_stops_its_tasks_when_dropped() {
    let rt = tokio::runtime::Handle::current();
    let baseline = rt.metrics().num_alive_tasks();
    // Nothing listens on port 1: build succeeds, acquire fails fast with an error.
    let store = RedisStore::builder("redis://127.0.0.1:1/")
        .acquire_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    assert!(store.acquire("x", 1).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        rt.metrics().num_alive_tasks() > baseline,
        "background tasks run"
    );
    drop(store);
    assert!(
        eventually(Duration::from_secs(5), || async {
            rt.metrics().num_alive_tasks() <= baseline
        })
        .await,
        "background tasks stopped: {} alive, {} before",
        rt.metrics().num_alive_tasks(),
        baseline
    );

    // Same with a live Redis, leases and a shutdown.
    let server = Server::shared();
    let store = builder(server.url(), &unique_prefix("tasks"))
        .build()
        .unwrap();
    let lease = store.acquire("y", 1).await.unwrap().unwrap();
    let _ = store.shutdown().await;
    drop(lease);
    drop(store);
    assert!(
        eventually(Duration::from_secs(5), || async {
            rt.metrics().num_alive_tasks() <= baseline
        })
        .await,
        "background tasks stopped after shutdown"
    );
}

/// `SCAN` calls the server has answered so far.
async fn scan_calls(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_scan:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Issue 15, item 11: a sweep paging through 100,000 foreign keys must not hold up the
/// heartbeat, or this process's leases expire while it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_sweep_over_100000_foreign_keys_does_not_delay_the_heartbeat() {
    let server = Server::start();
    let mut c = conn(server.url()).await;
    for chunk in 0..100 {
        let mut mset = redis::cmd("MSET");
        for i in 0..1000 {
            mset.arg(format!("foreign:{chunk}:{i}")).arg(1);
        }
        let _: () = mset.query_async(&mut c).await.unwrap();
    }
    let dbsize: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    assert!(dbsize >= 100_000);
    let prefix = unique_prefix("long-sweep");
    let ttl = Duration::from_millis(300);
    // Five keys per SCAN page: one sweep takes some 20,000 round trips, many TTLs.
    let store = builder(server.url(), &prefix)
        .lease_ttl(ttl)
        .heartbeat_interval(Duration::from_millis(100))
        .sweep_interval(Duration::from_millis(150))
        .sweep_batch(5)
        .build()
        .unwrap();
    let other = builder(server.url(), &prefix)
        .lease_ttl(ttl)
        .sweep_interval(Duration::ZERO)
        .build()
        .unwrap();
    let _lease = store.acquire("zed", 1).await.unwrap().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut c = c.clone();
            async move { scan_calls(&mut c).await > 0 }
        })
        .await,
        "the sweep started"
    );
    let scans_before = scan_calls(&mut c).await;
    let window = ttl * 4;
    let started = tokio::time::Instant::now();
    while started.elapsed() < window {
        assert!(
            other.acquire("zed", 1).await.unwrap().is_none(),
            "the lease expired {:?} into a sweep: the heartbeat was held up",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let scans = scan_calls(&mut c).await - scans_before;
    assert!(
        scans > 500,
        "the sweep kept paging during the window ({scans} SCANs)"
    );
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster (feature `redis-cluster`): local clusters on private ports.

#[cfg(feature = "redis-cluster")]
mod cluster {
    use std::collections::HashSet;

    use super::*;
    use support::redis::cluster::{slot, Cluster};

    type CConn = redis::cluster_async::ClusterConnection;

    fn cbuilder(cl: &Cluster, prefix: &str) -> RedisStoreBuilder {
        RedisStore::cluster_builder(cl.urls())
            .prefix(prefix)
            .acquire_timeout(Duration::from_secs(5))
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user-{i}")).collect()
    }

    async fn zcard(c: &mut CConn, key: &str) -> u64 {
        c.zcard(key).await.unwrap()
    }

    /// How many members of `key` belong to `instance`.
    async fn mine(c: &mut CConn, key: &str, instance: &str) -> usize {
        let members: Vec<String> = c.zrange(key, 0, -1).await.unwrap();
        members
            .iter()
            .filter(|m| m.starts_with(&format!("{instance}:")))
            .count()
    }

    /// Keys under `prefix` on the node at `port` (a plain connection: that node only).
    async fn keys_on_node(port: u16, prefix: &str) -> Vec<String> {
        let mut c = conn(&format!("redis://127.0.0.1:{port}/")).await;
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .unwrap();
            out.extend(page);
            if next == 0 {
                return out;
            }
            cursor = next;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_stores_share_a_limit_on_30_keys_over_every_primary() {
        let cl = Cluster::shared();
        let prefix = unique_prefix("cl-share");
        let a = cbuilder(&cl, &prefix).build().unwrap();
        let b = cbuilder(&cl, &prefix).build().unwrap();
        let keys = names(30);
        let primaries: HashSet<u16> = keys
            .iter()
            .map(|k| cl.primary_of(slot(&a.redis_key(k))))
            .collect();
        assert_eq!(primaries.len(), 3, "the keys hash to every primary");
        let mut from_a = Vec::new();
        let mut from_b = Vec::new();
        for k in &keys {
            from_a.push(a.acquire(k, 2).await.unwrap().expect("first slot"));
            from_b.push(b.acquire(k, 2).await.unwrap().expect("second slot"));
            assert!(a.acquire(k, 2).await.unwrap().is_none(), "{k}: limit holds");
            assert!(b.acquire(k, 2).await.unwrap().is_none(), "{k}: limit holds");
        }
        let mut c = cl.conn().await;
        for k in &keys {
            assert_eq!(zcard(&mut c, &a.redis_key(k)).await, 2);
        }
        // Releases free slots on every primary.
        drop(from_a);
        assert!(
            eventually(Duration::from_secs(5), || async {
                a.pending_releases() == 0
            })
            .await,
            "releases sent"
        );
        let mut again = Vec::new();
        for k in &keys {
            assert_eq!(zcard(&mut c, &a.redis_key(k)).await, 1, "{k}");
            again.push(b.acquire(k, 2).await.unwrap().expect("freed slot"));
        }
        // Heartbeats over every slot lose nothing.
        assert_eq!(a.heartbeat_now().await, 0);
        assert_eq!(b.heartbeat_now().await, 0);
        drop((from_b, again));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_of_a_store_dropped_without_clean_up_expire_on_every_primary() {
        let cl = Cluster::shared();
        let prefix = unique_prefix("cl-expire");
        let ttl = Duration::from_millis(600);
        let crashed = cbuilder(&cl, &prefix).lease_ttl(ttl).build().unwrap();
        let keys = names(30);
        let mut leaked = Vec::new();
        for k in &keys {
            leaked.push(crashed.acquire(k, 1).await.unwrap().unwrap());
        }
        let leaked = ManuallyDrop::new(leaked);
        drop(crashed);
        let other = cbuilder(&cl, &prefix).lease_ttl(ttl).build().unwrap();
        let started = tokio::time::Instant::now();
        assert!(other.acquire(&keys[0], 1).await.unwrap().is_none());
        let mut granted = Vec::new();
        for k in &keys {
            let lease = loop {
                if let Some(l) = other.acquire(k, 1).await.unwrap() {
                    break l;
                }
                assert!(started.elapsed() < ttl * 4, "{k}: expired after the TTL");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            granted.push(lease);
        }
        assert!(started.elapsed() >= ttl / 2, "not freed before the TTL");
        drop(ManuallyDrop::into_inner(leaked));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_clean_up_empties_every_primary_and_adds_up() {
        let cl = Cluster::shared();
        let prefix = unique_prefix("cl-cleanup");
        let store = cbuilder(&cl, &prefix).cleanup_batch(64).build().unwrap();
        let keys = names(30);
        let mut held = Vec::new();
        for k in &keys {
            for _ in 0..10 {
                held.push(store.acquire(k, 10).await.unwrap().unwrap());
            }
        }
        let ports: Vec<u16> = cl
            .topology()
            .into_iter()
            .filter(|t| t.2)
            .map(|t| t.0)
            .collect();
        assert_eq!(ports.len(), 3);
        for &p in &ports {
            assert!(!keys_on_node(p, &prefix).await.is_empty(), "keys on {p}");
        }
        let s = store.shutdown().await.expect("a summary");
        assert_eq!((s.before, s.total_cleaned, s.after), (300, 300, 0));
        assert_eq!(s.before, s.total_cleaned + s.after);
        assert!(s.iterations >= 300 / 64 && !s.max_iterations_reached);
        for &p in &ports {
            assert_eq!(
                keys_on_node(p, &prefix).await,
                Vec::<String>::new(),
                "node {p}"
            );
        }
        drop(held);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sweep_runs_on_every_primary() {
        let cl = Cluster::shared();
        let prefix = unique_prefix("cl-sweep");
        let keys = names(30);
        // Live leases with a long TTL keep every key alive; the crashed store's expire.
        let live = cbuilder(&cl, &prefix)
            .sweep_interval(Duration::ZERO)
            .build()
            .unwrap();
        let crashed = cbuilder(&cl, &prefix)
            .lease_ttl(Duration::from_millis(300))
            .build()
            .unwrap();
        let mut held = Vec::new();
        let mut leaked = Vec::new();
        for k in &keys {
            held.push(live.acquire(k, 5).await.unwrap().unwrap());
            leaked.push(crashed.acquire(k, 5).await.unwrap().unwrap());
        }
        let leaked = ManuallyDrop::new(leaked);
        drop(crashed);
        let rec = DebuggingRecorder::new();
        let snap = rec.snapshotter();
        let sweeper = metrics::with_local_recorder(&rec, || {
            cbuilder(&cl, &prefix)
                .sweep_interval(Duration::from_millis(200))
                .build()
                .unwrap()
        });
        let c = cl.conn().await;
        assert!(
            eventually(Duration::from_secs(5), || {
                let mut c = c.clone();
                let keys: Vec<String> = keys.iter().map(|k| live.redis_key(k)).collect();
                async move {
                    for k in &keys {
                        if zcard(&mut c, k).await != 1 {
                            return false;
                        }
                    }
                    true
                }
            })
            .await,
            "the expired leases were swept from every key"
        );
        assert!(counter(&snap, tower_drain::metrics::STALE_LEASES_CLEANED_TOTAL) >= 30);
        drop((sweeper, held, ManuallyDrop::into_inner(leaked)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_store_starts_before_its_cluster_and_connects_when_it_is_up() {
        let ports = support::redis::cluster::cluster_ports(3);
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect();
        let store = RedisStore::cluster_builder(urls)
            .prefix(unique_prefix("cl-late"))
            .acquire_timeout(Duration::from_millis(300))
            .build()
            .expect("builds while no node is up");
        assert!(store.acquire("lee", 1).await.is_err(), "no cluster yet");
        let cl = tokio::task::spawn_blocking(move || Cluster::start_on(ports, 0))
            .await
            .unwrap();
        let mut granted = None;
        for _ in 0..100 {
            if let Ok(Some(l)) = store.acquire("lee", 1).await {
                granted = Some(l);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(granted.is_some(), "connected once the cluster was up");
        assert!(store.acquire("lee", 1).await.unwrap().is_none());
        drop((granted, cl));
    }

    /// `rediss://` seeds: the cluster client reaches every node over TLS with the test CA (a
    /// cluster's root certificate goes through rustls only).
    #[cfg(feature = "redis-tls-rustls")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tls_cluster_shares_a_limit_and_cleans_up() {
        let (cl, ca) = tokio::task::spawn_blocking(Cluster::start_tls)
            .await
            .unwrap();
        let prefix = unique_prefix("cl-tls");
        let store = cbuilder(&cl, &prefix)
            .tls_root_certificate(ca)
            .build()
            .unwrap();
        let keys = names(30);
        let mut held = Vec::new();
        for k in &keys {
            held.push(
                store
                    .acquire(k, 1)
                    .await
                    .expect("TLS to every primary")
                    .unwrap(),
            );
            assert!(
                store.acquire(k, 1).await.unwrap().is_none(),
                "{k}: limit holds"
            );
        }
        assert_eq!(store.heartbeat_now().await, 0);
        let s = store.shutdown().await.unwrap();
        assert_eq!((s.before, s.total_cleaned, s.after), (30, 30, 0));
        drop(held);
    }

    /// Counter value of `tower_drain_store_errors_total{op}`.
    fn op_errors(snap: &Snapshotter, op: &str) -> u64 {
        snap.snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, _, _, _)| {
                k.key().name() == tower_drain::metrics::STORE_ERRORS_TOTAL
                    && k.key().labels().any(|l| l.key() == "op" && l.value() == op)
            })
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(n) => n,
                _ => 0,
            })
            .sum()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failover_serves_during_the_election_and_restores_every_live_lease() {
        let cl = Cluster::start(3, 1);
        let prefix = unique_prefix("cl-failover");
        let heartbeat = Duration::from_millis(300);
        let store = cbuilder(&cl, &prefix)
            .lease_ttl(Duration::from_secs(3))
            .heartbeat_interval(heartbeat)
            .acquire_timeout(Duration::from_millis(300))
            .command_timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        let drain = DrainController::new();
        let mut svc = limited_service(&drain, store.clone(), 1, StoreFailure::Open);
        let keys = names(30);
        // 30 open streams, one per key (limit 1), then 10 of them end.
        let mut streams = Vec::new();
        for k in &keys {
            let res = svc.ready().await.unwrap().call(req(k)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            streams.push(Some(res));
        }
        for k in &keys {
            let res = svc.ready().await.unwrap().call(req(k)).await.unwrap();
            assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "{k}");
        }
        for s in streams.iter_mut().step_by(3) {
            s.take();
        }
        assert!(
            eventually(Duration::from_secs(5), || async {
                store.pending_releases() == 0
            })
            .await
        );
        let live: Vec<bool> = streams.iter().map(Option::is_some).collect();
        // The replicas have everything written so far; the victim owns the first key.
        let topo = cl.topology();
        for (port, _, primary, _) in &topo {
            if *primary {
                cl.cli(*port, &["wait", "1", "2000"]);
            }
        }
        let victim_port = cl.primary_of(slot(&store.redis_key(&keys[0])));
        let on_victim: Vec<usize> = (0..keys.len())
            .filter(|&i| cl.primary_of(slot(&store.redis_key(&keys[i]))) == victim_port)
            .collect();
        let victim = cl.nodes.iter().find(|n| n.port == victim_port).unwrap();
        victim.kill();
        // During the election: requests for keys of the dead primary are served (fail-open).
        let during = svc
            .ready()
            .await
            .unwrap()
            .call(req(&keys[0]))
            .await
            .unwrap();
        assert_ne!(during.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(during);
        let free_on_victim = on_victim.iter().find(|&&i| !live[i]).copied();
        if let Some(i) = free_on_victim {
            let res = svc
                .ready()
                .await
                .unwrap()
                .call(req(&keys[i]))
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK, "served during the election");
        }
        let cl_ref = &cl;
        tokio::task::block_in_place(|| cl_ref.wait_ok(Duration::from_secs(15)));
        // Within one heartbeat (the next tick, and the one already under way), every live
        // stream's lease is back and no ended stream's lease is.
        let mut c = cl.conn().await;
        let instance = store.instance_id().to_owned();
        let redis_keys: Vec<String> = keys.iter().map(|k| store.redis_key(k)).collect();
        // A write the promoted replica never received (replication is asynchronous): the
        // lease of a live stream on the failed primary's slots is gone.
        let lost = on_victim
            .iter()
            .copied()
            .find(|&i| live[i])
            .expect("a live stream on the failed primary");
        let _: () = c.del(&redis_keys[lost]).await.unwrap();
        assert_eq!(mine(&mut c, &redis_keys[lost], &instance).await, 0);
        let ok = eventually(heartbeat * 2, || {
            let mut c = c.clone();
            let (redis_keys, live, instance) = (redis_keys.clone(), live.clone(), instance.clone());
            async move {
                for (k, live) in redis_keys.iter().zip(&live) {
                    if mine(&mut c, k, &instance).await != usize::from(*live) {
                        return false;
                    }
                }
                true
            }
        })
        .await;
        assert!(ok, "every live lease is back, nothing phantom");
        for (k, live) in keys.iter().zip(&live) {
            let res = svc.ready().await.unwrap().call(req(k)).await.unwrap();
            if *live {
                assert_eq!(
                    res.status(),
                    StatusCode::TOO_MANY_REQUESTS,
                    "{k}: limit true again"
                );
            } else {
                assert_eq!(res.status(), StatusCode::OK, "{k}: free slot");
            }
        }
        drop(streams);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resharding_with_open_streams_gives_no_false_429_and_loses_no_lease() {
        let cl = Cluster::start(3, 0);
        let prefix = unique_prefix("cl-reshard");
        let rec = DebuggingRecorder::new();
        let snap = rec.snapshotter();
        let (a, b) = metrics::with_local_recorder(&rec, || {
            let b = || {
                cbuilder(&cl, &prefix)
                    .lease_ttl(Duration::from_secs(2))
                    .heartbeat_interval(Duration::from_millis(200))
            };
            (b().build().unwrap(), b().build().unwrap())
        });
        // 20 keys in the slots that move (0..300), and user-0..user-9 (mostly elsewhere).
        let mut keys: Vec<String> = (10..)
            .map(|i| format!("user-{i}"))
            .filter(|k| slot(&a.redis_key(k)) < 300)
            .take(20)
            .collect();
        keys.extend(names(10));
        let mut held = Vec::new();
        for k in &keys {
            held.push(a.acquire(k, 2).await.unwrap().unwrap());
        }
        let topo = cl.topology();
        let from = topo.iter().find(|t| t.3.iter().any(|r| r.0 == 0)).unwrap();
        let to = topo.iter().find(|t| t.2 && t.0 != from.0).unwrap();
        let args = [
            "--cluster".to_owned(),
            "reshard".to_owned(),
            format!("127.0.0.1:{}", from.0),
            "--cluster-from".to_owned(),
            from.1.clone(),
            "--cluster-to".to_owned(),
            to.1.clone(),
            "--cluster-slots".to_owned(),
            "300".to_owned(),
            "--cluster-yes".to_owned(),
        ];
        let reshard = std::thread::spawn(move || {
            std::process::Command::new("redis-cli")
                .args(&args)
                .output()
                .unwrap()
        });
        // While slots move: the second slot of every key is always granted, never a 429.
        let mut rounds = 0;
        let mut acquire_errors = 0;
        while !reshard.is_finished() {
            for k in &keys {
                match b.acquire(k, 2).await {
                    Ok(Some(lease)) => drop(lease),
                    Ok(None) => {
                        let mut c = cl.conn().await;
                        let members: Vec<(String, i64)> =
                            c.zrange_withscores(b.redis_key(k), 0, -1).await.unwrap();
                        panic!(
                            "{k}: false 429 during resharding: {members:?}, a={}, b={}, release errors {}, heartbeat errors {}",
                            a.instance_id(),
                            b.instance_id(),
                            op_errors(&snap, "release"),
                            op_errors(&snap, "heartbeat")
                        )
                    }
                    Err(_) => acquire_errors += 1,
                }
            }
            rounds += 1;
        }
        let out = reshard.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(rounds >= 1);
        assert_eq!(acquire_errors, 0, "MOVED / ASK followed");
        let moved = cl
            .topology()
            .into_iter()
            .find(|t| t.0 == to.0)
            .map(|t| t.3.iter().any(|r| r.0 == 0))
            .unwrap();
        assert!(moved, "slot 0 moved");
        // No lease lost: a's leases are all there, so the limit of 1 holds for each key.
        assert_eq!(a.heartbeat_now().await, 0, "nothing to re-add");
        for k in &keys {
            assert!(
                b.acquire(k, 1).await.unwrap().is_none(),
                "{k}: a's lease held"
            );
        }
        assert_eq!(op_errors(&snap, "heartbeat"), 0);
        assert_eq!(op_errors(&snap, "release"), 0);
        drop(held);
    }
}

/// `rediss://` against a local TLS-only redis-server whose certificate a test CA signed.
#[cfg(any(feature = "redis-tls-rustls", feature = "redis-tls-native"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca() {
    let server = support::redis::TlsServer::start();
    let prefix = unique_prefix("tls");
    let store = builder(&server.url, &prefix)
        .tls_root_certificate(server.ca_pem.clone())
        .build()
        .unwrap();
    let a = store
        .acquire("tia", 1)
        .await
        .expect("TLS connection")
        .unwrap();
    assert!(
        store.acquire("tia", 1).await.unwrap().is_none(),
        "limit holds"
    );
    assert_eq!(store.heartbeat_now().await, 0);
    drop(a);
    assert!(
        eventually(Duration::from_secs(5), || async {
            store.pending_releases() == 0
        })
        .await
    );
    let b = store.acquire("tia", 1).await.unwrap().expect("released");
    let summary = store.shutdown().await.unwrap();
    assert_eq!(
        (summary.before, summary.total_cleaned, summary.after),
        (1, 1, 0)
    );
    drop(b);

    // Without the CA the certificate is not trusted: acquire fails (fail-open / closed).
    let untrusted = builder(&server.url, &prefix)
        .acquire_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    assert!(untrusted.acquire("tia", 1).await.is_err());
}

/// A foreign key of the wrong type fails its own command, not the whole heartbeat: the other
/// keys are refreshed and their lost leases re-added, and the error is counted once per key.
#[tokio::test]
async fn a_wrong_type_key_does_not_fail_the_heartbeat() {
    let server = Server::shared();
    let prefix = unique_prefix("wrongtype");
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let store = metrics::with_local_recorder(&rec, || {
        builder(server.url(), &prefix)
            .heartbeat_interval(Duration::from_secs(9))
            .build()
            .unwrap()
    });
    let lost = store.acquire("lost", 5).await.unwrap().unwrap();
    let clobbered = store.acquire("clobbered", 5).await.unwrap().unwrap();
    let mut c = conn(server.url()).await;
    let _: () = c.del(store.redis_key("lost")).await.unwrap();
    let _: () = c
        .set(store.redis_key("clobbered"), "a string")
        .await
        .unwrap();
    assert_eq!(store.heartbeat_now().await, 1, "the lost lease is re-added");
    assert_eq!(zcard(&mut c, &store.redis_key("lost")).await, 1);
    let heartbeat_errors: u64 = snap
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, _, _, _)| {
            k.key().name() == tower_drain::metrics::STORE_ERRORS_TOTAL
                && k.key()
                    .labels()
                    .any(|l| l.key() == "op" && l.value() == "heartbeat")
        })
        .map(|(_, _, _, v)| match v {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum();
    assert!(heartbeat_errors >= 1, "counted under op=heartbeat");
    drop((lost, clobbered));
}

/// A key's expiry only moves later: a process with a shorter `lease_ttl` on the same prefix
/// does not cut the key of one with a longer TTL short (acquire nor heartbeat).
#[tokio::test]
async fn a_shorter_ttl_never_shortens_a_keys_expiry() {
    let server = Server::shared();
    let prefix = unique_prefix("monotonic");
    let long = builder(server.url(), &prefix)
        .lease_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let short = builder(server.url(), &prefix)
        .lease_ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    let _l = long.acquire("mo", 5).await.unwrap().unwrap();
    let key = long.redis_key("mo");
    let mut c = conn(server.url()).await;
    let pttl = |c: &mut redis::aio::MultiplexedConnection| {
        let key = key.clone();
        let mut c = c.clone();
        async move { c.pttl::<_, i64>(&key).await.unwrap() }
    };
    assert!(pttl(&mut c).await > 50_000);
    let _s = short.acquire("mo", 5).await.unwrap().unwrap();
    assert!(
        pttl(&mut c).await > 50_000,
        "acquire kept the longer expiry"
    );
    assert_eq!(short.heartbeat_now().await, 0);
    assert!(
        pttl(&mut c).await > 50_000,
        "heartbeat kept the longer expiry"
    );
    // And a longer TTL still extends a shorter one.
    let k2 = short.redis_key("mo2");
    let _s2 = short.acquire("mo2", 5).await.unwrap().unwrap();
    let _l2 = long.acquire("mo2", 5).await.unwrap().unwrap();
    assert!(c.pttl::<_, i64>(&k2).await.unwrap() > 50_000);
}

/// An absurd duration is rejected at build time, naming the setting (it used to be accepted
/// and overflow `Instant + Duration` in the store's tasks).
#[tokio::test]
async fn absurd_durations_are_rejected_naming_the_setting() {
    let huge = Duration::from_secs(u64::MAX);
    let b = || RedisStore::builder("redis://127.0.0.1:1/");
    let cases: [(RedisStoreBuilder, &str); 6] = [
        (b().lease_ttl(huge), "lease_ttl"),
        (b().heartbeat_interval(huge), "heartbeat_interval"),
        (b().acquire_timeout(huge), "acquire_timeout"),
        (b().command_timeout(huge), "command_timeout"),
        (b().sweep_interval(huge), "sweep_interval"),
        (b().cleanup_timeout(huge), "cleanup_timeout"),
    ];
    for (builder, setting) in cases {
        let err = builder.build().unwrap_err();
        assert_eq!(err.config().map(|c| c.setting()), Some(setting), "{err}");
        assert!(err.to_string().contains(setting), "{setting}: {err}");
    }
}
