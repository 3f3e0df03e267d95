//! Reservations (SPC-4 5.13): persistent reservations (PERSISTENT RESERVE IN/OUT) and the
//! older RESERVE(6)/RELEASE(6), per logical unit and shared by every session of the portal.
//!
//! An I_T nexus is the initiator name plus its ISID (one portal group, so the target side
//! is always the same). Registrations and persistent reservations outlive the nexus (they
//! are not persisted across daemon restarts: APTPL is refused and REPORT CAPABILITIES says
//! so); a RESERVE(6) ends with its nexus, at logout, and at a LUN or target reset.
//!
//! Reservation commands are rare; every other command asks `Reservations::check`, which
//! answers from one atomic while no LUN is reserved and takes the lock only when one is.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tessel_engine::AlignedBuf;

use super::cdb::Cdb;
use super::sense::Sense;
use super::Reply;

/// One I_T nexus: who issued a command.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// The initiator's iSCSI name.
    pub initiator: String,
    /// The session's ISID.
    pub isid: [u8; 6],
}

impl Nexus {
    /// The iSCSI TransportID of the initiator port (SPC-4 7.6.4.6, format 01b: name and
    /// ISID), NUL-terminated and padded to a multiple of 4.
    fn transport_id(&self) -> Vec<u8> {
        let isid: String = self.isid.iter().map(|b| format!("{b:02x}")).collect();
        let mut name = format!("{},i,0x{isid}", self.initiator).into_bytes();
        name.push(0);
        name.resize(name.len().div_ceil(4) * 4, 0);
        let mut t = vec![0x45, 0];
        t.extend_from_slice(&(name.len() as u16).to_be_bytes());
        t.extend(name);
        t
    }
}

/// Persistent reservation types (SPC-4 table 178).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrType {
    WriteExclusive = 1,
    ExclusiveAccess = 3,
    WriteExclusiveRegistrantsOnly = 5,
    ExclusiveAccessRegistrantsOnly = 6,
    WriteExclusiveAllRegistrants = 7,
    ExclusiveAccessAllRegistrants = 8,
}

impl PrType {
    fn from_code(code: u8) -> Option<PrType> {
        Some(match code {
            1 => PrType::WriteExclusive,
            3 => PrType::ExclusiveAccess,
            5 => PrType::WriteExclusiveRegistrantsOnly,
            6 => PrType::ExclusiveAccessRegistrantsOnly,
            7 => PrType::WriteExclusiveAllRegistrants,
            8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// Every registrant holds an all-registrants reservation.
    fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants that do not hold the reservation keep access.
    fn registrants_keep_access(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }

    /// Non-holders may still read.
    fn shared_reads(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusive
                | PrType::WriteExclusiveRegistrantsOnly
                | PrType::WriteExclusiveAllRegistrants
        )
    }
}

/// PERSISTENT RESERVE OUT service actions.
mod action {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
}

/// PERSISTENT RESERVE IN service actions.
mod read {
    pub const KEYS: u8 = 0;
    pub const RESERVATION: u8 = 1;
    pub const CAPABILITIES: u8 = 2;
    pub const FULL_STATUS: u8 = 3;
}

/// What a command does to the medium, for the reservation check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Allowed whatever the reservation (INQUIRY, REPORT LUNS, REQUEST SENSE, RELEASE(6),
    /// PERSISTENT RESERVE IN).
    Free,
    /// No medium access, but refused while another nexus holds a RESERVE(6) (TEST UNIT
    /// READY, READ CAPACITY, PERSISTENT RESERVE OUT, RESERVE(6)).
    Control,
    /// Reads the medium or its state.
    Read,
    /// Changes the medium or its state.
    Write,
}

impl Access {
    /// The access `cdb` needs.
    pub fn of(cdb: &Cdb) -> Access {
        match cdb {
            Cdb::Inquiry { .. }
            | Cdb::ReportLuns { .. }
            | Cdb::RequestSense { .. }
            | Cdb::ReportSupportedOpcodes { .. }
            | Cdb::Release6
            | Cdb::PersistentReserveIn { .. } => Access::Free,
            Cdb::TestUnitReady
            | Cdb::ReadCapacity10 { .. }
            | Cdb::ReadCapacity16 { .. }
            | Cdb::PersistentReserveOut { .. }
            | Cdb::Reserve6 => Access::Control,
            Cdb::Read { .. }
            | Cdb::Verify { .. }
            | Cdb::PreFetch { .. }
            | Cdb::ModeSense { .. }
            | Cdb::GetLbaStatus { .. }
            | Cdb::ReadDefectData { .. } => Access::Read,
            Cdb::Write { .. }
            | Cdb::WriteSame { .. }
            | Cdb::Unmap { .. }
            | Cdb::CompareAndWrite { .. }
            | Cdb::ModeSelect { .. }
            | Cdb::SyncCache { .. }
            | Cdb::StartStopUnit
            | Cdb::PreventAllow => Access::Write,
        }
    }
}

/// A persistent reservation: its holder (None for the all-registrants types, held by every
/// registrant) and type.
#[derive(Clone, Debug)]
struct Persistent {
    holder: Option<Nexus>,
    kind: PrType,
}

/// The reservation state of one logical unit.
#[derive(Debug, Default)]
struct LunState {
    /// PRGENERATION: bumped by every successful REGISTER, CLEAR and PREEMPT.
    generation: u32,
    /// Registered keys, in registration order.
    registrations: Vec<(Nexus, u64)>,
    persistent: Option<Persistent>,
    /// The nexus holding a RESERVE(6).
    reserved_by: Option<Nexus>,
}

impl LunState {
    fn key_of(&self, nexus: &Nexus) -> Option<u64> {
        self.registrations
            .iter()
            .find(|(n, _)| n == nexus)
            .map(|&(_, k)| k)
    }

