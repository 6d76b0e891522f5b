//! The hypervisor seen by a host agent, behind one trait. Only this module
//! imports `virt`; the rest of ccs speaks `Hypervisor`.
//!
//! The trait covers domains with their volumes and NICs, the host's ccs
//! storage pools and their volumes, the tenant networks of the host, and
//! migration. Every operation is idempotent, so a retried order finishes
//! the job instead of failing on what the first attempt already did.
//!
//! libvirt calls block, so callers run them on a blocking thread. One
//! libvirt connection is kept for the agent's lifetime because the test
//! driver (`test:///…`) keeps its domains, pools and networks in the
//! connection that opened it.
//!
//! Two libvirt capabilities depend on the URI. Any URI other than `test:`
//! is taken to have device hot-plug and live migration. libvirt's test
//! driver has neither, so there a device change of a running domain is
//! written to its persistent definition only and waits for the next start,
//! and `can_migrate` is false (the agent then emulates migration).
//!
//! This file is longer than most because the domain, pool, volume and
//! network XML, and the small reader of libvirt's device XML, belong next to
//! the libvirt calls that use them, and only this module may import `virt`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::ErrorNumber;
use virt::network::Network;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

/// Prefix of the libvirt networks ccs defines: tenant network "blue" is
/// libvirt network "ccs-blue".
pub const NETWORK_PREFIX: &str = "ccs-";

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("libvirt {operation} failed: {message}")]
    Libvirt {
        operation: &'static str,
        message: String,
    },
    #[error(
        "storage pool {pool:?} is not defined on this host: define it as the pod's shared \
         array (type iscsi, logical, rbd or netfs) with `virsh pool-define` and start it"
    )]
    PoolMissing { pool: String },
    #[error(
        "libvirt network {network:?} exists with {existing}, but the order needs {requested}; \
         detach the NICs of domains {domains:?} from it first"
    )]
    NetworkConflict {
        network: String,
        existing: String,
        requested: String,
        domains: Vec<String>,
    },
    #[error("volume {volume:?} in pool {pool:?} is used by domain {domain}; detach it first")]
    VolumeInUse {
        volume: String,
        pool: String,
        domain: String,
    },
    #[error(
        "domain {uuid} is neither on this host nor on the migration destination {destination}"
    )]
    MigrationSourceMissing { uuid: String, destination: String },
    #[error("libvirt at {uri} cannot migrate domains")]
    MigrationUnsupported { uri: String },
}

/// CPU and memory of a host, as the hypervisor reports them.
#[derive(Clone, Copy, Debug)]
pub struct NodeCapacity {
    pub cpus: u32,
    pub memory_mib: u64,
}

/// The state of one domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainRunState {
    Running,
    Stopped,
    Absent,
}

impl DomainRunState {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainRunState::Running => "running",
            DomainRunState::Stopped => "stopped",
            DomainRunState::Absent => "absent",
        }
    }
}

/// The ccs storage pool a volume lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PoolKind {
    /// The host's own pool (DAS pods).
    Local,
    /// The pod's shared array (SAN pods).
    San,
}

impl PoolKind {
    /// Parses the wire form, "local" or "san".
    pub fn parse(text: &str) -> Option<PoolKind> {
        match text {
            "local" => Some(PoolKind::Local),
            "san" => Some(PoolKind::San),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Local => "local",
            PoolKind::San => "san",
        }
    }
}

/// The separation of a tenant network from the others on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkMode {
    /// An 802.1q tag on the host's uplink bridge.
    Vlan,
    /// A VXLAN segment, bridged on the host by a bridge of its own.
    Vxlan,
}

impl NetworkMode {
    /// Parses the wire form, "vlan" or "vxlan".
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
}

/// A tenant network as the host defines it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkSpec {
    /// The ccs network name, without the "ccs-" prefix.
    pub name: String,
    pub mode: NetworkMode,
    /// The VLAN id or VNI.
    pub segmentation_id: u32,
}

impl NetworkSpec {
    fn libvirt_name(&self) -> String {
        format!("{NETWORK_PREFIX}{}", self.name)
    }

    fn describe(&self) -> String {
        format!("{} {}", self.mode.as_str(), self.segmentation_id)
    }
}

/// A volume attached to a domain. Its libvirt volume name is its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub volume_id: String,
    pub pool: PoolKind,
    pub size_gib: u64,
}

/// A NIC of a domain, on a tenant network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicSpec {
    /// The ccs network name, without the "ccs-" prefix.
    pub network: String,
    pub mode: NetworkMode,
    /// The network's VLAN id or VNI.
    pub segmentation_id: u32,
    /// Lower-case, colon-separated.
    pub mac: String,
    /// The leased IPv4 address and the network's prefix length.
    pub ip: String,
    pub prefix_len: u32,
}

impl NicSpec {
    pub fn network_spec(&self) -> NetworkSpec {
        NetworkSpec {
            name: self.network.clone(),
            mode: self.mode,
            segmentation_id: self.segmentation_id,
        }
    }
}

/// The definition of a domain.
#[derive(Clone, Debug, Default)]
pub struct DomainSpec {
    /// The instance id, used as the domain UUID.
    pub uuid: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
}

#[derive(Clone, Debug)]
pub struct DomainSummary {
    pub uuid: String,
    pub name: String,
    pub state: DomainRunState,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// The effect of `Hypervisor::define` on a domain's devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChange {
    /// The definition already carried the spec's disks and NICs.
    Unchanged,
    /// The domain was not running, so only its definition changed (or it
    /// was defined now); the devices are in effect from its next start.
    Config,
    /// The running domain's devices were attached or detached live, and in
    /// its persistent definition.
    HotPlugged,
    /// Only the persistent definition changed, because the hypervisor has
    /// no hot-plug; the running domain keeps its old devices until it is
    /// stopped and started again.
    NextStart,
}

/// The result of `Hypervisor::define`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DefineOutcome {
    pub before: DomainRunState,
    pub after: DomainRunState,
    pub devices: DeviceChange,
}

/// The result of `Hypervisor::migrate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrateOutcome {
    /// State on this host before the call.
    pub before: DomainRunState,
    /// State on the destination after the call.
    pub after: DomainRunState,
}

/// The operations an agent needs from a hypervisor. Each one is idempotent.
pub trait Hypervisor: Send + Sync {
    fn capacity(&self) -> Result<NodeCapacity, HypervisorError>;
    /// Defines the domain if absent, makes its persistent definition carry
    /// exactly the spec's disks and NICs, and starts it when `start` is set
    /// and it is not running. The pools of its disks are ensured first; the
    /// networks of its NICs must exist (see `ensure_network`).
    fn define(&self, spec: &DomainSpec, start: bool) -> Result<DefineOutcome, HypervisorError>;
    fn domain_state(&self, uuid: &str) -> Result<DomainRunState, HypervisorError>;
    /// Powers the domain off if it runs and keeps its definition. Returns its previous state.
    fn ensure_stopped(&self, uuid: &str) -> Result<DomainRunState, HypervisorError>;
    /// Stops and undefines the domain if present. Returns its previous state.
    fn ensure_absent(&self, uuid: &str) -> Result<DomainRunState, HypervisorError>;
    fn list_domains(&self) -> Result<Vec<DomainSummary>, HypervisorError>;
    /// Makes the ccs storage pool exist and be active. Only the local pool,
    /// and the SAN pool under the test driver, are defined when missing.
    fn ensure_pool(&self, pool: PoolKind) -> Result<(), HypervisorError>;
    /// Creates volume `volume_id` of `size_gib` in the pool if absent.
    /// Returns true when it created it.
    fn ensure_volume(
        &self,
        pool: PoolKind,
        volume_id: &str,
        size_gib: u64,
    ) -> Result<bool, HypervisorError>;
    /// Deletes the volume if present. Returns true when it deleted it.
    fn delete_volume(&self, pool: PoolKind, volume_id: &str) -> Result<bool, HypervisorError>;
    /// Volume names (ids) in the host's ccs pools that exist.
    fn list_volumes(&self) -> Result<Vec<String>, HypervisorError>;
    /// Defines and starts the libvirt network of a tenant network if absent.
    /// Returns true when it defined it.
    fn ensure_network(&self, network: &NetworkSpec) -> Result<bool, HypervisorError>;
    /// Tenant networks defined on the host, by ccs network name.
    fn list_networks(&self) -> Result<Vec<String>, HypervisorError>;
    /// Removes the ccs networks no domain on the host uses, in its running
    /// or its persistent definition. Returns the ccs names removed.
    fn remove_unused_networks(&self) -> Result<Vec<String>, HypervisorError>;
    fn can_migrate(&self) -> bool;
    /// Moves the domain to the libvirt at `destination_uri`: live when it
    /// runs, persistent on the destination, undefined here. A domain already
    /// absent here and present on the destination counts as moved.
    fn migrate(&self, uuid: &str, destination_uri: &str)
        -> Result<MigrateOutcome, HypervisorError>;
}

