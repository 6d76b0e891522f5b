//! Client connections to a zone: a list of controller endpoints tried in
//! turn, following the leader hint that a replica returns when it cannot
//! serve a call itself. Used by the CLI, the agent and the dev demo.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::proto::zone::zone_client::ZoneClient;

/// The controllers of the local `ccs dev` cloud.
pub const DEV_ENDPOINTS: &str = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103";

/// Metadata key holding the machine-readable reason of an error status.
pub const REASON_KEY: &str = "ccs-reason";
/// Metadata key holding the leader's address on a `NOT_LEADER` status.
pub const LEADER_KEY: &str = "ccs-leader";

#[derive(Clone)]
pub struct ZoneConnector {
    endpoints: Arc<Vec<String>>,
    /// Index into `endpoints`, or an address learned from a leader hint.
    preferred: Arc<Mutex<Option<String>>>,
    timeout: Duration,
}

/// Returns the reason code of an error status, if the server attached one.
pub fn reason(status: &tonic::Status) -> Option<&str> {
    status.metadata().get(REASON_KEY).and_then(|v| v.to_str().ok())
}

fn leader_hint(status: &tonic::Status) -> Option<String> {
    let hint = status.metadata().get(LEADER_KEY)?.to_str().ok()?;
    (!hint.is_empty()).then(|| hint.to_string())
}

/// Returns whether another controller may serve a call that this one failed.
fn try_elsewhere(status: &tonic::Status) -> bool {
    // Another controller cannot help with a host that does not respond to
    // the leader, because the leader would call the same host.
    if reason(status) == Some("HOST_UNREACHABLE") {
        return false;
    }
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

/// Returns whether tonic failed to open a connection, so the call never left.
pub fn is_connect_failure(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && reason(status).is_none()
        && (status.message().contains("tcp connect error") || status.message().contains("dns error"))
}

pub fn channel(addr: &str, timeout: Duration) -> Result<Channel, tonic::Status> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| tonic::Status::invalid_argument(format!("invalid endpoint {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}

impl ZoneConnector {
    /// Parses a comma-separated list of `host:port` controller addresses.
    pub fn new(endpoints: &str, timeout: Duration) -> Result<ZoneConnector, String> {
        let list: Vec<String> = endpoints
            .split(',')
            .map(|e| e.trim().trim_start_matches("http://").to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if list.is_empty() {
            return Err(format!(
                "endpoint list {endpoints:?} is empty; give controller addresses as host:port,host:port"
            ));
        }
        Ok(ZoneConnector {
            endpoints: Arc::new(list),
            preferred: Arc::new(Mutex::new(None)),
            timeout,
        })
    }

    /// Runs `call` against the preferred controller, then the others in
    /// turn, until one answers with anything but "unavailable".
    ///
    /// A call that failed with a status meaning "may have happened" is
    /// retried on the next controller too, so callers must pass calls that
    /// are safe to repeat (reads, or writes carrying a request id).
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(ZoneClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut order: Vec<String> = Vec::new();
        if let Some(preferred) = self.preferred.lock().expect("lock poisoned").clone() {
            order.push(preferred);
        }
        order.extend(self.endpoints.iter().cloned());
        let mut last_error = None;
        let mut tried: Vec<String> = Vec::new();
        let mut position = 0;
        while position < order.len() {
            let addr = order[position].clone();
            position += 1;
            if tried.contains(&addr) {
                continue;
            }
            tried.push(addr.clone());
            let client = ZoneClient::new(channel(&addr, self.timeout)?);
            match call(client).await {
                Ok(response) => {
                    *self.preferred.lock().expect("lock poisoned") = Some(addr);
                    return Ok(response.into_inner());
                }
                Err(status) if try_elsewhere(&status) => {
                    if let Some(hint) = leader_hint(&status) {
                        order.insert(position, hint);
                    }
                    last_error = Some(status);
                }
                Err(status) => return Err(status),
            }
        }
        let endpoints = self.endpoints.join(",");
        Err(match last_error {
            // A connect failure names the endpoint list, which is what the caller can fix.
            Some(status) if is_connect_failure(&status) => tonic::Status::unavailable(format!(
                "no controller reachable at {endpoints}: {}; check --endpoint or CCS_ENDPOINT \
                 (the default is the local `ccs dev` cloud)",
                status.message()
            )),
            Some(status) => status,
            None => tonic::Status::unavailable(format!("no controller at {endpoints} answered")),
        })
    }

    /// Like `call`, but keeps retrying unavailable zones until `deadline` passes.
    pub async fn call_until<T, F, Fut>(&self, deadline: Duration, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(ZoneClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let start = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(50);
        loop {
            match self.call(&mut call).await {
                Err(status) if try_elsewhere(&status) && start.elapsed() < deadline => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }
}
