//! Software updates on the device (`docs/agent.md`, "Software updates";
//! `docs/update-modules.md`).
//!
//! - [`machine`]: the update state machine — pure, time and step outcomes as inputs; the
//!   recovery table for a restart in any step.
//! - [`engine`]: drives the machine: persists the job before every step, runs the step on
//!   tokio's blocking pool, answers `down/update` commands, sends `up/update` reports.
//! - [`download`]: HTTPS with the device certificate, `Range` to resume, streaming
//!   verification.
//! - [`modules`]: the update modules (`file`, `app`, `script`, external executables).
//! - [`hooks`]: state hooks. [`trust`]: the trust root. [`persist`]: files under
//!   `data_dir/update/`. [`proc`]: child processes with a time limit.
//!
//! The session and the engine meet in an [`UpdateLink`]: the session hands commands over and
//! publishes the reports; [`Shared`] holds what it needs at every connect (the software for
//! `hello`, the report to send again) and tells the engine whether it is connected.

pub mod download;
pub mod engine;
pub mod hooks;
pub mod machine;
pub mod modules;
pub mod persist;
pub mod proc;
pub mod trust;

#[cfg(test)]
pub(crate) mod testutil;

use std::sync::{Arc, Mutex};

use drover_proto::update::{Software, UpdateCommand, UpdateReport};
use tokio::sync::{mpsc, watch};

pub use engine::{Engine, RebootMode};

/// Reports waiting for the session; older progress is dropped when it is full.
const REPORT_QUEUE: usize = 64;
/// Commands waiting for the engine.
const COMMAND_QUEUE: usize = 16;

/// What the engine and the session share.
#[derive(Debug)]
pub struct Shared {
    connected: watch::Sender<bool>,
    software: Mutex<Option<Software>>,
    resend: Mutex<Option<UpdateReport>>,
    reports: mpsc::Sender<UpdateReport>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The software for `hello`.
    pub fn software(&self) -> Option<Software> {
        lock(&self.software).clone()
    }
    pub fn set_software(&self, s: Option<Software>) {
        *lock(&self.software) = s;
    }
    /// The report to send after every connect: the state of the update in flight, or the
    /// last final report until the next deployment starts.
    pub fn resend(&self) -> Option<UpdateReport> {
        lock(&self.resend).clone()
    }
    pub fn set_resend(&self, r: Option<UpdateReport>) {
        *lock(&self.resend) = r;
    }
    /// Queues a report for the session (dropped if the queue is full: [`Shared::resend`]
    /// has the latest state anyway).
    pub fn send(&self, r: UpdateReport) {
        if self.reports.try_send(r).is_err() {
            tracing::debug!("update report queue full; the state is sent again at the next connect");
        }
    }
    pub fn set_connected(&self, c: bool) {
        self.connected.send_replace(c);
    }
    pub fn connected(&self) -> bool {
        *self.connected.borrow()
    }
    pub fn connected_rx(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }
}

/// The session's end of the link to an engine. Clones share the same engine (a simulated
/// device makes a new session after each disconnect).
#[derive(Debug, Clone)]
pub struct UpdateLink {
    pub shared: Arc<Shared>,
    pub commands: mpsc::Sender<UpdateCommand>,
    pub reports: Arc<tokio::sync::Mutex<mpsc::Receiver<UpdateReport>>>,
}

/// A link and the engine's ends of it: commands to take, [`Shared`] to report through.
pub fn link(software: Option<Software>) -> (UpdateLink, mpsc::Receiver<UpdateCommand>, Arc<Shared>) {
    let (ctx, crx) = mpsc::channel(COMMAND_QUEUE);
    let (rtx, rrx) = mpsc::channel(REPORT_QUEUE);
    let shared = Arc::new(Shared {
        connected: watch::channel(false).0,
        software: Mutex::new(software),
        resend: Mutex::new(None),
        reports: rtx,
    });
    let l = UpdateLink { shared: shared.clone(), commands: ctx, reports: Arc::new(tokio::sync::Mutex::new(rrx)) };
    (l, crx, shared)
}

/// Starts `engine` on the current runtime; the link goes into the session's configuration.
pub fn spawn(engine: Engine) -> UpdateLink {
    let (l, commands, shared) = link(engine.installed().software);
    tokio::spawn(engine.run(commands, shared));
    l
}
