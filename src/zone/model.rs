//! Records of the zone state machine: pods and their profiles, hosts,
//! instances, tenant networks and the operation journal. These are plain
//! data; the rules that change them live in `zone::apply`, and nothing here
//! does I/O.
//!
//! Records are stored with bincode, which decodes fields by position, so a
//! stored record type never gains fields: new attributes go into a record
//! of their own (as `PodProfile` did for `Pod`).

use serde::{Deserialize, Serialize};

/// How the scheduler chooses among hosts that fit a request in one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    /// Fill the most used host first, keeping whole hosts free.
    Pack,
    /// Use the least used host first, spreading load and failure impact.
    Spread,
}

impl Placement {
    pub fn parse(text: &str) -> Option<Placement> {
        match text {
            "pack" => Some(Placement::Pack),
            "spread" => Some(Placement::Spread),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Pack => "pack",
            Placement::Spread => "spread",
        }
    }
}

/// A group of hosts that share oversubscription ratios and a placement policy.
///
/// Its storage and network attributes are in `PodProfile`, a separate record
/// under the same name: `Pod` is in databases and Raft logs written before
/// profiles existed, and bincode cannot decode it with more fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    /// Schedulable vCPUs per physical CPU.
    pub cpu_ratio: f64,
    /// Schedulable memory per byte of physical memory.
    pub memory_ratio: f64,
    pub placement: Placement,
}

/// The storage model of a pod: where its instances keep their disks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageModel {
    /// Direct-attached storage: every host has local disks.
    Das,
    /// One shared array, fronted by one agent, serves every host of the pod.
    San,
}

impl StorageModel {
    pub fn parse(text: &str) -> Option<StorageModel> {
        match text {
            "das" => Some(StorageModel::Das),
            "san" => Some(StorageModel::San),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StorageModel::Das => "das",
            StorageModel::San => "san",
        }
    }
}

/// The isolation technique of a pod's tenant networks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    /// 802.1Q VLANs: segmentation ids 1 to 4094.
    Vlan,
    /// VXLAN overlay: 24-bit VNIs, 1 to 16777215.
    Vxlan,
}

impl NetworkMode {
    pub fn parse(text: &str) -> Option<NetworkMode> {
        match text {
            "vlan" => Some(NetworkMode::Vlan),
            "vxlan" => Some(NetworkMode::Vxlan),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Vlan => "vlan",
            NetworkMode::Vxlan => "vxlan",
        }
    }

    /// Returns the segmentation ids the mode can carry: usable VLAN ids (0 and 4095
    /// are reserved by 802.1Q), or every non-zero 24-bit VNI.
    pub fn max_range(self) -> (u32, u32) {
        match self {
            NetworkMode::Vlan => (1, 4094),
            NetworkMode::Vxlan => (1, (1 << 24) - 1),
        }
    }

    /// Returns what to do, besides deleting networks, when a pod runs out of ids.
    pub fn exhaustion_advice(self) -> &'static str {
        match self {
            NetworkMode::Vlan => "create the network in a vxlan pod",
            NetworkMode::Vxlan => "create the network in a pod with a wider range",
        }
    }

    /// Returns the name of one segmentation id in this mode, for messages.
    pub fn id_name(self) -> &'static str {
        match self {
            NetworkMode::Vlan => "VLAN id",
            NetworkMode::Vxlan => "VNI",
        }
    }
}

/// A pod's storage, workload and network attributes, stored beside its
/// `Pod` record under the pod's name. A pod created before profiles existed
/// has none stored and reads as `PodProfile::default()`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodProfile {
    pub storage: StorageModel,
    /// Host id of the agent that fronts a SAN pod's array; `None` in a DAS pod.
    pub san_agent: Option<String>,
    /// Free text that names what the pod's hosts are for, e.g. "general" or "gpu".
    pub workload_class: String,
    /// Schedulable disk per unit of physical disk.
    ///
    /// NOTE: recorded and shown only; placement still checks disk against
    /// the host's configured size, as if the ratio were 1.
    pub storage_ratio: f64,
    pub network: NetworkMode,
    /// First segmentation id (VLAN id or VNI) that networks draw from.
    pub segmentation_first: u32,
    /// Last segmentation id, inclusive.
    pub segmentation_last: u32,
}

impl Default for PodProfile {
    fn default() -> Self {
        let (first, last) = NetworkMode::Vlan.max_range();
        PodProfile {
            storage: StorageModel::Das,
            san_agent: None,
            workload_class: DEFAULT_WORKLOAD_CLASS.to_string(),
            storage_ratio: 1.0,
            network: NetworkMode::Vlan,
            segmentation_first: first,
            segmentation_last: last,
        }
    }
}

/// The workload class of a pod created without one.
pub const DEFAULT_WORKLOAD_CLASS: &str = "general";

/// Whether a network can be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkState {
    Active,
    /// Deleted by a client; the segmentation id is released once no host
    /// carries the network any more.
    ///
    /// NOTE: no host carries networks yet, so delete removes the record at
    /// once and nothing sets this state so far.
    Deleting,
}

