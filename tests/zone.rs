//! Integration tests of a zone: controller replicas and host agents run as
//! `ccs` processes on loopback, the agents on libvirt's test driver. Each
//! test starts its own cluster (see `common`) and lists its scenario.
//!
//! The tests share one file, and so one test binary, because each binary
//! links all of ccs and RocksDB again.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ccs::client::{reason, ZoneConnector};
use ccs::proto::agent::agent_client::AgentClient;
use ccs::proto::agent::{LeaderId, ListDomainsRequest, Order, OrderAction};
use ccs::proto::zone::{
    AddReplicaRequest, CreateInstanceRequest, CreateNetworkRequest, CreatePodRequest,
    GetInstanceRequest, GetPodRequest, Instance, InstanceRef, Network, NetworkRef, Pod,
    ReadRequest, RegisterHostRequest, RemoveReplicaRequest,
};
use futures::stream::{self, StreamExt};
use tokio::sync::watch;
use tonic::{Code, Status};

use common::*;

/// Fifty creates all reach "running", and each domain exists on exactly one host.
///
/// 1. Start 3 controllers and 2 agents.
/// 2. Create 50 instances, 8 at a time.
/// 3. Wait until the zone reports all 50 running.
/// 4. Ask both agents for their domains (HostDomains): every instance id
///    appears exactly once over both hosts, running, under the instance's
///    name, on the host the zone placed it on, and no other domain exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_instances_run_once_each() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let connector = cluster.connector();

    let created = create_all(&connector, numbered_requests("fifty", 50)).await;
    let instances = wait_all_running(&connector, 50, Duration::from_secs(40)).await;
    assert_acknowledged_exist_once(&created, &instances);

    let mut placements: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for host in cluster.hosts() {
        let domains = host_domains(&connector, &host)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for domain in domains {
            let instance = instances.iter().find(|i| i.id == domain.uuid);
            let instance = instance.unwrap_or_else(|| {
                panic!("host {host} has domain {domain:?}, which is no instance of the zone")
            });
            assert_eq!(
                instance.host, host,
                "domain of {:?} is on the wrong host",
                instance.name
            );
            assert_eq!(
                domain.name, instance.name,
                "domain {} has the wrong name",
                domain.uuid
            );
            assert_eq!(
                domain.state, "running",
                "domain of {:?} is not running",
                instance.name
            );
            placements
                .entry(domain.uuid)
                .or_default()
                .push(host.clone());
        }
    }
    for instance in &instances {
        let hosts = placements.get(&instance.id).cloned().unwrap_or_default();
        assert_eq!(
            hosts.len(),
            1,
            "instance {:?} should have one domain in the zone, found it on {hosts:?}",
            instance.name
        );
    }
}

/// A leader killed with SIGKILL during a burst of creates loses no
/// acknowledged create and creates none twice.
///
/// 1. Start 3 controllers and 2 agents.
/// 2. Send 60 creates, 8 at a time, each with its own request id and
///    retried with that id while the zone is unavailable or the outcome is
///    unknown.
/// 3. After 10 acknowledgements, kill the leader with SIGKILL.
/// 4. Every create of the burst is acknowledged, 20 or more of them after
///    the kill.
/// 5. A new leader is elected and accepts a further create.
/// 6. Each acknowledged instance exists exactly once, by name and by id,
///    and no other instance exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_during_create_burst() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let connector = cluster.connector();
    let old_leader = cluster.leader_id().await;

    // Step 2: the burst runs in its own task and counts acknowledgements.
    let (acked_tx, mut acked_rx) = watch::channel(0usize);
    let burst_connector = connector.clone();
    let burst = tokio::spawn(async move {
        let acked_tx = &acked_tx;
        let connector = &burst_connector;
        stream::iter(numbered_requests("burst", 60))
            .map(|request| async move {
                let result = create_with_retry(connector, &request, CREATE_TIMEOUT).await;
                acked_tx.send_modify(|n| *n += usize::from(result.is_ok()));
                (request.name, result)
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await
    });

    // Step 3.
    // The borrow that `watch::Receiver::wait_for` returns is dropped at
    // once, because holding it would block the burst's `send_modify`.
    let reached = tokio::time::timeout(Duration::from_secs(30), acked_rx.wait_for(|n| *n >= 10))
        .await
        .is_ok_and(|result| result.is_ok());
    assert!(
        reached,
        "the burst did not get 10 creates acknowledged within 30 s"
    );
    cluster.kill_controller(old_leader).await;
    let acked_at_kill = *acked_rx.borrow();
    assert!(
        acked_at_kill <= 40,
        "{acked_at_kill} of 60 creates were acknowledged before the leader died, \
         which leaves too few to test the new leader"
    );

    // Step 4.
    let results = tokio::time::timeout(Duration::from_secs(50), burst)
        .await
        .expect("the burst did not complete within 50 s of the leader's kill")
        .expect("the burst task panicked");
    let mut created = Vec::new();
    for (name, result) in results {
        match result {
            Ok(instance) => created.push(instance),
            Err(status) => panic!("create {name:?} failed after the leader's kill: {status:?}"),
        }
    }
    assert_eq!(
        created.len(),
        60,
        "every create of the burst should be acknowledged"
    );

    // Step 5.
    let new_leader = cluster.leader_id().await;
    assert_ne!(
        new_leader, old_leader,
        "the killed replica cannot still lead"
    );
    let probe = small_instance("after-failover", "after-failover-request");
    let probe = create_with_retry(&connector, &probe, CREATE_TIMEOUT)
        .await
        .unwrap_or_else(|s| panic!("the new leader {new_leader} rejected a create: {s:?}"));
    created.push(probe);

    // Step 6.
    let listed = list_instances(&connector).await;
    assert_acknowledged_exist_once(&created, &listed);
    for instance in &listed {
        let expected = if instance.name == "after-failover" {
            "after-failover-request".to_string()
        } else {
            instance.name.replacen("burst-", "burst-request-", 1)
        };
        assert_eq!(
            instance.request_id, expected,
            "instance {:?} has the wrong request id",
            instance.name
        );
    }
}

/// A follower restarted after its log position was purged catches up
/// through a snapshot install.
///
/// 1. Start 3 controllers and 2 agents; replicas snapshot every 20 entries
///    and keep 5 entries behind a snapshot.
/// 2. Create 5 instances, then kill a follower with SIGKILL and note the
///    leader's last log index, which bounds the follower's.
/// 3. Create 100 more instances and wait until all 105 run.
/// 4. Wait until the leader has purged its log past the follower's last index.
/// 5. Restart the follower.
/// 6. Wait until a stale read from the follower alone lists the same
///    instances, in the same observed states, at the leader's applied index.
/// 7. The follower counts one installed snapshot or more in its metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_follower_catches_up_by_snapshot() {
    let mut options = ClusterOptions::default();
    options.raft.snapshot_after_entries = 20;
    options.raft.keep_entries_after_snapshot = 5;
    let mut cluster = Cluster::start(options).await;
    let connector = cluster.connector();

    // Step 2.
    create_all(&connector, numbered_requests("early", 5)).await;
    let leader = cluster.leader_id().await;
    let follower = *cluster
        .live_controllers()
        .iter()
        .find(|id| **id != leader)
        .expect("a 3-replica zone has a follower");
    cluster.kill_controller(follower).await;
    let follower_last_index = cluster.leader_status().await.last_log_index;

    // Step 3.
    create_all(&connector, numbered_requests("late", 100)).await;
    wait_all_running(&connector, 105, Duration::from_secs(45)).await;

    // Step 4.
    let condition = format!("the leader to purge its log past index {follower_last_index}");
    wait_for(&condition, Duration::from_secs(20), async || {
        let status = cluster.leader_status().await;
        if status.purged_index > follower_last_index {
            Ok(())
        } else {
            Err(format!(
                "purged_index {}, snapshot_index {}, last_log_index {}",
                status.purged_index, status.snapshot_index, status.last_log_index
            ))
        }
    })
    .await;

    // Step 5.
    cluster.restart_controller(follower);

    // Step 6.
    let follower_connector = cluster.connector_for(follower);
    let condition = format!("replica {follower} to serve the leader's state");
    wait_for(&condition, Duration::from_secs(30), async || {
        let fresh = connector
            .call(|mut c| async move { c.list_instances(ReadRequest { stale: false }).await })
            .await
            .map_err(|s| {
                format!(
                    "linearizable ListInstances failed: {:?} {}",
                    s.code(),
                    s.message()
                )
            })?;
        let stale = follower_connector
            .call(|mut c| async move { c.list_instances(ReadRequest { stale: true }).await })
            .await
            .map_err(|s| format!("stale ListInstances failed: {:?} {}", s.code(), s.message()))?;
        let read = stale.read.unwrap_or_default();
        let leader_applied = fresh.read.unwrap_or_default().applied_index;
        if read.serving_node_id != follower {
            return Err(format!(
                "the stale read was served by replica {}",
                read.serving_node_id
            ));
        }
        let states = |list: &[Instance]| -> BTreeMap<String, String> {
            list.iter()
                .map(|i| (i.id.clone(), i.observed_state.clone()))
                .collect()
        };
        let (expected, actual) = (states(&fresh.instances), states(&stale.instances));
        if read.applied_index == leader_applied && expected == actual {
            Ok(())
        } else {
            Err(format!(
                "follower applied {} with {} instances, leader applied {leader_applied} with {}",
                read.applied_index,
                actual.len(),
                expected.len()
            ))
        }
    })
    .await;

    // Step 7.
    let installed = cluster
        .controller_metric(follower, "ccs_raft_snapshots_installed_total")
        .await
        .unwrap_or(0.0);
    assert!(
        installed >= 1.0,
        "replica {follower} caught up without installing a snapshot"
    );
}

