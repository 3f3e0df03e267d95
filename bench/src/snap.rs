//! Snapshot load of a run: the windows during which a snapshot create call ran, and the stall
//! they caused to writes, measured by the submitters.
//!
//! Definition of `snapshot_stall_us_max`: the snapshot thread records each create call as a
//! window `[a, b]` (a = just before the call, b = when it returned). A write submitted at `s`
//! and completed (seen by its submitter's poll) at `c` was in flight during the window when
//! `s <= b` and `c >= a`. The stall is the largest latency `c - s` of such writes: it holds the
//! drain of writes admitted before the barrier as well as the hold of writes that arrived
//! during it. Times are nanoseconds since one common instant.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The create windows of a run, published by the snapshot thread to the submitters.
pub struct Windows {
    base: Instant,
    /// Start of the window now open, plus one; 0 when none is open.
    open: AtomicU64,
    /// Closed windows, oldest first (they never overlap: one snapshot thread).
    closed: Mutex<Vec<(u64, u64)>>,
    /// `closed.len()`, readable without the lock.
    count: AtomicUsize,
}

impl Windows {
    /// No window yet; times count from `base`.
    pub fn new(base: Instant) -> Windows {
        Windows {
            base,
            open: AtomicU64::new(0),
            closed: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
        }
    }

    /// Nanoseconds from `base` to `t` (0 for earlier instants).
    pub fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Open a window now (call right before the create call); returns its start.
    pub fn open(&self) -> u64 {
        let a = self.ns(Instant::now());
        self.open.store(a + 1, Ordering::Release);
        a
    }

    /// Close the window opened at `a` now (call right after the create call returned).
    pub fn close(&self, a: u64) {
        let b = self.ns(Instant::now());
        self.closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((a, b.max(a)));
        // The count is published before the open mark is cleared: a submitter that sees no
        // open window also sees this one among the closed.
        self.count.fetch_add(1, Ordering::Release);
        self.open.store(0, Ordering::Release);
    }

    /// Every window closed so far.
    #[cfg(test)]
    pub fn all(&self) -> Vec<(u64, u64)> {
        self.closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Was a write submitted at `s` and completed at `c` in flight during one of the `closed`
/// windows (sorted, non-overlapping) or the window opened at `open` (still running)?
pub fn overlaps(closed: &[(u64, u64)], open: Option<u64>, s: u64, c: u64) -> bool {
    if open.is_some_and(|a| a <= c) {
        return true;
    }
    // Windows are in time order: scan back from the newest until one ended before `s`.
    for &(a, b) in closed.iter().rev() {
        if b < s {
            break;
        }
        if a <= c {
            return true;
        }
    }
    false
}

/// One submitter's view of the windows and the longest stall it saw.
#[derive(Default)]
pub struct StallTracker {
    local: Vec<(u64, u64)>,
    /// Longest latency (ns) of a write in flight during a window.
    pub max_ns: u64,
    /// Writes that were in flight during a window.
    pub writes: u64,
}

impl StallTracker {
    /// Account one completed write submitted at `s` and completed at `c` (ns since base).
    pub fn observe(&mut self, w: &Windows, s: u64, c: u64) {
        let open = w.open.load(Ordering::Acquire);
        let n = w.count.load(Ordering::Acquire);
        if n > self.local.len() {
            let all = w.closed.lock().unwrap_or_else(|e| e.into_inner());
            self.local.extend_from_slice(&all[self.local.len()..]);
        }
        let open = (open != 0).then(|| open - 1);
        if overlaps(&self.local, open, s, c) {
            self.max_ns = self.max_ns.max(c.saturating_sub(s));
            self.writes += 1;
        }
    }
}

/// The longest stall over a list of writes `(submitted, completed)`, the same computation as
/// the submitters make online (for the tests).
#[cfg(test)]
pub fn stall_max(windows: &[(u64, u64)], writes: &[(u64, u64)]) -> u64 {
    writes
        .iter()
        .filter(|&&(s, c)| overlaps(windows, None, s, c))
        .map(|&(s, c)| c - s)
        .max()
        .unwrap_or(0)
}

/// Parse "500ms", "1s", "1.5s", "2m", "250us" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim().to_ascii_lowercase();
    let bad = || format!("{s:?} is not a duration (examples: 500ms, 1s, 2m)");
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t.as_str(), 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let secs = v * mult;
    if !(secs > 0.0 && secs.is_finite() && secs < 1e9) {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stall_counts_writes_in_flight_during_a_window_only() {
        let windows = [(1_000, 2_000), (10_000, 10_500)];
        let writes = [
            (0, 999),         // done before the first window: not counted
            (500, 1_000),     // completes as it opens: counted (latency 500)
            (1_500, 1_600),   // inside: counted (100)
            (1_900, 4_900),   // submitted inside, completes long after: counted (3000)
            (2_001, 9_999),   // between the windows: not counted although slow (7998)
            (9_000, 10_000),  // completes as the second opens: counted (1000)
            (10_500, 10_600), // submitted as it closes: counted (100)
            (10_501, 30_000), // after the last window: not counted
        ];
        assert_eq!(stall_max(&windows, &writes), 3_000);
        assert!(!overlaps(&windows, None, 2_001, 9_999));
        assert!(overlaps(&windows, None, 0, 20_000), "spans both windows");
        assert_eq!(stall_max(&[], &writes), 0);
    }

    #[test]
    fn open_window_counts_completions_after_its_start() {
        assert!(overlaps(&[], Some(100), 0, 100));
        assert!(overlaps(&[], Some(100), 150, 160));
        assert!(!overlaps(&[], Some(100), 0, 99));
        assert!(!overlaps(&[(10, 20)], Some(100), 30, 99));
    }

    #[test]
    fn tracker_sees_windows_published_while_it_runs() {
        let w = Windows::new(Instant::now() - Duration::from_secs(1));
        let mut t = StallTracker::default();
        t.observe(&w, 10, 20);
        assert_eq!((t.max_ns, t.writes), (0, 0), "no window yet");
        let a = w.open();
        // A write still in flight when the window opened, completing during it.
        t.observe(&w, a - 50, a + 10);
        assert_eq!((t.max_ns, t.writes), (60, 1));
        w.close(a);
        let (_, b) = w.all()[0];
        // Submitted during the window, completed after it closed: counted via the copy.
        t.observe(&w, b, b + 5_000);
        assert_eq!((t.max_ns, t.writes), (5_000, 2));
        // Entirely after it: ignored however slow.
        t.observe(&w, b + 1, b + 1_000_000);
        assert_eq!((t.max_ns, t.writes), (5_000, 2));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
