//! MIGRATE on the source host's agent.
//!
//! Where libvirt can migrate, the domain moves live through libvirt
//! (peer to peer, persistent on the destination, undefined here). libvirt's
//! test driver cannot migrate, so there the agent emulates it with orders to
//! the destination's agent, carrying the same order id, leader id, zone and
//! devices: DEFINE there, stop here, START there, undefine here. The domain
//! is defined on both hosts for a moment but never runs on both, and it
//! ends running on the destination even when it was stopped here.
//!
//! The local steps each pass the fence on their own, and no local lock is
//! held while the destination is called, so two agents migrating domains
//! to each other cannot wait on each other. A retried order finishes from
//! where the first attempt stopped: a domain already gone from this host
//! only needs START on the destination. A destination that rejects DEFINE
//! or START, or cannot be reached, fails the order, and the domain runs
//! here again if it ran before.

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic::{Code, Status};

use super::order::{Destination, Outcome};
use super::{AgentService, OrderContext};
use crate::hypervisor::{DomainRunState, DomainSpec};
use crate::proto::agent::agent_client::AgentClient;
use crate::proto::agent::{Order, OrderAction, OrderResult};

/// Connect timeout for the destination agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Per-call timeout for DEFINE and START on the destination agent.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a MIGRATE order on the source host.
pub(super) async fn migrate(
    service: &AgentService,
    context: &OrderContext,
    order: &Order,
    spec: &DomainSpec,
    destination: &Destination,
) -> Result<Outcome, Status> {
    if service.hypervisor.can_migrate() {
        return libvirt_migrate(service, context, spec, destination).await;
    }
    emulate(service, context, order, spec, destination).await
}

async fn libvirt_migrate(
    service: &AgentService,
    context: &OrderContext,
    spec: &DomainSpec,
    destination: &Destination,
) -> Result<Outcome, Status> {
    let _admitted = service.admit(context).await?;
    let uuid = spec.uuid.clone();
    let uri = destination.libvirt_uri.clone();
    let moved = service.blocking(move |h| h.migrate(&uuid, &uri)).await?;
    service.record(
        context,
        moved.before.as_str(),
        DomainRunState::Absent.as_str(),
    );
    service.remove_unused_networks().await;
    Ok(Outcome {
        before: moved.before.as_str().to_string(),
        after: moved.after.as_str().to_string(),
        already_done: moved.before == DomainRunState::Absent,
        note: String::new(),
    })
}

async fn emulate(
    service: &AgentService,
    context: &OrderContext,
    order: &Order,
    spec: &DomainSpec,
    destination: &Destination,
) -> Result<Outcome, Status> {
    let peer = Peer { order, destination };
    let before = {
        let _admitted = service.admit(context).await?;
        let uuid = spec.uuid.clone();
        service.blocking(move |h| h.domain_state(&uuid)).await?
    };
    tracing::info!(
        order_id = context.order_id, instance_id = %spec.uuid, destination = %destination.host_id,
        "emulating migration: libvirt's test driver cannot migrate"
    );

    // A retry after this host already removed the domain: only the
    // destination's START may be missing.
    if before == DomainRunState::Absent {
        let started = peer.send(OrderAction::Start).await?;
        service.record(context, "absent", "absent");
        return Ok(emulated(destination, "absent", started));
    }

    peer.send(OrderAction::Define).await?;
    stop_here(service, context, spec, before).await?;
    let started = match peer.send(OrderAction::Start).await {
        Ok(started) => started,
        Err(status) => return Err(restart_here(service, context, spec, before, status).await),
    };
    undefine_here(service, context, spec).await?;
    Ok(emulated(destination, before.as_str(), started))
}

fn emulated(destination: &Destination, before: &str, started: OrderResult) -> Outcome {
    Outcome {
        before: before.to_string(),
        after: started.domain_state,
        already_done: started.already_done && before == "absent",
        note: format!(
            "migration emulated because libvirt's test driver cannot migrate: the domain was \
             defined and started on host {} and removed from this host",
            destination.host_id
        ),
    }
}

