//! One controller replica's Raft node and its access to the state machine:
//! proposing commands, linearizable read barriers, typed reads of the
//! applied state, and the leader's identity. The gRPC layer and the leader
//! tasks build on this; it knows nothing of tonic.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use rocksdb::DB;

use super::error::ApiError;
use crate::config::ControllerConfig;
use crate::raft::types::{NodeId, Raft};
use crate::store::db::{self, DbError, CF_HOSTS, CF_INSTANCES, CF_JOURNAL, CF_NAMES, CF_PODS};
use crate::zone::command::{Command, CommandResult};
use crate::zone::model::{
    FenceRecord, Host, Instance, InstanceDevices, JournalEntry, KeyValue, LeaderStamp, Move,
    Network, Pod, PodProfile, SanPool, StaleCopy, Volume,
};

/// How long a proposal may wait for commit before the caller gets an indeterminate result.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a linearizable read may wait for the leader to confirm itself.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Node {
    pub id: NodeId,
    pub zone: String,
    /// The address other replicas and clients reach this replica at.
    pub addr: String,
    pub raft: Raft,
    pub db: Arc<DB>,
    pub config: ControllerConfig,
}

impl From<DbError> for ApiError {
    fn from(error: DbError) -> ApiError {
        ApiError::Internal(error.to_string())
    }
}

