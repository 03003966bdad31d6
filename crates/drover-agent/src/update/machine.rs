//! The update state machine: pure code, with time and the outcome of each step as inputs
//! (design decision 7). The driver in [`super::engine`] persists the [`Job`] *before* it runs
//! a step, runs it, and feeds the outcome to [`advance`]; after a restart (power cut, crash,
//! reboot) it feeds the persisted job to [`recover`], which decides whether the interrupted
//! step runs again, the update rolls back, or the update is finished.
//!
//! ```text
//! DownloadEnter → Download → Check → DownloadLeave → InstallEnter → Install → InstallLeave
//!   → [RebootEnter → Reboot → RebootLeave] → VerifyEnter → Verify → VerifyLeave
//!   → CommitEnter → Commit → CommitLeave → Cleanup → Done                      (success)
//! any step before Install fails  → Failure → Cleanup → Done                   (failure, device unchanged)
//! any step from Install fails    → RollbackEnter → Rollback → [RollbackReboot] → RollbackLeave
//!                                  → Failure → Cleanup → Done                  (rolled-back)
//!                                  (a module that cannot roll back: → Failure; `failure`)
//! ```
//!
//! `*Enter` / `*Leave` steps run the state hooks of `docs/agent.md`.
//!
//! **Invariant:** a step from `Install` on is never skipped back to a step before it, and the
//! device is only ever called "unchanged" (`failure` before `Install`) when the module has not
//! been asked to install.

use std::collections::BTreeMap;

use drover_proto::update::{ArtifactOffer, MAX_REPORT_MESSAGE, Software, UpdateAction, UpdateCommand, UpdateReport};
use drover_proto::update::{UpdateState, tail};
use serde::{Deserialize, Serialize};

/// One step of an update; see the module documentation for the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    DownloadEnter,
    Download,
    /// Verify the downloaded file (content address, signature, digests, compatibility),
    /// prepare the module's work directory and ask it whether it can roll back.
    Check,
    DownloadLeave,
    InstallEnter,
    Install,
    InstallLeave,
    RebootEnter,
    Reboot,
    RebootLeave,
    VerifyEnter,
    /// Wait for the session to be connected, then the module's verify and the health check.
    Verify,
    VerifyLeave,
    CommitEnter,
    Commit,
    CommitLeave,
    RollbackEnter,
    Rollback,
    /// After rolling back an update that was booted into: boot the old software again.
    RollbackReboot,
    RollbackLeave,
    /// The module's failure handling (after the device was changed), and recording what the
    /// device runs when it could not roll back.
    Failure,
    /// The module's cleanup; removes the work directory and the downloaded file.
    Cleanup,
    Done,
}

/// The state hooks' names (`<Name>_Enter`, `<Name>_Leave`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookState {
    Download,
    Install,
    Reboot,
    Verify,
    Commit,
    Rollback,
}

impl HookState {
    pub fn as_str(self) -> &'static str {
        match self {
            HookState::Download => "Download",
            HookState::Install => "Install",
            HookState::Reboot => "Reboot",
            HookState::Verify => "Verify",
            HookState::Commit => "Commit",
            HookState::Rollback => "Rollback",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPhase {
    Enter,
    Leave,
}

impl HookPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            HookPhase::Enter => "Enter",
            HookPhase::Leave => "Leave",
        }
    }
}

impl Step {
    /// The hooks this step runs, if it is a hook step.
    pub fn hooks(self) -> Option<(HookState, HookPhase)> {
        use HookPhase::*;
        use HookState::*;
        Some(match self {
            Step::DownloadEnter => (Download, Enter),
            Step::DownloadLeave => (Download, Leave),
            Step::InstallEnter => (Install, Enter),
            Step::InstallLeave => (Install, Leave),
            Step::RebootEnter => (Reboot, Enter),
            Step::RebootLeave => (Reboot, Leave),
            Step::VerifyEnter => (Verify, Enter),
            Step::VerifyLeave => (Verify, Leave),
            Step::CommitEnter => (Commit, Enter),
            Step::CommitLeave => (Commit, Leave),
            Step::RollbackEnter => (Rollback, Enter),
            Step::RollbackLeave => (Rollback, Leave),
            _ => return None,
        })
    }

    /// Steps where an operator's abort still stops the update.
    pub fn abortable(self) -> bool {
        self <= Step::DownloadLeave
    }

    /// The device may have been changed once this step has started.
    pub fn changes_device(self) -> bool {
        self >= Step::Install
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Step::DownloadEnter => "Download_Enter",
            Step::Download => "Download",
            Step::Check => "Check",
            Step::DownloadLeave => "Download_Leave",
            Step::InstallEnter => "Install_Enter",
            Step::Install => "Install",
            Step::InstallLeave => "Install_Leave",
            Step::RebootEnter => "Reboot_Enter",
            Step::Reboot => "Reboot",
            Step::RebootLeave => "Reboot_Leave",
            Step::VerifyEnter => "Verify_Enter",
            Step::Verify => "Verify",
            Step::VerifyLeave => "Verify_Leave",
            Step::CommitEnter => "Commit_Enter",
            Step::Commit => "Commit",
            Step::CommitLeave => "Commit_Leave",
            Step::RollbackEnter => "Rollback_Enter",
            Step::Rollback => "Rollback",
            Step::RollbackReboot => "RollbackReboot",
            Step::RollbackLeave => "Rollback_Leave",
            Step::Failure => "Failure",
            Step::Cleanup => "Cleanup",
            Step::Done => "Done",
        }
    }
}

