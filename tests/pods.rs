//! Integration tests of pods: volumes in DAS and SAN pods, NICs, migration
//! and drain, host failure with and without fencing, leader failover in the
//! middle of device and network changes, and drift. Controllers and agents
//! run as `ccs` processes on loopback, the agents on libvirt's test driver.
//! Most tests use the fixture's storage layout (`common::PodLayout`): host-1
//! and host-2 form a DAS pod, and host-3 to host-5 a SAN pod.
//!
//! Run them one at a time: `cargo test --test pods -- --test-threads 1`.
//! Each starts eight processes, and host-failure tests measure timings that
//! a busy machine would stretch.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use ccs::client::{reason, ZoneConnector};
use ccs::proto::agent::agent_client::AgentClient;
use ccs::proto::agent::{LeaderId, Order, OrderAction, OrderResult};
use ccs::proto::zone::{
    AttachVolumeRequest, CreateInstanceRequest, CreateNetworkRequest, CreateVolumeRequest,
    DeviceChangeReply, DrainReply, GetInstanceRequest, GetVolumeRequest, Host, HostRef, Instance,
    MigrateInstanceRequest, Network, ReadRequest, Volume, VolumeRef, ZoneDriftReply,
    ZoneDriftRequest,
};
use tokio::time::Instant;
use tonic::{Code, Status};

use common::*;

/// The hosts of the SAN pod in the storage layout.
const SAN_HOSTS: [&str; 3] = ["host-3", "host-4", "host-5"];
/// How long an instance, volume or migration may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(40);

/// Volumes and NICs in both pod types: a DAS volume attaches only on its
/// host, a SAN volume on any host of its pod, and a deleted volume returns
/// its space.
///
/// 1. Start 3 controllers and the storage layout.
/// 2. DAS: create network "das-net" and volumes "das-vol-1" on host-1 and
///    "das-vol-2" on host-2; host-1's used disk grows by the volume's size.
/// 3. Create "das-a" with das-vol-1 and "das-b" with das-vol-2, each with a
///    NIC on das-net: each runs on its volume's host, lists its volume, and
///    has a NIC whose address is a distinct host address of the CIDR.
/// 4. Create "das-vol-3" on host-1: attaching it to das-b (host-2) fails
///    with FAILED_PRECONDITION, reason VOLUME_HOST_MISMATCH.
/// 5. Attach it to the running das-a: accepted, applying at "next start".
/// 6. Deleting it while attached fails with IN_USE.
/// 7. Detach and delete it: the volume disappears and host-1's used disk is
///    back to its value before das-vol-3.
/// 8. SAN: create network "san-net" and volume "san-vol" (in the shared
///    pool, fronted by host-3), "san-a" with san-vol and "san-b" without,
///    both with a NIC; they run on different hosts.
/// 9. Detach san-vol from san-a and attach it to san-b on the other host.
/// 10. ZoneDrift reports nothing: every host has the volumes, networks and
///     domains the zone expects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle_das_and_san() {
    let cluster = Cluster::start(storage_options()).await;
    let connector = cluster.connector();
    let zone = &connector;

    // Step 2.
    create_network(zone, "das-net", DAS_POD, "10.10.0.0/24")
        .await
        .unwrap_or_else(|s| panic!("creating network das-net failed: {s:?}"));
    let host_1_before = host(zone, "host-1").await.used_disk_gib;
    let das_vol_1 = create_available_volume(zone, "das-vol-1", DAS_POD, 10, "host-1").await;
    let das_vol_2 = create_available_volume(zone, "das-vol-2", DAS_POD, 10, "host-2").await;
    assert_eq!(das_vol_1.pool, "local", "{das_vol_1:?}");
    assert_eq!(das_vol_1.host, "host-1", "{das_vol_1:?}");
    assert_eq!(
        host(zone, "host-1").await.used_disk_gib,
        host_1_before + 10,
        "a 10 GiB DAS volume on host-1 should add 10 GiB to its used disk"
    );

    // Step 3.
    let das_a = instance_request("das-a", DAS_POD, &["das-vol-1"], &["das-net"]);
    let das_b = instance_request("das-b", DAS_POD, &["das-vol-2"], &["das-net"]);
    create(zone, &das_a).await;
    create(zone, &das_b).await;
    let das_a = wait_settled(zone, "das-a").await;
    let das_b = wait_settled(zone, "das-b").await;
    assert_eq!(das_a.host, "host-1", "das-a should run on its volume's host");
    assert_eq!(das_b.host, "host-2", "das-b should run on its volume's host");
    assert_eq!(das_a.volumes, [das_vol_1.id.clone()], "volumes of das-a");
    assert_eq!(das_b.volumes, [das_vol_2.id.clone()], "volumes of das-b");
    assert_eq!(
        get_volume(zone, "das-vol-1").await.unwrap().attached_to,
        das_a.id,
        "das-vol-1 should be attached to das-a"
    );
    assert_distinct_leases(&[&das_a, &das_b], "das-net", "10.10.0.0/24");

    // Step 4.
    let host_1_before_vol_3 = host(zone, "host-1").await.used_disk_gib;
    let das_vol_3 = create_available_volume(zone, "das-vol-3", DAS_POD, 20, "host-1").await;
    assert_eq!(
        host(zone, "host-1").await.used_disk_gib,
        host_1_before_vol_3 + 20,
        "a 20 GiB DAS volume on host-1 should add 20 GiB to its used disk"
    );
    let across = attach_volume(zone, "das-vol-3", "das-b")
        .await
        .expect_err("a DAS volume of host-1 was attached to an instance on host-2");
    assert_rejected(
        &across,
        Code::FailedPrecondition,
        "VOLUME_HOST_MISMATCH",
        "attach across hosts",
    );
    assert_eq!(
        get_volume(zone, "das-vol-3").await.unwrap().attached_to,
        "",
        "the rejected attach left das-vol-3 attached"
    );

    // Step 5.
    let attached = attach_volume(zone, "das-vol-3", "das-a")
        .await
        .unwrap_or_else(|s| panic!("attaching das-vol-3 to das-a failed: {s:?}"));
    assert_eq!(
        attached.applies, "next start",
        "the test driver has no hot-plug, so the change should wait for the next start: {attached:?}"
    );
    assert!(
        !attached.message.is_empty(),
        "the reply should explain when the change applies"
    );
    let holder = attached.instance.expect("a device change returns the instance");
    assert!(
        holder.volumes.contains(&das_vol_3.id),
        "das-a should list das-vol-3 after the attach: {:?}",
        holder.volumes
    );
    assert_eq!(
        get_volume(zone, "das-vol-3").await.unwrap().attached_to,
        das_a.id
    );

    // Step 6.
    let in_use = delete_volume(zone, "das-vol-3")
        .await
        .expect_err("an attached volume was deleted");
    assert_rejected(
        &in_use,
        Code::FailedPrecondition,
        "IN_USE",
        "delete of an attached volume",
    );

    // Step 7.
    let detached = detach_volume(zone, "das-vol-3")
        .await
        .unwrap_or_else(|s| panic!("detaching das-vol-3 failed: {s:?}"));
    let holder = detached.instance.expect("a device change returns the instance");
    assert!(
        !holder.volumes.contains(&das_vol_3.id),
        "das-a still lists das-vol-3 after the detach: {:?}",
        holder.volumes
    );
    // The volume stays reserved for das-a until host-1's agent confirms a
    // definition without it.
    let freed = wait_volume_available(zone, "das-vol-3").await;
    assert_eq!(freed.attached_to, "", "{freed:?}");
    delete_volume(zone, "das-vol-3")
        .await
        .unwrap_or_else(|s| panic!("deleting the detached das-vol-3 failed: {s:?}"));
    wait_volume_gone(zone, "das-vol-3").await;
    assert_eq!(
        host(zone, "host-1").await.used_disk_gib,
        host_1_before_vol_3,
        "deleting das-vol-3 should return its 20 GiB to host-1"
    );

    // Step 8.
    create_network(zone, "san-net", SAN_POD, "10.20.0.0/24")
        .await
        .unwrap_or_else(|s| panic!("creating network san-net failed: {s:?}"));
    let san_vol = create_available_volume(zone, "san-vol", SAN_POD, 50, "").await;
    assert_eq!(san_vol.pool, "san", "{san_vol:?}");
    assert_eq!(
        san_vol.host, SAN_AGENT,
        "a SAN volume lives in the pool its SAN agent fronts"
    );
    create(zone, &instance_request("san-a", SAN_POD, &["san-vol"], &["san-net"])).await;
    create(zone, &instance_request("san-b", SAN_POD, &[], &["san-net"])).await;
    let san_a = wait_settled(zone, "san-a").await;
    let san_b = wait_settled(zone, "san-b").await;
    assert_ne!(
        san_a.host, san_b.host,
        "spread placement put san-a and san-b on one host of a 3-host pod"
    );
    assert_eq!(san_a.volumes, [san_vol.id.clone()], "volumes of san-a");
    assert_distinct_leases(&[&san_a, &san_b], "san-net", "10.20.0.0/24");

    // Step 9.
    detach_volume(zone, "san-vol")
        .await
        .unwrap_or_else(|s| panic!("detaching san-vol from san-a failed: {s:?}"));
    // Until san-a's host confirms a definition without the volume, it stays
    // reserved; an attach that races that confirmation may go either way.
    let early = attach_volume(zone, "san-vol", "san-b").await;
    let moved = match early {
        Ok(reply) => Ok(reply),
        Err(status) => {
            assert_rejected(&status, Code::FailedPrecondition, "WRONG_STATE", "attach of a detaching volume");
            wait_volume_available(zone, "san-vol").await;
            attach_volume(zone, "san-vol", "san-b").await
        }
    };
    let moved = moved
        .unwrap_or_else(|s| {
            panic!(
                "attaching san-vol, detached from san-a on {}, to san-b on {} failed: {s:?}",
                san_a.host, san_b.host
            )
        });
    let holder = moved.instance.expect("a device change returns the instance");
    assert_eq!(holder.volumes, [san_vol.id.clone()], "volumes of san-b");
    assert_eq!(get_volume(zone, "san-vol").await.unwrap().attached_to, san_b.id);
    let san_a = get_instance(zone, "san-a").await.unwrap();
    assert!(
        san_a.volumes.is_empty(),
        "san-a still lists volumes after the detach: {:?}",
        san_a.volumes
    );

    // Step 10.
    wait_for(
        "ZoneDrift to report every host and no drift",
        Duration::from_secs(30),
        async || {
            let report = drift(zone).await.map_err(|s| format!("ZoneDrift failed: {s:?}"))?;
            if report.items.is_empty() && report.hosts_checked == 5 {
                Ok(())
            } else {
                Err(format!("{report:?}"))
            }
        },
    )
    .await;
}

