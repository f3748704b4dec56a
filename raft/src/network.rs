//! The only HTTP client of the crate: Raft RPCs and forwarded requests to peers.
//!
//! Everything that dials another member goes through [`ClusterClient`]: HTTPS only,
//! with the rustls configuration the application hands in (client certificate, server
//! verification). Connections are pooled and reused, so a Raft RPC costs no handshake.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
use openraft::network::{Backoff, RPCOption};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{RPCTypes, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::TypeConfig;
use crate::wire::SnapshotChunk;
use crate::{DbError, Member, NodeId};

/// Request path prefix shared by every cluster endpoint of this crate.
pub(crate) const PREFIX: &str = "/raft";

/// How a call to a peer failed, before any interpretation of its answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// No connection could be made: the peer is down or the address is wrong.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The peer did not answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The peer answered 503: it is shutting down.
    #[error("peer is shutting down")]
    Unavailable,
    /// The peer has no such endpoint: it runs an earlier version.
    #[error("the peer has no such endpoint")]
    NotFound,
    /// Any other transport, status or decoding failure.
    #[error("{0}")]
    Other(String),
}

impl CallError {
    pub(crate) fn into_db_error(self, addr: &str) -> DbError {
        DbError::Network { addr: addr.to_string(), reason: self.to_string() }
    }
}

/// Pooled HTTP client for cluster traffic; cheap to clone.
/// The one way cluster traffic builds its HTTP client (Raft here, worker sync and
/// token joins in the application): the given mutual-TLS configuration, no proxy (an
/// `HTTP_PROXY` meant for the outside world must not capture peer traffic), a bounded
/// connect and pooled connections, so no RPC pays a handshake.
pub fn cluster_http_builder(
    tls: std::sync::Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .no_proxy()
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
}

#[derive(Clone, Debug)]
pub(crate) struct ClusterClient {
    http: reqwest::Client,
}

impl ClusterClient {
    pub(crate) fn new(connect_timeout: Duration, tls: std::sync::Arc<rustls::ClientConfig>) -> Result<Self, DbError> {
        let http = cluster_http_builder(tls, connect_timeout)
            .build()
            .map_err(|e| DbError::Storage(format!("cannot build the cluster HTTP client: {e}")))?;
        Ok(ClusterClient { http })
    }

    /// POSTs `body` as JSON to `https://{addr}/raft{path}` and decodes the JSON answer,
    /// giving up after `timeout`.
    pub(crate) async fn post<Req, Resp>(
        &self,
        addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let url = format!("https://{addr}{PREFIX}{path}");
        let send = self.http.post(&url).timeout(timeout).json(body).send();
        // reqwest's own timeout covers the body too; the outer one also bounds DNS.
        let resp = match tokio::time::timeout(timeout, send).await {
            Err(_) => return Err(CallError::Timeout(timeout)),
            Ok(Err(e)) => return Err(classify(e, timeout)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            return Err(CallError::Unavailable);
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(CallError::NotFound);
        }
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(CallError::Other(format!("HTTP {status} from {url}: {text}")));
        }
        match tokio::time::timeout(timeout, resp.json::<Resp>()).await {
            Err(_) => Err(CallError::Timeout(timeout)),
            Ok(Err(e)) => Err(classify(e, timeout)),
            Ok(Ok(v)) => Ok(v),
        }
    }
}

fn classify(e: reqwest::Error, timeout: Duration) -> CallError {
    if e.is_timeout() {
        CallError::Timeout(timeout)
    } else if e.is_connect() {
        CallError::Connect(e.to_string())
    } else {
        CallError::Other(e.to_string())
    }
}

/// Builds one [`PeerNetwork`] per replication target.
pub(crate) struct NetworkFactory {
    pub(crate) id: NodeId,
    pub(crate) client: ClusterClient,
    /// Upper bound of every Raft RPC, on top of openraft's own per-RPC deadline.
    pub(crate) rpc_timeout: Duration,
    /// Pause before retrying a peer that could not be reached.
    pub(crate) backoff: Duration,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerNetwork {
        PeerNetwork {
            id: self.id,
            target,
            addr: node.cluster_addr.clone(),
            client: self.client.clone(),
            rpc_timeout: self.rpc_timeout,
            backoff: self.backoff,
        }
    }
}

/// Raft RPCs to one peer.
pub(crate) struct PeerNetwork {
    id: NodeId,
    target: NodeId,
    addr: String,
    client: ClusterClient,
    rpc_timeout: Duration,
    backoff: Duration,
}

impl PeerNetwork {
    async fn rpc<Req, Resp, E>(
        &self,
        path: &str,
        action: RPCTypes,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let answer: Result<Resp, RaftError<NodeId, E>> =
            self.client.post(&self.addr, path, req, timeout).await.map_err(|e| match e {
                // Unreachable makes openraft back off instead of retrying at once.
                CallError::Connect(_) | CallError::Unavailable => RPCError::Unreachable(Unreachable::new(&e)),
                CallError::Timeout(t) => {
                    RPCError::Timeout(Timeout { action, id: self.id, target: self.target, timeout: t })
                }
                CallError::NotFound | CallError::Other(_) => RPCError::Network(NetworkError::new(&e)),
            })?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let timeout = option.hard_ttl().min(self.rpc_timeout);
        self.rpc("/append", RPCTypes::AppendEntries, &rpc, timeout).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>>
    {
        let chunk = SnapshotChunk::from(rpc);
        // The last chunk also installs the snapshot on the receiver, which may take
        // longer than an ordinary RPC: openraft's install_snapshot_timeout governs it.
        let timeout = option.hard_ttl().max(self.rpc_timeout);
        self.rpc("/snapshot", RPCTypes::InstallSnapshot, &chunk, timeout).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let timeout = option.hard_ttl().min(self.rpc_timeout);
        self.rpc("/vote", RPCTypes::Vote, &rpc, timeout).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.backoff))
    }
}
