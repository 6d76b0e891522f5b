//! The zone's public gRPC service. It converts between protobuf messages
//! and zone records, serves calls the leader must serve by forwarding them
//! once to the leader, and serves stale reads locally.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::error::ApiError;
use super::ops::{self, CreateInstance, CreatePod, Zone};
use super::status;
use crate::proto::agent::agent_client::AgentClient;
use crate::proto::agent::ListDomainsRequest;
use crate::proto::zone::zone_client::ZoneClient;
use crate::proto::zone::zone_server;
use crate::proto::zone::*;
use crate::zone::command::{Command, Rejection};
use crate::zone::model;

/// Metadata key set on a forwarded call. A replica that receives a call with
/// it never forwards the call again, so a call makes at most one hop.
const FORWARDED_KEY: &str = "ccs-forwarded";

pub struct ZoneService {
    pub zone: Arc<Zone>,
    leader_clients: DashMap<String, ZoneClient<Channel>>,
    agent_clients: DashMap<String, AgentClient<Channel>>,
}

impl ZoneService {
    pub fn new(zone: Arc<Zone>) -> ZoneService {
        ZoneService {
            zone,
            leader_clients: DashMap::new(),
            agent_clients: DashMap::new(),
        }
    }

    /// Sends a call this replica cannot serve to the leader, unless it was
    /// already forwarded once.
    async fn forward<Req, Resp, F, Fut>(&self, request: Request<Req>, call: F) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(ZoneClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let node = &self.zone.node;
        let rejection = node.not_leader();
        let (forwarded, leader) = (request.metadata().contains_key(FORWARDED_KEY), node.leader());
        let Some((leader_id, addr)) = leader else {
            return Err(rejection.into());
        };
        if forwarded || leader_id == node.id {
            return Err(rejection.into());
        }
        let client = match self.leader_clients.get(&addr) {
            Some(client) => client.clone(),
            None => {
                let client = ZoneClient::new(crate::client::channel(&addr, Duration::from_secs(30))?);
                self.leader_clients.insert(addr.clone(), client.clone());
                client
            }
        };
        let mut outgoing = Request::new(request.into_inner());
        outgoing
            .metadata_mut()
            .insert(FORWARDED_KEY, tonic::metadata::MetadataValue::from_static("1"));
        call(client, outgoing).await
    }

    fn read_info(&self, stale: bool) -> ReadInfo {
        let node = &self.zone.node;
        ReadInfo {
            stale,
            applied_index: node.applied_index(),
            leader_commit_index: if stale { status::known_commit_index(node) } else { node.applied_index() },
            serving_node_id: node.id,
        }
    }

    /// Converts an instance, reading its devices and migration.
    fn instance_reply(&self, instance: &model::Instance) -> Result<Instance, ApiError> {
        let node = &self.zone.node;
        let devices = node.devices(&instance.id)?;
        let migration = node.move_of(&instance.id)?;
        Ok(instance_message(instance, &devices, migration.as_ref().map(|m| m.to.as_str())))
    }

    fn device_reply(&self, change: super::resources::DeviceChange) -> Result<DeviceChangeReply, ApiError> {
        let migration = self.zone.node.move_of(&change.instance.id)?;
        Ok(DeviceChangeReply {
            instance: Some(instance_message(
                &change.instance,
                &change.devices,
                migration.as_ref().map(|m| m.to.as_str()),
            )),
            applies: change.applies.as_str().to_string(),
            message: change.message,
        })
    }

    fn agent_client(&self, endpoint: &str) -> Result<AgentClient<Channel>, Status> {
        if let Some(client) = self.agent_clients.get(endpoint) {
            return Ok(client.clone());
        }
        let client = AgentClient::new(crate::client::channel(endpoint, Duration::from_secs(10))?);
        self.agent_clients.insert(endpoint.to_string(), client.clone());
        Ok(client)
    }
}

