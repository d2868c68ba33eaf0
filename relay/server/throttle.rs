//! A warning that a flood of clients could repeat thousands of times a second (a full
//! `--max-pending`, a proxy whose upstreams are all down): said at most once a second, the ones in
//! between counted and said by the next, or once their second is over.
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_secs(1);

pub(super) struct Throttled {
    /// What happened to each client, for the count: "reset for --max-pending or for want of
    /// descriptors".
    what: &'static str,
    warned: Option<Instant>,
    unsaid: u64,
    /// When the clients `unsaid` counts are said, if no further warning says them first.
    due: Option<Instant>,
}

impl Throttled {
    pub(super) fn new(what: &'static str) -> Throttled {
        Throttled { what, warned: None, unsaid: 0, due: None }
    }

    /// `line` as a warning, or at debug level (counted) within a second of the last one.
    pub(super) fn warn(&mut self, line: String) {
        let now = Instant::now();
        if let Some(at) = self.warned.filter(|at| now < *at + EVERY) {
            self.unsaid += 1;
            self.due = Some(at + EVERY);
            return log::debug!("{line}");
        }
        self.due = None;
        match std::mem::take(&mut self.unsaid) {
            0 => log::warn!("{line}"),
            n => log::warn!("{line} ({n} more {} since the last such line)", self.what),
        }
        self.warned = Some(now);
    }

    /// The count not said yet, once its second is over (or at the end): the last burst's were
    /// said only by a later warning, which may never come (a helper's pass: 268 of 269 never
    /// appeared in the log).
    pub(super) fn say_unsaid(&mut self, now: Instant, at_end: bool) {
        if self.due.is_some_and(|due| at_end || now >= due) {
            self.due = None;
            let n = std::mem::take(&mut self.unsaid);
            log::warn!("{n} more clients {} since the last such line", self.what);
            self.warned = Some(now);
        }
    }

    /// When `say_unsaid` has something to say.
    pub(super) fn due(&self) -> Option<Instant> {
        self.due
    }
}
