//! Placement: a pure function from a request and a view of the zone to a
//! host. It does no I/O and keeps no state; the leader proposes its
//! decision as a command, and apply checks capacity again, so a decision
//! made on a stale view is rejected rather than applied.
//!
//! Filters: requested pod, host health, capacity after the pod's
//! oversubscription ratios. Weigher: per pod, pack (prefer the fullest host
//! that fits) or spread (prefer the emptiest). Ties go to the smaller host id
//! so that equal views give equal decisions.

use std::collections::BTreeMap;

use crate::zone::model::{Host, HostHealth, Placement, Pod};

#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    /// Restrict placement to this pod.
    pub pod: Option<&'a str>,
    /// Restrict placement to this host (an instance with DAS volumes).
    pub host: Option<&'a str>,
    /// Never choose this host (the source of a migration).
    pub avoid: Option<&'a str>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub host: String,
    pub pod: String,
}

/// Capacity held by decisions that are proposed but not yet applied.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reserved {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

/// Chooses a host for `request`, or `None` when no healthy host has room.
pub fn place(
    request: &Request,
    pods: &BTreeMap<String, Pod>,
    hosts: &[Host],
    reserved: &BTreeMap<String, Reserved>,
) -> Option<Decision> {
    let mut best: Option<(f64, &Host)> = None;
    for host in hosts {
        if request.pod.is_some_and(|pod| pod != host.pod)
            || request.host.is_some_and(|id| id != host.id)
            || request.avoid == Some(host.id.as_str())
            || host.health != HostHealth::Up
        {
            continue;
        }
        let Some(pod) = pods.get(&host.pod) else {
            continue;
        };
        let held = reserved.get(&host.id).copied().unwrap_or_default();
        let mut view = host.clone();
        view.used_vcpus += held.vcpus;
        view.used_memory_mib += held.memory_mib;
        view.used_disk_gib += held.disk_gib;
        if !view.fits(pod, request.vcpus, request.memory_mib, request.disk_gib) {
            continue;
        }
        let score = weigh(&view, pod, request);
        // Hosts arrive sorted by id, so a strict comparison keeps the smaller id on ties.
        if best.is_none_or(|(best_score, _)| score > best_score) {
            best = Some((score, host));
        }
    }
    best.map(|(_, host)| Decision {
        host: host.id.clone(),
        pod: host.pod.clone(),
    })
}

/// Scores a host for a request; higher is better.
fn weigh(host: &Host, pod: &Pod, request: &Request) -> f64 {
    let cpu_after =
        (f64::from(host.used_vcpus) + f64::from(request.vcpus)) / host.vcpu_limit(pod).max(1) as f64;
    let memory_after = (host.used_memory_mib + request.memory_mib) as f64
        / host.memory_limit_mib(pod).max(1) as f64;
    let utilisation = cpu_after.max(memory_after);
    match pod.placement {
        Placement::Pack => utilisation,
        Placement::Spread => 1.0 - utilisation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, placement: Placement) -> Pod {
        Pod {
            name: name.into(),
            cpu_ratio: 2.0,
            memory_ratio: 1.0,
            placement,
        }
    }

    fn host(id: &str, pod: &str, used_vcpus: u32) -> Host {
        Host {
            id: id.into(),
            pod: pod.into(),
            libvirt_uri: "test:///default".into(),
            agent_endpoint: "127.0.0.1:1".into(),
            cpus: 8,
            memory_mib: 32768,
            disk_gib: 1000,
            used_vcpus,
            used_memory_mib: 0,
            used_disk_gib: 0,
            instances: 0,
            health: HostHealth::Up,
            boot_id: 1,
        }
    }

    fn request(vcpus: u32) -> Request<'static> {
        Request {
            host: None,
            avoid: None,
            vcpus,
            memory_mib: 1024,
            disk_gib: 10,
            pod: None,
        }
    }

    fn pods(placement: Placement) -> BTreeMap<String, Pod> {
        BTreeMap::from([("p".to_string(), pod("p", placement))])
    }

    #[test]
    fn pack_prefers_fullest_host() {
        let hosts = [host("a", "p", 2), host("b", "p", 10)];
        let decision = place(&request(2), &pods(Placement::Pack), &hosts, &BTreeMap::new());
        assert_eq!(decision.expect("a host fits").host, "b");
    }

    #[test]
    fn spread_prefers_emptiest_host() {
        let hosts = [host("a", "p", 2), host("b", "p", 10)];
        let decision = place(&request(2), &pods(Placement::Spread), &hosts, &BTreeMap::new());
        assert_eq!(decision.expect("a host fits").host, "a");
    }

    #[test]
    fn oversubscription_limits_capacity() {
        // 8 CPUs at ratio 2.0 give 16 schedulable vCPUs.
        let hosts = [host("a", "p", 14)];
        let pods = pods(Placement::Pack);
        assert!(place(&request(2), &pods, &hosts, &BTreeMap::new()).is_some());
        assert!(place(&request(3), &pods, &hosts, &BTreeMap::new()).is_none());
    }

    #[test]
    fn suspect_host_is_skipped() {
        let mut suspect = host("a", "p", 0);
        suspect.health = HostHealth::Suspect;
        let hosts = [suspect, host("b", "p", 0)];
        let decision = place(&request(1), &pods(Placement::Pack), &hosts, &BTreeMap::new());
        assert_eq!(decision.expect("b fits").host, "b");
    }

    #[test]
    fn reservations_count_against_capacity() {
        let hosts = [host("a", "p", 0)];
        let reserved = BTreeMap::from([(
            "a".to_string(),
            Reserved {
                vcpus: 15,
                memory_mib: 0,
                disk_gib: 0,
            },
        )]);
        assert!(place(&request(2), &pods(Placement::Pack), &hosts, &reserved).is_none());
    }

    #[test]
    fn requested_pod_filters_hosts() {
        let mut all = pods(Placement::Pack);
        all.insert("q".into(), pod("q", Placement::Pack));
        let hosts = [host("a", "p", 0), host("b", "q", 0)];
        let mut wanted = request(1);
        wanted.pod = Some("q");
        let decision = place(&wanted, &all, &hosts, &BTreeMap::new());
        assert_eq!(decision.expect("b fits").host, "b");
    }
}
