//! Apply rules for NICs, their address leases, and the release of deleted
//! networks.
//!
//! A lease maps an address of a network's CIDR to the instance holding it.
//! The network address, the first host address (kept for the gateway) and
//! the broadcast address are never leased; the lowest free address is.

use std::net::Ipv4Addr;

use super::apply::{devices_of, reject, release_segmentation_id, Txn};
use super::command::{CommandResult, Rejection};
use super::model::{DesiredState, Instance, InstanceDevices, Network, NetworkState, Nic};
use crate::store::db::{DbError, CF_DEVICES, CF_INSTANCES, CF_LEASES, CF_NETWORKS};

/// Returns the key prefix of a network's leases.
fn lease_prefix(network: &str) -> Vec<u8> {
    let mut key = network.as_bytes().to_vec();
    key.push(0);
    key
}

fn lease_key(network: &str, address: u32) -> Vec<u8> {
    let mut key = lease_prefix(network);
    key.extend_from_slice(&address.to_be_bytes());
    key
}

/// Splits a CIDR the leader validated ("10.0.0.0/24") into its network
/// address and prefix length.
fn parse_cidr(cidr: &str) -> Option<(u32, u32)> {
    let (address, prefix) = cidr.split_once('/')?;
    let address: Ipv4Addr = address.parse().ok()?;
    let prefix: u32 = prefix.parse().ok()?;
    (prefix <= 30).then_some((u32::from(address), prefix))
}

/// Returns the prefix length of a network's CIDR, for the agent.
pub fn prefix_len(cidr: &str) -> u32 {
    parse_cidr(cidr).map_or(0, |(_, prefix)| prefix)
}

/// Leases the lowest free address of `network` to `instance`, unless the
/// instance already has a NIC there or the network cannot take it.
pub fn lease(
    txn: &mut Txn,
    instance: &Instance,
    devices: &InstanceDevices,
    network: &str,
) -> Result<Result<Nic, Rejection>, DbError> {
    let Some(record) = txn.get::<Network>(CF_NETWORKS, network.as_bytes())? else {
        return Ok(Err(Rejection::UnknownNetwork(network.to_string())));
    };
    if record.state != NetworkState::Active {
        return Ok(Err(Rejection::NetworkNotActive {
            network: network.to_string(),
            state: record.state.as_str().to_string(),
        }));
    }
    if record.pod != instance.pod {
        return Ok(Err(Rejection::NetworkPodMismatch {
            network: network.to_string(),
            network_pod: record.pod,
            instance: instance.name.clone(),
            instance_pod: instance.pod.clone(),
        }));
    }
    if devices.nics.iter().any(|nic| nic.network == network) {
        return Ok(Err(Rejection::NicExists {
            instance: instance.name.clone(),
            network: network.to_string(),
        }));
    }
    let exhausted = || Rejection::SubnetExhausted {
        network: network.to_string(),
        cidr: record.cidr.clone(),
    };
    let Some((base, prefix)) = parse_cidr(&record.cidr) else {
        return Ok(Err(exhausted()));
    };
    let broadcast = base | (u32::MAX >> prefix);
    // Leases come back in address order, so the first gap is the lowest
    // free address.
    // NOTE: this reads every lease of the network; a free-range index like
    // the segmentation ids' would make it one seek for very large subnets.
    let mut candidate = base + 2;
    for (key, _holder) in txn.scan_prefix::<String>(CF_LEASES, &lease_prefix(network))? {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(&key[key.len() - 4..]);
        let leased = u32::from_be_bytes(bytes);
        if leased > candidate {
            break;
        }
        if leased == candidate {
            candidate += 1;
        }
    }
    if candidate >= broadcast {
        return Ok(Err(exhausted()));
    }
    txn.put(CF_LEASES, &lease_key(network, candidate), &instance.id)?;
    Ok(Ok(Nic {
        network: network.to_string(),
        mac: mac_for(record.segmentation_id, candidate),
        ip: Ipv4Addr::from(candidate).to_string(),
    }))
}