    fn holds(&self, nexus: &Nexus) -> bool {
        match &self.persistent {
            Some(Persistent { holder: None, .. }) => self.key_of(nexus).is_some(),
            Some(Persistent {
                holder: Some(h), ..
            }) => h == nexus,
            None => false,
        }
    }

    /// Drops `nexus`'s registration; a reservation it held goes with it (an
    /// all-registrants one only with the last registrant).
    fn unregister(&mut self, nexus: &Nexus) {
        self.registrations.retain(|(n, _)| n != nexus);
        let gone = match &self.persistent {
            Some(Persistent { holder: None, .. }) => self.registrations.is_empty(),
            Some(Persistent {
                holder: Some(h), ..
            }) => h == nexus,
            None => false,
        };
        if gone {
            self.persistent = None;
        }
    }

    fn check(&self, nexus: &Nexus, access: Access) -> Result<(), ()> {
        if access == Access::Free {
            return Ok(());
        }
        if self.reserved_by.as_ref().is_some_and(|r| r != nexus) {
            return Err(());
        }
        let Some(p) = &self.persistent else {
            return Ok(());
        };
        let allowed = match access {
            Access::Free | Access::Control => true,
            Access::Read if p.kind.shared_reads() => true,
            _ => {
                self.holds(nexus)
                    || (p.kind.registrants_keep_access() && self.key_of(nexus).is_some())
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(())
        }
    }

    fn reserved(&self) -> bool {
        self.persistent.is_some() || self.reserved_by.is_some()
    }
}

/// The reservations of every logical unit the portal serves, keyed by `Lun::id`.
#[derive(Debug, Default)]
pub struct Reservations {
    /// True while some LUN is reserved: `check` needs the lock only then.
    any_reserved: AtomicBool,
    luns: Mutex<HashMap<u64, LunState>>,
}

impl Reservations {
    /// Runs `f` on the state of LUN `lun` under the lock, then refreshes the fast path.
    fn with<T>(&self, lun: u64, f: impl FnOnce(&mut LunState) -> T) -> T {
        let mut luns = self.luns.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(luns.entry(lun).or_default());
        luns.retain(|_, s| s.reserved() || !s.registrations.is_empty() || s.generation != 0);
        let any = luns.values().any(LunState::reserved);
        self.any_reserved.store(any, Ordering::Release);
        out
    }

