//! The openraft type configuration of a zone's Raft group.

use openraft::BasicNode;

use crate::zone::command::{Command, CommandResult};

openraft::declare_raft_types!(
    /// Raft types of one zone: commands are zone commands, nodes are
    /// controller replicas addressed by their gRPC `host:port`, and
    /// snapshots are files on disk so they never sit whole in memory.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