/// An agent that has executed orders from a leader rejects orders stamped
/// by an older leader, and still accepts the current one.
///
/// 1. Start 3 controllers and 1 agent, note the leader's term T and id L.
/// 2. Create an instance and wait until it runs: the agent has executed the
///    leader's order, stamped (T, L).
/// 3. Check that leadership did not change in between.
/// 4. Send the agent an order stamped (T-1, L) for a new instance id:
///    FAILED_PRECONDITION, and no domain appears for that id.
/// 5. Send one stamped (T-1, u64::MAX): the term is compared first, so it
///    is rejected as well.
/// 6. Send a start of the running instance stamped (T, L): accepted, and
///    reported as already done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_rejects_order_from_older_leader() {
    let options = ClusterOptions {
        agents: 1,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options).await;
    let connector = cluster.connector();

    // Steps 1 to 3.
    let before = cluster.leader_status().await;
    let request = small_instance("fenced", "fenced-request");
    let instance = create_with_retry(&connector, &request, CREATE_TIMEOUT)
        .await
        .unwrap_or_else(|s| panic!("creating {:?} failed: {s:?}", request.name));
    wait_all_running(&connector, 1, Duration::from_secs(20)).await;
    let after = cluster.leader_status().await;
    assert_eq!(
        (before.term, before.leader_id),
        (after.term, after.leader_id),
        "leadership changed during the test, so the agent's accepted leader is unknown"
    );
    let (term, leader) = (after.term, after.leader_id);
    assert!(term >= 1, "a zone with a leader has a term of at least 1");

    let host = cluster.hosts().remove(0);
    let endpoint = format!("http://{}", cluster.agent_addr(&host));
    let mut agent = AgentClient::connect(endpoint.clone())
        .await
        .unwrap_or_else(|e| panic!("connecting to agent {endpoint}: {e}"));
    let order = |term: u64, node_id: u64, instance_id: &str, name: &str| Order {
        order_id: 1_000_000 + term,
        leader: Some(LeaderId { term, node_id }),
        action: OrderAction::Start as i32,
        instance_id: instance_id.to_string(),
        instance_name: name.to_string(),
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 1,
        zone: ZONE.to_string(),
        ..Default::default()
    };

    // Step 4.
    let stray_id = uuid::Uuid::new_v4().to_string();
    let stale = agent
        .execute(order(term - 1, leader, &stray_id, "stale-order"))
        .await;
    let status = stale.expect_err("an order from term T-1 should be rejected");
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "wrong code for a stale order: {status:?}"
    );
    let domains = agent
        .list_domains(ListDomainsRequest {})
        .await
        .expect("ListDomains on the agent")
        .into_inner()
        .domains;
    assert!(
        domains.iter().all(|d| d.uuid != stray_id),
        "the rejected order created domain {stray_id} anyway"
    );

    // Step 5.
    let stale = agent
        .execute(order(term - 1, u64::MAX, &stray_id, "stale-order"))
        .await;
    let status = stale.expect_err("an order from term T-1 should be rejected whatever its node id");
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "wrong code for a stale order: {status:?}"
    );

    // Step 6.
    let current = agent
        .execute(order(term, leader, &instance.id, &instance.name))
        .await
        .unwrap_or_else(|s| panic!("an order from the current leader was rejected: {s:?}"))
        .into_inner();
    assert_eq!(current.domain_state, "running");
    assert!(
        current.already_done,
        "the instance was already running, so the start was a no-op"
    );
}

