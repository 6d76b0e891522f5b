//! Apply rules for instances that change hosts: live migration and drain in
//! SAN pods, and the restart of a fenced host's SAN instances elsewhere.
//!
//! Safety rests on two rules checked here, whatever the leader believed.
//! An instance is restarted on another host only when its host's fence is
//! committed (`evacuate_instance` requires `HostHealth::Fenced`). A copy
//! left on a fenced host is destroyed only through a `StaleCopy` that names
//! it, so a returning host loses nothing else.

use super::apply::{devices_of, hold, release, reject, remove_instance, supersede, Txn};
use super::volumes::finish_detaches;
use super::command::{CommandResult, Rejection};
use super::model::{
    DesiredState, FenceRecord, Host, HostHealth, Instance, JournalEntry, LeaderStamp, Move,
    ObservedState, OrderAction, OrderOutcome, Pod, PodProfile, StaleCopy, StorageModel,
};
use crate::store::db::{
    self, DbError, CF_DEVICES, CF_FENCES, CF_HOSTS, CF_INSTANCES, CF_JOURNAL, CF_MOVES, CF_PODS,
    CF_POD_PROFILES, CF_STALE_COPIES,
};

/// Returns the key of a stale copy: host id, a zero byte, instance id.
pub fn stale_key(host: &str, instance_id: &str) -> Vec<u8> {
    let mut key = host.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(instance_id.as_bytes());
    key
}

fn is_san(txn: &Txn, pod: &str) -> Result<bool, DbError> {
    let profile: PodProfile = txn.get(CF_POD_PROFILES, pod.as_bytes())?.unwrap_or_default();
    Ok(profile.storage == StorageModel::San)
}

/// Checks that `to` can take `instance` and returns it, or the rejection.
fn destination(txn: &Txn, instance: &Instance, to: &str) -> Result<Result<Host, Rejection>, DbError> {
    if instance.host == to {
        return Ok(Err(Rejection::SameHost {
            instance: instance.name.clone(),
            host: to.to_string(),
        }));
    }
    let Some(host) = txn.get::<Host>(CF_HOSTS, to.as_bytes())? else {
        return Ok(Err(Rejection::UnknownHost(to.to_string())));
    };
    if host.pod != instance.pod {
        return Ok(Err(Rejection::HostNotInPod {
            host: host.id,
            host_pod: host.pod,
            pod: instance.pod.clone(),
        }));
    }
    if host.health != HostHealth::Up {
        return Ok(Err(Rejection::HostNotUp(host.id)));
    }
    if txn.get::<StaleCopy>(CF_STALE_COPIES, &stale_key(to, &instance.id))?.is_some() {
        return Ok(Err(Rejection::StaleCopyPending {
            instance: instance.name.clone(),
            host: to.to_string(),
        }));
    }
    let Some(pod) = txn.get::<Pod>(CF_PODS, instance.pod.as_bytes())? else {
        return Ok(Err(Rejection::UnknownPod(instance.pod.clone())));
    };
    if !host.fits(&pod, instance.vcpus, instance.memory_mib, instance.disk_gib) {
        return Ok(Err(Rejection::HostFull {
            host: host.id,
            vcpus: instance.vcpus,
            memory_mib: instance.memory_mib,
            disk_gib: instance.disk_gib,
        }));
    }
    Ok(Ok(host))
}

pub fn migrate_instance(txn: &mut Txn, index: u64, instance_id: &str, to: &str) -> Result<CommandResult, DbError> {
    let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, instance_id.as_bytes())? else {
        return reject(Rejection::UnknownInstance(instance_id.to_string()));
    };
    if !is_san(txn, &instance.pod)? {
        return reject(Rejection::NotMigratable {
            instance: instance.name,
            pod: instance.pod,
            host: instance.host,
        });
    }
    if let Some(existing) = txn.get::<Move>(CF_MOVES, instance_id.as_bytes())? {
        return reject(Rejection::AlreadyMoving {
            instance: instance.name,
            to: existing.to,
        });
    }
    if instance.desired != DesiredState::Running || instance.observed != ObservedState::Running {
        return reject(Rejection::NotRunning {
            instance: instance.name,
            state: instance.observed.as_str().to_string(),
        });
    }
    let source_up = txn
        .get::<Host>(CF_HOSTS, instance.host.as_bytes())?
        .is_some_and(|h| h.health.takes_orders());
    if !source_up {
        return reject(Rejection::HostNotUp(instance.host));
    }
    let mut target = match destination(txn, &instance, to)? {
        Ok(host) => host,
        Err(rejection) => return reject(rejection),
    };
    hold(&mut target, &instance);
    txn.put(CF_HOSTS, target.id.as_bytes(), &target)?;
    let migration = Move {
        instance_id: instance.id.clone(),
        from: instance.host.clone(),
        to: to.to_string(),
        created_index: index,
    };
    txn.put(CF_MOVES, instance_id.as_bytes(), &migration)?;
    instance.generation += 1;
    txn.put(CF_INSTANCES, instance_id.as_bytes(), &instance)?;
    Ok(CommandResult::Instance(instance))
}

