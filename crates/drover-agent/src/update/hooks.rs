//! State hooks: executables in `hooks_dir` named `<State>_Enter[_<suffix>]` or
//! `<State>_Leave[_<suffix>]` (`Download_Enter_00`, `Install_Leave_10-restart-app`), run in
//! name order when the update enters or leaves that state.
//!
//! Exit 0: go on with the next hook. Exit 21: busy, retry the step later ([`BUSY`]). Anything
//! else: a veto — the update fails (before the install) or rolls back (after it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::machine::{HookPhase, HookState};
use super::persist::UpdateLog;
use super::proc;

/// The exit code that asks the agent to retry later.
pub const BUSY: i32 = 21;

/// What came of a state's hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookResult {
    Ok,
    /// A hook exited 21.
    Busy(String),
    /// A hook exited otherwise, timed out or could not run.
    Failed(String),
}

/// The hooks of `state`/`phase` in `dir`, in name order. Hidden files, non-executables and
/// names that only start alike (`Download_Entering`) are skipped.
pub fn find(dir: &Path, state: HookState, phase: HookPhase) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let base = format!("{}_{}", state.as_str(), phase.as_str());
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name == base || name.strip_prefix(&base).is_some_and(|r| r.starts_with('_'))
        })
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Runs the hooks of `state`/`phase`; stops at the first that does not exit 0.
pub fn run(
    dir: &Path,
    state: HookState,
    phase: HookPhase,
    env: &[(String, String)],
    timeout: Duration,
    log: &UpdateLog,
) -> HookResult {
    for hook in find(dir, state, phase) {
        let name = hook.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut cmd = std::process::Command::new(&hook);
        cmd.current_dir(dir).envs(env.iter().map(|(k, v)| (k, v)));
        cmd.env("DROVER_STATE", format!("{}_{}", state.as_str(), phase.as_str()));
        log.line(&format!("state hook {name}"));
        let out = match proc::run(&mut cmd, timeout) {
            Ok(o) => o,
            Err(e) => return HookResult::Failed(format!("state hook {name} could not run: {e}")),
        };
        log.output(&format!("{name} output"), &format!("{}{}", out.stdout, out.stderr));
        if out.success() {
            continue;
        }
        let said = out.last_line().map(|l| format!(": {l}")).unwrap_or_default();
        if out.code == Some(BUSY) {
            log.line(&format!("state hook {name} is busy (exit 21): retrying later"));
            return HookResult::Busy(format!("state hook {name} asked to retry later{said}"));
        }
        let why = out.describe(timeout);
        log.warn(&format!("state hook {name} failed ({why})"));
        return HookResult::Failed(format!("state hook {name} refused ({why}){said}"));
    }
    HookResult::Ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::testutil::{script, temp};

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn hooks_run_in_name_order_and_only_matching_executables() {
        let dir = temp("hooks-order");
        let out = dir.join("ran");
        for name in ["Install_Enter_20", "Install_Enter_10", "Install_Enter", "Install_Leave", "Install_Entering"] {
            script(&dir.join(name), &format!("echo {name} >> {}", out.display()));
        }
        std::fs::write(dir.join("Install_Enter_30"), "#!/bin/sh\necho not executable\n").unwrap();
        let env = vec![("DROVER_DEPLOYMENT".to_string(), "d1".to_string())];
        let r = run(&dir, HookState::Install, HookPhase::Enter, &env, T, &UpdateLog::none());
        assert_eq!(r, HookResult::Ok);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "Install_Enter\nInstall_Enter_10\nInstall_Enter_20\n");
        // No hooks (or no folder): nothing to do.
        assert_eq!(
            run(&dir.join("none"), HookState::Commit, HookPhase::Leave, &[], T, &UpdateLog::none()),
            HookResult::Ok
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Bad input: a hook vetoes; a hook is busy; a hook hangs. The hooks after it do not run.
    #[test]
    fn veto_busy_and_timeout_stop_the_hooks() {
        let dir = temp("hooks-veto");
        let after = dir.join("after-ran");
        script(&dir.join("Download_Enter_00"), "echo checking; echo 'battery too low' >&2; exit 3");
        script(&dir.join("Download_Enter_10"), &format!("touch {}", after.display()));
        let r = run(&dir, HookState::Download, HookPhase::Enter, &[], T, &UpdateLog::none());
        let HookResult::Failed(msg) = r else { panic!("{r:?}") };
        assert!(
            msg.contains("Download_Enter_00") && msg.contains("exit status 3") && msg.contains("battery too low"),
            "{msg}"
        );
        assert!(!after.exists());

        script(&dir.join("Verify_Leave_00"), "echo 'app still starting' >&2; exit 21");
        let r = run(&dir, HookState::Verify, HookPhase::Leave, &[], T, &UpdateLog::none());
        let HookResult::Busy(msg) = r else { panic!("{r:?}") };
        assert!(msg.contains("retry later") && msg.contains("app still starting"), "{msg}");

        script(&dir.join("Commit_Enter"), "sleep 30");
        let r = run(&dir, HookState::Commit, HookPhase::Enter, &[], Duration::from_millis(200), &UpdateLog::none());
        let HookResult::Failed(msg) = r else { panic!("{r:?}") };
        assert!(msg.contains("killed"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hooks_see_the_environment() {
        let dir = temp("hooks-env");
        let out = dir.join("env");
        script(&dir.join("Rollback_Leave"), &format!("echo \"$DROVER_STATE $DROVER_DEPLOYMENT\" > {}", out.display()));
        let env = vec![("DROVER_DEPLOYMENT".to_string(), "dep-7".to_string())];
        assert_eq!(run(&dir, HookState::Rollback, HookPhase::Leave, &env, T, &UpdateLog::none()), HookResult::Ok);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "Rollback_Leave dep-7\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
