//! Fencing drivers: how the leader makes sure a suspect host runs nothing
//! before the host's SAN instances restart elsewhere.
//!
//! A driver powers the host off and reports what it did. Only then does the
//! leader propose `FenceHost`, and apply lets an instance of that host
//! restart elsewhere only once that command is committed. A driver that
//! fails, or no driver at all, leaves the host suspect and its instances
//! where they are.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use crate::config::FencingConfig;
use crate::zone::model::Host;

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("fencing command {program:?} for host {host:?} could not start: {source}")]
    Spawn {
        program: String,
        host: String,
        source: std::io::Error,
    },
    #[error("fencing command {program:?} for host {host:?} exited with {status}: {stderr}")]
    Failed {
        program: String,
        host: String,
        status: String,
        stderr: String,
    },
    #[error("fencing command {program:?} for host {host:?} did not finish within {timeout:?}; it was killed")]
    TimedOut {
        program: String,
        host: String,
        timeout: Duration,
    },
    #[error("recording the fence of host {host:?} in {path} failed: {source}")]
    Record {
        host: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Powers a host off. `fence` returns only once the host is off, with a
/// description of how, which the zone records with the fence.
#[tonic::async_trait]
pub trait FenceDriver: Send + Sync {
    async fn fence(&self, host: &Host) -> Result<String, FenceError>;
}

/// Returns the configured driver, or `None` for "none".
pub fn driver(config: &FencingConfig) -> Option<Arc<dyn FenceDriver>> {
    match config.driver.as_str() {
        "command" => Some(Arc::new(CommandDriver {
            command: config.command.clone(),
            timeout: config.timeout,
        })),
        "test" => config.record_file.clone().map(|path| Arc::new(TestDriver { path }) as Arc<dyn FenceDriver>),
        _ => None,
    }
}

/// Runs an operator's program (a wrapper around ipmitool, a Redfish client
/// or a PDU) with the host id as its last argument. Exit status 0 means the
/// host is powered off. The program also gets the host's details in
/// CCS_HOST_ID, CCS_HOST_POD, CCS_LIBVIRT_URI and CCS_AGENT_ENDPOINT.
struct CommandDriver {
    command: Vec<String>,
    timeout: Duration,
}

#[tonic::async_trait]
impl FenceDriver for CommandDriver {
    async fn fence(&self, host: &Host) -> Result<String, FenceError> {
        let program = self.command[0].clone();
        let child = tokio::process::Command::new(&program)
            .args(&self.command[1..])
            .arg(&host.id)
            .env("CCS_HOST_ID", &host.id)
            .env("CCS_HOST_POD", &host.pod)
            .env("CCS_LIBVIRT_URI", &host.libvirt_uri)
            .env("CCS_AGENT_ENDPOINT", &host.agent_endpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| FenceError::Spawn {
                program: program.clone(),
                host: host.id.clone(),
                source,
            })?;
        let output = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(source)) => {
                return Err(FenceError::Spawn {
                    program,
                    host: host.id.clone(),
                    source,
                })
            }
            Err(_) => {
                return Err(FenceError::TimedOut {
                    program,
                    host: host.id.clone(),
                    timeout: self.timeout,
                })
            }
        };
        if !output.status.success() {
            return Err(FenceError::Failed {
                program,
                host: host.id.clone(),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
        Ok(format!("command {program:?} powered the host off: {stdout}"))
    }
}

/// For clouds on libvirt's test driver, whose hosts have no power to cut:
/// appends the fence to a file (one JSON line, synced) and reports success.
/// Tests read the file to check that no restart preceded its fence.
struct TestDriver {
    path: PathBuf,
}

#[tonic::async_trait]
impl FenceDriver for TestDriver {
    async fn fence(&self, host: &Host) -> Result<String, FenceError> {
        let record_error = |source| FenceError::Record {
            host: host.id.clone(),
            path: self.path.clone(),
            source,
        };
        let line = serde_json::json!({
            "host": host.id,
            "pod": host.pod,
            "time_unix_ns": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        });
        let path = self.path.clone();
        let write = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
            writeln!(file, "{line}")?;
            file.sync_all()
        });
        match write.await {
            Ok(result) => result.map_err(record_error)?,
            Err(e) => return Err(record_error(std::io::Error::other(e.to_string()))),
        }
        Ok(format!("test driver recorded the fence in {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zone::model::HostHealth;

    fn host() -> Host {
        Host {
            id: "host-7".into(),
            pod: "pod-s".into(),
            libvirt_uri: "test:///default".into(),
            agent_endpoint: "127.0.0.1:1".into(),
            cpus: 4,
            memory_mib: 4096,
            disk_gib: 10,
            used_vcpus: 0,
            used_memory_mib: 0,
            used_disk_gib: 0,
            instances: 0,
            health: HostHealth::Suspect,
            boot_id: 1,
        }
    }

    fn config(driver: &str, command: &[&str], record_file: Option<PathBuf>) -> FencingConfig {
        FencingConfig {
            driver: driver.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            record_file,
            timeout: Duration::from_secs(5),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn command_driver_passes_the_host_and_reports_failure() {
        let ok = driver(&config("command", &["sh", "-c", "echo off $0 $CCS_HOST_POD"], None)).unwrap();
        let method = ok.fence(&host()).await.unwrap();
        assert!(method.contains("off host-7 pod-s"), "{method}");

        let failing = driver(&config("command", &["sh", "-c", "echo no BMC >&2; exit 3"], None)).unwrap();
        let error = failing.fence(&host()).await.unwrap_err().to_string();
        assert!(error.contains("host-7"), "{error}");
        assert!(error.contains("no BMC"), "{error}");
    }

    #[tokio::test]
    async fn command_driver_times_out() {
        let mut slow = config("command", &["sh", "-c", "sleep 10"], None);
        slow.timeout = Duration::from_millis(100);
        let error = driver(&slow).unwrap().fence(&host()).await.unwrap_err();
        assert!(matches!(error, FenceError::TimedOut { .. }), "{error}");
    }

    #[tokio::test]
    async fn test_driver_appends_a_line_per_fence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fences.jsonl");
        let test = driver(&config("test", &[], Some(path.clone()))).unwrap();
        test.fence(&host()).await.unwrap();
        test.fence(&host()).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["host"], "host-7");
        assert!(driver(&config("none", &[], None)).is_none());
    }
}
