//! The hypervisor seen by a host agent, behind one trait. Only this module
//! imports `virt`; the rest of ccs speaks `Hypervisor`.
//!
//! libvirt calls block, so callers run them on a blocking thread. One
//! libvirt connection is kept for the agent's lifetime because the test
//! driver (`test:///…`) keeps its domains in the connection that opened it.

use std::sync::Mutex;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::ErrorNumber;

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("libvirt {operation} failed: {message}")]
    Libvirt {
        operation: &'static str,
        message: String,
    },
}

/// CPU and memory of a host, as the hypervisor reports them.
#[derive(Clone, Copy, Debug)]
pub struct NodeCapacity {
    pub cpus: u32,
    pub memory_mib: u64,
}

/// The state of one domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainRunState {
    Running,
    Stopped,
    Absent,
}

impl DomainRunState {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainRunState::Running => "running",
            DomainRunState::Stopped => "stopped",
            DomainRunState::Absent => "absent",
        }
    }
}

/// The definition of a domain to create.
#[derive(Clone, Debug)]
pub struct DomainSpec {
    /// The instance id, used as the domain UUID.
    pub uuid: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
}

#[derive(Clone, Debug)]
pub struct DomainSummary {
    pub uuid: String,
    pub name: String,
    pub state: DomainRunState,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// The operations an agent needs from a hypervisor. Each one is idempotent.
pub trait Hypervisor: Send + Sync {
    fn capacity(&self) -> Result<NodeCapacity, HypervisorError>;
    /// Defines the domain if absent and starts it if it is not running.
    /// Returns the state the domain was in before the call.
    fn ensure_running(&self, spec: &DomainSpec) -> Result<DomainRunState, HypervisorError>;
    /// Stops and undefines the domain if present. Returns its previous state.
    fn ensure_absent(&self, uuid: &str) -> Result<DomainRunState, HypervisorError>;
    fn list_domains(&self) -> Result<Vec<DomainSummary>, HypervisorError>;
}

/// A hypervisor reached through libvirt.
pub struct Libvirt {
    connection: Mutex<Connect>,
}

fn libvirt_error(operation: &'static str) -> impl Fn(virt::error::Error) -> HypervisorError {
    move |e| HypervisorError::Libvirt {
        operation,
        message: e.message().to_string(),
    }
}

impl Libvirt {
    /// Opens a connection to `uri`. libvirt's default error callback,
    /// which prints to stderr, is switched off first.
    pub fn open(uri: &str) -> Result<Libvirt, HypervisorError> {
        virt::error::clear_error_callback();
        let connection = Connect::open(Some(uri)).map_err(libvirt_error("connect"))?;
        Ok(Libvirt {
            connection: Mutex::new(connection),
        })
    }

    fn lookup(connection: &Connect, uuid: &str) -> Result<Option<Domain>, HypervisorError> {
        match connection.lookup_domain_by_uuid_string(uuid) {
            Ok(domain) => Ok(Some(domain)),
            Err(e) if e.code() == ErrorNumber::NoDomain.into() => Ok(None),
            Err(e) => Err(libvirt_error("lookup domain")(e)),
        }
    }

    fn run_state(domain: &Domain) -> Result<DomainRunState, HypervisorError> {
        // `info()` reports errors; `state()` would swallow some of them.
        let info = domain.info().map_err(libvirt_error("domain info"))?;
        let running = matches!(
            Result::<DomainState, _>::from(info.state),
            Ok(DomainState::Running | DomainState::Blocked | DomainState::Paused)
        );
        Ok(if running {
            DomainRunState::Running
        } else {
            DomainRunState::Stopped
        })
    }

    fn domain_xml(spec: &DomainSpec, domain_type: &str) -> String {
        format!(
            "<domain type='{domain_type}'>\
               <name>{name}</name><uuid>{uuid}</uuid>\
               <memory unit='MiB'>{memory}</memory>\
               <vcpu>{vcpus}</vcpu>\
               <os><type arch='x86_64'>hvm</type></os>\
             </domain>",
            name = xml_escape(&spec.name),
            uuid = spec.uuid,
            memory = spec.memory_mib,
            vcpus = spec.vcpus,
        )
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

impl Hypervisor for Libvirt {
    fn capacity(&self) -> Result<NodeCapacity, HypervisorError> {
        let connection = self.connection.lock().expect("libvirt lock poisoned");
        let info = connection.node_info().map_err(libvirt_error("node info"))?;
        Ok(NodeCapacity {
            cpus: info.cpus,
            memory_mib: info.memory / 1024,
        })
    }

    fn ensure_running(&self, spec: &DomainSpec) -> Result<DomainRunState, HypervisorError> {
        let connection = self.connection.lock().expect("libvirt lock poisoned");
        let (domain, before) = match Self::lookup(&connection, &spec.uuid)? {
            Some(domain) => {
                let state = Self::run_state(&domain)?;
                (domain, state)
            }
            None => {
                let uri = connection.uri().map_err(libvirt_error("connection uri"))?;
                let domain_type = if uri.starts_with("test:") { "test" } else { "kvm" };
                let xml = Self::domain_xml(spec, domain_type);
                let domain = connection.define_domain_xml(&xml).map_err(libvirt_error("define domain"))?;
                (domain, DomainRunState::Absent)
            }
        };
        if before != DomainRunState::Running {
            domain.create().map_err(libvirt_error("start domain"))?;
        }
        Ok(before)
    }

    fn ensure_absent(&self, uuid: &str) -> Result<DomainRunState, HypervisorError> {
        let connection = self.connection.lock().expect("libvirt lock poisoned");
        let Some(domain) = Self::lookup(&connection, uuid)? else {
            return Ok(DomainRunState::Absent);
        };
        let before = Self::run_state(&domain)?;
        if before == DomainRunState::Running {
            domain.destroy().map_err(libvirt_error("destroy domain"))?;
        }
        domain.undefine().map_err(libvirt_error("undefine domain"))?;
        Ok(before)
    }

    fn list_domains(&self) -> Result<Vec<DomainSummary>, HypervisorError> {
        let connection = self.connection.lock().expect("libvirt lock poisoned");
        let domains = connection
            .list_all_domains(0)
            .map_err(libvirt_error("list domains"))?;
        let mut out = Vec::with_capacity(domains.len());
        for domain in domains {
            let info = domain.info().map_err(libvirt_error("domain info"))?;
            out.push(DomainSummary {
                uuid: domain.uuid_string().map_err(libvirt_error("domain uuid"))?,
                name: domain.name().map_err(libvirt_error("domain name"))?,
                state: Self::run_state(&domain)?,
                vcpus: info.nr_virt_cpu,
                memory_mib: info.memory / 1024,
            });
        }
        Ok(out)
    }
}
