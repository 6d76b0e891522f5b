//! The leader's handling of client and agent writes: input validation,
//! scheduling, and the proposal of the resulting commands. Every function
//! here runs on the leader; the gRPC layer forwards calls that reach a
//! follower.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::time::Instant;

use super::error::ApiError;
use super::node::Node;
use crate::scheduler::{self, Reserved};
use crate::zone::command::{Command, CommandResult, Rejection};
use crate::zone::model::{
    Host, HostHealth, Instance, KeyValue, Network, NetworkMode, Placement, Pod, PodProfile,
    StorageModel, VolumePool, DEFAULT_WORKLOAD_CLASS,
};

/// Largest instance the API accepts: 256 vCPUs, 4 TiB memory, 64 TiB disk.
const MAX_VCPUS: u32 = 256;
const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;
const MAX_DISK_GIB: u64 = 64 * 1024;
/// Scheduling attempts when apply rejects a decision made on a stale view.
const PLACEMENT_ATTEMPTS: usize = 5;

/// A validated request to create an instance.
#[derive(Clone, Debug)]
pub struct CreateInstance {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub pod: Option<String>,
    pub request_id: Option<String>,
    /// Volume names or ids to attach.
    pub volumes: Vec<String>,
    /// Networks to attach one NIC each to.
    pub networks: Vec<String>,
}

/// A create's devices as resolved on the leader.
#[derive(Debug, Default)]
struct ResolvedDevices {
    volume_ids: Vec<String>,
    /// The host of the create's DAS volumes, which the instance must use.
    host: Option<String>,
}

/// A request to create a pod; `None` fields take their defaults.
#[derive(Clone, Debug, Default)]
pub struct CreatePod {
    pub name: String,
    /// Default 1.0.
    pub cpu_ratio: Option<f64>,
    /// Default 1.0.
    pub memory_ratio: Option<f64>,
    /// "pack" (default) or "spread".
    pub placement: Option<String>,
    /// "das" (default) or "san".
    pub storage: Option<String>,
    /// Required in a SAN pod, rejected in a DAS pod.
    pub san_agent: Option<String>,
    /// Default "general".
    pub workload_class: Option<String>,
    /// Default 1.0.
    pub storage_ratio: Option<f64>,
    /// "vlan" (default) or "vxlan".
    pub network: Option<String>,
    /// Default: the whole range of the network mode.
    pub segmentation_first: Option<u32>,
    pub segmentation_last: Option<u32>,
}

/// Oversubscription ratios the API accepts, for CPU, memory and storage.
const RATIO_RANGE: std::ops::RangeInclusive<f64> = 0.1..=64.0;
/// Maximum length of a workload class, in bytes.
const MAX_WORKLOAD_CLASS_BYTES: usize = 64;

fn ratio(field: &'static str, value: Option<f64>) -> Result<f64, ApiError> {
    let value = value.unwrap_or(1.0);
    if !(value.is_finite() && RATIO_RANGE.contains(&value)) {
        return Err(ApiError::invalid(field, value, "must be between 0.1 and 64"));
    }
    Ok(value)
}

impl CreatePod {
    /// Validates the request and fills in defaults.
    pub fn into_records(self) -> Result<(Pod, PodProfile), ApiError> {
        validate_name("name", &self.name)?;
        let pod = Pod {
            name: self.name,
            cpu_ratio: ratio("cpu_ratio", self.cpu_ratio)?,
            memory_ratio: ratio("memory_ratio", self.memory_ratio)?,
            placement: parse_placement(self.placement.as_deref().unwrap_or("pack"))?,
        };
        let storage = self.storage.as_deref().unwrap_or("das");
        let storage = StorageModel::parse(storage)
            .ok_or_else(|| ApiError::invalid("storage", storage, "use \"das\" or \"san\""))?;
        let mode = self.network.as_deref().unwrap_or("vlan");
        let reason = "use \"vlan\" or \"vxlan\"";
        let network = NetworkMode::parse(mode)
            .ok_or_else(|| ApiError::invalid("network_mode", mode, reason))?;
        let (min, max) = network.max_range();
        let profile = PodProfile {
            storage,
            san_agent: self.san_agent,
            workload_class: self
                .workload_class
                .unwrap_or_else(|| DEFAULT_WORKLOAD_CLASS.to_string()),
            storage_ratio: ratio("storage_ratio", self.storage_ratio)?,
            network,
            segmentation_first: self.segmentation_first.unwrap_or(min),
            segmentation_last: self.segmentation_last.unwrap_or(max),
        };
        validate_profile(&profile)?;
        Ok((pod, profile))
    }
}

