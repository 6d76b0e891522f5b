//! Apply rules for volumes and SAN pools.
//!
//! A DAS volume lives in one host's local pool and counts against that
//! host's disk. A SAN volume lives in its pod's shared pool and counts
//! against the pool's capacity, which the SAN agent reports. Both limits are
//! scaled by the pod's storage ratio. A volume attaches to one instance at a
//! time, and a DAS volume only to an instance on its own host.

use super::apply::{devices_of, reject, supersede, Txn};
use super::command::{CommandResult, Rejection};
use super::model::{
    DesiredState, Host, Instance, InstanceDevices, JournalEntry, LeaderStamp, OrderAction,
    OrderOutcome, Pod, PodProfile, SanPool, StorageModel, Volume, VolumePool, VolumeState,
};
use crate::store::db::{
    self, DbError, CF_DEVICES, CF_HOSTS, CF_INSTANCES, CF_JOURNAL, CF_PODS, CF_POD_PROFILES,
    CF_SAN_POOLS, CF_VOLUMES, CF_VOLUME_NAMES,
};

/// Returns an instance's name for messages, or its id once it is gone.
pub fn instance_name(txn: &Txn, id: &str) -> Result<String, DbError> {
    Ok(txn.get::<Instance>(CF_INSTANCES, id.as_bytes())?.map_or_else(|| id.to_string(), |i| i.name))
}

fn profile(txn: &Txn, pod: &str) -> Result<PodProfile, DbError> {
    Ok(txn.get(CF_POD_PROFILES, pod.as_bytes())?.unwrap_or_default())
}

/// Scales a physical size by the pod's storage ratio.
fn limit(capacity_gib: u64, profile: &PodProfile) -> u64 {
    (capacity_gib as f64 * profile.storage_ratio).floor() as u64
}

pub fn register_san_pool(txn: &mut Txn, pod: &str, host: &str, capacity_gib: u64) -> Result<CommandResult, DbError> {
    if txn.get::<Pod>(CF_PODS, pod.as_bytes())?.is_none() {
        return reject(Rejection::UnknownPod(pod.to_string()));
    }
    let profile = profile(txn, pod)?;
    if profile.storage != StorageModel::San || profile.san_agent.as_deref() != Some(host) {
        return reject(Rejection::NotSanAgent {
            host: host.to_string(),
            pod: pod.to_string(),
            expected: match &profile.san_agent {
                Some(agent) => format!("{agent:?}"),
                None => "none (it is a DAS pod)".to_string(),
            },
        });
    }
    let used_gib = txn.get::<SanPool>(CF_SAN_POOLS, pod.as_bytes())?.map_or(0, |p| p.used_gib);
    let pool = SanPool {
        pod: pod.to_string(),
        host: host.to_string(),
        capacity_gib,
        used_gib,
    };
    txn.put(CF_SAN_POOLS, pod.as_bytes(), &pool)?;
    Ok(CommandResult::SanPool(pool))
}