/// Where the libvirt hypervisor keeps what ccs creates on a host.
#[derive(Clone, Debug)]
pub struct LibvirtSettings {
    /// Name of the host's local storage pool, a `dir` pool ccs defines.
    pub local_pool: String,
    /// Directory of the local pool.
    pub local_pool_dir: PathBuf,
    /// Name of the pod's shared storage pool.
    pub san_pool: String,
    /// Whether this host fronts its pod's shared array, so that the SAN
    /// pool's volumes are listed as this host's.
    pub fronts_san: bool,
    /// The host's uplink bridge, an Open vSwitch bridge that carries the
    /// VLAN-tagged tenant networks.
    pub network_bridge: String,
}

/// A hypervisor reached through libvirt.
pub struct Libvirt {
    connection: Mutex<Connect>,
    uri: String,
    settings: LibvirtSettings,
}

fn libvirt_error(operation: &'static str) -> impl Fn(virt::error::Error) -> HypervisorError {
    move |e| HypervisorError::Libvirt {
        operation,
        message: e.message().to_string(),
    }
}

fn is_code(error: &virt::error::Error, code: ErrorNumber) -> bool {
    error.code() == code.into()
}

/// Turns a libvirt lookup's result into `None` when libvirt reports the
/// object missing with `missing`, and into an error naming `operation`
/// otherwise.
fn found<T>(
    result: Result<T, virt::error::Error>,
    missing: ErrorNumber,
    operation: &'static str,
) -> Result<Option<T>, HypervisorError> {
    match result {
        Ok(object) => Ok(Some(object)),
        Err(e) if is_code(&e, missing) => Ok(None),
        Err(e) => Err(libvirt_error(operation)(e)),
    }
}

/// Returns whether `uri` names libvirt's test driver.
fn is_test_uri(uri: &str) -> bool {
    uri.starts_with("test:")
}

impl Libvirt {
    /// Opens a connection to `uri`. libvirt's default error callback,
    /// which prints to stderr, is switched off first.
    pub fn open(uri: &str, settings: LibvirtSettings) -> Result<Libvirt, HypervisorError> {
        virt::error::clear_error_callback();
        let connection = Connect::open(Some(uri)).map_err(libvirt_error("connect"))?;
        Ok(Libvirt {
            connection: Mutex::new(connection),
            uri: uri.to_string(),
            settings,
        })
    }

    fn connection(&self) -> std::sync::MutexGuard<'_, Connect> {
        self.connection.lock().expect("libvirt lock poisoned")
    }

    // NOTE: the hot-plug and libvirt-migration paths (any URI but `test:`)
    // have no test, because ccs's tests run only libvirt's test driver.
    fn hot_plug(&self) -> bool {
        !is_test_uri(&self.uri)
    }

    fn lookup(connection: &Connect, uuid: &str) -> Result<Option<Domain>, HypervisorError> {
        found(connection.lookup_domain_by_uuid_string(uuid), ErrorNumber::NoDomain, "lookup domain")
    }

    fn run_state(domain: &Domain) -> Result<DomainRunState, HypervisorError> {
        // `info()` reports errors; `state()` would swallow some of them.
        let info = domain.info().map_err(libvirt_error("domain info"))?;
        let running = matches!(
            Result::<DomainState, _>::from(info.state),
            Ok(DomainState::Running | DomainState::Blocked | DomainState::Paused)
        );
        Ok(if running {
            DomainRunState::Running
        } else {
            DomainRunState::Stopped
        })
    }

    fn domain_type(&self) -> &'static str {
        if is_test_uri(&self.uri) {
            "test"
        } else {
            "kvm"
        }
    }

    fn pool_name(&self, kind: PoolKind) -> &str {
        match kind {
            PoolKind::Local => &self.settings.local_pool,
            PoolKind::San => &self.settings.san_pool,
        }
    }

    fn device_pools(&self) -> DevicePools<'_> {
        DevicePools {
            local: &self.settings.local_pool,
            san: &self.settings.san_pool,
        }
    }

    /// Reads the ccs devices of the domain's persistent definition, and of
    /// its running instance when it runs.
    fn current_devices(
        &self,
        domain: &Domain,
        running: bool,
    ) -> Result<(Devices, Option<Devices>), HypervisorError> {
        let pools = self.device_pools();
        let persistent = domain
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(libvirt_error("read domain definition"))?;
        let live = if running {
            let xml = domain
                .xml_desc(0)
                .map_err(libvirt_error("read running domain"))?;
            Some(parse_devices(&xml, &pools))
        } else {
            None
        };
        Ok((parse_devices(&persistent, &pools), live))
    }
}

/// Storage pools. The local one is created on demand. The SAN one is
/// created only under the test driver, because on a real host it fronts an
/// array the operator sets up.
impl Libvirt {
    fn ensure_pool_on(
        &self,
        connection: &Connect,
        kind: PoolKind,
    ) -> Result<StoragePool, HypervisorError> {
        let name = self.pool_name(kind).to_string();
        let pool = match connection.lookup_storage_pool_by_name(&name) {
            Ok(pool) => pool,
            Err(e) if is_code(&e, ErrorNumber::NoStoragePool) => {
                if kind == PoolKind::San && !is_test_uri(&self.uri) {
                    return Err(HypervisorError::PoolMissing { pool: name });
                }
                return self.define_dir_pool(connection, kind, &name);
            }
            Err(e) => return Err(libvirt_error("lookup storage pool")(e)),
        };
        if !pool
            .is_active()
            .map_err(libvirt_error("storage pool state"))?
        {
            pool.create(0)
                .map_err(libvirt_error("start storage pool"))?;
        }
        Ok(pool)
    }

    fn define_dir_pool(
        &self,
        connection: &Connect,
        kind: PoolKind,
        name: &str,
    ) -> Result<StoragePool, HypervisorError> {
        let local_dir = &self.settings.local_pool_dir;
        let dir = match kind {
            PoolKind::Local => local_dir.clone(),
            // Only reached under the test driver, which keeps volumes in memory.
            PoolKind::San => local_dir.with_file_name("ccs-san-test"),
        };
        let xml = dir_pool_xml(name, &dir.to_string_lossy());
        let pool = connection
            .define_storage_pool_xml(&xml, 0)
            .map_err(libvirt_error("define storage pool"))?;
        pool.build(0).map_err(libvirt_error("build storage pool"))?;
        pool.create(0)
            .map_err(libvirt_error("start storage pool"))?;
        pool.set_autostart(true)
            .map_err(libvirt_error("set storage pool autostart"))?;
        tracing::info!(pool = name, dir = %dir.display(), "defined storage pool");
        Ok(pool)
    }

