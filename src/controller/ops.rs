//! The leader's handling of client and agent writes: input validation,
//! scheduling, and the proposal of the resulting commands. Every function
//! here runs on the leader; the gRPC layer forwards calls that reach a
//! follower.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::time::Instant;

use super::error::ApiError;
use super::node::Node;
use crate::scheduler::{self, Reserved};
use crate::zone::command::{Command, CommandResult, Rejection};
use crate::zone::model::{Host, HostHealth, Instance, KeyValue, Placement, Pod};

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
}

/// The leader's record of each host's liveness between heartbeats.
#[derive(Debug)]
pub struct HostLiveness {
    pub last_heartbeat: Instant,
    /// Instance ids reported missing by consecutive heartbeats.
    pub absent: BTreeMap<String, u32>,
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
        Ok(())
    }
}

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
        if let Some(pod) = &request.pod {
            if !pods.contains_key(pod) {
                return Err(Rejection::UnknownPod(pod.clone()).into());
            }
        }
        for _ in 0..PLACEMENT_ATTEMPTS {
            match self.try_place(&request, &pods).await? {
                CommandResult::Instance(instance) | CommandResult::Duplicate(instance) => {
                    return Ok(instance)
                }
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

    async fn try_place(
        &self,
        request: &CreateInstance,
        pods: &BTreeMap<String, Pod>,
    ) -> Result<CommandResult, ApiError> {
        let hosts = self.node.hosts()?;
        let wanted = scheduler::Request {
            vcpus: request.vcpus,
            memory_mib: request.memory_mib,
            disk_gib: request.disk_gib,
            pod: request.pod.as_deref(),
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
        let command = Command::CreateInstance {
            id: uuid::Uuid::new_v4().to_string(),
            name: request.name.clone(),
            vcpus: request.vcpus,
            memory_mib: request.memory_mib,
            disk_gib: request.disk_gib,
            pod: decision.pod.clone(),
            host: decision.host.clone(),
            request_id: request.request_id.clone(),
        };
        let result = self.node.propose(command).await;
        self.release(&decision.host, request);
        let outcome = match &result {
            Ok(CommandResult::Instance(_)) => "placed",
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

    pub async fn create_pod(&self, pod: Pod) -> Result<Pod, ApiError> {
        validate_name("name", &pod.name)?;
        for (field, ratio) in [("cpu_ratio", pod.cpu_ratio), ("memory_ratio", pod.memory_ratio)] {
            if !(ratio.is_finite() && (0.1..=64.0).contains(&ratio)) {
                return Err(ApiError::invalid(field, ratio, "must be between 0.1 and 64"));
            }
        }
        match self.node.propose(Command::CreatePod { pod }).await? {
            CommandResult::Pod(pod) => Ok(pod),
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
        }
    }

    /// Sets a zone key, or, with `expected` given, swaps it only if the key
    /// holds that value (`Some(None)`: only if the key is absent).
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

    pub async fn register_host(&self, command: Command) -> Result<Host, ApiError> {
        let result = self.node.propose(command).await?;
        match result {
            CommandResult::Host(host) => {
                self.liveness.insert(
                    host.id.clone(),
                    HostLiveness {
                        last_heartbeat: Instant::now(),
                        absent: BTreeMap::new(),
                    },
                );
                Ok(host)
            }
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
        }
    }

    /// Records a heartbeat: marks the host up again if it was suspect, and
    /// marks instances missing that the host stopped reporting.
    pub async fn heartbeat(&self, host_id: &str, domains: &[String]) -> Result<(), ApiError> {
        let Some(host) = self.node.host(host_id)? else {
            return Err(Rejection::UnknownHost(host_id.to_string()).into());
        };
        let missing = self.record_heartbeat(&host, domains)?;
        if host.health != HostHealth::Up {
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
    fn record_heartbeat(&self, host: &Host, domains: &[String]) -> Result<Vec<String>, ApiError> {
        let instances: Vec<Instance> = self
            .node
            .instances()?
            .into_iter()
            .filter(|i| i.host == host.id)
            .collect();
        let mut entry = self.liveness.entry(host.id.clone()).or_insert_with(|| HostLiveness {
            last_heartbeat: Instant::now(),
            absent: BTreeMap::new(),
        });
        entry.last_heartbeat = Instant::now();
        let mut missing = Vec::new();
        let mut absent = BTreeMap::new();
        for instance in instances {
            let expected = instance.observed == crate::zone::model::ObservedState::Running
                && instance.open_order.is_none();
            if !expected || domains.contains(&instance.id) {
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
        Ok(missing)
    }
}

pub fn parse_placement(text: &str) -> Result<Placement, ApiError> {
    Placement::parse(text).ok_or_else(|| ApiError::invalid("placement", text, "use \"pack\" or \"spread\""))
}