fn validate_profile(profile: &PodProfile) -> Result<(), ApiError> {
    let class = &profile.workload_class;
    let too_long = class.len() > MAX_WORKLOAD_CLASS_BYTES;
    if class.is_empty() || too_long || class.chars().any(char::is_control) {
        let reason =
            format!("must be 1 to {MAX_WORKLOAD_CLASS_BYTES} bytes without control characters");
        return Err(ApiError::invalid("workload_class", class, reason));
    }
    match (profile.storage, &profile.san_agent) {
        (StorageModel::San, None) => {
            let reason = "a san pod must name the host id of the agent that fronts its array";
            return Err(ApiError::invalid("san_agent", "", reason));
        }
        (StorageModel::San, Some(agent)) => validate_name("san_agent", agent)?,
        (StorageModel::Das, Some(agent)) => {
            let reason = "only a san pod has an array agent; omit it for a das pod";
            return Err(ApiError::invalid("san_agent", agent, reason));
        }
        (StorageModel::Das, None) => {}
    }
    let (first, last) = (profile.segmentation_first, profile.segmentation_last);
    let (min, max) = profile.network.max_range();
    let range = format!("{first}..{last}");
    if first < min || last > max {
        let reason = format!(
            "{} pods use {}s from {min} to {max}",
            profile.network.as_str(),
            profile.network.id_name()
        );
        return Err(ApiError::invalid("segmentation_range", range, reason));
    }
    if first > last {
        let reason = "the first id must not exceed the last";
        return Err(ApiError::invalid("segmentation_range", range, reason));
    }
    Ok(())
}

/// Parses an IPv4 subnet in CIDR notation and returns it normalized. The
/// prefix length must be 8 to 30, and the host bits must be zero.
pub fn parse_cidr(text: &str) -> Result<String, ApiError> {
    let syntax = || ApiError::invalid("cidr", text, "use IPv4 CIDR notation, such as 10.0.0.0/24");
    let (addr, prefix) = text.split_once('/').ok_or_else(syntax)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(syntax());
    }
    let prefix: u32 = prefix.parse().map_err(|_| syntax())?;
    if !(8..=30).contains(&prefix) {
        return Err(ApiError::invalid("cidr", text, "the prefix length must be 8 to 30"));
    }
    let mask = u32::MAX << (32 - prefix);
    let network = Ipv4Addr::from(u32::from(addr) & mask);
    if network != addr {
        let reason = format!("host bits are set; use {network}/{prefix}");
        return Err(ApiError::invalid("cidr", text, reason));
    }
    Ok(format!("{network}/{prefix}"))
}

/// The leader's record of each host's liveness between heartbeats.
#[derive(Debug)]
pub struct HostLiveness {
    pub last_heartbeat: Instant,
    /// Instance ids reported missing by consecutive heartbeats.
    pub absent: BTreeMap<String, u32>,
    /// The host's latest heartbeat report; `None` until one arrives.
    pub report: Option<HostReport>,
}

/// A host's view of itself, as its agent's heartbeat reports it.
#[derive(Clone, Debug)]
pub struct HostReport {
    /// Domain UUID to state ("running", "stopped").
    pub domains: BTreeMap<String, String>,
    /// Volume names (ids) in the host's ccs pools.
    pub volumes: Vec<String>,
    /// ccs network names defined on the host.
    pub networks: Vec<String>,
    pub received: Instant,
}

/// Leader-side operations over one replica's node.
pub struct Zone {
    pub node: Arc<Node>,
    /// Capacity held by creates between scheduling and apply.
    reserved: Mutex<BTreeMap<String, Reserved>>,
    pub liveness: DashMap<String, HostLiveness>,
}