    /// RESERVATION CONFLICT when a reservation on LUN `lun` forbids `cdb` to `nexus`.
    pub fn check(&self, lun: u64, nexus: &Nexus, cdb: &Cdb) -> Result<(), Reply> {
        if !self.any_reserved.load(Ordering::Acquire) {
            return Ok(());
        }
        let access = Access::of(cdb);
        if access == Access::Free {
            return Ok(());
        }
        let luns = self.luns.lock().unwrap_or_else(|e| e.into_inner());
        match luns.get(&lun) {
            Some(s) => s.check(nexus, access).map_err(|()| Reply::conflict()),
            None => Ok(()),
        }
    }

    /// The nexus is gone (logout or dropped connection): its RESERVE(6)s end.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let mut luns = self.luns.lock().unwrap_or_else(|e| e.into_inner());
        for s in luns.values_mut() {
            if s.reserved_by.as_ref() == Some(nexus) {
                s.reserved_by = None;
            }
        }
        let any = luns.values().any(LunState::reserved);
        self.any_reserved.store(any, Ordering::Release);
    }

    /// A LUN or target reset: the RESERVE(6) on LUN `lun` ends (persistent reservations
    /// survive resets).
    pub fn reset(&self, lun: u64) {
        self.with(lun, |s| s.reserved_by = None);
    }

    /// RESERVE(6).
    pub fn reserve6(&self, lun: u64, nexus: &Nexus) -> Reply {
        self.with(lun, |s| {
            let other = s.reserved_by.as_ref().is_some_and(|r| r != nexus);
            if other || s.persistent.is_some() {
                return Reply::conflict();
            }
            s.reserved_by = Some(nexus.clone());
            Reply::good()
        })
    }

    /// RELEASE(6): ends the nexus's own RESERVE(6); from anyone else it does nothing.
    pub fn release6(&self, lun: u64, nexus: &Nexus) -> Reply {
        self.with(lun, |s| {
            if s.reserved_by.as_ref() == Some(nexus) {
                s.reserved_by = None;
            }
            Reply::good()
        })
    }

