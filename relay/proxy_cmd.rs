//! `skrelay proxy`: splice each client to a fresh connection to an upstream.
use crate::{
    cli::ProxyArgs,
    datapath,
    error::Error,
    metrics::{self, Metrics},
    relay_cmd::{funnel, loops, metrics_note, open, say_notes, serving, Listening, Opened},
    server::{Partnering, Server, ServerConfig},
    steer::PortList,
    sys,
    upstream::Upstreams,
};
use std::net::{IpAddr, SocketAddr};

pub fn run(args: ProxyArgs) -> Result<(), Error> {
    // Known for a relay or proxy by other skrelay commands under any binary name.
    crate::sys::name_this_process(c"skrelay");
    crate::sys::CARRIES_CONNECTIONS.store(true, std::sync::atomic::Ordering::Relaxed);
    // A stop signal during a name lookup ends the process at once (nothing is set up yet); held
    // from here, a resolver that does not answer held it for its whole timeout.
    let mut upstreams = Upstreams::resolve(&args.upstreams)?;
    // Until the event loop handles them (`Server::new`).
    let held = crate::sys::StopSignalsHeld::new();
    let serves: Vec<u16> =
        std::iter::once(args.listen.port()).chain(upstreams.addrs().iter().map(|u| u.port())).collect();
    let Opened {
        threads,
        datapaths,
        listening: Listening { listener, metrics: taken_metrics, handover, named },
        notes,
    } = open("proxy", &serves, args.listen, args.listen_given, &args.common, &args.ports)
        .map_err(|e| held.keep_if_stopped(e))?;
    let datapath = datapaths[0].name();
    let addr = listener.local_addr().unwrap_or(args.listen);
    let dual_stack = addr.is_ipv6() && !sys::v6only(&listener);
    for &up in upstreams.addrs() {
        if let Some(how) = loops_back(up, addr, dual_stack, args.ports.ports.as_ref()) {
            return Err(Error::Usage(format!(
                "cannot proxy to upstream {up}: {how}, so every client would loop back into the proxy \
                 (give --upstream the address of the server to proxy to)"
            )));
        }
        // The metrics responder is no server to proxy to either.
        if let Some(m) = args.common.metrics {
            if loops_back(up, m, m.is_ipv6(), None).is_some() {
                return Err(Error::Usage(format!(
                    "cannot proxy to upstream {up}: it is this proxy's own --metrics address ({m}), so every client \
                     would be proxied into the metrics responder (give --upstream the address of the server to \
                     proxy to, or --metrics another port)"
                )));
            }
        }
    }
    crate::relay_cmd::metrics_outside_ports(
        args.common.metrics,
        addr,
        dual_stack,
        args.ports.ports.as_ref(),
        "proxied upstream",
    )?;
    let metrics = Metrics::new(&metrics::datapath_labels(datapath));
    upstreams.count_in(metrics.clone());
    let served = metrics::start(args.common.metrics, &metrics, taken_metrics)?;
    let _funnel = match &args.ports.ports {
        Some(ports) => Some(funnel(&listener, addr, ports)?),
        None => None,
    };
    say_notes(notes);
    datapath::note_host_settings(&datapaths);
    let listening = format!(
        "listening on {addr}: proxying to {upstreams}, {datapath} datapath, {}{}",
        loops(threads),
        metrics_note(served)
    );
    let config = ServerConfig {
        listen: args.listen,
        partnering: Partnering::Upstreams { upstreams, connect_timeout: args.connect_timeout },
        max_pending: args.max_pending as usize,
        pair_timeout: args.connect_timeout,
        drain_timeout: args.common.drain_timeout,
        idle_timeout: args.common.idle_timeout,
        metrics,
    };
    // Said once the event loops exist: a process short of descriptors failed after it.
    let mut server = Server::new(listener, datapaths, config)?;
    drop(held);
    crate::relay_cmd::check_descriptors()?;
    // Before the start line, except after a takeover's commit (see relay_cmd.rs).
    let taking_over = handover.is_some();
    if !taking_over {
        crate::relay_cmd::warn_if_taken_away(addr, named);
    }
    log::info!("{listening}");
    serving(&mut server, handover, addr)?;
    if taking_over {
        crate::relay_cmd::warn_if_taken_away(addr, named);
    }
    server.run()
}

