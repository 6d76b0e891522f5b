//! The storage and network part of `ccs dev --demo`, run after the trace
//! replay: a tenant network in each pod, a DAS volume that cannot attach to
//! an instance on another host, and a SAN instance that migrates with its
//! volume. Each step prints what it did. The part fails at the first step
//! that does not behave so, and deletes what it created either way.
//!
//! Names and request ids carry a tag of the run, so a second run on the same
//! cloud never collides with objects that an interrupted run left behind.
//! This module neither starts nor stops the zone.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use tokio::time::Instant;
use tonic::Code;

use crate::cli::{call, CallError};
use crate::client::{reason, ZoneConnector};
use crate::proto::zone::*;

/// How long one step waits for an instance, volume or network to settle.
const WAIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Period of the reads while waiting.
const POLL_PERIOD: Duration = Duration::from_millis(250);
/// Size of every volume the walk-through creates, in GiB.
const VOLUME_GIB: u64 = 10;
/// Root disk of every instance the walk-through creates, in GiB.
const ROOT_DISK_GIB: u64 = 10;
/// Subnets of the two networks. The zone leases NIC addresses from them;
/// they reach no real network.
const DAS_CIDR: &str = "10.201.0.0/24";
const SAN_CIDR: &str = "10.202.0.0/24";
/// Reason code of the zone's rejection of a DAS volume attach to an
/// instance on another host.
const HOST_MISMATCH: &str = "VOLUME_HOST_MISMATCH";

/// A pod and two of its hosts that are up, sorted by id.
struct PodHosts {
    pod: String,
    hosts: [String; 2],
}

/// Runs the walk-through, then deletes what it created.
///
/// The replay's instances are deleted first so that a full pod cannot
/// reject the walk-through's instances for capacity.
pub async fn run(connector: &ZoneConnector) -> anyhow::Result<()> {
    println!("storage and network walk-through");
    let freed = crate::demo::delete_replay_instances(connector).await?;
    if freed > 0 {
        println!("deleted the {freed} replay instances to free capacity");
    }
    let mut walk = Walkthrough::new(connector);
    let outcome = walk.steps().await;
    let cleanup = walk.clean_up().await;
    match (outcome, cleanup) {
        (Ok(()), cleanup) => cleanup,
        (Err(error), Ok(())) => Err(error),
        (Err(error), Err(cleanup)) => {
            tracing::error!(error = %format!("{cleanup:#}"), "demo cleanup failed");
            Err(error)
        }
    }
}

struct Walkthrough<'a> {
    connector: &'a ZoneConnector,
    /// Distinguishes this run's names and request ids from earlier runs'.
    tag: String,
    /// Number of the last printed step.
    step: usize,
    /// Names of what this run created, deleted by `clean_up`.
    instances: Vec<String>,
    volumes: Vec<String>,
    networks: Vec<String>,
}

