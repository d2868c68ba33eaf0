//! The proxy's upstreams: resolved once at start-up, tried round-robin, and an upstream that
//! refused or timed out is skipped for a while.
use crate::{error::Error, metrics::Metrics};
use std::{
    fmt,
    net::{SocketAddr, ToSocketAddrs},
    time::{Duration, Instant},
};

/// How long an upstream that failed is skipped.
pub const DOWN_FOR: Duration = Duration::from_secs(10);

pub struct Upstreams {
    addrs: Vec<SocketAddr>,
    down_until: Vec<Option<Instant>>,
    next: usize,
    metrics: Option<Metrics>,
}

impl Upstreams {
    /// Resolves each `--upstream` (IPv4, IPv6 or HOST:PORT). Every address a name resolves to
    /// becomes an upstream of its own, so `localhost:80` covers both ::1 and 127.0.0.1.
    pub fn resolve(specs: &[String]) -> Result<Upstreams, Error> {
        let mut addrs = Vec::new();
        for spec in specs {
            let spec = spec.trim();
            if let Some(e) = crate::cli::unknown_scope(spec).or_else(|| crate::cli::misbracketed(spec)) {
                return Err(Error::Usage(format!("upstream {e}")));
            }
            let bare = spec.trim_start_matches('[').trim_end_matches(']');
            // `[fe80::1%eth0]` too (its scope kept it from parsing as an address).
            if !spec.contains(':') || bare.parse::<std::net::IpAddr>().is_ok() || spec.ends_with(']') {
                return Err(Error::Usage(format!(
                    "upstream `{spec}` has no port (give HOST:PORT, IP:PORT or [IPv6]:PORT)"
                )));
            }
            // Worded as every other address flag words it (it was "cannot resolve ...: invalid
            // port value"; a re-check pass).
            if spec.ends_with(':') {
                return Err(Error::Usage(format!(
                    "upstream `{spec}` has no port (give HOST:PORT, IP:PORT or [IPv6]:PORT)"
                )));
            }
            if let Some((_, port)) = spec.rsplit_once(':').filter(|(_, p)| crate::cli::port_number(p).is_none()) {
                return Err(Error::Usage(format!("upstream `{spec}`: `{port}` is not a port (ports are 1 to 65535)")));
            }
            let resolved: Vec<SocketAddr> = crate::cli::numeric_scope(spec)
                .to_socket_addrs()
                .map_err(|e| {
                    Error::Usage(format!(
                        "cannot resolve upstream `{spec}`: {e} (give HOST:PORT, IP:PORT or [IPv6]:PORT)"
                    ))
                })?
                .collect();
            if resolved.is_empty() {
                return Err(Error::Usage(format!("upstream `{spec}` resolves to no address")));
            }
            if resolved.iter().any(|a| a.port() == 0) {
                return Err(Error::Usage(format!(
                    "upstream `{spec}` has port 0, which nothing can be connected to (give the port the upstream listens on)"
                )));
            }
            let unscoped_link_local = |a: &SocketAddr| match a {
                SocketAddr::V6(v6) => v6.scope_id() == 0 && v6.ip().segments()[0] & 0xffc0 == 0xfe80,
                SocketAddr::V4(_) => false,
            };
            if let Some(a) = resolved.iter().find(|a| unscoped_link_local(a)) {
                return Err(Error::Usage(format!(
                    "upstream `{spec}` ({a}) is a link-local IPv6 address without its interface, which no connection can \
                     reach (give [{}%eth0]:{}, with the interface `ip addr` names)",
                    a.ip(),
                    a.port()
                )));
            }
            let no_tcp_peer = |a: &SocketAddr| match a.ip() {
                std::net::IpAddr::V4(ip) => ip.is_multicast() || ip.is_broadcast(),
                std::net::IpAddr::V6(ip) => ip.is_multicast(),
            };
            if let Some(a) = resolved.iter().find(|a| no_tcp_peer(a)) {
                return Err(Error::Usage(format!(
                    "upstream `{spec}` ({a}) is a multicast or broadcast address, which no TCP connection can \
                     reach (give the address of the server to proxy to)"
                )));
            }
            for a in resolved {
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
        }
        Ok(Upstreams::new(addrs))
    }

    pub fn new(addrs: Vec<SocketAddr>) -> Upstreams {
        let n = addrs.len();
        Upstreams { addrs, down_until: vec![None; n], next: 0, metrics: None }
    }

    /// Counts connects in `metrics` from now on (`skrelay_upstream_up`, `..._connect_failures_total`).
    pub fn count_in(&mut self, metrics: Metrics) {
        for &a in &self.addrs {
            metrics.upstream_known(a);
        }
        self.metrics = Some(metrics);
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn addr(&self, idx: usize) -> SocketAddr {
        self.addrs[idx]
    }

    /// The upstreams to try for one new client, in order: round-robin from the next one, those
    /// not marked down first. Down ones come last rather than never, so a client is only reset
    /// when every upstream has failed it.
    pub fn plan(&mut self, now: Instant) -> Vec<usize> {
        let n = self.addrs.len();
        let start = self.next;
        let order = (0..n).map(|i| (start + i) % n);
        let (up, down): (Vec<usize>, Vec<usize>) = order.partition(|&i| self.down_until[i].is_none_or(|t| t <= now));
        // The turn passes to the one after the upstream this client gets first.
        self.next = (up.first().copied().unwrap_or(start) + 1) % n;
        up.into_iter().chain(down).collect()
    }

    /// A connect to upstream `idx` failed: it is skipped for `DOWN_FOR`.
    /// Marks upstream `idx` down for `DOWN_FOR`; true if it was up (so the caller says so once,
    /// not once per client that finds it down).
    pub fn mark_down(&mut self, idx: usize, now: Instant) -> bool {
        let was_up = self.down_until[idx].is_none_or(|until| now >= until);
        self.down_until[idx] = Some(now + DOWN_FOR);
        if let Some(m) = &self.metrics {
            m.upstream_connected(self.addrs[idx], false);
        }
        was_up
    }

    /// A connect to upstream `idx` succeeded (for the metrics; the turn order is unchanged).
    /// True when it had been marked down since its last success: it is back.
    pub fn mark_up(&mut self, idx: usize) -> bool {
        if let Some(m) = &self.metrics {
            m.upstream_connected(self.addrs[idx], true);
        }
        self.down_until[idx].take().is_some()
    }
}

impl fmt::Display for Upstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.addrs.iter().map(|a| a.to_string()).collect();
        f.write_str(&list.join(", "))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_link_local_upstream_without_its_interface_is_refused_with_the_fix() {
        let e = super::Upstreams::resolve(&["[fe80::1]:80".into()]).err().unwrap().to_string();
        assert!(e.contains("link-local IPv6 address without its interface") && e.contains("[fe80::1%eth0]:80"), "{e}");
        assert!(super::Upstreams::resolve(&["[fe80::1%1]:80".into()]).is_ok());
        assert!(super::Upstreams::resolve(&["[::1]:80".into()]).is_ok());
    }

    use super::*;

    fn ups(n: u16) -> Upstreams {
        Upstreams::new((0..n).map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i))).collect())
    }

    #[test]
    fn round_robin_with_down_ones_last() {
        let mut u = ups(3);
        let now = Instant::now();
        assert_eq!(u.plan(now), vec![0, 1, 2]);
        assert_eq!(u.plan(now), vec![1, 2, 0]);
        u.mark_down(0, now);
        assert_eq!(u.plan(now), vec![2, 1, 0]);
        assert_eq!(u.plan(now), vec![1, 2, 0]);
        assert_eq!(u.plan(now), vec![2, 1, 0]);
        // after DOWN_FOR it is back in turn
        assert_eq!(u.plan(now + DOWN_FOR), vec![0, 1, 2]);
        assert_eq!(u.plan(now + DOWN_FOR), vec![1, 2, 0]);
        assert_eq!(u.plan(now + DOWN_FOR), vec![2, 0, 1]);
    }

    #[test]
    fn names_resolve_and_bad_ones_are_start_up_errors() {
        let u = Upstreams::resolve(&["127.0.0.1:80".into(), "[::1]:81".into(), "localhost:82".into()]).unwrap();
        assert!(u.addrs.len() >= 3, "{u}");
        let e = Upstreams::resolve(&["no-such-host.invalid:80".into()]).err().unwrap().to_string();
        assert!(e.contains("cannot resolve upstream `no-such-host.invalid:80`"), "{e}");
        for (spec, port) in
            [("[::1]:abc", "abc"), ("localhost:+80", "+80"), ("localhost:99999", "99999"), ("[::1]:-1", "-1")]
        {
            let e = Upstreams::resolve(&[spec.into()]).err().unwrap().to_string();
            assert!(e.contains(&format!("upstream `{spec}`: `{port}` is not a port (ports are 1 to 65535)")), "{e}");
        }
        for no_port in ["127.0.0.1", "localhost", "::1", "[::1]", "[fe80::1%1]", "[::1]:", "localhost:"] {
            let e = Upstreams::resolve(&[no_port.into()]).err().unwrap().to_string();
            assert!(e.contains(&format!("upstream `{no_port}` has no port")), "{e}");
        }
        let e = Upstreams::resolve(&["localhost:0".into()]).err().unwrap().to_string();
        assert!(e.contains("upstream `localhost:0` has port 0"), "{e}");
    }
}