    /// PERSISTENT RESERVE IN.
    pub fn read(&self, lun: u64, action: u8, alloc: u32) -> Reply {
        let luns = self.luns.lock().unwrap_or_else(|e| e.into_inner());
        let empty = LunState::default();
        let s = luns.get(&lun).unwrap_or(&empty);
        let mut d = s.generation.to_be_bytes().to_vec();
        match action {
            read::KEYS => {
                d.extend_from_slice(&((s.registrations.len() * 8) as u32).to_be_bytes());
                for (_, k) in &s.registrations {
                    d.extend_from_slice(&k.to_be_bytes());
                }
            }
            read::RESERVATION => match &s.persistent {
                Some(p) => {
                    let key = match &p.holder {
                        Some(h) => s.key_of(h).unwrap_or(0),
                        None => 0,
                    };
                    d.extend_from_slice(&16u32.to_be_bytes());
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, p.kind as u8, 0, 0]);
                }
                None => d.extend_from_slice(&0u32.to_be_bytes()),
            },
            read::CAPABILITIES => {
                // Length 8; no CRH, SIP_C, ATP_C nor PTPL_C; TMV with every type.
                d = vec![0, 8, 0, 0x80, 0xea, 0x01, 0, 0];
            }
            read::FULL_STATUS => {
                let mut list = Vec::new();
                for (n, k) in &s.registrations {
                    let holder = s.holds(n);
                    let kind = s.persistent.as_ref().filter(|_| holder).map(|p| p.kind);
                    let tid = n.transport_id();
                    list.extend_from_slice(&k.to_be_bytes());
                    list.extend_from_slice(&[0; 4]);
                    list.push(u8::from(holder));
                    list.push(kind.map_or(0, |k| k as u8));
                    list.extend_from_slice(&[0, 0, 0, 0, 0, 1]); // relative target port 1
                    list.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    list.extend(tid);
                }
                d.extend_from_slice(&(list.len() as u32).to_be_bytes());
                d.extend(list);
            }
            _ => return Reply::check(Sense::invalid_cdb(1)),
        }
        Reply::data(d, alloc)
    }

    /// PERSISTENT RESERVE OUT with its 24-byte parameter list.
    pub fn update(&self, lun: u64, nexus: &Nexus, cdb: &Cdb, data: Option<AlignedBuf>) -> Reply {
        let Cdb::PersistentReserveOut {
            action,
            scope,
            kind,
            len,
        } = *cdb
        else {
            unreachable!("update called with {cdb:?}");
        };
        let data = data.as_ref().map(|b| b.as_slice()).unwrap_or(&[]);
        if len != 24 || data.len() < 24 {
            return Reply::check(Sense::PARAMETER_LIST_LENGTH);
        }
        let be64 = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().expect("8"));
        let key = be64(0);
        let sark = be64(8);
        if data[20] & 0x0d != 0 {
            // SPEC_I_P, ALL_TG_PT and APTPL: none is supported (REPORT CAPABILITIES).
            return Reply::check(Sense::invalid_param(20));
        }
        let pr_type = PrType::from_code(kind);
        let scoped = matches!(
            action,
            action::RESERVE | action::RELEASE | action::PREEMPT | action::PREEMPT_AND_ABORT
        );
        // PREEMPT needs a type only when it takes the reservation over (checked there).
        let typed = matches!(action, action::RESERVE | action::RELEASE);
        if scoped && scope != 0 || typed && pr_type.is_none() {
            return Reply::check(Sense::invalid_cdb(2));
        }
        self.with(lun, |s| {
            if s.reserved_by.as_ref().is_some_and(|r| r != nexus) {
                return Reply::conflict();
            }
            let own = s.key_of(nexus);
            if action != action::REGISTER_AND_IGNORE && own.unwrap_or(0) != key {
                return Reply::conflict();
            }
            match action {
                action::REGISTER | action::REGISTER_AND_IGNORE => {
                    match (own, sark) {
                        (None, 0) => {}
                        (Some(_), 0) => s.unregister(nexus),
                        (Some(_), new) => {
                            for r in s.registrations.iter_mut().filter(|(n, _)| n == nexus) {
                                r.1 = new;
                            }
                        }
                        (None, new) => s.registrations.push((nexus.clone(), new)),
                    }
                    s.generation = s.generation.wrapping_add(1);
                    Reply::good()
                }
                _ if own.is_none() => Reply::conflict(),
                action::RESERVE => {
                    let kind = pr_type.expect("checked above");
                    match &s.persistent {
                        None => {
                            s.persistent = Some(Persistent {
                                holder: (!kind.all_registrants()).then(|| nexus.clone()),
                                kind,
                            });
                            Reply::good()
                        }
                        Some(p) if s.holds(nexus) && p.kind == kind => Reply::good(),
                        Some(_) => Reply::conflict(),
                    }
                }
                action::RELEASE => {
                    let kind = pr_type.expect("checked above");
                    match &s.persistent {
                        Some(p) if s.holds(nexus) => {
                            if p.kind != kind {
                                return Reply::check(Sense::INVALID_RELEASE);
                            }
                            s.persistent = None;
                            Reply::good()
                        }
                        _ => Reply::good(),
                    }
                }
                action::CLEAR => {
                    s.registrations.clear();
                    s.persistent = None;
                    s.generation = s.generation.wrapping_add(1);
                    Reply::good()
                }
                action::PREEMPT | action::PREEMPT_AND_ABORT => preempt(s, nexus, sark, pr_type),
                _ => Reply::check(Sense::invalid_cdb(1)),
            }
        })
    }
}

