//! The snapshot barrier as a protocol (DESIGN.md sections 5 and 9): typed messages between
//! a coordinator and its participants (today the reactors owning the volume's shards; a
//! remote node later), the coordinator's state machine for one round, and the event loop
//! that drives it. docs/architecture.md ("The barrier protocol") describes it for someone
//! implementing a participant elsewhere.
//!
//! The state machine is deterministic: time comes in as `now`, the epoch from the caller,
//! and what it wants sent comes out as values, so that its tests replay any conversation.

use crate::error::IoError;
use serde::{Deserialize, Serialize};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Names one round of the barrier; answers naming another round are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BarrierId(pub u64);

/// What a prepared participant holds back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// New writes (a snapshot): reads go on.
    Writes,
    /// New reads and writes (a rollback: nobody may read the volume as it is replaced).
    All,
}

/// What a commit does on each participant while the hold is in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Freeze the participant's shards of the volume into image `snap`: entries born at or
    /// before `epoch` belong to the snapshot, later ones to the volume alone.
    Freeze { snap: u64, epoch: u64 },
    /// Replace the volume's shards by snapshot `snap`'s.
    Rollback { snap: u64 },
}

/// Coordinator to participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToParticipant {
    /// Hold `scope` requests to `vol` that arrive from now on; answer `Ready` once those
    /// admitted before have completed.
    Prepare {
        barrier: BarrierId,
        vol: u64,
        scope: Scope,
    },
    /// Do `action`, release the held requests in arrival order, and answer `Committed`
    /// once the action's record is durable.
    Commit {
        barrier: BarrierId,
        vol: u64,
        action: Action,
    },
    /// Release the held requests without doing anything; answer `Released`. Sent to every
    /// participant, prepared or not: one that holds nothing for `barrier` just answers.
    Abort { barrier: BarrierId, vol: u64 },
}

/// Participant to coordinator; `from` is the participant's index in the round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// Drained: nothing in scope admitted before the prepare is in flight any more.
    Ready { barrier: BarrierId, from: u32 },
    /// The commit's action is durable (or failed); the hold is gone either way.
    Committed {
        barrier: BarrierId,
        from: u32,
        result: Result<(), IoError>,
    },
    /// The abort released the hold.
    Released { barrier: BarrierId, from: u32 },
}

impl ToCoordinator {
    fn barrier(&self) -> BarrierId {
        match self {
            ToCoordinator::Ready { barrier, .. }
            | ToCoordinator::Committed { barrier, .. }
            | ToCoordinator::Released { barrier, .. } => *barrier,
        }
    }

    fn from(&self) -> usize {
        match self {
            ToCoordinator::Ready { from, .. }
            | ToCoordinator::Committed { from, .. }
            | ToCoordinator::Released { from, .. } => *from as usize,
        }
    }
}

/// Where a participant sends its answers: the coordinator's inbox, handed over with each
/// message (over TCP it would be the peer connection).
#[derive(Clone)]
pub struct Reply(mpsc::Sender<ToCoordinator>);

impl Reply {
    /// Answer the coordinator. One that has gone (its round ended at a deadline) no longer
    /// listens, and the answer is dropped.
    pub(crate) fn send(&self, m: ToCoordinator) {
        let _ = self.0.send(m);
    }
}

/// How long each phase of a round may take.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// From the prepare until every participant is ready; then the round aborts.
    pub prepare: Duration,
    /// From the commit until every participant's action is durable.
    pub commit: Duration,
    /// From the abort until every participant released (later answers are not awaited).
    pub release: Duration,
}

/// How long every participant has to drain a volume's writes before a barrier aborts.
pub const BARRIER_DEADLINE: Duration = Duration::from_secs(5);

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            prepare: BARRIER_DEADLINE,
            commit: Duration::from_secs(60),
            release: Duration::from_secs(1),
        }
    }
}

/// What a commit does, decided before the round starts; a freeze's epoch is taken when
/// every participant is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Freeze into snapshot `snap`.
    Snapshot { snap: u64 },
    /// Roll back to snapshot `snap`.
    Rollback { snap: u64 },
}