/// Converts an instance with its devices and, while it migrates, its destination.
pub fn instance_message(
    instance: &model::Instance,
    devices: &model::InstanceDevices,
    migrating_to: Option<&str>,
) -> Instance {
    Instance {
        id: instance.id.clone(),
        name: instance.name.clone(),
        vcpus: instance.vcpus,
        memory_mib: instance.memory_mib,
        disk_gib: instance.disk_gib,
        pod: instance.pod.clone(),
        host: instance.host.clone(),
        desired_state: instance.desired.as_str().to_string(),
        observed_state: instance.observed.as_str().to_string(),
        generation: instance.generation,
        created_index: instance.created_index,
        request_id: instance.request_id.clone().unwrap_or_default(),
        last_error: instance.last_error.clone().unwrap_or_default(),
        volumes: devices.volumes.clone(),
        nics: devices
            .nics
            .iter()
            .map(|nic| InstanceNic {
                network: nic.network.clone(),
                mac: nic.mac.clone(),
                ip: nic.ip.clone(),
            })
            .collect(),
        migrating_to: migrating_to.unwrap_or_default().to_string(),
    }
}

fn volume_message(volume: &model::Volume) -> Volume {
    Volume {
        id: volume.id.clone(),
        name: volume.name.clone(),
        pod: volume.pod.clone(),
        pool: volume.pool.as_str().to_string(),
        host: volume.host.clone(),
        size_gib: volume.size_gib,
        state: match (volume.state, &volume.attached_to) {
            (model::VolumeState::Available, Some(_)) => "in-use".to_string(),
            (state, _) => state.as_str().to_string(),
        },
        attached_to: volume.attached_to.clone().unwrap_or_default(),
        created_index: volume.created_index,
        last_error: volume.last_error.clone().unwrap_or_default(),
    }
}

fn drift_message(report: &super::drift::DriftReport) -> ZoneDriftReply {
    ZoneDriftReply {
        items: report
            .items
            .iter()
            .map(|item| DriftItem {
                host: item.host.clone(),
                kind: item.kind.to_string(),
                name: item.name.clone(),
                problem: item.problem.to_string(),
                detail: item.detail.clone(),
            })
            .collect(),
        hosts_checked: report.hosts_checked,
        unreported: report.unreported.clone(),
    }
}

fn host_message(host: &model::Host) -> Host {
    Host {
        id: host.id.clone(),
        pod: host.pod.clone(),
        libvirt_uri: host.libvirt_uri.clone(),
        agent_endpoint: host.agent_endpoint.clone(),
        cpus: host.cpus,
        memory_mib: host.memory_mib,
        disk_gib: host.disk_gib,
        used_vcpus: host.used_vcpus,
        used_memory_mib: host.used_memory_mib,
        used_disk_gib: host.used_disk_gib,
        health: host.health.as_str().to_string(),
        instances: host.instances,
    }
}

fn pod_message(pod: &model::Pod, profile: &model::PodProfile) -> Pod {
    Pod {
        name: pod.name.clone(),
        cpu_ratio: pod.cpu_ratio,
        memory_ratio: pod.memory_ratio,
        placement: pod.placement.as_str().to_string(),
        storage: profile.storage.as_str().to_string(),
        san_agent: profile.san_agent.clone().unwrap_or_default(),
        workload_class: profile.workload_class.clone(),
        storage_ratio: profile.storage_ratio,
        network_mode: profile.network.as_str().to_string(),
        segmentation_first: profile.segmentation_first,
        segmentation_last: profile.segmentation_last,
    }
}

fn network_message(network: &model::Network) -> Network {
    Network {
        name: network.name.clone(),
        pod: network.pod.clone(),
        mode: network.mode.as_str().to_string(),
        segmentation_id: network.segmentation_id,
        cidr: network.cidr.clone(),
        created_index: network.created_index,
        state: network.state.as_str().to_string(),
    }
}

fn key_message(key: &str, record: Option<&model::KeyValue>) -> KeyReply {
    KeyReply {
        key: key.to_string(),
        found: record.is_some(),
        value: record.map(|r| r.value.clone()).unwrap_or_default(),
        modified_index: record.map_or(0, |r| r.modified_index),
        read: None,
    }
}

