//! Periodic snapshots: every N seconds take `auto-<UTC time>` of a volume and delete the
//! oldest scheduled ones beyond `keep`. A snapshot is scheduled when the pool recorded it
//! so as it was taken (its name plays no part): snapshots taken by hand, whatever their
//! name, and protected ones are never deleted here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tessel_engine::Engine;
use tessel_targets::control::proto::ScheduleInfo;

/// Prefix of the names the scheduler gives its snapshots.
pub const AUTO_PREFIX: &str = "auto-";

/// The file in the data directory that keeps schedules set at run time.
pub const FILE: &str = "schedules.json";

struct Schedule {
    volume: String,
    every_secs: u64,
    keep: u32,
    next_unix: u64,
}

/// What `tessel schedule set` and `remove` changed, per volume, as kept in [`FILE`]: it
/// overrides the configuration's `[[schedule]]` for that volume at every start. A removal
/// is kept too (`every_secs` 0), so that a configured schedule removed at run time stays
/// removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Overrides {
    schedules: BTreeMap<String, Setting>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Setting {
    /// 0: the schedule was removed.
    every_secs: u64,
    keep: u32,
    /// When it was set: the first snapshot is due one interval after, if none was taken.
    since_unix: u64,
}

/// The daemon's schedules (from the configuration and `tessel schedule set`).
pub struct Schedules {
    engine: Engine,
    list: Mutex<Vec<Schedule>>,
    /// Where run-time changes are kept.
    file: PathBuf,
    overrides: Mutex<Overrides>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `YYYYmmddTHHMMSSZ` for a Unix time (UTC).
pub fn utc_stamp(t: u64) -> String {
    let (y, mo, d, h, mi, s) = crate::table::utc_fields(t);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

impl Schedules {
    /// The configured schedules (`(volume, every_secs, keep)`), overridden per volume by
    /// the run-time changes kept in `file`. A schedule's next snapshot is due one interval
    /// after its newest scheduled snapshot (or after it was set with the CLI, when it took
    /// none yet; at once for a configured one that took none), so a restart neither resets
    /// nor skips its timer; one overdue is taken at once.
    pub fn open(
        engine: Engine,
        configured: &[(String, u64, u32)],
        file: &Path,
    ) -> Result<Arc<Schedules>, String> {
        let overrides = match std::fs::read_to_string(file) {
            Ok(text) => serde_json::from_str::<Overrides>(&text)
                .map_err(|e| format!("{}: {e}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Overrides::default(),
            Err(e) => return Err(format!("{}: {e}", file.display())),
        };
        let schedules = Arc::new(Schedules {
            engine,
            list: Mutex::new(Vec::new()),
            file: file.to_path_buf(),
            overrides: Mutex::new(overrides.clone()),
        });
        for (volume, every, keep) in configured {
            if overrides.schedules.contains_key(volume) {
                tracing::info!(
                    volume = %volume,
                    file = %file.display(),
                    "the schedule set at run time overrides the configured one"
                );
                continue;
            }
            // No time it was set: without a scheduled snapshot yet the first is due now,
            // so that a daemon restarted more often than the interval still takes them.
            if let Err(e) = schedules.install(volume, *every, *keep, 0) {
                tracing::warn!(volume = %volume, "schedule not set: {e}");
            }
        }
        for (volume, o) in &overrides.schedules {
            if o.every_secs == 0 {
                continue;
            }
            if let Err(e) = schedules.install(volume, o.every_secs, o.keep, o.since_unix) {
                tracing::warn!(volume = %volume, "schedule kept in {} not set: {e}", file.display());
            }
        }
        Ok(schedules)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Schedule>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When `volume`'s next snapshot is due: one interval after its newest scheduled
    /// snapshot, or after `since` when it has none (or only older ones).
    fn next_due(&self, volume: &str, every_secs: u64, since: u64) -> u64 {
        let newest = self
            .engine
            .snapshots(Some(volume))
            .ok()
            .and_then(|all| {
                all.iter()
                    .filter(|s| s.scheduled)
                    .map(|s| s.created_unix)
                    .max()
            })
            .unwrap_or(0);
        newest.max(since) + every_secs
    }

    /// Put a schedule in the table (replacing the volume's) without keeping it in the file.
    fn install(&self, volume: &str, every_secs: u64, keep: u32, since: u64) -> Result<(), String> {
        if self.engine.volume(volume).is_none() {
            return Err(format!("unknown volume '{volume}'"));
        }
        if every_secs > 0 && keep == 0 {
            return Err("keep must be at least 1".into());
        }
        let next_unix = self.next_due(volume, every_secs, since);
        let mut l = self.lock();
        l.retain(|s| s.volume != volume);
        if every_secs > 0 {
            l.push(Schedule {
                volume: volume.into(),
                every_secs,
                keep,
                next_unix,
            });
        }
        Ok(())
    }

    /// Add or replace the schedule of a volume; `every_secs == 0` removes it. Kept in the
    /// data directory's [`FILE`], so it holds across restarts.
    pub fn set(&self, volume: &str, every_secs: u64, keep: u32) -> Result<(), String> {
        let now = now_unix();
        self.install(volume, every_secs, keep, now)?;
        self.keep(volume, every_secs, keep, now)
    }

    /// A volume was deleted: its schedule goes, and so does what the file kept of it.
    pub fn forget(&self, volume: &str) {
        self.lock().retain(|s| s.volume != volume);
        let file = &self.file;
        let mut o = self.overrides.lock().unwrap_or_else(|p| p.into_inner());
        if o.schedules.remove(volume).is_some() {
            if let Err(e) = save(file, &o) {
                tracing::warn!(volume, "could not update {}: {e}", file.display());
            }
        }
    }

    fn keep(&self, volume: &str, every_secs: u64, keep: u32, now: u64) -> Result<(), String> {
        let file = &self.file;
        let mut o = self.overrides.lock().unwrap_or_else(|p| p.into_inner());
        o.schedules.insert(
            volume.to_string(),
            Setting {
                every_secs,
                keep: if every_secs == 0 { 0 } else { keep },
                since_unix: now,
            },
        );
        save(file, &o).map_err(|e| {
            format!(
                "the schedule runs, but could not be kept in {} for restarts: {e}",
                file.display()
            )
        })
    }

    /// Every schedule.
    pub fn list(&self) -> Vec<ScheduleInfo> {
        self.lock()
            .iter()
            .map(|s| ScheduleInfo {
                volume: s.volume.clone(),
                every_secs: s.every_secs,
                keep: s.keep,
                next_unix: Some(s.next_unix),
            })
            .collect()
    }

    fn take_due(&self, now: u64) -> Vec<(String, u32)> {
        let mut due = Vec::new();
        for s in self.lock().iter_mut() {
            if s.next_unix <= now {
                // From now, not from when it was due: one overdue after a long stop is
                // taken once, not once per missed interval.
                s.next_unix = now + s.every_secs;
                due.push((s.volume.clone(), s.keep));
            }
        }
        due
    }

    fn snapshot(&self, volume: &str, keep: u32, now: u64) {
        let mut name = format!("{AUTO_PREFIX}{}", utc_stamp(now));
        let existing = self.engine.snapshot_names(volume);
        let mut n = 1;
        while existing.contains(&name) {
            n += 1;
            name = format!("{AUTO_PREFIX}{}-{n}", utc_stamp(now));
        }
        match self.engine.snapshot_create_scheduled(volume, &name) {
            Ok(_) => tracing::info!(volume, snapshot = %name, "scheduled snapshot taken"),
            Err(e) => {
                tracing::warn!(volume, "scheduled snapshot failed: {e}");
                return;
            }
        }
        let scheduled: Vec<(String, bool)> = match self.engine.snapshots(Some(volume)) {
            Ok(all) => all
                .into_iter()
                .filter(|s| s.scheduled)
                .map(|s| (s.name, s.protected))
                .collect(),
            Err(e) => {
                tracing::warn!(volume, "cannot list snapshots to expire: {e}");
                return;
            }
        };
        // Protected ones count towards `keep` but are never deleted.
        let excess = scheduled.len().saturating_sub(keep as usize);
        let expired = scheduled.iter().take(excess).filter(|(_, p)| !p);
        for (old, _) in expired {
            match self.engine.snapshot_delete(volume, old) {
                Ok(()) => {
                    tracing::info!(volume, snapshot = %old, "expired scheduled snapshot deleted")
                }
                Err(e) => {
                    tracing::warn!(volume, snapshot = %old, "could not expire scheduled snapshot: {e}")
                }
            }
        }
    }

    /// Take due snapshots once a second until `stop`.
    pub fn run(self: Arc<Self>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Acquire) {
            let now = now_unix();
            for (volume, keep) in self.take_due(now) {
                self.snapshot(&volume, keep, now);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Write the overrides to `file` atomically.
fn save(file: &Path, o: &Overrides) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(o).map_err(std::io::Error::other)?;
    text.push('\n');
    super::origins::replace_file(file, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps_match_known_dates() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(1_795_315_545), "20261122T024545Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
    }
}
