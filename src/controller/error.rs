//! Errors of the zone API and their one mapping to gRPC statuses.
//!
//! Every status carries a machine-readable reason in the `ccs-reason`
//! metadata key; clients branch on it, never on the message text.
//!
//! | reason            | gRPC code           | the write may have happened |
//! |-------------------|---------------------|-----------------------------|
//! | INVALID_ARGUMENT  | INVALID_ARGUMENT    | no                          |
//! | POD_NOT_FOUND, HOST_NOT_FOUND, INSTANCE_NOT_FOUND, NETWORK_NOT_FOUND, VOLUME_NOT_FOUND | NOT_FOUND | no |
//! | NAME_TAKEN, POD_EXISTS | ALREADY_EXISTS | no                          |
//! | NO_CAPACITY       | RESOURCE_EXHAUSTED  | no                          |
//! | RANGE_EXHAUSTED   | RESOURCE_EXHAUSTED  | no (the pod has no free VLAN id or VNI) |
//! | POOL_FULL, SUBNET_EXHAUSTED | RESOURCE_EXHAUSTED | no (no room in a storage pool; no free address) |
//! | VOLUME_HOST_MISMATCH, POD_MISMATCH, HOST_POD_MISMATCH, IN_USE, NOT_MIGRATABLE, HOST_NOT_DRAINABLE, WRONG_STATE | FAILED_PRECONDITION | no |
//! | CONFLICT          | ABORTED             | no                          |
//! | CAS_MISMATCH      | FAILED_PRECONDITION | no                          |
//! | NOT_LEADER        | UNAVAILABLE         | no (refused before proposing; `ccs-leader` names the leader) |
//! | MEMBERSHIP_CHANGING | UNAVAILABLE       | no (another membership change is in progress) |
//! | NO_LEADER         | UNAVAILABLE         | no                          |
//! | HOST_UNREACHABLE  | UNAVAILABLE         | no (reads, and volume creates refused before proposing) |
//! | LEADER_CHANGED    | UNAVAILABLE         | yes                         |
//! | TIMEOUT           | DEADLINE_EXCEEDED   | yes                         |
//! | INTERNAL          | INTERNAL            | yes                         |
//!
//! A create retried with the same request id after a "yes" status returns
//! the first result instead of creating a second instance.

use tonic::metadata::MetadataValue;

use crate::client::{LEADER_KEY, REASON_KEY};
use crate::zone::command::Rejection;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field} {value:?} is invalid: {reason}")]
    InvalidArgument {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("no host in {scope} has room for {vcpus} vCPUs, {memory_mib} MiB memory and {disk_gib} GiB disk")]
    NoCapacity {
        scope: String,
        vcpus: u32,
        memory_mib: u64,
        disk_gib: u64,
    },
    #[error("this replica is not the leader; retry on the leader{}", leader_suffix(.leader))]
    NotLeader { leader: Option<String> },
    #[error("the zone has no leader (no quorum); retry later")]
    NoLeader,
    #[error("another membership change is in progress: {0}; retry when it has finished")]
    MembershipChanging(String),
    #[error("host {host:?} agent at {endpoint} is unreachable: {message}")]
    HostUnreachable {
        host: String,
        endpoint: String,
        message: String,
    },
    #[error("leadership changed while the write was in flight; it may have been applied, so retry with the same request id")]
    LeaderChanged,
    #[error("the write was not committed within {0:?}; it may still be applied, so retry with the same request id")]
    Timeout(std::time::Duration),
    #[error(
        "host {host:?} is in DAS pod {pod:?}, whose instances keep their disks on their host and \
         cannot move: {}; delete them or wait for them to end before maintenance",
        .instances.join(", ")
    )]
    NotDrainable {
        host: String,
        pod: String,
        instances: Vec<String>,
    },
    #[error(
        "host {host:?} is draining, but these instances could not start migrating: {}; run the drain again",
        .stuck.join("; ")
    )]
    DrainIncomplete { host: String, stuck: Vec<String> },
    #[error(
        "the storage pool's host {host:?} is {health}, so it cannot create or delete volumes; \
         retry when `ccs host list` shows it up"
    )]
    PoolHostDown { host: String, health: String },
    #[error("internal error: {0}")]
    Internal(String),
}

fn leader_suffix(leader: &Option<String>) -> String {
    match leader {
        Some(addr) => format!(" at {addr}"),
        None => String::new(),
    }
}