/// A create retried with the same request id returns the first instance,
/// whatever name the retry carries, and never makes a second one.
///
/// 1. Start 3 controllers and 1 agent.
/// 2. Create "first" with request id R.
/// 3. Send R again with the name "first", then with the name "second",
///    through each replica in turn: every reply is the first instance.
/// 4. The zone contains one instance, and "second" is not found.
/// 5. Delete "first" and wait until it is gone.
/// 6. Send R again with the name "third": the reply is still the first
///    instance, and the zone contains no instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_retry_returns_first_instance() {
    let options = ClusterOptions {
        agents: 1,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options).await;
    let connector = cluster.connector();

    // Step 2.
    let first = create_with_retry(
        &connector,
        &small_instance("first", "retry-r"),
        CREATE_TIMEOUT,
    )
    .await
    .unwrap_or_else(|s| panic!("creating \"first\" failed: {s:?}"));
    assert_eq!(first.request_id, "retry-r");

    // Step 3.
    for id in cluster.live_controllers() {
        let via = cluster.connector_for(id);
        for name in ["first", "second"] {
            let retry = create_with_retry(&via, &small_instance(name, "retry-r"), CREATE_TIMEOUT)
                .await
                .unwrap_or_else(|s| {
                    panic!("retry named {name:?} through replica {id} failed: {s:?}")
                });
            assert_eq!(
                retry.id, first.id,
                "retry named {name:?} through replica {id} made a new instance"
            );
            assert_eq!(
                retry.name, "first",
                "retry named {name:?} through replica {id} renamed the instance"
            );
        }
    }

    // Step 4.
    let listed = list_instances(&connector).await;
    let names: Vec<&str> = listed.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        names,
        ["first"],
        "the zone should hold only the first instance"
    );
    assert_not_found(&connector, "second").await;

    // Step 5.
    connector
        .call_until(START_TIMEOUT, |mut c| async move {
            c.delete_instance(InstanceRef {
                name: "first".to_string(),
            })
            .await
        })
        .await
        .unwrap_or_else(|s| panic!("deleting \"first\" failed: {s:?}"));
    wait_for(
        "\"first\" to be destroyed",
        Duration::from_secs(20),
        async || {
            let listed = list_instances(&connector).await;
            if listed.is_empty() {
                Ok(())
            } else {
                Err(format!("instances {listed:?}"))
            }
        },
    )
    .await;

    // Step 6.
    let late = create_with_retry(
        &connector,
        &small_instance("third", "retry-r"),
        CREATE_TIMEOUT,
    )
    .await
    .unwrap_or_else(|s| panic!("late retry failed: {s:?}"));
    assert_eq!(
        late.id, first.id,
        "a late retry after the delete made a new instance"
    );
    let listed = list_instances(&connector).await;
    assert!(
        listed.is_empty(),
        "a late retry brought an instance back: {listed:?}"
    );
    assert_not_found(&connector, "third").await;
}

/// A background writer that creates instances until `finish` stops it.
struct Writer {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<Vec<Instance>>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Writer {
    /// Starts creating instances `bg-0`, `bg-1`, ... one at a time, 20 ms apart.
    fn start(connector: ZoneConnector) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let (task_stop, task_acknowledged) = (stop.clone(), acknowledged.clone());
        let task = tokio::spawn(async move {
            let mut n = 0;
            while !task_stop.load(Ordering::Relaxed) {
                let request = small_instance(&format!("bg-{n}"), &format!("bg-request-{n}"));
                let instance = create_with_retry(&connector, &request, CREATE_TIMEOUT)
                    .await
                    .map_err(|s| format!("background create {:?} failed: {s:?}", request.name))?;
                task_acknowledged
                    .lock()
                    .expect("lock poisoned")
                    .push(instance);
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        });
        Writer {
            stop,
            acknowledged,
            task,
        }
    }

    fn count(&self) -> usize {
        self.acknowledged.lock().expect("lock poisoned").len()
    }

    /// Waits until the writer has `more` acknowledged creates beyond those it has now.
    async fn wait_more(&self, more: usize, during: &str) {
        let target = self.count() + more;
        let condition = format!("{more} more background creates acknowledged {during}");
        wait_for(&condition, Duration::from_secs(30), async || {
            let now = self.count();
            if now >= target {
                Ok(())
            } else {
                Err(format!("{now} acknowledged, waiting for {target}"))
            }
        })
        .await;
    }

    /// Stops the writer and returns its acknowledged creates.
    async fn finish(self) -> Vec<Instance> {
        self.stop.store(true, Ordering::Relaxed);
        let outcome = tokio::time::timeout(CREATE_TIMEOUT + Duration::from_secs(5), self.task)
            .await
            .expect("the background writer did not stop")
            .expect("the background writer panicked");
        if let Err(message) = outcome {
            panic!("{message}");
        }
        let acknowledged = self.acknowledged.lock().expect("lock poisoned");
        acknowledged.clone()
    }
}

/// The zone grows from 3 to 5 voters and shrinks back to 3 while a writer
/// creates instances the whole time, and loses none of its writes.
///
/// 1. Start 3 controllers and 2 agents, and a background writer.
/// 2. Start replica 4 with an empty bootstrap list and add it with
///    AddReplica. Wait until the leader's status lists it as a voter and
///    the writer gets 3 more creates acknowledged. Repeat for replica 5.
/// 3. Remove an original replica that does not lead with RemoveReplica.
///    Wait until the status no longer lists it, kill its process, and wait
///    for 3 more acknowledged creates. Repeat for a second one. The last creates need replica 4 or 5 for a quorum,
///    unless one of them leads.
/// 4. Stop the writer: every create it had acknowledged exists exactly
///    once, and replicas 4 and 5 serve all of them in stale reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_grows_and_shrinks_under_writes() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let connector = cluster.connector();
    let writer = Writer::start(connector.clone());
    writer.wait_more(3, "before the membership changes").await;

