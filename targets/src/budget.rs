//! Memory budgets for data a target holds on a host's behalf: read data waiting for the
//! engine or for the host to take its reply, and write payloads on their way to the engine.
//!
//! A request that does not fit waits (its bytes stay unread in the socket); none is
//! dropped. Each connection has its own limit so one host cannot take the whole daemon's
//! share, and all connections draw from one [`MemoryBudget`] so a thousand of them stay
//! within what the daemon may use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The bytes every connection of a daemon may hold together.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= self.limit).then_some(used + n)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One connection's share of a [`MemoryBudget`]; what it holds goes back when dropped.
#[derive(Debug)]
pub struct Allowance {
    budget: Arc<MemoryBudget>,
    limit: u64,
    held: u64,
}

impl Allowance {
    /// A connection's allowance of at most `limit` bytes from `budget`.
    pub fn new(budget: Arc<MemoryBudget>, limit: u64) -> Allowance {
        Allowance {
            budget,
            limit,
            held: 0,
        }
    }

    /// An allowance with no limit (sessions driven by unit tests).
    pub fn unlimited() -> Allowance {
        Allowance::new(MemoryBudget::new(u64::MAX / 2), u64::MAX / 2)
    }

    /// Take `n` bytes if both the connection's limit and the daemon's budget allow it. A
    /// connection holding nothing may exceed its own limit with one request (a request
    /// larger than the limit would otherwise never run), never the daemon's budget.
    pub fn try_take(&mut self, n: u64) -> bool {
        if self.held > 0 && self.held + n > self.limit {
            return false;
        }
        self.try_take_beyond_limit(n)
    }

    /// Take `n` bytes if the daemon's budget allows, whatever the connection's own limit
    /// says: for a connection whose held bytes are not its requests' (an iSCSI session
    /// whose held bytes are data of commands still waiting), so that one request still
    /// runs.
    pub fn try_take_beyond_limit(&mut self, n: u64) -> bool {
        if !self.budget.try_take(n) {
            return false;
        }
        self.held += n;
        true
    }

    /// Count `n` bytes that exist already (data received before its command could be
    /// admitted), even past the limits: requests then wait until bytes come back.
    pub fn hold(&mut self, n: u64) {
        self.budget.used.fetch_add(n, Ordering::AcqRel);
        self.held += n;
    }

    /// Give back `n` bytes taken earlier.
    pub fn give(&mut self, n: u64) {
        let n = n.min(self.held);
        self.held -= n;
        self.budget.give(n);
    }

    /// Bytes this connection holds.
    pub fn held(&self) -> u64 {
        self.held
    }
}

impl Drop for Allowance {
    fn drop(&mut self) {
        self.budget.give(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_waits_at_its_own_limit_and_at_the_daemons() {
        let budget = MemoryBudget::new(100);
        let mut a = Allowance::new(budget.clone(), 40);
        let mut b = Allowance::new(budget.clone(), 40);
        assert!(a.try_take(30));
        assert!(!a.try_take(20), "over the connection's limit");
        assert!(a.try_take(10));
        assert!(
            b.try_take(60),
            "one request over its limit when it holds nothing"
        );
        assert!(!b.try_take(1));
        let mut c = Allowance::new(budget.clone(), 40);
        assert!(!c.try_take(1), "the daemon's budget is spent");
        a.give(40);
        assert!(c.try_take(1));
        drop(b);
        drop(c);
        assert_eq!(
            budget.used(),
            0,
            "dropped allowances give back what they held"
        );
    }
}
