//! Deterministic apply of zone commands.
//!
//! Apply reads the state as of the previous log index, checks every rule
//! that must hold whatever the leader believed (name uniqueness, capacity,
//! generation, one open order per instance), and writes its changes into a
//! transaction. It reads no clock, draws no random numbers and does no I/O
//! beyond RocksDB reads: ids and times are stamped into commands by the
//! leader before they are proposed.
//!
//! Segmentation ids (VLAN ids and VNIs) are allocated here, so two racing
//! network creates cannot get the same id. Each pod's free ids are stored
//! as ranges keyed by their first id, so the lowest free id is one seek and
//! a release merges with at most two neighbours, whatever the range size.

use std::collections::BTreeMap;

use rocksdb::{Direction, IteratorMode, WriteBatch, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::command::{Command, CommandResult, Rejection};
use super::model::{
    DesiredState, Host, HostHealth, Instance, InstanceDevices, JournalEntry, KeyValue, LeaderStamp,
    Move, Network, NetworkState, ObservedState, OrderAction, OrderOutcome, Pod, PodProfile,
};
use super::{moves, nics, volumes};
use crate::store::db::{
    self, DbError, CF_DEVICES, CF_HOSTS, CF_INSTANCES, CF_JOURNAL, CF_KEYS, CF_MOVES, CF_NAMES,
    CF_NETWORKS, CF_PODS, CF_POD_PROFILES, CF_REQUESTS, CF_SEGMENTATION_FREE,
};

/// A raw key and value read through a `Txn`.
type Entry = (Vec<u8>, Vec<u8>);

/// An overlay slot: `None` when the key was not written, else the pending
/// value (`None` for a delete).
type Slot = Option<Option<Vec<u8>>>;

/// Pending writes of one apply call over the database, readable before commit.
pub struct Txn<'a> {
    pub(super) db: &'a DB,
    overlay: BTreeMap<(&'static str, Vec<u8>), Option<Vec<u8>>>,
    /// Each write of the current command with the slot it replaced, so that
    /// a rejected command leaves no write behind.
    undo: Vec<((&'static str, Vec<u8>), Slot)>,
}

impl<'a> Txn<'a> {
    pub fn new(db: &'a DB) -> Self {
        Txn {
            db,
            overlay: BTreeMap::new(),
            undo: Vec::new(),
        }
    }

    fn write(&mut self, cf: &'static str, key: &[u8], value: Option<Vec<u8>>) {
        let slot = (cf, key.to_vec());
        let previous = self.overlay.insert(slot.clone(), value);
        self.undo.push((slot, previous));
    }

    /// Starts a command: earlier commands' writes become final.
    fn begin(&mut self) {
        self.undo.clear();
    }

    /// Drops the current command's writes.
    fn roll_back(&mut self) {
        while let Some((slot, previous)) = self.undo.pop() {
            match previous {
                Some(value) => self.overlay.insert(slot, value),
                None => self.overlay.remove(&slot),
            };
        }
    }

    pub fn get<T: DeserializeOwned>(&self, cf: &'static str, key: &[u8]) -> Result<Option<T>, DbError> {
        match self.overlay.get(&(cf, key.to_vec())) {
            Some(Some(bytes)) => Ok(Some(db::decode(cf, bytes)?)),
            Some(None) => Ok(None),
            None => db::get(self.db, cf, key),
        }
    }

    pub fn put<T: Serialize>(&mut self, cf: &'static str, key: &[u8], value: &T) -> Result<(), DbError> {
        let bytes = db::encode(value)?;
        self.write(cf, key, Some(bytes));
        Ok(())
    }

    pub fn delete(&mut self, cf: &'static str, key: &[u8]) {
        self.write(cf, key, None);
    }

    /// Returns every record of `cf` whose key starts with `prefix`, as the
    /// pending writes would leave the column family, in key order.
    pub fn scan_prefix<T: DeserializeOwned>(
        &self,
        cf: &'static str,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, T)>, DbError> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let handle = self.db.cf_handle(cf).expect("column family is created at open");
        for item in self.db.iterator_cf(&handle, IteratorMode::From(prefix, Direction::Forward)) {
            let (key, value) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            merged.insert(key.to_vec(), value.to_vec());
        }
        let pending = self.overlay.range((cf, prefix.to_vec())..);
        for ((pending_cf, key), value) in pending {
            if *pending_cf != cf || !key.starts_with(prefix) {
                break;
            }
            match value {
                Some(bytes) => merged.insert(key.clone(), bytes.clone()),
                None => merged.remove(key),
            };
        }
        merged
            .into_iter()
            .map(|(key, bytes)| Ok((key, db::decode(cf, &bytes)?)))
            .collect()
    }

    /// Returns the entry with the smallest key in `start..end`, as the
    /// pending writes would leave the column family.
    pub fn first_in(
        &self,
        cf: &'static str,
        start: &[u8],
        end: &[u8],
    ) -> Result<Option<Entry>, DbError> {
        let pending = self
            .overlay
            .range((cf, start.to_vec())..(cf, end.to_vec()))
            .find_map(|((_, key), value)| Some((key.clone(), value.clone()?)));
        let handle = self.db.cf_handle(cf).expect("column family is created at open");
        let mut stored = None;
        for item in self.db.iterator_cf(&handle, IteratorMode::From(start, Direction::Forward)) {
            let (key, value) = item?;
            if key.as_ref() >= end {
                break;
            }
            // Pending writes to this key, puts or deletes, take precedence.
            if !self.overlay.contains_key(&(cf, key.to_vec())) {
                stored = Some((key.to_vec(), value.to_vec()));
                break;
            }
        }
        Ok(match (pending, stored) {
            (Some(pending), Some(stored)) => {
                Some(if pending.0 <= stored.0 { pending } else { stored })
            }
            (pending, stored) => pending.or(stored),
        })
    }

    /// Returns the entry with the largest key in `start..=last`, as the
    /// pending writes would leave the column family.
    pub fn last_in(
        &self,
        cf: &'static str,
        start: &[u8],
        last: &[u8],
    ) -> Result<Option<Entry>, DbError> {
        let pending = self
            .overlay
            .range((cf, start.to_vec())..=(cf, last.to_vec()))
            .rev()
            .find_map(|((_, key), value)| Some((key.clone(), value.clone()?)));
        let handle = self.db.cf_handle(cf).expect("column family is created at open");
        let mut stored = None;
        for item in self.db.iterator_cf(&handle, IteratorMode::From(last, Direction::Reverse)) {
            let (key, value) = item?;
            if key.as_ref() < start {
                break;
            }
            if !self.overlay.contains_key(&(cf, key.to_vec())) {
                stored = Some((key.to_vec(), value.to_vec()));
                break;
            }
        }
        Ok(match (pending, stored) {
            (Some(pending), Some(stored)) => {
                Some(if pending.0 >= stored.0 { pending } else { stored })
            }
            (pending, stored) => pending.or(stored),
        })
    }

    /// Moves the pending writes into a RocksDB batch.
    pub fn into_batch(self) -> WriteBatch {
        let mut batch = WriteBatch::default();
        for ((cf, key), value) in self.overlay {
            let handle = self.db.cf_handle(cf).expect("column family is created at open");
            match value {
                Some(bytes) => batch.put_cf(&handle, key, bytes),
                None => batch.delete_cf(&handle, key),
            }
        }
        batch
    }
}

/// Applies one command at log index `index`. A rejected command writes nothing.
pub fn apply_command(txn: &mut Txn, index: u64, command: &Command) -> Result<CommandResult, DbError> {
    txn.begin();
    let result = apply_one(txn, index, command)?;
    if matches!(result, CommandResult::Rejected(_)) {
        txn.roll_back();
    }
    Ok(result)
}

fn apply_one(txn: &mut Txn, index: u64, command: &Command) -> Result<CommandResult, DbError> {
    let result = match command {
        Command::CreatePod { pod } => create_pod(txn, pod, None)?,
        Command::CreatePodWithProfile { pod, profile } => create_pod(txn, pod, Some(profile))?,
        Command::CreateNetwork { name, pod, cidr } => create_network(txn, index, name, pod, cidr)?,
        Command::DeleteNetwork { name } => delete_network(txn, name)?,
        Command::RegisterHost {
            id,
            pod,
            libvirt_uri,
            agent_endpoint,
            cpus,
            memory_mib,
            disk_gib,
            boot_id,
        } => {
            let registration = Host {
                id: id.clone(),
                pod: pod.clone(),
                libvirt_uri: libvirt_uri.clone(),
                agent_endpoint: agent_endpoint.clone(),
                cpus: *cpus,
                memory_mib: *memory_mib,
                disk_gib: *disk_gib,
                used_vcpus: 0,
                used_memory_mib: 0,
                used_disk_gib: 0,
                instances: 0,
                health: HostHealth::Up,
                boot_id: *boot_id,
            };
            register_host(txn, registration)?
        }
        Command::SetHostHealth { host_id, up } => set_host_health(txn, host_id, *up)?,
        Command::CreateInstance {
            id,
            name,
            vcpus,
            memory_mib,
            disk_gib,
            pod,
            host,
            request_id,
        } => {
            let instance = new_instance(index, id, name, (*vcpus, *memory_mib, *disk_gib), pod, host, request_id);
            create_instance(txn, instance, &[], &[])?
        }
        Command::CreateInstanceWithDevices {
            id,
            name,
            vcpus,
            memory_mib,
            disk_gib,
            pod,
            host,
            request_id,
            volumes,
            networks,
        } => {
            let instance = new_instance(index, id, name, (*vcpus, *memory_mib, *disk_gib), pod, host, request_id);
            create_instance(txn, instance, volumes, networks)?
        }
        Command::DeleteInstance { id } => delete_instance(txn, id)?,
        Command::OpenOrder {
            instance_id,
            action,
            generation,
            leader,
        } => {
            let entry = JournalEntry {
                id: index,
                subject: instance_id.clone(),
                host_id: String::new(),
                action: *action,
                generation: *generation,
                leader: *leader,
                outcome: None,
            };
            open_order(txn, entry)?
        }
        Command::CloseOrder { order_id, outcome } => close_order(txn, *order_id, outcome)?,
        Command::ObserveInstance {
            instance_id,
            observed,
        } => observe_instance(txn, instance_id, *observed)?,
        Command::PutKey { key, value } => put_key(txn, index, key, value)?,
        Command::CompareAndSwapKey {
            key,
            expected,
            value,
        } => {
            let current: Option<KeyValue> = txn.get(CF_KEYS, key.as_bytes())?;
            let actual = current.map(|kv| kv.value);
            if actual != *expected {
                return reject(Rejection::KeyMismatch {
                    key: key.clone(),
                    expected: expected.clone(),
                    actual,
                });
            }
            put_key(txn, index, key, value)?
        }
        Command::RegisterSanPool {
            pod,
            host,
            capacity_gib,
        } => volumes::register_san_pool(txn, pod, host, *capacity_gib)?,
        Command::CreateVolume {
            id,
            name,
            pod,
            host,
            size_gib,
        } => volumes::create_volume(txn, index, id, name, pod, host.as_deref(), *size_gib)?,
        Command::DeleteVolume { id } => volumes::delete_volume(txn, id)?,
        Command::AttachVolume {
            volume_id,
            instance_id,
        } => volumes::attach_volume(txn, volume_id, instance_id)?,
        Command::DetachVolume { volume_id } => volumes::detach_volume(txn, volume_id)?,
        Command::AttachNic {
            instance_id,
            network,
        } => nics::attach_nic(txn, instance_id, network)?,
        Command::DetachNic {
            instance_id,
            network,
        } => nics::detach_nic(txn, instance_id, network)?,
        Command::OpenVolumeOrder {
            volume_id,
            action,
            leader,
        } => volumes::open_volume_order(txn, index, volume_id, *action, *leader)?,
        Command::OpenEvictOrder {
            instance_id,
            host,
            leader,
        } => moves::open_evict_order(txn, index, instance_id, host, *leader)?,
        Command::ReleaseNetwork { name } => nics::release_network(txn, name)?,
        Command::MigrateInstance { instance_id, to } => moves::migrate_instance(txn, index, instance_id, to)?,
        Command::SetHostDraining { host_id, draining } => moves::set_host_draining(txn, host_id, *draining)?,
        Command::FenceHost {
            host_id,
            leader,
            method,
        } => moves::fence_host(txn, index, host_id, *leader, method)?,
        Command::EvacuateInstance { instance_id, to } => moves::evacuate_instance(txn, index, instance_id, to)?,
    };
    Ok(result)
}

fn new_instance(
    index: u64,
    id: &str,
    name: &str,
    (vcpus, memory_mib, disk_gib): (u32, u64, u64),
    pod: &str,
    host: &str,
    request_id: &Option<String>,
) -> Instance {
    Instance {
        id: id.to_string(),
        name: name.to_string(),
        vcpus,
        memory_mib,
        disk_gib,
        pod: pod.to_string(),
        host: host.to_string(),
        desired: DesiredState::Running,
        observed: ObservedState::Pending,
        generation: 1,
        created_index: index,
        request_id: request_id.clone(),
        last_error: None,
        open_order: None,
    }
}

fn put_key(txn: &mut Txn, index: u64, key: &str, value: &str) -> Result<CommandResult, DbError> {
    let record = KeyValue {
        key: key.to_string(),
        value: value.to_string(),
        modified_index: index,
    };
    txn.put(CF_KEYS, key.as_bytes(), &record)?;
    Ok(CommandResult::Key(record))
}

pub(super) fn reject(rejection: Rejection) -> Result<CommandResult, DbError> {
    Ok(CommandResult::Rejected(rejection))
}

fn create_pod(
    txn: &mut Txn,
    pod: &Pod,
    profile: Option<&PodProfile>,
) -> Result<CommandResult, DbError> {
    if txn.get::<Pod>(CF_PODS, pod.name.as_bytes())?.is_some() {
        return reject(Rejection::PodExists(pod.name.clone()));
    }
    txn.put(CF_PODS, pod.name.as_bytes(), pod)?;
    let Some(profile) = profile else {
        return Ok(CommandResult::Pod(pod.clone()));
    };
    put_profile(txn, &pod.name, profile)?;
    Ok(CommandResult::ProfiledPod(pod.clone(), profile.clone()))
}

/// Stores a pod's profile and marks its whole segmentation range free.
fn put_profile(txn: &mut Txn, pod: &str, profile: &PodProfile) -> Result<(), DbError> {
    txn.put(CF_POD_PROFILES, pod.as_bytes(), profile)?;
    let key = free_key(pod, profile.segmentation_first);
    txn.put(CF_SEGMENTATION_FREE, &key, &profile.segmentation_last)
}

/// Reads a pod's profile. A pod created by the legacy `CreatePod` has none:
/// it gets the default profile stored here, with its range free, at its first
/// network create, so that every replica opens the range at the same index.
fn stored_profile(txn: &mut Txn, pod: &str) -> Result<PodProfile, DbError> {
    if let Some(profile) = txn.get::<PodProfile>(CF_POD_PROFILES, pod.as_bytes())? {
        return Ok(profile);
    }
    let profile = PodProfile::default();
    put_profile(txn, pod, &profile)?;
    Ok(profile)
}

fn create_network(
    txn: &mut Txn,
    index: u64,
    name: &str,
    pod: &str,
    cidr: &str,
) -> Result<CommandResult, DbError> {
    if txn.get::<Network>(CF_NETWORKS, name.as_bytes())?.is_some() {
        return reject(Rejection::NetworkNameTaken(name.to_string()));
    }
    if txn.get::<Pod>(CF_PODS, pod.as_bytes())?.is_none() {
        return reject(Rejection::UnknownPod(pod.to_string()));
    }
    let profile = stored_profile(txn, pod)?;
    let Some(segmentation_id) = allocate_segmentation_id(txn, pod)? else {
        return reject(Rejection::SegmentationRangeExhausted {
            pod: pod.to_string(),
            mode: profile.network,
            first: profile.segmentation_first,
            last: profile.segmentation_last,
        });
    };
    // NOTE: IP leases inside `cidr` are not allocated yet; when they are,
    // apply allocates them too, so they are unique by construction.
    let network = Network {
        name: name.to_string(),
        pod: pod.to_string(),
        mode: profile.network,
        segmentation_id,
        cidr: cidr.to_string(),
        created_index: index,
        state: NetworkState::Active,
    };
    txn.put(CF_NETWORKS, name.as_bytes(), &network)?;
    Ok(CommandResult::Network(network))
}

fn delete_network(txn: &mut Txn, name: &str) -> Result<CommandResult, DbError> {
    let Some(mut network) = txn.get::<Network>(CF_NETWORKS, name.as_bytes())? else {
        return reject(Rejection::UnknownNetwork(name.to_string()));
    };
    let holders = nics::lease_holders(txn, name)?;
    if !holders.is_empty() {
        return reject(Rejection::NetworkInUse {
            network: name.to_string(),
            instances: holders,
        });
    }
    // Hosts may still carry the network; `ReleaseNetwork` frees the id
    // once none does, so no new network can share a live segment.
    network.state = NetworkState::Deleting;
    txn.put(CF_NETWORKS, name.as_bytes(), &network)?;
    Ok(CommandResult::Network(network))
}

/// The key of the free range of `pod` that starts at `first`.
fn free_key(pod: &str, first: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(pod.len() + 5);
    key.extend_from_slice(pod.as_bytes());
    key.push(0);
    key.extend_from_slice(&first.to_be_bytes());
    key
}

/// The first key past every free range of `pod`. Pod names are DNS labels,
/// so no pod name contains the zero byte and prefixes cannot overlap.
fn free_keys_end(pod: &str) -> Vec<u8> {
    let mut key = pod.as_bytes().to_vec();
    key.push(1);
    key
}

fn first_id_of(key: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&key[key.len() - 4..]);
    u32::from_be_bytes(bytes)
}

/// Takes the lowest free segmentation id of `pod`, or returns `None` when
/// its range is exhausted.
fn allocate_segmentation_id(txn: &mut Txn, pod: &str) -> Result<Option<u32>, DbError> {
    let lowest = txn.first_in(CF_SEGMENTATION_FREE, &free_key(pod, 0), &free_keys_end(pod))?;
    let Some((key, value)) = lowest else {
        return Ok(None);
    };
    let first = first_id_of(&key);
    let last: u32 = db::decode(CF_SEGMENTATION_FREE, &value)?;
    txn.delete(CF_SEGMENTATION_FREE, &key);
    if first < last {
        txn.put(CF_SEGMENTATION_FREE, &free_key(pod, first + 1), &last)?;
    }
    Ok(Some(first))
}

/// Returns `id` to the free ranges of `pod`, merged with the free ranges
/// that end just below it and start just above it.
pub(super) fn release_segmentation_id(txn: &mut Txn, pod: &str, id: u32) -> Result<(), DbError> {
    let (mut first, mut last) = (id, id);
    let below = txn.last_in(CF_SEGMENTATION_FREE, &free_key(pod, 0), &free_key(pod, id))?;
    if let Some((key, value)) = below {
        let below_last: u32 = db::decode(CF_SEGMENTATION_FREE, &value)?;
        if below_last >= id {
            // Only a bug can free an id twice; keeping the ranges unchanged
            // keeps them disjoint.
            tracing::error!(pod, segmentation_id = id, "released segmentation id is already free");
            return Ok(());
        }
        if below_last + 1 == id {
            first = first_id_of(&key);
        }
    }
    let above_key = free_key(pod, id + 1);
    if let Some(above_last) = txn.get::<u32>(CF_SEGMENTATION_FREE, &above_key)? {
        txn.delete(CF_SEGMENTATION_FREE, &above_key);
        last = above_last;
    }
    txn.put(CF_SEGMENTATION_FREE, &free_key(pod, first), &last)
}

fn register_host(txn: &mut Txn, registration: Host) -> Result<CommandResult, DbError> {
    if txn.get::<Pod>(CF_PODS, registration.pod.as_bytes())?.is_none() {
        return reject(Rejection::UnknownPod(registration.pod));
    }
    let key = registration.id.clone();
    let host = match txn.get::<Host>(CF_HOSTS, key.as_bytes())? {
        None => registration,
        Some(known) if known.pod != registration.pod => {
            return reject(Rejection::HostPodMismatch {
                host: known.id,
                pod: known.pod,
            })
        }
        Some(known) => {
            if known.boot_id != registration.boot_id {
                mark_host_domains_missing(txn, &known.id)?;
            }
            Host {
                used_vcpus: known.used_vcpus,
                used_memory_mib: known.used_memory_mib,
                used_disk_gib: known.used_disk_gib,
                instances: known.instances,
                ..registration
            }
        }
    };
    txn.put(CF_HOSTS, key.as_bytes(), &host)?;
    Ok(CommandResult::Host(host))
}

/// Marks every instance on a restarted host as missing: a host that booted
/// again has lost the domains it ran, so the reconciler must recreate them.
fn mark_host_domains_missing(txn: &mut Txn, host_id: &str) -> Result<(), DbError> {
    // NOTE: this scans every instance; a per-host index would make it
    // proportional to the host's instances once zones hold millions.
    for (_, mut instance) in txn.scan_prefix::<Instance>(CF_INSTANCES, b"")? {
        if instance.host == host_id && instance.observed != ObservedState::Pending {
            instance.observed = ObservedState::Missing;
            txn.put(CF_INSTANCES, instance.id.as_bytes(), &instance)?;
        }
    }
    Ok(())
}

fn set_host_health(txn: &mut Txn, host_id: &str, up: bool) -> Result<CommandResult, DbError> {
    let Some(mut host) = txn.get::<Host>(CF_HOSTS, host_id.as_bytes())? else {
        return reject(Rejection::UnknownHost(host_id.to_string()));
    };
    host.health = if up { HostHealth::Up } else { HostHealth::Suspect };
    txn.put(CF_HOSTS, host_id.as_bytes(), &host)?;
    Ok(CommandResult::Host(host))
}

fn create_instance(
    txn: &mut Txn,
    instance: Instance,
    volume_ids: &[String],
    networks: &[String],
) -> Result<CommandResult, DbError> {
    if let Some(request_id) = &instance.request_id {
        if let Some(first) = txn.get::<Instance>(CF_REQUESTS, request_id.as_bytes())? {
            // Prefer the instance as it is now; fall back to the record the
            // first create returned once the instance has been deleted.
            let current = txn.get::<Instance>(CF_INSTANCES, first.id.as_bytes())?;
            return Ok(CommandResult::Duplicate(current.unwrap_or(first)));
        }
    }
    if txn.get::<String>(CF_NAMES, instance.name.as_bytes())?.is_some() {
        return reject(Rejection::NameTaken(instance.name));
    }
    if txn.get::<Instance>(CF_INSTANCES, instance.id.as_bytes())?.is_some() {
        return reject(Rejection::IdTaken(instance.id));
    }
    let Some(pod) = txn.get::<Pod>(CF_PODS, instance.pod.as_bytes())? else {
        return reject(Rejection::UnknownPod(instance.pod));
    };
    let Some(mut host) = txn.get::<Host>(CF_HOSTS, instance.host.as_bytes())? else {
        return reject(Rejection::UnknownHost(instance.host));
    };
    if host.pod != pod.name {
        return reject(Rejection::HostPodMismatch {
            host: host.id,
            pod: host.pod,
        });
    }
    if host.health != HostHealth::Up {
        return reject(Rejection::HostNotUp(host.id));
    }
    if !host.fits(&pod, instance.vcpus, instance.memory_mib, instance.disk_gib) {
        return reject(Rejection::HostFull {
            host: host.id,
            vcpus: instance.vcpus,
            memory_mib: instance.memory_mib,
            disk_gib: instance.disk_gib,
        });
    }

    hold(&mut host, &instance);
    txn.put(CF_HOSTS, host.id.as_bytes(), &host)?;
    txn.put(CF_NAMES, instance.name.as_bytes(), &instance.id)?;
    if let Some(request_id) = &instance.request_id {
        txn.put(CF_REQUESTS, request_id.as_bytes(), &instance)?;
    }
    txn.put(CF_INSTANCES, instance.id.as_bytes(), &instance)?;
    if volume_ids.is_empty() && networks.is_empty() {
        return Ok(CommandResult::Instance(instance));
    }
    // A rejection below rolls back the writes above with the command.
    let mut devices = InstanceDevices::default();
    for volume_id in volume_ids {
        if let Some(rejection) = volumes::attach_to(txn, volume_id, &instance)? {
            return reject(rejection);
        }
        devices.volumes.push(volume_id.clone());
    }
    for network in networks {
        match nics::lease(txn, &instance, &devices, network)? {
            Ok(nic) => devices.nics.push(nic),
            Err(rejection) => return reject(rejection),
        }
    }
    txn.put(CF_DEVICES, instance.id.as_bytes(), &devices)?;
    Ok(CommandResult::Devices(instance, devices))
}

/// Reads an instance's devices; an instance without a record has none.
pub(super) fn devices_of(txn: &Txn, instance_id: &str) -> Result<InstanceDevices, DbError> {
    Ok(txn.get(CF_DEVICES, instance_id.as_bytes())?.unwrap_or_default())
}

/// Adds a request to a host's used capacity.
pub(super) fn hold(host: &mut Host, instance: &Instance) {
    host.used_vcpus += instance.vcpus;
    host.used_memory_mib += instance.memory_mib;
    host.used_disk_gib += instance.disk_gib;
    host.instances += 1;
}

/// Returns an instance's share of a host's used capacity.
pub(super) fn release(host: &mut Host, instance: &Instance) {
    host.used_vcpus = host.used_vcpus.saturating_sub(instance.vcpus);
    host.used_memory_mib = host.used_memory_mib.saturating_sub(instance.memory_mib);
    host.used_disk_gib = host.used_disk_gib.saturating_sub(instance.disk_gib);
    host.instances = host.instances.saturating_sub(1);
}

fn delete_instance(txn: &mut Txn, id: &str) -> Result<CommandResult, DbError> {
    let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, id.as_bytes())? else {
        return reject(Rejection::UnknownInstance(id.to_string()));
    };
    if instance.desired != DesiredState::Deleted {
        instance.desired = DesiredState::Deleted;
        instance.generation += 1;
        txn.put(CF_INSTANCES, id.as_bytes(), &instance)?;
        // A migration in progress finishes before the destroy, which then
        // goes to the host the domain ended on.
        let fenced = txn
            .get::<Host>(CF_HOSTS, instance.host.as_bytes())?
            .is_some_and(|h| h.health == HostHealth::Fenced);
        if fenced {
            // The fenced host runs nothing, so the instance goes now; should
            // the host return with the domain, its agent destroys it.
            moves::abandon_move(txn, &instance)?;
            remove_instance(txn, &instance)?;
            moves::add_stale_copy(txn, &instance.id, &instance.host, instance.created_index)?;
        }
    }
    Ok(CommandResult::Instance(instance))
}

/// Closes an order an older leader left open on `open` with `Superseded`,
/// unless the new order's leader is not newer. Returns the rejection then.
pub(super) fn supersede(
    txn: &mut Txn,
    subject: &str,
    open: Option<u64>,
    leader: LeaderStamp,
) -> Result<Option<Rejection>, DbError> {
    let Some(open) = open else {
        return Ok(None);
    };
    let previous: Option<JournalEntry> = txn.get(CF_JOURNAL, &db::index_key(open))?;
    match previous {
        Some(previous) if previous.outcome.is_none() && previous.leader >= leader => Ok(Some(Rejection::OrderOpen {
            instance: subject.to_string(),
            order: open,
        })),
        Some(mut previous) if previous.outcome.is_none() => {
            previous.outcome = Some(OrderOutcome::Superseded);
            txn.put(CF_JOURNAL, &db::index_key(open), &previous)?;
            Ok(None)
        }
        _ => Ok(None),
    }
}

fn open_order(txn: &mut Txn, mut entry: JournalEntry) -> Result<CommandResult, DbError> {
    let key = entry.subject.clone();
    let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, key.as_bytes())? else {
        return reject(Rejection::UnknownInstance(key));
    };
    if instance.generation != entry.generation {
        return reject(Rejection::StaleGeneration {
            instance: instance.id,
            current: instance.generation,
            requested: entry.generation,
        });
    }
    // A new leader replaces the open order of an older one, which is how it
    // resumes work a deposed leader left unfinished.
    if let Some(rejection) = supersede(txn, &instance.id, instance.open_order, entry.leader)? {
        return reject(rejection);
    }
    entry.host_id = instance.host.clone();
    if entry.action == OrderAction::Migrate {
        // The source host executes a migration.
        let Some(migration) = txn.get::<Move>(CF_MOVES, key.as_bytes())? else {
            return reject(Rejection::NotRunning {
                instance: instance.name,
                state: "not migrating".to_string(),
            });
        };
        entry.host_id = migration.from;
    }
    instance.open_order = Some(entry.id);
    txn.put(CF_INSTANCES, key.as_bytes(), &instance)?;
    txn.put(CF_JOURNAL, &db::index_key(entry.id), &entry)?;
    Ok(CommandResult::Order(entry))
}

