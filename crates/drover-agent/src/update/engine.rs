//! The driver of the update [`machine`](super::machine): persists the job, runs each step
//! (blocking work on tokio's blocking pool, so the session's MQTT loop never waits), feeds
//! the outcome back, answers commands meanwhile and sends reports.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drover_artifact::read::Reader;
use drover_artifact::stream::Header;
use drover_proto::update::{Software, UpdateCommand, UpdateReport, UpdateState};
use tokio::sync::{Semaphore, mpsc, watch};

use super::download::{Downloader, Fetch};
use super::hooks::{self, HookResult};
use super::machine::{self, Decision, Installed, Job, Outcome, Policy, Step};
use super::modules::{self, Ctx};
use super::persist::{Persisted, UpdateDir, UpdateLog, now_ms};
use super::{Shared, proc, trust};
use crate::config::UpdateConfig;

/// How a reboot is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootMode {
    /// Run `reboot_command` and wait to be stopped by the reboot.
    Command,
    /// Pretend the device rebooted as soon as `reboot_command` succeeds (the simulator).
    Simulated,
}

/// One device's update engine; see [`Engine::run`].
pub struct Engine {
    cfg: Arc<UpdateConfig>,
    dir: UpdateDir,
    downloader: Option<Downloader>,
    policy: Policy,
    reboot: RebootMode,
    slots: Option<Arc<Semaphore>>,
    /// The slot this device's job holds, from its first blocking step until the job ends or
    /// waits (with `slots` only).
    held: std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    progress_every: Duration,
}

/// Everything a blocking step needs, cloned into its thread.
struct StepCx {
    cfg: Arc<UpdateConfig>,
    dir: UpdateDir,
    job: Job,
    installed: Installed,
    log: Arc<UpdateLog>,
}

impl StepCx {
    fn part(&self) -> PathBuf {
        self.dir.part_path(&self.job.artifact.id)
    }

    fn header(&self) -> Option<Header> {
        let f = std::fs::File::open(self.part()).ok()?;
        Reader::new(f).ok().map(|r| r.header().clone())
    }

    fn with_module<T>(
        &self,
        header: Option<&Header>,
        f: impl FnOnce(&dyn modules::UpdateModule, &Ctx) -> Result<T, modules::ModuleError>,
    ) -> Result<T, String> {
        let name = self.job.module.as_deref().ok_or("no update module chosen")?;
        let m = modules::for_type(name, &self.cfg).map_err(|e| e.to_string())?;
        let work = self.dir.work_dir();
        let part = self.part();
        let cx = Ctx {
            deployment: &self.job.deployment,
            artifact_id: &self.job.artifact.id,
            workdir: &work,
            artifact: &part,
            header,
            cfg: &self.cfg,
            installed: &self.installed,
            log: &self.log,
        };
        f(m.as_ref(), &cx).map_err(|e| e.to_string())
    }

    fn hook_env(&self) -> Vec<(String, String)> {
        let (name, version) = match self.job.incoming.as_ref().and_then(|i| i.software.as_ref()) {
            Some(s) => (s.name.clone(), s.version.clone()),
            None => (self.job.artifact.name.clone(), self.job.artifact.version.clone()),
        };
        vec![
            ("DROVER_DEPLOYMENT".into(), self.job.deployment.clone()),
            ("DROVER_ARTIFACT_ID".into(), self.job.artifact.id.clone()),
            ("DROVER_ARTIFACT_NAME".into(), name),
            ("DROVER_ARTIFACT_VERSION".into(), version),
            ("DROVER_DEVICE_TYPE".into(), self.cfg.device_type.clone()),
            ("DROVER_RETRY".into(), self.job.retries.to_string()),
        ]
    }

    /// The device's provides: the image's, then what Drover installed.
    fn provides(&self) -> std::collections::BTreeMap<String, String> {
        let mut p = self.cfg.provides.clone();
        p.extend(self.installed.provides.iter().map(|(k, v)| (k.clone(), v.clone())));
        p
    }
}

/// What a step came back with: the outcome and, when it changed, what is installed now.
type StepResult = (Outcome, Option<Installed>);