/// PREEMPT (and PREEMPT AND ABORT, whose tasks of other sessions run to completion: no
/// session can end another's tasks): removes the registrations of key `sark`, and takes
/// over the reservation when `sark` holds it (SPC-4 5.13.11.4).
fn preempt(s: &mut LunState, nexus: &Nexus, sark: u64, kind: Option<PrType>) -> Reply {
    let all_registrants = s.persistent.as_ref().is_some_and(|p| p.holder.is_none());
    let holder_key = s
        .persistent
        .as_ref()
        .and_then(|p| p.holder.as_ref())
        .and_then(|h| s.key_of(h));
    let takes_over = match (&s.persistent, all_registrants) {
        (None, _) => false,
        (Some(_), true) => sark == 0,
        (Some(_), false) => holder_key == Some(sark),
    };
    if sark == 0 && !takes_over {
        return Reply::check(Sense::invalid_param(8));
    }
    let before = s.registrations.len();
    if takes_over && all_registrants {
        s.registrations.retain(|(n, _)| n == nexus);
    } else {
        s.registrations.retain(|(n, k)| n == nexus || *k != sark);
    }
    if s.registrations.len() == before && !takes_over {
        return Reply::conflict();
    }
    if takes_over {
        let Some(kind) = kind else {
            return Reply::check(Sense::invalid_cdb(2));
        };
        s.persistent = Some(Persistent {
            holder: (!kind.all_registrants()).then(|| nexus.clone()),
            kind,
        });
    }
    s.generation = s.generation.wrapping_add(1);
    Reply::good()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cdb, lun, nexus};
    use super::super::{execute, Issuer};
    use super::*;

    /// One LUN shared by initiators 1 and 2.
    struct Fixture {
        lun: super::super::Lun,
        reservations: Reservations,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                lun: lun(64, false),
                reservations: Reservations::default(),
            }
        }

        fn run(&mut self, who: u8, bytes: &[u8], data: Option<&[u8]>) -> Reply {
            let n = nexus(who);
            let issuer = Issuer {
                nexus: &n,
                reservations: &self.reservations,
            };
            let data = data.map(AlignedBuf::from_slice);
            match execute(&mut self.lun, &[0], &cdb(bytes), data, issuer) {
                super::super::Step::Reply(r) => r,
                // Medium access passed the reservation check.
                super::super::Step::Io(_) => Reply::good(),
            }
        }

        /// PERSISTENT RESERVE OUT `action` with type `kind`, key and service action key.
        fn prout(&mut self, who: u8, action: u8, kind: u8, key: u64, sark: u64) -> Reply {
            let mut list = key.to_be_bytes().to_vec();
            list.extend_from_slice(&sark.to_be_bytes());
            list.extend_from_slice(&[0; 8]);
            self.run(
                who,
                &[0x5f, action, kind, 0, 0, 0, 0, 0, 24, 0],
                Some(&list),
            )
        }

        fn prin(&mut self, who: u8, action: u8) -> Vec<u8> {
            let r = self.run(who, &[0x5e, action, 0, 0, 0, 0, 0, 0x10, 0, 0], None);
            assert_eq!(r.status(), 0, "{r:?}");
            r.data.as_slice().to_vec()
        }

        fn keys(&mut self) -> Vec<u64> {
            let d = self.prin(1, read::KEYS);
            d[8..]
                .chunks(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect()
        }

        fn generation(&mut self) -> u32 {
            u32::from_be_bytes(self.prin(1, read::KEYS)[..4].try_into().unwrap())
        }

        /// (key, type) of the reservation, if any.
        fn reservation(&mut self) -> Option<(u64, u8)> {
            let d = self.prin(1, read::RESERVATION);
            (d.len() > 8).then(|| (u64::from_be_bytes(d[8..16].try_into().unwrap()), d[21]))
        }

        fn read_status(&mut self, who: u8) -> u8 {
            self.run(who, &[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0], None)
                .status()
        }

        fn write_status(&mut self, who: u8) -> u8 {
            self.run(who, &[0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0], Some(&[0; 512]))
                .status()
        }
    }

    const GOOD: u8 = 0x00;
    const CONFLICT: u8 = 0x18;
    const REGISTER_IGNORE: u8 = action::REGISTER_AND_IGNORE;

    #[test]
    fn register_lists_keys_and_bumps_the_generation() {
        let mut f = Fixture::new();
        assert_eq!(f.keys(), Vec::<u64>::new());
        assert!(f.prout(1, action::REGISTER, 0, 0, 0xa).sense.is_none());
        assert!(f.prout(2, REGISTER_IGNORE, 0, 0, 0xb).sense.is_none());
        assert_eq!(f.keys(), vec![0xa, 0xb]);
        assert_eq!(f.generation(), 2);
        // A wrong key conflicts; the right one changes and then drops the registration.
        assert_eq!(
            f.prout(1, action::REGISTER, 0, 0x99, 0xc).status(),
            CONFLICT
        );
        assert_eq!(f.prout(1, action::REGISTER, 0, 0xa, 0xc).status(), GOOD);
        assert_eq!(f.prout(1, action::REGISTER, 0, 0xc, 0).status(), GOOD);
        assert_eq!(f.keys(), vec![0xb]);
    }

    #[test]
    fn read_keys_keeps_the_full_length_when_truncated() {
        let mut f = Fixture::new();
        f.prout(1, REGISTER_IGNORE, 0, 0, 7);
        let r = f.run(1, &[0x5e, 0, 0, 0, 0, 0, 0, 0, 8, 0], None);
        assert_eq!(r.data.as_slice(), &[0, 0, 0, 1, 0, 0, 0, 8]);
    }

    #[test]
    fn reserve_and_release_report_key_and_type() {
        let mut f = Fixture::new();
        f.prout(1, REGISTER_IGNORE, 0, 0, 0xa);
        assert_eq!(f.prout(1, action::RESERVE, 1, 0xa, 0).status(), GOOD);
        assert_eq!(f.reservation(), Some((0xa, 1)));
        // The same reservation again is fine, another type conflicts.
        assert_eq!(f.prout(1, action::RESERVE, 1, 0xa, 0).status(), GOOD);
        assert_eq!(f.prout(1, action::RESERVE, 3, 0xa, 0).status(), CONFLICT);
        assert_eq!(
            f.prout(1, action::RELEASE, 3, 0xa, 0).sense,
            Some(Sense::INVALID_RELEASE)
        );
        assert_eq!(f.prout(1, action::RELEASE, 1, 0xa, 0).status(), GOOD);
        assert_eq!(f.reservation(), None);
        // All-registrants reservations carry key 0.
        assert_eq!(f.prout(1, action::RESERVE, 8, 0xa, 0).status(), GOOD);
        assert_eq!(f.reservation(), Some((0, 8)));
    }

    #[test]
    fn unregistered_initiators_cannot_reserve_and_bad_fields_are_refused() {
        let mut f = Fixture::new();
        assert_eq!(f.prout(2, action::RESERVE, 1, 0, 0).status(), CONFLICT);
        f.prout(1, REGISTER_IGNORE, 0, 0, 0xa);
        assert_eq!(
            f.prout(1, action::RESERVE, 2, 0xa, 0).sense,
            Some(Sense::invalid_cdb(2))
        );
        assert_eq!(
            f.prout(1, action::RESERVE, 0x11, 0xa, 0).sense,
            Some(Sense::invalid_cdb(2))
        );
        let mut aptpl = [0u8; 24];
        aptpl[8] = 1;
        aptpl[20] = 1;
        let r = f.run(2, &[0x5f, 6, 0, 0, 0, 0, 0, 0, 24, 0], Some(&aptpl));
        assert_eq!(r.sense, Some(Sense::invalid_param(20)));
        let r = f.run(2, &[0x5f, 6, 0, 0, 0, 0, 0, 0, 16, 0], Some(&[0; 16]));
        assert_eq!(r.sense, Some(Sense::PARAMETER_LIST_LENGTH));
        assert_eq!(
            f.run(1, &[0x5e, 4, 0, 0, 0, 0, 0, 0x10, 0, 0], None).sense,
            Some(Sense::invalid_cdb(1))
        );
    }

    /// (type, registered reads, registered writes, unregistered reads, unregistered
    /// writes) for initiator 2 while initiator 1 holds the reservation.
    const ACCESS: [(u8, bool, bool, bool, bool); 6] = [
        (1, true, false, true, false),
        (3, false, false, false, false),
        (5, true, true, true, false),
        (6, true, true, false, false),
        (7, true, true, true, false),
        (8, true, true, false, false),
    ];

    #[test]
    fn each_reservation_type_lets_the_right_initiators_read_and_write() {
        let status = |ok| if ok { GOOD } else { CONFLICT };
        for (kind, reg_r, reg_w, unreg_r, unreg_w) in ACCESS {
            let mut f = Fixture::new();
            f.prout(1, REGISTER_IGNORE, 0, 0, 0xa);
            f.prout(2, REGISTER_IGNORE, 0, 0, 0xb);
            assert_eq!(f.prout(1, action::RESERVE, kind, 0xa, 0).status(), GOOD);
            assert_eq!((f.read_status(1), f.write_status(1)), (GOOD, GOOD));
            assert_eq!(f.read_status(2), status(reg_r), "type {kind}");
            assert_eq!(f.write_status(2), status(reg_w), "type {kind}");
            f.prout(2, action::REGISTER, 0, 0xb, 0);
            assert_eq!(f.read_status(2), status(unreg_r), "type {kind}");
            assert_eq!(f.write_status(2), status(unreg_w), "type {kind}");
            // Commands that touch no data pass whatever the type.
            let tur = f.run(2, &[0, 0, 0, 0, 0, 0], None).status();
            let inquiry = f.run(2, &[0x12, 0, 0, 0, 36, 0], None).status();
            assert_eq!((tur, inquiry), (GOOD, GOOD));
        }
    }

    #[test]
    fn unregistering_the_holder_ends_its_reservation_but_not_a_shared_one() {
        for (kind, shared) in [(1, false), (6, false), (7, true), (8, true)] {
            let mut f = Fixture::new();
            f.prout(1, REGISTER_IGNORE, 0, 0, 0xa);
            f.prout(2, REGISTER_IGNORE, 0, 0, 0xb);
            f.prout(1, action::RESERVE, kind, 0xa, 0);
            f.prout(1, action::REGISTER, 0, 0xa, 0);
            assert_eq!(f.reservation().is_some(), shared, "type {kind}");
            if shared {
                assert_eq!(f.prout(2, action::RELEASE, kind, 0xb, 0).status(), GOOD);
                assert_eq!(f.reservation(), None);
            }
        }
    }

    #[test]
    fn clear_drops_every_registration_and_the_reservation() {
        let mut f = Fixture::new();
        f.prout(1, REGISTER_IGNORE, 0, 0, 0xa);
        f.prout(2, REGISTER_IGNORE, 0, 0, 0xb);
        f.prout(2, action::RESERVE, 3, 0xb, 0);
        assert_eq!(f.read_status(1), CONFLICT);
        assert_eq!(f.prout(1, action::CLEAR, 0, 0xa, 0).status(), GOOD);
        assert_eq!((f.keys(), f.reservation()), (vec![], None));
        assert_eq!(f.read_status(1), GOOD);
    }

    #[test]
    fn preempt_removes_a_registration_and_takes_over_the_reservation() {
        let mut f = Fixture::new();
        f.prout(1, REGISTER_IGNORE, 0, 0, 0xa);
        f.prout(2, REGISTER_IGNORE, 0, 0, 0xb);
        let generation = f.generation();
        assert_eq!(f.prout(2, action::PREEMPT, 3, 0xb, 0xa).status(), GOOD);
        assert_eq!(f.keys(), vec![0xb]);
        assert_eq!(f.generation(), generation + 1);
        assert_eq!(f.reservation(), None);
        // Preempting the holder moves the reservation, with the new type.
        f.prout(1, REGISTER_IGNORE, 0, 0, 0xa);
        f.prout(1, action::RESERVE, 1, 0xa, 0);
        assert_eq!(
            f.prout(2, action::PREEMPT_AND_ABORT, 3, 0xb, 0xa).status(),
            GOOD
        );
        assert_eq!(f.reservation(), Some((0xb, 3)));
        assert_eq!(f.read_status(1), CONFLICT);
        // A key nobody holds conflicts; key 0 outside an all-registrants one is invalid.
        assert_eq!(f.prout(2, action::PREEMPT, 3, 0xb, 0x77).status(), CONFLICT);
        assert_eq!(
            f.prout(2, action::PREEMPT, 3, 0xb, 0).sense,
            Some(Sense::invalid_param(8))
        );
    }

    #[test]
    fn report_capabilities_and_full_status() {
        let mut f = Fixture::new();
        let caps = f.prin(1, read::CAPABILITIES);
        assert_eq!(caps, vec![0, 8, 0, 0x80, 0xea, 0x01, 0, 0]);
        f.prout(1, REGISTER_IGNORE, 0, 0, 0xa);
        f.prout(1, action::RESERVE, 5, 0xa, 0);
        let d = f.prin(1, read::FULL_STATUS);
        let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
        assert_eq!(d.len(), 8 + len);
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 0xa);
        assert_eq!((d[20], d[21]), (1, 5));
        let tid = String::from_utf8_lossy(&d[36..]);
        assert!(
            tid.starts_with("iqn.2026-11.test:host1,i,0x800000000001"),
            "{tid}"
        );
    }

    #[test]
    fn reserve6_excludes_other_initiators_until_released() {
        let mut f = Fixture::new();
        assert_eq!(f.run(1, &[0x16, 0, 0, 0, 0, 0], None).status(), GOOD);
        assert_eq!(f.run(1, &[0x16, 0, 0, 0, 0, 0], None).status(), GOOD);
        assert_eq!(f.run(2, &[0x16, 0, 0, 0, 0, 0], None).status(), CONFLICT);
        // Another initiator's RELEASE does nothing; its MODE SENSE conflicts.
        assert_eq!(f.run(2, &[0x17, 0, 0, 0, 0, 0], None).status(), GOOD);
        let sense = [0x1a, 0, 0x3f, 0, 0xff, 0];
        assert_eq!(f.run(1, &sense, None).status(), GOOD);
        assert_eq!(f.run(2, &sense, None).status(), CONFLICT);
        assert_eq!(f.run(2, &[0x12, 0, 0, 0, 36, 0], None).status(), GOOD);
        assert_eq!(f.run(1, &[0x17, 0, 0, 0, 0, 0], None).status(), GOOD);
        assert_eq!(f.run(2, &[0x16, 0, 0, 0, 0, 0], None).status(), GOOD);
        // Nexus loss and resets end it.
        f.reservations.nexus_lost(&nexus(2));
        assert_eq!(f.read_status(1), GOOD);
        assert_eq!(f.run(1, &[0x16, 0, 0, 0, 0, 0], None).status(), GOOD);
        f.reservations.reset(f.lun.id);
        assert_eq!(f.run(2, &[0x16, 0, 0, 0, 0, 0], None).status(), GOOD);
        let mut extent = [0u8; 16];
        extent[..2].copy_from_slice(&[0x16, 1]);
        assert_eq!(Cdb::parse(&extent), Err(Sense::invalid_cdb(1)));
    }

    #[test]
    fn reserve6_conflicts_with_a_persistent_reservation() {
        let mut f = Fixture::new();
        f.prout(1, REGISTER_IGNORE, 0, 0, 0xa);
        f.prout(1, action::RESERVE, 1, 0xa, 0);
        assert_eq!(f.run(1, &[0x16, 0, 0, 0, 0, 0], None).status(), CONFLICT);
    }
}