/// How a connection to `upstream` would reach this proxy's own listener (bound at `listen`,
/// taking IPv4 too when `dual_stack`) or its `--ports` funnel; None when it would not.
pub fn loops_back(
    upstream: SocketAddr,
    listen: SocketAddr,
    dual_stack: bool,
    ports: Option<&PortList>,
) -> Option<String> {
    // Linux connects 0.0.0.0 and :: to the loopback address; ::ffff:a.b.c.d is a.b.c.d.
    let ip = match upstream.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    // A listener (or metrics responder) on [::ffff:a.b.c.d] is one on a.b.c.d for this purpose.
    let listen = crate::sys::unmapped(listen);
    // The upstream as a connection would reach it, with its interface (scope id) if it is
    // link-local: without it a link-local upstream looked foreign, and one that was this proxy's
    // own address under a wildcard listener or its --ports was caught only at run time, one
    // reset per client (an IPv6 stranger pass).
    let target = match (ip, upstream) {
        (IpAddr::V6(v6), SocketAddr::V6(u)) => {
            SocketAddr::V6(std::net::SocketAddrV6::new(v6, u.port(), 0, u.scope_id()))
        }
        (ip, u) => SocketAddr::new(ip, u.port()),
    };
    let port = upstream.port();
    // The listening socket itself.
    let listener_takes = if listen.ip().is_unspecified() {
        (ip.is_ipv6() == listen.is_ipv6() || (dual_stack && ip.is_ipv4())) && crate::sys::is_local_address(target)
    } else {
        crate::sys::same_local_ip(target, listen)
    };
    if port == listen.port() && listener_takes {
        return Some(format!("it is this proxy's own listening address ({listen})"));
    }
    if ports.is_some_and(|p| crate::relay_cmd::steered_here(target, listen, dual_stack, p)) {
        return Some(format!("--ports steers port {port} at that address to this proxy"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn upstreams_that_reach_our_own_listener_are_found() {
        let ports: PortList = "7,8000-8999".parse().unwrap();
        let l = a("127.0.0.1:7777");
        assert!(loops_back(a("127.0.0.1:7777"), l, false, None).is_some());
        assert!(loops_back(a("0.0.0.0:7777"), l, false, None).is_some());
        assert!(loops_back(a("[::ffff:127.0.0.1]:7777"), l, false, None).is_some());
        assert!(loops_back(a("127.0.0.2:7777"), l, false, None).is_none(), "another address");
        assert!(loops_back(a("127.0.0.1:7778"), l, false, None).is_none());
        assert!(loops_back(a("127.0.0.1:8080"), l, false, Some(&ports)).is_some());
        assert!(loops_back(a("127.0.0.1:9000"), l, false, Some(&ports)).is_none());
        let any = a("0.0.0.0:7777");
        assert!(loops_back(a("127.0.0.9:7777"), any, false, None).is_some(), "all of 127/8 is local");
        assert!(loops_back(a("127.0.0.9:7"), any, false, Some(&ports)).is_some());
        assert!(loops_back(a("192.0.2.1:7777"), any, false, None).is_none(), "not a local address");
        let any6 = a("[::]:7777");
        assert!(loops_back(a("127.0.0.1:7777"), any6, true, None).is_some(), "dual-stack");
        assert!(loops_back(a("127.0.0.1:7777"), any6, false, None).is_none(), "v6only");
        // A dual-stack [::]'s --ports funnel takes IPv4 too.
        assert!(loops_back(a("127.0.0.1:8080"), any6, true, Some(&ports)).is_some(), "dual-stack --ports");
        assert!(loops_back(a("[::ffff:127.0.0.1]:8080"), any6, true, Some(&ports)).is_some(), "mapped, --ports");
        assert!(loops_back(a("127.0.0.1:8080"), any6, false, Some(&ports)).is_none(), "v6only --ports");
    }
}