/// Derives a NIC's MAC from its network's segmentation id and its address:
/// a locally administered unicast prefix (0x52), the id's low 16 bits, and
/// the address's low 24 bits. Subnets are /8 or smaller, so two NICs of one
/// network differ in the address bits, and two NICs of one instance on
/// different networks of a VLAN pod differ in the id bits.
///
/// NOTE: in a VXLAN pod, two VNIs equal in their low 16 bits can give an
/// instance two NICs with one MAC when their subnets overlap.
fn mac_for(segmentation_id: u32, address: u32) -> String {
    let id = segmentation_id.to_be_bytes();
    let ip = address.to_be_bytes();
    format!("52:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", id[2], id[3], ip[1], ip[2], ip[3])
}

pub fn release_lease(txn: &mut Txn, nic: &Nic) -> Result<(), DbError> {
    if let Ok(address) = nic.ip.parse::<Ipv4Addr>() {
        txn.delete(CF_LEASES, &lease_key(&nic.network, u32::from(address)));
    }
    Ok(())
}

/// Returns the names of the instances holding leases on `network`.
pub fn lease_holders(txn: &Txn, network: &str) -> Result<Vec<String>, DbError> {
    let mut holders = Vec::new();
    for (_, holder) in txn.scan_prefix::<String>(CF_LEASES, &lease_prefix(network))? {
        holders.push(super::volumes::instance_name(txn, &holder)?);
    }
    holders.sort();
    holders.dedup();
    Ok(holders)
}

pub fn attach_nic(txn: &mut Txn, instance_id: &str, network: &str) -> Result<CommandResult, DbError> {
    let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, instance_id.as_bytes())? else {
        return reject(Rejection::UnknownInstance(instance_id.to_string()));
    };
    if instance.desired == DesiredState::Deleted {
        return reject(Rejection::UnknownInstance(instance.name));
    }
    let mut devices = devices_of(txn, instance_id)?;
    let nic = match lease(txn, &instance, &devices, network)? {
        Ok(nic) => nic,
        Err(rejection) => return reject(rejection),
    };
    devices.nics.push(nic);
    instance.generation += 1;
    txn.put(CF_DEVICES, instance_id.as_bytes(), &devices)?;
    txn.put(CF_INSTANCES, instance_id.as_bytes(), &instance)?;
    Ok(CommandResult::Devices(instance, devices))
}

pub fn detach_nic(txn: &mut Txn, instance_id: &str, network: &str) -> Result<CommandResult, DbError> {
    let Some(mut instance) = txn.get::<Instance>(CF_INSTANCES, instance_id.as_bytes())? else {
        return reject(Rejection::UnknownInstance(instance_id.to_string()));
    };
    let mut devices = devices_of(txn, instance_id)?;
    let Some(position) = devices.nics.iter().position(|nic| nic.network == network) else {
        return reject(Rejection::NoSuchNic {
            instance: instance.name,
            network: network.to_string(),
        });
    };
    // The lease is kept until the host confirms a definition without the
    // NIC, so the address cannot reach another instance while the domain
    // may still use it.
    let nic = devices.nics.remove(position);
    instance.generation += 1;
    devices.detaching_nics.push(nic);
    devices.detached_generation = instance.generation;
    txn.put(CF_DEVICES, instance_id.as_bytes(), &devices)?;
    txn.put(CF_INSTANCES, instance_id.as_bytes(), &instance)?;
    Ok(CommandResult::Devices(instance, devices))
}

/// Removes a deleting network and frees its segmentation id. The leader
/// proposes it once no host reports the network.
pub fn release_network(txn: &mut Txn, name: &str) -> Result<CommandResult, DbError> {
    let Some(network) = txn.get::<Network>(CF_NETWORKS, name.as_bytes())? else {
        return reject(Rejection::UnknownNetwork(name.to_string()));
    };
    if network.state != NetworkState::Deleting {
        return reject(Rejection::NetworkNotDeleting(name.to_string()));
    }
    let holders = lease_holders(txn, name)?;
    if !holders.is_empty() {
        return reject(Rejection::NetworkInUse {
            network: name.to_string(),
            instances: holders,
        });
    }
    txn.delete(CF_NETWORKS, name.as_bytes());
    release_segmentation_id(txn, &network.pod, network.segmentation_id)?;
    Ok(CommandResult::Network(network))
}
