//! Redis Cluster specifics (feature `redis-cluster`): the cluster connection, and the sweep
//! that runs on every primary.
//!
//! Everything else works on a cluster because every command touches one key and every
//! pipeline is grouped by hash slot (see `conn::by_slot`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ::redis::cluster::{ClusterClientBuilder, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use ::redis::{Cmd, Pipeline, RedisResult, Value};
use tokio::time::timeout;

use super::conn::{run_all, Conn};
use super::shared::{Op, Shared};
use super::tasks::{sweep_node, NodeLink};
use crate::track::store::StoreError;

/// Connects lazily to the cluster seeded by `nodes` (the connection is made in the background
/// and remade after failures).
pub(super) fn connect(
    nodes: &[String],
    command_timeout: std::time::Duration,
    tls_root: Option<&[u8]>,
) -> Result<Conn, StoreError> {
    let mut builder = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
        .connection_timeout(command_timeout)
        .response_timeout(command_timeout)
        .retries(4)
        .min_retry_wait(20)
        .max_retry_wait(500);
    if let Some(_pem) = tls_root {
        #[cfg(any(feature = "redis-tls-rustls", feature = "redis-tls-native"))]
        {
            builder = builder.certs(::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(_pem.to_vec()),
            });
        }
    }
    let client = builder
        .build()
        .map_err(|e| StoreError::with_source("invalid redis cluster nodes", e))?;
    let config = ClusterConfig::new()
        .set_connection_timeout(command_timeout)
        .set_response_timeout(command_timeout);
    Ok(Conn::Cluster(
        client.get_pending_async_connection_with_config(config),
    ))
}

/// One primary, reached by address through the cluster connection.
struct Primary {
    conn: ClusterConnection,
    host: String,
    port: u16,
}

impl Primary {
    fn route(&self) -> SingleNodeRoutingInfo {
        SingleNodeRoutingInfo::ByAddress {
            host: self.host.clone(),
            port: self.port,
        }
    }
}

impl NodeLink for Primary {
    fn query<'a>(
        &'a mut self,
        cmd: Cmd,
    ) -> Pin<Box<dyn Future<Output = RedisResult<Value>> + Send + 'a>> {
        let route = RoutingInfo::SingleNode(self.route());
        Box::pin(self.conn.route_command(cmd, route))
    }

    fn query_pipe<'a>(
        &'a mut self,
        pipe: Pipeline,
        count: usize,
    ) -> Pin<Box<dyn Future<Output = RedisResult<Vec<Value>>> + Send + 'a>> {
        // Pinned to the node, so keys of several slots may share it; a key that moved
        // answers MOVED in its own reply and is left to the next sweep.
        let route = self.route();
        Box::pin(async move { self.conn.route_pipeline(pipe, 0, count, route).await })
    }
}

/// The primaries, from `CLUSTER SLOTS` (each entry: start, end, [host, port, id], replicas…).
async fn primaries(
    shared: &Shared,
    conn: &mut ClusterConnection,
) -> Result<Vec<(String, u16)>, String> {
    let reply = timeout(
        shared.command_timeout,
        conn.route_command(
            ::redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        ),
    )
    .await
    .map_err(|_| "timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let ranges: Vec<Vec<Value>> = ::redis::from_redis_value(reply).map_err(|e| e.to_string())?;
    let mut out: Vec<(String, u16)> = Vec::new();
    for range in ranges {
        let Some(Value::Array(node)) = range.get(2) else {
            continue;
        };
        let (Some(host), Some(Value::Int(port))) = (node.first(), node.get(1)) else {
            continue;
        };
        let Ok(host) = ::redis::from_redis_value_ref::<String>(host) else {
            continue;
        };
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        if !out.contains(&(host.clone(), port)) {
            out.push((host, port));
        }
    }
    Ok(out)
}

/// Sweeps every primary concurrently; returns how many expired leases were removed.
pub(super) async fn sweep_primaries(shared: &Arc<Shared>) -> u64 {
    let Conn::Cluster(mut conn) = shared.conn() else {
        return 0;
    };
    let nodes = match primaries(shared, &mut conn).await {
        Ok(n) => n,
        Err(e) => {
            shared.fail(Op::Sweep, "sweep (listing the primaries)", &e);
            return 0;
        }
    };
    let sweeps = nodes.into_iter().map(|(host, port)| {
        let shared = shared.clone();
        let link = Primary {
            conn: conn.clone(),
            host,
            port,
        };
        async move { sweep_node(&shared, link).await }
    });
    run_all(sweeps.collect()).await.into_iter().sum()
}