    /// Returns the pool if it exists and is active; listing and deleting
    /// never create a pool.
    fn existing_pool(
        &self,
        connection: &Connect,
        kind: PoolKind,
    ) -> Result<Option<StoragePool>, HypervisorError> {
        match connection.lookup_storage_pool_by_name(self.pool_name(kind)) {
            Ok(pool)
                if pool
                    .is_active()
                    .map_err(libvirt_error("storage pool state"))? =>
            {
                Ok(Some(pool))
            }
            Ok(_) => Ok(None),
            Err(e) if is_code(&e, ErrorNumber::NoStoragePool) => Ok(None),
            Err(e) => Err(libvirt_error("lookup storage pool")(e)),
        }
    }

    fn lookup_volume(
        pool: &StoragePool,
        volume_id: &str,
    ) -> Result<Option<StorageVol>, HypervisorError> {
        found(pool.lookup_storage_vol_by_name(volume_id), ErrorNumber::NoStorageVolume, "lookup volume")
    }

    /// Returns the UUID of a domain whose running or persistent definition
    /// uses the volume, if any.
    fn volume_user(
        &self,
        connection: &Connect,
        pool: &str,
        volume_id: &str,
    ) -> Result<Option<String>, HypervisorError> {
        for (uuid, devices) in self.all_domain_devices(connection)? {
            if devices
                .disks
                .iter()
                .any(|d| d.pool == pool && d.volume == volume_id)
            {
                return Ok(Some(uuid));
            }
        }
        Ok(None)
    }

    /// Reads the ccs devices of every domain, persistent and running
    /// definitions merged, with the domain's UUID.
    fn all_domain_devices(
        &self,
        connection: &Connect,
    ) -> Result<Vec<(String, Devices)>, HypervisorError> {
        let domains = connection
            .list_all_domains(0)
            .map_err(libvirt_error("list domains"))?;
        let mut out = Vec::with_capacity(domains.len());
        for domain in domains {
            let uuid = domain.uuid_string().map_err(libvirt_error("domain uuid"))?;
            let running = Self::run_state(&domain)? == DomainRunState::Running;
            let (mut devices, live) = self.current_devices(&domain, running)?;
            if let Some(live) = live {
                devices.disks.extend(live.disks);
                devices.nics.extend(live.nics);
            }
            out.push((uuid, devices));
        }
        Ok(out)
    }
}

/// Tenant networks.
///
/// A VLAN network is `<forward mode='bridge'/>` on the uplink bridge with an
/// Open vSwitch virtualport and a `<vlan><tag id=…/></vlan>`. libvirt's
/// network driver accepts a network-level VLAN tag only on Open vSwitch
/// bridges, SR-IOV hostdev and passthrough networks (`networkValidate` in
/// libvirt's network/bridge_driver.c). So on a real host `network_bridge`
/// must be an Open vSwitch bridge. libvirt's test driver skips that check
/// and accepts the same XML.
///
/// A VXLAN network is an isolated libvirt network whose bridge libvirt
/// creates, named "ccsvx<VNI>" (at most 13 characters, within Linux's
/// 15-character interface names).
// NOTE: the VXLAN device itself (`ip link add vxlan<VNI> type vxlan id <VNI>`
// enslaved to that bridge) is plumbed outside libvirt; this agent does not create it.
impl Libvirt {
    fn lookup_network(
        connection: &Connect,
        name: &str,
    ) -> Result<Option<Network>, HypervisorError> {
        found(connection.lookup_network_by_name(name), ErrorNumber::NoNetwork, "lookup network")
    }

    fn define_network(
        &self,
        connection: &Connect,
        spec: &NetworkSpec,
    ) -> Result<(), HypervisorError> {
        let xml = network_xml(spec, &self.settings.network_bridge);
        let network = connection
            .define_network_xml(&xml)
            .map_err(libvirt_error("define network"))?;
        network.create().map_err(libvirt_error("start network"))?;
        network
            .set_autostart(true)
            .map_err(libvirt_error("set network autostart"))?;
        tracing::info!(
            network = %spec.name,
            mode = spec.mode.as_str(),
            segmentation_id = spec.segmentation_id,
            "defined network"
        );
        Ok(())
    }

    fn remove_network(network: &Network) -> Result<(), HypervisorError> {
        if network
            .is_active()
            .map_err(libvirt_error("network state"))?
        {
            network.destroy().map_err(libvirt_error("stop network"))?;
        }
        if network
            .is_persistent()
            .map_err(libvirt_error("network state"))?
        {
            network
                .undefine()
                .map_err(libvirt_error("undefine network"))?;
        }
        Ok(())
    }

    /// UUIDs of the domains whose definitions use libvirt network `name`.
    fn network_users(
        &self,
        connection: &Connect,
        name: &str,
    ) -> Result<Vec<String>, HypervisorError> {
        let users = self
            .all_domain_devices(connection)?
            .into_iter()
            .filter(|(_, devices)| devices.nics.iter().any(|n| n.network == name))
            .map(|(uuid, _)| uuid)
            .collect();
        Ok(users)
    }
}

/// Domain definition and device changes.
impl Libvirt {
    fn define_new(
        &self,
        connection: &Connect,
        spec: &DomainSpec,
    ) -> Result<Domain, HypervisorError> {
        let disks = plan_disks(spec, &self.device_pools(), &Devices::default(), None);
        let xml = domain_xml(spec, self.domain_type(), &disks);
        connection
            .define_domain_xml(&xml)
            .map_err(libvirt_error("define domain"))
    }

    /// Brings an existing domain's devices to the spec and reports how.
    fn update_devices(
        &self,
        connection: &Connect,
        domain: &Domain,
        spec: &DomainSpec,
        running: bool,
    ) -> Result<DeviceChange, HypervisorError> {
        let pools = self.device_pools();
        let (persistent, live) = self.current_devices(domain, running)?;
        let disks = plan_disks(spec, &pools, &persistent, live.as_ref());
        let desired = Devices::from_spec(&disks, spec);
        let config_changed = !persistent.same_as(&desired);
        let live_changed = live.as_ref().is_some_and(|live| !live.same_as(&desired));
        if !config_changed && !live_changed {
            return Ok(DeviceChange::Unchanged);
        }

        if self.hot_plug() {
            apply_device_diff(domain, &persistent, &desired, sys::VIR_DOMAIN_AFFECT_CONFIG)?;
            if let Some(live) = &live {
                apply_device_diff(domain, live, &desired, sys::VIR_DOMAIN_AFFECT_LIVE)?;
            }
            return Ok(if running {
                DeviceChange::HotPlugged
            } else {
                DeviceChange::Config
            });
        }

        // Without hot-plug the whole persistent definition is rewritten;
        // the running domain keeps its devices until it is started again.
        if config_changed {
            let xml = domain_xml(spec, self.domain_type(), &disks);
            connection
                .define_domain_xml(&xml)
                .map_err(libvirt_error("redefine domain"))?;
        }
        Ok(if running {
            DeviceChange::NextStart
        } else {
            DeviceChange::Config
        })
    }
}

