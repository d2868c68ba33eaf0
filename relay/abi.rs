//! The Rust mirror of probes/skrelay.h: map limits, counter indices and map key layouts shared
//! with the kernel programs. The header is the source of truth (the programs size their maps
//! from it); `tests` below checks every value here against the header as clang compiles it.

/// max_entries of every map with one entry per socket (relay and accel).
pub const MAX_SOCKETS: u32 = 65536;
/// max_entries of accel's `accel_ports`.
pub const ACCEL_MAX_PORTS: u32 = 1024;
/// `accel_config.flags`: the set-up's program honours DRAINING (one pinned by an older version
/// has 0: `off` then detaches sockops at once).
pub const ACCEL_FLAG_KNOWS_DRAINING: u32 = 1;
/// `accel_config.flags`: `accel off` ran; no new connection joins.
pub const ACCEL_FLAG_DRAINING: u32 = 2;

/// Indices of the relay programs' per-CPU counters (`relay_stats`).
pub mod relay_stat {
    pub const VERDICTS: u32 = 0;
    pub const REDIRECTED: u32 = 1;
    pub const NO_PEER: u32 = 2;
    pub const DROPPED: u32 = 3;
    pub const BYTES: u32 = 4;
    pub const EVENTS_LOST: u32 = 5;
    pub const PARKED: u32 = 6;
    pub const TRIMMED: u32 = 7;
    pub const BROKEN: u32 = 8;
    pub const EXTENDED: u32 = 9;
    pub const MAX: u32 = 10;
}

/// Value of the relay `peers` HASH (`struct relay_peer`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayPeer {
    /// The peer's socket cookie.
    pub peer: u64,
    /// The verdict redirects while `RelayCount::redirected` stays within this; past it, it parks.
    pub budget: u64,
    /// User space hears of the socket when `redirected` passes this.
    pub notify: u64,
    /// Parked bytes user space took out of the socket's queue.
    pub taken: u64,
    /// User space hears of the socket when its parked bytes not yet taken pass this.
    pub hold: u64,
    /// What had entered the peer's send queue when the pair joined (bytes_acked + SIOCOUTQ).
    pub base: u64,
    /// `--kernel-buffer`: past `budget`, the verdict measures the peer itself and redirects
    /// while what waits between the sockets stays within this (0: it parks at `budget`).
    pub limit: u64,
}

// SAFETY: plain old data, seven u64.
unsafe impl aya::Pod for RelayPeer {}

/// Value of the relay `relay_counts` HASH (`struct relay_count`), written by the verdict.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCount {
    pub redirected: u64,
    pub parked: u64,
    /// TCP sequence number of the next byte the verdict has not handed on.
    pub next_seq: u32,
    /// `relay_count_flags::*`.
    pub flags: u32,
}

/// `relay_count.flags` (probes/skrelay.h).
pub mod relay_count_flags {
    /// `next_seq` is set.
    pub const SEQ_KNOWN: u32 = 1;
    /// A repeated head could not be cut off and the skb was dropped: the pair must be reset.
    pub const BROKEN: u32 = 2;
}

// SAFETY: plain old data, two u64.
unsafe impl aya::Pod for RelayCount {}

/// Indices of the accel programs' per-CPU counters (`accel_stats`).
pub mod accel_stat {
    pub const SOCKETS: u32 = 0;
    pub const CONNECTIONS: u32 = 1;
    pub const MESSAGES: u32 = 2;
    pub const BYTES: u32 = 3;
    pub const FALLBACKS: u32 = 4;
    pub const INSERT_BUSY: u32 = 5;
    pub const INSERT_FAILED: u32 = 6;
    /// The errno of the latest refused insert: a value, not a count.
    pub const LAST_ERRNO: u32 = 7;
    pub const RACES_LOST: u32 = 8;
    pub const PAUSES: u32 = 9;
    pub const RESUMES: u32 = 10;
    pub const DEMOTED_SMALL: u32 = 11;
    pub const PASSED: u32 = 12;
    pub const PASSED_BYTES: u32 = 13;
    pub const LEFT: u32 = 14;
    pub const STUCK: u32 = 15;
    /// A gauge: sockets that joined and have not closed, summed over CPUs with wrapping adds.
    pub const LIVE_SOCKETS: u32 = 16;
    pub const MAX: u32 = 17;
}