impl Engine {
    pub fn new(cfg: UpdateConfig, data_dir: &std::path::Path, downloader: Option<Downloader>) -> Engine {
        let policy = Policy {
            hook_retry_interval_ms: cfg.hook_retry_interval.as_millis() as i64,
            hook_retry_max: cfg.hook_retry_max,
            download_retries: cfg.download_retries,
            download_backoff_ms: cfg.download_backoff.as_millis() as i64,
            download_backoff_max_ms: cfg.download_backoff_max.as_millis() as i64,
            verify_timeout_ms: cfg.verify_timeout.as_millis() as i64,
            ..Policy::default()
        };
        Engine {
            cfg: Arc::new(cfg),
            dir: UpdateDir::new(data_dir),
            downloader,
            policy,
            reboot: RebootMode::Command,
            slots: None,
            held: std::sync::Mutex::new(None),
            progress_every: Duration::from_secs(3),
        }
    }

    /// Reboots are simulated (the simulator).
    pub fn simulated_reboot(mut self) -> Self {
        self.reboot = RebootMode::Simulated;
        self
    }

    /// A job's blocking steps run within one of `slots` (the simulator bounds its threads
    /// so). The job takes a slot at its first blocking step and keeps it until it ends or
    /// waits (a busy hook, a download backoff): a device that has downloaded goes on to
    /// install and commit instead of queueing again behind every device still waiting to
    /// download, so devices finish one after another, as a real fleet's do.
    pub fn with_slots(mut self, slots: Arc<Semaphore>) -> Self {
        self.slots = Some(slots);
        self
    }

    pub fn with_progress_every(mut self, every: Duration) -> Self {
        self.progress_every = every;
        self
    }

    pub fn dir(&self) -> &UpdateDir {
        &self.dir
    }

    /// What the device runs, as recorded (for `hello` before the engine starts).
    pub fn installed(&self) -> Installed {
        self.dir.load_installed().unwrap_or_default()
    }