impl NetworkState {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkState::Active => "active",
            NetworkState::Deleting => "deleting",
        }
    }
}

/// A tenant network: an isolated layer-2 segment of one pod with an IPv4 subnet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub pod: String,
    /// The pod's network mode when the network was created.
    pub mode: NetworkMode,
    /// VLAN id or VNI, allocated by apply from the pod's range.
    pub segmentation_id: u32,
    /// IPv4 subnet in CIDR notation with its host bits zero, e.g. "10.0.0.0/24".
    pub cidr: String,
    /// Log index of the command that created the network.
    pub created_index: u64,
    pub state: NetworkState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostHealth {
    /// Heartbeats arrive on time.
    Up,
    /// Heartbeats stopped; the host may still run its domains.
    Suspect,
    /// Powered off by the fencing driver, and the fence is committed: its
    /// domains no longer run, so its SAN instances may run elsewhere.
    Fenced,
    /// Up, but the scheduler places nothing new on it: its instances are
    /// migrating away.
    Draining,
}

impl HostHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            HostHealth::Up => "up",
            HostHealth::Suspect => "suspect",
            HostHealth::Fenced => "fenced",
            HostHealth::Draining => "draining",
        }
    }

    /// Whether the host's agent takes orders: it is up, or up and draining.
    pub fn takes_orders(self) -> bool {
        matches!(self, HostHealth::Up | HostHealth::Draining)
    }
}

/// A hypervisor host, as registered by its agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub id: String,
    pub pod: String,
    pub libvirt_uri: String,
    /// gRPC address of the host's agent, `host:port`.
    pub agent_endpoint: String,
    /// Physical CPUs, from libvirt's node info.
    pub cpus: u32,
    /// Physical memory in MiB, from libvirt's node info.
    pub memory_mib: u64,
    /// Local disk in GiB, from the agent's configuration.
    pub disk_gib: u64,
    pub used_vcpus: u32,
    pub used_memory_mib: u64,
    pub used_disk_gib: u64,
    pub instances: u32,
    pub health: HostHealth,
    /// Changes at every agent start; a new value means the host lost its domains.
    pub boot_id: u64,
}

impl Host {
    /// Schedulable vCPUs after the pod's oversubscription.
    pub fn vcpu_limit(&self, pod: &Pod) -> u64 {
        (f64::from(self.cpus) * pod.cpu_ratio).floor() as u64
    }

    /// Schedulable memory in MiB after the pod's oversubscription.
    pub fn memory_limit_mib(&self, pod: &Pod) -> u64 {
        (self.memory_mib as f64 * pod.memory_ratio).floor() as u64
    }

    /// Whether a request of this size fits beside what the host already holds.
    pub fn fits(&self, pod: &Pod, vcpus: u32, memory_mib: u64, disk_gib: u64) -> bool {
        u64::from(self.used_vcpus) + u64::from(vcpus) <= self.vcpu_limit(pod)
            && self.used_memory_mib + memory_mib <= self.memory_limit_mib(pod)
            && self.used_disk_gib + disk_gib <= self.disk_gib
    }
}

/// The state an instance should be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DesiredState {
    Running,
    /// Deleted by a client; the record goes once the domain is destroyed.
    Deleted,
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "running",
            DesiredState::Deleted => "deleted",
        }
    }
}

/// What the zone last learned about an instance's domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObservedState {
    /// Placed; no order has completed yet.
    Pending,
    Running,
    Stopped,
    /// The host no longer reports the domain (agent restart, or removed behind ccs's back).
    Missing,
    /// The last order failed; the reconciler retries it.
    Failed,
    /// Its host was fenced. A DAS instance stays lost with its host (its
    /// disks are there); a SAN instance is restarted on another host.
    Lost,
}

