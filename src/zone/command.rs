//! Commands in the zone's Raft log and the results apply returns for them.
//!
//! New variants go at the end of `Command`: entries already in a log are
//! decoded by position, so reordering would change their meaning.

use serde::{Deserialize, Serialize};

use super::model::{
    Host, Instance, JournalEntry, KeyValue, LeaderStamp, Network, NetworkMode, ObservedState,
    OrderAction, OrderOutcome, Pod, PodProfile,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Creates a pod without a stored profile, so it reads as
    /// `PodProfile::default()`. Leaders propose `CreatePodWithProfile`
    /// instead; apply keeps this variant for logs written before profiles.
    CreatePod {
        pod: Pod,
    },
    /// Adds a host, or refreshes a known host's endpoint and capacity.
    RegisterHost {
        id: String,
        pod: String,
        libvirt_uri: String,
        agent_endpoint: String,
        cpus: u32,
        memory_mib: u64,
        disk_gib: u64,
        boot_id: u64,
    },
    SetHostHealth {
        host_id: String,
        up: bool,
    },
    /// Creates an instance already placed on `host` by the leader's scheduler.
    CreateInstance {
        id: String,
        name: String,
        vcpus: u32,
        memory_mib: u64,
        disk_gib: u64,
        pod: String,
        host: String,
        request_id: Option<String>,
    },
    DeleteInstance {
        id: String,
    },
    /// Records an order before the leader sends it to an agent.
    OpenOrder {
        instance_id: String,
        action: OrderAction,
        generation: u64,
        leader: LeaderStamp,
    },
    /// Records an order's outcome.
    CloseOrder {
        order_id: u64,
        outcome: OrderOutcome,
    },
    /// Records what a host reported about an instance outside any order.
    ObserveInstance {
        instance_id: String,
        observed: ObservedState,
    },
    /// Sets a zone key.
    PutKey {
        key: String,
        value: String,
    },
    /// Sets a zone key if it contains `expected`, or if it is absent when
    /// `expected` is `None`.
    CompareAndSwapKey {
        key: String,
        expected: Option<String>,
        value: String,
    },
    /// Creates a pod with its profile and opens its segmentation id range.
    CreatePodWithProfile {
        pod: Pod,
        profile: PodProfile,
    },
    /// Creates a tenant network; apply allocates the lowest free
    /// segmentation id of the pod's range. `cidr` is validated by the leader.
    CreateNetwork {
        name: String,
        pod: String,
        cidr: String,
    },
    /// Deletes a network and releases its segmentation id.
    DeleteNetwork {
        name: String,
    },
}

impl Command {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreatePod { .. } => "create_pod",
            Command::RegisterHost { .. } => "register_host",
            Command::SetHostHealth { .. } => "set_host_health",
            Command::CreateInstance { .. } => "create_instance",
            Command::DeleteInstance { .. } => "delete_instance",
            Command::OpenOrder { .. } => "open_order",
            Command::CloseOrder { .. } => "close_order",
            Command::ObserveInstance { .. } => "observe_instance",
            Command::PutKey { .. } => "put_key",
            Command::CompareAndSwapKey { .. } => "compare_and_swap_key",
            Command::CreatePodWithProfile { .. } => "create_pod_with_profile",
            Command::CreateNetwork { .. } => "create_network",
            Command::DeleteNetwork { .. } => "delete_network",
        }
    }
}

/// Why apply turned a command down. Apply is deterministic, so every replica
/// rejects the same command for the same reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("pod {0:?} already exists")]
    PodExists(String),
    #[error("pod {0:?} not found")]
    UnknownPod(String),
    #[error("host {0:?} not found")]
    UnknownHost(String),
    #[error("host {host:?} belongs to pod {pod:?}; a host cannot change pods")]
    HostPodMismatch { host: String, pod: String },
    #[error("instance {0:?} not found")]
    UnknownInstance(String),
    #[error("instance name {0:?} is already taken")]
    NameTaken(String),
    #[error("instance id {0:?} is already taken")]
    IdTaken(String),
    #[error("host {host:?} has no room for {vcpus} vCPUs, {memory_mib} MiB, {disk_gib} GiB")]
    HostFull {
        host: String,
        vcpus: u32,
        memory_mib: u64,
        disk_gib: u64,
    },
    #[error("host {0:?} is not up")]
    HostNotUp(String),
    #[error("order {0} not found")]
    UnknownOrder(u64),
    #[error("order {0} is already closed")]
    OrderClosed(u64),
    #[error("instance {instance:?} already has open order {order}")]
    OrderOpen { instance: String, order: u64 },
    #[error("key {key:?} holds {}, not the expected {}; read it and retry with its current value", describe_value(.actual), describe_value(.expected))]
    KeyMismatch {
        key: String,
        expected: Option<String>,
        actual: Option<String>,
    },
    #[error("instance {instance:?} is at generation {current}, not {requested}")]
    StaleGeneration {
        instance: String,
        current: u64,
        requested: u64,
    },
    #[error("network name {0:?} is already taken")]
    NetworkNameTaken(String),
    #[error("network {0:?} not found")]
    UnknownNetwork(String),
    #[error(
        "pod {pod:?} has no free {} left in its range {first}..{last}; delete networks \
         it no longer needs, or {}",
        .mode.id_name(),
        .mode.exhaustion_advice()
    )]
    SegmentationRangeExhausted {
        pod: String,
        mode: NetworkMode,
        first: u32,
        last: u32,
    },
}

/// The value apply returns for one command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Membership changes and blank entries.
    Empty,
    Pod(Pod),
    Host(Host),
    Instance(Instance),
    /// A create whose request id was applied before: the first instance.
    Duplicate(Instance),
    Order(JournalEntry),
    Key(KeyValue),
    Rejected(Rejection),
    /// A pod created by `CreatePodWithProfile`.
    ProfiledPod(Pod, PodProfile),
    Network(Network),
}

/// Formats an optional zone key value for messages: quoted, or "no value".
fn describe_value(value: &Option<String>) -> String {
    match value {
        Some(value) => format!("{value:?}"),
        None => "no value (the key does not exist)".to_string(),
    }
}