    /// Persists `st`, retrying until the disk takes it: no step runs unrecorded. The write
    /// and its fsyncs run on the blocking pool: on slow flash (or for the simulator's
    /// thousand devices) they would otherwise stall the runtime, and with it the MQTT
    /// connection.
    async fn save(&self, st: &Persisted) {
        let mut wait = Duration::from_millis(500);
        loop {
            let (dir, p) = (self.dir.clone(), st.clone());
            let (saved, _) = self
                .run_blocking(false, move || match dir.save(&p) {
                    Ok(()) => (Outcome::Ok, None),
                    Err(e) => (Outcome::Failed(e), None),
                })
                .await;
            let e = match saved {
                Outcome::Ok => return,
                Outcome::Failed(e) => e,
                other => format!("{other:?}"),
            };
            tracing::error!("cannot record the update state: {e}; retrying in {}s", wait.as_secs_f64());
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(60));
        }
    }

    /// Runs until `commands` closes: resumes or rolls back what a restart interrupted, then
    /// takes commands from the session and sends reports to it.
    pub async fn run(self, mut commands: mpsc::Receiver<UpdateCommand>, shared: Arc<Shared>) {
        let mut st = match self.dir.load() {
            Ok(p) => p,
            Err(e) => {
                // Should never happen (atomic writes); keep the evidence, start clean.
                let aside = self.dir.state_path().with_extension("json.corrupt");
                tracing::error!("the update state is unreadable ({e}); moved to {}", aside.display());
                let _ = std::fs::rename(self.dir.state_path(), &aside);
                Persisted { v: 1, ..Persisted::default() }
            }
        };
        st.v = 1;
        let mut installed = match self.dir.load_installed() {
            Ok(i) => i,
            Err(e) => {
                tracing::error!("the record of installed software is unreadable: {e}");
                Installed::default()
            }
        };
        shared.set_software(installed.software.clone());
        let mut log: Option<Arc<UpdateLog>> = None;
        if let Some(job) = st.job.take() {
            let before = job.step;
            let job = machine::recover(job, now_ms(), &self.policy);
            let l = Arc::new(UpdateLog::open(&self.dir, &job.deployment));
            l.line(&format!(
                "agent started with deployment {} at step {}: continuing at {}",
                job.deployment,
                before.as_str(),
                job.step.as_str()
            ));
            log = Some(l);
            st.job = Some(job);
            self.save(&st).await;
        }
        let mut reported: Option<UpdateState> = None;
        match &st.job {
            Some(job) => {
                let r = self.progress_report(job);
                reported = Some(r.state);
                shared.set_resend(Some(r.clone()));
                shared.send(r);
            }
            None => shared.set_resend(st.last.clone()),
        }
        let mut connected = shared.connected_rx();
        // A command that came while a new job waited for a slot, and stopped it.
        let mut next: Option<UpdateCommand> = None;
        loop {
            let Some(job) = st.job.clone() else {
                let cmd = match next.take() {
                    Some(c) => c,
                    None => match commands.recv().await {
                        Some(c) => c,
                        None => return,
                    },
                };
                match machine::on_command(&cmd, None, None, st.last.as_ref(), &installed, now_ms()) {
                    Decision::Start(job) => {
                        if let Err(cmd) = self.slot_before_start(&job, &mut commands, &st, &installed, &shared).await {
                            next = Some(cmd);
                            continue;
                        }
                        let l = Arc::new(UpdateLog::open(&self.dir, &job.deployment));
                        l.line(&format!(
                            "deployment {}: install {} {} (artifact {}, {} bytes)",
                            job.deployment, job.artifact.name, job.artifact.version, job.artifact.id, job.artifact.size
                        ));
                        self.dir.prune_logs(&job.deployment);
                        log = Some(l);
                        st.job = Some(job);
                        st.last = None;
                        self.save(&st).await;
                        reported = None;
                    }
                    Decision::Finish(r) => {
                        tracing::info!(deployment = %r.deployment, state = %r.state, "deployment answered at once");
                        st.last = Some(r.clone());
                        self.save(&st).await;
                        shared.set_resend(Some(r.clone()));
                        shared.send(r);
                    }
                    Decision::Reply(r) => shared.send(r),
                    Decision::Abort => {}
                }
                continue;
            };
            let l = log.get_or_insert_with(|| Arc::new(UpdateLog::open(&self.dir, &job.deployment))).clone();
            if reported != Some(job.report_state()) && job.step != Step::Done {
                let r = self.progress_report(&job);
                reported = Some(r.state);
                shared.set_resend(Some(r.clone()));
                shared.send(r);
            }
            if job.step == Step::Done {
                let report = machine::final_report(&job, &installed, &l.read());
                l.line(&format!("deployment {} ended: {}", job.deployment, report.state));
                st.job = None;
                st.last = Some(report.clone());
                self.save(&st).await;
                self.release_slot();
                shared.set_resend(Some(report.clone()));
                shared.send(report);
                log = None;
                reported = None;
                continue;
            }
            // A wait (busy hook, download backoff): commands are answered meanwhile.
            let mut abort = false;
            if let Some(nb) = job.not_before_ms {
                let wait = nb - now_ms();
                if wait > 0 {
                    self.release_slot();
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(wait as u64)) => {
                            let mut j = job.clone();
                            j.not_before_ms = None;
                            st.job = Some(j);
                        }
                        Some(cmd) = commands.recv() => {
                            abort = self.answer(&cmd, &job, &installed, &st, &shared);
                        }
                    }
                    if abort {
                        st.job = Some(machine::abort(job));
                        self.save(&st).await;
                    }
                    continue;
                }
            }
            l.line(&format!("step {}", job.step.as_str()));
            let cancel = Arc::new(AtomicBool::new(false));
            let step =
                self.step(job.clone(), installed.clone(), l.clone(), cancel.clone(), shared.clone(), &mut connected);
            tokio::pin!(step);
            let (outcome, now_installed) = loop {
                tokio::select! {
                    r = &mut step => break r,
                    Some(cmd) = commands.recv() => {
                        if self.answer(&cmd, &job, &installed, &st, &shared) {
                            abort = true;
                            cancel.store(true, Ordering::Relaxed);
                        }
                    }
                }
            };
            if let Some(i) = now_installed {
                installed = i;
                shared.set_software(installed.software.clone());
            }
            let next = if abort && job.step.abortable() {
                l.line("aborted by an operator");
                machine::abort(job)
            } else {
                let said = match &outcome {
                    Outcome::Busy(m) => Some(format!("busy, retrying later: {m}")),
                    Outcome::Retry(m) => Some(format!("will retry: {m}")),
                    Outcome::Failed(m) => Some(format!("failed: {m}")),
                    Outcome::Incompatible(m) => Some(format!("incompatible: {m}")),
                    Outcome::Ok | Outcome::Checked { .. } | Outcome::Installed { .. } => None,
                };
                if let Some(s) = said {
                    l.warn(&format!("step {} {s}", job.step.as_str()));
                }
                machine::advance(job, outcome, now_ms(), &self.policy)
            };
            st.job = Some(next);
            self.save(&st).await;
        }
    }

    /// Answers a command that came while `job` runs; true if it aborts the job.
    fn answer(&self, cmd: &UpdateCommand, job: &Job, installed: &Installed, st: &Persisted, shared: &Shared) -> bool {
        let progress = Some(self.progress_report(job));
        match machine::on_command(cmd, Some(job), progress, st.last.as_ref(), installed, now_ms()) {
            Decision::Reply(r) | Decision::Finish(r) => {
                shared.send(r);
                false
            }
            Decision::Abort => true,
            Decision::Start(_) => false,
        }
    }

    fn progress_report(&self, job: &Job) -> UpdateReport {
        let mut r = UpdateReport::new(&job.deployment, job.report_state());
        if r.state == UpdateState::Downloading {
            let have = std::fs::metadata(self.dir.part_path(&job.artifact.id)).map(|m| m.len()).unwrap_or(0);
            r.bytes = Some(have.min(job.artifact.size));
            r.total = Some(job.artifact.size);
        }
        r
    }

    /// With slots, a new job waits for one before it starts, so a device waiting its turn
    /// stays `pending` rather than reporting a download that is not running. Commands are
    /// answered meanwhile (a repeated install: still pending); `Err` with an abort, which the
    /// caller handles as for a job that never started.
    async fn slot_before_start(
        &self,
        job: &Job,
        commands: &mut mpsc::Receiver<UpdateCommand>,
        st: &Persisted,
        installed: &Installed,
        shared: &Shared,
    ) -> Result<(), UpdateCommand> {
        let Some(slots) = &self.slots else { return Ok(()) };
        let acquire = slots.clone().acquire_owned();
        tokio::pin!(acquire);
        loop {
            tokio::select! {
                permit = &mut acquire => {
                    *self.held.lock().unwrap_or_else(|e| e.into_inner()) = permit.ok();
                    return Ok(());
                }
                Some(cmd) = commands.recv() => {
                    let waiting = UpdateReport::new(&job.deployment, UpdateState::Pending);
                    match machine::on_command(&cmd, Some(job), Some(waiting), st.last.as_ref(), installed, now_ms()) {
                        Decision::Abort => return Err(cmd),
                        Decision::Reply(r) | Decision::Finish(r) => shared.send(r),
                        Decision::Start(_) => {}
                    }
                }
            }
        }
    }

    /// Gives back the job's slot, if it holds one.
    fn release_slot(&self) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Runs a step's `f` on the blocking pool, within the job's slot if slots are set.
    async fn blocking(&self, f: impl FnOnce() -> StepResult + Send + 'static) -> StepResult {
        self.run_blocking(true, f).await
    }

    /// Runs `f` on the blocking pool; `slotted`: within the job's slot, if slots are set
    /// (steps are, state writes are not). One closure type for everything: each distinct type would add a
    /// copy of tokio's task code to the agent.
    async fn run_blocking(&self, slotted: bool, f: impl FnOnce() -> StepResult + Send + 'static) -> StepResult {
        let f: Box<dyn FnOnce() -> StepResult + Send> = Box::new(f);
        if let Some(s) = &self.slots
            && slotted
            && self.held.lock().unwrap_or_else(|e| e.into_inner()).is_none()
        {
            let permit = s.clone().acquire_owned().await.ok();
            *self.held.lock().unwrap_or_else(|e| e.into_inner()) = permit;
        }
        match tokio::task::spawn_blocking(f).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    async fn step(
        &self,
        job: Job,
        installed: Installed,
        log: Arc<UpdateLog>,
        cancel: Arc<AtomicBool>,
        shared: Arc<Shared>,
        connected: &mut watch::Receiver<bool>,
    ) -> StepResult {
        let step = job.step;
        let cx = StepCx { cfg: self.cfg.clone(), dir: self.dir.clone(), job, installed, log };
        if let Some((state, phase)) = step.hooks() {
            let timeout = self.cfg.hook_timeout;
            return self
                .blocking(move || {
                    let r = hooks::run(&cx.cfg.hooks_dir, state, phase, &cx.hook_env(), timeout, &cx.log);
                    let o = match r {
                        HookResult::Ok => Outcome::Ok,
                        HookResult::Busy(m) => Outcome::Busy(m),
                        HookResult::Failed(m) => Outcome::Failed(m),
                    };
                    (o, None)
                })
                .await;
        }
        match step {
            Step::Download => {
                let Some(dl) = self.downloader.clone() else {
                    return (
                        Outcome::Failed("server_url is not set: this device cannot download artifacts".into()),
                        None,
                    );
                };
                let every = self.progress_every;
                self.blocking(move || (download(&cx, &dl, &cancel, every, &shared), None)).await
            }
            Step::Check => self.blocking(move || (check(&cx), None)).await,
            Step::Install => {
                self.blocking(move || {
                    let header = cx.header();
                    let r = cx.with_module(header.as_ref(), |m, c| {
                        m.install(c)?;
                        m.needs_reboot(c)
                    });
                    match r {
                        Ok(needs_reboot) => {
                            if needs_reboot {
                                cx.log.line("the update module asks for a reboot");
                            }
                            (Outcome::Installed { needs_reboot }, None)
                        }
                        Err(e) => (Outcome::Failed(format!("install failed: {e}")), None),
                    }
                })
                .await
            }
            Step::Reboot | Step::RollbackReboot => self.reboot(cx).await,
            Step::Verify => self.verify(cx, connected).await,
            Step::Commit => {
                self.blocking(move || {
                    let header = cx.header();
                    if let Err(e) = cx.with_module(header.as_ref(), |m, c| m.commit(c)) {
                        return (Outcome::Failed(format!("commit failed: {e}")), None);
                    }
                    let now = cx.installed.after(cx.job.incoming.as_ref().unwrap_or(&Installed::default()));
                    if let Err(e) = cx.dir.save_installed(&now) {
                        return (Outcome::Failed(format!("cannot record the installed software: {e}")), None);
                    }
                    cx.log.line("committed");
                    (Outcome::Ok, Some(now))
                })
                .await
            }
            Step::Rollback => {
                self.blocking(move || {
                    let header = cx.header();
                    match cx.with_module(header.as_ref(), |m, c| m.rollback(c)) {
                        Ok(()) => {
                            cx.log.line("rolled back");
                            (Outcome::Ok, None)
                        }
                        Err(e) => (Outcome::Failed(e), None),
                    }
                })
                .await
            }
            Step::Failure => {
                self.blocking(move || {
                    let mut now = None;
                    let end = cx.job.final_end();
                    if end.runs_new
                        && let Some(incoming) = &cx.job.incoming
                    {
                        let after = cx.installed.after(incoming);
                        match cx.dir.save_installed(&after) {
                            Ok(()) => now = Some(after),
                            Err(e) => cx.log.warn(&format!("cannot record the installed software: {e}")),
                        }
                    }
                    if cx.job.changed && cx.job.module.is_some() {
                        let header = cx.header();
                        if let Err(e) = cx.with_module(header.as_ref(), |m, c| m.failure(c)) {
                            cx.log.warn(&e);
                        }
                    }
                    (Outcome::Ok, now)
                })
                .await
            }
            Step::Cleanup => {
                self.blocking(move || {
                    if cx.job.module.is_some() {
                        let header = cx.header();
                        if let Err(e) = cx.with_module(header.as_ref(), |m, c| m.cleanup(c)) {
                            cx.log.warn(&e);
                        }
                    }
                    let _ = std::fs::remove_dir_all(cx.dir.work_dir());
                    let _ = std::fs::remove_file(cx.part());
                    (Outcome::Ok, None)
                })
                .await
            }
            Step::Done => (Outcome::Ok, None),
            other => (Outcome::Failed(format!("internal error: no driver for step {}", other.as_str())), None),
        }
    }

    async fn reboot(&self, cx: StepCx) -> StepResult {
        let command = self.cfg.reboot_command.clone();
        let log = cx.log.clone();
        log.line(&format!("rebooting: {command}"));
        let limit = Duration::from_secs(120);
        let (outcome, _) = self
            .blocking(move || {
                let o = match proc::run(&mut proc::shell(&command), limit) {
                    Err(e) => Outcome::Failed(format!("reboot_command could not run: {e}")),
                    Ok(o) if !o.success() => {
                        log.output("reboot_command output", &format!("{}{}", o.stdout, o.stderr));
                        let said = o.last_line().map(|l| format!(": {l}")).unwrap_or_default();
                        Outcome::Failed(format!("reboot_command failed ({}){said}", o.describe(limit)))
                    }
                    Ok(_) => Outcome::Ok,
                };
                (o, None)
            })
            .await;
        if outcome != Outcome::Ok {
            return (outcome, None);
        }
        if self.reboot == RebootMode::Simulated {
            return (Outcome::Ok, None);
        }
        // The reboot stops this process; the next start continues after it.
        tokio::time::sleep(self.cfg.reboot_timeout).await;
        (
            Outcome::Failed(format!(
                "reboot_command succeeded, but the device did not restart within {} s",
                self.cfg.reboot_timeout.as_secs()
            )),
            None,
        )
    }

    async fn verify(&self, cx: StepCx, connected: &mut watch::Receiver<bool>) -> StepResult {
        let deadline_ms = cx.job.verify_deadline_ms.unwrap_or_else(|| now_ms() + self.policy.verify_timeout_ms);
        let left = |d: i64| Duration::from_millis((d - now_ms()).max(0) as u64);
        if !*connected.borrow() {
            cx.log.line("verifying: waiting for the connection to the server");
            let ok = tokio::time::timeout(left(deadline_ms), connected.wait_for(|c| *c)).await;
            if !matches!(ok, Ok(Ok(_))) {
                return (
                    Outcome::Failed("the device did not connect to the server before the verify deadline".into()),
                    None,
                );
            }
        }
        cx.log.line("verifying: connected to the server");
        let health = self.cfg.health_check.clone();
        self.blocking(move || {
            let header = cx.header();
            if let Err(e) = cx.with_module(header.as_ref(), |m, c| m.verify(c)) {
                return (Outcome::Failed(format!("verification failed: {e}")), None);
            }
            if let Some(h) = health {
                let limit = left(deadline_ms).max(Duration::from_secs(1));
                let mut cmd = proc::shell(&h);
                cmd.envs(cx.hook_env());
                match proc::run(&mut cmd, limit) {
                    Ok(o) if o.success() => cx.log.line("health check passed"),
                    Ok(o) => {
                        cx.log.output("health check output", &format!("{}{}", o.stdout, o.stderr));
                        let said = o.last_line().map(|l| format!(": {l}")).unwrap_or_default();
                        return (Outcome::Failed(format!("health check failed ({}){said}", o.describe(limit))), None);
                    }
                    Err(e) => return (Outcome::Failed(format!("health check could not run: {e}")), None),
                }
            }
            (Outcome::Ok, None)
        })
        .await
    }
}