pub fn create_volume(
    txn: &mut Txn,
    index: u64,
    id: &str,
    name: &str,
    pod: &str,
    host: Option<&str>,
    size_gib: u64,
) -> Result<CommandResult, DbError> {
    if txn.get::<String>(CF_VOLUME_NAMES, name.as_bytes())?.is_some() {
        return reject(Rejection::VolumeNameTaken(name.to_string()));
    }
    if txn.get::<Volume>(CF_VOLUMES, id.as_bytes())?.is_some() {
        return reject(Rejection::VolumeIdTaken(id.to_string()));
    }
    if txn.get::<Pod>(CF_PODS, pod.as_bytes())?.is_none() {
        return reject(Rejection::UnknownPod(pod.to_string()));
    }
    let profile = profile(txn, pod)?;
    let (pool, pool_host) = match profile.storage {
        StorageModel::Das => {
            let Some(host_id) = host else {
                return reject(Rejection::UnknownHost(String::new()));
            };
            let Some(mut host) = txn.get::<Host>(CF_HOSTS, host_id.as_bytes())? else {
                return reject(Rejection::UnknownHost(host_id.to_string()));
            };
            if host.pod != pod {
                return reject(Rejection::HostNotInPod {
                    host: host.id,
                    host_pod: host.pod,
                    pod: pod.to_string(),
                });
            }
            let capacity = limit(host.disk_gib, &profile);
            let free = capacity.saturating_sub(host.used_disk_gib);
            if size_gib > free {
                return reject(Rejection::PoolFull {
                    pool: format!("the local pool of host {:?}", host.id),
                    size_gib,
                    free_gib: free,
                    capacity_gib: capacity,
                });
            }
            host.used_disk_gib += size_gib;
            txn.put(CF_HOSTS, host.id.as_bytes(), &host)?;
            (VolumePool::Local, host.id)
        }
        StorageModel::San => {
            let Some(mut san) = txn.get::<SanPool>(CF_SAN_POOLS, pod.as_bytes())? else {
                return reject(Rejection::NoSanPool(pod.to_string()));
            };
            let capacity = limit(san.capacity_gib, &profile);
            let free = capacity.saturating_sub(san.used_gib);
            if size_gib > free {
                return reject(Rejection::PoolFull {
                    pool: format!("the shared pool of SAN pod {pod:?}"),
                    size_gib,
                    free_gib: free,
                    capacity_gib: capacity,
                });
            }
            san.used_gib += size_gib;
            txn.put(CF_SAN_POOLS, pod.as_bytes(), &san)?;
            (VolumePool::San, san.host)
        }
    };
    let volume = Volume {
        id: id.to_string(),
        name: name.to_string(),
        pod: pod.to_string(),
        pool,
        host: pool_host,
        size_gib,
        attached_to: None,
        state: VolumeState::Creating,
        created_index: index,
        open_order: None,
        last_error: None,
    };
    txn.put(CF_VOLUME_NAMES, name.as_bytes(), &volume.id)?;
    txn.put(CF_VOLUMES, id.as_bytes(), &volume)?;
    Ok(CommandResult::Volume(volume))
}

pub fn delete_volume(txn: &mut Txn, id: &str) -> Result<CommandResult, DbError> {
    let Some(mut volume) = txn.get::<Volume>(CF_VOLUMES, id.as_bytes())? else {
        return reject(Rejection::UnknownVolume(id.to_string()));
    };
    if volume.state == VolumeState::Detaching {
        return reject(Rejection::VolumeNotAvailable {
            volume: volume.name,
            state: volume.state.as_str().to_string(),
        });
    }
    if let Some(instance) = &volume.attached_to {
        return reject(Rejection::VolumeAttached {
            instance: instance_name(txn, instance)?,
            volume: volume.name,
        });
    }
    if volume.state != VolumeState::Deleting {
        volume.state = VolumeState::Deleting;
        txn.put(CF_VOLUMES, id.as_bytes(), &volume)?;
    }
    Ok(CommandResult::Volume(volume))
}

