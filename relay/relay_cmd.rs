//! `skrelay relay`: pair clients of one listener and splice each pair.
use crate::{
    cli::{PairBy, RelayArgs},
    datapath,
    error::Error,
    metrics::{self, Metrics},
    server::{self, Partnering, Server, ServerConfig},
    steer::{self, Funnel},
    systemd,
};
use mio::net::TcpListener;
use std::net::SocketAddr;

pub fn run(args: RelayArgs) -> Result<(), Error> {
    let datapath = datapath::open(args.common.datapath, args.common.kernel_after)?;
    let listener = listener(args.listen)?;
    let addr = listener.local_addr().unwrap_or(args.listen);
    let metrics = Metrics::new(&metrics::datapath_labels(datapath.name()));
    metrics.set_inflight_sampler(datapath.inflight_sampler());
    let served = metrics::start(args.common.metrics, &metrics)?;
    let config = ServerConfig {
        listen: args.listen,
        partnering: Partnering::Clients(args.pair),
        max_pending: args.max_pending as usize,
        pair_timeout: args.pair_timeout,
        drain_timeout: args.common.drain_timeout,
        metrics,
    };
    // Attached before the first log line so "listening" means every port is served; dropped
    // (detached) when run() returns, and by the kernel if the process dies.
    let _funnel = match &args.ports.ports {
        Some(ports) => Some(funnel(&listener, addr, ports)?),
        None => None,
    };
    let pairing = match args.pair {
        PairBy::Order => "pairing clients in arrival order",
        PairBy::Token => "pairing clients by their token line",
    };
    log::info!("listening on {addr}: {pairing}, {} datapath{}", datapath.name(), metrics_note(served));
    let server = Server::new(listener, datapath, config)?;
    systemd::notify(&format!("READY=1\nSTATUS=listening on {addr}"));
    server.run()
}

/// The listening socket: the one systemd passed (socket activation), else `listen` bound now.
pub fn listener(listen: SocketAddr) -> Result<TcpListener, Error> {
    match systemd::listener()? {
        Some(l) => {
            let addr = l.local_addr().map_or("?".into(), |a| a.to_string());
            log::info!("serving the socket systemd passed ({addr}); --listen is not used");
            Ok(TcpListener::from_std(l))
        }
        None => server::listen(listen),
    }
}

/// The start line's mention of `--metrics`.
pub fn metrics_note(served: Option<std::net::SocketAddr>) -> String {
    served.map(|a| format!("; metrics at http://{a}/metrics")).unwrap_or_default()
}

/// `--ports`: steers the listed ports to the listener, warning about sockets it shadows.
pub fn funnel(
    listener: &impl std::os::fd::AsFd,
    addr: std::net::SocketAddr,
    ports: &steer::PortList,
) -> Result<Funnel, Error> {
    for other in steer::funnel::shadowed(addr, ports) {
        log::warn!(
            "port {}: {other} is served by another socket; skrelay takes its connections while it runs",
            other.port()
        );
    }
    let funnel = Funnel::attach(listener, addr, ports)?;
    log::info!("--ports: {} ports ({ports}) steered to {addr} with BPF sk_lookup", funnel.ports());
    Ok(funnel)
}
