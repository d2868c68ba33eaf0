//! The Rust mirror of probes/skrelay.h: counter indices and map key layouts shared with the
//! kernel programs. `tests` below checks it against the header as clang lays it out.

/// Indices of the relay programs' per-CPU counters (`relay_stats`).
pub mod relay_stat {
    pub const VERDICTS: u32 = 0;
    pub const REDIRECTED: u32 = 1;
    pub const NO_PEER: u32 = 2;
    pub const DROPPED: u32 = 3;
    pub const BYTES: u32 = 4;
    pub const MAX: u32 = 5;
}

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

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(non_upper_case_globals)]
    mod c {
        include!(concat!(env!("OUT_DIR"), "/c_layout.rs"));
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
    fn relay_counter_indices_match_the_c_enum() {
        assert_eq!(relay_stat::VERDICTS, c::RELAY_STAT_VERDICTS);
        assert_eq!(relay_stat::REDIRECTED, c::RELAY_STAT_REDIRECTED);
        assert_eq!(relay_stat::NO_PEER, c::RELAY_STAT_NO_PEER);
        assert_eq!(relay_stat::DROPPED, c::RELAY_STAT_DROPPED);
        assert_eq!(relay_stat::BYTES, c::RELAY_STAT_BYTES);
        assert_eq!(relay_stat::MAX, c::RELAY_STAT_MAX);
    }
}