impl Node {
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Returns the leader's id and address, as this replica last learned them.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        let node: &BasicNode = metrics.membership_config.membership().get_node(&leader)?;
        Some((leader, node.addr.clone()))
    }

    /// This replica's leader id, when it is the leader.
    pub fn leader_stamp(&self) -> Option<LeaderStamp> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return None;
        }
        let vote = metrics.vote;
        Some(LeaderStamp {
            term: vote.leader_id().get_term(),
            node_id: vote.leader_id().voted_for().unwrap_or(self.id),
        })
    }

    pub fn not_leader(&self) -> ApiError {
        match self.leader() {
            Some((id, addr)) if id != self.id => ApiError::NotLeader { leader: Some(addr) },
            _ => ApiError::NoLeader,
        }
    }

    /// Proposes a command and waits for its result from apply.
    pub async fn propose(&self, command: Command) -> Result<CommandResult, ApiError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let kind = command.kind();
        let started = Instant::now();
        let outcome = tokio::time::timeout(WRITE_TIMEOUT, self.raft.client_write(command)).await;
        metrics::histogram!("ccs_raft_proposal_seconds", "command" => kind)
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Err(_) => Err(ApiError::Timeout(WRITE_TIMEOUT)),
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                // The entry may have been appended before leadership moved.
                Err(ApiError::LeaderChanged)
            }
            Ok(Err(e)) => Err(ApiError::Internal(e.to_string())),
        }
    }

    /// Waits until this replica, as leader, has applied every write committed
    /// before the call, so that a local read that follows is linearizable.
    pub async fn read_barrier(&self) -> Result<(), ApiError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        if self.config.unsafe_canary.local_reads {
            // The canary trusts this replica's belief that it leads, which a
            // deposed leader keeps until it receives a newer term.
            return Ok(());
        }
        match tokio::time::timeout(READ_TIMEOUT, self.raft.ensure_linearizable()).await {
            Err(_) => Err(ApiError::NoLeader),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(_))) => Err(self.not_leader()),
            Ok(Err(e)) => Err(ApiError::Internal(e.to_string())),
        }
    }

    pub fn pods(&self) -> Result<BTreeMap<String, Pod>, ApiError> {
        let pods: Vec<Pod> = db::scan(&self.db, CF_PODS)?;
        Ok(pods.into_iter().map(|pod| (pod.name.clone(), pod)).collect())
    }

    pub fn pod(&self, name: &str) -> Result<Option<Pod>, ApiError> {
        Ok(db::get(&self.db, CF_PODS, name.as_bytes())?)
    }

    /// Reads a pod's profile, or returns the default one for a pod created
    /// before profiles existed.
    pub fn pod_profile(&self, name: &str) -> Result<PodProfile, ApiError> {
        let stored: Option<PodProfile> = db::get(&self.db, db::CF_POD_PROFILES, name.as_bytes())?;
        Ok(stored.unwrap_or_default())
    }

    pub fn networks(&self) -> Result<Vec<Network>, ApiError> {
        Ok(db::scan(&self.db, db::CF_NETWORKS)?)
    }

    pub fn network(&self, name: &str) -> Result<Option<Network>, ApiError> {
        Ok(db::get(&self.db, db::CF_NETWORKS, name.as_bytes())?)
    }

    pub fn hosts(&self) -> Result<Vec<Host>, ApiError> {
        Ok(db::scan(&self.db, CF_HOSTS)?)
    }

    pub fn host(&self, id: &str) -> Result<Option<Host>, ApiError> {
        Ok(db::get(&self.db, CF_HOSTS, id.as_bytes())?)
    }

    pub fn instances(&self) -> Result<Vec<Instance>, ApiError> {
        Ok(db::scan(&self.db, CF_INSTANCES)?)
    }

    /// Finds an instance by name, or by id when no instance has that name.
    pub fn instance(&self, name_or_id: &str) -> Result<Option<Instance>, ApiError> {
        let id: Option<String> = db::get(&self.db, CF_NAMES, name_or_id.as_bytes())?;
        let id = id.unwrap_or_else(|| name_or_id.to_string());
        Ok(db::get(&self.db, CF_INSTANCES, id.as_bytes())?)
    }

    pub fn instance_by_request(&self, request_id: &str) -> Result<Option<Instance>, ApiError> {
        let first: Option<Instance> = db::get(&self.db, db::CF_REQUESTS, request_id.as_bytes())?;
        let Some(first) = first else {
            return Ok(None);
        };
        let current: Option<Instance> = db::get(&self.db, CF_INSTANCES, first.id.as_bytes())?;
        Ok(Some(current.unwrap_or(first)))
    }

    pub fn key(&self, key: &str) -> Result<Option<KeyValue>, ApiError> {
        Ok(db::get(&self.db, db::CF_KEYS, key.as_bytes())?)
    }

    pub fn order(&self, id: u64) -> Result<Option<JournalEntry>, ApiError> {
        Ok(db::get(&self.db, CF_JOURNAL, &db::index_key(id))?)
    }

    pub fn volumes(&self) -> Result<Vec<Volume>, ApiError> {
        Ok(db::scan(&self.db, db::CF_VOLUMES)?)
    }

    /// Finds a volume by name, or by id when no volume has that name.
    pub fn volume(&self, name_or_id: &str) -> Result<Option<Volume>, ApiError> {
        let id: Option<String> = db::get(&self.db, db::CF_VOLUME_NAMES, name_or_id.as_bytes())?;
        let id = id.unwrap_or_else(|| name_or_id.to_string());
        Ok(db::get(&self.db, db::CF_VOLUMES, id.as_bytes())?)
    }

    pub fn san_pool(&self, pod: &str) -> Result<Option<SanPool>, ApiError> {
        Ok(db::get(&self.db, db::CF_SAN_POOLS, pod.as_bytes())?)
    }

    /// Returns an instance's devices, or none when it has no record.
    pub fn devices(&self, instance_id: &str) -> Result<InstanceDevices, ApiError> {
        let stored: Option<InstanceDevices> = db::get(&self.db, db::CF_DEVICES, instance_id.as_bytes())?;
        Ok(stored.unwrap_or_default())
    }

    /// Migrations in progress, by instance id.
    pub fn moves(&self) -> Result<BTreeMap<String, Move>, ApiError> {
        let moves: Vec<Move> = db::scan(&self.db, db::CF_MOVES)?;
        Ok(moves.into_iter().map(|m| (m.instance_id.clone(), m)).collect())
    }

    pub fn move_of(&self, instance_id: &str) -> Result<Option<Move>, ApiError> {
        Ok(db::get(&self.db, db::CF_MOVES, instance_id.as_bytes())?)
    }

    pub fn stale_copies(&self) -> Result<Vec<StaleCopy>, ApiError> {
        Ok(db::scan(&self.db, db::CF_STALE_COPIES)?)
    }

    pub fn fence(&self, host: &str) -> Result<Option<FenceRecord>, ApiError> {
        Ok(db::get(&self.db, db::CF_FENCES, host.as_bytes())?)
    }

    /// Last applied log index of this replica.
    pub fn applied_index(&self) -> u64 {
        let metrics = self.raft.metrics().borrow().clone();
        metrics.last_applied.map_or(0, |id| id.index)
    }
}
