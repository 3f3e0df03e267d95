//! Periodic snapshots: every N seconds take `auto-<UTC time>` of a volume and delete the
//! oldest scheduled ones beyond `keep`. A snapshot is scheduled when the pool recorded it
//! so as it was taken (its name plays no part): snapshots taken by hand, whatever their
//! name, and protected ones are never deleted here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tessel_engine::Engine;
use tessel_targets::control::proto::ScheduleInfo;

/// Prefix of the names the scheduler gives its snapshots.
pub const AUTO_PREFIX: &str = "auto-";

struct Schedule {
    volume: String,
    every_secs: u64,
    keep: u32,
    next_unix: u64,
}

/// The daemon's schedules (from the configuration and `tessel schedule set`).
pub struct Schedules {
    engine: Engine,
    list: Mutex<Vec<Schedule>>,
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
    /// No schedules yet.
    pub fn new(engine: Engine) -> Arc<Schedules> {
        Arc::new(Schedules {
            engine,
            list: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Schedule>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add or replace the schedule of a volume; `every_secs == 0` removes it.
    pub fn set(&self, volume: &str, every_secs: u64, keep: u32) -> Result<(), String> {
        if self.engine.volume(volume).is_none() {
            return Err(format!("unknown volume '{volume}'"));
        }
        let mut l = self.lock();
        l.retain(|s| s.volume != volume);
        if every_secs > 0 {
            if keep == 0 {
                return Err("keep must be at least 1".into());
            }
            l.push(Schedule {
                volume: volume.into(),
                every_secs,
                keep,
                next_unix: now_unix() + every_secs,
            });
        }
        Ok(())
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