    // Step 2.
    let mut expected_voters: BTreeSet<u64> = (1..=3).collect();
    for id in [4, 5] {
        let addr = cluster.start_extra_controller(id);
        let request = AddReplicaRequest { node_id: id, addr };
        connector
            .call_until(Duration::from_secs(30), |mut c| {
                let request = request.clone();
                async move { c.add_replica(request).await }
            })
            .await
            .unwrap_or_else(|s| panic!("adding replica {id} failed: {s:?}"));
        expected_voters.insert(id);
        wait_for_voters(&cluster, &expected_voters).await;
        let during = format!("with voters {expected_voters:?}");
        writer.wait_more(3, &during).await;
    }

    // Step 3.
    let leader = cluster.leader_id().await;
    let removed: Vec<u64> = [1, 2, 3]
        .into_iter()
        .filter(|id| *id != leader)
        .take(2)
        .collect();
    for id in removed {
        let request = RemoveReplicaRequest { node_id: id };
        connector
            .call_until(Duration::from_secs(30), |mut c| async move {
                c.remove_replica(request).await
            })
            .await
            .unwrap_or_else(|s| panic!("removing replica {id} failed: {s:?}"));
        expected_voters.remove(&id);
        wait_for_voters(&cluster, &expected_voters).await;
        cluster.kill_controller(id).await;
        let during = format!("with voters {expected_voters:?}");
        writer.wait_more(3, &during).await;
    }

    // Step 4.
    let acknowledged = writer.finish().await;
    let listed = list_instances(&connector).await;
    assert_acknowledged_exist_once(&acknowledged, &listed);
    let expected: BTreeSet<String> = acknowledged.iter().map(|i| i.id.clone()).collect();
    for id in [4, 5] {
        let replica = cluster.connector_for(id);
        let condition = format!("replica {id} to serve every acknowledged instance");
        wait_for(&condition, Duration::from_secs(20), async || {
            let stale = replica
                .call(|mut c| async move { c.list_instances(ReadRequest { stale: true }).await })
                .await
                .map_err(|s| {
                    format!("stale ListInstances failed: {:?} {}", s.code(), s.message())
                })?;
            let served: BTreeSet<String> = stale.instances.iter().map(|i| i.id.clone()).collect();
            let missing = expected.difference(&served).count();
            if missing == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{missing} of {} acknowledged instances missing",
                    expected.len()
                ))
            }
        })
        .await;
    }
}

/// Waits until the leader's status lists exactly `expected` as voters.
async fn wait_for_voters(cluster: &Cluster, expected: &BTreeSet<u64>) {
    let condition = format!("voters {expected:?}");
    wait_for(&condition, Duration::from_secs(30), async || {
        let status = cluster.leader_status().await;
        let actual = voters(&status);
        // A membership that is joint or not applied yet may still change,
        // so the wait ends only on a committed one.
        if &actual == expected && status.membership_committed {
            assert!(
                status.membership_index > 0,
                "a committed membership has a log index"
            );
            Ok(())
        } else {
            Err(format!("voters {actual:?}, replicas {:?}", status.replicas))
        }
    })
    .await;
}

/// A restarted agent comes back without its test-driver domains, and the
/// zone starts them again.
///
/// 1. Start 3 controllers and 2 agents; create 10 instances and wait until
///    they run.
/// 2. Note the instances the zone placed on host-1 and the domains of host-2.
/// 3. Kill host-1's agent with SIGKILL and start it again; its new test
///    driver has no domains.
/// 4. Wait until host-1 lists every one of its instances as a running
///    domain, and the zone reports all 10 running.
/// 5. host-2's domains did not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_recreates_domains() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let connector = cluster.connector();

    // Steps 1 and 2.
    create_all(&connector, numbered_requests("reboot", 10)).await;
    let instances = wait_all_running(&connector, 10, Duration::from_secs(30)).await;
    let on_host_1: BTreeSet<String> = instances
        .iter()
        .filter(|i| i.host == "host-1")
        .map(|i| i.id.clone())
        .collect();
    assert!(
        !on_host_1.is_empty(),
        "spread placement put no instance on host-1: {instances:?}"
    );
    let domains_of = |domains: Vec<ccs::proto::zone::HostDomain>| -> BTreeMap<String, String> {
        domains.into_iter().map(|d| (d.uuid, d.state)).collect()
    };
    let host_2_before = domains_of(
        host_domains(&connector, "host-2")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );

    // Step 3.
    cluster.kill_agent("host-1").await;
    cluster.restart_agent("host-1");

    // Step 4.
    wait_for(
        "host-1 to run its instances again",
        Duration::from_secs(30),
        async || {
            let domains = domains_of(host_domains(&connector, "host-1").await?);
            let running: BTreeSet<String> = domains
                .iter()
                .filter(|(_, state)| *state == "running")
                .map(|(id, _)| id.clone())
                .collect();
            let missing = on_host_1.difference(&running).count();
            if missing == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{missing} of {} instances not running; domains {domains:?}",
                    on_host_1.len()
                ))
            }
        },
    )
    .await;
    wait_all_running(&connector, 10, Duration::from_secs(20)).await;

    // Step 5.
    let host_2_after = domains_of(
        host_domains(&connector, "host-2")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    assert_eq!(
        host_2_before, host_2_after,
        "restarting host-1's agent changed host-2's domains"
    );
}

/// A create the zone must reject, with the status it must return.
struct RejectedCase {
    case: &'static str,
    create: CreateInstanceRequest,
    code: Code,
    reason: &'static str,
}