/// Checks that a name is a DNS label: 1 to 63 lower-case letters, digits or
/// hyphens, starting and ending with a letter or digit.
/// Largest zone key value accepted, in bytes. Keys hold small metadata; the
/// value travels through the Raft log and every snapshot.
pub const MAX_KEY_VALUE_BYTES: usize = 64 * 1024;

fn validate_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > 256 {
        return Err(ApiError::invalid("key", key, "must be 1 to 256 bytes long"));
    }
    if key.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid("key", key, "must not contain control characters"));
    }
    Ok(())
}

pub fn validate_name(field: &'static str, name: &str) -> Result<(), ApiError> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ends_ok = !name.starts_with('-') && !name.ends_with('-');
    if name.is_empty() || name.len() > 63 || !valid_chars || !ends_ok {
        return Err(ApiError::invalid(
            field,
            name,
            "use 1 to 63 lower-case letters, digits or hyphens, not starting or ending with a hyphen",
        ));
    }
    Ok(())
}

impl CreateInstance {
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_name("name", &self.name)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ApiError::invalid("vcpus", self.vcpus, format!("must be 1 to {MAX_VCPUS}")));
        }
        if self.memory_mib < 64 || self.memory_mib > MAX_MEMORY_MIB {
            return Err(ApiError::invalid(
                "memory_mib",
                self.memory_mib,
                format!("must be 64 to {MAX_MEMORY_MIB}"),
            ));
        }
        if self.disk_gib > MAX_DISK_GIB {
            return Err(ApiError::invalid(
                "disk_gib",
                self.disk_gib,
                format!("must be at most {MAX_DISK_GIB}"),
            ));
        }
        if let Some(request_id) = &self.request_id {
            if request_id.len() > 128 {
                return Err(ApiError::invalid("request_id", request_id, "must be at most 128 bytes"));
            }
        }
        for (field, names) in [("volumes", &self.volumes), ("networks", &self.networks)] {
            if names.len() > MAX_DEVICES {
                let reason = format!("lists {} entries; the limit is {MAX_DEVICES}", names.len());
                return Err(ApiError::invalid(field, names.join(","), reason));
            }
            let mut sorted = names.clone();
            sorted.sort();
            if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
                let reason = format!("names {:?} twice", pair[0]);
                return Err(ApiError::invalid(field, names.join(","), reason));
            }
        }
        Ok(())
    }
}

/// Most volumes, and most NICs, one instance can have.
const MAX_DEVICES: usize = 16;

impl Zone {
    pub fn new(node: Arc<Node>) -> Zone {
        Zone {
            node,
            reserved: Mutex::new(BTreeMap::new()),
            liveness: DashMap::new(),
        }
    }

    /// Creates an instance: returns the first result for a known request
    /// id, else schedules it and proposes the placement.
    pub async fn create_instance(&self, request: CreateInstance) -> Result<Instance, ApiError> {
        request.validate()?;
        self.node.read_barrier().await?;
        if let Some(request_id) = &request.request_id {
            if let Some(first) = self.node.instance_by_request(request_id)? {
                return Ok(first);
            }
        }
        if self.node.instance(&request.name)?.is_some() {
            return Err(Rejection::NameTaken(request.name).into());
        }
        let pods = self.node.pods()?;
        let mut request = request;
        let devices = self.resolve_devices(&mut request)?;
        if let Some(pod) = &request.pod {
            if !pods.contains_key(pod) {
                return Err(Rejection::UnknownPod(pod.clone()).into());
            }
        }
        for _ in 0..PLACEMENT_ATTEMPTS {
            match self.try_place(&request, &pods, &devices).await? {
                CommandResult::Instance(instance)
                | CommandResult::Duplicate(instance)
                | CommandResult::Devices(instance, _) => return Ok(instance),
                CommandResult::Rejected(Rejection::HostFull { .. } | Rejection::HostNotUp(_)) => {
                    continue
                }
                CommandResult::Rejected(rejection) => return Err(rejection.into()),
                other => return Err(ApiError::Internal(format!("unexpected result {other:?}"))),
            }
        }
        Err(ApiError::Internal(format!(
            "placement of {:?} conflicted {PLACEMENT_ATTEMPTS} times; retry",
            request.name
        )))
    }

