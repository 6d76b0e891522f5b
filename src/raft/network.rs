//! Raft transport over gRPC: the client side openraft uses to reach other
//! replicas, and the server side that hands their requests to the local
//! node. Payloads are openraft's own types encoded with bincode.

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use super::types::{NodeId, Raft, TypeConfig};
use crate::proto::raft::raft_transport_client::RaftTransportClient;
use crate::proto::raft::raft_transport_server::RaftTransport;
use crate::proto::raft::RaftPayload;

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("raft messages always encode")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map(|(v, _)| v)
}

/// Creates one connection per peer replica.
#[derive(Clone, Default)]
pub struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        Connection {
            target,
            addr: node.addr.clone(),
            client: None,
        }
    }
}

pub struct Connection {
    target: NodeId,
    addr: String,
    client: Option<RaftTransportClient<Channel>>,
}

impl Connection {
    fn client(&mut self) -> Result<RaftTransportClient<Channel>, NetworkError> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|e| NetworkError::new(&e))?
            .connect_timeout(std::time::Duration::from_secs(1))
            .tcp_nodelay(true);
        let client = RaftTransportClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Sends one request and decodes the remote node's `Result`.
    async fn call<Req, Resp, E>(
        &mut self,
        kind: RpcKind,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut client = self.client().map_err(RPCError::Network)?;
        let mut message = tonic::Request::new(RaftPayload { data: encode(request) });
        message.set_timeout(option.hard_ttl());
        let reply = match kind {
            RpcKind::Append => client.append_entries(message).await,
            RpcKind::Vote => client.vote(message).await,
            RpcKind::Snapshot => client.install_snapshot(message).await,
        };
        let reply = match reply {
            Ok(reply) => reply.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                // Drop the channel so the next call reconnects from scratch.
                self.client = None;
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Err(status) => return Err(RPCError::Network(NetworkError::new(&status))),
        };
        let result: Result<Resp, E> =
            decode(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(RpcKind::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(RpcKind::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(RpcKind::Vote, &rpc, &option).await
    }
}

/// The gRPC service that feeds peers' Raft requests to the local node.
pub struct TransportService {
    pub raft: Raft,
}

fn decode_request<T: DeserializeOwned>(request: tonic::Request<RaftPayload>) -> Result<T, tonic::Status> {
    decode(&request.into_inner().data)
        .map_err(|e| tonic::Status::invalid_argument(format!("undecodable raft payload: {e}")))
}

fn reply<T: Serialize>(value: &T) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
    Ok(tonic::Response::new(RaftPayload { data: encode(value) }))
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode_request(request)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: VoteRequest<NodeId> = decode_request(request)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode_request(request)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}
