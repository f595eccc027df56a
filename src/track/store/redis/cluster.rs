//! Redis Cluster specifics (feature `redis-cluster`): the cluster connection, the primaries
//! (for the sweep) and the slot map (for grouping pipelines per node).

use std::future::Future;
use std::pin::Pin;

use ::redis::cluster::{ClusterClientBuilder, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use ::redis::{Cmd, Pipeline, RedisResult, Value};
use tokio::time::timeout;

use super::conn::{Conn, NodeLink};
use super::shared::Shared;
use crate::track::store::StoreError;

/// Connects lazily to the cluster seeded by `nodes` (the connection is made in the background
/// and remade after failures).
pub(super) fn connect(
    nodes: &[String],
    command_timeout: std::time::Duration,
    tls_root: Option<&[u8]>,
) -> Result<Conn, StoreError> {
    #[allow(unused_mut)]
    let mut builder = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
        .connection_timeout(command_timeout)
        .response_timeout(command_timeout)
        .retries(4)
        .min_retry_wait(20)
        .max_retry_wait(500);
    // The `redis` crate takes a cluster's root certificate through rustls only; without
    // `redis-tls-rustls`, `RedisStoreBuilder::build` rejects the setting before this.
    #[cfg(feature = "redis-tls-rustls")]
    if let Some(pem) = tls_root {
        builder = builder.certs(::redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.to_vec()),
        });
    }
    #[cfg(not(feature = "redis-tls-rustls"))]
    debug_assert!(tls_root.is_none(), "rejected by RedisStoreBuilder::build");
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

/// One slot range and the address of the primary serving it.
pub(super) struct SlotRange {
    pub(super) start: u16,
    pub(super) end: u16,
    pub(super) host: String,
    pub(super) port: u16,
}

/// The slot map, from `CLUSTER SLOTS` (each entry: start, end, [host, port, id, …], replicas…).
pub(super) async fn slot_map(shared: &Shared) -> Result<Vec<SlotRange>, String> {
    let Conn::Cluster(mut conn) = shared.conn() else {
        return Err("not a cluster".to_owned());
    };
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
    let Value::Array(ranges) = reply else {
        return Err("unexpected CLUSTER SLOTS reply".to_owned());
    };
    let mut out = Vec::new();
    for range in ranges {
        let Value::Array(range) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(node))) =
            (range.first(), range.get(1), range.get(2))
        else {
            continue;
        };
        let (Some(host), Some(Value::Int(port))) = (node.first(), node.get(1)) else {
            continue;
        };
        let (Ok(host), Ok(port), Ok(start), Ok(end)) = (
            ::redis::from_redis_value_ref::<String>(host),
            u16::try_from(*port),
            u16::try_from(*start),
            u16::try_from(*end),
        ) else {
            continue;
        };
        out.push(SlotRange {
            start,
            end,
            host,
            port,
        });
    }
    Ok(out)
}

/// One primary, reached by address through the cluster connection.
pub(super) struct Primary {
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

/// A link to every primary.
pub(super) async fn primary_links(shared: &Shared) -> Result<Vec<Primary>, String> {
    let Conn::Cluster(conn) = shared.conn() else {
        return Err("not a cluster".to_owned());
    };
    let mut out: Vec<Primary> = Vec::new();
    for r in slot_map(shared).await? {
        if !out.iter().any(|p| p.host == r.host && p.port == r.port) {
            out.push(Primary {
                conn: conn.clone(),
                host: r.host,
                port: r.port,
            });
        }
    }
    Ok(out)
}