/// Migration in a SAN pod, to a named host and to the scheduler's choice,
/// then a drain that moves every instance off a host.
///
/// 1. Start 3 controllers and the storage layout; create "san-1" to "san-3"
///    in the SAN pod (spread: one per host) and wait until they run.
/// 2. Migrate san-2 with no destination: the reply names a host other than
///    its own, and the migration ends there with the instance running.
///    HostDomains lists the domain running on the destination and not on
///    the source.
/// 3. Migrate another instance to san-3's host by name, with the same
///    checks: that host now has two instances.
/// 4. Drain that host: the reply says "draining" and lists both; both end
///    running on other hosts, which HostDomains confirms, and the host
///    stays "draining".
/// 5. Undrain it: "up".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn san_migration_and_drain() {
    let cluster = Cluster::start(storage_options()).await;
    let connector = cluster.connector();
    let zone = &connector;

    // Step 1.
    for name in ["san-1", "san-2", "san-3"] {
        create(zone, &instance_request(name, SAN_POD, &[], &[])).await;
    }
    for name in ["san-1", "san-2", "san-3"] {
        wait_settled(zone, name).await;
    }

    // Step 2.
    let before = get_instance(zone, "san-2").await.unwrap();
    let started = migrate(zone, "san-2", "")
        .await
        .unwrap_or_else(|s| panic!("migrating san-2 with no destination failed: {s:?}"));
    let chosen = started.migrating_to.clone();
    assert!(
        SAN_HOSTS.contains(&chosen.as_str()) && chosen != before.host,
        "the scheduler chose {chosen:?} for san-2 on {}; expected another SAN host",
        before.host
    );
    wait_on_host(zone, "san-2", &chosen).await;
    assert_domain_moved(zone, &before, &chosen).await;

    // Step 3.
    let target = get_instance(zone, "san-3").await.unwrap().host;
    let mut mover = None;
    for name in ["san-1", "san-2"] {
        let instance = get_instance(zone, name).await.unwrap();
        if instance.host != target {
            mover = Some(instance);
            break;
        }
    }
    let mover = mover.unwrap_or_else(|| {
        panic!("san-1, san-2 and san-3 all run on {target}, so nothing can move there")
    });
    let started = migrate(zone, &mover.name, &target)
        .await
        .unwrap_or_else(|s| panic!("migrating {} to {target} failed: {s:?}", mover.name));
    assert_eq!(started.migrating_to, target, "{started:?}");
    wait_on_host(zone, &mover.name, &target).await;
    assert_domain_moved(zone, &mover, &target).await;

    // Step 4.
    let on_target: BTreeSet<String> = list_instances(zone)
        .await
        .into_iter()
        .filter(|i| i.host == target)
        .map(|i| i.name)
        .collect();
    assert_eq!(
        on_target.len(),
        2,
        "{target} should hold two instances: {on_target:?}"
    );
    let drained = drain(zone, &target)
        .await
        .unwrap_or_else(|s| panic!("draining SAN host {target} failed: {s:?}"));
    let drained_host = drained.host.clone().expect("DrainReply names the host");
    assert_eq!(drained_host.health, "draining", "{drained:?}");
    let listed: BTreeSet<String> = drained.migrating.iter().map(|i| i.name.clone()).collect();
    assert_eq!(
        listed, on_target,
        "DrainReply should list the instances leaving {target}"
    );
    for name in &on_target {
        let instance = wait_settled(zone, name).await;
        assert_ne!(instance.host, target, "{name} is still on drained {target}");
        assert!(
            SAN_HOSTS.contains(&instance.host.as_str()),
            "{name} left the SAN pod: {instance:?}"
        );
        let state = domain_state(zone, &instance.host, &instance.id).await;
        assert_eq!(
            state.as_deref(),
            Some("running"),
            "{name}'s domain on {}",
            instance.host
        );
    }
    let left = host_domains(zone, &target).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        left.is_empty(),
        "drained {target} still has domains: {left:?}"
    );
    assert_eq!(host(zone, &target).await.health, "draining");

    // Step 5.
    let undrained = undrain(zone, &target)
        .await
        .unwrap_or_else(|s| panic!("undraining {target} failed: {s:?}"));
    assert_eq!(undrained.health, "up", "{undrained:?}");
    assert_eq!(host(zone, &target).await.health, "up");
}

