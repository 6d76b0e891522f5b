//! Orders as the agent executes them: the wire `Order` checked and turned
//! into a `Task` before the fence is touched, and the `Outcome` an executed
//! task reports back.
//!
//! A malformed order is rejected with INVALID_ARGUMENT naming the field and
//! value; nothing here has side effects.

use tonic::Status;

use crate::hypervisor::{DiskSpec, DomainSpec, NetworkMode, NicSpec, PoolKind};
use crate::proto::agent::{Order, OrderAction};

/// Highest VLAN id (802.1q reserves 0 and 4095).
const MAX_VLAN_ID: u32 = 4094;
/// Highest VXLAN network identifier (24 bits).
const MAX_VNI: u32 = (1 << 24) - 1;

/// One order, checked.
#[derive(Clone, Debug)]
pub(crate) enum Task {
    Start(DomainSpec),
    Define(DomainSpec),
    Stop(String),
    Destroy(String),
    CreateVolume(VolumeTask),
    DeleteVolume(VolumeTask),
    Migrate(DomainSpec, Destination),
}

/// The subject of a volume order.
#[derive(Clone, Debug)]
pub(crate) struct VolumeTask {
    pub volume_id: String,
    pub pool: PoolKind,
    pub size_gib: u64,
}

/// The destination of a MIGRATE order.
#[derive(Clone, Debug)]
pub(crate) struct Destination {
    pub host_id: String,
    pub agent_endpoint: String,
    pub libvirt_uri: String,
}

/// The report of an executed order.
#[derive(Clone, Debug)]
pub(crate) struct Outcome {
    /// State before and after: "running", "stopped" or "absent" for a
    /// domain, "present" or "absent" for a volume.
    pub before: String,
    pub after: String,
    pub already_done: bool,
    /// A sentence for the operator when the agent did more than the order's
    /// plain meaning; empty otherwise.
    pub note: String,
}

impl Task {
    /// Checks an order and builds its task.
    pub(crate) fn from_order(order: &Order) -> Result<Task, Status> {
        let action = OrderAction::try_from(order.action).unwrap_or(OrderAction::Unspecified);
        let task = match action {
            OrderAction::Start => Task::Start(domain_spec(order)?),
            OrderAction::Define => Task::Define(domain_spec(order)?),
            OrderAction::Stop => Task::Stop(instance_uuid(order)?),
            OrderAction::Destroy => Task::Destroy(instance_uuid(order)?),
            OrderAction::CreateVolume => Task::CreateVolume(volume_task(order, true)?),
            OrderAction::DeleteVolume => Task::DeleteVolume(volume_task(order, false)?),
            OrderAction::Migrate => Task::Migrate(domain_spec(order)?, destination(order)?),
            OrderAction::Unspecified => {
                return Err(invalid(
                    order,
                    format!("action {} is not a known order action", order.action),
                ))
            }
        };
        Ok(task)
    }

    /// Names the action in the ledger and in logs.
    pub(crate) fn action(&self) -> &'static str {
        match self {
            Task::Start(_) => "start",
            Task::Define(_) => "define",
            Task::Stop(_) => "stop",
            Task::Destroy(_) => "destroy",
            Task::CreateVolume(_) => "create_volume",
            Task::DeleteVolume(_) => "delete_volume",
            Task::Migrate(..) => "migrate",
        }
    }

    /// Returns the instance id, or the volume id of a volume order.
    pub(crate) fn subject(&self) -> &str {
        match self {
            Task::Start(spec) | Task::Define(spec) | Task::Migrate(spec, _) => &spec.uuid,
            Task::Stop(uuid) | Task::Destroy(uuid) => uuid,
            Task::CreateVolume(volume) | Task::DeleteVolume(volume) => &volume.volume_id,
        }
    }
}

fn invalid(order: &Order, message: String) -> Status {
    Status::invalid_argument(format!("order {}: {message}", order.order_id))
}