/// What a device runs, as Drover installed it: the `Software` of `hello` plus what it provides
/// (for artifacts' `depends`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Installed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub software: Option<Software>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provides: BTreeMap<String, String>,
}

impl Installed {
    /// What the device runs once `incoming` is committed: its software, and the provides
    /// merged (the artifact's win).
    pub fn after(&self, incoming: &Installed) -> Installed {
        let mut provides = self.provides.clone();
        provides.extend(incoming.provides.iter().map(|(k, v)| (k.clone(), v.clone())));
        Installed { software: incoming.software.clone(), provides }
    }
}

/// How an update ends, once that is decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub state: UpdateState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The device runs the new software although the update did not succeed (a module that
    /// cannot roll back): the [`Step::Failure`] step records it as installed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub runs_new: bool,
}

/// One deployment on this device, persisted before every step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub deployment: String,
    pub artifact: ArtifactOffer,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<String>,
    pub step: Step,
    /// Unix milliseconds.
    pub started_ms: i64,
    /// What the artifact installs, once checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<Installed>,
    /// The update module (`payload_type`), once checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(default)]
    pub supports_rollback: bool,
    #[serde(default)]
    pub needs_reboot: bool,
    /// The module was asked to install: from here on the device may be changed.
    #[serde(default)]
    pub changed: bool,
    /// The device restarted into the new software.
    #[serde(default)]
    pub rebooted: bool,
    /// When verifying must have succeeded (Unix ms); set on entering [`Step::Verify`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_deadline_ms: Option<i64>,
    /// Attempts of the current step that asked to be retried (busy hooks, download errors).
    #[serde(default)]
    pub retries: u32,
    /// Times the agent restarted in the current step.
    #[serde(default)]
    pub restarts: u32,
    /// Do not run the current step before this (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<End>,
}

/// Retry limits and timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub hook_retry_interval_ms: i64,
    pub hook_retry_max: u32,
    pub download_retries: u32,
    pub download_backoff_ms: i64,
    pub download_backoff_max_ms: i64,
    pub verify_timeout_ms: i64,
    /// Restarts of the agent in one step (other than downloading) before that step counts
    /// as failed: a crash loop must not keep a device in limbo.
    pub restart_max: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            hook_retry_interval_ms: 60_000,
            hook_retry_max: 30,
            download_retries: 10,
            download_backoff_ms: 5_000,
            download_backoff_max_ms: 300_000,
            verify_timeout_ms: 300_000,
            restart_max: 5,
        }
    }
}

/// What came of running a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The step did its work.
    Ok,
    /// A state hook exited 21: run the step again later.
    Busy(String),
    /// A transient failure (network): try again after a backoff.
    Retry(String),
    /// The step failed.
    Failed(String),
    /// [`Step::Check`]: verified; what will be installed, by which module.
    Checked { incoming: Installed, module: String, supports_rollback: bool },
    /// [`Step::Download`] or [`Step::Check`]: not for this device.
    Incompatible(String),
    /// [`Step::Install`]: installed; whether the module needs a reboot.
    Installed { needs_reboot: bool },
}

fn clip(msg: &str) -> String {
    if msg.len() <= MAX_REPORT_MESSAGE {
        return msg.to_string();
    }
    let mut end = MAX_REPORT_MESSAGE - 3;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &msg[..end])
}

impl Job {
    pub fn new(deployment: String, artifact: ArtifactOffer, roots: Vec<String>, now_ms: i64) -> Job {
        Job {
            deployment,
            artifact,
            roots,
            step: Step::DownloadEnter,
            started_ms: now_ms,
            incoming: None,
            module: None,
            supports_rollback: false,
            needs_reboot: false,
            changed: false,
            rebooted: false,
            verify_deadline_ms: None,
            retries: 0,
            restarts: 0,
            not_before_ms: None,
            end: None,
        }
    }

    fn to(mut self, step: Step) -> Job {
        self.step = step;
        self.retries = 0;
        self.restarts = 0;
        self.not_before_ms = None;
        self
    }

    fn ending(mut self, state: UpdateState, message: Option<String>, step: Step) -> Job {
        self.end = Some(End { state, message: message.map(|m| clip(&m)), runs_new: false });
        self.to(step)
    }

    /// Failed before the device was changed: `failure`, nothing to roll back.
    fn fail_unchanged(self, message: String) -> Job {
        self.ending(UpdateState::Failure, Some(message), Step::Failure)
    }