/// Maps a failed membership change to an API error. Losing leadership
/// while the change was in flight is `LEADER_CHANGED`, not an internal
/// error: the change may have been committed, and repeating it is safe.
/// A change refused because another one is still in progress did nothing.
fn membership_error(error: RaftError<u64, ClientWriteError<u64, BasicNode>>, action: &str) -> ApiError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => ApiError::LeaderChanged,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(e))) => {
            ApiError::MembershipChanging(e.to_string())
        }
        other => ApiError::Internal(format!("{action} failed: {other}")),
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// Serves a read: locally when stale, else on the leader after a read barrier.
macro_rules! read {
    ($self:ident, $request:ident, $stale:expr, $method:ident, $serve:expr) => {{
        let stale = $stale;
        if !stale {
            if !$self.zone.node.is_leader() {
                return $self
                    .forward($request, |mut client, r| async move { client.$method(r).await })
                    .await;
            }
            $self.zone.node.read_barrier().await?;
        }
        let serve = $serve;
        Ok(Response::new(serve(stale)?))
    }};
}

/// Serves a write on the leader, forwarding it there from a follower.
macro_rules! write {
    ($self:ident, $request:ident, $method:ident) => {
        if !$self.zone.node.is_leader() {
            return $self
                .forward($request, |mut client, r| async move { client.$method(r).await })
                .await;
        }
    };
}

#[tonic::async_trait]
impl zone_server::Zone for ZoneService {
    async fn create_instance(&self, request: Request<CreateInstanceRequest>) -> Result<Response<Instance>, Status> {
        write!(self, request, create_instance);
        let message = request.into_inner();
        let create = CreateInstance {
            name: message.name,
            vcpus: message.vcpus,
            memory_mib: message.memory_mib,
            disk_gib: message.disk_gib,
            pod: non_empty(message.pod),
            request_id: non_empty(message.request_id),
            volumes: message.volumes,
            networks: message.networks,
        };
        let instance = self.zone.create_instance(create).await?;
        Ok(Response::new(self.instance_reply(&instance)?))
    }

    async fn delete_instance(&self, request: Request<InstanceRef>) -> Result<Response<Instance>, Status> {
        write!(self, request, delete_instance);
        let instance = self.zone.delete_instance(&request.into_inner().name).await?;
        Ok(Response::new(self.instance_reply(&instance)?))
    }

    async fn get_instance(&self, request: Request<GetInstanceRequest>) -> Result<Response<InstanceReply>, Status> {
        let name = request.get_ref().name.clone();
        read!(self, request, request.get_ref().stale, get_instance, |stale| {
            let instance = self
                .zone
                .node
                .instance(&name)?
                .ok_or_else(|| ApiError::from(crate::zone::command::Rejection::UnknownInstance(name.clone())))?;
            Ok::<_, ApiError>(InstanceReply {
                instance: Some(self.instance_reply(&instance)?),
                read: Some(self.read_info(stale)),
            })
        })
    }

    async fn list_instances(&self, request: Request<ReadRequest>) -> Result<Response<InstanceList>, Status> {
        read!(self, request, request.get_ref().stale, list_instances, |stale| {
            let node = &self.zone.node;
            let moves = node.moves()?;
            let mut instances = Vec::new();
            for instance in node.instances()? {
                let devices = node.devices(&instance.id)?;
                let migrating_to = moves.get(&instance.id).map(|m| m.to.as_str());
                instances.push(instance_message(&instance, &devices, migrating_to));
            }
            Ok::<_, ApiError>(InstanceList {
                instances,
                read: Some(self.read_info(stale)),
            })
        })
    }

