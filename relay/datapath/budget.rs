//! What a kernel pair may hold. A redirected skb waits on the peer's psock queue until the psock
//! backlog moves it into the peer's send queue; no socket buffer and no tcp_mem limit bounds that
//! queue (net/core/skmsg.c queues without a check), so a client whose partner never reads could
//! make the host queue gigabytes while `ss` shows nothing. So each direction of a kernel pair has a
//! budget for exactly that queue: bytes its verdict redirected that have not yet entered the
//! destination's send queue (which TCP bounds by its send buffer and tcp_mem, like every socket's).
//! The verdict redirects within the budget and parks what comes past it in the source's own queue,
//! where it counts against the source's receive buffer: TCP's window then holds the sender back
//! exactly as on the userspace datapath. Halfway through a budget the verdict asks user space for
//! the next one, so a pair whose psock keeps up never parks. Once parked, user space waits until
//! the psock queue is empty, peeks the parked bytes and writes them on itself, lets the verdict
//! redirect again, and only then consumes them (so the source's window stays closed while it
//! catches up); no skb overtakes a parked one.
//!
//! This module is the pure part: the numbers and the decisions. kernel.rs does the syscalls.
use std::time::Duration;

/// Default bytes one direction of a kernel pair may hold between its sockets.
pub const DEFAULT_PER_DIRECTION: u64 = 16 << 20;
/// Default bytes all kernel pairs together may hold: 64 pairs at the default budget.
pub const DEFAULT_TOTAL: u64 = 2 << 30;
/// First and longest wait between looks at a parked direction.
pub const RECHECK_FIRST: Duration = Duration::from_micros(250);
pub const RECHECK_MAX: Duration = Duration::from_millis(100);

/// The limits the user chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes one direction of a pair may hold.
    pub per_direction: u64,
    /// Bytes all pairs in the kernel maps may hold together.
    pub total: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { per_direction: DEFAULT_PER_DIRECTION, total: DEFAULT_TOTAL }
    }
}

impl Limits {
    /// How many pairs may be in the kernel maps at once so that all of them together, each
    /// direction at its budget, stay within `total`. Further pairs are spliced in user space.
    pub fn max_pairs(&self) -> usize {
        (self.total / (2 * self.per_direction.max(1))).max(1) as usize
    }

    /// Whether one pair fits in the total: below that, the first kernel pair alone would hold
    /// more than `--kernel-memory` promises, and a smaller total could never be kept.
    pub fn check(&self) -> Result<(), String> {
        let pair = 2 * self.per_direction;
        if self.total < pair {
            return Err(format!(
                "--kernel-memory ({}) is less than what one kernel pair may hold (2 x --kernel-buffer = {}): \
                 raise --kernel-memory to at least {pair}, lower --kernel-buffer, or use --datapath userspace",
                self.total, pair
            ));
        }
        Ok(())
    }
}

/// Beyond its budget, the most one direction of a kernel pair may hold (README, "Bounded
/// memory"): 16 MiB parked plus the window already advertised (24 MiB together), and the relay's
/// 16 MiB send buffer.
pub const WORST_BEYOND_BUDGET: u64 = 40 << 20;

impl Limits {
    /// The most one kernel pair may hold, both directions at their worst.
    pub fn worst_per_pair(per_direction: u64) -> u64 {
        2 * (per_direction + WORST_BEYOND_BUDGET)
    }

    /// How many kernel pairs, each at its worst, fit in half of the host's TCP memory pressure
    /// threshold (`pressure`, bytes; at least one). Past that threshold the kernel failed the
    /// psock's sends to the sockets of stalled pairs with EFAULT, which ends such a pair
    /// (KERNEL-NOTES item 20: 20 pairs whose clients sent 40 MiB each before reading, 19 reset),
    /// and every TCP socket of the host has its buffers moderated. The other half is for the
    /// clients' own sockets, the pairs spliced in user space and the rest of the host.
    pub fn pairs_within_tcp_memory(per_direction: u64, pressure: u64) -> u64 {
        (pressure / 2 / Self::worst_per_pair(per_direction).max(1)).max(1)
    }

    /// `--kernel-memory` when it is not given: `DEFAULT_TOTAL`, or the budgets of the pairs
    /// `pairs_within_tcp_memory` allows where that is less (`pressure`: None if unknown).
    pub fn default_total(per_direction: u64, pressure: Option<u64>) -> u64 {
        let total = match pressure {
            Some(p) => {
                DEFAULT_TOTAL.min(Self::pairs_within_tcp_memory(per_direction, p).saturating_mul(2 * per_direction))
            }
            None => DEFAULT_TOTAL,
        };
        // At least one pair: a --kernel-buffer over 1G was refused for a --kernel-memory the
        // user had not given (a new-user pass).
        total.max(per_direction.saturating_mul(2))
    }
}

/// Where one direction stands, from the datapath's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    /// Bytes the source's verdict redirected since the direction joined.
    pub redirected: u64,
    /// Bytes the verdict parked in the source's own queue since the direction joined.
    pub parked: u64,
    /// Bytes that left the source and have not yet entered the destination's send queue: what
    /// waits on the destination's psock, outside every socket buffer.
    pub in_flight: u64,
}