fn close_order(txn: &mut Txn, order_id: u64, outcome: &OrderOutcome) -> Result<CommandResult, DbError> {
    let key = db::index_key(order_id);
    let Some(mut entry) = txn.get::<JournalEntry>(CF_JOURNAL, &key)? else {
        return reject(Rejection::UnknownOrder(order_id));
    };
    if entry.outcome.is_some() {
        return reject(Rejection::OrderClosed(order_id));
    }
    entry.outcome = Some(outcome.clone());
    txn.put(CF_JOURNAL, &key, &entry)?;
    match entry.action {
        OrderAction::CreateVolume | OrderAction::DeleteVolume => {
            volumes::close_volume_order(txn, &entry, outcome)?;
            return Ok(CommandResult::Order(entry));
        }
        OrderAction::Evict => {
            moves::close_evict_order(txn, &entry, outcome)?;
            return Ok(CommandResult::Order(entry));
        }
        OrderAction::Start | OrderAction::Destroy | OrderAction::Migrate => {}
    }

    let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, entry.subject.as_bytes())? else {
        return Ok(CommandResult::Order(entry));
    };
    if instance.open_order == Some(order_id) {
        instance.open_order = None;
    }
    let current = instance.generation == entry.generation;
    if entry.action == OrderAction::Migrate && matches!(outcome, OrderOutcome::Done { .. }) && !current {
        // The domain is on the destination whatever changed meanwhile.
        moves::finish_migration(txn, &mut instance)?;
    }
    match outcome {
        OrderOutcome::Done { domain_state } if current => {
            instance.last_error = None;
            if entry.action == OrderAction::Destroy && instance.desired == DesiredState::Deleted {
                remove_instance(txn, &instance)?;
                return Ok(CommandResult::Order(entry));
            }
            if entry.action == OrderAction::Migrate {
                moves::finish_migration(txn, &mut instance)?;
            }
            instance.observed = match domain_state.as_str() {
                "running" => ObservedState::Running,
                "stopped" => ObservedState::Stopped,
                _ => ObservedState::Missing,
            };
            // Only a start confirms devices: a live migration moves the
            // source's definition as it was, so a start follows it.
            if entry.action == OrderAction::Start {
                let stored = txn.get::<InstanceDevices>(CF_DEVICES, instance.id.as_bytes())?;
                if let Some(mut devices) = stored.filter(|d| d.applied_generation < entry.generation) {
                    devices.applied_generation = entry.generation;
                    volumes::finish_detaches(txn, &mut devices, entry.generation)?;
                    txn.put(CF_DEVICES, instance.id.as_bytes(), &devices)?;
                }
            }
        }
        OrderOutcome::Failed { error } if current => {
            // A failed migration keeps its move: the source still runs the
            // domain, and the retried order finishes from where it stopped.
            if entry.action != OrderAction::Migrate {
                instance.observed = ObservedState::Failed;
            }
            instance.last_error = Some(error.clone());
        }
        _ => {}
    }
    txn.put(CF_INSTANCES, instance.id.as_bytes(), &instance)?;
    Ok(CommandResult::Order(entry))
}

