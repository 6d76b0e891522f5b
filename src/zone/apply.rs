//! Deterministic apply of zone commands.
//!
//! Apply reads the state as of the previous log index, checks every rule
//! that must hold whatever the leader believed (name uniqueness, capacity,
//! generation, one open order per instance), and writes its changes into a
//! transaction. It reads no clock, draws no random numbers and does no I/O
//! beyond RocksDB reads: ids and times are stamped into commands by the
//! leader before they are proposed.

use std::collections::BTreeMap;

use rocksdb::{WriteBatch, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::command::{Command, CommandResult, Rejection};
use super::model::{
    DesiredState, Host, HostHealth, Instance, JournalEntry, KeyValue, ObservedState, OrderAction,
    OrderOutcome, Pod,
};
use crate::store::db::{
    self, DbError, CF_HOSTS, CF_INSTANCES, CF_JOURNAL, CF_KEYS, CF_NAMES, CF_PODS, CF_REQUESTS,
};

/// Pending writes of one apply call over the database, readable before commit.
pub struct Txn<'a> {
    db: &'a DB,
    overlay: BTreeMap<(&'static str, Vec<u8>), Option<Vec<u8>>>,
}

impl<'a> Txn<'a> {
    pub fn new(db: &'a DB) -> Self {
        Txn {
            db,
            overlay: BTreeMap::new(),
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
        self.overlay.insert((cf, key.to_vec()), Some(db::encode(value)?));
        Ok(())
    }

    pub fn delete(&mut self, cf: &'static str, key: &[u8]) {
        self.overlay.insert((cf, key.to_vec()), None);
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

/// Applies one command at log index `index`.
pub fn apply_command(txn: &mut Txn, index: u64, command: &Command) -> Result<CommandResult, DbError> {
    let result = match command {
        Command::CreatePod { pod } => create_pod(txn, pod)?,
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
            let instance = Instance {
                id: id.clone(),
                name: name.clone(),
                vcpus: *vcpus,
                memory_mib: *memory_mib,
                disk_gib: *disk_gib,
                pod: pod.clone(),
                host: host.clone(),
                desired: DesiredState::Running,
                observed: ObservedState::Pending,
                generation: 1,
                created_index: index,
                request_id: request_id.clone(),
                last_error: None,
                open_order: None,
            };
            create_instance(txn, instance)?
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
                instance_id: instance_id.clone(),
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
    };
    Ok(result)
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

fn reject(rejection: Rejection) -> Result<CommandResult, DbError> {
    Ok(CommandResult::Rejected(rejection))
}

fn create_pod(txn: &mut Txn, pod: &Pod) -> Result<CommandResult, DbError> {
    if txn.get::<Pod>(CF_PODS, pod.name.as_bytes())?.is_some() {
        return reject(Rejection::PodExists(pod.name.clone()));
    }
    txn.put(CF_PODS, pod.name.as_bytes(), pod)?;
    Ok(CommandResult::Pod(pod.clone()))
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
    let instances: Vec<Instance> = db::scan(txn.db, CF_INSTANCES)?;
    for stored in instances {
        let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, stored.id.as_bytes())? else {
            continue;
        };
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

fn create_instance(txn: &mut Txn, instance: Instance) -> Result<CommandResult, DbError> {
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

    host.used_vcpus += instance.vcpus;
    host.used_memory_mib += instance.memory_mib;
    host.used_disk_gib += instance.disk_gib;
    host.instances += 1;
    txn.put(CF_HOSTS, host.id.as_bytes(), &host)?;
    txn.put(CF_NAMES, instance.name.as_bytes(), &instance.id)?;
    if let Some(request_id) = &instance.request_id {
        txn.put(CF_REQUESTS, request_id.as_bytes(), &instance)?;
    }
    txn.put(CF_INSTANCES, instance.id.as_bytes(), &instance)?;
    Ok(CommandResult::Instance(instance))
}

fn delete_instance(txn: &mut Txn, id: &str) -> Result<CommandResult, DbError> {
    let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, id.as_bytes())? else {
        return reject(Rejection::UnknownInstance(id.to_string()));
    };
    if instance.desired != DesiredState::Deleted {
        instance.desired = DesiredState::Deleted;
        instance.generation += 1;
        txn.put(CF_INSTANCES, id.as_bytes(), &instance)?;
    }
    Ok(CommandResult::Instance(instance))
}

fn open_order(txn: &mut Txn, mut entry: JournalEntry) -> Result<CommandResult, DbError> {
    let key = entry.instance_id.clone();
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
    if let Some(open) = instance.open_order {
        let previous: Option<JournalEntry> = txn.get(CF_JOURNAL, &db::index_key(open))?;
        match previous {
            Some(previous) if previous.leader >= entry.leader => {
                return reject(Rejection::OrderOpen {
                    instance: instance.id,
                    order: open,
                });
            }
            Some(mut previous) => {
                previous.outcome = Some(OrderOutcome::Superseded);
                txn.put(CF_JOURNAL, &db::index_key(open), &previous)?;
            }
            None => {}
        }
    }
    entry.host_id = instance.host.clone();
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

    let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, entry.instance_id.as_bytes())? else {
        return Ok(CommandResult::Order(entry));
    };
    if instance.open_order == Some(order_id) {
        instance.open_order = None;
    }
    let current = instance.generation == entry.generation;
    match outcome {
        OrderOutcome::Done { domain_state } if current => {
            instance.last_error = None;
            if entry.action == OrderAction::Destroy && instance.desired == DesiredState::Deleted {
                remove_instance(txn, &instance)?;
                return Ok(CommandResult::Order(entry));
            }
            instance.observed = match domain_state.as_str() {
                "running" => ObservedState::Running,
                "stopped" => ObservedState::Stopped,
                _ => ObservedState::Missing,
            };
        }
        OrderOutcome::Failed { error } if current => {
            instance.observed = ObservedState::Failed;
            instance.last_error = Some(error.clone());
        }
        _ => {}
    }
    txn.put(CF_INSTANCES, instance.id.as_bytes(), &instance)?;
    Ok(CommandResult::Order(entry))
}

/// Drops a destroyed instance and returns its capacity and name.
fn remove_instance(txn: &mut Txn, instance: &Instance) -> Result<(), DbError> {
    if let Some(mut host) = txn.get::<Host>(CF_HOSTS, instance.host.as_bytes())? {
        host.used_vcpus = host.used_vcpus.saturating_sub(instance.vcpus);
        host.used_memory_mib = host.used_memory_mib.saturating_sub(instance.memory_mib);
        host.used_disk_gib = host.used_disk_gib.saturating_sub(instance.disk_gib);
        host.instances = host.instances.saturating_sub(1);
        txn.put(CF_HOSTS, host.id.as_bytes(), &host)?;
    }
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