/// A DAS host with instances cannot be drained, and the error names them.
///
/// 1. Start 3 controllers and the storage layout; create 4 instances in
///    the DAS pod (spread: two per host) and wait until they run.
/// 2. Drain host-1: FAILED_PRECONDITION with reason HOST_NOT_DRAINABLE,
///    and the message names host-1's instances and none of host-2's.
/// 3. host-1 is still "up" and its instances still run there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn das_drain_names_instances() {
    let cluster = Cluster::start(storage_options()).await;
    let connector = cluster.connector();
    let zone = &connector;

    // Step 1.
    let names: Vec<String> = (0..4).map(|n| format!("das-{n}")).collect();
    for name in &names {
        create(zone, &instance_request(name, DAS_POD, &[], &[])).await;
    }
    let mut on_host_1 = Vec::new();
    let mut on_host_2 = Vec::new();
    for name in &names {
        let instance = wait_settled(zone, name).await;
        match instance.host.as_str() {
            "host-1" => on_host_1.push(instance),
            "host-2" => on_host_2.push(instance),
            other => panic!("{name} runs on {other}, outside the DAS pod"),
        }
    }
    assert!(
        !on_host_1.is_empty(),
        "spread placement put no instance on host-1"
    );

    // Step 2.
    let refused = drain(zone, "host-1")
        .await
        .expect_err("a DAS host with instances was drained");
    assert_rejected(
        &refused,
        Code::FailedPrecondition,
        "HOST_NOT_DRAINABLE",
        "drain of DAS host-1",
    );
    let message = refused.message();
    for instance in &on_host_1 {
        assert!(
            message.contains(&instance.name),
            "the message should name {}: {message}",
            instance.name
        );
    }
    for instance in &on_host_2 {
        assert!(
            !message.contains(&instance.name),
            "the message names {}, which runs on host-2: {message}",
            instance.name
        );
    }

    // Step 3.
    assert_eq!(
        host(zone, "host-1").await.health,
        "up",
        "a refused drain changed host-1"
    );
    for instance in &on_host_1 {
        let now = get_instance(zone, &instance.name).await.unwrap();
        assert_eq!(now.host, "host-1", "{now:?}");
        assert_eq!(now.observed_state, "running", "{now:?}");
        assert_eq!(now.migrating_to, "", "{now:?}");
    }
}