impl Measure {
    /// `base`: what had entered the destination's send queue when the direction joined
    /// (bytes_acked + SIOCOUTQ); `redirected` and `parked`: the verdict's counts since; `written`:
    /// parked bytes user space wrote into the destination; `entered`: the destination's
    /// bytes_acked + SIOCOUTQ now. An actively opened socket counts its SYN in bytes_acked, and a
    /// FIN too: both are in `base` and `entered` alike, or make the result one short, never more.
    pub fn new(base: u64, redirected: u64, parked: u64, written: u64, entered: u64) -> Measure {
        Measure { redirected, parked, in_flight: (base + redirected + written).saturating_sub(entered) }
    }
}

/// The next budget of a direction: (budget, notify) for `struct relay_peer`. The verdict may
/// redirect until the direction holds `limit` bytes if nothing more is acknowledged meanwhile,
/// and asks for the next budget halfway there.
pub fn grant(m: Measure, limit: u64) -> (u64, u64) {
    let room = limit.saturating_sub(m.in_flight);
    (m.redirected + room, m.redirected + room / 2)
}

/// A parked direction's bytes may be written on once nothing redirected before them still waits
/// on the destination's psock: written earlier, they would overtake those.
pub fn may_unpark(m: Measure) -> bool {
    m.in_flight == 0
}

/// The next wait before looking at a parked direction again, when the last look moved nothing.
pub fn backoff(delay: Duration) -> Duration {
    (delay * 2).min(RECHECK_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_is_what_left_the_source_and_was_not_acknowledged() {
        // 1,000 bytes had entered the destination's send queue at join, 5,000 were redirected
        // since and 500 parked bytes written by user space; 4,500 have entered it now.
        let m = Measure::new(1_000, 5_000, 600, 500, 4_500);
        assert_eq!(m, Measure { redirected: 5_000, parked: 600, in_flight: 2_000 });
        // A FIN acknowledged after the last byte makes acked one more than written: never negative.
        assert_eq!(Measure::new(1, 10, 0, 0, 12).in_flight, 0);
    }

    #[test]
    fn a_budget_stops_where_the_direction_would_hold_its_limit() {
        let limit = 4 << 20;
        let m = Measure { redirected: 10 << 20, parked: 0, in_flight: 1 << 20 };
        let (budget, notify) = grant(m, limit);
        assert_eq!(budget, (10 << 20) + (3 << 20));
        assert_eq!(notify, (10 << 20) + (3 << 19));
        // Redirecting up to the budget with nothing more acknowledged holds exactly the limit.
        assert_eq!(Measure::new(0, budget, 0, 0, budget - limit).in_flight, limit);
        // A direction that holds its limit (or more) gets no room: its next skb parks.
        let full = Measure { redirected: 10 << 20, parked: 0, in_flight: limit + 5 };
        assert_eq!(grant(full, limit), (10 << 20, 10 << 20));
    }

    #[test]
    fn parked_bytes_move_only_behind_everything_redirected_before() {
        assert!(!may_unpark(Measure { redirected: 9 << 20, parked: 1, in_flight: 1 }));
        assert!(may_unpark(Measure { redirected: 9 << 20, parked: 1, in_flight: 0 }));
    }

    #[test]
    fn the_total_bounds_how_many_pairs_join() {
        assert_eq!(Limits::default().max_pairs(), 64);
        assert_eq!(Limits { per_direction: 1 << 20, total: 64 << 20 }.max_pairs(), 32);
        // Never zero: one pair may always join.
        assert_eq!(Limits { per_direction: 1 << 30, total: 1 }.max_pairs(), 1);
        assert!(Limits { per_direction: 1 << 20, total: 2 << 20 }.check().is_ok());
        let short = Limits { per_direction: 1 << 20, total: (2 << 20) - 1 }.check().unwrap_err();
        assert!(short.contains("--kernel-memory (2097151)") && short.contains("at least 2097152"), "{short}");
    }

    #[test]
    fn by_default_the_kernel_pairs_at_their_worst_fit_in_half_of_tcp_memory_pressure() {
        let pressure_24g_host = 383_877 * 4096; // tcp_mem of a 24 GiB host: 1.43 GiB
        assert_eq!(Limits::worst_per_pair(16 << 20), 112 << 20);
        assert_eq!(Limits::pairs_within_tcp_memory(16 << 20, pressure_24g_host), 6);
        assert_eq!(Limits::default_total(16 << 20, Some(pressure_24g_host)), 6 * (32 << 20));
        // A large host keeps the fixed default; an unknown one too.
        assert_eq!(Limits::default_total(16 << 20, Some(64 << 30)), DEFAULT_TOTAL);
        assert_eq!(Limits::default_total(16 << 20, None), DEFAULT_TOTAL);
        // A tiny one still lets one pair in.
        assert_eq!(Limits::default_total(16 << 20, Some(1 << 20)), 32 << 20);
        let tiny = Limits { per_direction: 16 << 20, total: Limits::default_total(16 << 20, Some(1 << 20)) };
        assert!(tiny.check().is_ok());
        assert_eq!(tiny.max_pairs(), 1);
        // So does a --kernel-buffer larger than half the fixed default.
        let large = Limits { per_direction: 1025 << 20, total: Limits::default_total(1025 << 20, None) };
        assert!(large.check().is_ok());
        assert_eq!(large.max_pairs(), 1);
    }

    #[test]
    fn rechecks_back_off_to_a_ceiling() {
        assert_eq!(backoff(RECHECK_FIRST), Duration::from_micros(500));
        assert_eq!(backoff(Duration::from_millis(80)), RECHECK_MAX);
    }
}