async fn stop_here(
    service: &AgentService,
    context: &OrderContext,
    spec: &DomainSpec,
    before: DomainRunState,
) -> Result<(), Status> {
    let _admitted = service.admit(context).await?;
    let uuid = spec.uuid.clone();
    service.blocking(move |h| h.ensure_stopped(&uuid)).await?;
    service.record(context, before.as_str(), DomainRunState::Stopped.as_str());
    Ok(())
}

/// Starts the domain here again after the destination failed to start it,
/// and returns the error to fail the order with.
async fn restart_here(
    service: &AgentService,
    context: &OrderContext,
    spec: &DomainSpec,
    before: DomainRunState,
    failure: Status,
) -> Status {
    if before != DomainRunState::Running {
        return failure;
    }
    let restarted = async {
        let _admitted = service.admit(context).await?;
        let spec = spec.clone();
        service.blocking(move |h| h.define(&spec, true)).await?;
        service.record(
            context,
            DomainRunState::Stopped.as_str(),
            DomainRunState::Running.as_str(),
        );
        Ok::<(), Status>(())
    }
    .await;
    match restarted {
        Ok(()) => failure,
        Err(error) => {
            tracing::error!(
                order_id = context.order_id,
                instance_id = %spec.uuid,
                error = error.message(),
                "restart after failed migration failed: domain stopped on both hosts"
            );
            Status::new(
                failure.code(),
                format!(
                    "{}; restarting the domain on this host also failed: {}",
                    failure.message(),
                    error.message()
                ),
            )
        }
    }
}

async fn undefine_here(
    service: &AgentService,
    context: &OrderContext,
    spec: &DomainSpec,
) -> Result<(), Status> {
    let _admitted = service.admit(context).await?;
    let uuid = spec.uuid.clone();
    service.blocking(move |h| h.ensure_absent(&uuid)).await?;
    service.record(
        context,
        DomainRunState::Stopped.as_str(),
        DomainRunState::Absent.as_str(),
    );
    service.remove_unused_networks().await;
    Ok(())
}

/// The destination host's agent, seen from the source.
struct Peer<'a> {
    /// The MIGRATE order, whose id, leader, zone and devices the
    /// destination's orders carry.
    order: &'a Order,
    destination: &'a Destination,
}

impl Peer<'_> {
    /// Sends the MIGRATE order as `action` to the destination agent.
    async fn send(&self, action: OrderAction) -> Result<OrderResult, Status> {
        let order = Order {
            action: action as i32,
            volume: None,
            destination: None,
            ..self.order.clone()
        };
        let endpoint = &self.destination.agent_endpoint;
        let url = if endpoint.contains("://") {
            endpoint.clone()
        } else {
            format!("http://{endpoint}")
        };
        let channel = Endpoint::from_shared(url)
            .map_err(|e| {
                self.failed(
                    action,
                    Code::InvalidArgument,
                    &format!("invalid endpoint: {e}"),
                )
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect()
            .await
            .map_err(|e| self.failed(action, Code::Unavailable, &format!("cannot connect: {e}")))?;
        let reply = AgentClient::new(channel).execute(order).await;
        reply.map(|r| r.into_inner()).map_err(|status| {
            // Never pass FAILED_PRECONDITION on: to the leader it means
            // that this agent fenced the order.
            let code = match status.code() {
                Code::Unavailable | Code::DeadlineExceeded => Code::Unavailable,
                _ => Code::Aborted,
            };
            let detail = format!("{:?}: {}", status.code(), status.message());
            self.failed(action, code, &detail)
        })
    }

    fn failed(&self, action: OrderAction, code: Code, detail: &str) -> Status {
        let message = format!(
            "migration to host {} failed: its agent at {} did not execute {}: {detail}",
            self.destination.host_id,
            self.destination.agent_endpoint,
            action.as_str_name()
        );
        Status::new(code, message)
    }
}