/// The single value of the accel `accel_config` array (`struct accel_config`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccelConfig {
    /// 0: every connection; 1: only those with an end on a port in `accel_ports`.
    pub filter_ports: u32,
    /// The most unread bytes a reader may hold in its redirect queue before the direction that
    /// feeds it pauses on the TCP path (0: 4 MiB).
    pub max_queued: u32,
    /// A sendmsg below this many bytes is small (0: never demote for size).
    pub small_write: u32,
    /// Demote after this many consecutive small sends that found the reader with unread data.
    pub small_streak: u32,
    /// CPUs the cgroup's processes may run on (0: 1): with more live connections than this, a
    /// paused direction gives up the redirect sooner (probes/accel.bpf.c, STUCK_LIMITS).
    pub cpus: u32,
    /// `ACCEL_FLAG_*`: `on` sets KNOWS_DRAINING (its program honours DRAINING), `off` sets
    /// DRAINING (no new connection joins; the joined ones keep sockops).
    pub flags: u32,
    /// The kernel's address of `woken_wake_function` (0: unknown), which tells a thread blocked
    /// in recvmsg on a socket's wait queue (probes/accel.bpf.c, `blocked_readers`).
    pub woken_wake_function: u64,
}

// SAFETY: plain old data, u32 and u64 fields, no padding (the u64 starts at offset 24).
unsafe impl aya::Pod for AccelConfig {}

/// Five-tuple key of the accel SOCKHASH (`struct sock_key`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SockKey {
    pub local_ip6: [u32; 4],
    pub remote_ip6: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
}

// SAFETY: plain old data of u32 fields, no padding.
unsafe impl aya::Pod for SockKey {}

/// Limits of the steer maps (probes/skrelay.h).
pub const STEER_MAX_BINDINGS: u32 = 4096;
pub const STEER_MAX_PORT_ENTRIES: u32 = 262144;

/// The data part of a `steer_ports` LPM trie key (`struct steer_key` after `prefixlen`, which
/// aya's `lpm_trie::Key` supplies): family, proto, port (host order), address (network order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SteerMatch {
    pub family: u8,
    pub proto: u8,
    pub port: u16,
    pub addr: [u8; 16],
}

// SAFETY: plain old data, no padding (1 + 1 + 2 + 16 bytes).
unsafe impl aya::Pod for SteerMatch {}

/// A binding's description (`struct steer_binding`), for `steer list` and bpftool.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SteerBinding {
    pub cookie: u64,
    pub pid: u32,
    pub port_lo: u16,
    pub port_hi: u16,
    pub family: u8,
    pub proto: u8,
    pub prefixlen: u8,
    pub target_family: u8,
    pub target_port: u16,
    pub target_scope: u16,
    pub addr: [u8; 16],
    pub target_addr: [u8; 16],
    pub comm: [u8; 16],
}

// SAFETY: plain old data; the layout test below checks there is no hidden padding.
unsafe impl aya::Pod for SteerBinding {}

/// Per-CPU counters of one binding (`struct steer_counters`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SteerCounters {
    pub hits: u64,
    pub refused: u64,
}