impl ObservedState {
    pub fn as_str(self) -> &'static str {
        match self {
            ObservedState::Pending => "pending",
            ObservedState::Running => "running",
            ObservedState::Stopped => "stopped",
            ObservedState::Missing => "missing",
            ObservedState::Failed => "failed",
            ObservedState::Lost => "lost",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// UUID chosen by the leader; also the libvirt domain UUID.
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub pod: String,
    pub host: String,
    pub desired: DesiredState,
    pub observed: ObservedState,
    /// Incremented at every change of `desired`; orders carry the generation they serve.
    pub generation: u64,
    /// Log index of the command that created the instance.
    pub created_index: u64,
    pub request_id: Option<String>,
    pub last_error: Option<String>,
    /// Journal id of the order in flight for this instance, if any.
    pub open_order: Option<u64>,
}

/// A Raft leader's identity, used as the fencing token on orders.
///
/// Ordering is lexicographic on (term, node_id); at most one leader exists
/// per term, so a larger value always names a later leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaderStamp {
    pub term: u64,
    pub node_id: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderAction {
    /// Define the domain if absent and start it.
    Start,
    /// Destroy and undefine the domain.
    Destroy,
    /// Create a volume in its pool.
    CreateVolume,
    /// Delete a volume from its pool.
    DeleteVolume,
    /// Move the instance's running domain from its host to the destination
    /// its `Move` names; sent to the source host.
    Migrate,
    /// Destroy a copy of an instance left on a host the instance moved away
    /// from while that host was fenced.
    Evict,
}

impl OrderAction {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderAction::Start => "start",
            OrderAction::Destroy => "destroy",
            OrderAction::CreateVolume => "create_volume",
            OrderAction::DeleteVolume => "delete_volume",
            OrderAction::Migrate => "migrate",
            OrderAction::Evict => "evict",
        }
    }

    /// Whether the order's subject is a volume rather than an instance.
    pub fn is_volume_action(self) -> bool {
        matches!(self, OrderAction::CreateVolume | OrderAction::DeleteVolume)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum OrderOutcome {
    /// The agent executed the order; the domain is now in `domain_state`.
    Done { domain_state: String },
    /// The agent or libvirt failed; the order can be retried.
    Failed { error: String },
    /// The agent had accepted a newer leader and refused this order.
    Fenced,
    /// Closed without a reply because a newer order replaced it.
    Superseded,
}

/// One order in the operation journal: recorded before it is sent, closed
/// with its outcome afterwards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Log index of the command that opened the order.
    pub id: u64,
    /// The instance id, or the volume id for volume actions.
    pub subject: String,
    /// The host whose agent executes the order.
    pub host_id: String,
    pub action: OrderAction,
    /// The instance generation the order serves.
    pub generation: u64,
    /// The leader that journaled the order.
    pub leader: LeaderStamp,
    pub outcome: Option<OrderOutcome>,
}

/// A zone key's value and the log index of the write that set it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    pub modified_index: u64,
}

/// The storage pool a volume lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumePool {
    /// The local pool of one host of a DAS pod.
    Local,
    /// The shared pool of a SAN pod, on the array its SAN agent fronts.
    San,
}

impl VolumePool {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumePool::Local => "local",
            VolumePool::San => "san",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeState {
    /// Recorded; the create order has not completed yet.
    Creating,
    Available,
    /// Deleted by a client; the record goes once the pool no longer has it.
    Deleting,
    /// Detached by a client, but the instance's host has not yet confirmed
    /// a definition without it, so it stays reserved for that instance.
    Detaching,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Available => "available",
            VolumeState::Deleting => "deleting",
            VolumeState::Detaching => "detaching",
        }
    }
}

/// A block volume. Its name in the libvirt storage pool is its id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    /// UUID chosen by the leader.
    pub id: String,
    pub name: String,
    pub pod: String,
    pub pool: VolumePool,
    /// The host whose pool contains the volume: the DAS host, or the SAN agent.
    pub host: String,
    pub size_gib: u64,
    /// The instance the volume is attached to.
    pub attached_to: Option<String>,
    pub state: VolumeState,
    /// Log index of the command that created the volume.
    pub created_index: u64,
    /// Journal id of the order in flight for this volume, if any.
    pub open_order: Option<u64>,
    pub last_error: Option<String>,
}

/// A SAN pod's shared pool: its capacity, reported by the agent that fronts
/// the array, and the space its volumes hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SanPool {
    pub pod: String,
    pub host: String,
    pub capacity_gib: u64,
    pub used_gib: u64,
}

/// A network interface of an instance, with its leased address.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Nic {
    pub network: String,
    pub mac: String,
    pub ip: String,
}

/// An instance's devices: attached volumes and NICs. Stored beside the
/// instance under its id; an instance without a record has none.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceDevices {
    /// Volume ids, in attach order.
    pub volumes: Vec<String>,
    pub nics: Vec<Nic>,
    /// The instance generation whose devices a host last confirmed; device
    /// changes bump the generation, so a smaller value means the host's
    /// definition is behind.
    pub applied_generation: u64,
    /// Volumes detached at `detached_generation` that the host has not yet
    /// confirmed gone; they become available when it does.
    pub detaching: Vec<String>,
    /// The generation of the latest detach.
    pub detached_generation: u64,
    /// NICs detached at `detached_generation` whose leases are kept until
    /// the host confirms them gone, so no other NIC gets their address.
    pub detaching_nics: Vec<Nic>,
}

/// A migration in progress: capacity is held on both hosts until the
/// source reports the domain running on the destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub instance_id: String,
    pub from: String,
    pub to: String,
    /// Log index of the command that started the migration.
    pub created_index: u64,
}

/// A copy of an instance that may still exist on a host the instance left
/// while that host was fenced. When the host takes orders again, its agent
/// destroys the copy, and nothing else.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StaleCopy {
    pub instance_id: String,
    pub host: String,
    /// Log index of the command that moved the instance away.
    pub moved_index: u64,
    /// Journal id of the evict order in flight, if any.
    pub open_order: Option<u64>,
}

/// A host's fence, as committed: who fenced it, how, and at which index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FenceRecord {
    pub host: String,
    pub leader: LeaderStamp,
    /// The fencing driver's description of what it did.
    pub method: String,
    pub index: u64,
}