/// Drops a destroyed instance and returns its capacity, name, volumes and
/// leased addresses.
pub(super) fn remove_instance(txn: &mut Txn, instance: &Instance) -> Result<(), DbError> {
    if let Some(mut host) = txn.get::<Host>(CF_HOSTS, instance.host.as_bytes())? {
        release(&mut host, instance);
        txn.put(CF_HOSTS, host.id.as_bytes(), &host)?;
    }
    let devices = devices_of(txn, &instance.id)?;
    for volume_id in devices.volumes.iter().chain(&devices.detaching) {
        volumes::detach_from(txn, volume_id)?;
    }
    for nic in devices.nics.iter().chain(&devices.detaching_nics) {
        nics::release_lease(txn, nic)?;
    }
    txn.delete(CF_DEVICES, instance.id.as_bytes());
    txn.delete(CF_NAMES, instance.name.as_bytes());
    txn.delete(CF_INSTANCES, instance.id.as_bytes());
    // The request id keeps its record so that a late retry of the create
    // returns the first result, not applied as a new instance.
    Ok(())
}

fn observe_instance(
    txn: &mut Txn,
    instance_id: &str,
    observed: ObservedState,
) -> Result<CommandResult, DbError> {
    let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, instance_id.as_bytes())? else {
        return reject(Rejection::UnknownInstance(instance_id.to_string()));
    };
    instance.observed = observed;
    txn.put(CF_INSTANCES, instance_id.as_bytes(), &instance)?;
    Ok(CommandResult::Instance(instance))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::db::CF_STALE_COPIES;
    use crate::zone::model::{NetworkMode, Placement, StaleCopy, StorageModel};

    fn pod(name: &str) -> Pod {
        Pod {
            name: name.to_string(),
            cpu_ratio: 1.0,
            memory_ratio: 1.0,
            placement: Placement::Pack,
        }
    }

    fn vlan_profile(first: u32, last: u32) -> PodProfile {
        PodProfile {
            segmentation_first: first,
            segmentation_last: last,
            ..PodProfile::default()
        }
    }

    /// A database in a temporary directory, with an index for each command.
    struct Harness {
        _dir: tempfile::TempDir,
        db: std::sync::Arc<DB>,
        index: u64,
    }

    impl Harness {
        fn new() -> Harness {
            let dir = tempfile::tempdir().expect("temporary directory");
            let db = db::open(dir.path()).expect("open database");
            Harness { _dir: dir, db, index: 0 }
        }

        /// Applies commands in one transaction, as one batch of log entries.
        fn apply(&mut self, commands: &[Command]) -> Vec<CommandResult> {
            let mut txn = Txn::new(&self.db);
            let mut results = Vec::new();
            for command in commands {
                self.index += 1;
                results.push(apply_command(&mut txn, self.index, command).expect("apply"));
            }
            self.db.write(txn.into_batch()).expect("write batch");
            results
        }

        fn create_network(&mut self, name: &str, pod: &str) -> CommandResult {
            let command = Command::CreateNetwork {
                name: name.to_string(),
                pod: pod.to_string(),
                cidr: "10.0.0.0/24".to_string(),
            };
            self.apply(&[command]).remove(0)
        }

        /// Deletes a network and releases it, as the leader does once no
        /// host carries it.
        fn delete_network(&mut self, name: &str) -> CommandResult {
            let mut results = self.apply(&[
                Command::DeleteNetwork { name: name.to_string() },
                Command::ReleaseNetwork { name: name.to_string() },
            ]);
            match results[0] {
                CommandResult::Network(_) => results.remove(1),
                _ => results.remove(0),
            }
        }

        /// The free ranges of `pod`, as stored.
        fn free_ranges(&self, pod: &str) -> Vec<(u32, u32)> {
            let handle = self.db.cf_handle(CF_SEGMENTATION_FREE).expect("column family");
            let start = free_key(pod, 0);
            let end = free_keys_end(pod);
            let mut ranges = Vec::new();
            let mode = IteratorMode::From(&start, Direction::Forward);
            for item in self.db.iterator_cf(&handle, mode) {
                let (key, value) = item.expect("iterate");
                if key.as_ref() >= end.as_slice() {
                    break;
                }
                let last: u32 = db::decode(CF_SEGMENTATION_FREE, &value).expect("decode");
                ranges.push((first_id_of(&key), last));
            }
            ranges
        }
    }

    fn segmentation_id(result: &CommandResult) -> u32 {
        match result {
            CommandResult::Network(network) => network.segmentation_id,
            other => panic!("expected a network, got {other:?}"),
        }
    }

    fn create_pod(harness: &mut Harness, name: &str, profile: PodProfile) {
        let command = Command::CreatePodWithProfile { pod: pod(name), profile };
        let result = harness.apply(&[command]).remove(0);
        assert!(matches!(result, CommandResult::ProfiledPod(..)), "{result:?}");
    }

    #[test]
    fn lowest_free_id_until_exhausted() {
        let mut harness = Harness::new();
        create_pod(&mut harness, "small", vlan_profile(100, 104));
        for expected in 100..=104 {
            let result = harness.create_network(&format!("net-{expected}"), "small");
            assert_eq!(segmentation_id(&result), expected);
        }
        let exhausted = harness.create_network("one-too-many", "small");
        let expected = Rejection::SegmentationRangeExhausted {
            pod: "small".to_string(),
            mode: NetworkMode::Vlan,
            first: 100,
            last: 104,
        };
        assert_eq!(exhausted, CommandResult::Rejected(expected));
        assert_eq!(harness.free_ranges("small"), []);
    }

    #[test]
    fn released_ids_merge_with_neighbours() {
        let mut harness = Harness::new();
        create_pod(&mut harness, "merge", vlan_profile(1, 10));
        for id in 1..=8 {
            harness.create_network(&format!("net-{id}"), "merge");
        }
        assert_eq!(harness.free_ranges("merge"), [(9, 10)]);

        harness.delete_network("net-3");
        harness.delete_network("net-5");
        assert_eq!(harness.free_ranges("merge"), [(3, 3), (5, 5), (9, 10)]);
        harness.delete_network("net-4");
        assert_eq!(harness.free_ranges("merge"), [(3, 5), (9, 10)]);
        harness.delete_network("net-8");
        assert_eq!(harness.free_ranges("merge"), [(3, 5), (8, 10)]);
        harness.delete_network("net-1");
        assert_eq!(harness.free_ranges("merge"), [(1, 1), (3, 5), (8, 10)]);

        // The lowest free id goes first.
        assert_eq!(segmentation_id(&harness.create_network("again-1", "merge")), 1);
        assert_eq!(segmentation_id(&harness.create_network("again-3", "merge")), 3);
        assert_eq!(harness.free_ranges("merge"), [(4, 5), (8, 10)]);
    }

    /// Creates and deletes in one batch see each other's pending writes.
    #[test]
    fn one_batch_sees_pending_ranges() {
        let mut harness = Harness::new();
        let network = |name: &str| Command::CreateNetwork {
            name: name.to_string(),
            pod: "batch".to_string(),
            cidr: "10.1.0.0/16".to_string(),
        };
        let results = harness.apply(&[
            Command::CreatePodWithProfile { pod: pod("batch"), profile: vlan_profile(7, 9) },
            network("a"),
            network("b"),
            Command::DeleteNetwork { name: "a".to_string() },
            Command::ReleaseNetwork { name: "a".to_string() },
            network("c"),
            network("d"),
            network("e"),
        ]);
        let ids: Vec<Option<u32>> = results[1..]
            .iter()
            .map(|result| match result {
                CommandResult::Network(network) => Some(network.segmentation_id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [Some(7), Some(8), Some(7), Some(7), Some(7), Some(9), None]);
        assert!(matches!(
            results[7],
            CommandResult::Rejected(Rejection::SegmentationRangeExhausted { .. })
        ));
        assert_eq!(harness.free_ranges("batch"), []);
    }

    /// Two pods whose names share a prefix keep separate ranges.
    #[test]
    fn pods_allocate_independently() {
        let mut harness = Harness::new();
        create_pod(&mut harness, "a", vlan_profile(1, 2));
        let vxlan = PodProfile {
            storage: StorageModel::San,
            san_agent: Some("array-1".to_string()),
            network: NetworkMode::Vxlan,
            segmentation_first: 5000,
            segmentation_last: 16_777_215,
            ..PodProfile::default()
        };
        create_pod(&mut harness, "a-b", vxlan);
        assert_eq!(segmentation_id(&harness.create_network("n1", "a-b")), 5000);
        assert_eq!(segmentation_id(&harness.create_network("n2", "a")), 1);
        assert_eq!(segmentation_id(&harness.create_network("n3", "a")), 2);
        assert_eq!(segmentation_id(&harness.create_network("n4", "a-b")), 5001);
        match harness.create_network("n5", "a-b") {
            CommandResult::Network(network) => assert_eq!(network.mode, NetworkMode::Vxlan),
            other => panic!("expected a network, got {other:?}"),
        }
    }

    /// A pod created before profiles existed gets the default profile, with
    /// VLAN ids 1 to 4094, at its first network create.
    #[test]
    fn legacy_pod_gets_default_range() {
        let mut harness = Harness::new();
        harness.apply(&[Command::CreatePod { pod: pod("old") }]);
        assert_eq!(harness.free_ranges("old"), []);
        assert_eq!(segmentation_id(&harness.create_network("first", "old")), 1);
        assert_eq!(harness.free_ranges("old"), [(2, 4094)]);
        let stored: Option<PodProfile> =
            db::get(&harness.db, CF_POD_PROFILES, b"old").expect("read");
        assert_eq!(stored, Some(PodProfile::default()));
    }

    #[test]
    fn network_rules() {
        let mut harness = Harness::new();
        create_pod(&mut harness, "p", vlan_profile(1, 4094));
        harness.create_network("taken", "p");
        assert_eq!(
            harness.create_network("taken", "p"),
            CommandResult::Rejected(Rejection::NetworkNameTaken("taken".to_string()))
        );
        assert_eq!(
            harness.create_network("lost", "no-such-pod"),
            CommandResult::Rejected(Rejection::UnknownPod("no-such-pod".to_string()))
        );
        assert_eq!(
            harness.delete_network("never"),
            CommandResult::Rejected(Rejection::UnknownNetwork("never".to_string()))
        );
        // The rejected create with a taken name allocated nothing.
        assert_eq!(harness.free_ranges("p"), [(2, 4094)]);
    }

    /// An old Pod record, encoded before profiles existed, still decodes.
    #[test]
    fn pod_record_encoding_is_unchanged() {
        let bytes = db::encode(&pod("old")).expect("encode");
        // Name length, name, two f64 ratios, placement variant.
        assert_eq!(bytes.len(), 1 + 3 + 8 + 8 + 1);
        let decoded: Pod = db::decode(CF_PODS, &bytes).expect("decode");
        assert_eq!(decoded, pod("old"));
    }

    fn one(harness: &mut Harness, command: Command) -> CommandResult {
        harness.apply(&[command]).remove(0)
    }

    fn register(harness: &mut Harness, id: &str, pod: &str) {
        let result = one(
            harness,
            Command::RegisterHost {
                id: id.to_string(),
                pod: pod.to_string(),
                libvirt_uri: "test:///default".to_string(),
                agent_endpoint: "127.0.0.1:1".to_string(),
                cpus: 8,
                memory_mib: 16384,
                disk_gib: 100,
                boot_id: 1,
            },
        );
        assert!(matches!(result, CommandResult::Host(_)), "{result:?}");
    }

    fn instance_on(harness: &mut Harness, name: &str, pod: &str, host: &str, volumes: &[&str], networks: &[&str]) -> CommandResult {
        one(
            harness,
            Command::CreateInstanceWithDevices {
                id: format!("id-{name}"),
                name: name.to_string(),
                vcpus: 1,
                memory_mib: 512,
                disk_gib: 1,
                pod: pod.to_string(),
                host: host.to_string(),
                request_id: None,
                volumes: volumes.iter().map(|v| v.to_string()).collect(),
                networks: networks.iter().map(|n| n.to_string()).collect(),
            },
        )
    }

    fn volume(harness: &mut Harness, id: &str, pod: &str, host: Option<&str>, size_gib: u64) -> CommandResult {
        one(
            harness,
            Command::CreateVolume {
                id: id.to_string(),
                name: id.to_string(),
                pod: pod.to_string(),
                host: host.map(str::to_string),
                size_gib,
            },
        )
    }

    /// The leader stamp of the orders the tests open.
    const LEADER: LeaderStamp = LeaderStamp { term: 1, node_id: 1 };

    /// Applies `open` and closes the order it opens as done, as the
    /// reconciler does when the agent executes it.
    fn complete_order(harness: &mut Harness, open: Command, domain_state: &str) {
        let opened = one(harness, open);
        let CommandResult::Order(entry) = opened else {
            panic!("expected an order, got {opened:?}");
        };
        let done = OrderOutcome::Done { domain_state: domain_state.to_string() };
        one(harness, Command::CloseOrder { order_id: entry.id, outcome: done });
    }

    /// Completes a volume's create order.
    fn make_available(harness: &mut Harness, id: &str) {
        let open = Command::OpenVolumeOrder { volume_id: id.to_string(), action: OrderAction::CreateVolume, leader: LEADER };
        complete_order(harness, open, "");
    }

    /// Opens and completes an order for an instance at its generation.
    fn complete_instance_order(harness: &mut Harness, instance: &Instance, action: OrderAction) {
        let open = Command::OpenOrder {
            instance_id: instance.id.clone(),
            action,
            generation: instance.generation,
            leader: LEADER,
        };
        complete_order(harness, open, "running");
    }

    /// Completes a start order, as when the host confirms the definition.
    fn confirm_start(harness: &mut Harness, instance: &Instance) {
        complete_instance_order(harness, instance, OrderAction::Start);
    }

    fn das_and_san(harness: &mut Harness) {
        create_pod(harness, "das", vlan_profile(1, 4094));
        let san = PodProfile {
            storage: StorageModel::San,
            san_agent: Some("s1".to_string()),
            ..vlan_profile(1, 4094)
        };
        create_pod(harness, "san", san);
        register(harness, "d1", "das");
        register(harness, "d2", "das");
        register(harness, "s1", "san");
        register(harness, "s2", "san");
    }

    #[test]
    fn volumes_attach_by_pool_type() {
        let mut harness = Harness::new();
        das_and_san(&mut harness);
        assert!(matches!(volume(&mut harness, "v-das", "das", Some("d1"), 10), CommandResult::Volume(_)));
        // A SAN pool exists only once its agent reports it.
        assert_eq!(
            volume(&mut harness, "v-san", "san", None, 10),
            CommandResult::Rejected(Rejection::NoSanPool("san".to_string()))
        );
        let wrong_agent = one(&mut harness, Command::RegisterSanPool { pod: "san".into(), host: "s2".into(), capacity_gib: 50 });
        assert!(matches!(wrong_agent, CommandResult::Rejected(Rejection::NotSanAgent { .. })), "{wrong_agent:?}");
        one(&mut harness, Command::RegisterSanPool { pod: "san".into(), host: "s1".into(), capacity_gib: 50 });
        assert!(matches!(volume(&mut harness, "v-san", "san", None, 40), CommandResult::Volume(_)));
        let full = volume(&mut harness, "v-san-2", "san", None, 11);
        assert!(matches!(full, CommandResult::Rejected(Rejection::PoolFull { free_gib: 10, .. })), "{full:?}");

        // A volume still being created cannot attach.
        let early = instance_on(&mut harness, "early", "das", "d1", &["v-das"], &[]);
        assert!(matches!(early, CommandResult::Rejected(Rejection::VolumeNotAvailable { .. })), "{early:?}");
        make_available(&mut harness, "v-das");
        make_available(&mut harness, "v-san");

        // DAS: only an instance on the volume's host takes it.
        instance_on(&mut harness, "on-d2", "das", "d2", &[], &[]);
        let across = one(&mut harness, Command::AttachVolume { volume_id: "v-das".into(), instance_id: "id-on-d2".into() });
        assert!(matches!(across, CommandResult::Rejected(Rejection::VolumeHostMismatch { .. })), "{across:?}");
        let here = instance_on(&mut harness, "on-d1", "das", "d1", &["v-das"], &[]);
        assert!(matches!(here, CommandResult::Devices(..)), "{here:?}");
        let deleted = one(&mut harness, Command::DeleteVolume { id: "v-das".into() });
        assert!(matches!(deleted, CommandResult::Rejected(Rejection::VolumeAttached { .. })), "{deleted:?}");

        // SAN: the volume follows whichever host's instance attaches it.
        instance_on(&mut harness, "on-s1", "san", "s1", &[], &[]);
        instance_on(&mut harness, "on-s2", "san", "s2", &[], &[]);
        let first = one(&mut harness, Command::AttachVolume { volume_id: "v-san".into(), instance_id: "id-on-s1".into() });
        assert!(matches!(first, CommandResult::Devices(..)), "{first:?}");
        let twice = one(&mut harness, Command::AttachVolume { volume_id: "v-san".into(), instance_id: "id-on-s2".into() });
        assert!(matches!(twice, CommandResult::Rejected(Rejection::VolumeAttached { .. })), "{twice:?}");
        let detached = one(&mut harness, Command::DetachVolume { volume_id: "v-san".into() });
        let CommandResult::Devices(on_s1, _) = detached else {
            panic!("expected the detach to apply, got {detached:?}");
        };
        // Until s1's agent confirms a definition without the volume, the
        // running domain may still write it, so no other instance can attach it.
        let early = one(&mut harness, Command::AttachVolume { volume_id: "v-san".into(), instance_id: "id-on-s2".into() });
        assert!(matches!(early, CommandResult::Rejected(Rejection::VolumeNotAvailable { .. })), "{early:?}");
        let deleted = one(&mut harness, Command::DeleteVolume { id: "v-san".into() });
        assert!(matches!(deleted, CommandResult::Rejected(Rejection::VolumeNotAvailable { .. })), "{deleted:?}");
        confirm_start(&mut harness, &on_s1);
        let moved = one(&mut harness, Command::AttachVolume { volume_id: "v-san".into(), instance_id: "id-on-s2".into() });
        let CommandResult::Devices(instance, devices) = moved else {
            panic!("expected the attach to apply, got {moved:?}");
        };
        assert_eq!(devices.volumes, ["v-san"]);
        assert_eq!(instance.generation, 2, "an attach bumps the generation so the host redefines the domain");
    }

    #[test]
    fn rejected_command_writes_nothing() {
        let mut harness = Harness::new();
        das_and_san(&mut harness);
        create_network_in(&mut harness, "net", "das", "10.9.0.0/24");
        // The instance itself fits, but its volume does not exist: the
        // whole create, capacity and lease included, must leave no trace.
        let result = instance_on(&mut harness, "ghost", "das", "d1", &["no-such-volume"], &["net"]);
        assert_eq!(result, CommandResult::Rejected(Rejection::UnknownVolume("no-such-volume".into())));
        let host: Host = db::get(&harness.db, CF_HOSTS, b"d1").unwrap().unwrap();
        assert_eq!((host.used_vcpus, host.instances), (0, 0));
        assert!(db::get::<Instance>(&harness.db, CF_INSTANCES, b"id-ghost").unwrap().is_none());
        let again = instance_on(&mut harness, "ghost", "das", "d1", &[], &["net"]);
        let CommandResult::Devices(_, devices) = again else {
            panic!("expected the create to apply, got {again:?}");
        };
        assert_eq!(devices.nics[0].ip, "10.9.0.2", "the rejected create leased no address");
    }

    fn create_network_in(harness: &mut Harness, name: &str, pod: &str, cidr: &str) {
        let result = one(harness, Command::CreateNetwork { name: name.into(), pod: pod.into(), cidr: cidr.into() });
        assert!(matches!(result, CommandResult::Network(_)), "{result:?}");
    }

    #[test]
    fn leases_take_lowest_free_address() {
        let mut harness = Harness::new();
        das_and_san(&mut harness);
        // A /29 has 6 host addresses; the first is the gateway's.
        create_network_in(&mut harness, "tiny", "das", "10.7.0.0/29");
        let mut ips = Vec::new();
        for n in 0..5 {
            match instance_on(&mut harness, &format!("i{n}"), "das", "d1", &[], &["tiny"]) {
                CommandResult::Devices(_, devices) => ips.push(devices.nics[0].ip.clone()),
                other => panic!("expected a lease, got {other:?}"),
            }
        }
        assert_eq!(ips, ["10.7.0.2", "10.7.0.3", "10.7.0.4", "10.7.0.5", "10.7.0.6"]);
        let full = instance_on(&mut harness, "i5", "das", "d1", &[], &["tiny"]);
        assert!(matches!(full, CommandResult::Rejected(Rejection::SubnetExhausted { .. })), "{full:?}");
        let in_use = one(&mut harness, Command::DeleteNetwork { name: "tiny".into() });
        assert!(matches!(in_use, CommandResult::Rejected(Rejection::NetworkInUse { .. })), "{in_use:?}");
        let detached = one(&mut harness, Command::DetachNic { instance_id: "id-i1".into(), network: "tiny".into() });
        let CommandResult::Devices(i1, _) = detached else {
            panic!("expected the detach to apply, got {detached:?}");
        };
        // The address stays leased until i1's host confirms the detach.
        let early = instance_on(&mut harness, "i6", "das", "d1", &[], &["tiny"]);
        assert!(matches!(early, CommandResult::Rejected(Rejection::SubnetExhausted { .. })), "{early:?}");
        confirm_start(&mut harness, &i1);
        let CommandResult::Devices(_, devices) = one(&mut harness, Command::AttachNic { instance_id: "id-i1".into(), network: "tiny".into() }) else {
            panic!("expected the NIC to attach");
        };
        assert_eq!(devices.nics[0].ip, "10.7.0.3", "the freed address is the lowest free one");
        assert_eq!(devices.nics[0].mac, "52:00:01:07:00:03", "VLAN id 1, address 10.7.0.3");

        // A second network over the same subnet gives the same address but
        // another MAC, so one instance never has two NICs with one MAC.
        create_network_in(&mut harness, "tiny-twin", "das", "10.7.0.0/29");
        let CommandResult::Devices(_, devices) = one(&mut harness, Command::AttachNic { instance_id: "id-i1".into(), network: "tiny-twin".into() }) else {
            panic!("expected the second NIC to attach");
        };
        assert_eq!(devices.nics[1].ip, "10.7.0.2");
        assert_ne!(devices.nics[0].mac, devices.nics[1].mac);
    }

    #[test]
    fn evacuation_requires_committed_fence() {
        let mut harness = Harness::new();
        das_and_san(&mut harness);
        instance_on(&mut harness, "san-vm", "san", "s1", &[], &[]);
        instance_on(&mut harness, "das-vm", "das", "d1", &[], &[]);
        let evacuate = Command::EvacuateInstance { instance_id: "id-san-vm".into(), to: "s2".into() };
        let early = one(&mut harness, evacuate.clone());
        assert!(matches!(early, CommandResult::Rejected(Rejection::HostNotFenced { .. })), "{early:?}");

        let leader = LeaderStamp { term: 3, node_id: 2 };
        let fence = |host: &str| Command::FenceHost { host_id: host.into(), leader, method: "test".into() };
        let up_host = one(&mut harness, fence("s1"));
        assert!(matches!(up_host, CommandResult::Rejected(Rejection::HostNotSuspect { .. })), "{up_host:?}");
        for host in ["s1", "d1"] {
            one(&mut harness, Command::SetHostHealth { host_id: host.into(), up: false });
            assert!(matches!(one(&mut harness, fence(host)), CommandResult::Fence(_)));
        }
        let das: Instance = db::get(&harness.db, CF_INSTANCES, b"id-das-vm").unwrap().unwrap();
        assert_eq!((das.observed, das.host.as_str()), (ObservedState::Lost, "d1"));
        let das_move = one(&mut harness, Command::EvacuateInstance { instance_id: "id-das-vm".into(), to: "d2".into() });
        assert!(matches!(das_move, CommandResult::Rejected(Rejection::NotMigratable { .. })), "{das_move:?}");

        let moved = one(&mut harness, evacuate);
        let CommandResult::Devices(instance, _) = moved else {
            panic!("expected the evacuation to apply, got {moved:?}");
        };
        assert_eq!((instance.host.as_str(), instance.observed), ("s2", ObservedState::Pending));
        // The fenced host keeps a stale copy to destroy when it returns, and
        // the instance cannot move back there until that copy is gone.
        let copy: Option<StaleCopy> = db::get(&harness.db, CF_STALE_COPIES, &moves::stale_key("s1", "id-san-vm")).unwrap();
        assert!(copy.is_some());
        one(&mut harness, Command::SetHostHealth { host_id: "s1".into(), up: true });
        one(&mut harness, Command::ObserveInstance { instance_id: "id-san-vm".into(), observed: ObservedState::Running });
        let back = one(&mut harness, Command::MigrateInstance { instance_id: "id-san-vm".into(), to: "s1".into() });
        assert!(matches!(back, CommandResult::Rejected(Rejection::StaleCopyPending { .. })), "{back:?}");
        let s1: Host = db::get(&harness.db, CF_HOSTS, b"s1").unwrap().unwrap();
        assert_eq!(s1.instances, 0, "the evacuated instance's capacity left the fenced host");
    }

    fn san_with_pool(harness: &mut Harness) {
        das_and_san(harness);
        register(harness, "s3", "san");
        one(harness, Command::RegisterSanPool { pod: "san".into(), host: "s1".into(), capacity_gib: 100 });
    }

    /// Creates a SAN instance on s1 and confirms its start.
    fn running_san_vm(harness: &mut Harness, name: &str, volumes: &[&str]) -> Instance {
        let created = instance_on(harness, name, "san", "s1", volumes, &[]);
        let instance = match created {
            CommandResult::Devices(instance, _) | CommandResult::Instance(instance) => instance,
            other => panic!("expected the create to apply, got {other:?}"),
        };
        confirm_start(harness, &instance);
        db::get(&harness.db, CF_INSTANCES, instance.id.as_bytes()).unwrap().unwrap()
    }

    /// A live migration moves the source's definition as it was, so it does
    /// not confirm a detach made before it: the volume stays reserved until
    /// a start on the destination confirms the new definition.
    #[test]
    fn migration_does_not_confirm_a_detach() {
        let mut harness = Harness::new();
        san_with_pool(&mut harness);
        volume(&mut harness, "v", "san", None, 10);
        make_available(&mut harness, "v");
        let vm = running_san_vm(&mut harness, "vm", &["v"]);
        running_san_vm(&mut harness, "other", &[]);
        one(&mut harness, Command::DetachVolume { volume_id: "v".into() });
        let migrated = one(&mut harness, Command::MigrateInstance { instance_id: vm.id.clone(), to: "s2".into() });
        let CommandResult::Instance(vm) = migrated else {
            panic!("expected the migration to start, got {migrated:?}");
        };
        complete_instance_order(&mut harness, &vm, OrderAction::Migrate);

        let early = one(&mut harness, Command::AttachVolume { volume_id: "v".into(), instance_id: "id-other".into() });
        assert!(matches!(early, CommandResult::Rejected(Rejection::VolumeNotAvailable { .. })), "{early:?}");
        let vm: Instance = db::get(&harness.db, CF_INSTANCES, vm.id.as_bytes()).unwrap().unwrap();
        assert_eq!(vm.host, "s2");
        confirm_start(&mut harness, &vm);
        let later = one(&mut harness, Command::AttachVolume { volume_id: "v".into(), instance_id: "id-other".into() });
        assert!(matches!(later, CommandResult::Devices(..)), "{later:?}");
    }

    /// Replicas apply the same entries in different batches; a fence must
    /// see the instances created and deleted earlier in its own batch.
    #[test]
    fn fence_same_in_any_batching() {
        let leader = LeaderStamp { term: 3, node_id: 2 };
        let commands = vec![
            Command::CreateInstance {
                id: "id-x".into(),
                name: "x".into(),
                vcpus: 1,
                memory_mib: 512,
                disk_gib: 1,
                pod: "san".into(),
                host: "s2".into(),
                request_id: None,
            },
            Command::DeleteInstance { id: "id-x".into() },
            Command::SetHostHealth { host_id: "s2".into(), up: false },
            Command::FenceHost { host_id: "s2".into(), leader, method: "test".into() },
        ];
        let mut one_by_one = Harness::new();
        das_and_san(&mut one_by_one);
        for command in &commands {
            one(&mut one_by_one, command.clone());
        }
        let mut batched = Harness::new();
        das_and_san(&mut batched);
        batched.apply(&commands);

        let split: Option<Instance> = db::get(&one_by_one.db, CF_INSTANCES, b"id-x").unwrap();
        let whole: Option<Instance> = db::get(&batched.db, CF_INSTANCES, b"id-x").unwrap();
        assert_eq!(split, None, "the fence removes an instance deleted before it");
        assert_eq!(whole, None, "the same in one batch");
        let split_host: Host = db::get(&one_by_one.db, CF_HOSTS, b"s2").unwrap().unwrap();
        let whole_host: Host = db::get(&batched.db, CF_HOSTS, b"s2").unwrap().unwrap();
        assert_eq!(split_host, whole_host);
    }

    /// The destination of a migration cut short by the source's fence may
    /// run the domain, so no restart elsewhere happens until it is evicted.
    #[test]
    fn evacuation_waits_for_live_stale_copies() {
        let mut harness = Harness::new();
        san_with_pool(&mut harness);
        let vm = running_san_vm(&mut harness, "vm", &[]);
        let migrated = one(&mut harness, Command::MigrateInstance { instance_id: vm.id.clone(), to: "s2".into() });
        let CommandResult::Instance(vm) = migrated else {
            panic!("expected the migration to start, got {migrated:?}");
        };
        let leader = LeaderStamp { term: 1, node_id: 1 };
        let opened = one(
            &mut harness,
            Command::OpenOrder { instance_id: vm.id.clone(), action: OrderAction::Migrate, generation: vm.generation, leader },
        );
        assert!(matches!(opened, CommandResult::Order(_)), "{opened:?}");
        one(&mut harness, Command::SetHostHealth { host_id: "s1".into(), up: false });
        one(&mut harness, Command::FenceHost { host_id: "s1".into(), leader, method: "test".into() });

        let evacuate = Command::EvacuateInstance { instance_id: vm.id.clone(), to: "s3".into() };
        let early = one(&mut harness, evacuate.clone());
        assert!(matches!(early, CommandResult::Rejected(Rejection::StaleCopyPending { .. })), "{early:?}");
        let evict = Command::OpenEvictOrder { instance_id: vm.id.clone(), host: "s2".into(), leader };
        complete_order(&mut harness, evict, "absent");
        let later = one(&mut harness, evacuate);
        assert!(matches!(later, CommandResult::Devices(..)), "{later:?}");
    }

    /// An instance deleted after its host was fenced goes at once, with its
    /// volumes; its host, should it return, destroys the domain.
    #[test]
    fn delete_on_fenced_host_removes_instance() {
        let mut harness = Harness::new();
        san_with_pool(&mut harness);
        volume(&mut harness, "v", "san", None, 10);
        make_available(&mut harness, "v");
        let vm = running_san_vm(&mut harness, "vm", &["v"]);
        let leader = LeaderStamp { term: 1, node_id: 1 };
        one(&mut harness, Command::SetHostHealth { host_id: "s1".into(), up: false });
        one(&mut harness, Command::FenceHost { host_id: "s1".into(), leader, method: "test".into() });
        one(&mut harness, Command::DeleteInstance { id: vm.id.clone() });

        let gone: Option<Instance> = db::get(&harness.db, CF_INSTANCES, vm.id.as_bytes()).unwrap();
        assert_eq!(gone, None);
        let copy: Option<StaleCopy> = db::get(&harness.db, CF_STALE_COPIES, &moves::stale_key("s1", &vm.id)).unwrap();
        assert!(copy.is_some(), "the returning host must destroy the domain");
        let deleted = one(&mut harness, Command::DeleteVolume { id: "v".into() });
        assert!(matches!(deleted, CommandResult::Volume(_)), "{deleted:?}");
    }
}