// SAFETY: two u64.
unsafe impl aya::Pod for SteerCounters {}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(non_upper_case_globals)]
    mod c {
        include!(concat!(env!("OUT_DIR"), "/c_layout.rs"));
    }

    #[test]
    fn map_limits_match_the_header() {
        assert_eq!(MAX_SOCKETS, c::MAX_SOCKETS);
        assert_eq!(ACCEL_MAX_PORTS, c::ACCEL_MAX_PORTS);
        assert_eq!(ACCEL_FLAG_KNOWS_DRAINING, c::ACCEL_FLAG_KNOWS_DRAINING);
        assert_eq!(ACCEL_FLAG_DRAINING, c::ACCEL_FLAG_DRAINING);
        assert_eq!(STEER_MAX_BINDINGS, c::STEER_MAX_BINDINGS);
        assert_eq!(STEER_MAX_PORT_ENTRIES, c::STEER_MAX_PORT_ENTRIES);
    }

    #[test]
    fn sock_key_matches_the_c_layout() {
        assert_eq!(std::mem::size_of::<SockKey>(), c::SOCK_KEY_SIZE);
        assert_eq!(std::mem::offset_of!(SockKey, local_ip6), c::sock_key__local_ip6);
        assert_eq!(std::mem::offset_of!(SockKey, remote_ip6), c::sock_key__remote_ip6);
        assert_eq!(std::mem::offset_of!(SockKey, local_port), c::sock_key__local_port);
        assert_eq!(std::mem::offset_of!(SockKey, remote_port), c::sock_key__remote_port);
    }

    #[test]
    fn accel_config_matches_the_c_layout() {
        assert_eq!(std::mem::size_of::<AccelConfig>(), c::ACCEL_CONFIG_SIZE);
        assert_eq!(std::mem::offset_of!(AccelConfig, filter_ports), c::accel_config__filter_ports);
        assert_eq!(std::mem::offset_of!(AccelConfig, max_queued), c::accel_config__max_queued);
        assert_eq!(std::mem::offset_of!(AccelConfig, small_write), c::accel_config__small_write);
        assert_eq!(std::mem::offset_of!(AccelConfig, small_streak), c::accel_config__small_streak);
        assert_eq!(std::mem::offset_of!(AccelConfig, cpus), c::accel_config__cpus);
        assert_eq!(std::mem::offset_of!(AccelConfig, flags), c::accel_config__flags);
        assert_eq!(std::mem::offset_of!(AccelConfig, woken_wake_function), c::accel_config__woken_wake_function);
    }

    #[test]
    fn accel_counter_indices_match_the_c_enum() {
        assert_eq!(accel_stat::SOCKETS, c::ACCEL_STAT_SOCKETS);
        assert_eq!(accel_stat::CONNECTIONS, c::ACCEL_STAT_CONNECTIONS);
        assert_eq!(accel_stat::MESSAGES, c::ACCEL_STAT_MESSAGES);
        assert_eq!(accel_stat::BYTES, c::ACCEL_STAT_BYTES);
        assert_eq!(accel_stat::FALLBACKS, c::ACCEL_STAT_FALLBACKS);
        assert_eq!(accel_stat::INSERT_BUSY, c::ACCEL_STAT_INSERT_BUSY);
        assert_eq!(accel_stat::INSERT_FAILED, c::ACCEL_STAT_INSERT_FAILED);
        assert_eq!(accel_stat::LAST_ERRNO, c::ACCEL_STAT_LAST_ERRNO);
        assert_eq!(accel_stat::RACES_LOST, c::ACCEL_STAT_RACES_LOST);
        assert_eq!(accel_stat::PAUSES, c::ACCEL_STAT_PAUSES);
        assert_eq!(accel_stat::RESUMES, c::ACCEL_STAT_RESUMES);
        assert_eq!(accel_stat::DEMOTED_SMALL, c::ACCEL_STAT_DEMOTED_SMALL);
        assert_eq!(accel_stat::PASSED, c::ACCEL_STAT_PASSED);
        assert_eq!(accel_stat::PASSED_BYTES, c::ACCEL_STAT_PASSED_BYTES);
        assert_eq!(accel_stat::LEFT, c::ACCEL_STAT_LEFT);
        assert_eq!(accel_stat::STUCK, c::ACCEL_STAT_STUCK);
        assert_eq!(accel_stat::LIVE_SOCKETS, c::ACCEL_STAT_LIVE_SOCKETS);
        assert_eq!(accel_stat::MAX, c::ACCEL_STAT_MAX);
    }

    #[test]
    fn relay_counter_indices_match_the_c_enum() {
        assert_eq!(relay_stat::VERDICTS, c::RELAY_STAT_VERDICTS);
        assert_eq!(relay_stat::REDIRECTED, c::RELAY_STAT_REDIRECTED);
        assert_eq!(relay_stat::NO_PEER, c::RELAY_STAT_NO_PEER);
        assert_eq!(relay_stat::DROPPED, c::RELAY_STAT_DROPPED);
        assert_eq!(relay_stat::BYTES, c::RELAY_STAT_BYTES);
        assert_eq!(relay_stat::EVENTS_LOST, c::RELAY_STAT_EVENTS_LOST);
        assert_eq!(relay_stat::MAX, c::RELAY_STAT_MAX);
    }

    #[test]
    fn relay_peer_matches_the_c_layout() {
        assert_eq!(std::mem::size_of::<RelayPeer>(), c::RELAY_PEER_SIZE);
        assert_eq!(std::mem::offset_of!(RelayPeer, peer), c::relay_peer__peer);
        assert_eq!(std::mem::offset_of!(RelayPeer, budget), c::relay_peer__budget);
        assert_eq!(std::mem::offset_of!(RelayPeer, notify), c::relay_peer__notify);
        assert_eq!(std::mem::offset_of!(RelayPeer, taken), c::relay_peer__taken);
        assert_eq!(std::mem::offset_of!(RelayPeer, hold), c::relay_peer__hold);
        assert_eq!(std::mem::offset_of!(RelayPeer, base), c::relay_peer__base);
        assert_eq!(std::mem::offset_of!(RelayPeer, limit), c::relay_peer__limit);
        assert_eq!(std::mem::size_of::<RelayCount>(), c::RELAY_COUNT_SIZE);
        assert_eq!(std::mem::offset_of!(RelayCount, redirected), c::relay_count__redirected);
        assert_eq!(std::mem::offset_of!(RelayCount, parked), c::relay_count__parked);
        assert_eq!(std::mem::offset_of!(RelayCount, next_seq), c::relay_count__next_seq);
        assert_eq!(std::mem::offset_of!(RelayCount, flags), c::relay_count__flags);
        assert_eq!(relay_count_flags::SEQ_KNOWN, c::RELAY_COUNT_SEQ_KNOWN);
        assert_eq!(relay_count_flags::BROKEN, c::RELAY_COUNT_BROKEN);
        assert_eq!(relay_stat::PARKED, c::RELAY_STAT_PARKED);
        assert_eq!(relay_stat::TRIMMED, c::RELAY_STAT_TRIMMED);
        assert_eq!(relay_stat::BROKEN, c::RELAY_STAT_BROKEN);
        assert_eq!(relay_stat::EXTENDED, c::RELAY_STAT_EXTENDED);
    }

    #[test]
    fn steer_structs_match_the_c_layout() {
        use aya::maps::lpm_trie::Key;
        // aya's Key is { prefix_len: u32, data: K }: `struct steer_key` with data at offset 4.
        assert_eq!(std::mem::size_of::<Key<SteerMatch>>(), c::STEER_KEY_SIZE);
        assert_eq!(c::steer_key__prefixlen, 0);
        assert_eq!(4 + std::mem::offset_of!(SteerMatch, family), c::steer_key__family);
        assert_eq!(4 + std::mem::offset_of!(SteerMatch, proto), c::steer_key__proto);
        assert_eq!(4 + std::mem::offset_of!(SteerMatch, port), c::steer_key__port);
        assert_eq!(4 + std::mem::offset_of!(SteerMatch, addr), c::steer_key__addr);

        assert_eq!(std::mem::size_of::<SteerBinding>(), c::STEER_BINDING_SIZE);
        assert_eq!(std::mem::offset_of!(SteerBinding, cookie), c::steer_binding__cookie);
        assert_eq!(std::mem::offset_of!(SteerBinding, pid), c::steer_binding__pid);
        assert_eq!(std::mem::offset_of!(SteerBinding, port_lo), c::steer_binding__port_lo);
        assert_eq!(std::mem::offset_of!(SteerBinding, port_hi), c::steer_binding__port_hi);
        assert_eq!(std::mem::offset_of!(SteerBinding, family), c::steer_binding__family);
        assert_eq!(std::mem::offset_of!(SteerBinding, proto), c::steer_binding__proto);
        assert_eq!(std::mem::offset_of!(SteerBinding, prefixlen), c::steer_binding__prefixlen);
        assert_eq!(std::mem::offset_of!(SteerBinding, target_family), c::steer_binding__target_family);
        assert_eq!(std::mem::offset_of!(SteerBinding, target_port), c::steer_binding__target_port);
        assert_eq!(std::mem::offset_of!(SteerBinding, target_scope), c::steer_binding__target_scope);
        assert_eq!(std::mem::offset_of!(SteerBinding, addr), c::steer_binding__addr);
        assert_eq!(std::mem::offset_of!(SteerBinding, target_addr), c::steer_binding__target_addr);
        assert_eq!(std::mem::offset_of!(SteerBinding, comm), c::steer_binding__comm);

        assert_eq!(std::mem::size_of::<SteerCounters>(), c::STEER_COUNTERS_SIZE);
        assert_eq!(std::mem::offset_of!(SteerCounters, hits), c::steer_counters__hits);
        assert_eq!(std::mem::offset_of!(SteerCounters, refused), c::steer_counters__refused);
    }
}