    /// Failed after the module was asked to install: roll back if the module can.
    fn fail_changed(self, message: String) -> Job {
        if self.supports_rollback {
            return self.ending(UpdateState::RolledBack, Some(message), Step::RollbackEnter);
        }
        let module = self.module.clone().unwrap_or_default();
        // An install that did not finish may have left anything; one that finished left the
        // new software in place, and it stays there.
        let installed = self.step > Step::Install;
        let message = if installed {
            let (name, version) = self.new_name_version();
            format!(
                "{message}; the {module} module cannot roll back, so the device keeps running {name} {version}, uncommitted"
            )
        } else {
            format!("{message}; the {module} module cannot roll back: the device may be partly updated")
        };
        let mut job = self.ending(UpdateState::Failure, Some(message), Step::Failure);
        if let Some(e) = job.end.as_mut() {
            e.runs_new = installed;
        }
        job
    }

    fn new_name_version(&self) -> (String, String) {
        match self.incoming.as_ref().and_then(|i| i.software.as_ref()) {
            Some(s) => (s.name.clone(), s.version.clone()),
            None => (self.artifact.name.clone(), self.artifact.version.clone()),
        }
    }

    /// Fail the current step, in whatever way its place in the update calls for.
    fn fail(self, message: String) -> Job {
        match self.step {
            Step::DownloadEnter | Step::Download | Step::Check | Step::DownloadLeave | Step::InstallEnter => {
                self.fail_unchanged(message)
            }
            Step::Install | Step::InstallLeave | Step::RebootEnter | Step::Reboot | Step::RebootLeave => {
                self.fail_changed(message)
            }
            Step::VerifyEnter | Step::Verify | Step::VerifyLeave | Step::CommitEnter | Step::Commit => {
                self.fail_changed(message)
            }
            // Past the commit: the new software stays; the problem is only logged.
            Step::CommitLeave => self.to(Step::Cleanup),
            Step::RollbackEnter => self.to(Step::Rollback),
            Step::Rollback => {
                let prior = self.end.as_ref().and_then(|e| e.message.clone()).unwrap_or_default();
                let msg = format!("{prior}; rollback failed: {message}: the device may be inconsistent");
                self.ending(UpdateState::Failure, Some(msg), Step::RollbackLeave)
            }
            Step::RollbackReboot => {
                let prior = self.end.as_ref().and_then(|e| e.message.clone()).unwrap_or_default();
                let msg = format!("{prior}; rolled back, but the reboot into the old software failed: {message}");
                self.ending(UpdateState::Failure, Some(msg), Step::RollbackLeave)
            }
            Step::RollbackLeave => self.to(Step::Failure),
            Step::Failure => self.to(Step::Cleanup),
            Step::Cleanup | Step::Done => self.to(Step::Done),
        }
    }

    /// The state to report while this job is at its current step.
    pub fn report_state(&self) -> UpdateState {
        match self.step {
            s if s <= Step::DownloadLeave => UpdateState::Downloading,
            s if s <= Step::InstallLeave => UpdateState::Installing,
            s if s <= Step::RebootLeave => UpdateState::Rebooting,
            s if s <= Step::CommitLeave => UpdateState::Verifying,
            Step::Done => self.end.as_ref().map(|e| e.state).unwrap_or(UpdateState::Success),
            // Rolling back, failing or cleaning up: still in flight, say where it came from.
            _ => match &self.end {
                None => UpdateState::Verifying,
                Some(e) if e.state == UpdateState::RolledBack || e.runs_new => UpdateState::Installing,
                Some(_) => UpdateState::Downloading,
            },
        }
    }

    /// The final state once the job is [`Step::Done`].
    pub fn final_end(&self) -> End {
        self.end.clone().unwrap_or(End { state: UpdateState::Success, message: None, runs_new: false })
    }
}

