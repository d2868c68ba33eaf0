//! Planning a change to the bindings, before anything is written: the one place that decides
//! which binding owns each port-trie entry (precedence) and that the maps can hold the result
//! (capacity). Pure: bindings in, a plan out; `State::apply` writes it.
//!
//! Precedence: the trie gives "longest prefix wins"; within one (proto, prefix), overlapping port
//! ranges are resolved here: the narrowest range owns a port, and between equally narrow ranges
//! the one starting lower.
use super::{bindings::BindingKey, ports::PortRange};
use crate::abi::{STEER_MAX_BINDINGS, STEER_MAX_PORT_ENTRIES};
use std::collections::{BTreeMap, BTreeSet};

/// What the maps can hold (`max_entries` in probes/skrelay.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub bindings: u32,
    pub port_entries: u32,
}

impl Limits {
    pub const MAPS: Limits = Limits { bindings: STEER_MAX_BINDINGS, port_entries: STEER_MAX_PORT_ENTRIES };
}

/// One trie entry to write: `slot`'s (proto, prefix) and `port` now go to binding `owner`, or to
/// none (the entry is deleted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortChange {
    pub slot: BindingKey,
    pub port: u16,
    pub owner: Option<u32>,
}

/// What a change does, in the order `State::apply` writes it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// New bindings, with the ids they get (the lowest free ones).
    pub added: Vec<(u32, BindingKey)>,
    /// Bindings asked for that exist already: they keep their id and trie entries and get the
    /// new target.
    pub replaced: Vec<(u32, BindingKey)>,
    pub removed: Vec<(u32, BindingKey)>,
    /// Only the trie entries whose owner changes.
    pub ports: Vec<PortChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "too many bindings: {existing} exist, {adding} more would pass the limit of {limit} (a binding is one \
         prefix and one port or range: bind ranges like 8000-8999 instead of single ports, or fewer --addr \
         prefixes)"
    )]
    Bindings { existing: usize, adding: usize, limit: u32 },
    #[error(
        "too many steered ports: {existing} (prefix, port) entries exist, {adding} more would pass the limit of \
         {limit} (bind fewer prefixes or ports; `skrelay steer list` shows what is bound)"
    )]
    PortEntries { existing: u64, adding: u64, limit: u32 },
}

impl PlanError {
    /// The error of a plan against empty maps (the request alone is too big), said without the
    /// "0 exist" of an empty plan, which read as a miscount where bindings did exist (a helper's
    /// pass).
    pub fn alone(&self) -> String {
        match self {
            PlanError::Bindings { adding, limit, .. } => format!(
                "too many bindings: this command alone asks for {adding}, more than the limit of {limit} (a binding \
                 is one prefix and one port or range: bind ranges like 8000-8999 instead of single ports, or fewer \
                 --addr prefixes)"
            ),
            PlanError::PortEntries { adding, limit, .. } => format!(
                "too many steered ports: this command alone asks for {adding} (prefix, port) entries, more than the \
                 limit of {limit} (bind fewer prefixes or ports)"
            ),
        }
    }
}

/// Precedence between bindings of the same proto and prefix that both cover a port: lower wins.
pub fn rank(ports: &PortRange) -> (u32, u16) {
    (ports.len(), ports.lo)
}

/// The binding that should own `port` among `candidates` (id, key), all of one proto and prefix.
pub fn owner<'a>(candidates: impl IntoIterator<Item = (u32, &'a BindingKey)>, port: u16) -> Option<u32> {
    candidates.into_iter().filter(|(_, k)| k.ports.contains(port)).min_by_key(|(_, k)| rank(&k.ports)).map(|(id, _)| id)
}

/// A (proto, prefix) pair: one group of trie entries, one per port.
type Slot = (u8, u8, [u8; 16], u8);

fn slot(k: &BindingKey) -> Slot {
    (k.proto.ipproto(), k.prefix.family(), k.prefix.bytes(), k.prefix.len)
}