    async fn create_pod(&self, request: Request<CreatePodRequest>) -> Result<Response<Pod>, Status> {
        write!(self, request, create_pod);
        let message = request.into_inner();
        let create = CreatePod {
            name: message.name,
            cpu_ratio: message.cpu_ratio,
            memory_ratio: message.memory_ratio,
            placement: non_empty(message.placement),
            storage: non_empty(message.storage),
            san_agent: non_empty(message.san_agent),
            workload_class: non_empty(message.workload_class),
            storage_ratio: message.storage_ratio,
            network: non_empty(message.network_mode),
            segmentation_first: message.segmentation_first,
            segmentation_last: message.segmentation_last,
        };
        let (pod, profile) = self.zone.create_pod(create).await?;
        Ok(Response::new(pod_message(&pod, &profile)))
    }

    async fn get_pod(&self, request: Request<GetPodRequest>) -> Result<Response<PodReply>, Status> {
        let name = request.get_ref().name.clone();
        read!(self, request, request.get_ref().stale, get_pod, |stale| {
            let node = &self.zone.node;
            let pod = node
                .pod(&name)?
                .ok_or_else(|| ApiError::from(Rejection::UnknownPod(name.clone())))?;
            let profile = node.pod_profile(&name)?;
            Ok::<_, ApiError>(PodReply {
                pod: Some(pod_message(&pod, &profile)),
                read: Some(self.read_info(stale)),
            })
        })
    }

    async fn list_pods(&self, request: Request<ReadRequest>) -> Result<Response<PodList>, Status> {
        read!(self, request, request.get_ref().stale, list_pods, |stale| {
            let node = &self.zone.node;
            let mut pods = Vec::new();
            for pod in node.pods()?.values() {
                pods.push(pod_message(pod, &node.pod_profile(&pod.name)?));
            }
            Ok::<_, ApiError>(PodList {
                pods,
                read: Some(self.read_info(stale)),
            })
        })
    }

    async fn create_network(
        &self,
        request: Request<CreateNetworkRequest>,
    ) -> Result<Response<Network>, Status> {
        write!(self, request, create_network);
        let message = request.into_inner();
        let network = self
            .zone
            .create_network(message.name, message.pod, &message.cidr)
            .await?;
        Ok(Response::new(network_message(&network)))
    }

    async fn delete_network(
        &self,
        request: Request<NetworkRef>,
    ) -> Result<Response<Network>, Status> {
        write!(self, request, delete_network);
        let network = self.zone.delete_network(request.into_inner().name).await?;
        Ok(Response::new(network_message(&network)))
    }

    async fn get_network(
        &self,
        request: Request<GetNetworkRequest>,
    ) -> Result<Response<NetworkReply>, Status> {
        let name = request.get_ref().name.clone();
        read!(self, request, request.get_ref().stale, get_network, |stale| {
            let network = self
                .zone
                .node
                .network(&name)?
                .ok_or_else(|| ApiError::from(Rejection::UnknownNetwork(name.clone())))?;
            Ok::<_, ApiError>(NetworkReply {
                network: Some(network_message(&network)),
                read: Some(self.read_info(stale)),
            })
        })
    }