impl<'a> Walkthrough<'a> {
    fn new(connector: &'a ZoneConnector) -> Walkthrough<'a> {
        let seconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Walkthrough {
            connector,
            tag: seconds.to_string(),
            step: 0,
            instances: Vec::new(),
            volumes: Vec::new(),
            networks: Vec::new(),
        }
    }

    fn print_step(&mut self, text: impl fmt::Display) {
        self.step += 1;
        println!("{:>3}. {text}", self.step);
    }

    async fn steps(&mut self) -> anyhow::Result<()> {
        let (das, san) = self.find_pods().await?;
        let das_network = self.create_network(&das.pod, "das", DAS_CIDR).await?;
        let san_network = self.create_network(&san.pod, "san", SAN_CIDR).await?;
        self.das_steps(&das, &das_network).await?;
        self.san_steps(&san, &san_network).await
    }

    /// Finds a DAS pod and a SAN pod with two hosts up each.
    async fn find_pods(&mut self) -> anyhow::Result<(PodHosts, PodHosts)> {
        let read = ReadRequest { stale: false };
        let pods = call(self.connector, read, |mut c, r| async move {
            c.list_pods(r).await
        })
        .await?
        .pods;
        let hosts = call(self.connector, read, |mut c, r| async move {
            c.list_hosts(r).await
        })
        .await?
        .hosts;
        let pick = |storage: &str| {
            pods.iter()
                .filter(|pod| pod.storage == storage)
                .find_map(|pod| {
                    let mut up: Vec<&str> = hosts
                        .iter()
                        .filter(|h| h.pod == pod.name && h.health == "up")
                        .map(|h| h.id.as_str())
                        .collect();
                    up.sort_unstable();
                    match up.as_slice() {
                        [first, second, ..] => Some(PodHosts {
                            pod: pod.name.clone(),
                            hosts: [first.to_string(), second.to_string()],
                        }),
                        _ => None,
                    }
                })
        };
        let (Some(das), Some(san)) = (pick("das"), pick("san")) else {
            bail!(
                "the walk-through needs a DAS pod and a SAN pod with 2 hosts up each; \
                 check `ccs pod list` and `ccs host list`"
            );
        };
        self.print_step(format!(
            "using DAS pod {} (hosts {}, {}) and SAN pod {} (hosts {}, {})",
            das.pod, das.hosts[0], das.hosts[1], san.pod, san.hosts[0], san.hosts[1]
        ));
        Ok((das, san))
    }

    async fn create_network(
        &mut self,
        pod: &str,
        label: &str,
        cidr: &str,
    ) -> anyhow::Result<String> {
        let name = format!("demo-{label}-net-{}", self.tag);
        self.networks.push(name.clone());
        let request = CreateNetworkRequest {
            name: name.clone(),
            pod: pod.to_string(),
            cidr: cidr.to_string(),
        };
        let network = call(self.connector, request, |mut c, r| async move {
            c.create_network(r).await
        })
        .await?;
        let id_name = if network.mode == "vxlan" {
            "VNI"
        } else {
            "VLAN id"
        };
        self.print_step(format!(
            "created network {name} in pod {pod}: {id_name} {}, CIDR {}",
            network.segmentation_id, network.cidr
        ));
        Ok(name)
    }

    /// Creates a DAS volume and an instance with it on one host and a second
    /// instance on the other host, then tries to attach the first volume to it.
    async fn das_steps(&mut self, das: &PodHosts, network: &str) -> anyhow::Result<()> {
        let [first_host, second_host] = &das.hosts;
        let volume = self
            .create_volume("das-a", &das.pod, Some(first_host.as_str()))
            .await?;
        let first = self
            .create_instance("das-a", &das.pod, &volume, Some(network))
            .await?;
        expect_host(&first, first_host)?;
        let nic = first
            .nics
            .iter()
            .find(|nic| nic.network == network && !nic.ip.is_empty())
            .ok_or_else(|| {
                anyhow!(
                    "instance {} has no NIC with an address on {network}",
                    first.name
                )
            })?;
        self.print_step(format!(
            "instance {} runs on host {first_host} with volume {} and a NIC on {network}: \
             IP {}, MAC {}",
            first.name, volume.name, nic.ip, nic.mac
        ));

        let other_volume = self
            .create_volume("das-b", &das.pod, Some(second_host.as_str()))
            .await?;
        let second = self
            .create_instance("das-b", &das.pod, &other_volume, None)
            .await?;
        expect_host(&second, second_host)?;
        self.print_step(format!(
            "instance {} runs on host {second_host} with volume {}",
            second.name, other_volume.name
        ));

        let request = VolumeRef {
            name: volume.id.clone(),
        };
        let detached = call(self.connector, request, |mut c, r| async move {
            c.detach_volume(r).await
        })
        .await?;
        self.print_step(format!(
            "detached {} from {}: applies {}: {}",
            volume.name, first.name, detached.applies, detached.message
        ));
        // The volume stays reserved ("detaching") until host-1's agent
        // confirms a definition without it.
        self.wait_available(&volume.name).await?;
        self.attach_across_hosts(&volume, &second).await
    }

    /// Attaches a DAS volume to an instance on another host and fails
    /// unless the zone rejects it.
    async fn attach_across_hosts(
        &mut self,
        volume: &Volume,
        other: &Instance,
    ) -> anyhow::Result<()> {
        let request = AttachVolumeRequest {
            volume: volume.id.clone(),
            instance: other.id.clone(),
        };
        let attempt = call(self.connector, request, |mut c, r| async move {
            c.attach_volume(r).await
        })
        .await;
        match attempt {
            Ok(_) => bail!(
                "the zone attached DAS volume {} (host {}) to instance {} on host {}, \
                 but a DAS volume must attach only to instances on its own host",
                volume.name,
                volume.host,
                other.name,
                other.host
            ),
            Err(CallError(status)) if reason(&status) == Some(HOST_MISMATCH) => {
                self.print_step(format!(
                    "attaching {} (host {}) to {} (host {}) is rejected: {} ({HOST_MISMATCH})",
                    volume.name,
                    volume.host,
                    other.name,
                    other.host,
                    status.message()
                ));
                Ok(())
            }
            Err(error) => Err(anyhow!(
                "attaching {} to {} failed, but not with {HOST_MISMATCH}: {error}",
                volume.name,
                other.name
            )),
        }
    }

    /// Creates a SAN volume and an instance with it, then migrates the
    /// instance to the other host.
    async fn san_steps(&mut self, san: &PodHosts, network: &str) -> anyhow::Result<()> {
        let volume = self.create_volume("san", &san.pod, None).await?;
        let instance = self
            .create_instance("san", &san.pod, &volume, Some(network))
            .await?;
        let source = instance.host.clone();
        let target = if source == san.hosts[0] {
            &san.hosts[1]
        } else {
            &san.hosts[0]
        };
        self.print_step(format!(
            "instance {} runs on host {source} with SAN volume {}",
            instance.name, volume.name
        ));

        let request = MigrateInstanceRequest {
            instance: instance.id.clone(),
            to_host: target.clone(),
        };
        call(self.connector, request, |mut c, r| async move {
            c.migrate_instance(r).await
        })
        .await?;
        self.print_step(format!(
            "migrating {} from host {source} to host {target}",
            instance.name
        ));

        let ended = self.wait_instance(&instance.id, "end its migration", |i| {
            i.migrating_to.is_empty()
        });
        let moved = ended.await?;
        if moved.host != *target {
            bail!(
                "instance {} is on host {} after its migration, not on {target} (last error: {})",
                moved.name,
                moved.host,
                or_none(&moved.last_error)
            );
        }
        let running = self.wait_instance(&instance.id, "run", |i| i.observed_state == "running");
        let moved = running.await?;
        if !moved.volumes.contains(&volume.id) {
            bail!(
                "instance {} lost volume {} in its migration: it has volumes {:?}",
                moved.name,
                volume.id,
                moved.volumes
            );
        }
        self.print_step(format!(
            "instance {} runs on host {target} with volume {} attached",
            moved.name, volume.name
        ));
        Ok(())
    }

    /// Waits until a volume is available.
    async fn wait_available(&self, name: &str) -> anyhow::Result<Volume> {
        poll(&format!("volume {name} to become available"), async || {
            let volume = self.volume(name).await?;
            Ok(match volume {
                Some(v) if v.state == "available" => Ok(v),
                Some(v) => Err(format!(
                    "state {}, last error {}",
                    v.state,
                    or_none(&v.last_error)
                )),
                None => Err("not found".to_string()),
            })
        })
        .await
    }

    /// Creates a volume and waits until it is available.
    async fn create_volume(
        &mut self,
        label: &str,
        pod: &str,
        host: Option<&str>,
    ) -> anyhow::Result<Volume> {
        let name = format!("demo-{label}-vol-{}", self.tag);
        self.volumes.push(name.clone());
        let request = CreateVolumeRequest {
            name: name.clone(),
            pod: pod.to_string(),
            size_gib: VOLUME_GIB,
            host: host.unwrap_or_default().to_string(),
        };
        call(self.connector, request, |mut c, r| async move {
            c.create_volume(r).await
        })
        .await?;
        let volume = self.wait_available(&name).await?;
        if let Some(host) = host.filter(|host| *host != volume.host) {
            bail!(
                "volume {name} is on host {}, not on the requested host {host}",
                volume.host
            );
        }
        self.print_step(format!(
            "created {} volume {name} of {VOLUME_GIB} GiB on host {}",
            volume.pool, volume.host
        ));
        Ok(volume)
    }

    /// Creates a 1-vCPU instance with `volume` and an optional NIC, and
    /// waits until it runs.
    async fn create_instance(
        &mut self,
        label: &str,
        pod: &str,
        volume: &Volume,
        network: Option<&str>,
    ) -> anyhow::Result<Instance> {
        let name = format!("demo-{label}-vm-{}", self.tag);
        self.instances.push(name.clone());
        let request = CreateInstanceRequest {
            name: name.clone(),
            vcpus: 1,
            memory_mib: 512,
            disk_gib: ROOT_DISK_GIB,
            pod: pod.to_string(),
            request_id: format!("demo-{}-{label}", self.tag),
            volumes: vec![volume.id.clone()],
            networks: network.map(str::to_string).into_iter().collect(),
        };
        let instance = call(self.connector, request, |mut c, r| async move {
            c.create_instance(r).await
        })
        .await?;
        self.wait_instance(&instance.id, "run", |i| i.observed_state == "running")
            .await
    }

    /// Polls an instance until `done` accepts it.
    async fn wait_instance(
        &self,
        id: &str,
        condition: &str,
        done: impl Fn(&Instance) -> bool,
    ) -> anyhow::Result<Instance> {
        poll(&format!("instance {id} to {condition}"), async || {
            let instance = self.instance(id).await?;
            Ok(match instance {
                Some(i) if done(&i) => Ok(i),
                Some(i) => Err(format!(
                    "host {}, observed {}, migrating to {}, last error {}",
                    i.host,
                    i.observed_state,
                    or_none(&i.migrating_to),
                    or_none(&i.last_error)
                )),
                None => Err("not found".to_string()),
            })
        })
        .await
    }

    async fn instance(&self, name: &str) -> anyhow::Result<Option<Instance>> {
        let request = GetInstanceRequest {
            name: name.to_string(),
            stale: false,
        };
        let reply = call(self.connector, request, |mut c, r| async move {
            c.get_instance(r).await
        });
        Ok(found(reply.await)?.and_then(|reply| reply.instance))
    }

    async fn volume(&self, name: &str) -> anyhow::Result<Option<Volume>> {
        let request = GetVolumeRequest {
            name: name.to_string(),
            stale: false,
        };
        let reply = call(self.connector, request, |mut c, r| async move {
            c.get_volume(r).await
        });
        Ok(found(reply.await)?.and_then(|reply| reply.volume))
    }

    async fn network(&self, name: &str) -> anyhow::Result<Option<Network>> {
        let request = GetNetworkRequest {
            name: name.to_string(),
            stale: false,
        };
        let reply = call(self.connector, request, |mut c, r| async move {
            c.get_network(r).await
        });
        Ok(found(reply.await)?.and_then(|reply| reply.network))
    }

    /// Deletes the instances, then the volumes, then the networks this run
    /// created, waiting for each group to be gone because the next one
    /// depends on it. Returns the first failure after trying everything.
    async fn clean_up(&mut self) -> anyhow::Result<()> {
        let mut failures: Vec<anyhow::Error> = Vec::new();
        for name in self.instances.clone() {
            let request = InstanceRef { name: name.clone() };
            let deleted = call(self.connector, request, |mut c, r| async move {
                c.delete_instance(r).await
            });
            failures.extend(not_found_is_gone(deleted.await, "instance", &name).err());
        }
        for name in self.instances.clone() {
            let condition = format!("instance {name} to be deleted");
            let deleted = poll(&condition, async || {
                Ok(self
                    .instance(&name)
                    .await?
                    .map_or(Ok(()), |i| Err(i.observed_state)))
            });
            failures.extend(deleted.await.err());
        }
        for name in self.volumes.clone() {
            let request = VolumeRef { name: name.clone() };
            let deleted = call(self.connector, request, |mut c, r| async move {
                c.delete_volume(r).await
            });
            failures.extend(not_found_is_gone(deleted.await, "volume", &name).err());
        }
        for name in self.volumes.clone() {
            let condition = format!("volume {name} to be deleted");
            let deleted = poll(&condition, async || {
                Ok(self.volume(&name).await?.map_or(Ok(()), |v| Err(v.state)))
            });
            failures.extend(deleted.await.err());
        }
        for name in self.networks.clone() {
            let request = NetworkRef { name: name.clone() };
            let deleted = call(self.connector, request, |mut c, r| async move {
                c.delete_network(r).await
            });
            failures.extend(not_found_is_gone(deleted.await, "network", &name).err());
        }
        for name in self.networks.clone() {
            let condition = format!("network {name} to be deleted");
            let deleted = poll(&condition, async || {
                Ok(self.network(&name).await?.map_or(Ok(()), |n| Err(n.state)))
            });
            failures.extend(deleted.await.err());
        }
        let (instances, volumes, networks) = (
            self.instances.len(),
            self.volumes.len(),
            self.networks.len(),
        );
        match failures.into_iter().next() {
            None => {
                self.print_step(format!(
                    "deleted the {instances} instances, {volumes} volumes and {networks} \
                     networks of the walk-through"
                ));
                Ok(())
            }
            Some(error) => Err(error.context("cleaning up the walk-through failed")),
        }
    }
}

/// Returns a read's reply, or `None` when the object does not exist.
fn found<T>(reply: Result<T, CallError>) -> anyhow::Result<Option<T>> {
    match reply {
        Ok(reply) => Ok(Some(reply)),
        Err(CallError(status)) if status.code() == Code::NotFound => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Accepts a delete that succeeded or found nothing to delete.
fn not_found_is_gone<T>(
    deleted: Result<T, CallError>,
    kind: &str,
    name: &str,
) -> anyhow::Result<()> {
    match found(deleted) {
        Ok(_) => Ok(()),
        Err(error) => Err(error.context(format!("deleting {kind} {name} failed"))),
    }
}

/// Polls `probe` until it returns `Ok(value)`, for up to `WAIT_TIMEOUT`.
/// An `Err(text)` from the probe describes the state seen so far; the
/// timeout error quotes the last one.
async fn poll<T>(
    condition: &str,
    mut probe: impl AsyncFnMut() -> anyhow::Result<Result<T, String>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        let last = match probe().await? {
            Ok(value) => return Ok(value),
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            bail!("timed out after {WAIT_TIMEOUT:?} waiting for {condition}; last seen: {last}");
        }
        tokio::time::sleep(POLL_PERIOD).await;
    }
}

/// Fails unless the zone placed `instance` on `host`.
fn expect_host(instance: &Instance, host: &str) -> anyhow::Result<()> {
    if instance.host != host {
        bail!(
            "instance {} was placed on host {}, but its DAS volume is on host {host}",
            instance.name,
            instance.host
        );
    }
    Ok(())
}

fn or_none(text: &str) -> &str {
    if text.is_empty() {
        "none"
    } else {
        text
    }
}
