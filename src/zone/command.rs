//! Commands in the zone's Raft log and the results apply returns for them.
//!
//! New variants go at the end of `Command`: entries already in a log are
//! decoded by position, so reordering would change their meaning.

use serde::{Deserialize, Serialize};

use super::model::{
    FenceRecord, Host, Instance, InstanceDevices, JournalEntry, KeyValue, LeaderStamp, Network,
    NetworkMode, ObservedState, OrderAction, OrderOutcome, Pod, PodProfile, SanPool, Volume,
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
    /// Marks a network deleting; `ReleaseNetwork` removes it once no host
    /// carries it.
    DeleteNetwork {
        name: String,
    },
    /// Creates an instance placed by the leader, with volumes (ids) attached
    /// and one NIC per network name; apply leases the NICs' addresses.
    CreateInstanceWithDevices {
        id: String,
        name: String,
        vcpus: u32,
        memory_mib: u64,
        disk_gib: u64,
        pod: String,
        host: String,
        request_id: Option<String>,
        volumes: Vec<String>,
        networks: Vec<String>,
    },
    /// Records the capacity of a SAN pod's shared pool, reported by the
    /// agent that fronts the array.
    RegisterSanPool {
        pod: String,
        host: String,
        capacity_gib: u64,
    },
    /// Creates a volume in a DAS host's local pool (`host` set, chosen by
    /// the leader) or in a SAN pod's shared pool (`host` is `None`).
    CreateVolume {
        id: String,
        name: String,
        pod: String,
        host: Option<String>,
        size_gib: u64,
    },
    DeleteVolume {
        id: String,
    },
    AttachVolume {
        volume_id: String,
        instance_id: String,
    },
    DetachVolume {
        volume_id: String,
    },
    /// Adds a NIC on `network` to an instance, with a leased address.
    AttachNic {
        instance_id: String,
        network: String,
    },
    /// Removes the instance's NIC on `network` and releases its lease.
    DetachNic {
        instance_id: String,
        network: String,
    },
    /// Records a volume order before the leader sends it.
    OpenVolumeOrder {
        volume_id: String,
        action: OrderAction,
        leader: LeaderStamp,
    },
    /// Records an order to destroy a stale copy of an instance on `host`.
    OpenEvictOrder {
        instance_id: String,
        host: String,
        leader: LeaderStamp,
    },
    /// Removes a deleting network that no host carries any more and
    /// releases its segmentation id.
    ReleaseNetwork {
        name: String,
    },
    /// Starts migrating a running SAN instance to host `to`.
    MigrateInstance {
        instance_id: String,
        to: String,
    },
    /// Stops or resumes placements on a host.
    SetHostDraining {
        host_id: String,
        draining: bool,
    },
    /// Records that the fencing driver powered a suspect host off. Its DAS
    /// instances become lost; its SAN instances may now restart elsewhere.
    FenceHost {
        host_id: String,
        leader: LeaderStamp,
        method: String,
    },
    /// Moves an instance of a fenced host to host `to`, where the
    /// reconciler starts it; the fenced host keeps a stale copy to evict.
    EvacuateInstance {
        instance_id: String,
        to: String,
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
            Command::CreateInstanceWithDevices { .. } => "create_instance_with_devices",
            Command::RegisterSanPool { .. } => "register_san_pool",
            Command::CreateVolume { .. } => "create_volume",
            Command::DeleteVolume { .. } => "delete_volume",
            Command::AttachVolume { .. } => "attach_volume",
            Command::DetachVolume { .. } => "detach_volume",
            Command::AttachNic { .. } => "attach_nic",
            Command::DetachNic { .. } => "detach_nic",
            Command::OpenVolumeOrder { .. } => "open_volume_order",
            Command::OpenEvictOrder { .. } => "open_evict_order",
            Command::ReleaseNetwork { .. } => "release_network",
            Command::MigrateInstance { .. } => "migrate_instance",
            Command::SetHostDraining { .. } => "set_host_draining",
            Command::FenceHost { .. } => "fence_host",
            Command::EvacuateInstance { .. } => "evacuate_instance",
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
    #[error("host {host:?} is in pod {host_pod:?}, not in pod {pod:?}; choose a host of pod {pod:?}")]
    HostNotInPod {
        host: String,
        host_pod: String,
        pod: String,
    },
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
    #[error("volume {0:?} not found")]
    UnknownVolume(String),
    #[error("volume name {0:?} is already taken")]
    VolumeNameTaken(String),
    #[error("volume id {0:?} is already taken")]
    VolumeIdTaken(String),
    #[error(
        "volume {volume:?} lives in the local pool of host {volume_host:?} (DAS pod {pod:?}), \
         but instance {instance:?} runs on host {instance_host:?}; a DAS volume attaches only \
         to instances on its own host"
    )]
    VolumeHostMismatch {
        volume: String,
        volume_host: String,
        pod: String,
        instance: String,
        instance_host: String,
    },
    #[error("volume {volume:?} is in pod {volume_pod:?}, but instance {instance:?} is in pod {instance_pod:?}")]
    VolumePodMismatch {
        volume: String,
        volume_pod: String,
        instance: String,
        instance_pod: String,
    },
    #[error("volume {volume:?} is attached to instance {instance:?}; detach it first")]
    VolumeAttached { volume: String, instance: String },
    #[error("volume {volume:?} is not attached to any instance")]
    VolumeNotAttached { volume: String },
    #[error("volume {volume:?} is {state}, not available; wait until `ccs volume show` says it is available")]
    VolumeNotAvailable { volume: String, state: String },
    #[error("{pool} has no room for {size_gib} GiB: {free_gib} GiB of {capacity_gib} GiB free")]
    PoolFull {
        pool: String,
        size_gib: u64,
        free_gib: u64,
        capacity_gib: u64,
    },
    #[error(
        "SAN pod {0:?} has no shared pool yet: its SAN agent has not registered with \
         san_pool_gib set in its config"
    )]
    NoSanPool(String),
    #[error("host {host:?} is not the SAN agent of pod {pod:?}; the pod names {expected}")]
    NotSanAgent {
        host: String,
        pod: String,
        expected: String,
    },
    #[error("instance {instance:?} already has a NIC on network {network:?}")]
    NicExists { instance: String, network: String },
    #[error("instance {instance:?} has no NIC on network {network:?}")]
    NoSuchNic { instance: String, network: String },
    #[error("network {network:?} is {state}; it takes no new NICs")]
    NetworkNotActive { network: String, state: String },
    #[error("network {network:?} is in pod {network_pod:?}, but instance {instance:?} is in pod {instance_pod:?}")]
    NetworkPodMismatch {
        network: String,
        network_pod: String,
        instance: String,
        instance_pod: String,
    },
    #[error("network {network:?} has no free address left in {cidr}; detach NICs or use a larger subnet")]
    SubnetExhausted { network: String, cidr: String },
    #[error(
        "network {network:?} still has NICs, held by instances: {}; detach them first",
        .instances.join(", ")
    )]
    NetworkInUse {
        network: String,
        instances: Vec<String>,
    },
    #[error("network {0:?} is not deleting")]
    NetworkNotDeleting(String),
    #[error(
        "instance {instance:?} is in DAS pod {pod:?}: its disks live on host {host:?}, so it \
         cannot move; only SAN pods migrate"
    )]
    NotMigratable {
        instance: String,
        pod: String,
        host: String,
    },
    #[error("instance {instance:?} is already migrating to host {to:?}")]
    AlreadyMoving { instance: String, to: String },
    #[error("instance {instance:?} is {state}, not running; only running instances migrate")]
    NotRunning { instance: String, state: String },
    #[error("instance {instance:?} already runs on host {host:?}")]
    SameHost { instance: String, host: String },
    #[error(
        "host {host:?} still holds a stale copy of instance {instance:?} that its agent has not \
         destroyed yet; choose another host"
    )]
    StaleCopyPending { instance: String, host: String },
    #[error("host {host:?} is {health}; only a suspect host is fenced")]
    HostNotSuspect { host: String, health: String },
    #[error("host {host:?} is {health}, not fenced; its instances stay until it is")]
    HostNotFenced { host: String, health: String },
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
    Volume(Volume),
    /// An instance with its devices after a create or device change.
    Devices(Instance, InstanceDevices),
    SanPool(SanPool),
    Fence(FenceRecord),
}

/// Formats an optional zone key value for messages: quoted, or "no value".
fn describe_value(value: &Option<String>) -> String {
    match value {
        Some(value) => format!("{value:?}"),
        None => "no value (the key does not exist)".to_string(),
    }
}