/// Attaches a volume to an instance's record, or returns why it cannot.
/// The caller records the volume in the instance's devices.
pub fn attach_to(txn: &mut Txn, volume_id: &str, instance: &Instance) -> Result<Option<Rejection>, DbError> {
    let Some(mut volume) = txn.get::<Volume>(CF_VOLUMES, volume_id.as_bytes())? else {
        return Ok(Some(Rejection::UnknownVolume(volume_id.to_string())));
    };
    if volume.state == VolumeState::Detaching {
        return Ok(Some(Rejection::VolumeNotAvailable {
            volume: volume.name,
            state: volume.state.as_str().to_string(),
        }));
    }
    if let Some(holder) = &volume.attached_to {
        return Ok(Some(Rejection::VolumeAttached {
            instance: instance_name(txn, holder)?,
            volume: volume.name,
        }));
    }
    if volume.state != VolumeState::Available {
        return Ok(Some(Rejection::VolumeNotAvailable {
            volume: volume.name,
            state: volume.state.as_str().to_string(),
        }));
    }
    if volume.pod != instance.pod {
        return Ok(Some(Rejection::VolumePodMismatch {
            volume: volume.name,
            volume_pod: volume.pod,
            instance: instance.name.clone(),
            instance_pod: instance.pod.clone(),
        }));
    }
    if volume.pool == VolumePool::Local && volume.host != instance.host {
        return Ok(Some(Rejection::VolumeHostMismatch {
            volume: volume.name,
            volume_host: volume.host,
            pod: volume.pod,
            instance: instance.name.clone(),
            instance_host: instance.host.clone(),
        }));
    }
    volume.attached_to = Some(instance.id.clone());
    txn.put(CF_VOLUMES, volume_id.as_bytes(), &volume)?;
    Ok(None)
}

pub fn attach_volume(txn: &mut Txn, volume_id: &str, instance_id: &str) -> Result<CommandResult, DbError> {
    let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, instance_id.as_bytes())? else {
        return reject(Rejection::UnknownInstance(instance_id.to_string()));
    };
    if instance.desired == DesiredState::Deleted {
        return reject(Rejection::UnknownInstance(instance.name));
    }
    if let Some(rejection) = attach_to(txn, volume_id, &instance)? {
        return reject(rejection);
    }
    let mut devices = devices_of(txn, instance_id)?;
    devices.volumes.push(volume_id.to_string());
    instance.generation += 1;
    txn.put(CF_DEVICES, instance_id.as_bytes(), &devices)?;
    txn.put(CF_INSTANCES, instance_id.as_bytes(), &instance)?;
    Ok(CommandResult::Devices(instance, devices))
}

/// Detaches a volume from its instance's record. The volume stays
/// `detaching`, reserved for that instance, until the host confirms a
/// definition without it, so no other instance can write it meanwhile.
pub fn detach_volume(txn: &mut Txn, volume_id: &str) -> Result<CommandResult, DbError> {
    let Some(mut volume) = txn.get::<Volume>(CF_VOLUMES, volume_id.as_bytes())? else {
        return reject(Rejection::UnknownVolume(volume_id.to_string()));
    };
    let attached = volume.attached_to.clone().filter(|_| volume.state == VolumeState::Available);
    let Some(instance_id) = attached else {
        return reject(Rejection::VolumeNotAttached { volume: volume.name });
    };
    let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, instance_id.as_bytes())? else {
        detach_from(txn, volume_id)?;
        return Ok(CommandResult::Volume(volume));
    };
    instance.generation += 1;
    let mut devices = devices_of(txn, &instance_id)?;
    devices.volumes.retain(|v| v != volume_id);
    devices.detaching.push(volume_id.to_string());
    devices.detached_generation = instance.generation;
    volume.state = VolumeState::Detaching;
    txn.put(CF_VOLUMES, volume_id.as_bytes(), &volume)?;
    txn.put(CF_DEVICES, instance_id.as_bytes(), &devices)?;
    txn.put(CF_INSTANCES, instance_id.as_bytes(), &instance)?;
    Ok(CommandResult::Devices(instance, devices))
}

/// Frees a volume of an instance: on instance removal, and once the host
/// confirmed a detach.
pub fn detach_from(txn: &mut Txn, volume_id: &str) -> Result<(), DbError> {
    if let Some(mut volume) = txn.get::<Volume>(CF_VOLUMES, volume_id.as_bytes())? {
        volume.attached_to = None;
        if volume.state == VolumeState::Detaching {
            volume.state = VolumeState::Available;
        }
        txn.put(CF_VOLUMES, volume_id.as_bytes(), &volume)?;
    }
    Ok(())
}