    /// Resolves a create's volumes to ids and pins the request to the pod
    /// (and, for DAS volumes, the host) its volumes and networks live in.
    fn resolve_devices(&self, request: &mut CreateInstance) -> Result<ResolvedDevices, ApiError> {
        let mut resolved = ResolvedDevices::default();
        // (pod, what lives there) of every device, checked against the request's pod.
        let mut homes: Vec<(String, String)> = Vec::new();
        for name in &request.volumes {
            let Some(volume) = self.node.volume(name)? else {
                return Err(Rejection::UnknownVolume(name.clone()).into());
            };
            homes.push((volume.pod.clone(), format!("volume {name:?}")));
            if volume.pool == VolumePool::Local {
                if let Some(host) = &resolved.host {
                    if *host != volume.host {
                        let reason = format!(
                            "DAS volumes live on different hosts ({host:?} and {:?}); an instance can use only volumes of its own host",
                            volume.host
                        );
                        return Err(ApiError::invalid("volumes", request.volumes.join(","), reason));
                    }
                }
                resolved.host = Some(volume.host.clone());
            }
            resolved.volume_ids.push(volume.id);
        }
        for name in &request.networks {
            let Some(network) = self.node.network(name)? else {
                return Err(Rejection::UnknownNetwork(name.clone()).into());
            };
            homes.push((network.pod.clone(), format!("network {name:?}")));
        }
        for (pod, what) in homes {
            match &request.pod {
                Some(wanted) if *wanted != pod => {
                    let reason = format!("{what} is in pod {pod:?}; an instance and its devices share one pod");
                    return Err(ApiError::invalid("pod", wanted, reason));
                }
                _ => request.pod = Some(pod),
            }
        }
        Ok(resolved)
    }

    async fn try_place(
        &self,
        request: &CreateInstance,
        pods: &BTreeMap<String, Pod>,
        devices: &ResolvedDevices,
    ) -> Result<CommandResult, ApiError> {
        let hosts = self.node.hosts()?;
        let wanted = scheduler::Request {
            vcpus: request.vcpus,
            memory_mib: request.memory_mib,
            disk_gib: request.disk_gib,
            pod: request.pod.as_deref(),
            host: devices.host.as_deref(),
            avoid: None,
        };
        let decision = {
            let mut reserved = self.reserved.lock().expect("lock poisoned");
            let decision = scheduler::place(&wanted, pods, &hosts, &reserved);
            if let Some(decision) = &decision {
                let held = reserved.entry(decision.host.clone()).or_default();
                held.vcpus += request.vcpus;
                held.memory_mib += request.memory_mib;
                held.disk_gib += request.disk_gib;
            }
            decision
        };
        let Some(decision) = decision else {
            metrics::counter!("ccs_scheduler_decisions_total", "outcome" => "no_capacity").increment(1);
            return Err(ApiError::NoCapacity {
                scope: match &request.pod {
                    Some(pod) => format!("pod {pod:?}"),
                    None => "the zone".to_string(),
                },
                vcpus: request.vcpus,
                memory_mib: request.memory_mib,
                disk_gib: request.disk_gib,
            });
        };
        let id = uuid::Uuid::new_v4().to_string();
        let command = if devices.volume_ids.is_empty() && request.networks.is_empty() {
            Command::CreateInstance {
                id,
                name: request.name.clone(),
                vcpus: request.vcpus,
                memory_mib: request.memory_mib,
                disk_gib: request.disk_gib,
                pod: decision.pod.clone(),
                host: decision.host.clone(),
                request_id: request.request_id.clone(),
            }
        } else {
            Command::CreateInstanceWithDevices {
                id,
                name: request.name.clone(),
                vcpus: request.vcpus,
                memory_mib: request.memory_mib,
                disk_gib: request.disk_gib,
                pod: decision.pod.clone(),
                host: decision.host.clone(),
                request_id: request.request_id.clone(),
                volumes: devices.volume_ids.clone(),
                networks: request.networks.clone(),
            }
        };
        let result = self.node.propose(command).await;
        self.release(&decision.host, request);
        let outcome = match &result {
            Ok(CommandResult::Instance(_) | CommandResult::Devices(..)) => "placed",
            Ok(CommandResult::Rejected(Rejection::HostFull { .. })) => "conflict",
            _ => "other",
        };
        metrics::counter!("ccs_scheduler_decisions_total", "outcome" => outcome).increment(1);
        result
    }

