//! The loop's deadlines, each typed by what it is for, so firing one needs no guessing.
use std::{cmp::Reverse, collections::BinaryHeap, time::Instant};

/// What a deadline is for. Each names a slot and the serial of the client or pair that was in it
/// when the timer was set: a slot reused since then is not the timer's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    /// `relay`: a client has had `--pair-timeout` to send its token line and find a partner.
    PairTimeout { slot: usize, serial: u64 },
    /// `proxy`: a client's upstream connection may have run past `--connect-timeout`. The
    /// connection's own deadline decides: one that failed over since has a later one.
    ConnectTimeout { slot: usize, serial: u64 },
    /// A pair's source reached end of file with bytes still in flight: look again.
    FlushCheck { slot: usize, serial: u64 },
}

/// Timers in deadline order.
#[derive(Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, Timer)>>,
}

impl Timers {
    pub(super) fn set(&mut self, at: Instant, timer: Timer) {
        self.heap.push(Reverse((at, timer)));
    }

    /// The earliest deadline, if any timer is set.
    pub(super) fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Takes the earliest timer whose deadline is at or before `now`, with its deadline.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(Instant, Timer)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(entry)| entry),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timers_fire_in_deadline_order_and_only_when_due() {
        let now = Instant::now();
        let mut t = Timers::default();
        assert_eq!(t.next(), None);
        t.set(now + Duration::from_millis(20), Timer::FlushCheck { slot: 1, serial: 7 });
        t.set(now + Duration::from_millis(10), Timer::ConnectTimeout { slot: 2, serial: 8 });
        t.set(now + Duration::from_millis(30), Timer::PairTimeout { slot: 3, serial: 9 });
        assert_eq!(t.next(), Some(now + Duration::from_millis(10)));
        assert_eq!(t.pop_due(now), None, "nothing is due yet");
        let later = now + Duration::from_millis(25);
        assert_eq!(t.pop_due(later).map(|(_, t)| t), Some(Timer::ConnectTimeout { slot: 2, serial: 8 }));
        assert_eq!(t.pop_due(later), Some((now + Duration::from_millis(20), Timer::FlushCheck { slot: 1, serial: 7 })));
        assert_eq!(t.pop_due(later), None);
        assert_eq!(t.next(), Some(now + Duration::from_millis(30)));
    }
}
