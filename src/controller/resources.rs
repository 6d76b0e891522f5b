//! The leader's handling of volume, NIC, migration and drain requests.
//!
//! Each request is validated and resolved here (names to ids, a host for a
//! DAS volume, a destination for a migration) and proposed as one command.
//! Apply checks every rule again, so a decision made on a stale view is
//! rejected rather than applied.

use super::error::ApiError;
use super::ops::{validate_name, Zone};
use crate::scheduler;
use crate::zone::command::{Command, CommandResult, Rejection};
use crate::zone::model::{
    DesiredState, HostHealth, Instance, InstanceDevices, StorageModel, Volume,
};

/// Largest volume accepted, in GiB (1 PiB).
const MAX_VOLUME_GIB: u64 = 1024 * 1024;

/// The moment a device change reaches the instance's domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applies {
    /// The running domain changes at once (hot-plug).
    Now,
    /// The hypervisor has no hot-plug; the change waits for the next start.
    NextStart,
    /// The instance is not running yet; its first start carries the change.
    AtStart,
}

impl Applies {
    pub fn as_str(self) -> &'static str {
        match self {
            Applies::Now => "now",
            Applies::NextStart => "next start",
            Applies::AtStart => "at start",
        }
    }
}

/// The result of a device change.
pub struct DeviceChange {
    pub instance: Instance,
    pub devices: InstanceDevices,
    pub applies: Applies,
    pub message: String,
}

fn unexpected(result: CommandResult) -> ApiError {
    ApiError::Internal(format!("unexpected result {result:?}"))
}

impl Zone {
    pub async fn create_volume(
        &self,
        name: String,
        pod: String,
        size_gib: u64,
        host: Option<String>,
    ) -> Result<Volume, ApiError> {
        validate_name("name", &name)?;
        validate_name("pod", &pod)?;
        if size_gib == 0 || size_gib > MAX_VOLUME_GIB {
            return Err(ApiError::invalid("size_gib", size_gib, format!("must be 1 to {MAX_VOLUME_GIB}")));
        }
        self.node.read_barrier().await?;
        if self.node.pod(&pod)?.is_none() {
            return Err(Rejection::UnknownPod(pod).into());
        }
        let profile = self.node.pod_profile(&pod)?;
        let host = match (profile.storage, host) {
            (StorageModel::San, Some(host)) => {
                let reason = format!("pod {pod:?} is a SAN pod; its volumes live in the shared pool, so leave host empty");
                return Err(ApiError::invalid("host", host, reason));
            }
            (StorageModel::San, None) => None,
            (StorageModel::Das, Some(host)) => Some(host),
            (StorageModel::Das, None) => Some(self.roomiest_host(&pod, size_gib)?),
        };
        // The pool's agent creates the volume; a create it cannot execute
        // would stay "creating" until the host returns.
        let pool_host = match &host {
            Some(host) => Some(host.clone()),
            None => self.node.san_pool(&pod)?.map(|pool| pool.host),
        };
        if let Some(pool_host) = pool_host {
            if let Some(record) = self.node.host(&pool_host)? {
                if !record.health.takes_orders() {
                    return Err(ApiError::PoolHostDown {
                        host: record.id,
                        health: record.health.as_str().to_string(),
                    });
                }
            }
        }
        let command = Command::CreateVolume {
            id: uuid::Uuid::new_v4().to_string(),
            name,
            pod,
            host,
            size_gib,
        };
        match self.node.propose(command).await? {
            CommandResult::Volume(volume) => Ok(volume),
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(unexpected(other)),
        }
    }

    /// Returns the up host of a DAS pod with the most free disk that fits
    /// `size_gib`, for a volume created without a host.
    fn roomiest_host(&self, pod: &str, size_gib: u64) -> Result<String, ApiError> {
        let profile = self.node.pod_profile(pod)?;
        let best = self
            .node
            .hosts()?
            .into_iter()
            .filter(|h| h.pod == pod && h.health == HostHealth::Up)
            .map(|h| {
                let capacity = (h.disk_gib as f64 * profile.storage_ratio).floor() as u64;
                (capacity.saturating_sub(h.used_disk_gib), h.id)
            })
            .filter(|(free, _)| *free >= size_gib)
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        match best {
            Some((_, host)) => Ok(host),
            None => Err(Rejection::PoolFull {
                pool: format!("every local pool of DAS pod {pod:?}"),
                size_gib,
                free_gib: 0,
                capacity_gib: 0,
            }
            .into()),
        }
    }

    pub async fn delete_volume(&self, name_or_id: &str) -> Result<Volume, ApiError> {
        let volume = self.find_volume(name_or_id).await?;
        match self.node.propose(Command::DeleteVolume { id: volume.id }).await? {
            CommandResult::Volume(volume) => Ok(volume),
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(unexpected(other)),
        }
    }