/// Detaches what `current` has and `desired` lacks, then attaches the rest,
/// with `flags` choosing the running domain or its persistent definition.
/// The `*_flags` calls are used because `virt`'s plain `attach_device`
/// drops libvirt's error.
fn apply_device_diff(
    domain: &Domain,
    current: &Devices,
    desired: &Devices,
    flags: u32,
) -> Result<(), HypervisorError> {
    for disk in current.disks.iter().filter(|d| !desired.has_disk(d)) {
        domain
            .detach_device_flags(&disk_xml(disk), flags)
            .map_err(libvirt_error("detach disk"))?;
    }
    for nic in current.nics.iter().filter(|n| !desired.has_nic(n)) {
        domain
            .detach_device_flags(&interface_xml(nic), flags)
            .map_err(libvirt_error("detach interface"))?;
    }
    for disk in desired.disks.iter().filter(|d| !current.has_disk(d)) {
        domain
            .attach_device_flags(&disk_xml(disk), flags)
            .map_err(libvirt_error("attach disk"))?;
    }
    for nic in desired.nics.iter().filter(|n| !current.has_nic(n)) {
        domain
            .attach_device_flags(&interface_xml(nic), flags)
            .map_err(libvirt_error("attach interface"))?;
    }
    Ok(())
}

impl Hypervisor for Libvirt {
    fn capacity(&self) -> Result<NodeCapacity, HypervisorError> {
        let connection = self.connection();
        let info = connection.node_info().map_err(libvirt_error("node info"))?;
        Ok(NodeCapacity {
            cpus: info.cpus,
            memory_mib: info.memory / 1024,
        })
    }

    fn define(&self, spec: &DomainSpec, start: bool) -> Result<DefineOutcome, HypervisorError> {
        let connection = self.connection();
        let kinds: BTreeSet<PoolKind> = spec.disks.iter().map(|d| d.pool).collect();
        for kind in kinds {
            self.ensure_pool_on(&connection, kind)?;
        }

        let (domain, before, devices) = match Self::lookup(&connection, &spec.uuid)? {
            Some(domain) => {
                let before = Self::run_state(&domain)?;
                let running = before == DomainRunState::Running;
                let devices = self.update_devices(&connection, &domain, spec, running)?;
                (domain, before, devices)
            }
            None => {
                let domain = self.define_new(&connection, spec)?;
                (domain, DomainRunState::Absent, DeviceChange::Config)
            }
        };
        let mut after = if before == DomainRunState::Running {
            DomainRunState::Running
        } else {
            DomainRunState::Stopped
        };
        if start && after != DomainRunState::Running {
            domain.create().map_err(libvirt_error("start domain"))?;
            after = DomainRunState::Running;
        }
        Ok(DefineOutcome {
            before,
            after,
            devices,
        })
    }

    fn domain_state(&self, uuid: &str) -> Result<DomainRunState, HypervisorError> {
        let connection = self.connection();
        match Self::lookup(&connection, uuid)? {
            Some(domain) => Self::run_state(&domain),
            None => Ok(DomainRunState::Absent),
        }
    }

    fn ensure_stopped(&self, uuid: &str) -> Result<DomainRunState, HypervisorError> {
        let connection = self.connection();
        let Some(domain) = Self::lookup(&connection, uuid)? else {
            return Ok(DomainRunState::Absent);
        };
        let before = Self::run_state(&domain)?;
        if before == DomainRunState::Running {
            domain.destroy().map_err(libvirt_error("destroy domain"))?;
        }
        Ok(before)
    }

    fn ensure_absent(&self, uuid: &str) -> Result<DomainRunState, HypervisorError> {
        let connection = self.connection();
        let Some(domain) = Self::lookup(&connection, uuid)? else {
            return Ok(DomainRunState::Absent);
        };
        let before = Self::run_state(&domain)?;
        if before == DomainRunState::Running {
            domain.destroy().map_err(libvirt_error("destroy domain"))?;
        }
        domain
            .undefine()
            .map_err(libvirt_error("undefine domain"))?;
        Ok(before)
    }

    fn list_domains(&self) -> Result<Vec<DomainSummary>, HypervisorError> {
        let connection = self.connection();
        let domains = connection
            .list_all_domains(0)
            .map_err(libvirt_error("list domains"))?;
        let mut out = Vec::with_capacity(domains.len());
        for domain in domains {
            let info = domain.info().map_err(libvirt_error("domain info"))?;
            out.push(DomainSummary {
                uuid: domain.uuid_string().map_err(libvirt_error("domain uuid"))?,
                name: domain.name().map_err(libvirt_error("domain name"))?,
                state: Self::run_state(&domain)?,
                vcpus: info.nr_virt_cpu,
                memory_mib: info.memory / 1024,
            });
        }
        Ok(out)
    }

    fn ensure_pool(&self, kind: PoolKind) -> Result<(), HypervisorError> {
        self.ensure_pool_on(&self.connection(), kind).map(drop)
    }

    fn ensure_volume(
        &self,
        kind: PoolKind,
        volume_id: &str,
        size_gib: u64,
    ) -> Result<bool, HypervisorError> {
        let connection = self.connection();
        let pool = self.ensure_pool_on(&connection, kind)?;
        if Self::lookup_volume(&pool, volume_id)?.is_some() {
            return Ok(false);
        }
        // NOTE: libvirt's iscsi pool backend cannot create volumes (LUNs are
        // made on the array), so on an iscsi SAN pool this fails with libvirt's error.
        StorageVol::create_xml(&pool, &volume_xml(volume_id, size_gib), 0)
            .map_err(libvirt_error("create volume"))?;
        Ok(true)
    }

    fn delete_volume(&self, kind: PoolKind, volume_id: &str) -> Result<bool, HypervisorError> {
        let connection = self.connection();
        let Some(pool) = self.existing_pool(&connection, kind)? else {
            return Ok(false);
        };
        let Some(volume) = Self::lookup_volume(&pool, volume_id)? else {
            return Ok(false);
        };
        let pool_name = self.pool_name(kind);
        if let Some(domain) = self.volume_user(&connection, pool_name, volume_id)? {
            return Err(HypervisorError::VolumeInUse {
                volume: volume_id.to_string(),
                pool: pool_name.to_string(),
                domain,
            });
        }
        volume.delete(0).map_err(libvirt_error("delete volume"))?;
        Ok(true)
    }

    fn list_volumes(&self) -> Result<Vec<String>, HypervisorError> {
        let connection = self.connection();
        let mut kinds = vec![PoolKind::Local];
        if self.settings.fronts_san {
            kinds.push(PoolKind::San);
        }
        let mut names = Vec::new();
        for kind in kinds {
            if let Some(pool) = self.existing_pool(&connection, kind)? {
                names.extend(pool.list_volumes().map_err(libvirt_error("list volumes"))?);
            }
        }
        names.sort();
        Ok(names)
    }

    fn ensure_network(&self, spec: &NetworkSpec) -> Result<bool, HypervisorError> {
        let connection = self.connection();
        let name = spec.libvirt_name();
        let Some(network) = Self::lookup_network(&connection, &name)? else {
            self.define_network(&connection, spec)?;
            return Ok(true);
        };

        // A network of the same name left from a deleted tenant network may
        // carry another segment; replace it unless a domain still uses it.
        let xml = network.xml_desc(0).map_err(libvirt_error("read network"))?;
        let existing = network_segment(&xml);
        if existing != Some((spec.mode, spec.segmentation_id)) {
            let domains = self.network_users(&connection, &name)?;
            if !domains.is_empty() {
                return Err(HypervisorError::NetworkConflict {
                    network: name,
                    existing: existing.map_or("no ccs segment".to_string(), |(mode, id)| {
                        format!("{} {id}", mode.as_str())
                    }),
                    requested: spec.describe(),
                    domains,
                });
            }
            Self::remove_network(&network)?;
            self.define_network(&connection, spec)?;
            return Ok(true);
        }
        if !network
            .is_active()
            .map_err(libvirt_error("network state"))?
        {
            network.create().map_err(libvirt_error("start network"))?;
        }
        Ok(false)
    }

