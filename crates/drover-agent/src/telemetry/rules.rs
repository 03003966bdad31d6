//! Device rules: the evaluator (pure: values and times in, firings out) and the rule set's
//! file under the data directory.
//!
//! A metric rule fires when its condition has held for `for_s` seconds of the device's own
//! measurements, and not again until the condition has cleared. An event rule fires on every
//! matching event from the local interface (events that rules raise themselves are not fed
//! back, so a rule cannot trigger itself).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use drover_proto::telemetry::{Condition, Rule, RuleSet};

/// A rule that fired: what the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    pub rule: Rule,
    /// The value that made it fire (metric rules).
    pub value: Option<f64>,
    pub t: i64,
}

#[derive(Debug, Default, Clone, Copy)]
struct RuleState {
    /// Since when (Unix ms) the condition has held.
    since: Option<i64>,
    fired: bool,
}

/// The rules in force and where each stands.
#[derive(Debug, Default)]
pub struct Evaluator {
    set: Option<RuleSet>,
    state: BTreeMap<String, RuleState>,
}

impl Evaluator {
    pub fn new(set: Option<RuleSet>) -> Self {
        Evaluator { set, state: BTreeMap::new() }
    }

    pub fn version(&self) -> Option<u64> {
        self.set.as_ref().map(|s| s.version)
    }

    pub fn rules(&self) -> &[Rule] {
        self.set.as_ref().map(|s| s.rules.as_slice()).unwrap_or_default()
    }

    /// Puts a new rule set in force. A rule whose id and condition are unchanged keeps its
    /// state (a condition already true and fired does not fire again because of the update).
    pub fn replace(&mut self, set: RuleSet) {
        let old = std::mem::take(&mut self.state);
        for r in &set.rules {
            let same = self.rules().iter().any(|o| o.id == r.id && o.condition() == r.condition());
            if same && let Some(s) = old.get(&r.id) {
                self.state.insert(r.id.clone(), *s);
            }
        }
        self.set = Some(set);
    }

    /// One measurement of `metric` at `t` (Unix ms).
    pub fn metric(&mut self, metric: &str, value: f64, t: i64) -> Vec<Firing> {
        let mut out = Vec::new();
        let Some(set) = &self.set else { return out };
        for r in &set.rules {
            let Some(Condition::Metric { metric: m, op, threshold, for_s }) = r.condition() else { continue };
            if m != metric {
                continue;
            }
            let st = self.state.entry(r.id.clone()).or_default();
            if op.holds(value, threshold) {
                let since = *st.since.get_or_insert(t);
                if !st.fired && t.saturating_sub(since) >= (for_s as i64) * 1000 {
                    st.fired = true;
                    out.push(Firing { rule: r.clone(), value: Some(value), t });
                }
            } else {
                *st = RuleState::default();
            }
        }
        out
    }

    /// An event named `name` happened at `t`.
    pub fn event(&mut self, name: &str, t: i64) -> Vec<Firing> {
        let Some(set) = &self.set else { return Vec::new() };
        set.rules
            .iter()
            .filter(|r| matches!(r.condition(), Some(Condition::Event { name: n }) if n == name))
            .map(|r| Firing { rule: r.clone(), value: None, t })
            .collect()
    }
}

/// `rules.json` in the telemetry directory: the last rule set applied.
pub struct RuleFile(pub PathBuf);

impl RuleFile {
    pub fn new(dir: &Path) -> Self {
        RuleFile(dir.join("rules.json"))
    }