/// Without a fencing driver, a silent host's instances wait for it.
///
/// 1. Start 3 controllers and the storage layout, fencing driver "none"
///    with `after` 2 s; create "san-0" and "san-1" in the SAN pod.
/// 2. Partition the host of the one not on host-3 (which fronts the array).
/// 3. The host becomes "suspect" within 20 s.
/// 4. For 10 s, five times `after`, the host stays "suspect" and the
///    instance stays on it; no other agent's ledger mentions the instance.
/// 5. Heal: the host is "up" and the instance runs there, as HostDomains
///    confirms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfenced_suspect_host_keeps_instances() {
    let options = ClusterOptions {
        fencing: ccs::config::FencingConfig {
            driver: "none".to_string(),
            after: Duration::from_secs(2),
            ..Default::default()
        },
        ..storage_options()
    };
    let cluster = Cluster::start(options).await;
    let connector = cluster.connector();
    let zone = &connector;

    // Steps 1 and 2.
    for name in ["san-0", "san-1"] {
        create(zone, &instance_request(name, SAN_POD, &[], &[])).await;
    }
    let mut target = None;
    for name in ["san-0", "san-1"] {
        let instance = wait_settled(zone, name).await;
        if instance.host != SAN_AGENT {
            target = Some(instance);
        }
    }
    let target = target.expect("spread placement put both instances on host-3");
    let silent = target.host.clone();
    cluster.partition(&silent);

    // Step 3.
    wait_health(zone, &silent, "suspect", Duration::from_secs(20)).await;

    // Step 4.
    let watch_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < watch_until {
        let instance = get_instance(zone, &target.name).await.unwrap();
        assert_eq!(
            instance.host, silent,
            "with no fencing driver, {} moved off suspect {silent}: {instance:?}",
            target.name
        );
        assert_eq!(instance.migrating_to, "", "{instance:?}");
        let health = host(zone, &silent).await.health;
        assert_eq!(
            health, "suspect",
            "with no fencing driver, partitioned {silent} should stay suspect"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for other in cluster.hosts().iter().filter(|h| **h != silent) {
        let entries: Vec<_> = cluster
            .ledger(other)
            .into_iter()
            .filter(|e| e.instance_id == target.id)
            .collect();
        assert!(
            entries.is_empty(),
            "{other} executed orders for {}, which lives on suspect {silent}: {entries:?}",
            target.name
        );
    }

    // Step 5.
    cluster.heal(&silent);
    wait_health(zone, &silent, "up", Duration::from_secs(30)).await;
    let instance = wait_on_host(zone, &target.name, &silent).await;
    let state = domain_state(zone, &silent, &instance.id).await;
    assert_eq!(
        state.as_deref(),
        Some("running"),
        "{}'s domain on {silent} after the heal",
        target.name
    );
}

/// A fenced SAN host's instances restart elsewhere only after the fence,
/// a fenced DAS host's instances are lost in place, and a returning host
/// loses only the copies that moved.
///
/// 1. Start 3 controllers and the storage layout with the "test" fencing
///    driver (`after` 2 s).
/// 2. Start a domain on host-4 behind ccs's back: an order sent straight to
///    its agent with the current leader's id and a random UUID.
/// 3. Create 6 SAN instances (spread: two on host-4) and 2 DAS instances
///    (one on host-2), and wait until all run.
/// 4. Partition host-4 and host-2.
/// 5. Within 60 s host-4's SAN instances run on other SAN hosts; print how
///    long it took. No poll saw one moved while host-4 was not fenced.
/// 6. host-2's instance is "lost", still on host-2.
/// 7. The fence records have host-4 and host-2; every start of a moved
///    instance in another agent's ledger is later than host-4's fence, and
///    no other agent's ledger mentions host-2's instance.
/// 8. Heal both: they are "up", and host-4's ledger shows destroy orders
///    for exactly the moved instances. Its foreign domain still runs there,
///    the moved ones are gone from it, and they run on their new hosts.
/// 9. host-2's instance runs on host-2 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_host_instances_restart_elsewhere() {
    let options = ClusterOptions {
        fencing: test_fencing(Duration::from_secs(2)),
        ..storage_options()
    };
    let cluster = Cluster::start(options).await;
    let connector = cluster.connector();
    let zone = &connector;

    // Step 2.
    let foreign = uuid::Uuid::new_v4().to_string();
    let started = order_behind_zone(&cluster, "host-4", OrderAction::Start, &foreign, 9_000_001).await;
    assert_eq!(started.domain_state, "running", "{started:?}");

    // Step 3.
    let mut requests: Vec<CreateInstanceRequest> = (0..6)
        .map(|n| instance_request(&format!("san-{n}"), SAN_POD, &[], &[]))
        .collect();
    requests.extend((0..2).map(|n| instance_request(&format!("das-{n}"), DAS_POD, &[], &[])));
    create_all(zone, requests).await;
    let instances = wait_all_running(zone, 8, SETTLE_TIMEOUT).await;
    let moved: BTreeMap<String, String> = instances
        .iter()
        .filter(|i| i.pod == SAN_POD && i.host == "host-4")
        .map(|i| (i.id.clone(), i.name.clone()))
        .collect();
    assert!(
        !moved.is_empty(),
        "spread placement put no SAN instance on host-4"
    );
    let lost = instances
        .iter()
        .find(|i| i.pod == DAS_POD && i.host == "host-2")
        .cloned()
        .unwrap_or_else(|| panic!("spread placement put no DAS instance on host-2: {instances:?}"));

    // Step 4.
    let partitioned_at = Instant::now();
    cluster.partition("host-4");
    cluster.partition("host-2");

    // Step 5. Instances are read before hosts, and a fence is never undone
    // while the host is partitioned, so a moved instance next to a host
    // that is not fenced means it moved before the fence.
    let mut early_moves = Vec::new();
    wait_for(
        "host-4's SAN instances to run on other SAN hosts",
        Duration::from_secs(60),
        async || {
            let listed = list_instances(zone).await;
            let health = host(zone, "host-4").await.health;
            let mut waiting = Vec::new();
            for id in moved.keys() {
                let instance = listed.iter().find(|i| &i.id == id).ok_or(format!("{id} vanished"))?;
                if instance.host != "host-4" && health != "fenced" {
                    early_moves.push(format!("{} on {} while host-4 was {health}", instance.name, instance.host));
                }
                let settled = instance.host != "host-4"
                    && SAN_HOSTS.contains(&instance.host.as_str())
                    && instance.observed_state == "running"
                    && instance.migrating_to.is_empty();
                if !settled {
                    waiting.push(format!(
                        "{} on {} {} (migrating to {:?})",
                        instance.name, instance.host, instance.observed_state, instance.migrating_to
                    ));
                }
            }
            if waiting.is_empty() {
                Ok(())
            } else {
                Err(format!("host-4 is {health}; waiting for {waiting:?}"))
            }
        },
    )
    .await;
    eprintln!(
        "host-4's {} SAN instances ran on other hosts {:.1} s after the partition \
         (host_timeout 3 s, fencing after 2 s)",
        moved.len(),
        partitioned_at.elapsed().as_secs_f64()
    );
    assert!(
        early_moves.is_empty(),
        "instances moved before host-4's fence was committed: {early_moves:?}"
    );

    // Step 6.
    wait_for(
        "host-2's DAS instance to be lost",
        Duration::from_secs(30),
        async || {
            let instance = get_instance(zone, &lost.name).await.map_err(|s| format!("{s:?}"))?;
            if instance.observed_state == "lost" {
                Ok(())
            } else {
                Err(format!("{instance:?}"))
            }
        },
    )
    .await;
    let still = get_instance(zone, &lost.name).await.unwrap();
    assert_eq!(still.host, "host-2", "a DAS instance cannot leave its host: {still:?}");

    // Step 7.
    let fences = cluster.fences();
    let fenced_at = |host: &str| {
        fences
            .iter()
            .filter(|f| f.host == host)
            .map(|f| f.time_unix_ns)
            .min()
            .unwrap_or_else(|| panic!("no fence of {host} was recorded: {fences:?}"))
    };
    let host_4_fence = fenced_at("host-4");
    fenced_at("host-2");
    for (id, name) in &moved {
        let mut starts = Vec::new();
        for other in cluster.hosts().iter().filter(|h| *h != "host-4") {
            starts.extend(
                cluster
                    .ledger(other)
                    .into_iter()
                    .filter(|e| &e.instance_id == id && e.action == "start"),
            );
        }
        assert!(
            !starts.is_empty(),
            "no other agent's ledger has a start of {name}"
        );
        for start in &starts {
            assert!(
                start.time_unix_ns > host_4_fence,
                "{name} started on {} at {} ns, before host-4's fence at {host_4_fence} ns",
                start.host_id,
                start.time_unix_ns
            );
        }
    }
    for other in cluster.hosts().iter().filter(|h| *h != "host-2") {
        let entries: Vec<_> = cluster
            .ledger(other)
            .into_iter()
            .filter(|e| e.instance_id == lost.id)
            .collect();
        assert!(
            entries.is_empty(),
            "{other} executed orders for DAS instance {}: {entries:?}",
            lost.name
        );
    }

    // Step 8.
    cluster.heal("host-4");
    cluster.heal("host-2");
    wait_health(zone, "host-4", "up", Duration::from_secs(30)).await;
    wait_health(zone, "host-2", "up", Duration::from_secs(30)).await;
    let expected: BTreeSet<String> = moved.keys().cloned().collect();
    let destroyed = wait_for(
        "host-4's agent to destroy the moved copies",
        Duration::from_secs(30),
        async || {
            let destroyed: BTreeSet<String> = cluster
                .ledger("host-4")
                .into_iter()
                .filter(|e| e.action == "destroy")
                .map(|e| e.instance_id)
                .collect();
            if destroyed.is_superset(&expected) {
                Ok(destroyed)
            } else {
                Err(format!("destroyed {destroyed:?}"))
            }
        },
    )
    .await;
    assert_eq!(
        destroyed, expected,
        "host-4 should destroy exactly the copies that moved (foreign domain {foreign})"
    );
    let left = host_domains(zone, "host-4").await.unwrap_or_else(|e| panic!("{e}"));
    let foreign_domain = left.iter().find(|d| d.uuid == foreign);
    assert_eq!(
        foreign_domain.map(|d| d.state.as_str()),
        Some("running"),
        "the domain created behind ccs's back should survive the clean-up: {left:?}"
    );
    for domain in &left {
        assert!(
            !moved.contains_key(&domain.uuid),
            "host-4 still has moved instance {}: {domain:?}",
            moved[&domain.uuid]
        );
    }
    for (id, name) in &moved {
        let instance = get_instance(zone, name).await.unwrap();
        assert_ne!(instance.host, "host-4", "{instance:?}");
        let state = domain_state(zone, &instance.host, id).await;
        assert_eq!(
            state.as_deref(),
            Some("running"),
            "{name}'s domain on its new host {}",
            instance.host
        );
    }

    // Step 9.
    let back = wait_on_host(zone, &lost.name, "host-2").await;
    let state = domain_state(zone, "host-2", &back.id).await;
    assert_eq!(state.as_deref(), Some("running"), "{}'s domain on host-2", lost.name);
}