    fn release(&self, host: &str, request: &CreateInstance) {
        let mut reserved = self.reserved.lock().expect("lock poisoned");
        if let Some(held) = reserved.get_mut(host) {
            held.vcpus = held.vcpus.saturating_sub(request.vcpus);
            held.memory_mib = held.memory_mib.saturating_sub(request.memory_mib);
            held.disk_gib = held.disk_gib.saturating_sub(request.disk_gib);
        }
    }

    pub async fn delete_instance(&self, name_or_id: &str) -> Result<Instance, ApiError> {
        self.node.read_barrier().await?;
        let Some(instance) = self.node.instance(name_or_id)? else {
            return Err(Rejection::UnknownInstance(name_or_id.to_string()).into());
        };
        match self.node.propose(Command::DeleteInstance { id: instance.id }).await? {
            CommandResult::Instance(instance) => Ok(instance),
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
        }
    }

    pub async fn create_pod(&self, request: CreatePod) -> Result<(Pod, PodProfile), ApiError> {
        let (pod, profile) = request.into_records()?;
        match self.node.propose(Command::CreatePodWithProfile { pod, profile }).await? {
            CommandResult::ProfiledPod(pod, profile) => Ok((pod, profile)),
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
        }
    }

    /// Creates a tenant network; apply allocates its segmentation id.
    pub async fn create_network(
        &self,
        name: String,
        pod: String,
        cidr: &str,
    ) -> Result<Network, ApiError> {
        validate_name("name", &name)?;
        validate_name("pod", &pod)?;
        let cidr = parse_cidr(cidr)?;
        match self.node.propose(Command::CreateNetwork { name, pod, cidr }).await? {
            CommandResult::Network(network) => Ok(network),
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
        }
    }

    /// Deletes a network and releases its segmentation id; returns the deleted record.
    pub async fn delete_network(&self, name: String) -> Result<Network, ApiError> {
        match self.node.propose(Command::DeleteNetwork { name }).await? {
            CommandResult::Network(network) => Ok(network),
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
        }
    }

    /// Sets a zone key, or, with `expected` given, swaps it only if the key
    /// contains that value (`Some(None)`: only if the key is absent).
    pub async fn put_key(&self, key: String, expected: Option<Option<String>>, value: String) -> Result<KeyValue, ApiError> {
        validate_key(&key)?;
        if value.len() > MAX_KEY_VALUE_BYTES {
            let reason = format!("is {} bytes; the limit is {MAX_KEY_VALUE_BYTES}", value.len());
            return Err(ApiError::invalid("value", format!("{}...", value.chars().take(32).collect::<String>()), reason));
        }
        let command = match expected {
            None => Command::PutKey { key, value },
            Some(expected) => Command::CompareAndSwapKey { key, expected, value },
        };
        match self.node.propose(command).await? {
            CommandResult::Key(record) => Ok(record),
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
        }
    }

    /// Registers a host, and the SAN pool it fronts when `san_pool_gib` is set.
    pub async fn register_host(&self, command: Command, san_pool_gib: u64) -> Result<Host, ApiError> {
        let result = self.node.propose(command).await?;
        match result {
            CommandResult::Host(host) => {
                if san_pool_gib > 0 {
                    let pool = Command::RegisterSanPool {
                        pod: host.pod.clone(),
                        host: host.id.clone(),
                        capacity_gib: san_pool_gib,
                    };
                    match self.node.propose(pool).await? {
                        CommandResult::SanPool(_) => {}
                        CommandResult::Rejected(rejection) => return Err(rejection.into()),
                        other => return Err(ApiError::Internal(format!("unexpected result {other:?}"))),
                    }
                }
                self.liveness.insert(
                    host.id.clone(),
                    HostLiveness {
                        last_heartbeat: Instant::now(),
                        absent: BTreeMap::new(),
                        report: None,
                    },
                );
                Ok(host)
            }
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
        }
    }