/// Invalid creates are rejected with the documented code and reason, and
/// leave nothing behind.
///
/// 1. Start 3 controllers and 1 agent; create the instance "taken".
/// 2. Send each invalid create of the table below, each with its own
///    request id, and check its gRPC code and `ccs-reason`.
/// 3. The zone still contains only "taken", none of the rejected names exist,
///    and the host's used capacity is that of "taken" alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_creates_are_rejected() {
    let options = ClusterOptions {
        agents: 1,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options).await;
    let connector = cluster.connector();
    let existing = create_with_retry(
        &connector,
        &small_instance("taken", "taken-request"),
        CREATE_TIMEOUT,
    )
    .await
    .unwrap_or_else(|s| panic!("creating \"taken\" failed: {s:?}"));

    let request = |name: &str| small_instance(name, &format!("{name}-request"));
    let cases = [
        RejectedCase {
            case: "zero vCPUs",
            create: CreateInstanceRequest {
                vcpus: 0,
                ..request("zero-vcpus")
            },
            code: Code::InvalidArgument,
            reason: "INVALID_ARGUMENT",
        },
        RejectedCase {
            case: "memory under 64 MiB",
            create: CreateInstanceRequest {
                memory_mib: 32,
                ..request("tiny-memory")
            },
            code: Code::InvalidArgument,
            reason: "INVALID_ARGUMENT",
        },
        RejectedCase {
            case: "upper-case name",
            create: request("Upper-Case"),
            code: Code::InvalidArgument,
            reason: "INVALID_ARGUMENT",
        },
        RejectedCase {
            case: "unknown pod",
            create: CreateInstanceRequest {
                pod: "no-such-pod".into(),
                ..request("lost-pod")
            },
            code: Code::NotFound,
            reason: "POD_NOT_FOUND",
        },
        RejectedCase {
            case: "duplicate name",
            create: small_instance("taken", "another-request"),
            code: Code::AlreadyExists,
            reason: "NAME_TAKEN",
        },
        // 4 TiB of memory passes validation, but no 128 GiB host fits it.
        RejectedCase {
            case: "no capacity",
            create: CreateInstanceRequest {
                vcpus: 256,
                memory_mib: 4 * 1024 * 1024,
                ..request("huge")
            },
            code: Code::ResourceExhausted,
            reason: "NO_CAPACITY",
        },
    ];

    // Step 2.
    for case in &cases {
        let result = connector
            .call_until(START_TIMEOUT, |mut c| {
                let create = case.create.clone();
                async move { c.create_instance(create).await }
            })
            .await;
        let status = match result {
            Ok(instance) => panic!("{}: the create was accepted: {instance:?}", case.case),
            Err(status) => status,
        };
        assert_eq!(
            status.code(),
            case.code,
            "{}: wrong code, status {status:?}",
            case.case
        );
        assert_eq!(
            reason(&status),
            Some(case.reason),
            "{}: wrong reason, status {status:?}",
            case.case
        );
    }

    // Step 3.
    let listed = list_instances(&connector).await;
    let names: Vec<&str> = listed.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["taken"], "rejected creates left instances behind");
    assert_eq!(
        listed[0].id, existing.id,
        "the instance \"taken\" changed id"
    );
    for case in cases.iter().filter(|case| case.create.name != "taken") {
        assert_not_found(&connector, &case.create.name).await;
    }
    let hosts = connector
        .call_until(START_TIMEOUT, |mut c| async move {
            c.list_hosts(ReadRequest { stale: false }).await
        })
        .await
        .unwrap_or_else(|s| panic!("ListHosts failed: {s:?}"))
        .hosts;
    let used: Vec<(u32, u64, u64, u32)> = hosts
        .iter()
        .map(|h| {
            (
                h.used_vcpus,
                h.used_memory_mib,
                h.used_disk_gib,
                h.instances,
            )
        })
        .collect();
    let expected = vec![(existing.vcpus, existing.memory_mib, existing.disk_gib, 1)];
    assert_eq!(
        used, expected,
        "rejected creates changed the host's used capacity"
    );
}

/// A host registered with a malformed agent endpoint does not stop the
/// leader from driving the other hosts.
///
/// 1. Start 3 controllers and 1 agent (host-1).
/// 2. Register host "bad-endpoint" through RegisterHost with the agent
///    endpoint "not a host:port".
/// 3. Create "on-bad-host" and then "on-good-host". Spread placement puts
///    the first on "bad-endpoint", whose id sorts first, and the second on
///    host-1.
/// 4. "on-good-host" reaches "running": the leader still sends orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_agent_endpoint_spares_others() {
    let options = ClusterOptions {
        agents: 1,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options).await;
    let connector = cluster.connector();

    // Step 2.
    let register = RegisterHostRequest {
        host_id: "bad-endpoint".to_string(),
        pod: POD.to_string(),
        libvirt_uri: "test:///default".to_string(),
        agent_endpoint: "not a host:port".to_string(),
        cpus: 32,
        memory_mib: 131_072,
        disk_gib: 1_000,
        boot_id: 1,
        ..Default::default()
    };
    let registered = connector
        .call_until(START_TIMEOUT, |mut c| {
            let register = register.clone();
            async move { c.register_host(register).await }
        })
        .await;
    if let Err(status) = registered {
        // Rejecting the endpoint at registration is a valid fix as well.
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "wrong status: {status:?}"
        );
    }

    // Step 3.
    for name in ["on-bad-host", "on-good-host"] {
        let request = small_instance(name, &format!("{name}-request"));
        create_with_retry(&connector, &request, CREATE_TIMEOUT)
            .await
            .unwrap_or_else(|s| panic!("creating {name:?} failed: {s:?}"));
    }

    // Step 4.
    wait_for(
        "\"on-good-host\" to run",
        Duration::from_secs(20),
        async || {
            let request = GetInstanceRequest {
                name: "on-good-host".to_string(),
                stale: false,
            };
            let reply = connector
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.get_instance(request).await }
                })
                .await
                .map_err(|s| format!("GetInstance failed: {:?} {}", s.code(), s.message()))?;
            let instance = reply.instance.unwrap_or_default();
            if instance.observed_state == "running" {
                Ok(())
            } else {
                Err(format!("{instance:?}"))
            }
        },
    )
    .await;
}