/// Frees the detaching volumes and NIC leases of an instance whose host confirmed its
/// definition at `generation`, or whose old domain can no longer run
/// (`generation` is `u64::MAX` after a fence).
///
/// NOTE: without hot-plug (of the hypervisors here, only libvirt's test
/// driver) the running domain keeps the volume until its next start, yet
/// the volume is freed once the new definition is confirmed.
pub fn finish_detaches(txn: &mut Txn, devices: &mut InstanceDevices, generation: u64) -> Result<(), DbError> {
    if generation < devices.detached_generation {
        return Ok(());
    }
    for volume_id in std::mem::take(&mut devices.detaching) {
        detach_from(txn, &volume_id)?;
    }
    for nic in std::mem::take(&mut devices.detaching_nics) {
        super::nics::release_lease(txn, &nic)?;
    }
    Ok(())
}

pub fn open_volume_order(
    txn: &mut Txn,
    index: u64,
    volume_id: &str,
    action: OrderAction,
    leader: LeaderStamp,
) -> Result<CommandResult, DbError> {
    let Some(mut volume) = txn.get::<Volume>(CF_VOLUMES, volume_id.as_bytes())? else {
        return reject(Rejection::UnknownVolume(volume_id.to_string()));
    };
    if let Some(rejection) = supersede(txn, &volume.name, volume.open_order, leader)? {
        return reject(rejection);
    }
    let entry = JournalEntry {
        id: index,
        subject: volume.id.clone(),
        host_id: volume.host.clone(),
        action,
        generation: 0,
        leader,
        outcome: None,
    };
    volume.open_order = Some(index);
    txn.put(CF_VOLUMES, volume_id.as_bytes(), &volume)?;
    txn.put(CF_JOURNAL, &db::index_key(index), &entry)?;
    Ok(CommandResult::Order(entry))
}

pub fn close_volume_order(txn: &mut Txn, entry: &JournalEntry, outcome: &OrderOutcome) -> Result<(), DbError> {
    let Some(mut volume) = txn.get::<Volume>(CF_VOLUMES, entry.subject.as_bytes())? else {
        return Ok(());
    };
    if volume.open_order == Some(entry.id) {
        volume.open_order = None;
    }
    match outcome {
        OrderOutcome::Done { .. } => {
            volume.last_error = None;
            match (entry.action, volume.state) {
                (OrderAction::CreateVolume, VolumeState::Creating) => volume.state = VolumeState::Available,
                (OrderAction::DeleteVolume, VolumeState::Deleting) => return remove_volume(txn, &volume),
                _ => {}
            }
        }
        OrderOutcome::Failed { error } => volume.last_error = Some(error.clone()),
        OrderOutcome::Fenced | OrderOutcome::Superseded => {}
    }
    txn.put(CF_VOLUMES, volume.id.as_bytes(), &volume)
}

/// Drops a deleted volume and returns its space to its pool.
fn remove_volume(txn: &mut Txn, volume: &Volume) -> Result<(), DbError> {
    match volume.pool {
        VolumePool::Local => {
            if let Some(mut host) = txn.get::<Host>(CF_HOSTS, volume.host.as_bytes())? {
                host.used_disk_gib = host.used_disk_gib.saturating_sub(volume.size_gib);
                txn.put(CF_HOSTS, host.id.as_bytes(), &host)?;
            }
        }
        VolumePool::San => {
            if let Some(mut san) = txn.get::<SanPool>(CF_SAN_POOLS, volume.pod.as_bytes())? {
                san.used_gib = san.used_gib.saturating_sub(volume.size_gib);
                txn.put(CF_SAN_POOLS, volume.pod.as_bytes(), &san)?;
            }
        }
    }
    txn.delete(CF_VOLUME_NAMES, volume.name.as_bytes());
    txn.delete(CF_VOLUMES, volume.id.as_bytes());
    Ok(())
}