    fn list_networks(&self) -> Result<Vec<String>, HypervisorError> {
        let connection = self.connection();
        let networks = connection
            .list_all_networks(0)
            .map_err(libvirt_error("list networks"))?;
        let mut names = Vec::new();
        for network in networks {
            let name = network.name().map_err(libvirt_error("network name"))?;
            if let Some(ccs_name) = name.strip_prefix(NETWORK_PREFIX) {
                names.push(ccs_name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn remove_unused_networks(&self) -> Result<Vec<String>, HypervisorError> {
        let connection = self.connection();
        let used: BTreeSet<String> = self
            .all_domain_devices(&connection)?
            .into_iter()
            .flat_map(|(_, devices)| devices.nics.into_iter().map(|n| n.network))
            .collect();
        let networks = connection
            .list_all_networks(0)
            .map_err(libvirt_error("list networks"))?;
        let mut removed = Vec::new();
        for network in networks {
            let name = network.name().map_err(libvirt_error("network name"))?;
            let Some(ccs_name) = name.strip_prefix(NETWORK_PREFIX) else {
                continue;
            };
            if used.contains(&name) {
                continue;
            }
            Self::remove_network(&network)?;
            tracing::info!(network = ccs_name, "removed unused network");
            removed.push(ccs_name.to_string());
        }
        Ok(removed)
    }

    fn can_migrate(&self) -> bool {
        !is_test_uri(&self.uri)
    }

    fn migrate(
        &self,
        uuid: &str,
        destination_uri: &str,
    ) -> Result<MigrateOutcome, HypervisorError> {
        if !self.can_migrate() {
            return Err(HypervisorError::MigrationUnsupported {
                uri: self.uri.clone(),
            });
        }
        let domain = Self::lookup(&self.connection(), uuid)?;
        let Some(domain) = domain else {
            return destination_state(uuid, destination_uri);
        };
        let before = Self::run_state(&domain)?;
        let mut flags = sys::VIR_MIGRATE_PEER2PEER
            | sys::VIR_MIGRATE_PERSIST_DEST
            | sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        flags |= if before == DomainRunState::Running {
            sys::VIR_MIGRATE_LIVE
        } else {
            sys::VIR_MIGRATE_OFFLINE
        };
        // The connection lock is not held while the guest's memory is
        // copied, so heartbeats keep listing domains meanwhile.
        domain
            .migrate_to_uri(destination_uri, flags, None, 0)
            .map_err(libvirt_error("migrate domain"))?;
        let after = if before == DomainRunState::Running {
            DomainRunState::Running
        } else {
            DomainRunState::Stopped
        };
        Ok(MigrateOutcome { before, after })
    }
}

/// Reports a migration whose domain is already absent here as done when
/// the destination has the domain.
fn destination_state(uuid: &str, destination_uri: &str) -> Result<MigrateOutcome, HypervisorError> {
    let destination =
        Connect::open(Some(destination_uri)).map_err(libvirt_error("connect to destination"))?;
    match Libvirt::lookup(&destination, uuid)? {
        Some(domain) => Ok(MigrateOutcome {
            before: DomainRunState::Absent,
            after: Libvirt::run_state(&domain)?,
        }),
        None => Err(HypervisorError::MigrationSourceMissing {
            uuid: uuid.to_string(),
            destination: destination_uri.to_string(),
        }),
    }
}

// ---------------------------------------------------------------------------
// XML: what ccs writes, and the part of libvirt's domain XML it reads back.

/// Names of the ccs storage pools, which tell ccs disks from others.
struct DevicePools<'a> {
    local: &'a str,
    san: &'a str,
}

impl DevicePools<'_> {
    fn name(&self, kind: PoolKind) -> &str {
        match kind {
            PoolKind::Local => self.local,
            PoolKind::San => self.san,
        }
    }

    fn is_ccs(&self, pool: &str) -> bool {
        pool == self.local || pool == self.san
    }
}

/// A disk of a domain definition: libvirt pool and volume names, and target device.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DiskDevice {
    pool: String,
    volume: String,
    target: String,
}

/// A NIC of a domain definition: MAC and libvirt network name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NicDevice {
    mac: String,
    network: String,
}

/// The ccs devices of one domain definition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Devices {
    disks: Vec<DiskDevice>,
    nics: Vec<NicDevice>,
    /// Target devices of every disk, ccs or not, so new disks avoid them.
    targets: BTreeSet<String>,
}

impl Devices {
    fn from_spec(disks: &[DiskDevice], spec: &DomainSpec) -> Devices {
        Devices {
            disks: disks.to_vec(),
            nics: spec
                .nics
                .iter()
                .map(|nic| NicDevice {
                    mac: nic.mac.to_ascii_lowercase(),
                    network: format!("{NETWORK_PREFIX}{}", nic.network),
                })
                .collect(),
            targets: disks.iter().map(|d| d.target.clone()).collect(),
        }
    }

    fn has_disk(&self, disk: &DiskDevice) -> bool {
        self.disks
            .iter()
            .any(|d| d.pool == disk.pool && d.volume == disk.volume)
    }

    fn has_nic(&self, nic: &NicDevice) -> bool {
        self.nics
            .iter()
            .any(|n| n.mac == nic.mac && n.network == nic.network)
    }

    fn disk_target(&self, pool: &str, volume: &str) -> Option<&str> {
        self.disks
            .iter()
            .find(|d| d.pool == pool && d.volume == volume)
            .map(|d| d.target.as_str())
    }

    /// Compares the disks and NICs as sets; target names do not count.
    fn same_as(&self, other: &Devices) -> bool {
        self.disks.len() == other.disks.len()
            && self.nics.len() == other.nics.len()
            && self.disks.iter().all(|d| other.has_disk(d))
            && self.nics.iter().all(|n| other.has_nic(n))
    }
}

/// Gives each disk of the spec a target device: the one it already has in
/// the persistent or running definition, else the first free "vdX".
fn plan_disks(
    spec: &DomainSpec,
    pools: &DevicePools,
    persistent: &Devices,
    live: Option<&Devices>,
) -> Vec<DiskDevice> {
    let mut used_targets: BTreeSet<String> = persistent.targets.clone();
    if let Some(live) = live {
        used_targets.extend(live.targets.iter().cloned());
    }
    let mut planned = Vec::with_capacity(spec.disks.len());
    for disk in &spec.disks {
        let pool = pools.name(disk.pool).to_string();
        let existing = persistent
            .disk_target(&pool, &disk.volume_id)
            .or_else(|| live.and_then(|l| l.disk_target(&pool, &disk.volume_id)));
        let target = match existing {
            Some(target) => target.to_string(),
            None => {
                let free = (0..).map(virtio_target).find(|t| !used_targets.contains(t));
                free.expect("an unbounded range always has a free target name")
            }
        };
        used_targets.insert(target.clone());
        planned.push(DiskDevice {
            pool,
            volume: disk.volume_id.clone(),
            target,
        });
    }
    planned
}

/// Names the n-th virtio disk in libvirt's order: vda … vdz, vdaa, vdab, …
fn virtio_target(index: usize) -> String {
    let mut suffix = Vec::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        suffix.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8(suffix).expect("ASCII letters"))
}