/// Zone keys: put, linearizable get on a follower, compare-and-swap with a
/// matching and a mismatched expectation, and creation only when absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_keys_compare_and_swap() {
    use ccs::proto::zone::{CompareAndSwapKeyRequest, GetKeyRequest, PutKeyRequest};
    let options = ClusterOptions {
        agents: 0,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options).await;
    let connector = cluster.connector();
    let leader = cluster.leader_id().await;
    let follower = *cluster
        .live_controllers()
        .iter()
        .find(|id| **id != leader)
        .expect("a follower");

    let put = PutKeyRequest {
        key: "owner".into(),
        value: "alice".into(),
    };
    let written = connector
        .call_until(Duration::from_secs(20), |mut c| {
            let r = put.clone();
            async move { c.put_key(r).await }
        })
        .await
        .expect("put owner");
    assert!(written.modified_index > 0, "a put reports its log index");

    // A follower forwards the read to the leader, so it returns the put at once.
    let get = GetKeyRequest {
        key: "owner".into(),
        stale: false,
    };
    let read = cluster
        .connector_for(follower)
        .call(|mut c| {
            let r = get.clone();
            async move { c.get_key(r).await }
        })
        .await
        .expect("get owner on a follower");
    assert!(read.found);
    assert_eq!(read.value, "alice");
    assert_eq!(read.modified_index, written.modified_index);

    let swap = |expected: Option<&str>, value: &str| CompareAndSwapKeyRequest {
        key: "owner".into(),
        expected: expected.map(str::to_string),
        value: value.into(),
    };
    let swapped = connector
        .call(|mut c| async move { c.compare_and_swap_key(swap(Some("alice"), "bob")).await })
        .await
        .expect("swap alice for bob");
    assert_eq!(swapped.value, "bob");

    let stale = connector
        .call(|mut c| async move { c.compare_and_swap_key(swap(Some("alice"), "carol")).await })
        .await
        .expect_err("a swap expecting the old value fails");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert_eq!(reason(&stale), Some("CAS_MISMATCH"));
    assert!(
        stale.message().contains("\"bob\""),
        "message names the value held: {}",
        stale.message()
    );

    let exists = connector
        .call(|mut c| async move { c.compare_and_swap_key(swap(None, "dave")).await })
        .await
        .expect_err("create-if-absent fails on an existing key");
    assert_eq!(reason(&exists), Some("CAS_MISMATCH"));

    let fresh = CompareAndSwapKeyRequest {
        key: "new".into(),
        expected: None,
        value: "1".into(),
    };
    let created = connector
        .call(|mut c| {
            let r = fresh.clone();
            async move { c.compare_and_swap_key(r).await }
        })
        .await
        .expect("create-if-absent on a new key");
    assert_eq!(created.value, "1");

    let missing = GetKeyRequest {
        key: "never-written".into(),
        stale: false,
    };
    let absent = connector
        .call(|mut c| {
            let r = missing.clone();
            async move { c.get_key(r).await }
        })
        .await
        .expect("get a missing key");
    assert!(!absent.found);

    let empty = PutKeyRequest {
        key: String::new(),
        value: "x".into(),
    };
    let invalid = connector
        .call(|mut c| {
            let r = empty.clone();
            async move { c.put_key(r).await }
        })
        .await
        .expect_err("an empty key is invalid");
    assert_eq!(invalid.code(), Code::InvalidArgument);
}

/// Creates a pod, retrying while the zone has no leader.
async fn create_pod(connector: &ZoneConnector, request: &CreatePodRequest) -> Result<Pod, Status> {
    connector
        .call_until(START_TIMEOUT, |mut c| {
            let request = request.clone();
            async move { c.create_pod(request).await }
        })
        .await
}

/// A VLAN pod with the segmentation ids `first..=last`.
fn vlan_pod(name: &str, first: u32, last: u32) -> CreatePodRequest {
    CreatePodRequest {
        name: name.to_string(),
        network_mode: "vlan".to_string(),
        segmentation_first: Some(first),
        segmentation_last: Some(last),
        ..CreatePodRequest::default()
    }
}

/// Creates a network, retrying while the zone has no leader. A create
/// retried after an indeterminate status may come back NAME_TAKEN, which
/// fails these fault-free tests loudly rather than hiding a second apply.
async fn create_network(
    connector: &ZoneConnector,
    name: &str,
    pod: &str,
    cidr: &str,
) -> Result<Network, Status> {
    let request = CreateNetworkRequest {
        name: name.to_string(),
        pod: pod.to_string(),
        cidr: cidr.to_string(),
    };
    connector
        .call_until(START_TIMEOUT, |mut c| {
            let request = request.clone();
            async move { c.create_network(request).await }
        })
        .await
}

/// Creates networks `{prefix}-0` to `{prefix}-{count - 1}` in `pod`,
/// `parallel` at a time, and returns every one, failing on any error.
async fn create_networks(
    connector: &ZoneConnector,
    prefix: &str,
    pod: &str,
    count: usize,
    parallel: usize,
) -> Vec<Network> {
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    let results: Vec<(String, Result<Network, Status>)> = stream::iter(names)
        .map(|name| async move {
            let result = create_network(connector, &name, pod, "10.0.0.0/24").await;
            (name, result)
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    results
        .into_iter()
        .map(|(name, result)| {
            result.unwrap_or_else(|s| panic!("creating network {name} failed: {s:?}"))
        })
        .collect()
}

async fn list_networks(connector: &ZoneConnector) -> Vec<Network> {
    connector
        .call_until(START_TIMEOUT, |mut c| async move {
            c.list_networks(ReadRequest { stale: false }).await
        })
        .await
        .unwrap_or_else(|s| panic!("ListNetworks failed: {s:?}"))
        .networks
}

/// Concurrent network creates in one VLAN pod get distinct VLAN ids: the
/// lowest free ones, since apply allocates them one command at a time.
///
/// 1. Start 3 controllers and no agent; create the pod "tenants" with VLAN
///    ids 100 to 999.
/// 2. Create 200 networks, 16 at a time: every create succeeds.
/// 3. The 200 VLAN ids are distinct and are exactly 100 to 299.
/// 4. ListNetworks returns exactly the 200 networks, with the ids the
///    creates returned, in mode "vlan" and state "active".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_creates_get_distinct_vlans() {
    let options = ClusterOptions {
        agents: 0,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options).await;
    let connector = cluster.connector();
    create_pod(&connector, &vlan_pod("tenants", 100, 999))
        .await
        .unwrap_or_else(|s| panic!("creating pod \"tenants\" failed: {s:?}"));

    // Step 2.
    let created = create_networks(&connector, "tenant", "tenants", 200, 16).await;
    assert_eq!(created.len(), 200);

    // Step 3.
    let ids: BTreeSet<u32> = created.iter().map(|n| n.segmentation_id).collect();
    assert_eq!(ids.len(), 200, "two creates got the same VLAN id");
    assert_eq!(
        ids,
        (100..300).collect::<BTreeSet<u32>>(),
        "ids are not the lowest free ones"
    );

    // Step 4.
    let by_name: BTreeMap<String, u32> = created
        .iter()
        .map(|n| (n.name.clone(), n.segmentation_id))
        .collect();
    let listed = list_networks(&connector).await;
    let listed_by_name: BTreeMap<String, u32> = listed
        .iter()
        .map(|n| (n.name.clone(), n.segmentation_id))
        .collect();
    assert_eq!(
        listed.len(),
        200,
        "ListNetworks returned {} networks",
        listed.len()
    );
    assert_eq!(
        listed_by_name, by_name,
        "listed ids differ from the created ones"
    );
    for network in &listed {
        assert_eq!(network.pod, "tenants", "{network:?}");
        assert_eq!(network.mode, "vlan", "{network:?}");
        assert_eq!(network.state, "active", "{network:?}");
        assert_eq!(network.cidr, "10.0.0.0/24", "{network:?}");
    }
}

/// Checks that `status` is the range-exhausted error of `pod` over `range`.
fn assert_range_exhausted(status: &Status, pod: &str, range: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(status), Some("RANGE_EXHAUSTED"), "{status:?}");
    let message = status.message();
    assert!(
        message.contains(&format!("{pod:?}")),
        "message does not name the pod: {message}"
    );
    assert!(
        message.contains(range),
        "message does not name the range {range}: {message}"
    );
    assert!(
        message.contains("delete networks"),
        "message does not say what to do: {message}"
    );
}