/// Trie entries the bindings fill: per (proto, prefix), the ports their ranges cover.
fn entries<'a>(keys: impl Iterator<Item = &'a BindingKey>) -> u64 {
    let mut by_slot: BTreeMap<Slot, Vec<(u32, u32)>> = BTreeMap::new();
    for k in keys {
        by_slot.entry(slot(k)).or_default().push((u32::from(k.ports.lo), u32::from(k.ports.hi)));
    }
    let mut total = 0;
    for ranges in by_slot.values_mut() {
        ranges.sort_unstable();
        let mut end = 0u32; // one past the last port counted
        for &(lo, hi) in ranges.iter() {
            let from = lo.max(end);
            if hi + 1 > from {
                total += u64::from(hi + 1 - from);
            }
            end = end.max(hi + 1);
        }
    }
    total
}

/// Every trie entry the bindings call for, each with its owner: what the trie holds once every
/// plan is fully written. The pinned records are the truth; the trie is derived from them, so a
/// command killed part-way (records written, entries not yet; or entries moved, records not yet
/// removed) is found, and repaired, by comparing the trie with this.
pub fn entries_of(bindings: &BTreeMap<u32, BindingKey>) -> Vec<PortChange> {
    let mut by_slot: BTreeMap<Slot, Vec<(u32, BindingKey)>> = BTreeMap::new();
    for (id, k) in bindings {
        by_slot.entry(slot(k)).or_default().push((*id, *k));
    }
    let mut out = Vec::new();
    for list in by_slot.values_mut() {
        // The first to claim a port in rank order is its owner (as `owner` decides).
        list.sort_by_key(|(_, k)| rank(&k.ports));
        let mut taken = std::collections::HashSet::new();
        for (id, k) in list.iter() {
            for port in k.ports.ports() {
                if taken.insert(port) {
                    out.push(PortChange { slot: *k, port, owner: Some(*id) });
                }
            }
        }
    }
    out
}