    /// Records a heartbeat: marks the host up again if it was suspect or
    /// fenced, and marks instances missing that the host stopped reporting.
    pub async fn heartbeat(&self, host_id: &str, report: HostReport) -> Result<(), ApiError> {
        let Some(host) = self.node.host(host_id)? else {
            return Err(Rejection::UnknownHost(host_id.to_string()).into());
        };
        let missing = self.record_heartbeat(&host, report)?;
        if matches!(host.health, HostHealth::Suspect | HostHealth::Fenced) {
            tracing::info!(host_id, "host is up again");
            self.node
                .propose(Command::SetHostHealth {
                    host_id: host_id.to_string(),
                    up: true,
                })
                .await?;
        }
        for instance_id in missing {
            tracing::warn!(host_id, instance_id, "host no longer reports instance");
            self.node
                .propose(Command::ObserveInstance {
                    instance_id,
                    observed: crate::zone::model::ObservedState::Missing,
                })
                .await?;
        }
        Ok(())
    }

    /// Updates the host's liveness and returns instances absent from two
    /// heartbeats in a row while they should be running and no order is open.
    fn record_heartbeat(&self, host: &Host, report: HostReport) -> Result<Vec<String>, ApiError> {
        let instances: Vec<Instance> = self
            .node
            .instances()?
            .into_iter()
            .filter(|i| i.host == host.id)
            .collect();
        let mut entry = self.liveness.entry(host.id.clone()).or_insert_with(|| HostLiveness {
            last_heartbeat: Instant::now(),
            absent: BTreeMap::new(),
            report: None,
        });
        entry.last_heartbeat = Instant::now();
        let mut missing = Vec::new();
        let mut absent = BTreeMap::new();
        for instance in instances {
            let expected = instance.observed == crate::zone::model::ObservedState::Running
                && instance.open_order.is_none();
            if !expected || report.domains.contains_key(&instance.id) {
                continue;
            }
            let count = entry.absent.get(&instance.id).copied().unwrap_or(0) + 1;
            if count >= 2 {
                missing.push(instance.id.clone());
            } else {
                absent.insert(instance.id.clone(), count);
            }
        }
        entry.absent = absent;
        entry.report = Some(report);
        Ok(missing)
    }
}

pub fn parse_placement(text: &str) -> Result<Placement, ApiError> {
    Placement::parse(text).ok_or_else(|| ApiError::invalid("placement", text, "use \"pack\" or \"spread\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_is_normalized_and_checked() {
        assert_eq!(parse_cidr("10.0.0.0/24").expect("valid"), "10.0.0.0/24");
        assert_eq!(parse_cidr("172.16.0.0/12").expect("valid"), "172.16.0.0/12");
        let invalid_cidrs = [
            "10.0.0.1/24",
            "10.0.0.0/31",
            "10.0.0.0/7",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/+24",
            "fd00::/64",
        ];
        for invalid in invalid_cidrs {
            assert!(parse_cidr(invalid).is_err(), "{invalid} was accepted");
        }
    }

    #[test]
    fn pod_defaults_follow_network_mode() {
        let vxlan = CreatePod {
            name: "overlay".into(),
            network: Some("vxlan".into()),
            ..CreatePod::default()
        };
        let (pod, profile) = vxlan.into_records().expect("valid");
        assert_eq!((pod.cpu_ratio, pod.memory_ratio, pod.placement), (1.0, 1.0, Placement::Pack));
        assert_eq!((profile.segmentation_first, profile.segmentation_last), (1, 16_777_215));
        assert_eq!(profile.workload_class, "general");
        let (_, vlan) = CreatePod { name: "plain".into(), ..CreatePod::default() }
            .into_records()
            .expect("valid");
        assert_eq!(vlan, PodProfile::default());
    }
}