/// How a round ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every participant committed. `epoch`: the snapshot's (0 for a rollback);
    /// `drained`: how long after the prepare the last participant was ready.
    Committed { epoch: u64, drained: Duration },
    /// A participant was not ready by the prepare deadline: every hold was released and
    /// nothing was done.
    Aborted,
    /// Committed, but a participant's action failed or was not durable by the commit
    /// deadline (`Device(ETIMEDOUT)`).
    Failed(IoError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Preparing,
    Committing,
    Aborting,
    Done,
}

/// One round of the barrier, as its coordinator sees it.
pub struct Round {
    id: BarrierId,
    vol: u64,
    scope: Scope,
    plan: Plan,
    deadlines: Deadlines,
    phase: Phase,
    /// Per participant: answered in this phase.
    answered: Vec<bool>,
    started: Instant,
    /// End of the current phase.
    deadline: Instant,
    epoch: u64,
    drained: Duration,
    /// First error a participant's commit reported.
    error: Option<IoError>,
    outcome: Option<Outcome>,
}

/// A message for participant `.0`.
pub type Outgoing = (usize, ToParticipant);

impl Round {
    /// A round over `participants` participants, started at `now`; `start` returns the
    /// prepares to send.
    pub fn new(
        id: BarrierId,
        vol: u64,
        scope: Scope,
        plan: Plan,
        participants: usize,
        deadlines: Deadlines,
        now: Instant,
    ) -> Round {
        Round {
            id,
            vol,
            scope,
            plan,
            deadlines,
            phase: Phase::Preparing,
            answered: vec![false; participants],
            started: now,
            deadline: now + deadlines.prepare,
            epoch: 0,
            drained: Duration::ZERO,
            error: None,
            outcome: None,
        }
    }

    /// The prepares, one per participant.
    pub fn start(&self) -> Vec<Outgoing> {
        let (barrier, vol, scope) = (self.id, self.vol, self.scope);
        self.to_all(ToParticipant::Prepare {
            barrier,
            vol,
            scope,
        })
    }

    fn to_all(&self, m: ToParticipant) -> Vec<Outgoing> {
        (0..self.answered.len()).map(|p| (p, m)).collect()
    }

    /// A participant's answer. `epoch` is called once, when the last participant is ready
    /// for a snapshot: the snapshot's epoch, taken after every admitted write drained.
    pub fn handle(
        &mut self,
        m: ToCoordinator,
        now: Instant,
        epoch: &mut dyn FnMut() -> u64,
    ) -> Vec<Outgoing> {
        let from = m.from();
        if m.barrier() != self.id || from >= self.answered.len() || self.answered[from] {
            return Vec::new();
        }
        match (self.phase, m) {
            (Phase::Preparing, ToCoordinator::Ready { .. }) => {
                self.answered[from] = true;
                if !self.all_answered() {
                    return Vec::new();
                }
                self.drained = now.saturating_duration_since(self.started);
                let action = match self.plan {
                    Plan::Snapshot { snap } => {
                        self.epoch = epoch();
                        Action::Freeze {
                            snap,
                            epoch: self.epoch,
                        }
                    }
                    Plan::Rollback { snap } => Action::Rollback { snap },
                };
                self.enter(Phase::Committing, now + self.deadlines.commit);
                let (barrier, vol) = (self.id, self.vol);
                self.to_all(ToParticipant::Commit {
                    barrier,
                    vol,
                    action,
                })
            }
            (Phase::Committing, ToCoordinator::Committed { result, .. }) => {
                self.answered[from] = true;
                if let Err(e) = result {
                    self.error.get_or_insert(e);
                }
                if self.all_answered() {
                    self.outcome = Some(match self.error.take() {
                        None => Outcome::Committed {
                            epoch: self.epoch,
                            drained: self.drained,
                        },
                        Some(e) => Outcome::Failed(e),
                    });
                    self.phase = Phase::Done;
                }
                Vec::new()
            }
            (Phase::Aborting, ToCoordinator::Released { .. }) => {
                self.answered[from] = true;
                if self.all_answered() {
                    self.phase = Phase::Done;
                }
                Vec::new()
            }
            // A ready that comes after the abort, or an answer the phase does not expect.
            _ => Vec::new(),
        }
    }