    async fn find_volume(&self, name_or_id: &str) -> Result<Volume, ApiError> {
        self.node.read_barrier().await?;
        self.node
            .volume(name_or_id)?
            .ok_or_else(|| Rejection::UnknownVolume(name_or_id.to_string()).into())
    }

    async fn find_instance(&self, name_or_id: &str) -> Result<Instance, ApiError> {
        self.node.read_barrier().await?;
        match self.node.instance(name_or_id)? {
            Some(instance) if instance.desired == DesiredState::Running => Ok(instance),
            _ => Err(Rejection::UnknownInstance(name_or_id.to_string()).into()),
        }
    }

    pub async fn attach_volume(&self, volume: &str, instance: &str) -> Result<DeviceChange, ApiError> {
        let volume = self.find_volume(volume).await?;
        let instance = self.find_instance(instance).await?;
        let command = Command::AttachVolume {
            volume_id: volume.id,
            instance_id: instance.id,
        };
        self.device_change(command).await
    }

    pub async fn detach_volume(&self, volume: &str) -> Result<DeviceChange, ApiError> {
        let volume = self.find_volume(volume).await?;
        self.device_change(Command::DetachVolume { volume_id: volume.id }).await
    }

    pub async fn attach_nic(&self, instance: &str, network: &str) -> Result<DeviceChange, ApiError> {
        let instance = self.find_instance(instance).await?;
        let command = Command::AttachNic {
            instance_id: instance.id,
            network: network.to_string(),
        };
        self.device_change(command).await
    }

    pub async fn detach_nic(&self, instance: &str, network: &str) -> Result<DeviceChange, ApiError> {
        let instance = self.find_instance(instance).await?;
        let command = Command::DetachNic {
            instance_id: instance.id,
            network: network.to_string(),
        };
        self.device_change(command).await
    }

    /// Proposes a device change and reports when it reaches the domain.
    async fn device_change(&self, command: Command) -> Result<DeviceChange, ApiError> {
        let (instance, devices) = match self.node.propose(command).await? {
            CommandResult::Devices(instance, devices) => (instance, devices),
            CommandResult::Rejected(rejection) => return Err(rejection.into()),
            other => return Err(unexpected(other)),
        };
        let hot_plug = self
            .node
            .host(&instance.host)?
            .is_some_and(|h| !h.libvirt_uri.starts_with("test:"));
        let running = instance.observed == crate::zone::model::ObservedState::Running;
        let (applies, message) = match (running, hot_plug) {
            (false, _) => (
                Applies::AtStart,
                format!(
                    "instance {:?} is {}, not running; its next start carries the change",
                    instance.name,
                    instance.observed.as_str()
                ),
            ),
            (true, true) => (
                Applies::Now,
                format!(
                    "the agent of host {:?} will change the running domain (hot-plug); \
                     `ccs instance show` lists the devices",
                    instance.host
                ),
            ),
            (true, false) => (
                Applies::NextStart,
                format!(
                    "host {:?} runs libvirt's test driver, which has no hot-plug: its agent will \
                     update the definition, and the running domain gets the change at its next start",
                    instance.host
                ),
            ),
        };
        Ok(DeviceChange {
            instance,
            devices,
            applies,
            message,
        })
    }

    /// Starts migrating a running SAN instance; the scheduler picks the
    /// destination unless `to` names one.
    pub async fn migrate_instance(&self, name_or_id: &str, to: Option<String>) -> Result<Instance, ApiError> {
        let instance = self.find_instance(name_or_id).await?;
        let to = match to {
            Some(to) => to,
            None => self.destination_for(&instance)?,
        };
        let command = Command::MigrateInstance {
            instance_id: instance.id,
            to,
        };
        match self.node.propose(command).await? {
            CommandResult::Instance(instance) => Ok(instance),
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(unexpected(other)),
        }
    }

    /// Chooses another up host of the instance's pod with room for it.
    pub(super) fn destination_for(&self, instance: &Instance) -> Result<String, ApiError> {
        let pods = self.node.pods()?;
        let hosts = self.node.hosts()?;
        let request = scheduler::Request {
            vcpus: instance.vcpus,
            memory_mib: instance.memory_mib,
            disk_gib: instance.disk_gib,
            pod: Some(&instance.pod),
            host: None,
            avoid: Some(&instance.host),
        };
        let reserved = Default::default();
        match scheduler::place(&request, &pods, &hosts, &reserved) {
            Some(decision) => Ok(decision.host),
            None => Err(ApiError::NoCapacity {
                scope: format!("pod {:?} besides host {:?}", instance.pod, instance.host),
                vcpus: instance.vcpus,
                memory_mib: instance.memory_mib,
                disk_gib: instance.disk_gib,
            }),
        }
    }