/// The step after `job.step`, given what came of it.
pub fn advance(job: Job, outcome: Outcome, now_ms: i64, p: &Policy) -> Job {
    use Outcome as O;
    match outcome {
        O::Busy(msg) => {
            let mut job = job;
            job.retries += 1;
            if job.retries > p.hook_retry_max {
                let retries = job.retries - 1;
                return job.fail(format!("{msg} (still busy after {retries} retries)"));
            }
            job.not_before_ms = Some(now_ms + p.hook_retry_interval_ms);
            job
        }
        O::Retry(msg) => {
            let mut job = job;
            job.retries += 1;
            if job.retries > p.download_retries {
                let attempts = job.retries;
                return job.fail(format!("{msg} (gave up after {attempts} attempts)"));
            }
            let exp = p.download_backoff_ms.saturating_mul(1i64 << (job.retries - 1).min(20));
            job.not_before_ms = Some(now_ms + exp.min(p.download_backoff_max_ms));
            job
        }
        O::Failed(msg) => job.fail(msg),
        // The header is checked as soon as it is in (Download), and again in Check.
        O::Incompatible(msg) if matches!(job.step, Step::Download | Step::Check) => {
            job.ending(UpdateState::Incompatible, Some(msg), Step::Cleanup)
        }
        O::Checked { incoming, module, supports_rollback } if job.step == Step::Check => {
            let mut job = job;
            job.incoming = Some(incoming);
            job.module = Some(module);
            job.supports_rollback = supports_rollback;
            job.to(Step::DownloadLeave)
        }
        O::Installed { needs_reboot } if job.step == Step::Install => {
            let mut job = job;
            job.needs_reboot = needs_reboot;
            job.to(Step::InstallLeave)
        }
        O::Ok => {
            let next = match job.step {
                Step::DownloadEnter => Step::Download,
                Step::Download => Step::Check,
                // Check and Install answer with Checked / Installed; a bare Ok is a bug in the
                // driver, and the safe reading is "failed".
                Step::Check | Step::Install => return job.fail("internal error: the step returned no result".into()),
                Step::DownloadLeave => Step::InstallEnter,
                Step::InstallEnter => {
                    let mut job = job;
                    job.changed = true;
                    return job.to(Step::Install);
                }
                Step::InstallLeave if job.needs_reboot => Step::RebootEnter,
                Step::InstallLeave => Step::VerifyEnter,
                Step::RebootEnter => Step::Reboot,
                Step::Reboot => {
                    let mut job = job;
                    job.rebooted = true;
                    return job.to(Step::RebootLeave);
                }
                Step::RebootLeave => Step::VerifyEnter,
                Step::VerifyEnter => {
                    let mut job = job.to(Step::Verify);
                    job.verify_deadline_ms = Some(now_ms + p.verify_timeout_ms);
                    return job;
                }
                Step::Verify => Step::VerifyLeave,
                Step::VerifyLeave => Step::CommitEnter,
                Step::CommitEnter => Step::Commit,
                Step::Commit => Step::CommitLeave,
                Step::CommitLeave => Step::Cleanup,
                Step::RollbackEnter => Step::Rollback,
                Step::Rollback if job.rebooted && job.needs_reboot => Step::RollbackReboot,
                Step::Rollback => Step::RollbackLeave,
                Step::RollbackReboot => Step::RollbackLeave,
                Step::RollbackLeave => Step::Failure,
                Step::Failure => Step::Cleanup,
                Step::Cleanup | Step::Done => Step::Done,
            };
            job.to(next)
        }
        other => job.fail(format!("internal error: unexpected result {other:?}")),
    }
}

/// The job to continue with after the agent restarted with `job` persisted: the step that
/// was running (or about to run) when the agent stopped.
pub fn recover(job: Job, now_ms: i64, p: &Policy) -> Job {
    let mut job = job;
    job.not_before_ms = None;
    match job.step {
        // A restart inside the install: what the module did is unknown.
        Step::Install => return job.fail("the agent stopped during the install (power cut or crash)".into()),
        // The restart is the reboot the module asked for.
        Step::Reboot => {
            job.rebooted = true;
            return job.to(Step::RebootLeave);
        }
        Step::RollbackReboot => return job.to(Step::RollbackLeave),
        Step::Done => return job,
        // Resuming a download is always right, however often it was cut.
        Step::Download => return job,
        _ => {}
    }
    job.restarts += 1;
    if job.restarts > p.restart_max {
        let msg = format!("the agent stopped {} times in step {}", job.restarts, job.step.as_str());
        return job.fail(msg);
    }
    if job.step == Step::Verify {
        // The clock may have gone back (no real-time clock): then re-arm the deadline.
        let deadline = job.verify_deadline_ms.unwrap_or(now_ms);
        if now_ms > deadline {
            return job.fail("verification did not succeed before the deadline (verify_timeout_secs)".into());
        }
        if deadline - now_ms > p.verify_timeout_ms {
            job.verify_deadline_ms = Some(now_ms + p.verify_timeout_ms);
        }
    }
    job
}

/// What to do with a command from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer with this report; nothing else changes.
    Reply(UpdateReport),
    /// Start this job (no job is running).
    Start(Job),
    /// Finish at once with this final report (e.g. already installed).
    Finish(UpdateReport),
    /// Stop the running job: it ends `aborted`.
    Abort,
}