    /// Time passed: at the prepare deadline the round aborts (every participant is told,
    /// ready or not); at the commit deadline it fails; at the release deadline it stops
    /// waiting for releases.
    pub fn tick(&mut self, now: Instant) -> Vec<Outgoing> {
        if now < self.deadline {
            return Vec::new();
        }
        match self.phase {
            Phase::Preparing => {
                self.outcome = Some(Outcome::Aborted);
                self.enter(Phase::Aborting, now + self.deadlines.release);
                let (barrier, vol) = (self.id, self.vol);
                self.to_all(ToParticipant::Abort { barrier, vol })
            }
            Phase::Committing => {
                self.outcome = Some(Outcome::Failed(
                    self.error
                        .take()
                        .unwrap_or(IoError::Device(libc::ETIMEDOUT)),
                ));
                self.phase = Phase::Done;
                Vec::new()
            }
            Phase::Aborting => {
                self.phase = Phase::Done;
                Vec::new()
            }
            Phase::Done => Vec::new(),
        }
    }

    fn enter(&mut self, phase: Phase, deadline: Instant) {
        self.phase = phase;
        self.deadline = deadline;
        self.answered.fill(false);
    }

    fn all_answered(&self) -> bool {
        self.answered.iter().all(|a| *a)
    }

    /// When `tick` has something to do next, while the round runs.
    pub fn deadline(&self) -> Option<Instant> {
        (self.phase != Phase::Done).then_some(self.deadline)
    }

    /// The round's end, once it is over (every answer in, or its last deadline passed).
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref().filter(|_| self.phase == Phase::Done)
    }

    /// Participants that have not answered in the current phase.
    pub fn silent(&self) -> Vec<usize> {
        (0..self.answered.len())
            .filter(|p| !self.answered[*p])
            .collect()
    }
}

/// How the coordinator reaches participants: each message goes with the reply handle its
/// answer is to be sent to.
pub(crate) trait Participants {
    fn send(&self, to: usize, m: ToParticipant, reply: &Reply);
}