    /// Stops placements on a SAN host and migrates its running instances
    /// away. A DAS host is refused, naming the instances that cannot move,
    /// and so is a SAN host whose instances do not all fit elsewhere: then
    /// nothing changes.
    pub async fn drain_host(&self, host_id: &str) -> Result<(crate::zone::model::Host, Vec<Instance>), ApiError> {
        self.node.read_barrier().await?;
        let Some(host) = self.node.host(host_id)? else {
            return Err(Rejection::UnknownHost(host_id.to_string()).into());
        };
        let on_host: Vec<Instance> = self
            .node
            .instances()?
            .into_iter()
            .filter(|i| i.host == host.id && i.desired == DesiredState::Running)
            .collect();
        if self.node.pod_profile(&host.pod)?.storage == StorageModel::Das {
            if on_host.is_empty() {
                return self.set_draining(host_id).await.map(|host| (host, Vec::new()));
            }
            return Err(ApiError::NotDrainable {
                host: host.id,
                pod: host.pod,
                instances: on_host.into_iter().map(|i| i.name).collect(),
            });
        }
        let moves = self.node.moves()?;
        let to_move: Vec<Instance> = on_host.iter().filter(|i| !moves.contains_key(&i.id)).cloned().collect();
        // Plan every destination first, each holding its capacity for the
        // next, so a drain that cannot finish changes nothing.
        let plan = self.plan_destinations(&to_move)?;
        let host = self.set_draining(host_id).await?;
        let mut migrating: Vec<Instance> = on_host.into_iter().filter(|i| moves.contains_key(&i.id)).collect();
        let mut stuck = Vec::new();
        for (instance, to) in to_move.into_iter().zip(plan) {
            let command = Command::MigrateInstance {
                instance_id: instance.id.clone(),
                to,
            };
            match self.node.propose(command).await? {
                CommandResult::Instance(instance) => migrating.push(instance),
                CommandResult::Rejected(rejection) => {
                    tracing::warn!(host_id, instance = %instance.name, %rejection, "drain could not migrate instance");
                    stuck.push(format!("{}: {rejection}", instance.name));
                }
                other => return Err(unexpected(other)),
            }
        }
        if !stuck.is_empty() {
            return Err(ApiError::DrainIncomplete {
                host: host.id,
                stuck,
            });
        }
        Ok((host, migrating))
    }

    /// Chooses a destination for each instance, counting the ones chosen
    /// before it, or fails naming the first that fits nowhere.
    fn plan_destinations(&self, instances: &[Instance]) -> Result<Vec<String>, ApiError> {
        let pods = self.node.pods()?;
        let hosts = self.node.hosts()?;
        let mut reserved: std::collections::BTreeMap<String, scheduler::Reserved> = Default::default();
        let mut plan = Vec::with_capacity(instances.len());
        for instance in instances {
            let request = scheduler::Request {
                vcpus: instance.vcpus,
                memory_mib: instance.memory_mib,
                disk_gib: instance.disk_gib,
                pod: Some(&instance.pod),
                host: None,
                avoid: Some(&instance.host),
            };
            let Some(decision) = scheduler::place(&request, &pods, &hosts, &reserved) else {
                return Err(ApiError::NoCapacity {
                    scope: format!(
                        "pod {:?} besides host {:?} (for instance {:?}; the host was not drained)",
                        instance.pod, instance.host, instance.name
                    ),
                    vcpus: instance.vcpus,
                    memory_mib: instance.memory_mib,
                    disk_gib: instance.disk_gib,
                });
            };
            let held = reserved.entry(decision.host.clone()).or_default();
            held.vcpus += instance.vcpus;
            held.memory_mib += instance.memory_mib;
            held.disk_gib += instance.disk_gib;
            plan.push(decision.host);
        }
        Ok(plan)
    }

    async fn set_draining(&self, host_id: &str) -> Result<crate::zone::model::Host, ApiError> {
        let command = Command::SetHostDraining {
            host_id: host_id.to_string(),
            draining: true,
        };
        match self.node.propose(command).await? {
            CommandResult::Host(host) => Ok(host),
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(unexpected(other)),
        }
    }

    pub async fn undrain_host(&self, host_id: &str) -> Result<crate::zone::model::Host, ApiError> {
        let command = Command::SetHostDraining {
            host_id: host_id.to_string(),
            draining: false,
        };
        match self.node.propose(command).await? {
            CommandResult::Host(host) => Ok(host),
            CommandResult::Rejected(rejection) => Err(rejection.into()),
            other => Err(unexpected(other)),
        }
    }
}