/// Completes a migration the source host reported done: the instance now
/// lives on the destination, whose capacity was held since the start.
pub fn finish_migration(txn: &mut Txn, instance: &mut Instance) -> Result<(), DbError> {
    let Some(migration) = txn.get::<Move>(CF_MOVES, instance.id.as_bytes())? else {
        return Ok(());
    };
    if let Some(mut source) = txn.get::<Host>(CF_HOSTS, migration.from.as_bytes())? {
        release(&mut source, instance);
        txn.put(CF_HOSTS, source.id.as_bytes(), &source)?;
    }
    instance.host = migration.to;
    txn.delete(CF_MOVES, instance.id.as_bytes());
    Ok(())
}

/// Drops the migration of an instance that is being deleted or whose
/// destination was fenced: the destination's held capacity is returned, and
/// the copy the destination may hold becomes a stale copy to destroy.
pub fn abandon_move(txn: &mut Txn, instance: &Instance) -> Result<(), DbError> {
    let Some(migration) = txn.get::<Move>(CF_MOVES, instance.id.as_bytes())? else {
        return Ok(());
    };
    if let Some(mut target) = txn.get::<Host>(CF_HOSTS, migration.to.as_bytes())? {
        release(&mut target, instance);
        txn.put(CF_HOSTS, target.id.as_bytes(), &target)?;
    }
    add_stale_copy(txn, &instance.id, &migration.to, migration.created_index)?;
    txn.delete(CF_MOVES, instance.id.as_bytes());
    Ok(())
}

pub fn add_stale_copy(txn: &mut Txn, instance_id: &str, host: &str, moved_index: u64) -> Result<(), DbError> {
    let copy = StaleCopy {
        instance_id: instance_id.to_string(),
        host: host.to_string(),
        moved_index,
        open_order: None,
    };
    txn.put(CF_STALE_COPIES, &stale_key(host, instance_id), &copy)
}

pub fn set_host_draining(txn: &mut Txn, host_id: &str, draining: bool) -> Result<CommandResult, DbError> {
    let Some(mut host) = txn.get::<Host>(CF_HOSTS, host_id.as_bytes())? else {
        return reject(Rejection::UnknownHost(host_id.to_string()));
    };
    host.health = match (host.health, draining) {
        (HostHealth::Up | HostHealth::Draining, true) => HostHealth::Draining,
        (HostHealth::Up | HostHealth::Draining, false) => HostHealth::Up,
        _ => return reject(Rejection::HostNotUp(host.id)),
    };
    txn.put(CF_HOSTS, host_id.as_bytes(), &host)?;
    Ok(CommandResult::Host(host))
}

pub fn fence_host(
    txn: &mut Txn,
    index: u64,
    host_id: &str,
    leader: LeaderStamp,
    method: &str,
) -> Result<CommandResult, DbError> {
    let Some(mut host) = txn.get::<Host>(CF_HOSTS, host_id.as_bytes())? else {
        return reject(Rejection::UnknownHost(host_id.to_string()));
    };
    if host.health != HostHealth::Suspect {
        return reject(Rejection::HostNotSuspect {
            host: host.id,
            health: host.health.as_str().to_string(),
        });
    }
    host.health = HostHealth::Fenced;
    txn.put(CF_HOSTS, host_id.as_bytes(), &host)?;
    let record = FenceRecord {
        host: host_id.to_string(),
        leader,
        method: method.to_string(),
        index,
    };
    txn.put(CF_FENCES, host_id.as_bytes(), &record)?;

    // NOTE: this scans every instance and every move; per-host indexes would
    // make it proportional to the host's share once zones are large.
    // Through the transaction's view: commands earlier in this batch count.
    let instances = txn.scan_prefix::<Instance>(CF_INSTANCES, b"")?;
    for (_, mut instance) in instances {
        let migration = txn.get::<Move>(CF_MOVES, instance.id.as_bytes())?;
        if let Some(migration) = &migration {
            if migration.to == host_id || migration.from == host_id {
                abandon_move(txn, &instance)?;
                if migration.to == host_id {
                    // The source may have stopped the domain before the
                    // destination went silent; the reconciler starts it.
                    instance.observed = ObservedState::Missing;
                    instance.generation += 1;
                    txn.put(CF_INSTANCES, instance.id.as_bytes(), &instance)?;
                }
            }
        }
        if instance.host != host_id {
            continue;
        }
        if instance.desired == DesiredState::Deleted {
            // Powered off, the domain is gone; should the host come back
            // with it, its agent destroys it.
            remove_instance(txn, &instance)?;
            add_stale_copy(txn, &instance.id, host_id, index)?;
            continue;
        }
        instance.observed = ObservedState::Lost;
        txn.put(CF_INSTANCES, instance.id.as_bytes(), &instance)?;
    }
    Ok(CommandResult::Fence(record))
}