fn instance_uuid(order: &Order) -> Result<String, Status> {
    match uuid::Uuid::parse_str(&order.instance_id) {
        Ok(_) => Ok(order.instance_id.clone()),
        Err(_) => Err(invalid(
            order,
            format!(
                "instance_id {:?} is not a UUID; instance ids are domain UUIDs",
                order.instance_id
            ),
        )),
    }
}

fn domain_spec(order: &Order) -> Result<DomainSpec, Status> {
    let uuid = instance_uuid(order)?;
    if order.instance_name.is_empty() {
        return Err(invalid(order, "instance_name is empty".to_string()));
    }
    let disks = order
        .disks
        .iter()
        .map(|disk| {
            Ok(DiskSpec {
                volume_id: volume_id(order, &disk.volume_id)?,
                pool: pool_kind(order, &disk.pool)?,
                size_gib: disk.size_gib,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let nics = order
        .nics
        .iter()
        .map(|nic| nic_spec(order, nic))
        .collect::<Result<Vec<_>, Status>>()?;
    Ok(DomainSpec {
        uuid,
        name: order.instance_name.clone(),
        vcpus: order.vcpus,
        memory_mib: order.memory_mib,
        disks,
        nics,
    })
}

fn nic_spec(order: &Order, nic: &crate::proto::agent::Nic) -> Result<NicSpec, Status> {
    if nic.network.is_empty() || nic.network.contains('/') {
        return Err(invalid(
            order,
            format!(
                "NIC network {:?} must be a non-empty name without '/'",
                nic.network
            ),
        ));
    }
    let Some(mode) = NetworkMode::parse(&nic.mode) else {
        return Err(invalid(
            order,
            format!(
                "NIC mode {:?} on network {:?} must be \"vlan\" or \"vxlan\"",
                nic.mode, nic.network
            ),
        ));
    };
    let max = match mode {
        NetworkMode::Vlan => MAX_VLAN_ID,
        NetworkMode::Vxlan => MAX_VNI,
    };
    if nic.segmentation_id == 0 || nic.segmentation_id > max {
        return Err(invalid(
            order,
            format!(
                "segmentation id {} of network {:?} is outside {} ids 1 to {max}",
                nic.segmentation_id,
                nic.network,
                mode.as_str()
            ),
        ));
    }
    if !is_mac(&nic.mac) {
        return Err(invalid(
            order,
            format!("NIC MAC {:?} is not six colon-separated hex bytes", nic.mac),
        ));
    }
    Ok(NicSpec {
        network: nic.network.clone(),
        mode,
        segmentation_id: nic.segmentation_id,
        mac: nic.mac.to_ascii_lowercase(),
        ip: nic.ip.clone(),
        prefix_len: nic.prefix_len,
    })
}

fn is_mac(text: &str) -> bool {
    let bytes: Vec<&str> = text.split(':').collect();
    bytes.len() == 6
        && bytes
            .iter()
            .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()))
}

fn pool_kind(order: &Order, text: &str) -> Result<PoolKind, Status> {
    PoolKind::parse(text)
        .ok_or_else(|| invalid(order, format!("pool {text:?} must be \"local\" or \"san\"")))
}

fn volume_id(order: &Order, id: &str) -> Result<String, Status> {
    if id.is_empty() || id.contains('/') {
        return Err(invalid(
            order,
            format!("volume id {id:?} must be non-empty and without '/'"),
        ));
    }
    Ok(id.to_string())
}

fn volume_task(order: &Order, create: bool) -> Result<VolumeTask, Status> {
    let Some(volume) = &order.volume else {
        return Err(invalid(order, "a volume order needs `volume`".to_string()));
    };
    if create && volume.size_gib == 0 {
        return Err(invalid(
            order,
            format!("volume {:?} has size 0 GiB", volume.volume_id),
        ));
    }
    Ok(VolumeTask {
        volume_id: volume_id(order, &volume.volume_id)?,
        pool: pool_kind(order, &volume.pool)?,
        size_gib: volume.size_gib,
    })
}

fn destination(order: &Order) -> Result<Destination, Status> {
    let Some(destination) = &order.destination else {
        return Err(invalid(
            order,
            "a MIGRATE order needs `destination`".to_string(),
        ));
    };
    let fields = [
        ("host_id", &destination.host_id),
        ("agent_endpoint", &destination.agent_endpoint),
        ("libvirt_uri", &destination.libvirt_uri),
    ];
    for (field, value) in fields {
        if value.is_empty() {
            return Err(invalid(order, format!("destination.{field} is empty")));
        }
    }
    Ok(Destination {
        host_id: destination.host_id.clone(),
        agent_endpoint: destination.agent_endpoint.clone(),
        libvirt_uri: destination.libvirt_uri.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::agent::{Nic, VolumeSpec};

    const UUID: &str = "0b6f2a4e-8f3c-4d7e-9a51-2c6d1e0f7a31";

    fn start_order(nic: Nic) -> Order {
        Order {
            order_id: 9,
            action: OrderAction::Start as i32,
            instance_id: UUID.to_string(),
            instance_name: "web".to_string(),
            nics: vec![nic],
            ..Default::default()
        }
    }

    fn nic(mode: &str, segmentation_id: u32, mac: &str) -> Nic {
        Nic {
            network: "blue".to_string(),
            mode: mode.to_string(),
            segmentation_id,
            mac: mac.to_string(),
            ..Default::default()
        }
    }

    fn rejection(order: &Order) -> String {
        Task::from_order(order)
            .expect_err("order is malformed")
            .message()
            .to_string()
    }

    #[test]
    fn start_order_builds_spec() {
        let order = start_order(nic("vxlan", 70_000, "52:54:00:AB:cd:01"));
        let Task::Start(spec) = Task::from_order(&order).expect("valid order") else {
            panic!("expected a start task");
        };
        assert_eq!(spec.uuid, UUID);
        assert_eq!(spec.nics[0].mac, "52:54:00:ab:cd:01");
        assert_eq!(spec.nics[0].mode, NetworkMode::Vxlan);
    }

    #[test]
    fn vlan_id_above_4094_rejected() {
        let message = rejection(&start_order(nic("vlan", 4095, "52:54:00:00:00:01")));
        assert!(message.contains("4095"), "{message}");
    }

    #[test]
    fn malformed_mac_rejected() {
        let message = rejection(&start_order(nic("vlan", 10, "52:54:00:00:01")));
        assert!(message.contains("MAC"), "{message}");
    }

    #[test]
    fn unknown_mode_rejected() {
        let message = rejection(&start_order(nic("geneve", 10, "52:54:00:00:00:01")));
        assert!(message.contains("geneve"), "{message}");
    }

    #[test]
    fn non_uuid_instance_rejected() {
        let mut order = start_order(nic("vlan", 10, "52:54:00:00:00:01"));
        order.instance_id = "web-1".to_string();
        assert!(rejection(&order).contains("web-1"));
    }

    #[test]
    fn volume_order_needs_volume() {
        let mut order = Order {
            action: OrderAction::CreateVolume as i32,
            ..Default::default()
        };
        assert!(rejection(&order).contains("volume"));
        order.volume = Some(VolumeSpec {
            volume_id: "vol-1".to_string(),
            pool: "nfs".to_string(),
            size_gib: 1,
        });
        assert!(rejection(&order).contains("nfs"));
    }

    #[test]
    fn migrate_needs_destination_fields() {
        let mut order = start_order(nic("vlan", 10, "52:54:00:00:00:01"));
        order.action = OrderAction::Migrate as i32;
        assert!(rejection(&order).contains("destination"));
        order.destination = Some(crate::proto::agent::Destination {
            host_id: "host-2".to_string(),
            agent_endpoint: String::new(),
            libvirt_uri: "test:///x".to_string(),
        });
        assert!(rejection(&order).contains("agent_endpoint"));
    }
}