/// Run one round to its end: send, wait for answers or the next deadline, repeat. No lock
/// is held meanwhile; the caller waits for the outcome only.
pub(crate) fn run(
    round: &mut Round,
    to: &dyn Participants,
    epoch: &mut dyn FnMut() -> u64,
) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let reply = Reply(tx);
    for (p, m) in round.start() {
        to.send(p, m, &reply);
    }
    loop {
        if let Some(o) = round.outcome() {
            return o.clone();
        }
        let Some(deadline) = round.deadline() else {
            unreachable!("a round without an outcome has a deadline");
        };
        let sends = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(m) => round.handle(m, Instant::now(), epoch),
            // The round holds a sender itself: the channel cannot disconnect.
            Err(_) => {
                let silent = round.silent();
                let sends = round.tick(Instant::now());
                if !sends.is_empty() || round.outcome().is_some() {
                    tracing::warn!(barrier = round.id.0, ?silent, "barrier deadline passed");
                }
                sends
            }
        };
        for (p, m) in sends {
            to.send(p, m, &reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const ID: BarrierId = BarrierId(7);
    const VOL: u64 = 3;
    const SNAP: u64 = 9;

    fn deadlines() -> Deadlines {
        Deadlines {
            prepare: Duration::from_millis(50),
            commit: Duration::from_millis(500),
            release: Duration::from_millis(50),
        }
    }

    fn snapshot_round(n: usize, now: Instant) -> Round {
        Round::new(
            ID,
            VOL,
            Scope::Writes,
            Plan::Snapshot { snap: SNAP },
            n,
            deadlines(),
            now,
        )
    }

    fn ready(from: u32) -> ToCoordinator {
        ToCoordinator::Ready { barrier: ID, from }
    }

    fn committed(from: u32, result: Result<(), IoError>) -> ToCoordinator {
        ToCoordinator::Committed {
            barrier: ID,
            from,
            result,
        }
    }

    fn released(from: u32) -> ToCoordinator {
        ToCoordinator::Released { barrier: ID, from }
    }

    fn no_epoch() -> impl FnMut() -> u64 {
        || panic!("no epoch may be taken")
    }

    #[test]
    fn commits_go_out_only_after_every_participant_is_ready_with_one_epoch() {
        let t0 = Instant::now();
        let mut r = snapshot_round(3, t0);
        assert_eq!(
            r.start(),
            (0..3)
                .map(|p| (
                    p,
                    ToParticipant::Prepare {
                        barrier: ID,
                        vol: VOL,
                        scope: Scope::Writes
                    }
                ))
                .collect::<Vec<_>>()
        );
        let mut taken = 0;
        let mut epoch = || {
            taken += 1;
            41
        };
        assert!(r.handle(ready(2), t0, &mut epoch).is_empty());
        assert!(r.handle(ready(0), t0, &mut epoch).is_empty());
        // A repeated ready counts once.
        assert!(r.handle(ready(0), t0, &mut epoch).is_empty());
        let commits = r.handle(ready(1), t0 + Duration::from_millis(3), &mut epoch);
        let action = Action::Freeze {
            snap: SNAP,
            epoch: 41,
        };
        assert_eq!(
            commits,
            (0..3)
                .map(|p| (
                    p,
                    ToParticipant::Commit {
                        barrier: ID,
                        vol: VOL,
                        action
                    }
                ))
                .collect::<Vec<_>>()
        );
        assert_eq!(taken, 1);
        // Committed only once every participant's freeze is durable.
        let mut none = no_epoch();
        for p in 0..3 {
            assert_eq!(r.outcome(), None);
            assert!(r.handle(committed(p, Ok(())), t0, &mut none).is_empty());
        }
        assert_eq!(
            r.outcome(),
            Some(&Outcome::Committed {
                epoch: 41,
                drained: Duration::from_millis(3)
            })
        );
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn a_participant_that_never_answers_aborts_the_round_at_the_deadline() {
        let t0 = Instant::now();
        let mut r = snapshot_round(2, t0);
        let mut none = no_epoch();
        assert!(r.handle(ready(0), t0, &mut none).is_empty());
        assert!(r.tick(t0 + Duration::from_millis(49)).is_empty());
        let at = t0 + Duration::from_millis(50);
        assert_eq!(
            r.tick(at),
            vec![
                (
                    0,
                    ToParticipant::Abort {
                        barrier: ID,
                        vol: VOL
                    }
                ),
                (
                    1,
                    ToParticipant::Abort {
                        barrier: ID,
                        vol: VOL
                    }
                )
            ],
            "every participant is told, the ready one too"
        );
        // The late ready commits nothing.
        assert!(r.handle(ready(1), at, &mut none).is_empty());
        assert_eq!(r.outcome(), None, "still collecting releases");
        assert!(r.handle(released(0), at, &mut none).is_empty());
        assert_eq!(r.silent(), vec![1]);
        assert!(r.handle(released(1), at, &mut none).is_empty());
        assert_eq!(r.outcome(), Some(&Outcome::Aborted));
    }

    #[test]
    fn an_abort_stops_waiting_for_releases_at_the_release_deadline() {
        let t0 = Instant::now();
        let mut r = snapshot_round(2, t0);
        let at = t0 + Duration::from_millis(50);
        assert_eq!(r.tick(at).len(), 2);
        let mut none = no_epoch();
        r.handle(released(1), at, &mut none);
        assert_eq!(r.outcome(), None);
        assert!(r.tick(at + Duration::from_millis(50)).is_empty());
        assert_eq!(r.outcome(), Some(&Outcome::Aborted));
    }

    #[test]
    fn a_failed_or_late_commit_fails_the_round() {
        let t0 = Instant::now();
        let mut r = snapshot_round(2, t0);
        let mut epoch = || 5;
        r.handle(ready(0), t0, &mut epoch);
        assert_eq!(r.handle(ready(1), t0, &mut epoch).len(), 2);
        r.handle(
            committed(1, Err(IoError::Device(libc::EIO))),
            t0,
            &mut epoch,
        );
        r.handle(committed(0, Ok(())), t0, &mut epoch);
        assert_eq!(
            r.outcome(),
            Some(&Outcome::Failed(IoError::Device(libc::EIO)))
        );

        let mut r = snapshot_round(2, t0);
        r.handle(ready(0), t0, &mut epoch);
        r.handle(ready(1), t0, &mut epoch);
        r.handle(committed(0, Ok(())), t0, &mut epoch);
        // A commit is never aborted: the deadline only ends the wait.
        assert!(r.tick(t0 + Duration::from_millis(500)).is_empty());
        assert_eq!(
            r.outcome(),
            Some(&Outcome::Failed(IoError::Device(libc::ETIMEDOUT)))
        );
    }

    #[test]
    fn answers_of_another_round_or_participant_are_ignored() {
        let t0 = Instant::now();
        let mut r = snapshot_round(1, t0);
        let mut none = no_epoch();
        let other = ToCoordinator::Ready {
            barrier: BarrierId(8),
            from: 0,
        };
        assert!(r.handle(other, t0, &mut none).is_empty());
        assert!(r.handle(ready(1), t0, &mut none).is_empty());
        assert!(r.handle(committed(0, Ok(())), t0, &mut none).is_empty());
        assert_eq!(r.silent(), vec![0]);
    }

    #[test]
    fn a_rollback_commits_without_an_epoch() {
        let t0 = Instant::now();
        let mut r = Round::new(
            ID,
            VOL,
            Scope::All,
            Plan::Rollback { snap: SNAP },
            1,
            deadlines(),
            t0,
        );
        let mut none = no_epoch();
        assert_eq!(
            r.handle(ready(0), t0, &mut none),
            vec![(
                0,
                ToParticipant::Commit {
                    barrier: ID,
                    vol: VOL,
                    action: Action::Rollback { snap: SNAP }
                }
            )]
        );
    }

    #[test]
    fn messages_cross_a_wire_unchanged() {
        let sent = [
            ToParticipant::Prepare {
                barrier: ID,
                vol: VOL,
                scope: Scope::All,
            },
            ToParticipant::Commit {
                barrier: ID,
                vol: VOL,
                action: Action::Freeze { snap: 1, epoch: 2 },
            },
        ];
        let back: Vec<ToParticipant> =
            serde_json::from_str(&serde_json::to_string(&sent).expect("encode")).expect("decode");
        assert_eq!(back, sent);
        let answer = committed(4, Err(IoError::NoSpace));
        let back: ToCoordinator =
            serde_json::from_str(&serde_json::to_string(&answer).expect("encode")).expect("decode");
        assert_eq!(back, answer);
    }

    /// Participants played by threads: each answers what it is told, except the silent
    /// ones, which never answer a prepare (but do release on an abort).
    struct Fake {
        silent: Vec<usize>,
        log: Arc<Mutex<Vec<(usize, ToParticipant)>>>,
    }

    impl Participants for Fake {
        fn send(&self, to: usize, m: ToParticipant, reply: &Reply) {
            self.log.lock().expect("log").push((to, m));
            let from = to as u32;
            let answer = match m {
                ToParticipant::Prepare { barrier, .. } if !self.silent.contains(&to) => {
                    Some(ToCoordinator::Ready { barrier, from })
                }
                ToParticipant::Prepare { .. } => None,
                ToParticipant::Commit { barrier, .. } => Some(ToCoordinator::Committed {
                    barrier,
                    from,
                    result: Ok(()),
                }),
                ToParticipant::Abort { barrier, .. } => {
                    Some(ToCoordinator::Released { barrier, from })
                }
            };
            if let Some(a) = answer {
                let reply = reply.clone();
                std::thread::spawn(move || reply.send(a));
            }
        }
    }

    #[test]
    fn the_loop_aborts_at_the_deadline_and_every_participant_releases() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            silent: vec![1],
            log: log.clone(),
        };
        let t0 = Instant::now();
        let mut r = snapshot_round(3, t0);
        let outcome = run(&mut r, &fake, &mut no_epoch());
        assert_eq!(outcome, Outcome::Aborted);
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let aborts: Vec<usize> = log
            .lock()
            .expect("log")
            .iter()
            .filter(|(_, m)| matches!(m, ToParticipant::Abort { .. }))
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(aborts, vec![0, 1, 2]);
        assert!(r.silent().is_empty(), "every release was collected");
    }

    #[test]
    fn the_loop_commits_when_everyone_answers() {
        let fake = Fake {
            silent: Vec::new(),
            log: Arc::new(Mutex::new(Vec::new())),
        };
        let mut r = snapshot_round(4, Instant::now());
        let outcome = run(&mut r, &fake, &mut || 12);
        assert!(
            matches!(outcome, Outcome::Committed { epoch: 12, .. }),
            "{outcome:?}"
        );
    }
}