pub fn evacuate_instance(txn: &mut Txn, index: u64, instance_id: &str, to: &str) -> Result<CommandResult, DbError> {
    let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, instance_id.as_bytes())? else {
        return reject(Rejection::UnknownInstance(instance_id.to_string()));
    };
    let source = txn.get::<Host>(CF_HOSTS, instance.host.as_bytes())?;
    let Some(mut source) = source.filter(|h| h.health == HostHealth::Fenced) else {
        let health = txn
            .get::<Host>(CF_HOSTS, instance.host.as_bytes())?
            .map_or("unknown".to_string(), |h| h.health.as_str().to_string());
        return reject(Rejection::HostNotFenced {
            host: instance.host,
            health,
        });
    };
    if !is_san(txn, &instance.pod)? {
        return reject(Rejection::NotMigratable {
            instance: instance.name,
            pod: instance.pod,
            host: instance.host,
        });
    }
    if instance.desired != DesiredState::Running {
        return reject(Rejection::NotRunning {
            instance: instance.name,
            state: instance.desired.as_str().to_string(),
        });
    }
    let mut target = match destination(txn, &instance, to)? {
        Ok(host) => host,
        Err(rejection) => return reject(rejection),
    };
    // A host that takes orders and has a stale copy (the destination of
    // an abandoned migration) may run the domain: evict it first.
    for (_, host) in txn.scan_prefix::<Host>(CF_HOSTS, b"")? {
        let stale = txn.get::<StaleCopy>(CF_STALE_COPIES, &stale_key(&host.id, &instance.id))?;
        if stale.is_some() && host.health.takes_orders() {
            return reject(Rejection::StaleCopyPending {
                instance: instance.name,
                host: host.id,
            });
        }
    }
    // An order still open on the fenced host will never complete there.
    if let Some(open) = instance.open_order.take() {
        if let Some(mut entry) = txn.get::<JournalEntry>(CF_JOURNAL, &db::index_key(open))? {
            if entry.outcome.is_none() {
                entry.outcome = Some(OrderOutcome::Superseded);
                txn.put(CF_JOURNAL, &db::index_key(open), &entry)?;
            }
        }
    }
    release(&mut source, &instance);
    hold(&mut target, &instance);
    txn.put(CF_HOSTS, source.id.as_bytes(), &source)?;
    txn.put(CF_HOSTS, target.id.as_bytes(), &target)?;
    add_stale_copy(txn, &instance.id, &source.id, index)?;
    instance.host = target.id;
    instance.observed = ObservedState::Pending;
    instance.generation += 1;
    txn.put(CF_INSTANCES, instance_id.as_bytes(), &instance)?;
    // The fenced host's domain can no longer use the volumes being detached.
    let mut devices = devices_of(txn, instance_id)?;
    if !devices.detaching.is_empty() || !devices.detaching_nics.is_empty() {
        finish_detaches(txn, &mut devices, u64::MAX)?;
        txn.put(CF_DEVICES, instance_id.as_bytes(), &devices)?;
    }
    Ok(CommandResult::Devices(instance, devices))
}

pub fn open_evict_order(
    txn: &mut Txn,
    index: u64,
    instance_id: &str,
    host: &str,
    leader: LeaderStamp,
) -> Result<CommandResult, DbError> {
    let key = stale_key(host, instance_id);
    let Some(mut copy) = txn.get::<StaleCopy>(CF_STALE_COPIES, &key)? else {
        return reject(Rejection::UnknownInstance(instance_id.to_string()));
    };
    if let Some(rejection) = supersede(txn, instance_id, copy.open_order, leader)? {
        return reject(rejection);
    }
    let entry = JournalEntry {
        id: index,
        subject: instance_id.to_string(),
        host_id: host.to_string(),
        action: OrderAction::Evict,
        generation: 0,
        leader,
        outcome: None,
    };
    copy.open_order = Some(index);
    txn.put(CF_STALE_COPIES, &key, &copy)?;
    txn.put(CF_JOURNAL, &db::index_key(index), &entry)?;
    Ok(CommandResult::Order(entry))
}

pub fn close_evict_order(txn: &mut Txn, entry: &JournalEntry, outcome: &OrderOutcome) -> Result<(), DbError> {
    let key = stale_key(&entry.host_id, &entry.subject);
    let Some(mut copy) = txn.get::<StaleCopy>(CF_STALE_COPIES, &key)? else {
        return Ok(());
    };
    if matches!(outcome, OrderOutcome::Done { .. }) {
        txn.delete(CF_STALE_COPIES, &key);
        return Ok(());
    }
    if copy.open_order == Some(entry.id) {
        copy.open_order = None;
        txn.put(CF_STALE_COPIES, &key, &copy)?;
    }
    Ok(())
}