fn domain_xml(spec: &DomainSpec, domain_type: &str, disks: &[DiskDevice]) -> String {
    let mut devices = String::new();
    for disk in disks {
        devices.push_str(&disk_xml(disk));
    }
    for nic in &spec.nics {
        devices.push_str(&interface_xml(&NicDevice {
            mac: nic.mac.to_ascii_lowercase(),
            network: format!("{NETWORK_PREFIX}{}", nic.network),
        }));
    }
    // NOTE: the NIC's leased address is not in the XML, because libvirt's QEMU
    // driver rejects a guest-side <ip> on network interfaces; the guest learns it elsewhere.
    format!(
        "<domain type='{domain_type}'>\
           <name>{name}</name><uuid>{uuid}</uuid>\
           <memory unit='MiB'>{memory}</memory>\
           <vcpu>{vcpus}</vcpu>\
           <os><type arch='x86_64'>hvm</type></os>\
           <devices>{devices}</devices>\
         </domain>",
        name = xml_escape(&spec.name),
        uuid = xml_escape(&spec.uuid),
        memory = spec.memory_mib,
        vcpus = spec.vcpus,
    )
}

fn disk_xml(disk: &DiskDevice) -> String {
    format!(
        "<disk type='volume' device='disk'>\
           <driver name='qemu' type='raw'/>\
           <source pool='{pool}' volume='{volume}'/>\
           <target dev='{target}' bus='virtio'/>\
         </disk>",
        pool = xml_escape(&disk.pool),
        volume = xml_escape(&disk.volume),
        target = xml_escape(&disk.target),
    )
}

fn interface_xml(nic: &NicDevice) -> String {
    format!(
        "<interface type='network'>\
           <mac address='{mac}'/>\
           <source network='{network}'/>\
           <model type='virtio'/>\
         </interface>",
        mac = xml_escape(&nic.mac),
        network = xml_escape(&nic.network),
    )
}

fn dir_pool_xml(name: &str, dir: &str) -> String {
    format!(
        "<pool type='dir'><name>{}</name><target><path>{}</path></target></pool>",
        xml_escape(name),
        xml_escape(dir)
    )
}

/// Builds the XML of a thin (sparse) raw volume, with nothing allocated up front.
fn volume_xml(volume_id: &str, size_gib: u64) -> String {
    format!(
        "<volume><name>{}</name>\
           <capacity unit='GiB'>{size_gib}</capacity>\
           <allocation unit='GiB'>0</allocation>\
         </volume>",
        xml_escape(volume_id)
    )
}

fn network_xml(spec: &NetworkSpec, uplink_bridge: &str) -> String {
    let name = xml_escape(&spec.libvirt_name());
    match spec.mode {
        NetworkMode::Vlan => format!(
            "<network><name>{name}</name>\
               <forward mode='bridge'/>\
               <bridge name='{bridge}'/>\
               <virtualport type='openvswitch'/>\
               <vlan><tag id='{tag}'/></vlan>\
             </network>",
            bridge = xml_escape(uplink_bridge),
            tag = spec.segmentation_id,
        ),
        NetworkMode::Vxlan => format!(
            "<network><name>{name}</name>\
               <bridge name='{bridge}' stp='off'/>\
             </network>",
            bridge = vxlan_bridge(spec.segmentation_id),
        ),
    }
}

/// Names the bridge of a VXLAN segment: "ccsvx" and the VNI, at most 13 characters.
fn vxlan_bridge(vni: u32) -> String {
    format!("ccsvx{vni}")
}

/// Reads back the segment a ccs network XML carries: its VLAN tag, or the
/// VNI in its VXLAN bridge name.
fn network_segment(xml: &str) -> Option<(NetworkMode, u32)> {
    if let Some(vlan) = elements(xml, "vlan").first() {
        let tag = elements(vlan, "tag")
            .first()
            .and_then(|t| attribute(t, "id"))?;
        return tag.parse().ok().map(|id| (NetworkMode::Vlan, id));
    }
    let bridge = elements(xml, "bridge")
        .first()
        .and_then(|b| attribute(b, "name"))?;
    let vni = bridge.strip_prefix("ccsvx")?.parse().ok()?;
    Some((NetworkMode::Vxlan, vni))
}

/// Reads the ccs disks (volumes of the ccs pools) and NICs (on "ccs-"
/// networks) of a domain XML, and the targets of all its disks.
fn parse_devices(xml: &str, pools: &DevicePools) -> Devices {
    let mut devices = Devices::default();
    for disk in elements(xml, "disk") {
        let target = first_attribute(disk, "target", "dev");
        if let Some(target) = &target {
            devices.targets.insert(target.clone());
        }
        if start_tag_attribute(disk, "type").as_deref() != Some("volume") {
            continue;
        }
        let pool = first_attribute(disk, "source", "pool");
        let volume = first_attribute(disk, "source", "volume");
        if let (Some(pool), Some(volume), Some(target)) = (pool, volume, target) {
            if pools.is_ccs(&pool) {
                devices.disks.push(DiskDevice {
                    pool,
                    volume,
                    target,
                });
            }
        }
    }
    for interface in elements(xml, "interface") {
        if start_tag_attribute(interface, "type").as_deref() != Some("network") {
            continue;
        }
        let mac = first_attribute(interface, "mac", "address");
        let network = first_attribute(interface, "source", "network");
        if let (Some(mac), Some(network)) = (mac, network) {
            if network.starts_with(NETWORK_PREFIX) {
                let mac = mac.to_ascii_lowercase();
                devices.nics.push(NicDevice { mac, network });
            }
        }
    }
    devices
}

/// Returns each `<tag …>…</tag>` or `<tag …/>` element of `xml`, in order.
/// Enough for libvirt's own output, which has no comments, CDATA or
/// nested elements of the same name in the places read here.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut found = Vec::new();
    let mut rest = xml;
    let mut offset = 0;
    while let Some(at) = rest.find(&open) {
        let start = offset + at;
        let after_name = xml[start + open.len()..].chars().next();
        if !matches!(after_name, Some(' ' | '\t' | '\n' | '\r' | '>' | '/')) {
            offset = start + open.len();
            rest = &xml[offset..];
            continue;
        }
        let Some(tag_end) = xml[start..].find('>').map(|i| start + i) else {
            break;
        };
        let end = if xml[..tag_end].ends_with('/') {
            tag_end + 1
        } else {
            match xml[tag_end..].find(&close) {
                Some(i) => tag_end + i + close.len(),
                None => break,
            }
        };
        found.push(&xml[start..end]);
        offset = end;
        rest = &xml[offset..];
    }
    found
}

/// Reads an attribute of the start tag of `element`.
fn start_tag_attribute(element: &str, name: &str) -> Option<String> {
    let tag_end = element.find('>')?;
    attribute(&element[..tag_end], name)
}

/// Reads an attribute of the first `<child>` inside `element`.
fn first_attribute(element: &str, child: &str, name: &str) -> Option<String> {
    let inner = element.find('>').map(|i| &element[i + 1..])?;
    elements(inner, child)
        .first()
        .and_then(|c| start_tag_attribute(c, name))
}