fn download(cx: &StepCx, dl: &Downloader, cancel: &AtomicBool, every: Duration, shared: &Shared) -> Outcome {
    if let Err(e) = cx.dir.ensure() {
        return Outcome::Retry(e);
    }
    let offer = &cx.job.artifact;
    let part = cx.part();
    cx.log.line(&format!("downloading {}", dl.url(offer)));
    let mut incompatible = None;
    let mut on_header = |h: &Header| -> Result<(), String> {
        // Fail early: who signed, and whether it is for this device at all.
        let store = trust::load(&cx.dir, &cx.cfg.root_file, &cx.job.roots)?;
        let key = store.verify_header(h).map_err(|e| format!("signature check failed: {e}"))?;
        cx.log.line(&format!("signed by trusted release key {key}"));
        if let Err(e) = h.manifest.check_compatible(&cx.cfg.device_type, &cx.provides()) {
            incompatible = Some(e.to_string());
            return Err(e.to_string());
        }
        Ok(())
    };
    let deployment = cx.job.deployment.clone();
    let total = offer.size;
    let mut progress = |bytes: u64| {
        let mut r = UpdateReport::new(&deployment, UpdateState::Downloading);
        r.bytes = Some(bytes);
        r.total = Some(total);
        shared.set_resend(Some(r.clone()));
        shared.send(r);
    };
    let r = dl.fetch(offer, &part, cx.cfg.max_artifact_size, cancel, every, &mut progress, &mut on_header);
    match r {
        Fetch::Done(v) => {
            cx.log.line(&format!("downloaded and verified {} bytes", v.size));
            Outcome::Ok
        }
        Fetch::Retry(m) => Outcome::Retry(m),
        Fetch::Failed(m) => match incompatible {
            Some(i) => Outcome::Incompatible(i),
            None => Outcome::Failed(m),
        },
        Fetch::Cancelled => Outcome::Failed("download cancelled".into()),
    }
}