/// What became of one operation that was in flight when the leader died.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Absent,
}

/// A leader killed with SIGKILL while a volume attach, a network create
/// and a migration are in flight leaves each one done or cleanly absent.
///
/// 1. Start 3 controllers and the storage layout; create SAN instances
///    "k-attach" and "k-move" and SAN volumes "k-vol-0" to "k-vol-2".
/// 2. For each kill delay of 0, 20 and 80 ms, send three calls to the
///    leader at once: an attach of k-vol-N to k-attach, a create of network
///    "k-net-N" and a migration of k-move to a named host. Kill the leader
///    after the delay. Each call succeeds or fails with a retryable status.
/// 3. Within 60 s a new leader serves a settled zone: the volume
///    "available" or "in-use", k-move and k-attach running with no migration.
/// 4. Each operation is done or absent, never half. The volume is attached
///    and listed by k-attach, or detached and not listed, and then a new
///    attach succeeds. The network is listed with a VLAN id, or absent, and
///    then a new create succeeds. k-move runs on the destination or on the
///    source, and HostDomains shows it running there and not on the other
///    host. An acknowledged attach or network create is done.
/// 5. Restart the killed controller before the next round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_mid_operations() {
    let mut cluster = Cluster::start(storage_options()).await;
    let connector = cluster.connector();
    let zone = &connector;

    // Step 1.
    create(zone, &instance_request("k-attach", SAN_POD, &[], &[])).await;
    create(zone, &instance_request("k-move", SAN_POD, &[], &[])).await;
    let k_attach = wait_settled(zone, "k-attach").await;
    wait_settled(zone, "k-move").await;
    let delays_ms = [0u64, 20, 80];
    for round in 0..delays_ms.len() {
        create_available_volume(zone, &format!("k-vol-{round}"), SAN_POD, 5, "").await;
    }

    for (round, delay_ms) in delays_ms.into_iter().enumerate() {
        let volume = format!("k-vol-{round}");
        let network = format!("k-net-{round}");
        let source = get_instance(zone, "k-move").await.unwrap().host;
        let destination = SAN_HOSTS
            .into_iter()
            .find(|h| *h != source)
            .expect("the SAN pod has three hosts")
            .to_string();

        // Step 2. A connector to the leader alone, so that no call is
        // retried on another replica behind the test's back.
        let leader = cluster.leader_id().await;
        let via = cluster.connector_for(leader);
        let attach = {
            let (via, request) = (via.clone(), AttachVolumeRequest {
                volume: volume.clone(),
                instance: "k-attach".to_string(),
            });
            tokio::spawn(async move {
                via.call(|mut client| {
                    let request = request.clone();
                    async move { client.attach_volume(request).await }
                })
                .await
            })
        };
        let create_net = {
            let (via, request) = (via.clone(), network_request(&network, SAN_POD, "10.30.0.0/24"));
            tokio::spawn(async move {
                via.call(|mut client| {
                    let request = request.clone();
                    async move { client.create_network(request).await }
                })
                .await
            })
        };
        let move_instance = {
            let (via, request) = (via.clone(), MigrateInstanceRequest {
                instance: "k-move".to_string(),
                to_host: destination.clone(),
            });
            tokio::spawn(async move {
                via.call(|mut client| {
                    let request = request.clone();
                    async move { client.migrate_instance(request).await }
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        cluster.kill_controller(leader).await;
        let attach = join_call(attach, "attach").await;
        let create_net = join_call(create_net, "network create").await;
        let move_instance = join_call(move_instance, "migration").await;
        for (what, status) in [
            ("attach", attach.as_ref().err()),
            ("network create", create_net.as_ref().err()),
            ("migration", move_instance.as_ref().err()),
        ] {
            if let Some(status) = status {
                assert!(
                    is_retryable(status),
                    "round {round}: the {what} failed with a status that is not retryable: {status:?}"
                );
            }
        }

        // Step 3.
        let new_leader = cluster.leader_id().await;
        assert_ne!(new_leader, leader, "the killed replica cannot lead");
        cluster.restart_controller(leader);
        let condition = format!("round {round}: the zone to settle after the leader's kill");
        let (volume_now, k_move, holder) = wait_for(&condition, Duration::from_secs(60), async || {
            let volume_now = get_volume(zone, &volume).await.map_err(|s| format!("{s:?}"))?;
            let k_move = get_instance(zone, "k-move").await.map_err(|s| format!("{s:?}"))?;
            let holder = get_instance(zone, "k-attach").await.map_err(|s| format!("{s:?}"))?;
            let settled = matches!(volume_now.state.as_str(), "available" | "in-use")
                && is_settled(&k_move)
                && is_settled(&holder);
            if settled {
                Ok((volume_now, k_move, holder))
            } else {
                Err(format!("volume {volume_now:?}; k-move {k_move:?}; k-attach {holder:?}"))
            }
        })
        .await;

        // Step 4: the attach.
        let attached = match volume_now.attached_to.as_str() {
            "" => Outcome::Absent,
            id if id == k_attach.id => Outcome::Done,
            other => panic!("round {round}: {volume} is attached to {other}, not k-attach"),
        };
        assert_eq!(
            holder.volumes.contains(&volume_now.id),
            attached == Outcome::Done,
            "round {round}: {volume} is {attached:?} but k-attach lists volumes {:?}",
            holder.volumes
        );
        if attach.is_ok() {
            assert_eq!(attached, Outcome::Done, "round {round}: an acknowledged attach was lost");
        }
        if attached == Outcome::Absent {
            attach_volume(zone, &volume, "k-attach")
                .await
                .unwrap_or_else(|s| panic!("round {round}: attaching {volume} again failed: {s:?}"));
        }

        // Step 4: the network.
        let listed: Vec<Network> = list_networks(zone)
            .await
            .into_iter()
            .filter(|n| n.name == network)
            .collect();
        let created = match listed.as_slice() {
            [] => Outcome::Absent,
            [one] => {
                assert!(one.segmentation_id >= 1, "round {round}: {one:?} has no VLAN id");
                assert_eq!(one.state, "active", "round {round}: {one:?}");
                Outcome::Done
            }
            many => panic!("round {round}: {network} is listed twice: {many:?}"),
        };
        if let Ok(acknowledged) = &create_net {
            assert_eq!(created, Outcome::Done, "round {round}: an acknowledged network create was lost");
            assert_eq!(listed[0].segmentation_id, acknowledged.segmentation_id, "round {round}");
        }
        if created == Outcome::Absent {
            let retried = create_network(zone, &network, SAN_POD, "10.30.0.0/24")
                .await
                .unwrap_or_else(|s| panic!("round {round}: creating {network} again failed: {s:?}"));
            assert!(retried.segmentation_id >= 1, "{retried:?}");
        }

        // Step 4: the migration.
        let moved = if k_move.host == destination {
            Outcome::Done
        } else {
            assert_eq!(
                k_move.host, source,
                "round {round}: k-move is on neither its source nor its destination"
            );
            Outcome::Absent
        };
        if let Ok(reply) = &move_instance {
            assert_eq!(reply.migrating_to, destination, "round {round}: {reply:?}");
        }
        let other = if moved == Outcome::Done { &source } else { &destination };
        let condition = format!("round {round}: k-move's domain to run on {} only", k_move.host);
        wait_for(&condition, Duration::from_secs(20), async || {
            let current = try_domain_state(zone, &k_move.host, &k_move.id).await?;
            let previous = try_domain_state(zone, other, &k_move.id).await?;
            let running = |state: &Option<String>| state.as_deref() == Some("running");
            assert!(
                !(running(&current) && running(&previous)),
                "round {round}: k-move runs on {} and {other} at once",
                k_move.host
            );
            if running(&current) && previous.is_none() {
                Ok(())
            } else {
                Err(format!("on {}: {current:?}, on {other}: {previous:?}", k_move.host))
            }
        })
        .await;
        eprintln!(
            "round {round}, leader killed {delay_ms} ms after sending: attach {attached:?} \
             ({}), network {created:?} ({}), migration {moved:?} ({})",
            call_summary(&attach),
            call_summary(&create_net),
            call_summary(&move_instance)
        );
    }
}

/// ZoneDrift reports a domain created behind ccs's back, and stops once it
/// is gone.
///
/// 1. Start 3 controllers and 2 agents; create "known" and wait until it runs.
/// 2. Start a domain on host-1 with an order sent straight to its agent.
/// 3. Within 30 s ZoneDrift lists exactly that domain: host-1, kind
///    "domain", problem "unknown"; "known" is not listed.
/// 4. Destroy the domain the same way: within 30 s ZoneDrift is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_reports_foreign_domain() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let connector = cluster.connector();
    let zone = &connector;

    // Step 1.
    create(zone, &small_instance("known", "known-request")).await;
    wait_settled(zone, "known").await;

    // Step 2.
    let foreign = uuid::Uuid::new_v4().to_string();
    let started = order_behind_zone(&cluster, "host-1", OrderAction::Start, &foreign, 9_000_001).await;
    assert_eq!(started.domain_state, "running", "{started:?}");

    // Step 3.
    let expected = vec![(
        "host-1".to_string(),
        "domain".to_string(),
        foreign.clone(),
        "unknown".to_string(),
    )];
    let report = wait_for(
        "ZoneDrift to report the foreign domain",
        Duration::from_secs(30),
        async || {
            let report = drift(zone).await.map_err(|s| format!("ZoneDrift failed: {s:?}"))?;
            if drift_keys(&report) == expected {
                Ok(report)
            } else {
                Err(format!("{report:?}"))
            }
        },
    )
    .await;
    assert!(
        !report.items[0].detail.is_empty(),
        "a drift item should explain itself: {report:?}"
    );

    // Step 4.
    let destroyed =
        order_behind_zone(&cluster, "host-1", OrderAction::Destroy, &foreign, 9_000_002).await;
    assert_eq!(destroyed.domain_state, "absent", "{destroyed:?}");
    wait_for(
        "ZoneDrift to drop the destroyed domain",
        Duration::from_secs(30),
        async || {
            let report = drift(zone).await.map_err(|s| format!("ZoneDrift failed: {s:?}"))?;
            if report.items.is_empty() {
                Ok(())
            } else {
                Err(format!("{report:?}"))
            }
        },
    )
    .await;
}

/// A pool that loses its volumes gets them back: under the test driver an
/// agent restart empties its pools, and the leader creates them again.
///
/// 1. Start the storage layout; create SAN volume "kept" (on host-3's pool).
/// 2. Kill and restart host-3's agent.
/// 3. Within 60 s host-3's ledger has a second create of "kept", and
///    ZoneDrift reports nothing on host-3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_volumes_are_created_again() {
    let mut cluster = Cluster::start(storage_options()).await;
    let connector = cluster.connector();
    let zone = &connector;

    // Step 1.
    let kept = create_available_volume(zone, "kept", SAN_POD, 10, "").await;
    let creates = |cluster: &Cluster| {
        cluster
            .ledger(SAN_AGENT)
            .into_iter()
            .filter(|e| e.instance_id == kept.id && e.action == "create_volume")
            .count()
    };
    assert_eq!(creates(&cluster), 1, "host-3 should have created kept once");

    // Step 2.
    cluster.kill_agent(SAN_AGENT).await;
    cluster.restart_agent(SAN_AGENT);

    // Step 3.
    wait_for("the leader to create kept again", Duration::from_secs(60), async || {
        let count = creates(&cluster);
        let report = drift(zone).await.map_err(|s| format!("ZoneDrift failed: {s:?}"))?;
        let on_host: Vec<_> = report.items.iter().filter(|i| i.host == SAN_AGENT).collect();
        if count >= 2 && on_host.is_empty() && !report.unreported.contains(&SAN_AGENT.to_string()) {
            Ok(())
        } else {
            Err(format!("{count} creates; drift {report:?}"))
        }
    })
    .await;
}

/// Lists the (host, kind, name, problem) of every drift item.
fn drift_keys(report: &ZoneDriftReply) -> Vec<(String, String, String, String)> {
    report
        .items
        .iter()
        .map(|i| (i.host.clone(), i.kind.clone(), i.name.clone(), i.problem.clone()))
        .collect()
}

/// Sends `action` for domain `uuid` straight to `host`'s agent, stamped
/// with the current leader's id, as an operator acting behind ccs's back.
async fn order_behind_zone(
    cluster: &Cluster,
    host: &str,
    action: OrderAction,
    uuid: &str,
    order_id: u64,
) -> OrderResult {
    let status = cluster.leader_status().await;
    let endpoint = format!("http://{}", cluster.agent_addr(host));
    let mut agent = AgentClient::connect(endpoint.clone())
        .await
        .unwrap_or_else(|e| panic!("connecting to agent {endpoint}: {e}"));
    let order = Order {
        order_id,
        leader: Some(LeaderId {
            term: status.term,
            node_id: status.leader_id,
        }),
        action: action as i32,
        instance_id: uuid.to_string(),
        instance_name: format!("foreign-{}", &uuid[..8]),
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 1,
        zone: ZONE.to_string(),
        ..Default::default()
    };
    agent
        .execute(order)
        .await
        .unwrap_or_else(|s| panic!("{action:?} of foreign domain {uuid} on {host} failed: {s:?}"))
        .into_inner()
}

/// Waits for a spawned zone call and returns its result.
async fn join_call<T>(
    call: tokio::task::JoinHandle<Result<T, Status>>,
    what: &str,
) -> Result<T, Status> {
    tokio::time::timeout(CALL_TIMEOUT * 3, call)
        .await
        .unwrap_or_else(|_| panic!("the {what} call did not return"))
        .unwrap_or_else(|e| panic!("the {what} task panicked: {e}"))
}

fn call_summary<T>(result: &Result<T, Status>) -> String {
    match result {
        Ok(_) => "acknowledged".to_string(),
        Err(status) => format!("{:?}, reason {:?}", status.code(), reason(status)),
    }
}

/// Checks a status's gRPC code and `ccs-reason`.
fn assert_rejected(status: &Status, code: Code, expected_reason: &str, what: &str) {
    assert_eq!(status.code(), code, "{what}: wrong code, status {status:?}");
    assert_eq!(
        reason(status),
        Some(expected_reason),
        "{what}: wrong reason, status {status:?}"
    );
}

/// Checks that every instance has one NIC on `network`, with a distinct
/// host address of `cidr`.
fn assert_distinct_leases(instances: &[&Instance], network: &str, cidr: &str) {
    let (base, prefix) = cidr.split_once('/').expect("test CIDRs have a prefix");
    let base = u32::from(base.parse::<Ipv4Addr>().expect("test CIDRs are IPv4"));
    let host_bits = u32::MAX >> prefix.parse::<u32>().expect("test prefixes are numbers");
    let mut seen = BTreeSet::new();
    for instance in instances {
        let nics: Vec<_> = instance.nics.iter().filter(|n| n.network == network).collect();
        assert_eq!(nics.len(), 1, "{} should have one NIC on {network}: {:?}", instance.name, instance.nics);
        let ip = &nics[0].ip;
        let address = u32::from(
            ip.parse::<Ipv4Addr>()
                .unwrap_or_else(|e| panic!("{}'s NIC address {ip:?} is invalid: {e}", instance.name)),
        );
        assert_eq!(
            address & !host_bits,
            base,
            "{}'s address {ip} is outside {cidr}",
            instance.name
        );
        let offset = address & host_bits;
        assert!(
            offset != 0 && offset != host_bits,
            "{}'s address {ip} is the network or broadcast address of {cidr}",
            instance.name
        );
        assert!(!nics[0].mac.is_empty(), "{}'s NIC has no MAC", instance.name);
        assert!(seen.insert(address), "{}'s address {ip} is leased twice", instance.name);
    }
}

/// Checks that a finished migration left `before`'s domain running on
/// `destination` and gone from its source host.
async fn assert_domain_moved(zone: &ZoneConnector, before: &Instance, destination: &str) {
    let arrived = domain_state(zone, destination, &before.id).await;
    assert_eq!(
        arrived.as_deref(),
        Some("running"),
        "{}'s domain on destination {destination}",
        before.name
    );
    let left = domain_state(zone, &before.host, &before.id).await;
    assert_eq!(left, None, "{}'s domain is still on source {}", before.name, before.host);
}

/// Returns the state of domain `id` on `host`, or `None` when the host has
/// no such domain.
async fn domain_state(zone: &ZoneConnector, host: &str, id: &str) -> Option<String> {
    try_domain_state(zone, host, id)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Like `domain_state`, but returns a failed HostDomains call as `Err`.
async fn try_domain_state(
    zone: &ZoneConnector,
    host: &str,
    id: &str,
) -> Result<Option<String>, String> {
    let domains = host_domains(zone, host).await?;
    Ok(domains.into_iter().find(|d| d.uuid == id).map(|d| d.state))
}

/// Returns whether an instance runs with no migration in progress.
fn is_settled(instance: &Instance) -> bool {
    instance.observed_state == "running" && instance.migrating_to.is_empty()
}

/// Waits until instance `name` runs with no migration in progress.
async fn wait_settled(zone: &ZoneConnector, name: &str) -> Instance {
    let condition = format!("{name} to run with no migration in progress");
    wait_for(&condition, SETTLE_TIMEOUT, async || {
        let instance = get_instance(zone, name).await.map_err(|s| format!("{s:?}"))?;
        if is_settled(&instance) {
            Ok(instance)
        } else {
            Err(format!("{instance:?}"))
        }
    })
    .await
}

/// Waits until instance `name` runs on `host` with no migration in progress.
async fn wait_on_host(zone: &ZoneConnector, name: &str, host: &str) -> Instance {
    let condition = format!("{name} to run on {host} with no migration in progress");
    wait_for(&condition, SETTLE_TIMEOUT, async || {
        let instance = get_instance(zone, name).await.map_err(|s| format!("{s:?}"))?;
        if is_settled(&instance) && instance.host == host {
            Ok(instance)
        } else {
            Err(format!("{instance:?}"))
        }
    })
    .await
}

async fn wait_health(zone: &ZoneConnector, id: &str, health: &str, timeout: Duration) {
    let condition = format!("{id} to be {health}");
    wait_for(&condition, timeout, async || {
        let host = host(zone, id).await;
        if host.health == health {
            Ok(())
        } else {
            Err(format!("{id} is {}", host.health))
        }
    })
    .await;
}

fn instance_request(
    name: &str,
    pod: &str,
    volumes: &[&str],
    networks: &[&str],
) -> CreateInstanceRequest {
    CreateInstanceRequest {
        pod: pod.to_string(),
        volumes: volumes.iter().map(|v| v.to_string()).collect(),
        networks: networks.iter().map(|n| n.to_string()).collect(),
        ..small_instance(name, &format!("{name}-request"))
    }
}

/// Creates an instance, retrying with its request id through failovers.
async fn create(zone: &ZoneConnector, request: &CreateInstanceRequest) -> Instance {
    create_with_retry(zone, request, CREATE_TIMEOUT)
        .await
        .unwrap_or_else(|s| panic!("creating {:?} failed: {s:?}", request.name))
}

async fn get_instance(zone: &ZoneConnector, name: &str) -> Result<Instance, Status> {
    let request = GetInstanceRequest {
        name: name.to_string(),
        stale: false,
    };
    let reply = zone
        .call_until(START_TIMEOUT, |mut client| {
            let request = request.clone();
            async move { client.get_instance(request).await }
        })
        .await?;
    Ok(reply.instance.expect("GetInstance returns an instance"))
}

async fn list_hosts(zone: &ZoneConnector) -> Vec<Host> {
    zone.call_until(START_TIMEOUT, |mut client| async move {
        client.list_hosts(ReadRequest { stale: false }).await
    })
    .await
    .unwrap_or_else(|s| panic!("ListHosts failed: {s:?}"))
    .hosts
}

async fn host(zone: &ZoneConnector, id: &str) -> Host {
    let hosts = list_hosts(zone).await;
    let found = hosts.iter().find(|h| h.id == id).cloned();
    found.unwrap_or_else(|| panic!("the zone lists no host {id}: {hosts:?}"))
}

fn network_request(name: &str, pod: &str, cidr: &str) -> CreateNetworkRequest {
    CreateNetworkRequest {
        name: name.to_string(),
        pod: pod.to_string(),
        cidr: cidr.to_string(),
    }
}

async fn create_network(zone: &ZoneConnector, name: &str, pod: &str, cidr: &str) -> Result<Network, Status> {
    let request = network_request(name, pod, cidr);
    zone.call_until(START_TIMEOUT, |mut client| {
        let request = request.clone();
        async move { client.create_network(request).await }
    })
    .await
}

async fn list_networks(zone: &ZoneConnector) -> Vec<Network> {
    zone.call_until(START_TIMEOUT, |mut client| async move {
        client.list_networks(ReadRequest { stale: false }).await
    })
    .await
    .unwrap_or_else(|s| panic!("ListNetworks failed: {s:?}"))
    .networks
}

/// Creates a volume and waits until its pool contains it ("available").
/// `host` is empty for a SAN volume.
async fn create_available_volume(
    zone: &ZoneConnector,
    name: &str,
    pod: &str,
    size_gib: u64,
    host: &str,
) -> Volume {
    let request = CreateVolumeRequest {
        name: name.to_string(),
        pod: pod.to_string(),
        size_gib,
        host: host.to_string(),
    };
    let created = zone
        .call_until(START_TIMEOUT, |mut client| {
            let request = request.clone();
            async move { client.create_volume(request).await }
        })
        .await
        .unwrap_or_else(|s| panic!("creating volume {name} failed: {s:?}"));
    assert_eq!(created.size_gib, size_gib, "{created:?}");
    let condition = format!("volume {name} to be available");
    wait_for(&condition, SETTLE_TIMEOUT, async || {
        let volume = get_volume(zone, name).await.map_err(|s| format!("{s:?}"))?;
        if volume.state == "available" {
            Ok(volume)
        } else {
            Err(format!("{volume:?}"))
        }
    })
    .await
}

async fn get_volume(zone: &ZoneConnector, name: &str) -> Result<Volume, Status> {
    let request = GetVolumeRequest {
        name: name.to_string(),
        stale: false,
    };
    let reply = zone
        .call_until(START_TIMEOUT, |mut client| {
            let request = request.clone();
            async move { client.get_volume(request).await }
        })
        .await?;
    Ok(reply.volume.expect("GetVolume returns a volume"))
}

/// Waits until volume `name` is deleted: GetVolume returns VOLUME_NOT_FOUND
/// and ListVolumes does not list it.
/// Waits until a volume is available, e.g. after its host confirmed a detach.
async fn wait_volume_available(zone: &ZoneConnector, name: &str) -> Volume {
    let condition = format!("volume {name} to be available");
    wait_for(&condition, SETTLE_TIMEOUT, async || {
        let volume = get_volume(zone, name).await.map_err(|s| format!("{s:?}"))?;
        if volume.state == "available" {
            Ok(volume)
        } else {
            Err(format!("{volume:?}"))
        }
    })
    .await
}

async fn wait_volume_gone(zone: &ZoneConnector, name: &str) {
    let condition = format!("volume {name} to be deleted");
    wait_for(&condition, SETTLE_TIMEOUT, async || match get_volume(zone, name).await {
        Ok(volume) => Err(format!("{volume:?}")),
        Err(status) if reason(&status) == Some("VOLUME_NOT_FOUND") => Ok(()),
        Err(status) => Err(format!("GetVolume failed: {status:?}")),
    })
    .await;
    let listed = zone
        .call_until(START_TIMEOUT, |mut client| async move {
            client.list_volumes(ReadRequest { stale: false }).await
        })
        .await
        .unwrap_or_else(|s| panic!("ListVolumes failed: {s:?}"))
        .volumes;
    assert!(
        listed.iter().all(|v| v.name != name),
        "ListVolumes still lists deleted {name}: {listed:?}"
    );
}

async fn attach_volume(zone: &ZoneConnector, volume: &str, instance: &str) -> Result<DeviceChangeReply, Status> {
    let request = AttachVolumeRequest {
        volume: volume.to_string(),
        instance: instance.to_string(),
    };
    zone.call_until(START_TIMEOUT, |mut client| {
        let request = request.clone();
        async move { client.attach_volume(request).await }
    })
    .await
}

async fn detach_volume(zone: &ZoneConnector, volume: &str) -> Result<DeviceChangeReply, Status> {
    let request = VolumeRef {
        name: volume.to_string(),
    };
    zone.call_until(START_TIMEOUT, |mut client| {
        let request = request.clone();
        async move { client.detach_volume(request).await }
    })
    .await
}

async fn delete_volume(zone: &ZoneConnector, volume: &str) -> Result<Volume, Status> {
    let request = VolumeRef {
        name: volume.to_string(),
    };
    zone.call_until(START_TIMEOUT, |mut client| {
        let request = request.clone();
        async move { client.delete_volume(request).await }
    })
    .await
}

async fn migrate(zone: &ZoneConnector, instance: &str, to_host: &str) -> Result<Instance, Status> {
    let request = MigrateInstanceRequest {
        instance: instance.to_string(),
        to_host: to_host.to_string(),
    };
    zone.call_until(START_TIMEOUT, |mut client| {
        let request = request.clone();
        async move { client.migrate_instance(request).await }
    })
    .await
}

async fn drain(zone: &ZoneConnector, host: &str) -> Result<DrainReply, Status> {
    let request = HostRef {
        host: host.to_string(),
    };
    zone.call_until(START_TIMEOUT, |mut client| {
        let request = request.clone();
        async move { client.drain_host(request).await }
    })
    .await
}

async fn undrain(zone: &ZoneConnector, host: &str) -> Result<Host, Status> {
    let request = HostRef {
        host: host.to_string(),
    };
    zone.call_until(START_TIMEOUT, |mut client| {
        let request = request.clone();
        async move { client.undrain_host(request).await }
    })
    .await
}

async fn drift(zone: &ZoneConnector) -> Result<ZoneDriftReply, Status> {
    zone.call_until(START_TIMEOUT, |mut client| async move {
        client.zone_drift(ZoneDriftRequest {}).await
    })
    .await
}