/// Reads an attribute of the start tag at the beginning of `tag`, unescaped.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
    for quote in ['\'', '"'] {
        let key = format!(" {name}={quote}");
        if let Some(at) = tag.find(&key) {
            let value = &tag[at + key.len()..];
            let end = value.find(quote)?;
            return Some(xml_unescape(&value[..end]));
        }
    }
    None
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn xml_unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&apos;", "'")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host of 8 CPUs and 16 GiB for the test driver (memory in KiB).
    const HOST_XML: &str = "<node><cpu><mhz>2600</mhz><model>x86_64</model><active>8</active>\
        <max>8</max><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>2</threads></cpu>\
        <memory>16777216</memory></node>";
    const UUID: &str = "5b1c8f3e-2a47-4c1d-9e6b-7f0a3d2c1b10";
    const OTHER_UUID: &str = "6c2d9f4a-3b58-4d2e-8f7c-801b4e3d2c21";

    /// A private test driver: each connection to a host file has its own state.
    struct TestHost {
        _dir: tempfile::TempDir,
        libvirt: Libvirt,
    }

    fn test_host(fronts_san: bool) -> TestHost {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("host.xml");
        std::fs::write(&path, HOST_XML).expect("writing host XML");
        let settings = LibvirtSettings {
            local_pool: "ccs-local".to_string(),
            local_pool_dir: dir.path().join("volumes"),
            san_pool: "ccs-san".to_string(),
            fronts_san,
            network_bridge: "br-ccs".to_string(),
        };
        let uri = format!("test://{}", path.display());
        let libvirt = Libvirt::open(&uri, settings).expect("opening the test driver");
        TestHost { _dir: dir, libvirt }
    }

    fn nic(network: &str, mode: NetworkMode, segmentation_id: u32, mac: &str) -> NicSpec {
        NicSpec {
            network: network.to_string(),
            mode,
            segmentation_id,
            mac: mac.to_string(),
            ip: "10.0.0.5".to_string(),
            prefix_len: 24,
        }
    }

    fn disk(volume_id: &str, pool: PoolKind) -> DiskSpec {
        DiskSpec {
            volume_id: volume_id.to_string(),
            pool,
            size_gib: 10,
        }
    }

    fn spec(uuid: &str, disks: Vec<DiskSpec>, nics: Vec<NicSpec>) -> DomainSpec {
        DomainSpec {
            uuid: uuid.to_string(),
            name: format!("vm-{}", &uuid[..8]),
            vcpus: 1,
            memory_mib: 256,
            disks,
            nics,
        }
    }

    fn blue() -> NicSpec {
        nic("blue", NetworkMode::Vlan, 100, "52:54:00:00:00:01")
    }

    impl TestHost {
        fn network_xml(&self, libvirt_name: &str) -> String {
            let connection = self.libvirt.connection();
            let network = connection
                .lookup_network_by_name(libvirt_name)
                .expect("network exists");
            network.xml_desc(0).expect("network XML")
        }

        fn domain_xml(&self, uuid: &str, flags: u32) -> String {
            let connection = self.libvirt.connection();
            let domain = connection
                .lookup_domain_by_uuid_string(uuid)
                .expect("domain exists");
            domain.xml_desc(flags).expect("domain XML")
        }

        /// Defines and starts a domain with its NICs' networks, as the agent does.
        fn start(&self, spec: &DomainSpec) -> DefineOutcome {
            for nic in &spec.nics {
                self.libvirt
                    .ensure_network(&nic.network_spec())
                    .expect("network");
            }
            self.libvirt.define(spec, true).expect("define and start")
        }
    }

    #[test]
    fn volume_create_delete_idempotent() {
        let host = test_host(false);
        let hv = &host.libvirt;
        assert!(hv
            .ensure_volume(PoolKind::Local, "vol-1", 10)
            .expect("create"));
        assert!(!hv
            .ensure_volume(PoolKind::Local, "vol-1", 10)
            .expect("create again"));
        assert_eq!(hv.list_volumes().expect("list"), vec!["vol-1".to_string()]);

        assert!(hv.delete_volume(PoolKind::Local, "vol-1").expect("delete"));
        assert!(!hv
            .delete_volume(PoolKind::Local, "vol-1")
            .expect("delete again"));
        assert!(hv.list_volumes().expect("list").is_empty());
    }

    #[test]
    fn thin_volume_larger_than_test_pool() {
        // The test driver gives each pool 100 GiB (`defaultPoolCap` in its
        // test_driver.c), and a thin volume allocates nothing.
        let host = test_host(false);
        assert!(host
            .libvirt
            .ensure_volume(PoolKind::Local, "big", 500)
            .expect("create"));
    }

    #[test]
    fn san_volumes_listed_only_when_fronting() {
        let plain = test_host(false);
        assert!(plain
            .libvirt
            .ensure_volume(PoolKind::San, "vol-s", 5)
            .expect("create"));
        assert!(plain.libvirt.list_volumes().expect("list").is_empty());

        let front = test_host(true);
        front
            .libvirt
            .ensure_volume(PoolKind::San, "vol-s", 5)
            .expect("create");
        front
            .libvirt
            .ensure_volume(PoolKind::Local, "vol-l", 5)
            .expect("create");
        let listed = front.libvirt.list_volumes().expect("list");
        assert_eq!(listed, vec!["vol-l".to_string(), "vol-s".to_string()]);
    }

    #[test]
    fn domain_defined_with_disk_and_nic() {
        let host = test_host(false);
        let hv = &host.libvirt;
        hv.ensure_volume(PoolKind::Local, "vol-1", 10)
            .expect("volume");
        assert!(hv.ensure_network(&blue().network_spec()).expect("network"));
        assert!(!hv
            .ensure_network(&blue().network_spec())
            .expect("network again"));

        let network = host.network_xml("ccs-blue");
        assert!(network.contains("<tag id='100'/>"), "{network}");
        assert!(network.contains("openvswitch"), "{network}");
        assert!(network.contains("br-ccs"), "{network}");
        assert_eq!(hv.list_networks().expect("list"), vec!["blue".to_string()]);

        let spec = spec(UUID, vec![disk("vol-1", PoolKind::Local)], vec![blue()]);
        let outcome = hv.define(&spec, true).expect("define");
        assert_eq!(outcome.before, DomainRunState::Absent);
        assert_eq!(outcome.after, DomainRunState::Running);
        assert_eq!(outcome.devices, DeviceChange::Config);

        let xml = host.domain_xml(UUID, 0);
        assert!(xml.contains("pool='ccs-local' volume='vol-1'"), "{xml}");
        assert!(xml.contains("<target dev='vda' bus='virtio'/>"), "{xml}");
        assert!(xml.contains("<source network='ccs-blue'"), "{xml}");
        assert!(xml.contains("52:54:00:00:00:01"), "{xml}");
        assert!(xml.contains("<model type='virtio'/>"), "{xml}");
    }

    #[test]
    fn define_again_unchanged() {
        let host = test_host(false);
        let spec = spec(UUID, vec![disk("vol-1", PoolKind::San)], vec![blue()]);
        host.start(&spec);
        let again = host.libvirt.define(&spec, true).expect("define again");
        assert_eq!(again.before, DomainRunState::Running);
        assert_eq!(again.after, DomainRunState::Running);
        assert_eq!(again.devices, DeviceChange::Unchanged);
    }

    #[test]
    fn vxlan_network_gets_own_bridge() {
        let host = test_host(false);
        let vxlan = NetworkSpec {
            name: "green".to_string(),
            mode: NetworkMode::Vxlan,
            segmentation_id: 5000,
        };
        host.libvirt.ensure_network(&vxlan).expect("network");
        let xml = host.network_xml("ccs-green");
        assert!(xml.contains("name='ccsvx5000'"), "{xml}");
        assert!(!xml.contains("<vlan"), "{xml}");
        assert_eq!(network_segment(&xml), Some((NetworkMode::Vxlan, 5000)));
    }

    #[test]
    fn running_device_change_waits_for_next_start() {
        let host = test_host(false);
        let hv = &host.libvirt;
        let before = spec(UUID, vec![], vec![blue()]);
        host.start(&before);

        let changed = spec(UUID, vec![disk("vol-2", PoolKind::Local)], vec![blue()]);
        let outcome = hv.define(&changed, false).expect("redefine");
        assert_eq!(outcome.devices, DeviceChange::NextStart);
        assert_eq!(outcome.after, DomainRunState::Running);
        let persistent = host.domain_xml(UUID, sys::VIR_DOMAIN_XML_INACTIVE);
        assert!(persistent.contains("volume='vol-2'"), "{persistent}");
        let live = host.domain_xml(UUID, 0);
        assert!(!live.contains("volume='vol-2'"), "{live}");

        // Still pending: the running domain lacks the disk.
        let again = hv.define(&changed, false).expect("redefine again");
        assert_eq!(again.devices, DeviceChange::NextStart);

        hv.ensure_stopped(UUID).expect("stop");
        let restarted = hv.define(&changed, true).expect("start");
        assert_eq!(restarted.devices, DeviceChange::Unchanged);
        assert!(host.domain_xml(UUID, 0).contains("volume='vol-2'"));
    }

    #[test]
    fn stopped_domain_device_change_is_config() {
        let host = test_host(false);
        let hv = &host.libvirt;
        host.start(&spec(UUID, vec![disk("a", PoolKind::Local)], vec![]));
        hv.ensure_stopped(UUID).expect("stop");

        let changed = spec(
            UUID,
            vec![disk("b", PoolKind::Local), disk("a", PoolKind::Local)],
            vec![],
        );
        let outcome = hv.define(&changed, false).expect("redefine");
        assert_eq!(outcome.devices, DeviceChange::Config);
        assert_eq!(outcome.after, DomainRunState::Stopped);
        // Disk "a" keeps its target; "b" gets the next free one.
        let xml = host.domain_xml(UUID, sys::VIR_DOMAIN_XML_INACTIVE);
        let devices = parse_devices(&xml, &host.libvirt.device_pools());
        let target = |volume: &str| devices.disk_target("ccs-local", volume).map(str::to_string);
        assert_eq!(target("a").as_deref(), Some("vda"));
        assert_eq!(target("b").as_deref(), Some("vdb"));
    }

    #[test]
    fn unused_network_removed_after_destroy() {
        let host = test_host(false);
        let hv = &host.libvirt;
        let red = nic("red", NetworkMode::Vlan, 200, "52:54:00:00:00:02");
        host.start(&spec(UUID, vec![], vec![blue()]));
        host.start(&spec(OTHER_UUID, vec![], vec![red]));
        assert!(hv.remove_unused_networks().expect("clean-up").is_empty());

        hv.ensure_absent(UUID).expect("destroy");
        assert_eq!(
            hv.remove_unused_networks().expect("clean-up"),
            vec!["blue".to_string()]
        );
        assert_eq!(hv.list_networks().expect("list"), vec!["red".to_string()]);
    }

    #[test]
    fn stopped_domain_keeps_its_network() {
        let host = test_host(false);
        host.start(&spec(UUID, vec![], vec![blue()]));
        host.libvirt.ensure_stopped(UUID).expect("stop");
        assert!(host
            .libvirt
            .remove_unused_networks()
            .expect("clean-up")
            .is_empty());
    }

    #[test]
    fn network_with_other_tag_replaced_when_unused() {
        let host = test_host(false);
        let hv = &host.libvirt;
        hv.ensure_network(&blue().network_spec()).expect("network");
        let retagged = NetworkSpec {
            segmentation_id: 300,
            ..blue().network_spec()
        };
        assert!(hv.ensure_network(&retagged).expect("replace"));
        assert!(host.network_xml("ccs-blue").contains("<tag id='300'/>"));
    }

    #[test]
    fn network_with_other_tag_in_use_conflicts() {
        let host = test_host(false);
        host.start(&spec(UUID, vec![], vec![blue()]));
        let retagged = NetworkSpec {
            segmentation_id: 300,
            ..blue().network_spec()
        };
        let error = host.libvirt.ensure_network(&retagged).expect_err("in use");
        assert!(
            matches!(error, HypervisorError::NetworkConflict { .. }),
            "{error}"
        );
        assert!(error.to_string().contains(UUID), "{error}");
    }

    #[test]
    fn attached_volume_not_deleted() {
        let host = test_host(false);
        host.libvirt
            .ensure_volume(PoolKind::Local, "vol-1", 1)
            .expect("volume");
        host.start(&spec(UUID, vec![disk("vol-1", PoolKind::Local)], vec![]));
        let error = host
            .libvirt
            .delete_volume(PoolKind::Local, "vol-1")
            .expect_err("attached");
        assert!(
            matches!(error, HypervisorError::VolumeInUse { .. }),
            "{error}"
        );
    }

    #[test]
    fn stop_keeps_definition() {
        let host = test_host(false);
        host.start(&spec(UUID, vec![], vec![]));
        assert_eq!(
            host.libvirt.ensure_stopped(UUID).expect("stop"),
            DomainRunState::Running
        );
        assert_eq!(
            host.libvirt.domain_state(UUID).expect("state"),
            DomainRunState::Stopped
        );
        assert_eq!(
            host.libvirt.ensure_stopped(UUID).expect("stop again"),
            DomainRunState::Stopped
        );
    }

    #[test]
    fn test_driver_cannot_migrate() {
        let host = test_host(false);
        assert!(!host.libvirt.can_migrate());
        let error = host
            .libvirt
            .migrate(UUID, "test:///default")
            .expect_err("no migration");
        assert!(
            matches!(error, HypervisorError::MigrationUnsupported { .. }),
            "{error}"
        );
    }

    #[test]
    fn virtio_target_names() {
        assert_eq!(virtio_target(0), "vda");
        assert_eq!(virtio_target(25), "vdz");
        assert_eq!(virtio_target(26), "vdaa");
        assert_eq!(virtio_target(27), "vdab");
    }

    #[test]
    fn devices_read_from_libvirt_xml() {
        let xml = "<domain type='kvm'><devices>\n\
            <disk type='file' device='cdrom'><source file='/iso/a.iso'/><target dev='sda' bus='sata'/></disk>\n\
            <disk type='volume' device='disk'>\n  <driver name='qemu' type='raw'/>\n\
              <source pool='ccs-san' volume='v&amp;1'/>\n  <target dev='vdc' bus='virtio'/>\n</disk>\n\
            <disk type='volume' device='disk'><source pool='other' volume='x'/><target dev='vdd'/></disk>\n\
            <interface type='network'><mac address='52:54:00:AA:00:01'/>\
              <source network='ccs-blue' portid='1' bridge='br-ccs'/><target dev='vnet0'/></interface>\n\
            <interface type='network'><mac address='52:54:00:aa:00:02'/><source network='default'/></interface>\n\
            <interfaces-like/>\n\
            </devices></domain>";
        let pools = DevicePools {
            local: "ccs-local",
            san: "ccs-san",
        };
        let devices = parse_devices(xml, &pools);
        assert_eq!(
            devices.disks,
            vec![DiskDevice {
                pool: "ccs-san".to_string(),
                volume: "v&1".to_string(),
                target: "vdc".to_string(),
            }]
        );
        assert_eq!(
            devices.nics,
            vec![NicDevice {
                mac: "52:54:00:aa:00:01".to_string(),
                network: "ccs-blue".to_string(),
            }]
        );
        let targets: Vec<&str> = devices.targets.iter().map(String::as_str).collect();
        assert_eq!(targets, vec!["sda", "vdc", "vdd"]);
    }

    #[test]
    fn domain_xml_escapes_text() {
        let mut spec = spec(UUID, vec![], vec![]);
        spec.name = "a<b>&'c'".to_string();
        let xml = domain_xml(&spec, "test", &[]);
        assert!(
            xml.contains("<name>a&lt;b&gt;&amp;&apos;c&apos;</name>"),
            "{xml}"
        );
    }

    #[test]
    fn network_segment_reads_vlan_tag() {
        let xml = "<network>\n  <name>ccs-blue</name>\n  <forward mode='bridge'/>\n\
                   <bridge name='br-ccs'/>\n  <vlan>\n    <tag id='42'/>\n  </vlan>\n</network>";
        assert_eq!(network_segment(xml), Some((NetworkMode::Vlan, 42)));
        assert_eq!(
            network_segment("<network><bridge name='virbr0'/></network>"),
            None
        );
    }
}