    async fn list_networks(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<NetworkList>, Status> {
        read!(self, request, request.get_ref().stale, list_networks, |stale| {
            let networks = self.zone.node.networks()?;
            Ok::<_, ApiError>(NetworkList {
                networks: networks.iter().map(network_message).collect(),
                read: Some(self.read_info(stale)),
            })
        })
    }

    async fn list_hosts(&self, request: Request<ReadRequest>) -> Result<Response<HostList>, Status> {
        read!(self, request, request.get_ref().stale, list_hosts, |stale| {
            let hosts = self.zone.node.hosts()?;
            Ok::<_, ApiError>(HostList {
                hosts: hosts.iter().map(host_message).collect(),
                read: Some(self.read_info(stale)),
            })
        })
    }

    async fn host_domains(&self, request: Request<HostRef>) -> Result<Response<HostDomainsReply>, Status> {
        // A lagging follower may not have applied the host's registration
        // yet, so the host record is read on the leader after a read barrier.
        if !self.zone.node.is_leader() {
            return self
                .forward(request, |mut client, r| async move { client.host_domains(r).await })
                .await;
        }
        self.zone.node.read_barrier().await?;
        let host_id = request.into_inner().host;
        let host = self
            .zone
            .node
            .host(&host_id)?
            .ok_or_else(|| ApiError::from(crate::zone::command::Rejection::UnknownHost(host_id.clone())))?;
        let mut client = self.agent_client(&host.agent_endpoint)?;
        // Shorter than a client's own deadline, so a silent agent gets a
        // HOST_UNREACHABLE that names it rather than the client's timeout.
        let mut list = Request::new(ListDomainsRequest {});
        list.set_timeout(Duration::from_secs(3));
        let reply = client.list_domains(list).await.map_err(|status| {
            ApiError::HostUnreachable {
                host: host.id.clone(),
                endpoint: host.agent_endpoint.clone(),
                message: status.message().to_string(),
            }
        })?;
        let domains = reply
            .into_inner()
            .domains
            .into_iter()
            .map(|d| HostDomain {
                uuid: d.uuid,
                name: d.name,
                state: d.state,
                vcpus: d.vcpus,
                memory_mib: d.memory_mib,
            })
            .collect();
        Ok(Response::new(HostDomainsReply { host: host.id, domains }))
    }

    async fn get_key(&self, request: Request<GetKeyRequest>) -> Result<Response<KeyReply>, Status> {
        let key = request.get_ref().key.clone();
        read!(self, request, request.get_ref().stale, get_key, |stale| {
            let record = self.zone.node.key(&key)?;
            let mut reply = key_message(&key, record.as_ref());
            reply.read = Some(self.read_info(stale));
            Ok::<_, ApiError>(reply)
        })
    }

    async fn put_key(&self, request: Request<PutKeyRequest>) -> Result<Response<KeyReply>, Status> {
        write!(self, request, put_key);
        let message = request.into_inner();
        let record = self.zone.put_key(message.key.clone(), None, message.value).await?;
        Ok(Response::new(key_message(&message.key, Some(&record))))
    }

    async fn compare_and_swap_key(&self, request: Request<CompareAndSwapKeyRequest>) -> Result<Response<KeyReply>, Status> {
        write!(self, request, compare_and_swap_key);
        let message = request.into_inner();
        let record = self
            .zone
            .put_key(message.key.clone(), Some(message.expected), message.value)
            .await?;
        Ok(Response::new(key_message(&message.key, Some(&record))))
    }

    async fn zone_status(&self, request: Request<ZoneStatusRequest>) -> Result<Response<ZoneStatusReply>, Status> {
        if !self.zone.node.is_leader() && self.zone.node.leader().is_some() {
            let forwarded = self
                .forward(request, |mut client, r| async move { client.zone_status(r).await })
                .await;
            if forwarded.is_ok() {
                return forwarded;
            }
        }
        Ok(Response::new(status::zone_status(&self.zone.node)))
    }

    async fn add_replica(&self, request: Request<AddReplicaRequest>) -> Result<Response<ZoneStatusReply>, Status> {
        write!(self, request, add_replica);
        let message = request.into_inner();
        if message.node_id == 0 {
            return Err(ApiError::invalid("node_id", 0, "must be at least 1").into());
        }
        if message.addr.parse::<std::net::SocketAddr>().is_err() && !message.addr.contains(':') {
            return Err(ApiError::invalid("addr", &message.addr, "use host:port").into());
        }
        let raft = &self.zone.node.raft;
        let node = BasicNode { addr: message.addr.clone() };
        tracing::info!(node_id = message.node_id, addr = %message.addr, "adding replica as learner");
        raft.add_learner(message.node_id, node, true)
            .await
            .map_err(|e| membership_error(e, &format!("adding learner {}", message.node_id)))?;
        tracing::info!(node_id = message.node_id, "promoting learner to voter");
        let voters = std::collections::BTreeSet::from([message.node_id]);
        raft.change_membership(ChangeMembers::AddVoterIds(voters), false)
            .await
            .map_err(|e| membership_error(e, &format!("promoting {}", message.node_id)))?;
        Ok(Response::new(status::zone_status(&self.zone.node)))
    }

    async fn remove_replica(&self, request: Request<RemoveReplicaRequest>) -> Result<Response<ZoneStatusReply>, Status> {
        write!(self, request, remove_replica);
        let node_id = request.into_inner().node_id;
        let membership = self.zone.node.raft.metrics().borrow().membership_config.clone();
        let voters: Vec<u64> = membership.membership().voter_ids().collect();
        if !voters.contains(&node_id) {
            return Err(ApiError::invalid("node_id", node_id, format!("is not a voter; voters are {voters:?}")).into());
        }
        if voters.len() <= 1 {
            return Err(ApiError::invalid("node_id", node_id, "is the last voter").into());
        }
        tracing::info!(node_id, "removing replica");
        let removed = std::collections::BTreeSet::from([node_id]);
        self.zone
            .node
            .raft
            .change_membership(ChangeMembers::RemoveVoters(removed), false)
            .await
            .map_err(|e| membership_error(e, &format!("removing {node_id}")))?;
        Ok(Response::new(status::zone_status(&self.zone.node)))
    }

    async fn register_host(&self, request: Request<RegisterHostRequest>) -> Result<Response<Host>, Status> {
        write!(self, request, register_host);
        let message = request.into_inner();
        ops::validate_name("host_id", &message.host_id)?;
        if crate::client::channel(&message.agent_endpoint, Duration::from_secs(1)).is_err() {
            let reason = "use host:port where the zone leader can reach the agent";
            return Err(ApiError::invalid("agent_endpoint", &message.agent_endpoint, reason).into());
        }
        let command = Command::RegisterHost {
            id: message.host_id,
            pod: message.pod,
            libvirt_uri: message.libvirt_uri,
            agent_endpoint: message.agent_endpoint,
            cpus: message.cpus,
            memory_mib: message.memory_mib,
            disk_gib: message.disk_gib,
            boot_id: message.boot_id,
        };
        let host = self.zone.register_host(command, message.san_pool_gib).await?;
        Ok(Response::new(host_message(&host)))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        write!(self, request, heartbeat);
        let message = request.into_inner();
        let report = ops::HostReport {
            domains: message.domains.into_iter().map(|d| (d.uuid, d.state)).collect(),
            volumes: message.volumes,
            networks: message.networks,
            received: tokio::time::Instant::now(),
        };
        self.zone.heartbeat(&message.host_id, report).await?;
        Ok(Response::new(HeartbeatReply { leader_id: self.zone.node.id }))
    }

    async fn create_volume(&self, request: Request<CreateVolumeRequest>) -> Result<Response<Volume>, Status> {
        write!(self, request, create_volume);
        let message = request.into_inner();
        let volume = self
            .zone
            .create_volume(message.name, message.pod, message.size_gib, non_empty(message.host))
            .await?;
        Ok(Response::new(volume_message(&volume)))
    }

    async fn delete_volume(&self, request: Request<VolumeRef>) -> Result<Response<Volume>, Status> {
        write!(self, request, delete_volume);
        let volume = self.zone.delete_volume(&request.into_inner().name).await?;
        Ok(Response::new(volume_message(&volume)))
    }

    async fn get_volume(&self, request: Request<GetVolumeRequest>) -> Result<Response<VolumeReply>, Status> {
        let name = request.get_ref().name.clone();
        read!(self, request, request.get_ref().stale, get_volume, |stale| {
            let volume = self
                .zone
                .node
                .volume(&name)?
                .ok_or_else(|| ApiError::from(Rejection::UnknownVolume(name.clone())))?;
            Ok::<_, ApiError>(VolumeReply {
                volume: Some(volume_message(&volume)),
                read: Some(self.read_info(stale)),
            })
        })
    }

    async fn list_volumes(&self, request: Request<ReadRequest>) -> Result<Response<VolumeList>, Status> {
        read!(self, request, request.get_ref().stale, list_volumes, |stale| {
            let volumes = self.zone.node.volumes()?;
            Ok::<_, ApiError>(VolumeList {
                volumes: volumes.iter().map(volume_message).collect(),
                read: Some(self.read_info(stale)),
            })
        })
    }

    async fn attach_volume(&self, request: Request<AttachVolumeRequest>) -> Result<Response<DeviceChangeReply>, Status> {
        write!(self, request, attach_volume);
        let message = request.into_inner();
        let change = self.zone.attach_volume(&message.volume, &message.instance).await?;
        Ok(Response::new(self.device_reply(change)?))
    }

    async fn detach_volume(&self, request: Request<VolumeRef>) -> Result<Response<DeviceChangeReply>, Status> {
        write!(self, request, detach_volume);
        let change = self.zone.detach_volume(&request.into_inner().name).await?;
        Ok(Response::new(self.device_reply(change)?))
    }

    async fn attach_nic(&self, request: Request<NicRequest>) -> Result<Response<DeviceChangeReply>, Status> {
        write!(self, request, attach_nic);
        let message = request.into_inner();
        let change = self.zone.attach_nic(&message.instance, &message.network).await?;
        Ok(Response::new(self.device_reply(change)?))
    }

    async fn detach_nic(&self, request: Request<NicRequest>) -> Result<Response<DeviceChangeReply>, Status> {
        write!(self, request, detach_nic);
        let message = request.into_inner();
        let change = self.zone.detach_nic(&message.instance, &message.network).await?;
        Ok(Response::new(self.device_reply(change)?))
    }

    async fn migrate_instance(&self, request: Request<MigrateInstanceRequest>) -> Result<Response<Instance>, Status> {
        write!(self, request, migrate_instance);
        let message = request.into_inner();
        let instance = self.zone.migrate_instance(&message.instance, non_empty(message.to_host)).await?;
        Ok(Response::new(self.instance_reply(&instance)?))
    }

    async fn drain_host(&self, request: Request<HostRef>) -> Result<Response<DrainReply>, Status> {
        write!(self, request, drain_host);
        let (host, migrating) = self.zone.drain_host(&request.into_inner().host).await?;
        let mut replies = Vec::with_capacity(migrating.len());
        for instance in &migrating {
            replies.push(self.instance_reply(instance)?);
        }
        Ok(Response::new(DrainReply {
            host: Some(host_message(&host)),
            migrating: replies,
        }))
    }

    async fn undrain_host(&self, request: Request<HostRef>) -> Result<Response<Host>, Status> {
        write!(self, request, undrain_host);
        let host = self.zone.undrain_host(&request.into_inner().host).await?;
        Ok(Response::new(host_message(&host)))
    }

    async fn zone_drift(&self, request: Request<ZoneDriftRequest>) -> Result<Response<ZoneDriftReply>, Status> {
        // Only the leader receives heartbeats, so only it can compare.
        write!(self, request, zone_drift);
        let report = self.zone.drift()?;
        Ok(Response::new(drift_message(&report)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::error::ForwardToLeader;

    /// Regression: ccs-jepsen's membership nemesis saw RemoveReplica fail with
    /// INTERNAL when the leader changed while the change was in flight, so
    /// clients did not retry a change that may well have been committed.
    #[test]
    fn leader_change_during_membership_change() {
        let forward = ForwardToLeader {
            leader_id: Some(3),
            leader_node: Some(BasicNode { addr: "10.0.0.3:7000".into() }),
        };
        let error = RaftError::APIError(ClientWriteError::ForwardToLeader(forward));
        let status = tonic::Status::from(membership_error(error, "removing 2"));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(crate::client::reason(&status), Some("LEADER_CHANGED"));
    }

    /// A membership change refused because another is in progress did
    /// nothing, so it is reported as retryable rather than internal.
    #[test]
    fn concurrent_membership_change_is_retryable() {
        let in_progress = openraft::error::InProgress {
            committed: None,
            membership_log_id: None,
        };
        let error = RaftError::APIError(ClientWriteError::ChangeMembershipError(in_progress.into()));
        let status = tonic::Status::from(membership_error(error, "adding learner 4"));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(crate::client::reason(&status), Some("MEMBERSHIP_CHANGING"));
    }
}