impl ApiError {
    pub fn invalid(field: &'static str, value: impl ToString, reason: impl ToString) -> ApiError {
        ApiError::InvalidArgument {
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    fn code_and_reason(&self) -> (tonic::Code, &'static str) {
        use tonic::Code;
        match self {
            ApiError::InvalidArgument { .. } => (Code::InvalidArgument, "INVALID_ARGUMENT"),
            ApiError::Rejected(rejection) => rejection_code(rejection),
            ApiError::NoCapacity { .. } => (Code::ResourceExhausted, "NO_CAPACITY"),
            ApiError::NotLeader { .. } => (Code::Unavailable, "NOT_LEADER"),
            ApiError::NoLeader => (Code::Unavailable, "NO_LEADER"),
            ApiError::MembershipChanging(_) => (Code::Unavailable, "MEMBERSHIP_CHANGING"),
            ApiError::HostUnreachable { .. } => (Code::Unavailable, "HOST_UNREACHABLE"),
            ApiError::LeaderChanged => (Code::Unavailable, "LEADER_CHANGED"),
            ApiError::Timeout(_) => (Code::DeadlineExceeded, "TIMEOUT"),
            ApiError::NotDrainable { .. } => (Code::FailedPrecondition, "HOST_NOT_DRAINABLE"),
            ApiError::DrainIncomplete { .. } => (Code::Aborted, "CONFLICT"),
            ApiError::PoolHostDown { .. } => (Code::Unavailable, "HOST_UNREACHABLE"),
            ApiError::Internal(_) => (Code::Internal, "INTERNAL"),
        }
    }
}

fn rejection_code(rejection: &Rejection) -> (tonic::Code, &'static str) {
    use tonic::Code;
    match rejection {
        Rejection::PodExists(_) => (Code::AlreadyExists, "POD_EXISTS"),
        Rejection::NameTaken(_) | Rejection::IdTaken(_) | Rejection::NetworkNameTaken(_) => {
            (Code::AlreadyExists, "NAME_TAKEN")
        }
        Rejection::UnknownNetwork(_) => (Code::NotFound, "NETWORK_NOT_FOUND"),
        Rejection::SegmentationRangeExhausted { .. } => {
            (Code::ResourceExhausted, "RANGE_EXHAUSTED")
        }
        Rejection::UnknownPod(_) => (Code::NotFound, "POD_NOT_FOUND"),
        Rejection::UnknownHost(_) => (Code::NotFound, "HOST_NOT_FOUND"),
        Rejection::UnknownInstance(_) => (Code::NotFound, "INSTANCE_NOT_FOUND"),
        Rejection::HostFull { .. } | Rejection::HostNotUp(_) => (Code::Aborted, "CONFLICT"),
        Rejection::HostPodMismatch { .. } => (Code::FailedPrecondition, "HOST_POD_MISMATCH"),
        Rejection::KeyMismatch { .. } => (Code::FailedPrecondition, "CAS_MISMATCH"),
        Rejection::UnknownOrder(_)
        | Rejection::OrderClosed(_)
        | Rejection::OrderOpen { .. }
        | Rejection::StaleGeneration { .. } => (Code::Aborted, "CONFLICT"),
        Rejection::UnknownVolume(_) => (Code::NotFound, "VOLUME_NOT_FOUND"),
        Rejection::VolumeNameTaken(_) | Rejection::VolumeIdTaken(_) => (Code::AlreadyExists, "NAME_TAKEN"),
        Rejection::VolumeHostMismatch { .. } => (Code::FailedPrecondition, "VOLUME_HOST_MISMATCH"),
        Rejection::VolumePodMismatch { .. } | Rejection::NetworkPodMismatch { .. } | Rejection::HostNotInPod { .. } => {
            (Code::FailedPrecondition, "POD_MISMATCH")
        }
        Rejection::VolumeAttached { .. } | Rejection::NicExists { .. } | Rejection::NetworkInUse { .. } => {
            (Code::FailedPrecondition, "IN_USE")
        }
        Rejection::PoolFull { .. } => (Code::ResourceExhausted, "POOL_FULL"),
        Rejection::SubnetExhausted { .. } => (Code::ResourceExhausted, "SUBNET_EXHAUSTED"),
        Rejection::NotMigratable { .. } => (Code::FailedPrecondition, "NOT_MIGRATABLE"),
        Rejection::VolumeNotAttached { .. }
        | Rejection::VolumeNotAvailable { .. }
        | Rejection::NoSanPool(_)
        | Rejection::NotSanAgent { .. }
        | Rejection::NoSuchNic { .. }
        | Rejection::NetworkNotActive { .. }
        | Rejection::NetworkNotDeleting(_)
        | Rejection::AlreadyMoving { .. }
        | Rejection::NotRunning { .. }
        | Rejection::SameHost { .. }
        | Rejection::StaleCopyPending { .. }
        | Rejection::HostNotSuspect { .. }
        | Rejection::HostNotFenced { .. } => (Code::FailedPrecondition, "WRONG_STATE"),
    }
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> tonic::Status {
        let (code, reason) = error.code_and_reason();
        let mut status = tonic::Status::new(code, error.to_string());
        status
            .metadata_mut()
            .insert(REASON_KEY, MetadataValue::from_static(reason));
        if let ApiError::NotLeader { leader: Some(addr) } = &error {
            if let Ok(value) = MetadataValue::try_from(addr.as_str()) {
                status.metadata_mut().insert(LEADER_KEY, value);
            }
        }
        status
    }
}