/// What the device answers to `cmd`, given the job in flight, the last final report and what
/// is installed. `progress` is the report of the job in flight.
pub fn on_command(
    cmd: &UpdateCommand,
    current: Option<&Job>,
    progress: Option<UpdateReport>,
    last_final: Option<&UpdateReport>,
    installed: &Installed,
    now_ms: i64,
) -> Decision {
    let dep = &cmd.deployment;
    let same_running = current.filter(|j| &j.deployment == dep);
    match &cmd.action {
        UpdateAction::Install { artifact, roots } => {
            if same_running.is_some() {
                return Decision::Reply(progress.unwrap_or_else(|| UpdateReport::new(dep, UpdateState::Pending)));
            }
            if let Some(other) = current {
                let mut r = UpdateReport::new(dep, UpdateState::Pending);
                r.message = Some(format!("waiting: deployment {} is in progress on this device", other.deployment));
                return Decision::Reply(r);
            }
            if let Some(last) = last_final.filter(|r| &r.deployment == dep) {
                return Decision::Reply(last.clone());
            }
            let current_sw = installed.software.as_ref();
            if current_sw.and_then(|s| s.artifact.as_deref()) == Some(artifact.id.as_str()) {
                let mut r = UpdateReport::new(dep, UpdateState::AlreadyInstalled);
                r.software = current_sw.cloned();
                return Decision::Finish(r);
            }
            Decision::Start(Job::new(dep.clone(), artifact.clone(), roots.clone(), now_ms))
        }
        UpdateAction::Abort => {
            if let Some(job) = same_running {
                if job.step.abortable() && job.end.is_none() {
                    return Decision::Abort;
                }
                return Decision::Reply(progress.unwrap_or_else(|| UpdateReport::new(dep, job.report_state())));
            }
            if let Some(last) = last_final.filter(|r| &r.deployment == dep) {
                return Decision::Reply(last.clone());
            }
            // Never started here: it is aborted as far as this device goes.
            let mut r = UpdateReport::new(dep, UpdateState::Aborted);
            r.software = installed.software.clone();
            Decision::Finish(r)
        }
    }
}

/// A running job stopped by an operator.
pub fn abort(job: Job) -> Job {
    job.ending(UpdateState::Aborted, Some("aborted by an operator".into()), Step::Cleanup)
}