/// Running out of VLAN ids is a clear error, and a delete frees exactly
/// the deleted network's id.
///
/// 1. Start 3 controllers and no agent; create the pods "tiny" (VLAN ids
///    1 to 5) and "full" (VLAN ids 1 to 4094).
/// 2. Create 5 networks in "tiny"; the 6th fails with RANGE_EXHAUSTED,
///    naming the pod and the range 1..5.
/// 3. Create 4094 networks in "full", 32 at a time, and print how long it
///    took: every create succeeds, with the ids 1 to 4094.
/// 4. The 4095th fails with RANGE_EXHAUSTED, naming "full" and 1..4094.
/// 5. Delete the network that has id 2000: the next create gets 2000,
///    and the one after fails with RANGE_EXHAUSTED again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vlan_range_exhaustion_is_reported() {
    let options = ClusterOptions {
        agents: 0,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options).await;
    let connector = cluster.connector();
    for request in [vlan_pod("tiny", 1, 5), vlan_pod("full", 1, 4094)] {
        create_pod(&connector, &request)
            .await
            .unwrap_or_else(|s| panic!("creating pod {} failed: {s:?}", request.name));
    }

    // Step 2.
    let tiny = create_networks(&connector, "tiny", "tiny", 5, 5).await;
    let tiny_ids: BTreeSet<u32> = tiny.iter().map(|n| n.segmentation_id).collect();
    assert_eq!(tiny_ids, (1..=5).collect::<BTreeSet<u32>>());
    let sixth = create_network(&connector, "tiny-6", "tiny", "10.0.0.0/24")
        .await
        .expect_err("the 6th network in a 5-id range was created");
    assert_range_exhausted(&sixth, "tiny", "1..5");

    // Step 3.
    let started = std::time::Instant::now();
    let full = create_networks(&connector, "full", "full", 4094, 32).await;
    let elapsed = started.elapsed();
    eprintln!(
        "4094 network creates, 32 at a time, took {:.1} s ({:.0} per second)",
        elapsed.as_secs_f64(),
        4094.0 / elapsed.as_secs_f64()
    );
    let full_ids: BTreeSet<u32> = full.iter().map(|n| n.segmentation_id).collect();
    assert_eq!(
        full_ids,
        (1..=4094).collect::<BTreeSet<u32>>(),
        "ids are not exactly 1 to 4094"
    );

    // Step 4.
    let extra = create_network(&connector, "full-4095th", "full", "10.0.0.0/24")
        .await
        .expect_err("the 4095th network in a 4094-id range was created");
    assert_range_exhausted(&extra, "full", "1..4094");

    // Step 5.
    let holder = full
        .iter()
        .find(|n| n.segmentation_id == 2000)
        .expect("a network has id 2000");
    let request = NetworkRef {
        name: holder.name.clone(),
    };
    let deleted = connector
        .call_until(START_TIMEOUT, |mut c| {
            let request = request.clone();
            async move { c.delete_network(request).await }
        })
        .await
        .unwrap_or_else(|s| panic!("deleting {} failed: {s:?}", holder.name));
    assert_eq!(deleted.segmentation_id, 2000);
    assert_eq!(deleted.state, "deleting");
    // The id is released once every host of the pod has reported since the
    // delete without the network, which takes a heartbeat or two.
    let reused = wait_for("the deleted network's id to be released", Duration::from_secs(20), async || {
        create_network(&connector, "full-reuse", "full", "10.0.0.0/24")
            .await
            .map_err(|s| format!("creating a network after a delete failed: {s:?}"))
    })
    .await;
    assert_eq!(
        reused.segmentation_id, 2000,
        "the freed id was not the one reused"
    );
    let again = create_network(&connector, "full-again", "full", "10.0.0.0/24")
        .await
        .expect_err("a delete freed more than one id");
    assert_range_exhausted(&again, "full", "1..4094");
}

/// A pod or network request the zone must reject, with its reason.
struct InvalidCase<T> {
    case: &'static str,
    request: T,
    reason: &'static str,
}