/// Verifies the downloaded file end to end, checks it is for this device, prepares the work
/// directory and lets the module stage the payloads.
fn check(cx: &StepCx) -> Outcome {
    let offer = &cx.job.artifact;
    let part = cx.part();
    let v = match super::download::verify_file(&part, cx.cfg.max_artifact_size) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Outcome::Failed(e);
        }
    };
    if v.file_sha256 != offer.id {
        let _ = std::fs::remove_file(&part);
        return Outcome::Failed(format!("the artifact's SHA-256 is {}, not the offered {}", v.file_sha256, offer.id));
    }
    let store = match trust::load(&cx.dir, &cx.cfg.root_file, &cx.job.roots) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(e),
    };
    if let Err(e) = store.verify_header(&v.header) {
        return Outcome::Failed(format!("signature check failed: {e}"));
    }
    let m = &v.header.manifest;
    if let Err(e) = m.check_compatible(&cx.cfg.device_type, &cx.provides()) {
        return Outcome::Incompatible(e.to_string());
    }
    cx.log.line(&format!(
        "verified: {} {} for {}, payload type {}",
        m.name, m.version, cx.cfg.device_type, m.payload_type
    ));
    let work = cx.dir.work_dir();
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = std::fs::create_dir_all(&work) {
        return Outcome::Failed(format!("{}: {e}", work.display()));
    }
    let incoming = Installed {
        software: Some(Software { artifact: Some(offer.id.clone()), name: m.name.clone(), version: m.version.clone() }),
        provides: m.provides.clone(),
    };
    let mut job = cx.job.clone();
    job.module = Some(m.payload_type.clone());
    let cx2 =
        StepCx { cfg: cx.cfg.clone(), dir: cx.dir.clone(), job, installed: cx.installed.clone(), log: cx.log.clone() };
    let r = cx2.with_module(Some(&v.header), |module, c| {
        module.download(c)?;
        module.supports_rollback(c)
    });
    match r {
        Ok(supports_rollback) => {
            cx.log.line(&format!(
                "the {} module is ready; it {} roll back",
                m.payload_type,
                if supports_rollback { "can" } else { "cannot" }
            ));
            Outcome::Checked { incoming, module: m.payload_type.clone(), supports_rollback }
        }
        Err(e) => {
            // Staging failed: leave nothing behind.
            let _ = cx2.with_module(Some(&v.header), |module, c| module.cleanup(c));
            Outcome::Failed(e)
        }
    }
}