/// The final report of a finished job: the log's tail for anything but success, and what the
/// device runs now.
pub fn final_report(job: &Job, installed: &Installed, log: &str) -> UpdateReport {
    let end = job.final_end();
    let mut r = UpdateReport::new(&job.deployment, end.state);
    r.message = end.message.map(|m| clip(&m));
    if end.state != UpdateState::Success && !log.is_empty() {
        r.log = Some(tail(log, drover_proto::update::MAX_REPORT_LOG).to_string());
    }
    r.software = installed.software.clone();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        hook_retry_interval_ms: 1_000,
        hook_retry_max: 2,
        download_retries: 3,
        download_backoff_ms: 100,
        download_backoff_max_ms: 250,
        verify_timeout_ms: 10_000,
        restart_max: 2,
    };

    fn offer(id: char) -> ArtifactOffer {
        ArtifactOffer {
            id: id.to_string().repeat(64),
            name: "app".into(),
            version: "2".into(),
            size: 100,
            path: "/device/v1/artifacts/x".into(),
        }
    }

    fn job() -> Job {
        Job::new("dep-1".into(), offer('a'), vec![], 0)
    }

    fn checked(rollback: bool) -> Outcome {
        Outcome::Checked {
            incoming: Installed {
                software: Some(Software { artifact: Some("a".repeat(64)), name: "app".into(), version: "2".into() }),
                provides: BTreeMap::new(),
            },
            module: "file".into(),
            supports_rollback: rollback,
        }
    }

    /// Runs `outcomes` in order from a fresh job; returns the steps visited (after each).
    fn run(outcomes: &[Outcome]) -> (Job, Vec<Step>) {
        let mut j = job();
        let mut steps = vec![j.step];
        for o in outcomes {
            j = advance(j, o.clone(), 0, &P);
            steps.push(j.step);
        }
        (j, steps)
    }

    /// Drives a job to Done, answering Ok (Checked / Installed where needed).
    fn to_done(mut j: Job, reboot: bool) -> (Job, Vec<Step>) {
        let mut steps = vec![];
        for _ in 0..64 {
            if j.step == Step::Done {
                return (j, steps);
            }
            let o = match j.step {
                Step::Check => checked(true),
                Step::Install => Outcome::Installed { needs_reboot: reboot },
                _ => Outcome::Ok,
            };
            j = advance(j, o, 0, &P);
            steps.push(j.step);
        }
        panic!("no end: {steps:?}");
    }

    #[test]
    fn happy_path_visits_every_step_in_order() {
        let (j, steps) = to_done(job(), false);
        use Step::*;
        assert_eq!(
            steps,
            [
                Download,
                Check,
                DownloadLeave,
                InstallEnter,
                Install,
                InstallLeave,
                VerifyEnter,
                Verify,
                VerifyLeave,
                CommitEnter,
                Commit,
                CommitLeave,
                Cleanup,
                Done
            ]
        );
        assert_eq!(j.final_end().state, UpdateState::Success);
        let (j, steps) = to_done(job(), true);
        assert!(steps.windows(3).any(|w| w == [RebootEnter, Reboot, RebootLeave]), "{steps:?}");
        assert!(j.rebooted);
        assert_eq!(j.final_end().state, UpdateState::Success);
    }

    #[test]
    fn reported_states_follow_the_steps() {
        let mut j = job();
        let mut seen = vec![];
        for _ in 0..64 {
            if seen.last() != Some(&j.report_state()) {
                seen.push(j.report_state());
            }
            if j.step == Step::Done {
                break;
            }
            let o = match j.step {
                Step::Check => checked(true),
                Step::Install => Outcome::Installed { needs_reboot: true },
                _ => Outcome::Ok,
            };
            j = advance(j, o, 0, &P);
        }
        use UpdateState::*;
        assert_eq!(seen, [Downloading, Installing, Rebooting, Verifying, Success]);
    }

    /// Bad input: failures before the install leave the device unchanged: `failure`, no
    /// rollback, the module's cleanup still runs.
    #[test]
    fn failures_before_install_end_in_failure_without_rollback() {
        for at in [Step::DownloadEnter, Step::Download, Step::Check, Step::DownloadLeave, Step::InstallEnter] {
            let mut j = job();
            while j.step != at {
                let o = if j.step == Step::Check { checked(true) } else { Outcome::Ok };
                j = advance(j, o, 0, &P);
            }
            let j = advance(j, Outcome::Failed("nope".into()), 0, &P);
            assert_eq!(j.step, Step::Failure, "{at:?}");
            let (j, steps) = to_done(j, false);
            assert_eq!(steps, [Step::Cleanup, Step::Done], "{at:?}");
            assert_eq!(j.final_end().state, UpdateState::Failure);
            assert_eq!(j.final_end().message.as_deref(), Some("nope"));
        }
    }

    #[test]
    fn incompatible_and_check_results() {
        let (j, _) = run(&[Outcome::Ok, Outcome::Ok, Outcome::Incompatible("wrong type".into())]);
        assert_eq!(j.step, Step::Cleanup);
        assert_eq!(j.final_end().state, UpdateState::Incompatible);
        let (j, _) = run(&[Outcome::Ok, Outcome::Incompatible("wrong type".into())]);
        assert_eq!((j.step, j.final_end().state), (Step::Cleanup, UpdateState::Incompatible));
        // Never after the install started.
        let (j, _) = run(&[Outcome::Ok, Outcome::Ok, checked(true), Outcome::Ok, Outcome::Ok]);
        let j = advance(j, Outcome::Incompatible("late".into()), 0, &P);
        assert_eq!(j.final_end().state, UpdateState::RolledBack);
        // A bare Ok from Check is a driver bug: read as failure, never as success.
        let (j, _) = run(&[Outcome::Ok, Outcome::Ok, Outcome::Ok]);
        assert_eq!(j.step, Step::Failure);
        assert_eq!(j.final_end().state, UpdateState::Failure);
    }

    /// Failures from the install on roll back when the module can, and say `failure` with
    /// the right words when it cannot.
    #[test]
    fn failures_after_install_roll_back_or_explain() {
        for at in [
            Step::Install,
            Step::InstallLeave,
            Step::RebootEnter,
            Step::Reboot,
            Step::RebootLeave,
            Step::VerifyEnter,
            Step::Verify,
            Step::VerifyLeave,
            Step::CommitEnter,
            Step::Commit,
        ] {
            for rollback in [true, false] {
                let mut j = job();
                while j.step != at {
                    let o = match j.step {
                        Step::Check => checked(rollback),
                        Step::Install => Outcome::Installed { needs_reboot: true },
                        _ => Outcome::Ok,
                    };
                    j = advance(j, o, 0, &P);
                }
                let j = advance(j, Outcome::Failed("broke".into()), 0, &P);
                let end = j.final_end();
                if rollback {
                    assert_eq!(j.step, Step::RollbackEnter, "{at:?}");
                    assert_eq!(end.state, UpdateState::RolledBack);
                    assert_eq!(end.message.as_deref(), Some("broke"));
                    let (done, steps) = to_done(j, true);
                    assert_eq!(done.final_end().state, UpdateState::RolledBack);
                    let rebooted = at > Step::Reboot;
                    assert_eq!(steps.contains(&Step::RollbackReboot), rebooted, "{at:?}: {steps:?}");
                } else {
                    assert_eq!(j.step, Step::Failure, "{at:?}");
                    assert_eq!(end.state, UpdateState::Failure);
                    let msg = end.message.unwrap();
                    assert!(msg.contains("cannot roll back"), "{msg}");
                    if at == Step::Install {
                        assert!(msg.contains("partly updated") && !end.runs_new, "{msg}");
                    } else {
                        assert!(msg.contains("keeps running app 2") && end.runs_new, "{msg}");
                    }
                }
            }
        }
    }

    #[test]
    fn commit_leave_failure_keeps_success_and_rollback_failure_is_failure() {
        let mut j = job();
        while j.step != Step::CommitLeave {
            let o = match j.step {
                Step::Check => checked(true),
                Step::Install => Outcome::Installed { needs_reboot: false },
                _ => Outcome::Ok,
            };
            j = advance(j, o, 0, &P);
        }
        let j = advance(j, Outcome::Failed("hook said no".into()), 0, &P);
        assert_eq!(j.step, Step::Cleanup);
        assert_eq!(j.final_end().state, UpdateState::Success);

        let (j, _) = run(&[Outcome::Ok, Outcome::Ok, checked(true), Outcome::Ok, Outcome::Ok]);
        assert_eq!(j.step, Step::Install);
        let j = advance(j, Outcome::Failed("disk full".into()), 0, &P);
        // A veto of the rollback hooks does not stop the rollback.
        let j = advance(j, Outcome::Failed("veto".into()), 0, &P);
        assert_eq!(j.step, Step::Rollback);
        let j = advance(j, Outcome::Failed("cannot restore".into()), 0, &P);
        assert_eq!(j.step, Step::RollbackLeave);
        let end = j.final_end();
        assert_eq!(end.state, UpdateState::Failure);
        assert!(end.message.unwrap().contains("disk full; rollback failed: cannot restore"));
    }

    /// Bad input: hooks that stay busy; downloads that keep failing.
    #[test]
    fn busy_hooks_and_download_retries_are_bounded() {
        let j = job();
        let j = advance(j, Outcome::Busy("Download_Enter_00 busy".into()), 5_000, &P);
        assert_eq!((j.step, j.retries, j.not_before_ms), (Step::DownloadEnter, 1, Some(6_000)));
        let j = advance(j, Outcome::Busy("busy".into()), 6_000, &P);
        assert_eq!(j.step, Step::DownloadEnter);
        let j = advance(j, Outcome::Busy("busy".into()), 7_000, &P);
        assert_eq!(j.step, Step::Failure);
        assert!(j.final_end().message.unwrap().contains("still busy after 2 retries"));

        let (mut j, _) = run(&[Outcome::Ok]);
        let mut waits = vec![];
        for _ in 0..3 {
            j = advance(j, Outcome::Retry("connection reset".into()), 0, &P);
            waits.push(j.not_before_ms.unwrap());
        }
        assert_eq!(waits, [100, 200, 250], "exponential, capped");
        let j = advance(j, Outcome::Retry("connection reset".into()), 0, &P);
        assert_eq!(j.step, Step::Failure);
        assert!(j.final_end().message.unwrap().contains("gave up after 4 attempts"));
        // Success resets the counters.
        let (j, _) = run(&[Outcome::Ok, Outcome::Retry("x".into()), Outcome::Ok]);
        assert_eq!((j.step, j.retries, j.not_before_ms), (Step::Check, 0, None));
    }

    /// Recovery from every persisted step (the kill -9 / power-cut table of docs/agent.md).
    #[test]
    fn recovery_from_every_step() {
        use Step::*;
        let all = [
            DownloadEnter,
            Download,
            Check,
            DownloadLeave,
            InstallEnter,
            Install,
            InstallLeave,
            RebootEnter,
            Reboot,
            RebootLeave,
            VerifyEnter,
            Verify,
            VerifyLeave,
            CommitEnter,
            Commit,
            CommitLeave,
            RollbackEnter,
            Rollback,
            RollbackReboot,
            RollbackLeave,
            Failure,
            Cleanup,
            Done,
        ];
        for step in all {
            let mut j = job();
            j.step = step;
            j.module = Some("file".into());
            j.supports_rollback = true;
            j.verify_deadline_ms = Some(20_000);
            j.not_before_ms = Some(99_999);
            let r = recover(j.clone(), 1_000, &P);
            let expected = match step {
                Install => RollbackEnter,
                Reboot => RebootLeave,
                RollbackReboot => RollbackLeave,
                s => s,
            };
            assert_eq!(r.step, expected, "recovering {step:?}");
            assert_eq!(r.not_before_ms, None, "{step:?}: a restart runs the step at once");
            if step == Install {
                assert_eq!(r.final_end().state, UpdateState::RolledBack);
                assert!(r.final_end().message.unwrap().contains("stopped during the install"));
            }
            if step == Reboot {
                assert!(r.rebooted);
            }
            // Nothing past the install ever goes back to a step before it.
            if step.changes_device() {
                assert!(r.step.changes_device(), "{step:?} -> {:?}", r.step);
            }
        }
        // Install with a module that cannot roll back: failure, and it says so.
        let mut j = job();
        j.step = Install;
        j.module = Some("script".into());
        let r = recover(j, 0, &P);
        assert_eq!((r.step, r.final_end().state), (Failure, UpdateState::Failure));
        assert!(r.final_end().message.unwrap().contains("partly updated"));
    }

    #[test]
    fn recovery_in_verify_checks_the_deadline_and_crash_loops() {
        let mut j = job();
        j.step = Step::Verify;
        j.supports_rollback = true;
        j.verify_deadline_ms = Some(10_000);
        // Before the deadline: verify again.
        let r = recover(j.clone(), 5_000, &P);
        assert_eq!(r.step, Step::Verify);
        // After: roll back.
        let r = recover(j.clone(), 10_001, &P);
        assert_eq!((r.step, r.final_end().state), (Step::RollbackEnter, UpdateState::RolledBack));
        assert!(r.final_end().message.unwrap().contains("deadline"));
        // The clock went back (no RTC): re-armed, not waiting for years.
        let r = recover(j.clone(), -1_000_000, &P);
        assert_eq!(r.verify_deadline_ms, Some(-1_000_000 + P.verify_timeout_ms));
        // A crash loop in the same step ends it.
        let mut j = recover(j, 1_000, &P);
        j = recover(j, 1_000, &P);
        assert_eq!(j.step, Step::Verify);
        let j = recover(j, 1_000, &P);
        assert_eq!(j.step, Step::RollbackEnter);
        assert!(j.final_end().message.unwrap().contains("stopped 3 times"));
        // Downloads resume however often they are cut.
        let mut j = job();
        j.step = Step::Download;
        for _ in 0..20 {
            j = recover(j, 0, &P);
        }
        assert_eq!(j.step, Step::Download);
    }

    #[test]
    fn commands_are_idempotent_and_one_install_at_a_time() {
        let none = Installed::default();
        let install = |dep: &str, id: char| UpdateCommand {
            v: 1,
            deployment: dep.into(),
            action: UpdateAction::Install { artifact: offer(id), roots: vec![] },
        };
        let abort_cmd = |dep: &str| UpdateCommand { v: 1, deployment: dep.into(), action: UpdateAction::Abort };
        // Idle: start.
        let d = on_command(&install("d1", 'a'), None, None, None, &none, 7);
        let Decision::Start(j) = d else { panic!("{d:?}") };
        assert_eq!((j.deployment.as_str(), j.step, j.started_ms), ("d1", Step::DownloadEnter, 7));
        // The same again while running: the current report.
        let mut progress = UpdateReport::new("d1", UpdateState::Downloading);
        progress.bytes = Some(10);
        let d = on_command(&install("d1", 'a'), Some(&j), Some(progress.clone()), None, &none, 8);
        assert_eq!(d, Decision::Reply(progress.clone()));
        // Another deployment while one runs: pending, not started.
        let Decision::Reply(r) = on_command(&install("d2", 'b'), Some(&j), Some(progress.clone()), None, &none, 8)
        else {
            panic!()
        };
        assert_eq!((r.deployment.as_str(), r.state), ("d2", UpdateState::Pending));
        assert!(r.message.unwrap().contains("d1"));
        // A finished deployment: its final report again.
        let mut last = UpdateReport::new("d1", UpdateState::Success);
        last.software = Some(Software { artifact: None, name: "app".into(), version: "2".into() });
        assert_eq!(on_command(&install("d1", 'a'), None, None, Some(&last), &none, 9), Decision::Reply(last.clone()));
        // Already installed.
        let inst = Installed {
            software: Some(Software { artifact: Some("a".repeat(64)), name: "app".into(), version: "2".into() }),
            provides: BTreeMap::new(),
        };
        let Decision::Finish(r) = on_command(&install("d3", 'a'), None, None, Some(&last), &inst, 9) else { panic!() };
        assert_eq!(r.state, UpdateState::AlreadyInstalled);
        assert_eq!(r.software, inst.software);
        // Abort: while downloading yes; past the point of no return no.
        assert_eq!(on_command(&abort_cmd("d1"), Some(&j), Some(progress.clone()), None, &none, 9), Decision::Abort);
        let mut installing = j.clone();
        installing.step = Step::Install;
        let d = on_command(&abort_cmd("d1"), Some(&installing), None, None, &none, 9);
        assert_eq!(d, Decision::Reply(UpdateReport::new("d1", UpdateState::Installing)));
        // Abort of a deployment never started: aborted at once.
        let Decision::Finish(r) = on_command(&abort_cmd("d9"), Some(&j), None, None, &none, 9) else { panic!() };
        assert_eq!((r.deployment.as_str(), r.state), ("d9", UpdateState::Aborted));
        let aborted = abort(j);
        assert_eq!((aborted.step, aborted.final_end().state), (Step::Cleanup, UpdateState::Aborted));
    }

    #[test]
    fn final_reports_carry_log_tail_and_software_and_stay_in_limits() {
        let mut j = job();
        j.step = Step::Done;
        j.end = Some(End { state: UpdateState::RolledBack, message: Some("x".repeat(5000)), runs_new: false });
        let inst = Installed {
            software: Some(Software { artifact: None, name: "app".into(), version: "1".into() }),
            provides: BTreeMap::new(),
        };
        let log = "line\n".repeat(20_000);
        let r = final_report(&j, &inst, &log);
        assert_eq!(r.state, UpdateState::RolledBack);
        assert!(r.check().is_ok(), "{:?}", r.check());
        assert!(r.log.as_ref().unwrap().len() <= drover_proto::update::MAX_REPORT_LOG);
        assert_eq!(r.software.unwrap().version, "1");
        j.end = None;
        let r = final_report(&j, &inst, &log);
        assert_eq!((r.state, r.log), (UpdateState::Success, None));
    }

    #[test]
    fn jobs_round_trip_through_json() {
        let (j, _) = run(&[Outcome::Ok, Outcome::Ok, checked(true)]);
        let text = serde_json::to_string(&j).unwrap();
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), j);
        assert!(text.contains("\"step\":\"download_leave\""), "{text}");
    }
}