    /// The stored rule set; `None` when there is none or it is unreadable (logged).
    pub fn load(&self) -> Option<RuleSet> {
        let text = match std::fs::read(&self.0) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.0.display(), "device rules unreadable, none in force: {e}");
                return None;
            }
        };
        match serde_json::from_slice::<RuleSet>(&text).map_err(|e| e.to_string()).and_then(|s| s.check().map(|()| s)) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(path = %self.0.display(), "device rules invalid, none in force: {e}");
                None
            }
        }
    }

    /// Writes atomically: a temporary file, fsync, rename, fsync of the directory.
    pub fn save(&self, set: &RuleSet) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self.0.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(set).unwrap_or_default())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.0)?;
        if let Some(dir) = self.0.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(version: u64, rules: &str) -> RuleSet {
        let s: RuleSet = serde_json::from_str(&format!(r#"{{"v":1,"version":{version},"rules":[{rules}]}}"#)).unwrap();
        s.check().unwrap();
        s
    }

    const HOT: &str = r#"{"id":"hot","name":"Hot","metric":"temp","op":">","threshold":70,"for_s":10,"raise":{"name":"temp.hot","severity":"warning"}}"#;

    #[test]
    fn hold_time_then_one_firing_until_cleared() {
        let mut ev = Evaluator::new(Some(set(1, HOT)));
        assert!(ev.metric("temp", 80.0, 0).is_empty(), "not held long enough");
        assert!(ev.metric("temp", 80.0, 9_999).is_empty());
        assert!(ev.metric("other", 99.0, 10_000).is_empty(), "another metric");
        let f = ev.metric("temp", 75.0, 10_000);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].rule.id.as_str(), f[0].value, f[0].t), ("hot", Some(75.0), 10_000));
        assert!(ev.metric("temp", 90.0, 20_000).is_empty(), "no re-firing while it stays true");
        assert!(ev.metric("temp", 70.0, 21_000).is_empty(), "cleared (70 is not > 70)");
        assert!(ev.metric("temp", 71.0, 22_000).is_empty(), "hold time starts again");
        assert_eq!(ev.metric("temp", 71.0, 32_000).len(), 1, "fires again after clearing");
    }

    #[test]
    fn a_dip_resets_the_hold_time() {
        let mut ev = Evaluator::new(Some(set(1, HOT)));
        ev.metric("temp", 80.0, 0);
        ev.metric("temp", 60.0, 5_000);
        assert!(ev.metric("temp", 80.0, 10_000).is_empty());
        assert_eq!(ev.metric("temp", 80.0, 20_000).len(), 1);
    }

    #[test]
    fn event_rules_and_updates() {
        let door = r#"{"id":"door","name":"Door","event":"door.open","action":"siren"}"#;
        let mut ev = Evaluator::new(None);
        assert!(ev.event("door.open", 1).is_empty(), "no rules");
        ev.replace(set(2, &format!("{HOT},{door}")));
        assert_eq!(ev.event("door.open", 1).len(), 2 - 1);
        assert_eq!(ev.event("door.open", 2).len(), 1, "every matching event fires");
        assert!(ev.event("door.closed", 3).is_empty());
        // Fired and still true: an update that keeps the rule does not fire it again.
        ev.metric("temp", 80.0, 0);
        assert_eq!(ev.metric("temp", 80.0, 10_000).len(), 1);
        ev.replace(set(3, HOT));
        assert!(ev.metric("temp", 80.0, 11_000).is_empty());
        // A changed threshold is a new rule: its state starts over.
        ev.replace(set(4, &HOT.replace("70", "50")));
        assert!(ev.metric("temp", 80.0, 12_000).is_empty());
        assert_eq!(ev.metric("temp", 80.0, 22_000).len(), 1);
        assert_eq!(ev.version(), Some(4));
        ev.replace(set(5, ""));
        assert!(ev.metric("temp", 80.0, 40_000).is_empty(), "rules removed");
    }

    #[test]
    fn file_round_trip_and_bad_file() {
        let d = std::env::temp_dir().join(format!("drover-rules-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = RuleFile::new(&d);
        assert_eq!(f.load(), None);
        let s = set(7, HOT);
        f.save(&s).unwrap();
        assert_eq!(f.load(), Some(s));
        // Bad input: a rules file that is not a valid rule set.
        std::fs::write(&f.0, b"{not json").unwrap();
        assert_eq!(f.load(), None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