/// Plans adding `add` and removing `remove` (keys that exist; others are ignored) over the
/// bindings `existing` (id -> key). Fails, before anything is written, when the result would not
/// fit the maps.
pub fn plan(
    existing: &BTreeMap<u32, BindingKey>,
    add: &[BindingKey],
    remove: &[BindingKey],
    limits: Limits,
) -> Result<Plan, PlanError> {
    let mut out = Plan::default();
    let id_of = |key: &BindingKey| existing.iter().find(|(_, k)| *k == key).map(|(id, _)| *id);
    let mut after = existing.clone();
    for key in remove {
        if let Some(id) = id_of(key) {
            if after.remove(&id).is_some() {
                out.removed.push((id, *key));
            }
        }
    }
    let mut new_keys: Vec<BindingKey> = Vec::new();
    for key in add {
        match id_of(key) {
            Some(id) if !out.replaced.iter().any(|(i, _)| *i == id) => out.replaced.push((id, *key)),
            Some(_) => {}
            None if !new_keys.contains(key) => new_keys.push(*key),
            None => {}
        }
    }
    // Removals are written last, so their ids (and map entries) are not free for this plan's
    // new bindings.
    if existing.len() + new_keys.len() > limits.bindings as usize {
        return Err(PlanError::Bindings { existing: existing.len(), adding: new_keys.len(), limit: limits.bindings });
    }
    let mut free = (0..limits.bindings).filter(|i| !existing.contains_key(i));
    for key in new_keys {
        let id = free.next().expect("checked against the limit above");
        after.insert(id, key);
        out.added.push((id, key));
    }

    // Every port of a binding that comes or goes may change owner; no other can.
    let mut touched: BTreeMap<Slot, (BindingKey, BTreeSet<u16>)> = BTreeMap::new();
    for (_, key) in out.added.iter().chain(&out.removed) {
        touched.entry(slot(key)).or_insert_with(|| (*key, BTreeSet::new())).1.extend(key.ports.ports());
    }
    let (mut gained, mut lost) = (0u64, 0u64);
    for (s, (rep, ports)) in &touched {
        let (lo, hi) = (*ports.first().expect("a range has a port"), *ports.last().expect("a range has a port"));
        let near = |m: &BTreeMap<u32, BindingKey>| -> Vec<(u32, BindingKey)> {
            m.iter()
                .filter(|(_, k)| slot(k) == *s && k.ports.lo <= hi && k.ports.hi >= lo)
                .map(|(i, k)| (*i, *k))
                .collect()
        };
        let (before_near, after_near) = (near(existing), near(&after));
        for &port in ports {
            let was = owner(before_near.iter().map(|(i, k)| (*i, k)), port);
            let now = owner(after_near.iter().map(|(i, k)| (*i, k)), port);
            if was != now {
                gained += u64::from(was.is_none());
                lost += u64::from(now.is_none());
                out.ports.push(PortChange { slot: *rep, port, owner: now });
            }
        }
    }
    if gained > lost {
        let now = entries(existing.values());
        if now + gained - lost > u64::from(limits.port_entries) {
            return Err(PlanError::PortEntries { existing: now, adding: gained - lost, limit: limits.port_entries });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Proto;

    /// "tcp 10.0.0.0/8 80-89" or "udp ::/0 53".
    fn key(s: &str) -> BindingKey {
        let mut it = s.split_whitespace();
        let proto = match it.next().unwrap() {
            "tcp" => Proto::Tcp,
            _ => Proto::Udp,
        };
        let prefix = it.next().unwrap().parse().unwrap();
        let ports = it.next().unwrap();
        let (lo, hi) = ports.split_once('-').unwrap_or((ports, ports));
        BindingKey { proto, prefix, ports: PortRange { lo: lo.parse().unwrap(), hi: hi.parse().unwrap() } }
    }

    fn bindings(list: &[(u32, &str)]) -> BTreeMap<u32, BindingKey> {
        list.iter().map(|(id, k)| (*id, key(k))).collect()
    }

    /// The trie entries a set of bindings should produce, computed the slow way.
    fn trie(b: &BTreeMap<u32, BindingKey>) -> BTreeMap<(Slot, u16), u32> {
        let mut t = BTreeMap::new();
        for k in b.values() {
            for port in k.ports.ports() {
                let rivals = b.iter().filter(|(_, o)| o.same_slot(k)).map(|(i, o)| (*i, o));
                t.insert((slot(k), port), owner(rivals, port).unwrap());
            }
        }
        t
    }

    #[test]
    fn the_entries_the_bindings_call_for_are_the_trie_of_the_slow_way() {
        let b = bindings(&[
            (1, "tcp 0.0.0.0/0 1000-1999"),
            (2, "tcp 0.0.0.0/0 1500-1509"),
            (3, "tcp 0.0.0.0/0 1505"),
            (4, "tcp 0.0.0.0/0 1495-1504"),
            (5, "tcp 10.0.0.0/8 1500"),
            (6, "udp 0.0.0.0/0 1500-1501"),
            (7, "tcp ::/0 1000-1001"),
        ]);
        let got: BTreeMap<(Slot, u16), u32> =
            entries_of(&b).into_iter().map(|c| ((slot(&c.slot), c.port), c.owner.unwrap())).collect();
        assert_eq!(got, trie(&b));
        assert_eq!(entries_of(&b).len(), got.len(), "one entry per (slot, port)");
    }

    const BIG: Limits = Limits { bindings: 100, port_entries: 100_000 };

    #[test]
    fn narrowest_range_then_lowest_start_owns_a_port() {
        let b = bindings(&[
            (1, "tcp 0.0.0.0/0 1000-1999"),
            (2, "tcp 0.0.0.0/0 1500-1509"),
            (3, "tcp 0.0.0.0/0 1505"),
            (4, "tcp 0.0.0.0/0 1495-1504"),
        ]);
        let all: Vec<(u32, &BindingKey)> = b.iter().map(|(i, k)| (*i, k)).collect();
        for (port, want) in [(1200, Some(1)), (1505, Some(3)), (1506, Some(2)), (1502, Some(4)), (2000, None)] {
            assert_eq!(owner(all.iter().copied(), port), want, "port {port}");
        }
    }

    /// Each case: bindings before, keys to add, keys to remove; then the plan applied to the
    /// trie of the bindings before must give exactly the trie of the bindings after.
    #[test]
    fn plans_change_exactly_the_entries_whose_owner_changes() {
        struct Case {
            name: &'static str,
            before: &'static [(u32, &'static str)],
            add: &'static [&'static str],
            remove: &'static [&'static str],
            added: &'static [u32],
            replaced: &'static [u32],
            changes: usize,
        }
        let cases = [
            Case {
                name: "first binding",
                before: &[],
                add: &["tcp 0.0.0.0/0 80-82"],
                remove: &[],
                added: &[0],
                replaced: &[],
                changes: 3,
            },
            Case {
                name: "a narrower range takes its ports from a wider one",
                before: &[(0, "tcp 0.0.0.0/0 1000-1999")],
                add: &["tcp 0.0.0.0/0 1500-1509"],
                remove: &[],
                added: &[1],
                replaced: &[],
                changes: 10,
            },
            Case {
                name: "a wider range leaves a narrower one its ports",
                before: &[(0, "tcp 0.0.0.0/0 1500-1509")],
                add: &["tcp 0.0.0.0/0 1000-1999"],
                remove: &[],
                added: &[1],
                replaced: &[],
                changes: 990,
            },
            Case {
                name: "equal widths: the lower start keeps the overlap",
                before: &[(0, "tcp 0.0.0.0/0 10-19")],
                add: &["tcp 0.0.0.0/0 15-24"],
                remove: &[],
                added: &[1],
                replaced: &[],
                changes: 5,
            },
            Case {
                name: "another prefix or protocol is another slot",
                before: &[(0, "tcp 0.0.0.0/0 80"), (1, "udp 0.0.0.0/0 80")],
                add: &["tcp 10.0.0.0/8 80", "tcp ::/0 80"],
                remove: &[],
                added: &[2, 3],
                replaced: &[],
                changes: 2,
            },
            Case {
                name: "adding an existing key replaces its target only",
                before: &[(0, "tcp 0.0.0.0/0 80-89")],
                add: &["tcp 0.0.0.0/0 80-89", "tcp 0.0.0.0/0 80-89"],
                remove: &[],
                added: &[],
                replaced: &[0],
                changes: 0,
            },
            Case {
                name: "new ids fill the lowest gap",
                before: &[(0, "tcp 0.0.0.0/0 1"), (2, "tcp 0.0.0.0/0 3")],
                add: &["tcp 0.0.0.0/0 2", "tcp 0.0.0.0/0 4"],
                remove: &[],
                added: &[1, 3],
                replaced: &[],
                changes: 2,
            },
            Case {
                name: "removing a narrow range hands its ports back to the wider one",
                before: &[(0, "tcp 0.0.0.0/0 1000-1999"), (1, "tcp 0.0.0.0/0 1500-1509")],
                add: &[],
                remove: &["tcp 0.0.0.0/0 1500-1509"],
                added: &[],
                replaced: &[],
                changes: 10,
            },
            Case {
                name: "removing a wide range keeps the narrow one's ports and clears the rest",
                before: &[(0, "tcp 0.0.0.0/0 1000-1999"), (1, "tcp 0.0.0.0/0 1500-1509")],
                add: &[],
                remove: &["tcp 0.0.0.0/0 1000-1999"],
                added: &[],
                replaced: &[],
                changes: 990,
            },
            Case {
                name: "removing a key that is not there changes nothing",
                before: &[(0, "tcp 0.0.0.0/0 80")],
                add: &[],
                remove: &["udp 0.0.0.0/0 80"],
                added: &[],
                replaced: &[],
                changes: 0,
            },
        ];
        for c in cases {
            let before = bindings(c.before);
            let add: Vec<BindingKey> = c.add.iter().map(|k| key(k)).collect();
            let remove: Vec<BindingKey> = c.remove.iter().map(|k| key(k)).collect();
            let p = plan(&before, &add, &remove, BIG).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            assert_eq!(p.added.iter().map(|(i, _)| *i).collect::<Vec<_>>(), c.added, "{}: added", c.name);
            assert_eq!(p.replaced.iter().map(|(i, _)| *i).collect::<Vec<_>>(), c.replaced, "{}: replaced", c.name);
            assert_eq!(p.ports.len(), c.changes, "{}: trie writes", c.name);
            let mut after = before.clone();
            for (id, _) in &p.removed {
                after.remove(id);
            }
            after.extend(p.added.iter().copied());
            let mut t = trie(&before);
            for ch in &p.ports {
                match ch.owner {
                    Some(id) => t.insert((slot(&ch.slot), ch.port), id),
                    None => t.remove(&(slot(&ch.slot), ch.port)),
                };
            }
            assert_eq!(t, trie(&after), "{}: the trie after the plan", c.name);
        }
    }

    #[test]
    fn capacity_is_checked_before_anything_is_written() {
        let limits = Limits { bindings: 3, port_entries: 100 };
        let two = bindings(&[(0, "tcp 0.0.0.0/0 1"), (1, "tcp 0.0.0.0/0 2")]);
        let err = plan(&two, &[key("tcp 0.0.0.0/0 3"), key("tcp 0.0.0.0/0 4")], &[], limits).unwrap_err();
        assert_eq!(err, PlanError::Bindings { existing: 2, adding: 2, limit: 3 });
        assert!(err.to_string().starts_with("too many bindings: 2 exist, 2 more would pass the limit of 3"));
        // Replacing does not count; removing in the same plan makes no room (it is written last).
        assert!(plan(&two, &[key("tcp 0.0.0.0/0 1"), key("tcp 0.0.0.0/0 3")], &[], limits).is_ok());
        let remove = [key("tcp 0.0.0.0/0 1")];
        assert!(plan(&two, &[key("tcp 0.0.0.0/0 3"), key("tcp 0.0.0.0/0 4")], &remove, limits).is_err());

        // Trie entries: 60 + 41 new ports do not fit 100; overlapping ports of the same slot are
        // one entry, so 60 + 40 more (20 of them shared) do.
        let sixty = bindings(&[(0, "tcp 0.0.0.0/0 1-60")]);
        let err = plan(&sixty, &[key("tcp 0.0.0.0/0 61-101")], &[], limits).unwrap_err();
        assert_eq!(err, PlanError::PortEntries { existing: 60, adding: 41, limit: 100 });
        assert!(plan(&sixty, &[key("tcp 0.0.0.0/0 41-100")], &[], limits).is_ok());
        assert!(plan(&sixty, &[key("tcp 10.0.0.0/8 1-41")], &[], limits).is_err(), "another prefix: new entries");
        // Over the limit already (a smaller map than before): removing still works.
        let full = bindings(&[(0, "tcp 0.0.0.0/0 1-150")]);
        assert!(plan(&full, &[], &[key("tcp 0.0.0.0/0 1-150")], limits).is_ok());
    }

    #[test]
    fn entries_count_each_slot_and_port_once() {
        let b = bindings(&[
            (0, "tcp 0.0.0.0/0 1-10"),
            (1, "tcp 0.0.0.0/0 5-14"),
            (2, "tcp 0.0.0.0/0 14-20"),
            (3, "udp 0.0.0.0/0 1-10"),
            (4, "tcp 0.0.0.0/0 65535"),
        ]);
        assert_eq!(entries(b.values()), 20 + 10 + 1);
        assert_eq!(entries(b.values()), trie(&b).len() as u64);
    }
}