/// Invalid pods and networks are rejected with the documented reason and
/// leave nothing behind; valid pods show their attributes and defaults.
///
/// 1. Start 3 controllers and no agent.
/// 2. Send each invalid pod of the table: INVALID_ARGUMENT.
/// 3. Create a SAN pod with a VXLAN range and show it: every attribute is
///    as requested. Show the fixture's pod, created with no attribute:
///    DAS, "general", storage ratio 1, VLAN ids 1 to 4094.
/// 4. ListPods lists only those two pods.
/// 5. Send each invalid network create and delete of the second table,
///    with its reason; ListNetworks is then empty but for "taken".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_pods_and_networks_are_rejected() {
    let options = ClusterOptions {
        agents: 0,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options).await;
    let connector = cluster.connector();

    // Step 2.
    let pod = |name: &str| CreatePodRequest {
        name: name.to_string(),
        ..CreatePodRequest::default()
    };
    let invalid = "INVALID_ARGUMENT";
    let pods = [
        InvalidCase {
            case: "first after last",
            request: vlan_pod("reversed", 200, 100),
            reason: invalid,
        },
        InvalidCase {
            case: "VLAN id 0",
            request: vlan_pod("vlan-zero", 0, 100),
            reason: invalid,
        },
        InvalidCase {
            case: "VLAN id 4095",
            request: vlan_pod("vlan-4095", 1, 4095),
            reason: invalid,
        },
        InvalidCase {
            case: "VNI beyond 24 bits",
            request: CreatePodRequest {
                network_mode: "vxlan".into(),
                segmentation_first: Some(1),
                segmentation_last: Some(1 << 24),
                ..pod("vni-25-bits")
            },
            reason: invalid,
        },
        InvalidCase {
            case: "san without san_agent",
            request: CreatePodRequest {
                storage: "san".into(),
                ..pod("san-alone")
            },
            reason: invalid,
        },
        InvalidCase {
            case: "das with san_agent",
            request: CreatePodRequest {
                san_agent: "array-1".into(),
                ..pod("das-agent")
            },
            reason: invalid,
        },
        InvalidCase {
            case: "unknown storage model",
            request: CreatePodRequest {
                storage: "nfs".into(),
                ..pod("nfs")
            },
            reason: invalid,
        },
        InvalidCase {
            case: "unknown network mode",
            request: CreatePodRequest {
                network_mode: "geneve".into(),
                ..pod("geneve")
            },
            reason: invalid,
        },
        InvalidCase {
            case: "cpu ratio 0",
            request: CreatePodRequest {
                cpu_ratio: Some(0.0),
                ..pod("cpu-zero")
            },
            reason: invalid,
        },
        InvalidCase {
            case: "storage ratio 100",
            request: CreatePodRequest {
                storage_ratio: Some(100.0),
                ..pod("disk-100")
            },
            reason: invalid,
        },
        InvalidCase {
            case: "existing pod",
            request: pod(POD),
            reason: "POD_EXISTS",
        },
    ];
    for case in &pods {
        let status = create_pod(&connector, &case.request)
            .await
            .expect_err(&format!("{}: the pod was created", case.case));
        assert_eq!(
            reason(&status),
            Some(case.reason),
            "{}: {status:?}",
            case.case
        );
    }

    // Step 3.
    let san = CreatePodRequest {
        name: "san-overlay".into(),
        cpu_ratio: Some(4.0),
        storage: "san".into(),
        san_agent: "array-1".into(),
        workload_class: "gpu".into(),
        storage_ratio: Some(2.5),
        network_mode: "vxlan".into(),
        segmentation_first: Some(5000),
        segmentation_last: Some(16_777_215),
        ..CreatePodRequest::default()
    };
    create_pod(&connector, &san)
        .await
        .unwrap_or_else(|s| panic!("creating the SAN pod failed: {s:?}"));
    let show = |name: &str| {
        let request = GetPodRequest {
            name: name.to_string(),
            stale: false,
        };
        let connector = &connector;
        async move {
            connector
                .call_until(START_TIMEOUT, |mut c| {
                    let request = request.clone();
                    async move { c.get_pod(request).await }
                })
                .await
                .unwrap_or_else(|s| panic!("GetPod failed: {s:?}"))
                .pod
                .expect("GetPod returns a pod")
        }
    };
    let shown = show("san-overlay").await;
    let expected = Pod {
        name: "san-overlay".into(),
        cpu_ratio: 4.0,
        memory_ratio: 1.0,
        placement: "pack".into(),
        storage: "san".into(),
        san_agent: "array-1".into(),
        workload_class: "gpu".into(),
        storage_ratio: 2.5,
        network_mode: "vxlan".into(),
        segmentation_first: 5000,
        segmentation_last: 16_777_215,
    };
    assert_eq!(shown, expected);
    let fixture = show(POD).await;
    assert_eq!(fixture.storage, "das");
    assert_eq!(fixture.san_agent, "");
    assert_eq!(fixture.workload_class, "general");
    assert_eq!(fixture.storage_ratio, 1.0);
    assert_eq!(fixture.network_mode, "vlan");
    assert_eq!(
        (fixture.segmentation_first, fixture.segmentation_last),
        (1, 4094)
    );

    // Step 4.
    let listed = connector
        .call_until(START_TIMEOUT, |mut c| async move {
            c.list_pods(ReadRequest { stale: false }).await
        })
        .await
        .unwrap_or_else(|s| panic!("ListPods failed: {s:?}"))
        .pods;
    let names: Vec<&str> = listed.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [POD, "san-overlay"],
        "rejected pods left records behind"
    );

    // Step 5.
    create_network(&connector, "taken", POD, "10.0.0.0/24")
        .await
        .unwrap_or_else(|s| panic!("creating \"taken\" failed: {s:?}"));
    let network = |name: &str, pod: &str, cidr: &str| CreateNetworkRequest {
        name: name.into(),
        pod: pod.into(),
        cidr: cidr.into(),
    };
    let networks = [
        InvalidCase {
            case: "host bits set",
            request: network("host-bits", POD, "10.0.0.1/24"),
            reason: invalid,
        },
        InvalidCase {
            case: "prefix /31",
            request: network("slash-31", POD, "10.0.0.0/31"),
            reason: invalid,
        },
        InvalidCase {
            case: "prefix /7",
            request: network("slash-7", POD, "10.0.0.0/7"),
            reason: invalid,
        },
        InvalidCase {
            case: "IPv6",
            request: network("ipv6", POD, "fd00::/64"),
            reason: invalid,
        },
        InvalidCase {
            case: "no prefix",
            request: network("bare", POD, "10.0.0.0"),
            reason: invalid,
        },
        InvalidCase {
            case: "upper-case name",
            request: network("Upper", POD, "10.0.0.0/24"),
            reason: invalid,
        },
        InvalidCase {
            case: "unknown pod",
            request: network("lost", "no-such-pod", "10.0.0.0/24"),
            reason: "POD_NOT_FOUND",
        },
        InvalidCase {
            case: "taken name",
            request: network("taken", POD, "10.1.0.0/16"),
            reason: "NAME_TAKEN",
        },
    ];
    for case in &networks {
        let request = &case.request;
        let status = create_network(&connector, &request.name, &request.pod, &request.cidr)
            .await
            .expect_err(&format!("{}: the network was created", case.case));
        assert_eq!(
            reason(&status),
            Some(case.reason),
            "{}: {status:?}",
            case.case
        );
    }
    let missing = connector
        .call_until(START_TIMEOUT, |mut c| async move {
            c.delete_network(NetworkRef {
                name: "never-created".into(),
            })
            .await
        })
        .await
        .expect_err("deleting a missing network succeeded");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert_eq!(reason(&missing), Some("NETWORK_NOT_FOUND"), "{missing:?}");
    let names: Vec<String> = list_networks(&connector)
        .await
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["taken"], "rejected creates left networks behind");
}
